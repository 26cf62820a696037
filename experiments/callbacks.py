"""SB3 callbacks of a training run: evaluation, Perceiver observability, checkpoints, curriculum, progress.

TensorBoard x-axis: SB3's `num_timesteps` (agent steps summed over envs). `charts/frames` (x action repeat) is
logged beside it, as the DMC literature counts frames.
"""

from __future__ import annotations

import csv
import functools
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import TensorBoardOutputFormat

from envs.multitask import active_task_weights
from experiments.checkpoint import best_checkpoint, read_meta, save_best, save_checkpoint
from experiments.evaluation import evaluate_tasks, has_action_layer, missing_modalities, perceiver_encoder
from experiments.tb import add_video, attention_figure, attention_on_image
from perceiver_policy.introspection import (
    attention_entropy,
    attention_map,
    count_flops,
    modality_balance,
    token_moments,
)
from perceiver_policy.latent_scaling import num_latents, perceiver_encoders
from perceiver_policy.probes import MIN_EPISODES

HISTORY_COLUMNS = ["step", "frames", "return_mean"]
# eval/tasks.csv of a multi-task run: one row per task and evaluation (eval/history.csv holds their pooled mean)
TASK_HISTORY_COLUMNS = ["step", "frames", "task", "return_mean", "normalized_return", "weight"]


def tensorboard_writer(logger):
    for output in logger.output_formats:
        if isinstance(output, TensorBoardOutputFormat):
            return output.writer
    return None


def scaled_latent_choices(model) -> list[int]:
    """The trained numbers of latents of a policy trained with latent_scaling, ascending; [] otherwise."""
    encoders = perceiver_encoders(model)
    return list(encoders[0].config.latent_scaling) if encoders else []


