"""Learning curves from TensorBoard events: `python -m experiments.plot RUN_DIR... [--out curves.png]`.

Runs that differ only in their seed are one curve: mean ± std across seeds, on the x-axis in frames (agent steps
x action repeat, as the DMC literature counts). Seeds are aligned by linear interpolation on the union of steps,
over the frames every seed reached: a shorter (cut) seed shortens its curve, and the plot says so on stderr.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from experiments import config as cfg  # noqa: E402
from experiments.reporting import method_name  # noqa: E402
from experiments.runtime import prepare_process


def read_scalars(run_dir: Path, tag: str) -> tuple[np.ndarray, np.ndarray]:
    accumulator = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    accumulator.Reload()
    if tag not in accumulator.Tags()["scalars"]:
        raise ValueError(f"no {tag!r} in {run_dir}; tags there: {sorted(accumulator.Tags()['scalars'])}")
    by_step = {event.step: event.value for event in accumulator.Scalars(tag)}  # last write per step wins
    steps = np.array(sorted(by_step))
    return steps, np.array([by_step[s] for s in steps])


def label(config: cfg.TrainConfig, by_device: bool = True) -> str:
    """The task and the report's method key (experiments.reporting.method_name): one curve per agent and protocol.
    Other hardware, another curve, unless asked to pool seeds across devices (returns per frame do not depend on
    the hardware in fp32; wall time does)."""
    device = " on CUDA" if by_device and str(config.device).startswith("cuda") else ""
    return f"{config.task} {method_name(config)}{device}"


def group_runs(run_dirs: list[Path], by_device: bool = True) -> dict[str, list[tuple[cfg.TrainConfig, Path]]]:
    groups = defaultdict(list)
    for run_dir in run_dirs:
        if not (run_dir / "config.yaml").exists():
            raise ValueError(f"run directory {str(run_dir)!r} not found (no config.yaml in it)")
        config = cfg.load(run_dir / "config.yaml")
        groups[label(config, by_device)].append((config, run_dir))
    return groups


def split_common_prefix(names: list[str]) -> tuple[str, list[str]]:
    """('what every label starts with', [the rest of each]) by whole words; nothing is split off one label."""
    if len(names) < 2:
        return "", names
    words = [name.split(" ") for name in names]
    common = 0
    while all(len(w) > common + 1 and w[common] == words[0][common] for w in words):
        common += 1
    return " ".join(words[0][:common]), [" ".join(w[common:]) for w in words]


def plot(
    run_dirs: list[Path],
    out: Path,
    tag: str = "eval/return_mean",
    title: str | None = None,
    by_device: bool = True,
) -> Path:
    figure, axis = plt.subplots(figsize=(7, 5.0), dpi=110)
    groups = group_runs(run_dirs, by_device)
    common, short = split_common_prefix(
        list(groups)
    )  # the shared part goes under the title, not in the legend
    for name, (_, runs) in zip(short, groups.items()):
        curves = []
        for config, run_dir in runs:
            steps, values = read_scalars(run_dir, tag)
            curves.append((steps * config.action_repeat, values))
        grid = np.unique(np.concatenate([frames for frames, _ in curves]))
        grid = grid[(grid >= max(c[0][0] for c in curves)) & (grid <= min(c[0][-1] for c in curves))]
        ends = {run_dir: frames[-1] for (_, run_dir), (frames, _) in zip(runs, curves)}
        if len(set(ends.values())) > 1:
            shortest = min(ends, key=ends.get)
            print(
                f"warning: curve {name!r} stops at {ends[shortest]:g} frames, where {shortest} ends; its other "
                f"seeds reach {max(ends.values()):g} (plot the cut run apart to keep the rest of the curve)",
                file=sys.stderr,
            )
        stacked = np.stack([np.interp(grid, frames, values) for frames, values in curves])
        mean, std = stacked.mean(0), stacked.std(0)
        text = f"{name} ({len(runs)} seed{'s' * (len(runs) > 1)})"
        axis.plot(
            grid, mean, label=textwrap.fill(text, 90)
        )  # long method keys wrap instead of widening the figure
        axis.fill_between(grid, mean - std, mean + std, alpha=0.2)
    axis.set_xlabel("frames (agent steps x action repeat)")
    axis.set_ylabel(tag)
    axis.set_title("\n".join(part for part in (title or tag, common) if part), fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, -0.16), frameon=False)  # under the axes
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument(
        "--tag",
        default="eval/return_mean",
        help="the TensorBoard scalar to plot (default: %(default)s; a multi-task run's mean over its tasks, "
        "eval/<task>/return_mean for one of them)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("curves.png"), help="image to write (default: %(default)s)"
    )
    parser.add_argument(
        "--title",
        default=None,
        help="figure title (default: the tag; what the runs share is written beneath it)",
    )
    parser.add_argument(
        "--merge-devices",
        action="store_true",
        help="one curve per agent whatever device trained each seed (default: CUDA runs get their own curve)",
    )
    args = parser.parse_args(argv)
    try:
        path = plot(args.runs, args.out, args.tag, args.title, by_device=not args.merge_devices)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    prepare_process()  # the commands tune their process, importing the package does not
    sys.exit(main())
