"""Can a critic head on an agent's frozen features rank actions as the critic of an agent that solves the task does?

The reliance probe (`experiments.evaluate --reliance`) says whether a trained critic's preferred action moves with
the camera; it cannot say whether the encoder under that critic holds what a better ranking needs (capacity), or
holds it and the critic never learned to use it (training). This separates the two. A *teacher*, a DrQ-recipe run
that solves the task, plays `episodes` deterministic episodes; on every `every`-th state its critic's min Q over
the reliance probe's candidate actions (`experiments.evaluation.greedy_actions`) is the target. Each run's encoder
(the teacher's own included) reads the same observations, frozen, and a fresh critic head of each kind is fit to
the teacher's Q (standardised) on the first half of the episodes, Adam lr 1e-3, `steps` batches of 64 states x 16
candidates; scored on the second half:
- R² of Q over (state, candidate) pairs, and R² of its *action-dependent part* (Q minus each state's mean over the
  candidates): what ranks actions;
- the teacher's regret: the teacher's min Q at its own best candidate minus at the head's best, over its mean |Q|.
Each fit is repeated with the pixel key of every state replaced by another state's (a fixed permutation): the
same inputs, but a camera that says nothing of the state. A state-independent head (each candidate's mean Q over
the fitting states) is the floor.

`python -m experiments.benchmark critic --teacher RUN --runs RUN...` (DrQ-recipe SAC runs reading the same
observation keys as the teacher; a Perceiver is fit with each of `HEAD_KINDS`, a conv encoder with 'flat').
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from experiments.benchmarks.common import table
from perceiver_policy.modalities import is_image_space

HEAD_KINDS = ("queries", "query", "flat")
"""Fresh critic heads: 'queries', action-conditioned queries over the latents (`critic_head='queries'`); 'query'
and 'flat', DrQ's critic (an MLP on [readout, action], `critic_head='mlp'`) on a one-query or a flat readout."""
STATES_PER_BATCH, CANDIDATES_PER_STATE = 64, 16


def teacher_targets(teacher, task: str, env_kwargs: dict, episodes: int, seed: int, every: int = 2):
    """The teacher's evaluation states (every `every`-th step of `episodes` deterministic episodes), the episode
    of each, the candidate actions (C, A) and the teacher's min Q of each state and candidate (N, C)."""
    from envs.vec import make_env_fn
    from experiments.evaluation import greedy_actions, has_q_critic, min_q_over_actions

    if not has_q_critic(teacher):
        raise ValueError(f"the teacher needs a Q critic (SAC); {type(teacher).__name__} has none")
    spaces = teacher.observation_space.spaces
    env = make_env_fn(task, **env_kwargs)()
    observations, episode_of = [], []
    try:
        for episode in range(episodes):
            obs, _ = env.reset(seed=seed + episode)
            done, step = False, 0
            while not done:
                obs = {k: v for k, v in obs.items() if k in spaces}
                action, _ = teacher.predict(obs, deterministic=True)
                if step % every == 0:
                    observations.append({k: np.array(v, copy=True) for k, v in obs.items()})
                    episode_of.append(episode)
                obs, _, terminated, truncated, _ = env.step(action)
                done, step = terminated or truncated, step + 1
    finally:
        env.close()
    candidates = torch.as_tensor(greedy_actions(teacher.action_space.shape[0]))
    with torch.no_grad():
        q = torch.stack(
            [
                min_q_over_actions(teacher.policy.critic, teacher.policy.obs_to_tensor(o)[0], candidates)
                for o in observations
            ]
        )
    return observations, np.asarray(episode_of), candidates, q


def encoder_features(model, observations: list[dict], shuffle_key: str | None = None) -> torch.Tensor:
    """The frozen encoder output of each observation, stacked (N, ...); with `shuffle_key`, that key of every
    observation is another's (a fixed permutation)."""
    order = np.random.default_rng(1).permutation(len(observations))
    model.policy.set_training_mode(False)
    out = []
    with torch.no_grad():
        for i, obs in enumerate(observations):
            if shuffle_key is not None:
                obs = {**obs, shuffle_key: observations[order[i]][shuffle_key]}
            out.append(model.policy.encoder(model.policy.obs_to_tensor(obs)[0]))
    return torch.cat(out)


