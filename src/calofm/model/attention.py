"""Causal multi-head attention with partial rotary position embeddings.

Self-attention, or (with `kv` given) causal cross-attention from one hit stream to the other at the
same positions: query at position t sees the other stream's positions <= t (the energy -> space
variant of the published model, see config.stream_combine).
"""

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


_compiled_attend = None


def compiled_attend_over_cache():
    """attend_over_cache through torch.compile (dynamic shapes: batch and span change every step),
    compiled once per process."""
    global _compiled_attend
    if _compiled_attend is None:
        allow_recompiles()
        _compiled_attend = torch.compile(attend_over_cache, dynamic=True)
    return _compiled_attend


def allow_recompiles(limit: int = 64) -> None:
    """Decoding meets a handful of graph variants per function (batch 1 and >1, prefill and step,
    fp32 and bf16): more than dynamo's default of 8, past which it silently runs eager."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)


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
        self.kv_cache: KVCache | None = None
        # decode only: [W_q; W_k; W_v] concatenated (see fuse_qkv), not part of the state dict
        self.qkv_weight: torch.Tensor | None = None

    def fuse_qkv(self, on: bool = True) -> bool:
        """Decode with one (3d, d) projection instead of three. Built from the current q/k/v weights
        (the state dict keeps the separate ones); only when all three are plain nn.Linear without
        bias: wrapped projections (a LoRA adapter) keep the separate path. Returns whether fused."""
        self.qkv_weight = None
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if on and all(type(p) is nn.Linear and p.bias is None for p in projs):
            self.qkv_weight = torch.cat([p.weight.detach() for p in projs], dim=0)
        return self.qkv_weight is not None

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None = None,
                kv: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, d) at positions pos (T,); keys/values from kv (B, T, d) if given, else from x.
        Without a cache: causal over the T tokens. With a cache: attend to everything cached so far;
        mask (T, S) says which of the S cache slots read each query sees."""
        B, T, _ = x.shape
        if self.qkv_weight is not None and kv is None and not self.training:
            q, k, v = (F.linear(x, self.qkv_weight).view(B, T, 3, self.n_heads, self.head_dim)
                       .permute(2, 0, 3, 1, 4).unbind(0))  # (B, H, T, D) each
        else:
            kv = x if kv is None else kv
            q, k, v = (proj(inp).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
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
            # Compiled only here: over an fp32 cache the eager matmuls below were as fast (batch 100)
            # or faster (batch 1000: 46 vs 44 showers/s) than the compiled form
            y = (compiled_attend_over_cache() if cache.compiled else attend_over_cache)(q, k, v, mask)
        elif on_cpu:
            # decoding on CPU: explicit masked attention in fp32. Faster than SDPA's masked path for
            # one query row, and gives bit-identical results whether the cache is read whole or as its
            # aligned filled prefix (see KVCache), so decoding options never change a shower
            q = q.float()
            scores = (q @ k.float().transpose(-1, -2)) * self.head_dim ** -0.5
            y = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v.float()
        else:
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, dropout_p=dropout)
        return self.o_proj(y.to(dtype).transpose(1, 2).reshape(B, T, -1))
