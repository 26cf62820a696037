"""Atomic checkpoints: write everything into a temporary directory, fsync, then rename it into place.

A checkpoint is ``checkpoints/step_<N>/`` holding ``model.zip`` (SB3: weights, optimizer, step counter, learning
rate schedule progress), ``rng.pt`` (torch / numpy / python RNG states; SB3 saves none),
``vecnormalize.pkl`` (reward-normalisation statistics); an off-policy run's replay buffer is one snapshot of raw
arrays beside them (``checkpoints/replay_<step>/``, the latest only: `experiments.replay_snapshot`). Rename is atomic on POSIX, so a run killed at any moment (SIGKILL included) leaves only
complete checkpoints plus, at worst, a ``.tmp-*`` directory that is ignored and cleaned up. Nothing is deleted
before its replacement is in place: a second checkpoint of the same step (the end of a run rewrites the last
periodic one) is written as ``step_<N>.<k>`` and the older one removed after. A write that fails (a full disk)
removes its temporary directory and leaves every earlier checkpoint as it was.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from stable_baselines3.common.save_util import load_from_pkl

from experiments.replay_snapshot import list_snapshots, load_replay_snapshot, save_replay_snapshot

PREFIX = "step_"
BEST_PREFIX = (
    "best_"  # checkpoints/best_<N>/: the policy whose evaluation scored highest so far (`save_best`)
)
AVERAGE_PREFIX = (
    "average_"  # checkpoints/average_<N>/: kept checkpoints' policy weights averaged (`save_average`)
)
COMPLETE = "meta.json"  # written last: a checkpoint directory without it is not a checkpoint


class CheckpointError(ValueError):
    """A checkpoint that is missing or cannot be read."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    """RNG states as tensors, ints and strings only, so `load_rng_state` can read them with weights_only=True."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (
            kind,
            torch.from_numpy(keys.astype(np.int64)),
            int(position),
            int(has_gauss),
            float(cached),
        ),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def load_rng_state(path: Path) -> dict:
    """rng.pt without unpickling code (weights_only=True); checkpoints written before that format (numpy arrays
    inside) need the full unpickler, as the rest of a run directory does."""
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # an older rng.pt: numpy objects are not on torch's weights_only allow-list
        return torch.load(path, weights_only=False)


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_replay_buffer(model, checkpoint: Path) -> str | None:
    """Put the run's replay back into an off-policy model: the newest snapshot, copied into the buffer the model
    already has (or, from checkpoints written before snapshots, the checkpoint's pickled buffer). A resumed run
    restarts its envs, so buffers that track the running episode are told it ended. Returns what was loaded."""
    legacy = checkpoint / "replay_buffer.pkl"
    snapshots = list_snapshots(checkpoint.parent)
    if legacy.exists():
        buffer = load_from_pkl(legacy)
    elif snapshots and getattr(model, "replay_buffer", None) is not None:
        buffer = model.replay_buffer
        step = load_replay_snapshot(buffer, snapshots[-1])
        if step != int(read_meta(checkpoint)["step"]):
            print(
                f"note: replay snapshot of step {step} with the checkpoint of step {read_meta(checkpoint)['step']}"
            )
    else:
        return None
    if hasattr(buffer, "set_device"):  # FrameReplayBuffer: frames back onto the GPU when they fit
        buffer.set_device(model.device)
    else:
        buffer.device = model.device
    if hasattr(buffer, "truncate_last_trajectory"):
        buffer.truncate_last_trajectory()
    model.replay_buffer = buffer
    return str(legacy if legacy.exists() else snapshots[-1])