def fresh_head(model, kind: str, action_dim: int):
    """(module, q(features, actions) -> (B, 1)) of a fresh critic head of `kind` on `model`'s encoder."""
    from agents.drq_policy import mlp
    from agents.encoders import orthogonal_init
    from perceiver_policy.sac_policy import PerceiverSACCritic

    if kind not in HEAD_KINDS:
        raise ValueError(f"unknown critic head {kind!r}; valid choices: {list(HEAD_KINDS)}")
    policy = model.policy
    if kind == "queries":
        if policy.encoder_name != "perceiver":
            raise ValueError(
                f"critic head 'queries' reads a Perceiver's latents; encoder {policy.encoder_name!r} takes 'flat'"
            )
        head = PerceiverSACCritic(policy.encoder, policy.perceiver_config, action_dim, 1)
        return head, lambda h, a: head.q_values(h, a)[0]
    readout = policy.encoder.make_readout(policy.feature_dim, kind, False, None)
    net = mlp(policy.feature_dim + action_dim, policy.hidden_dim, 1, policy.hidden_depth)
    orthogonal_init(net)
    # the features of one state (batch 1) are read out once and paired with each of the actions
    return torch.nn.ModuleList([readout, net]), lambda h, a: net(
        torch.cat([readout(h).expand(a.shape[0], -1), a], dim=-1)
    )


