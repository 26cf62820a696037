"""The encoder's input cross-attention: M latents read N tokens of several modalities, with gating.

Per-modality logit bias b[h, m] (per head, initialised to -log N_m so every modality starts with an equal
share of attention whatever its token count) and a per-latent gate g[l, m] = softmax_m(gamma[l, m]) let latents
choose what to listen to: the attention of latent l to a token of modality m is  softmax_n(q_l.k_n / sqrt(d) +
b[h, m] + gamma[l, m]), i.e. each modality's attention mass is multiplied by its gate before renormalising.

Both terms are added *without a mask tensor*: they are a product of a latent-side and a token-side vector, so we
append them to the query and key as extra channels (q' = [q, (b + gamma) * sqrt(d), ABSENT * sqrt(d)],
k' = [k, onehot(modality), absent flag]) and SDPA's fast kernels apply. A token flagged absent receives a
-30000 logit, exactly 0 attention in fp32/bf16: the same result as if its tokens had never been there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from perceiver_policy.attention import ABSENT_LOGIT, CrossAttentionLayers, DropPath, merge_heads, split_heads


class GatedCrossAttention(CrossAttentionLayers):
    legacy_names = {"latent_norm": "query_norm", "token_norm": "context_norm"}

    def __init__(
        self,
        dim: int,
        heads: int,
        num_latents: int,
        num_modalities: int,
        widening_factor: int,
        dropout: float,
        attn_dropout: float,
        gating: bool,
        tokens_per_modality: list[int] | None = None,
    ):
        # query_norm normalises the latents, context_norm the input tokens
        super().__init__(dim, heads, widening_factor, dropout, attn_dropout)
        self.head_dim, self.gating = dim // heads, gating
        self.dropout = nn.Dropout(dropout)
        self.num_modalities = num_modalities
        if gating:
            # Balanced init b[h, m] = -log N_m: each modality starts with an equal share of attention mass, so 2
            # proprio tokens are not drowned by 150 pixel patches before the gates have learned anything.
            counts = torch.tensor(tokens_per_modality or [1] * num_modalities, dtype=torch.float32)
            self.modality_bias = nn.Parameter(-counts.log().expand(heads, num_modalities).clone())  # b[h, m]
            self.gate_logits = nn.Parameter(torch.zeros(num_latents, num_modalities))  # gamma[l, m]
        # Extra channels: one per modality + the absent flag, padded to a multiple of 8 for the fused kernels.
        self.extra_dim = -(-(num_modalities + 1) // 8) * 8
        self._query_cache: tuple | None = None
        self._onehot_cache: tuple | None = None

    # ------------------------------------------------------------------------------------------- queries
    def _query_sources(self, latents: torch.Tensor) -> list[torch.Tensor]:
        params = [latents, self.q.weight, self.q.bias, self.query_norm.weight, self.query_norm.bias]
        return params + ([self.modality_bias, self.gate_logits] if self.gating else [])

    def latent_queries(self, latents: torch.Tensor, with_extras: bool) -> torch.Tensor:
        """Projected latent queries (1, H, M, E). In eval mode without grad they are input-independent, so they
        are cached; the cache key holds every source tensor's version counter (bumped by optimizer steps and
        load_state_dict) so any parameter change, a dtype/device move or train() invalidates it."""
        cacheable = not self.training and not torch.is_grad_enabled()
        if cacheable:
            key = (
                with_extras,
                latents.device,
                latents.dtype,
                *((id(t), t._version) for t in self._query_sources(latents)),
            )
            if self._query_cache is not None and self._query_cache[0] == key:
                return self._query_cache[1]
        with torch.autocast(latents.device.type, enabled=False):
            q = split_heads(self.q(self.query_norm(latents)).unsqueeze(0), self.heads)  # (1, H, M, dh)
            if with_extras:
                q = torch.cat([q, self._query_extras(latents.shape[0], q.dtype, q.device)], dim=-1)
        if cacheable:
            self._query_cache = (key, q)
        return q

    def _query_extras(self, num_latents: int, dtype, device) -> torch.Tensor:
        # SDPA scales logits by 1/sqrt(dh): pre-multiply so the added logit is exactly b + gamma (or ABSENT).
        root = self.head_dim**0.5
        extras = torch.zeros(1, self.heads, num_latents, self.extra_dim, dtype=dtype, device=device)
        if self.gating:
            bias = self.modality_bias[:, None, :] + self.gate_logits[None, :, :]  # (H, M, n_mod)
            extras[0, :, :, : self.num_modalities] = bias * root
        extras[..., self.num_modalities] = ABSENT_LOGIT * root
        return extras

    def train(self, mode: bool = True):
        self._query_cache = None
        return super().train(mode)

    # ------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        latents: torch.Tensor,
        tokens: torch.Tensor,
        modality_index: torch.Tensor,
        absent: torch.Tensor | None = None,
        capture: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """latents (M, D), tokens (B, N, D), modality_index (N,) long, absent (B, N) bool or None.

        Returns the updated latents (B, M, D) and, when `capture`, the attention weights (B, H, M, N).
        """
        batch = tokens.shape[0]
        with_extras = self.gating or absent is not None
        q = self.latent_queries(latents, with_extras).expand(batch, -1, -1, -1)  # (B, H, M, E)
        k, v = (split_heads(t, self.heads) for t in self.kv(self.context_norm(tokens)).chunk(2, dim=-1))
        if with_extras:
            k = torch.cat([k, self._key_extras(k, modality_index, absent)], dim=-1)  # (B, H, N, E)
        scale = self.head_dim**-0.5
        weights = None
        if capture:  # opt-in, off the hot path: materialise the weights we would otherwise never see
            weights = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)
        dropout = self.attn_dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(q.to(k.dtype), k, v, dropout_p=dropout, scale=scale)
        x = latents.unsqueeze(0) + self.dropout(self.out(merge_heads(attended)))  # (B, M, D)
        return x + self.mlp(self.mlp_norm(x)), weights

    def _key_extras(
        self, k: torch.Tensor, modality_index: torch.Tensor, absent: torch.Tensor | None
    ) -> torch.Tensor:
        batch, heads, length, _ = k.shape
        key = (modality_index.data_ptr(), length, k.dtype, k.device)
        if self._onehot_cache is None or self._onehot_cache[0] != key:  # constant per token layout
            self._onehot_cache = (key, F.one_hot(modality_index, self.extra_dim).to(k.dtype))
        onehot = self._onehot_cache[1]  # (N, E_extra)
        extras = onehot.expand(batch, heads, length, self.extra_dim)
        if absent is not None:
            flag = F.one_hot(torch.full_like(modality_index, self.num_modalities), self.extra_dim).to(k.dtype)
            extras = extras + absent[:, None, :, None].to(k.dtype) * flag  # (B, H, N, E_extra)
        return extras

    @property
    def gates(self) -> torch.Tensor | None:
        """Per-latent modality gates softmax_m(gamma[l, m]), (M, n_mod), or None without gating."""
        return torch.softmax(self.gate_logits, dim=-1) if self.gating else None


__all__ = ["DropPath", "GatedCrossAttention"]
