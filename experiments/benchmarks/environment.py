"""Environment steps per second: states vs pixels, the fast renderer vs dm_control's, subprocess workers."""

from __future__ import annotations

import os
import time

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")

import envs  # noqa: E402
from experiments.benchmarks.common import table  # noqa: E402

TASK = "cheetah-run"
PIXEL_OBS = {"image_size": 84, "frame_stack": 3, "action_history_len": 8}


# ------------------------------------------------------------------------------------------------------- env


def env_steps_per_sec(steps: int, n_envs: int = 1, vec_env_type: str = "dummy", **kwargs) -> float:
    venv = envs.make_vec_env(TASK, n_envs=n_envs, seed=0, vec_env_type=vec_env_type, **kwargs)
    venv.reset()
    actions = np.zeros((n_envs, *venv.action_space.shape), np.float32)
    for _ in range(5):
        venv.step(actions)
    start = time.perf_counter()
    for _ in range(steps // n_envs):
        venv.step(actions)
    elapsed = time.perf_counter() - start
    venv.close()
    return (steps // n_envs) * n_envs / elapsed


def bench_env(quick: bool) -> None:
    steps = 300 if quick else 2000
    workers = max(2, min(4, os.cpu_count() or 2))
    base = env_steps_per_sec(steps, modalities=("proprio",))
    rows = [["states (proprio)", "-", "-", 1, base, 1.0]]
    for backend in ("fast", "dm_control"):
        for size in (64, 84):
            for stack in (1, 3):
                if stack == 1 and size == 64:
                    continue
                sps = env_steps_per_sec(steps, render_backend=backend, image_size=size, frame_stack=stack)
                rows.append([f"pixels+proprio+history, {backend}", size, stack, 1, sps, sps / base])
    for n, kind in ((1, "subproc"), (workers, "subproc")):
        sps = env_steps_per_sec(steps, n_envs=n, vec_env_type=kind, image_size=84)
        rows.append([f"pixels fast, {kind} x{n}", 84, 3, n, sps, sps / base])
    table(
        f"Env steps/s, {TASK}, action repeat 1 (agent steps = frames)",
        ["observation / renderer", "px", "frames", "workers", "steps/s", "vs states"],
        rows,
    )


# ---------------------------------------------------------------------------------------------------- policy
