"""Results kept while the tensors they were computed from keep their values.

A version counter alone does not say that a tensor is unchanged: torch's fused Adam (`fused=True`, the policies'
optimizer, `perceiver_policy.policies.fused_adam`) writes parameters in place without bumping their version, and
so does any write through `.data`. A kept result is therefore checked against a copy of its sources' values.
Keyed on versions only, the conv stem's border correction kept from the weights of a run's first no-gradient pass
was used in every later one (the DrQ target, acting, evaluation), and `experiments.evaluate` on a checkpoint
disagreed with the run's own final evaluation (docs/results.md)."""

from __future__ import annotations

import torch


def snapshot(sources) -> tuple[torch.Tensor, ...]:
    """Copies of the values of `sources` (small tensors: weights, a mean frame)."""
    return tuple(t.detach().clone() for t in sources)


def unchanged(kept: tuple[torch.Tensor, ...], sources) -> bool:
    """Whether every source still holds the values, shape, dtype and device that `kept` copied."""
    sources = tuple(sources)
    return len(kept) == len(sources) and all(
        a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b.detach())
        for a, b in zip(kept, sources)
    )


class Kept:
    """One kept result: `get(key, sources)` returns it while `key` is the same and the sources' values are;
    `put(key, sources, value)` keeps a new one; `fetch(key, sources, compute)` does both."""

    __slots__ = ("key", "values", "value")

    def __init__(self) -> None:
        self.key, self.values, self.value = None, (), None

    def get(self, key, sources):
        if self.value is not None and self.key == key and unchanged(self.values, sources):
            return self.value
        return None

    def put(self, key, sources, value):
        self.key, self.values, self.value = key, snapshot(sources), value
        return value

    def fetch(self, key, sources, compute):
        """The kept result, or `compute()` kept in its place."""
        value = self.get(key, sources)
        return self.put(key, sources, compute()) if value is None else value

    def clear(self) -> None:
        self.key, self.values, self.value = None, (), None
