"""Off-policy replay that stores every pixel frame once, uint8, on the device when it fits.

SB3's `DictReplayBuffer` keeps obs and next_obs separately, so a 3-frame stack holds each frame six times (and
it refuses `optimize_memory_usage` for Dict spaces). Here, as in DrQ-v2's replay, each env appends its newest
frame to a ring of frames and a transition records the ids of the frames of its obs and next_obs stacks; stacks
are rebuilt by indexing at sample time. Episode boundaries: the reset stack is stored once per episode
(identical frames share one id); the terminal next_obs is stored like any other; time-limit truncations keep
`done = 0` for bootstrapping (SB3's `handle_timeout_termination`). Other keys (proprio, action history) are
small and stored as obs/next_obs arrays.

Frame ids are monotonic per env; slot = id % frame_capacity. A transition whose frames were overwritten (only
possible with episodes shorter than ~1/frame_margin steps) is never sampled: `sample` draws only from the valid
range, found by binary search (no rejection sampling, no give-up).

`TaskReplayBuffer`: SB3's Dict replay for multi-task observations from states, drawing each batch's samples per
task by the task sampler's weights.
"""

from __future__ import annotations

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.buffers import BaseBuffer, DictReplayBuffer
from stable_baselines3.common.type_aliases import DictReplayBufferSamples

from perceiver_policy.modalities import TASK_KEY, task_count


def committed_zeros(shape: tuple, dtype) -> np.ndarray:
    """Zeros whose pages are really allocated now (np.zeros maps them lazily, at first write)."""
    array = np.empty(shape, dtype=dtype)
    array.fill(0)
    return array


def choose_storage_device(device: torch.device, nbytes: int) -> torch.device:
    """The policy's CUDA device when the frames fit in half its free memory, else host memory."""
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes < 0.5 * free:
            return device
    return torch.device("cpu")