def fit_head(module, q_fn, features, targets, candidates, fit_index, steps: int, seed: int = 0) -> None:
    """Adam (lr 1e-3) on the squared error to `targets` (N, C), `steps` batches of STATES_PER_BATCH states from
    `fit_index` x CANDIDATES_PER_STATE candidates each."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    for _ in range(steps):
        states = torch.as_tensor(rng.choice(fit_index, STATES_PER_BATCH))
        picked = torch.as_tensor(rng.integers(len(candidates), size=(STATES_PER_BATCH, CANDIDATES_PER_STATE)))
        h = features[states].repeat_interleave(CANDIDATES_PER_STATE, 0)
        y = targets[states].gather(1, picked).reshape(-1, 1)
        loss = (q_fn(h, candidates[picked.reshape(-1)]) - y).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def score(predicted: torch.Tensor, targets: torch.Tensor, teacher_q: torch.Tensor) -> dict[str, float]:
    """R² of (N, C) predictions, R² of their action-dependent part and the teacher's regret at their best
    candidate (over the teacher's mean |Q|)."""
    r2 = 1 - (predicted - targets).pow(2).mean() / targets.var()
    centred = lambda x: x - x.mean(1, keepdim=True)  # noqa: E731
    action_r2 = 1 - (centred(predicted) - centred(targets)).pow(2).mean() / centred(targets).pow(2).mean()
    best = predicted.argmax(1, keepdim=True)
    regret = (teacher_q.max(1).values - teacher_q.gather(1, best)[:, 0]).mean() / teacher_q.abs().mean()
    return {"r2": float(r2), "action_r2": float(action_r2), "regret": float(regret)}


def predict(q_fn, features, candidates, index) -> torch.Tensor:
    """(len(index), C) Q of each indexed state and candidate: one state's features (batch 1) with all candidates,
    so its readout (or the query decoder's pass over its latents) runs once per state."""
    with torch.no_grad():
        return torch.stack([q_fn(features[i : i + 1], candidates)[:, 0] for i in index])


def pixel_key(model) -> str | None:
    return next((k for k, s in model.observation_space.spaces.items() if is_image_space(s)), None)


def critic_rows(teacher, students: list[tuple[str, object]], task: str, env_kwargs: dict, episodes: int = 10,
                seed: int = 10_000, steps: int = 2000, kinds: tuple[str, ...] = HEAD_KINDS, progress=None) -> list[list]:  # fmt: skip
    """[[features, camera, head, R², action-part R², teacher regret]]: the floor, then each of `students`
    (name, model) with each head kind it takes, with its camera and with another state's. `progress`: called
    with each row as it is done (a fit takes minutes)."""
    from agents.drq_policy import DrQSACPolicy

    if episodes < 2:
        raise ValueError(
            f"the critic benchmark fits on half the episodes and scores the other half: needs 2 or more, got {episodes}"
        )
    keys = set(teacher.observation_space.spaces)
    for name, model in students:
        if not isinstance(model.policy, DrQSACPolicy):
            raise ValueError(
                f"{name}: the critic benchmark reads DrQ-recipe runs (--recipe drq); its policy is {type(model.policy).__name__}"
            )
        if set(model.observation_space.spaces) != keys:
            raise ValueError(
                f"{name} reads {sorted(model.observation_space.spaces)}; the teacher reads {sorted(keys)}"
            )
    observations, episode_of, candidates, teacher_q = teacher_targets(
        teacher, task, env_kwargs, episodes, seed
    )
    targets = (teacher_q - teacher_q.mean()) / teacher_q.std().clamp_min(1e-6)
    fit_index = np.flatnonzero(episode_of < episodes // 2)
    scored = np.flatnonzero(episode_of >= episodes // 2)
    floor = targets[fit_index].mean(0, keepdim=True).expand(len(scored), -1)
    result = score(floor, targets[scored], teacher_q[scored])
    rows = [["none (each candidate's mean Q)", "-", "-", result["r2"], result["action_r2"], result["regret"]]]
    camera = pixel_key(teacher)
    for name, model in students:
        conditions = [("its own", None)] + ([("another state's", camera)] if camera else [])
        for label, shuffle in conditions:
            features = encoder_features(model, observations, shuffle)
            for kind in kinds if model.policy.encoder_name == "perceiver" else ("flat",):
                module, q_fn = fresh_head(model, kind, candidates.shape[1])
                fit_head(module, q_fn, features, targets, candidates, fit_index, steps)
                result = score(
                    predict(q_fn, features, candidates, scored), targets[scored], teacher_q[scored]
                )
                rows.append([name, label, kind, result["r2"], result["action_r2"], result["regret"]])
                if progress is not None:
                    progress(rows[-1])
    return rows


def checkpoint_name(checkpoint: Path) -> str:
    """'<run> <checkpoint>' for a checkpoint in a run's checkpoints/ folder."""
    return (
        f"{checkpoint.parent.parent.name} {checkpoint.name}"
        if checkpoint.parent.name == "checkpoints"
        else str(checkpoint)
    )


def bench_critic(teacher_run: Path | None, runs: list[Path] | None, quick: bool = False) -> None:
    from agents.factory import algorithm_class
    from experiments.checkpoint import load_model, locate

    if teacher_run is None or not runs:
        raise ValueError(
            "the critic benchmark needs --teacher RUN (a run that solves the task) and --runs RUN..."
        )
    config, latest = locate(Path(teacher_run))
    load = lambda c, path: load_model(algorithm_class(c.algorithm, c.policy_type), path, device="cpu")  # noqa: E731
    teacher = load(config, latest)
    students = [(f"{checkpoint_name(latest)}, the teacher", teacher)]
    for run in runs:
        student_config, student_latest = locate(Path(run))
        if student_config.task != config.task:
            raise ValueError(f"{run} trained on {student_config.task!r}; the teacher on {config.task!r}")
        students.append((checkpoint_name(student_latest), load(student_config, student_latest)))
    episodes, steps = (4, 300) if quick else (10, 2000)
    rows = critic_rows(teacher, students, config.task, config.env_kwargs(), episodes, 10_000 + config.seed, steps,
                       progress=lambda row: print("fit:", *row[:3], f"regret {100 * row[5]:.2f} %", file=sys.stderr,
                                                  flush=True))  # fmt: skip
    table(
        f"critic heads fit to {checkpoint_name(latest)}'s Q ({config.task}; {episodes // 2} episodes fit, "
        f"{episodes - episodes // 2} scored, {steps} steps)",
        [
            "features (frozen)",
            "camera",
            "fresh head",
            "R² of Q",
            "R² of its action-dependent part",
            "teacher's regret",
        ],
        [
            [f, c, h, round(r2, 3), round(ar2, 3), f"{100 * regret:.2f} %"]
            for f, c, h, r2, ar2, regret in rows
        ],
    )
