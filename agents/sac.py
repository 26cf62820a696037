"""SAC with a shared Perceiver encoder trained by the critic only (DrQ / DrQ-v2), as a thin SB3 subclass.

`SAC.train` calls the critic the same way for the critic and the actor losses, so with a shared encoder the
actor's loss would also train it. `PerceiverSAC.train` instead encodes obs once (with grad, for the critic loss)
and next_obs once (no grad, for the target), gives the actor detached latents, and Polyak-averages only the
critic's heads (the encoder has no target copy). Optional DrQ random shifts of the pixels. With
`PerceiverConfig.latent_scaling`, each update (both recipes) reads the first k latents, k drawn from the list;
the agent acts with the k set on the policy (all latents unless `set_num_latents` chose fewer).

With ``aux_state_weight > 0`` (and the privileged ``state`` in the observation), the policy's state-decoding
queries read the critic's latents of the augmented batch and their MSE joins the critic's loss, so the encoder
is trained to carry the true state (`perceiver/state_decode_mse/<sensor>`).

With `agents.DrQSACPolicy` (any encoder of `agents.encoders`) `train` runs DrQ's update rule instead
(`agents.drq.drq_update`): K augmented next observations averaged in the target, M augmented observations in the
critic loss, actor and temperature every `actor_update_interval` updates, the full target critic (encoder
included) Polyak-averaged every `target_update_interval` updates.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from stable_baselines3 import SAC
from stable_baselines3.common.utils import polyak_update

from agents.augment import random_shift
from agents.drq import action_spread, drq_update
from agents.drq_policy import DrQSACPolicy
from agents.modality_mix import ModalityMixSettings, with_flags
from agents.warmup import LearningRateWarmupMixin
from perceiver_policy.introspection import encoder_parameter_groups, gradient_norms
from perceiver_policy.latent_scaling import num_latents, training_num_latents
from perceiver_policy.modalities import ABSENT_KEY, ACTION_MASK_KEY, STATE_KEY, TASK_KEY
from perceiver_policy.sac_policy import PerceiverSACPolicy

TARGET_ENCODERS = ("copy", "online")
"""What reads next_obs for DrQ's critic target: the target critic's encoder copy (DrQ) or the online one (DrQ-v2)."""


class PerceiverSAC(LearningRateWarmupMixin, ModalityMixSettings, SAC):
    """SB3 SAC for `PerceiverSACPolicy` (the SB3 recipe) and `DrQSACPolicy` (DrQ's recipe, any encoder).

    :param augment_pad: DrQ shift in pixels (0 disables).
    :param aux_state_weight: weight of the state-decoding loss (needs the privileged `state` observation key).
    :param target_augmentations: DrQ's K, augmented next observations averaged in the target (DrQSACPolicy).
    :param critic_augmentations: DrQ's M, augmented observations in the critic loss (DrQSACPolicy).
    :param actor_update_interval: updates between actor and temperature steps (DrQSACPolicy).
    :param modality_mix: a weighted modality sampler spec (`agents.modality_mix`): each replay sample trained with
        a modality subset, withheld modalities masked alike in the critic, target and actor passes.
    :param modality_mix_mode: 'fixed', 'curriculum' (stages by frames), 'active' (weights follow TD error) or
        'reliance' (weights follow the return lost without each modality).
    :param frames_per_step: the env's action repeat (curriculum stages are in frames).
    :param lr_warmup: updates of linear learning-rate warmup for actor, critic and temperature (`agents.warmup`;
        0, the default: none).
    :param target_encoder: which encoder reads next_obs for the critic target (DrQSACPolicy): 'copy' (DrQ's: the
        target critic's own Polyak-averaged encoder, the default) or 'online' (DrQ-v2's, denisyarats/drqv2
        drqv2.py `DrQV2Agent.update`: the online encoder without gradient; the target critic keeps its own
        readout and heads). SB3's recipe always reads the online encoder (its encoder has no copy).
    SB3's ``target_update_interval`` counts updates over the whole run here (SB3 counts them per `train` call).
    """

    def __init__(
        self,
        policy,
        env,
        augment_pad: int = 4,
        pixel_key: str = "pixels",
        aux_state_weight: float = 0.0,
        target_augmentations: int = 1,
        critic_augmentations: int = 1,
        actor_update_interval: int = 1,
        target_encoder: str | None = None,
        **kwargs,
    ):
        self.augment_pad, self.pixel_key, self.aux_state_weight = augment_pad, pixel_key, aux_state_weight
        for name, value in (
            ("target_augmentations", target_augmentations),
            ("critic_augmentations", critic_augmentations),
            ("actor_update_interval", actor_update_interval),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.target_augmentations, self.critic_augmentations = target_augmentations, critic_augmentations
        self.actor_update_interval = actor_update_interval
        if target_encoder not in (None, *TARGET_ENCODERS):
            raise ValueError(f"target_encoder must be one of {TARGET_ENCODERS}, got {target_encoder!r}")
        self.target_encoder = target_encoder
        super().__init__(policy, env, **kwargs)

    def _setup_model(self) -> None:
        super()._setup_model()
        if not isinstance(self.policy, (PerceiverSACPolicy, DrQSACPolicy)):
            raise ValueError(
                f"PerceiverSAC needs PerceiverSACPolicy or DrQSACPolicy, got {type(self.policy).__name__}"
            )
        if (
            isinstance(self.policy, DrQSACPolicy)
            and self.aux_state_weight
            and self.policy.encoder_name != "perceiver"
        ):
            raise ValueError(
                f"aux_state_weight={self.aux_state_weight} decodes the state with the Perceiver's output queries; "
                f"encoder {self.policy.encoder_name!r} has none (use policy_type 'perceiver')"
            )
        check_state_decoding(self.aux_state_weight, self.policy)
        if ACTION_MASK_KEY in self.observation_space.spaces:
            self._setup_multitask()
        drq_only = {
            name: getattr(self, name)
            for name in ("target_augmentations", "critic_augmentations", "actor_update_interval")
            if getattr(self, name) != 1
        }
        if self.target_encoder == "copy":
            drq_only["target_encoder"] = "copy"
        if drq_only and not isinstance(self.policy, DrQSACPolicy):
            raise ValueError(
                f"{drq_only} are settings of DrQ's update rule; this policy trains with SB3's (use recipe 'drq')"
            )
        self._setup_mixer(self.policy.encoder, getattr(self.policy, "encoder_name", "perceiver"))

    @property
    def num_tasks(self) -> int:
        """Training tasks of a multi-task policy (envs.multitask observations); 0 for one task."""
        return getattr(self.policy, "num_tasks", 0)

    def _setup_multitask(self) -> None:
        """A multi-task policy learns one temperature per task (as multi-task SAC does: bodies with 1 and 6
        actuators need different entropy bonuses), each towards its own target entropy, -(the task's actuators)."""
        if not isinstance(self.policy, PerceiverSACPolicy):
            raise ValueError(
                "a multi-task observation (envs.multitask) needs PerceiverSACPolicy: its per-actuator queries keep "
                f"padded actions out of log-probabilities and Q; got {type(self.policy).__name__} (recipe 'sb3', "
                "policy_type 'perceiver')"
            )
        if self.log_ent_coef is not None:
            initial = self.log_ent_coef.detach().reshape(-1)[0]
            self.log_ent_coef = initial.repeat(self.num_tasks).requires_grad_(True)
            self.ent_coef_optimizer = torch.optim.Adam([self.log_ent_coef], lr=self.lr_schedule(1))

    def temperature_terms(self, observations) -> tuple[torch.Tensor, torch.Tensor]:
        """(log temperature, target entropy) per sample, (B, 1) each (broadcastable scalars for one task)."""
        if not self.num_tasks:
            return self.log_ent_coef, torch.as_tensor(self.target_entropy)
        task = observations[TASK_KEY].reshape(-1).long()
        target = -observations[ACTION_MASK_KEY].float().sum(dim=1, keepdim=True)
        return self.log_ent_coef[task][:, None], target

    def mix_batch(self, data):
        """The replay batch with each sample's withheld modalities flagged in obs and next_obs alike, and the
        subset index per sample (None without modality_mix)."""
        if self.mixer is None:
            return data, None
        batch = data.actions.shape[0]
        index, flags = self.mixer.draw(batch, self.num_timesteps, data.actions.device)
        return data._replace(
            observations=with_flags(data.observations, flags, ABSENT_KEY),
            next_observations=with_flags(data.next_observations, flags, ABSENT_KEY),
        ), index

    def _augment(self, obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.augment_pad <= 0 or self.pixel_key not in obs:
            return obs
        return {**obs, self.pixel_key: random_shift(obs[self.pixel_key], self.augment_pad)}

    def augmented_copies(self, obs: dict[str, torch.Tensor], copies: int) -> dict[str, torch.Tensor]:
        """`copies` independently shifted copies of a batch, stacked along the batch: (copies * B, ...)."""
        if copies > 1:
            obs = {key: torch.cat([value] * copies) for key, value in obs.items()}
        return self._augment(obs)

    def train(self, gradient_steps: int, batch_size: int = 64) -> None:
        if isinstance(self.policy, DrQSACPolicy):
            drq_update(self, gradient_steps, batch_size)
            return
        self.policy.set_training_mode(True)
        optimizers = [self.actor.optimizer, self.critic.optimizer]
        if self.ent_coef_optimizer is not None:
            optimizers.append(self.ent_coef_optimizer)
        self._update_learning_rate(optimizers)
        metrics: dict[str, list[float]] = {
            "ent_coef": [],
            "actor_loss": [],
            "critic_loss": [],
            "ent_coef_loss": [],
            "actor_action_spread": [],
        }
        decode_metrics: list[dict[str, float]] = []
        encoder_grads: dict[str, float] = {}

        for gradient_step in range(gradient_steps):
            with num_latents(
                self.policy, training_num_latents(self.policy)
            ):  # nested latents: one k per update
                self._perceiver_step(
                    gradient_step, gradient_steps, batch_size, metrics, decode_metrics, encoder_grads
                )

        self._n_updates += gradient_steps
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        for name, values in metrics.items():
            if values:
                self.logger.record(f"train/{name}", float(np.mean(values)))
        record_state_decoding(self.logger, decode_metrics)
        for group, norm in encoder_grads.items():
            self.logger.record(f"perceiver/grad_norm/{group}", norm)
        self._log_mixer()

    def _perceiver_step(
        self, gradient_step, gradient_steps, batch_size, metrics, decode_metrics, encoder_grads
    ):
        """One update of the SB3 recipe (critic, actor, temperature, target heads), losses into `metrics`."""
        encoder = self.policy.encoder
        data, mix_index = self.mix_batch(self.replay_buffer.sample(batch_size, env=self._vec_normalize_env))
        discounts = data.discounts if data.discounts is not None else self.gamma
        latents = encoder(self._augment(data.observations))  # (B, k, D), trained by the critic loss
        with torch.no_grad(), evaluation_mode(encoder):  # the target's latents without dropout
            next_latents = encoder(self._augment(data.next_observations))

        actions_pi, log_prob, modes = self.actor.sample_and_mode(latents.detach(), data.observations)
        log_prob = log_prob.reshape(-1, 1)
        if self.ent_coef_optimizer is not None and self.log_ent_coef is not None:
            log_alpha, target_entropy = self.temperature_terms(data.observations)
            ent_coef = torch.exp(log_alpha.detach())
            ent_coef_loss = -(log_alpha * (log_prob + target_entropy).detach()).mean()
            self.ent_coef_optimizer.zero_grad()
            ent_coef_loss.backward()
            self.ent_coef_optimizer.step()
            metrics["ent_coef_loss"].append(ent_coef_loss.item())
        else:
            ent_coef = self.ent_coef_tensor
        metrics["ent_coef"].append(ent_coef.mean().item())

        with torch.no_grad():
            next_obs = data.next_observations
            next_actions, next_log_prob = self.actor.action_log_prob_latents(next_latents, next_obs)
            next_q = torch.cat(self.critic_target.q_values(next_latents, next_actions, next_obs), dim=1)
            next_q = next_q.min(dim=1, keepdim=True).values - ent_coef * next_log_prob.reshape(-1, 1)
            target_q = data.rewards + (1 - data.dones) * discounts * next_q

        current_q = self.critic.q_values(latents, data.actions, data.observations)
        critic_loss = 0.5 * sum(F.mse_loss(q, target_q) for q in current_q)
        if mix_index is not None:  # per-sample squared TD error, summed over the critics
            self.mixer.record(mix_index, sum((q.detach() - target_q).square() for q in current_q).squeeze(1))
        if self.aux_state_weight > 0:
            decode_loss, per_sensor = self.policy.state_decoder.loss(latents, data.observations[STATE_KEY])
            critic_loss = critic_loss + self.aux_state_weight * decode_loss
            decode_metrics.append(per_sensor)
        self.critic.optimizer.zero_grad()
        critic_loss.backward()
        if gradient_step == gradient_steps - 1:  # what reaches each encoder stage (cheap: ~20 norms)
            encoder_grads.update(gradient_norms(encoder_parameter_groups(encoder)))
        self.critic.optimizer.step()
        metrics["critic_loss"].append(critic_loss.item())

        q_pi = torch.cat(self.critic.q_values(latents.detach(), actions_pi, data.observations), dim=1)
        actor_loss = (ent_coef * log_prob - q_pi.min(dim=1, keepdim=True).values).mean()
        self.actor.optimizer.zero_grad()
        actor_loss.backward()
        self.actor.optimizer.step()
        metrics["actor_loss"].append(actor_loss.item())
        metrics["actor_action_spread"].append(action_spread(modes, data.observations.get(ACTION_MASK_KEY)))

        if gradient_step % self.target_update_interval == 0:
            polyak_update(self.critic.parameters(), self.critic_target.parameters(), self.tau)


@contextlib.contextmanager
def evaluation_mode(module: torch.nn.Module):
    """`module` in eval mode inside the block (no dropout, DropPath or modality dropout), its mode restored after."""
    was_training = module.training
    module.train(False)
    try:
        yield module
    finally:
        module.train(was_training)


def check_state_decoding(weight: float, policy) -> None:
    """A positive `aux_state_weight` needs the policy's state decoder, i.e. the privileged `state` key."""
    if weight < 0:
        raise ValueError(f"aux_state_weight must be >= 0, got {weight!r}")
    if weight > 0 and getattr(policy, "state_decoder", None) is None:
        raise ValueError(
            f"aux_state_weight={weight} needs the privileged {STATE_KEY!r} key in the observation "
            "(envs: privileged_state=True; experiments.train sets it when --aux-state-weight > 0)"
        )


def record_state_decoding(logger, metrics: list[dict[str, float]]) -> None:
    """perceiver/state_decode_mse/<sensor> (standardised units) and their mean, averaged over the updates."""
    if not metrics:
        return
    for name in metrics[0]:
        logger.record(f"perceiver/state_decode_mse/{name}", float(np.mean([m[name] for m in metrics])))
    logger.record(
        "perceiver/state_decode_mse_mean", float(np.mean([np.mean(list(m.values())) for m in metrics]))
    )
