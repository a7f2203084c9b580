"""Causal multi-head attention with partial rotary position embeddings.

Self-attention, or (with `kv` given) causal cross-attention from one hit stream to the other at the
same positions: query at position t sees the other stream's positions <= t (the energy -> space
variant of the published model, see config.stream_combine).
"""

from __future__ import annotations

from dataclasses import dataclass

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
        self.rot_dim, self.base = 2 * int(head_dim * fraction / 2), base
        cos, sin = self._tables(0, max_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (stop - start, rot_dim / 2) of positions start..stop-1, fp32 (computed in fp64)."""
        inv_freq = 1.0 / self.base ** (torch.arange(0, self.rot_dim, 2, dtype=torch.float64) / max(self.rot_dim, 1))
        angles = torch.outer(torch.arange(start, stop, dtype=torch.float64), inv_freq)  # (S, rot_dim / 2)
        return angles.cos().float(), angles.sin().float()

    def grow(self, max_len: int) -> None:
        """Tables for max_len positions: the rows already there are kept as they are (bit for bit), the
        new ones appended (an adapter whose showers run longer than the base's)."""
        n = self.cos.shape[0]
        if max_len > n:
            cos, sin = self._tables(n, max_len)
            self.cos, self.sin = (torch.cat([old, new.to(old.device)]) for old, new in ((self.cos, cos), (self.sin, sin)))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # x (B, H, T, D), pos (T,)
        if self.rot_dim == 0:
            return x
        half = self.rot_dim // 2
        cos, sin = self.cos[pos].to(x.dtype), self.sin[pos].to(x.dtype)  # (T, half)
        x1, x2, rest = x[..., :half], x[..., half:self.rot_dim], x[..., self.rot_dim:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)


def attend_over_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of T new queries over S cache slots, accumulated in fp32 whatever the cache's dtype:
    q (B, H, T, D), k/v (B, H, S, D), mask (T, S) -> (B, H, T, D) fp32.

    For a bf16 cache: batched matmuls would need it copied to fp32 every step, or run in bf16 (no
    faster on the 2-core CPU), while torch.compile fuses these products and sums into a pass over the
    cache that converts bf16 on the fly. Over an fp32 cache the plain matmuls are as fast (see
    CausalAttention.forward)."""
    scores = (q.float().unsqueeze(-2) * k.float().unsqueeze(-3)).sum(-1) * q.shape[-1] ** -0.5  # (B, H, T, S)
    p = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return (p.unsqueeze(-1) * v.float().unsqueeze(-3)).sum(-2)


@dataclass
class Showers:
    """The per-shower ids (B,) of the batch in flight, handed down to the layers that act on some showers
    only (calofm.extension's gated adapters). static: the batch runs a step that must not read the
    device (a captured CUDA graph, see generation.decode), so such a layer may take no shortcut that
    depends on the data."""

    material: torch.Tensor
    particle: torch.Tensor
    static: bool = False


def per_shower(layer: nn.Module, x: torch.Tensor, showers: Showers | None) -> torch.Tensor:
    """layer(x), or layer(x, showers) for a layer that acts per shower (one with `per_shower = True`)."""
    return layer(x, showers) if getattr(layer, "per_shower", False) else layer(x)


class CausalAttention(nn.Module):
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
        self.kv_cache: KVCache | None = None  # set for the length of a decode (ShowerTransformer.install_cache)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None = None,
                kv: torch.Tensor | None = None, showers: Showers | None = None) -> torch.Tensor:
        """x (B, T, d) at positions pos (T,); keys/values from kv (B, T, d) if given, else from x.
        Without a cache: causal over the T tokens. With a cache: attend to everything cached so far;
        mask (T, S) says which of the S cache slots read each query sees. showers: for gated adapters."""
        B, T, _ = x.shape
        kv = x if kv is None else kv
        q, k, v = (per_shower(proj, inp, showers).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
                   for proj, inp in ((self.q_proj, x), (self.k_proj, kv), (self.v_proj, kv)))  # (B, H, T, D)
        q, k = self.rotary(q, pos), self.rotary(k, pos)
        dropout = self.dropout if self.training else 0.0
        dtype = q.dtype
        cache = self.kv_cache
        if cache is not None:
            k, v = cache.update(k, v)
        on_cpu = x.device.type == "cpu"
        if cache is None:
            if on_cpu:  # the CPU attention kernels are faster in fp32 than in bf16
                q, k, v = q.float(), k.float(), v.float()
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        elif on_cpu and cache.k.dtype != torch.float32:
            # a bf16 cache is read as bf16 (converting it to fp32 first would copy it every step).
            # cache.attend: a compiled attend_over_cache (the decoder's, with compile); only here:
            # over an fp32 cache the eager matmuls below were as fast (batch 100) or faster (batch
            # 1000: 46 vs 44 showers/s) than the compiled form
            y = (cache.attend or attend_over_cache)(q, k, v, mask)
        elif on_cpu:
            # decoding on CPU: explicit masked attention in fp32. Faster than SDPA's masked path for
            # one query row, and gives bit-identical results whether the cache is read whole or as its
            # aligned filled prefix (see KVCache), so decoding options never change a shower
            q = q.float()
            scores = (q @ k.float().transpose(-1, -2)) * self.head_dim ** -0.5
            y = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v.float()
        else:
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, dropout_p=dropout)
        return per_shower(self.o_proj, y.to(dtype).transpose(1, 2).reshape(B, T, -1), showers)
