"""Learning-rate schedule and the order in which training showers are visited."""

from __future__ import annotations

import math

import numpy as np

from calofm.errors import CalofmError


def lr_at(step: int, lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up to `lr` over `warmup` steps, then cosine decay to min_ratio * lr at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class BatchSampler:
    """Global batches of shower indices: a fresh permutation each epoch, drawn from (seed, epoch),
    so the whole data order is a function of (seed, epoch, cursor) -- the resumable state."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int = 0, cursor: int = 0):
        if batch_size > n:
            raise CalofmError(f"batch size {batch_size} exceeds the {n} training showers")
        self.n, self.batch_size, self.seed, self.epoch, self.cursor = n, batch_size, seed, epoch, cursor
        self._perm_epoch, self._perm = -1, None

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
            self._perm_epoch = self.epoch
        return self._perm

    def next(self) -> np.ndarray:
        if self.cursor + self.batch_size > self.n:  # drop the incomplete tail, start a new epoch
            self.epoch, self.cursor = self.epoch + 1, 0
        idx = self._permutation()[self.cursor:self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return idx

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}
