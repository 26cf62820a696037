"""Benchmarks (not tests): `python -m experiments.benchmark env|policy|train|sac|drq|fuse|fuse-drq|features|readout|critic|estimator|latents|multitask|precision|streaming|gpu|all [--quick]`.

Every table compares alternatives measured side by side in the same run and reports ratios; quote them with
the machine (printed first). Timings use `time.perf_counter` after warm-up; latency is per call, p50/p95.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("MUJOCO_GL", "egl")

from experiments.benchmarks.common import machine  # noqa: E402
from experiments.benchmarks.environment import bench_env  # noqa: E402
from experiments.benchmarks.policy import bench_policy  # noqa: E402
from experiments.benchmarks.training import (  # noqa: E402
    bench_gpu_rollouts,
    bench_train,
    replay_worker,
    summary,
    train_worker,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "what",
        choices=[
            "env",
            "policy",
            "train",
            "sac",
            "drq",
            "fuse",
            "fuse-drq",
            "features",
            "readout",
            "critic",
            "estimator",
            "latents",
            "multitask",
            "precision",
            "streaming",
            "gpu",
            "all",
            "train-worker",
            "replay-worker",
        ],
        help="which benchmark to run ('all': every table; the -worker ones are subprocesses of the others)",
    )
    parser.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument(
        "--quick", action="store_true", help="fewer repetitions: a few minutes on 2 CPU cores"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="estimator: which encoders (default: all but drq-cnn and the stem and knob variants; --quick: four; "
        "'stems': the conv-stem comparison; 'knobs': one Perceiver setting at a time; 'warmup', 'locality', "
        "'background': the learning-rate warmup, placed latents, the running mean frame); names in "
        "experiments/benchmarks/estimator.py",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="estimator: training steps of each encoder (default 800; --quick: 400); R^2 is scored after a "
        "quarter, half and all of them",
    )
    parser.add_argument(
        "--task",
        default="cartpole-swingup",
        help="estimator: the DMC task whose images and states are regressed (default: %(default)s; "
        "ball_in_cup-catch scores the ball's position, which only the camera shows, apart)",
    )
    parser.add_argument(
        "--runs",
        nargs="+",
        type=Path,
        default=None,
        help="features: trained pixel SAC runs (with a replay snapshot): their features and Q on their own replay, and "
        "how far encoder, features and actions moved between their kept checkpoints; readout: trained Perceiver runs: "
        "whether each readout kind, fit from scratch on their frozen latents, carries the state their actor's last "
        "layer does not; critic: DrQ-recipe runs whose encoders are read, frozen, by fresh critic heads fit to the "
        "teacher's Q",
    )
    parser.add_argument(
        "--teacher",
        type=Path,
        default=None,
        help="critic: a DrQ-recipe SAC run that solves the task; its critic's Q over candidate actions on its own "
        "evaluation states is what fresh critic heads on each run's frozen encoder are fit to",
    )
    args = parser.parse_args(argv)
    if args.what in ("train-worker", "replay-worker"):
        worker = train_worker if args.what == "train-worker" else replay_worker
        print(json.dumps(worker(json.loads(args.spec))))
        return 0
    try:
        if args.what in ("estimator", "all"):
            from experiments.benchmarks.estimator import variant_names

            variant_names(args.quick, args.variants, args.steps, args.task)
        return run(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    """The tables `args.what` names, after the machine line."""
    torch.manual_seed(0)
    print(f"machine: {machine()}; date: {time.strftime('%Y-%m-%d')}; quick={args.quick}")
    if args.what in ("env", "all"):
        bench_env(args.quick)
    if args.what in ("policy", "all"):
        bench_policy(args.quick)
    headline = None
    if args.what in ("train", "all"):
        headline = bench_train(args.quick)
        if args.what == "train":  # "all" prints it with the other GPU tables
            bench_gpu_rollouts(args.quick)
    if args.what in ("gpu", "all"):
        from experiments.benchmarks.gpu import bench_gpu

        bench_gpu(args.quick)
    if args.what in ("precision", "all"):
        from experiments.benchmarks.attention import bench_bf16_attention
        from experiments.benchmarks.precision import bench_bf16_ratio

        bench_bf16_ratio(args.quick)
        bench_bf16_attention(args.quick)
    if args.what in ("streaming", "all"):
        from experiments.benchmarks.streaming import bench_streaming

        bench_streaming(args.quick)
    if args.what in ("train", "sac", "all"):
        from experiments.benchmarks.sac import bench_sac

        sac_speedup = bench_sac(args.quick)
        if headline is not None:
            summary(headline, sac_speedup)
    if args.what in ("drq", "all"):
        from experiments.benchmarks.sac import bench_drq

        bench_drq(args.quick)
    if args.what in ("fuse", "all"):
        from experiments.benchmarks.sac import bench_fuse

        bench_fuse(args.quick)
    if args.what in ("fuse-drq", "all"):
        from experiments.benchmarks.sac import bench_fuse_drq

        bench_fuse_drq(args.quick)
    if args.what in ("features", "all"):
        from experiments.benchmarks.features import bench_features

        bench_features(args.runs)
    if args.what == "readout" or (args.what == "all" and args.runs):
        from experiments.benchmarks.readout import bench_readout

        bench_readout(args.runs)
    if args.what == "critic" or (args.what == "all" and args.teacher):
        from experiments.benchmarks.critic import bench_critic

        bench_critic(args.teacher, args.runs, args.quick)
    if args.what in ("estimator", "all"):
        from experiments.benchmarks.estimator import bench_estimator

        bench_estimator(args.quick, args.variants, args.steps, task=args.task)
    if args.what in ("latents", "all"):
        from experiments.benchmarks.latents import bench_latents

        bench_latents(args.quick)
    if args.what in ("multitask", "all"):
        from experiments.benchmarks.multitask import bench_multitask

        bench_multitask(args.quick)
    return 0
