"""Distances between a reference and a generated sample.

- separation power (triangular discrimination) of normalized histograms, bins from the reference;
- 1-D Wasserstein distance of samples or of binned distributions;
- FPD: Frechet distance of the high-level features, extrapolated to infinite sample size;
- KPD: unbiased kernel MMD^2 of the high-level features with a cubic polynomial kernel.
Uncertainties come from bootstrap resampling of both samples (per feature) or from the spread
over subsamples (FPD, KPD). Definitions and references: docs/evaluation.md.
"""

from __future__ import annotations

import numpy as np

N_BINS = 40


# --- binning ----------------------------------------------------------------------------------
def reference_edges(x_ref: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Histogram edges from a reference sample: its 0.1%-99.9% range, integer-aligned for counts,
    log-spaced for positive values spanning more than two decades."""
    x = x_ref[np.isfinite(x_ref)]
    lo, hi = np.quantile(x, [1e-3, 1 - 1e-3]) if x.size else (0.0, 1.0)
    if hi <= lo:  # constant feature: one bin around it
        half = 0.1 * abs(lo) if lo != 0 else 0.5
        return np.array([lo - half, lo + half])
    if np.all(x == np.round(x)) and hi - lo <= 2 * n_bins:  # small counts: one bin per integer
        return np.arange(np.floor(lo) - 0.5, np.ceil(hi) + 1.0)
    if lo > 0 and hi / lo > 100:
        return np.geomspace(lo, hi, n_bins + 1)
    return np.linspace(lo, hi, n_bins + 1)


def histogram(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per bin; values outside the edges are counted in the first or last bin."""
    idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
    return np.bincount(idx, minlength=len(edges) - 1).astype(np.float64)


# --- separation power -------------------------------------------------------------------------
def separation_power(h1: np.ndarray, h2: np.ndarray) -> np.ndarray | float:
    """1/2 sum_i (p_i - q_i)^2 / (p_i + q_i) of the normalized histograms; 0 = identical, 1 = disjoint.

    Works on the last axis, so (B, K) histograms give (B,) values; bins empty in both are skipped.
    """
    p = np.asarray(h1, dtype=np.float64)
    q = np.asarray(h2, dtype=np.float64)
    p = p / p.sum(axis=-1, keepdims=True)
    q = q / q.sum(axis=-1, keepdims=True)
    s = p + q
    terms = np.where(s > 0, (p - q) ** 2 / np.where(s > 0, s, 1.0), 0.0)
    out = 0.5 * terms.sum(axis=-1)
    return float(out) if np.ndim(out) == 0 else out


# --- Wasserstein-1 ----------------------------------------------------------------------------
def wasserstein_1d(u: np.ndarray, v: np.ndarray, u_weights: np.ndarray | None = None,
                   v_weights: np.ndarray | None = None) -> np.ndarray | float:
    """W1 = integral |F_u - F_v| dx of two (weighted) empirical distributions.

    Weights may be (B, n) to evaluate B reweightings (bootstrap replicas) at once; returns (B,).
    """
    u, v = np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)
    uw = np.ones(len(u)) if u_weights is None else np.asarray(u_weights, dtype=np.float64)
    vw = np.ones(len(v)) if v_weights is None else np.asarray(v_weights, dtype=np.float64)
    values = np.concatenate([u, v])
    order = np.argsort(values, kind="stable")
    dx = np.diff(values[order])  # (n_u + n_v - 1,)
    batch = np.broadcast_shapes(uw.shape[:-1], vw.shape[:-1])
    # F_u - F_v along the merged sorted values is one cumulative sum of +u and -v weights
    signed = np.concatenate([np.broadcast_to(uw / uw.sum(axis=-1, keepdims=True), batch + uw.shape[-1:]),
                             np.broadcast_to(-vw / vw.sum(axis=-1, keepdims=True), batch + vw.shape[-1:])], axis=-1)
    diff = np.cumsum(signed[..., order[:-1]], axis=-1)
    out = (np.abs(diff) * dx).sum(axis=-1)
    return float(out) if np.ndim(out) == 0 else out


