"""DrQ's SAC update (Kostrikov, Yarats & Fergus 2020; denisyarats/drq, drq.py `DRQAgent.update`) for any encoder.

One update on a replay batch of B transitions, `update` counting updates over the run:
1. target: K independently shifted copies of next_obs; the online actor picks a' (reading the online encoder),
   the target critic (its own encoder copy; with `target_encoder='online'` the online encoder's output the actor
   read, no gradient, as DrQ-v2) scores it; y = r + gamma (1 - done) (min_i Q'_i - alpha log pi),
   averaged over the K copies (`update_critic`, target_Q = (target_Q + target_Q_aug) / 2 for K = 2);
2. critic: M independently shifted copies of obs, loss sum_m sum_i mean_b (Q_i - y)^2 (DrQ sums its two
   critics over its two copies); the critic's optimizer owns the encoder, so this loss alone trains it;
3. every `actor_update_interval` updates: the actor reads the first copy's encoder output detached (DrQ's
   `detach_encoder=True`), loss mean(alpha log pi - min_i Q_i); then the temperature,
   loss mean(alpha (-log pi - target_entropy)) (DrQ's `update_actor_and_alpha`, alpha itself, not log alpha);
4. every `target_update_interval` updates: target <- tau * online + (1 - tau) * target over the whole critic,
   encoder included (`utils.soft_update_params(self.critic, self.critic_target, self.critic_tau)`).

The M and K copies go through each network in one batched forward (M * B and K * B samples), and the actor reuses
the critic pass's encoder output of the first copy instead of encoding it again. DrQ encodes it again after the
critic's step; here the actor reads the features from just before that step (one update older).
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from stable_baselines3.common.utils import polyak_update

from perceiver_policy.introspection import encoder_parameter_groups, gradient_norms
from perceiver_policy.latent_scaling import num_latents, training_num_latents
from perceiver_policy.modalities import STATE_KEY
from perceiver_policy.model import PerceiverEncoder

FEATURE_LOG_INTERVAL = 100
"""Updates between measurements of `train/critic_feature_variation`."""

FEATURE_COLLAPSE_BELOW = 1e-3
"""`train/critic_feature_variation` under which a run is warned that its critic's features have collapsed.
Measured on cartpole-swingup pixels (docs/results.md, "Why the Perceiver does not learn under DrQ's recipe"): the
collapsed runs 4.4e-4 (at 500 updates) and 1e-6, and none recovered; at initialisation the Perceiver's 0.003-0.012;
a run with a 1,000-update warmup 0.004 at 500 updates, which recovered; runs that learned 0.1-0.8."""


def action_spread(modes: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """`train/actor_action_spread`: the std over a batch's states of the actor's deterministic actions (B, A) in
    [-1, 1], averaged over the actuators; `mask` (B, A): a multi-task batch's real entries (each actuator's std over
    the samples where it is real). 0 when the actor takes one action whatever the state: the collapse that
    docs/results.md reports for three ball_in_cup-catch runs (at ±1, and at a constant inside the bounds)."""
    modes = modes.detach().float()
    mask = torch.ones_like(modes) if mask is None else mask.to(modes.dtype)
    count = mask.sum(0)  # (A,) samples where each actuator is real
    mean = (modes * mask).sum(0) / count.clamp_min(1.0)
    std = (((modes - mean) ** 2 * mask).sum(0) / count.clamp_min(1.0)).sqrt()
    measured = count >= 2
    return float(std[measured].mean()) if measured.any() else 0.0


class FeatureCollapseWarning(UserWarning):
    """The critic's features vary less than `FEATURE_COLLAPSE_BELOW` across a batch: it scores every state alike,
    so the actor learns one action for all of them. `warnings.simplefilter('error', FeatureCollapseWarning)` ends
    such a run at once (with a checkpoint at that step, as any error mid-run)."""


def feature_variation(x: torch.Tensor) -> float:
    """Total std over the batch / root mean square of (B, ...) features: 0 when every sample gives the same
    features (a critic that cannot tell states apart), about 1 when they are centred."""
    x = x.flatten(1).float()
    return float(x.std(0).pow(2).sum().sqrt() / x.pow(2).mean(0).sum().sqrt().clamp_min(1e-12))


def temperature(algo) -> torch.Tensor:
    """alpha, detached: learned (SB3's `log_ent_coef`) or fixed (`ent_coef_tensor`)."""
    if algo.ent_coef_optimizer is not None and algo.log_ent_coef is not None:
        return torch.exp(algo.log_ent_coef.detach())
    return algo.ent_coef_tensor


def min_q(q_values: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.cat(q_values, dim=1).min(dim=1, keepdim=True).values  # (B, 1)


def critic_target(algo, data, alpha: torch.Tensor) -> torch.Tensor:
    """y (B, 1): DrQ's target averaged over `algo.target_augmentations` shifted copies of next_obs."""
    policy, copies = algo.policy, algo.target_augmentations
    batch = data.actions.shape[0]
    discounts = data.discounts if data.discounts is not None else algo.gamma
    with torch.no_grad():
        next_obs = algo.augmented_copies(data.next_observations, copies)  # (K*B, ...)
        h_next = policy.encoder(next_obs)  # what the actor reads
        next_actions, next_log_prob = policy.actor.sample(h_next)
        target = policy.critic_target
        if algo.target_encoder != "online":  # DrQ: the target critic's own encoder copy
            h_next = target.encoder(next_obs)
        next_v = min_q(target.q_values(h_next, next_actions)) - alpha * next_log_prob
        y = (
            data.rewards.repeat(copies, 1)
            + (1 - data.dones.repeat(copies, 1))
            * (discounts.repeat(copies, 1) if torch.is_tensor(discounts) else discounts)
            * next_v
        )  # (K*B, 1)
        return y.view(copies, batch, 1).mean(0)


def critic_loss(q_values: tuple[torch.Tensor, ...], target: torch.Tensor, copies: int) -> torch.Tensor:
    """sum over the critics and the M copies of mean_b (Q - y)^2; q_values each (M*B, 1), target (B, 1)."""
    batch = target.shape[0]
    loss = 0.0
    for q in q_values:
        errors = F.mse_loss(q.view(copies, batch, 1), target.expand(copies, batch, 1), reduction="none")
        loss = loss + errors.mean(dim=(1, 2)).sum()
    return loss


def drq_step(algo, data, update: int, mix_index: torch.Tensor | None = None) -> dict[str, float]:
    """One DrQ update on a replay batch; returns its losses (the actor's and temperature's on their updates).
    `mix_index`: each sample's modality subset (`PerceiverSAC.mix_batch`), for the per-subset critic loss."""
    policy, copies = algo.policy, algo.critic_augmentations
    batch = data.actions.shape[0]
    alpha = temperature(algo)
    target = critic_target(algo, data, alpha)

    h = policy.encoder(algo.augmented_copies(data.observations, copies))  # (M*B, ...) with grad
    features = policy.critic.readout(h)
    q_values = policy.critic.q_heads(features, data.actions.repeat(copies, 1))
    loss = critic_loss(q_values, target, copies)
    if (
        mix_index is not None
    ):  # per-sample squared TD error: summed over the critics, averaged over the copies
        errors = sum((q.detach().view(copies, batch) - target.view(1, batch)).square() for q in q_values)
        algo.mixer.record(mix_index, errors.mean(0))
    metrics = {"critic_loss": loss.item(), "ent_coef": alpha.item()}
    if update % FEATURE_LOG_INTERVAL == 0:  # do the critic's features tell the batch's states apart?
        metrics["critic_feature_variation"] = feature_variation(features[:batch].detach())
    if algo.aux_state_weight > 0:  # state decoding from the first copy's latents, trained with the critic
        decode_loss, per_sensor = policy.state_decoder.loss(h[:batch], data.observations[STATE_KEY])
        loss = loss + algo.aux_state_weight * decode_loss
        metrics["state_decode"] = per_sensor
    policy.critic.optimizer.zero_grad()
    loss.backward()
    algo._last_encoder_grads = (
        gradient_norms(encoder_parameter_groups(policy.encoder))
        if isinstance(policy.encoder, PerceiverEncoder)
        else {}
    )
    policy.critic.optimizer.step()

    if update % algo.actor_update_interval == 0:
        h_actor = h[:batch].detach()  # the first shifted copy, as DrQ's actor reads `obs`
        actions, log_prob, modes = policy.actor.sample_and_mode(h_actor)
        actor_loss = (alpha * log_prob - min_q(policy.critic.q_values(h_actor, actions))).mean()
        policy.actor.optimizer.zero_grad()
        actor_loss.backward()
        policy.actor.optimizer.step()
        metrics["actor_loss"] = actor_loss.item()
        metrics["actor_action_spread"] = action_spread(modes)
        if algo.ent_coef_optimizer is not None and algo.log_ent_coef is not None:
            alpha_loss = (torch.exp(algo.log_ent_coef) * (-log_prob - algo.target_entropy).detach()).mean()
            algo.ent_coef_optimizer.zero_grad()
            alpha_loss.backward()
            algo.ent_coef_optimizer.step()
            metrics["ent_coef_loss"] = alpha_loss.item()

    if update % algo.target_update_interval == 0:
        polyak_update(policy.critic.parameters(), policy.critic_target.parameters(), algo.tau)
        copy_running_means(policy.critic, policy.critic_target)
    return metrics


def copy_running_means(online: torch.nn.Module, target: torch.nn.Module) -> None:
    """The target critic's readout statistics and reference observation follow the online critic's (as SB3 copies
    BatchNorm statistics)."""
    buffers = dict(target.named_buffers())
    with torch.no_grad():
        for name, value in online.named_buffers():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("running_mean", "initialised") or leaf.startswith("reference_"):
                buffers[name].copy_(value)


def warn_on_feature_collapse(algo, variations: list[float] | None) -> None:
    """A `FeatureCollapseWarning`, once a run, when a measured `critic_feature_variation` falls below
    `FEATURE_COLLAPSE_BELOW`."""
    if (
        not variations
        or min(variations) >= FEATURE_COLLAPSE_BELOW
        or getattr(algo, "_warned_feature_collapse", False)
    ):
        return
    algo._warned_feature_collapse = True
    warnings.warn(
        f"the critic's features have collapsed by update {algo._n_updates}: train/critic_feature_variation "
        f"{min(variations):.2g} (below {FEATURE_COLLAPSE_BELOW}). The critic scores every state alike, so the actor "
        "learns one action for all of them; no collapsed run measured in docs/results.md recovered. Leads from "
        "one-seed screens of the conv Perceiver: --policy critic_head=queries, or a longer --algo lr_warmup.",
        FeatureCollapseWarning,
        stacklevel=2,
    )


def drq_update(algo, gradient_steps: int, batch_size: int) -> None:
    """`gradient_steps` DrQ updates (`PerceiverSAC.train` with a `DrQSACPolicy`), logged as SB3's SAC logs."""
    algo.policy.set_training_mode(True)
    optimizers = [algo.policy.actor.optimizer, algo.policy.critic.optimizer]
    if algo.ent_coef_optimizer is not None:
        optimizers.append(algo.ent_coef_optimizer)
    algo._update_learning_rate(optimizers)
    from agents.sac import record_state_decoding  # agents.sac imports this module

    metrics: dict[str, list[float]] = defaultdict(list)
    decoding: list[dict[str, float]] = []
    for step in range(gradient_steps):
        data, mix_index = algo.mix_batch(algo.replay_buffer.sample(batch_size, env=algo._vec_normalize_env))
        with num_latents(algo.policy, training_num_latents(algo.policy)):  # nested latents: one k per update
            losses = drq_step(algo, data, algo._n_updates + step, mix_index)
        for name, value in losses.items():
            if name == "state_decode":
                decoding.append(value)
            else:
                metrics[name].append(value)
    algo._n_updates += gradient_steps
    algo.logger.record("train/n_updates", algo._n_updates, exclude="tensorboard")
    for name, values in metrics.items():
        algo.logger.record(f"train/{name}", float(np.mean(values)))
    warn_on_feature_collapse(algo, metrics.get("critic_feature_variation"))
    record_state_decoding(algo.logger, decoding)
    for group, norm in getattr(algo, "_last_encoder_grads", {}).items():
        algo.logger.record(f"perceiver/grad_norm/{group}", norm)
    algo._log_mixer()
