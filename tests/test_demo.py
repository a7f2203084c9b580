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


@pytest.fixture(scope="module")
def ild_weights(tmp_path_factory):
    """A shipped-model folder holding a tiny `calofm-ild`: an `ild`-geometry base trained on W photons,
    a Pb material adapter, and an e- particle adapter trained on W and Pb electrons on top of it."""
    from calofm.checkpoint import export_model
    from calofm.extension.train import extend
    from calofm.training import TrainConfig, train
    from calofm.training.synthetic import write_synthetic

    d = tmp_path_factory.mktemp("ild")
    f = {(m, p): write_synthetic(str(d / f"{m}_{p}.h5"), 16, material=m, particle=p, geometry="ild", seed=i,
                                 mean_hits=8)
         for i, (m, p) in enumerate([("W", "gamma"), ("Pb", "gamma"), ("W", "e-"), ("Pb", "e-")])}
    quiet = lambda *a, **k: None  # noqa: E731
    train(TrainConfig(data=(f["W", "gamma"],), out=str(d / "run"), preset="tiny", steps=2, batch_size=4, warmup=1,
                      eval_every=2, ckpt_every=2, log_every=2, max_val=2, device="cpu"), threads=1, progress=False,
          log=quiet)
    weights = d / "weights"
    base = str(weights / "calofm-ild")
    export_model(str(d / "run"), base, min_p={"voxel": 1e-3})  # the energy cut: DEFAULT_MIN_P's
    kw = dict(steps=1, batch_size=4, warmup=1, progress=False, log=quiet, threads=1, max_val=2)
    os.makedirs(os.path.join(base, "adapters"))
    # written in the order that a plain name sort would get wrong: e- needs Pb first
    extend("material", base, [f["Pb", "gamma"]], os.path.join(base, "adapters", "Pb"), **kw)
    extend("particle", base, [f["W", "e-"], f["Pb", "e-"]], os.path.join(base, "adapters", "e-"),
           adapters=(os.path.join(base, "adapters", "Pb"),), **kw)
    return weights


def test_demo_and_bench_take_any_shipped_model(ild_weights, tmp_path, monkeypatch):
    """`--model calofm-ild`: found by name in the weights folder, its shipped adapters loaded in the order
    they require, its classes from its training data, reference showers simulated in its own geometry."""
    import calofm
    import calofm.demo as demo
    import calofm.evaluate.report as report
    import calofm.pretrained as pretrained
    from calofm.cli.main import main
    from calofm.data.showers import inspect_file
    from calofm.generation.sampler import DEFAULT_MIN_P

    monkeypatch.setattr(pretrained, "weights_dir", lambda: str(ild_weights))
    assert "calofm-ild" in shipped_models()
    model_dir = resolve_model("calofm-ild")
    assert demo.demo_adapters(model_dir) == ["Pb", "e-"]  # not the name order: e- requires Pb
    assert calofm.load("calofm-ild").min_p == {"voxel": 1e-3, "energy": DEFAULT_MIN_P["energy"]}  # the export's
    seen = {}

    def evaluate_files(refs, gens, output, **kw):  # the evaluation itself is tested on its own
        seen.update(refs=refs, gens=gens)
        return {"materials": {}}

    monkeypatch.setattr(report, "evaluate_files", evaluate_files)
    summary = demo.run_demo(str(tmp_path / "demo"), n=100, model="calofm-ild", log=lambda *a: None)
    assert summary["adapters"] == ["Pb", "e-"] and summary["geometry"] == "ild"
    assert summary["samples"] == ["W_gamma", "Pb_gamma", "W_e-", "Pb_e-"]
    for ref, gen, (material, particle) in zip(seen["refs"], seen["gens"],
                                              [("W", "gamma"), ("Pb", "gamma"), ("W", "e-"), ("Pb", "e-")]):
        r, g = inspect_file(ref), inspect_file(gen)
        assert r.geometry.name == g.geometry.name == "ild" and r.geometry.n_voxels == 27_000
        assert (r.material, r.particle) == (g.material, g.particle) == (material, particle)
        assert r.n_showers == g.n_showers == 100

    out = tmp_path / "bench.json"
    assert main(["bench", "generate", "--model", "calofm-ild", "--adapter", "Pb", "--material", "Pb",
                 "--batches", "2", "--energies", "", "--sim-n", "2", "--threads", "1", "--json", str(out)]) == 0
    bench = json.loads(out.read_text())
    assert bench["geometry"] == "ild" and bench["simulator_showers_per_s"] > 0
    assert bench["results"][0]["batch"] == 2 and bench["results"][0]["showers_per_s"] > 0


def test_demo_classes_of_the_small_model():
    import calofm
    from calofm.demo import demo_adapters, demo_samples

    adapters = demo_adapters(resolve_model("calofm-small"))
    assert adapters == ["Pb", "e-"]
    assert {f"{m}_{p}" for m, p in demo_samples(calofm.load("calofm-small", adapters=adapters))} == SAMPLES
