"""What each number of latents costs: one policy trained with latent_scaling, batch-1 latency at each k beside
the forward FLOPs torch counts at that k (the O(k * N) cross-attention and O(k^2) self-attention shrink with k;
the tokenizer and the heads do not)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from experiments.benchmarks.common import percentiles, table, timed

LEAN = {"latent_scaling": [4, 8, 16, 32]}  # the default 32 latents x 64
WIDE = {
    "num_latents": 256,
    "latent_dim": 128,
    "latent_scaling": [16, 32, 64, 128, 256],
}  # Perceiver IO's order


def forward_flops(policy, obs: dict[str, np.ndarray]) -> tuple[float, float]:
    """(policy forward FLOPs, of which the tokenizers') for one observation, counted by torch."""
    tensors, _ = policy.obs_to_tensor(obs)
    with FlopCounterMode(display=False) as total:  # with grad: its module tracker needs grad functions
        policy._predict(tensors, deterministic=True)
    encoder = policy.encoder if hasattr(policy, "encoder") else policy.features_extractor.encoder
    with FlopCounterMode(display=False) as tokenize:
        for name, adapter in encoder.adapters.items():
            adapter(tensors[name])
    return float(total.get_total_flops()), float(tokenize.get_total_flops())


def latent_table(title: str, modalities: tuple[str, ...], perceiver: dict, repeats: int) -> None:
    import envs
    from agents import make_agent
    from perceiver_policy.latent_scaling import latency_by_num_latents, num_latents

    venv = envs.make_vec_env("cartpole-swingup", n_envs=1, seed=0, modalities=modalities, action_repeat=8)
    model = make_agent("ppo", venv, perceiver=perceiver, device="cpu", seed=0)
    scaling = perceiver["latent_scaling"]
    obs = venv.reset()
    obs = {key: value[0] for key, value in obs.items()}
    policy = model.policy.eval()
    tensors, _ = policy.obs_to_tensor(obs)
    forward = {k: [] for k in scaling}
    for _ in range(5):  # rounds, the ks interleaved: a change in load reaches every k alike
        for k in scaling:
            with num_latents(model, k), torch.no_grad():
                forward[k] += timed(lambda: policy._predict(tensors, deterministic=True), repeats // 5)
    predict = latency_by_num_latents(model, obs, repeats)
    flops = {}
    for k in scaling:
        with num_latents(model, k):
            flops[k] = forward_flops(policy, obs)
    venv.close()
    full = scaling[-1]
    p50 = {k: percentiles(v)[0] for k, v in forward.items()}
    rows = [
        [k, flops[k][0] / 1e6, flops[k][1] / flops[k][0], flops[k][0] / flops[full][0], p50[k],
         p50[k] / p50[full], predict[k]]
        for k in scaling
    ]  # fmt: skip
    header = ["k (latents)", "forward MFLOPs", "tokenizer share", f"FLOPs / k={full}", "forward p50 ms",
              f"forward / k={full}", "predict p95 ms"]  # fmt: skip
    table(title, header, rows)


def bench_latents(quick: bool) -> None:
    """Latency and FLOPs at each k of one scaled Perceiver (PPO actor, deterministic), the lean default and a
    wide one (256 latents x 128), from states and from pixels (84 px x 3 frames with the body's sensors): the
    policy's forward on a tensor observation (p50) and SB3's `predict` on a numpy one (p95, with its conversion
    and checks), the ks interleaved over 5 rounds."""
    repeats = 100 if quick else 500
    threads = torch.get_num_threads()
    states, pixels = ("proprio", "action_history"), ("pixels", "proprio", "action_history")
    for name, perceiver in (("lean 32 x 64", LEAN), ("wide 256 x 128", WIDE)):
        for inputs, modalities in (("states", states), ("pixels 84 px x 3 + sensors", pixels)):
            title = f"Latent scaling, {name}, {inputs}, cartpole-swingup, batch 1, {threads} torch threads"
            latent_table(title, modalities, perceiver, repeats)
