"""Per-shower physics features for any geometry: the CaloChallenge high-level set and a few more.

Every feature is computed from the voxel energies after the hit threshold (a voxel at or below it
counts as empty), from the geometry's voxel centres only, so Cartesian and cylindrical grids are
treated alike. Two kinds:
- scalars: one number per shower (E_vis/E_inc, energy, centre and width of every layer, ...);
  they are histogrammed, compared one by one, and stacked into the high-level vector.
- profiles: distributions pooled over all showers (longitudinal and radial energy profiles,
  hit-energy spectrum), kept as per-shower contents of fixed bins so they can be resampled.
And the hits themselves (energy, x, y, layer), for the published paper's observables (published.py).
Empty layers get centre and width 0, as in the CaloChallenge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calofm.detector.geometry import Geometry
from calofm.errors import CalofmError
from calofm.evaluate.published import HitList, hit_list

PER_LAYER = ("e_layer", "cx", "cy", "cr", "wx", "wy", "wr", "sparsity")  # groups with one feature per layer
GLOBAL = ("e_ratio", "long_cog", "long_width", "n_hits")
LABELS = {  # name -> (axis label, unit)
    "e_ratio": ("$E_{vis}/E_{inc}$", ""),
    "long_cog": ("longitudinal centre of gravity", "layer"),
    "long_width": ("longitudinal width", "layers"),
    "n_hits": ("hits above threshold", ""),
    "e_layer": ("energy in layer", "MeV"),
    "cx": ("centre of energy x", "mm"),
    "cy": ("centre of energy y", "mm"),
    "cr": ("centre of energy r", "mm"),
    "wx": ("width x", "mm"),
    "wy": ("width y", "mm"),
    "wr": ("width r", "mm"),
    "sparsity": ("fraction of cells hit", ""),
}
N_HIT_BINS = 60  # log-spaced bins of the hit-energy spectrum


def split_name(name: str) -> tuple[str, int | None]:
    """'cx_3' -> ('cx', 3); 'e_ratio' -> ('e_ratio', None)."""
    base, _, tail = name.rpartition("_")
    return (base, int(tail)) if base in PER_LAYER and tail.isdigit() else (name, None)


def feature_label(name: str) -> tuple[str, str]:
    """Axis label and unit of a scalar feature."""
    base, layer = split_name(name)
    label, unit = LABELS.get(base, (name, ""))
    return (f"{label} {layer}" if layer is not None else label), unit


@dataclass
class Profile:
    """A distribution pooled over showers: bin edges and each shower's content of every bin."""
    edges: np.ndarray  # (K + 1,) in `unit`
    weights: np.ndarray  # (N, K), energy (MeV) or hit counts per shower and bin
    label: str
    unit: str
    log_x: bool = False


@dataclass
class Features:
    incident_MeV: np.ndarray  # (N,)
    scalars: dict[str, np.ndarray]  # name -> (N,), in report order
    profiles: dict[str, Profile]
    threshold_MeV: float
    hits: HitList | None = None  # every hit above the threshold (published.py)

    def __len__(self) -> int:
        return len(self.incident_MeV)

    def subset(self, idx: np.ndarray) -> Features:
        return Features(
            self.incident_MeV[idx], {k: v[idx] for k, v in self.scalars.items()},
            {k: Profile(p.edges, p.weights[idx], p.label, p.unit, p.log_x) for k, p in self.profiles.items()},
            self.threshold_MeV, None if self.hits is None else self.hits.subset(idx),
        )

    def matrix(self) -> np.ndarray:
        """The high-level vector of every shower: all scalars side by side; (N, F) float64."""
        return np.stack([self.scalars[k] for k in self.scalars], axis=1).astype(np.float64)

    @property
    def names(self) -> list[str]:
        return list(self.scalars)


