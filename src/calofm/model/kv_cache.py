"""Static key/value cache (gpt-fast style): storage allocated once per decode, written in place at
the positions being decoded.

Two ways to hold it:
- static (sliced=False): (B, H, S_max, D) buffers, attention masked to the filled slots; every step
  has the same shapes (what CUDA graphs need);
- sliced (sliced=True): buffers only as wide as the filled prefix (all sequences of a decoding batch
  are at the same position) rounded up to a multiple of SLICE_ALIGN slots, and as tall as the batch
  in flight: no work on most empty slots or on finished showers (the fast CPU path). They are
  contiguous views of a preallocated flat storage; widening (every SLICE_ALIGN steps) and dropping
  rows (`select_rows`) rewrite them into a spare storage of the same size, shared by all the layers'
  caches (a `KVStorage`), which then swaps places with theirs. Why both:
  - contiguous: at batch 1000 the cache does not fit the CPU's caches, and attention over the prefix
    of a wider buffer (strided reads) ran at half the speed of the same over a contiguous one;
  - preallocated: a fresh CPU tensor over 32 MB comes from mmap, and its page faults made each
    widening ~10x slower than the copy itself.
  The rounding to SLICE_ALIGN keeps the matmul kernels on the same code path as for the full
  buffers, so both give bit-identical attention (tests/test_fast_decode.py); the few empty slots
  read are zeros (finite: they are masked, and 0 x NaN would poison the softmax).
The owner sets `fill` (number of filled slots after the current write) before each step, or, for a
static cache written from a CUDA graph, `write_pos`: the positions as a device tensor, so that one
captured step serves every position (a Python int would be frozen into the graph); and `window`, the
slots attention reads (a multiple of a few dozen covering the filled ones), so that one graph per
window, not one per position, skips most of the empty slots.

The cache's dtype is the decode's compute dtype: bf16 under bf16 autocast halves the bytes each step
reads, which is what bounds cached attention at large batch (see attention.attend_over_cache)."""

from __future__ import annotations

import torch
from torch import nn

SLICE_ALIGN = 16


class KVStorage:
    """One flat (key, value) pair of storage, where a sliced cache keeps its buffers; one more, shared
    by the caches of all layers, is the spare they rewrite themselves into."""

    def __init__(self, n_elements: int, dtype: torch.dtype, device):
        self.k, self.v = (torch.empty(n_elements, dtype=dtype, device=device) for _ in range(2))


class KVCache(nn.Module):
    def __init__(self, batch_size: int, n_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 sliced: bool = False, attend=None, spare: KVStorage | None = None):
        super().__init__()
        self.sliced, self.fill, self.max_len = sliced, 0, max_len
        self.write_pos: torch.Tensor | None = None  # (T,) positions of the next write (static decoding)
        self.window: int | None = None  # static: slots attention reads (covering the filled ones); None = all
        self.attend = attend  # attention over a bf16 cache, if not attention.attend_over_cache (a compiled one)
        shape = (batch_size, n_heads, max_len, head_dim)
        if not sliced:
            k, v = torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
        else:
            n = batch_size * n_heads * max_len * head_dim
            self.spare = spare or KVStorage(n, dtype, device)
            if self.spare.k.numel() != n or self.spare.k.dtype != dtype:
                raise ValueError("a spare storage is shared only by caches of the same size and dtype")
            self.storage = KVStorage(n, dtype, device)
            k = self.storage.k[:0].view(batch_size, n_heads, 0, head_dim)
            v = self.storage.v[:0].view(batch_size, n_heads, 0, head_dim)
        # buffers (not persistent): they follow the module's .to(); later assignments replace them
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, T, D) at write_pos if set, else at the last T filled positions (fill - T ..
        fill - 1); return the caches (B, H, span, D): the full buffers or their window (static), or the
        filled prefix (sliced)."""
        if self.write_pos is not None:
            if self.sliced:
                raise ValueError("positions given as a tensor need a static (unsliced) cache")
            self.k.index_copy_(2, self.write_pos, k)
            self.v.index_copy_(2, self.write_pos, v)
        else:
            T = k.shape[2]
            if self.k.shape[2] < self.span:
                self._rewrite(self.span)
            self.k[:, :, self.fill - T:self.fill] = k  # a slice copy: cheaper than index_put with positions
            self.v[:, :, self.fill - T:self.fill] = v
        if self.sliced:
            return self.k, self.v
        return self.k[:, :, :self.span], self.v[:, :, :self.span]  # the whole buffer unless a window is set

    @property
    def span(self) -> int:
        """Number of slots attention reads: all of them (static) or its window, or the aligned filled
        prefix (sliced)."""
        if self.sliced:
            return min(self.max_len, -(-self.fill // SLICE_ALIGN) * SLICE_ALIGN)
        return min(self.max_len, self.window or self.max_len)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the sequences `rows` (B',) of the batch (decoding drops finished showers)."""
        if self.sliced:
            self._rewrite(self.k.shape[2], rows)
        else:
            self.k, self.v = self.k.index_select(0, rows), self.v.index_select(0, rows)

    def _rewrite(self, width: int, rows: torch.Tensor | None = None) -> None:
        """Sliced: move the buffers into the spare storage, `width` slots wide (new slots zero), keeping
        the sequences `rows` only (all when None); the storage they leave becomes the spare."""
        B, H, old_width, D = self.k.shape
        B = B if rows is None else len(rows)
        new = []
        for old, store in ((self.k, self.spare.k), (self.v, self.spare.v)):
            buf = store[:B * H * width * D].view(B, H, width, D)
            if rows is None:
                buf[:, :, :old_width] = old
            else:
                torch.index_select(old, 0, rows, out=buf[:, :, :old_width])
            buf[:, :, old_width:] = 0
            new.append(buf)
        self.k, self.v = new
        mine = self.storage
        mine.k, mine.v, self.spare.k, self.spare.v = self.spare.k, self.spare.v, mine.k, mine.v
