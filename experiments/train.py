"""Train an agent: `python -m experiments.train --preset cartpole-balance-pixels --seed 3 --total-steps 20000`.

Resume a run (killed or finished early): `python -m experiments.train --resume runs/<name>`. A resumed run
continues the step counter, optimizer, learning-rate schedule, torch/numpy/python RNG and (SAC) replay buffer,
and appends to the same TensorBoard run after purging events logged past the checkpoint. Env state inside
worker processes cannot be restored (envs are re-seeded with seed + step), so a resumed run is statistically,
not bit-for-bit, the same as an uninterrupted one.
"""

from __future__ import annotations

import re
import sys
import time
import traceback
from pathlib import Path

from stable_baselines3.common.callbacks import CallbackList
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.vec_env import VecNormalize

import envs
from agents import DEFAULTS, algorithm_class, make_agent, resolve_device, transfer_weights
from envs.multitask import padded_action_dim
from experiments import config as cfg
from experiments.average import chosen_checkpoints, write_average
from experiments.callbacks import (
    CheckpointCallback,
    CurriculumCallback,
    EvalCallback,
    FramesCallback,
    PerceiverMetricsCallback,
    ProgressCallback,
    TaskReturnsCallback,
    tensorboard_writer,
)
from experiments.checkpoint import (
    CheckpointError,
    best_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_model,
    load_replay_buffer,
    load_rng_state,
    locate,
    read_meta,
    set_rng_state,
)
from experiments.evaluation import evaluate_tasks, write_mp4
from experiments.interrupt import RunStopped, StopOnSignal
from experiments.runtime import prepare_process
from experiments.tb import PurgingTensorBoardFormat
from perceiver_policy import count_parameters
from perceiver_policy.model import cpu_has_native_bf16

RUN_SUFFIX = re.compile(r"-s\d+(-\d{8}-\d{6})?$")
"""The `-s<seed>[-<date>-<time>]` ending of a run's name (`default_run_name`, the sweeps' `...-s<seed>`)."""


def preset_label(preset: str | None) -> str | None:
    """A preset's part of a run's name: its name; a file's stem; for a run's `config.yaml`, that run's folder name
    without its seed and time (`runs/cup-cnn-s0/config.yaml` -> 'cup-cnn'), so a rerun is named after its run."""
    if not preset or not cfg.is_preset_file(preset):
        return preset
    path = Path(preset)
    folder = path.resolve().parent.name
    if path.stem == "config" and folder:
        return RUN_SUFFIX.sub("", folder) or path.stem
    return path.stem


def remove_unstarted(run_dir: Path) -> None:
    """A run directory this command created that holds only its config.yaml (a setting refused while the agent was
    built, before anything was written) is removed, so the corrected command can take the same name; a directory
    with anything else in it is kept."""
    if [p.name for p in run_dir.iterdir()] == ["config.yaml"]:
        (run_dir / "config.yaml").unlink()
        run_dir.rmdir()


def default_run_name(config: cfg.TrainConfig) -> str:
    base = (
        preset_label(config.preset)
        or f"{'multitask' if config.multitask else config.task}-{config.algorithm}"
    )
    suffix = "" if config.policy_type == "perceiver" else f"-{config.policy_type}"
    base += "" if base.endswith(suffix) else suffix
    return f"{base}-s{config.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def make_env(config: cfg.TrainConfig, seed: int, normalizer: Path | None = None):
    if config.multitask:  # SAC only (validated): raw rewards, no VecNormalize
        kwargs = config.env_kwargs()
        venv = envs.make_multitask_vec_env(
            kwargs.pop("tasks"),
            n_envs=config.n_envs,
            seed=seed,
            task_sampler=config.task_sampler,
            task_weights=config.task_weights or None,
            vec_env_type=config.vec_env,
            **kwargs,
        )
        return envs.NonFiniteGuard(venv, sanitize=config.sanitize_nonfinite)
    venv = envs.make_vec_env(
        config.task,
        n_envs=config.n_envs,
        seed=seed,
        vec_env_type=config.vec_env,
        modality_dropout=config.env_modality_dropout,
        **config.env_kwargs(privileged_state=config.aux_state_weight > 0),
    )
    venv = envs.NonFiniteGuard(venv, sanitize=config.sanitize_nonfinite)
    if not config.normalize_reward or config.algorithm == "sac":  # SAC learns from raw rewards, as DrQ does
        return venv
    if normalizer is not None and normalizer.exists():
        return VecNormalize.load(str(normalizer), venv)
    gamma = config.algo.get("gamma", DEFAULTS[config.algorithm].get("gamma", 0.99))
    return VecNormalize(venv, norm_obs=False, norm_reward=True, gamma=gamma)


