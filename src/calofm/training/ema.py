"""Exponential moving average of the weights: the model a run exports.

Near the end of a schedule the weights still move from step to step by more than the tokens between
them explain: on calofm-small's 56 M-token run, two checkpoints 500 steps apart differed by 0.10 in
high-level AUC, and the mean of the last three checkpoints' weights beat every one of them (MODEL_CARD.md).
An average over the last few hundred steps is that mean, kept as training runs:

    avg <- d * avg + (1 - d) * w   after every optimizer step, d = min(decay, n / (n + 9))

where n counts the updates. The warm-up of d (n / (n + 9): 0.1, 0.18, ... 0.9 at n = 81) lets a short
run's average follow its weights instead of staying at the initialization; with decay 0.998 the
average reaches back about 1 / (1 - decay) = 500 steps. decay 0 exports the last step's weights.
Only the parameters that train are averaged (an adapter's, in `calofm extend`); frozen ones stay copies.
"""

from __future__ import annotations

import copy

import torch


class WeightAverage:
    """An fp32 copy of `model` whose parameters are the moving average of `model`'s; `n` updates so far."""

    def __init__(self, model: torch.nn.Module, decay: float, n: int = 0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay, self.n = decay, n
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.n += 1
        d = min(self.decay, self.n / (self.n + 9))
        for avg, w in zip(self.model.parameters(), model.parameters()):
            if w.requires_grad:
                avg.lerp_(w.detach(), 1.0 - d)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Put the averaged values into `model`'s trainable parameters (in place)."""
        for avg, w in zip(self.model.parameters(), model.parameters()):
            if w.requires_grad:
                w.copy_(avg)
