"""An on-policy rollout buffer that lives on the policy's device.

SB3's `DictRolloutBuffer` keeps numpy arrays on the host: every PPO epoch gathers minibatches there and copies
them to the device again. Here observations (uint8 pixels stay uint8), actions, values and log-probs are written
on the device once per step, GAE runs there, and minibatches are index slices of device tensors.
Same arithmetic as SB3's buffer (tested against it on the same data).
"""

from __future__ import annotations

from collections.abc import Generator

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.buffers import BaseBuffer
from stable_baselines3.common.type_aliases import DictRolloutBufferSamples, RolloutBufferSamples


def _as_tensor(x, device, dtype=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype or x.dtype)
    return torch.as_tensor(np.asarray(x), device=device, dtype=dtype)


class DeviceRolloutBuffer(BaseBuffer):
    """Drop-in `rollout_buffer_class` for SB3's PPO / A2C with Dict or Box observations."""

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: torch.device | str = "auto",
        gae_lambda: float = 1.0,
        gamma: float = 0.99,
        n_envs: int = 1,
    ):
        super().__init__(buffer_size, observation_space, action_space, device, n_envs=n_envs)
        self.gae_lambda, self.gamma = gae_lambda, gamma
        self.is_dict = isinstance(observation_space, spaces.Dict)
        self.generator_ready = False
        self.reset()

    def _obs_storage(self, space: spaces.Space) -> torch.Tensor:
        dtype = torch.uint8 if space.dtype == np.uint8 else torch.float32
        return torch.zeros((self.buffer_size, self.n_envs, *space.shape), dtype=dtype, device=self.device)

    def reset(self) -> None:
        shape, device = (self.buffer_size, self.n_envs), self.device
        if self.is_dict:
            self.observations = {k: self._obs_storage(s) for k, s in self.observation_space.spaces.items()}
        else:
            self.observations = self._obs_storage(self.observation_space)
        self.actions = torch.zeros((*shape, self.action_dim), dtype=torch.float32, device=device)
        self._rewards = torch.zeros(shape, device=device)
        self._episode_starts = torch.zeros(shape, device=device)
        self._values = torch.zeros(shape, device=device)
        self._log_probs = torch.zeros(shape, device=device)
        self._advantages = torch.zeros(shape, device=device)
        self._returns = torch.zeros(shape, device=device)
        self.generator_ready = False
        super().reset()

    # SB3's algorithms read these as numpy (explained_variance); the training data stays on the device.
    @property
    def values(self) -> np.ndarray:
        return self._values.cpu().numpy()

    @property
    def returns(self) -> np.ndarray:
        return self._returns.cpu().numpy()

    @property
    def advantages(self) -> np.ndarray:
        return self._advantages.cpu().numpy()

    def add(self, obs, action, reward, episode_start, value, log_prob) -> None:
        """obs {key: (n_envs, ...)} (device tensors, or numpy); action (n_envs, A); the rest (n_envs,)."""
        step = self.pos
        if self.is_dict:
            for key, storage in self.observations.items():
                storage[step].copy_(_as_tensor(obs[key], self.device), non_blocking=True)
        else:
            self.observations[step].copy_(_as_tensor(obs, self.device), non_blocking=True)
        self.actions[step] = _as_tensor(action, self.device, torch.float32).reshape(
            self.n_envs, self.action_dim
        )
        self._rewards[step] = _as_tensor(reward, self.device, torch.float32)
        self._episode_starts[step] = _as_tensor(episode_start, self.device, torch.float32)
        self._values[step] = _as_tensor(value, self.device, torch.float32).flatten()
        self._log_probs[step] = _as_tensor(log_prob, self.device, torch.float32).flatten()
        self.pos += 1
        if self.pos == self.buffer_size:
            self.full = True

    @torch.no_grad()
    def compute_returns_and_advantage(self, last_values: torch.Tensor, dones: np.ndarray) -> None:
        """GAE(lambda) advantages and TD(lambda) returns, on the device."""
        last_values = _as_tensor(last_values, self.device, torch.float32).flatten()
        dones = _as_tensor(dones, self.device, torch.float32)
        last_gae = torch.zeros(self.n_envs, device=self.device)
        for step in reversed(range(self.buffer_size)):
            if step == self.buffer_size - 1:
                next_non_terminal, next_values = 1.0 - dones, last_values
            else:
                next_non_terminal, next_values = 1.0 - self._episode_starts[step + 1], self._values[step + 1]
            delta = self._rewards[step] + self.gamma * next_values * next_non_terminal - self._values[step]
            last_gae = delta + self.gamma * self.gae_lambda * next_non_terminal * last_gae
            self._advantages[step] = last_gae
        self._returns = self._advantages + self._values

    def get(
        self, batch_size: int | None = None
    ) -> Generator[RolloutBufferSamples | DictRolloutBufferSamples, None, None]:
        assert self.full, "the rollout buffer must be full before sampling"
        total = self.buffer_size * self.n_envs
        indices = torch.randperm(total, device=self.device)
        batch_size = batch_size or total
        for start in range(0, total, batch_size):
            yield self._get_samples(indices[start : start + batch_size])

    def _get_samples(self, index: torch.Tensor, env=None):
        flat = lambda t: t.reshape(self.buffer_size * self.n_envs, *t.shape[2:])[index]  # noqa: E731
        if self.is_dict:
            observations = {key: flat(storage) for key, storage in self.observations.items()}
            cls = DictRolloutBufferSamples
        else:
            observations, cls = flat(self.observations), RolloutBufferSamples
        return cls(
            observations,
            flat(self.actions),
            flat(self._values),
            flat(self._log_probs),
            flat(self._advantages),
            flat(self._returns),
        )
