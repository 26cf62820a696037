"""PPO and A2C with batched, device-resident rollouts: thin subclasses of SB3's algorithms.

Only `collect_rollouts` changes: SB3 converts each step's observations to tensors for the policy and then hands
the *numpy* arrays to `buffer.add`, so a device buffer alone would copy twice. Here the observations of all envs
cross to the device once per step (pinned, non-blocking on CUDA), the policy runs once for all envs, and the
same device tensors are written into `DeviceRolloutBuffer`. Timeout bootstrapping is batched too.
SB3's `train` is untouched.
"""

from __future__ import annotations

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecEnv

from agents.rollout_buffer import DeviceRolloutBuffer
from agents.transfer import ObservationTransfer, stack_observations


class BatchedRolloutMixin:
    """Overrides `OnPolicyAlgorithm.collect_rollouts` for `DeviceRolloutBuffer`; other buffers use SB3's."""

    def _transfer(self) -> ObservationTransfer:
        if getattr(self, "_obs_transfer", None) is None or self._obs_transfer.device != self.device:
            self._obs_transfer = ObservationTransfer(self.device)
        return self._obs_transfer

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_obs_transfer"]

    def collect_rollouts(
        self, env: VecEnv, callback: BaseCallback, rollout_buffer, n_rollout_steps: int
    ) -> bool:
        if not isinstance(rollout_buffer, DeviceRolloutBuffer):
            return super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)
        assert self._last_obs is not None, "No previous observation was provided"
        to_device = self._transfer()
        self.policy.set_training_mode(False)
        n_steps = 0
        rollout_buffer.reset()
        callback.on_rollout_start()
        while n_steps < n_rollout_steps:
            with torch.no_grad():
                obs_tensor = to_device(self._last_obs)
                actions, values, log_probs = self.policy(obs_tensor)
            actions_np = actions.cpu().numpy()
            clipped_actions = actions_np
            if isinstance(self.action_space, spaces.Box):
                clipped_actions = np.clip(actions_np, self.action_space.low, self.action_space.high)
            new_obs, rewards, dones, infos = env.step(clipped_actions)
            self.num_timesteps += env.num_envs
            callback.update_locals(locals())
            if not callback.on_step():
                return False
            self._update_info_buffer(infos, dones)
            n_steps += 1
            self._bootstrap_timeouts(rewards, dones, infos, to_device)
            rollout_buffer.add(obs_tensor, actions, rewards, self._last_episode_starts, values, log_probs)
            self._last_obs = new_obs
            self._last_episode_starts = dones
        with torch.no_grad():
            values = self.policy.predict_values(to_device(new_obs))
        rollout_buffer.compute_returns_and_advantage(last_values=values, dones=dones)
        callback.update_locals(locals())
        callback.on_rollout_end()
        return True

    def _bootstrap_timeouts(
        self, rewards: np.ndarray, dones: np.ndarray, infos: list[dict], to_device
    ) -> None:
        """r += gamma * V(terminal obs) for envs cut by a time limit (SB3 issue #633), in one batched call."""
        index = [
            i
            for i, done in enumerate(dones)
            if done
            and infos[i].get("terminal_observation") is not None
            and infos[i].get("TimeLimit.truncated", False)
        ]
        if not index:
            return
        terminal = [infos[i]["terminal_observation"] for i in index]
        batch = stack_observations(terminal) if isinstance(terminal[0], dict) else np.stack(terminal)
        with torch.no_grad():
            terminal_values = self.policy.predict_values(to_device(batch)).flatten().cpu().numpy()
        rewards[index] += self.gamma * terminal_values


class PerceiverPPO(BatchedRolloutMixin, PPO):
    """SB3 PPO with batched device rollouts (default buffer: `DeviceRolloutBuffer`)."""

    def __init__(self, policy, env, **kwargs):
        kwargs.setdefault("rollout_buffer_class", DeviceRolloutBuffer)
        super().__init__(policy, env, **kwargs)


class PerceiverA2C(BatchedRolloutMixin, A2C):
    """SB3 A2C with batched device rollouts (default buffer: `DeviceRolloutBuffer`)."""

    def __init__(self, policy, env, **kwargs):
        kwargs.setdefault("rollout_buffer_class", DeviceRolloutBuffer)
        super().__init__(policy, env, **kwargs)
