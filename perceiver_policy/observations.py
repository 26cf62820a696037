"""Checking an observation against the policy's observation space, before it reaches the model.

SB3 accepts many malformed inputs silently (a missing Dict key, float pixels that would then be divided by 255 a
second time, an integer proprio vector). The Perceiver policies call `check_observation` on every `predict`:
a few attribute reads per key, no pass over the data.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from gymnasium import spaces


def _is_uint8(value) -> bool:
    return value.dtype == torch.uint8 if isinstance(value, torch.Tensor) else value.dtype == np.uint8


def _is_float(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point()
    return np.issubdtype(value.dtype, np.floating)


STATE_KEY = "state"  # = envs.dmc.STATE_KEY: the privileged state, for losses and probes, never a policy input


def sensor_space(space: spaces.Space) -> spaces.Space:
    """The observation space a policy is built on: the env's, without the privileged `state` key (which only the
    buffers and the losses see), so `predict`, evaluation and an exported actor need the sensor keys alone."""
    if isinstance(space, spaces.Dict) and STATE_KEY in space.spaces:
        return spaces.Dict({k: v for k, v in space.spaces.items() if k != STATE_KEY})
    return space


def without_state(observation):
    """The observation without the privileged `state` key (a batch from the env or a buffer may carry it)."""
    if isinstance(observation, Mapping) and STATE_KEY in observation:
        return {k: v for k, v in observation.items() if k != STATE_KEY}
    return observation


def check_observation(observation: Mapping, space: spaces.Dict) -> None:
    """Raise one ValueError naming the key, what was expected and what was received; return None if it fits.

    Accepts a single observation or a batch (leading dimension) per key, numpy arrays or tensors."""
    if not isinstance(observation, Mapping):
        raise ValueError(
            f"expected a dict observation with keys {sorted(space.spaces)}, got {type(observation).__name__}"
        )
    missing = sorted(set(space.spaces) - set(observation))
    extra = sorted(set(observation) - set(space.spaces))
    if missing or extra:
        raise ValueError(
            f"observation keys do not match the policy's observation space: missing {missing}, unexpected "
            f"{extra}; expected exactly {sorted(space.spaces)}"
        )
    for key, sub in space.spaces.items():
        value = observation[key]
        if not hasattr(value, "shape"):
            value = np.asarray(value)
        shape = tuple(value.shape)
        if shape != sub.shape and shape[1:] != sub.shape:
            raise ValueError(
                f"observation {key!r}: expected shape {sub.shape} or (batch, *{sub.shape}), got {shape}"
            )
        if isinstance(sub, spaces.Box) and sub.dtype == np.uint8 and not _is_uint8(value):
            raise ValueError(
                f"observation {key!r}: expected uint8 (the policy scales pixels itself, once), got {value.dtype}; "
                "pass the env's uint8 frames, not frames already scaled to floats"
            )
        if isinstance(sub, spaces.Box) and np.issubdtype(sub.dtype, np.floating) and not _is_float(value):
            raise ValueError(f"observation {key!r}: expected a float array ({sub.dtype}), got {value.dtype}")
        if isinstance(sub, spaces.Box) and np.issubdtype(
            sub.dtype, np.integer
        ):  # an index (a multi-task `task`)
            low, high = int(np.min(sub.low)), int(np.max(sub.high))
            values = value if isinstance(value, torch.Tensor) else np.asarray(value)
            if int(values.min()) < low or int(values.max()) > high:
                raise ValueError(
                    f"observation {key!r}: {values.flatten().tolist()[:8]} outside the policy's range [{low}, {high}] "
                    "(a task index the policy was not trained with: fine-tune it with --init-from first)"
                )
    check_finite(observation, space)


def check_finite(observation: Mapping, space: spaces.Dict) -> None:
    """NaN / inf in a float key is an error naming the key. One sum per key and one check for all of them (a
    finite total of finite values is the common case); only a non-finite total looks for the key."""
    floats = [k for k, sub in space.spaces.items() if np.issubdtype(sub.dtype, np.floating)]
    sums = [
        observation[k].sum() if hasattr(observation[k], "sum") else np.sum(observation[k]) for k in floats
    ]
    if not sums or np.isfinite(float(sum(sums))):
        return
    for key in floats:
        value = observation[key]
        finite = torch.isfinite(value).all() if isinstance(value, torch.Tensor) else np.isfinite(value).all()
        if not bool(finite):
            raise ValueError(
                f"observation {key!r} holds NaN or inf values; a policy acts only on finite observations "
                "(check the sensor, or train with --sanitize-nonfinite to replace them by 0)"
            )


class SensorObservations:
    """Mixin for SB3 policies built on `sensor_space`: `obs_to_tensor` drops the privileged `state` key, then
    `check_observation` (missing / extra keys, shapes, uint8 pixels, dtypes, NaN / inf), then SB3's conversion."""

    def obs_to_tensor(self, observation):
        if isinstance(self.observation_space, spaces.Dict):
            observation = without_state(observation)
            check_observation(observation, self.observation_space)
        return super().obs_to_tensor(observation)
