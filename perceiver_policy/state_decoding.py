"""The Perceiver IO decoder as a state estimator: one output query per state sensor decodes the true state.

Trained by an auxiliary MSE loss (``aux_state_weight``) against the privileged full state (the ``state``
observation key, which no policy input ever reads). Targets are standardised by running statistics so that
every sensor counts alike whatever its units (angles ~1, velocities ~10); the loss is the mean over sensors of
each sensor's mean squared error in those units.
"""

from __future__ import annotations

import torch
from torch import nn

from perceiver_policy.config import PerceiverConfig
from perceiver_policy.model import LearnedQueries, PerceiverDecoder, init_weights


class RunningStandardizer(nn.Module):
    """Per-dimension running mean / variance (parallel Welford), saved with the module's state.

    The scale is sqrt(max(var, min_var) + eps): a near-constant sensor (a variance far below its siblings') is
    not amplified into a loss that dwarfs the others; with `min_var` = 1e-2 a sensor is scaled by at most 10x."""

    def __init__(self, dim: int, eps: float = 1e-4, min_var: float = 1e-2):
        super().__init__()
        self.eps, self.min_var = eps, min_var
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """x: (B, dim)."""
        batch = x.shape[0]
        mean, var = x.mean(0), x.var(0, unbiased=False)
        total = self.count + batch
        delta = mean - self.mean
        self.mean += delta * batch / total
        self.var.copy_((self.var * self.count + var * batch + delta**2 * self.count * batch / total) / total)
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale()

    def scale(self) -> torch.Tensor:
        return torch.sqrt(self.var.clamp_min(self.min_var) + self.eps)


class StateDecoder(nn.Module):
    """latents (B, M, D) -> standardised state (B, S): query s reads sensor s of `layout` ({name: (start, stop)})."""

    def __init__(self, layout: dict[str, tuple[int, int]], config: PerceiverConfig):
        super().__init__()
        if not layout:
            raise ValueError("StateDecoder needs a non-empty state layout {sensor: (start, stop)}")
        self.names = list(layout)
        self.spans = [tuple(map(int, layout[name])) for name in self.names]
        width = max(stop - start for start, stop in self.spans)
        state_dim = max(stop for _, stop in self.spans)
        self.queries = LearnedQueries(len(self.names), config.latent_dim, config.init_std)
        self.decoder = PerceiverDecoder(config)
        self.head = nn.Linear(config.latent_dim, width)
        # Where each state dimension sits in the flattened (S * width) head outputs.
        index = torch.zeros(state_dim, dtype=torch.long)
        for sensor, (start, stop) in enumerate(self.spans):
            index[start:stop] = sensor * width + torch.arange(stop - start)
        self.register_buffer("output_index", index, persistent=False)
        self.standardizer = RunningStandardizer(state_dim)
        init_weights(self.head)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        out = self.decoder(self.queries(latents.shape[0]), latents)  # (B, S, D)
        return self.head(out).flatten(1)[:, self.output_index]  # (B, state_dim), standardised units

    def loss(self, latents: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """(mean over sensors of the per-sensor MSE, {sensor: MSE}); updates the running statistics in training."""
        state = state.float()
        if self.training:
            self.standardizer.update(state)
        error = (self(latents) - self.standardizer(state)) ** 2  # (B, state_dim)
        per_sensor = torch.stack([error[:, a:b].mean() for a, b in self.spans])
        metrics = dict(zip(self.names, per_sensor.detach().tolist()))
        return per_sensor.mean(), metrics

    def predict(self, latents: torch.Tensor) -> torch.Tensor:
        """The decoded state in the simulator's units, (B, state_dim)."""
        scale = self.standardizer.scale()
        return self(latents) * scale + self.standardizer.mean


def make_state_decoder(observation_space, config: PerceiverConfig) -> StateDecoder | None:
    """A decoder for the privileged `state` key of a Dict space (with its sensor layout), else None."""
    from perceiver_policy.modalities import STATE_KEY

    space = getattr(observation_space, "spaces", {}).get(STATE_KEY)
    if space is None:
        return None
    layout = getattr(space, "layout", None) or {STATE_KEY: (0, int(space.shape[0]))}
    return StateDecoder(layout, config)
