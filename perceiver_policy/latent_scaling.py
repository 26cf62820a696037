"""Dynamic latent scaling: one trained policy that runs with the first k of its M latents, for any trained k.

The cross-attention costs O(k * N) and each latent self-attention layer O(k^2), so k is the Perceiver's
quality / speed dial. A policy trained with `PerceiverConfig.latent_scaling` (nested latents: each update reads
the first k latents, k drawn from the list) works at every listed k; a policy trained without it runs at M only
and refuses other values by name.

    from perceiver_policy import set_num_latents
    set_num_latents(model, 8)                       # an SB3 model or its policy; every Perceiver encoder in it
    k = choose_num_latents(model, obs, budget_ms=2.0)  # the largest k whose batch-1 p95 latency fits
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
from torch import nn

from perceiver_policy.config import PerceiverConfig
from perceiver_policy.model import PerceiverEncoder


def _module(model_or_policy) -> nn.Module:
    policy = getattr(model_or_policy, "policy", model_or_policy)
    if not isinstance(policy, nn.Module):
        raise ValueError(f"expected an SB3 model or policy, got {type(model_or_policy).__name__}")
    return policy


def perceiver_encoders(model_or_policy) -> list[PerceiverEncoder]:
    """Every Perceiver encoder of a model or policy (a DrQ-recipe critic target has its own copy)."""
    return [m for m in _module(model_or_policy).modules() if isinstance(m, PerceiverEncoder)]


def _encoders_or_error(model_or_policy) -> list[PerceiverEncoder]:
    encoders = perceiver_encoders(model_or_policy)
    if not encoders:
        raise ValueError(
            f"{type(_module(model_or_policy)).__name__} has no Perceiver encoder: the number of latents is a "
            "setting of policy_type 'perceiver' only"
        )
    return encoders


def latent_choices(model_or_policy) -> list[int]:
    """The numbers of latents the policy was trained to run with (`PerceiverConfig.latent_choices`)."""
    return _encoders_or_error(model_or_policy)[0].config.latent_choices()


def get_num_latents(model_or_policy) -> int:
    """The number of latents the policy runs with now."""
    return _encoders_or_error(model_or_policy)[0].num_active_latents


def set_num_latents(model_or_policy, k: int) -> None:
    """Run every Perceiver encoder of the model / policy with its first `k` latents (a trained choice)."""
    encoders = _encoders_or_error(model_or_policy)
    encoders[0].set_num_latents(k)  # validates, naming the valid choices
    for encoder in encoders[1:]:
        encoder.set_num_latents(k)


@contextlib.contextmanager
def num_latents(model_or_policy, k: int | None):
    """`set_num_latents(k)` inside the block (None: unchanged), the previous k restored after."""
    if k is None:
        yield
        return
    before = get_num_latents(model_or_policy)
    set_num_latents(model_or_policy, k)
    try:
        yield
    finally:
        set_num_latents(model_or_policy, before)


def sample_num_latents(config: PerceiverConfig, generator: torch.Generator | None = None) -> int | None:
    """A k drawn uniformly from `config.latent_scaling` for one update, or None when scaling is off."""
    if not config.latent_scaling:
        return None
    index = int(torch.randint(len(config.latent_scaling), (1,), generator=generator))
    return config.latent_scaling[index]


def training_num_latents(policy) -> int | None:
    """A k for the next update of `policy` (None: no scaling, or no Perceiver encoder)."""
    encoders = perceiver_encoders(policy)
    return sample_num_latents(encoders[0].config) if encoders else None


def batch1_latency_ms(policy, obs: dict[str, np.ndarray], repeats: int = 50, warmup: int = 5) -> np.ndarray:
    """Wall-clock ms of `policy.predict(obs, deterministic=True)` on one observation, `repeats` times."""
    for _ in range(warmup):
        policy.predict(obs, deterministic=True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        policy.predict(obs, deterministic=True)
        times.append((time.perf_counter() - start) * 1e3)
    return np.asarray(times)


def latency_by_num_latents(
    model_or_policy, obs: dict[str, np.ndarray], repeats: int = 50
) -> dict[int, float]:
    """p95 batch-1 latency (ms) at each trained k, measured here, interleaved over the ks in 5 rounds so that
    a change in the machine's load reaches every k alike."""
    policy = _module(model_or_policy)
    choices = latent_choices(policy)
    samples: dict[int, list[np.ndarray]] = {k: [] for k in choices}
    rounds = 5
    for _ in range(rounds):
        for k in choices:
            with num_latents(policy, k):
                samples[k].append(batch1_latency_ms(policy, obs, max(1, repeats // rounds)))
    return {k: float(np.percentile(np.concatenate(v), 95)) for k, v in samples.items()}


def choose_num_latents(
    model_or_policy, obs: dict[str, np.ndarray], budget_ms: float, repeats: int = 50
) -> tuple[int, dict[int, float]]:
    """The largest trained k whose measured p95 batch-1 latency is within `budget_ms`, and every k's p95."""
    if not budget_ms > 0:
        raise ValueError(f"latency budget must be > 0 ms, got {budget_ms!r}")
    latency = latency_by_num_latents(model_or_policy, obs, repeats)
    fitting = [k for k, ms in latency.items() if ms <= budget_ms]
    if not fitting:
        measured = ", ".join(f"k={k}: {ms:.2f} ms" for k, ms in latency.items())
        raise ValueError(
            f"no trained number of latents fits a p95 latency of {budget_ms} ms here ({measured})"
        )
    return max(fitting), latency