class PeriodicCallback(BaseCallback):
    """Calls `_fire()` whenever `num_timesteps` crosses a multiple of `every` agent steps."""

    def __init__(self, every: int):
        super().__init__()
        self.every = every
        self._next = None

    def _on_training_start(self) -> None:
        self._next = (self.num_timesteps // self.every + 1) * self.every

    def _on_step(self) -> bool:
        if self.every > 0 and self.num_timesteps >= self._next:
            self._next += self.every * max(1, (self.num_timesteps - self._next) // self.every + 1)
            self._fire()
        return True

    def _fire(self) -> None:
        raise NotImplementedError


class EvalCallback(PeriodicCallback):
    """Deterministic episodes every `every` steps: eval/return_mean|std, perf/latency_*, eval video.

    `keep_best`: after each evaluation that beats every earlier one of the run (a resumed run's included: the
    best checkpoint on disk sets the bar), the model goes to RUN/checkpoints/best_<step> (`save_best`);
    eval/best_return logs the bar."""

    def __init__(
        self,
        every,
        task,
        env_kwargs,
        episodes,
        run_dir: Path,
        action_repeat: int,
        video: bool,
        seed: int,
        probe_state: bool = False,
        reliance: bool = False,
        reliance_every: int = 1,
        references: dict[str, float] | None = None,
        task_sampler: str = "uniform",
        tasks: list[str] | None = None,
        keep_best: bool = False,
    ):
        super().__init__(every)
        self.keep_best = keep_best
        best = best_checkpoint(run_dir) if keep_best else None
        self.best_return = float(read_meta(best)["return_mean"]) if best is not None else float("-inf")
        self.reliance, self.reliance_every = reliance, reliance_every
        # Multi-task (env_kwargs['tasks']): each task's reference return; 'active' reweights the training envs' tasks.
        self.references, self.task_sampler, self.tasks = references, task_sampler, tasks
        self.probe_state = probe_state and episodes >= MIN_EPISODES
        self.task, self.env_kwargs, self.episodes = task, env_kwargs, episodes
        self.run_dir, self.action_repeat, self.video, self.seed = run_dir, action_repeat, video, seed
        self.history: list[tuple[int, float]] = []
        self.last_per_task: dict[str, dict] = {}  # multi-task: the latest evaluation's summary per task
        self._total: int | None = None
        self.last_frames: np.ndarray | None = None  # (T, H, W, 3) of the latest evaluation's first episode
        self.seconds = 0.0

    def evaluate_now(self) -> dict:
        """Evaluates with all latents; a policy trained with latent_scaling also at each trained k:
        eval/k<k>/return_mean and perf/k<k>/latency_p95_ms (the largest k is the main evaluation's)."""
        start = time.perf_counter()
        choices = scaled_latent_choices(self.model)
        evaluate = functools.partial(
            evaluate_tasks,
            self.model,
            self.task,
            self.env_kwargs,
            self.episodes,
            seed=self.seed,
            tasks=self.tasks,
        )
        with num_latents(self.model, choices[-1] if choices else None):
            result, per_task = evaluate(
                video=self.video,
                probe_state=self.probe_state,
                # the actor's action layer beside the encoder: does a state the latents carry reach the action?
                probe_features=("encoder", "actor") if has_action_layer(self.model) else ("encoder",),
                reliance=self.reliance,
                reliance_every=self.reliance_every,
                # beside the reliance: where each modality reaches a Perceiver's latents and where it is lost
                modality_path=self.reliance and perceiver_encoder(self.model) is not None,
            )
        summary = result.summary()
        mixer = getattr(self.model, "mixer", None)
        if mixer is not None and mixer.mode == "reliance":
            with num_latents(self.model, choices[-1] if choices else None):
                self._follow_reliance(mixer, summary["return_mean"], evaluate)
        for key, change in (result.reliance or {}).items():
            for measure, value in change.items():  # action, value, greedy; blanked, then resampled
                if np.isfinite(value):
                    self.logger.record(f"perceiver/reliance/{key}/{measure}", value)
        if result.actor_regret is not None and np.isfinite(result.actor_regret):
            self.logger.record("perceiver/reliance/actor_regret", result.actor_regret)
        for key, stages in (result.modality_path or {}).items():
            for stage, value in stages.items():
                if np.isfinite(value):
                    self.logger.record(f"perceiver/path/{key}/{stage}", value)
        for k in choices:
            if k == choices[-1]:
                scaled = summary
            else:
                with num_latents(self.model, k):
                    scaled = evaluate()[0].summary()
            self.logger.record(f"eval/k{k}/return_mean", scaled["return_mean"])
            self.logger.record(f"perf/k{k}/latency_p95_ms", scaled["latency_p95_ms"])
        if per_task:
            self._record_tasks(per_task)
        self._append_history(self.num_timesteps, summary["return_mean"])
        for sensor, r2 in (result.probe or {}).items():
            self.logger.record(f"perceiver/state_probe_r2/{sensor}", r2)
        step = self.num_timesteps
        self.history.append((step, summary["return_mean"]))
        for key in ("return_mean", "return_std", "length_mean"):
            self.logger.record(f"eval/{key}", summary[key])
        self.logger.record("perf/latency_p50_ms", summary["latency_p50_ms"])
        self.logger.record("perf/latency_p95_ms", summary["latency_p95_ms"])
        # perf/stream_cache_hit_rate, perf/stream_window_overlap (Perceiver policies reading a frame stack)
        for key, value in (result.stream or {}).items():
            self.logger.record(f"perf/{key}", value)
        self.logger.record("charts/frames", step * self.action_repeat)
        if self.keep_best and summary["return_mean"] > self.best_return:
            self.best_return = float(summary["return_mean"])
            save_best(self.model, self.run_dir / "checkpoints", step,
                      {"return_mean": self.best_return, "frames": step * self.action_repeat,
                       "episodes": self.episodes, "seed": self.seed, "time": time.time()})  # fmt: skip
        if self.keep_best:
            self.logger.record("eval/best_return", self.best_return)
        writer = tensorboard_writer(self.logger)
        self.last_frames = result.frames
        if result.frames is not None and writer is not None:
            add_video(writer, "eval/video", result.frames, step)
        # the whole evaluation: episodes, reliance probe, the reliance sampler's replays, scaled-latent evaluations
        self.logger.record("perf/eval_seconds", time.perf_counter() - start)
        self.logger.dump(step)
        self.seconds += time.perf_counter() - start
        return summary

    def _follow_reliance(self, mixer, full_return: float, evaluate) -> None:
        """The ``reliance`` modality sampler: the evaluation's episodes (the same starts) with each modality that
        the sampler withholds masked (perceiver/reliance/<key>/return); the share of return each loss costs goes to
        the sampler."""
        drops = {}
        for key in mixer.withholdable_names:  # the others' mask tokens were never trained
            with missing_modalities(self.model, (key,)):
                withheld = evaluate()[0].summary()["return_mean"]
            self.logger.record(f"perceiver/reliance/{key}/return", withheld)
            drops[key] = (full_return - withheld) / max(abs(full_return), 1e-8)
        mixer.follow_reliance(drops)

    def _record_tasks(self, per_task: dict[str, dict]) -> None:
        """Multi-task: eval/<task>/return_mean, the mean normalised score, and the task sampler's weights (the
        active sampler's new weights pushed to the training envs first)."""
        returns = [per_task[t]["return_mean"] for t in per_task]
        references = [self.references[t] for t in per_task]
        for task, ret, ref in zip(per_task, returns, references, strict=True):
            self.logger.record(f"eval/{task}/return_mean", ret)
            self.logger.record(f"eval/{task}/normalized_return", ret / ref)
        self.logger.record("eval/normalized_return_mean", float(np.mean(np.divide(returns, references))))
        if self.task_sampler == "active":
            self.training_env.env_method("set_task_weights", active_task_weights(returns, references))
        weights = self.training_env.get_attr("task_weights", indices=[0])[0]
        trained = list(self.env_kwargs["tasks"])
        replay = getattr(self.model, "replay_buffer", None)
        if getattr(replay, "task_weights", None) is not None:  # the replay follows the sampler (task_replay)
            replay.set_task_weights(weights)
        if getattr(replay, "normalize_task_rewards", False):
            scales = replay.reward_scales()
            for task in per_task:
                self.logger.record(f"multitask/reward_scale/{task}", float(scales[trained.index(task)]))
        for task in per_task:
            self.logger.record(f"multitask/weight/{task}", float(weights[trained.index(task)]))
        step = self.num_timesteps
        self._append_rows(self.task_history_path, TASK_HISTORY_COLUMNS, [
            [step, step * self.action_repeat, task, f"{ret:.3f}", f"{ret / ref:.4f}",
             f"{weights[trained.index(task)]:.4f}"]
            for task, ret, ref in zip(per_task, returns, references, strict=True)
        ])  # fmt: skip
        self.last_per_task = per_task

    @property
    def history_path(self) -> Path:
        return self.run_dir / "eval" / "history.csv"

    @property
    def task_history_path(self) -> Path:
        return self.run_dir / "eval" / "tasks.csv"

    def _append_history(self, step: int, value: float) -> None:
        self._append_rows(
            self.history_path, HISTORY_COLUMNS, [[step, step * self.action_repeat, f"{value:.3f}"]]
        )

    @staticmethod
    def _append_rows(path: Path, columns: list[str], rows: list[list]) -> None:
        """Rows of one evaluation, flushed at once: a killed run keeps every evaluation it made."""
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(columns)
            writer.writerows(rows)
            handle.flush()
            os.fsync(handle.fileno())

    def truncate_history(self, last_step: int) -> None:
        """On --resume: drop rows logged after the checkpoint (as TensorBoard's purge does), atomically, from
        eval/history.csv and a multi-task run's eval/tasks.csv."""
        kept = self._truncate_rows(self.history_path, last_step)
        self.history = [(int(row[0]), float(row[2])) for row in kept[1:]]
        self._truncate_rows(self.task_history_path, last_step)

    @staticmethod
    def _truncate_rows(path: Path, last_step: int) -> list[list[str]]:
        """Keeps the header and the rows of steps up to `last_step`; returns them ([] without the file)."""
        if not path.exists():
            return []
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle))
        kept = [rows[0], *(row for row in rows[1:] if row and int(row[0]) <= last_step)]
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as handle:
            csv.writer(handle).writerows(kept)
        os.replace(tmp, path)
        return kept

    def _on_training_start(self) -> None:
        super()._on_training_start()
        self._total = self.locals.get("total_timesteps")  # SB3's absolute budget of this learn() call

    def _fire(self) -> None:
        # Not in the budget's last steps: the run's final evaluation, of the model after its last update, follows
        # (an evaluation here would see the model before it and label the same step twice).
        if self._total is None or self.num_timesteps < self._total:
            self.evaluate_now()