def record_precision(config: cfg.TrainConfig, model, run_dir: Path) -> None:
    """The precision the model really runs in (make_agent picks bf16 on CUDA), written into config.yaml."""
    dtype = getattr(getattr(model.policy, "perceiver_config", None), "dtype", None)
    if dtype is not None and config.perceiver.get("dtype") != dtype:
        config.perceiver["dtype"] = dtype
        cfg.save(config, run_dir / "config.yaml")


# What SubprocVecEnv raises when a worker process is gone (its pipe closed under a send or a recv).
WORKER_DIED = (EOFError, BrokenPipeError, ConnectionResetError)


class EnvWorkerDied(RuntimeError):
    """An env subprocess died mid-run; the run was checkpointed first."""


class TrainingFailed(RuntimeError):
    """An error stopped training mid-run (a bug, a bad state); the model was checkpointed first where it could be."""


def close_quietly(venv) -> None:
    """Close the envs; with a dead worker SubprocVecEnv's close raises on the broken pipe: nothing left to close."""
    try:
        venv.close()
    except WORKER_DIED:
        for process in getattr(getattr(venv, "unwrapped", venv), "processes", []):
            process.terminate()


def make_logger(run_dir: Path, purge_step: int | None) -> Logger:
    return Logger(
        folder=str(run_dir), output_formats=[PurgingTensorBoardFormat(str(run_dir / "tb"), purge_step)]
    )


def initialise_from(model, config: cfg.TrainConfig) -> None:
    """Transfer: the source run's policy weights into `model` (agents.transfer_weights), with a report."""
    source_config, checkpoint = locate(Path(config.init_from))
    for name in ("algorithm", "policy_type"):
        if getattr(source_config, name) != getattr(config, name):
            raise ValueError(
                f"--init-from {config.init_from} was trained with {name} {getattr(source_config, name)!r}; this run "
                f"uses {getattr(config, name)!r} (transfer needs the same {name})"
            )
    source = load_model(
        algorithm_class(source_config.algorithm, source_config.policy_type), checkpoint, device="cpu"
    )
    report = transfer_weights(model, source.policy.state_dict())
    fresh = report["reinitialised"]
    print(
        f"init from {checkpoint} ({', '.join(source_config.tasks) or source_config.task}): {len(report['loaded'])} tensors loaded, "
        f"{len(fresh)} freshly initialised{' ' + str(fresh) if fresh else ''}; finetune {config.finetune}: "
        f"{count_parameters(model.policy):,} of {count_parameters(model.policy, trainable_only=False):,} "
        "parameters train",
        flush=True,
    )


