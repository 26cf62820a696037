"""What one policy for many bodies costs: `python -m experiments.benchmark multitask [--quick]`.

SAC from states (proprio + action history, action repeat 4, batch 128, 16 latents): the generalist over
cartpole-swingup, walker-walk, cheetah-run and reacher-easy (with and without task stems) against a single-task
Perceiver on walker-walk and the four single-task Perceivers together, by trainable parameters and by the time of
one SAC update, measured alternately in this process (median). Then what one evaluation of the generalist costs
(one deterministic episode per task) without the reliance probe, with it on every 4th step (the training
evaluations' default, `TrainConfig.reliance_every`) and on every step (`experiments.evaluate --reliance`).
"""

from __future__ import annotations

import time

import numpy as np

import envs
from agents import make_agent
from experiments.benchmarks.common import table
from experiments.evaluation import evaluate_tasks

TASKS = ("cartpole-swingup", "walker-walk", "cheetah-run", "reacher-easy")
STATES = ("proprio", "action_history")
BATCH = 128
PERCEIVER = {"num_latents": 16}


def trainable(model) -> int:
    return sum(p.numel() for p in model.policy.parameters() if p.requires_grad)


def bench_multitask(quick: bool) -> None:
    fill, updates = (300, 10) if quick else (1000, 60)
    common = dict(batch_size=BATCH, learning_starts=fill, buffer_size=10_000, seed=0, device="cpu")
    env_options = dict(n_envs=1, seed=0, modalities=STATES, action_repeat=4)
    singles = {task: make_agent("sac", envs.make_vec_env(task, **env_options), perceiver=PERCEIVER, **common)
               for task in TASKS}  # fmt: skip
    generalist_env = envs.make_multitask_vec_env(TASKS, **env_options)
    models = {
        "generalist (4 tasks)": make_agent("sac", generalist_env, perceiver=PERCEIVER, **common),
        "generalist (4 tasks), task stems": make_agent(
            "sac", generalist_env, perceiver={**PERCEIVER, "task_stems": True}, **common
        ),
        "single-task Perceiver, walker-walk": singles["walker-walk"],
    }
    for model in models.values():
        model.learn(fill)  # random actions until learning_starts: fills the buffer, no update yet
        model.train(gradient_steps=2, batch_size=BATCH)
    times = {name: [] for name in models}
    for _ in range(updates):  # alternated, so drifts in machine speed hit every agent
        for name, model in models.items():
            start = time.perf_counter()
            model.train(gradient_steps=1, batch_size=BATCH)
            times[name].append(time.perf_counter() - start)
    single = float(np.median(times["single-task Perceiver, walker-walk"]))
    rows = [
        [name, trainable(models[name]), 1000 * float(np.median(t)), float(np.median(t)) / single]
        for name, t in times.items()
    ]
    rows.append(["four single-task Perceivers together", sum(trainable(m) for m in singles.values()), "", ""])
    table(
        f"Multi-task SAC from states, batch {BATCH}, 16 latents: parameters and one update (median of {updates})",
        ["policy", "trainable parameters", "ms / update", "update time vs single-task"],
        rows,
    )
    bench_evaluation(models["generalist (4 tasks)"], TASKS, rounds=1 if quick else 3)
    for model in (*singles.values(), *models.values()):
        model.get_env().close()


def bench_evaluation(model, tasks, rounds: int, action_repeat: int = 4) -> dict[str, float]:
    """Seconds per evaluation (one episode per task) by reliance-probe setting, rounds alternated (median);
    returns {setting: seconds}."""
    settings = {"no reliance probe": None, "reliance on every 4th step": 4, "reliance on every step": 1}
    env_kwargs = {"tasks": list(tasks), "modalities": STATES, "action_repeat": action_repeat}
    times = {name: [] for name in settings}
    for _ in range(rounds):
        for name, every in settings.items():
            start = time.perf_counter()
            evaluate_tasks(
                model, tasks[0], env_kwargs, 1, reliance=every is not None, reliance_every=every or 1
            )
            times[name].append(time.perf_counter() - start)
    base = float(np.median(times["no reliance probe"]))
    seconds = {name: float(np.median(t)) for name, t in times.items()}
    table(
        f"One evaluation of the generalist ({len(tasks)} tasks, one episode each; median of {rounds})",
        ["evaluation", "s", "vs no probe"],
        [[name, value, value / base] for name, value in seconds.items()],
    )
    return seconds
