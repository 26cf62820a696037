"""Which SDPA kernel the input cross-attention gets, and what it costs: `python -m experiments.benchmark policy`.

The gating (per-modality bias + per-latent gate) reaches SDPA as an additive float mask (current) instead of
extra query/key channels (the first version: q and k 8 channels wider than v, which the fused kernels refuse).
Each is timed on the default encoder's shapes in this process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from experiments.benchmarks.common import percentiles, table, timed
from perceiver_policy import PerceiverConfig, PerceiverEncoder

EXTRA_CHANNELS = 8  # one per modality + the absent flag, padded to 8 (as the first version did)


def kernel(q, k, v, mask=None) -> str:
    return SDPBackend(torch._fused_sdp_choice(q, k, v, mask, 0.0, False)).name.lower()


def cross_attention_kernels(encoder) -> tuple[str, str]:
    """The SDPA kernel an encoder's input cross-attention gets at inference (no grad) and in a training step
    (the gating mask then needs a gradient)."""
    cross = encoder.cross_attention
    index = encoder._modality_index(tuple(range(len(encoder.specs))), encoder.latents.device)  # (N,)
    q = torch.randn(1, cross.heads, encoder.config.num_latents, cross.head_dim)
    k = torch.randn(1, cross.heads, len(index), cross.head_dim)
    with torch.no_grad():
        inference = kernel(q, k, k, cross.logit_bias(index))
    return inference, kernel(q, k, k, cross.logit_bias(index))


def bench_attention_kernel(space, quick: bool) -> None:
    config = PerceiverConfig()
    encoder = PerceiverEncoder(space, config).eval()
    cross = encoder.cross_attention
    index = torch.cat([torch.full((s.num_tokens,), i) for i, s in enumerate(encoder.specs)])
    heads, latents, tokens = config.cross_attn_heads, config.num_latents, index.shape[0]
    dim = config.latent_dim // heads
    rows = []
    for batch in (1, 256):
        repeats = (30 if quick else 200) if batch == 1 else (5 if quick else 30)
        q = torch.randn(batch, heads, latents, dim)
        k, v = torch.randn(batch, heads, tokens, dim), torch.randn(batch, heads, tokens, dim)
        with torch.no_grad():
            mask = cross.logit_bias(index)  # (1, H, M, N)
        onehot = F.one_hot(index, EXTRA_CHANNELS).float().expand(batch, heads, tokens, EXTRA_CHANNELS)
        q_extra = torch.cat([q, torch.randn(batch, heads, latents, EXTRA_CHANNELS)], dim=-1)
        k_extra = torch.cat([k, onehot], dim=-1)
        variants = {
            "float mask (current)": (q, k, v, mask),
            "extra q/k channels (before)": (q_extra, k_extra, v, None),
        }
        times = {}
        for name, (qq, kk, vv, mm) in variants.items():
            p50, p95 = percentiles(timed(lambda a=(qq, kk, vv, mm): F.scaled_dot_product_attention(
                a[0], a[1], a[2], attn_mask=a[3]), repeats))  # fmt: skip
            times[name] = p50
            rows.append([name, batch, kernel(qq, kk, vv, mm), p50, p95])
        rows.append(
            [
                "before / current",
                batch,
                "",
                times["extra q/k channels (before)"] / times["float mask (current)"],
                "",
            ]
        )
    train_kernel = cross_attention_kernels(encoder)[1]
    table(
        f"Input cross-attention SDPA ({latents} latents x {tokens} tokens, {heads} head of {dim}), inference "
        f"(no grad); in training the mask needs a gradient and the kernel is: {train_kernel}",
        ["gating as", "batch", "kernel", "p50 ms", "p95 ms"],
        rows,
    )


def bench_bf16_attention(quick: bool) -> None:
    """`python -m experiments.benchmark precision`: forward + backward of one attention call at training shapes
    (batch 256; the lean study Perceiver: 32 latents x 64), SDPA in float32, SDPA in bf16, and the Perceiver's
    `attend` on bf16 inputs (which runs SDPA in float32 on the CPU), alternated in this process."""
    from perceiver_policy.attention import attend

    repeats = 5 if quick else 20
    shapes = {  # name -> (heads, queries, keys, head dim, masked)
        "latent self-attention (4 heads x 16)": (4, 32, 32, 16, False),
        "input cross-attention (1 head x 64, 131 tokens, float mask)": (1, 32, 131, 64, True),
    }
    rows = []
    for name, (heads, queries, keys, dim, masked) in shapes.items():
        q32, k32, v32 = (torch.randn(256, heads, n, dim) for n in (queries, keys, keys))
        mask32 = torch.randn(1, heads, queries, keys) if masked else None
        variants = {
            "SDPA, float32": (F.scaled_dot_product_attention, torch.float32),
            "SDPA, bf16": (F.scaled_dot_product_attention, torch.bfloat16),
            "attend, bf16 in and out (float32 kernel)": (attend, torch.bfloat16),
        }
        inputs = {}
        for label, (_, dtype) in variants.items():
            tensors = [t.to(dtype).requires_grad_() for t in (q32, k32, v32)]
            inputs[label] = (*tensors, None if mask32 is None else mask32.to(dtype))
        calls = {
            label: (lambda fn=fn, args=inputs[label]: fn(*args[:3], attn_mask=args[3]).sum().backward())
            for label, (fn, _) in variants.items()
        }
        times = {label: timed(call, 0, warmup=2) for label, call in calls.items()}  # warm-up only
        for _ in range(repeats):  # alternated: a drift in machine speed hits every variant
            for label, call in calls.items():
                times[label] += timed(call, 1, warmup=0)
        fp32 = percentiles(times["SDPA, float32"])[0]
        for label in variants:
            p50, _ = percentiles(times[label])
            rows.append([name, label, p50, p50 / fp32])
    table(
        f"Attention forward + backward on the CPU, float32 and bf16, batch 256, median of {repeats} alternated calls",
        ["call", "kernel", "p50 ms", "x SDPA float32"],
        rows,
    )
