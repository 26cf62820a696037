"""Distillation by DAgger: a light student imitates a trained teacher on the states the student itself visits.

Each iteration rolls out a mixture (the teacher acts with probability beta, halved every iteration from 1; the
student acts otherwise), labels every visited state with the teacher's deterministic action, adds it to one
aggregated dataset and regresses the student's mean action onto the labels (Ross et al. 2011). Optionally the
student's features also predict the teacher's mean latent vector through a linear head ("the teacher's
embeddings supervise the student"; `latent_weight`).

The student is SB3's PPO `MultiInputPolicy`, so it saves, loads and evaluates like any baseline run:
``"cnn"`` reads what the teacher reads (NatureCNN for pixels + MLP); ``"mlp"`` reads the teacher's non-pixel
modalities only (proprio and histories) through SB3's flatten + MLP extractor.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3 import PPO
from torch import nn

from envs.dmc import STATE_KEY
from envs.wrappers import ABSENT_KEY
from perceiver_policy.streaming import encoder_of

STUDENTS = ("mlp", "cnn")
NOT_INPUTS = (STATE_KEY, ABSENT_KEY)


def student_keys(observation_space: spaces.Dict, student: str) -> list[str]:
    """The observation keys a student of this kind reads (errors name the valid choices)."""
    if student not in STUDENTS:
        raise ValueError(f"unknown student {student!r}; valid choices: {list(STUDENTS)}")
    keys = [k for k in observation_space.spaces if k not in NOT_INPUTS]
    if student == "mlp":
        keys = [k for k in keys if k != "pixels"]
        if not keys:
            raise ValueError(
                "an mlp student reads proprio and histories, but the teacher reads pixels only; use --student cnn"
            )
    return keys


def make_student(student_env, seed: int, device: str = "cpu", net_arch=(256, 256)) -> PPO:
    """A PPO MultiInputPolicy for `student_env`'s observations (a vec env with the student's modalities; it
    supplies the spaces, DAgger steps the teacher's env)."""
    return PPO(
        "MultiInputPolicy",
        student_env,
        policy_kwargs={"net_arch": dict(pi=list(net_arch), vf=list(net_arch))},
        seed=seed,
        device=device,
    )


@dataclass
class DaggerConfig:
    iterations: int = 8
    steps_per_iteration: int = 2_000
    """Env steps collected per iteration, summed over envs."""
    epochs: int = 10
    batch_size: int = 256
    learning_rate: float = 1e-3
    latent_weight: float = 0.0
    """> 0: also regress the teacher's mean latent vector (Perceiver teachers) from the student's features."""
    max_samples: int = 200_000
    """The aggregated dataset keeps the newest this many states."""
    seed: int = 0


@dataclass
class DaggerHistory:
    iteration: list[int] = field(default_factory=list)
    dataset_size: list[int] = field(default_factory=list)
    beta: list[float] = field(default_factory=list)
    on_policy_mse: list[float] = field(default_factory=list)
    """Mean squared action error of the (not yet retrained) student on the states collected this iteration."""
    train_mse: list[float] = field(default_factory=list)
    student_return: list[float] = field(default_factory=list)
    seconds: float = 0.0


class _LatentTap:
    """The teacher encoder's mean latent vector (B, D) from its latest forward, i.e. from `teacher.predict`:
    latent targets cost no second encoder pass."""

    def __init__(self, encoder):
        self.latest: np.ndarray | None = None
        self._handle = encoder.register_forward_hook(self._store)

    def _store(self, module, inputs, output: torch.Tensor) -> None:
        self.latest = output.detach().mean(dim=1).cpu().numpy()  # (B, M, D) -> (B, D)

    def close(self) -> None:
        self._handle.remove()


def dagger(
    teacher,
    student: PPO,
    keys: list[str],
    venv,
    config: DaggerConfig,
    evaluate: Callable[[PPO], float] | None = None,
    log: Callable[[int, dict], None] | None = None,
) -> DaggerHistory:
    """Run DAgger; `venv` gives the teacher's observations (the student reads `keys` of them); `evaluate(student)`
    returns a return after each iteration; `log(iteration, metrics)` receives each iteration's metrics."""
    head = tap = None
    if config.latent_weight > 0:
        encoder = encoder_of(teacher.policy)
        if encoder is None:
            raise ValueError("latent matching needs a Perceiver teacher (its latents are the targets)")
        head = nn.Linear(student.policy.features_dim, encoder.config.latent_dim).to(student.device)
        tap = _LatentTap(encoder)
    try:
        return _dagger_loop(teacher, student, keys, venv, config, head, tap, evaluate, log)
    finally:
        if tap is not None:
            tap.close()