class PerceiverMetricsCallback(PeriodicCallback):
    """Attention heatmap, modality balance, gates, entropy, Fourier drift, cost and throughput."""

    def __init__(self, every: int, latency_repeats: int = 20):
        super().__init__(every)
        self.latency_repeats = latency_repeats
        self._first_moments: dict[
            str, tuple[float, float]
        ] = {}  # input drift: since this process started (a resumed run starts anew)
        self._cross_attn_gflops: float | None = None
        self._last = None
        self.seconds = 0.0
        self._start = None

    def _on_training_start(self) -> None:
        super()._on_training_start()
        self._last = (time.perf_counter(), self.num_timesteps)
        self._start = time.perf_counter()

    def _fire(self) -> None:
        start = time.perf_counter()
        now, steps = start, self.num_timesteps
        self.logger.record("perf/steps_per_sec", (steps - self._last[1]) / max(now - self._last[0], 1e-9))
        self._last = (now, steps)
        encoder = perceiver_encoder(self.model)
        policy = self.model.policy
        if encoder is not None and self.model._last_obs is not None:
            obs, _ = policy.obs_to_tensor(self.model._last_obs)
            was_training = encoder.training
            encoder.eval()
            encoder.capture_attention = True
            try:
                with torch.no_grad():
                    encoder(obs)
            finally:
                encoder.capture_attention = False
                encoder.train(was_training)
            capture = encoder.last_capture
            for name, share in modality_balance(capture).items():
                self.logger.record(f"perceiver/modality_balance/{name}", share)
            self.logger.record("perceiver/attention_entropy", attention_entropy(capture))
            gates = encoder.cross_attention.gates
            if gates is not None:
                for name, value in zip(encoder.names, gates.mean(0).tolist()):
                    self.logger.record(f"perceiver/gate/{name}", value)
            for name, adapter in encoder.adapters.items():
                if adapter.use_position:  # from the baseline saved with the weights
                    self.logger.record(f"perceiver/fourier_drift/{name}", adapter.position_drift())
            moments = token_moments(capture)
            for name, (mean, std) in moments.items():  # a modality switched on later gets its baseline then
                mean0, std0 = self._first_moments.setdefault(name, (mean, std))
                self.logger.record(f"perceiver/input_drift/{name}", abs(mean - mean0) + abs(std - std0))
            if self._cross_attn_gflops is None:  # analytic and constant for a run
                self._cross_attn_gflops = (
                    count_flops(policy.observation_space, encoder.config)["cross_attn"] / 1e9
                )
            self.logger.record("perf/cross_attn_gflops", self._cross_attn_gflops)
            self._log_heatmap(capture)
            self._log_attention_on_frame(capture, encoder, obs)
            self._log_latency(obs)
        self.logger.record("perf/memory_mb", _peak_memory_mb(self.model.device))
        self.seconds += time.perf_counter() - start
        elapsed = time.perf_counter() - self._start
        self.logger.record("perf/observability_fraction", self.seconds / max(elapsed, 1e-9))

    def _log_heatmap(self, capture: dict) -> None:
        writer = tensorboard_writer(self.logger)
        if writer is None:
            return
        import matplotlib.pyplot as plt

        index = capture["modality_index"].cpu().numpy()
        counts = [int((index == m).sum()) for m in capture["present"]]
        figure = attention_figure(attention_map(capture).cpu().numpy(), capture["names"], counts)
        writer.add_figure("perceiver/attention", figure, self.num_timesteps, close=True)
        plt.close(figure)

    def _log_attention_on_frame(self, capture: dict, encoder, obs: dict) -> None:
        """perceiver/attention_on_frame: where the latents read in each stacked frame of env 0's image."""
        writer = tensorboard_writer(self.logger)
        if writer is None or "pixels" not in obs:
            return
        image = attention_on_image(encoder, capture, obs["pixels"][0])
        if image is None:
            return
        writer.add_image("perceiver/attention_on_frame", image, self.num_timesteps, dataformats="HWC")

    def _log_latency(self, obs: dict) -> None:
        single = {k: v[:1] for k, v in obs.items()}
        policy = self.model.policy
        times = []
        with torch.no_grad():
            for _ in range(self.latency_repeats):
                start = time.perf_counter()
                policy._predict(single, deterministic=True)
                if self.model.device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(1000 * (time.perf_counter() - start))
        self.logger.record("perf/policy_forward_p50_ms", float(np.percentile(times, 50)))
        self.logger.record("perf/policy_forward_p95_ms", float(np.percentile(times, 95)))


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class CheckpointCallback(PeriodicCallback):
    def __init__(
        self, every: int, directory: Path, keep: int, with_replay_buffer: bool, multitask: bool = False
    ):
        """`multitask`: also record the task sampler's weights (asked of the envs only then: a pipelined env
        refuses queries while half of it is stepping)."""
        super().__init__(every)
        self.directory, self.keep, self.with_replay_buffer = directory, keep, with_replay_buffer
        self.multitask = multitask
        self.task_weights: list[float] | None = None

    def sampler_state(self) -> dict:
        """{'modality_mix': ...} of a run with the weighted modality sampler (its active / reliance weights
        survive --resume) and {'task_weights': [...]} of a multi-task run (the active task sampler's weights), as
        the envs report them; the weights last read when they cannot answer (a checkpoint written because a worker
        died, a pipelined half still stepping): the checkpoint itself must never fail on them."""
        mixer = getattr(self.model, "mixer", None)
        state = {"modality_mix": mixer.state()} if mixer is not None else {}
        if not self.multitask:
            return state
        try:
            weights = self.training_env.get_attr("task_weights", indices=[0])[0]
            self.task_weights = [float(w) for w in weights]
        except (EOFError, OSError, ValueError, RuntimeError):
            pass
        return {**state, "task_weights": self.task_weights} if self.task_weights is not None else state

    def save_now(self) -> Path:
        """Checkpoint the current step. At the end of a run this rewrites a periodic checkpoint of the same step on
        purpose: SB3 calls callbacks before it stores the step's transition, so that one lacks it in its replay."""
        return save_checkpoint(
            self.model,
            self.directory,
            self.num_timesteps,
            self.keep,
            self.with_replay_buffer,
            {"time": time.time(), **self.sampler_state()},
        )

    def _fire(self) -> None:
        self.save_now()


