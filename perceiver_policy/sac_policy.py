"""A Perceiver IO policy for SB3's SAC: one encoder, an action query (actor) and action-conditioned Q queries.

As in Perceiver-Actor-Critic, each critic's query is built from an embedding of the action, so one encoder pass
serves any action. The encoder is shared: `critic.optimizer` owns it (the critic's loss trains it) and the actor
reads detached latents in `agents.PerceiverSAC.train` (DrQ / DrQ-v2). SB3's own `share_features_extractor=True`
does the opposite, which is why `PerceiverSAC` overrides `train`.
"""

from __future__ import annotations

import torch
from gymnasium import spaces
from stable_baselines3.common.distributions import SquashedDiagGaussianDistribution
from stable_baselines3.common.policies import BasePolicy
from torch import nn

from perceiver_policy.config import PerceiverConfig, centering_mode, reference_centring
from perceiver_policy.finetuning import apply_finetune
from perceiver_policy.modalities import ACTION_MASK_KEY, TASK_KEY, task_count
from perceiver_policy.model import ActionQueries, LearnedQueries, PerceiverDecoder, PerceiverEncoder
from perceiver_policy.observations import SensorObservations, sensor_space
from perceiver_policy.policies import LOG_STD_RANGE, as_config, fused_adam
from perceiver_policy.state_decoding import make_state_decoder

# The key of an optimizer parameter group whose learning rate is this multiple of the schedule's (the DrQ recipe's
# `encoder_lr_scale`); groups without it follow the schedule.
LR_SCALE = "lr_scale"


