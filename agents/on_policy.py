"""PPO and A2C with batched, device-resident rollouts: thin subclasses of SB3's algorithms.

Only `collect_rollouts` changes (with `DeviceRolloutBuffer`, the default on CUDA): SB3 converts each step's
observations to tensors for the policy and then hands the *numpy* arrays to `buffer.add`, so a device buffer
alone would copy twice. Here the observations of all envs
cross to the device once per step (pinned, non-blocking on CUDA), the policy runs once for all envs, and the
same device tensors are written into `DeviceRolloutBuffer`. Timeout bootstrapping is batched too.

`train` is SB3's, line for line, plus one term: with ``aux_state_weight > 0`` the policy's state-decoding loss of
each minibatch's encoder pass (`PerceiverActorCriticPolicy.evaluate_actions`) joins the minibatch loss. With
``modality_mix`` (`ModalityMixMixin`) each rollout sample is trained with one modality subset, and the ratio's old
log-probabilities are recomputed under the same masks before the epochs.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.utils import explained_variance, get_device
from stable_baselines3.common.vec_env import VecEnv

from agents.modality_mix import ModalityMixSettings, with_flags
from agents.pipelined import collect_pipelined, pipelined_base
from agents.rollout_buffer import DeviceRolloutBuffer
from agents.sac import check_state_decoding, record_state_decoding
from agents.transfer import ObservationTransfer, stack_observations
from agents.warmup import LearningRateWarmupMixin
from perceiver_policy.latent_scaling import (
    get_num_latents,
    perceiver_encoders,
    set_num_latents,
    training_num_latents,
)
from perceiver_policy.modalities import ABSENT_KEY


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's intra-op thread count set to ``n`` inside the block (None: unchanged), restored after."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class BatchedRolloutMixin:
    """Overrides `OnPolicyAlgorithm.collect_rollouts` for `DeviceRolloutBuffer` and for pipelined subprocess envs
    (`agents.pipelined`); other buffers and envs use SB3's.

    The default buffer is `DeviceRolloutBuffer` on CUDA (one host->device copy per step instead of one per
    minibatch and epoch) and SB3's `DictRolloutBuffer` on the CPU, where there is no copy to save: measured
    side by side, PPO steps/s with the device buffer were 1.007x SB3's on an AVX-512 host and 0.84x on an
    AVX2-only host (docs/results.md).

    :param collect_threads: torch threads while collecting on the CPU (the update keeps torch's setting). At
        batch n_envs the forward gains nothing from more threads, and their OpenMP workers spin on the cores
        the envs (their workers, the software renderer) need: on 2 cores, collection ran 1.09x (in-process
        envs) and 1.24x (subprocess envs) faster with 1 thread than with 2 (docs/results.md). None leaves
        torch's setting.
    """

    def __init__(self, policy, env, collect_threads: int | None = 1, **kwargs):
        if "rollout_buffer_class" not in kwargs and get_device(kwargs.get("device", "auto")).type == "cuda":
            kwargs["rollout_buffer_class"] = DeviceRolloutBuffer
        self.collect_threads = collect_threads
        super().__init__(policy, env, **kwargs)

    def _transfer(self) -> ObservationTransfer:
        if getattr(self, "_obs_transfer", None) is None or self._obs_transfer.device != self.device:
            self._obs_transfer = ObservationTransfer(self.device)
        return self._obs_transfer

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_obs_transfer", "_acting_num_latents"]

    def collect_rollouts(
        self, env: VecEnv, callback: BaseCallback, rollout_buffer, n_rollout_steps: int
    ) -> bool:
        """Collects with the k of the next update when `PerceiverConfig.latent_scaling` is on (`train` keeps it,
        then restores the acting k): the buffer's old log-probabilities are those of the policy it updates."""
        k = training_num_latents(self.policy)
        if k is not None:
            if getattr(self, "_acting_num_latents", None) is None:
                self._acting_num_latents = get_num_latents(self.policy)
            set_num_latents(self.policy, k)
        with torch_threads(self.collect_threads if self.device.type == "cpu" else None):
            return self._collect(env, callback, rollout_buffer, n_rollout_steps)

    def _restore_acting_num_latents(self) -> None:
        """After an update: the policy acts (and is evaluated, saved) with its own k again."""
        acting = getattr(self, "_acting_num_latents", None)
        if acting is not None and perceiver_encoders(self.policy):
            set_num_latents(self.policy, acting)
            self._acting_num_latents = None

    def _collect(self, env: VecEnv, callback: BaseCallback, rollout_buffer, n_rollout_steps: int) -> bool:
        pipelined = pipelined_base(env)
        if pipelined is not None:
            return collect_pipelined(self, env, pipelined, callback, rollout_buffer, n_rollout_steps)
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


class StateDecodingMixin:
    """`aux_state_weight` for on-policy algorithms: the state-decoding loss of the minibatch's encoder pass."""

    def __init__(self, policy, env, aux_state_weight: float = 0.0, **kwargs):
        self.aux_state_weight = aux_state_weight
        super().__init__(policy, env, **kwargs)

    def _setup_model(self) -> None:
        super()._setup_model()
        check_state_decoding(self.aux_state_weight, self.policy)
        self._decode_metrics: list[dict[str, float]] = []

    def _auxiliary_loss(self):
        """w * the state-decoding loss left by `evaluate_actions` (0 when off)."""
        decoding = getattr(self.policy, "state_decoding", None)
        if self.aux_state_weight <= 0 or decoding is None:
            return 0.0
        self.policy.state_decoding = None
        loss, per_sensor = decoding
        self._decode_metrics.append(per_sensor)
        return self.aux_state_weight * loss

    def _record_auxiliary(self) -> None:
        record_state_decoding(self.logger, self._decode_metrics)
        self._decode_metrics = []

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_decode_metrics"]


class ModalityMixMixin(ModalityMixSettings):
    """The weighted modality sampler (`agents.modality_mix`) for PPO and A2C.

    Before each update every rollout sample draws a modality subset; its other modalities are flagged absent
    (``absent_modalities``, OR-ed with env-side dropout flags) in the buffer's observations, so each minibatch's
    encoder pass withholds them (masked or removed per `PerceiverConfig.missing_tokens`). Then, with the policy
    that collected the rollout, one no-grad pass over the buffer recomputes the old log-probabilities and values
    under those masks: PPO's ratio starts at exactly 1 and compares the updated masked policy with the same masked
    policy before the update, never with the unmasked acting one (a biased ratio). Advantages and returns stay
    those of the rollout (the buffer's values, and so ``train/explained_variance``, become the masked pass's). That
    pass (one forward per sample, no backward) also gives each subset's mean squared value error, logged as
    ``perceiver/modality_mix_critic_loss/<subset>`` and followed by the ``active`` mode.
    Acting and evaluation see every modality.

    Settings: `agents.modality_mix.ModalityMixSettings`.
    """

    def _setup_model(self) -> None:
        super()._setup_model()
        encoder = getattr(self.policy, "encoder", None)
        self._setup_mixer(encoder, type(self.policy if encoder is None else encoder).__name__)

    @torch.no_grad()
    def _mix_rollout(self) -> None:
        """Flag each buffer sample's withheld modalities, then recompute old log-probs and values under them."""
        if self.mixer is None:
            return
        buffer = self.rollout_buffer
        steps, n_envs, total = buffer.buffer_size, buffer.n_envs, buffer.buffer_size * buffer.n_envs
        index, flags = self.mixer.draw(total, self.num_timesteps, self.device)
        observations = buffer.observations
        on_device = isinstance(buffer, DeviceRolloutBuffer)
        as_tensor = lambda x: torch.as_tensor(x, device=self.device)  # noqa: E731
        flat = {key: as_tensor(value).reshape(total, *value.shape[2:]) for key, value in observations.items()}
        flat = with_flags(flat, flags, ABSENT_KEY)
        absent = flat[ABSENT_KEY].to(torch.int8)
        absent = absent.reshape(steps, n_envs, -1)
        observations[ABSENT_KEY] = absent if on_device else absent.cpu().numpy()
        actions = as_tensor(buffer.actions).reshape(total, -1).float()
        if isinstance(self.action_space, spaces.Discrete):
            actions = actions.long().flatten()
        self.policy.set_training_mode(False)  # as when the rollout was collected
        values, log_probs = [], []
        chunk = getattr(self, "batch_size", None) or total  # A2C has none: one pass
        for start in range(0, total, chunk):
            part = {key: value[start : start + chunk] for key, value in flat.items()}
            value, log_prob, _ = self.policy.evaluate_actions(part, actions[start : start + chunk])
            values.append(value.flatten())
            log_probs.append(log_prob.flatten())
        if hasattr(self.policy, "state_decoding"):
            self.policy.state_decoding = None  # not a training pass
        self.policy.set_training_mode(True)
        values, log_probs = torch.cat(values), torch.cat(log_probs)
        returns = as_tensor(buffer.returns).reshape(total).float()
        self.mixer.record(index, (returns - values).square())
        if on_device:
            buffer._values.copy_(values.reshape(steps, n_envs))
            buffer._log_probs.copy_(log_probs.reshape(steps, n_envs))
        else:
            buffer.values = values.reshape(steps, n_envs).cpu().numpy()
            buffer.log_probs = log_probs.reshape(steps, n_envs).cpu().numpy()


class PerceiverPPO(LearningRateWarmupMixin, ModalityMixMixin, StateDecodingMixin, BatchedRolloutMixin, PPO):
    """SB3 PPO with batched device rollouts (default buffer: `DeviceRolloutBuffer` on CUDA, SB3's on the CPU), the optional
    state-decoding loss (``aux_state_weight``), learning-rate warmup (``lr_warmup``, `agents.warmup`) and the
    weighted modality sampler (``modality_mix``, `ModalityMixMixin`)."""

    def train(self) -> None:
        """SB3's `PPO.train` (2.9) with `self._auxiliary_loss()` added to each minibatch loss, after
        `_mix_rollout` (a no-op without ``modality_mix``)."""
        self._mix_rollout()
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        clip_range = self.clip_range(self._current_progress_remaining)
        if self.clip_range_vf is not None:
            clip_range_vf = self.clip_range_vf(self._current_progress_remaining)
        entropy_losses, pg_losses, value_losses, clip_fractions = [], [], [], []
        continue_training = True
        for epoch in range(self.n_epochs):
            approx_kl_divs = []
            for rollout_data in self.rollout_buffer.get(self.batch_size):
                actions = rollout_data.actions
                if isinstance(self.action_space, spaces.Discrete):
                    actions = rollout_data.actions.long().flatten()
                values, log_prob, entropy = self.policy.evaluate_actions(rollout_data.observations, actions)
                values = values.flatten()
                advantages = rollout_data.advantages
                if self.normalize_advantage and len(advantages) > 1:
                    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
                ratio = torch.exp(log_prob - rollout_data.old_log_prob)
                policy_loss_1 = advantages * ratio
                policy_loss_2 = advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
                policy_loss = -torch.min(policy_loss_1, policy_loss_2).mean()
                pg_losses.append(policy_loss.item())
                clip_fractions.append(torch.mean((torch.abs(ratio - 1) > clip_range).float()).item())
                if self.clip_range_vf is None:
                    values_pred = values
                else:
                    values_pred = rollout_data.old_values + torch.clamp(
                        values - rollout_data.old_values, -clip_range_vf, clip_range_vf
                    )
                value_loss = F.mse_loss(rollout_data.returns, values_pred)
                value_losses.append(value_loss.item())
                entropy_loss = -torch.mean(-log_prob) if entropy is None else -torch.mean(entropy)
                entropy_losses.append(entropy_loss.item())
                loss = policy_loss + self.ent_coef * entropy_loss + self.vf_coef * value_loss
                loss = loss + self._auxiliary_loss()
                with torch.no_grad():
                    log_ratio = log_prob - rollout_data.old_log_prob
                    approx_kl_div = torch.mean((torch.exp(log_ratio) - 1) - log_ratio).cpu().numpy()
                    approx_kl_divs.append(approx_kl_div)
                if self.target_kl is not None and approx_kl_div > 1.5 * self.target_kl:
                    continue_training = False
                    if self.verbose >= 1:
                        print(f"Early stopping at step {epoch} due to reaching max kl: {approx_kl_div:.2f}")
                    break
                self.policy.optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
                self.policy.optimizer.step()
            self._n_updates += 1
            if not continue_training:
                break
        explained_var = explained_variance(
            self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten()
        )
        self.logger.record("train/entropy_loss", np.mean(entropy_losses))
        self.logger.record("train/policy_gradient_loss", np.mean(pg_losses))
        self.logger.record("train/value_loss", np.mean(value_losses))
        self.logger.record("train/approx_kl", np.mean(approx_kl_divs))
        self.logger.record("train/clip_fraction", np.mean(clip_fractions))
        self.logger.record("train/loss", loss.item())
        self.logger.record("train/explained_variance", explained_var)
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", torch.exp(self.policy.log_std).mean().item())
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/clip_range", clip_range)
        if self.clip_range_vf is not None:
            self.logger.record("train/clip_range_vf", clip_range_vf)
        self._record_auxiliary()
        self._log_mixer()
        self._restore_acting_num_latents()


class PerceiverA2C(LearningRateWarmupMixin, ModalityMixMixin, StateDecodingMixin, BatchedRolloutMixin, A2C):
    """SB3 A2C with batched device rollouts (default buffer: `DeviceRolloutBuffer` on CUDA, SB3's on the CPU), the optional
    state-decoding loss (``aux_state_weight``), learning-rate warmup (``lr_warmup``, `agents.warmup`) and the
    weighted modality sampler (``modality_mix``, `ModalityMixMixin`)."""

    def train(self) -> None:
        """SB3's `A2C.train` (2.9) with `self._auxiliary_loss()` added to the loss, after `_mix_rollout` (a
        no-op without ``modality_mix``)."""
        self._mix_rollout()
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        for rollout_data in self.rollout_buffer.get(batch_size=None):
            actions = rollout_data.actions
            if isinstance(self.action_space, spaces.Discrete):
                actions = actions.long().flatten()
            values, log_prob, entropy = self.policy.evaluate_actions(rollout_data.observations, actions)
            values = values.flatten()
            advantages = rollout_data.advantages
            if self.normalize_advantage:
                advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
            policy_loss = -(advantages * log_prob).mean()
            value_loss = F.mse_loss(rollout_data.returns, values)
            entropy_loss = -torch.mean(-log_prob) if entropy is None else -torch.mean(entropy)
            loss = policy_loss + self.ent_coef * entropy_loss + self.vf_coef * value_loss
            loss = loss + self._auxiliary_loss()
            self.policy.optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
            self.policy.optimizer.step()
        explained_var = explained_variance(
            self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten()
        )
        self._n_updates += 1
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/explained_variance", explained_var)
        self.logger.record("train/entropy_loss", entropy_loss.item())
        self.logger.record("train/policy_loss", policy_loss.item())
        self.logger.record("train/value_loss", value_loss.item())
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", torch.exp(self.policy.log_std).mean().item())
        self._record_auxiliary()
        self._log_mixer()
        self._restore_acting_num_latents()