class FramesCallback(BaseCallback):
    """charts/frames beside SB3's rollout scalars."""

    def __init__(self, action_repeat: int):
        super().__init__()
        self.action_repeat = action_repeat

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.logger.record("charts/frames", self.num_timesteps * self.action_repeat)
        guard = self.training_env
        while guard is not None and not hasattr(guard, "nonfinite_count"):
            guard = getattr(guard, "venv", None)
        if guard is not None and guard.sanitize:
            self.logger.record("env/nonfinite_count", guard.nonfinite_count)


class TaskReturnsCallback(BaseCallback):
    """Multi-task runs: multitask/train_return/<task> and multitask/train_episodes/<task>, from the training
    episodes that ended (SB3's Monitor puts `episode` in their info; envs.MultiTaskEnv names the task)."""

    def __init__(self):
        super().__init__()
        self.episodes: dict[str, int] = {}

    def _on_step(self) -> bool:
        for info in self.locals.get("infos", ()):
            if "episode" in info and "task" in info:
                task = info["task"]
                self.episodes[task] = self.episodes.get(task, 0) + 1
                self.logger.record_mean(f"multitask/train_return/{task}", float(info["episode"]["r"]))
                self.logger.record(f"multitask/train_episodes/{task}", self.episodes[task])
        return True


