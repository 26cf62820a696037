"""Build a ready SB3 algorithm for an env and an algorithm name: the place presets resolve to."""

from __future__ import annotations

import copy
import inspect
import warnings

import torch
from gymnasium import spaces
from sb3_contrib import RecurrentPPO
from stable_baselines3 import A2C, PPO, SAC
from stable_baselines3.common.base_class import BaseAlgorithm

from agents.baselines import ObservationExtractor
from agents.drq_policy import DrQSACPolicy
from agents.on_policy import PerceiverA2C, PerceiverPPO
from agents.replay_buffer import FrameReplayBuffer, TaskReplayBuffer
from agents.sac import PerceiverSAC
from perceiver_policy.config import PerceiverConfig
from perceiver_policy.modalities import TASK_KEY
from perceiver_policy.model import cpu_has_native_bf16
from perceiver_policy.policies import PerceiverActorCriticPolicy
from perceiver_policy.sac_policy import PerceiverSACPolicy

ALGORITHMS = ("ppo", "a2c", "sac")
POLICY_TYPES = ("perceiver", "sb3", "lstm", "cnn", "drq-cnn")
# Encoders of the shared pixel SAC recipe (agents/encoders.py): trained by `PerceiverSAC` with `DrQSACPolicy`.
SAC_ENCODER_TYPES = ("cnn", "drq-cnn")
RECIPES = ("sb3", "drq")

# Sensible defaults per algorithm for DMC with the lean Perceiver (override any of them by keyword).
DEFAULTS: dict[str, dict] = {
    "ppo": {
        "learning_rate": 3e-4,
        "n_steps": 256,
        "batch_size": 128,
        "n_epochs": 5,
        "gamma": 0.99,
        "gae_lambda": 0.95,
        "clip_range": 0.2,
        "ent_coef": 0.0,
        "max_grad_norm": 0.5,
    },
    "a2c": {"learning_rate": 7e-4, "n_steps": 16, "gamma": 0.99, "gae_lambda": 0.95, "max_grad_norm": 0.5},
    "sac": {
        "learning_rate": 3e-4,
        "buffer_size": 100_000,
        "learning_starts": 1_000,
        "batch_size": 256,
        "tau": 0.01,
        "gamma": 0.99,
        "train_freq": 1,
        "gradient_steps": 1,
    },
}

# DrQ's recipe (denisyarats/drq, config.yaml and drq.py), `recipe="drq"`; each value can be overridden by keyword.
# The paper's batch is 512 ("use a batch size of 512 to reproduce the results in the paper"; the repository's
# default is 128). SB3's `learning_starts` plays DrQ's `num_seed_steps` (random actions, no updates).
DRQ_DEFAULTS: dict = {
    "learning_rate": 1e-3,  # lr: actor, critic and temperature
    "buffer_size": 100_000,  # replay_buffer_capacity
    "learning_starts": 1_000,  # num_seed_steps
    "batch_size": 512,  # the paper's batch
    "tau": 0.01,  # critic_tau
    "target_update_interval": 2,  # critic_target_update_frequency
    "actor_update_interval": 2,  # actor_update_frequency (actor and temperature)
    "target_augmentations": 2,  # K: target_Q averaged over next_obs and next_obs_aug
    "critic_augmentations": 2,  # M: critic loss on obs and obs_aug
    "ent_coef": "auto_0.1",  # init_temperature 0.1, learned; target entropy -|A|
    "gamma": 0.99,  # discount
    "train_freq": 1,  # one update per agent step (num_train_iters 1)
    "gradient_steps": 1,
}  # DrQ's image_pad 4 (replicate-pad, random crop back) is PerceiverSAC's default augment_pad
# DrQ's policy (config.yaml: encoder feature_dim 50; actor / critic hidden_dim 1024, hidden_depth 2; actor
# log_std_bounds [-10, 2]); agents.drq_policy holds the same values as its defaults.
DRQ_POLICY_DEFAULTS: dict = {
    "feature_dim": 50,
    "hidden_dim": 1024,
    "hidden_depth": 2,
    "log_std_bounds": (-10.0, 2.0),
}
# DrQ's action repeats (the PlaNet benchmark; drq README / data/dmc_planet_bench.csv) by DMC domain.
DRQ_ACTION_REPEAT = {"cartpole": 8, "reacher": 4, "cheetah": 4, "ball_in_cup": 4, "finger": 2, "walker": 2}

