"""DeepMind Control Suite tasks as multimodal gymnasium environments.

``import envs`` registers ``dmc/<domain>-<task>-v0`` for every task in ``dm_control.suite.ALL_TASKS``.
"""

import os

# MuJoCo picks its GL backend when first imported: default to headless EGL before anything imports it.
os.environ.setdefault("MUJOCO_GL", "egl")

import logging  # noqa: E402

import gymnasium as gym  # noqa: E402

# dm_control's cartpole/walker XML use the deprecated `settotalmass`: absl warns once per model load, which
# fills benchmark and training output with a page of identical lines. Only that message is filtered.
logging.getLogger("absl").addFilter(lambda record: "settotalmass" not in record.getMessage())

from envs.dmc import (  # noqa: E402
    DOMAINS,
    MODALITIES,
    PLANET_ACTION_REPEAT,
    STATE_KEY,
    TASKS,
    DMCEnv,
    SensorBox,
    parse_task,
)
from envs.multitask import (  # noqa: E402
    ACTION_MASK_KEY,
    TASK_KEY,
    TASK_SAMPLERS,
    MultiTaskEnv,
    make_multitask_vec_env,
    present_key,
    sensor_slots,
)
from envs.proprio_modes import PROPRIO_MODES  # noqa: E402
from envs.vec import make_env_fn, make_vec_env  # noqa: E402
from envs.wrappers import ABSENT_KEY, ModalityDropout, NonFiniteGuard  # noqa: E402


def env_id(task: str) -> str:
    """'cheetah-run' -> 'dmc/cheetah-run-v0'."""
    return f"dmc/{task}-v0"


def _register_all() -> None:
    for task in TASKS:
        if env_id(task) in gym.registry:
            continue
        domain, name = task.split("-", 1)
        gym.register(
            id=env_id(task),
            entry_point="envs.dmc:DMCEnv",
            kwargs={"domain": domain, "task": name},
            # dm_control enforces its own time limit (a truncation); no TimeLimit wrapper on top.
            max_episode_steps=None,
            disable_env_checker=True,
        )


_register_all()

__all__ = [
    "ABSENT_KEY",
    "ACTION_MASK_KEY",
    "MultiTaskEnv",
    "TASK_KEY",
    "TASK_SAMPLERS",
    "make_multitask_vec_env",
    "present_key",
    "sensor_slots",
    "ModalityDropout",
    "NonFiniteGuard",
    "DMCEnv",
    "DOMAINS",
    "MODALITIES",
    "PLANET_ACTION_REPEAT",
    "PROPRIO_MODES",
    "STATE_KEY",
    "SensorBox",
    "TASKS",
    "env_id",
    "make_env_fn",
    "make_vec_env",
    "parse_task",
]
