"""Stable-Baselines3 actor-critic policy whose networks are one Perceiver IO.

SB3's seams map onto Perceiver IO's three stages:

- ``features_extractor`` = `PerceiverExtractor`: the encoder; features are the flattened latents (B, M*D);
- ``mlp_extractor`` = `PerceiverOutputQueries`: a learned action query and a value query cross-attend the latents;
- ``action_net`` / ``value_net``: linear heads on the decoded queries (Gaussian mean [and log-std], logits, value).

So `PPO(PerceiverActorCriticPolicy, env)` and `A2C(...)` run SB3's own training loops unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.distributions import CategoricalDistribution, DiagGaussianDistribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from perceiver_policy.config import PerceiverConfig, centering_mode, reference_centring
from perceiver_policy.finetuning import apply_finetune, check_finetune
from perceiver_policy.modalities import STATE_KEY
from perceiver_policy.model import LearnedQueries, PerceiverDecoder, PerceiverEncoder
from perceiver_policy.observations import SensorObservations, sensor_space
from perceiver_policy.state_decoding import make_state_decoder

LOG_STD_MODES = ("learned", "state")
LOG_STD_RANGE = (-5.0, 2.0)


def fused_adam(optimizer_class, optimizer_kwargs: dict | None, sb3_default: dict) -> dict:
    """The optimizer kwargs SB3 would use (``sb3_default`` when none are given) plus ``fused=True`` for torch's
    Adam / AdamW: one kernel per step instead of a loop over the parameter tensors (PPO update 1.06x faster on
    the CPU, 6 of 6 alternated rounds; docs/results.md). A caller's own ``fused`` or ``foreach`` wins."""
    kwargs = dict(sb3_default if optimizer_kwargs is None else optimizer_kwargs)
    if optimizer_class in (torch.optim.Adam, torch.optim.AdamW) and not {"fused", "foreach"} & kwargs.keys():
        kwargs["fused"] = True
    return kwargs


def as_config(perceiver: PerceiverConfig | dict | None) -> PerceiverConfig:
    if perceiver is None:
        return PerceiverConfig()
    if isinstance(perceiver, PerceiverConfig):
        return perceiver
    if isinstance(perceiver, dict):
        return PerceiverConfig.from_dict(perceiver)
    raise ValueError(f"perceiver must be a PerceiverConfig or a dict, got {type(perceiver).__name__}")


