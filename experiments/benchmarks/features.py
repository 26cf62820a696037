"""Do the critic's features see the state? How much a pixel SAC critic's readout features vary across real
observations, at initialisation for every encoder and, for trained runs, on their own replay; and how far a trained
run's encoder, critic features and actions moved between its kept checkpoints (a policy that swings between
evaluations: docs/results.md, "Is a run's final evaluation its level?").

Variation = total std over the batch / root-mean-square, over all feature dimensions: 0 when every observation
gives the same feature vector, ~1 when the features are centred. A critic whose features barely vary cannot tell
states apart, and the actor it trains acts the same everywhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from agents.drq import feature_variation as variation
from experiments.benchmarks.common import table

LEAN = {"num_latents": 32, "latent_dim": 64, "self_attn_layers": 1, "patch_size": 12}


def random_observations(count: int = 256, seed: int = 0) -> tuple[object, dict[str, torch.Tensor]]:
    """(vec env, `count` observations of cartpole-swingup pixels, 84 px x 3, DrQ's repeat 8, random actions)."""
    import envs

    venv = envs.make_vec_env("cartpole-swingup", n_envs=1, seed=seed, modalities=("pixels",), action_repeat=8)
    rng = np.random.default_rng(seed)
    obs, frames = venv.reset(), []
    for _ in range(count):
        frames.append(obs["pixels"][0])
        obs, *_ = venv.step(rng.uniform(-1, 1, (1, 1)).astype(np.float32))
    return venv, {"pixels": torch.as_tensor(np.stack(frames))}


def critic_spread(policy, obs: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(variation of the critic's readout features, of the encoder output) on `obs`, in eval mode. A critic
    without a readout (SB3's recipe: action-conditioned queries read the latents) has no features of its own
    apart from the action: NaN for them."""
    policy.set_training_mode(False)
    with torch.no_grad():
        h = policy.encoder(obs)
        readout = getattr(policy.critic, "readout", None)
        return (variation(readout(h)) if readout is not None else float("nan")), variation(h)


def init_table() -> None:
    from agents import make_agent

    venv, obs = random_observations()
    rows = []
    for name, policy_type, perceiver, kwargs in (
        ("NatureCNN (cnn)", "cnn", None, {}),
        ("DrQ's encoder (drq-cnn)", "drq-cnn", None, {}),
        ("Perceiver, patch tokens, query readout", "perceiver", LEAN, {}),
        ("Perceiver, patch tokens, flat readout", "perceiver", LEAN, {"readout": "flat"}),
        ("Perceiver, conv tokens, query readout", "perceiver", {**LEAN, "pixel_tokenizer": "conv"}, {}),
        ("Perceiver, patch tokens, query readout, centred", "perceiver", LEAN, {"center_features": True}),
        (
            "Perceiver, patch tokens, query readout, reference-centred",
            "perceiver",
            LEAN,
            {"center_features": "reference"},
        ),
        (
            "Perceiver, conv tokens, query readout, reference-centred",
            "perceiver",
            {**LEAN, "pixel_tokenizer": "conv"},
            {"center_features": "reference"},
        ),
    ):
        # a replay as small as the batch: it is never filled here, and zeroing DrQ's 100k frames took half the time
        model = make_agent("sac", venv, policy_type=policy_type, recipe="drq", policy_kwargs=kwargs, device="cpu",
                           seed=0, buffer_size=len(obs["pixels"]), **({"perceiver": perceiver} if perceiver else {}))  # fmt: skip
        if kwargs.get(
            "center_features"
        ):  # running means and references start at the first batch read in training
            model.policy.set_training_mode(True)
            with torch.no_grad():
                model.policy.critic.readout(model.policy.encoder(obs))
        features, encoder = critic_spread(model.policy, obs)
        rows.append([name, encoder, features])
    venv.close()
    table("Variation across 256 cartpole-swingup pixel observations (random actions), DrQ recipe, at initialisation",
          ["encoder", "encoder output", "critic features"], rows)  # fmt: skip


def replay_sample(run: Path, count: int = 256):
    """(config, model of the run's latest checkpoint, `count` samples of the replay saved with it)."""
    from agents import algorithm_class
    from envs import make_vec_env
    from experiments.checkpoint import load_model, load_replay_buffer, locate

    config, checkpoint = locate(run)
    venv = make_vec_env(config.task, n_envs=1, seed=0, **config.env_kwargs())
    try:
        model = load_model(
            algorithm_class(config.algorithm, config.policy_type), checkpoint, env=venv, device="cpu"
        )
        if load_replay_buffer(model, checkpoint) is None:
            raise ValueError(f"{run} has no replay snapshot (train with --checkpoint-replay-buffer true)")
        torch.manual_seed(0)
        return config, model, model.replay_buffer.sample(count)
    finally:
        venv.close()


def spread_row(name: str, model, data) -> list:
    """Feature variation, Q's spread over states and over actions, and the action's spread over states."""
    features, encoder = critic_spread(model.policy, data.observations)
    count = data.actions.shape[0]
    with torch.no_grad():
        h = model.policy.encoder(data.observations)
        grid = torch.linspace(-1, 1, 11)
        q = torch.stack([torch.cat(model.policy.critic.q_values(h, torch.full((count, 1), float(a))), 1).min(1).values
                         for a in grid], 1)  # (count, 11)  # fmt: skip
        action = model.policy.actor(data.observations, deterministic=True)  # (count, A), in [-1, 1]
    return [name, encoder, features, float(q[:, 5].std()), float((q.max(1).values - q.min(1).values).mean()),
            float(action.std())]  # fmt: skip


def relative_change(before: torch.Tensor, after: torch.Tensor) -> float:
    """||after - before|| / ||before|| over the whole batch: 0 when nothing moved, 1 when the change is as large
    as what was there."""
    return float((after - before).norm() / before.norm().clamp_min(1e-12))


def drift_rows(run: Path, config, data) -> list[list]:
    """How far the run moved between its kept checkpoints (`--keep-checkpoints`) on `data`: the encoder's output
    and the critic's features (relative change) and the deterministic action (mean absolute change; actions lie
    in [-1, 1]). The actor reads the critic's encoder, so a representation that moves under it moves its actions
    too. One kept checkpoint: no row."""
    from agents import algorithm_class
    from experiments.checkpoint import list_checkpoints, load_model, read_meta

    passes = []
    for checkpoint in list_checkpoints(run / "checkpoints"):
        policy = load_model(
            algorithm_class(config.algorithm, config.policy_type), checkpoint, device="cpu"
        ).policy
        policy.set_training_mode(False)
        with torch.no_grad():
            h = policy.encoder(data.observations)
            readout = getattr(policy.critic, "readout", None)
            features = readout(h) if readout is not None else h  # SB3's recipe's critic reads the latents
            action = policy.actor(data.observations, deterministic=True)
        passes.append((int(read_meta(checkpoint)["step"]), h.flatten(1), features.flatten(1), action))
    return [[run.name, f"{step0} → {step1}", relative_change(h0, h1), relative_change(f0, f1),
             float((a1 - a0).abs().mean())]
            for (step0, h0, f0, a0), (step1, h1, f1, a1) in zip(passes, passes[1:])]  # fmt: skip


def trained_tables(runs: list[Path]) -> None:
    """For trained runs, on 256 samples of each one's replay (read once): feature variation and Q's spread over
    states and over actions at its latest checkpoint, and how far it moved between its kept checkpoints. Any SAC
    run whose policy has an `encoder` and a critic with `q_values(latents, actions)`: both recipes."""
    spread, moved = [], []
    for run in runs:
        config, model, data = replay_sample(run)
        spread.append(spread_row(run.name, model, data))
        moved += drift_rows(run, config, data)
    table("Trained runs, on 256 samples of their own replay",
          ["run", "encoder output variation", "critic features variation", "Q(s, 0) std over states",
           "Q range over actions", "deterministic action std over states"], spread)  # fmt: skip
    table("Trained runs, between kept checkpoints, on 256 samples of their final replay",
          ["run", "agent steps", "encoder output change", "critic features change", "action change"], moved)  # fmt: skip


def bench_features(runs: list[Path] | None = None) -> None:
    init_table()
    if runs:
        trained_tables(runs)
