"""Can the actor's readout carry a state its latents hold? Supervised readouts on a trained Perceiver's frozen latents.

A state probe (`experiments.evaluate --probe-state --probe-features encoder actor`) says where a state is linearly
available: in the latents, in the actor's last layer. When the latents carry a state that the actor's last layer
does not, either the readout between them cannot carry it (capacity) or the actor never learned to (training).
This separates the two: on the run's own deterministic evaluation episodes (the first `episodes // 2 - 1` fit,
the next one picks the epoch, the second half is scored, as the state probe splits them), each readout kind is
trained from scratch to regress the standardised privileged state from the frozen latents - a fresh ``query``
readout (one output query, the actor's own architecture) and a fresh ``flat`` readout (DrQ's, on the flattened
latents), each Linear -> 50 + LayerNorm + tanh then a Linear to the state, Adam lr 1e-3, batch 128 - beside the
linear probes of the latents, of their mean over the latent axis and of the trained actor's last layer.

`python -m experiments.benchmark readout --runs RUN...` (Perceiver runs of the DrQ recipe or SB3's).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from agents.drq_policy import FEATURE_DIM
from agents.encoders import FeatureReadout, QueryReadout, orthogonal_init
from experiments.benchmarks.common import table
from perceiver_policy.probes import MIN_EPISODES, r2, state_probe

READOUT_KINDS = ("query", "flat")


def fit_readout(
    kind: str, config, latents: list, states: list, epochs: int = 150, seed: int = 0
) -> np.ndarray:
    """A fresh readout of `kind` + a Linear to the state, trained on the first half of the episodes but one, the
    epoch picked on the last of that half (every 10 epochs); its prediction on the second half."""
    if kind not in READOUT_KINDS:
        raise ValueError(f"unknown readout {kind!r}; valid choices: {list(READOUT_KINDS)}")
    half = len(latents) // 2
    as_tensor = lambda parts: torch.as_tensor(np.concatenate(parts), dtype=torch.float32)  # noqa: E731
    x, y = as_tensor(latents[: half - 1]), as_tensor(states[: half - 1])
    val_x, val_y = as_tensor(latents[half - 1 : half]), as_tensor(states[half - 1 : half])
    test_x = as_tensor(latents[half:])
    mean, std = y.mean(0), y.std(0).clamp_min(1e-6)
    torch.manual_seed(seed)
    if kind == "query":
        readout = QueryReadout(config, FEATURE_DIM)
        orthogonal_init(readout.head)
    else:
        readout = torch.nn.Sequential(torch.nn.Flatten(1), FeatureReadout(x[0].numel(), FEATURE_DIM))
        orthogonal_init(readout)
    model = torch.nn.Sequential(readout, torch.nn.Linear(FEATURE_DIM, y.shape[1]))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    best, best_prediction = -np.inf, None
    for epoch in range(1, epochs + 1):
        model.train()
        for index in torch.randperm(len(x), generator=generator).split(128):
            loss = (model(x[index]) - (y[index] - mean) / std).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if epoch % 10 == 0:
            model.eval()
            with torch.no_grad():
                score = r2(model(val_x).numpy() * std.numpy() + mean.numpy(), val_y.numpy())
                if score > best:
                    best, best_prediction = score, model(test_x).numpy() * std.numpy() + mean.numpy()
    return best_prediction


def readout_rows(
    model, task: str, env_kwargs: dict, episodes: int = 10, seed: int = 10_000, epochs: int = 150
):
    """[(what, R² per state part)] for one Perceiver policy on its own deterministic evaluation episodes: the
    linear probes of its latents, their mean and its actor's last layer, and each readout kind fit from scratch
    on the latents."""
    from experiments.evaluation import evaluate_policy

    if episodes < MIN_EPISODES:
        raise ValueError(f"the readout benchmark needs at least {MIN_EPISODES} episodes, got {episodes}")
    result = evaluate_policy(model, task, env_kwargs, episodes, seed=seed, probe_state=True,
                             probe_features=("encoder", "actor"), keep_probe_data=True)  # fmt: skip
    data, config = result.probe_data, model.policy.perceiver_config
    latents = [f.reshape(len(f), config.num_latents, config.latent_dim) for f in data["features"]["encoder"]]
    states, layout, parts = data["states"], data["layout"], data["parts"]
    actor = {
        name[len("actor/") :]: value for name, value in result.probe.items() if name.startswith("actor/")
    }
    rows = [
        ("linear probe: latents", {name: value for name, value in result.probe.items() if "/" not in name}),
        (
            "linear probe: mean latent",
            state_probe([lat.mean(1) for lat in latents], states, layout, parts=parts),
        ),
        ("linear probe: the actor's last layer", actor),
    ]
    test = np.concatenate(states[len(states) // 2 :])
    for kind in READOUT_KINDS:
        prediction = fit_readout(kind, config, latents, states, epochs)
        scores = {
            name: r2(prediction[:, start:end], test[:, start:end]) for name, (start, end) in layout.items()
        }
        scores["mean"] = float(np.mean(list(scores.values())))
        scores.update(
            {name: r2(prediction[:, columns], test[:, columns]) for name, columns in (parts or {}).items()}
        )
        rows.append((f"fresh {kind} readout, fit to the state", scores))
    return rows


def bench_readout(runs: list[Path] | None, episodes: int = 10) -> None:
    from agents.factory import algorithm_class
    from experiments.checkpoint import load_model, locate

    if not runs:
        raise ValueError("the readout benchmark reads trained Perceiver runs: pass --runs RUN...")
    for run in runs:
        config, latest = locate(Path(run))
        if config.policy_type != "perceiver":
            raise ValueError(
                f"{run}: policy_type {config.policy_type!r}; the readout benchmark reads 'perceiver' runs"
            )
        model = load_model(algorithm_class(config.algorithm, config.policy_type), latest, device="cpu")
        rows = readout_rows(model, config.task, config.env_kwargs(), episodes, seed=10_000 + config.seed)
        names = list(rows[0][1])
        table(f"{run} ({config.task}, {latest.name}): R² on {episodes - episodes // 2} held-out episodes",
              ["what reads the latents", *names], [[what, *(round(s[n], 3) for n in names)] for what, s in rows])  # fmt: skip
