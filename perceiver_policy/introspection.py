"""Analytic cost of the Perceiver for an observation space, summaries of captured cross-attention, and where a
modality's information is lost on its way into the latents (`modality_path`)."""

from __future__ import annotations

import math

import torch
from gymnasium import spaces
from torch import nn

from perceiver_policy.config import PerceiverConfig
from perceiver_policy.modalities import ON_IMAGE_KINDS, build_specs, position_feature_dim


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
    when that modality is absent or its tokens have no place on the image (keypoint tokens carry their place as
    content). Tokens are ordered (frame, patch row, patch col) by the image adapter; conv tokens
    (`pixel_tokenizer='conv'`, one per cell of a feature map over the stacked frames) give (Hp, Wp)."""
    names = capture["names"]
    if key not in names:
        return None
    spec = next(s for s in specs if s.name == key)
    if spec.kind not in ON_IMAGE_KINDS:
        return None
    return modality_mass(capture, key, sample).reshape(spec.fourier_resolutions)  # (F, Hp, Wp)


def modality_mass(capture: dict, key: str, sample: int = 0) -> torch.Tensor:
    """(N_key,) each of modality `key`'s tokens' share of one sample's cross-attention mass (summed over latents,
    averaged over heads, as a fraction of all the sample's mass); `key` must be in the capture."""
    m = capture["present"][capture["names"].index(key)]
    per_token = capture["weights"][sample].float().mean(dim=0).sum(dim=0)  # (N,)
    return per_token[capture["modality_index"] == m] / per_token.sum()


def keypoints_on_frames(
    encoder, capture: dict, pixels: torch.Tensor, sample: int = 0, key: str = "pixels"
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Keypoint tokens (`pixel_tokenizer='keypoints'`) of one sample, as places on its frames: ((G, K, 2) each
    keypoint's (x, y) in the frame's pixel coordinates, (G, K) its share of the sample's cross-attention mass,
    summed over latents and averaged over heads), G = F with `keypoints_per_frame` (frame f's keypoints), else 1
    (keypoints of the whole stack). None when `key` is absent or not keypoint tokens. `pixels`: the observation
    the capture came from, (B, F*3, H, W) as the encoder reads it. The places are the adapter's own spatial
    softmax over these frames (frozen statistics: no running mean moves); cell centres map to the pixels as in
    `attention_on_frames`' maps (cell i of n covers pixels [i H / n, (i + 1) H / n))."""
    names = capture["names"]
    if key not in names:
        return None
    adapter = encoder.adapters[key]
    spec = adapter.spec
    if spec.kind != "keypoint_image":
        return None
    training = adapter.training
    adapter.eval()
    try:
        with torch.no_grad():
            xy = adapter.tokens_content(pixels[sample : sample + 1])[0].float()  # ([F *] K, 2) in [-1, 1]
    finally:
        adapter.train(training)
    mass = modality_mass(capture, key, sample)
    (rows, cols), (height, width) = spec.conv_grid, spec.shape[1:]
    cells = (xy + 1) / 2 * xy.new_tensor([cols - 1, rows - 1]) + 0.5  # in cells, centres at i + 0.5
    places = cells * xy.new_tensor([width / cols, height / rows])
    return places.reshape(-1, spec.keypoints, 2), mass.reshape(-1, spec.keypoints)


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


PATH_STAGES = ("attention", "focus", "token_signal", "tokens", "cross_attention", "latents")
"""What `modality_path` reports, in the order the encoder computes it."""


def _spread(x: torch.Tensor) -> torch.Tensor:
    """Mean over features of the std across observations (dim 0)."""
    return x.float().std(dim=0).mean().clamp_min(1e-12)


def modality_path(encoder, obs: dict, key: str) -> dict[str, float]:
    """Where does modality `key` reach the latents, and where is it lost? One pass over a batch of observations
    (B >= 2, tensors as the encoder reads them) with `key` as observed and one with it withheld: the encoder's
    mask tokens if it has them (`missing_tokens='mask'`), else zeros (black frames, zero readings), as the
    reliance probe withholds. Returns, stage by stage through the cross-attention:

    - ``attention``: the share of the cross-attention mass on `key`'s tokens (mean over observations, heads and
      latents);
    - ``focus``: 1 - the entropy of each latent's attention *within* `key`'s tokens over its maximum, log N:
      0 when the latents average the tokens uniformly (a global mean pool, which keeps no place), 1 when each
      reads one token (NaN for a one-token modality);
    - ``token_signal``: of the layer-normalised tokens the keys and values are computed from, the spread across
      observations over the spread across the token's places: how much of what the latents read of `key` varies
      with what is observed rather than with where the token sits (NaN for a one-token modality);
    - ``tokens``, ``cross_attention``, ``latents``: the mean change when `key` is withheld, over the spread across
      the observations, of the normalised tokens of `key`, of the latents after the cross-attention and of the
      encoder's output (after self-attention): a modality that changes its tokens by several spreads and the
      latents by 1 % of theirs is lost in the cross-attention.
    """
    if key not in encoder.names:
        raise ValueError(
            f"unknown modality {key!r} for the modality path; valid choices: {list(encoder.names)}"
        )
    batch = next(torch.as_tensor(obs[n]).shape[0] for n in encoder.names if n in obs)
    if batch < 2:
        raise ValueError(
            f"the modality path compares observations: it needs a batch of at least 2, got {batch}"
        )
    device = encoder.latents.device
    if encoder.mask_tokens is not None:
        given, withheld, absent = obs, obs, {key: torch.ones(batch, dtype=torch.bool, device=device)}
    else:
        given, withheld, absent = obs, {**obs, key: torch.zeros_like(torch.as_tensor(obs[key]))}, None
    cross: list[torch.Tensor] = []
    hook = encoder.cross_attention.register_forward_hook(
        lambda module, args, out: cross.append(
            out[0].detach().float()[:batch]
        )  # [:batch]: not the reference row
    )
    capture_before, was_training = encoder.capture_attention, encoder.training
    encoder.capture_attention = True
    encoder.eval()
    try:
        with torch.no_grad():
            latents = encoder(given)
            capture = encoder.last_capture
            latents_withheld = encoder(withheld, absent)
            capture_withheld = encoder.last_capture
    finally:
        hook.remove()
        encoder.capture_attention = capture_before
        encoder.train(was_training)
    m = encoder.names.index(key)
    selected = capture["modality_index"] == m
    norm = encoder.cross_attention.context_norm
    with torch.no_grad():
        tokens = norm(capture["tokens"][:, selected]).float()  # (B, N_key, D)
        tokens_withheld = norm(capture_withheld["tokens"][:, selected]).float()
    weights = capture["weights"].float()  # (B, H, M, N)
    on_key = weights[..., selected]
    count = int(selected.sum())
    within = on_key / on_key.sum(-1, keepdim=True).clamp_min(1e-12)
    entropy = -(within * within.clamp_min(1e-12).log()).sum(-1)
    nan = float("nan")
    return {
        "attention": float(on_key.sum(-1).mean()),
        "focus": float(1 - entropy.mean() / math.log(count)) if count > 1 else nan,
        "token_signal": float(_spread(tokens) / _spread(tokens.transpose(0, 1))) if count > 1 else nan,
        "tokens": float((tokens - tokens_withheld).abs().mean() / _spread(tokens)),
        "cross_attention": float((cross[0] - cross[1]).abs().mean() / _spread(cross[0])),
        "latents": float((latents - latents_withheld).abs().mean() / _spread(latents)),
    }
