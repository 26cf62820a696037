"""Host -> device transfer of batched Dict observations (one copy per key per step)."""

from __future__ import annotations

import numpy as np
import torch


class ObservationTransfer:
    """Moves `{key: (n_envs, ...)}` numpy observations to the policy's device as one batch per key.

    On CUDA each key goes through a persistent pinned staging tensor and a non-blocking copy (pinning a fresh
    array every step would cost more than it saves). On CPU the arrays are wrapped without a copy; note that
    `Tensor.pin_memory()` raises on CPU-only torch builds, so pinning is used only when CUDA is present.
    uint8 pixels stay uint8: the model casts them.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.pinned = self.device.type == "cuda" and torch.cuda.is_available()
        self._staging: dict[str, torch.Tensor] = {}

    def __call__(self, obs: dict[str, np.ndarray] | np.ndarray):
        if not isinstance(obs, dict):
            return self._one("_", obs)
        return {key: self._one(key, value) for key, value in obs.items()}

    def _one(self, key: str, value: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(np.ascontiguousarray(value))
        if not self.pinned:
            return host.to(self.device)
        staging = self._staging.get(key)
        if staging is None or staging.shape != host.shape or staging.dtype != host.dtype:
            staging = self._staging[key] = torch.empty_like(host).pin_memory()
        staging.copy_(host)
        # Safe to reuse the staging tensor next step: the policy's output is read back (synchronising) first.
        return staging.to(self.device, non_blocking=True)


def stack_observations(observations: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A list of single-env Dict observations -> one batched Dict."""
    return {key: np.stack([obs[key] for obs in observations]) for key in observations[0]}
