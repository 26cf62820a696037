"""The encoder's input cross-attention: M latents read N tokens of several modalities, with gating.

Per-modality logit bias b[h, m] (per head, initialised to -log N_m so every modality starts with an equal
share of attention whatever its token count) and a per-latent gate g[l, m] = softmax_m(gamma[l, m]) let latents
choose what to listen to: the attention of latent l to a token of modality m is  softmax_n(q_l.k_n / sqrt(d) +
b[h, m] + gamma[l, m]), i.e. each modality's attention mass is multiplied by its gate before renormalising.

Both terms reach SDPA as one additive float mask (H, M, N) = b[h, m(n)] + gamma[l, m(n)], gathered from the
(H, M, n_mod) table by each token's modality: a mask keeps q, k and v at the same head size, so PyTorch's fused
flash kernel runs wherever it may (on the CPU: whenever no gradient flows into the mask, i.e. rollouts,
evaluation and deployment; a training step's backward uses the math kernel, since the fused CPU kernels do not
differentiate a mask). In eval mode without grad the mask is cached, like the latent queries. A token flagged
absent adds -30000 to its logits, exactly 0 attention in fp32/bf16: the same result as if its tokens had never
been there. (A first version appended the bias as extra q/k channels: head size 64 + 8 for q and k but 64 for v,
which the fused kernels refuse, so the math kernel always ran.)
"""

from __future__ import annotations

import torch
from torch import nn

from perceiver_policy.attention import (
    ABSENT_LOGIT,
    CrossAttentionLayers,
    DropPath,
    attend,
    merge_heads,
    split_heads,
)
from perceiver_policy.kept import Kept


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
        drop_path: float = 0.0,
    ):
        # query_norm normalises the latents, context_norm the input tokens
        super().__init__(dim, heads, widening_factor, dropout, attn_dropout)
        self.head_dim, self.gating = dim // heads, gating
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)
        self.num_modalities = num_modalities
        if gating:
            # Balanced init b[h, m] = -log N_m: each modality starts with an equal share of attention mass, so 2
            # proprio tokens are not drowned by 150 pixel patches before the gates have learned anything.
            counts = torch.tensor(tokens_per_modality or [1] * num_modalities, dtype=torch.float32)
            self.modality_bias = nn.Parameter(-counts.log().expand(heads, num_modalities).clone())  # b[h, m]
            self.gate_logits = nn.Parameter(torch.zeros(num_latents, num_modalities))  # gamma[l, m]
        self._query_cache, self._mask_cache = Kept(), Kept()

    # ------------------------------------------------------------------------------------------- queries
    def _query_sources(self, latents: torch.Tensor) -> list[torch.Tensor]:
        # every parameter of the projection: a LoRA-wrapped q (perceiver_policy.finetuning) changes through its
        # adapters while its base weight stays put
        return [latents, *self.q.parameters(), *self.query_norm.parameters()]

    def _cacheable(self) -> bool:
        """Results may be kept in eval mode without grad; in training, or with grad enabled, they are computed."""
        return not (self.training or torch.is_grad_enabled())

    def latent_queries(self, latents: torch.Tensor, count: int | None = None) -> torch.Tensor:
        """Projected queries of the first `count` latents (1, H, k, E), contiguous (SDPA's fused kernels need
        it). In eval mode without grad they are input-independent, so they are cached; a parameter change, a
        dtype/device move, another k or train() invalidates the cache."""
        count = latents.shape[0] if count is None else count

        def queries() -> torch.Tensor:
            first = latents if count == len(latents) else latents[:count]
            with torch.autocast(latents.device.type, enabled=False):
                return split_heads(self.q(self.query_norm(first)).unsqueeze(0), self.heads)  # (1, H, k, dh)

        if not self._cacheable():
            return queries()
        key = (latents.device, latents.dtype, count)
        return self._query_cache.fetch(key, self._query_sources(latents), queries)

    def logit_bias(self, modality_index: torch.Tensor, count: int | None = None) -> torch.Tensor | None:
        """The gating mask of the first `count` latents (1, H, k, N): b[h, m(n)] + gamma[l, m(n)], or None
        without gating."""
        if not self.gating:
            return None
        count = self.gate_logits.shape[0] if count is None else count

        def mask() -> torch.Tensor:
            table = self.modality_bias[:, None, :] + self.gate_logits[None, :count, :]  # (H, k, n_mod)
            return table[:, :, modality_index].unsqueeze(0)  # (1, H, M, N)

        if not self._cacheable():
            return mask()
        # the index is a source, not its address: an index written in place, or a new one where a freed one
        # lay, gives its own mask
        key = (modality_index.device, modality_index.shape[0], count)
        return self._mask_cache.fetch(key, [self.modality_bias, self.gate_logits, modality_index], mask)

    def train(self, mode: bool = True):
        self._query_cache.clear()
        self._mask_cache.clear()
        return super().train(mode)

    # ------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        latents: torch.Tensor,
        tokens: torch.Tensor,
        modality_index: torch.Tensor,
        absent: torch.Tensor | None = None,
        capture: bool = False,
        num_latents: int | None = None,
        latent_token_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """latents (M, D), tokens (B, N, D), modality_index (N,) long, absent (B, N) bool or None; `num_latents`
        k <= M: only the first k latents read the tokens (nested latents); `latent_token_bias` (M, N): additive
        logits per latent and token (grouped latents: ABSENT_LOGIT where a latent may not read a token).

        Returns the updated latents (B, k, D) and, when `capture`, the attention weights (B, H, k, N).
        """
        batch = tokens.shape[0]
        count = latents.shape[0] if num_latents is None else num_latents
        k, v = (split_heads(t, self.heads) for t in self.kv(self.context_norm(tokens)).chunk(2, dim=-1))
        q = self.latent_queries(latents, count).to(k.dtype).expand(batch, -1, -1, -1)  # (B, H, k, dh)
        mask = self.logit_bias(modality_index, count)  # (1, H, k, N) or None
        if latent_token_bias is not None:
            group = latent_token_bias[:count][None, None]  # (1, 1, k, N)
            mask = group if mask is None else mask + group
        if absent is not None:
            absent_logits = absent[:, None, None, :].to(k.dtype) * ABSENT_LOGIT  # (B, 1, 1, N)
            mask = absent_logits if mask is None else mask.to(k.dtype) + absent_logits
        if mask is not None:
            mask = mask.to(k.dtype)
        scale = self.head_dim**-0.5
        weights = None
        if capture:  # opt-in, off the hot path: materialise the weights we would otherwise never see
            logits = (q.float() @ k.float().transpose(-1, -2)) * scale
            weights = torch.softmax(logits if mask is None else logits + mask.float(), dim=-1)
        dropout = self.attn_dropout if self.training else 0.0
        attended = attend(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
        x = latents[:count].unsqueeze(0) + self.drop_path(
            self.dropout(self.out(merge_heads(attended)))
        )  # (B, k, D)
        return x + self.drop_path(self.mlp(self.mlp_norm(x))), weights

    @property
    def gates(self) -> torch.Tensor | None:
        """Per-latent modality gates softmax_m(gamma[l, m]), (M, n_mod), or None without gating."""
        return torch.softmax(self.gate_logits, dim=-1) if self.gating else None


__all__ = ["DropPath", "GatedCrossAttention"]
