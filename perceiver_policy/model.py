"""Perceiver IO: modality adapters -> gated cross-attention into latents -> latent self-attention -> output queries.

obs (Dict) --adapters--> tokens (B, N, D) --cross-attn--> latents (B, M, D) --self-attn x L--> latents
queries (B, Q, D) --cross-attn over latents--> outputs (B, Q, D) --heads--> logits / Gaussian / values / Q
"""

from __future__ import annotations

import contextlib
import functools
import math
import platform
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from perceiver_policy.attention import ABSENT_LOGIT, QueryCrossAttention, SelfAttentionLayer
from perceiver_policy.config import SHARED_GROUP, PerceiverConfig
from perceiver_policy.cross_attention import GatedCrossAttention
from perceiver_policy.modalities import (
    ABSENT_KEY,
    ADAPTERS,
    ON_IMAGE_KINDS,
    PRESENT_SUFFIX,
    TASK_KEY,
    build_specs,
    task_count,
)


def init_weights(module: nn.Module, std: float | None = None) -> None:
    """The one place Linear layers are initialised: truncated normal with variance 1/fan_in (LeCun, as
    DeepMind's Perceiver uses variance scaling), zero biases. `std` overrides the scale (tests only).

    A fixed 0.02 (right for 768-wide transformers) is ~6x too small at 64 channels: the input-dependent part
    of the latents then drowns under the learned latent array and the policy barely sees its inputs."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            scale = std if std is not None else sub.in_features**-0.5
            nn.init.trunc_normal_(sub.weight, std=scale, a=-2 * scale, b=2 * scale)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@functools.lru_cache(maxsize=1)
def cpu_model_and_flags() -> tuple[str, list[str]]:
    """The CPU's model name and which of the instruction sets that decide fp32 / bf16 speed it has (Linux)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), []
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if "model name" in line), "?")
    flags = set(
        next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    )
    return model, [flag for flag in CPU_FLAGS if flag in flags]


def cpu_has_native_bf16() -> bool:
    """bf16 arithmetic in hardware (AVX512-BF16 or AMX); without it CPU autocast to bf16 is emulated and slow."""
    return any(flag in cpu_model_and_flags()[1] for flag in ("avx512_bf16", "amx_bf16"))


