"""Next-token sampling: temperature, top-k, top-p, without host synchronization.

Two exact ways to draw from the categorical distribution p (both sync-free, no multinomial):
- "cdf" (default): inverse CDF, the first token i with cumsum(p)_i > u * sum(p), u ~ U[0, 1): one
  uniform per row (a cumsum and a searchsorted over the vocabulary);
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
    logits = logits.float() / max(cfg.temperature, 1e-8)
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


def unnormalized_cdf(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) logits -> running sums of exp(logit - max): the uniform is scaled by the row total
    instead of dividing V entries."""
    return (logits - logits.amax(dim=-1, keepdim=True)).exp().cumsum(dim=-1)


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None,
           method: str = "cdf", rows: torch.Tensor | None = None, n_rows: int | None = None,
           cdf_fn=None) -> torch.Tensor:
    """(B, V) logits (masked entries -inf) -> (B,) token ids. cdf_fn: a compiled unnormalized_cdf."""
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
    cdf = (cdf_fn or unnormalized_cdf)(filter_logits(logits, cfg))
    total = cdf[:, -1:]
    u = torch.rand((n, 1), dtype=cdf.dtype, device=cdf.device, generator=generator)
    u = (u if rows is None else u[rows]) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total even after rounding
    # first i with cdf_i > u: cdf_i > cdf_{i-1}, so a token of probability 0 is never chosen
    return torch.searchsorted(cdf, u, right=True).squeeze(1)
