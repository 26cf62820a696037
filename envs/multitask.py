"""Many DMC tasks behind one observation and action space: the environment of a multi-task (generalist) policy.

A `MultiTaskEnv` holds one `DMCEnv` per task and plays one of them per episode, chosen at each reset by the task
sampler's weights (or ``reset(options={"task": name})``). Bodies differ in sensors and actuators, so:

- ``proprio`` is a fixed union of *sensor slots* (`sensor_slots`): one slot per sensor name over all tasks
  (``position``, ``velocity``, ``touch``, ...), as wide as its widest reading; a task's reading fills the start
  of its slots and zeros pad the rest. The Perceiver tokenises one token per slot; ``proprio_present``
  ((n_slots,) float, 1 = the playing task has this sensor) tells it which slot tokens to mask. The same holds
  for ``proprio_history`` (each reading laid out the same way);
- actions are padded to the largest action size: the action space is ``Box(-1, 1, (A_max,))``, the playing task
  reads the first ``A_task`` entries, and the padding never reaches a simulator. ``action_mask`` ((A_max,)
  float, 1 = a real actuator) says which entries are real; ``action_history`` is padded with zeros;
- ``task`` ((1,) int64) is the playing task's index in ``tasks`` (the policy's domain embedding reads it);
- pixels, when asked for, are the playing task's camera at one image size for every task.

Each task keeps its own action repeat (``action_repeat`` may be a {task: repeat} dict). ``info`` carries
``task`` (its name), ``frames`` / ``env_steps`` of the episode (as `DMCEnv`) and ``task_frames``: the frames this
env has simulated per task since it was built.
"""

from __future__ import annotations

import functools

import gymnasium as gym
import numpy as np
from dm_control import suite
from gymnasium import spaces

from envs import proprio_modes
from envs.dmc import STATE_KEY, DMCEnv, SensorBox, parse_task
from envs.vec import make_vec_env

TASK_KEY = "task"
ACTION_MASK_KEY = "action_mask"
PRESENT_SUFFIX = "_present"  # '<vector key>_present': per-token (sensor slot) presence flags of that key
TASK_SAMPLERS = ("uniform", "fixed", "active")


def present_key(name: str) -> str:
    return name + PRESENT_SUFFIX


def check_tasks(tasks) -> tuple[str, ...]:
    """At least two distinct known tasks, in the given order."""
    tasks = tuple(tasks)
    if len(tasks) < 2:
        raise ValueError(f"a multi-task env needs at least two tasks, got {list(tasks)}")
    duplicates = sorted({t for t in tasks if tasks.count(t) > 1})
    if duplicates:
        raise ValueError(f"tasks {duplicates} are listed twice in {list(tasks)}")
    for task in tasks:
        parse_task(task)  # names the valid choices
    return tasks


@functools.lru_cache(maxsize=64)
def _task_sensors(task: str, proprio: str) -> tuple[tuple[tuple[str, int], ...], int]:
    """((sensor, width), ...) of what the proprio mode keeps, in dm_control's order, and the action size."""
    domain, name = parse_task(task)
    env = suite.load(domain, name)
    sizes = {k: int(np.prod(v.shape, dtype=np.int64)) for k, v in env.observation_spec().items()}
    _, layout = proprio_modes.select(domain, name, proprio, sizes)
    action_dim = int(env.action_spec().shape[0])
    return tuple((sensor, stop - start) for sensor, (start, stop) in layout.items()), action_dim


def padded_action_dim(tasks) -> int:
    """The padded action size of a multi-task env over `tasks`: their largest number of actuators."""
    return max(_task_sensors(t, "full")[1] for t in tasks)


def sensor_slots(tasks, proprio: str = "full") -> dict[str, int]:
    """{sensor name: slot width} over `tasks`: each name once, in first-seen order, as wide as its widest reading."""
    slots: dict[str, int] = {}
    for task in check_tasks(tasks):
        for sensor, width in _task_sensors(task, proprio)[0]:
            slots[sensor] = max(slots.get(sensor, 0), width)
    return slots