def adopt_multitask_layout(config: cfg.TrainConfig) -> None:
    """A run initialised from a multi-task policy (--init-from GENERALIST) keeps the generalist's observation and
    action layout: it becomes a multi-task run over the generalist's tasks plus its own --task, which alone it
    plays (task sampler 'fixed'); its task gets a new row of the domain embeddings. Its sensors must fit the
    generalist's slots and its actuators the padded action size (an error names what does not)."""
    if not config.init_from or config.multitask:
        return
    source, _ = locate(Path(config.init_from))
    if not source.multitask:
        return
    slots = envs.sensor_slots(source.tasks, source.proprio)
    envs.MultiTaskEnv(
        source.tasks,
        task=config.task,
        slots=slots,
        max_action_dim=padded_action_dim(source.tasks),
        modalities=("proprio",),
        proprio=source.proprio,
    ).close()  # fmt: skip  (names what does not fit)
    config.tasks = list(source.tasks) + ([] if config.task in source.tasks else [config.task])
    config.task_sampler, config.task_weights = "fixed", f"{config.task}=1"
    if source.task_references:
        config.task_references = " ".join(
            pair for pair in source.task_references.split() if pair.split("=")[0] in config.tasks
        )
    config.validate()


def agent_kwargs(config: cfg.TrainConfig) -> dict:
    """`make_agent`'s keyword arguments for this config, besides the env, device and seed."""
    kwargs = dict(perceiver=config.perceiver, policy_type=config.policy_type, recipe=config.recipe)
    kwargs["policy_kwargs"] = dict(config.policy)
    if config.policy_type == "perceiver" and config.finetune != "all":
        kwargs["policy_kwargs"]["finetune"] = config.finetune_spec()
    if config.aux_state_weight > 0:
        kwargs["aux_state_weight"] = config.aux_state_weight
    if config.multitask and config.task_reward_normalization:
        kwargs["replay_buffer_kwargs"] = {"normalize_task_rewards": True}
    if config.modality_mix:
        kwargs.update(modality_mix=config.modality_mix, modality_mix_mode=config.modality_mix_mode,
                      frames_per_step=config.action_repeat)  # fmt: skip
    return {**kwargs, **config.algo}


def build(config: cfg.TrainConfig, run_dir: Path, resume: bool):
    """(model, venv, start_step) for a fresh or resumed run."""
    device = resolve_device(config.device)
    if not resume:
        venv = make_env(config, config.seed)
        model = make_agent(
            config.algorithm, venv, device=str(device), seed=config.seed, **agent_kwargs(config)
        )
        record_precision(config, model, run_dir)
        if config.init_from:
            initialise_from(model, config)
        return model, venv, 0
    checkpoint = latest_checkpoint(run_dir)
    meta = read_meta(checkpoint)
    step = int(meta["step"])
    venv = make_env(config, config.seed + step, normalizer=checkpoint / "vecnormalize.pkl")
    if "task_weights" in meta:  # the task sampler where the run left it (the active sampler's latest weights)
        venv.env_method("set_task_weights", meta["task_weights"])
    model = load_model(
        algorithm_class(config.algorithm, config.policy_type), checkpoint, env=venv, device=str(device)
    )
    if "modality_mix" in meta and getattr(model, "mixer", None) is not None:
        model.mixer.load_state(meta["modality_mix"])  # the sampler's weights where the run left them
    load_replay_buffer(model, checkpoint)
    set_rng_state(load_rng_state(checkpoint / "rng.pt"))
    model._last_obs = None  # reset the (re-seeded) envs at learn()
    precision = getattr(getattr(model.policy, "perceiver_config", None), "dtype", "float32")
    if precision == "bfloat16" and device.type == "cpu":
        native = "native bf16" if cpu_has_native_bf16() else "NO native bf16: emulated, several times slower"
        print(
            f"this run trains in bfloat16; on this CPU it continues in bfloat16 under CPU autocast ({native})"
        )
    print(f"resuming {run_dir} from checkpoint step {step}", flush=True)
    return model, venv, step


