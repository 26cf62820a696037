"""Evaluate a trained policy: `python -m experiments.evaluate RUN_DIR_OR_CHECKPOINT [--tasks ...] [--episodes N] [--video]`.

Deterministic actions (`--stochastic`: sampled, seeded), one env per episode, policy latency timed per step.
Writes `<out>/eval.csv` and `<out>/eval.md` (task, episodes, return mean ± std, episode length, latency p50/p95)
and, with --video, one mp4 per task. `--missing-modality pixels` (or any modality, repeatable) evaluates with it absent (a Perceiver drops its
tokens); `--blank-modality pixels` feeds it as zeros instead (a dead sensor; any policy). `--probe-state`
adds one column per state sensor: R² of a linear probe from the policy's features (Perceiver latents, SB3
extractor output, LSTM state) to the true state, fit on the first half of the episodes, scored on the rest (and
a column for each sensed / unsensed part of a sensor the proprio mode keeps in part, e.g. the ball's position).
`--num-latents 4 8 32` evaluates a policy trained with latent_scaling at each of those numbers of latents (one
row each); `--latency-budget-ms B` measures p95 batch-1 latency at every trained k here and evaluates the largest
k that fits. `--all-checkpoints` evaluates every checkpoint a run kept, oldest first, one row each with its step
(is the final evaluation representative of the last stretch of training, or a peak or a dip?); `--best` the
policy of the run's best training evaluation (RUN/checkpoints/best_<step>, kept by `--keep-best`); `--average` the
weight average of its kept checkpoints (RUN/checkpoints/average_<step>, written by `experiments.average`).
`--modality-path` (Perceiver policies) writes `<out>/modality-path.md`: for each modality, where it reaches the
latents and where it is lost in the cross-attention (`perceiver_policy.introspection.modality_path`).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

from agents import algorithm_class
from experiments import config as cfg
from experiments.checkpoint import (
    CheckpointError,
    average_checkpoint,
    best_checkpoint,
    is_run_directory,
    list_checkpoints,
    load_model,
    locate,
    read_meta,
)
from experiments.evaluation import PROBE_FEATURES, evaluate_policy, write_mp4
from experiments.export import observations
from experiments.runtime import prepare_process
from perceiver_policy.introspection import PATH_STAGES
from perceiver_policy.latent_scaling import choose_num_latents, num_latents, set_num_latents

PATH_HEADINGS = {
    "attention": "attention share",
    "focus": "focus within",
    "token_signal": "token signal",
    "tokens": "withheld: tokens",
    "cross_attention": "after cross-attention",
    "latents": "latents",
}
"""The modality-path table's heading of each of `PATH_STAGES`, in its order."""
PATH_LEGEND = (
    "Where each modality reaches the latents (`perceiver_policy.introspection.modality_path`): its share of the "
    "cross-attention; focus within its tokens (0: the latents average them uniformly, 1: each reads one); token "
    "signal (spread of its normalised tokens across observations over their spread across places); and the change "
    "when it is withheld, over the spread across observations, of its tokens, of the latents after the "
    "cross-attention and of the encoder's output.\n\n"
)

COLUMNS = [
    "task",
    "missing",
    "episodes",
    "return_mean",
    "return_std",
    "length_mean",
    "latency_p50_ms",
    "latency_p95_ms",
    "num_latents",
    "step",
]


def markdown_table(rows: list[dict], probe_columns: list[str] = (), steps: bool = False) -> str:
    """`steps`: a first column with each row's checkpoint step (--all-checkpoints)."""
    probe_head = "".join(f" R² {name} |" for name in probe_columns)
    latents = any(r.get("num_latents") for r in rows)
    lines = [
        ("| step " if steps else "") + "| task | missing |" + (" latents |" if latents else "")
        + " episodes | return | length | latency p50 / p95 (ms) |" + probe_head,
        ("| --- " if steps else "") + "| --- | --- |" + (" --- |" if latents else "")
        + " --- | --- | --- | --- |" + " --- |" * len(probe_columns),
    ]  # fmt: skip
    for r in rows:
        probes = "".join(f" {r.get('r2_' + name, float('nan')):.3f} |" for name in probe_columns)
        lines.append(
            (f"| {r['step']} " if steps else "")
            + f"| {r['task']} | {r['missing'] or '-'} |" + (f" {r.get('num_latents') or '-'} |" if latents else "")
            + f" {r['episodes']} | {r['return_mean']:.1f} ± {r['return_std']:.1f} "
            f"| {r['length_mean']:.0f} | {r['latency_p50_ms']:.2f} / {r['latency_p95_ms']:.2f} |" + probes
        )  # fmt: skip
    return "\n".join(lines) + "\n"