class FrameReplayBuffer(BaseBuffer):
    """`replay_buffer_class` for SB3's SAC (and `PerceiverSAC`) with a frame-stacked uint8 pixel key."""

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Dict,
        action_space: spaces.Space,
        device: torch.device | str = "auto",
        n_envs: int = 1,
        optimize_memory_usage: bool = False,
        handle_timeout_termination: bool = True,
        pixel_key: str = "pixels",
        channels_per_frame: int = 3,
        frame_margin: float = 0.1,
    ):
        super().__init__(buffer_size, observation_space, action_space, device, n_envs=n_envs)
        if not isinstance(observation_space, spaces.Dict) or pixel_key not in observation_space.spaces:
            raise ValueError(
                f"FrameReplayBuffer needs a Dict observation space with a {pixel_key!r} key, got {observation_space}"
            )
        pixel_space = observation_space[pixel_key]
        if (
            pixel_space.dtype != np.uint8
            or len(pixel_space.shape) != 3
            or pixel_space.shape[0] % channels_per_frame
        ):
            raise ValueError(
                f"{pixel_key!r} must be uint8 (frames*{channels_per_frame}, H, W), got {pixel_space}"
            )
        self.pixel_key, self.channels = pixel_key, channels_per_frame
        self.frame_stack = pixel_space.shape[0] // channels_per_frame
        self.frame_shape = (channels_per_frame, *pixel_space.shape[1:])
        self.handle_timeout_termination = handle_timeout_termination
        self.frame_capacity = int(self.buffer_size * (1 + frame_margin)) + self.frame_stack + 1
        self.frames = self._place(
            torch.zeros((self.frame_capacity, n_envs, *self.frame_shape), dtype=torch.uint8)
        )

        # Every array is written once here (committed_zeros): the memory is taken up front, so a run that does
        # not fit fails at the start, not hours in when the lazily-mapped pages of np.zeros are first touched.
        shape = (self.buffer_size, n_envs)
        self.obs_ids = committed_zeros((*shape, self.frame_stack), np.int64)
        self.next_obs_ids = committed_zeros((*shape, self.frame_stack), np.int64)
        self.other_keys = [k for k in observation_space.spaces if k != pixel_key]
        self.observations = {
            k: committed_zeros((*shape, *observation_space[k].shape), np.float32) for k in self.other_keys
        }
        self.next_observations = {k: committed_zeros(v.shape, v.dtype) for k, v in self.observations.items()}
        self.actions = committed_zeros((*shape, self.action_dim), np.float32)
        self.rewards = committed_zeros(shape, np.float32)
        self.dones = committed_zeros(shape, np.float32)
        self.timeouts = committed_zeros(shape, np.float32)
        self.frames_pushed = np.zeros(n_envs, dtype=np.int64)  # next frame id per env
        self._episode_start = np.ones(n_envs, dtype=bool)
        self._stack_ids = np.zeros((n_envs, self.frame_stack), dtype=np.int64)

    # ------------------------------------------------------------------------------------------------ writes
    def _push_frame(self, env: int, frame: np.ndarray) -> int:
        frame_id = int(self.frames_pushed[env])
        self.frames[frame_id % self.frame_capacity, env].copy_(torch.from_numpy(np.ascontiguousarray(frame)))
        self.frames_pushed[env] += 1
        return frame_id

    def _push_stack(self, env: int, stack: np.ndarray) -> np.ndarray:
        """Store an episode's first stack; consecutive identical frames (the reset padding) share one id."""
        frames = stack.reshape(self.frame_stack, *self.frame_shape)
        ids = np.empty(self.frame_stack, dtype=np.int64)
        for j, frame in enumerate(frames):
            same = j > 0 and np.array_equal(frame, frames[j - 1])
            ids[j] = ids[j - 1] if same else self._push_frame(env, frame)
        return ids

    def add(self, obs, next_obs, action, reward, done, infos) -> None:
        """Dict obs/next_obs of (n_envs, ...) arrays, as SB3's `OffPolicyAlgorithm._store_transition` passes them."""
        pixels, next_pixels = np.asarray(obs[self.pixel_key]), np.asarray(next_obs[self.pixel_key])
        for env in range(self.n_envs):
            if self._episode_start[env]:
                self._stack_ids[env] = self._push_stack(env, pixels[env])
            elif not np.array_equal(pixels[env, : self.channels], self._last_first_frame[env]):
                raise ValueError(
                    "FrameReplayBuffer needs consecutive observations to be frame stacks shifted by one frame; "
                    "got an observation that does not continue the previous next_obs (wrapped env?)"
                )
            newest = self._push_frame(env, next_pixels[env, -self.channels :])
            self.obs_ids[self.pos, env] = self._stack_ids[env]
            self.next_obs_ids[self.pos, env] = np.append(self._stack_ids[env, 1:], newest)
            if done[env]:
                self._episode_start[env] = True
            else:
                self._episode_start[env] = False
                self._stack_ids[env] = self.next_obs_ids[self.pos, env]
        self._last_first_frame = next_pixels[:, : self.channels].copy()  # obs[t+1] must equal next_obs[t]
        for key in self.other_keys:
            self.observations[key][self.pos] = obs[key]
            self.next_observations[key][self.pos] = next_obs[key]
        self.actions[self.pos] = np.asarray(action).reshape(self.n_envs, self.action_dim)
        self.rewards[self.pos] = reward
        self.dones[self.pos] = done
        if self.handle_timeout_termination:
            self.timeouts[self.pos] = [info.get("TimeLimit.truncated", False) for info in infos]
        self.pos += 1
        if self.pos == self.buffer_size:
            self.full, self.pos = True, 0

    # ------------------------------------------------------------------------------------------------ saving
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        # Frames are pickled from host memory, so the buffer loads on a machine without that GPU too.
        state["frames"] = self.frames.cpu()
        state["storage_device"] = torch.device("cpu")
        return state

    def set_device(self, device: torch.device | str) -> None:
        """Serve samples on `device`, keeping the frames there when they fit (as at construction)."""
        self.device = torch.device(device)
        self.frames = self._place(self.frames.cpu())

    def _place(self, frames: torch.Tensor) -> torch.Tensor:
        """Host `frames` moved to the storage device chosen for `self.device`."""
        self.storage_device = choose_storage_device(self.device, frames.numel() * frames.element_size())
        if self.storage_device.type == "cpu" and self.device.type == "cuda":
            frames = frames.pin_memory()  # pinned host fallback when the frames do not fit on the GPU
        return frames.to(self.storage_device)

    def truncate_last_trajectory(self) -> None:
        """The next `add` starts new episodes (as after a resumed run re-creates its envs). The transitions
        already stored keep their own next_obs, so they stay valid and bootstrap as before."""
        self._episode_start[:] = True

    # ------------------------------------------------------------------------------------------------ reads
    def _valid(self, index: np.ndarray, env: np.ndarray) -> np.ndarray:
        oldest_kept = self.frames_pushed[env] - self.frame_capacity
        return self.obs_ids[index, env].min(axis=1) >= oldest_kept

    def valid_ranges(self) -> tuple[int, int, np.ndarray]:
        """(start, count, skip): transitions in insertion order are slots (start + k) % buffer_size for
        k < count; for env e the first skip[e] of them have frames already overwritten. A stack's first frame id
        never decreases in insertion order, so the invalid ones are always the oldest: a binary search per env."""
        count = self.buffer_size if self.full else self.pos
        start = self.pos if self.full else 0
        oldest_kept = self.frames_pushed - self.frame_capacity  # (n_envs,)
        skip = np.zeros(self.n_envs, dtype=np.int64)
        for env in range(self.n_envs):
            low, high = 0, count  # first k whose stack is still fully in the ring
            while low < high:
                middle = (low + high) // 2
                if self.obs_ids[(start + middle) % self.buffer_size, env, 0] < oldest_kept[env]:
                    low = middle + 1
                else:
                    high = middle
            skip[env] = low
        return start, count, skip

    def sample(self, batch_size: int, env=None) -> DictReplayBufferSamples:
        """Uniform over the valid (transition, env) pairs only: an overwritten stack cannot be drawn."""
        start, count, skip = self.valid_ranges()
        valid = count - skip  # (n_envs,)
        if valid.sum() <= 0:
            raise ValueError("FrameReplayBuffer has no valid transition to sample yet")
        ends = np.cumsum(valid)
        flat = np.random.randint(0, int(ends[-1]), size=batch_size)
        env_index = np.searchsorted(ends, flat, side="right")
        k = flat - (ends - valid)[env_index] + skip[env_index]
        return self._get_samples((start + k) % self.buffer_size, env_index)

    def _stacks(self, ids: np.ndarray, env_index: np.ndarray) -> torch.Tensor:
        # Rows of a flat (slots·envs, C·H·W) view: index_select copies whole frames, where indexing
        # frames[slots, envs] gathered byte by byte (≈ 4× slower: `python -m experiments.benchmark sac`).
        rows = (ids % self.frame_capacity) * self.n_envs + np.asarray(env_index)[:, None]  # (B, k)
        rows = torch.as_tensor(rows.reshape(-1), device=self.storage_device)
        stacks = self.frames.view(-1, self.frames[0, 0].numel()).index_select(0, rows)
        stacks = stacks.view(len(env_index), -1, *self.frame_shape[1:])  # (B, k*C, H, W) uint8
        return stacks.to(self.device, non_blocking=True)

    def _get_samples(self, index: np.ndarray, env_index: np.ndarray, env=None) -> DictReplayBufferSamples:
        obs = {self.pixel_key: self._stacks(self.obs_ids[index, env_index], env_index)}
        next_obs = {self.pixel_key: self._stacks(self.next_obs_ids[index, env_index], env_index)}
        for key in self.other_keys:
            obs[key] = self.to_torch(self.observations[key][index, env_index])
            next_obs[key] = self.to_torch(self.next_observations[key][index, env_index])
        # Only true terminations stop bootstrapping; time-limit truncations do not.
        dones = self.dones[index, env_index] * (1 - self.timeouts[index, env_index])
        return DictReplayBufferSamples(
            observations=obs,
            actions=self.to_torch(self.actions[index, env_index]),
            next_observations=next_obs,
            dones=self.to_torch(dones.reshape(-1, 1)),
            rewards=self.to_torch(self.rewards[index, env_index].reshape(-1, 1)),
        )

    def nbytes(self) -> int:
        arrays = [self.obs_ids, self.next_obs_ids, self.actions, self.rewards, self.dones, self.timeouts]
        arrays += list(self.observations.values()) + list(self.next_observations.values())
        return self.frames.numel() * self.frames.element_size() + sum(a.nbytes for a in arrays)