def run(config: cfg.TrainConfig, run_dir: Path, resume: bool = False) -> dict:
    model, venv, start_step = build(config, run_dir, resume)
    # Events after the checkpoint's step are dropped; those at its step (its evaluation) describe the restored state.
    model.set_logger(make_logger(run_dir, purge_step=start_step + 1 if resume else None))
    if config.replay_follows_sampler() and hasattr(model.replay_buffer, "set_task_weights"):
        model.replay_buffer.set_task_weights(venv.get_attr("task_weights", indices=[0])[0])
    if config.init_from and not resume:  # a transferred run: how much of the policy trains
        model.logger.record("finetune/trainable_params", count_parameters(model.policy))
        model.logger.record("finetune/total_params", count_parameters(model.policy, trainable_only=False))
        model.logger.dump(0)
    env_kwargs = config.env_kwargs()
    evaluator = EvalCallback(
        config.eval_freq,
        config.task,
        env_kwargs,
        config.eval_episodes,
        run_dir,
        config.action_repeat,
        config.eval_video,
        seed=10_000 + config.seed,
        probe_state=config.state_probe and not config.multitask,  # no privileged state across bodies
        reliance=config.reliance,
        reliance_every=config.reliance_every,
        references=config.references() if config.multitask else None,
        tasks=config.eval_tasks(),
        task_sampler=config.task_sampler,
        keep_best=config.keep_best,
    )
    if resume:  # evaluations logged after the checkpoint are dropped, as in TensorBoard
        evaluator.truncate_history(start_step)
    checkpoints = CheckpointCallback(
        config.checkpoint_freq,
        run_dir / "checkpoints",
        config.keep_checkpoints,
        config.checkpoint_replay_buffer,
        multitask=config.multitask,
    )
    callbacks = [FramesCallback(config.action_repeat), evaluator, checkpoints]
    if config.multitask:
        callbacks.append(TaskReturnsCallback())
    if config.perceiver_log_freq > 0:
        callbacks.append(PerceiverMetricsCallback(config.perceiver_log_freq))
    if config.curriculum:
        callbacks.append(CurriculumCallback(config.curriculum))
    if config.progress_bar:
        callbacks.append(ProgressCallback(config.total_steps, evaluator))
    repeat = config.action_repeat
    print(
        f"budget {config.total_steps} agent steps = {config.total_steps * repeat} frames; evaluation every "
        f"{config.eval_freq} steps = {config.eval_freq * repeat} frames; checkpoint every {config.checkpoint_freq} "
        f"steps = {config.checkpoint_freq * repeat} frames",
        flush=True,
    )
    remaining = config.total_steps - model.num_timesteps
    started = time.perf_counter()
    stopper = StopOnSignal()
    try:
        if remaining > 0:
            try:
                with stopper.installed():
                    model.learn(
                        remaining,
                        callback=CallbackList([stopper, *callbacks]),
                        reset_num_timesteps=not resume,
                        progress_bar=False,
                    )
            except WORKER_DIED as err:  # a SubprocVecEnv worker died: keep what was trained, say how to go on
                raise EnvWorkerDied(
                    f"an env worker process died at step {model.num_timesteps} ({type(err).__name__}: {err}); "
                    + checkpoint_and_hint(checkpoints, model, run_dir)
                ) from err
            except Exception as err:  # anything else mid-run: keep what was trained, then say what stopped it
                raise TrainingFailed(
                    f"training stopped at step {model.num_timesteps} by {type(err).__name__}: {err}; "
                    + checkpoint_or_reason(checkpoints, model, run_dir)
                ) from err
            if stopper.received is not None:  # SIGTERM / Ctrl-C: keep what was trained, say how to go on
                raise RunStopped(
                    f"stopped by {stopper.name} at step {model.num_timesteps}; "
                    + checkpoint_and_hint(checkpoints, model, run_dir),
                    stopper.received,
                )
        evaluator.init_callback(model)
        final = evaluator.evaluate_now()
        checkpoints.init_callback(model)
        checkpoints.save_now()
        averaged = (
            average_at_the_end(config, run_dir, model, evaluator) if config.average_checkpoints else None
        )
    finally:
        close_quietly(venv)
    seconds = time.perf_counter() - started
    return finish(config, run_dir, model, evaluator, final, seconds, remaining, averaged)


