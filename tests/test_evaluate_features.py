"""Features against values computed by hand on constructed showers (Cartesian and cylindrical grids)."""

import numpy as np
import pytest

from calofm.detector.geometry import CartesianGrid, CylindricalGrid, Geometry, Layer, get_geometry
from calofm.errors import CalofmError
from calofm.evaluate.features import compute_features, feature_label, split_name

# 2 layers of 3 x 3 cells of 10 mm; voxel order (layer, y, x), cell centres at -10, 0, +10 mm
SMALL = Geometry("small", (Layer("W", 3.5, "Si", 0.5),) * 2, CartesianGrid(3, 3, 10.0))


def voxel(layer: int, ix: int, iy: int) -> int:
    return layer * 9 + iy * 3 + ix


def constructed_shower() -> np.ndarray:
    """Layer 0: 2 MeV at (0, 0) and 2 MeV at (+10, 0); layer 1: 1 MeV at (0, +10); E_inc = 10 MeV."""
    s = np.zeros((1, SMALL.n_voxels), np.float32)
    s[0, voxel(0, 1, 1)] = 2.0
    s[0, voxel(0, 2, 1)] = 2.0
    s[0, voxel(1, 1, 2)] = 1.0
    return s


def test_features_match_hand_computed_values():
    f = compute_features(np.array([10.0]), constructed_shower(), SMALL)
    v = {k: float(x[0]) for k, x in f.scalars.items()}
    expected = {
        "e_ratio": 0.5, "e_layer_0": 4.0, "e_layer_1": 1.0,
        # layer 0: <x> = (2*0 + 2*10)/4 = 5, <x^2> = 50 -> width sqrt(50 - 25) = 5; r equals |x| here
        "cx_0": 5.0, "cy_0": 0.0, "cr_0": 5.0, "wx_0": 5.0, "wy_0": 0.0, "wr_0": 5.0,
        "cx_1": 0.0, "cy_1": 10.0, "cr_1": 10.0, "wx_1": 0.0, "wy_1": 0.0, "wr_1": 0.0,
        "sparsity_0": 2 / 9, "sparsity_1": 1 / 9,
        # longitudinal: <l> = (0*4 + 1*1)/5 = 0.2, <l^2> = 0.2 -> width sqrt(0.2 - 0.04) = 0.4
        "long_cog": 0.2, "long_width": 0.4, "n_hits": 3.0,
    }
    assert set(expected) == set(v)
    for name, value in expected.items():
        assert v[name] == pytest.approx(value, abs=1e-9), name
    radial = f.profiles["radial_profile"]
    assert radial.edges[:3].tolist() == [0.0, 10.0, 20.0]
    # r = 0 holds 2 MeV; r = 10 mm holds 2 MeV (layer 0) + 1 MeV (layer 1)
    assert radial.weights[0, :2].tolist() == [2.0, 3.0] and radial.weights[0, 2:].sum() == 0
    assert f.profiles["longitudinal_profile"].weights[0].tolist() == [4.0, 1.0]
    assert f.profiles["hit_energy_spectrum"].weights.sum() == 3


def test_threshold_removes_hits_and_empty_layers_get_zero():
    f = compute_features(np.array([10.0]), constructed_shower(), SMALL, threshold_MeV=1.5)
    v = {k: float(x[0]) for k, x in f.scalars.items()}
    assert v["n_hits"] == 2 and v["e_layer_1"] == 0.0 and v["e_ratio"] == pytest.approx(0.4)
    assert v["cy_1"] == 0.0 and v["wr_1"] == 0.0 and v["sparsity_1"] == 0.0
    assert v["long_cog"] == 0.0 and v["long_width"] == 0.0


def test_cylindrical_grid():
    # one layer, radial edges 0-10-20 mm, 4 azimuthal bins; voxel order (alpha, r)
    g = Geometry("cyl", (Layer("W", 3.5, "Si", 0.5),), CylindricalGrid(((0.0, 10.0, 20.0),), (4,)))
    s = np.zeros((2, g.n_voxels), np.float32)
    s[0, 0 * 2 + 1] = 3.0  # alpha bin 0 (centre 45 deg), r bin 1 (centre 15 mm)
    s[1, 2 * 2 + 0] = 1.0  # alpha bin 2 (centre 225 deg), r bin 0 (centre 5 mm)
    s[1, 0 * 2 + 0] = 1.0  # alpha bin 0, r bin 0: opposite side, so the centre is at 0
    f = compute_features(np.array([6.0, 4.0]), s, g)
    c = 15 / np.sqrt(2)
    assert f.scalars["cx_0"][0] == pytest.approx(c) and f.scalars["cy_0"][0] == pytest.approx(c)
    assert f.scalars["cr_0"][0] == pytest.approx(15.0) and f.scalars["wr_0"][0] == pytest.approx(0.0, abs=1e-6)
    assert f.scalars["cx_0"][1] == pytest.approx(0.0, abs=1e-9) and f.scalars["cr_0"][1] == pytest.approx(5.0)
    assert f.scalars["wx_0"][1] == pytest.approx(5 / np.sqrt(2))  # points at x = -+3.54 mm
    assert f.scalars["sparsity_0"].tolist() == [1 / 8, 2 / 8]
    assert f.profiles["radial_profile"].edges.tolist() == [0.0, 10.0, 20.0]
    assert f.profiles["radial_profile"].weights.tolist() == [[0.0, 3.0], [2.0, 0.0]]


def test_subset_matrix_and_names():
    g = get_geometry("cpu")
    rng = np.random.default_rng(0)
    s = (rng.random((5, g.n_voxels)) < 0.05) * rng.exponential(1.0, (5, g.n_voxels))
    f = compute_features(np.full(5, 1000.0), s.astype(np.float32), g)
    assert f.matrix().shape == (5, 1 + 8 * g.n_layers + 3)
    sub = f.subset(np.array([1, 3]))
    assert len(sub) == 2 and np.array_equal(sub.matrix(), f.matrix()[[1, 3]])
    assert sub.profiles["radial_profile"].weights.shape[0] == 2
    assert split_name("e_layer_12") == ("e_layer", 12) and split_name("long_cog") == ("long_cog", None)
    assert feature_label("wx_3") == ("width x 3", "mm")


def test_wrong_shapes_are_refused():
    with pytest.raises(CalofmError, match="do not fit geometry"):
        compute_features(np.array([1.0]), np.zeros((1, 7), np.float32), SMALL)
    with pytest.raises(CalofmError, match="incident energies"):
        compute_features(np.array([1.0, 2.0]), np.zeros((1, SMALL.n_voxels), np.float32), SMALL)
