"""The SAC policy of the shared pixel recipe: any encoder of `agents.encoders`, DrQ's actor and critic above it.

Structure (denisyarats/drq, drq.py): one encoder trunk, owned by the critic (its loss alone trains it); actor and
critic each own a readout (Linear -> feature_dim, LayerNorm, tanh; for the Perceiver an output query first) and
an MLP of `hidden_depth` x `hidden_dim` ReLU layers; twin Q networks on [feature, action]; the actor a squashed
Gaussian whose log-std is tanh-rescaled into `log_std_bounds`. The target critic is a full copy, encoder
included, Polyak-averaged by `agents.PerceiverSAC`.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from gymnasium import spaces
from torch import nn

from agents.encoders import (
    CENTER_MOMENTUM,
    ENCODERS,
    READOUTS,
    build_encoder,
    check_center_momentum,
    orthogonal_init,
)
from perceiver_policy.config import CENTERINGS, centering_mode  # noqa: F401 (re-exported)
from perceiver_policy.policies import as_config
from perceiver_policy.sac_policy import PerceiverSACCritic, SACActorPolicy
from perceiver_policy.state_decoding import make_state_decoder

HIDDEN_DIM = 1024  # drq config.yaml: actor / critic hidden_dim
HIDDEN_DEPTH = 2  # drq config.yaml: hidden_depth
FEATURE_DIM = 50  # drq config.yaml: encoder feature_dim
LOG_STD_BOUNDS = (-10.0, 2.0)  # drq config.yaml: actor log_std_bounds
CRITIC_HEADS = ("mlp", "queries")
"""The critic's head: ``mlp``, DrQ's (drq.py `Critic`: readout -> twin `hidden_depth` x `hidden_dim` MLPs on
[feature, action]); ``queries``, SB3's recipe's for the Perceiver (`perceiver_policy.PerceiverSACCritic`: one
action-conditioned output query per critic cross-attends the latents, then a linear read-out) - everything else of
DrQ's recipe kept, the target critic included (a full copy, encoder and all)."""


def mlp(in_dim: int, hidden_dim: int, out_dim: int, depth: int) -> nn.Sequential:
    """DrQ's `utils.mlp`: `depth` Linear + ReLU layers of `hidden_dim`, then a Linear to `out_dim`."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(in_dim if i == 0 else hidden_dim, hidden_dim), nn.ReLU()]
    layers.append(nn.Linear(hidden_dim if depth else in_dim, out_dim))
    return nn.Sequential(*layers)


def squashed_log_prob(pre_tanh: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log pi(tanh(u)) summed over action dims, (B, 1): DrQ's `SquashedNormal` with its stable Jacobian
    2 (log 2 - u - softplus(-2u)) (utils.py `TanhTransform.log_abs_det_jacobian`)."""
    gaussian = torch.distributions.Normal(mean, std, validate_args=False).log_prob(pre_tanh)
    jacobian = 2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))
    return (gaussian - jacobian).sum(-1, keepdim=True)


