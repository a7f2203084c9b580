"""Shower totals: how many hits a shower has and what they add up to, per (material, particle).

A next-token model builds the total visible energy E_vis and the hit count n out of hundreds of
sampled tokens; small errors in how each token depends on the ones before add up, and the
shower-to-shower spread of E_vis/E_inc and n comes out two to three times too wide, although both
are the first things a physicist checks (resolution, occupancy). Flow-based calorimeter surrogates
(CaloFlow and successors) solve the same problem with two stages: first sample the energy budget,
then the shape. We do that here with the smallest model that carries the physics:

- per class, the joint law of (n, r = E_vis/E_inc) given the incident energy is a Gaussian copula:
  a smooth trend in log E_inc (quadratic fit) plus the quantile functions of the residuals in
  `n_bins` bins of log E_inc (interpolated linearly between bin centres; the trend keeps the bins
  from widening the laws), tied by the correlation of their normal scores (more hits <-> more energy);
- at generation, (n, r) is drawn first; the decoder is held to exactly n hits (EOS masked before,
  forced at n), and the hit energies above the readout threshold are rescaled so that they sum to
  r * E_inc (every hit stays above threshold and the energy order is kept).

The statistics are fitted on the training rows of the training files (never on reference data),
travel with the tokenizer in the model manifest, and an adapter brings those of its new classes.
Off by default (it hurts showers that leak, see docs/model.md); switch on with
`generate(..., totals=True)` / `calofm generate --totals`.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr, ndtri

from calofm.errors import CalofmError

TOTALS_MODES = ("off", "energy", "hits+energy")  # generation: see ShowerModel.generate
N_LEVELS = 41  # quantile levels 0, 1/40, ..., 1 (the ends are the observed extremes)
MIN_PER_BIN = 200  # fewer showers per energy bin make the quantiles noisy


def totals_mode(totals: bool | str | None) -> str:
    """generate()'s `totals` as one of TOTALS_MODES (True: "hits+energy", False / None: "off")."""
    if totals is True:
        return "hits+energy"
    if totals is False or totals is None:
        return "off"
    if totals not in TOTALS_MODES:
        raise CalofmError(f"totals must be one of {', '.join(TOTALS_MODES)}, got {totals!r}")
    return totals


def class_key(material: str, particle: str) -> str:
    return f"{material}/{particle}"


def _scores(x: np.ndarray) -> np.ndarray:
    """Normal scores of the ranks (ties get distinct ranks: the copula only needs the order)."""
    ranks = np.argsort(np.argsort(x, kind="stable"), kind="stable")
    return ndtri((ranks + 0.5) / len(x))


