"""DeepMind Control Suite tasks as gymnasium environments with multimodal Dict observations.

Observation keys (only the requested ones are present):

- ``pixels``: uint8 ``(frame_stack * 3, H, W)``, channel-first, oldest frame first;
- ``proprio``: float32 ``(D,)``: dm_control's observation dict flattened in the order the task returns it
  (an ``OrderedDict``), each entry in C order, restricted to what the ``proprio`` mode keeps (``full``,
  ``robot``, ``positions``: see `envs.proprio_modes`). The per-sensor layout (name -> ``(start, stop)``) is on
  the space itself (``space["proprio"].layout``) and on the env (``env.unwrapped.proprio_layout``);
- ``proprio_history``: float32 ``(proprio_history_len, D)``: the last proprio readings, oldest first, newest
  = the current ``proprio``; the first reading repeated after reset (as frame stacks repeat the first frame);
- ``action_history``: float32 ``(action_history_len, action_dim)``: the last actions taken, oldest first,
  zeros after reset;
- ``state`` (only with ``privileged_state=True``): the task's *full* observation vector, for training losses
  and probes. It is privileged: the policies never read it, and a client of these envs never receives it
  unless it asks.

Counting: one ``step`` is one *agent step* = ``action_repeat`` simulator steps (*frames*), rewards summed.
``info["env_steps"]`` and ``info["frames"]`` count both since the last reset. DMC ends episodes on a time limit
(1000 frames): that is a truncation, never a termination.
"""

from __future__ import annotations

from collections import deque

import gymnasium as gym
import numpy as np
from dm_control import suite
from gymnasium import spaces

from envs import proprio_modes
from envs.rendering import RENDER_BACKENDS, CameraRenderer

MODALITIES = ("pixels", "proprio", "action_history", "proprio_history")
STATE_KEY = "state"  # the privileged full observation (never an input of a policy)
TASKS = tuple(f"{domain}-{task}" for domain, task in suite.ALL_TASKS)
DOMAINS = tuple(sorted({domain for domain, _ in suite.ALL_TASKS}))

# Action repeats of the PlaNet benchmark (used by CURL, DrQ, DrQ-v2 for pixel-based control).
PLANET_ACTION_REPEAT = {
    "cartpole-swingup": 8,
    "reacher-easy": 4,
    "cheetah-run": 4,
    "finger-spin": 2,
    "ball_in_cup-catch": 4,
    "walker-walk": 2,
}


class SensorBox(spaces.Box):
    """A float Box that also records which slice of the vector each named sensor occupies."""

    def __init__(self, low, high, shape, dtype, layout: dict[str, tuple[int, int]]):
        super().__init__(low=low, high=high, shape=shape, dtype=dtype)
        self.layout = dict(layout)

    def __repr__(self) -> str:
        return f"SensorBox({self.shape}, sensors={list(self.layout)})"


def default_camera(domain: str) -> int:
    return 2 if domain == "quadruped" else 0


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def parse_task(task: str) -> tuple[str, str]:
    """'cheetah-run' -> ('cheetah', 'run'), with errors naming the valid choices."""
    domain, sep, name = task.partition("-")
    if not sep or domain not in DOMAINS:
        raise ValueError(f"unknown domain in task {task!r}; known domains: {list(DOMAINS)}")
    if task not in TASKS:
        tasks = [t for t in TASKS if t.startswith(domain + "-")]
        raise ValueError(f"unknown task {task!r}; known tasks of domain {domain!r}: {tasks}")
    return domain, name


