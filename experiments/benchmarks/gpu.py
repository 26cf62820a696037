"""The GPU tables: `python -m experiments.benchmark gpu [--quick]` (skipped, with a line saying so, without CUDA).

1. Extractor forward on the device: Perceiver fp32 and bf16 autocast against SB3's NatureCNN (CombinedExtractor),
   batch-1 latency (p50/p95, synchronised) and throughput at batch 256 and 1024, with peak device memory; and the
   num_latents sweep (32 … 512) on the device, where Perceiver IO's published sizes (256–512 latents) are meant to run.
2. Which SDPA kernel the input cross-attention gets on the device (inference and training) in fp32 and bf16.
3. The pixel SAC update (ours vs SB3 SAC + NatureCNN, fp32, batch 128), synchronised after each update.
4. Rollout batching (`bench_gpu_rollouts` in experiments.benchmark): CPU path vs GPU path, fp32 vs bf16,
   1/8/32 subprocess envs.
"""

from __future__ import annotations

import numpy as np
import torch

from experiments.benchmarks.common import percentiles, table, timed
from perceiver_policy import PerceiverConfig, count_flops


def bench_gpu_extractor(quick: bool, device: str = "cuda") -> None:
    """The extractor tables on `device` ("cpu" runs the same code here, to check it without a GPU)."""
    from experiments.benchmarks.policy import default_space, extractors, sample_batch

    torch.set_grad_enabled(False)
    space = default_space()
    repeats, big = (50, 10) if quick else (300, 40)
    one = {k: v.to(device) for k, v in sample_batch(space, 1).items()}
    batches = {n: {k: v.to(device) for k, v in sample_batch(space, n).items()} for n in (256, 1024)}
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else device
    rows = []
    for name, config in (
        ("perceiver fp32", PerceiverConfig()),
        ("perceiver bf16", PerceiverConfig(dtype="bfloat16")),
    ):
        models, cnn = extractors(space, config)
        model = models["perceiver"].to(device)
        rows.append([name, *measure(model, one, batches, repeats, big, device)])
    cnn.to(device)  # in place: the "cnn" entry calls this module
    rows.append(["NatureCNN (SB3) fp32", *measure(models["cnn"], one, batches, repeats, big, device)])
    for ours in rows[:2]:
        rows.append(
            [f"{ours[0]} / cnn", ours[1] / rows[2][1], "", ours[3] / rows[2][3], ours[4] / rows[2][4], ""]
        )
    table(
        f"Extractor forward on {device_name}, pixels 84 px x 3 + proprio + 8-step history "
        "(Perceiver 32x64, 1 self-attn layer)",
        ["extractor", "b=1 p50 ms", "b=1 p95 ms", "b=256 samples/s", "b=1024 samples/s", "peak MiB (b=1024)"],
        rows,
    )

    rows = []
    for latents in (32, 64, 128, 256, 512):
        for dtype in ("float32", "bfloat16"):
            cfg = PerceiverConfig(num_latents=latents, latent_dim=128 if latents >= 256 else 64, dtype=dtype)
            model = extractors(space, cfg)[0]["perceiver"].to(device)
            p50, p95, thr, _, _ = measure(model, one, {256: batches[256]}, repeats // 2, big // 2, device)
            flops = count_flops(space, cfg)
            rows.append([latents, cfg.latent_dim, dtype, flops["cross_attn"] / 1e6, p50, p95, thr])
    table(
        "num_latents sweep on the device (latent_dim 64, 128 from 256 latents): the quality/speed trade-off",
        [
            "latents",
            "latent_dim",
            "dtype",
            "cross-attn MFLOPs",
            "b=1 p50 ms",
            "b=1 p95 ms",
            "b=256 samples/s",
        ],
        rows,
    )
    torch.set_grad_enabled(True)
    bench_gpu_attention_kernel(space, device)


def measure(model, one, batches, repeats, big, device):
    p50, p95 = percentiles(timed(lambda: model(one), repeats, warmup=5, device=device))
    throughput = {
        n: n / np.median(timed(lambda b=b: model(b), big, warmup=5, device=device))
        for n, b in batches.items()
    }
    peak = ""
    if 1024 in batches and device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        model(batches[1024])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    return p50, p95, throughput[256], throughput.get(1024, ""), peak


def bench_gpu_attention_kernel(space, device: str) -> None:
    from experiments.benchmarks.attention import kernel
    from perceiver_policy import PerceiverEncoder

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        encoder = PerceiverEncoder(space, PerceiverConfig()).to(device)
        cross = encoder.cross_attention
        index = encoder._modality_index(tuple(range(len(encoder.specs))), encoder.latents.device)
        q = torch.randn(
            256, cross.heads, encoder.config.num_latents, cross.head_dim, device=device, dtype=dtype
        )
        k = torch.randn(256, cross.heads, len(index), cross.head_dim, device=device, dtype=dtype)
        with torch.no_grad():
            inference = kernel(q, k, k, cross.logit_bias(index).to(dtype))
        training = kernel(q, k, k, cross.logit_bias(index).to(dtype))
        rows.append([str(dtype).removeprefix("torch."), inference, training])
    table(
        f"SDPA kernel of the gated input cross-attention on {device} (batch 256)",
        ["dtype", "inference", "training (mask needs a gradient)"],
        rows,
    )


def bench_gpu(quick: bool) -> None:
    if not torch.cuda.is_available():
        print("\n### GPU tables\n\nno CUDA device here: skipped (run on a GPU machine)")
        return
    from experiments.benchmarks.sac import sac_update_table
    from experiments.benchmarks.training import bench_gpu_rollouts

    bench_gpu_extractor(quick)
    venv = sac_update_table(fill=300, updates=30 if quick else 200, device="cuda")[2]
    venv.close()
    bench_gpu_rollouts(quick)