_CLASSES = {
    "ppo": (PerceiverPPO, PerceiverActorCriticPolicy),
    "a2c": (PerceiverA2C, PerceiverActorCriticPolicy),
    "sac": (PerceiverSAC, PerceiverSACPolicy),
}
# The baselines (agents/baselines.py): SB3's own algorithm and MultiInputPolicy (CombinedExtractor: NatureCNN for
# pixels, flatten + MLP); sb3-contrib's RecurrentPPO with MultiInputLstmPolicy (PPO only).
SB3_CLASSES = {"ppo": PPO, "a2c": A2C, "sac": SAC}
LSTM_CLASSES = {"ppo": RecurrentPPO}


def algorithm_class(algorithm: str, policy_type: str = "perceiver") -> type[BaseAlgorithm]:
    """The SB3 algorithm class a run uses (for training and for loading its checkpoints)."""
    if policy_type not in POLICY_TYPES:
        raise ValueError(f"unknown policy_type {policy_type!r}; valid choices: {list(POLICY_TYPES)}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; valid choices: {list(ALGORITHMS)}")
    if policy_type in SAC_ENCODER_TYPES:
        if algorithm != "sac":
            raise ValueError(
                f"policy_type {policy_type!r} (an encoder of the pixel SAC recipe) needs algorithm 'sac', got "
                f"{algorithm!r}; for PPO/A2C with a CNN use policy_type 'sb3'"
            )
        return PerceiverSAC
    if policy_type == "lstm":
        if algorithm not in LSTM_CLASSES:
            raise ValueError(
                f"policy_type 'lstm' (sb3-contrib RecurrentPPO) needs algorithm 'ppo', got {algorithm!r}; "
                f"valid choices: {list(LSTM_CLASSES)}"
            )
        return LSTM_CLASSES[algorithm]
    return SB3_CLASSES[algorithm] if policy_type == "sb3" else _CLASSES[algorithm][0]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(
            f"unknown device {device!r}; valid choices: 'auto', 'cpu', 'cuda', 'cuda:N'"
        ) from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return resolved


# On an NVIDIA H200 (docs/results.md, "GPU") bf16 autocast made the encoder's batch-256 forward
# 1.56x faster at 256 latents and 2.04x at 512, but 0.66x at 32 latents, and PPO with the default 32 latents
# learned 3-13 % slower in bf16 at 1, 8 and 32 envs: below this many latents the casts cost more than the
# small matmuls save.
BF16_MIN_LATENTS = 256


def default_dtype(device: torch.device, perceiver: dict) -> str:
    """The Perceiver's precision when the caller names none: bf16 autocast on CUDA for models of at least
    `BF16_MIN_LATENTS` latents, float32 otherwise (and always on the CPU)."""
    latents = perceiver.get("num_latents", PerceiverConfig.num_latents)
    return "bfloat16" if device.type == "cuda" and latents >= BF16_MIN_LATENTS else "float32"


def computes_in_bf16(perceiver: dict | None, policy_kwargs: dict | None) -> bool:
    """Whether an agent with these Perceiver and policy options computes in bf16 (autocast or convolutions)."""
    conv_dtype = (policy_kwargs or {}).get("conv_dtype")
    return (perceiver or {}).get("dtype") == "bfloat16" or conv_dtype == "bfloat16"