class DMCEnv(gym.Env):
    """One dm_control task; see the module docstring for observations and counting."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}

    def __init__(
        self,
        domain: str,
        task: str,
        modalities: tuple[str, ...] | list[str] = ("pixels", "proprio", "action_history"),
        image_size: int = 84,
        frame_stack: int = 3,
        action_repeat: int = 1,
        action_history_len: int = 8,
        proprio: str = "full",
        proprio_history_len: int = 8,
        privileged_state: bool = False,
        camera_id: int | None = None,
        render_backend: str = "fast",
        render_mode: str | None = None,
        render_size: int = 128,
        environment_kwargs: dict | None = None,
    ):
        domain, task = parse_task(f"{domain}-{task}")
        modalities = tuple(modalities)
        bad = [m for m in modalities if m not in MODALITIES]
        if bad or not modalities:
            raise ValueError(f"unknown modalities {bad or modalities!r}; valid choices: {list(MODALITIES)}")
        if len(set(modalities)) != len(modalities):
            raise ValueError(f"duplicate modalities in {modalities!r}")
        for name, value in (
            ("image_size", image_size),
            ("frame_stack", frame_stack),
            ("action_repeat", action_repeat),
            ("action_history_len", action_history_len),
            ("proprio_history_len", proprio_history_len),
            ("render_size", render_size),
        ):
            _check_positive(name, value)
        if render_backend not in RENDER_BACKENDS:
            raise ValueError(
                f"unknown render_backend {render_backend!r}; valid choices: {list(RENDER_BACKENDS)}"
            )
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"unknown render_mode {render_mode!r}; valid choices: [None, 'rgb_array']")

        self.task_name = f"{domain}-{task}"
        self.modalities = modalities
        self.image_size, self.frame_stack = int(image_size), int(frame_stack)
        self.action_repeat, self.action_history_len = int(action_repeat), int(action_history_len)
        self.proprio_mode, self.proprio_history_len = proprio, int(proprio_history_len)
        self.privileged_state = bool(privileged_state)
        self.camera_id = default_camera(domain) if camera_id is None else int(camera_id)
        self.render_backend, self.render_mode, self.render_size = (
            render_backend,
            render_mode,
            int(render_size),
        )

        self._env = suite.load(domain, task, environment_kwargs=environment_kwargs)
        action_spec = self._env.action_spec()
        # DMC's bounds are float64; SB3 and torch want float32 (and SB3's check_env warns otherwise).
        self.action_space = spaces.Box(
            action_spec.minimum.astype(np.float32), action_spec.maximum.astype(np.float32), dtype=np.float32
        )
        sizes = {
            name: int(np.prod(spec.shape, dtype=np.int64))
            for name, spec in self._env.observation_spec().items()
        }
        self.state_layout = proprio_modes.full_layout(sizes)
        self._proprio_index, self.proprio_layout = proprio_modes.select(domain, task, proprio, sizes)
        self._proprio_all = len(self._proprio_index) == sum(sizes.values())
        # State probes also score each sensor the proprio mode keeps in part, split into what the agent senses
        # and what it must estimate (`proprio_modes.sensed_parts`).
        senses_proprio = "proprio" in modalities or "proprio_history" in modalities
        self.state_parts = (
            proprio_modes.sensed_parts(self.state_layout, self._proprio_index) if senses_proprio else {}
        )
        self.observation_space = self._build_observation_space()

        self._renderer = None
        self._video_renderer = None
        if "pixels" in modalities:
            self._renderer = CameraRenderer(
                self._env.physics, self.image_size, self.image_size, self.camera_id, render_backend
            )
        self._frames: deque[np.ndarray] = deque(maxlen=self.frame_stack)
        self._actions: deque[np.ndarray] = deque(maxlen=self.action_history_len)
        self._readings: deque[np.ndarray] = deque(maxlen=self.proprio_history_len)
        self._env_steps = 0
        self._sim_frames = 0

    # ----------------------------------------------------------------------------------------------- spaces
    def _build_observation_space(self) -> spaces.Dict:
        obs = {}
        if "pixels" in self.modalities:
            shape = (3 * self.frame_stack, self.image_size, self.image_size)
            obs["pixels"] = spaces.Box(0, 255, shape, dtype=np.uint8)
        dim = len(self._proprio_index)
        if "proprio" in self.modalities:
            obs["proprio"] = SensorBox(-np.inf, np.inf, (dim,), np.float32, self.proprio_layout)
        if "proprio_history" in self.modalities:
            shape = (self.proprio_history_len, dim)
            obs["proprio_history"] = spaces.Box(-np.inf, np.inf, shape, dtype=np.float32)
        if "action_history" in self.modalities:
            shape = (self.action_history_len, self.action_space.shape[0])
            low = np.broadcast_to(self.action_space.low, shape)
            high = np.broadcast_to(self.action_space.high, shape)
            obs["action_history"] = spaces.Box(low.copy(), high.copy(), dtype=np.float32)
        if self.privileged_state:
            state_dim = max(stop for _, stop in self.state_layout.values())
            obs[STATE_KEY] = SensorBox(-np.inf, np.inf, (state_dim,), np.float32, self.state_layout)
        return spaces.Dict(obs)

    # ------------------------------------------------------------------------------------------ observations
    def _state(self, observation) -> np.ndarray:
        return np.concatenate([np.asarray(v, dtype=np.float32).ravel() for v in observation.values()])

    def _observation(self, timestep) -> dict[str, np.ndarray]:
        obs = {}
        state = self._state(timestep.observation)  # (S,) the full observation
        reading = state if self._proprio_all else state[self._proprio_index]  # (D,) what the mode keeps
        if "pixels" in self.modalities:
            obs["pixels"] = np.concatenate(self._frames, axis=0)  # (F*3, H, W)
        if "proprio" in self.modalities:
            obs["proprio"] = reading
        if "proprio_history" in self.modalities:
            if not self._readings:  # after reset: the first reading repeated
                self._readings.extend([reading] * self.proprio_history_len)
            else:
                self._readings.append(reading)
            obs["proprio_history"] = np.stack(self._readings, axis=0)  # (T, D)
        if "action_history" in self.modalities:
            obs["action_history"] = np.stack(self._actions, axis=0)  # (T, A)
        if self.privileged_state:
            obs[STATE_KEY] = state
        return obs

    def _render_frame(self) -> np.ndarray:
        return self._renderer.render().transpose(2, 0, 1).copy()  # (3, H, W) uint8

    # -------------------------------------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        # dm_control draws initial states from task.random: derive it from gymnasium's seeded generator so
        # reset(seed=s) reproduces the episode (pixels included) and later resets continue the same stream.
        self._env.task.random.seed(int(self.np_random.integers(2**31 - 1)))
        timestep = self._env.reset()
        self._env_steps = self._sim_frames = 0
        zero = np.zeros(self.action_space.shape, dtype=np.float32)
        self._actions.extend([zero] * self.action_history_len)
        self._readings.clear()
        if self._renderer is not None:
            frame = self._render_frame()
            self._frames.extend([frame] * self.frame_stack)
        return self._observation(timestep), self._info(timestep)

    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float32), self.action_space.low, self.action_space.high)
        reward = 0.0
        for _ in range(self.action_repeat):
            timestep = self._env.step(action)
            reward += timestep.reward or 0.0
            self._sim_frames += 1
            if timestep.last():
                break
        self._env_steps += 1
        self._actions.append(action)
        if self._renderer is not None:
            self._frames.append(self._render_frame())
        # dm_control signals a time limit with discount 1 and a true termination with discount 0.
        terminated = bool(timestep.last() and timestep.discount == 0.0)
        truncated = bool(timestep.last() and not terminated)
        return self._observation(timestep), float(reward), terminated, truncated, self._info(timestep)

    def _info(self, timestep) -> dict:
        discount = 1.0 if timestep.discount is None else float(timestep.discount)
        return {"env_steps": self._env_steps, "frames": self._sim_frames, "discount": discount}

    def render(self):
        """The camera at ``render_size`` px (for videos), `(H, W, 3)` uint8."""
        if self._video_renderer is None:
            size = self.render_size
            self._video_renderer = CameraRenderer(
                self._env.physics, size, size, self.camera_id, self.render_backend
            )
        return self._video_renderer.render()

    def close(self):
        for renderer in (self._renderer, self._video_renderer):
            if renderer is not None:
                renderer.close()
        self._renderer = self._video_renderer = None
        super().close()

    @property
    def physics(self):
        return self._env.physics