def binned_wasserstein(centres: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray | float:
    """W1 of two distributions living on the same bin centres (K,); p, q (..., K) unnormalized."""
    cp = np.cumsum(p, axis=-1) / np.sum(p, axis=-1, keepdims=True)
    cq = np.cumsum(q, axis=-1) / np.sum(q, axis=-1, keepdims=True)
    out = (np.abs(cp - cq)[..., :-1] * np.diff(centres)).sum(axis=-1)
    return float(out) if np.ndim(out) == 0 else out


# --- Frechet and kernel distances on the high-level features ---------------------------------
def standardize(ref: np.ndarray, gen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale every feature by the reference mean and std; features constant in the reference are dropped."""
    mean, std = ref.mean(axis=0), ref.std(axis=0)
    keep = std > 1e-12 * np.maximum(1.0, np.abs(mean))
    return (ref[:, keep] - mean[keep]) / std[keep], (gen[:, keep] - mean[keep]) / std[keep]


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """|mu_x - mu_y|^2 + Tr(C_x + C_y - 2 (C_x C_y)^1/2) of Gaussians fitted to x (n, d) and y (m, d)."""
    mu_x, mu_y = x.mean(axis=0), y.mean(axis=0)
    c_x, c_y = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    # Tr (C_x C_y)^1/2 = sum of sqrt of the eigenvalues of the symmetric C_x^1/2 C_y C_x^1/2
    w, v = np.linalg.eigh(c_x)
    sqrt_cx = (v * np.sqrt(np.maximum(w, 0.0))) @ v.T
    cross = np.linalg.eigvalsh(sqrt_cx @ c_y @ sqrt_cx)
    tr_sqrt = np.sqrt(np.maximum(cross, 0.0)).sum()
    return float(np.sum((mu_x - mu_y) ** 2) + np.trace(c_x) + np.trace(c_y) - 2.0 * tr_sqrt)


def fpd(ref: np.ndarray, gen: np.ndarray, n_points: int = 10, n_batches: int = 10, min_fraction: float = 0.2,
        seed: int = 0) -> tuple[float, float]:
    """Frechet physics distance: FD at sizes N from min_fraction*n to n (n = the smaller sample), each the
    mean over n_batches random subsets, fitted with FD(N) = FD_inf + k / N; returns (FD_inf, its fit error).
    FD_inf is clipped at 0: a distance cannot be negative, but the extrapolation of two samples of one
    distribution scatters around 0 by about its error (identical files gave -22 +- 3.5 x1e-3 unclipped),
    so a value of 0 means "no difference resolved at this error".

    Features should already be standardized (see `standardize`).
    """
    rng = np.random.default_rng(seed)
    n = min(len(ref), len(gen))
    sizes = np.unique(np.linspace(max(2, int(min_fraction * n)), n, n_points).astype(int))
    if len(sizes) < 3:
        raise ValueError(f"FPD needs at least a few dozen showers per sample, got {n}")
    means = []
    for size in sizes:  # subsets without replacement are iid samples of size N, so E[FD_N] = FD_inf + k / N
        vals = [frechet_distance(ref[rng.choice(len(ref), size, replace=False)],
                                 gen[rng.choice(len(gen), size, replace=False)]) for _ in range(n_batches)]
        means.append(np.mean(vals))
    (slope, intercept), cov = np.polyfit(1.0 / sizes, means, 1, cov=True)
    return max(float(intercept), 0.0), float(np.sqrt(max(cov[1, 1], 0.0)))


def _poly_kernel_mean(a: np.ndarray, b: np.ndarray, d: int, exclude_diagonal: bool) -> float:
    # float32 kernel entries (2x faster), float64 sums: rounding errors average out over m^2 entries
    with np.errstate(over="ignore", invalid="ignore"):
        k = (a.astype(np.float32) @ b.astype(np.float32).T / np.float32(d) + np.float32(1.0)) ** 3
    if not np.isfinite(k).all():  # a shower with a feature ~1e4 standard deviations out overflows float32
        k = (a.astype(np.float64) @ b.astype(np.float64).T / d + 1.0) ** 3
    total = k.sum(dtype=np.float64)
    if exclude_diagonal:
        m = len(a)
        return float((total - np.trace(k, dtype=np.float64)) / (m * (m - 1)))
    return float(total / k.size)


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the kernel k(a, b) = (a.b / d + 1)^3."""
    d = x.shape[1]
    return (_poly_kernel_mean(x, x, d, True) + _poly_kernel_mean(y, y, d, True)
            - 2.0 * _poly_kernel_mean(x, y, d, False))


def kpd(ref: np.ndarray, gen: np.ndarray, n_batches: int = 10, batch_size: int = 5000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel physics distance: median of the unbiased MMD^2 over n_batches random subsets (without
    replacement inside a subset, at most half of the smaller sample so subsets differ), and half the
    16-84% spread of the batch values as error."""
    rng = np.random.default_rng(seed)
    m = max(2, min(batch_size, min(len(ref), len(gen)) // 2))
    vals = [mmd2_unbiased(ref[rng.choice(len(ref), m, replace=False)], gen[rng.choice(len(gen), m, replace=False)])
            for _ in range(n_batches)]
    lo, hi = np.percentile(vals, [16, 84])
    return float(np.median(vals)), float((hi - lo) / 2)


RESPONSE_STEP_GEV = 10.0  # width of the incident-energy bins of response_by_energy


def response_by_energy(inc_ref: np.ndarray, r_ref: np.ndarray, inc_gen: np.ndarray, r_gen: np.ndarray,
                       step_GeV: float = RESPONSE_STEP_GEV, min_showers: int = 20) -> dict:
    """The calorimeter response r = E_vis/E_inc per bin of incident energy (step_GeV wide, on the GeV grid),
    what a physicist reads first (scale and resolution): per bin the generated mean relative to the
    simulated one minus 1, the ratio of the interquartile ranges, and the fraction of generated showers
    above the largest simulated r of the bin; bins with fewer than min_showers on either side are left
    out. `worst` holds the largest |mean - 1|, the IQR ratio farthest from 1, and the overall fraction
    beyond the simulated maxima."""
    lo = np.floor(min(inc_ref.min(), inc_gen.min()) / 1e3 / step_GeV) * step_GeV
    edges = np.arange(lo, max(inc_ref.max(), inc_gen.max()) / 1e3 + step_GeV, step_GeV)
    b_ref = np.searchsorted(edges, inc_ref / 1e3, side="right") - 1
    b_gen = np.searchsorted(edges, inc_gen / 1e3, side="right") - 1
    bins, beyond, counted = [], 0, 0
    for k in range(len(edges) - 1):
        x, y = r_ref[b_ref == k], r_gen[b_gen == k]
        if min(len(x), len(y)) < min_showers:
            continue
        iqr_x, iqr_y = np.subtract(*np.percentile(x, [75, 25])), np.subtract(*np.percentile(y, [75, 25]))
        n_beyond = int((y > x.max()).sum())
        beyond, counted = beyond + n_beyond, counted + len(y)
        bins.append({"GeV": [float(edges[k]), float(edges[k + 1])], "n_reference": len(x), "n_generated": len(y),
                     "mean_reference": float(x.mean()), "mean_rel_diff": float(y.mean() / x.mean() - 1),
                     "iqr_reference": float(iqr_x), "iqr_ratio": float(iqr_y / iqr_x) if iqr_x > 0 else None,
                     "beyond_max_fraction": n_beyond / len(y)})
    ratios = [b["iqr_ratio"] for b in bins if b["iqr_ratio"] is not None]
    worst = {"mean_rel_diff": max((b["mean_rel_diff"] for b in bins), key=abs, default=None),
             "iqr_ratio": max(ratios, key=lambda v: abs(v - 1), default=None),
             "beyond_max_fraction": beyond / counted if counted else None}
    return {"step_GeV": step_GeV, "bins": bins, "worst": worst}
