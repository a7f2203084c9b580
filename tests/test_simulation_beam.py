"""Beam impact point and angle of incidence: defaults, geometry of tilted showers, files and CLI."""

import subprocess
import sys

import numpy as np
import pytest

from calofm.cli.main import main
from calofm.data import read_beam, read_showers
from calofm.detector import PRESETS, get_geometry
from calofm.errors import CalofmError
from calofm.simulation import parse_beam, simulate, simulate_to_file


def _layer_centroid_x(showers, geometry):
    """Energy-weighted mean x per layer (mm); (L,)."""
    x = geometry.voxel_xy_mm[:, 0]
    per_layer = np.add.reduceat(showers.sum(0) * x, geometry.layer_offsets[:-1])
    return per_layer / np.add.reduceat(showers.sum(0), geometry.layer_offsets[:-1])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_default_beam_enters_at_a_cell_centre(name):
    geometry = get_geometry(name)
    x, y = geometry.default_impact_mm
    cell = geometry.locate(np.array([0]), np.array([x]), np.array([y]))[0]
    assert cell >= 0 and np.allclose(geometry.voxel_xy_mm[cell], (x, y))


def test_ild_shower_is_centred_on_one_cell():
    """On a cell corner four cells would share the core equally; at a cell centre one cell leads."""
    geometry = get_geometry("ild")
    _, showers = simulate(100, "W", "e-", 50, geometry=geometry, seed=3)
    first = showers[:, : geometry.layer_offsets[8]].reshape(100, 8, 30, 30).sum((0, 1))  # (y, x)
    top = np.sort(first.ravel())[::-1]
    assert top[0] > 2 * top[1], top[:4]
    assert np.unravel_index(np.argmax(first), first.shape) == (15, 15)  # x, y = +2.54 mm: cell 15


def test_tilted_shower_follows_its_axis():
    geometry = get_geometry("ild")
    theta = 30.0
    _, straight = simulate(200, "W", "e-", 30, geometry=geometry, seed=5, position=(0.0, 0.0))
    _, tilted = simulate(200, "W", "e-", 30, geometry=geometry, seed=5, position=(0.0, 0.0), angle=(theta, 0.0))
    z = geometry.active_depth_mm
    shift = _layer_centroid_x(tilted, geometry) - _layer_centroid_x(straight, geometry)
    core = slice(2, 20)  # layers with most of the energy
    slope = np.polyfit(z[core], shift[core], 1)[0]
    assert slope == pytest.approx(np.tan(np.radians(theta)), rel=0.1)
    # the path through each layer is 1/cos(theta) longer: the shower peaks in an earlier layer
    peak = lambda s: np.argmax(np.add.reduceat(s.sum(0), geometry.layer_offsets[:-1]))  # noqa: E731
    assert peak(tilted) < peak(straight)


def test_azimuth_turns_the_tilt():
    geometry = get_geometry("cpu")
    _, showers = simulate(200, "W", "e-", 30, geometry=geometry, seed=6, angle=(30.0, 90.0))
    grid = showers.reshape(200, geometry.n_layers, 15, 15)[:, 12:].sum((0, 1))  # deep layers, (y, x)
    y_mean = (grid.sum(1) * np.arange(15)).sum() / grid.sum()
    x_mean = (grid.sum(0) * np.arange(15)).sum() / grid.sum()
    assert y_mean > 8.5 and abs(x_mean - 7) < 0.3  # moved towards +y only


def test_random_impact_points_cover_the_area_and_are_returned():
    geometry = get_geometry("ild")
    _, _, pos, ang = simulate(400, "W", "gamma", 20, geometry=geometry, seed=2, position="random:20x10",
                              return_beam=True)
    x0, y0 = geometry.default_impact_mm
    assert pos.shape == (400, 2) and np.all(ang == 0)
    assert np.all(np.abs(pos[:, 0] - x0) <= 10) and np.all(np.abs(pos[:, 1] - y0) <= 5)
    assert pos[:, 0].std() > 5 and len(np.unique(pos[:, 0])) == 400
    _, _, cell_pos, _ = simulate(300, "W", "gamma", 20, geometry=geometry, seed=2, position="random", return_beam=True)
    assert np.all(np.abs(cell_pos - np.array([x0, y0])) <= 5.08 / 2)


@pytest.mark.parametrize("position, angle, message", [
    ("1,2,3", None, "two numbers"), ("a,b", None, "two numbers"), ("random:-5", None, "> 0"),
    (None, "95,0", "theta"), (None, "-1,0", "theta"), (None, "nan,0", "two numbers"),
])
def test_bad_beam_is_refused(position, angle, message):
    with pytest.raises(CalofmError, match=message):
        parse_beam(get_geometry("cpu"), position, angle)


def test_file_records_the_beam_of_every_shower(tmp_path):
    path = str(tmp_path / "beam.h5")
    simulate_to_file(path, 300, "W", "e-", 20, geometry="ild", seed=1, workers=1, progress=False,
                     position="random", angle="10,45")
    pos, ang = read_beam(path)
    _, _, pos_mem, ang_mem = simulate(300, "W", "e-", 20, geometry="ild", seed=1, position="random", angle="10,45",
                                      return_beam=True)
    assert np.array_equal(pos, pos_mem) and np.array_equal(ang, ang_mem)
    assert np.allclose(ang, [10.0, 45.0])
    energies, showers, info = read_showers(path)
    assert info.has_beam and info.attrs["simulator_version"] == 2 and "theta 10 deg" in info.attrs["beam"]


def test_cli_simulate_with_position_and_angle(tmp_path, capsys):
    out = tmp_path / "cli.h5"
    args = ["simulate", "--n", "50", "--energy", "20", "--geometry", "ild", "--position", "12.7,-2.54",
            "--angle", "15,30", "--threshold-mip", "0.4", "--noise-mip", "0.1", "--workers", "1"]
    assert main(args + ["-o", str(out)]) == 0
    assert "theta 15 - 15 deg" in capsys.readouterr().out
    pos, ang = read_beam(str(out))
    assert np.allclose(pos, [12.7, -2.54]) and np.allclose(ang, [15.0, 30.0])
    bad = subprocess.run([sys.executable, "-m", "calofm.cli.main", *args[:-4], "--angle", "100,0",
                          "-o", str(tmp_path / "bad.h5")], capture_output=True, text=True)
    assert bad.returncode != 0 and "theta" in bad.stderr and not (tmp_path / "bad.h5").exists()