def parse_task_values(spec, tasks, name: str = "task_weights") -> dict[str, float]:
    """'walker-walk=2 cheetah-run=1' (or a {task: value} dict) -> {task: value}; a bad pair or a task the run does
    not train is an error naming it (`name`: the setting's name in the message)."""
    tasks = tuple(tasks)
    if isinstance(spec, str):
        pairs = {}
        for item in spec.split():
            task, sep, value = item.partition("=")
            try:
                pairs[task] = float(value) if sep else None
            except ValueError:
                pairs[task] = None
            if pairs[task] is None:
                raise ValueError(f"{name} are TASK=NUMBER pairs, got {item!r} in {spec!r}")
        spec = pairs
    unknown = sorted(set(spec) - set(tasks))
    if unknown:
        raise ValueError(f"{name} names {unknown}, which this run does not train; its tasks: {list(tasks)}")
    return {task: float(value) for task, value in spec.items()}


def parse_task_weights(spec, tasks) -> np.ndarray:
    """'walker-walk=2 cheetah-run=1' (or a {task: weight} dict) -> normalised weights in `tasks` order; an
    unlisted task gets weight 0."""
    tasks = tuple(tasks)
    values = parse_task_values(spec, tasks)
    weights = np.array([values.get(t, 0.0) for t in tasks])
    if not np.all(np.isfinite(weights)) or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"task weights must be finite, >= 0 and not all 0, got {dict(zip(tasks, weights))}")
    return weights / weights.sum()


def initial_task_weights(tasks, sampler: str = "uniform", weights=None) -> np.ndarray:
    """The weights a sampler starts from: uniform ('uniform', 'active') or the given ones ('fixed')."""
    if sampler not in TASK_SAMPLERS:
        raise ValueError(f"unknown task_sampler {sampler!r}; valid choices: {list(TASK_SAMPLERS)}")
    if sampler == "fixed":
        if not weights:
            raise ValueError("task_sampler 'fixed' needs task weights, e.g. 'walker-walk=2 cheetah-run=1'")
        return parse_task_weights(weights, tasks)
    if weights:
        raise ValueError(
            f"task weights are read by task_sampler 'fixed' only; this run's sampler is {sampler!r}"
        )
    return np.full(len(tuple(tasks)), 1.0 / len(tuple(tasks)))


ACTIVE_FLOOR = 0.1


def active_task_weights(returns, references, floor: float = ACTIVE_FLOOR) -> np.ndarray:
    """The active sampler's rule: each task's weight is proportional to ``floor + gap``, where ``gap = clip(1 -
    return / reference, 0, 1)`` is how far its latest evaluation return is below its single-task reference. A
    task at or above its reference keeps the floor's share, so no task is ever dropped from the mix."""
    returns, references = np.asarray(returns, dtype=float), np.asarray(references, dtype=float)
    gap = np.clip(1.0 - returns / np.maximum(references, 1e-8), 0.0, 1.0)
    weights = floor + gap
    return weights / weights.sum()


def _reading_index(layout: tuple[tuple[str, int], ...], slots: dict[str, int]) -> np.ndarray:
    """Where each entry of a task's reading goes in the slot vector."""
    offsets, start = {}, 0
    for sensor, width in slots.items():
        offsets[sensor] = start
        start += width
    index = []
    for sensor, width in layout:
        index.extend(range(offsets[sensor], offsets[sensor] + width))
    return np.asarray(index, dtype=np.int64)


