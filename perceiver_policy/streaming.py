"""Streaming inference: at each env step, embed only what is new in the observation window.

Consecutive observations overlap: a frame stack of F frames shares F-1 frames with the previous step, and an
action or proprio history of T steps shares T-1. Each image token's content depends only on its own frame's
patch and each sequence token only on its own step, so their embeddings can be carried over. `StreamingTokens`
keeps, per modality of a streamed kind (frame stacks by default; histories too with
`kinds=("image", "sequence")`), the previous raw window and its content embeddings; when the new window's older
part equals the previous window's newer part (compared per sample, so resets and batched envs with different
episode boundaries are handled), it reuses those embeddings and embeds only the newest frame / step. The
projected Fourier position features (and the pixel-scaling-folded patch weights) are constant at inference and
computed once per weight version. Other modalities (proprio vectors; histories by default) are re-embedded every
step. Cross-attention and everything after it run in full. New frames go through the same per-frame
convolution as the full forward, so frame-stack tokens, and the actions, equal the full forward's bit for bit
(tested over whole episodes, including resets and missing modalities, and in closed loop); streamed histories
agree to float rounding (one step through a Linear vs all steps at once).

Usage::

    with streaming(model.policy) as stream:      # any policy with a Perceiver encoder
        action, _ = model.predict(obs, deterministic=True)
    stream.stats()  # {"stream_cache_hit_rate": ..., "stream_window_overlap": ...}

The cache is used only in eval mode without grad (inference); training forwards ignore it.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from perceiver_policy.kept import Kept
from perceiver_policy.modalities import ModalityAdapter
from perceiver_policy.model import PerceiverEncoder

WINDOWED_KINDS = ("image", "sequence")
STREAMED_KINDS = ("image",)
"""What streams by default: frame stacks. Re-embedding a history of T steps is one small Linear, cheaper at
batch 1 than comparing and splicing windows (benchmark streaming: 1.6-2.3x slower with histories streamed)."""


@dataclass
class _Window:
    raw: torch.Tensor  # the previous observation of this modality (B, ...)
    content: torch.Tensor  # its content embeddings per frame / step (B, W, P, D)


class StreamingTokens:
    """Per-modality token cache of one encoder; `tokens(name, x)` replaces `adapters[name](x)`."""

    def __init__(self, encoder, kinds: tuple[str, ...] = STREAMED_KINDS):
        bad = sorted(set(kinds) - set(WINDOWED_KINDS))
        if bad:
            raise ValueError(f"cannot stream modality kinds {bad}; valid choices: {list(WINDOWED_KINDS)}")
        self.encoder, self.kinds = encoder, tuple(kinds)
        self._windows: dict[str, _Window] = {}
        self._constants: dict[tuple, tuple[tuple, object]] = {}
        self.reused_tokens = self.total_tokens = 0
        self.overlap_sum = 0.0
        self.windows_seen = 0
        # {name: callable(x) -> tokens}: what the encoder calls instead of its `adapters` while streaming
        self.embedders = {name: functools.partial(self.tokens, name) for name in encoder.names}

    def stats(self) -> dict[str, float]:
        """Fraction of tokens whose embedding was reused, and the mean fraction of each window (frames / steps)
        shared with the previous one, since construction."""
        return {
            "stream_cache_hit_rate": self.reused_tokens / max(self.total_tokens, 1),
            "stream_window_overlap": self.overlap_sum / max(self.windows_seen, 1),
        }

    def _constant(self, name: str, what: str, sources: tuple[torch.Tensor, ...], compute, *extra):
        """`compute()` for one modality, recomputed only when a source tensor's values change (an optimizer step,
        load_state_dict: `perceiver_policy.kept`) or `extra` (dtype) changes."""
        return self._constants.setdefault((name, what), Kept()).fetch(extra, sources, compute)

    def tokens(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The same (B, N, D) tokens as `encoder.adapters[name](x)`."""
        adapter = self.encoder.adapters[name]
        if adapter.spec.kind not in self.kinds:
            content = adapter.embed(x)  # (B, N, D): embedded afresh
            self.total_tokens += content.shape[0] * content.shape[1]
        else:
            content = self._windowed(name, adapter, x).flatten(1, 2)  # (B, W * P, D)
        if adapter.use_position:
            # the projected position features (N, D); the dtype follows autocast, seen in the content's dtype
            position = adapter.position
            content = content + self._constant(
                name,
                "position",
                (position.weight,),
                lambda: position(adapter.position_features),
                content.dtype,
            )
        return content

    def _windowed(self, name: str, adapter: ModalityAdapter, x: torch.Tensor) -> torch.Tensor:
        """Content embeddings (B, W, P, D) of a window of W frames (P patches each) or W steps (P = 1)."""
        # The newest element of the window, along the stacked axis: the last frame's channels / the last step.
        step = adapter.spec.channels_per_frame if adapter.spec.kind == "image" else 1
        batch, width = x.shape[0], x.shape[1] // step

        folded = None
        if adapter.spec.kind == "image":  # the pixel-scaling-folded patch weights
            linear = adapter.content
            folded = self._constant(name, "folded", (linear.weight, linear.bias), adapter._folded)

        def embed(part: torch.Tensor) -> torch.Tensor:  # (b, w * step, ...) -> (b, w, P, D)
            # The same kernel as the full forward (a per-frame convolution): the tokens, and so the actions, are
            # the full forward's bit for bit. (Explicit patches @ W are faster for one frame, 79 vs 137 us, but
            # differ in the last bits, and a closed-loop episode amplifies that into another trajectory.)
            out = adapter.embed(part, folded) if folded is not None else adapter.embed(part)
            return out.view(part.shape[0], part.shape[1] // step, -1, out.shape[-1])

        previous = self._windows.get(name)
        match = None
        if previous is not None and previous.raw.shape == x.shape and width > 1:
            match = shifted_by_one(x, previous.raw, step)
        if match is None or not bool(match.any()):
            content = embed(x)
            hits = 0
        elif bool(match.all()):
            content = torch.cat([previous.content[:, 1:], embed(x[:, -step:])], dim=1)
            hits = batch
        else:  # some samples continue their episode, others were reset
            content = torch.empty_like(previous.content)
            content[match] = torch.cat([previous.content[match, 1:], embed(x[match, -step:])], dim=1)
            content[~match] = embed(x[~match])
            hits = int(match.sum())
        self._windows[name] = _Window(x.clone(), content)
        tokens_per_element = content.shape[2]
        self.reused_tokens += hits * (width - 1) * tokens_per_element
        self.total_tokens += batch * width * tokens_per_element
        self.overlap_sum += hits * (width - 1) / width
        self.windows_seen += batch
        return content


def shifted_by_one(new: torch.Tensor, old: torch.Tensor, step: int) -> torch.Tensor:
    """(B,) bool: new[b, :-step] == old[b, step:] exactly, i.e. the window moved on by one frame / step.
    Compared as 8-byte words when the rows allow it (8x fewer elements than uint8 pixels)."""
    a, b = new[:, :-step].flatten(1), old[:, step:].flatten(1)  # (B, L)
    size = a.element_size()
    aligned = all(t.is_contiguous() and t.storage_offset() * size % 8 == 0 for t in (a, b))
    if aligned and a.shape[1] * size % 8 == 0:
        a, b = a.view(torch.int64), b.view(torch.int64)
    return (a == b).all(dim=1)


def encoder_of(policy):
    """The Perceiver encoder of a policy (PPO/A2C or SAC), or None (also for a convolutional encoder)."""
    encoder = getattr(policy, "encoder", None)
    return encoder if isinstance(encoder, PerceiverEncoder) else None


def applies(policy, kinds: tuple[str, ...] = STREAMED_KINDS) -> bool:
    """Whether streaming changes anything: a Perceiver encoder reading a modality of a streamed kind. Not for an
    encoder that also reads a reference observation in each pass (`center_features='reference'`): its batch
    carries the reference beside the stream, so it runs uncached."""
    encoder = encoder_of(policy)
    if encoder is None or getattr(encoder, "reference", False):
        return False
    return any(spec.kind in kinds for spec in encoder.specs)


@contextlib.contextmanager
def streaming(policy, enabled: bool = True, kinds: tuple[str, ...] = STREAMED_KINDS):
    """Serve the policy's encoder from a `StreamingTokens` cache inside the block; yields the cache, or None
    (and nothing changes) when `enabled` is False or streaming does not apply (see `applies`)."""
    if not enabled or not applies(policy, kinds):
        yield None
        return
    encoder = encoder_of(policy)
    cache = StreamingTokens(encoder, kinds)
    previous, encoder.token_cache = encoder.token_cache, cache
    try:
        yield cache
    finally:
        encoder.token_cache = previous