class ShowerTotals:
    def __init__(self, tables: dict[str, dict] | None = None):
        self.tables = dict(tables or {})  # class key -> {"log_e", "levels", "n_q", "r_q", "rho"}

    def __contains__(self, key: str) -> bool:
        return key in self.tables

    def __len__(self) -> int:
        return len(self.tables)

    def keys(self) -> list[str]:
        return list(self.tables)

    def update(self, other: ShowerTotals) -> None:
        self.tables.update(other.tables)

    def to_dict(self) -> dict:
        return {k: dict(v) for k, v in self.tables.items()}

    @classmethod
    def from_dict(cls, d: dict | None) -> ShowerTotals:
        try:
            tables = {str(k): {"log_e": [float(x) for x in v["log_e"]], "levels": [float(x) for x in v["levels"]],
                               "n_q": [[float(x) for x in row] for row in v["n_q"]],
                               "r_q": [[float(x) for x in row] for row in v["r_q"]],
                               "rho": [float(x) for x in v["rho"]], "min_hit_MeV": float(v["min_hit_MeV"]),
                               "n_trend": [float(x) for x in v["n_trend"]], "r_trend": [float(x) for x in v["r_trend"]]}
                      for k, v in (d or {}).items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise CalofmError(f"malformed shower totals: {exc!r}") from None
        return cls(tables)

    @classmethod
    def fit(cls, key: str, incident_MeV: np.ndarray, n_hits: np.ndarray, e_vis_MeV: np.ndarray,
            min_hit_MeV: float, n_bins: int = 16) -> ShowerTotals:
        """Fit one class from its training showers (incident energy, hit count, visible energy) and
        the smallest hit energy seen (the readout threshold as the data show it)."""
        log_e = np.log(np.asarray(incident_MeV, dtype=np.float64).reshape(-1))
        n = np.asarray(n_hits, dtype=np.float64).reshape(-1)
        r = np.asarray(e_vis_MeV, dtype=np.float64).reshape(-1) / np.exp(log_e)
        if not (len(log_e) == len(n) == len(r)) or len(r) < 2 or not np.all(np.isfinite(r)):
            raise CalofmError(f"{key}: cannot fit shower totals on {len(r)} showers")
        n_bins = max(1, min(n_bins, len(r) // MIN_PER_BIN))
        order = np.argsort(log_e)  # equal-population bins in log E_inc
        levels = np.linspace(0.0, 1.0, N_LEVELS)
        deg = 2 if np.ptp(log_e) > 0 and len(r) > 10 else 0
        n_trend, r_trend = np.polyfit(log_e, n, deg), np.polyfit(log_e, r, deg)
        dn, dr = n - np.polyval(n_trend, log_e), r - np.polyval(r_trend, log_e)
        table = {"log_e": [], "levels": levels.tolist(), "n_q": [], "r_q": [], "rho": [],
                 "n_trend": n_trend.tolist(), "r_trend": r_trend.tolist(), "min_hit_MeV": float(min_hit_MeV)}
        for rows in np.array_split(order, n_bins):
            table["log_e"].append(float(np.mean(log_e[rows])))
            table["n_q"].append(np.quantile(dn[rows], levels).tolist())
            table["r_q"].append(np.quantile(dr[rows], levels).tolist())
            rho = float(np.corrcoef(_scores(dn[rows]), _scores(dr[rows]))[0, 1]) if len(rows) > 2 else 0.0
            table["rho"].append(rho if np.isfinite(rho) else 0.0)
        return cls({key: table})

    def min_hit_MeV(self, key: str) -> float:
        return self.tables[key]["min_hit_MeV"]

    def sample(self, key: str, incident_MeV: np.ndarray, rng: np.random.Generator | None = None,
               normals: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(n hits (N,) int, E_vis/E_inc (N,)) for showers of class `key` at the given energies, from
        two standard normals per shower: `normals` (N, 2), or drawn from rng."""
        if key not in self.tables:
            raise CalofmError(f"no shower totals for {key}; known: {', '.join(self.tables) or 'none'}")
        law = _Law(self.tables[key], incident_MeV)
        z1, z2 = rng.standard_normal((2, len(law.log_e))) if normals is None else np.asarray(normals, dtype=np.float64).T
        n = np.rint(law.trend("n") + law.quantile("n", ndtr(z1)))
        return np.maximum(n, 1).astype(np.int64), law.ratio_given(z1, z2)

    def sample_ratio_given_hits(self, key: str, incident_MeV: np.ndarray, n_hits: np.ndarray,
                                normals: np.ndarray) -> np.ndarray:
        """E_vis/E_inc (N,) for showers of class `key` whose hit count n is already known (decoded freely):
        drawn from the law of r given n. The count's normal score z_n comes from its place in the fitted
        count law (n is an integer: its rank is jittered uniformly across the count's step with the first
        normal, and kept within the 0.1-99.9 % levels), and r's score is rho z_n + sqrt(1 - rho^2) z with
        the second. normals: (N, 2) standard normals."""
        law = _Law(self.tables[key], incident_MeV)
        z_jitter, z2 = np.asarray(normals, dtype=np.float64).T
        dn = np.asarray(n_hits, dtype=np.float64).reshape(-1) + ndtr(z_jitter) - 0.5 - law.trend("n")
        z1 = ndtri(np.clip(law.level("n", dn), 1e-3, 1 - 1e-3))
        return law.ratio_given(z1, z2)


class _Law:
    """One class's totals law at given incident energies: the two energy bins around each shower and the
    weight of the upper one (clamped outside the fitted range), for the quantile functions, their
    inverses and the copula."""

    def __init__(self, table: dict, incident_MeV: np.ndarray):
        self.t = table
        self.log_e = np.log(np.asarray(incident_MeV, dtype=np.float64).reshape(-1))
        centres = np.asarray(table["log_e"])
        self.levels = np.asarray(table["levels"])
        if len(centres) == 1:
            self.lo = self.hi = np.zeros(len(self.log_e), dtype=np.int64)
            self.w = np.zeros(len(self.log_e))
        else:
            self.hi = np.clip(np.searchsorted(centres, self.log_e), 1, len(centres) - 1)
            self.lo = self.hi - 1
            self.w = np.clip((self.log_e - centres[self.lo]) / (centres[self.hi] - centres[self.lo]), 0.0, 1.0)

    def trend(self, name: str) -> np.ndarray:  # name: "n" or "r"
        return np.polyval(self.t[f"{name}_trend"], self.log_e)

    def _at_bins(self, fn, x: np.ndarray) -> np.ndarray:
        """(1 - w) fn(x, bin lo) + w fn(x, bin hi), one call per energy bin, not per shower."""
        out = np.zeros(len(x))
        for bins, weight in ((self.lo, 1 - self.w), (self.hi, self.w)):
            for b in np.unique(bins):
                sel = bins == b
                out[sel] += weight[sel] * fn(x[sel], b)
        return out

    def quantile(self, name: str, u: np.ndarray) -> np.ndarray:
        """The residual of `name` at levels u (N,)."""
        q = np.asarray(self.t[f"{name}_q"])
        return self._at_bins(lambda x, b: np.interp(x, self.levels, q[b]), u)

    def level(self, name: str, residual: np.ndarray) -> np.ndarray:
        """The inverse of quantile: the level (N,) of each residual."""
        q = np.asarray(self.t[f"{name}_q"])
        return self._at_bins(lambda x, b: np.interp(x, q[b], self.levels), residual)

    def ratio_given(self, z1: np.ndarray, z2: np.ndarray) -> np.ndarray:
        """E_vis/E_inc from the count's normal score z1 and an independent standard normal z2 (the copula)."""
        rho = np.asarray(self.t["rho"])
        c = (1 - self.w) * rho[self.lo] + self.w * rho[self.hi]
        u_r = ndtr(c * z1 + np.sqrt(np.clip(1 - c * c, 0.0, 1.0)) * z2)
        return np.maximum(self.trend("r") + self.quantile("r", u_r), 0.0)


def rescale_to_total(showers: np.ndarray, target_MeV: np.ndarray, threshold_MeV: float) -> np.ndarray:
    """Scale each shower's energy above threshold so that the hits sum to `target_MeV`.

    E -> thr + s (E - thr) keeps every hit at or above the readout threshold and keeps their order;
    s is solved per shower. A target below n * thr (not reachable with n hits) puts every hit at thr."""
    showers = np.asarray(showers, dtype=np.float64)
    hit = showers > 0
    # a sampled energy bin can lie below the threshold the data show; such a hit is read at threshold
    showers = np.where(hit, np.maximum(showers, threshold_MeV), 0.0)
    n = hit.sum(axis=1)
    excess = np.where(hit, showers - threshold_MeV, 0.0).sum(axis=1)
    want = np.asarray(target_MeV, dtype=np.float64) - n * threshold_MeV
    s = np.where(excess > 0, np.maximum(want, 0.0) / np.where(excess > 0, excess, 1.0), 1.0)
    out = np.where(hit, threshold_MeV + s[:, None] * (showers - threshold_MeV), 0.0)
    return out.astype(np.float32)