class DrQActor(nn.Module):
    """readout -> MLP -> (mean, log-std tanh-rescaled into the bounds) -> tanh-squashed Gaussian.
    The encoder is shared and deliberately not registered (a tuple), so `actor.parameters()` are its own."""

    def __init__(self, encoder: nn.Module, readout: nn.Module, sizes: dict, log_std_bounds):
        """`readout`: the actor's own (`make_readout`); `sizes`: action_dim, feature_dim, hidden_dim, hidden_depth."""
        super().__init__()
        self._encoder = (encoder,)
        self.readout = readout
        self.trunk = mlp(
            sizes["feature_dim"], sizes["hidden_dim"], 2 * sizes["action_dim"], sizes["hidden_depth"]
        )
        orthogonal_init(self.trunk)
        self.log_std_bounds = tuple(log_std_bounds)

    def mean_std(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output h -> (mean, std), each (B, A), of the pre-tanh Gaussian."""
        mean, log_std = self.trunk(self.readout(h)).chunk(2, dim=-1)
        low, high = self.log_std_bounds
        log_std = low + 0.5 * (high - low) * (torch.tanh(log_std) + 1.0)
        return mean, log_std.exp()

    def sample(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised action in [-1, 1] (B, A) and its log-probability (B, 1)."""
        return self.sample_and_mode(h)[:2]

    def sample_and_mode(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`sample`'s action and log-probability, and the deterministic action tanh(mean) (B, A), detached."""
        mean, std = self.mean_std(h)
        pre_tanh = mean + std * torch.randn_like(mean)
        return torch.tanh(pre_tanh), squashed_log_prob(pre_tanh, mean, std), torch.tanh(mean.detach())

    def forward(self, obs: dict[str, torch.Tensor], deterministic: bool = False) -> torch.Tensor:
        h = self._encoder[0](obs)
        if deterministic:
            return torch.tanh(self.mean_std(h)[0])
        return self.sample(h)[0]


def check_encoder_lr_scale(value) -> float:
    """`encoder_lr_scale`: a positive number, the encoder's learning rate over the critic's. DrQ (denisyarats/drq)
    trains the encoder with the critic at one rate (1); transformers are usually trained at lower rates than the
    heads on top of them."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(
            f"encoder_lr_scale must be a positive number (the encoder's learning rate over the critic's; "
            f"1: one rate, as DrQ), got {value!r}"
        )
    return float(value)


class DrQCritic(nn.Module):
    """Twin Q networks on [readout(encoder(obs)), action]. The encoder is registered here: the critic's optimizer
    owns it, and the target critic (a deep copy) has its own, as DrQ's target network does."""

    def __init__(self, encoder: nn.Module, readout: nn.Module, sizes: dict, n_critics: int):
        """`readout`: the critic's own (`make_readout`); `sizes`: action_dim, feature_dim, hidden_dim, hidden_depth."""
        super().__init__()
        self.encoder = encoder
        self.readout = readout
        width = sizes["feature_dim"] + sizes["action_dim"]
        self.q_networks = nn.ModuleList(
            mlp(width, sizes["hidden_dim"], 1, sizes["hidden_depth"]) for _ in range(n_critics)
        )
        orthogonal_init(self.q_networks)

    def q_values(self, h: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Encoder output h and actions (B, A) -> n_critics tensors (B, 1)."""
        return self.q_heads(self.readout(h), actions)

    def q_heads(self, features: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Readout features (B, feature_dim) and actions (B, A) -> n_critics tensors (B, 1); features of one
        observation (batch 1) are read with each of the B actions."""
        x = torch.cat([features.expand(actions.shape[0], -1), actions], dim=-1)
        return tuple(q(x) for q in self.q_networks)

    def forward(self, obs: dict[str, torch.Tensor], actions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.q_values(self.encoder(obs), actions)


class QueryCritic(nn.Module):
    """Twin Q values from action-conditioned queries over the Perceiver's latents (`critic_head='queries'`): the
    critic of SB3's recipe (`PerceiverSACCritic`) on DrQ's recipe. Registers the encoder, as `DrQCritic` does (its
    optimizer owns it; the target critic is a deep copy). It has no readout of its own: its features are the
    latents (`readout` is the identity, so `agents.drq.drq_step` reads every critic the same way)."""

    def __init__(self, encoder: nn.Module, config, action_dim: int, n_critics: int):
        super().__init__()
        self.encoder = encoder
        self.readout = nn.Identity()
        self.heads = PerceiverSACCritic(encoder, config, action_dim, n_critics)

    def q_values(self, h: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Latents h (B, M, D) and actions (B, A) -> n_critics tensors (B, 1)."""
        return self.heads.q_values(h, actions)

    def q_heads(self, features: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Latents (B or 1, M, D) and actions (B, A) -> n_critics tensors (B, 1)."""
        return self.heads.q_values(features, actions)

    def forward(self, obs: dict[str, torch.Tensor], actions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.q_values(self.encoder(obs), actions)


class DrQSACPolicy(SACActorPolicy):
    """`encoder`, `actor`, `critic` (which owns the encoder), `critic_target` (a full copy, encoder included).

    ``policy_kwargs``: ``encoder`` ('perceiver', 'cnn', 'drq-cnn'), ``perceiver`` (PerceiverConfig fields, for the
    Perceiver encoder), ``readout`` (`agents.encoders.READOUTS`; None: 'query' for the Perceiver, 'flat' for the
    conv encoders), ``critic_head`` (`CRITIC_HEADS`: 'mlp', DrQ's; 'queries', action-conditioned output
    queries over the Perceiver's latents, as SB3's recipe; Perceiver only), ``center_features`` (`CENTERINGS`: 'none' / False; 'running' / True: the readouts subtract a
    running mean of their input, `agents.encoders.FeatureReadout`; 'reference': the Perceiver's latents minus its
    latents of a reference observation, `agents.encoders.PerceiverTrunk`), ``center_momentum`` (the weight of each
    training batch in that running mean; default `agents.encoders.CENTER_MOMENTUM`), ``conv_dtype`` ('float32' or
    'bfloat16': bf16 autocast of the cnn / drq-cnn convolutions, `agents.encoders.CONV_DTYPES`), ``feature_dim``,
    ``hidden_dim``, ``hidden_depth``, ``log_std_bounds``, ``n_critics``, ``encoder_lr_scale`` (the encoder
    learns at this multiple of the critic's learning rate, `check_encoder_lr_scale`; 1: DrQ's, one rate). The
    target critic's running means and reference follow the online critic's at each target update."""

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.Box,
        lr_schedule,
        encoder: str = "perceiver",
        perceiver: dict | None = None,
        feature_dim: int = FEATURE_DIM,
        hidden_dim: int = HIDDEN_DIM,
        hidden_depth: int = HIDDEN_DEPTH,
        log_std_bounds: tuple[float, float] = LOG_STD_BOUNDS,
        n_critics: int = 2,
        readout: str | None = None,
        center_features: bool | str = False,
        center_momentum: float = CENTER_MOMENTUM,
        conv_dtype: str = "float32",
        critic_head: str = "mlp",
        encoder_lr_scale: float = 1.0,
        use_sde: bool = False,
        optimizer_class: type[torch.optim.Optimizer] = torch.optim.Adam,
        optimizer_kwargs: dict | None = None,
        **kwargs,
    ):
        if encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {encoder!r}; valid choices: {list(ENCODERS)}")
        if readout is None:
            readout = "query" if encoder == "perceiver" else "flat"
        if readout not in READOUTS:
            raise ValueError(f"unknown readout {readout!r}; valid choices: {list(READOUTS)}")
        if critic_head not in CRITIC_HEADS:
            raise ValueError(f"unknown critic_head {critic_head!r}; valid choices: {list(CRITIC_HEADS)}")
        if critic_head == "queries" and encoder != "perceiver":
            raise ValueError(
                f"critic_head 'queries' reads the Perceiver's latents; encoder {encoder!r} takes critic_head 'mlp'"
            )
        if critic_head == "queries" and centering_mode(center_features) == "running":
            raise ValueError(
                "critic_head 'queries' has no readout for center_features 'running' to centre; use 'reference' "
                "or 'none' (valid choices with critic_head 'mlp': " + str(list(CENTERINGS)) + ")"
            )
        encoder_lr_scale = check_encoder_lr_scale(encoder_lr_scale)
        low, high = (float(b) for b in log_std_bounds)
        if not low < high:
            raise ValueError(f"log_std_bounds must be (low, high) with low < high, got {log_std_bounds!r}")
        for name, value in (
            ("feature_dim", feature_dim),
            ("hidden_dim", hidden_dim),
            ("n_critics", n_critics),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(hidden_depth, int) or hidden_depth < 0:
            raise ValueError(f"hidden_depth must be a non-negative integer, got {hidden_depth!r}")
        super().__init__(observation_space, action_space, use_sde, optimizer_class, optimizer_kwargs, kwargs)
        self.encoder_name = encoder
        self.perceiver_config = as_config(perceiver)
        self.feature_dim, self.hidden_dim, self.hidden_depth = feature_dim, hidden_dim, hidden_depth
        self.log_std_bounds, self.n_critics, self.readout = (low, high), n_critics, readout
        self.center_features = center_features
        self.centering = centering_mode(center_features)
        self.center_momentum = check_center_momentum(center_momentum)
        action_dim = int(action_space.shape[0])
        if readout == "flat" and encoder == "perceiver" and self.perceiver_config.latent_scaling:
            raise ValueError(
                "readout 'flat' reads a fixed number of latents; latent_scaling "
                f"{self.perceiver_config.latent_scaling} needs readout 'query' (valid choices: {list(READOUTS)})"
            )
        self.encoder = build_encoder(
            encoder,
            self.observation_space,
            self.perceiver_config,
            reference=self.centering == "reference",
            conv_dtype=conv_dtype,
        )
        self.conv_dtype = conv_dtype
        sizes = {"action_dim": action_dim, "feature_dim": feature_dim, "hidden_dim": hidden_dim,
                 "hidden_depth": hidden_depth}  # fmt: skip
        make = lambda: self.encoder.make_readout(  # noqa: E731
            feature_dim, readout, self.centering == "running", self.center_momentum
        )
        self.actor = DrQActor(self.encoder, make(), sizes, self.log_std_bounds)
        self.critic_head = critic_head
        self.critic = (
            QueryCritic(self.encoder, self.perceiver_config, action_dim, n_critics)
            if critic_head == "queries"
            else DrQCritic(self.encoder, make(), sizes, n_critics)
        )
        self.critic_target = copy.deepcopy(self.critic)
        self.critic_target.requires_grad_(False)
        self.critic_target.eval()
        # State-decoding queries on the critic's latents (Perceiver encoder, privileged `state` in the space).
        self.state_decoder = (
            make_state_decoder(self.env_observation_space, self.perceiver_config)
            if encoder == "perceiver"
            else None
        )
        self.encoder_lr_scale = encoder_lr_scale
        self.make_optimizers(
            lr_schedule, optimizer_class, list(self.critic.parameters()), encoder_lr_scale
        )  # the encoder's included

    def _get_constructor_parameters(self) -> dict:
        data = super()._get_constructor_parameters()
        data.update(
            encoder=self.encoder_name,
            perceiver=self.perceiver_config.to_dict(),
            feature_dim=self.feature_dim,
            hidden_dim=self.hidden_dim,
            hidden_depth=self.hidden_depth,
            log_std_bounds=self.log_std_bounds,
            n_critics=self.n_critics,
            readout=self.readout,
            center_features=self.center_features,
            center_momentum=self.center_momentum,
            conv_dtype=self.conv_dtype,
            critic_head=self.critic_head,
            encoder_lr_scale=self.encoder_lr_scale,
        )
        return data

    def set_training_mode(self, mode: bool) -> None:
        self.actor.train(mode)
        self.critic.train(mode)  # the encoder with it; the target critic stays in eval mode
        if self.state_decoder is not None:
            self.state_decoder.train(mode)
        self.training = mode
