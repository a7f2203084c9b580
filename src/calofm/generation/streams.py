"""Per-shower random streams: every random number of shower i of a run comes from (seed, i, purpose).

So a shower does not depend on the batch size, on the other showers of its batch, on how a run is split
into shards or on the device: shard K of N reproduces showers start..end-1 of the one-process run.

The engine is Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011;
the counter-based generator of cuRAND, JAX and TensorFlow), evaluated here over whole tensors of
counters with int64 arithmetic, on the CPU or the GPU alike (the same words on both): key = the seed's
two 32-bit halves, counter = (block j, shower index i, purpose, 0). Stream (seed, i, purpose) is the
words of blocks j = 0, 1, ..., four per block. A float32 uniform is a word's top 24 bits / 2^24 (what
torch.rand draws: [0, 1)); a float64 one takes 53 bits of two words, offset by half a step into (0, 1).

Purposes (each stream is independent of the others, so e.g. two-stage totals on or off leave the
decoder's uniforms as they are):
- INCIDENT: the incident energy (one float64);
- TOTALS: two float64 for the two-stage totals' copula (tokenizer.totals);
- DECODE: the decoder's table (max_hits + 1, draws per step) of float32, read at step t, draw k
  (generation.decode: k = 0 the voxel, the last the energy);
- SMEAR: one float32 per hit for the energy inside its bin (tokenizer decode, mode "uniform").
Cost at batch 10 000 with calofm-small's 352 hits: see decode_uniforms.
"""

from __future__ import annotations

import numpy as np
import torch

INCIDENT, TOTALS, DECODE, SMEAR = range(4)

_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl increments of the key
_MASK = 0xFFFFFFFF
ROUNDS = 10


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * m for 32-bit a (int64 tensor) and constant m, without int64
    overflow: m is split into 16-bit halves, so no partial product reaches 2^49."""
    lo_part = a * (m & 0xFFFF)  # < 2^48
    hi_part = a * (m >> 16)  # < 2^48
    mid = lo_part + ((hi_part & 0xFFFF) << 16)  # < 2^49
    return (hi_part >> 16) + (mid >> 32), mid & _MASK


def philox4x32(counter, key: tuple[int, int]) -> torch.Tensor:
    """Philox4x32-10 of counters given as four words (int64 tensors holding 32-bit words, or ints,
    broadcastable) under one key -> (..., 4) words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key[0] & _MASK, key[1] & _MASK
    for r in range(ROUNDS):
        if r:
            k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack(torch.broadcast_tensors(*(torch.as_tensor(c) for c in (c0, c1, c2, c3))), dim=-1)


def _index(index) -> torch.Tensor:
    index = torch.as_tensor(np.asarray(index, dtype=np.int64) if not isinstance(index, torch.Tensor) else index)
    if index.dim() != 1 or (len(index) and (int(index.min()) < 0 or int(index.max()) > _MASK)):
        raise ValueError("shower indices must be a 1-d sequence within [0, 2^32)")
    return index.to(torch.int64)


def shower_words(seed: int, index, purpose: int, n: int, device="cpu") -> torch.Tensor:
    """The first n 32-bit words (int64, [0, 2^32)) of stream (seed, i, purpose) for every shower index i
    of `index` (B,) -> (B, n)."""
    index = _index(index).to(device)
    j = torch.arange(-(-n // 4), dtype=torch.int64, device=device)
    seed = int(seed) % 2 ** 64
    words = philox4x32((j[None, :], index[:, None], purpose, 0), (seed & _MASK, seed >> 32))  # (B, blocks, 4)
    return words.flatten(1)[:, :n]


def shower_uniforms(seed: int, index, purpose: int, n: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """(B, n) uniforms of stream (seed, i, purpose): float32 in [0, 1) (24 bits), float64 in (0, 1) (53)."""
    if dtype == torch.float32:
        return (shower_words(seed, index, purpose, n, device) >> 8).to(torch.float32) * 2.0 ** -24
    if dtype == torch.float64:
        w = shower_words(seed, index, purpose, 2 * n, device).view(-1, n, 2)
        bits = ((w[..., 0] >> 5) << 26) | (w[..., 1] >> 6)  # 27 + 26 bits
        return (bits.to(torch.float64) + 0.5) * 2.0 ** -53
    raise ValueError(f"uniforms are float32 or float64, not {dtype}")


def shower_normals(seed: int, index, purpose: int, n: int, device="cpu") -> torch.Tensor:
    """(B, n) standard normals (float64) of stream (seed, i, purpose): the inverse normal CDF of its uniforms."""
    return torch.special.ndtri(shower_uniforms(seed, index, purpose, n, torch.float64, device))


def decode_uniforms(seed: int, index, max_hits: int, draws_per_step: int, device="cpu") -> torch.Tensor:
    """The decoder's table (B, max_hits + 1, draws_per_step) float32: draw k of step t of shower index[b]
    is [b, t, k] (the flat position t * draws_per_step + k of its DECODE stream, so a shorter max_hits
    gives a prefix of the same table). 0.6 s for 10 000 showers of 353 x 2 on one thread of the 2-core
    AMD EPYC (noisy, shared), against ~4 minutes to decode them there."""
    table = shower_uniforms(seed, index, DECODE, (max_hits + 1) * draws_per_step, torch.float32, device)
    return table.view(-1, max_hits + 1, draws_per_step)
