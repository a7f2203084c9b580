"""Log-spaced cell-energy bins.

The published model used 25,000 linear bins of 1.4 keV, which spend most of the vocabulary on
energies no cell has and resolve small cells poorly. Cell energies span four decades, so calofm bins
log E with a fixed ratio r between edges: every bin has the same relative width (hi - lo) / lo = r - 1,
at most `rel_width` (1 % by default).

Default range 0.01 MeV .. 10 GeV (1389 bins at r = 1.00999): the cpu-geometry cells are thresholded
at ~0.1 MeV (a factor 10 margin below) and hold at most tens of MeV of visible energy (a factor >100
margin above). Values outside the range are clamped to the first/last bin and counted by `encode`,
and the counts go into the training log and the manifest. A wider range later is a new vocabulary
block of bins, never a renumbering.

Decoding rule: a bin decodes to its geometric centre sqrt(lo * hi) (`mode="center"`, relative error
at most ~0.5 %), or to a value drawn log-uniformly inside the bin (`mode="uniform"`, used for generated
showers so that their cell energies form a continuous spectrum rather than a comb).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from calofm.errors import CalofmError


@dataclass(frozen=True)
class LogEnergyBins:
    e_min_MeV: float = 0.01
    e_max_MeV: float = 1.0e4
    rel_width: float = 0.01

    def __post_init__(self):
        if not (0 < self.e_min_MeV < self.e_max_MeV) or not (0 < self.rel_width < 1):
            raise CalofmError(f"invalid energy binning {self}")

    @property
    def n_bins(self) -> int:
        return math.ceil(math.log(self.e_max_MeV / self.e_min_MeV) / math.log1p(self.rel_width))

    @property
    def log_step(self) -> float:
        """ln of the edge ratio r; r - 1 <= rel_width by construction."""
        return math.log(self.e_max_MeV / self.e_min_MeV) / self.n_bins

    @property
    def edges(self) -> np.ndarray:
        return self.e_min_MeV * np.exp(self.log_step * np.arange(self.n_bins + 1))

    def encode(self, energy_MeV: np.ndarray) -> tuple[np.ndarray, int, int]:
        """Bin index of each energy, plus the numbers of under- and overflows (clamped)."""
        e = np.asarray(energy_MeV, dtype=np.float64)
        idx = np.floor(np.log(np.maximum(e, 1e-300) / self.e_min_MeV) / self.log_step).astype(np.int64)
        under, over = int(np.count_nonzero(idx < 0)), int(np.count_nonzero(idx >= self.n_bins))
        return np.clip(idx, 0, self.n_bins - 1), under, over

    def decode(self, idx: np.ndarray, mode: str = "center", rng: np.random.Generator | None = None,
               u: np.ndarray | None = None) -> np.ndarray:
        """Energy in MeV for bin indices: geometric centre, or log-uniform within the bin (the position
        in the bin's logarithm: `u` (idx's shape) in [0, 1), or drawn from rng)."""
        idx = np.asarray(idx, dtype=np.float64)
        if mode == "center":
            u = 0.5
        elif mode == "uniform":
            u = (rng or np.random.default_rng()).random(idx.shape) if u is None else np.asarray(u, dtype=np.float64)
        else:
            raise CalofmError(f"unknown energy decoding mode {mode!r} (center, uniform)")
        return (self.e_min_MeV * np.exp(self.log_step * (idx + u))).astype(np.float32)

    def to_dict(self) -> dict:
        return {"e_min_MeV": self.e_min_MeV, "e_max_MeV": self.e_max_MeV, "rel_width": self.rel_width,
                "n_bins": self.n_bins}

    @classmethod
    def from_dict(cls, d: dict) -> LogEnergyBins:
        bins = cls(float(d["e_min_MeV"]), float(d["e_max_MeV"]), float(d["rel_width"]))
        if "n_bins" in d and int(d["n_bins"]) != bins.n_bins:
            raise CalofmError(f"energy binning stored with {d['n_bins']} bins, rebuilt with {bins.n_bins}")
        return bins
