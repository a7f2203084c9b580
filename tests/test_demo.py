"""`calofm demo --quick` end to end: shipped model + adapters, simulation, generation, report."""

import json
import os

import pytest

from calofm.pretrained import resolve_model, shipped_adapters, shipped_models


def test_shipped_model_and_adapters_are_present():
    assert "calofm-small" in shipped_models()
    assert {"Pb", "e-"} <= set(shipped_adapters(resolve_model("calofm-small")))


def test_quick_demo_writes_a_report(tmp_path):
    from calofm.cli.main import main

    out = tmp_path / "demo-report"
    assert main(["demo", "--quick", "-o", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["materials"]) == {"W_gamma", "Ta_gamma", "Cu_gamma", "Pb_gamma", "W_e-"}
    for label, m in metrics["materials"].items():
        auc, err = m["classifier_auc_high"] if isinstance(m["classifier_auc_high"], list) else (m["classifier_auc_high"], 0)
        assert 0.0 <= auc <= 1.0
        assert m["n_generated"] == m["n_reference"] == 120
    page = (out / "index.html").read_text()
    assert "Speed" in page and "data:image/png;base64" in page
    assert os.path.getsize(out / "index.html") > 10_000


def test_load_by_name_generates():
    import calofm

    model = calofm.load("calofm-small", adapters=["Pb"])
    incident, showers = model.generate(3, material="Pb", particle="gamma", energy_GeV=50, seed=0)
    assert showers.shape == (3, 4500) and (showers > 0).sum() > 0
    with pytest.raises(calofm.errors.CalofmError):
        model.generate(3, material="Fe")
