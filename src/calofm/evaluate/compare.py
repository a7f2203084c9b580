"""One comparison of a generated sample with a reference, and the same with two reference halves.

`compare` fills the metrics.json object of one material (schema in docs/evaluation.md):
classifier AUC/JSD on low- and high-level inputs, FPD, KPD, and per feature the separation power
and Wasserstein distance, each with its uncertainty; the response E_vis/E_inc per 10 GeV of incident
energy (scale, resolution, showers beyond the simulated maximum); and the published paper's W1 and KL of its ten
observables (published.py). `noise_floor` runs the same on two disjoint
random halves of the reference: what a perfect generator would score (at half the statistics).
The input checks refuse comparisons that would be meaningless: other geometry, other energies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from calofm.detector.geometry import Geometry
from calofm.errors import CalofmError
from calofm.evaluate import metrics as M
from calofm.evaluate.classifier import classifier_test, high_level_inputs
from calofm.evaluate.features import Features
from calofm.evaluate.published import published_metrics

KPD_FPD_SCALE = 1e3  # FPD and KPD are quoted x 10^3, as in the CaloChallenge tables
ENERGY_MAX_KS = 0.1  # refuse when the incident-energy CDFs differ by more than this ...
ENERGY_MIN_P = 1e-3  # ... and the KS test says the difference is significant


@dataclass
class Options:
    seed: int = 0
    n_boot: int = 50  # bootstrap replicas for separation power and Wasserstein errors
    classifier: bool = True
    max_epochs: int = 30
    patience: int = 5
    folds: int = 1  # classifier test splits measured in turn (classifier_test); 1: the CaloChallenge's one
    threads: int | None = 1  # torch threads of the classifier (see classifier_test)
    progress: bool = True
    log: callable = field(default=print, repr=False)


@dataclass
class Prepared:
    """What the metrics need of one sample: its features and its low-level classifier input."""
    features: Features
    low_level: np.ndarray | None  # (N, 1 + V) float32, see classifier.low_level_inputs

    def __len__(self) -> int:
        return len(self.features)

    def subset(self, idx: np.ndarray) -> Prepared:
        return Prepared(self.features.subset(idx), None if self.low_level is None else self.low_level[idx])


# --- input checks -----------------------------------------------------------------------------
def readout_signature(geometry: Geometry) -> dict:
    """The geometry without its name and absorber material: what must agree for voxels to compare."""
    d = geometry.to_dict()
    d.pop("name")
    for layer in d["layers"]:
        layer.pop("absorber")
    return d


def check_geometries(ref_geometry: Geometry | None, gen_geometry: Geometry | None, ref_name: str,
                     gen_name: str) -> list[str]:
    """Refuse different readouts; return warnings (e.g. other absorber, a legitimate material study)."""
    for g, name in ((ref_geometry, ref_name), (gen_geometry, gen_name)):
        if g is None:
            raise CalofmError(f"{name}: the file does not say its geometry; pass --geometry (or --binning)")
    if readout_signature(ref_geometry) != readout_signature(gen_geometry):
        raise CalofmError(
            f"{gen_name} and {ref_name} come from different geometries: {gen_geometry.name!r} "
            f"({gen_geometry.n_layers} layers, {gen_geometry.n_voxels} voxels) vs {ref_geometry.name!r} "
            f"({ref_geometry.n_layers} layers, {ref_geometry.n_voxels} voxels); showers compare only voxel by voxel")
    if ref_geometry.absorber != gen_geometry.absorber:
        return [f"{gen_name} has absorber {gen_geometry.absorber}, the reference {ref_geometry.absorber}"]
    return []


def check_energies(e_ref: np.ndarray, e_gen: np.ndarray, ref_name: str, gen_name: str) -> float:
    """Refuse incident-energy spectra that clearly differ (KS distance > 0.1 with p < 0.001); return the KS distance."""
    from scipy.stats import ks_2samp

    res = ks_2samp(e_ref, e_gen)
    if res.statistic > ENERGY_MAX_KS and res.pvalue < ENERGY_MIN_P:
        raise CalofmError(
            f"{gen_name} and {ref_name} have different incident-energy spectra "
            f"({e_gen.min() / 1e3:.3g}-{e_gen.max() / 1e3:.3g} GeV vs "
            f"{e_ref.min() / 1e3:.3g}-{e_ref.max() / 1e3:.3g} GeV, "
            f"KS distance {res.statistic:.2f} > {ENERGY_MAX_KS}); generate at the reference energies "
            f"(or pass --allow-energy-mismatch)")
    return float(res.statistic)


# --- per-feature distances --------------------------------------------------------------------
def feature_distances(ref: Features, gen: Features, n_boot: int, rng: np.random.Generator) -> dict:
    """Separation power and W1 of every scalar and profile, with bootstrap standard deviations."""
    n_r, n_g = len(ref), len(gen)
    # one set of bootstrap replicas for all features: w[b, i] = times shower i is drawn in replica b
    w_r = rng.multinomial(n_r, np.full(n_r, 1.0 / n_r), size=n_boot).astype(np.float64)  # (B, n_r)
    w_g = rng.multinomial(n_g, np.full(n_g, 1.0 / n_g), size=n_boot).astype(np.float64)  # (B, n_g)
    out = {"separation_power": {}, "wasserstein": {}, "separation_power_err": {}, "wasserstein_err": {}}

    def store(name, sp, sp_boot, w1, w1_boot):
        out["separation_power"][name], out["wasserstein"][name] = float(sp), float(w1)
        out["separation_power_err"][name] = float(np.std(sp_boot)) if n_boot > 1 else 0.0
        out["wasserstein_err"][name] = float(np.std(w1_boot)) if n_boot > 1 else 0.0

    for name in ref.scalars:
        x_r, x_g = ref.scalars[name], gen.scalars[name]
        edges = M.reference_edges(x_r)
        k = len(edges) - 1
        i_r = np.clip(np.searchsorted(edges, x_r, side="right") - 1, 0, k - 1)
        i_g = np.clip(np.searchsorted(edges, x_g, side="right") - 1, 0, k - 1)
        h_r = np.stack([np.bincount(i_r, weights=w, minlength=k) for w in w_r])  # (B, K)
        h_g = np.stack([np.bincount(i_g, weights=w, minlength=k) for w in w_g])
        sp = M.separation_power(np.bincount(i_r, minlength=k), np.bincount(i_g, minlength=k))
        store(name, sp, M.separation_power(h_r, h_g), M.wasserstein_1d(x_r, x_g), M.wasserstein_1d(x_r, x_g, w_r, w_g))

    for name, p_r in ref.profiles.items():
        p_g = gen.profiles[name]
        edges = np.log10(p_r.edges) if p_r.log_x else p_r.edges
        centres = 0.5 * (edges[1:] + edges[:-1])
        tot_r, tot_g = p_r.weights.sum(axis=0), p_g.weights.sum(axis=0)  # (K,)
        boot_r, boot_g = w_r @ p_r.weights, w_g @ p_g.weights  # (B, K)
        store(name, M.separation_power(tot_r, tot_g), M.separation_power(boot_r, boot_g),
              M.binned_wasserstein(centres, tot_r, tot_g), M.binned_wasserstein(centres, boot_r, boot_g))
    return out


# --- the comparison ---------------------------------------------------------------------------
def compare(ref: Prepared, gen: Prepared, opts: Options, what: str = "reference vs generated") -> dict:
    """All metrics of gen against ref, as one metrics.json object (without noise_floor)."""
    from threadpoolctl import threadpool_limits

    # one BLAS thread: numpy's small eigen-decompositions and covariances run up to 80x slower with
    # two OpenBLAS threads on a shared 2-core machine; torch keeps its own thread setting
    with threadpool_limits(1, user_api="blas"):
        return _compare(ref, gen, opts, what)


def _compare(ref: Prepared, gen: Prepared, opts: Options, what: str) -> dict:
    rng = np.random.default_rng(opts.seed)
    timings = {}
    t = time.perf_counter()
    result = {"n_reference": len(ref), "n_generated": len(gen)}
    dist = feature_distances(ref.features, gen.features, opts.n_boot, rng)
    timings["features"] = time.perf_counter() - t

    t = time.perf_counter()
    hl_ref, hl_gen = M.standardize(ref.features.matrix(), gen.features.matrix())
    if min(len(ref), len(gen)) < 10 * hl_ref.shape[1]:
        opts.log(f"  note ({what}): FPD is strongly biased with fewer than 10 showers per feature "
                 f"({min(len(ref), len(gen))} for {hl_ref.shape[1]} features); read it against the noise floor")
    fpd = M.fpd(hl_ref, hl_gen, seed=opts.seed)
    kpd = M.kpd(hl_ref, hl_gen, seed=opts.seed)
    result["fpd"] = [fpd[0] * KPD_FPD_SCALE, fpd[1] * KPD_FPD_SCALE]
    result["kpd"] = [kpd[0] * KPD_FPD_SCALE, kpd[1] * KPD_FPD_SCALE]
    timings["fpd_kpd"] = time.perf_counter() - t

    details = {}
    if opts.classifier:
        t = time.perf_counter()
        common = dict(seed=opts.seed, max_epochs=opts.max_epochs, patience=opts.patience, folds=opts.folds,
                      threads=opts.threads, progress=opts.progress)
        if ref.low_level is not None and gen.low_level is not None:
            details["low"] = classifier_test(ref.low_level, gen.low_level, standardize=False,
                                             desc=f"classifier low-level ({what})", **common)
        details["high"] = classifier_test(
            high_level_inputs(ref.features.incident_MeV, ref.features.matrix()),
            high_level_inputs(gen.features.incident_MeV, gen.features.matrix()),
            standardize=True, desc=f"classifier high-level ({what})", **common)
        for level, r in details.items():
            trained = f"{r.epochs} epochs (best {r.best_epoch})" if r.folds == 1 else f"mean of {r.folds} folds"
            opts.log(f"  classifier {level}-level ({what}): AUC {r.auc:.3f} ± {r.auc_err:.3f}, {trained}, "
                     f"{r.seconds:.1f} s")
        timings["classifier"] = time.perf_counter() - t
    for level in ("low", "high"):
        r = details.get(level)
        result[f"classifier_auc_{level}"] = None if r is None else r.auc
        result[f"jsd_{level}"] = None if r is None else r.jsd
    result["separation_power"] = dist["separation_power"]
    result["wasserstein"] = dist["wasserstein"]
    result["uncertainties"] = {"separation_power": dist["separation_power_err"], "wasserstein": dist["wasserstein_err"]}
    for level in ("low", "high"):
        r = details.get(level)
        result["uncertainties"][f"classifier_auc_{level}"] = None if r is None else r.auc_err
        result["uncertainties"][f"jsd_{level}"] = None if r is None else r.jsd_err
    result["classifier"] = {k: v.to_dict() for k, v in details.items()}
    result["response"] = M.response_by_energy(ref.features.incident_MeV, ref.features.scalars["e_ratio"],
                                              gen.features.incident_MeV, gen.features.scalars["e_ratio"])
    if ref.features.hits is not None and gen.features.hits is not None:
        t = time.perf_counter()
        result["published"] = published_metrics(ref.features.hits, gen.features.hits)
        timings["published"] = time.perf_counter() - t
    result["seconds"] = {k: round(v, 2) for k, v in timings.items()}
    return result


def noise_floor(ref: Prepared, opts: Options) -> dict:
    """The comparison of two disjoint random halves of the reference."""
    n = len(ref) // 2
    if n < 2:
        raise CalofmError(f"the noise floor needs at least 4 reference showers, got {len(ref)}")
    perm = np.random.default_rng(opts.seed + 1).permutation(len(ref))
    return compare(ref.subset(np.sort(perm[:n])), ref.subset(np.sort(perm[n:2 * n])), opts,
                   what="reference vs reference")
