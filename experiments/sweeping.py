"""Sweeps over tasks x seeds x settings on Ray Tune; every trial is a normal run directory.

A spec (YAML) names a grid over `TrainConfig` fields (``algo.learning_rate`` style keys reach dict fields), the
fields every trial shares (``base``, a preset allowed), and optionally an Optuna search space. Each trial runs
``python -m experiments.train`` in a subprocess with its own run directory ``<run_dir>/<sweep>/<trial>``, so
train / evaluate / plot / report / ``--resume`` work on it unchanged. Failure handling is Ray's (a failed or
killed trial is retried up to ``max_failures`` times) plus ours: a trial whose run directory exists resumes
from its last checkpoint, and one that already reached its budget trains nothing, so re-running a sweep only
does what is left. Local by default (``ray.init()`` on this machine, ``torch_threads`` CPUs per trial); the same
spec runs on a Ray cluster given its address.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from experiments import config as cfg

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class SweepSpec:
    name: str
    grid: dict = field(default_factory=dict)
    """TrainConfig field (or 'dict_field.key') -> list of values; the trials are their product."""
    base: dict = field(default_factory=dict)
    """TrainConfig fields shared by every trial (e.g. preset, total_steps, algo.batch_size)."""
    variants: list = field(default_factory=list)
    """Optional agents to compare, each a dict of settings (e.g. {policy_type: sb3}), crossed with the grid:
    combinations a plain grid would make invalid (an SB3 agent with the Perceiver's decoding loss) never arise.
    A variant may start from another spec's variant, `{from: pixels-drq#perceiver-conv, ...}` (`SPEC#LABEL`, SPEC a
    spec of the same folder without `.yaml`), its own keys overriding: one agent's settings live in one spec."""
    run_dir: str = "runs/sweeps"
    max_concurrent: int | None = None
    torch_threads: int = 1
    max_failures: int = 2
    search: dict = field(default_factory=dict)
    """Optional Optuna space: field -> [low, high] or [low, high, 'log']; sampled num_samples times per grid point."""
    num_samples: int = 1
    run_name: str | None = None
    """Optional run-name template over the trial's settings and its variant's `label`, e.g.
    'study1-pixels-{label}-s{seed}'; default: the settings spelled out ('policy_type=sb3,seed=0')."""


LABEL = "label"
"""A variant's name in run names (`SweepSpec.run_name`), not a training setting."""
FROM = "from"
"""A variant key: `SPEC#LABEL`, the variant it starts from (`SweepSpec.variants`), not a training setting."""


def _check_field(key: str) -> None:
    if key == LABEL:
        return
    name = key.split(".", 1)[0]
    fields = {f for f in cfg.TrainConfig.__dataclass_fields__}
    if (
        name not in fields
        or name in ("run_dir", "run_name")
        or ("." in key and name not in ("perceiver", "algo", "policy"))
    ):
        raise ValueError(f"unknown sweep field {key!r}; valid: TrainConfig fields {sorted(fields)} "
                         "(dict fields as perceiver.<key>, algo.<key>, policy.<key>)")  # fmt: skip


def _resolve_variant(variant: dict, folder: Path, seen: tuple[str, ...]) -> dict:
    """`variant` with its `from: SPEC#LABEL` replaced by that variant's settings (resolved in turn), its own keys
    overriding them; key order: the source's keys, then this variant's new ones."""
    if not isinstance(variant, dict):
        raise ValueError(f"a variant must be a mapping of settings, got {variant!r}")
    if FROM not in variant:
        return variant
    ref = variant[FROM]
    spec_name, _, label = str(ref).partition("#")
    if not spec_name or not label:
        raise ValueError(f"variant 'from: {ref}' must name SPEC#LABEL, e.g. 'pixels-drq#perceiver-conv'")
    if ref in seen:
        raise ValueError(f"variants start from each other in a cycle: {' -> '.join([*seen, ref])}")
    source = folder / f"{spec_name}.yaml"
    if not source.exists():
        specs = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ValueError(f"variant 'from: {ref}': no spec {spec_name!r} in {folder}; valid: {specs}")
    variants = (cfg.load_yaml(source.read_text()) or {}).get("variants") or []
    matches = [v for v in variants if isinstance(v, dict) and v.get(LABEL) == label]
    if not matches:
        labels = [v.get(LABEL) for v in variants if isinstance(v, dict)]
        raise ValueError(
            f"variant 'from: {ref}': {spec_name} has no variant labelled {label!r}; valid: {labels}"
        )
    base = _resolve_variant(matches[0], folder, (*seen, ref))
    return {**base, **{k: v for k, v in variant.items() if k != FROM}}


