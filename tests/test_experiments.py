"""The real commands in subprocesses, with tiny budgets, exactly as a user types them."""

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import HANG_GUARD_S
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from experiments.checkpoint import average_checkpoint, best_checkpoint, list_checkpoints, read_meta
from experiments.config import load_yaml

pytestmark = pytest.mark.slow

TINY = [
    "--image-size",
    "32",
    "--n-envs",
    "2",
    "--eval-episodes",
    "1",
    "--action-repeat",
    "8",
]
TINY_PERCEIVER = ["--perceiver", "num_latents=8", "latent_dim=32", "fourier_bands=4", "patch_size=8"]
REQUIRED_TAGS = {
    "eval/return_mean",
    "eval/return_std",
    "charts/frames",
    "perf/latency_p50_ms",
    "perf/latency_p95_ms",
    "perf/cross_attn_gflops",
    "perf/memory_mb",
    "perf/steps_per_sec",
    "perceiver/attention_entropy",
    "perceiver/modality_balance/pixels",
    "perceiver/gate/proprio",
    "perceiver/fourier_drift/pixels",
    "perceiver/input_drift/pixels",
    "hparams/final_eval_return",
}


def cli(*args, check=True, timeout=HANG_GUARD_S, **kwargs):
    env = {**os.environ, "MUJOCO_GL": "egl", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, env=env, **kwargs
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def wait_for_checkpoints(process: subprocess.Popen, folder: Path, count: int = 1) -> None:
    """Until the running command has written `count` checkpoints, however loaded the host (a fixed deadline made
    these tests fail on a slow CI host): fails at once, with its output, if the command ends first."""
    for _ in range(HANG_GUARD_S * 5):  # polls every 0.2 s; the bound only ends a hang
        if len(list_checkpoints(folder)) >= count:
            return
        if process.poll() is not None:
            _, stderr = process.communicate()
            raise AssertionError(
                f"the run ended ({process.returncode}) before {count} checkpoint(s): {stderr!s:.2000}"
            )
        time.sleep(0.2)
    raise AssertionError(f"no {count} checkpoint(s) within the hang guard")


def ppo_run(root, name: str, total_steps: int, every: int = 1000, *extra: str) -> list[str]:
    """A tiny training command (PPO unless `extra` says otherwise): evals and checkpoints every `every` agent steps,
    no video, and no reliance probe unless `extra` asks for one (it re-runs the policy 1 + 2 × modalities times
    per evaluation step; its own tests are the trained_run fixture's and tests/test_fusion.py)."""
    policy_type = extra[extra.index("--policy-type") + 1] if "--policy-type" in extra else "perceiver"
    perceiver = (
        TINY_PERCEIVER if policy_type == "perceiver" else []
    )  # other policies refuse Perceiver options
    reliance = [] if "--reliance" in extra else ["--reliance", "false"]
    return [
        "experiments.train", "--task", "cartpole-balance", *TINY, *perceiver, "--algo", "n_steps=16",
        "batch_size=32", "--total-steps", str(total_steps), "--eval-freq", str(every), "--checkpoint-freq",
        str(every), "--eval-video", "false", "--run-dir", str(root), "--run-name", name, "--progress-bar", "false",
        *reliance, *extra,
    ]  # fmt: skip


def tags(run_dir: Path) -> dict:
    accumulator = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def test_an_error_mid_run_checkpoints_what_was_trained(tmp_path, monkeypatch, capsys):
    """A bug in any callback (here the Perceiver's logging) stops the run with its traceback, after a checkpoint
    at the step it reached, and says how to go on."""
    from experiments import callbacks, train

    def broken(self):
        raise ValueError("a broken logger")

    monkeypatch.setattr(callbacks.PerceiverMetricsCallback, "_fire", broken)
    code = train.main(ppo_run(tmp_path, "run", 64, 1000, "--perceiver-log-freq", "32")[1:])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" in err and "error: training stopped at step 32 by ValueError: a broken logger" in err
    assert f"continue with: python -m experiments.train --resume {tmp_path / 'run'}" in err
    assert [read_meta(c)["step"] for c in list_checkpoints(tmp_path / "run" / "checkpoints")] == [32]


@pytest.mark.parametrize("tokenizer", ["conv", "keypoints", "no pixels"])
def test_conv_and_keypoint_tokens_log_their_attention_on_the_frames(tmp_path, tokenizer):
    """A run with conv tokens logs its attention maps (one (Hp, Wp) map over the stacked frames, drawn over each
    frame), one with keypoint tokens its keypoints where they sit, instead of stopping at the first log step; a
    run without a camera logs its other Perceiver metrics and no frame image."""
    name = tokenizer.replace(" ", "-")
    if tokenizer == "no pixels":
        extra = ["--modalities", "proprio", "action_history", "--perceiver-log-freq", "16"]
    else:
        extra = ["--perceiver", "num_latents=8", "latent_dim=32", "fourier_bands=4", f"pixel_tokenizer={tokenizer}",
                 "conv_strides=[2, 2, 2]", "--perceiver-log-freq", "16"]  # fmt: skip
    cli(*ppo_run(tmp_path, name, 32, 1000, *extra))
    logged = tags(tmp_path / name).Tags()
    assert ("perceiver/attention_on_frame" in logged["images"]) == (tokenizer != "no pixels")
    assert "perceiver/attention_entropy" in logged["scalars"]


@pytest.mark.parametrize("algorithm", ["ppo", "a2c", "sac"])
def test_train_creates_run_directory_events_and_checkpoint(tmp_path, algorithm):
    extra = (
        ["--algo", "learning_starts=32", "batch_size=16"] if algorithm == "sac" else ["--algo", "n_steps=32"]
    )
    cli(
        "experiments.train",
        "--algorithm",
        algorithm,
        "--task",
        "cartpole-balance",
        *TINY,
        *TINY_PERCEIVER,
        *extra,
        "--total-steps",
        "128",
        "--eval-freq",
        "64",
        "--checkpoint-freq",
        "64",
        "--perceiver-log-freq",
        "32",
        "--run-dir",
        str(tmp_path),
        "--run-name",
        "run",
        "--progress-bar",
        "false",
    )
    run_dir = tmp_path / "run"
    assert "dtype: float32" in (run_dir / "config.yaml").read_text()  # the precision actually used
    assert list_checkpoints(run_dir / "checkpoints")
    accumulator = tags(run_dir)
    missing = REQUIRED_TAGS - set(accumulator.Tags()["scalars"])
    assert not missing, missing
    reliance = {f"perceiver/reliance/pixels/{measure}" for measure in ("action", "value", "greedy")}
    # SAC's critic has a greedy action; PPO's / A2C's value head has none
    assert reliance & set(accumulator.Tags()["scalars"]) == (reliance if algorithm == "sac" else reliance - {
        "perceiver/reliance/pixels/greedy"})  # fmt: skip
    # how far the actor's action falls below its critic's preferred one (SAC only)
    assert ("perceiver/reliance/actor_regret" in accumulator.Tags()["scalars"]) == (algorithm == "sac")
    path = {f"perceiver/path/pixels/{stage}" for stage in ("attention", "focus", "token_signal", "latents")}
    assert path <= set(
        accumulator.Tags()["scalars"]
    )  # where the camera reaches the latents, at each evaluation
    assert {"eval/video", "perceiver/attention", "perceiver/attention_on_frame"} <= set(
        accumulator.Tags()["images"]
    )
    video = accumulator.Images("eval/video")[-1]
    assert video.encoded_image_string[:6] == b"GIF89a"  # the video really is in the event file
    frames = accumulator.Scalars("charts/frames")[-1]
    assert frames.value == frames.step * 8
    assert list((run_dir / "eval").glob("final_step_*.mp4"))


def test_sigkill_then_resume_continues_from_the_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    args = ppo_run(tmp_path, "run", 100_000, 64, "--perceiver-log-freq", "0")
    env = {**os.environ, "MUJOCO_GL": "egl"}
    process = subprocess.Popen(
        [sys.executable, "-m", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    wait_for_checkpoints(process, run_dir / "checkpoints", 2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    assert len(checkpoints) >= 2, process.stderr.read().decode()[-2000:]
    killed_step = int(read_meta(checkpoints[-1])["step"])
    for checkpoint in checkpoints:  # every complete checkpoint is readable
        assert (checkpoint / "model.zip").stat().st_size > 0
    history = run_dir / "eval" / "history.csv"
    killed_rows = [int(row.split(",")[0]) for row in history.read_text().splitlines()[1:]]
    assert killed_step in killed_rows  # every evaluation made before the kill is on disk
    target = killed_step + 96
    result = cli("experiments.train", "--resume", str(run_dir), "--total-steps", str(target))
    assert f"from checkpoint step {killed_step}" in result.stdout
    final_step = int(read_meta(list_checkpoints(run_dir / "checkpoints")[-1])["step"])
    assert target <= final_step < target + 64
    steps = [event.step for event in tags(run_dir).Scalars("eval/return_mean")]
    assert steps == sorted(set(steps)), steps  # the axis never restarts nor repeats
    assert steps[-1] == final_step and killed_step in steps  # the checkpoint's own evaluation is kept
    rows = [int(row.split(",")[0]) for row in history.read_text().splitlines()[1:]]
    assert rows == steps  # the CSV agrees with TensorBoard: rows past the checkpoint dropped, none repeated


@pytest.mark.parametrize("algorithm,signum", [("sac", signal.SIGTERM), ("ppo", signal.SIGINT)])
def test_sigterm_or_ctrl_c_checkpoints_at_the_step_and_resume_continues(tmp_path, algorithm, signum):
    run_dir = tmp_path / "run"
    extra = ["--algorithm", "sac", "--algo", "learning_starts=32", "batch_size=16", "buffer_size=1000"]
    args = ppo_run(
        tmp_path, "run", 100_000, 64, "--perceiver-log-freq", "0", *(extra if algorithm == "sac" else [])
    )
    env = {**os.environ, "MUJOCO_GL": "egl"}
    process = subprocess.Popen(
        [sys.executable, "-m", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for_checkpoints(process, run_dir / "checkpoints")
    first = int(read_meta(list_checkpoints(run_dir / "checkpoints")[-1])["step"])
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=HANG_GUARD_S)
    assert process.returncode == 128 + signum, stderr[-2000:]
    name = signal.Signals(signum).name
    step = int(re.search(rf"stopped by {name} at step (\d+);", stderr).group(1))
    assert step >= first and f"--resume {run_dir}" in stderr
    latest = list_checkpoints(run_dir / "checkpoints")[-1]
    assert int(read_meta(latest)["step"]) == step  # written at the stop, not the last periodic one
    result = cli("experiments.train", "--resume", str(run_dir), "--total-steps", str(step + 64))
    assert f"from checkpoint step {step}" in result.stdout


def test_sac_resume_continues_the_saved_replay_buffer(tmp_path):
    sac = ["--algorithm", "sac", "--algo", "learning_starts=32", "batch_size=16", "buffer_size=1000"]
    cli(*ppo_run(tmp_path, "sac", 64, 64, "--perceiver-log-freq", "0", *sac))
    result = cli("experiments.train", "--resume", str(tmp_path / "sac"), "--total-steps", "128")
    assert "from checkpoint step 64" in result.stdout
    checkpoint = list_checkpoints(tmp_path / "sac" / "checkpoints")[-1]
    assert read_meta(checkpoint)["step"] == 128
    snapshots = list((tmp_path / "sac" / "checkpoints").glob("replay_*"))
    assert len(snapshots) == 1 and not list(checkpoint.glob("*.pkl"))  # one replay for the run, raw arrays
    manifest = json.loads((snapshots[0] / "manifest.json").read_text())
    assert manifest["class"] == "FrameReplayBuffer" and manifest["step"] == 128
    assert manifest["scalars"]["pos"] * manifest["scalars"]["n_envs"] == 128  # the 64 steps before the resume
    # budgets that are multiples of --eval-freq: one evaluation per step, not a periodic plus a final one
    assert [event.step for event in tags(tmp_path / "sac").Scalars("eval/return_mean")] == [64, 128]
    history = (tmp_path / "sac" / "eval" / "history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in history[1:]] == ["64", "128"]
    again = cli("experiments.train", "--resume", str(tmp_path / "sac"))
    assert "is at step 128, its budget is 128 steps: nothing to train" in again.stdout
    refused = cli("experiments.train", "--resume", str(tmp_path / "sac"), "--seed", "3", check=False)
    assert refused.returncode == 2 and "cannot change --seed" in refused.stderr


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    trained = cli(*ppo_run(root, "run", 64, 32, "--reliance", "true"))
    (root / "train-stdout.txt").write_text(trained.stdout)  # what the command printed at its end
    return root / "run"


def test_a_runs_config_is_a_preset_for_the_next_run(trained_run, tmp_path):
    """`--preset RUN/config.yaml`: another seed of a trained run's settings, as a user types it."""
    cli("experiments.train", "--preset", str(trained_run / "config.yaml"), "--seed", "1", "--total-steps", "16",
        "--run-dir", str(tmp_path), "--progress-bar", "false")  # fmt: skip
    (new,) = tmp_path.iterdir()  # a new run named after the one it came from ('run'), its own seed and time
    assert new.name.startswith("run-s1-")
    old, again = (load_yaml((d / "config.yaml").read_text()) for d in (trained_run, new))
    assert (
        again["seed"] == 1
        and again["total_steps"] == 16
        and again["preset"] == str(trained_run / "config.yaml")
    )
    same = set(old) - {"seed", "total_steps", "run_name", "run_dir", "preset"}
    assert {k: again[k] for k in same} == {k: old[k] for k in same}


def test_evaluate_writes_table_and_video(trained_run, tmp_path):
    result = cli(
        "experiments.evaluate", str(trained_run), "--episodes", "2", "--video", "--output", str(tmp_path)
    )
    assert "| cartpole-balance | - | 2 |" in result.stdout
    assert (tmp_path / "eval.csv").read_text().startswith("task,missing,episodes,return_mean")
    assert "latency p50" in (tmp_path / "eval.md").read_text()
    assert (tmp_path / "cartpole-balance.mp4").stat().st_size > 1000
    missing = cli(
        "experiments.evaluate",
        str(trained_run),
        "--episodes",
        "1",
        "--missing-modality",
        "pixels",
        "--output",
        str(tmp_path / "nopix"),
    )
    assert "| cartpole-balance | pixels | 1 |" in missing.stdout
    blank = cli("experiments.evaluate", str(trained_run), "--episodes", "1", "--blank-modality", "pixels",
                "--output", str(tmp_path / "blank"))  # fmt: skip
    assert "| cartpole-balance | pixels (blank) | 1 |" in blank.stdout
    # one file per condition, so evaluating several conditions into one folder keeps each
    cli("experiments.evaluate", str(trained_run), "--episodes", "1", "--missing-modality", "proprio",
        "--output", str(tmp_path / "blank"))  # fmt: skip
    assert {p.name for p in (tmp_path / "blank").glob("*.csv")} == {
        "eval-blank-pixels.csv",
        "eval-no-proprio.csv",
    }
    overlay = tmp_path / "overlay"
    cli("experiments.evaluate", str(trained_run), "--episodes", "1", "--video", "--attention-overlay",
        "--output", str(overlay))  # fmt: skip
    assert (overlay / "cartpole-balance-attention.mp4").stat().st_size > 1000


def final_training_return(run: Path) -> str:
    """The final training evaluation's mean return as `experiments.evaluate` prints it ("| 123.4 ± ")."""
    step, frames, return_mean = (run / "eval" / "history.csv").read_text().splitlines()[-1].split(",")
    return f"| {float(return_mean):.1f} ± "


def test_evaluate_reports_the_episodes_of_the_final_training_evaluation(trained_run, tmp_path):
    """One convention: evaluate's default env seeds are the training evaluations' (10000 + the run's seed)."""
    out = cli("experiments.evaluate", str(trained_run), "--episodes", "1", "--output", str(tmp_path)).stdout
    assert f"{final_training_return(trained_run)}0.0 |" in out


def test_evaluate_stochastic_samples_actions_into_its_own_files(trained_run, tmp_path):
    out = cli(
        "experiments.evaluate", str(trained_run), "--episodes", "1", "--stochastic", "--output", str(tmp_path)
    )
    assert "| cartpole-balance | - | 1 |" in out.stdout
    assert not (tmp_path / "eval.csv").exists()  # the deterministic evaluation's files are left alone
    assert "actions sampled from the policy" in (tmp_path / "eval-stochastic.md").read_text()


def test_evaluate_all_checkpoints_gives_one_row_per_kept_checkpoint(trained_run, tmp_path):
    """--all-checkpoints: every kept checkpoint, oldest first, on the same episodes; the newest one's row is what
    the plain command reports, and its own files leave the plain evaluation's alone."""
    kept = [int(read_meta(c)["step"]) for c in list_checkpoints(trained_run / "checkpoints")]
    assert len(kept) >= 2
    out = cli(
        "experiments.evaluate", str(trained_run), "--all-checkpoints", "--episodes", "1", "--output", str(tmp_path)
    ).stdout  # fmt: skip
    assert "| step | task | missing | episodes | return |" in out
    with open(tmp_path / "eval-checkpoints.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in rows] == kept
    cli("experiments.evaluate", str(trained_run), "--episodes", "1", "--output", str(tmp_path))
    with open(tmp_path / "eval.csv") as handle:
        (latest,) = csv.DictReader(handle)
    assert int(latest["step"]) == kept[-1] and latest["return_mean"] == rows[-1]["return_mean"]
    one = list_checkpoints(trained_run / "checkpoints")[0]
    refused = cli("experiments.evaluate", str(one), "--all-checkpoints", check=False)
    assert refused.returncode == 2 and f"give its run directory, '{trained_run}'" in refused.stderr


def test_the_best_evaluation_s_policy_is_kept_and_evaluate_best_reads_it(trained_run, tmp_path):
    """--keep-best (default): RUN/checkpoints/best_<step> holds the policy of the highest training evaluation, apart
    from the rotating step_ checkpoints; `evaluate --best` scores it and says which it is."""
    with open(trained_run / "eval" / "history.csv") as handle:
        history = [(int(r["step"]), float(r["return_mean"])) for r in csv.DictReader(handle)]
    assert len(history) >= 2
    best_step, best_return = max(history, key=lambda row: row[1])  # the first of equal returns: max keeps it
    best = best_checkpoint(trained_run)
    meta = read_meta(best)
    assert meta["step"] == best_step and meta["return_mean"] == pytest.approx(best_return, abs=1e-3)
    assert len(list((trained_run / "checkpoints").glob("best_*"))) == 1  # earlier bests removed
    assert best not in list_checkpoints(trained_run / "checkpoints")  # not a --resume candidate
    printed = (trained_run.parent / "train-stdout.txt").read_text()
    assert f"best policy   : {best} (evaluation {meta['return_mean']:.1f} at step {best_step};" in printed
    out = cli(
        "experiments.evaluate", str(trained_run), "--best", "--episodes", "1", "--output", str(tmp_path)
    )
    assert f"best checkpoint: {best} (step {best_step}," in out.stdout
    with open(tmp_path / "eval-best.csv") as handle:
        (row,) = csv.DictReader(handle)
    assert int(row["step"]) == best_step
    both = cli("experiments.evaluate", str(trained_run), "--best", "--all-checkpoints", check=False)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_average_writes_the_mean_of_the_kept_checkpoints_and_evaluate_average_reads_it(trained_run, tmp_path):
    """`experiments.average RUN`: a checkpoint whose policy tensors are the element-wise mean of the kept ones'
    (integers the newest's), apart from the --resume candidates; `evaluate --average` scores it."""
    import shutil

    from stable_baselines3.common.save_util import load_from_zip_file

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    missing = cli("experiments.evaluate", str(run), "--average", "--episodes", "1", check=False)
    assert (
        missing.returncode == 2 and f"write one with: python -m experiments.average {run}" in missing.stderr
    )
    kept = list_checkpoints(run / "checkpoints")
    steps = [int(read_meta(c)["step"]) for c in kept]
    assert len(steps) >= 2
    out = cli("experiments.average", str(run))
    written = average_checkpoint(run)
    assert f"averaged the policy weights of steps {steps} -> {written}" in out.stdout
    assert read_meta(written)["averaged_steps"] == steps and written not in list_checkpoints(
        run / "checkpoints"
    )

    def policy(checkpoint):
        return load_from_zip_file(checkpoint / "model.zip", device="cpu", load_data=False)[1]["policy"]

    sources, average = [policy(c) for c in kept], policy(written)
    floats = [key for key, value in average.items() if value.is_floating_point()]
    assert any(
        not torch.equal(sources[0][key], sources[-1][key]) for key in floats
    )  # there is something to average
    for key, value in average.items():
        expected = torch.stack([s[key] for s in sources]).mean(0) if key in floats else sources[-1][key]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
    if (kept[-1] / "vecnormalize.pkl").exists():
        assert (written / "vecnormalize.pkl").read_bytes() == (kept[-1] / "vecnormalize.pkl").read_bytes()

    scored = cli(
        "experiments.evaluate", str(run), "--average", "--episodes", "1", "--output", str(tmp_path / "e")
    )
    assert f"averaged checkpoint: {written} (the policy weights of steps {steps})" in scored.stdout
    with open(tmp_path / "e" / "eval-average.csv") as handle:
        (row,) = csv.DictReader(handle)
    assert int(row["step"]) == steps[-1]
    unknown = cli("experiments.average", str(run), "--steps", "999999", check=False)
    assert (
        unknown.returncode == 2 and f"valid choices (the kept checkpoints' steps): {steps}" in unknown.stderr
    )
    one = cli("experiments.average", str(run), "--steps", str(steps[0]), check=False)
    assert one.returncode == 2 and "averaging needs at least 2 checkpoints" in one.stderr


def test_a_run_averages_its_last_checkpoints_and_evaluate_scores_the_average_alike(tmp_path):
    """--average-checkpoints K: at the end, the newest K checkpoints averaged and evaluated on the final
    evaluation's episodes; `evaluate RUN --average` reports the same return; the trained checkpoint is untouched."""
    trained = cli(*ppo_run(tmp_path, "avg", 96, 32, "--average-checkpoints", "2")).stdout
    run = tmp_path / "avg"
    written, kept = (
        average_checkpoint(run),
        [int(read_meta(c)["step"]) for c in list_checkpoints(run / "checkpoints")],
    )
    assert len(kept) == 3 and read_meta(written)["averaged_steps"] == kept[-2:]
    printed = re.search(r"averaged      : (-?[\d.]+) ± [\d.]+ on the same episodes, the policy weights of steps "
                        rf"\[{kept[-2]}, {kept[-1]}\] \((\S+);", trained)  # fmt: skip
    assert printed and printed.group(2) == str(written), trained[-1500:]
    assert "eval/average_return" in tags(run).Tags()["scalars"]
    scored = cli(
        "experiments.evaluate", str(run), "--average", "--episodes", "1", "--output", str(tmp_path / "e")
    )
    assert f"| {printed.group(1)} ± " in scored.stdout  # the same policy on the same episode
    final = cli("experiments.evaluate", str(run), "--episodes", "1", "--output", str(tmp_path / "f")).stdout
    assert (
        final_training_return(run) in final
    )  # the run's own checkpoint is its trained policy, not the average
    refused = cli(*ppo_run(tmp_path, "bad", 16, 16, "--average-checkpoints", "4"), check=False)
    assert (
        refused.returncode == 2
        and "average_checkpoints must be 0 (off) or between 2 and keep_checkpoints (3)" in (refused.stderr)
    )


def test_keep_best_false_keeps_none_and_evaluate_best_says_so(tmp_path):
    trained = cli(*ppo_run(tmp_path, "nobest", 32, 16, "--keep-best", "false"))
    assert "best policy" not in trained.stdout
    run = tmp_path / "nobest"
    assert best_checkpoint(run) is None and not list((run / "checkpoints").glob("best_*"))
    refused = cli("experiments.evaluate", str(run), "--best", "--episodes", "1", check=False)
    assert (
        refused.returncode == 2
        and "kept no best checkpoint (trained with --keep-best false" in refused.stderr
    )


def test_evaluate_reliance_prints_each_key_withheld_resampled_and_blanked(trained_run, tmp_path):
    out = cli(
        "experiments.evaluate", str(trained_run), "--episodes", "2", "--reliance", "--reliance-every", "4",
        "--output", str(tmp_path),
    )  # fmt: skip
    for key in ("pixels", "proprio", "action_history"):
        row = next(
            line for line in out.stdout.splitlines() if line.startswith(f"| cartpole-balance | {key} |")
        )
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 9 and cells[4] == cells[7] == "nan"  # PPO has no Q critic: no greedy action
        assert float(cells[2]) >= 0 and float(cells[5]) >= 0  # action change blanked, resampled
    text = (tmp_path / "reliance.md").read_text()
    assert "| greedy action change | resampled: action change | value change |" in text
    assert "| --- " * 9 + "|" in text and "Actor regret" not in text  # no critic to regret against
    refused = cli(
        "experiments.evaluate", str(trained_run), "--reliance", "--reliance-every", "0", check=False
    )
    assert refused.returncode != 0 and "--reliance-every must be a positive integer, got 0" in refused.stderr
    scalars = set(tags(trained_run).Tags()["scalars"])
    assert {"perceiver/reliance/pixels/action", "perceiver/reliance/proprio/value"} <= scalars


def test_evaluate_modality_path_prints_each_modality_stage_by_stage(trained_run, tmp_path):
    out = cli(
        "experiments.evaluate", str(trained_run), "--episodes", "1", "--modality-path", "--output", str(tmp_path)
    )  # fmt: skip
    heading = "| task | modality | attention share | focus within | token signal | withheld: tokens |"
    assert heading in out.stdout
    for key in ("pixels", "proprio", "action_history"):
        assert f"| cartpole-balance | {key} | " in out.stdout
    written = (tmp_path / "modality-path.md").read_text()
    assert "focus within its tokens (0: the latents average them uniformly" in written and heading in written


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_cli_writes_an_actor_that_matches_predict(trained_run, tmp_path, fmt):
    pytest.importorskip("onnxruntime")
    out = tmp_path / f"actor.{fmt}"
    result = cli(
        "experiments.export", str(trained_run), "--format", fmt, "--output", str(out), "--check-steps", "12"
    )
    assert out.stat().st_size > 1000 and "max |action - predict| over 12 observations" in result.stdout
    assert "batch-1 p50 ms" in result.stdout


def test_plot_writes_png(trained_run, tmp_path):
    out = tmp_path / "curves.png"
    cli("experiments.plot", str(trained_run), "--out", str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args,message",
    [
        (["experiments.train", "--preset", "nope"], "unknown preset 'nope'; valid choices: ["),
        (["experiments.train", "--task", "cheetah-fly"], "unknown task 'cheetah-fly'; valid choices: ["),
        (
            ["experiments.train", "--algorithm", "dqn"],
            "unknown algorithm 'dqn'; valid choices: ['ppo', 'a2c', 'sac']",
        ),
        (
            ["experiments.train", "--modalities", "pixels", "lidar"],
            "unknown modalities ['lidar']; valid choices",
        ),
        (["experiments.train", "--perceiver", "latents=3"], "unknown PerceiverConfig fields ['latents']"),
        (
            ["experiments.train", "--task", "cartpole-balance", "--algo", "lr_warmpu=5"],
            "unknown ppo settings ['lr_warmpu'] for policy_type 'perceiver' (PerceiverPPO); valid choices: [",
        ),
        (
            ["experiments.train", "--task", "cartpole-balance", "--policy", "readout=flat"],
            "unknown policy settings ['readout'] for policy_type 'perceiver' (PerceiverActorCriticPolicy); valid",
        ),
        (["experiments.train", "--total-frames", "-5"], "total_frames must be a positive integer, got -5"),
        (["experiments.train", "--resume", "/nonexistent/run"], "run directory '/nonexistent/run' not found"),
        (["experiments.evaluate", "/nonexistent/run"], "'/nonexistent/run' not found"),
        (["experiments.plot", "/nonexistent/run"], "run directory '/nonexistent/run' not found"),
    ],
)
def test_bad_cli_values_exit_with_one_line_error(args, message):
    result = cli(*args, check=False, timeout=HANG_GUARD_S)
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error")]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_a_setting_refused_while_the_agent_is_built_leaves_no_run_directory(tmp_path):
    args = [
        "experiments.train",
        "--task",
        "cartpole-balance",
        "--run-dir",
        str(tmp_path),
        "--run-name",
        "typo",
    ]
    refused = cli(*args, "--algo", "lr_warmpu=5", check=False, timeout=HANG_GUARD_S)
    assert refused.returncode == 2 and "unknown ppo settings ['lr_warmpu']" in refused.stderr
    assert list(tmp_path.iterdir()) == []  # the corrected command may take the same name


def test_a_run_name_in_use_says_whether_it_can_be_resumed(trained_run, tmp_path):
    args = ["experiments.train", "--run-dir", str(trained_run.parent), "--run-name", trained_run.name]
    taken = cli(*args, check=False)
    assert taken.returncode == 2 and f"use --resume {trained_run}" in taken.stderr
    failed = tmp_path / "failed"  # a start that failed before its first checkpoint leaves only config.yaml
    failed.mkdir()
    (failed / "config.yaml").write_text((trained_run / "config.yaml").read_text())
    again = cli("experiments.train", "--run-dir", str(tmp_path), "--run-name", "failed", check=False)
    assert (
        again.returncode == 2
        and "without a checkpoint to resume; remove it or choose another" in again.stderr
    )


def test_corrupt_checkpoint_is_a_one_line_error(trained_run, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained_run, broken)
    latest = list_checkpoints(broken / "checkpoints")[-1]
    (latest / "model.zip").write_bytes(b"not a zip")
    resume = [
        "experiments.train",
        "--resume",
        str(broken),
        "--total-steps",
        "1000",
    ]  # more to train: loads it
    for command in (["experiments.evaluate", str(broken)], resume):
        result = cli(*command, check=False, timeout=HANG_GUARD_S)
        assert result.returncode != 0
        assert "error: corrupt checkpoint" in result.stderr and "model.zip" in result.stderr


def test_a_bad_device_is_named_not_blamed_on_the_checkpoint(trained_run):
    result = cli(
        "experiments.evaluate", str(trained_run), "--device", "tpu", check=False, timeout=HANG_GUARD_S
    )
    assert result.returncode != 0
    assert "unknown device 'tpu'; valid choices" in result.stderr and "corrupt" not in result.stderr


def test_sb3_baseline_through_the_cli(tmp_path):
    cli(*ppo_run(tmp_path, "base", 64, 1000, "--image-size", "64", "--policy-type", "sb3"))
    from stable_baselines3 import PPO
    from stable_baselines3.common.policies import MultiInputActorCriticPolicy

    model = PPO.load(list_checkpoints(tmp_path / "base" / "checkpoints")[-1] / "model.zip", device="cpu")
    assert type(model.policy) is MultiInputActorCriticPolicy
    assert (list_checkpoints(tmp_path / "base" / "checkpoints")[-1] / "vecnormalize.pkl").exists()


def test_curriculum_adds_modalities_at_the_given_step(tmp_path):
    stages = "[{step: 0, modalities: [proprio, action_history]}, {step: 64, modalities: [pixels, proprio, action_history]}]"
    cli(*ppo_run(tmp_path, "cur", 128, 1000, "--perceiver-log-freq", "0", "--curriculum", stages))
    pixels = [(e.step, e.value) for e in tags(tmp_path / "cur").Scalars("curriculum/pixels")]
    assert pixels[0][1] == 0.0 and pixels[-1][1] == 1.0 and pixels[-1][0] >= 64


def test_benchmark_sac_prints_its_tables():  # plumbing only: benchmarks report timings, tests never assert them
    result = cli("experiments.benchmark", "sac", "--quick")
    assert "### SAC update" in result.stdout and "### SAC data path" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 2 + 2 + 5  # two headers, two agents, five kernels


def test_benchmark_mix_update_prints_its_table(capsys):  # plumbing only: the ratio's value is not asserted
    from experiments.benchmarks.training import bench_mix_update

    spec = {"task": "cartpole-balance", "n_envs": 1, "image_size": 32, "action_repeat": 8, "n_steps": 8,
            "batch_size": 8, "n_epochs": 1}  # fmt: skip
    ratio = bench_mix_update(spec, quick=True)
    out = capsys.readouterr().out
    assert ratio > 0 and "| without the sampler |" in out and "| with the sampler (recomputed" in out
    assert "3 alternating rounds" in out


def test_benchmark_evaluation_prints_each_reliance_setting(capsys):  # plumbing only: no timing is asserted
    import envs
    from agents import make_agent
    from experiments.benchmarks.multitask import bench_evaluation

    tasks = ("cartpole-swingup", "reacher-easy")
    venv = envs.make_multitask_vec_env(tasks, modalities=("proprio", "action_history"), action_repeat=8)
    model = make_agent("sac", venv, perceiver={"num_latents": 4, "latent_dim": 16}, seed=0, device="cpu")
    timed = bench_evaluation(model, tasks, rounds=1, action_repeat=8)
    out = capsys.readouterr().out
    assert set(timed) == {"no reliance probe", "reliance on every 4th step", "reliance on every step"}
    assert "| reliance on every 4th step |" in out and "2 tasks, one episode each" in out
    venv.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_benchmark_drq_prints_the_tokenizer_and_update_tables():  # plumbing only: no timing is asserted
    out = cli("experiments.benchmark", "drq", "--quick", timeout=HANG_GUARD_S).stdout
    assert "| conv (3 x 3/2, 32 ch, stacked) | 121 |" in out and "| patch (12 px, per frame) | 147 |" in out
    assert out.count("| DrQ's encoder (drq-cnn) |") == 1 and "batch 32" in out
    assert "| Perceiver, conv tokens, critic_head=queries |" in out
    assert "| Perceiver, conv tokens, target_encoder=online |" in out
    assert "| DrQ's encoder (drq-cnn), target_encoder=online |" in out
    assert "| conv (5 x 5/4, 3 x 3/2, 3 x 3/1, 32 ch, stacked) | 121 |" in out
    assert (
        "| Perceiver, conv tokens 5x5/4 + 3x3/2 + 3x3/1, target_encoder=online + critic_head=queries |" in out
    )


def test_benchmark_fuse_prints_study_2s_agents():  # plumbing only: no timing is asserted
    out = cli("experiments.benchmark", "fuse", "--quick", timeout=HANG_GUARD_S).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 4 and "batch 32" in out and "`--proprio robot`" in out
    assert "| Perceiver, grouped latents + sampler with camera-only samples, conv tokens |" in out


def test_benchmark_fuse_builds_its_agents_from_study_2s_spec():
    from experiments.benchmarks.sac import FUSE_AGENTS, FUSE_SPEC, spec_configs

    configs = spec_configs(FUSE_SPEC, FUSE_AGENTS)
    conv = configs["Perceiver, grouped latents + sampler with camera-only samples, conv tokens"]
    assert conv.perceiver["pixel_tokenizer"] == "conv" and conv.algo["lr_warmup"] == 100
    assert conv.modality_mix == "all=0.4 pixels+proprio=0.2 pixels+action_history=0.2 pixels=0.2"
    assert configs["SB3 SAC, MultiInputPolicy (NatureCNN + MLP)"].policy_type == "sb3"
    assert {c.proprio for c in configs.values()} == {"robot"} and {c.seed for c in configs.values()} == {0}
    with pytest.raises(ValueError, match=r"no variants \['perceiver-nope'\].*'perceiver-groups-mix-camera'"):
        spec_configs(FUSE_SPEC, {"row": "perceiver-nope"})


def test_benchmark_fuse_drq_builds_its_agents_from_the_drq_spec_with_added_flags():
    from experiments.benchmarks.sac import FUSE_DRQ_AGENTS, FUSE_DRQ_SPEC, spec_configs

    configs = spec_configs(FUSE_DRQ_SPEC, FUSE_DRQ_AGENTS)
    assert {c.recipe for c in configs.values()} == {"drq"} and {c.proprio for c in configs.values()} == {
        "robot"
    }
    best, bf16 = (
        configs["Perceiver, best (+ SB3's critic head, encoder at 0.3x lr)"],
        configs["Perceiver, best, bf16 autocast"],
    )
    assert best.policy == bf16.policy == {"critic_head": "queries", "encoder_lr_scale": 0.3}
    assert bf16.perceiver == {**best.perceiver, "dtype": "bfloat16"} and "dtype" not in best.perceiver
    cnn, cnn_bf16 = configs["NatureCNN + MLP (cnn)"], configs["NatureCNN + MLP (cnn), bf16 convolutions"]
    assert cnn_bf16.policy == {**cnn.policy, "conv_dtype": "bfloat16"} and cnn_bf16.policy_type == "cnn"
    with pytest.raises(ValueError, match=r"no variants \['cnn-nope'\]"):
        spec_configs(FUSE_DRQ_SPEC, {"row": ("cnn-nope", ("--policy", "conv_dtype=bfloat16"))})


def test_benchmark_fuse_drq_times_the_cup_agents_with_and_without_the_mean_frame():
    from experiments.benchmarks.sac import FUSE_DRQ_CUP_AGENTS, FUSE_DRQ_CUP_SPEC, spec_configs

    configs = spec_configs(FUSE_DRQ_CUP_SPEC, FUSE_DRQ_CUP_AGENTS)
    assert {c.task for c in configs.values()} == {"ball_in_cup-catch"}
    best = configs["Perceiver, best (+ SB3's critic head, encoder at 0.3x lr)"]
    centred = configs["Perceiver, best + running mean frame"]
    placed = configs["Perceiver, best + placed latents + running mean frame"]
    assert centred.perceiver == {**best.perceiver, "image_centering": "running"}
    assert placed.perceiver == {**centred.perceiver, "image_locality": 1.0} and placed.policy == best.policy


def test_benchmark_bf16_attention_times_each_kernel_against_float32(
    capsys,
):  # plumbing: no timing is asserted
    from experiments.benchmarks.attention import bench_bf16_attention

    bench_bf16_attention(quick=True)
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][2:]
    assert [row[1] for row in rows] == [
        "SDPA, float32",
        "SDPA, bf16",
        "attend, bf16 in and out (float32 kernel)",
    ] * 2
    assert all(float(row[2]) > 0 for row in rows) and {row[3] for row in rows[::3]} == {"1 |"}


def test_benchmark_features_prints_the_variation_table():  # plumbing: the table's rows and columns
    out = cli("experiments.benchmark", "features", timeout=HANG_GUARD_S).stdout
    assert "| NatureCNN (cnn) |" in out and "| Perceiver, patch tokens, query readout, centred |" in out


def test_benchmark_critic_names_what_it_needs(tmp_path, capsys):
    """`critic` without a teacher or runs, or with runs of another task: one `error:` line, exit 2."""
    from experiments.benchmarks.cli import main

    assert main(["critic", "--runs", str(tmp_path)]) == 2
    assert "error: the critic benchmark needs --teacher RUN" in capsys.readouterr().err
    for task in ("cartpole-swingup", "cartpole-balance"):
        cli(*ppo_run(tmp_path, task, 16, 16, "--algorithm", "sac", "--recipe", "drq", "--task", task,
                     "--modalities", "proprio", "--n-envs", "1", "--perceiver-log-freq", "0",
                     "--algo", "learning_starts=8", "batch_size=8", "--policy", "hidden_dim=32"))  # fmt: skip
    assert (
        main(
            [
                "critic",
                "--teacher",
                str(tmp_path / "cartpole-swingup"),
                "--runs",
                str(tmp_path / "cartpole-balance"),
            ]
        )
        == 2
    )
    assert "trained on 'cartpole-balance'; the teacher on 'cartpole-swingup'" in capsys.readouterr().err


def test_benchmark_features_reads_trained_runs_of_both_recipes(tmp_path, capsys):
    """`features --runs`: Q's spread over states and actions for a DrQ-recipe run and an SB3-recipe run (whose
    critic, action-conditioned queries over the latents, has no readout features: NaN), and how far each moved
    between its two kept checkpoints (learning starts between them)."""
    from experiments.benchmarks.features import trained_tables

    for recipe, policy in (("drq", ["--policy", "hidden_dim=32"]), ("sb3", [])):
        cli(*ppo_run(tmp_path, recipe, 32, 16, "--algorithm", "sac", "--recipe", recipe, "--task",
                     "cartpole-swingup", "--modalities", "pixels", "--n-envs", "1", "--perceiver-log-freq", "0",
                     "--algo", "batch_size=8", "learning_starts=24", "buffer_size=200", *policy))  # fmt: skip
    trained_tables([tmp_path / "drq", tmp_path / "sb3"])
    spread, moved = capsys.readouterr().out.split("between kept checkpoints")
    rows = {
        line.split("|")[1].strip(): [float(cell) for cell in line.split("|")[2:-1]]
        for line in spread.splitlines()
        if line.startswith("| drq |") or line.startswith("| sb3 |")
    }
    assert set(rows) == {"drq", "sb3"}
    assert not any(math.isnan(v) for v in rows["drq"]) and rows["drq"][3] > 0  # Q differs across actions
    assert (
        math.isnan(rows["sb3"][1]) and not any(math.isnan(v) for v in rows["sb3"][2:]) and rows["sb3"][3] > 0
    )
    drift = {
        line.split("|")[1].strip(): (
            line.split("|")[2].strip(),
            [float(cell) for cell in line.split("|")[3:-1]],
        )
        for line in moved.splitlines()
        if line.startswith("| drq |") or line.startswith("| sb3 |")
    }
    assert set(drift) == {"drq", "sb3"}
    for steps, changes in drift.values():
        assert steps == "16 → 32" and all(
            0 < change < math.inf for change in changes
        )  # it trained in between


def test_benchmark_gpu_without_cuda_says_it_skipped():
    result = cli("experiments.benchmark", "gpu", "--quick")
    assert "no CUDA device here: skipped" in result.stdout


def test_benchmark_streaming_prints_equal_actions():  # plumbing, plus the one thing it checks: same actions
    result = cli("experiments.benchmark", "streaming", "--quick")
    rows = [
        line.split("|") for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line
    ]
    assert len(rows) == 1 + 3
    assert all(float(row[-2]) < 1e-4 for row in rows[1:])  # max |action diff| streaming vs full


@pytest.mark.parametrize("algorithm", ["ppo", "sac"])
def test_partial_observation_with_state_decoding_writes_decode_and_probe_tags(tmp_path, algorithm):
    extra = (
        ["--algorithm", "sac", "--algo", "learning_starts=32", "batch_size=16"] if algorithm == "sac" else []
    )
    cli(*ppo_run(tmp_path, "robot", 96, 48, "--task", "cartpole-swingup", "--proprio", "robot",
                 "--aux-state-weight", "1", "--eval-episodes", "4", *extra))  # fmt: skip
    scalars = set(tags(tmp_path / "robot").Tags()["scalars"])
    for sensor in ("position", "velocity"):  # the full state's sensors, decoded and probed
        assert f"perceiver/state_decode_mse/{sensor}" in scalars
        assert f"perceiver/state_probe_r2/{sensor}" in scalars
        assert (
            f"perceiver/state_probe_r2/actor/{sensor}" in scalars
        )  # the actor's action layer, probed beside
    config = (tmp_path / "robot" / "config.yaml").read_text()
    assert "proprio: robot" in config and "aux_state_weight: 1.0" in config


def test_lstm_trains_evaluates_with_probe_and_resumes(tmp_path):
    run = [*ppo_run(tmp_path, "lstm", 64, 32, "--task", "cartpole-swingup", "--policy-type", "lstm",
                    "--proprio", "positions", "--modalities", "proprio", "proprio_history", "action_history",
                    "--eval-episodes", "4")]  # fmt: skip
    cli(*run)
    assert "perceiver/state_probe_r2/velocity" in tags(tmp_path / "lstm").Tags()["scalars"]
    cli("experiments.train", "--resume", str(tmp_path / "lstm"), "--total-steps", "96")
    assert read_meta(list_checkpoints(tmp_path / "lstm" / "checkpoints")[-1])["step"] >= 96
    out = cli("experiments.evaluate", str(tmp_path / "lstm"), "--episodes", "4", "--probe-state").stdout
    assert "R² position" in out and "R² velocity" in out
    # the checkpoint acts as the run did, memory and all
    assert final_training_return(tmp_path / "lstm") in out


@pytest.mark.parametrize("policy_type", ["perceiver", "sb3"])
def test_evaluate_probe_state_prints_r2_per_sensor(tmp_path, policy_type):
    cli(*ppo_run(tmp_path, policy_type, 32, 32, "--task", "cartpole-swingup", "--policy-type", policy_type,
                 "--modalities", "proprio", "action_history"))  # fmt: skip
    out = cli("experiments.evaluate", str(tmp_path / policy_type), "--episodes", "4", "--probe-state").stdout
    assert "R² position" in out and "R² velocity" in out
    header = (tmp_path / policy_type / "eval" / "eval.csv").read_text().splitlines()[0]
    assert header.endswith("r2_position,r2_velocity,r2_mean")
    out = cli("experiments.evaluate", str(tmp_path / policy_type), "--episodes", "4", "--probe-state",
              "--probe-features", "encoder", "actor").stdout  # fmt: skip
    assert "R² position" in out and "R² actor/velocity" in out
    failed = cli(
        "experiments.evaluate", str(tmp_path / policy_type), "--probe-features", "actor", check=False
    )
    assert (
        failed.returncode != 0 and "--probe-features actor chooses what --probe-state reads" in failed.stderr
    )


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(child) for child in text]
    return found


@pytest.mark.parametrize("vec_env", ["subproc", "pipelined"])
def test_a_dead_env_worker_ends_the_run_with_a_message_and_a_checkpoint(tmp_path, vec_env):
    args = ppo_run(tmp_path, "run", 100_000, 64, "--perceiver-log-freq", "0", "--vec-env", vec_env,
                   "--modalities", "proprio", "action_history")  # fmt: skip
    env = {**os.environ, "MUJOCO_GL": "egl"}
    process = subprocess.Popen(
        [sys.executable, "-m", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for_checkpoints(process, tmp_path / "run" / "checkpoints")
    first = int(read_meta(list_checkpoints(tmp_path / "run" / "checkpoints")[-1])["step"])
    workers = [grandchild for child in _children(process.pid) for grandchild in _children(child)]
    assert workers, "no env worker processes found"
    os.kill(workers[0], signal.SIGKILL)
    _, stderr = process.communicate(timeout=HANG_GUARD_S)  # ends: no hang
    assert process.returncode == 2, stderr[-2000:]
    assert "an env worker process died" in stderr and "--resume" in stderr

    step, saved = re.search(r"died at step (\d+) .*checkpointed to (\S+);", stderr).groups()
    assert int(read_meta(Path(saved))["step"]) == int(step) >= first  # written at the failure, readable


CONV_CENTRED = ["--perceiver", "num_latents=8", "latent_dim=32", "fourier_bands=4", "pixel_tokenizer=conv",
                "image_centering=running"]  # fmt: skip
KEYPOINTS_CENTRED = [*CONV_CENTRED[:4], "pixel_tokenizer=keypoints", "keypoints=8", "image_centering=running"]


@pytest.mark.parametrize(
    "policy_type, policy_arg, algo_arg, extra",
    [
        ("drq-cnn", "center_features=none", "target_encoder=copy", []),
        (
            "perceiver",
            "center_features=none",
            "target_encoder=online",
            CONV_CENTRED,
        ),  # + the running mean frame
        ("perceiver", "center_features=reference", "target_encoder=copy", []),
        ("perceiver", "critic_head=queries", "target_encoder=copy", []),
        ("perceiver", "critic_head=queries", "target_encoder=online", KEYPOINTS_CENTRED),
    ],  # 'cnn' shares drq-cnn's ConvEncoder
)
def test_drq_recipe_agents_train_evaluate_probe_blank_export_and_resume(
    tmp_path, policy_type, policy_arg, algo_arg, extra
):
    """The shared pixel SAC recipe, every encoder through the same commands as the Perceiver."""
    pytest.importorskip("onnxruntime")
    run = tmp_path / policy_type
    drq = ["--algorithm", "sac", "--recipe", "drq", "--policy-type", policy_type, "--task", "cartpole-swingup",
           "--image-size", "48", "--n-envs", "1", "--eval-episodes", "4", "--perceiver-log-freq", "0",
           "--algo", "batch_size=8", "learning_starts=24", "buffer_size=200", algo_arg,
           "--policy", "hidden_dim=32", policy_arg, *extra]  # fmt: skip
    cli(*ppo_run(tmp_path, policy_type, 32, 32, *drq))
    if extra:
        assert "image_centering: running" in (run / "config.yaml").read_text()
    if "pixel_tokenizer=keypoints" in extra:  # the overlay draws each keypoint where it sits
        cli("experiments.evaluate", str(run), "--episodes", "1", "--video", "--attention-overlay",
            "--output", str(tmp_path / "overlay"))  # fmt: skip
        assert (tmp_path / "overlay" / "cartpole-swingup-attention.mp4").stat().st_size > 1000
    assert "perceiver/state_probe_r2/velocity" in tags(run).Tags()["scalars"]
    assert {"train/critic_loss", "train/actor_action_spread"} <= set(tags(run).Tags()["scalars"])
    resumed = cli("experiments.train", "--resume", str(run), "--total-steps", "48")
    assert "from checkpoint step 32" in resumed.stdout
    out = cli(
        "experiments.evaluate", str(run), "--episodes", "4", "--probe-state", "--output", str(tmp_path / "e")
    )
    assert "R² position" in out.stdout
    # the resumed run's checkpoint acts as its final evaluation saw it
    assert final_training_return(run) in out.stdout
    if (
        policy_type == "drq-cnn"
    ):  # blanking zeroes the key before any policy reads it (a Perceiver: trained_run)
        blank = cli("experiments.evaluate", str(run), "--episodes", "1", "--blank-modality", "pixels",
                    "--output", str(tmp_path / "blank"))  # fmt: skip
        assert "pixels (blank)" in blank.stdout
    export = cli("experiments.export", str(run), "--format", "onnx", "--output", str(tmp_path / "a.onnx"),
                 "--check-steps", "4")  # fmt: skip
    assert "max |action - predict| over 4 observations" in export.stdout
