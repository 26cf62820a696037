"""Perceiver IO for multimodal reinforcement learning, and its Stable-Baselines3 policies."""

from perceiver_policy.config import PerceiverConfig
from perceiver_policy.introspection import count_flops, count_parameters
from perceiver_policy.latent_scaling import choose_num_latents, get_num_latents, set_num_latents
from perceiver_policy.modalities import ADAPTERS, ModalityAdapter, ModalitySpec, build_specs, register_adapter
from perceiver_policy.model import ActionQueries, LearnedQueries, PerceiverDecoder, PerceiverEncoder

__all__ = [
    "ADAPTERS",
    "ActionQueries",
    "LearnedQueries",
    "ModalityAdapter",
    "ModalitySpec",
    "PerceiverConfig",
    "PerceiverDecoder",
    "PerceiverEncoder",
    "build_specs",
    "choose_num_latents",
    "get_num_latents",
    "set_num_latents",
    "count_flops",
    "count_parameters",
    "register_adapter",
]

from perceiver_policy.policies import PerceiverActorCriticPolicy, PerceiverExtractor  # noqa: E402

__all__ += ["PerceiverActorCriticPolicy", "PerceiverExtractor"]

from perceiver_policy.sac_policy import PerceiverSACPolicy  # noqa: E402

__all__ += ["PerceiverSACPolicy"]