class PerceiverSACActor(nn.Module):
    """Action query -> squashed Gaussian. `encoder` is shared and deliberately not registered here."""

    def __init__(self, encoder: PerceiverEncoder, config: PerceiverConfig, action_dim: int):
        super().__init__()
        self._encoder = (encoder,)  # a tuple: not a submodule, so its parameters stay out of actor.optimizer
        self.query = LearnedQueries(1, config.latent_dim, config.init_std)
        self.decoder = PerceiverDecoder(config)
        self.head = nn.Linear(config.latent_dim, 2 * action_dim)
        self.action_dist = SquashedDiagGaussianDistribution(action_dim)

    def distribution(self, latents: torch.Tensor, obs=None) -> SquashedDiagGaussianDistribution:
        out = self.decoder(self.query(latents.shape[0]), latents)[:, 0]  # (B, D)
        mean, log_std = self.head(out).chunk(2, dim=-1)
        return self.action_dist.proba_distribution(mean, log_std.clamp(*LOG_STD_RANGE))

    def forward(self, obs: dict[str, torch.Tensor], deterministic: bool = False) -> torch.Tensor:
        return self.distribution(self._encoder[0](obs), obs).get_actions(deterministic=deterministic)

    def action_log_prob(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """SB3 SAC's entry point: the actor reads latents without gradient (the critic alone trains the encoder,
        as in DrQ); SB3 steps the critic before the actor's backward, which would otherwise find the encoder's
        weights changed under its graph."""
        with torch.no_grad():
            latents = self._encoder[0](obs)
        return self.action_log_prob_latents(latents, obs)

    def action_log_prob_latents(self, latents: torch.Tensor, obs=None) -> tuple[torch.Tensor, torch.Tensor]:
        """A sampled action and its log-probability from latents; `obs` (the batch they were encoded from) gives a
        multi-task actor its task and action mask."""
        return self.sample_and_mode(latents, obs)[:2]

    def sample_and_mode(
        self, latents: torch.Tensor, obs=None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`action_log_prob_latents`' action and log-probability, and the deterministic action (B, A), detached."""
        dist = self.distribution(latents, obs)
        actions = dist.get_actions()
        log_prob = dist.log_prob(actions)
        with torch.no_grad():  # the same forward's mean, after the sample and its log-probability
            modes = dist.get_actions(deterministic=True)
        return actions, log_prob, modes


class MaskedSquashedGaussian:
    """A tanh-squashed diagonal Gaussian over padded actions: entries where `mask` is 0 are returned as 0 and add
    nothing to the log-probability (nor, therefore, to the entropy term of SAC)."""

    EPS = 1e-6  # as SB3's SquashedDiagGaussianDistribution

    def __init__(self, mean: torch.Tensor, log_std: torch.Tensor, mask: torch.Tensor):
        self.mean, self.std, self.mask = mean, log_std.exp(), mask
        self._gaussian: torch.Tensor | None = None

    def get_actions(self, deterministic: bool = False) -> torch.Tensor:
        gaussian = self.mean if deterministic else self.mean + self.std * torch.randn_like(self.mean)
        self._gaussian = gaussian
        return torch.tanh(gaussian) * self.mask

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        """(B,) for the actions of the latest `get_actions` (their pre-tanh values are kept, as SB3 does)."""
        gaussian = self._gaussian
        normal = torch.distributions.Normal(self.mean, self.std).log_prob(gaussian)
        squash = torch.log(1.0 - torch.tanh(gaussian).square() + self.EPS)
        return ((normal - squash) * self.mask).sum(dim=-1)


class SlotHeads(nn.Module):
    """One (mean, log-std) readout per actuator slot: (B, A, D) -> (B, A, 2).

    A head shared by every slot would start all of a body's actuators at the same action: the actuator queries
    are initialised near zero (init_std) and the decoder ends in a LayerNorm, so at initialisation the slots'
    outputs differ by almost nothing. Per-slot readouts break that symmetry from the first update (a shared
    head left walker's hip, knee and ankle saturated together). Initialised as `nn.Linear(D, 2)` per slot."""

    def __init__(self, num_slots: int, dim: int):
        super().__init__()
        bound = dim**-0.5
        self.weight = nn.Parameter(torch.empty(num_slots, dim, 2).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_slots, 2).uniform_(-bound, bound))

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bad,adk->bak", out, self.weight) + self.bias

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A policy saved with one shared nn.Linear(D, 2) head (perceiver-rl 0.4.0): every slot gets that head,
        # so it acts exactly as it was trained.
        weight, bias = state_dict.get(prefix + "weight"), state_dict.get(prefix + "bias")
        if weight is not None and weight.dim() == 2 and bias is not None and bias.dim() == 1:
            slots = self.weight.shape[0]
            state_dict[prefix + "weight"] = weight.t().unsqueeze(0).expand(slots, -1, -1).clone()
            state_dict[prefix + "bias"] = bias.unsqueeze(0).expand(slots, -1).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class PerceiverMultiTaskActor(PerceiverSACActor):
    """The actor of a multi-task policy: one output query per actuator slot (a 1-actuator cartpole and a
    6-actuator walker share one decoder), each read out by its slot's (mean, log-std) head (`SlotHeads`); with
    the domain embedding, the task's embedding joins every actuator query (slot j is a different joint in each
    body). Padded actuators act 0 and add nothing to the log-probability (`MaskedSquashedGaussian`)."""

    def __init__(self, encoder, config: PerceiverConfig, action_dim: int, num_tasks: int):
        super().__init__(encoder, config, action_dim)
        self.query = LearnedQueries(action_dim, config.latent_dim, config.init_std)
        self.head = SlotHeads(action_dim, config.latent_dim)
        self.task_query = nn.Embedding(num_tasks, config.latent_dim) if config.domain_embedding else None
        if self.task_query is not None:
            nn.init.trunc_normal_(
                self.task_query.weight, std=config.init_std, a=-2 * config.init_std, b=2 * config.init_std
            )

    def distribution(self, latents: torch.Tensor, obs=None) -> MaskedSquashedGaussian:
        if obs is None or ACTION_MASK_KEY not in obs:
            raise ValueError(
                f"a multi-task actor needs the observation's {ACTION_MASK_KEY!r} (and {TASK_KEY!r})"
            )
        queries = self.query(latents.shape[0])  # (B, A, D)
        if self.task_query is not None:
            queries = queries + self.task_query(obs[TASK_KEY].reshape(-1).long())[:, None]
        out = self.decoder(queries, latents)  # (B, A, D)
        mean, log_std = self.head(out).unbind(dim=-1)  # (B, A) each
        return MaskedSquashedGaussian(mean, log_std.clamp(*LOG_STD_RANGE), obs[ACTION_MASK_KEY].float())


class PerceiverSACCritic(nn.Module):
    """Twin (n_critics) Q-functions from action-conditioned queries over the latents."""

    def __init__(self, encoder: PerceiverEncoder, config: PerceiverConfig, action_dim: int, n_critics: int):
        super().__init__()
        self._encoder = (encoder,)
        self.n_critics = n_critics
        self.queries = ActionQueries(action_dim, config.latent_dim, n_critics, config.init_std)
        self.decoder = PerceiverDecoder(config)
        self.head_weight = nn.Parameter(torch.randn(n_critics, config.latent_dim) * config.latent_dim**-0.5)
        self.head_bias = nn.Parameter(torch.zeros(n_critics))

    def q_values(self, latents: torch.Tensor, actions: torch.Tensor, obs=None) -> tuple[torch.Tensor, ...]:
        """Q of each critic, (B, 1) each; a multi-task observation's `action_mask` zeroes the padded entries
        first (exploration samples them at random), so padding never reaches Q. Latents of one observation
        (batch 1) are read with each of the B actions: each query reads the latents on its own, so all B × n_critics
        queries go through the decoder as one observation's."""
        if obs is not None and ACTION_MASK_KEY in obs:
            actions = actions * obs[ACTION_MASK_KEY].to(actions.dtype)
        queries = self.queries(actions)  # (B, n_critics, D)
        if latents.shape[0] == 1 < queries.shape[0]:
            out = self.decoder(queries.reshape(1, -1, queries.shape[-1]), latents).view_as(queries)
        else:
            out = self.decoder(queries, latents)  # (B, n_critics, D)
        q = (out * self.head_weight).sum(-1) + self.head_bias  # (B, n_critics)
        return tuple(q[:, i : i + 1] for i in range(self.n_critics))

    def forward(self, obs: dict[str, torch.Tensor], actions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.q_values(self._encoder[0](obs), actions, obs)


def multitask_count(observation_space: spaces.Dict) -> int:
    """How many training tasks a multi-task observation space indexes (`task` and `action_mask` keys); 0 otherwise."""
    keys = observation_space.spaces
    if ACTION_MASK_KEY not in keys:
        return 0
    if TASK_KEY not in keys:
        raise ValueError(
            f"a multi-task observation has {ACTION_MASK_KEY!r} and {TASK_KEY!r}; {TASK_KEY!r} is missing"
        )
    return task_count(observation_space)


class SACActorPolicy(SensorObservations, BasePolicy):
    """A SAC policy whose `actor(obs, deterministic)` acts (the Perceiver's and `agents.DrQSACPolicy`), built on
    the sensor keys (`SensorObservations`; `env_observation_space` keeps the privileged state for the losses).
    `kwargs`: what SB3 passes on a reload (ignored here: the subclass defines it); anything else is refused."""

    IGNORED_KWARGS = (
        "normalize_images",
        "features_extractor_class",
        "features_extractor_kwargs",
        "squash_output",
    )

    def __init__(
        self, observation_space, action_space, use_sde, optimizer_class, optimizer_kwargs, kwargs: dict
    ):
        name = type(self).__name__
        if not isinstance(action_space, spaces.Box):
            raise ValueError(f"{name} needs a Box action space, got {action_space}")
        if use_sde:
            raise ValueError(f"use_sde=True is not supported by {name}")
        unknown = sorted(set(kwargs) - set(self.IGNORED_KWARGS))
        if unknown:
            raise ValueError(f"unknown {name} arguments {unknown}")
        self.env_observation_space = observation_space
        super().__init__(
            sensor_space(observation_space),
            action_space,
            optimizer_class=optimizer_class,
            optimizer_kwargs=fused_adam(optimizer_class, optimizer_kwargs, {}),
            squash_output=True,
            normalize_images=False,
        )

    def make_optimizers(
        self, lr_schedule, optimizer_class, critic_params: list, encoder_lr_scale: float = 1.0
    ) -> None:
        """`actor.optimizer` over the actor's own parameters; `critic.optimizer` over `critic_params` (those the
        critic's loss trains, the shared encoder's included) and the state decoder's, if any. `encoder_lr_scale`
        != 1: the encoder's parameters are a group of their own whose learning rate is that multiple of the
        schedule's (`LR_SCALE`, applied by `agents.warmup.LearningRateWarmupMixin` whenever SB3 sets the rate)."""
        lr = lr_schedule(1)
        self.actor.optimizer = optimizer_class(self.actor.parameters(), lr=lr, **self.optimizer_kwargs)
        if self.state_decoder is not None:
            critic_params = [*critic_params, *self.state_decoder.parameters()]
        groups = critic_params
        if encoder_lr_scale != 1.0:
            encoder = {id(p) for p in self.encoder.parameters()}
            groups = [
                {"params": [p for p in critic_params if id(p) in encoder], "lr": lr * encoder_lr_scale,
                 LR_SCALE: encoder_lr_scale},
                {"params": [p for p in critic_params if id(p) not in encoder]},
            ]  # fmt: skip
        self.critic.optimizer = optimizer_class(groups, lr=lr, **self.optimizer_kwargs)

    def forward(self, obs, deterministic: bool = False) -> torch.Tensor:
        return self._predict(obs, deterministic)

    def _predict(self, observation, deterministic: bool = False) -> torch.Tensor:
        return self.actor(observation, deterministic)


class PerceiverSACPolicy(SACActorPolicy):
    """SAC policy: `encoder`, `actor`, `critic`, `critic_target` (heads only; the encoder has no target copy,
    as in DrQ-v2: the target heads read the shared encoder's latents, without gradient under SB3's no_grad).
    Options go through ``policy_kwargs`` (``perceiver=dict(...)``, ``n_critics``, ``center_features``:
    'reference' makes the latents relative to a reference observation's, `PerceiverEncoder`).

    Works with SB3's own ``SAC`` (the critic's optimizer owns the encoder, so the critic loss trains it; the
    actor's gradients that reach the encoder are cleared by the next critic step) and with `agents.PerceiverSAC`,
    which encodes each batch once and adds DrQ shifts."""

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.Box,
        lr_schedule,
        perceiver: PerceiverConfig | dict | None = None,
        n_critics: int = 2,
        finetune: dict | None = None,
        center_features: bool | str = "none",
        use_sde: bool = False,
        optimizer_class: type[torch.optim.Optimizer] = torch.optim.Adam,
        optimizer_kwargs: dict | None = None,
        **kwargs,
    ):
        super().__init__(observation_space, action_space, use_sde, optimizer_class, optimizer_kwargs, kwargs)
        self.perceiver_config = as_config(perceiver)
        self.n_critics = n_critics
        action_dim = int(action_space.shape[0])
        self.center_features = centering_mode(center_features)
        self.encoder = PerceiverEncoder(
            self.observation_space,
            self.perceiver_config,
            reference=reference_centring(center_features, "the Perceiver SAC policy of SB3's recipe"),
        )
        # Multi-task observations (envs.multitask): per-actuator queries over padded actions, per-task temperatures.
        self.num_tasks = multitask_count(self.observation_space)
        if self.num_tasks:
            self.actor = PerceiverMultiTaskActor(
                self.encoder, self.perceiver_config, action_dim, self.num_tasks
            )
        else:
            self.actor = PerceiverSACActor(self.encoder, self.perceiver_config, action_dim)
        self.critic = PerceiverSACCritic(self.encoder, self.perceiver_config, action_dim, n_critics)
        self.critic_target = PerceiverSACCritic(self.encoder, self.perceiver_config, action_dim, n_critics)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.critic_target.requires_grad_(False)
        self.critic_target.eval()  # as SB3's SAC: the target never runs dropout
        # State-decoding queries (auxiliary loss on the critic's encoder pass) when the obs has the privileged state.
        self.state_decoder = make_state_decoder(self.env_observation_space, self.perceiver_config)
        # Transfer: freeze the encoder / add LoRA adapters before the optimizers see the parameters.
        self.finetune = apply_finetune(self.encoder, finetune)
        self.make_optimizers(
            lr_schedule, optimizer_class, [*self.encoder.parameters(), *self.critic.parameters()]
        )

    def _get_constructor_parameters(self) -> dict:
        data = super()._get_constructor_parameters()
        data.update(
            perceiver=self.perceiver_config.to_dict(),
            n_critics=self.n_critics,
            finetune=self.finetune,
            center_features=self.center_features,
        )
        return data

    def set_training_mode(self, mode: bool) -> None:
        self.encoder.train(mode)
        self.actor.train(mode)
        self.critic.train(mode)
        if self.state_decoder is not None:
            self.state_decoder.train(mode)
        self.training = mode
