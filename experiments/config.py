"""One typed config for training runs: dataclass defaults <- YAML preset <- command-line overrides.

CLI flags are the kebab-case forms of the fields (``--total-steps``); dict fields take ``KEY=VALUE`` pairs
(``--perceiver num_latents=64 latent_dim=128``, ``--algo n_steps=512``), values parsed as YAML.

Counting: ``total_steps``, ``eval_freq`` and ``checkpoint_freq`` count *agent steps* summed over envs (SB3's
``num_timesteps``, the TensorBoard x-axis). A preset states its budget and frequencies in *frames*
(``total_frames``, ``eval_every_frames``, ``checkpoint_every_frames`` = agent steps x action repeat, as the DMC
literature counts) and the step counts follow from them; an explicit step flag on the command line wins.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import functools
import inspect
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from agents.factory import (
    ALGORITHMS,
    DRQ_ACTION_REPEAT,
    POLICY_TYPES,
    RECIPES,
    algorithm_class,
    check_recipe,
)
from agents.modality_mix import MIX_MODES, ModalityMixer
from envs.dmc import MODALITIES, TASKS
from envs.multitask import TASK_SAMPLERS, check_tasks, initial_task_weights, parse_task_values
from envs.proprio_modes import PROPRIO_MODES, valid_modes
from envs.rendering import RENDER_BACKENDS
from envs.vec import VEC_ENV_TYPES
from perceiver_policy.config import PerceiverConfig
from perceiver_policy.finetuning import LORA_TARGETS, check_finetune

PRESET_DIR = Path(__file__).parent / "presets"
# A budget or frequency in frames (as presets state them) -> the agent-step field it sets.
FRAME_FIELDS = {
    "total_frames": "total_steps",
    "eval_every_frames": "eval_freq",
    "checkpoint_every_frames": "checkpoint_freq",
}
# Fields renamed since runs were saved: old config.yaml files (and old command lines) still load.
LEGACY_FIELDS = {"modality_dropout": "env_modality_dropout"}
# What `--resume RUN` may change; any other flag given with --resume is refused by name.
RESUME_SAFE_FIELDS = (
    "total_steps", "total_frames", "device", "eval_freq", "eval_every_frames", "eval_episodes", "eval_video",
    "state_probe", "reliance", "reliance_every", "checkpoint_freq", "checkpoint_every_frames", "keep_checkpoints",
    "keep_best", "average_checkpoints", "checkpoint_replay_buffer", "perceiver_log_freq", "progress_bar",
)  # fmt: skip


TASK_REPLAYS = ("auto", "sampler", "transitions")


@dataclass
class TrainConfig:
    """A training run. Every field is a CLI flag (`--field-name`)."""

    preset: str | None = None
    """YAML preset: a name from experiments/presets/ (without .yaml), or a path to a YAML file of these fields
    (e.g. a run's config.yaml: its run_name is dropped, the new run is named after that run's folder); CLI
    flags override it."""
    task: str = "cartpole-balance"
    """DMC task, '<domain>-<task>'."""
    tasks: list[str] = field(default_factory=list)
    """Multi-task: one policy trained on all these DMC tasks at once (envs.multitask: sensor slots, padded actions,
    a task index; SAC with the Perceiver, recipe sb3), e.g. cartpole-swingup walker-walk cheetah-run reacher-easy.
    --task is then the first of them unless it names another. Empty: the single --task."""
    task_sampler: str = "uniform"
    """Multi-task: which task each env plays after a reset. 'uniform'; 'fixed' (--task-weights); 'active' (each
    evaluation moves weight towards the tasks furthest below their reference return: envs.multitask.active_task_weights)."""
    task_weights: str = ""
    """Multi-task, task_sampler 'fixed': 'walker-walk=2 cheetah-run=1' (normalised; an unlisted task gets 0)."""
    task_replay: str = "auto"
    """Multi-task SAC: which task each replay sample comes from. 'sampler' (from states): each batch's samples per
    task follow the task sampler's weights (uniform: equal shares; active: its latest weights;
    agents.replay_buffer.TaskReplayBuffer); 'transitions': uniform over the stored transitions, so the mix follows
    the episodes played; 'auto': 'sampler' from states, 'transitions' with pixels (the frame replay)."""
    task_reward_normalization: bool = False
    """Multi-task SAC from states: give every task's rewards the same spread in each replay batch (each scaled by
    the mean over tasks of their reward std over its own; agents.replay_buffer.TaskReplayBuffer), so a shared critic
    does not fit only the task whose returns are largest."""
    task_references: str = ""
    """Multi-task: each task's reference return, 'walker-walk=900 ...', for the normalised score and the active
    sampler; a task not given takes SAC-from-states at 500k frames (experiments/published/dmc-states.yaml), else 1000."""
    algorithm: str = "ppo"
    """ppo, a2c or sac."""
    policy_type: str = "perceiver"
    """'perceiver'; 'sb3' for SB3's own algorithm with MultiInputPolicy (NatureCNN / MLP, SB3's own recipe); 'lstm'
    for sb3-contrib's RecurrentPPO with MultiInputLstmPolicy (algorithm ppo); 'cnn' (SB3's NatureCNN) or 'drq-cnn'
    (DrQ's encoder) for the shared pixel SAC recipe (--recipe drq), trained exactly as the Perceiver is."""
    recipe: str = "sb3"
    """SAC's training recipe: 'sb3' (SB3's SAC update and defaults; the Perceiver's action-conditioned queries)
    or 'drq' (DrQ's update rule and networks for any encoder: K = M = 2 shifted copies, actor / temperature and
    target every 2 updates, tau 0.01, lr 1e-3, temperature 0.1, 2 x 1024 heads, batch 512; agents.DRQ_DEFAULTS)."""
    modalities: list[str] = field(default_factory=lambda: ["pixels", "proprio", "action_history"])
    """Observation keys the policy reads: camera frames, the body's sensors, past actions (and proprio_history)."""
    image_size: int = 84
    """Side of the square camera image in pixels (84 in the DMC pixel benchmarks)."""
    frame_stack: int = 3
    """Camera frames stacked into one observation (the newest last)."""
    action_repeat: int = 4
    """Simulator steps per agent step (the same action repeated); frames = agent steps x action_repeat. With
    --recipe drq and no value given: DrQ's repeat for the domain (cartpole 8; reacher, cheetah, ball_in_cup 4;
    finger, walker 2)."""
    action_history_len: int = 8
    """Past actions in the action_history modality."""
    proprio: str = "full"
    """What proprio senses: 'full' (dm_control's whole observation), 'robot' (the agent's body only: the world
    must be seen) or 'positions' (no velocities); see the README's table and envs/proprio_modes.py."""
    proprio_history_len: int = 8
    """Readings in the proprio_history modality (add 'proprio_history' to --modalities)."""
    aux_state_weight: float = 0.0
    """Weight of the state-decoding loss: output queries decode the privileged full state from the latents
    (SAC: on the critic's batch; PPO/A2C: in each minibatch). 0 = off; > 0 gives the training envs the state."""
    render_backend: str = "fast"
    """Camera renderer: 'fast' (MuJoCo's Renderer, reused) or 'dm_control' (dm_control's physics.render, with
    shadows and skybox)."""
    n_envs: int = 4
    """Environments stepped in parallel (one vector env)."""
    vec_env: str = "dummy"
    """'dummy' (in-process), 'subproc' (one process per env) or 'pipelined' (subproc stepped in two halves, each
    half's policy forward overlapping the other half's env step; PPO/A2C with the Perceiver policy)."""
    env_modality_dropout: float = 0.0
    """Training envs mark each modality absent with this probability per step (envs.wrappers.ModalityDropout):
    robustness to missing sensors, PPO-safe because the flags are part of the observation. Eval envs: none."""
    modality_mix: str = ""
    """A weighted modality sampler (the Perceiver policy). Each training sample is trained with one modality subset,
    e.g. 'all=0.5 pixels+action_history=0.3 proprio+action_history=0.2' (weights normalised; 'all' = every
    modality); the others are withheld (masked per PerceiverConfig.missing_tokens): SAC in the critic, target and
    actor passes alike; PPO/A2C in each rollout sample's update, with PPO's old log-probabilities recomputed under
    the same masks. Acting and evaluation see every modality. Empty: off. See agents/modality_mix.py."""
    modality_mix_mode: str = "fixed"
    """How the modality_mix weights move: 'fixed'; 'curriculum' (stages by frames: '0: all=1; 50000: all=0.5
    pixels+action_history=0.5', interpolated); 'active' (towards the subsets with the larger critic error: TD
    error for SAC, value error for PPO / A2C); 'reliance' (at each evaluation the episodes are replayed with each
    modality that some subset withholds masked; subsets that withhold the modalities whose loss costs the most
    return are drawn more: perceiver/reliance/<key>/return; each evaluation then costs 1 + that many times the
    episodes)."""
    sanitize_nonfinite: bool = False
    """NaN / inf in an observation or reward stop the run with a named error (default); with this flag they are
    replaced by 0 and counted (env/nonfinite_count)."""
    normalize_reward: bool = True
    """PPO/A2C: scale rewards by a running std of discounted returns (SB3 VecNormalize, rewards only). DMC returns reach
    1000 per episode: unscaled, the value loss dominates PPO's clipped gradient and the policy does not learn.
    The statistics are saved in checkpoints and restored on --resume; evaluation reports raw returns."""
    device: str = "auto"
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    seed: int = 0
    """Seed of the networks, the training envs (seed, seed + 1, ...) and the evaluations (10000 + seed)."""
    total_steps: int = 100_000
    """Agent steps summed over envs (SB3 timesteps)."""
    total_frames: int | None = None
    """If set, total_steps = ceil(total_frames / action_repeat)."""
    eval_freq: int = 10_000
    """Agent steps between evaluations."""
    eval_every_frames: int | None = None
    """If set, eval_freq = ceil(eval_every_frames / action_repeat) (presets state frequencies in frames)."""
    eval_episodes: int = 5
    """Episodes per evaluation (deterministic actions)."""
    eval_video: bool = True
    """Write an mp4 of the first episode of each evaluation to RUN/eval/."""
    state_probe: bool = True
    """At each evaluation, fit a linear probe from the policy's features (Perceiver latents, SB3 extractor output,
    LSTM state) to the privileged state on half the episodes, score R² on the rest: perceiver/state_probe_r2/<sensor>,
    and <sensor>_sensed / <sensor>_unsensed for a sensor the proprio mode keeps in part; the same from the input of
    the actor's action layer: perceiver/state_probe_r2/actor/<sensor> (does a state the latents carry reach the
    action?).
    Needs eval_episodes >= 4 (skipped otherwise)."""
    reliance: bool = True
    """At each evaluation, the causal reliance on each modality (experiments.evaluation.RelianceProbe): how much
    the deterministic action, the value and (SAC) the critic's greedy action change when it is withheld:
    perceiver/reliance/<key>/action|value|greedy, and the same with the key resampled from an earlier evaluation
    episode's state (<measure>_resampled; 2 episodes or more), and (SAC) perceiver/reliance/actor_regret. Costs
    1 + 2 x (number of modalities) extra policy passes per probed step, twice the 2 x from the second episode, the value and the greedy action sharing one critic pass (a small pixel SAC policy with three
    modalities: a whole 32-step run with one 4-episode evaluation took 71 s with it, 30 s without, on a 2-core
    host, perceiver-rl 0.8.3); false skips it. `reliance_every` thins the probed states."""
    reliance_every: int = 4
    """The reliance probe of the training evaluations reads every k-th evaluation step (from the first): a
    four-task generalist's evaluation took 4.7x the time of one without the probe when every step was probed
    (docs/results.md, "Evaluation cost"); with k = 4 the probe still averages over a quarter of the states.
    `python -m experiments.evaluate --reliance` probes every step unless given `--reliance-every`."""
    checkpoint_freq: int = 10_000
    """Agent steps between checkpoints."""
    checkpoint_every_frames: int | None = None
    """If set, checkpoint_freq = ceil(checkpoint_every_frames / action_repeat)."""
    keep_checkpoints: int = 3
    """Most recent checkpoints kept on disk (older ones are deleted)."""
    keep_best: bool = True
    """Also keep the policy of the best evaluation so far in RUN/checkpoints/best_<step> (model and its return;
    not for --resume): a policy that swings late in training is not lost. It is chosen on the training
    evaluations' episodes, so its return there is optimistic: `python -m experiments.evaluate RUN --best --seed
    20000` scores it on fresh ones."""
    average_checkpoints: int = 0
    """At the end of the run, average the policy weights of the newest K kept checkpoints (the final one among
    them) into RUN/checkpoints/average_<step> (`python -m experiments.average`), evaluate that policy on the final
    evaluation's episodes and report it beside the final evaluation (`eval/average_return`). 0: off; else at least
    2 and at most keep_checkpoints."""
    checkpoint_replay_buffer: bool = True
    """SAC: store the replay buffer in checkpoints so --resume continues with it (large for pixels)."""
    perceiver_log_freq: int = 5_000
    """Agent steps between attention / modality-balance / latency logs (0 disables)."""
    run_dir: str = "runs"
    """Folder that holds the run directories."""
    run_name: str | None = None
    """Default: '<preset or task>-<algorithm>-s<seed>-<time>'."""
    progress_bar: bool = True
    """Show a progress bar (tqdm / rich) while training."""
    perceiver: dict = field(default_factory=dict)
    """PerceiverConfig fields (perceiver_policy/config.py documents each), e.g. num_latents=64 latent_dim=128
    pixel_tokenizer=conv missing_tokens=mask dtype=bfloat16; an unknown name is refused with the valid ones."""
    algo: dict = field(default_factory=dict)
    """Keyword overrides for the SB3 algorithm (learning_rate, n_steps, batch_size, buffer_size, ...; for the DrQ
    recipe also target_augmentations, critic_augmentations, actor_update_interval, lr_warmup and
    target_encoder=copy|online: what reads next_obs for the critic target, DrQ's encoder copy or DrQ-v2's online
    encoder)."""
    policy: dict = field(default_factory=dict)
    """Extra policy_kwargs (e.g. log_std_mode; for the DrQ recipe feature_dim, hidden_dim, readout=query|flat,
    center_features=none|running|reference, center_momentum, conv_dtype=float32|bfloat16 for cnn / drq-cnn,
    critic_head=mlp|queries for the Perceiver: DrQ's MLP, or SB3's recipe's action queries over the latents,
    encoder_lr_scale: the encoder's learning rate over the critic's, 1 by default)."""
    curriculum: list = field(default_factory=list)
    """Optional [{'step': N, 'modalities': [...]}, ...]: from agent step N the model reads only those."""
    init_from: str | None = None
    """Transfer: a run directory (or one of its checkpoints) whose policy weights start this run. Tensors whose
    names and shapes agree are copied; the rest (an action head for another action space) stays freshly
    initialised. Same algorithm and policy type as the source."""
    finetune: str = "all"
    """What trains: 'all'; 'output-queries' (encoder frozen: output queries, decoders and heads train); 'lora'
    (as output-queries, plus LoRA adapters on the encoder's attention / MLP layers). Perceiver policies."""
    lora_rank: int = 8
    """Rank of the LoRA adapters (--finetune lora)."""
    lora_alpha: float | None = None
    """LoRA scale numerator (default 2 x rank: adapters scaled by alpha / rank = 2)."""
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Encoder layers that get LoRA adapters: any of q, kv, qkv, out, mlp."""

    def __post_init__(self) -> None:
        self.modalities = list(self.modalities)
        self.tasks = list(self.tasks)
        if self.tasks and self.task not in self.tasks:  # a multi-task run's --task: the first of its tasks
            self.task = self.tasks[0]
        self.sync_frames()

    def sync_frames(self) -> None:
        """Step counts from the frame fields that are set (frames / action repeat, rounded up)."""
        for frames, steps in FRAME_FIELDS.items():
            if getattr(self, frames) is not None:
                setattr(self, steps, math.ceil(getattr(self, frames) / self.action_repeat))

    def apply_resume_flags(self, given: dict) -> list[str]:
        """Apply the flags given with --resume that may change a run; the rest is refused by name."""
        refused = sorted(set(given) - set(RESUME_SAFE_FIELDS))
        if refused:
            flags = ", ".join("--" + name.replace("_", "-") for name in refused)
            safe = ", ".join("--" + name.replace("_", "-") for name in RESUME_SAFE_FIELDS)
            raise ValueError(
                f"--resume continues a run with the settings it was trained with; cannot change {flags} "
                f"(start a new run instead). Flags that --resume applies: {safe}"
            )
        for name, value in given.items():
            setattr(self, name, value)
        for frames, steps in FRAME_FIELDS.items():
            if steps in given and frames not in given:
                setattr(self, frames, None)  # an explicit step count wins over the run's frames
        self.sync_frames()
        self.validate()
        return sorted(given)

    def validate(self) -> None:
        choices = {
            "task": TASKS,
            "algorithm": ALGORITHMS,
            "policy_type": POLICY_TYPES,
            "recipe": RECIPES,
            "render_backend": RENDER_BACKENDS,
            "vec_env": VEC_ENV_TYPES,
            "modality_mix_mode": MIX_MODES,
            "task_sampler": TASK_SAMPLERS,
            "task_replay": TASK_REPLAYS,
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                shown = list(valid) if len(valid) < 12 else sorted(valid)
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; valid choices: {shown}")
        bad = [m for m in self.modalities if m not in MODALITIES]
        if bad or not self.modalities:
            raise ValueError(
                f"unknown modalities {bad or self.modalities}; valid choices: {list(MODALITIES)}"
            )
        for name in FRAME_FIELDS:  # named as given, before the step counts they set
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in (
            "image_size",
            "frame_stack",
            "action_repeat",
            "action_history_len",
            "proprio_history_len",
            "n_envs",
            "total_steps",
            "eval_episodes",
            "eval_freq",
            "checkpoint_freq",
            "keep_checkpoints",
            "reliance_every",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.average_checkpoints, int) or not (
            self.average_checkpoints == 0 or 2 <= self.average_checkpoints <= self.keep_checkpoints
        ):
            raise ValueError(
                f"average_checkpoints must be 0 (off) or between 2 and keep_checkpoints ({self.keep_checkpoints}), "
                f"got {self.average_checkpoints!r}"
            )
        PerceiverConfig.from_dict(self.perceiver)  # names bad Perceiver fields
        algorithm_class(self.algorithm, self.policy_type)  # e.g. 'lstm' is PPO only
        check_recipe(self.algorithm, self.policy_type, self.recipe)
        if self.proprio not in PROPRIO_MODES:
            raise ValueError(f"unknown proprio {self.proprio!r}; valid choices: {list(PROPRIO_MODES)}")
        domain = self.task.split("-", 1)[0]
        if self.proprio not in valid_modes(domain):
            raise ValueError(
                f"proprio {self.proprio!r} is not defined for {self.task}; valid choices: {list(valid_modes(domain))}"
            )
        if not self.aux_state_weight >= 0.0:
            raise ValueError(f"aux_state_weight must be >= 0, got {self.aux_state_weight!r}")
        if self.aux_state_weight > 0 and self.policy_type != "perceiver":
            raise ValueError(
                f"aux_state_weight needs policy_type 'perceiver' (its state-decoding queries), got {self.policy_type!r}"
            )
        if self.tasks:
            self.validate_tasks()
        check_finetune(self.finetune_spec())  # names a bad mode, rank or target
        if self.finetune != "all" and self.policy_type != "perceiver":
            raise ValueError(
                f"finetune {self.finetune!r} needs policy_type 'perceiver', got {self.policy_type!r}"
            )
        if self.finetune != "all" and self.recipe != "sb3":
            raise ValueError(
                f"finetune {self.finetune!r} trains the policies of recipe 'sb3', got recipe {self.recipe!r} "
                "(DrQ's policy has no output-query / LoRA fine-tuning)"
            )
        if self.finetune != "all" and not self.init_from:
            raise ValueError(
                f"finetune {self.finetune!r} freezes the encoder: give the trained run with --init-from"
            )
        if not 0.0 <= self.env_modality_dropout < 1.0:
            raise ValueError(f"env_modality_dropout must be in [0, 1), got {self.env_modality_dropout!r}")
        if (
            self.policy_type != "perceiver"
        ):  # what only the Perceiver honours is refused, never silently ignored
            if self.env_modality_dropout > 0:
                raise ValueError(
                    f"env_modality_dropout needs policy_type 'perceiver' (it masks the dropped modality's tokens); "
                    f"policy_type {self.policy_type!r} would still read the dropped data"
                )
            if self.curriculum:
                raise ValueError(
                    f"curriculum needs policy_type 'perceiver' (it switches the encoder's modalities); got "
                    f"{self.policy_type!r}"
                )
        if self.modality_mix:
            if self.policy_type != "perceiver":
                raise ValueError(
                    f"modality_mix withholds modalities inside the Perceiver: it needs policy_type 'perceiver', got "
                    f"{self.policy_type!r} (for other policies use env_modality_dropout, which feeds zeros)"
                )
            mixer = ModalityMixer(self.modality_mix, self.modality_mix_mode, tuple(self.modalities))
            if self.modality_mix_mode == "reliance" and not mixer.withholdable_names:
                raise ValueError(
                    f"modality_mix_mode 'reliance' moves weight between subsets that withhold modalities; "
                    f"{self.modality_mix!r} has none (e.g. 'all=0.5 pixels+action_history=0.5')"
                )
        self.validate_centering()
        self.validate_conv_dtype()
        self.validate_critic_head()
        self.validate_target_encoder()
        self.validate_encoder_lr_scale()
        for stage in self.curriculum:
            if not isinstance(stage, dict) or set(stage) != {"step", "modalities"}:
                raise ValueError(f"curriculum stages are {{'step': N, 'modalities': [...]}}, got {stage!r}")
            extra = [m for m in stage["modalities"] if m not in self.modalities]
            if extra:
                raise ValueError(
                    f"curriculum modality {extra} not among the run's modalities {self.modalities}"
                )

    @property
    def multitask(self) -> bool:
        return bool(self.tasks)

    def validate_centering(self) -> None:
        """`--policy center_features=...`: a known choice the run's policy has. 'running' is a statistic of the DrQ
        recipe's readouts; 'reference' centres the Perceiver's latents under any recipe and algorithm, but not
        a multi-task run's (one reference observation is one body's)."""
        if "center_features" not in self.policy:
            return
        from perceiver_policy.config import centering_mode

        mode = centering_mode(self.policy["center_features"])
        drq = self.algorithm == "sac" and self.recipe == "drq"
        where = f"sac with recipe {self.recipe!r}" if self.algorithm == "sac" else self.algorithm
        if mode == "running" and not drq:
            raise ValueError(
                f"center_features {self.policy['center_features']!r} (a running mean) is a setting of the DrQ "
                f"recipe's readouts; {where} takes 'reference' or 'none' (or use --algorithm sac --recipe drq)"
            )
        if self.policy_type != "perceiver" and (mode == "reference" or not drq):
            raise ValueError(
                f"center_features {self.policy['center_features']!r} is for the Perceiver's latents; policy_type "
                f"{self.policy_type!r} takes " + ("'running' or 'none'" if drq else "no center_features")
            )
        if mode == "reference" and self.multitask:
            raise ValueError(
                "center_features 'reference' centres one body's latents on one reference observation; a multi-task "
                f"run ({' '.join(self.tasks)}) takes 'none'"
            )

    def drq_option(self, options: dict, name: str, choices, elsewhere: str):
        """The value of a DrQ-recipe setting `name` in `options` (self.policy or self.algo), checked against
        `choices` and refused outside `--algorithm sac --recipe drq` with `elsewhere` (what other recipes do);
        None when unset."""
        if name not in options:
            return None
        value = options[name]
        if value not in choices:
            raise ValueError(f"{name} {value!r} is not one of {list(choices)}")
        if (self.algorithm, self.recipe) != ("sac", "drq"):
            raise ValueError(
                f"{name} is a setting of the DrQ recipe (--algorithm sac --recipe drq), got algorithm "
                f"{self.algorithm!r}, recipe {self.recipe!r} ({elsewhere})"
            )
        return value

    def validate_conv_dtype(self) -> None:
        """`--policy conv_dtype=bfloat16`: the precision of the DrQ recipe's conv encoders (cnn, drq-cnn)."""
        from agents.encoders import CONV_DTYPES

        elsewhere = "the Perceiver's precision is --perceiver dtype=bfloat16"
        if self.drq_option(self.policy, "conv_dtype", CONV_DTYPES, elsewhere) is None:
            return
        if self.policy_type not in ("cnn", "drq-cnn"):
            raise ValueError(
                f"conv_dtype sets the precision of the DrQ recipe's conv encoders (--policy-type cnn | drq-cnn), "
                f"got policy_type {self.policy_type!r}; {elsewhere}"
            )

    def validate_critic_head(self) -> None:
        """`--policy critic_head=queries`: the DrQ recipe's Perceiver critic read by action queries (`CRITIC_HEADS`)."""
        from agents.drq_policy import CRITIC_HEADS

        elsewhere = "SB3's recipe's Perceiver critic is 'queries' already"
        value = self.drq_option(self.policy, "critic_head", CRITIC_HEADS, elsewhere)
        if value not in (None, "mlp") and self.policy_type != "perceiver":
            raise ValueError(f"critic_head {value!r} reads the Perceiver's latents; policy_type "
                             f"{self.policy_type!r} takes 'mlp'")  # fmt: skip

    def validate_target_encoder(self) -> None:
        """`--algo target_encoder=copy|online`: DrQ's target critic reads its encoder copy or the online encoder."""
        from agents.sac import TARGET_ENCODERS

        elsewhere = "SB3's recipe's target always reads the online encoder"
        self.drq_option(self.algo, "target_encoder", TARGET_ENCODERS, elsewhere)

    def validate_encoder_lr_scale(self) -> None:
        """`--policy encoder_lr_scale=S`: the DrQ recipe's encoder learns at S x the critic's learning rate."""
        from agents.drq_policy import check_encoder_lr_scale

        if "encoder_lr_scale" not in self.policy:
            return
        check_encoder_lr_scale(self.policy["encoder_lr_scale"])
        if (self.algorithm, self.recipe) != ("sac", "drq"):
            raise ValueError(
                f"encoder_lr_scale is a setting of the DrQ recipe (--algorithm sac --recipe drq), got algorithm "
                f"{self.algorithm!r}, recipe {self.recipe!r} (the other recipes train the encoder at the policy's "
                f"learning rate)"
            )

    def validate_tasks(self) -> None:
        """Multi-task runs: known, distinct tasks, SAC with the Perceiver (SB3 recipe), no privileged state."""
        check_tasks(self.tasks)
        for task in self.tasks:
            if self.proprio not in valid_modes(task.split("-", 1)[0]):
                raise ValueError(
                    f"proprio {self.proprio!r} is not defined for {task}; valid choices: {list(valid_modes(task.split('-', 1)[0]))}"
                )
        if (self.algorithm, self.policy_type, self.recipe) != ("sac", "perceiver", "sb3"):
            raise ValueError(
                f"--tasks trains SAC with policy_type 'perceiver' and recipe 'sb3' (per-actuator queries keep padded "
                f"actions out of the log-probabilities and Q); got algorithm {self.algorithm!r}, policy_type "
                f"{self.policy_type!r}, recipe {self.recipe!r}"
            )
        if self.aux_state_weight > 0 or self.modality_mix or self.env_modality_dropout > 0 or self.curriculum:
            raise ValueError(
                "--tasks does not combine with aux_state_weight (the privileged state differs per body), "
                "modality_mix, env_modality_dropout or curriculum"
            )
        initial_task_weights(self.tasks, self.task_sampler, self.task_weights or None)
        if "pixels" in self.modalities and self.task_reward_normalization:
            raise ValueError(
                "task_reward_normalization scales rewards in the replay of multi-task runs from states; pixel runs "
                "use the frame replay (set it to false)"
            )
        if "pixels" in self.modalities and self.task_replay == "sampler":
            raise ValueError(
                "task_replay 'sampler' weights the replay of multi-task runs from states; pixel runs replay stored "
                "transitions uniformly (valid choices with pixels: 'auto', 'transitions')"
            )
        self.references()

    def replay_follows_sampler(self) -> bool:
        """Whether a multi-task run's replay draws each batch's tasks by the task sampler's weights."""
        return self.multitask and self.task_replay != "transitions" and "pixels" not in self.modalities

    def eval_tasks(self) -> list[str]:
        """The tasks evaluations report: a multi-task run's tasks with a sampling weight (task_sampler 'fixed'
        gives 0 to unlisted ones: a generalist fine-tuned to one task evaluates that task), else all of them."""
        if not self.tasks:
            return [self.task]
        if self.task_sampler != "fixed":
            return list(self.tasks)
        weights = initial_task_weights(self.tasks, "fixed", self.task_weights or None)
        return [t for t, w in zip(self.tasks, weights, strict=True) if w > 0]

    def references(self) -> dict[str, float]:
        """Each training task's reference return (task_references, else the published SAC-from-states value)."""
        given = parse_task_values(self.task_references, self.tasks, "task_references")
        published = published_references()
        return {t: float(given.get(t, published.get(t, 1000.0))) for t in self.tasks}

    def finetune_spec(self) -> dict:
        """The policy's `finetune` argument (perceiver_policy.finetuning)."""
        spec = {"mode": self.finetune, "lora_rank": self.lora_rank, "lora_targets": list(self.lora_targets)}
        return spec if self.lora_alpha is None else {**spec, "lora_alpha": self.lora_alpha}

    def env_kwargs(self, privileged_state: bool = False) -> dict:
        """Keyword arguments of `envs.DMCEnv` (multi-task: and the `tasks` of `envs.MultiTaskEnv`); the privileged
        state only where a loss or probe reads it."""
        return {
            **({"tasks": tuple(self.tasks)} if self.tasks else {}),
            "modalities": tuple(self.modalities),
            "image_size": self.image_size,
            "frame_stack": self.frame_stack,
            "action_repeat": self.action_repeat,
            "action_history_len": self.action_history_len,
            "proprio": self.proprio,
            "proprio_history_len": self.proprio_history_len,
            "privileged_state": privileged_state,
            "render_backend": self.render_backend,
        }

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PUBLISHED_STATES = Path(__file__).parent / "published" / "dmc-states.yaml"


