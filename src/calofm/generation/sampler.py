"""Next-token sampling: temperature, top-k, top-p, min-p, without host synchronization.

Sampling is exact and sync-free (no multinomial), by inverse CDF: the first token i with
cumsum(p)_i > u * sum(p), u ~ U[0, 1): one uniform per row, which the decoder reads from each shower's
own table (see generation.decode and generation.streams). Searched in two levels, first among chunks of CHUNK tokens
(sums of each chunk, then a short cumsum), then inside the chosen chunk: a cumsum over the whole
vocabulary is a sequential scan, several times slower than the chunk sums on CPU. The probabilities
are never stored: one pass over the logits gives the chunk sums, and only the chosen chunk's CHUNK
probabilities are recomputed (at batch 1000 the (B, V) logits outgrow the CPU caches, so every full
pass is a trip to memory). The logits are read in their own dtype (bf16 under bf16 decoding), the sums
accumulated in fp32. (The exponential race, argmax(p_i / q_i) with one q_i ~ Exp(1) per vocabulary
entry, made decoding 2.1x slower on the 2-core CPU.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """How one head's tokens are drawn. min_p drops the tokens less probable than min_p times the most
    probable one (relative to the row's mode, unlike top-p's cumulative mass): the far tail of a softmax
    that no training example supports (see DEFAULT_MIN_P)."""

    temperature: float = 1.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off

    def __post_init__(self):
        if not (0 < self.top_p <= 1) or self.top_k < 0 or self.temperature < 0 or not 0 <= self.min_p <= 1:
            raise ValueError(f"invalid sampling settings {self} (temperature >= 0, top_k >= 0, "
                             "0 < top_p <= 1, 0 <= min_p <= 1)")

    @property
    def log_min_p(self) -> float:
        """ln(min_p): a token is kept when logit - max logit >= this (-inf: all kept)."""
        return math.log(self.min_p) if self.min_p > 0 else -math.inf


# Generation defaults of calofm.generate, per head (docs/model.md, "Min-p truncation"). Without them
# 0.7-2 % of generated W and Ta showers held a cell above anything in 10 000 simulated ones (up to
# 7 GeV where the simulated files' largest is 0.2 GeV): the energy head's softmax leaves a little mass
# on every one of its 1389 bins up to 10 GeV, and a shower makes ~180 draws. The energy cut is
# benchmarks/min_p_study.py's choice; the voxel cut was raised from 3e-4 to 3e-3 on an earlier
# calofm-small (`energy` order, 20.5 M tokens), where it lowered the high-level AUC of all five classes
# by 0.03-0.05 on held-out seeds (1e-2 helps W and Ta further but trims the halo of the sparse Cu showers).
# A model may ship its own (the manifest's "min_p", tuned on its weights: ShowerModel.min_p); these are
# the defaults of a model without one.
DEFAULT_MIN_P = {"voxel": 3e-3, "energy": 3e-3}


def min_p_defaults(value, where: str) -> dict[str, float]:
    """A model manifest's "min_p" ({"voxel": x, "energy": y}, either may be left out) over DEFAULT_MIN_P;
    ValueError naming `where` when it is not such a mapping of numbers in [0, 1]."""
    if value is None:
        return dict(DEFAULT_MIN_P)
    if not isinstance(value, dict) or not set(value) <= set(DEFAULT_MIN_P):
        raise ValueError(f"{where}: \"min_p\" must map 'voxel' and/or 'energy' to a number in [0, 1], "
                         f"found {value!r}")
    for head, v in value.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise ValueError(f"{where}: \"min_p\" of the {head} head must be a number in [0, 1], found {v!r}")
    return {**DEFAULT_MIN_P, **{head: float(v) for head, v in value.items()}}


def head_samplings(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p_voxel: float | None = None,
                   min_p_energy: float | None = None,
                   defaults: dict[str, float] | None = None) -> tuple[SamplingConfig, SamplingConfig]:
    """(voxel head's, energy head's) SamplingConfig, as generate() draws: temperature, top_k and top_p
    shared, each head its own min_p (None: the model's default from `defaults`, ShowerModel.min_p, else
    DEFAULT_MIN_P). A bad value raises ValueError naming it."""
    defaults = DEFAULT_MIN_P if defaults is None else defaults
    if not temperature >= 0:
        raise ValueError(f"temperature (--temperature) must be >= 0, got {temperature}")
    if not top_k >= 0:
        raise ValueError(f"top_k (--top-k) must be >= 0, got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p (--top-p) must be within (0, 1], got {top_p}")
    heads = []
    for head, min_p in (("voxel", min_p_voxel), ("energy", min_p_energy)):
        try:
            heads.append(SamplingConfig(temperature, top_k, top_p, defaults[head] if min_p is None else min_p))
        except ValueError as err:
            raise ValueError(f"{head} head (min_p_{head}, --min-p-{head}): {err}") from None
    return heads[0], heads[1]


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig, with_min_p: bool = True) -> torch.Tensor:
    """Apply temperature, top-k, top-p (nucleus) and (unless with_min_p is False) min-p to (B, V) logits;
    removed entries become -inf. Without any of them the logits come back as they are (no fp32 copy:
    the samplers accumulate in fp32)."""
    min_p = cfg.min_p if with_min_p else 0.0
    if cfg.temperature == 1.0 and not cfg.top_k and cfg.top_p >= 1.0 and min_p <= 0:
        return logits
    logits = logits.float()
    if cfg.temperature != 1.0:
        logits = logits / max(cfg.temperature, 1e-8)
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p (the top token always stays)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= cfg.top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    if min_p > 0:
        logits = logits.masked_fill(logits - logits.amax(dim=-1, keepdim=True) < math.log(min_p), float("-inf"))
    return logits


CHUNK = 64  # tokens per chunk of the two-level inverse-CDF search


def weights(logits: torch.Tensor, m: torch.Tensor, log_min_p: float) -> torch.Tensor:
    """Unnormalized probabilities exp(logit - m) in fp32, zero where logit - m < log_min_p (min-p)."""
    d = logits.float() - m
    if log_min_p == -math.inf:
        return d.exp()
    return torch.where(d >= log_min_p, d.exp(), 0.0)


def chunk_sums(logits: torch.Tensor, log_min_p: float = -math.inf) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, V) logits -> their row maxima (B, 1) and the sums of the weights (see `weights`) over each
    chunk of CHUNK tokens (B, C), in fp32; the last chunk may be shorter. The whole chunks and the short
    one are summed apart: padding the logits to whole chunks instead made the compiled kernel 1.8x
    slower (batch 1000 x 4503 on the 2-core CPU: 4.5 ms against 2.5)."""
    B, V = logits.shape
    m = logits.amax(dim=-1, keepdim=True).float()
    whole = V // CHUNK * CHUNK
    sums = weights(logits[:, :whole].view(B, -1, CHUNK), m[:, :, None], log_min_p).sum(dim=-1)
    if whole == V:
        return m, sums
    return m, torch.cat([sums, weights(logits[:, whole:], m, log_min_p).sum(dim=-1, keepdim=True)], dim=1)


