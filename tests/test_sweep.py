"""experiments.sweep on Ray Tune: trials are run directories, a killed trial is retried from its checkpoint,
a re-run trains nothing, and experiments.report summarises the sweep."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import HANG_GUARD_S

from experiments.checkpoint import list_checkpoints, read_meta
from experiments.sweeping import load_spec, train_args, trial_name

pytestmark = pytest.mark.slow

SPEC = {
    "name": "tiny",
    "max_concurrent": 2,
    "grid": {"task": ["cartpole-balance", "cartpole-swingup"], "seed": [0]},
    "base": {
        "modalities": ["proprio", "action_history"], "n_envs": 2, "action_repeat": 8, "total_steps": 192,
        "eval_freq": 96, "checkpoint_freq": 32, "eval_episodes": 1, "eval_video": False, "state_probe": False,
        "perceiver_log_freq": 0, "algo.n_steps": 16, "algo.batch_size": 32, "perceiver.num_latents": 8,
        "perceiver.latent_dim": 32,
    },
}  # fmt: skip


def test_spec_validation_and_flags(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"grid": {"learning_rat": [1]}}))
    with pytest.raises(ValueError, match="unknown sweep field 'learning_rat'"):
        load_spec(path)
    assert train_args({"algo.n_steps": 16, "modalities": ["proprio"], "seed": 1}) == [
        "--modalities", "proprio", "--seed", "1", "--algo", "n_steps=16"]  # fmt: skip
    assert trial_name({"task": "cartpole-balance", "seed": 0}) == "seed=0,task=cartpole-balance"


def _train_pids(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "experiments.train" in cmdline and marker in cmdline:
                pids.append(int(proc.name))
    return pids


def test_sweep_retries_a_killed_trial_from_its_checkpoint_and_a_rerun_trains_nothing(tmp_path):
    pytest.importorskip("ray")
    spec = {**SPEC, "run_dir": str(tmp_path / "sweeps")}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(spec))
    command = [sys.executable, "-m", "experiments.sweep", str(tmp_path / "tiny.yaml")]
    env = {**os.environ, "MUJOCO_GL": "egl", "RAY_DEDUP_LOGS": "0"}
    sweep = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = tmp_path / "sweeps" / "tiny" / "seed=0,task=cartpole-balance"
    deadline = time.time() + HANG_GUARD_S
    while time.time() < deadline and not list_checkpoints(victim / "checkpoints"):
        time.sleep(0.5)
    killed = False
    while time.time() < deadline and not killed:  # kill it mid-run, after its first checkpoint
        for pid in _train_pids(victim.name):
            os.kill(pid, signal.SIGKILL)
            killed = True
        time.sleep(0.2)
    output, _ = sweep.communicate(timeout=HANG_GUARD_S)
    assert killed and sweep.returncode == 0, output[-3000:]
    assert "2 trials done, 0 failed" in output
    for run in (tmp_path / "sweeps" / "tiny").glob("seed=*"):
        if run.is_dir():
            assert read_meta(list_checkpoints(run / "checkpoints")[-1])["step"] >= 192, run
    assert "resuming" in (victim.parent / f"{victim.name}.log").read_text()  # the retry continued the run

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert again.returncode == 0 and "2 trials done" in again.stdout, again.stdout[-2000:]
    for log in (tmp_path / "sweeps" / "tiny").glob("*.log"):
        assert log.read_text().rstrip().endswith("(pass a larger --total-steps to continue)"), log

    report = subprocess.run(
        [sys.executable, "-m", "experiments.report", str(tmp_path / "sweeps" / "tiny"), "--out", str(tmp_path / "report")],
        capture_output=True, text=True, timeout=HANG_GUARD_S, env=env,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr[-2000:]
    assert (tmp_path / "report" / "curves.png").exists() and (
        tmp_path / "report" / "performance_profile.png"
    ).exists()
    assert "## cartpole-swingup" in (tmp_path / "report" / "report.md").read_text()
