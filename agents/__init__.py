"""SB3 algorithms wired for the Perceiver policy: batched device rollouts, frame replay, DrQ-style SAC."""

from agents.drq_policy import DrQSACPolicy
from agents.encoders import ENCODERS, build_encoder
from agents.factory import (
    ALGORITHMS,
    BF16_MIN_LATENTS,
    DEFAULTS,
    DRQ_ACTION_REPEAT,
    DRQ_DEFAULTS,
    DRQ_POLICY_DEFAULTS,
    POLICY_TYPES,
    RECIPES,
    algorithm_class,
    default_dtype,
    make_agent,
    resolve_device,
)
from agents.finetune import transfer_weights
from agents.on_policy import BatchedRolloutMixin, PerceiverA2C, PerceiverPPO
from agents.replay_buffer import FrameReplayBuffer
from agents.rollout_buffer import DeviceRolloutBuffer
from agents.sac import PerceiverSAC

__all__ = [
    "ALGORITHMS",
    "POLICY_TYPES",
    "RECIPES",
    "DRQ_DEFAULTS",
    "DRQ_POLICY_DEFAULTS",
    "DRQ_ACTION_REPEAT",
    "DrQSACPolicy",
    "ENCODERS",
    "build_encoder",
    "algorithm_class",
    "DEFAULTS",
    "BatchedRolloutMixin",
    "DeviceRolloutBuffer",
    "FrameReplayBuffer",
    "PerceiverA2C",
    "PerceiverPPO",
    "PerceiverSAC",
    "make_agent",
    "default_dtype",
    "BF16_MIN_LATENTS",
    "resolve_device",
    "transfer_weights",
]