class TaskReplayBuffer(DictReplayBuffer):
    """SB3's `DictReplayBuffer` for a multi-task observation (envs.multitask, its `task` key): with
    `set_task_weights(w)`, each batch draws its number of samples per task from a multinomial over `w` (restricted
    to the tasks the buffer holds) and each task's samples uniformly among its transitions; without weights, it
    samples stored transitions uniformly, as SB3 does. experiments.train sets the task sampler's weights
    (`TrainConfig.task_replay` 'sampler'), so the replay's task mix follows the sampler and not the episodes that
    happen to be stored.

    `normalize_task_rewards`: each sampled reward of task t is multiplied by s / s_t, s_t the std of task t's
    stored rewards (at least `MIN_REWARD_STD`) and s their mean over the stored tasks: every task's rewards (hence
    its Q values and TD errors) get the same spread, while the overall scale stays that of the raw rewards. A
    shared critic otherwise fits the task whose returns are largest and ignores the rest (the multi-task failure
    PopArt addresses, Hessel et al. 2019); SAC's per-task temperatures absorb the change of scale."""

    MIN_REWARD_STD = 1e-2

    def __init__(self, *args, normalize_task_rewards: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.normalize_task_rewards = normalize_task_rewards
        if TASK_KEY not in self.observations:
            raise ValueError(
                f"TaskReplayBuffer needs a multi-task observation with a {TASK_KEY!r} key (envs.multitask); got keys "
                f"{sorted(self.observations)}"
            )
        self.num_tasks = task_count(self.observation_space)
        self.task_weights: np.ndarray | None = None

    def set_task_weights(self, weights) -> None:
        """Per-task sampling weights (normalised here), or None for uniform over stored transitions."""
        if weights is None:
            self.task_weights = None
            return
        weights = np.asarray(weights, dtype=np.float64).reshape(-1)
        if weights.shape != (self.num_tasks,) or np.any(weights < 0) or not np.isfinite(weights).all():
            raise ValueError(
                f"task weights must be {self.num_tasks} finite non-negative numbers, got {weights.tolist()}"
            )
        if weights.sum() <= 0:
            raise ValueError(f"task weights must not all be 0, got {weights.tolist()}")
        self.task_weights = weights / weights.sum()

    def sample(self, batch_size: int, env=None) -> DictReplayBufferSamples:
        if self.task_weights is None:
            return super().sample(batch_size, env=env)
        tasks = self._stored_tasks()
        held = np.bincount(tasks, minlength=self.num_tasks) > 0
        weights = np.where(held, self.task_weights, 0.0)
        if weights.sum() <= 0:  # none of the weighted tasks is stored yet: uniform over what is
            weights = held.astype(np.float64)
        counts = np.random.multinomial(batch_size, weights / weights.sum())
        flat = np.concatenate(
            [
                np.random.choice(np.flatnonzero(tasks == task), size=count)
                for task, count in enumerate(counts)
                if count
            ]
        )
        return self._samples_at(*np.divmod(flat, self.n_envs), env=env)

    def _stored_tasks(self) -> np.ndarray:
        """The task index of every stored transition, flat in (step, env) row-major order, int64."""
        upper = self.buffer_size if self.full else self.pos
        return self.observations[TASK_KEY][:upper].reshape(-1).astype(np.int64)

    def reward_scales(self) -> np.ndarray:
        """(num_tasks,) the factor s / s_t each task's rewards are multiplied by (1 for a task not stored)."""
        tasks = self._stored_tasks()
        rewards = self.rewards[: self.buffer_size if self.full else self.pos].reshape(-1).astype(np.float64)
        count = np.bincount(tasks, minlength=self.num_tasks)
        held = count > 0
        mean = np.bincount(tasks, rewards, self.num_tasks) / np.maximum(count, 1)
        var = np.bincount(tasks, rewards**2, self.num_tasks) / np.maximum(count, 1) - mean**2
        std = np.maximum(np.sqrt(np.maximum(var, 0.0)), self.MIN_REWARD_STD)
        return np.where(held, std[held].mean() / std if held.any() else 1.0, 1.0)

    def _get_samples(self, batch_inds, env=None) -> DictReplayBufferSamples:
        """SB3's uniform draw (no task weights): the env of each sample drawn at random, as SB3 does."""
        return self._samples_at(batch_inds, np.random.randint(0, self.n_envs, size=len(batch_inds)), env=env)

    def _samples_at(self, batch_inds, env_indices, env=None) -> DictReplayBufferSamples:
        """`DictReplayBuffer._get_samples` at given (step, env) pairs (SB3's draws the env at random)."""
        obs = self._normalize_obs(
            {k: o[batch_inds, env_indices, :] for k, o in self.observations.items()}, env
        )
        next_obs = self._normalize_obs(
            {k: o[batch_inds, env_indices, :] for k, o in self.next_observations.items()}, env
        )
        dones = self.dones[batch_inds, env_indices] * (1 - self.timeouts[batch_inds, env_indices])
        rewards = self._normalize_reward(self.rewards[batch_inds, env_indices].reshape(-1, 1), env)
        if self.normalize_task_rewards:
            task = self.observations[TASK_KEY][batch_inds, env_indices].reshape(-1).astype(np.int64)
            rewards = (rewards * self.reward_scales()[task][:, None]).astype(np.float32)
        return DictReplayBufferSamples(
            observations={k: self.to_torch(v) for k, v in obs.items()},
            actions=self.to_torch(self.actions[batch_inds, env_indices]),
            next_observations={k: self.to_torch(v) for k, v in next_obs.items()},
            dones=self.to_torch(dones).reshape(-1, 1),
            rewards=self.to_torch(rewards),
        )
