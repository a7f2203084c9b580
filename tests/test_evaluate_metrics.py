"""Separation power, Wasserstein, FPD and KPD against hand-computed and analytic values."""

import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from calofm.detector.geometry import get_geometry
from calofm.evaluate import metrics as M
from calofm.evaluate.compare import feature_distances
from calofm.evaluate.features import compute_features


def test_separation_power_hand_computed():
    # p = (1/4, 1/2, 1/4), q = (1/2, 1/4, 1/4): 1/2 * [(1/4)^2 / (3/4) * 2 + 0] = 1/12
    assert M.separation_power([1, 2, 1], [2, 1, 1]) == pytest.approx(1 / 12)
    assert M.separation_power([10, 20, 10], [20, 10, 10]) == pytest.approx(1 / 12)  # normalized first
    assert M.separation_power([3, 5, 0], [3, 5, 0]) == 0.0
    assert M.separation_power([1, 0], [0, 1]) == pytest.approx(1.0)
    batch = M.separation_power(np.array([[1, 2, 1], [1, 1, 1]]), np.array([[2, 1, 1], [1, 1, 1]]))
    assert batch.shape == (2,) and batch == pytest.approx([1 / 12, 0.0])


def test_histogram_clips_into_edge_bins_and_reference_edges():
    edges = np.array([0.0, 1.0, 2.0])
    assert M.histogram(np.array([-5.0, 0.5, 1.5, 9.0]), edges).tolist() == [2.0, 2.0]
    counts = M.reference_edges(np.array([0, 1, 1, 2, 3, 3, 3], dtype=float))
    assert counts.tolist() == [-0.5, 0.5, 1.5, 2.5, 3.5]  # integer features: one bin per value
    log = M.reference_edges(np.geomspace(1e-2, 1e3, 1000))
    assert np.allclose(np.diff(np.log(log)), np.diff(np.log(log))[0])  # log-spaced
    assert len(M.reference_edges(np.full(10, 4.0))) == 2  # constant feature: one bin


def test_wasserstein_matches_scipy_and_batches():
    rng = np.random.default_rng(1)
    u, v = rng.normal(size=50), rng.normal(1.0, 2.0, size=70)
    wu, wv = rng.random(50), rng.random(70)
    assert M.wasserstein_1d(u, v) == pytest.approx(wasserstein_distance(u, v))
    assert M.wasserstein_1d(u, v, wu, wv) == pytest.approx(wasserstein_distance(u, v, wu, wv))
    batch = M.wasserstein_1d(u, v, np.stack([wu, np.ones(50)]), wv)
    assert batch.shape == (2,) and batch[1] == pytest.approx(wasserstein_distance(u, v, None, wv))
    assert M.wasserstein_1d([0.0, 0.0], [3.0]) == pytest.approx(3.0)
    # binned: all mass at centre 0 vs all at centre 2 -> 2
    centres = np.array([0.0, 1.0, 2.0])
    assert M.binned_wasserstein(centres, np.array([1, 0, 0]), np.array([0, 0, 5])) == pytest.approx(2.0)


def test_frechet_distance_analytic():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(500, 3))
    shift = np.array([1.0, -2.0, 0.5])
    # same covariance: only the mean term remains, |shift|^2
    assert M.frechet_distance(x, x + shift) == pytest.approx(np.sum(shift ** 2))
    # y = 2x: C_y = 4 C_x, so Tr(C + 4C - 2 * 2C) = Tr(C)
    xc = x - x.mean(axis=0)
    assert M.frechet_distance(xc, 2 * xc) == pytest.approx(np.trace(np.cov(xc, rowvar=False)))


def test_fpd_extrapolates_away_the_finite_sample_bias():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(3000, 8)), rng.normal(size=(3000, 8))
    value, err = M.fpd(a, b, seed=0)
    assert err > 0 and abs(value) < 4 * err + 2e-3  # identical distributions: FD_inf = 0
    assert M.frechet_distance(a[:300], b[:300]) > 0.03  # while small samples are clearly biased
    value, err = M.fpd(a, b + 0.3, seed=0)
    assert value == pytest.approx(8 * 0.09, rel=0.1)  # |shift|^2