class CurriculumCallback(BaseCallback):
    """Starts with a subset of modalities and adds the rest at given steps, via the missing-modality path.

    Switches at rollout boundaries so a PPO rollout and its update always see the same inputs."""

    def __init__(self, stages: list[dict]):
        super().__init__()
        self.stages = sorted(stages, key=lambda s: s["step"])
        self.active: tuple[str, ...] | None = None

    def _on_rollout_start(self) -> None:
        encoder = perceiver_encoder(self.model)
        current = [s for s in self.stages if s["step"] <= self.num_timesteps]
        if encoder is None or not current:
            return
        modalities = tuple(current[-1]["modalities"])
        if modalities != self.active:
            self.active = modalities
            encoder.disabled_modalities = set(encoder.names) - set(modalities)
            for name in encoder.names:
                self.logger.record(f"curriculum/{name}", float(name in modalities))

    def _on_step(self) -> bool:
        return True


class ProgressCallback(BaseCallback):
    """A tqdm bar with steps/s and the latest eval return."""

    def __init__(self, total: int, eval_callback: EvalCallback | None):
        super().__init__()
        self.total, self.eval_callback = total, eval_callback
        self.bar = None

    def _on_training_start(self) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, initial=self.num_timesteps, unit="step", dynamic_ncols=True)

    def _on_step(self) -> bool:
        self.bar.update(self.num_timesteps - self.bar.n)
        if self.eval_callback is not None and self.eval_callback.history:
            self.bar.set_postfix(eval_return=f"{self.eval_callback.history[-1][1]:.1f}", refresh=False)
        return True

    def _on_training_end(self) -> None:
        self.bar.close()