def radial_binning(geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Radial bins in mm (one cell wide on a Cartesian grid, the grid's own r edges on a cylindrical
    one) and the bin of every voxel centre: (edges (K + 1,), voxel_bin (n_voxels,))."""
    r = np.hypot(*geometry.voxel_xy_mm.T)
    if geometry.is_cartesian:
        step = geometry.grid.cell_mm
        edges = np.arange(0.0, r.max() + 1.5 * step, step)
    else:
        edges = np.unique(np.concatenate([np.asarray(e, dtype=np.float64) for e in geometry.grid.r_edges_mm]))
    return edges, np.clip(np.searchsorted(edges, r, side="right") - 1, 0, len(edges) - 2)


def hit_energy_edges(showers: np.ndarray, threshold_MeV: float = 0.0, n_bins: int = N_HIT_BINS) -> np.ndarray:
    """Log-spaced hit-energy bins in MeV spanning a (reference) sample: from the threshold, or the
    0.1% quantile of non-zero voxels when there is none, up to the largest voxel."""
    sample = showers[: min(len(showers), 2000)]
    hits = sample[sample > threshold_MeV]
    if hits.size == 0:
        raise CalofmError(f"no voxel above the hit threshold {threshold_MeV:g} MeV in the reference showers")
    lo = threshold_MeV if threshold_MeV > 0 else float(np.quantile(hits, 1e-3))
    hi = max(float(showers.max()), lo * 10)
    return np.geomspace(lo, hi, n_bins + 1)


def compute_features(incident_MeV: np.ndarray, showers: np.ndarray, geometry: Geometry,
                     threshold_MeV: float = 0.0, hit_edges: np.ndarray | None = None,
                     chunk: int = 1024) -> Features:
    """All features of showers (N, n_voxels) in MeV with incident energies (N,) in MeV.

    hit_edges: bins of the hit-energy spectrum; pass the reference's so that samples compare bin by bin.
    """
    incident_MeV = np.asarray(incident_MeV, dtype=np.float64).reshape(-1)
    if showers.ndim != 2 or showers.shape[1] != geometry.n_voxels:
        raise CalofmError(f"showers of shape {showers.shape} do not fit geometry {geometry.name!r} "
                          f"({geometry.n_voxels} voxels)")
    if len(incident_MeV) != len(showers):
        raise CalofmError(f"{len(incident_MeV)} incident energies for {len(showers)} showers")
    if len(showers) == 0:
        raise CalofmError("no showers to compute features of")
    n, n_layers = len(showers), geometry.n_layers
    starts = geometry.layer_offsets[:-1]
    x, y = geometry.voxel_xy_mm.T  # (V,) each
    r = np.hypot(x, y)
    cells = np.asarray(geometry.cells_per_layer, dtype=np.float64)  # (L,)
    r_edges, r_bin = radial_binning(geometry)  # (K + 1,), (V,)
    r_onehot = np.zeros((geometry.n_voxels, len(r_edges) - 1))
    r_onehot[np.arange(geometry.n_voxels), r_bin] = 1.0
    if hit_edges is None:
        hit_edges = hit_energy_edges(showers, threshold_MeV)
    n_hit_bins = len(hit_edges) - 1
    layer_idx = np.arange(n_layers, dtype=np.float64)

    per_layer = {k: np.zeros((n, n_layers)) for k in PER_LAYER}
    e_total, n_hits = np.zeros(n), np.zeros(n)
    long_cog, long_width = np.zeros(n), np.zeros(n)
    radial = np.zeros((n, len(r_edges) - 1))
    hit_counts = np.zeros((n, n_hit_bins))

    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        e = showers[lo:hi].astype(np.float64)  # (c, V)
        hit = e > threshold_MeV
        e = np.where(hit, e, 0.0)
        e_l = np.add.reduceat(e, starts, axis=1)  # (c, L)
        safe = np.where(e_l > 0, e_l, 1.0)

        def layer_mean(values):  # energy-weighted mean of per-voxel values within each layer; (c, L)
            return np.add.reduceat(e * values, starts, axis=1) / safe

        for c, w, v in (("cx", "wx", x), ("cy", "wy", y), ("cr", "wr", r)):
            m1, m2 = layer_mean(v), layer_mean(v * v)
            per_layer[c][lo:hi] = np.where(e_l > 0, m1, 0.0)
            per_layer[w][lo:hi] = np.where(e_l > 0, np.sqrt(np.maximum(m2 - m1 * m1, 0.0)), 0.0)
        per_layer["e_layer"][lo:hi] = e_l
        per_layer["sparsity"][lo:hi] = np.add.reduceat(hit.astype(np.float64), starts, axis=1) / cells

        e_sum = e_l.sum(axis=1)  # (c,)
        e_total[lo:hi] = e_sum
        n_hits[lo:hi] = hit.sum(axis=1)
        safe_sum = np.where(e_sum > 0, e_sum, 1.0)
        m1 = e_l @ layer_idx / safe_sum
        m2 = e_l @ layer_idx**2 / safe_sum
        long_cog[lo:hi] = np.where(e_sum > 0, m1, 0.0)
        long_width[lo:hi] = np.where(e_sum > 0, np.sqrt(np.maximum(m2 - m1 * m1, 0.0)), 0.0)
        radial[lo:hi] = e @ r_onehot

        rows, cols = np.nonzero(hit)  # hit-energy spectrum: count of hits per log-energy bin
        b = np.clip(np.searchsorted(hit_edges, e[rows, cols], side="right") - 1, 0, n_hit_bins - 1)
        hit_counts[lo:hi] = np.bincount(rows * n_hit_bins + b, minlength=(hi - lo) * n_hit_bins).reshape(hi - lo, -1)

    scalars = {"e_ratio": e_total / incident_MeV}
    for k in PER_LAYER:
        for i in range(n_layers):
            scalars[f"{k}_{i}"] = per_layer[k][:, i]
    scalars.update(long_cog=long_cog, long_width=long_width, n_hits=n_hits)
    profiles = {
        "longitudinal_profile": Profile(np.arange(n_layers + 1) - 0.5, per_layer["e_layer"], "layer", "", False),
        "radial_profile": Profile(r_edges, radial, "radius", "mm", False),
        "hit_energy_spectrum": Profile(np.asarray(hit_edges, dtype=np.float64), hit_counts, "hit energy", "MeV", True),
    }
    return Features(incident_MeV, scalars, profiles, float(threshold_MeV),
                    hit_list(showers, geometry, threshold_MeV, chunk))
