"""Low-rank adapters that act only on the showers they were made for.

Written by hand rather than with HF peft for two reasons: peft would pull in transformers and
accelerate for what is ~60 lines here, and peft's adapters act on every input, whereas ours must be
*gated per shower*: an adapter for the new particle e- changes nothing for photon showers, so the
base model's outputs for everything it already knew stay bit-for-bit identical (the gate selects
with torch.where, it does not add a zero).

Scaling is rank-stabilized (rsLoRA, Kalajdzievski 2023): delta = (alpha / sqrt(r)) * B A x, with A
random and B zero at initialization, so a fresh adapter leaves the model unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from calofm.model.attention import Showers


class LowRank(nn.Module):
    """delta(x) = scale * B(A(x)); A (r, d_in), B (d_out, r), B starts at zero."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float):
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, d_in) / math.sqrt(d_in))
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        self.scale = alpha / math.sqrt(rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A.to(x.dtype).t()) @ self.B.to(x.dtype).t() * self.scale


class ShowerGate:
    """Which showers of a batch an adapter acts on: those whose `key` id ('material' or 'particle') is
    one of `ids`. The model hands every gated layer the batch's ids (model.attention.Showers)."""

    def __init__(self, key: str, ids: tuple[int, ...]):
        self.key, self.ids = key, tuple(ids)

    def mask(self, showers: Showers) -> torch.Tensor:
        """(B,) bool: the gated showers; None when none is, in a batch that may be read back (a
        static step, inside a CUDA graph, computes the adapter for every row and selects)."""
        ids = getattr(showers, self.key)
        m = ids == self.ids[0]
        for i in self.ids[1:]:
            m = m | (ids == i)
        return m if showers.static or bool(m.any()) else None


class GatedLoRALinear(nn.Module):
    """A frozen nn.Linear plus a LowRank delta on the gated showers' rows; x (B, T, d_in)."""

    per_shower = True  # called as layer(x, showers) (model.attention.per_shower)

    def __init__(self, base: nn.Linear, rank: int, alpha: float, gate: ShowerGate):
        super().__init__()
        self.base, self.gate = base, gate
        self.lora = LowRank(base.in_features, base.out_features, rank, alpha).to(base.weight.device)

    def forward(self, x: torch.Tensor, showers: Showers) -> torch.Tensor:
        y = self.base(x)
        m = self.gate.mask(showers)
        if m is None:  # no shower is gated
            return y
        return torch.where(m.view(-1, *([1] * (y.dim() - 1))), y + self.lora(x).to(y.dtype), y)


class GatedResidual(nn.Module):
    """module(x) + gate * LowRank(module(x)): a low-rank correction of everything downstream of
    `module`. Wrapped around the final LayerNorm it corrects both output heads: W (1 + BA) h."""

    per_shower = True

    def __init__(self, module: nn.Module, dim: int, rank: int, alpha: float, gate: ShowerGate):
        super().__init__()
        self.module, self.gate = module, gate
        self.lora = LowRank(dim, dim, rank, alpha).to(next(module.parameters()).device)

    # the wrapped LayerNorm's weight, for code that reads `model.ln_f.weight` (device, dtype)
    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    def forward(self, x: torch.Tensor, showers: Showers) -> torch.Tensor:
        y = self.module(x)
        m = self.gate.mask(showers)
        if m is None:  # no shower is gated
            return y
        return torch.where(m.view(-1, *([1] * (y.dim() - 1))), y + self.lora(y).to(y.dtype), y)