def average_at_the_end(config, run_dir: Path, model, evaluator: EvalCallback) -> dict | None:
    """`--average-checkpoints K`: the newest K kept checkpoints' policy weights averaged, written as
    RUN/checkpoints/average_<step> and evaluated on the final evaluation's episodes (logged as
    eval/average_return); `model` holds its trained weights again after. None, with a line, when the run kept
    fewer than 2 checkpoints."""
    try:
        kept = chosen_checkpoints(run_dir, config.average_checkpoints, None)
    except ValueError as err:
        print(f"no averaged policy: {err}", flush=True)
        return None
    trained = {key: value.clone() for key, value in model.policy.state_dict().items()}
    try:
        path, steps = write_average(model, run_dir, kept, config.action_repeat)
        result, _ = evaluate_tasks(
            model,
            evaluator.task,
            evaluator.env_kwargs,
            evaluator.episodes,
            seed=evaluator.seed,
            tasks=evaluator.tasks,
        )
    finally:
        model.policy.load_state_dict(trained)
    summary = result.summary()
    model.logger.record("eval/average_return", summary["return_mean"])
    model.logger.dump(model.num_timesteps)
    return {**summary, "path": path, "steps": steps}


def checkpoint_and_hint(checkpoints: CheckpointCallback, model, run_dir: Path) -> str:
    """Checkpoints the model now (a run ending early) and says where, and how to go on."""
    checkpoints.init_callback(model)
    saved = checkpoints.save_now()
    return f"the model was checkpointed to {saved}; continue with: python -m experiments.train --resume {run_dir}"


def checkpoint_or_reason(checkpoints: CheckpointCallback, model, run_dir: Path) -> str:
    """`checkpoint_and_hint`, or why no checkpoint could be written and where the last periodic one is."""
    try:
        return checkpoint_and_hint(checkpoints, model, run_dir)
    except Exception as err:  # the model itself may be what broke
        return (
            f"no checkpoint could be written ({type(err).__name__}: {err}); the latest periodic checkpoint in "
            f"{run_dir / 'checkpoints'} continues with: python -m experiments.train --resume {run_dir}"
        )


def finish(
    config,
    run_dir: Path,
    model,
    evaluator: EvalCallback,
    final: dict,
    seconds: float,
    trained: int,
    averaged: dict | None = None,
) -> dict:
    eval_dir = run_dir / "eval"
    eval_dir.mkdir(exist_ok=True)
    video_path = None
    if evaluator.last_frames is not None:  # the final evaluation's first episode, already rendered
        video_path = write_mp4(eval_dir / f"final_step_{model.num_timesteps}.mp4", evaluator.last_frames)
    tb = tensorboard_writer(model.logger)
    if tb is not None:
        hparams = {
            "task": ",".join(config.tasks) if config.multitask else config.task,
            "algorithm": config.algorithm,
            "seed": config.seed,
            "modalities": ",".join(config.modalities),
            "total_steps": config.total_steps,
            "precision": getattr(getattr(model.policy, "perceiver_config", None), "dtype", "float32"),
            "init_from": config.init_from or "",
            "finetune": config.finetune,
            "trainable_params": count_parameters(model.policy),
            **{
                f"perceiver.{k}": v
                for k, v in config.perceiver.items()
                if isinstance(v, (int, float, str, bool))
            },
        }
        tb.add_hparams(
            hparams,
            {
                "hparams/final_eval_return": final["return_mean"],
                **({"hparams/average_eval_return": averaged["return_mean"]} if averaged else {}),
            },
            run_name=".",
            global_step=model.num_timesteps,
        )
    model.logger.close()
    first = evaluator.history[0][1] if evaluator.history else final["return_mean"]
    fps = trained / seconds if trained > 0 else 0.0
    lines = [
        f"run directory : {run_dir}",
        f"steps         : {model.num_timesteps} agent steps = {model.num_timesteps * config.action_repeat} frames "
        f"({fps:.0f} steps/s since this command started)",
        f"eval return   : first {first:.1f} -> final {final['return_mean']:.1f} ± {final['return_std']:.1f} "
        f"({config.eval_episodes} episodes{' per task, mean over tasks' if config.multitask else ''}, deterministic)",
        *(
            f"  {task:<12}: {summary['return_mean']:.1f} ± {summary['return_std']:.1f}"
            for task, summary in evaluator.last_per_task.items()
        ),
        *(
            [
                f"averaged      : {averaged['return_mean']:.1f} ± {averaged['return_std']:.1f} on the same episodes, "
                f"the policy weights of steps {averaged['steps']} ({averaged['path']}; python -m "
                f"experiments.evaluate {run_dir} --average)"
            ]
            if averaged
            else []
        ),
        f"tensorboard   : tensorboard --logdir {run_dir.parent}   (or: make tensorboard)",
        f"checkpoints   : {run_dir / 'checkpoints'}",
    ]
    best = best_checkpoint(run_dir) if config.keep_best else None
    if best is not None:
        meta = read_meta(best)
        lines.append(
            f"best policy   : {best} (evaluation {meta['return_mean']:.1f} at step {meta['step']}; on fresh "
            f"episodes: python -m experiments.evaluate {run_dir} --best --seed 20000)"
        )
    if video_path:
        lines.append(f"eval video    : {video_path}")
    print("\n".join(lines), flush=True)
    return {
        "final": final,
        "first": first,
        "history": evaluator.history,
        "video": video_path,
        "averaged": averaged,
    }


