"""Vectorised DMC environments for Stable-Baselines3."""

from __future__ import annotations

import functools

import numpy as np
from stable_baselines3.common.env_util import make_vec_env as sb3_make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv
from stable_baselines3.common.vec_env.subproc_vec_env import _stack_obs

from envs.dmc import DMCEnv, parse_task
from envs.wrappers import ModalityDropout

VEC_ENV_TYPES = ("subproc", "dummy", "pipelined")
START_METHODS = ("forkserver", "spawn")


def make_env_fn(task: str, **env_kwargs):
    """A picklable constructor for one env (subprocess workers import `envs` and build their own renderer). With
    ``tasks=(...)`` in `env_kwargs`: an `envs.MultiTaskEnv` over those tasks that plays `task` only (the
    evaluation env of a multi-task policy)."""
    if env_kwargs.get("tasks"):
        from envs.multitask import MultiTaskEnv  # envs.multitask builds its VecEnv with this module

        tasks = tuple(env_kwargs.pop("tasks"))
        return functools.partial(MultiTaskEnv, tasks, task=task, **env_kwargs)
    env_kwargs.pop("tasks", None)
    domain, name = parse_task(task)
    return functools.partial(DMCEnv, domain, name, **env_kwargs)


def make_vec_env(
    task,
    n_envs: int = 1,
    seed: int | None = None,
    vec_env_type: str = "dummy",
    start_method: str = "forkserver",
    monitor_dir: str | None = None,
    modality_dropout: float = 0.0,
    **env_kwargs,
) -> VecEnv:
    """``n_envs`` copies of ``dmc/<task>`` as an SB3 ``VecEnv``, each wrapped in SB3's ``Monitor``. `task` may
    also be a picklable env constructor (`envs.multitask` builds its VecEnv so).

    ``vec_env_type="subproc"`` runs each env in its own process (one renderer each); ``"dummy"`` steps them in
    this process; ``"pipelined"`` is ``"subproc"`` whose two halves can also be stepped one after the other
    (`PipelinedSubprocVecEnv`: our PPO / A2C then overlap one half's env step with the other half's policy
    forward; needs ``n_envs >= 2``). ``fork`` is refused: workers forked after the parent rendered were seen to hang.
    Env ``i`` is seeded with ``seed + i``. ``modality_dropout > 0`` wraps each env in
    `envs.wrappers.ModalityDropout` (PPO-safe random missing modalities, flagged in the observation).
    """
    if vec_env_type not in VEC_ENV_TYPES:
        raise ValueError(f"unknown vec_env_type {vec_env_type!r}; valid choices: {list(VEC_ENV_TYPES)}")
    if start_method not in START_METHODS:
        raise ValueError(f"unsupported start_method {start_method!r}; valid choices: {list(START_METHODS)}")
    if not isinstance(n_envs, int) or n_envs <= 0:
        raise ValueError(f"n_envs must be a positive integer, got {n_envs!r}")
    if vec_env_type == "pipelined" and n_envs < 2:
        raise ValueError(
            f"vec_env_type 'pipelined' steps the envs in two halves: it needs n_envs >= 2, got {n_envs}"
        )
    if vec_env_type in ("subproc", "pipelined"):
        vec_cls = PipelinedSubprocVecEnv if vec_env_type == "pipelined" else SubprocVecEnv
        vec_kwargs = {"start_method": start_method}
    else:
        vec_cls, vec_kwargs = DummyVecEnv, None
    if callable(task) and env_kwargs:
        raise ValueError(f"env options {sorted(env_kwargs)} go into the env constructor when `task` is one")
    env_fn = task if callable(task) else make_env_fn(task, **env_kwargs)
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


class PipelinedSubprocVecEnv(SubprocVecEnv):
    """A `SubprocVecEnv` whose envs can also be stepped in two halves, so that a caller can run the policy on one
    half while the other half's workers step.

    ``step_async_half(h, actions)`` sends one step to half ``h`` (``halves[h]`` is a slice of env indices);
    ``step_wait_half(h)`` receives it and returns that half's observations. Once both halves have been sent a
    step, the usual ``step_wait()`` (through any `VecEnvWrapper`s above) returns the whole step in env order,
    exactly as `SubprocVecEnv` would, receiving whatever was not received yet. A half may be sent its next step
    before the whole step is collected: that step stays in flight for the next ``step_wait()``. Plain
    ``step_async`` / ``step_wait`` work as in `SubprocVecEnv`.
    """

    def __init__(self, env_fns, start_method: str | None = None):
        super().__init__(env_fns, start_method)
        half = self.num_envs // 2
        self.halves = (slice(0, half), slice(half, self.num_envs))
        self._in_flight: list[int] = []  # halves sent a step and not received, in the order they were sent
        self._received: dict[int, list] = {}  # half -> its workers' results of the step being assembled

    def step_async_half(self, half: int, actions: np.ndarray) -> None:
        """actions: (len(halves[half]), *action_shape) for the envs of that half."""
        if half in self._in_flight:
            raise RuntimeError(f"half {half} already has a step in flight; call step_wait_half({half}) first")
        for remote, action in zip(self.remotes[self.halves[half]], actions, strict=True):
            remote.send(("step", action))
        self._in_flight.append(half)
        self.waiting = True

    def step_wait_half(self, half: int):
        """Receives half ``half``'s step and returns its observations (its part of the stacked observation)."""
        if half not in self._in_flight:
            raise RuntimeError(f"half {half} has no step in flight; valid: {self._in_flight}")
        if half in self._received:
            raise RuntimeError(f"half {half}'s previous step is not collected yet: call step_wait() first")
        self._in_flight.remove(half)
        self._received[half] = [remote.recv() for remote in self.remotes[self.halves[half]]]
        self.waiting = bool(self._in_flight)
        return _stack_obs([result[0] for result in self._received[half]], self.observation_space)

    def step_async(self, actions: np.ndarray) -> None:
        for half, part in enumerate(self.halves):
            self.step_async_half(half, actions[part])

    def step_wait(self):
        for half in range(2):
            if half not in self._received:
                self.step_wait_half(half)
        results = self._received[0] + self._received[1]
        self._received = {}
        obs, rews, dones, infos, self.reset_infos = zip(*results, strict=True)
        return _stack_obs(obs, self.observation_space), np.stack(rews), np.stack(dones), infos

    def _get_target_remotes(self, indices):
        if self._in_flight:  # a get_attr / env_method reply would be read as a step result, or the reverse
            raise RuntimeError(
                "env_method / get_attr / set_attr while a half is stepping; call step_wait() first"
            )
        return super()._get_target_remotes(indices)

    def reset(self):
        self._drain()
        return super().reset()

    def _drain(self) -> None:
        for half in list(self._in_flight):
            self._received.pop(half, None)
            self.step_wait_half(half)
        self._received = {}
        self.waiting = False

    def close(self) -> None:
        if not self.closed:  # receive only what is in flight (SubprocVecEnv would wait on every worker)
            self._drain()
        super().close()
