"""The published paper's metrics (arXiv:2603.28804; its code wmdataphys/FM4CAL, plotting.py and
utils/metrics.py): Wasserstein-1 and binned KL divergence of ten shower observables, reference vs
generated, with the published definitions wherever calofm's data allow:

- per hit (pooled over all showers): cell visible energy (MeV); hit x, y (cell index on a Cartesian
  grid, mm otherwise) and z (layer index);
- per shower: visible-energy sum (MeV), number of hits, "start layer" (as published: the layer of the
  shower's most energetic cell), and the energy-weighted mean x, y (cells) and z (layers).

W1: the 1-D Wasserstein distance of the raw values (not standardized, as published), in the
observable's unit (metrics.wasserstein_1d, the same quantity as scipy.stats.wasserstein_distance).
KL: KL(reference || generated) in nats over N_KL_BINS bins at equiprobable quantiles of the reference
(outer bins open-ended; repeated edges of discrete observables merged), shared by both samples; the
generated fractions get KL_EPSILON added and are renormalized, so a bin the generator never fills
costs a large but finite amount. This is the published quantiled_kl_divergence, except that its bin
count followed each plot's binning (33-50); here it is one fixed number for every observable.

Hits are the cells above the evaluation threshold for every observable (the published code cut at
0.1 MeV except for the cell spectrum; calofm's showers carry the simulator's readout threshold).
Showers without hits have no start layer or centre and are left out of those three observables.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calofm.detector.geometry import Geometry
from calofm.evaluate.metrics import wasserstein_1d

N_KL_BINS = 30
KL_EPSILON = 1e-10
OBSERVABLES = {  # name -> (label, unit)
    "cell_energy": ("cell visible energy", "MeV"),
    "energy_sum": ("visible-energy sum", "MeV"),
    "start_layer": ("start layer (layer of the most energetic cell)", "layer"),
    "n_hits": ("number of hits", "hits"),
    "hit_x": ("hit x", "cell"),
    "hit_y": ("hit y", "cell"),
    "hit_z": ("hit z", "layer"),
    "cog_x": ("energy-weighted mean x", "cell"),
    "cog_y": ("energy-weighted mean y", "cell"),
    "cog_z": ("energy-weighted mean z", "layer"),
}


@dataclass
class HitList:
    """Every hit of a sample: shower i owns hits offsets[i]:offsets[i+1]; x, y in cells (Cartesian grid)
    or mm, z the layer index."""

    offsets: np.ndarray  # (N + 1,) int64
    energy: np.ndarray  # (H,) float64, MeV
    x: np.ndarray  # (H,) float64
    y: np.ndarray  # (H,)
    z: np.ndarray  # (H,)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def subset(self, idx: np.ndarray) -> HitList:
        counts = self.counts[idx]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        flat = np.repeat(self.offsets[:-1][idx], counts) + (np.arange(offsets[-1]) - np.repeat(offsets[:-1], counts))
        return HitList(offsets, self.energy[flat], self.x[flat], self.y[flat], self.z[flat])


def hit_list(showers: np.ndarray, geometry: Geometry, threshold_MeV: float = 0.0, chunk: int = 1024) -> HitList:
    """The hits (cells above threshold_MeV) of showers (N, n_voxels) in MeV."""
    xy = geometry.voxel_xy_mm.astype(np.float64)
    if geometry.is_cartesian:  # cell indices 0 .. n-1, as the published code's coordinates
        xy = np.rint((xy - xy.min(axis=0)) / geometry.grid.cell_mm)
    layer = geometry.voxel_layer.astype(np.float64)
    counts, energy, cols = [], [], []
    for lo in range(0, len(showers), chunk):
        e = showers[lo:lo + chunk]
        rows, c = np.nonzero(e > threshold_MeV)
        counts.append(np.bincount(rows, minlength=len(e)))
        energy.append(e[rows, c].astype(np.float64))
        cols.append(c)
    counts = np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)
    cols = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    energy = np.concatenate(energy) if energy else np.zeros(0)
    return HitList(offsets, energy, xy[cols, 0], xy[cols, 1], layer[cols])


def observables(hits: HitList) -> dict[str, np.ndarray]:
    """The ten observables of OBSERVABLES: per hit (pooled) or per shower."""
    counts = hits.counts
    has = counts > 0
    starts = hits.offsets[:-1][has]
    e_sum = np.zeros(len(hits))
    if len(hits.energy):
        e_sum[has] = np.add.reduceat(hits.energy, starts)
    out = {"cell_energy": hits.energy, "energy_sum": e_sum, "start_layer": None, "n_hits": counts.astype(np.float64),
           "hit_x": hits.x, "hit_y": hits.y, "hit_z": hits.z}
    shower = np.repeat(np.arange(len(hits)), counts)
    # the most energetic hit of each shower: the largest energy, first in storage order on ties
    order = np.lexsort((-hits.energy, shower))
    out["start_layer"] = hits.z[order[hits.offsets[:-1][has]]]
    for axis in ("x", "y", "z"):
        v = getattr(hits, axis)
        out[f"cog_{axis}"] = np.add.reduceat(v * hits.energy, starts) / e_sum[has] if len(v) else np.zeros(0)
    return {k: out[k] for k in OBSERVABLES}


def kl_divergence(ref: np.ndarray, gen: np.ndarray, n_bins: int = N_KL_BINS, eps: float = KL_EPSILON) -> float:
    """KL(ref || gen) in nats of the two samples binned at n_bins equiprobable quantiles of ref (see the
    module docstring)."""
    ref, gen = np.asarray(ref, dtype=np.float64), np.asarray(gen, dtype=np.float64)
    if len(ref) == 0 or len(gen) == 0:
        return float("nan")
    inner = np.unique(np.quantile(ref, np.linspace(0.0, 1.0, n_bins + 1)[1:-1]))  # open-ended outer bins
    k = len(inner) + 1
    p = np.bincount(np.searchsorted(inner, ref, side="right"), minlength=k) / len(ref)
    q = np.bincount(np.searchsorted(inner, gen, side="right"), minlength=k) / len(gen) + eps
    q /= q.sum()
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p[nz] / q[nz])))


def published_metrics(ref: HitList, gen: HitList) -> dict:
    """{"wasserstein": {observable: W1}, "kl": {observable: KL(ref || gen)}} (NaN where a sample has no values)."""
    o_r, o_g = observables(ref), observables(gen)
    w1, kl = {}, {}
    for name in OBSERVABLES:
        a, b = o_r[name], o_g[name]
        w1[name] = float(wasserstein_1d(a, b)) if len(a) and len(b) else float("nan")
        kl[name] = kl_divergence(a, b)
    return {"wasserstein": w1, "kl": kl}
