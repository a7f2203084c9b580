"""`calofm evaluate` end to end: the report folder, the metrics.json schema, and refusals of bad input."""

import json
import os

import h5py
import pytest

from calofm.cli.main import main
from calofm.detector.geometry import get_geometry
from calofm.simulation import simulate_to_file

SCHEMA = {"classifier_auc_low", "classifier_auc_high", "jsd_low", "jsd_high", "fpd", "kpd", "separation_power",
          "wasserstein", "noise_floor", "n_reference", "n_generated"}
FAST = ["--epochs", "2", "--bootstrap", "5", "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("showers")
    paths = {}
    for name, kw in {
        "W1": dict(material="W", seed=1), "W2": dict(material="W", seed=2), "Pb": dict(material="Pb", seed=3),
        "ild": dict(material="W", seed=4, geometry="ild", n=60), "low": dict(material="W", seed=5, energy_GeV=(10, 12)),
    }.items():
        paths[name] = str(d / f"{name}.h5")
        simulate_to_file(paths[name], kw.pop("n", 120), workers=1, progress=False, **kw)
    paths["empty"] = str(d / "empty.h5")
    with h5py.File(paths["empty"], "w") as f:
        f.create_dataset("incident_energies", shape=(0, 1), dtype="f4")
        f.create_dataset("showers", shape=(0, get_geometry("cpu").n_voxels), dtype="f4")
        f.attrs["geometry"] = get_geometry("cpu").to_json()
    return paths


def check_schema(m: dict, n_ref: int, n_gen: int) -> None:
    assert SCHEMA <= set(m)
    assert SCHEMA - {"noise_floor"} <= set(m["noise_floor"])
    assert (m["n_reference"], m["n_generated"]) == (n_ref, n_gen)
    assert m["noise_floor"]["n_reference"] == m["noise_floor"]["n_generated"] == n_ref // 2
    for key in ("fpd", "kpd"):
        assert len(m[key]) == 2 and m[key][1] >= 0
    for key in ("classifier_auc_low", "classifier_auc_high"):
        assert 0.0 <= m[key] <= 1.0 and 0.0 <= m["noise_floor"][key] <= 1.0
    assert "e_ratio" in m["separation_power"] and "radial_profile" in m["wasserstein"]
    assert set(m["separation_power"]) == set(m["wasserstein"]) == set(m["noise_floor"]["separation_power"])
    # the published paper's W1 and KL, beside the floor
    assert set(m["published"]["kl"]) == set(m["noise_floor"]["published"]["wasserstein"]) >= {"n_hits", "cog_z"}


@pytest.mark.slow  # ~20 s: every figure of the report
def test_report_folder(files, tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a user's file in the folder survives
    assert main(["evaluate", "--reference", files["W1"], "--generated", files["W2"], "-o", str(out), *FAST,
                 "--folds", "2"]) == 0
    from calofm.evaluate.compare import Options
    from calofm.evaluate.report import evaluate_files

    extra = evaluate_files([files["W1"]], [files["W2"]], str(tmp_path / "api"), plots=False,
                           opts=Options(n_boot=5, classifier=False, log=lambda m: None),
                           sections=[("Speed", "<p id='speed'>42</p>")])
    assert extra["classifier_auc_low"] is None and extra["fpd"][1] > 0  # --no-classifier gives nulls
    assert "<p id='speed'>42</p>" in (tmp_path / "api" / "index.html").read_text()
    m = json.loads((out / "metrics.json").read_text())
    check_schema(m, 120, 120)
    assert m["material"] == "W" and m["units"]["fpd"].startswith("Frechet")
    for level in ("low", "high"):  # --folds: two classifiers per test, the floor's included
        assert m["classifier"][level]["folds"] == m["noise_floor"]["classifier"][level]["folds"] == 2
        assert len(m["classifier"][level]["fold_aucs"]) == 2
    assert set(m["response"]) == {"step_GeV", "bins", "worst"}  # 120 showers: under 20 per 10 GeV bin, none kept
    assert (out / "notes.txt").read_text() == "mine"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"separation_power.png", "profiles.png", "average_shower.png", "single_showers.png",
            "layer_energy_means.png", "global_features.png"} <= set(pngs)
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == len(pngs) and "<table>" in page
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]
    assert "AUC low" in capsys.readouterr().out