def _write_temporary(
    model, directory: Path, name: str, meta: dict, rng: bool, replay_step: int | None
) -> Path:
    """``directory/.tmp-<name>-<pid>/`` holding model.zip, the RNG states (`rng`), the reward normaliser and
    meta.json (last), each file synced; with `replay_step`, the replay snapshot of that step beside it first.
    Removed again if a write fails (the OSError is re-raised). The caller renames it into place."""
    tmp = directory / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        model.save(tmp / "model.zip")
        if rng:
            torch.save(rng_state(), tmp / "rng.pt")
        normalizer = model.get_vec_normalize_env()
        if normalizer is not None:
            normalizer.save(str(tmp / "vecnormalize.pkl"))
        if replay_step is not None:  # before the checkpoint that needs it
            save_replay_snapshot(model.replay_buffer, directory, replay_step)
        (tmp / COMPLETE).write_text(json.dumps(meta))
        for file in tmp.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(tmp)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def save_checkpoint(
    model, directory: Path, step: int, keep: int, with_replay_buffer: bool, extra: dict
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    name = f"{PREFIX}{step:012d}"
    same_step = [p for p in list_checkpoints(directory) if _step_and_generation(p)[0] == step]
    if same_step:  # never delete before the replacement is in place: a new generation of this step
        name += f".{_step_and_generation(same_step[-1])[1] + 1}"
    final = directory / name
    replay = with_replay_buffer and getattr(model, "replay_buffer", None) is not None
    try:
        tmp = _write_temporary(
            model, directory, name, {"step": step, **extra}, True, step if replay else None
        )
    except OSError as err:
        previous = list_checkpoints(directory)
        kept = (
            f"the previous checkpoint {previous[-1]} is intact"
            if previous
            else "no earlier checkpoint exists"
        )
        raise CheckpointError(f"checkpoint of step {step} not written ({err}); {kept}") from err
    os.replace(tmp, final)
    _fsync_dir(directory)
    for old in same_step:
        shutil.rmtree(old, ignore_errors=True)
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in directory.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def save_best(model, directory: Path, step: int, extra: dict) -> Path:
    """The model of `step` as the run's best checkpoint, ``directory/best_<step>/`` (model.zip, the reward
    normaliser, meta.json with the step and `extra`; no replay, no RNG: it is for evaluation and export, not for
    --resume). Written to a temporary directory and renamed into place; the previous best is removed only after."""
    previous = best_checkpoint(directory.parent)
    return _save_apart(model, directory, BEST_PREFIX, step, extra, previous, "best checkpoint")


def _save_apart(
    model,
    directory: Path,
    prefix: str,
    step: int,
    extra: dict,
    previous: Path | None,
    what: str,
    normalizer=None,
) -> Path:
    """`model` as ``directory/<prefix><step>/``, beside the --resume checkpoints (model.zip, meta.json with the step
    and `extra`, the reward normaliser or the file `normalizer`). A second one of `previous`'s step is written as
    ``<prefix><step>.<k>``; the earlier ones of `prefix` are removed only once it is in place."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{prefix}{step:012d}"
    if previous is not None and _step_and_generation(previous, prefix)[0] == step:
        final = final.with_name(f"{final.name}.{_step_and_generation(previous, prefix)[1] + 1}")
    try:
        tmp = _write_temporary(model, directory, final.name, {"step": step, **extra}, False, None)
        try:
            if normalizer is not None and normalizer.exists():
                shutil.copy2(normalizer, tmp / normalizer.name)
            os.replace(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except OSError as err:
        raise CheckpointError(f"{what} of step {step} not written ({err})") from err
    _fsync_dir(directory)
    for old in directory.glob(f"{prefix}*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def average_policy_weights(checkpoints: list[Path]) -> dict[str, torch.Tensor]:
    """The mean of the checkpoints' policy tensors (the SB3 state dict in each model.zip), element by element;
    integer and boolean tensors (counters, masks) are the last checkpoint's. Every checkpoint must hold the same
    tensors with the same shapes (one run's checkpoints do), else a CheckpointError names the first that differs."""
    from stable_baselines3.common.save_util import load_from_zip_file

    states = []
    for checkpoint in checkpoints:
        try:
            _, params, _ = load_from_zip_file(checkpoint / "model.zip", device="cpu", load_data=False)
        except Exception as err:  # zipfile, pickle and torch errors all mean the same thing here
            raise CheckpointError(f"corrupt checkpoint {checkpoint}: {type(err).__name__}: {err}") from err
        states.append(params["policy"])
    last = states[-1]
    expected = {(key, tuple(value.shape)) for key, value in last.items()}
    for checkpoint, state in zip(checkpoints, states):
        shapes = {(key, tuple(value.shape)) for key, value in state.items()}
        if shapes != expected:
            differing = sorted(shapes ^ expected)[0][0]
            raise CheckpointError(
                f"{checkpoint} and {checkpoints[-1]} hold different policies ({differing!r} differs): "
                "average checkpoints of one run"
            )
    return {
        key: torch.stack([state[key] for state in states]).mean(0)
        if value.is_floating_point()
        else value.clone()
        for key, value in last.items()
    }


def save_average(model, directory: Path, step: int, extra: dict, normalizer: Path | None = None) -> Path:
    """`model` (holding averaged weights) as ``directory/average_<step>/`` (model.zip, meta.json with the step
    and `extra`, the reward normaliser file `normalizer` copied; no replay, no RNG: for evaluation and export,
    not --resume). Earlier averages are removed only once it is in place."""
    previous = average_checkpoint(directory.parent)
    return _save_apart(
        model, directory, AVERAGE_PREFIX, step, extra, previous, "averaged checkpoint", normalizer
    )


def average_checkpoint(run_dir: Path) -> Path | None:
    """The run's newest averaged checkpoint (`save_average`), None if it has none."""
    found = [p for p in (Path(run_dir) / "checkpoints").glob(f"{AVERAGE_PREFIX}*") if (p / COMPLETE).exists()]
    return max(found, key=lambda path: _step_and_generation(path, AVERAGE_PREFIX)) if found else None


def best_checkpoint(run_dir: Path) -> Path | None:
    """The run's best checkpoint (`save_best`): the highest recorded return (then the latest), None if it kept
    none."""
    found = [p for p in (Path(run_dir) / "checkpoints").glob(f"{BEST_PREFIX}*") if (p / COMPLETE).exists()]

    def rank(path: Path) -> tuple[float, int, int]:
        return (
            float(read_meta(path).get("return_mean", float("-inf"))),
            *_step_and_generation(path, BEST_PREFIX),
        )

    return max(found, key=rank) if found else None


def _step_and_generation(path: Path, prefix: str = PREFIX) -> tuple[int, int]:
    """step_<N> -> (N, 0); step_<N>.<k> -> (N, k) (`prefix` BEST_PREFIX / AVERAGE_PREFIX: the same for best_<N>,
    average_<N>)."""
    step, _, generation = path.name[len(prefix) :].partition(".")
    return int(step), int(generation or 0)


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob(f"{PREFIX}*") if p.is_dir() and (p / COMPLETE).exists()]
    return sorted(found, key=_step_and_generation)


def latest_checkpoint(run_dir: Path) -> Path:
    checkpoints = list_checkpoints(Path(run_dir) / "checkpoints")
    if not checkpoints:
        raise CheckpointError(f"no checkpoint in {run_dir}/checkpoints (has the run written one yet?)")
    return checkpoints[-1]


def read_meta(checkpoint: Path) -> dict:
    try:
        return json.loads((checkpoint / COMPLETE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"corrupt checkpoint {checkpoint}: cannot read {COMPLETE} ({err})") from err


def load_model(algo_cls, checkpoint: Path, env=None, device: str = "auto"):
    """The SB3 model of a checkpoint directory (or a model .zip), with a one-line error when unreadable."""
    path = checkpoint / "model.zip" if checkpoint.is_dir() else checkpoint
    if not path.exists():
        raise CheckpointError(f"no model.zip in checkpoint {checkpoint}")
    from agents.factory import resolve_device  # a bad device is the caller's error, not the checkpoint's

    device = resolve_device(device)
    try:
        return algo_cls.load(path, env=env, device=device)
    except Exception as err:  # zipfile, pickle and torch errors all mean the same thing here
        raise CheckpointError(f"corrupt checkpoint {path}: {type(err).__name__}: {err}") from err


def is_run_directory(path: Path) -> bool:
    """A run directory holds the run's config.yaml; a checkpoint inside it (RUN/checkpoints/NAME) holds model.zip."""
    return (path / "config.yaml").exists()


def locate(path: Path) -> tuple:
    """(TrainConfig, checkpoint) for a run directory or a checkpoint directory inside one."""
    from experiments.config import load as load_config  # config imports agents: keep this module light

    if not path.exists():
        raise ValueError(f"run directory or checkpoint {str(path)!r} not found")
    if is_run_directory(path):
        return load_config(path / "config.yaml"), latest_checkpoint(path)
    if (path / "model.zip").exists() and is_run_directory(path.parent.parent):
        return load_config(path.parent.parent / "config.yaml"), path
    raise ValueError(f"{str(path)!r} is neither a run directory (config.yaml) nor a checkpoint (model.zip)")
