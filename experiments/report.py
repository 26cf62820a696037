"""Suite report: `python -m experiments.report RUN_OR_SWEEP_DIRS... --out DIR [--baselines published.yaml]`.

Reads every run's evaluation history and writes DIR/report.md (per task: mean, median, IQM with a 95 %
stratified-bootstrap CI over seeds, per-seed values; across tasks: IQM / median / mean / optimality gap of
returns / 1000 with CIs), DIR/scores.csv, DIR/performance_profile.png and DIR/curves.png. Statistics by rliable
(`pip install -e .[report]`). A baselines YAML adds published rows per task:
`{cartpole-swingup: {"DrQ": {mean: 759, std: 92, seeds: 10, frames: 100000, source: "DrQ Table 1"}}}`.
`--scores FILE.yaml` reports per-seed scores given by hand instead of runs ({comparison: {agent: {task: [scores]}}},
e.g. docs/headline-scores.yaml): IQM and mean of returns / 1000 with 95 % CIs per agent.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.config import load_yaml
from experiments.reporting import find_runs, score_table, write_report
from experiments.runtime import prepare_process

YAML_FORMATS = {
    "scores": "per-seed scores {comparison: {agent: {task: [scores]}}}, e.g. docs/headline-scores.yaml",
    "baselines": "published rows per task {task: {agent: {mean: ..., std: ..., seeds: ...}}}, e.g. "
    "experiments/published/dmc100k-pixels.yaml",
}


def read_yaml_file(path: Path, flag: str):
    """The YAML file given to `--<flag>`; a missing one is named with the format the flag takes."""
    if not path.is_file():
        raise ValueError(f"--{flag} file {str(path)!r} not found; give a YAML of {YAML_FORMATS[flag]}")
    return load_yaml(path.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="run directories, or directories holding runs")
    parser.add_argument("--out", type=Path, default=None, help="output directory (required with runs)")
    parser.add_argument("--scores", type=Path, default=None, help="YAML of per-seed scores instead of runs")
    parser.add_argument("--baselines", type=Path, default=None, help="YAML of published rows per task")
    parser.add_argument("--reps", type=int, default=2000, help="bootstrap samples")
    args = parser.parse_args(argv)
    if args.scores is not None:
        try:
            print(score_table(read_yaml_file(args.scores, "scores"), reps=args.reps), end="")
        except (ValueError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    if not args.paths or args.out is None:
        parser.error("give run directories and --out, or --scores FILE")
    try:
        baselines = read_yaml_file(args.baselines, "baselines") if args.baselines else None
        runs = find_runs(args.paths)
        report = write_report(runs, args.out, baselines, reps=args.reps)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.read_text())
    print(f"written: {report}, {args.out / 'scores.csv'}, {args.out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    prepare_process()  # the commands tune their process, importing the package does not
    sys.exit(main())
