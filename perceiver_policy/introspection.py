"""Analytic cost of the Perceiver for an observation space, and summaries of captured cross-attention."""

from __future__ import annotations

import torch
from gymnasium import spaces
from torch import nn

from perceiver_policy.config import PerceiverConfig
from perceiver_policy.modalities import build_specs, position_feature_dim


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Unique parameters (shared weights counted once)."""
    seen = {id(p): p for p in module.parameters() if p.requires_grad or not trainable_only}
    return sum(p.numel() for p in seen.values())


def count_flops(
    observation_space: spaces.Dict, config: PerceiverConfig, num_queries: int = 2
) -> dict[str, float]:
    """Forward FLOPs per sample (2 x multiply-adds), by stage. Cross-attention is O(M * N * D)."""
    specs = build_specs(observation_space, config)
    dim, latents = config.latent_dim, config.num_latents
    tokens = sum(s.num_tokens for s in specs)
    tokenize = sum(
        2 * s.num_tokens * s.token_dim * dim + (2 * s.num_tokens * position_feature_dim(s, config) * dim)
        for s in specs
    )
    hidden = config.widening_factor * dim
    # queries (cacheable at inference), keys+values, logits, weighted sum, output projection, MLP
    cross = 2 * (
        latents * dim * dim + 2 * tokens * dim * dim + 2 * latents * tokens * dim + latents * dim * dim
    )
    cross += 2 * 2 * latents * dim * hidden
    per_layer = 2 * (4 * latents * dim * dim + 2 * latents * latents * dim + 2 * latents * dim * hidden)
    self_attn = per_layer * config.self_attn_layers * config.self_attn_repeats
    decode = 2 * (num_queries * dim * dim + 2 * latents * dim * dim + 2 * num_queries * latents * dim)
    decode += 2 * (num_queries * dim * dim + 2 * num_queries * dim * hidden)
    return {
        "tokens": float(tokens),
        "tokenize": float(tokenize),
        "cross_attn": float(cross),
        "self_attn": float(self_attn),
        "decode": float(decode),
        "total": float(tokenize + cross + self_attn + decode),
    }


def modality_balance(capture: dict) -> dict[str, float]:
    """Share of the cross-attention mass each modality receives, averaged over batch, heads and latents."""
    weights = capture["weights"]  # (B, H, M, N)
    index = capture["modality_index"]
    per_token = weights.float().mean(dim=(0, 1, 2))  # (N,)
    return {name: float(per_token[index == m].sum()) for name, m in zip(capture["names"], capture["present"])}


def attention_entropy(capture: dict) -> float:
    """Mean entropy (nats) of each latent's attention over tokens; a collapse detector (low = peaked)."""
    weights = capture["weights"].float().clamp_min(1e-12)
    return float(-(weights * weights.log()).sum(-1).mean())


def attention_map(capture: dict, sample: int = 0) -> torch.Tensor:
    """(M, N) head-averaged attention of one sample, tokens grouped by modality in encoder order."""
    return capture["weights"][sample].float().mean(dim=0)


def token_moments(capture: dict) -> dict[str, tuple[float, float]]:
    """(mean, std) of each modality's embedded tokens (content + position + modality embedding): the input-drift
    metric. Fourier drift proper is `ModalityAdapter.position_drift`."""
    tokens, index = capture["tokens"], capture["modality_index"]
    return {
        name: (float(tokens[:, index == m].mean()), float(tokens[:, index == m].std()))
        for name, m in zip(capture["names"], capture["present"])
    }


def attention_on_frames(capture: dict, specs, sample: int = 0, key: str = "pixels") -> torch.Tensor | None:
    """(F, Hp, Wp) share of one sample's cross-attention mass on each (frame, patch) token of the image modality
    `key` (summed over latents, averaged over heads, as a fraction of all the sample's attention mass), or None
    when that modality is absent. Tokens are ordered (frame, patch row, patch col) by the image adapter; conv
    tokens (`pixel_tokenizer='conv'`, one per cell of a feature map over the stacked frames) give (Hp, Wp)."""
    names = capture["names"]
    if key not in names:
        return None
    spec = next(s for s in specs if s.name == key)
    m = capture["present"][names.index(key)]
    per_token = capture["weights"][sample].float().mean(dim=0).sum(dim=0)  # (N,)
    mass = per_token[capture["modality_index"] == m] / per_token.sum()
    return mass.reshape(spec.fourier_resolutions)  # (F, Hp, Wp)


def encoder_parameter_groups(encoder) -> dict[str, list[torch.nn.Parameter]]:
    """The encoder's parameters by stage: one group per modality adapter (content + position projections), the
    latent array and modality embeddings, cross-attention, self-attention."""
    groups = {f"adapter_{name}": list(adapter.parameters()) for name, adapter in encoder.adapters.items()}
    groups["latents"] = [encoder.latents, encoder.modality_embedding]
    groups["cross_attention"] = list(encoder.cross_attention.parameters())
    groups["self_attention"] = [*encoder.self_attention.parameters(), *encoder.final_norm.parameters()]
    return groups


def gradient_norms(groups: dict[str, list[torch.nn.Parameter]]) -> dict[str, float]:
    """L2 norm of the current gradients of each group (0 where no gradient reached it)."""
    norms = {}
    for name, params in groups.items():
        grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
        norms[name] = float(torch.stack(grads).norm()) if grads else 0.0
    return norms
