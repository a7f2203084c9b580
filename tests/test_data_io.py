"""HDF5 layout, streaming, atomic writes, reproducibility and refusal of bad files."""

import tracemalloc

import h5py
import numpy as np
import pytest

from calofm.data import ShowerWriter, inspect_file, iter_showers, read_beam, read_showers
from calofm.data.calochallenge import read_binning
from calofm.detector import get_geometry
from calofm.errors import CalofmError
from calofm.simulation import simulate, simulate_to_file


@pytest.fixture(scope="module")
def sim_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "w.h5"
    simulate_to_file(str(path), 600, "W", "gamma", (10, 100), seed=7, workers=1, progress=False)
    return path


def test_file_has_calochallenge_layout_and_attributes(sim_file):
    with h5py.File(sim_file) as f:
        assert f["incident_energies"].shape == (600, 1) and f["incident_energies"].dtype == np.float32
        assert f["showers"].shape == (600, 4500) and f["showers"].dtype == np.float32
        assert f["showers"].compression == "gzip"
        assert f.attrs["material"] == "W" and f.attrs["particle"] == "gamma" and int(f.attrs["seed"]) == 7
        assert "calofm-sim" in f.attrs["generator"]
        energies = f["incident_energies"][:, 0]
        positions, angles = f["incident_positions"][:], f["incident_angles"][:]
    assert 10_000 <= energies.min() and energies.max() <= 100_000  # MeV
    assert positions.shape == angles.shape == (600, 2) and np.all(positions == 0) and np.all(angles == 0)
    info = inspect_file(str(sim_file))
    assert info.geometry == get_geometry("cpu") and info.has_beam


def test_files_without_beam_datasets_still_read(tmp_path, sim_file):
    """Files of other producers (and older calofm files) have only incident_energies and showers."""
    geometry = get_geometry("cpu")
    energies, showers, _ = read_showers(str(sim_file))
    path = tmp_path / "plain.h5"
    _write_raw(path, energies[:, None], showers, geometry)
    e2, s2, info = read_showers(str(path))
    assert np.array_equal(e2, energies) and np.array_equal(s2, showers)
    assert not info.has_beam and read_beam(str(path)) is None
    with ShowerWriter(str(tmp_path / "nobeam.h5"), geometry, "W", "gamma", "test") as w:
        w.write(energies[:3], showers[:3])
    assert read_beam(str(tmp_path / "nobeam.h5")) is None


def test_beam_writer_refuses_missing_or_bad_beam(tmp_path):
    geometry = get_geometry("cpu")
    energies, showers = np.full(2, 1e4, np.float32), np.zeros((2, 4500), np.float32)
    for positions, angles in [(None, None), (np.zeros((2, 2)), np.zeros((3, 2))), (np.full((2, 2), np.nan), np.zeros((2, 2)))]:
        with pytest.raises(CalofmError, match="positions and angles"):
            with ShowerWriter(str(tmp_path / "b.h5"), geometry, "W", "gamma", "test", beam=True) as w:
                w.write(energies, showers, positions, angles)
        assert not (tmp_path / "b.h5").exists()


def test_voxel_order_is_layer_y_x():
    """A shower shot off-axis at +x must light cells with larger x index, not larger y."""
    from calofm.simulation.gflash import simulate_batch
    from calofm.simulation.medium import Medium

    geometry = get_geometry("cpu")
    showers = simulate_batch(np.full(50, 50_000.0), geometry, Medium.from_geometry(geometry), "e-",
                             np.random.default_rng(0), impact_mm=(40.0, 0.0))
    grid = showers.reshape(50, geometry.n_layers, 15, 15).sum((0, 1))  # (y, x)
    y_peak, x_peak = np.unravel_index(np.argmax(grid), grid.shape)
    assert (y_peak, x_peak) == (7, 11)  # centre cell 7, shifted 4 cells of 10 mm in x


def test_same_seed_gives_identical_files_for_any_worker_count(tmp_path):
    a, b, c = (str(tmp_path / n) for n in ("a.h5", "b.h5", "c.h5"))
    simulate_to_file(a, 700, "Pb", "e-", (10, 100), seed=3, workers=1, progress=False)
    simulate_to_file(b, 700, "Pb", "e-", (10, 100), seed=3, workers=2, progress=False)
    simulate_to_file(c, 700, "Pb", "e-", (10, 100), seed=4, workers=1, progress=False)
    ea, sa, _ = read_showers(a)
    eb, sb, _ = read_showers(b)
    ec, sc, _ = read_showers(c)
    assert np.array_equal(ea, eb) and np.array_equal(sa, sb)
    assert not np.array_equal(sa, sc)


def test_spectra():
    e_uni, _ = simulate(2000, energy_GeV=(1, 100), spectrum="uniform", seed=1, geometry="cpu")
    e_log, _ = simulate(2000, energy_GeV=(1, 100), spectrum="log", seed=1, geometry="cpu")
    assert np.median(e_uni) > 40_000 and np.median(e_log) < 15_000  # log-uniform median = 10 GeV
    e_fix, _ = simulate(10, energy_GeV=50, seed=1)
    assert np.all(e_fix == 50_000)


