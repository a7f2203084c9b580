"""Static key/value cache (gpt-fast style): buffers preallocated for the whole decode, written in
place at the positions being decoded.

Two ways to read it back:
- static (sliced=False): the full (B, H, S_max, D) buffers, attention masked to the filled slots;
  every step has the same shapes (what CUDA graphs need);
- sliced (sliced=True): only the filled prefix (all sequences of a decoding batch are at the same
  position), rounded up to a multiple of SLICE_ALIGN slots: no work on most empty slots (the fast
  CPU path). The rounding keeps the matmul kernels on the same code path as for the full buffers,
  so both give bit-identical attention (tests/test_fast_decode.py); the few empty slots read are
  masked like in the static case.
The owner sets `fill` (number of filled slots after the current write) before each step.

The cache's dtype is the decode's compute dtype: bf16 under bf16 autocast halves the bytes each step
reads, which is what bounds cached attention at large batch (see attention.attend_over_cache)."""

from __future__ import annotations

import torch
from torch import nn

SLICE_ALIGN = 16


class KVCache(nn.Module):
    def __init__(self, batch_size: int, n_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 sliced: bool = False, compiled: bool = False):
        super().__init__()
        self.sliced, self.fill = sliced, 0
        self.compiled = compiled  # attention over this cache through torch.compile (see CausalAttention)
        shape = (batch_size, n_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, T, D) at the last T filled positions (fill - T .. fill - 1); return the full
        (B, H, S_max, D) caches, or their filled prefix (B, H, span, D) when sliced."""
        T = k.shape[2]
        self.k[:, :, self.fill - T:self.fill] = k  # a slice copy: cheaper than index_put with positions
        self.v[:, :, self.fill - T:self.fill] = v
        return self.k[:, :, :self.span], self.v[:, :, :self.span]

    @property
    def span(self) -> int:
        """Number of slots attention reads: all of them (static), or the aligned filled prefix (sliced)."""
        size = self.k.shape[2]
        return min(size, -(-self.fill // SLICE_ALIGN) * SLICE_ALIGN) if self.sliced else size

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the sequences `rows` (B',) of the batch (decoding drops finished showers). A sliced
        cache copies only its filled prefix; a static one copies everything."""
        if not self.sliced:
            self.k, self.v = self.k.index_select(0, rows), self.v.index_select(0, rows)
            return
        # empty slots are read (masked) by attention later on: they must stay finite, hence zeros
        k, v = self.k.new_zeros((len(rows), *self.k.shape[1:])), self.v.new_zeros((len(rows), *self.v.shape[1:]))
        torch.index_select(self.k[:, :, :self.fill], 0, rows, out=k[:, :, :self.fill])
        torch.index_select(self.v[:, :, :self.fill], 0, rows, out=v[:, :, :self.fill])
        self.k, self.v = k, v