def _below(x: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """x clipped into [0, limit): rounding must not push a target past the last positive weight."""
    return torch.minimum(x.clamp(min=0), torch.nextafter(limit, torch.zeros_like(limit)))


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None,
           cdf_fn=None, u: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) logits (masked entries -inf) -> (B,) token ids. cdf_fn: a compiled chunk_sums.
    u (B, 1): the uniforms, given by the caller instead of drawn from `generator` (the decoder reads
    each shower's own, and a CUDA graph cannot draw from a Python-held generator)."""
    if cfg.temperature <= 0:
        return logits.argmax(dim=-1)
    B, V = logits.shape
    logits = filter_logits(logits, cfg, with_min_p=False)  # min-p is applied to the weights below
    m, sums = (cdf_fn or chunk_sums)(logits, cfg.log_min_p)  # (B, 1), (B, C)
    chunk_cdf = sums.cumsum(dim=-1)
    if u is None:
        u = torch.rand((B, 1), dtype=chunk_cdf.dtype, device=logits.device, generator=generator)
    target = _below(u * chunk_cdf[:, -1:], chunk_cdf[:, -1:])  # (B, 1)
    # first chunk c with chunk_cdf_c > target: its sum is > 0. Then the first token inside it whose
    # running sum exceeds what is left of the target; running sums only grow at tokens of positive
    # probability, so a token of probability 0 (masked) is never chosen
    c = torch.searchsorted(chunk_cdf, target, right=True)  # (B, 1)
    before = torch.where(c > 0, chunk_cdf.gather(1, (c - 1).clamp(min=0)), 0.0)
    tokens = c * CHUNK + torch.arange(CHUNK, device=logits.device)  # (B, CHUNK), past V in the last chunk
    chunk = logits.gather(1, tokens.clamp(max=V - 1)).float().masked_fill(tokens >= V, float("-inf"))
    inside = weights(chunk, m, cfg.log_min_p).cumsum(dim=-1)
    i = torch.searchsorted(inside, _below(target - before, inside[:, -1:]), right=True)
    # a compiled cdf_fn and these eager weights could round a chunk of weights near underflow (logit -
    # max ~ -104) differently: positive there, all zero here. Then take the chunk's best token (finite,
    # and kept by min-p if any of the chunk is) rather than index CHUNK, which is past the chunk
    i = torch.where(inside[:, -1:] > 0, i, chunk.argmax(dim=-1, keepdim=True))
    return (c * CHUNK + i).squeeze(1)