def _dagger_loop(teacher, student, keys, venv, config, head, tap, evaluate, log) -> DaggerHistory:
    rng = np.random.default_rng(config.seed)
    policy = student.policy
    parameters = list(policy.parameters()) + (list(head.parameters()) if head is not None else [])
    optimizer = torch.optim.Adam(parameters, lr=config.learning_rate)
    data: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    labels: list[np.ndarray] = []
    latents: list[np.ndarray] = []
    history = DaggerHistory()
    started = time.perf_counter()
    obs = venv.reset()
    for iteration in range(config.iterations):
        beta = 0.5**iteration  # all teacher first; the student's own states dominate later
        new_obs, new_labels, new_latents, student_actions = [], [], [], []
        for _ in range(max(1, config.steps_per_iteration // venv.num_envs)):
            label, _ = teacher.predict(obs, deterministic=True)
            if tap is not None:
                new_latents.append(tap.latest)  # from the forward that produced `label`
            seen = {k: obs[k] for k in keys}  # what the student reads
            mine, _ = student.predict(seen, deterministic=True)
            new_obs.append(seen)
            new_labels.append(label)
            student_actions.append(mine)
            acting = np.where(rng.random(venv.num_envs)[:, None] < beta, label, mine)
            obs, _, _, _ = venv.step(acting)
        on_policy_mse = float(np.mean((np.concatenate(student_actions) - np.concatenate(new_labels)) ** 2))
        for key in keys:
            data[key].extend(o[key] for o in new_obs)
        labels.extend(new_labels)
        latents.extend(new_latents)
        _trim(data, labels, latents, config.max_samples // venv.num_envs)
        train_mse = _fit(policy, head, optimizer, data, labels, latents, config, rng)
        history.iteration.append(iteration)
        history.dataset_size.append(len(labels) * venv.num_envs)
        history.beta.append(beta)
        history.on_policy_mse.append(on_policy_mse)
        history.train_mse.append(train_mse)
        history.student_return.append(evaluate(student) if evaluate is not None else float("nan"))
        if log is not None:
            log(iteration, {k: getattr(history, k)[-1] for k in
                            ("dataset_size", "beta", "on_policy_mse", "train_mse", "student_return")})  # fmt: skip
    history.seconds = time.perf_counter() - started
    return history


def _trim(data: dict, labels: list, latents: list, keep: int) -> None:
    excess = len(labels) - keep
    if excess > 0:
        for values in (*data.values(), labels, latents):
            del values[: min(excess, len(values))]


def _fit(policy, head, optimizer, data, labels, latents, config: DaggerConfig, rng) -> float:
    """Epochs of minibatch regression on the aggregated dataset; returns the last epoch's mean action MSE."""
    keys = list(data)
    stacked = {k: np.concatenate(v) for k, v in data.items()}  # (N, ...) per key
    targets = torch.as_tensor(np.concatenate(labels), dtype=torch.float32, device=policy.device)
    latent_targets = (
        torch.as_tensor(np.concatenate(latents), dtype=torch.float32, device=policy.device)
        if head is not None
        else None
    )
    count = len(targets)
    policy.set_training_mode(True)
    last = []
    for _ in range(config.epochs):
        order = rng.permutation(count)
        last = []
        for start in range(0, count, config.batch_size):
            index = order[start : start + config.batch_size]
            obs, _ = policy.obs_to_tensor({k: stacked[k][index] for k in keys})
            features = policy.extract_features(obs, policy.pi_features_extractor)
            mean = policy.action_net(policy.mlp_extractor.forward_actor(features))
            loss = torch.mean((mean - targets[index]) ** 2)
            last.append(loss.item())
            if head is not None:
                loss = loss + config.latent_weight * torch.mean((head(features) - latent_targets[index]) ** 2)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    policy.set_training_mode(False)
    return float(np.mean(last))
