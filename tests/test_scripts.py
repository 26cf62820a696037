"""The study scripts run the commands their sweep specs print, quoting intact (a fake interpreter records them)."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import HANG_GUARD_S

ROOT = Path(__file__).parents[1]


def fake_python(tmp_path: Path) -> tuple[Path, Path]:
    """An interpreter that runs `-m experiments.sweep` for real and records every other call's argv."""
    records = tmp_path / "calls"
    records.mkdir()
    fake = tmp_path / "fakepy"
    fake.write_text(
        f'#!/bin/sh\nif [ "$2" = "experiments.sweep" ]; then exec {sys.executable} "$@"; fi\n'
        f'printf "%s\\n" "$@" > "{records}/$$.args"\n'
    )
    fake.chmod(0o755)
    return fake, records


def calls(records: Path) -> list[list[str]]:
    return [p.read_text().splitlines() for p in sorted(records.glob("*.args"))]


def test_reproduce_results_runs_the_specs_commands(tmp_path):
    fake, records = fake_python(tmp_path)
    env = {**os.environ, "PY": str(fake), "RUNS": str(tmp_path / "runs"), "JOBS": "2", "SEEDS": "0"}
    subprocess.run(["bash", "experiments/scripts/reproduce_results.sh", "latents"], cwd=ROOT, env=env, check=True,
                   capture_output=True, text=True, timeout=HANG_GUARD_S)  # fmt: skip
    argvs = calls(records)
    assert len(argvs) == 10  # five variants, one seed, two tasks (cartpole-swingup, walker-walk)
    assert any("latents-walker-k4-s0" in a for a in argvs)
    scaled = next(a for a in argvs if "latents-swingup-scaled-s0" in a)
    assert scaled[:2] == ["-m", "experiments.train"] and "latent_scaling=[4, 8, 16, 32]" in scaled
    assert (
        not (tmp_path / "runs" / "errors.log").exists()
        or "FAILED" not in (tmp_path / "runs" / "errors.log").read_text()
    )
    bad = subprocess.run(["bash", "experiments/scripts/reproduce_results.sh", "fuse,fuse-drqq"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=HANG_GUARD_S)  # fmt: skip
    assert bad.returncode == 2 and "unknown study 'fuse-drqq'; valid: states, pixels," in bad.stderr
    assert "fuse-drq, remember" in bad.stderr and not calls(records)[len(argvs) :]  # nothing started


def test_reproduce_results_runs_study_2_under_drqs_recipe(tmp_path):
    fake, records = fake_python(tmp_path)
    env = {**os.environ, "PY": str(fake), "RUNS": str(tmp_path / "runs"), "JOBS": "2", "SEEDS": "0"}
    subprocess.run(["bash", "experiments/scripts/reproduce_results.sh", "fuse-drq"], cwd=ROOT, env=env, check=True,
                   capture_output=True, text=True, timeout=HANG_GUARD_S)  # fmt: skip
    argvs = {a[a.index("--run-name") + 1]: a for a in calls(records)}
    assert set(argvs) == {"study2-drq-perceiver-conv-online-target-s0", "study2-drq-cnn-s0",
                          "study2-drq-perceiver-conv-online-target-full-s0",
                          "study2-drq-perceiver-conv-online-target-mix-camera-s0",
                          "study2-drq-perceiver-conv-online-target-groups-s0",
                          "study2-drq-perceiver-conv-online-queries-enc-lr0.3-s0",
                          "study2-drq-perceiver-conv-online-queries-enc-lr0.3-bf16-s0",
                          "study2-drq-perceiver-conv-online-queries-enc-lr0.3-aux1-s0"}  # fmt: skip
    # the mix reaches train as one argument
    mix = argvs["study2-drq-perceiver-conv-online-target-mix-camera-s0"]
    spec = "all=0.4 pixels+proprio=0.2 pixels+action_history=0.2 pixels=0.2"
    assert mix[mix.index("--modality-mix") + 1] == spec
    assert "missing_tokens=mask" in mix and "target_encoder=online" in mix
    full = argvs["study2-drq-perceiver-conv-online-target-full-s0"]
    assert full[full.index("--proprio") + 1] == "full" and "target_encoder=online" in full
    assert argvs["study2-drq-cnn-s0"][argvs["study2-drq-cnn-s0"].index("--proprio") + 1] == "robot"
    groups = argvs["study2-drq-perceiver-conv-online-target-groups-s0"]
    assert "latent_groups={'pixels': 16, 'proprio': 8, 'action_history': 8}" in groups
    assert "--modality-mix" not in groups
    # the best pixels-only settings, read from pixels-drq.yaml (`from:` in the spec), with study 2's base
    best = argvs["study2-drq-perceiver-conv-online-queries-enc-lr0.3-s0"]
    assert "critic_head=queries" in best and "encoder_lr_scale=0.3" in best
    assert "pixel_tokenizer=conv" in best and "lr_warmup=100" in best and "target_encoder=online" in best
    # its bf16 twin differs by the Perceiver's dtype alone
    bf16 = argvs["study2-drq-perceiver-conv-online-queries-enc-lr0.3-bf16-s0"]
    assert [a for a in bf16 if a not in best] == [
        "dtype=bfloat16",
        "study2-drq-perceiver-conv-online-queries-enc-lr0.3-bf16-s0",
    ]
    assert best[best.index("--proprio") + 1] == "robot"


def gpu_session_env(tmp_path: Path, fake: Path, **overrides: str) -> dict[str, str]:
    """gpu_session.sh's environment with the fake interpreter, no tables and no GPU tests."""
    return {**os.environ, "PY": str(fake), "OUT": str(tmp_path / "out"), "RUNS": str(tmp_path / "gpu"),
            "BENCH_LIMIT": "0", "GPU_TESTS": "0", "TRAIN_UNTIL": "120", **overrides}  # fmt: skip


def test_gpu_session_trains_the_named_spec_runs_on_the_gpu(tmp_path):
    # TRAIN_UNTIL well past the fake run's life: the script waits for it to exit. A deadline that can pass before
    # the fake has written its record (the script's own start-up takes seconds) would SIGTERM it first.
    fake, records = fake_python(tmp_path)
    env = gpu_session_env(tmp_path, fake, PROBE_LIMIT="0", GPU_RUNS="drq128-swingup-perceiver-center-s1")
    subprocess.run(["bash", "experiments/scripts/gpu_session.sh"], cwd=ROOT, env=env, check=True,
                   capture_output=True, text=True, timeout=HANG_GUARD_S)  # fmt: skip
    (argv,) = [a for a in calls(records) if "experiments.train" in a]
    assert "drq128-swingup-perceiver-center-s1" in argv and "center_features=True" in argv
    assert argv[argv.index("--device") + 1] == "cuda"
    bad = subprocess.run(["bash", "experiments/scripts/gpu_session.sh"], cwd=ROOT, capture_output=True, text=True,
                         env={**env, "GPU_RUNS": "nope"}, timeout=HANG_GUARD_S)  # fmt: skip
    assert bad.returncode == 2 and "unknown run 'nope' in GPU_RUNS" in bad.stderr


def test_gpu_session_default_runs_exist_and_eval_args_reach_evaluate(tmp_path):
    fake, records = fake_python(tmp_path)
    env = gpu_session_env(tmp_path, fake, PROBE_LIMIT="60", EVAL_ARGS="--episodes 3 --reliance")
    env.pop("GPU_RUNS", None)
    subprocess.run(["bash", "experiments/scripts/gpu_session.sh"], cwd=ROOT, env=env, check=True,
                   capture_output=True, text=True, timeout=HANG_GUARD_S)  # fmt: skip
    argvs = calls(records)
    trained = sorted(a[a.index("--run-name") + 1] for a in argvs if "experiments.train" in a)
    cup_perceiver = "drq128-cup-perceiver-conv-online-queries-enc-lr0.3-s0"
    assert trained == ["drq128-cup-cnn-s0", cup_perceiver, "drq512-swingup-cnn-s0"]
    cup = next(a for a in argvs if cup_perceiver in a)
    assert cup[cup.index("--preset") + 1] == "ball_in_cup-catch-pixels" and "encoder_lr_scale=0.3" in cup
    evaluated = [a for a in argvs if "experiments.evaluate" in a]
    assert len(evaluated) == 3
    assert all(a[-3:] == ["--episodes", "3", "--reliance"] for a in evaluated)