def main(argv: list[str] | None = None) -> int:
    parser = cfg.build_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue this run from its latest checkpoint (with --total-steps: new budget)",
    )
    args = parser.parse_args(argv)
    try:
        if args.resume:
            run_dir = Path(args.resume)
            if not (run_dir / "config.yaml").exists():
                raise ValueError(f"run directory {str(run_dir)!r} not found (no config.yaml in it)")
            config = cfg.load(run_dir / "config.yaml")
            changed = config.apply_resume_flags(cfg.given_fields(args))  # e.g. --total-steps: a new budget
            if changed:
                print(
                    f"resume: applying {', '.join('--' + n.replace('_', '-') for n in changed)}", flush=True
                )
            step = int(read_meta(latest_checkpoint(run_dir))["step"])
            if step >= config.total_steps:
                print(f"{run_dir} is at step {step}, its budget is {config.total_steps} steps: nothing to train "
                      f"(pass a larger --total-steps to continue)")  # fmt: skip
                return 0
            cfg.save(config, run_dir / "config.yaml")
            run(config, run_dir, resume=True)
        else:
            config = cfg.resolve(args)
            adopt_multitask_layout(config)
            run_dir = Path(config.run_dir) / (config.run_name or default_run_name(config))
            if (run_dir / "config.yaml").exists():
                if not list_checkpoints(
                    run_dir / "checkpoints"
                ):  # a start that failed before its first checkpoint
                    raise ValueError(
                        f"run directory {str(run_dir)!r} already exists without a checkpoint to resume; remove it "
                        "or choose another --run-name"
                    )
                raise ValueError(
                    f"run directory {str(run_dir)!r} already exists; use --resume {run_dir} to continue"
                )
            created = not run_dir.exists()
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(config, run_dir / "config.yaml")
            try:
                run(config, run_dir)
            except ValueError:
                if created:
                    remove_unstarted(run_dir)
                raise
    except (ValueError, CheckpointError, EnvWorkerDied) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunStopped as stop:
        print(str(stop), file=sys.stderr)
        return 128 + stop.signum
    except TrainingFailed as failed:
        traceback.print_exception(failed.__cause__, file=sys.stderr)
        print(f"error: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    prepare_process()  # the commands tune their process, importing the package does not
    sys.exit(main())
