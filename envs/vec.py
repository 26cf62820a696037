"""Vectorised DMC environments for Stable-Baselines3."""

from __future__ import annotations

import functools

from stable_baselines3.common.env_util import make_vec_env as sb3_make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv

from envs.dmc import DMCEnv, parse_task
from envs.wrappers import ModalityDropout

VEC_ENV_TYPES = ("subproc", "dummy")
START_METHODS = ("forkserver", "spawn")


def make_env_fn(task: str, **env_kwargs):
    """A picklable constructor for one env (subprocess workers import `envs` and build their own renderer)."""
    domain, name = parse_task(task)
    return functools.partial(DMCEnv, domain, name, **env_kwargs)


def make_vec_env(
    task: str,
    n_envs: int = 1,
    seed: int | None = None,
    vec_env_type: str = "dummy",
    start_method: str = "forkserver",
    monitor_dir: str | None = None,
    modality_dropout: float = 0.0,
    **env_kwargs,
) -> VecEnv:
    """``n_envs`` copies of ``dmc/<task>`` as an SB3 ``VecEnv``, each wrapped in SB3's ``Monitor``.

    ``vec_env_type="subproc"`` runs each env in its own process (one renderer each); ``"dummy"`` steps them in
    this process. ``fork`` is refused: workers forked after the parent rendered were seen to hang.
    Env ``i`` is seeded with ``seed + i``. ``modality_dropout > 0`` wraps each env in
    `envs.wrappers.ModalityDropout` (PPO-safe random missing modalities, flagged in the observation).
    """
    if vec_env_type not in VEC_ENV_TYPES:
        raise ValueError(f"unknown vec_env_type {vec_env_type!r}; valid choices: {list(VEC_ENV_TYPES)}")
    if start_method not in START_METHODS:
        raise ValueError(f"unsupported start_method {start_method!r}; valid choices: {list(START_METHODS)}")
    if not isinstance(n_envs, int) or n_envs <= 0:
        raise ValueError(f"n_envs must be a positive integer, got {n_envs!r}")
    env_fn = make_env_fn(task, **env_kwargs)
    if vec_env_type == "subproc":
        vec_cls, vec_kwargs = SubprocVecEnv, {"start_method": start_method}
    else:
        vec_cls, vec_kwargs = DummyVecEnv, None
    wrapper = functools.partial(ModalityDropout, probability=modality_dropout) if modality_dropout else None
    return sb3_make_vec_env(
        env_fn,
        n_envs=n_envs,
        seed=seed,
        vec_env_cls=vec_cls,
        vec_env_kwargs=vec_kwargs,
        monitor_dir=monitor_dir,
        wrapper_class=wrapper,
    )
