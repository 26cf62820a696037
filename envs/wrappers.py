"""Observation wrappers that compose with any Dict-observation env."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env import VecEnvWrapper

from envs.dmc import STATE_KEY

# Observation key of the per-sample absent-modality flags; the Perceiver reads it instead of tokenising it.
ABSENT_KEY = "absent_modalities"


class ModalityDropout(gym.ObservationWrapper):
    """Marks whole modalities absent at random, per step, in an extra `absent_modalities` observation.

    Unlike model-side dropout this is PPO-safe: the flags are part of the observation, so the rollout and the
    update see the same inputs and the probability ratio stays exact. The Perceiver treats flagged modalities
    as missing (as if their tokens were not there). At least one modality always stays present.
    Flag order = the Dict's key order (gymnasium sorts keys), the privileged `state` excluded (never absent).
    """

    def __init__(self, env: gym.Env, probability: float, seed: int | None = None):
        super().__init__(env)
        if not 0.0 < probability < 1.0:
            raise ValueError(f"modality dropout probability must be in (0, 1), got {probability!r}")
        if not isinstance(env.observation_space, spaces.Dict) or ABSENT_KEY in env.observation_space.spaces:
            raise ValueError(f"ModalityDropout needs a Dict observation without {ABSENT_KEY!r}")
        self.probability = probability
        self.names = [k for k in env.observation_space.spaces if k != STATE_KEY]
        self.observation_space = spaces.Dict(
            {**env.observation_space.spaces, ABSENT_KEY: spaces.MultiBinary(len(self.names))}
        )
        self._rng = np.random.default_rng(seed)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:  # reproducible flags under a seeded reset
            self._rng = np.random.default_rng([seed, 7919])
        return super().reset(seed=seed, options=options)

    def observation(self, observation: dict) -> dict:
        absent = self._rng.random(len(self.names)) < self.probability
        if absent.all():
            absent[self._rng.integers(len(self.names))] = False
        return {**observation, ABSENT_KEY: absent.astype(np.int8)}


class NonFiniteGuard(VecEnvWrapper):
    """Stops NaN / inf in observations or rewards at the env boundary, before they reach a buffer or a gradient.

    Default: a ValueError naming the key (or 'reward') and the env index. With ``sanitize=True`` the bad values
    are replaced by 0 and counted (`nonfinite_count`, logged as env/nonfinite_count by the training run). One
    fused `isfinite().all()` per float key per step; the slow path runs only when something is wrong."""

    def __init__(self, venv, sanitize: bool = False):
        super().__init__(venv)
        self.sanitize = sanitize
        self.nonfinite_count = 0
        spaces_ = getattr(venv.observation_space, "spaces", {"": venv.observation_space})
        self.float_keys = [k for k, s in spaces_.items() if np.issubdtype(s.dtype, np.floating)]

    def _guard(self, name: str, values: np.ndarray) -> np.ndarray:
        if np.isfinite(values).all():
            return values
        bad = ~np.isfinite(values)
        if not self.sanitize:
            envs_ = sorted({int(i) for i in np.argwhere(bad.reshape(len(values), -1).any(axis=1)).ravel()})
            raise ValueError(
                f"non-finite {name} from env(s) {envs_} (NaN or inf); pass --sanitize-nonfinite to replace them "
                "by 0 and count them instead"
            )
        self.nonfinite_count += int(bad.sum())
        return np.where(bad, 0, values).astype(values.dtype)

    def _check_obs(self, obs):
        if isinstance(obs, dict):
            for key in self.float_keys:
                obs[key] = self._guard(f"observation {key!r}", obs[key])
            return obs
        return self._guard("observation", obs) if self.float_keys else obs

    def reset(self):
        return self._check_obs(self.venv.reset())

    def step_wait(self):
        obs, rewards, dones, infos = self.venv.step_wait()
        return self._check_obs(obs), self._guard("reward", rewards), dones, infos
