"""Distil a trained policy into a light student by DAgger: `python -m experiments.distill RUN --student mlp`.

The student (SB3 PPO MultiInputPolicy: `mlp` reads proprio and histories, `cnn` reads what the teacher reads) is
written as a normal run directory (config.yaml + checkpoints/), so `experiments.evaluate` and `experiments.export`
take it like any run. Prints and writes distill.json: teacher and student return on the same evaluation episodes,
return kept (% of the teacher's), batch-1 latency of both measured side by side, acting parameters, wall time.
TensorBoard: distill/student_return, distill/on_policy_mse (the student's action error on the states it visits,
before training on them), distill/train_mse, distill/dataset_size, distill/beta.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import envs
from agents import algorithm_class
from agents.distill import STUDENTS, DaggerConfig, dagger, make_student, student_keys
from envs.dmc import STATE_KEY
from envs.vec import make_env_fn
from envs.wrappers import ABSENT_KEY
from experiments import config as cfg
from experiments.checkpoint import CheckpointError, load_model, locate, save_checkpoint
from experiments.evaluation import evaluate_policy
from experiments.runtime import prepare_process
from perceiver_policy import count_parameters


def acting_parameters(model) -> int:
    """Parameters on the path from observation to action (a SAC critic or a PPO value head excluded)."""
    policy = model.policy
    if hasattr(policy, "actor") and hasattr(policy, "critic"):  # SAC: actor (+ the shared Perceiver encoder)
        modules = [policy.actor] + ([policy.encoder] if hasattr(policy, "encoder") else [])
    else:  # PPO / A2C: extractor, the action branch, the action head
        modules = [policy.pi_features_extractor, policy.action_net]
        branch = getattr(policy.mlp_extractor, "policy_net", None)
        modules += [branch] if branch is not None else [policy.mlp_extractor]
    return count_parameters(nn.ModuleList(modules), trainable_only=False)  # shared weights counted once


def side_by_side_latency(models: dict, env, steps: int) -> dict[str, float]:
    """Batch-1 `predict` p50 (ms) per model on the same observations, alternating the order each step."""
    obs, _ = env.reset(seed=123)
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for step in range(steps):
        action = None
        for name in names if step % 2 else names[::-1]:
            model, keys = models[name]
            start = time.perf_counter()
            predicted, _ = model.predict({k: obs[k] for k in keys}, deterministic=True)
            times[name].append(time.perf_counter() - start)
            action = predicted if name == names[-1] else action
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            obs, _ = env.reset()
    return {name: 1000 * float(np.percentile(values[5:], 50)) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher", type=Path, help="the teacher's run directory (or a checkpoint in it)")
    parser.add_argument("--student", default="mlp", help=f"one of {list(STUDENTS)}")
    defaults = DaggerConfig()
    parser.add_argument(
        "--iterations",
        type=int,
        default=defaults.iterations,
        help="DAgger rounds: collect, aggregate, retrain (default: %(default)s)",
    )
    parser.add_argument(
        "--steps-per-iteration",
        type=int,
        default=defaults.steps_per_iteration,
        help="env steps collected per round, summed over envs (default: %(default)s)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=defaults.epochs,
        help="passes over the aggregated dataset per round (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="student minibatch (default: %(default)s)"
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=defaults.learning_rate,
        help="the student's Adam learning rate (default: %(default)s)",
    )
    parser.add_argument(
        "--latent-weight", type=float, default=0.0, help="> 0: also match the teacher's latents"
    )
    parser.add_argument(
        "--n-envs", type=int, default=4, help="envs collecting in parallel (default: %(default)s)"
    )
    parser.add_argument(
        "--eval-episodes",
        type=int,
        default=5,
        help="student evaluation episodes per round (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the student, the envs and the sampling (default: %(default)s)",
    )
    parser.add_argument(
        "--device", default="cpu", help="torch device for teacher and student (default: %(default)s)"
    )
    parser.add_argument("--run-dir", default=None, help="default: the teacher's run directory's parent")
    parser.add_argument("--run-name", default=None, help="default: <teacher>-distill-<student>")
    args = parser.parse_args(argv)
    try:
        for name in ("iterations", "steps_per_iteration", "epochs", "batch_size", "n_envs", "eval_episodes"):
            if getattr(args, name) <= 0:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}"
                )
        teacher_config, checkpoint = locate(args.teacher)
        teacher = load_model(
            algorithm_class(teacher_config.algorithm, teacher_config.policy_type),
            checkpoint,
            device=args.device,
        )
        if ABSENT_KEY in teacher.observation_space.spaces:
            raise ValueError(
                "teachers trained with --env-modality-dropout are not supported by distillation yet"
            )
        keys = student_keys(teacher.observation_space, args.student)
        run_dir = Path(args.run_dir or checkpoint.parent.parent.parent) / (
            args.run_name or f"{checkpoint.parent.parent.name}-distill-{args.student}"
        )
        if (run_dir / "config.yaml").exists():
            raise ValueError(f"run directory {str(run_dir)!r} already exists; choose another --run-name")
        return distill(args, teacher_config, teacher, checkpoint, keys, run_dir)
    except (ValueError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def distill(
    args, teacher_config: cfg.TrainConfig, teacher, checkpoint: Path, keys: list[str], run_dir: Path
) -> int:
    values = teacher_config.to_dict() | {
        "algorithm": "ppo", "policy_type": "sb3", "modalities": keys, "aux_state_weight": 0.0, "perceiver": {},
        "algo": {}, "policy": {}, "init_from": None, "finetune": "all", "env_modality_dropout": 0.0,
        "run_dir": str(run_dir.parent), "run_name": run_dir.name, "seed": args.seed, "curriculum": [],
    }  # fmt: skip
    student_config = cfg.from_dict(values)
    student_config.validate()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(student_config, run_dir / "config.yaml")
    task = teacher_config.task
    privileged = STATE_KEY in teacher.observation_space.spaces
    venv = envs.make_vec_env(
        task, n_envs=args.n_envs, seed=args.seed, **teacher_config.env_kwargs(privileged)
    )
    student_env = envs.make_vec_env(task, n_envs=1, seed=args.seed, **student_config.env_kwargs())
    student = make_student(student_env, seed=args.seed, device=args.device)
    episodes, eval_seed = args.eval_episodes, 30_000 + args.seed

    def evaluate(model, config=student_config) -> float:
        return evaluate_policy(model, task, config.env_kwargs(), episodes, seed=eval_seed).summary()[
            "return_mean"
        ]

    writer = SummaryWriter(str(run_dir / "tb"))

    def log(iteration: int, metrics: dict) -> None:
        for key, value in metrics.items():
            writer.add_scalar(f"distill/{key}", value, iteration)
        writer.flush()
        print(f"iteration {iteration}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)

    teacher_return = evaluate(teacher, teacher_config)
    print(f"teacher {checkpoint} ({task}): return {teacher_return:.1f} over {episodes} episodes", flush=True)
    config = DaggerConfig(
        iterations=args.iterations, steps_per_iteration=args.steps_per_iteration, epochs=args.epochs,
        batch_size=args.batch_size, learning_rate=args.learning_rate, latent_weight=args.latent_weight, seed=args.seed,
    )  # fmt: skip
    history = dagger(teacher, student, keys, venv, config, evaluate=evaluate, log=log)
    venv.close()
    student_env.close()
    saved = save_checkpoint(
        student, run_dir / "checkpoints", history.dataset_size[-1], keep=1, with_replay_buffer=False,
        extra={"distilled_from": str(checkpoint)},
    )  # fmt: skip
    env = make_env_fn(task, **teacher_config.env_kwargs(privileged))()
    teacher_keys = [k for k in teacher.observation_space.spaces]
    latency = side_by_side_latency({"teacher": (teacher, teacher_keys), "student": (student, keys)}, env, 200)
    env.close()
    summary = {
        "teacher": str(checkpoint), "task": task, "student": args.student, "student_keys": keys,
        "teacher_return": teacher_return, "student_return": history.student_return[-1],
        "return_kept": history.student_return[-1] / teacher_return if teacher_return else float("nan"),
        "teacher_latency_p50_ms": latency["teacher"], "student_latency_p50_ms": latency["student"],
        "teacher_parameters": acting_parameters(teacher), "student_parameters": acting_parameters(student),
        "distill_seconds": history.seconds, "dataset_size": history.dataset_size[-1],
        "on_policy_mse": history.on_policy_mse, "student_returns": history.student_return,
        "latent_weight": args.latent_weight, "checkpoint": str(saved),
    }  # fmt: skip
    (run_dir / "distill.json").write_text(json.dumps(summary, indent=2))
    writer.close()
    print(
        f"student ({args.student}: {', '.join(keys)}): return {summary['student_return']:.1f} = "
        f"{100 * summary['return_kept']:.0f}% of the teacher's {teacher_return:.1f}; batch-1 latency "
        f"{latency['student']:.2f} ms vs {latency['teacher']:.2f} ms; parameters {summary['student_parameters']:,} "
        f"vs {summary['teacher_parameters']:,}; {history.seconds:.0f} s\nrun directory: {run_dir}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    prepare_process()  # the commands tune their process, importing the package does not
    sys.exit(main())