def make_agent(
    algorithm: str,
    env,
    perceiver: dict | None = None,
    policy_kwargs: dict | None = None,
    device: str = "auto",
    seed: int | None = None,
    tensorboard_log: str | None = None,
    verbose: int = 0,
    policy_type: str = "perceiver",
    recipe: str = "sb3",
    **overrides,
) -> BaseAlgorithm:
    """`make_agent("ppo", vec_env, perceiver={"num_latents": 64}, n_steps=512)` -> a ready SB3 algorithm.

    PPO/A2C use `PerceiverActorCriticPolicy` with batched device rollouts; SAC uses `PerceiverSACPolicy` with
    DrQ-style encoder training and `FrameReplayBuffer` when the observation has frame-stacked pixels. On CUDA
    the Perceiver runs under bf16 autocast from `BF16_MIN_LATENTS` latents on (see `default_dtype`); pass
    `perceiver={"dtype": ...}` to choose.
    `policy_type="sb3"` builds the baseline instead: SB3's own algorithm with `MultiInputPolicy`, same
    hyper-parameters (the `perceiver` options are then ignored); `policy_type="lstm"`: sb3-contrib's
    `RecurrentPPO` with `MultiInputLstmPolicy`. Baselines never read the privileged `state` key.
    `recipe="drq"` (SAC): DrQ's update rule and networks (`DRQ_DEFAULTS`, `DRQ_POLICY_DEFAULTS`) with the encoder
    of `policy_type` ('perceiver', 'cnn' for SB3's NatureCNN, 'drq-cnn' for DrQ's), `DrQSACPolicy` and
    `PerceiverSAC`; 'cnn' and 'drq-cnn' train with this recipe only.
    """
    algo_cls = algorithm_class(algorithm, policy_type)
    check_recipe(algorithm, policy_type, recipe)
    torch_device = resolve_device(device)
    perceiver = dict(perceiver or {})
    perceiver.setdefault("dtype", default_dtype(torch_device, perceiver))
    emulates_bf16 = torch_device.type == "cpu" and not cpu_has_native_bf16()
    if emulates_bf16 and computes_in_bf16(perceiver, policy_kwargs):
        warnings.warn(
            "bfloat16 on a CPU without native bf16 (no AVX512-BF16 / AMX): autocast emulates it and was "
            "measured 5x slower than float32 on such a host; use float32",
            stacklevel=2,
        )
    if recipe == "drq":
        kwargs = {**copy.deepcopy(DRQ_DEFAULTS), **overrides}
        policy_kwargs = {**DRQ_POLICY_DEFAULTS, **(policy_kwargs or {}), "perceiver": perceiver}
        policy_kwargs["encoder"] = policy_type  # 'perceiver', 'cnn' or 'drq-cnn' (agents.encoders)
    else:
        kwargs = {**copy.deepcopy(DEFAULTS[algorithm]), **overrides}
        policy_kwargs = {**(policy_kwargs or {}), "perceiver": perceiver}
    common = dict(
        policy_kwargs=policy_kwargs,
        device=torch_device,
        seed=seed,
        tensorboard_log=tensorboard_log,
        verbose=verbose,
    )
    if algorithm == "ppo":  # SB3 wants the rollout (n_steps * n_envs) to be a multiple of the minibatch
        kwargs["batch_size"] = min(kwargs["batch_size"], kwargs["n_steps"] * getattr(env, "num_envs", 1))
    if policy_type in ("sb3", "lstm"):
        baseline_kwargs = {k: v for k, v in policy_kwargs.items() if k != "perceiver"}
        baseline_kwargs.setdefault("features_extractor_class", ObservationExtractor)
        common["policy_kwargs"] = baseline_kwargs
        if kwargs.pop("aux_state_weight", 0):
            raise ValueError(f"aux_state_weight needs policy_type 'perceiver', got {policy_type!r}")
        policy = "MultiInputLstmPolicy" if policy_type == "lstm" else "MultiInputPolicy"
        check_algorithm_kwargs(algo_cls, kwargs, algorithm, policy_type)
        check_policy_kwargs(algo_cls.policy_aliases[policy], baseline_kwargs, policy_type)
        return algo_cls(policy, env, **kwargs, **common)
    if algorithm == "sac":
        obs_space = env.observation_space
        if isinstance(obs_space, spaces.Dict) and "pixels" in obs_space.spaces:
            kwargs.setdefault("replay_buffer_class", FrameReplayBuffer)
        else:
            kwargs.setdefault("augment_pad", 0)
            if isinstance(obs_space, spaces.Dict) and TASK_KEY in obs_space.spaces:
                kwargs.setdefault("replay_buffer_class", TaskReplayBuffer)
    policy_class = DrQSACPolicy if recipe == "drq" else _CLASSES[algorithm][1]
    check_algorithm_kwargs(algo_cls, kwargs, algorithm, policy_type)
    check_policy_kwargs(policy_class, policy_kwargs, policy_type)
    return algo_cls(policy_class, env, **kwargs, **common)