class MultiTaskEnv(gym.Env):
    """Several DMC tasks behind one space; see the module docstring.

    :param tasks: the tasks ('<domain>-<task>'), in the order of the ``task`` index.
    :param task_weights: the sampler's weights over `tasks` (None: uniform); `set_task_weights` changes them.
    :param task: play only this task (evaluation); must be one of `tasks`.
    :param slots: {sensor: width} of the proprio union (default: `sensor_slots(tasks, proprio)`); give a trained
        policy's slots to play a task it was not trained on (its sensors must fit them).
    :param max_action_dim: the padded action size (default: the largest of `tasks`).
    :param action_repeat: simulator steps per agent step, for every task or as {task: repeat}.
    The other keyword arguments are `DMCEnv`'s. The privileged ``state`` differs per body: refused here.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}

    def __init__(
        self,
        tasks,
        task_weights=None,
        task: str | None = None,
        slots: dict[str, int] | None = None,
        max_action_dim: int | None = None,
        action_repeat: int | dict = 1,
        modalities=("pixels", "proprio", "action_history"),
        proprio: str = "full",
        privileged_state: bool = False,
        **env_kwargs,
    ):
        self.tasks = check_tasks(tasks)
        if task is not None and task not in self.tasks:
            # a task outside the training set: playable when its sensors and actuators fit the given slots
            parse_task(task)
            self.tasks = (*self.tasks, task)
        if privileged_state:
            raise ValueError(
                f"the privileged {STATE_KEY!r} differs per body: a multi-task env has none (no --aux-state-weight, "
                "no state probe)"
            )
        self.fixed_task = task
        self.modalities = tuple(modalities)
        repeats = self._repeats(action_repeat)
        self.envs = {
            t: DMCEnv(
                *parse_task(t), modalities=modalities, proprio=proprio, action_repeat=repeats[t], **env_kwargs
            )
            for t in self.tasks
            if task is None or t == task
        }
        self.slots = dict(slots) if slots is not None else sensor_slots(tuple(tasks), proprio)
        sensors = {t: _task_sensors(t, proprio)[0] for t in self.envs}
        for t, layout in sensors.items():
            misfit = [(s, w) for s, w in layout if s not in self.slots or w > self.slots[s]]
            if misfit:
                raise ValueError(
                    f"task {t!r} has sensors {misfit} (name, width) that do not fit the sensor slots {self.slots}; "
                    "a policy reads only the slots it was built with (train it with a task that has these sensors)"
                )
        self._index = {t: _reading_index(layout, self.slots) for t, layout in sensors.items()}
        self._present = {
            t: np.array([float(s in dict(layout)) for s in self.slots], dtype=np.float32)
            for t, layout in sensors.items()
        }
        self.action_dims = {t: int(env.action_space.shape[0]) for t, env in self.envs.items()}
        for t, env in self.envs.items():
            if not (np.all(env.action_space.low == -1.0) and np.all(env.action_space.high == 1.0)):
                raise ValueError(
                    f"task {t!r} has action bounds other than [-1, 1]: it cannot share padded actions"
                )
        largest = padded_action_dim(self.tasks)
        self.max_action_dim = int(max_action_dim) if max_action_dim is not None else largest
        if self.max_action_dim < largest:
            raise ValueError(
                f"max_action_dim {self.max_action_dim} is smaller than a task's {largest} actuators"
            )
        self.action_space = spaces.Box(-1.0, 1.0, (self.max_action_dim,), dtype=np.float32)
        n_tasks = len(
            tuple(tasks)
        )  # the training tasks index the domain embedding; a played extra one is last
        self.task_weights = (
            np.full(n_tasks, 1.0 / n_tasks) if task_weights is None else np.asarray(task_weights)
        )
        self.set_task_weights(self.task_weights)
        self.observation_space = self._build_observation_space(len(self.tasks))
        # What every observation of a task repeats, built once: the slot vector's width, its index and action mask.
        self._width = sum(self.slots.values())
        self._constant = {
            t: (
                np.array([self.tasks.index(t)], dtype=np.int64),
                (np.arange(self.max_action_dim) < dim).astype(np.float32),
            )
            for t, dim in self.action_dims.items()
        }
        self.current = self.fixed_task or next(iter(self.envs))
        self.task_frames = {t: 0 for t in self.envs}
        self._episode_frames = 0

    def _repeats(self, action_repeat) -> dict[str, int]:
        if isinstance(action_repeat, dict):
            missing = sorted(set(self.tasks) - set(action_repeat))
            unknown = sorted(set(action_repeat) - set(self.tasks))
            if missing or unknown:
                raise ValueError(
                    f"action_repeat per task: missing {missing}, unknown {unknown}; tasks: {list(self.tasks)}"
                )
            return {t: int(action_repeat[t]) for t in self.tasks}
        return {t: int(action_repeat) for t in self.tasks}

    def _build_observation_space(self, n_tasks: int) -> spaces.Dict:
        some = next(iter(self.envs.values())).observation_space
        width = sum(self.slots.values())
        layout, start = {}, 0
        for sensor, size in self.slots.items():
            layout[sensor] = (start, start + size)
            start += size
        obs = {}
        if "pixels" in self.modalities:
            obs["pixels"] = some["pixels"]
        if "proprio" in self.modalities:
            obs["proprio"] = SensorBox(-np.inf, np.inf, (width,), np.float32, layout)
            obs[present_key("proprio")] = spaces.Box(0.0, 1.0, (len(self.slots),), dtype=np.float32)
        if "proprio_history" in self.modalities:
            steps = some["proprio_history"].shape[0]
            obs["proprio_history"] = spaces.Box(-np.inf, np.inf, (steps, width), dtype=np.float32)
        if "action_history" in self.modalities:
            steps = some["action_history"].shape[0]
            obs["action_history"] = spaces.Box(-1.0, 1.0, (steps, self.max_action_dim), dtype=np.float32)
        obs[TASK_KEY] = spaces.Box(0, n_tasks - 1, (1,), dtype=np.int64)
        obs[ACTION_MASK_KEY] = spaces.Box(0.0, 1.0, (self.max_action_dim,), dtype=np.float32)
        return spaces.Dict(obs)

    def set_task_weights(self, weights) -> None:
        """The sampler's weights over the training tasks (normalised here); called by the active sampler."""
        weights = np.asarray(weights, dtype=float)
        n_tasks = len(self.task_weights)
        if (
            weights.shape != (n_tasks,)
            or not np.all(np.isfinite(weights))
            or (weights < 0).any()
            or weights.sum() <= 0
        ):
            raise ValueError(
                f"task weights must be {n_tasks} finite values >= 0, not all 0; got {weights.tolist()}"
            )
        self.task_weights = weights / weights.sum()

    def _pad(self, obs: dict) -> dict:
        task = self.current
        out = {}
        if "pixels" in obs:
            out["pixels"] = obs["pixels"]
        width = self._width
        if "proprio" in obs:
            reading = np.zeros(width, dtype=np.float32)
            reading[self._index[task]] = obs["proprio"]
            out["proprio"] = reading
            out[present_key("proprio")] = self._present[task]
        if "proprio_history" in obs:
            history = np.zeros((obs["proprio_history"].shape[0], width), dtype=np.float32)
            history[:, self._index[task]] = obs["proprio_history"]
            out["proprio_history"] = history
        if "action_history" in obs:
            actions = np.zeros((obs["action_history"].shape[0], self.max_action_dim), dtype=np.float32)
            actions[:, : self.action_dims[task]] = obs["action_history"]
            out["action_history"] = actions
        out[TASK_KEY], out[ACTION_MASK_KEY] = self._constant[task]
        return out

    def _info(self, info: dict) -> dict:
        return {**info, "task": self.current, "task_frames": dict(self.task_frames)}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        requested = (options or {}).get("task")
        if requested is not None:
            if requested not in self.envs:
                raise ValueError(f"unknown task {requested!r} for reset; this env plays {list(self.envs)}")
            self.current = requested
        elif self.fixed_task is not None:
            self.current = self.fixed_task
        else:
            self.current = self.tasks[int(self.np_random.choice(len(self.task_weights), p=self.task_weights))]
        obs, info = self.envs[self.current].reset(seed=int(self.np_random.integers(2**31 - 1)))
        self._episode_frames = 0
        return self._pad(obs), self._info(info)

    def step(self, action):
        action = np.asarray(action, dtype=np.float32).reshape(self.max_action_dim)
        env = self.envs[self.current]
        obs, reward, terminated, truncated, info = env.step(action[: self.action_dims[self.current]])
        self.task_frames[self.current] += info["frames"] - self._episode_frames  # frames of this step
        self._episode_frames = info["frames"]
        return self._pad(obs), reward, terminated, truncated, self._info(info)

    def render(self):
        return self.envs[self.current].render()

    def close(self):
        for env in self.envs.values():
            env.close()
        super().close()


