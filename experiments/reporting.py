"""Suite reports the way the field reads them (rliable: IQM with stratified-bootstrap CIs, performance profiles).

A *run* is a run directory (config.yaml + eval/history.csv). Runs are grouped by task and by *method* (what was
trained: algorithm, policy type, inputs, proprio mode, state decoding); a run's score is its final evaluation
return. A multi-task generalist counts once per task it was evaluated on (its eval/tasks.csv, or its
TensorBoard `eval/<task>/return_mean`), so it sits beside the single-task runs of each task and pools with them
across tasks. DMC returns lie in [0, 1000], so normalised scores are return / 1000.
"""

from __future__ import annotations

import csv
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments import config as cfg

MAX_RETURN = 1000.0


@dataclass
class Run:
    path: Path
    task: str
    method: str
    frames: list[int]
    returns: list[float]

    @property
    def score(self) -> float:
        return self.returns[-1]


POLICY_LABELS = {"sb3": "SB3 MultiInputPolicy", "lstm": "RecurrentPPO LSTM", "perceiver": "Perceiver"}


def budget_frames(config: cfg.TrainConfig) -> int:
    return config.total_steps * config.action_repeat


def method_name(config: cfg.TrainConfig) -> str:
    """The one key that report and plot group runs by: everything that makes two runs different agents or
    protocols (algorithm, recipe, policy, inputs, proprio mode, decoding, dropout, model, algorithm and policy
    options, transfer source, action repeat, budget), never the seed or the device. Runs pool only when equal."""
    parts = [config.algorithm, POLICY_LABELS.get(config.policy_type, config.policy_type)]
    parts.append(
        f"recipe={config.recipe}" if config.algorithm == "sac" and config.policy_type != "sb3" else ""
    )
    parts.append(f"[{'+'.join(config.modalities)}]")
    parts.append(f"proprio={config.proprio}" if config.proprio != "full" else "")
    parts.append(f"decode×{config.aux_state_weight:g}" if config.aux_state_weight > 0 else "")
    parts.append(
        f"modality-dropout={config.env_modality_dropout:g}" if config.env_modality_dropout > 0 else ""
    )
    for name in ("perceiver", "algo", "policy") if config.policy_type == "perceiver" else ("algo", "policy"):
        options = getattr(config, name)
        if options:
            parts.append(f"{name}(" + ",".join(f"{k}={options[k]}" for k in sorted(options)) + ")")
    parts.append(f"from {Path(config.init_from).name} ({config.finetune})" if config.init_from else "")
    evaluated = config.eval_tasks()
    frames = f"repeat {config.action_repeat}, {budget_frames(config) / 1000:g}k frames"
    # A generalist: its sampler and replay make it another agent, and its frames are shared by its tasks.
    if len(evaluated) > 1:
        parts += [_multitask_part(config), f"{frames} over {len(evaluated)} tasks"]
    else:  # one task (a transfer or a body alone in a multi-task layout): its own frames
        parts += [f"in the layout of {len(config.tasks)} tasks" if config.tasks else "", frames]
    return " ".join(part for part in parts if part)


def _multitask_part(config: cfg.TrainConfig) -> str:
    options = [f"tasks={'+'.join(config.tasks)}", f"sampler={config.task_sampler}"]
    options += [f"weights={config.task_weights}"] if config.task_sampler == "fixed" else []
    options += [f"replay={config.task_replay}"] if config.task_replay != "auto" else []
    options += ["reward-normalization"] if config.task_reward_normalization else []
    options += [f"references={config.task_references}"] if config.task_references else []
    return "multitask(" + ",".join(options) + ")"


