"""Observation wrappers that compose with any Dict-observation env."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

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