def make_multitask_env_fn(tasks, **env_kwargs):
    """A picklable constructor for one `MultiTaskEnv` (subprocess workers build their own)."""
    return functools.partial(MultiTaskEnv, tuple(tasks), **env_kwargs)


def make_multitask_vec_env(
    tasks,
    n_envs: int = 1,
    seed: int | None = None,
    task_sampler: str = "uniform",
    task_weights=None,
    vec_env_type: str = "dummy",
    start_method: str = "forkserver",
    monitor_dir: str | None = None,
    **env_kwargs,
):
    """``n_envs`` `MultiTaskEnv`s over `tasks` as one SB3 ``VecEnv`` (each in SB3's ``Monitor``): every env slot
    draws the task of each episode from the sampler's weights. ``task_sampler``: 'uniform'; 'fixed' with
    ``task_weights`` ('walker-walk=2 cheetah-run=1' or a dict); 'active' starts uniform and follows
    `active_task_weights` once a caller (experiments' `TaskSamplerCallback`) pushes weights with
    ``env_method("set_task_weights", w)``. The other arguments are `envs.make_vec_env`'s."""
    tasks = check_tasks(tasks)
    weights = initial_task_weights(tasks, task_sampler, task_weights)
    return make_vec_env(
        make_multitask_env_fn(tasks, task_weights=weights, **env_kwargs),
        n_envs=n_envs,
        seed=seed,
        vec_env_type=vec_env_type,
        start_method=start_method,
        monitor_dir=monitor_dir,
    )