def test_streaming_memory_does_not_grow_with_file_size(tmp_path):
    peaks = []
    for n in (600, 2400):
        tracemalloc.start()
        simulate_to_file(str(tmp_path / f"s{n}.h5"), n, seed=1, workers=1, progress=False)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.5 * peaks[0], peaks  # 4x the showers, same peak: written chunk by chunk


def test_iter_showers_chunks(sim_file):
    sizes = [len(e) for e, _ in iter_showers(str(sim_file), chunk_size=256)]
    assert sizes == [256, 256, 88]


def _write_raw(path, energies, showers, geometry=None, **attrs):
    with h5py.File(path, "w") as f:
        f["incident_energies"] = energies
        f["showers"] = showers
        if geometry is not None:
            f.attrs["geometry"] = geometry.to_json()
        for k, v in attrs.items():
            f.attrs[k] = v


def test_refuses_non_hdf5_and_truncated_files(tmp_path, sim_file):
    text = tmp_path / "notes.h5"
    text.write_text("this is not HDF5")
    with pytest.raises(CalofmError, match="not a readable HDF5"):
        inspect_file(str(text))
    data = sim_file.read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CalofmError):
        read_showers(str(truncated))
    with pytest.raises(CalofmError, match="no such file"):
        inspect_file(str(tmp_path / "missing.h5"))


def test_refuses_foreign_and_inconsistent_files(tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(CalofmError, match="no 'incident_energies'"):
        inspect_file(str(foreign))
    geometry = get_geometry("cpu")
    wrong = tmp_path / "wrong.h5"
    _write_raw(wrong, np.ones((4, 1), np.float32) * 1e4, np.zeros((4, 100), np.float32), geometry)
    with pytest.raises(CalofmError, match="4500"):
        inspect_file(str(wrong))
    mismatch = tmp_path / "mismatch.h5"
    _write_raw(mismatch, np.ones((3, 1), np.float32), np.zeros((4, 4500), np.float32), geometry)
    with pytest.raises(CalofmError, match="3 incident energies but 4 showers"):
        inspect_file(str(mismatch))


@pytest.mark.parametrize("bad", ["nan_cell", "negative_cell", "zero_energy"])
def test_refuses_bad_values(tmp_path, bad):
    geometry = get_geometry("cpu")
    energies = np.full((4, 1), 1e4, np.float32)
    showers = np.zeros((4, 4500), np.float32)
    if bad == "nan_cell":
        showers[1, 5] = np.nan
    elif bad == "negative_cell":
        showers[2, 7] = -1.0
    else:
        energies[0] = 0.0
    path = tmp_path / "bad.h5"
    _write_raw(path, energies, showers, geometry)
    with pytest.raises(CalofmError):
        read_showers(str(path))
    with pytest.raises(CalofmError):  # the writer refuses the same values
        with ShowerWriter(str(tmp_path / "out.h5"), geometry, "W", "gamma", "test") as w:
            w.write(energies, showers)
    assert not (tmp_path / "out.h5").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_failed_simulation_leaves_existing_file_untouched(tmp_path, monkeypatch):
    from calofm.simulation import runner as simulate_module

    target = tmp_path / "keep.h5"
    target.write_bytes(b"precious")
    calls = {"n": 0}
    real = simulate_module.simulate_batch

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed mid-run")
        return real(*args, **kwargs)

    monkeypatch.setattr(simulate_module, "simulate_batch", failing)
    with pytest.raises(RuntimeError):
        simulate_to_file(str(target), 1000, workers=1, progress=False)
    assert target.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.h5"]


CALOCHALLENGE_XML = """<Bins>
  <Particle name="electron" pid="11">
    <Layer id="0" r_edges="0,4.65,9.3,13.95" n_bin_alpha="4"/>
    <Layer id="1" r_edges="0,4.65,9.3,13.95" n_bin_alpha="4"/>
  </Particle>
</Bins>"""


def test_reads_calochallenge_files_with_binning_xml(tmp_path):
    xml = tmp_path / "binning.xml"
    xml.write_text(CALOCHALLENGE_XML)
    geometry, particle = read_binning(str(xml))
    assert particle == "e-" and geometry.n_voxels == 2 * 4 * 3 and not geometry.is_cartesian
    path = tmp_path / "dataset.h5"
    rng = np.random.default_rng(0)
    _write_raw(path, rng.uniform(1e3, 1e6, (5, 1)).astype(np.float32), rng.random((5, 24)).astype(np.float32))
    energies, showers, info = read_showers(str(path), binning_xml=str(xml))
    assert showers.shape == (5, 24) and info.particle == "e-" and info.geometry.n_voxels == 24
    # voxel order (layer, alpha, r): voxel 1 is the second radial bin of the first angular bin
    xy = geometry.voxel_xy_mm
    assert np.hypot(*xy[1]) == pytest.approx(0.5 * (4.65 + 9.3))
    assert np.array_equal(geometry.locate(np.array([0]), np.array([7.0]), np.array([0.1])), np.array([1]))
    bad = tmp_path / "bad.h5"
    _write_raw(bad, np.ones((2, 1), np.float32), np.zeros((2, 25), np.float32))
    with pytest.raises(CalofmError, match="25 voxels"):
        inspect_file(str(bad), binning_xml=str(xml))
