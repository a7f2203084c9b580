"""`calofm demo --quick` end to end: shipped model + adapters, simulation, generation, report."""

import json
import os

import numpy as np
import pytest

from calofm.pretrained import resolve_model, shipped_adapters, shipped_models

SAMPLES = {"W_gamma", "Ta_gamma", "Cu_gamma", "Pb_gamma", "W_e-"}


def test_shipped_model_and_adapters_are_present():
    assert "calofm-small" in shipped_models()
    assert {"Pb", "e-"} <= set(shipped_adapters(resolve_model("calofm-small")))


@pytest.mark.slow  # about 2 minutes: the whole pipeline
def test_quick_demo_writes_a_report(tmp_path):
    from calofm.cli.main import main
    from calofm.data.showers import read_showers

    out = tmp_path / "demo-report"
    assert main(["demo", "--quick", "-o", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["materials"]) == SAMPLES
    for label, m in metrics["materials"].items():
        assert m["n_generated"] == m["n_reference"] == 120
        # a classifier on 24 + 24 test showers: 0.5 when indistinguishable (standard deviation about 0.08),
        # far below only by a bug
        assert 0.2 <= m["classifier_auc_high"] <= 1.0 and 0.2 <= m["classifier_auc_low"] <= 1.0
        assert m["fpd"][0] > 0 and m["noise_floor"]["n_reference"] == 60

    # the generated showers look like the simulated ones in what a physicist checks first
    for label in SAMPLES:
        e_ref, s_ref, _ = read_showers(str(out / "data" / f"ref_{label}.h5"))
        e_gen, s_gen, _ = read_showers(str(out / "data" / f"{label}.h5"))
        assert s_gen.shape == s_ref.shape == (120, 4500) and (s_gen >= 0).all()
        assert 10e3 <= e_gen.min() and e_gen.max() <= 100e3
        hits_ref, hits_gen = (s_ref > 0).sum(1).mean(), (s_gen > 0).sum(1).mean()
        assert 0.7 < hits_gen / hits_ref < 1.4, (label, hits_gen, hits_ref)
        frac_ref, frac_gen = (s_ref.sum(1) / e_ref).mean(), (s_gen.sum(1) / e_gen).mean()
        assert 0.8 < frac_gen / frac_ref < 1.25, (label, frac_gen, frac_ref)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_per_sample"] == 120 and {r["sample"] for r in summary["speed"]} == SAMPLES
    for r in summary["speed"]:
        assert r["model_showers_per_s"] > 0 and r["simulator_showers_per_s"] > 0
        assert np.isclose(r["model_ms_per_shower"] * r["model_showers_per_s"], 1000)
        assert 10 < r["mean_hits"] < 400
    assert 0 < summary["seconds_evaluate"] < summary["seconds"]

    page = (out / "index.html").read_text()
    assert "Speed" in page and page.count("data:image/png;base64,") >= 5 * 10
    for label in SAMPLES:
        pngs = list((out / label).glob("*.png"))
        assert len(pngs) >= 10 and all(os.path.getsize(p) > 5_000 for p in pngs)


def test_load_by_name_generates():
    import calofm

    model = calofm.load("calofm-small", adapters=["Pb"])
    incident, showers = model.generate(3, material="Pb", particle="gamma", energy_GeV=50, seed=0)
    assert showers.shape == (3, 4500) and (showers > 0).sum() > 0
    with pytest.raises(calofm.errors.CalofmError):
        model.generate(3, material="Fe")
