"""Batch-1 latency of `model.predict`, full forward vs streaming inference: `python -m experiments.benchmark streaming`.

Both read the same recorded sequence of env observations (random actions, an episode boundary included), one
call each per observation, alternating which goes first; streaming keeps its cache across the sequence as in an
evaluation episode. The actions are compared too (max |difference|).
"""

from __future__ import annotations

import time

import numpy as np
import torch

import envs
from agents import make_agent
from envs.vec import make_env_fn
from experiments.benchmarks.common import table
from perceiver_policy.streaming import streaming

PIXELS = ("cartpole-swingup", {"action_repeat": 8})
HISTORIES = (
    "cartpole-swingup",
    {
        "action_repeat": 4,
        "proprio": "positions",
        "modalities": ("proprio", "proprio_history", "action_history"),
    },
)
CASES = {
    # name: (task, env kwargs), perceiver config, streamed kinds
    "pixels 84 px x 3 + proprio + actions; default Perceiver (32 x 64, 1 layer, patch 12)": (
        PIXELS,
        {},
        ("image",),
    ),
    "the same; 256 latents x 128, 4 layers, patch 6": (
        PIXELS,
        {"num_latents": 256, "latent_dim": 128, "self_attn_layers": 4, "patch_size": 6},
        ("image",),
    ),
    "positions + proprio/action histories (study 3), histories streamed (off by default)": (
        HISTORIES,
        {},
        ("sequence",),
    ),
}


def record_observations(task: str, env_kwargs: dict, steps: int) -> list[dict]:
    env = make_env_fn(task, **env_kwargs)()
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=0)
    sequence = []
    for step in range(steps):
        sequence.append({k: v[None] for k, v in obs.items()})  # batch 1
        obs, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, env.action_space.shape))
        if terminated or truncated or step == steps // 2:  # one reset in the middle
            obs, _ = env.reset()
    env.close()
    return sequence


def compare(env: tuple[str, dict], perceiver: dict, kinds: tuple[str, ...], steps: int) -> list:
    task, env_kwargs = env
    torch.manual_seed(0)
    venv = envs.make_vec_env(task, n_envs=1, seed=0, **env_kwargs)
    model = make_agent("sac", venv, perceiver=perceiver, device="cpu", learning_starts=10, buffer_size=100)
    venv.close()
    sequence = record_observations(task, env_kwargs, steps)
    encoder = model.policy.encoder
    full_ms, stream_ms, worst = [], [], 0.0
    with streaming(model.policy, kinds=kinds) as stream:
        for i, obs in enumerate(sequence):
            results = {}
            for mode in ("full", "stream") if i % 2 else ("stream", "full"):
                encoder.token_cache = stream if mode == "stream" else None
                start = time.perf_counter()
                results[mode], _ = model.predict(obs, deterministic=True)
                (stream_ms if mode == "stream" else full_ms).append(1000 * (time.perf_counter() - start))
            worst = max(worst, float(np.abs(results["full"] - results["stream"]).max()))
        stats = stream.stats()
    warm = 5  # the first calls allocate
    full, fast = np.asarray(full_ms[warm:]), np.asarray(stream_ms[warm:])
    return [
        sum(encoder.num_tokens.values()),
        np.percentile(full, 50),
        np.percentile(full, 95),
        np.percentile(fast, 50),
        np.percentile(fast, 95),
        float(np.percentile(fast, 50) / np.percentile(full, 50)),
        stats["stream_cache_hit_rate"],
        stats["stream_window_overlap"],
        f"{worst:.1e}",
    ]


def bench_streaming(quick: bool) -> None:
    steps = 60 if quick else 300
    rows = [[name, *compare(*case, steps)] for name, case in CASES.items()]
    table(
        f"Streaming inference, SAC actor, batch 1, {steps} consecutive observations (model.predict, ms)",
        ["observation, model", "tokens", "full p50", "full p95", "stream p50", "stream p95",
         "stream / full (p50)", "cache hit rate", "window overlap", "max |action diff|"],
        rows,
    )  # fmt: skip
