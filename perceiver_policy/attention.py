"""Pre-LayerNorm attention blocks on `F.scaled_dot_product_attention` (never a hand-written softmax in the hot path)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# A logit offset that makes exp() exactly 0 in float32 and bfloat16: absent tokens get no attention mass.
ABSENT_LOGIT = -30000.0


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention`, in float32 when bf16 inputs are on the CPU (bf16 autocast). PyTorch's
    CPU kernel in bf16 took 8.9x (the latents' self-attention, 4 heads of 16) and 1.7x (32 latents reading 131
    tokens, one head of 64) its float32 time for forward + backward at batch 256; this path, casts included, 1.7x
    and 1.5x (torch 2.13, Intel Xeon with AMX, 2026-12-05; `python -m experiments.benchmark precision`). The
    softmax is then computed at float32 precision too; the output is cast back, so the layers around it stay in
    bf16. Training and acting take the same path, so their numerics agree."""
    if q.dtype != torch.bfloat16 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    mask = None if attn_mask is None else attn_mask.float()
    with torch.autocast("cpu", enabled=False):  # autocast would cast the float32 inputs back to bf16
        out = F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout_p, scale=scale
        )
    return out.to(q.dtype)


class DropPath(nn.Module):
    """Stochastic depth: drops a whole residual branch per sample in training, rescaling the kept ones."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.rate)
        return x * keep / (1.0 - self.rate)


class MLP(nn.Sequential):
    def __init__(self, dim: int, widening_factor: int, dropout: float):
        super().__init__(
            nn.Linear(dim, widening_factor * dim),
            nn.GELU(),
            nn.Linear(widening_factor * dim, dim),
            nn.Dropout(dropout),
        )


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H*E) -> (B, H, N, E)"""
    batch, length, _ = x.shape
    return x.view(batch, length, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, E) -> (B, N, H*E)"""
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim)


class SelfAttentionLayer(nn.Module):
    """x + DropPath(Attn(LN(x))); x + DropPath(MLP(LN(x)))  on the latents (B, M, D)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        widening_factor: int,
        dropout: float,
        attn_dropout: float,
        drop_path: float,
    ):
        super().__init__()
        self.heads, self.attn_dropout = heads, attn_dropout
        self.attn_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = MLP(dim, widening_factor, dropout)
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(self.attn_norm(x)).chunk(3, dim=-1))
        attended = attend(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        x = x + self.drop_path(self.dropout(self.out(merge_heads(attended))))
        return x + self.drop_path(self.mlp(self.mlp_norm(x)))


class CrossAttentionLayers(nn.Module):
    """The layers of a pre-LN cross-attention block in which queries read a context: LN + q projection for the
    queries, LN + k/v projection for the context, output projection, LN + MLP. Subclasses define `forward`."""

    def __init__(self, dim: int, heads: int, widening_factor: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.heads, self.attn_dropout = heads, attn_dropout
        self.query_norm = nn.LayerNorm(dim)
        self.context_norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = MLP(dim, widening_factor, dropout)

    # Names the layer norms had before encoder and decoder shared this base (old name -> current name): checkpoints
    # saved before that rename still load.
    legacy_names: dict[str, str] = {}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for old, new in self.legacy_names.items():
            for field in ("weight", "bias"):
                old_key, new_key = f"{prefix}{old}.{field}", f"{prefix}{new}.{field}"
                if old_key in state_dict and new_key not in state_dict:
                    state_dict[new_key] = state_dict.pop(old_key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class QueryCrossAttention(CrossAttentionLayers):
    """Output queries read the latents: q + Attn(LN(q), LN(latents)); q + MLP(LN(q)).  (B, Q, D), (B, M, D) -> (B, Q, D)"""

    legacy_names = {"latent_norm": "context_norm"}

    def forward(self, queries: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        q = split_heads(self.q(self.query_norm(queries)), self.heads)
        k, v = (split_heads(t, self.heads) for t in self.kv(self.context_norm(latents)).chunk(2, dim=-1))
        attended = attend(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        x = queries + self.out(merge_heads(attended))
        return x + self.mlp(self.mlp_norm(x))