def autocast_context(config: PerceiverConfig, device: torch.device):
    """bf16 autocast when the config asks for it, on CUDA or on CPU; a free no-op context otherwise (entering a
    disabled torch.autocast still costs tens of microseconds per call, which shows at batch 1)."""
    if config.dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class TaskStems(nn.Module):
    """`PerceiverConfig.task_stems`: a per-task residual to the content projection of each vector and sequence
    modality, (n_tasks, token_dim, D) per modality, zero at initialisation (every task starts from the shared
    projection; a task added later for fine-tuning starts there too)."""

    KINDS = ("vector", "sequence")

    def __init__(self, specs, num_tasks: int, dim: int):
        super().__init__()
        self.weights = nn.ParameterDict(
            {
                spec.name: nn.Parameter(torch.zeros(num_tasks, spec.token_dim, dim))
                for spec in specs
                if spec.kind in self.KINDS
            }
        )

    def forward(self, name: str, content: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """content (B, N, W) raw token features, task (B,) long -> the residual tokens (B, N, D)."""
        weight = self.weights[name][task]  # (B, W, D)
        return torch.einsum("bnw,bwd->bnd", content.to(weight.dtype), weight)


class PerceiverEncoder(nn.Module):
    """Reads a Dict observation into latents (B, M, D).

    Missing modalities: a key absent from `obs` (or listed in `disabled_modalities`) contributes no tokens; a
    per-sample flag in `absent` ({name: (B,) bool}), or in the observation's `absent_modalities` (B, n) flags
    (from `envs.wrappers.ModalityDropout`, PPO-safe), masks that sample's tokens with the same result. In
    training, `config.encoder_modality_dropout` flags whole modalities absent per sample (never all of one sample's).

    `reference=True` (a policy's `center_features='reference'`): the encoder returns latents(obs) -
    latents(reference), where the reference is the first observation it reads (captured once, saved with the
    weights as `reference_<key>` buffers). Both terms come from the same weights in the same pass, so everything
    that does not depend on the input (the latent array, position and modality embeddings, the attention's
    average over background tokens) cancels exactly at every update. Without it the latents of 84 px cartpole
    frames vary by ~1 % across states at initialisation (a CNN's features by ~60 %), and heads trained on them
    lean on whichever other modality varies more (docs/results.md). The reference row reads every modality;
    what a batch withholds (a missing key, per-sample `absent` flags) is withheld from its own rows only.
    """

    def __init__(
        self, observation_space: spaces.Dict, config: PerceiverConfig | None = None, reference: bool = False
    ):
        super().__init__()
        self.config = config = config or PerceiverConfig()
        self.specs = build_specs(observation_space, config)
        self.names = tuple(spec.name for spec in self.specs)
        # Keys whose tokens can be flagged absent one by one ('<key>_present': a multi-task env's sensor slots).
        self.slot_flagged = tuple(
            spec.name for spec in self.specs if spec.name + PRESENT_SUFFIX in observation_space.spaces
        )
        for name in self.slot_flagged:
            flags = observation_space.spaces[name + PRESENT_SUFFIX].shape
            spec = self.specs[self.names.index(name)]
            if flags != (spec.num_tokens,):
                raise ValueError(
                    f"{name + PRESENT_SUFFIX!r} flags {flags[0] if flags else 0} sensor slots but {name!r} is read as "
                    f"{spec.num_tokens} tokens; one token per sensor needs proprio_tokens 'sensor'"
                )
        self.adapters = nn.ModuleDict({spec.name: ADAPTERS[spec.kind](spec, config) for spec in self.specs})
        dim = config.latent_dim
        self.modality_embedding = nn.Parameter(torch.empty(len(self.specs), dim))
        self.latents = nn.Parameter(torch.empty(config.num_latents, dim))
        depth = config.self_attn_layers * (1 if config.share_repeat_weights else config.self_attn_repeats)
        # Stochastic depth grows linearly over the residual blocks, cross-attention first; the deepest gets
        # `drop_path` (with one self-attention layer: cross-attention drop_path / 2, the layer drop_path).
        rates = [config.drop_path * (i + 1) / (depth + 1) for i in range(depth + 1)]
        self.cross_attention = GatedCrossAttention(
            dim,
            config.cross_attn_heads,
            config.num_latents,
            len(self.specs),
            config.widening_factor,
            config.dropout,
            config.attn_dropout,
            config.modality_gating,
            tokens_per_modality=[spec.num_tokens for spec in self.specs],
            drop_path=rates[0],
        )
        self.self_attention = nn.ModuleList(
            SelfAttentionLayer(
                dim,
                config.self_attn_heads,
                config.widening_factor,
                config.dropout,
                config.attn_dropout,
                rates[i + 1],
            )
            for i in range(depth)
        )
        self.final_norm = nn.LayerNorm(dim)
        num_tasks = task_count(observation_space)
        self.task_stems = TaskStems(self.specs, num_tasks, dim) if config.task_stems and num_tasks else None
        self.disabled_modalities: set[str] = set()
        self.num_active_latents = config.num_latents  # k of the nested latents (`set_num_latents`)
        # missing_tokens 'mask': one learned mask token per modality; latent_groups: each latent's modality (-1: shared)
        self.mask_tokens = (
            nn.Parameter(torch.zeros(len(self.specs), dim)) if config.missing_tokens == "mask" else None
        )
        self.register_buffer("latent_group", self._latent_groups(config), persistent=False)
        self._latent_token_bias_cache: dict = {}
        self.capture_attention = False
        self.last_capture: dict | None = None
        # A perceiver_policy.streaming.StreamingTokens while streaming (inference only): reuses the embeddings of
        # the frames / steps the previous observation's window already had.
        self.token_cache = None
        self._modality_index_cache: dict = {}
        init_weights(self)
        for param in (
            self.modality_embedding,
            self.latents,
            *([self.mask_tokens] if self.mask_tokens is not None else []),
        ):
            nn.init.trunc_normal_(param, std=config.init_std, a=-2 * config.init_std, b=2 * config.init_std)
        for adapter in self.adapters.values():
            adapter.reset_position_baseline()
        self.reference = bool(reference)
        if self.reference:
            if num_tasks or self.slot_flagged:
                raise ValueError(
                    "center_features 'reference' centres one body's latents on one reference observation; "
                    "multi-task observations (a task index, sensor-slot flags) take center_features 'none'"
                )
            for spec in self.specs:
                space = observation_space[spec.name]
                dtype = torch.uint8 if space.dtype == np.uint8 else torch.float32
                self.register_buffer(f"reference_{spec.name}", torch.zeros((1, *space.shape), dtype=dtype))
            self.register_buffer("reference_initialised", torch.zeros((), dtype=torch.bool))

    @property
    def num_tokens(self) -> dict[str, int]:
        return {spec.name: spec.num_tokens for spec in self.specs}

    def _latent_groups(self, config: PerceiverConfig) -> torch.Tensor | None:
        """(M,) long: the modality index each latent reads (-1: every modality), or None without groups."""
        if not config.latent_groups:
            return None
        unknown = sorted(set(config.latent_groups) - set(self.names) - {SHARED_GROUP})
        if unknown:
            raise ValueError(
                f"latent_groups names {unknown}, which this observation does not have; valid choices: "
                f"{[*self.names, SHARED_GROUP]}"
            )
        index = [
            self.names.index(g) if g != SHARED_GROUP else -1
            for g, n in config.latent_groups.items()
            for _ in range(n)
        ]
        return torch.tensor(index, dtype=torch.long)

    def _latent_token_bias(self, present: tuple[int, ...], device) -> torch.Tensor | None:
        """(M, N) additive logits of each latent for each token, or None: with latent_groups, ABSENT_LOGIT where a
        latent may not read a token (another group's modality; shared latents read all); with image_locality,
        each placed latent's place prior on the image tokens (`_locality_bias`)."""
        if self.latent_group is None and not self.config.image_locality:
            return None
        key = (present, device)
        if key not in self._latent_token_bias_cache:
            modality_index = self._modality_index(present, device).cpu()
            bias = torch.zeros(len(self.latents), len(modality_index))
            if self.latent_group is not None:
                group = self.latent_group.cpu()
                allowed = (group[:, None] == -1) | (group[:, None] == modality_index[None, :])
                bias = torch.where(allowed, 0.0, ABSENT_LOGIT)
            if self.config.image_locality:
                bias = bias + self._locality_bias(present, modality_index)
            self._latent_token_bias_cache[key] = bias.to(device)
        return self._latent_token_bias_cache[key]

    def _locality_bias(self, present: tuple[int, ...], modality_index: torch.Tensor) -> torch.Tensor:
        """(M, N): for each image modality, its latents (its group's, or all without groups) on a rows x cols grid
        over the token map; logit -d^2 / 2 for a token d spacings x image_locality from the latent's place,
        shifted per latent so that its attention mass on the image is what it was without the prior (the
        log-sum-exp over the image's tokens is log N)."""
        bias = torch.zeros(len(self.latents), len(modality_index))
        for m in present:
            spec = self.specs[m]
            if spec.kind not in ON_IMAGE_KINDS:
                continue
            placed = (
                torch.arange(len(self.latents))
                if self.latent_group is None
                else torch.nonzero(self.latent_group.cpu() == m).flatten()
            )
            if len(placed) == 0:
                continue
            height, width = spec.fourier_resolutions[-2:]
            rows = max(d for d in range(1, int(len(placed) ** 0.5) + 1) if len(placed) % d == 0)
            cols = len(placed) // rows
            # each latent's place, in token cells: the centres of a rows x cols partition of the map
            place_y = ((torch.arange(rows) + 0.5) * height / rows - 0.5).repeat_interleave(cols)
            place_x = ((torch.arange(cols) + 0.5) * width / cols - 0.5).repeat(rows)
            # each token's cell (row-major; patch tokens repeat the map once per frame)
            cell = torch.arange(spec.num_tokens) % (height * width)
            token_y, token_x = (cell // width).float(), (cell % width).float()
            scale = self.config.image_locality
            dy = (token_y[None, :] - place_y[:, None]) / (scale * height / rows)
            dx = (token_x[None, :] - place_x[:, None]) / (scale * width / cols)
            logits = -0.5 * (dy**2 + dx**2)  # (placed, N_m)
            logits = logits - logits.logsumexp(dim=1, keepdim=True) + math.log(spec.num_tokens)
            columns = torch.nonzero(modality_index == m).flatten()
            bias[placed[:, None], columns[None, :]] = logits
        return bias

    def set_num_latents(self, k: int) -> None:
        """Run with the first `k` latents (one of `config.latent_choices()`: those the policy was trained with)."""
        choices = self.config.latent_choices()
        if isinstance(k, bool) or not isinstance(k, int) or k not in choices:
            trained = (
                f"trained with latent_scaling {choices}"
                if self.config.latent_scaling
                else f"trained with all {self.config.num_latents} latents only (PerceiverConfig.latent_scaling is "
                "empty; train with latent_scaling to run at other sizes)"
            )
            raise ValueError(
                f"num_latents {k!r} is not available: this encoder was {trained}; valid choices: {choices}"
            )
        self.num_active_latents = k

    def _layer_sequence(self) -> list[nn.Module]:
        if (
            self.config.share_repeat_weights
        ):  # the same modules applied `repeats` times: no duplicated parameters
            return list(self.self_attention) * self.config.self_attn_repeats
        return list(self.self_attention)

    def _modality_index(self, present: tuple[int, ...], device) -> torch.Tensor:
        key = (present, device)
        if key not in self._modality_index_cache:
            counts = torch.tensor([self.specs[m].num_tokens for m in present])
            self._modality_index_cache[key] = torch.repeat_interleave(torch.tensor(present), counts).to(
                device
            )
        return self._modality_index_cache[key]  # (N,) long

    def _absent_flags(
        self, present: tuple[int, ...], batch: int, absent: Mapping | None, device
    ) -> torch.Tensor | None:
        """(B, n_present) bool of modalities absent per sample, or None when every sample has all of them."""
        flags = None
        if absent:
            unknown = sorted(set(absent) - set(self.names))
            if unknown:
                raise ValueError(f"unknown modalities {unknown} in absent; valid choices: {list(self.names)}")
            flags = torch.zeros(batch, len(present), dtype=torch.bool, device=device)
            for column, m in enumerate(present):
                if self.names[m] in absent:
                    flags[:, column] = (
                        torch.as_tensor(absent[self.names[m]], device=device).bool().reshape(batch)
                    )
            if bool(flags.all(dim=1).any()):
                raise ValueError("every modality is absent for some sample; at least one must be present")
        rate = self.config.encoder_modality_dropout
        if self.training and rate > 0 and len(present) > 1:
            drop = torch.rand(batch, len(present), device=device) < rate
            everything = drop.all(dim=1)
            keep = torch.randint(len(present), (batch,), device=device)
            drop[everything, keep[everything]] = False  # never drop all of a sample's modalities
            if flags is None:
                flags = drop
            else:  # on top of the caller's flags; where that would leave nothing, keep the caller's flags only
                combined = flags | drop
                flags = torch.where(combined.all(dim=1, keepdim=True), flags, combined)
        return flags

    def _slot_absent(self, obs, present, available, batch: int, device) -> torch.Tensor | None:
        """(B, N) bool: tokens of the sensor slots flagged absent ('<key>_present' == 0), or None."""
        if not any(name + PRESENT_SUFFIX in obs for name in self.slot_flagged):
            return None
        parts = []
        for m in present:
            key, count = self.names[m] + PRESENT_SUFFIX, self.specs[m].num_tokens
            if m in available and key in obs:
                parts.append(torch.as_tensor(obs[key], device=device).reshape(batch, count) < 0.5)
            else:
                parts.append(torch.zeros(batch, count, dtype=torch.bool, device=device))
        return torch.cat(parts, dim=1)

    def forward(
        self, obs: Mapping[str, torch.Tensor], absent: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """obs: {name: (B, ...)} -> latents (B, k, D) float32, k = `num_active_latents` (M unless set).

        With `config.missing_tokens == "mask"`, a modality missing from `obs` (or disabled) and one flagged absent
        for a sample enter as its learned mask tokens (same token count); otherwise their tokens get no attention.
        With `reference`, the latents are relative to the reference observation's (read with every modality)."""
        if not self.reference:
            return self._encode(obs, absent)
        first = next((obs[n] for n in self.names if n in obs), None)
        if first is None:
            return self._encode(obs, absent)  # raises the missing-modality error
        batch = first.shape[0]
        if not bool(self.reference_initialised):
            if set(self.names) - set(obs):
                raise ValueError(
                    f"the reference observation must have every modality {list(self.names)}; got {sorted(obs)}"
                )
            with torch.no_grad():
                for name in self.names:
                    getattr(self, f"reference_{name}").copy_(torch.as_tensor(obs[name])[:1])
                self.reference_initialised.fill_(True)
        device = self.latents.device
        joined, absent = {}, dict(absent or {})
        for name in self.names:  # the reference row reads every modality, whatever this batch withholds
            reference = getattr(self, f"reference_{name}")
            if name in obs:
                value = torch.as_tensor(obs[name], device=device)
                joined[name] = torch.cat([value, reference.to(value.dtype)])
            else:
                joined[name] = reference.expand(batch + 1, *reference.shape[1:])
                absent[name] = torch.ones(batch, dtype=torch.bool)
        if ABSENT_KEY in obs:
            flags = torch.as_tensor(obs[ABSENT_KEY], device=device).reshape(batch, -1)
            joined[ABSENT_KEY] = torch.cat([flags, flags.new_zeros(1, flags.shape[1])])
        none = torch.zeros(1, dtype=torch.bool, device=device)
        absent = {
            n: torch.cat([torch.as_tensor(f, device=device).bool().reshape(batch), none])
            for n, f in absent.items()
        }
        latents = self._encode(joined, absent or None)
        if self.capture_attention and self.last_capture is not None:
            self.last_capture["weights"] = self.last_capture["weights"][:-1]
            self.last_capture["tokens"] = self.last_capture["tokens"][:-1]
        return latents[:-1] - latents[-1:]

    def _encode(
        self, obs: Mapping[str, torch.Tensor], absent: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        available = tuple(
            i for i, n in enumerate(self.names) if n in obs and n not in self.disabled_modalities
        )
        if not available:
            raise ValueError(
                f"no modality to read: observation keys {sorted(obs)}, disabled {sorted(self.disabled_modalities)}; "
                f"the encoder reads {list(self.names)}"
            )
        masking = self.mask_tokens is not None
        present = tuple(range(len(self.names))) if masking else available
        batch = obs[self.names[available[0]]].shape[0]
        device = self.latents.device
        if ABSENT_KEY in obs:
            flags = torch.as_tensor(obs[ABSENT_KEY], device=device).bool().reshape(batch, len(self.names))
            absent = {**{n: flags[:, i] for i, n in enumerate(self.names)}, **(absent or {})}
        embed = self.adapters
        if self.token_cache is not None and not self.training and not torch.is_grad_enabled():
            embed = self.token_cache.embedders
        with autocast_context(self.config, device):
            mask_vectors = self.mask_tokens + self.modality_embedding if masking else None  # (n_mod, D)
            tokens = []
            stems, task = self.task_stems, None
            if stems is not None:
                if TASK_KEY not in obs:
                    raise ValueError(f"task_stems read the observation's {TASK_KEY!r} index; it is missing")
                task = torch.as_tensor(obs[TASK_KEY], device=device).reshape(batch).long()
            for m in present:
                if m in available:
                    name = self.names[m]
                    token = embed[name](obs[name]) + self.modality_embedding[m]
                    if stems is not None and name in stems.weights:
                        token = token + stems(name, self.adapters[name].tokens_content(obs[name]), task)
                    tokens.append(token)
                else:  # masking: a missing modality is its mask tokens
                    tokens.append(mask_vectors[m].expand(batch, self.specs[m].num_tokens, -1))
            tokens = torch.cat(tokens, dim=1) if len(tokens) > 1 else tokens[0]  # (B, N, D)
            modality_index = self._modality_index(present, device)
            flags = self._absent_flags(available, batch, absent, device)  # (B, n_available) or None
            if masking and len(available) < len(present):
                full = torch.ones(batch, len(present), dtype=torch.bool, device=device)
                full[:, list(available)] = False if flags is None else flags
                flags = full
            token_absent = None
            if flags is not None:  # (B, n_present) -> (B, N) via each token's column among the present ones
                column_of = torch.zeros(len(self.names), dtype=torch.long, device=device)
                column_of[list(present)] = torch.arange(len(present), device=device)
                token_absent = flags[:, column_of[modality_index]]
                if masking:  # the withheld tokens become mask tokens, which the latents attend to
                    tokens = torch.where(
                        token_absent[..., None], mask_vectors[modality_index].to(tokens.dtype), tokens
                    )
                    token_absent = None
            slot_absent = self._slot_absent(obs, present, available, batch, device)
            if slot_absent is not None:  # sensor slots the sample's body lacks: never attended
                token_absent = slot_absent if token_absent is None else token_absent | slot_absent
            latents, weights = self.cross_attention(
                self.latents,
                tokens,
                modality_index,
                token_absent,
                capture=self.capture_attention,
                num_latents=self.num_active_latents,
                latent_token_bias=self._latent_token_bias(present, device),
            )
            for layer in self._layer_sequence():
                latents = layer(latents)
            latents = self.final_norm(latents)
        if self.capture_attention:
            self.last_capture = {
                "weights": weights.detach(),  # (B, H, M, N)
                "modality_index": modality_index,
                "names": [self.names[m] for m in present],
                "present": present,
                "tokens": tokens.detach().float(),
            }
        return latents.float()


class LearnedQueries(nn.Module):
    """Q trainable output queries, the same for every sample: -> (B, Q, D)."""

    def __init__(self, num_queries: int, dim: int, init_std: float = 0.02):
        super().__init__()
        self.queries = nn.Parameter(torch.empty(num_queries, dim))
        nn.init.trunc_normal_(self.queries, std=init_std, a=-2 * init_std, b=2 * init_std)

    def forward(self, batch: int) -> torch.Tensor:
        return self.queries.unsqueeze(0).expand(batch, -1, -1)


class ActionQueries(nn.Module):
    """Perceiver-Actor-Critic Q queries: a learned query per critic plus an embedding of the action.

    actions (B, A) -> (B, num_critics, D); one encoder pass serves any number of candidate actions.
    """

    def __init__(self, action_dim: int, dim: int, num_critics: int = 2, init_std: float = 0.02):
        super().__init__()
        self.num_critics = num_critics
        self.base = LearnedQueries(num_critics, dim, init_std)
        self.embed = nn.Sequential(nn.Linear(action_dim, dim), nn.GELU(), nn.Linear(dim, num_critics * dim))

    def forward(self, actions: torch.Tensor) -> torch.Tensor:
        batch = actions.shape[0]
        return self.base(batch) + self.embed(actions.float()).view(batch, self.num_critics, -1)


class PerceiverDecoder(nn.Module):
    """Output queries cross-attend the latents: queries (B, Q, D), latents (B, M, D) -> (B, Q, D)."""

    def __init__(self, config: PerceiverConfig):
        super().__init__()
        self.config = config
        self.attend = QueryCrossAttention(
            config.latent_dim,
            config.decoder_heads,
            config.widening_factor,
            config.dropout,
            config.attn_dropout,
        )
        self.norm = nn.LayerNorm(config.latent_dim)
        init_weights(self)

    def forward(self, queries: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        with autocast_context(self.config, latents.device):
            out = self.norm(self.attend(queries, latents))
        return out.float()
