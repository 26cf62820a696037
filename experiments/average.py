"""Average a run's kept checkpoints in weight space: `python -m experiments.average RUN_DIR [--last K | --steps N ...]`.

Writes RUN_DIR/checkpoints/average_<newest step>/: the newest checkpoint's model with every floating-point tensor
of its policy (encoder, actor, critic) replaced by the mean over the chosen checkpoints, as stochastic weight
averaging does along one run (Izmailov et al. 2018; for RL, Nikishin et al. 2018, "Improving Stability in Deep
Reinforcement Learning with Weight Averaging": a good policy, once found, is often forgotten a few updates
later). `python -m experiments.evaluate RUN_DIR --average` scores it; `experiments.export` and `--init-from`
take its directory like any checkpoint. It is not a --resume candidate, and no trained checkpoint is changed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agents import algorithm_class
from experiments.checkpoint import (
    CheckpointError,
    average_policy_weights,
    is_run_directory,
    list_checkpoints,
    load_model,
    read_meta,
    save_average,
)
from experiments.config import load as load_config
from experiments.runtime import prepare_process


def chosen_checkpoints(run_dir: Path, last: int | None, steps: list[int] | None) -> list[Path]:
    """The kept checkpoints to average, oldest first: those of `steps`, else the newest `last`, else all of them."""
    kept = list_checkpoints(run_dir / "checkpoints")
    by_step = {int(read_meta(c)["step"]): c for c in kept}  # a step rewritten (step_<N>.<k>): its newest
    if steps:
        unknown = sorted(set(steps) - set(by_step))
        if unknown:
            raise ValueError(
                f"--steps {' '.join(map(str, unknown))}: no such checkpoint in {run_dir}; valid choices "
                f"(the kept checkpoints' steps): {sorted(by_step)}"
            )
        chosen = [by_step[step] for step in sorted(set(steps))]
    else:
        chosen = [by_step[step] for step in sorted(by_step)][-last if last else None :]
    if len(chosen) < 2:
        raise ValueError(
            f"averaging needs at least 2 checkpoints; {run_dir} kept {len(by_step)} "
            f"(steps {sorted(by_step)}) and {len(chosen)} was chosen (train with --keep-checkpoints K to keep more)"
        )
    return chosen


def write_average(
    model, run_dir: Path, checkpoints: list[Path], action_repeat: int
) -> tuple[Path, list[int]]:
    """Loads the checkpoints' averaged policy weights into `model` (a model of the run) and writes it as
    RUN/checkpoints/average_<newest step> (the newest checkpoint's reward normaliser beside it when `model` has
    none); returns (its directory, the averaged steps)."""
    steps = [int(read_meta(checkpoint)["step"]) for checkpoint in checkpoints]
    model.policy.load_state_dict(average_policy_weights(checkpoints))
    extra = {"frames": steps[-1] * action_repeat, "averaged_steps": steps}
    normalizer = checkpoints[-1] / "vecnormalize.pkl" if model.get_vec_normalize_env() is None else None
    return save_average(model, run_dir / "checkpoints", steps[-1], extra, normalizer), steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="run directory")
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--last",
        type=int,
        default=None,
        metavar="K",
        help="average the newest K kept checkpoints (default: every checkpoint the run kept, the newest "
        "keep_checkpoints: 3 unless the run was trained with --keep-checkpoints)",
    )
    which.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="average the kept checkpoints of these steps",
    )
    args = parser.parse_args(argv)
    try:
        if args.last is not None and args.last < 2:
            raise ValueError(
                f"--last must be at least 2 (an average of several checkpoints), got {args.last}"
            )
        if not is_run_directory(args.path):
            raise ValueError(f"{str(args.path)!r} is not a run directory (no config.yaml in it)")
        config = load_config(args.path / "config.yaml")
        checkpoints = chosen_checkpoints(args.path, args.last, args.steps)
        model = load_model(
            algorithm_class(config.algorithm, config.policy_type), checkpoints[-1], device="cpu"
        )
        written, steps = write_average(model, args.path, checkpoints, config.action_repeat)
    except (ValueError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"averaged the policy weights of steps {steps} -> {written}")
    print(f"score it: python -m experiments.evaluate {args.path} --average --seed 20000")
    return 0


if __name__ == "__main__":
    prepare_process()  # the commands tune their process, importing the package does not
    sys.exit(main())