def find_runs(paths: list[Path]) -> list[Run]:
    """Run directories given directly or found below the given directories (sweeps), with an evaluation."""
    found = []
    for path in paths:
        if not path.exists():
            raise ValueError(f"run or sweep directory {str(path)!r} not found")
        candidates = (
            [path] if (path / "config.yaml").exists() else sorted(p.parent for p in path.rglob("config.yaml"))
        )
        for run_dir in candidates:
            config = cfg.load(run_dir / "config.yaml")
            evaluated = config.eval_tasks()
            if len(evaluated) > 1:
                per_task = read_task_history(run_dir, config.action_repeat, evaluated)
            else:
                per_task = {evaluated[0]: read_history(run_dir, config.action_repeat)}
            last = max((int(rows[-1]["frames"]) for rows in per_task.values() if rows), default=None)
            if last is not None and last < budget_frames(config):  # a cut run is not a final score
                warnings.warn(
                    f"{run_dir}: its last evaluation is at {last} of its {budget_frames(config)} "
                    "frames (cut): left out of the scores",
                    stacklevel=2,
                )
                continue
            method = method_name(config)
            for task, rows in per_task.items():
                if rows:
                    found.append(Run(run_dir, task, method,
                                     [int(r["frames"]) for r in rows], [float(r["return_mean"]) for r in rows]))  # fmt: skip
    if not found:
        raise ValueError(
            f"no run with an evaluation history (eval/history.csv) under {[str(p) for p in paths]}"
        )
    return found


def read_history(run_dir: Path, action_repeat: int) -> list[dict]:
    """Rows {step, frames, return_mean} of eval/history.csv, or from the TensorBoard events of runs written before
    the CSV was appended at every evaluation (a run killed mid-way had none)."""
    history = run_dir / "eval" / "history.csv"
    if history.exists():
        with open(history, newline="") as handle:
            return [row for row in csv.DictReader(handle) if row]
    return _tensorboard_rows(run_dir, action_repeat, {"": "eval/return_mean"})[""]