class PerceiverExtractor(BaseFeaturesExtractor):
    """The Perceiver encoder as an SB3 features extractor: Dict obs -> flattened latents (B, M * D)."""

    def __init__(
        self,
        observation_space: spaces.Dict,
        config: PerceiverConfig | dict | None = None,
        reference: bool = False,
    ):
        config = as_config(config)
        super().__init__(observation_space, features_dim=config.num_latents * config.latent_dim)
        self.encoder = PerceiverEncoder(observation_space, config, reference)

    def forward(self, observations: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encoder(observations).flatten(1)


class PerceiverOutputQueries(nn.Module):
    """Decoder stage: query 0 reads the action features, query 1 the value features, each (B, D)."""

    def __init__(self, config: PerceiverConfig):
        super().__init__()
        self.num_latents, self.latent_dim = config.num_latents, config.latent_dim
        self.latent_dim_pi = self.latent_dim_vf = config.latent_dim  # what SB3 reads to size its heads
        self.queries = LearnedQueries(2, config.latent_dim, config.init_std)
        self.decoder = PerceiverDecoder(config)

    def _decode(self, features: torch.Tensor, which: slice) -> torch.Tensor:
        latents = features.view(features.shape[0], -1, self.latent_dim)  # (B, k, D): any number of latents
        return self.decoder(self.queries(features.shape[0])[:, which], latents)  # (B, Q, D)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._decode(features, slice(0, 2))
        return out[:, 0], out[:, 1]

    def forward_actor(self, features: torch.Tensor) -> torch.Tensor:
        return self._decode(features, slice(0, 1))[:, 0]

    def forward_critic(self, features: torch.Tensor) -> torch.Tensor:
        return self._decode(features, slice(1, 2))[:, 0]


class PerceiverActorCriticPolicy(SensorObservations, ActorCriticPolicy):
    """SB3 `ActorCriticPolicy` with a Perceiver IO for PPO and A2C.

    :param perceiver: a `PerceiverConfig` or a dict of its fields (pass it through ``policy_kwargs``).
    :param log_std_mode: Box actions only. ``"learned"``: a state-independent log-std parameter (SB3's
        default); ``"state"``: the action query also outputs a log-std per action dimension, clamped to [-5, 2].
    :param center_features: ``"reference"``: the latents are relative to those of a reference observation (the
        first the encoder reads, saved with the weights; `PerceiverEncoder`), so that what the input changes is
        not ~1 % of what the heads read; ``"none"`` (default).
    :param ortho_init: SB3's orthogonal init, applied to the action and value heads only; the Perceiver keeps
        its own truncated-normal init (SB3 would otherwise re-initialise every Linear inside it).

    Pixels stay uint8 until the Perceiver's image adapter scales them (SB3's ``normalize_images`` is forced off
    so they are scaled exactly once). The encoder is shared by actor and critic.
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule,
        perceiver: PerceiverConfig | dict | None = None,
        log_std_mode: str = "learned",
        finetune: dict | None = None,
        center_features: bool | str = "none",
        **kwargs,
    ):
        if log_std_mode not in LOG_STD_MODES:
            raise ValueError(f"unknown log_std_mode {log_std_mode!r}; valid choices: {list(LOG_STD_MODES)}")
        if not isinstance(action_space, (spaces.Box, spaces.Discrete)):
            raise ValueError(
                f"PerceiverActorCriticPolicy supports Box and Discrete action spaces, got {action_space}"
            )
        if kwargs.get("use_sde"):
            raise ValueError(
                "use_sde=True is not supported by the Perceiver policy; use log_std_mode='state'"
            )
        self.perceiver_config = as_config(perceiver)
        self.log_std_mode = log_std_mode
        self.center_features = centering_mode(center_features)
        reference = reference_centring(center_features, "the Perceiver's PPO / A2C policy")
        self.finetune = check_finetune(finetune)
        if self.finetune["mode"] != "all" and kwargs.get("share_features_extractor") is False:
            raise ValueError(f"finetune mode {self.finetune['mode']!r} needs share_features_extractor=True")
        for ignored in (
            "features_extractor_class",
            "features_extractor_kwargs",
            "net_arch",
            "normalize_images",
        ):
            kwargs.pop(ignored, None)  # present when SB3 reloads a saved model; the Perceiver defines them
        optimizer_class = kwargs.get("optimizer_class", torch.optim.Adam)
        sb3_default = (
            {"eps": 1e-5} if optimizer_class is torch.optim.Adam else {}
        )  # ActorCriticPolicy's default
        kwargs["optimizer_kwargs"] = fused_adam(optimizer_class, kwargs.get("optimizer_kwargs"), sb3_default)
        self.env_observation_space = observation_space  # with the privileged state, for the state decoder
        super().__init__(
            sensor_space(observation_space),
            action_space,
            lr_schedule,
            features_extractor_class=PerceiverExtractor,
            features_extractor_kwargs={"config": self.perceiver_config, "reference": reference},
            normalize_images=False,
            share_features_extractor=kwargs.pop("share_features_extractor", True),
            **kwargs,
        )

    @property
    def encoder(self) -> PerceiverEncoder:
        return self.features_extractor.encoder

    def _build_mlp_extractor(self) -> None:
        self.mlp_extractor = PerceiverOutputQueries(self.perceiver_config)

    def _build(self, lr_schedule) -> None:
        self._build_mlp_extractor()
        dim = self.perceiver_config.latent_dim
        if isinstance(self.action_dist, DiagGaussianDistribution):
            if self.log_std_mode == "state":
                # No `log_std` attribute then: SB3's PPO logs train/std only when the policy has one.
                self.action_net = nn.Linear(dim, 2 * int(np.prod(self.action_space.shape)))
            else:
                self.action_net, self.log_std = self.action_dist.proba_distribution_net(
                    dim, self.log_std_init
                )
        elif isinstance(self.action_dist, CategoricalDistribution):
            self.action_net = self.action_dist.proba_distribution_net(latent_dim=dim)
        else:
            raise ValueError(f"unsupported action distribution {self.action_dist} for {self.action_space}")
        self.value_net = nn.Linear(dim, 1)
        # State-decoding output queries when the observation carries the privileged state (an auxiliary loss).
        self.state_decoder = make_state_decoder(self.env_observation_space, self.perceiver_config)
        self.state_decoding: tuple[torch.Tensor, dict[str, float]] | None = None
        if self.ortho_init:
            self.action_net.apply(lambda m: self.init_weights(m, gain=0.01))
            self.value_net.apply(lambda m: self.init_weights(m, gain=1.0))
        # Transfer: freeze the encoder / add LoRA adapters before the optimizer sees the parameters.
        apply_finetune(self.features_extractor.encoder, self.finetune)
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def extract_features(self, obs, features_extractor=None):
        # Skip SB3's preprocess_obs (a float copy of every pixel): the adapters cast, and scale pixels, once.
        if self.share_features_extractor:
            return (features_extractor or self.features_extractor)(obs)
        return self.pi_features_extractor(obs), self.vf_features_extractor(obs)

    def predict_values(self, obs) -> torch.Tensor:
        """SB3's, through `extract_features` (SB3 calls its base class's, which float-copies every pixel and
        indexes the observation space by every observation key, the privileged state included)."""
        features = self.vf_features_extractor(obs)  # the shared extractor when share_features_extractor
        return self.value_net(self.mlp_extractor.forward_critic(features))

    def evaluate_actions(self, obs, actions: torch.Tensor):
        """SB3's evaluate_actions (values, log-prob, entropy); with a state decoder, the state-decoding loss of
        the same encoder pass is left in `self.state_decoding` for the algorithm's loss."""
        if self.state_decoder is None or not self.share_features_extractor:
            return super().evaluate_actions(obs, actions)
        features = self.extract_features(obs)  # (B, M * D)
        latent_pi, latent_vf = self.mlp_extractor(features)
        distribution = self._get_action_dist_from_latent(latent_pi)
        latents = features.view(features.shape[0], -1, self.perceiver_config.latent_dim)  # (B, k, D)
        self.state_decoding = self.state_decoder.loss(latents, obs[STATE_KEY])
        return self.value_net(latent_vf), distribution.log_prob(actions), distribution.entropy()

    def _get_action_dist_from_latent(self, latent_pi: torch.Tensor):
        if self.log_std_mode == "state" and isinstance(self.action_dist, DiagGaussianDistribution):
            mean, log_std = self.action_net(latent_pi).chunk(2, dim=-1)
            return self.action_dist.proba_distribution(mean, log_std.clamp(*LOG_STD_RANGE))
        return super()._get_action_dist_from_latent(latent_pi)

    def _get_constructor_parameters(self) -> dict:
        data = super()._get_constructor_parameters()
        data.update(
            perceiver=self.perceiver_config.to_dict(),
            log_std_mode=self.log_std_mode,
            finetune=self.finetune,
            center_features=self.center_features,
        )
        return data
