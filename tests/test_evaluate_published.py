"""The published paper's metrics (calofm.evaluate.published): observables on hand-made showers, the
binned KL divergence, W1 as scipy computes it, and their place in `calofm evaluate`'s output."""

import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from calofm.detector.geometry import get_geometry
from calofm.evaluate.published import (
    KL_EPSILON, N_KL_BINS, OBSERVABLES, hit_list, kl_divergence, observables, published_metrics,
)


def test_observables_of_hand_made_showers():
    geo = get_geometry("cpu")  # 20 layers of 15 x 15 cells
    nx = geo.grid.nx
    showers = np.zeros((3, geo.n_voxels), dtype=np.float32)

    def voxel(layer, iy, ix):
        return layer * nx * nx + iy * nx + ix

    showers[0, voxel(2, 7, 7)] = 10.0
    showers[0, voxel(5, 7, 9)] = 30.0  # the most energetic cell: layer 5
    showers[0, voxel(5, 8, 7)] = 0.05  # below the threshold used below
    showers[2, voxel(0, 0, 14)] = 2.0
    hits = hit_list(showers, geo, threshold_MeV=0.1)
    o = observables(hits)
    assert list(o) == list(OBSERVABLES)
    np.testing.assert_array_equal(o["n_hits"], [2, 0, 1])
    np.testing.assert_allclose(o["energy_sum"], [40.0, 0.0, 2.0])
    np.testing.assert_array_equal(o["start_layer"], [5, 0])  # the empty shower has none
    np.testing.assert_array_equal(np.sort(o["cell_energy"]), [2.0, 10.0, 30.0])
    np.testing.assert_array_equal(np.sort(o["hit_x"]), [7, 9, 14])  # cell indices
    np.testing.assert_array_equal(np.sort(o["hit_z"]), [0, 2, 5])
    np.testing.assert_allclose(o["cog_x"], [(10 * 7 + 30 * 9) / 40, 14])
    np.testing.assert_allclose(o["cog_y"], [7, 0])
    np.testing.assert_allclose(o["cog_z"], [(10 * 2 + 30 * 5) / 40, 0])
    # a subset keeps each shower's hits
    sub = observables(hits.subset(np.array([2, 0])))
    np.testing.assert_array_equal(sub["n_hits"], [1, 2])
    np.testing.assert_array_equal(sub["start_layer"], [0, 5])


def test_kl_divergence_binning_direction_and_epsilon():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 200_000), rng.normal(0, 1, 200_000)
    assert 0 <= kl_divergence(a, b) < 2e-3  # one distribution: only the sampling noise of 30 bins
    assert kl_divergence(a, a) == pytest.approx(0.0, abs=1e-8)
    shifted = rng.normal(0.5, 1, 200_000)
    assert 0.09 < kl_divergence(a, shifted) < 0.13  # 0.125 nats unbinned; binning loses a little
    # the direction: KL(ref || gen), from a narrow reference to a wide generator is small, not the reverse
    narrow, wide = rng.normal(0, 0.5, 100_000), rng.normal(0, 2, 100_000)
    assert kl_divergence(narrow, wide) < kl_divergence(wide, narrow)
    # a generator that never reaches most reference bins: large but finite (epsilon)
    far = kl_divergence(a, np.full(1000, 50.0))
    assert 10 < far < -np.log(KL_EPSILON) + 1
    # discrete values: repeated quantile edges merge into one bin per value
    counts = rng.poisson(3, 50_000).astype(float)
    assert kl_divergence(counts, counts + 1) > 0.3 and kl_divergence(counts, rng.poisson(3, 50_000)) < 1e-3
    assert N_KL_BINS == 30


def test_w1_is_scipys_and_every_observable_is_reported():
    rng = np.random.default_rng(1)
    geo = get_geometry("cpu")
    ref = np.where(rng.random((40, geo.n_voxels)) < 0.03, rng.exponential(2.0, (40, geo.n_voxels)), 0.0)
    gen = np.where(rng.random((30, geo.n_voxels)) < 0.04, rng.exponential(3.0, (30, geo.n_voxels)), 0.0)
    h_r, h_g = hit_list(ref, geo), hit_list(gen, geo)
    m = published_metrics(h_r, h_g)
    assert set(m["wasserstein"]) == set(m["kl"]) == set(OBSERVABLES)
    o_r, o_g = observables(h_r), observables(h_g)
    for name in OBSERVABLES:
        assert m["wasserstein"][name] == pytest.approx(wasserstein_distance(o_r[name], o_g[name]), rel=1e-9)
        assert m["kl"][name] >= 0
    assert m["wasserstein"]["n_hits"] > 10 and m["kl"]["n_hits"] > 0.5  # 3 % vs 4 % of 4500 cells hit
    same = published_metrics(h_r, h_r)
    assert all(v == pytest.approx(0.0, abs=1e-8) for v in same["wasserstein"].values())


def test_evaluate_reports_the_published_metrics(tmp_path):
    import json

    from calofm.evaluate.compare import Options
    from calofm.evaluate.report import evaluate_files
    from calofm.simulation import simulate_to_file

    paths = {}
    for name, material, seed in (("ref", "W", 1), ("gen", "Pb", 2)):
        paths[name] = str(tmp_path / f"{name}.h5")
        simulate_to_file(paths[name], 60, material=material, seed=seed, workers=1, progress=False)
    m = evaluate_files([paths["ref"]], [paths["gen"]], str(tmp_path / "report"), plots=False,
                       opts=Options(n_boot=2, classifier=False, log=lambda *a: None))
    p, floor = m["published"], m["noise_floor"]["published"]
    assert set(p["wasserstein"]) == set(p["kl"]) == set(OBSERVABLES) == set(floor["kl"])
    # Pb showers are longer and wider than W's: far above the two W halves' floor
    assert p["wasserstein"]["cog_z"] > 3 * floor["wasserstein"]["cog_z"] and p["kl"]["cog_z"] > floor["kl"]["cog_z"]
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["published"] == p
    assert "KL(reference || generated)" in m["units"]["published"]
    page = (tmp_path / "report" / "index.html").read_text()
    assert "The published paper's metrics" in page and "start layer" in page