def test_mmd2_unbiased_by_hand_and_kpd():
    x, y = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]), np.array([[2.0, 0.0], [0.0, 0.5]])
    k = lambda a, b: (a @ b / 2 + 1) ** 3  # noqa: E731
    kxx = np.mean([k(x[i], x[j]) for i in range(3) for j in range(3) if i != j])
    kyy = np.mean([k(y[i], y[j]) for i in range(2) for j in range(2) if i != j])
    kxy = np.mean([k(a, b) for a in x for b in y])
    assert M.mmd2_unbiased(x, y) == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-5)
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(2000, 5)), rng.normal(size=(2000, 5))
    same, same_err = M.kpd(a, b, seed=0)
    shifted, _ = M.kpd(a, b + 0.5, seed=0)
    assert abs(same) < 3 * same_err + 1e-3 and shifted > 10 * same_err


def test_mmd2_stays_finite_with_an_extreme_outlier():
    # one generated shower 1e7 standard deviations out: (x.y/d + 1)^3 ~ 1e42 overflows float32
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(50, 4)), rng.normal(size=(50, 4))
    y[0] = 1e7
    k = lambda a, b: (a @ b.T / 4 + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    exact = ((kxx.sum() - np.trace(kxx)) / (50 * 49) + (kyy.sum() - np.trace(kyy)) / (50 * 49) - 2 * kxy.mean())
    assert np.isfinite(M.mmd2_unbiased(x, y)) and M.mmd2_unbiased(x, y) == pytest.approx(exact, rel=1e-5)


def test_standardize_drops_constant_features():
    ref = np.array([[1.0, 5.0, 2.0], [3.0, 5.0, 4.0]])
    r, g = M.standardize(ref, ref + 1)
    assert r.shape == (2, 2) and np.allclose(r.mean(axis=0), 0) and np.allclose(g - r, 1.0)


def test_feature_distances_identical_samples_are_zero():
    g = get_geometry("cpu")
    rng = np.random.default_rng(5)
    s = ((rng.random((60, g.n_voxels)) < 0.05) * rng.exponential(1.0, (60, g.n_voxels))).astype(np.float32)
    f = compute_features(rng.uniform(1e4, 1e5, 60), s, g)
    d = feature_distances(f, f, n_boot=5, rng=np.random.default_rng(0))
    assert len(d["separation_power"]) == len(f.names) + len(f.profiles)
    assert max(d["separation_power"].values()) == 0.0
    assert max(d["wasserstein"].values()) == pytest.approx(0.0, abs=1e-12)  # cumulative-sum rounding only
    assert max(d["separation_power_err"].values()) > 0  # the bootstrap replicas do differ


def test_response_by_energy_reads_scale_resolution_and_overflow():
    """Generated r = E_vis/E_inc 2 % high, twice as wide and with 1 % far outliers: the per-10-GeV table says so;
    the same law twice gives means within a few per mille and IQR ratios near 1."""
    rng = np.random.default_rng(0)
    inc_r, inc_g = rng.uniform(1e4, 1e5, 40_000), rng.uniform(1e4, 1e5, 40_000)
    r_ref = 0.0165 * (1 + 0.05 * rng.standard_normal(40_000))
    same = M.response_by_energy(inc_r, r_ref, inc_g, 0.0165 * (1 + 0.05 * rng.standard_normal(40_000)))
    assert [b["GeV"] for b in same["bins"]] == [[float(lo), float(lo + 10)] for lo in range(10, 100, 10)]
    assert abs(same["worst"]["mean_rel_diff"]) < 0.005 and abs(same["worst"]["iqr_ratio"] - 1) < 0.1
    assert same["worst"]["beyond_max_fraction"] < 0.002
    r_gen = 0.0165 * 1.02 * (1 + 0.10 * rng.standard_normal(40_000))
    r_gen[:400] = 0.03  # far beyond anything simulated
    off = M.response_by_energy(inc_r, r_ref, inc_g, r_gen)
    assert off["worst"]["mean_rel_diff"] == pytest.approx(0.02 + 0.03 / 0.0165 * 0.01, abs=0.01)
    assert all(1.8 < b["iqr_ratio"] < 2.3 for b in off["bins"])
    assert 0.01 < off["worst"]["beyond_max_fraction"] < 0.1  # the 1 % outliers plus the wider tail
    sparse = M.response_by_energy(inc_r[:30], r_ref[:30], inc_g[:30], r_ref[:30])
    assert sparse["bins"] == [] and sparse["worst"]["mean_rel_diff"] is None
