"""Deployable actors: a trained SB3 policy as a plain module, Dict observation in, deterministic action out.

`DeterministicActor` does what `model.predict(obs, deterministic=True)` does, inside the graph: the policy's
deterministic action, then SB3's post-processing (a squashed SAC action rescaled to the action bounds, a PPO
action clipped to them). Observations are positional tensors in `input_names` order; pixels stay uint8 (the
policy scales them). `export_onnx` / `export_torchscript` write files that run without SB3 (onnxruntime, or
`torch.jit.load`). LoRA adapters (perceiver_policy.finetuning) are merged into their layers first. Recurrent policies are not exportable this way (their state would be an input).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from pathlib import Path

import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from perceiver_policy.finetuning import lora_parameter_names, merge_lora

FORMATS = ("onnx", "torchscript")


def _bf16_modules(policy: nn.Module) -> list[nn.Module]:
    """Modules that compute under bf16 autocast: a Perceiver with `PerceiverConfig.dtype='bfloat16'` (its encoder
    and decoders hold the config) or a conv encoder with `conv_dtype='bfloat16'` (a `dtype` string)."""
    return [
        module
        for module in policy.modules()
        if getattr(module, "dtype", None) == "bfloat16"
        or getattr(getattr(module, "config", None), "dtype", None) == "bfloat16"
    ]


class DeterministicActor(nn.Module):
    """policy -> module(*observation tensors) = action (B, A) float32, as `predict(deterministic=True)`. A policy
    that trained under bf16 autocast is exported in float32 (a copy; the policy is kept): its actions then differ
    from `predict`'s by bf16's rounding."""

    def __init__(self, policy):
        super().__init__()
        if hasattr(policy, "lstm_actor"):
            raise ValueError("recurrent (LSTM) policies cannot be exported as a stateless actor")
        if not isinstance(policy.action_space, spaces.Box):
            raise ValueError(f"export supports Box action spaces, got {policy.action_space}")
        if lora_parameter_names(
            policy
        ):  # fold LoRA adapters into plain Linear layers (a copy: the model is kept)
            policy = merge_lora(copy.deepcopy(policy))
        if _bf16_modules(policy):  # ONNX Runtime's CPU Conv has no bf16 kernel: export float32 (a copy)
            policy = copy.deepcopy(policy)
            for module in _bf16_modules(policy):
                if getattr(module, "dtype", None) == "bfloat16":
                    module.dtype = "float32"  # a conv encoder's `conv_dtype` (agents.encoders.ConvEncoder)
                else:
                    module.config = dataclasses.replace(module.config, dtype="float32")
        self.policy = policy
        self.input_names = list(policy.observation_space.spaces)
        self.squashed = bool(policy.squash_output)
        self.register_buffer("low", torch.as_tensor(policy.action_space.low, dtype=torch.float32))
        self.register_buffer("high", torch.as_tensor(policy.action_space.high, dtype=torch.float32))
        self.eval()

    def train(self, mode: bool = True) -> DeterministicActor:
        """Always evaluation mode: a trace records what runs, so dropout, DropPath or a running statistic (the mean
        frame of `PerceiverConfig.image_centering`) left in training mode would be exported. (`torch.onnx.export`
        puts its model back into the mode it found, recursively: a root left in training mode would switch the
        policy back into it.)"""
        return super().train(False)

    def forward(self, *observations: torch.Tensor) -> torch.Tensor:
        obs = dict(zip(self.input_names, observations))
        action = self.policy._predict(obs, deterministic=True).float()
        if self.squashed:  # SAC: tanh-squashed in [-1, 1] -> the env's bounds (SB3's unscale_action)
            return self.low + 0.5 * (action + 1.0) * (self.high - self.low)
        return torch.maximum(torch.minimum(action, self.high), self.low)  # PPO: clipped (SB3's predict)

    def example_inputs(self, batch: int = 1) -> tuple[torch.Tensor, ...]:
        """Zero observations of the right shapes and dtypes."""
        space = self.policy.observation_space
        return tuple(
            torch.zeros(
                (batch, *space[name].shape), dtype=torch.from_numpy(np.zeros(0, space[name].dtype)).dtype
            )
            for name in self.input_names
        )


@contextlib.contextmanager
def tracing():
    """No grad, and no distribution argument checks (data-dependent Python branches a trace cannot record)."""
    previous = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.distributions.Distribution.set_default_validate_args(previous)


def export_onnx(actor: DeterministicActor, path: Path, opset: int = 17) -> Path:
    """ONNX graph with a dynamic batch axis; inputs named after the observation keys, output 'action'."""
    axes = {name: {0: "batch"} for name in actor.input_names} | {"action": {0: "batch"}}
    with tracing():
        torch.onnx.export(
            actor,
            actor.example_inputs(2),
            str(path),
            input_names=actor.input_names,
            output_names=["action"],
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )
    return path


def export_torchscript(actor: DeterministicActor, path: Path) -> Path:
    with tracing():
        traced = torch.jit.trace(actor, actor.example_inputs(2), check_trace=False)
    traced.save(str(path))
    return path
