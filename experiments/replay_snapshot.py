"""One replay snapshot per run, as raw arrays: written next to the checkpoints, loaded in place.

Pickling the replay buffer into every checkpoint cost its whole size (≈ 2.4 GB at 100k pixel transitions) per
kept checkpoint plus a temporary copy, and loading it allocated a second buffer beside the one SB3 builds when it
loads the model (peak ≈ 2×). Here the buffer's arrays are saved with `numpy.save` (only the filled part) into
``checkpoints/replay_<step>/``; the newest complete snapshot is the only one kept (an older one is removed once
the new one is in place). Loading memory-maps each file and copies it into the buffer the model already has, so
the resident peak stays ≈ one buffer. Works for any buffer whose state is arrays, tensors, dicts of arrays and
scalars (`FrameReplayBuffer`, SB3's `ReplayBuffer` / `DictReplayBuffer`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

PREFIX = "replay_"
MANIFEST = "manifest.json"  # written last
CHUNK_ROWS = 4096  # rows copied at a time into a tensor (bounded temporary memory)


def _filled(buffer, name: str, array) -> int:
    """How many leading rows of `array` hold data (the rest is still zeros): saved and loaded, nothing more."""
    rows = len(array)
    if getattr(buffer, "full", True):
        return rows
    if name == "frames" and hasattr(buffer, "frames_pushed"):  # FrameReplayBuffer's ring of frames
        return min(rows, int(np.max(buffer.frames_pushed)))
    return min(rows, int(buffer.pos)) if rows == buffer.buffer_size else rows


def _state(buffer) -> tuple[dict, dict]:
    arrays, scalars = {}, {}
    for name, value in vars(buffer).items():
        if isinstance(value, (torch.Tensor, np.ndarray)):
            arrays[name] = value
        elif isinstance(value, dict) and value and all(isinstance(v, np.ndarray) for v in value.values()):
            arrays.update({f"{name}/{key}": v for key, v in value.items()})
        elif isinstance(value, (bool, int, float, str, np.integer, np.floating, np.bool_)):
            scalars[name] = value.item() if hasattr(value, "item") else value
    return arrays, scalars


def save_replay_snapshot(buffer, directory: Path, step: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    name = f"{PREFIX}{step:012d}"
    same_step = [p for p in list_snapshots(directory) if _step_and_generation(p)[0] == step]
    if same_step:  # the end of a run snapshots its last step again: a new generation, the old removed after
        name += f".{_step_and_generation(same_step[-1])[1] + 1}"
    final = directory / name
    tmp = directory / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    arrays, scalars = _state(buffer)
    files = {}
    for index, (key, value) in enumerate(arrays.items()):
        rows = _filled(buffer, key.split("/")[0], value)
        data = value[:rows].cpu().numpy() if isinstance(value, torch.Tensor) else value[:rows]
        files[key] = f"{index:03d}.npy"
        np.save(tmp / files[key], data)
    meta = {"step": step, "class": type(buffer).__name__, "arrays": files, "scalars": scalars}
    (tmp / MANIFEST).write_text(json.dumps(meta))
    for file in tmp.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    os.replace(tmp, final)
    for old in list_snapshots(directory)[:-1]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_snapshots(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob(f"{PREFIX}*") if (p / MANIFEST).exists()]
    return sorted(found, key=_step_and_generation)


def _step_and_generation(path: Path) -> tuple[int, int]:
    step, _, generation = path.name[len(PREFIX) :].partition(".")
    return int(step), int(generation or 0)


def load_replay_snapshot(buffer, snapshot: Path) -> int:
    """Copy a snapshot into `buffer` in place (memory-mapped reads); returns the step it was taken at."""
    meta = json.loads((snapshot / MANIFEST).read_text())
    if meta["class"] != type(buffer).__name__:
        raise ValueError(
            f"replay snapshot {snapshot} holds a {meta['class']}, the model has a {type(buffer).__name__}"
        )
    for key, file in meta["arrays"].items():
        data = np.load(snapshot / file, mmap_mode="r")
        name, _, sub = key.partition("/")
        target = getattr(buffer, name, None)
        if sub and target is not None:
            target = target.get(sub)
        if target is None:  # state the fresh buffer does not have yet (e.g. the last frame seen)
            value = np.array(data)
            (getattr(buffer, name).__setitem__(sub, value) if sub else setattr(buffer, name, value))
            continue
        if tuple(target.shape[1:]) != tuple(data.shape[1:]) or len(data) > len(target):
            raise ValueError(
                f"replay snapshot {snapshot}: {key} has shape {data.shape}, the buffer {tuple(target.shape)}"
            )
        for start in range(0, len(data), CHUNK_ROWS):
            chunk = np.require(
                data[start : start + CHUNK_ROWS], requirements=("C", "W")
            )  # read-only mmap -> a copy
            if isinstance(target, torch.Tensor):
                target[start : start + len(chunk)].copy_(torch.from_numpy(chunk))
            else:
                target[start : start + len(chunk)] = chunk
    for name, value in meta["scalars"].items():
        setattr(buffer, name, value)
    return int(meta["step"])