def init_settings(klass: type, exclude: set[str]) -> set[str]:
    """The keyword arguments `klass(...)` accepts: its own and those its `**kwargs` pass on along the MRO (the
    mixins of agents/ and the policies of perceiver_policy/ forward theirs to SB3's classes), less `exclude`."""
    names: set[str] = set()
    for base in klass.__mro__:
        init = base.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        names |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return names - exclude


def algorithm_settings(algo_cls: type) -> set[str]:
    """The keyword arguments `algo_cls(policy, env, ...)` accepts, less those `make_agent` sets itself."""
    set_by_make_agent = "self _init_setup_model policy env policy_kwargs device seed tensorboard_log verbose"
    return init_settings(algo_cls, set(set_by_make_agent.split()))


def policy_settings(policy_cls: type) -> set[str]:
    """The `policy_kwargs` a policy class accepts (`--policy key=value`, a preset's `policy:`), less the spaces and
    the schedule SB3 passes; the Perceiver's SAC policies also take the arguments SB3 passes on a reload."""
    valid = init_settings(policy_cls, {"self", "observation_space", "action_space", "lr_schedule", "kwargs"})
    return valid | set(getattr(policy_cls, "IGNORED_KWARGS", ()))


def check_settings(what: str, klass: type, valid: set[str], given: dict, policy_type: str) -> None:
    """Every setting given is one `klass` takes; the error names the unknown ones and the valid choices instead of
    a TypeError from inside SB3's constructors."""
    unknown = sorted(set(given) - valid)
    if unknown:
        raise ValueError(
            f"unknown {what} settings {unknown} for policy_type {policy_type!r} ({klass.__name__}); "
            f"valid choices: {sorted(valid)}"
        )


def check_policy_kwargs(policy_cls: type, policy_kwargs: dict, policy_type: str) -> None:
    """Every policy setting (`--policy key=value`, a preset's `policy:`) is one the policy class takes."""
    check_settings("policy", policy_cls, policy_settings(policy_cls), policy_kwargs, policy_type)


def check_algorithm_kwargs(algo_cls: type, kwargs: dict, algorithm: str, policy_type: str) -> None:
    """Every algorithm setting (`--algo key=value`, a preset's `algo:`) is one the algorithm class takes."""
    check_settings(algorithm, algo_cls, algorithm_settings(algo_cls), kwargs, policy_type)


def check_recipe(algorithm: str, policy_type: str, recipe: str) -> None:
    """A recipe exists, applies to the algorithm, and suits the policy type; errors name the valid choices."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; valid choices: {list(RECIPES)}")
    if recipe == "drq" and algorithm != "sac":
        raise ValueError(f"recipe 'drq' is a SAC recipe; got algorithm {algorithm!r} (use --algorithm sac)")
    if recipe == "drq" and policy_type not in ("perceiver", *SAC_ENCODER_TYPES):
        raise ValueError(
            f"recipe 'drq' trains policy types {['perceiver', *SAC_ENCODER_TYPES]}, got {policy_type!r} "
            "('sb3' is SB3's own SAC with its own recipe)"
        )
    if recipe == "sb3" and policy_type in SAC_ENCODER_TYPES:
        raise ValueError(
            f"policy_type {policy_type!r} trains with recipe 'drq' (the shared pixel SAC recipe), got recipe "
            "'sb3'; for SB3's own SAC + NatureCNN use policy_type 'sb3'"
        )