@functools.lru_cache(maxsize=1)
def published_references() -> dict[str, float]:
    """SAC from states at 500k frames per task (experiments/published/dmc-states.yaml, the 'SAC-state' rows)."""
    data = load_yaml(PUBLISHED_STATES.read_text()) or {}
    return {
        task: float(rows["SAC-state 500k"]["mean"]) for task, rows in data.items() if "SAC-state 500k" in rows
    }


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


PRESET_FILE_SUFFIXES = (".yaml", ".yml")


def is_preset_file(name: str) -> bool:
    """A preset given as a file of TrainConfig fields (a path ending in .yaml / .yml) rather than by name."""
    return name.endswith(PRESET_FILE_SUFFIXES)


def load_preset(name: str) -> dict:
    """A preset by name (experiments/presets/<name>.yaml) or a YAML file of TrainConfig fields, e.g. a copy of a
    run's config.yaml. A file's `run_name` is dropped: a run's name says which run it is, not how to train one,
    so a copied config starts a new run (`--run-name` to name it) instead of meeting the old one's folder."""
    if is_preset_file(name):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ValueError(
                f"preset file {name!r} not found; give a YAML file of TrainConfig fields (a run's config.yaml "
                f"will do) or a preset name: {list_presets()}"
            )
    else:
        path = PRESET_DIR / f"{name}.yaml"
        if not path.exists():
            raise ValueError(
                f"unknown preset {name!r}; valid choices: {list_presets()}, or a path to a YAML file ending in "
                f"{' / '.join(PRESET_FILE_SUFFIXES)}"
            )
    values = load_yaml(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(
            f"preset {name!r} must be a mapping of TrainConfig fields (field: value), got {type(values).__name__}"
        )
    if is_preset_file(name):
        values.pop("run_name", None)
    return values


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: ``3e-4`` and ``1E5`` are numbers, not strings (YAML 1.1,
    which PyYAML follows, needs a dot: ``3.0e-4``), so ``--algo learning_rate=3e-4`` means what it says."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str):
    """Parse a YAML document or scalar (config files, ``KEY=VALUE`` values) with YAML 1.2's float syntax."""
    return copy.deepcopy(_parse_yaml(text))  # a copy: callers change what they get


@functools.lru_cache(maxsize=1024)
def _parse_yaml(text: str):
    """A sweep resolves thousands of trials from a few presets and values: each text is parsed once."""
    return yaml.load(text, Loader=_Loader)


def from_dict(values: dict) -> TrainConfig:
    values = {LEGACY_FIELDS.get(k, k): v for k, v in values.items()}
    unknown = sorted(set(values) - set(_fields()))
    if unknown:
        raise ValueError(f"unknown config fields {unknown}; valid fields: {sorted(_fields())}")
    return TrainConfig(**values)


def _key_values(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        out[key.replace("-", "_")] = load_yaml(value)
    return out


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


@functools.lru_cache(maxsize=1)
def field_docs() -> dict[str, str]:
    """Each TrainConfig field's docstring (the string literal under its annotation), whitespace folded."""
    tree = ast.parse(inspect.getsource(TrainConfig))
    body, docs = tree.body[0].body, {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr):
            if isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def field_choices() -> dict[str, list]:
    """The valid values of the fields that have a fixed set (shown in --help; validate() enforces them)."""
    return {
        "algorithm": list(ALGORITHMS),
        "policy_type": list(POLICY_TYPES),
        "recipe": list(RECIPES),
        "proprio": list(PROPRIO_MODES),
        "render_backend": list(RENDER_BACKENDS),
        "vec_env": list(VEC_ENV_TYPES),
        "modality_mix_mode": list(MIX_MODES),
        "task_sampler": list(TASK_SAMPLERS),
        "task_replay": list(TASK_REPLAYS),
        "finetune": ["all", "output-queries", "lora"],
        "preset": list_presets(),
    }


def field_help(name: str, default) -> str:
    """One help line per flag: the field's docstring, its choices, its default (argparse's '%' escaped)."""
    text = field_docs().get(name, "")
    choices = field_choices().get(name)
    if choices:
        text += f" Choices: {'|'.join(map(str, choices))}."
    if name == "task":
        text += f" One of {len(TASKS)} DMC tasks, e.g. cartpole-swingup, walker-walk."
    text += f" (default: {default})"
    return text.strip().replace("%", "%%")


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    hints = typing.get_type_hints(TrainConfig)
    for name, f in _fields().items():
        flag = "--" + name.replace("_", "-")
        kind = hints[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = field_help(name, default)
        if kind is bool:
            parser.add_argument(
                flag, type=_parse_bool, nargs="?", const=True, default=None, metavar="BOOL", help=help_text
            )
        elif name in ("modalities", "lora_targets"):
            valid = list(MODALITIES) if name == "modalities" else list(LORA_TARGETS)
            parser.add_argument(
                flag, nargs="+", default=None, metavar="NAME", help=f"Any of {'|'.join(valid)}. {help_text}"
            )
        elif name == "tasks":
            parser.add_argument(flag, nargs="+", default=None, metavar="TASK", help=help_text)
        elif kind is dict:
            parser.add_argument(flag, nargs="+", default=None, metavar="KEY=VALUE", help=help_text)
        elif name == "curriculum":
            parser.add_argument(
                flag,
                default=None,
                metavar="YAML",
                help=help_text + ' E.g. "[{step: 0, modalities: [proprio]}]".',
            )
        else:
            base = int if kind in (int, int | None) else float if kind in (float, float | None) else str
            parser.add_argument(flag, type=base, default=None, help=help_text)
    # Renamed flags keep working (LEGACY_FIELDS).
    parser.add_argument("--modality-dropout", dest="env_modality_dropout", type=float, help=argparse.SUPPRESS)
    return parser


def given_fields(args: argparse.Namespace) -> dict:
    """The TrainConfig fields set explicitly on the command line (dict fields parsed), preset excluded."""
    given = {}
    for name, f in _fields().items():
        value = getattr(args, name, None)
        if value is None or name == "preset":
            continue
        if f.type in ("dict", dict):
            value = _key_values(value)
        elif name == "curriculum":
            value = load_yaml(value)
        given[name] = value
    return given


def resolve(args: argparse.Namespace) -> TrainConfig:
    """dataclass defaults <- preset <- explicit CLI flags."""
    values: dict = {}
    if args.preset:
        values.update(load_preset(args.preset))
        values["preset"] = args.preset
    given = given_fields(args)
    policy_type = given.get("policy_type", values.get("policy_type", TrainConfig.policy_type))
    if policy_type != "perceiver":
        if given.get("perceiver"):  # the preset's Perceiver is dropped; options the user typed are refused
            raise ValueError(
                f"--perceiver {' '.join(f'{k}={v}' for k, v in given['perceiver'].items())} configures the Perceiver; "
                f"policy_type {policy_type!r} has none"
            )
        values.pop("perceiver", None)
    for name, value in given.items():
        values[name] = {**values.get(name, {}), **value} if isinstance(value, dict) else value
    for frames, steps in FRAME_FIELDS.items():
        if getattr(args, steps, None) is not None:
            values[frames] = None  # an explicit step count wins over the preset's frames
    if values.get("recipe") == "drq" and "action_repeat" not in values:  # DrQ's repeat for the domain
        domain = str(values.get("task", TrainConfig.task)).split("-", 1)[0]
        if domain in DRQ_ACTION_REPEAT:
            values["action_repeat"] = DRQ_ACTION_REPEAT[domain]
    config = from_dict(values)
    config.validate()
    return config


def save(config: TrainConfig, path: Path) -> None:
    """Written to a temporary file and renamed: a crash mid-write never leaves a truncated config.yaml."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    os.replace(tmp, path)


def load(path: Path) -> TrainConfig:
    return from_dict(load_yaml(Path(path).read_text()))