def load_spec(path: Path) -> SweepSpec:
    values = cfg.load_yaml(Path(path).read_text()) or {}
    known = set(SweepSpec.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown sweep spec keys {unknown} in {path}; valid keys: {sorted(known)}")
    values.setdefault("name", Path(path).stem)
    spec = SweepSpec(**values)
    spec.variants = [_resolve_variant(v, Path(path).parent, ()) for v in spec.variants]
    for key in [*spec.grid, *spec.base, *spec.search, *(k for v in spec.variants for k in v)]:
        _check_field(key)
    for key, options in spec.grid.items():
        if not isinstance(options, list) or not options:
            raise ValueError(f"grid {key!r} must be a non-empty list, got {options!r}")
    return spec


def trial_name(point: dict) -> str:
    text = ",".join(f"{k}={v}" for k, v in sorted(point.items()))
    return re.sub(r"[^A-Za-z0-9_.,=-]+", "_", text)


def run_name(template: str | None, point: dict) -> str:
    """The run directory name of a trial: the spec's template filled from its settings, or `trial_name`."""
    if template is None:
        return trial_name({k: v for k, v in point.items() if k != LABEL})
    try:
        return template.format(**{k.replace(".", "_"): v for k, v in point.items()})
    except KeyError as err:
        raise ValueError(
            f"run_name {template!r} names {err}, which this trial does not set: {sorted(point)}"
        ) from None


def trials(spec: SweepSpec) -> list[tuple[str, dict]]:
    """(run name, settings) of every trial of a grid spec: the grid's product crossed with the variants."""
    import itertools

    if spec.search:
        raise ValueError(f"sweep {spec.name!r} samples a search space: its trials are chosen while it runs")
    keys = list(spec.grid)
    out = []
    for variant in spec.variants or [{}]:
        for values in itertools.product(*(spec.grid[k] for k in keys)):
            point = {**variant, **dict(zip(keys, values))}
            out.append((run_name(spec.run_name, point), {**spec.base, **point}))
    names = [name for name, _ in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"run_name {spec.run_name!r} gives several trials the same name: {duplicates}")
    return out


def check_trials(planned: list[tuple[str, dict]]) -> None:
    """Each (run name, settings) of `trials(spec)` resolved as `experiments.train` resolves its flags (preset,
    defaults, validation), so a bad value is named with its trial before any trial runs."""
    import argparse

    parser = cfg.build_parser("experiments.sweep")
    parser.exit_on_error = False
    for name, settings in planned:
        try:
            cfg.resolve(parser.parse_args(train_args(settings)))
        except (ValueError, argparse.ArgumentError) as err:
            raise ValueError(f"trial {name}: {err}") from None


def train_args(settings: dict) -> list[str]:
    """TrainConfig settings -> experiments.train flags (dict fields grouped into KEY=VALUE lists)."""
    args, dicts = [], {}
    for key, value in settings.items():
        if key == LABEL:
            continue
        name, _, sub = key.partition(".")
        if sub:
            dicts.setdefault(name, []).append(f"{sub}={value}")
        elif isinstance(value, list):
            args += [f"--{name.replace('_', '-')}", *map(str, value)]
        else:
            args += [f"--{name.replace('_', '-')}", str(value)]
    for name, pairs in dicts.items():
        args += [f"--{name}", *pairs]
    return args


def final_return(run_dir: Path) -> tuple[int, float]:
    with open(run_dir / "eval" / "history.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row]
    return int(rows[-1]["frames"]), float(rows[-1]["return_mean"])


def run_trial(config: dict) -> None:
    """Ray Tune function trainable: one training run in a subprocess, fresh or resumed."""
    from ray import tune

    point, spec = {**config.get("variant", {}), **config["point"]}, config["spec"]
    run_root = Path(spec["root"])
    run_dir = run_root / run_name(spec["run_name"], point)
    settings = {**spec["base"], **point}
    if (run_dir / "config.yaml").exists():  # a retry or a re-run: continue (or find it finished)
        args = ["--resume", str(run_dir), "--progress-bar", "false"]
        if "total_steps" in settings:
            args += ["--total-steps", str(settings["total_steps"])]
    else:
        args = [
            *train_args(settings),
            "--run-dir",
            str(run_root),
            "--run-name",
            run_dir.name,
            "--progress-bar",
            "false",
        ]
    threads = str(spec["torch_threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    log = run_root / f"{run_dir.name}.log"
    with open(log, "a") as handle:
        result = subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=PROJECT_ROOT, env=env,
                                stdout=handle, stderr=subprocess.STDOUT)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"trial {run_dir.name} failed (exit {result.returncode}); see {log}")
    frames, value = final_return(run_dir)
    tune.report({"return": value, "frames": frames})


def run_sweep(spec: SweepSpec, address: str | None = None, max_concurrent: int | None = None):
    """Run every trial of the spec; returns Ray Tune's ResultGrid."""
    import ray
    from ray import tune

    run_root = (Path(spec.run_dir) / spec.name).resolve()
    run_root.mkdir(parents=True, exist_ok=True)
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        # Ray starts its workers at nice 15, and a trial's training subprocess inherits it: on a machine with
        # anything else running, trials then got ~1 % of a core (seen here). Trials are the work: normal priority.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    concurrency = max_concurrent or spec.max_concurrent or max(1, cpus // spec.torch_threads)
    shared = {
        "root": str(run_root),
        "base": spec.base,
        "torch_threads": spec.torch_threads,
        "run_name": spec.run_name,
    }
    point_space = {key: tune.grid_search(values) for key, values in spec.grid.items()}
    search_alg, samples = None, 1
    if spec.search:  # Optuna samples every key (it does not enumerate a grid): grid keys become choices
        from ray.tune.search.optuna import OptunaSearch

        point_space = {key: tune.choice(values) for key, values in spec.grid.items()}
        for key, bounds in spec.search.items():
            point_space[key] = (
                tune.loguniform(*bounds[:2]) if bounds[2:] == ["log"] else tune.uniform(*bounds[:2])
            )
        search_alg, samples = OptunaSearch(metric="return", mode="max"), spec.num_samples
    param_space = {"point": point_space, "spec": shared}
    if spec.variants:
        param_space["variant"] = (
            tune.grid_search(spec.variants) if not spec.search else tune.choice(spec.variants)
        )
    trainable = tune.with_resources(run_trial, {"cpu": spec.torch_threads})
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            max_concurrent_trials=concurrency,
            num_samples=samples,
            search_alg=search_alg,
            metric="return",
            mode="max",
        ),  # fmt: skip
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=str(run_root / "_ray"),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            verbose=1,
        ),
    )
    try:
        return tuner.fit()
    finally:
        ray.shutdown()
