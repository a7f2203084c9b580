"""Next-token sampling: temperature, top-k, top-p, without host synchronization.

Two exact ways to draw from the categorical distribution p (both sync-free, no multinomial):
- "cdf" (default): inverse CDF, the first token i with cumsum(p)_i > u * sum(p), u ~ U[0, 1): one
  uniform per row. Searched in two levels, first among chunks of CHUNK tokens (sums of each chunk,
  then a short cumsum), then inside the chosen chunk: a cumsum over the whole vocabulary is a
  sequential scan, several times slower than the chunk sums on CPU;
- "exp": argmax(p_i / q_i) with q_i ~ Exp(1) i.i.d. (the exponential-race form of the Gumbel-max
  trick): one exponential per vocabulary entry, which made it the most expensive op of decoding.

`rows` / `n_rows`: the logits are rows `rows` of a batch of `n_rows` rows. The random numbers are
drawn for the whole batch and these rows' used, so a row's draw never depends on which other rows
are still in the batch (decoding drops finished showers, see decode.DecodeOptions.compact).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Apply temperature, top-k and top-p (nucleus) to (B, V) logits; removed entries become -inf."""
    logits = logits.float()
    if cfg.temperature != 1.0:  # a pass over (B, V) saved in the usual case
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
    return logits


SAMPLERS = ("cdf", "exp")
CHUNK = 64  # tokens per chunk of the two-level inverse-CDF search


def chunked_weights(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, V) logits -> unnormalized probabilities exp(logit - max), zero-padded to (B, C, CHUNK), and
    their sums per chunk (B, C). Not normalized: the uniform is scaled by the row total instead."""
    B, V = logits.shape
    p = (logits - logits.amax(dim=-1, keepdim=True)).exp()
    p = torch.nn.functional.pad(p, (0, -V % CHUNK)).view(B, -1, CHUNK)
    return p, p.sum(dim=-1)


def _below(x: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """x clipped into [0, limit): rounding must not push a target past the last positive weight."""
    return torch.minimum(x.clamp(min=0), torch.nextafter(limit, torch.zeros_like(limit)))


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None,
           method: str = "cdf", rows: torch.Tensor | None = None, n_rows: int | None = None,
           cdf_fn=None) -> torch.Tensor:
    """(B, V) logits (masked entries -inf) -> (B,) token ids. cdf_fn: a compiled chunked_weights."""
    if cfg.temperature <= 0:
        return logits.argmax(dim=-1)
    B, V = logits.shape
    n = B if rows is None else n_rows
    if method == "exp":
        probs = filter_logits(logits, cfg).softmax(dim=-1)
        q = torch.empty((n, V), dtype=probs.dtype, device=probs.device).exponential_(1.0, generator=generator)
        return (probs / (q if rows is None else q[rows])).argmax(dim=-1)
    if method != "cdf":
        raise ValueError(f"unknown sampler {method!r} ({', '.join(SAMPLERS)})")
    p, chunk_sums = (cdf_fn or chunked_weights)(filter_logits(logits, cfg))  # (B, C, CHUNK), (B, C)
    chunk_cdf = chunk_sums.cumsum(dim=-1)
    u = torch.rand((n, 1), dtype=p.dtype, device=p.device, generator=generator)
    target = _below((u if rows is None else u[rows]) * chunk_cdf[:, -1:], chunk_cdf[:, -1:])  # (B, 1)
    # first chunk c with chunk_cdf_c > target: its sum is > 0. Then the first token inside it whose
    # running sum exceeds what is left of the target; running sums only grow at tokens of positive
    # probability, so a token of probability 0 (masked) is never chosen
    c = torch.searchsorted(chunk_cdf, target, right=True)  # (B, 1)
    before = torch.where(c > 0, chunk_cdf.gather(1, (c - 1).clamp(min=0)), 0.0)
    inside = p.gather(1, c[:, :, None].expand(-1, 1, CHUNK)).squeeze(1).cumsum(dim=-1)  # (B, CHUNK)
    i = torch.searchsorted(inside, _below(target - before, inside[:, -1:]), right=True)
    return (c * CHUNK + i).squeeze(1)