def condition(args: argparse.Namespace) -> str:
    """The file-name suffix of an evaluated condition: '' (every sensor), '-no-pixels', '-blank-pixels', ..."""
    suffix = f"-no-{'-'.join(args.missing_modality)}" if args.missing_modality else ""
    suffix += f"-blank-{'-'.join(args.blank_modality)}" if args.blank_modality else ""
    if args.num_latents:
        suffix += f"-k{'-'.join(str(k) for k in args.num_latents)}"
    suffix += f"-budget{args.latency_budget_ms:g}ms" if args.latency_budget_ms is not None else ""
    suffix += "-checkpoints" if args.all_checkpoints else ""
    suffix += "-best" if args.best else "-average" if args.average else ""
    return suffix + ("-stochastic" if args.stochastic else "")


def checkpoints_to_evaluate(
    path: Path, latest: Path, every: bool, best: bool = False, average: bool = False
) -> list[Path]:
    """[latest]; with `every` (--all-checkpoints) each complete checkpoint of the run directory, oldest first;
    with `best` (--best) the run's best checkpoint; with `average` (--average) its newest averaged one."""
    if not (every or best or average):
        return [latest]
    flag = "--all-checkpoints" if every else "--best" if best else "--average"
    if not is_run_directory(path):
        raise ValueError(
            f"{flag} reads the checkpoints of a run directory; {str(path)!r} is one checkpoint "
            f"(give its run directory, {str(path.parent.parent)!r})"
        )
    if every:
        return list_checkpoints(path / "checkpoints")
    if average:
        found = average_checkpoint(path)
        if found is None:
            raise ValueError(
                f"{str(path)!r} has no averaged checkpoint; write one with: python -m experiments.average {path}"
            )
        return [found]
    found = best_checkpoint(path)
    if found is None:
        raise ValueError(
            f"{str(path)!r} kept no best checkpoint (trained with --keep-best false, or before the option "
            f"existed); evaluate its latest checkpoint ({str(latest)!r}) without --best"
        )
    return [found]


def checkpoint_step(checkpoint: Path) -> int | None:
    """The agent step a checkpoint directory was written at; None for a bare model .zip or a checkpoint without
    its completion record."""
    try:
        return int(read_meta(checkpoint)["step"]) if checkpoint.is_dir() else None
    except (CheckpointError, KeyError, ValueError):
        return None


def reliance_table(
    model, task: str, config, args: argparse.Namespace, seed: int, result, step: int | None = None
) -> list[str]:
    """Markdown rows: per observation key, the action / value / greedy action change withheld and the return with
    it blanked (`step`: a first column with the checkpoint's step)."""
    rows = []
    for key, change in result.reliance.items():
        blanked = evaluate_policy(
            model, task, config.env_kwargs(), args.episodes, seed=seed, blank=(key,),
            deterministic=not args.stochastic,
        ).summary()  # fmt: skip
        rows.append(
            (f"| {step} " if step is not None else "")
            + f"| {task} | {key} | {change['action']:.3f} | {change['value']:.3f} | {change['greedy']:.3f} | "
            f"{change['action_resampled']:.3f} | {change['value_resampled']:.3f} | "
            f"{change['greedy_resampled']:.3f} | {blanked['return_mean']:.1f} ± {blanked['return_std']:.1f} |\n"
        )
    return rows


RELIANCE_HEADINGS = (
    "| task | withheld | action change | value change | greedy action change | resampled: action change | "
    "value change | greedy action change | return, blanked |"
)