def test_several_materials_one_table(files, tmp_path):
    out = tmp_path / "rep"
    args = ["evaluate", "--reference", files["W1"], "--generated", files["W2"], files["Pb"], "-o", str(out),
            "--no-plots", *FAST, "--epochs", "10"]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["materials"]) == {"W", "Pb"}
    for row in m["materials"].values():
        check_schema(row, 120, 120)
    assert m["materials"]["W"]["noise_floor"] == m["materials"]["Pb"]["noise_floor"]  # one reference, one floor
    assert m["materials"]["Pb"]["classifier_auc_high"] > 0.9
    assert m["materials"]["Pb"]["separation_power"]["e_ratio"] > 5 * m["materials"]["W"]["separation_power"]["e_ratio"]
    assert any("absorber Pb" in w for w in m["warnings"])
    page = (out / "index.html").read_text()
    assert "<td>W</td>" in page and "<td>Pb</td>" in page


@pytest.mark.parametrize("case, message", [
    ("geometry", "different geometries"),
    ("empty", "holds no showers"),
    ("energies", "different incident-energy spectra"),
    ("missing", "no such file"),
    ("output_is_file", "not a directory"),
    ("pairing", "reference files for"),
])
def test_bad_input_is_refused(files, tmp_path, capsys, case, message):
    ref, gen, out = [files["W1"]], [files["W2"]], tmp_path / "rep"
    out.mkdir()
    (out / "metrics.json").write_text("previous")  # an earlier report in the folder must survive
    if case == "geometry":
        gen = [files["ild"]]
    elif case == "empty":
        gen = [files["empty"]]
    elif case == "energies":
        gen = [files["low"]]
    elif case == "missing":
        gen = [str(tmp_path / "nope.h5")]
    elif case == "output_is_file":
        out = tmp_path / "a-file"
        out.write_text("x")
    elif case == "pairing":
        ref, gen = [files["W1"], files["W2"]], [files["Pb"], files["W2"], files["W1"]]
    rc = main(["evaluate", "--reference", *ref, "--generated", *gen, "-o", str(out), "--no-plots", *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    if case == "output_is_file":
        assert out.read_text() == "x"
    else:  # nothing written, nothing overwritten
        assert os.listdir(out) == ["metrics.json"] and (out / "metrics.json").read_text() == "previous"


def test_pairing_by_material_and_labels():
    from types import SimpleNamespace as NS

    from calofm.evaluate.report import pair_files

    refs, gens = ["w.h5", "pb.h5"], ["gen_pb.h5", "gen_w.h5"]
    ref_infos = [NS(material="W", particle="gamma"), NS(material="Pb", particle="gamma")]
    pairs = pair_files(refs, gens, ref_infos, ref_infos[::-1])
    assert pairs == [("Pb", 1, 0), ("W", 0, 1)]
    # no materials: paired in order, named by file
    pairs = pair_files(refs, gens, [NS(material=None, particle=None)] * 2, [NS(material=None, particle=None)] * 2)
    assert pairs == [("gen_pb", 0, 0), ("gen_w", 1, 1)]
    # same material, other particles: material_particle; same everything: file names
    infos = [NS(material="W", particle="gamma"), NS(material="W", particle="e-")]
    assert [p[0] for p in pair_files(["w.h5"], ["a.h5", "b.h5"], infos[:1], infos)] == ["W_gamma", "W_e-"]
    pairs = pair_files(["w.h5"], ["a.h5", "b.h5"], infos[:1], [infos[0]] * 2)
    assert [p[0] for p in pairs] == ["a", "b"]
