"""Run a sweep on Ray Tune: `python -m experiments.sweep SPEC.yaml [--address ray://HOST:10001 | auto] [--max-concurrent N]`.

Trials are normal run directories under `<run_dir>/<sweep name>/`; a failed or killed trial is retried from its
last checkpoint, and running the same spec again only does what is left. Summarise with
`python -m experiments.report <run_dir>/<sweep name> --out DIR`. Needs `pip install -e .[sweep]`.
`--print-commands` prints each trial's `experiments.train` command instead (no Ray), for one spec or several in
one process (`python -m experiments.sweep A.yaml B.yaml --print-commands`): the study scripts
(experiments/scripts/) run the specs that way, so each study's settings live in its spec only.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from experiments.runtime import prepare_process
from experiments.sweeping import check_trials, load_spec, run_sweep, train_args, trials


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "spec",
        type=Path,
        nargs="+",
        help="sweep spec YAML (see experiments/sweeps/); several with --print-commands",
    )
    parser.add_argument(
        "--address", default=None, help="Ray cluster address (ray://HOST:10001 or 'auto'); default: local"
    )
    parser.add_argument(
        "--max-concurrent", type=int, default=None, help="trials at a time (default: CPUs / torch_threads)"
    )
    parser.add_argument(
        "--print-commands",
        action="store_true",
        help="print one `experiments.train ...` command per trial (shell-quoted) and exit, without Ray",
    )
    parser.add_argument(
        "--run-dir", default=None, help="parent of the runs (default: the spec's run_dir/<name>)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="replace the spec's seed grid")
    args = parser.parse_args(argv)
    try:
        if len(args.spec) > 1 and not args.print_commands:
            raise ValueError(
                f"a sweep runs one spec, got {len(args.spec)}: {[str(p) for p in args.spec]} (several specs only "
                "with --print-commands)"
            )
        specs = []
        for path in args.spec:  # every spec loaded and its seeds replaced before any is printed or run
            if not path.exists():
                raise ValueError(f"sweep spec {str(path)!r} not found")
            specs.append(load_spec(path))
            if args.seeds is not None:
                specs[-1].grid["seed"] = args.seeds
        if args.print_commands:
            commands = []
            for spec in specs:
                root = args.run_dir or str(Path(spec.run_dir) / spec.name)
                planned = trials(spec)
                check_trials(planned)
                commands += [
                    [*train_args(settings), "--run-dir", root, "--run-name", name]
                    for name, settings in planned
                ]
            try:
                for command in commands:
                    print(shlex.join(["experiments.train", *command]), flush=True)
            except BrokenPipeError:
                # the reader stopped early (`| head`): no traceback; stdout to /dev/null so exit's flush is quiet
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return 1
            return 0
        (spec,) = specs
        if args.run_dir is not None:
            spec.run_dir, spec.name = str(Path(args.run_dir).parent), Path(args.run_dir).name
        if not spec.search:  # a search space's trials are sampled while it runs (its fields: load_spec)
            check_trials(trials(spec))  # every trial's settings, before Ray starts any
        results = run_sweep(spec, address=args.address, max_concurrent=args.max_concurrent)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    done = [r for r in results if r.error is None]
    failed = [r for r in results if r.error is not None]
    print(f"sweep {spec.name}: {len(done)} trials done, {len(failed)} failed; run directories in "
          f"{Path(spec.run_dir) / spec.name}")  # fmt: skip
    if done:
        best = max(done, key=lambda r: r.metrics.get("return", float("-inf")))
        print(
            f"best return {best.metrics['return']:.1f}: {best.config.get('variant', {}) | best.config['point']}"
        )
    return 0 if not failed else 1


if __name__ == "__main__":
    prepare_process()  # the commands tune their process, importing the package does not
    sys.exit(main())