def latent_sizes(model, config, args: argparse.Namespace) -> list[int | None]:
    """The numbers of latents to evaluate at: --num-latents, the one --latency-budget-ms picks, or [None]
    (the policy as loaded)."""
    if args.num_latents:
        for k in args.num_latents:
            set_num_latents(model, k)  # names the trained choices when k is not one
        return list(args.num_latents)
    if args.latency_budget_ms is None:
        return [None]
    obs = observations(config, 1, seed=0)[0]
    k, latency = choose_num_latents(model, obs, args.latency_budget_ms)
    measured = ", ".join(f"k={size}: {ms:.2f} ms" for size, ms in latency.items())
    print(f"p95 batch-1 latency here: {measured}; within {args.latency_budget_ms:g} ms: k={k}")
    return [k]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="run directory or checkpoint directory")
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        help="DMC tasks (default: the run's task; a multi-task run's: all of them)",
    )
    parser.add_argument(
        "--task", default=None, help="evaluate this one task (e.g. one of a multi-task run's)"
    )
    parser.add_argument("--episodes", type=int, default=10, help="episodes per task (default: %(default)s)")
    parser.add_argument(
        "--stochastic",
        action="store_true",
        help="sample each action from the policy's distribution (SB3's deterministic=False), seeded from the env "
        "seed, instead of taking its mean or mode (the default, as training evaluations do); files end in "
        "-stochastic",
    )
    parser.add_argument("--video", action="store_true", help="write an mp4 of the first episode per task")
    parser.add_argument(
        "--attention-overlay",
        action="store_true",
        help="with --video: show the policy's stacked frames with its cross-attention overlaid (per patch or conv cell;"
        " keypoint tokens: a disc where each keypoint sits, growing with its attention)",
    )
    parser.add_argument(
        "--missing-modality", action="append", default=[], help="evaluate with this modality absent"
    )
    parser.add_argument(
        "--blank-modality",
        action="append",
        default=[],
        help="evaluate with this observation key all zeros (black frames): a dead sensor, for any policy",
    )
    parser.add_argument(
        "--probe-state",
        action="store_true",
        help="R² per state sensor of a linear probe from the policy's features, and of the sensed / unsensed "
        "parts of a sensor the proprio mode keeps in part (needs >= 4 episodes)",
    )
    parser.add_argument(
        "--probe-features",
        nargs="+",
        choices=PROBE_FEATURES,
        default=["encoder"],
        metavar="FEATURES",
        help="with --probe-state: what the probe reads, one or more of "
        f"{', '.join(PROBE_FEATURES)} - 'encoder' (default): what the policy's heads read (Perceiver latents, a "
        "CNN's features, an LSTM's state); 'actor': the input of the actor's action layer (columns 'actor/<sensor>'), "
        "to see whether a state the encoder carries reaches the action",
    )
    parser.add_argument(
        "--reliance",
        action="store_true",
        help="per observation key: how much the deterministic action, the value and (SAC) the critic's greedy "
        "action change when it is withheld (the Perceiver's mask tokens if it has them, else zeros) and when it is "
        "resampled (the same key of a state from another evaluation episode; needs 2 episodes or more), and the "
        "return with it blanked; SAC: the actor's regret against its critic's greedy action",
    )
    parser.add_argument(
        "--reliance-every",
        type=int,
        default=1,
        metavar="K",
        help="with --reliance: probe every K-th evaluation step (default 1: every step; each probed step costs "
        "1 + 2 x keys extra policy passes, 1 + 4 x keys from the second episode on)",
    )
    parser.add_argument(
        "--modality-path",
        action="store_true",
        help="Perceiver policies: for each modality, on the evaluation's observations, where it reaches the "
        "latents and where it is lost - its share of the cross-attention, how focused the latents' attention "
        "within it is (0: a uniform average), how much its normalised tokens vary with the observation, and the "
        "change when it is withheld of its tokens, of the latents after the cross-attention and of the "
        "encoder's output, each over its spread across observations",
    )
    parser.add_argument(
        "--streaming",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Perceiver policies embed only the newest frame / step of each window (same actions; measured "
        "1.00-1.02x the plain forward on 2 CPU cores, so off by default)",
    )
    scaling = parser.add_mutually_exclusive_group()
    scaling.add_argument(
        "--num-latents",
        type=int,
        nargs="+",
        default=None,
        metavar="K",
        help="evaluate with the first K latents, one row per K (a policy trained with latent_scaling: one of its "
        "trained values; without it: only all of them)",
    )
    scaling.add_argument(
        "--latency-budget-ms",
        type=float,
        default=None,
        metavar="B",
        help="measure p95 batch-1 latency at every trained number of latents on this machine and evaluate the "
        "largest that fits within B ms",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--all-checkpoints",
        action="store_true",
        help="evaluate every checkpoint the run directory kept (the newest keep_checkpoints, default 3), oldest "
        "first, one row each with its step: is the final evaluation a peak, a dip or the level of the last "
        "stretch of training?",
    )
    which.add_argument(
        "--best",
        action="store_true",
        help="evaluate the policy of the run's best training evaluation (RUN/checkpoints/best_<step>, kept with "
        "--keep-best, the default) instead of the latest; chosen on the training evaluations' episodes, so give "
        "--seed for fresh ones (e.g. --seed 20000)",
    )
    which.add_argument(
        "--average",
        action="store_true",
        help="evaluate the run's averaged policy (RUN/checkpoints/average_<step>, the weight average of its kept "
        "checkpoints written by `python -m experiments.average RUN`) instead of the latest",
    )
    parser.add_argument(
        "--device", default="cpu", help="torch device to run the policy on (default: %(default)s)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="first episode's env seed (default: 10000 + the run's seed, the seeds of the training evaluations, "
        "so the final training evaluation and this command report the same episodes)",
    )
    parser.add_argument("--output", type=Path, default=None, help="output directory (default: RUN_DIR/eval)")
    args = parser.parse_args(argv)
    try:
        if args.episodes <= 0:
            raise ValueError(f"--episodes must be a positive integer, got {args.episodes}")
        if args.reliance_every <= 0:
            raise ValueError(f"--reliance-every must be a positive integer, got {args.reliance_every}")
        if args.probe_features != ["encoder"] and not args.probe_state:
            raise ValueError(
                f"--probe-features {' '.join(args.probe_features)} chooses what --probe-state reads; add "
                "--probe-state"
            )
        config, latest = locate(args.path)
        checkpoints = checkpoints_to_evaluate(
            args.path, latest, args.all_checkpoints, args.best, args.average
        )
        if args.best:
            meta = read_meta(checkpoints[0])
            print(
                f"best checkpoint: {checkpoints[0]} (step {meta['step']}, {meta.get('frames', '?')} frames; "
                f"its training evaluation {meta['return_mean']:.1f} over {meta.get('episodes', '?')} episodes)"
            )
        if args.average:
            meta = read_meta(checkpoints[0])
            print(
                f"averaged checkpoint: {checkpoints[0]} (the policy weights of steps {meta['averaged_steps']})"
            )
        seed = args.seed if args.seed is not None else 10_000 + config.seed
        if args.task and args.tasks:
            raise ValueError("give --task T (one task) or --tasks T1 T2 ..., not both")
        tasks = [args.task] if args.task else args.tasks or config.eval_tasks()
        for task in tasks:
            cfg.TrainConfig(**{**config.to_dict(), "task": task}).validate()
        out = args.output or (latest.parent.parent / "eval")
        out.mkdir(parents=True, exist_ok=True)
        rows, reliance_rows, path_rows, regret_lines = [], [], [], []
        for checkpoint in checkpoints:
            step = checkpoint_step(checkpoint)
            model = load_model(
                algorithm_class(config.algorithm, config.policy_type), checkpoint, device=args.device
            )
            sizes = latent_sizes(model, config, args)
            for task, k in ((task, k) for task in tasks for k in sizes):
                with num_latents(model, k):
                    result = evaluate_policy(
                        model,
                        task,
                        config.env_kwargs(),
                        args.episodes,
                        seed=seed,
                        video=args.video,
                        missing=tuple(args.missing_modality),
                        blank=tuple(args.blank_modality),
                        probe_state=args.probe_state,
                        probe_features=tuple(args.probe_features),
                        attention_overlay=args.attention_overlay,
                        streaming=args.streaming,
                        reliance=args.reliance,
                        reliance_every=args.reliance_every,
                        modality_path=args.modality_path,
                        deterministic=not args.stochastic,
                    )
                    if result.reliance is not None:
                        reliance_rows += reliance_table(
                            model, task, config, args, seed, result, step if args.all_checkpoints else None
                        )
                        if result.actor_regret is not None and math.isfinite(result.actor_regret):
                            at = f" (step {step})" if args.all_checkpoints else ""
                            regret_lines.append(
                                f"\nActor regret{at}, {task}: {result.actor_regret:.4f} (min-Q of the critic's "
                                "greedy action minus min-Q of the actor's, over mean |Q|)\n"
                            )
                if result.modality_path is not None:
                    at = f"| {step} " if args.all_checkpoints else ""
                    path_rows += [
                        at
                        + f"| {task} | {key} | "
                        + " | ".join(f"{stages[s]:.3f}" for s in PATH_STAGES)
                        + " |\n"
                        for key, stages in result.modality_path.items()
                    ]
                if result.stream is not None:
                    print(
                        f"{task}: streaming cache hit rate {result.stream['stream_cache_hit_rate']:.3f}, "
                        f"window overlap {result.stream['stream_window_overlap']:.3f}"
                    )
                probe = {f"r2_{name}": value for name, value in (result.probe or {}).items()}
                absent = args.missing_modality + [f"{name} (blank)" for name in args.blank_modality]
                rows.append(
                    {
                        "task": task,
                        "missing": ",".join(absent),
                        **result.summary(),
                        "num_latents": k or "",
                        "step": step if step is not None else "",
                        **probe,
                    }
                )
                if result.frames is not None:
                    attention = ("-attention" if args.attention_overlay else "") + (f"-k{k}" if k else "")
                    at = f"-step{step}" if args.all_checkpoints else ""
                    write_mp4(out / f"{task}{condition(args)}{attention}{at}.mp4", result.frames)
    except (ValueError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    probe_columns = list(dict.fromkeys(k[3:] for r in rows for k in r if k.startswith("r2_")))
    name = f"eval{condition(args)}"  # one file per evaluated condition: a later call keeps the others
    with open(out / f"{name}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS + [f"r2_{name}" for name in probe_columns])
        writer.writeheader()
        writer.writerows(rows)
    header = f"Checkpoint{'s' if len(checkpoints) > 1 else ''}: " + ", ".join(f"`{c}`" for c in checkpoints)
    header += (
        f", env seeds from {seed}" + (", actions sampled from the policy" if args.stochastic else "") + "\n\n"
    )
    steps = "| step " if args.all_checkpoints else ""
    if reliance_rows:
        text = f"{steps}{RELIANCE_HEADINGS}\n"
        text += ("| --- " if steps else "") + "| --- " * (RELIANCE_HEADINGS.count("|") - 1) + "|\n"
        text += "".join(reliance_rows) + "".join(regret_lines)
        (out / f"reliance{condition(args)}.md").write_text(header + text)
        print(text, end="")
    if path_rows:
        text = f"{steps}| task | modality | " + " | ".join(PATH_HEADINGS[s] for s in PATH_STAGES) + " |\n"
        text += (
            ("| --- " if steps else "")
            + "| --- | --- |"
            + " --- |" * len(PATH_STAGES)
            + "\n"
            + "".join(path_rows)
        )
        (out / f"modality-path{condition(args)}.md").write_text(header + PATH_LEGEND + text)
        print(text, end="")
    table = markdown_table(rows, probe_columns, steps=args.all_checkpoints)
    (out / f"{name}.md").write_text(header + table)
    print(table, end="")
    if config.multitask:
        references = config.references()
        for step in dict.fromkeys(r["step"] for r in rows):  # one summary per evaluated checkpoint
            trained = [r for r in rows if r["task"] in references and not r["missing"] and r["step"] == step]
            if trained:
                mean = sum(r["return_mean"] for r in trained) / len(trained)
                normalised = sum(r["return_mean"] / references[r["task"]] for r in trained) / len(trained)
                at = f" at step {step}" if args.all_checkpoints else ""
                print(
                    f"mean over {len(trained)} training tasks{at}: return {mean:.1f}, normalised by the "
                    f"references {normalised:.3f}"
                )
    print(f"written: {out / f'{name}.csv'}, {out / f'{name}.md'}")
    return 0


if __name__ == "__main__":
    prepare_process()  # the commands tune their process, importing the package does not
    sys.exit(main())