def read_task_history(run_dir: Path, action_repeat: int, tasks: list[str]) -> dict[str, list[dict]]:
    """A multi-task run's rows {step, frames, return_mean} per task: from eval/tasks.csv, or from the TensorBoard
    tags eval/<task>/return_mean of runs written before that file existed."""
    history = run_dir / "eval" / "tasks.csv"
    if not history.exists():
        return _tensorboard_rows(run_dir, action_repeat, {task: f"eval/{task}/return_mean" for task in tasks})
    per_task = {task: [] for task in tasks}
    with open(history, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"step", "frames", "task", "return_mean"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{history}: no column {sorted(missing)} (columns: {reader.fieldnames})")
        for row in reader:
            if row and row["task"] in per_task:
                per_task[row["task"]].append(row)
    return per_task


def _tensorboard_rows(run_dir: Path, action_repeat: int, tags: dict[str, str]) -> dict[str, list[dict]]:
    """{key: rows {step, frames, return_mean}} of each TensorBoard scalar tag ([] where the run has none); the
    last write per step wins (a resumed run's events after its checkpoint)."""
    rows = {key: [] for key in tags}
    if not (run_dir / "tb").is_dir():
        return rows
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    present = set(events.Tags()["scalars"])
    for key, tag in tags.items():
        if tag in present:
            by_step = {e.step: e.value for e in events.Scalars(tag)}
            rows[key] = [{"step": s, "frames": s * action_repeat, "return_mean": by_step[s]} for s in sorted(by_step)]  # fmt: skip
    return rows


def score_matrices(runs: list[Run]) -> tuple[dict[str, np.ndarray], list[str]]:
    """{method: (seeds, tasks) normalised final scores} over one set of tasks; rliable's input. The set is the
    one that most methods have every task of (ties: the larger set), among the task sets of methods run on two or
    more tasks (a generalist, or one agent run per task), else the tasks every method has; methods without all of
    them are left out. Where a method has unequal seed counts across tasks, each task keeps its smallest count."""
    by = defaultdict(lambda: defaultdict(list))
    for run in runs:
        by[run.method][run.task].append(run.score / MAX_RETURN)
    candidates = {frozenset(t) for t in by.values() if len(t) > 1}
    if candidates:
        covered = {c: sum(c <= set(t) for t in by.values()) for c in candidates}
        tasks = sorted(max(candidates, key=lambda c: (covered[c], len(c), sorted(c))))
    else:
        tasks = sorted(set.intersection(*(set(t) for t in by.values())))
    matrices = {}
    for method, per_task in by.items():
        seeds = min(len(per_task.get(t, ())) for t in tasks) if tasks else 0
        if seeds:
            matrices[method] = np.array([[per_task[t][i] for t in tasks] for i in range(seeds)])
    return matrices, tasks


def aggregates(matrices: dict[str, np.ndarray], reps: int = 2000, seed: int = 0):
    """rliable's IQM / median / mean / optimality gap with stratified-bootstrap 95 % CIs, per method."""
    from rliable import library as rly
    from rliable import metrics

    def all_four(scores):
        return np.array([metrics.aggregate_iqm(scores), metrics.aggregate_median(scores),
                         metrics.aggregate_mean(scores), metrics.aggregate_optimality_gap(scores)])  # fmt: skip

    points, intervals = {}, {}
    # One seeded bootstrap per method, so a method's CI does not depend on the others in the report. With the
    # installed arch, rliable's `random_state` alone does not fix the draws (they also come from NumPy's global
    # RNG): seed that too, and put it back afterwards.
    saved = np.random.get_state()
    try:
        with warnings.catch_warnings():  # arch's notice that RandomState will give way to Generator
            warnings.simplefilter("ignore", FutureWarning)
            for method, scores in matrices.items():
                np.random.seed(seed)
                point, interval = rly.get_interval_estimates(
                    {method: scores}, all_four, reps=reps, random_state=np.random.RandomState(seed)
                )
                points[method], intervals[method] = point[method], interval[method]
    finally:
        np.random.set_state(saved)
    return points, intervals


def score_table(comparisons: dict, reps: int = 2000) -> str:
    """Markdown: per comparison and agent, seeds, mean ± sample std of the returns, IQM and mean with 95 %
    stratified-bootstrap CIs (rliable, returns / 1000, shown x 1000). Every agent of a comparison needs the same
    tasks; seed counts may differ."""
    lines = ["| comparison | agent | tasks | seeds | mean ± sample std | IQM [95 % CI] | mean [95 % CI] |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    if not isinstance(comparisons, dict) or not comparisons:
        raise ValueError("scores YAML must map comparison -> agent -> task -> [per-seed scores]")
    for comparison, agents in comparisons.items():
        tasks = None
        for agent, per_task in agents.items():
            if tasks is None:
                tasks = sorted(per_task)
            elif sorted(per_task) != tasks:
                raise ValueError(
                    f"{comparison!r}: agent {agent!r} has tasks {sorted(per_task)}, the others {tasks}"
                )
            seeds = min(len(per_task[t]) for t in tasks)
            matrix = np.array([[per_task[t][i] for t in tasks] for i in range(seeds)]) / MAX_RETURN
            values = matrix.mean(axis=1) * MAX_RETURN  # per seed, over tasks
            spread = (
                f"{values.mean():.1f} ± {values.std(ddof=1):.1f}" if seeds > 1 else f"{values.mean():.1f}"
            )
            if seeds > 1:
                points, intervals = aggregates({agent: matrix}, reps=reps)
                iqm = _ci(points[agent][0], *intervals[agent][:, 0], scale=MAX_RETURN)
                mean = _ci(points[agent][2], *intervals[agent][:, 2], scale=MAX_RETURN)
            else:
                iqm = mean = "– (one seed)"
            lines.append(
                f"| {comparison} | {agent} | {', '.join(tasks)} | {seeds} | {spread} | {iqm} | {mean} |"
            )
    return "\n".join(lines) + "\n"


def _ci(point, low, high, scale: float = 1.0) -> str:
    return f"{point * scale:.1f} [{low * scale:.1f}, {high * scale:.1f}]"


def write_report(runs: list[Run], out: Path, baselines: dict | None = None, reps: int = 2000) -> Path:
    """report.md (per-task and aggregate tables), scores.csv, performance_profile.png, curves.png in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rliable import library as rly
    from rliable import plot_utils

    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Suite report", "", f"{len(runs)} runs; score = final evaluation return (returns / 1000 where normalised).",
             "IQM and 95 % stratified-bootstrap CIs over seeds from rliable "
             f"(Agarwal et al. 2021; {reps} bootstrap samples).", ""]  # fmt: skip
    with open(out / "scores.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["task", "method", "run", "frames", "final_return"])
        for run in runs:
            writer.writerow([run.task, run.method, run.path.name, run.frames[-1], f"{run.score:.3f}"])
    for task in sorted({r.task for r in runs}):
        lines += [f"## {task}", "", "| method | seeds | frames | mean | median | IQM [95 % CI] | per seed |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        methods = defaultdict(list)
        for run in runs:
            if run.task == task:
                methods[run.method].append(run)
        points, intervals = aggregates(
            {m: np.array([[r.score / MAX_RETURN] for r in rs]) for m, rs in methods.items()}, reps
        )
        for method, group in sorted(methods.items()):
            scores = np.array([r.score for r in group])
            iqm = _ci(points[method][0], *intervals[method][:, 0], scale=MAX_RETURN)
            per_seed = ", ".join(f"{s:.1f}" for s in scores)
            lines.append(f"| {method} | {len(scores)} | {max(r.frames[-1] for r in group)} | {scores.mean():.1f} "
                         f"| {np.median(scores):.1f} | {iqm} | {per_seed} |")  # fmt: skip
        for name, row in ((baselines or {}).get(task) or {}).items():
            spread = f" ± {row['std']}" if "std" in row else ""
            lines.append(f"| *{name}* ({row.get('source', 'published')}) | {row.get('seeds', '')} | "
                         f"{row.get('frames', '')} | *{row['mean']}{spread}* | | | |")  # fmt: skip
        lines.append("")
    matrices, tasks = score_matrices(runs)
    if matrices:
        points, intervals = aggregates(matrices, reps)
        lines += [f"## Across tasks ({', '.join(tasks)}), normalised scores", "",
                  "| method | seeds × tasks | IQM | median | mean | optimality gap |", "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for method in sorted(matrices):
            shape = "×".join(map(str, matrices[method].shape))
            lines.append(f"| {method} | {shape} | " + " | ".join(
                f"{points[method][i]:.3f} [{intervals[method][0, i]:.3f}, {intervals[method][1, i]:.3f}]" for i in range(4)) + " |")  # fmt: skip
        left_out = sorted({r.method for r in runs} - set(matrices))
        if left_out:
            lines += ["", "Left out (not run on every one of these tasks): " + "; ".join(left_out) + "."]
        taus = np.linspace(0.0, 1.0, 51)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            profiles, profile_cis = rly.create_performance_profile(matrices, taus, reps=min(reps, 2000))
        figure, axis = plt.subplots(figsize=(7, 4), dpi=90)
        plot_utils.plot_performance_profiles(profiles, taus, performance_profile_cis=profile_cis, ax=axis,
                                             colors=dict(zip(matrices, plt.rcParams["axes.prop_cycle"].by_key()["color"])))  # fmt: skip
        axis.legend(list(matrices), fontsize=7, loc="lower left")
        figure.tight_layout()
        figure.savefig(out / "performance_profile.png")
        plt.close(figure)
        lines += ["", "![performance profile](performance_profile.png)"]
    _plot_curves(runs, out / "curves.png")
    lines += ["", "![learning curves](curves.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"


def _plot_curves(runs: list[Run], path: Path) -> None:
    """Mean evaluation return vs frames per method (band: min-max over seeds), one panel per task."""
    import matplotlib.pyplot as plt

    tasks = sorted({r.task for r in runs})
    figure, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.8), dpi=90, squeeze=False)
    for axis, task in zip(axes[0], tasks):
        methods = defaultdict(list)
        for run in runs:
            if run.task == task:
                methods[run.method].append(run)
        for method, group in sorted(methods.items()):
            length = min(len(r.frames) for r in group)
            frames = np.array(group[0].frames[:length])
            values = np.array([r.returns[:length] for r in group])
            axis.plot(frames, values.mean(0), label=f"{method} ({len(group)})")
            axis.fill_between(frames, values.min(0), values.max(0), alpha=0.15)
        axis.set_title(task)
        axis.set_xlabel("frames")
        axis.set_ylabel("evaluation return")
        axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
