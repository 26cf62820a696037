"""The Perceiver encoder against SB3's NatureCNN extractor: latency, throughput, latents, precision, caches."""

from __future__ import annotations

import os

import numpy as np
import torch

os.environ.setdefault("MUJOCO_GL", "egl")

import envs  # noqa: E402
from experiments.benchmarks.common import percentiles, table, timed  # noqa: E402
from experiments.benchmarks.environment import PIXEL_OBS  # noqa: E402
from perceiver_policy import PerceiverConfig, count_flops, count_parameters  # noqa: E402
from perceiver_policy.model import cpu_has_native_bf16  # noqa: E402


def default_space():
    env = envs.DMCEnv("cheetah", "run", **PIXEL_OBS)
    space = env.observation_space
    env.close()
    return space


def sample_batch(space, batch: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    return {
        k: torch.as_tensor(rng.integers(0, 256, (batch, *s.shape), dtype=np.uint8))
        if s.dtype == np.uint8
        else torch.as_tensor(rng.standard_normal((batch, *s.shape)).astype(np.float32))
        for k, s in space.spaces.items()
    }


def extractors(space, config: PerceiverConfig):
    from stable_baselines3.common.preprocessing import preprocess_obs
    from stable_baselines3.common.torch_layers import CombinedExtractor

    from perceiver_policy.policies import PerceiverExtractor

    ours = PerceiverExtractor(space, config).eval()
    cnn = CombinedExtractor(space).eval()
    # SB3 scales pixels in preprocess_obs before the extractor: include it, as ours scales inside.
    return {"perceiver": ours, "cnn": lambda obs: cnn(preprocess_obs(obs, space, normalize_images=True))}, cnn


def bench_policy(quick: bool) -> None:
    torch.set_grad_enabled(False)
    space = default_space()
    config = PerceiverConfig()
    repeats, big = (30, 5) if quick else (200, 20)
    one, batch = sample_batch(space, 1), sample_batch(space, 256)
    models, cnn = extractors(space, config)
    rows, results = [], {}
    for name, model in models.items():
        p50, p95 = percentiles(timed(lambda m=model: m(one), repeats))
        throughput = 256 / np.median(timed(lambda m=model: m(batch), big))
        params = count_parameters(model if name == "perceiver" else cnn)
        results[name] = (p50, throughput)
        rows.append([name, params, p50, p95, throughput])
    ratio_latency = results["perceiver"][0] / results["cnn"][0]
    ratio_throughput = results["perceiver"][1] / results["cnn"][1]
    rows.append(["perceiver / cnn", "", ratio_latency, "", ratio_throughput])
    table(
        f"Extractor forward, pixels 84 px x 3 frames + proprio + 8-step history; Perceiver {config.num_latents}x"
        f"{config.latent_dim}, {config.self_attn_layers} self-attn layer, {config.image_patch_size(84, 84)}-px patches "
        f"(targets: latency <= 1.5x, throughput >= 1x)",
        ["extractor", "params", "b=1 p50 ms", "b=1 p95 ms", "b=256 samples/s"],
        rows,
    )

    rows = []
    for latents in (32, 64, 128, 256, 512):
        cfg = PerceiverConfig(num_latents=latents)
        model = extractors(space, cfg)[0]["perceiver"]
        p50, p95 = percentiles(timed(lambda m=model: m(one), repeats // 2 or 1))
        flops = count_flops(space, cfg)
        rows.append(
            [latents, count_parameters(model), flops["cross_attn"] / 1e6, flops["total"] / 1e6, p50, p95]
        )
    table(
        "num_latents sweep (latent_dim 64): the quality/speed trade-off",
        ["latents", "params", "cross-attn MFLOPs", "total MFLOPs", "b=1 p50 ms", "b=1 p95 ms"],
        rows,
    )

    rows = []
    variants = {
        "fp32": PerceiverConfig(),
        "bf16 autocast": PerceiverConfig(dtype="bfloat16"),
    }
    if not cpu_has_native_bf16() and not torch.cuda.is_available():
        print("(bf16 autocast row skipped: this CPU has no native bf16, where it was measured 5x slower)")
        variants.pop("bf16 autocast")
    for name, cfg in variants.items():
        model = extractors(space, cfg)[0]["perceiver"]
        p50, _ = percentiles(timed(lambda m=model: m(one), repeats))
        throughput = 256 / np.median(timed(lambda m=model: m(batch), big))
        rows.append([name, p50, throughput])
    model = extractors(space, config)[0]["perceiver"]
    p50_cached, _ = percentiles(timed(lambda: model(one), repeats))
    rows.append(["Fourier features cached (default)", p50_cached, ""])
    p50_rebuilt, _ = percentiles(timed(lambda: rebuild_fourier_then_forward(model, one), repeats))
    rows.append(["Fourier features rebuilt every forward", p50_rebuilt, ""])
    cross = model.encoder.cross_attention
    p50_nocache, _ = percentiles(timed(lambda: (cross._query_cache.clear(), model(one)), repeats))
    rows.append(["latent-query cache off", p50_nocache, ""])
    table(
        "Precision and caches (b=1 latency; b=256 throughput)",
        ["variant", "b=1 p50 ms", "b=256 samples/s"],
        rows,
    )
    torch.set_grad_enabled(True)
    bench_input_checks(space, model, repeats)
    from experiments.benchmarks.attention import bench_attention_kernel

    bench_attention_kernel(space, quick)


def bench_input_checks(space, model, repeats: int) -> None:
    """What the input checks add: `check_observation` on each predict, the non-finite guard on each env step."""
    from envs.wrappers import NonFiniteGuard
    from perceiver_policy.observations import check_observation

    one = {k: v.numpy() for k, v in sample_batch(space, 1).items()}
    guard = NonFiniteGuard.__new__(NonFiniteGuard)  # only its per-step check, without an env behind it
    guard.sanitize, guard.nonfinite_count = False, 0
    guard.float_keys = [k for k, s in space.spaces.items() if np.issubdtype(s.dtype, np.floating)]
    tensors = {k: torch.as_tensor(v) for k, v in one.items()}
    with torch.no_grad():
        forward, _ = percentiles(timed(lambda: model(tensors), repeats))
    check, _ = percentiles(timed(lambda: check_observation(one, space), repeats * 10))
    finite, _ = percentiles(timed(lambda: guard._check_obs(dict(one)), repeats * 10))
    table(
        "Input checks, batch 1 (cost beside the Perceiver's own forward)",
        ["check", "p50 ms", "share of the forward"],
        [["check_observation (keys, shapes, dtypes)", check, check / forward],
         ["non-finite guard (one isfinite().all() per float key)", finite, finite / forward],
         ["Perceiver forward", forward, 1.0]],
    )  # fmt: skip


def rebuild_fourier_then_forward(model, obs):
    """What a naive implementation does: recompute every modality's Fourier features in forward."""
    from perceiver_policy.position import grid_fourier_features

    for adapter in model.encoder.adapters.values():
        adapter.position_features = grid_fourier_features(
            adapter.spec.fourier_resolutions, model.encoder.config.fourier_bands
        )
    return model(obs)


# ----------------------------------------------------------------------------------------------------- train
