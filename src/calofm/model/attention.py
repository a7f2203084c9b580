"""Causal multi-head self-attention with partial rotary position embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calofm.model.config import ModelConfig
from calofm.model.kv_cache import KVCache


class Rotary(nn.Module):
    """Partial RoPE: the first `rot_dim` dimensions of each head rotate with the position, the rest
    stay position-free (so content-only matching, e.g. 'same voxel neighbourhood', stays easy)."""

    def __init__(self, head_dim: int, fraction: float, max_len: int, base: float = 10000.0):
        super().__init__()
        self.rot_dim = 2 * int(head_dim * fraction / 2)
        inv_freq = 1.0 / base ** (torch.arange(0, self.rot_dim, 2, dtype=torch.float64) / max(self.rot_dim, 1))
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # (S, rot_dim / 2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # x (B, H, T, D), pos (T,)
        if self.rot_dim == 0:
            return x
        half = self.rot_dim // 2
        cos, sin = self.cos[pos].to(x.dtype), self.sin[pos].to(x.dtype)  # (T, half)
        x1, x2, rest = x[..., :half], x[..., half:self.rot_dim], x[..., self.rot_dim:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary):
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.head_dim, self.dropout = cfg.n_heads, cfg.head_dim, cfg.dropout
        # separate projections: a per-particle LoRA later wraps q/k/v/o individually
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.rotary = rotary
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, d) at positions pos (T,). Without a cache: causal over the T tokens. With a cache:
        attend to everything cached so far; mask (T, S_max) says which cache slots each query sees."""
        B, T, _ = x.shape
        q, k, v = (proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, T, D)
        q, k = self.rotary(q, pos), self.rotary(k, pos)
        dropout = self.dropout if self.training else 0.0
        if self.kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            k, v = self.kv_cache.update(pos, k, v)
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, dropout_p=dropout)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
