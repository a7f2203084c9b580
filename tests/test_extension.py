"""Growing a model: new material experts and new particle adapters, with no forgetting by
construction (bit-identical logits and generations for everything the base knew)."""

import hashlib
import os

import numpy as np
import pytest
import torch

from calofm.errors import CalofmError
from calofm.extension import closest_material
from calofm.generation import load
from calofm.extension.train import extend
from calofm.training import TrainConfig, train
from calofm.training.data import load_corpus
from calofm.training.synthetic import write_synthetic


def quiet(*args, **kwargs):
    pass


def dir_digest(path):
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            h.update(name.encode())
            h.update(open(full, "rb").read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("extension")
    f = {}
    for i, (mat, par) in enumerate([("W", "gamma"), ("Cu", "gamma"), ("Pb", "gamma"), ("W", "e-"), ("Pb", "e-")]):
        f[mat, par] = write_synthetic(str(d / f"{mat}_{par}.h5"), 40, material=mat, particle=par, seed=i, mean_hits=12)
    base = str(d / "base")
    train(TrainConfig(data=(f["W", "gamma"], f["Cu", "gamma"]), out=base, preset="tiny", steps=15, batch_size=8,
                      lr=1e-2, warmup=2, eval_every=15, ckpt_every=15, log_every=15, max_val=4, device="cpu"),
          threads=1, progress=False, log=quiet)
    base_digest = dir_digest(base)
    kw = dict(steps=25, batch_size=8, lr=1e-2, warmup=2, progress=False, log=quiet, threads=1)
    pb = str(d / "pb")
    extend("material", base, [f["Pb", "gamma"]], pb, **kw)
    em = str(d / "e-")
    extend("particle", base, [f["W", "e-"]], em, **kw)
    pb_em = str(d / "pb_e-")  # a particle added on top of an added material, as in the published workflow
    extend("particle", base, [f["W", "e-"], f["Pb", "e-"]], pb_em, adapters=(pb,), **kw)
    return dict(dir=d, files=f, base=base, base_digest=base_digest, pb=pb, em=em, pb_em=pb_em)


def logits_on(shower_model, files):
    """Voxel and energy logits of the base model's own inputs, on fixed showers."""
    _, corpus, _, _ = load_corpus(files, tokenizer=shower_model.tokenizer, log=quiet)
    batch = corpus.batch(np.arange(min(12, len(corpus))))
    net = shower_model.model
    with torch.no_grad():
        h, _ = net.hidden(batch["vox_in"], batch["en_in"], batch["incident"], batch["material"], batch["particle"],
                          valid=batch["valid"])
        return net.voxel_logits(h), net.energy_logits(h, batch["vox_tgt"].clamp(min=0))


@pytest.mark.parametrize("adapters", [["pb"], ["em"], ["pb", "pb_em"], ["pb", "em"]])
def test_known_showers_are_bit_identical_after_extension(setup, adapters):
    known = [setup["files"]["W", "gamma"], setup["files"]["Cu", "gamma"]]
    before = logits_on(load(setup["base"]), known)
    after = logits_on(load(setup["base"], [setup[a] for a in adapters]), known)
    for b, a in zip(before, after):
        assert torch.equal(b, a)
    if adapters == ["pb", "pb_em"]:  # and the Pb photons are untouched by the e- adapter trained on top
        pb_before = logits_on(load(setup["base"], [setup["pb"]]), [setup["files"]["Pb", "gamma"]])
        pb_after = logits_on(load(setup["base"], [setup["pb"], setup["pb_em"]]),
                             [setup["files"]["Pb", "gamma"]])
        for b, a in zip(pb_before, pb_after):
            assert torch.equal(b, a)
    assert dir_digest(setup["base"]) == setup["base_digest"]


def test_generation_with_the_same_seed_is_identical(setup, tmp_path):
    outputs = []
    for adapters in ([], [setup["pb"], setup["pb_em"]]):
        sm = load(setup["base"], adapters)
        for material in ("W", "Cu"):
            outputs.append(sm.generate(6, material=material, particle="gamma", seed=5)[1])
    assert np.array_equal(outputs[0], outputs[2]) and np.array_equal(outputs[1], outputs[3])


def test_extended_model_generates_new_material_and_particle(setup):
    sm = load(setup["base"], [setup["pb"], setup["pb_em"]])
    assert sm.materials == ["W", "Cu", "Pb"] and sm.particles == ["gamma", "e-"]
    # each adapter brings the hit-count / E_vis laws of its new classes, fitted on its own data
    assert {"Pb/gamma", "Pb/e-"} <= set(sm.tokenizer.totals.keys())
    assert "Pb/gamma" not in load(setup["base"]).tokenizer.totals
    for material, particle in (("Pb", "gamma"), ("Pb", "e-"), ("W", "e-")):
        incident, showers = sm.generate(4, material=material, particle=particle, seed=1)
        assert showers.shape == (4, sm.geometry.n_voxels) and np.all(showers >= 0)


def test_adapters_are_small_and_learn(setup):
    import json

    for key, limit in (("pb", 0.03), ("em", 0.10)):
        manifest = json.load(open(os.path.join(setup[key], "manifest.json")))
        t = manifest["training"]
        assert 0 < t["trainable_fraction"] <= limit
        assert manifest["weights"]["n_parameters"] == t["trainable_parameters"]
        assert t["final_loss"] < t["initial_loss"]
        assert manifest["spec"]["base_sha256"] == json.load(open(os.path.join(setup["base"], "manifest.json")))["weights"]["sha256"]
    assert json.load(open(os.path.join(setup["pb"], "manifest.json")))["spec"]["init_from"] == {"Pb": "W"}


def test_adapter_is_the_moving_average_of_its_trained_weights(setup, tmp_path):
    """Averaging does not change what trains: the ema run's last trained weights validate exactly as the
    run that exports them (--ema 0), while the adapter it writes is another, averaged one."""
    import json

    from safetensors.torch import load_file

    f = setup["files"]
    last = str(tmp_path / "last")
    extend("particle", setup["base"], [f["W", "e-"]], last, steps=25, batch_size=8, lr=1e-2, warmup=2,
           progress=False, log=quiet, threads=1, ema=0.0)
    averaged, trained = (json.load(open(os.path.join(d, "manifest.json")))["training"] for d in (setup["em"], last))
    assert averaged["ema"] == 0.99 and trained["ema"] == 0.0 and "validation_trained" not in trained
    assert averaged["validation_trained"] == trained["validation"]
    assert averaged["validation"] != trained["validation"]
    a, b = (load_file(os.path.join(d, "adapter.safetensors")) for d in (setup["em"], last))
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)


def test_closest_material_uses_shower_properties():
    assert closest_material("Pb", ["W", "Ta", "Cu"]) == "Ta"
    assert closest_material("Fe", ["W", "Ta", "Cu"]) == "Cu"


def test_bad_extensions_are_refused_and_leave_the_base_untouched(setup, tmp_path):
    f, base = setup["files"], setup["base"]
    kw = dict(steps=1, progress=False, log=quiet)
    with pytest.raises(CalofmError, match="already knows material W"):
        extend("material", base, [f["W", "gamma"]], str(tmp_path / "x"), **kw)
    ild = write_synthetic(str(tmp_path / "ild.h5"), 4, material="Fe", geometry="ild", mean_hits=5)
    with pytest.raises(CalofmError, match="differs from the model"):
        extend("material", base, [ild], str(tmp_path / "y"), **kw)
    with pytest.raises(CalofmError, match="requires|trained on top"):
        load(base, [setup["pb_em"]])  # needs the Pb adapter first
    # an adapter for another base model
    other = str(tmp_path / "other")
    train(TrainConfig(data=(f["W", "gamma"],), out=other, preset="tiny", steps=2, batch_size=4, warmup=1,
                      eval_every=2, ckpt_every=2, log_every=2, max_val=2, device="cpu"),
          threads=1, progress=False, log=quiet)
    with pytest.raises(CalofmError, match="another base model"):
        load(other, [setup["em"]])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert dir_digest(base) == setup["base_digest"]


def test_command_line_extend_and_info(setup, tmp_path, capsys):
    import json

    from calofm.cli.main import main

    out = str(tmp_path / "fe")
    fe = write_synthetic(str(tmp_path / "Fe.h5"), 20, material="Fe", seed=9, mean_hits=10)
    assert main(["extend", "material", "--base", setup["base"], "--data", fe, "-o", out, "--steps", "3",
                 "--threads", "1", "--ema", "0.5", "--no-progress"]) == 0
    assert json.load(open(os.path.join(out, "manifest.json")))["training"]["ema"] == 0.5
    assert main(["info", setup["base"], "--adapter", out]) == 0
    text = capsys.readouterr().out
    assert "Fe" in text and "% of the base" in text and "max_hits" in text
    assert "weights: moving average over about 2 steps (--ema 0.5)" in text
    with pytest.raises(SystemExit):  # a decay of 1 would never move from the initialization
        main(["extend", "material", "--base", setup["base"], "--data", fe, "-o", str(tmp_path / "w"), "--ema", "1"])
    assert not (tmp_path / "w").exists()
    assert main(["extend", "material", "--base", setup["base"], "--data", setup["files"]["W", "gamma"],
                 "-o", str(tmp_path / "z")]) == 2


def test_adapters_on_a_factorized_base_leave_its_showers_bit_identical(setup, tmp_path):
    """A base with the factorized voxel head and the running inputs: a material adapter and a particle
    adapter (whose head LoRA corrects the layer and cell heads through the final norm) change nothing
    for what the base knew, and its generated showers stay the same."""
    f = setup["files"]
    base = str(tmp_path / "base")
    train(TrainConfig(data=(f["W", "gamma"],), out=base, preset="tiny", steps=4, batch_size=8, lr=1e-2, warmup=1,
                      eval_every=4, ckpt_every=4, log_every=4, max_val=4, device="cpu",
                      model={"voxel_head": "factorized", "running_inputs": True}), threads=1, progress=False, log=quiet)
    kw = dict(steps=3, batch_size=8, lr=1e-2, warmup=1, progress=False, log=quiet, threads=1, max_val=4,
              n_reference=8)
    pb, em = str(tmp_path / "pb"), str(tmp_path / "e-")
    extend("material", base, [f["Pb", "gamma"]], pb, **kw)
    extend("particle", base, [f["W", "e-"]], em, **kw)
    plain = load(base)
    before = logits_on(plain, [f["W", "gamma"]])
    inc = np.array([2e4, 5e4, 9e4], dtype=np.float32)
    showers = plain.generate(3, material="W", incident_MeV=inc, seed=2)[1]
    grown = load(base, [pb, em])
    assert grown.model.factorized and grown.model.running is not None
    for b, a in zip(before, logits_on(grown, [f["W", "gamma"]])):
        assert torch.equal(b, a)
    assert np.array_equal(showers, grown.generate(3, material="W", incident_MeV=inc, seed=2)[1])
    assert np.isfinite(grown.generate(2, material="Pb", particle="e-", incident_MeV=inc[:2], seed=2)[1]).all()


@pytest.mark.parametrize("adapters", [["Pb"], ["Pb", "e-"]])
def test_shipped_ild_model_is_bit_identical_under_its_adapters(tmp_path, adapters):
    """calofm-ild: the base's logits on its own W and Ta photons, and a generated W photon, are the same bits
    with its shipped adapters loaded (the adapters' longer sequences grow the position tables)."""
    from calofm.simulation import simulate_to_file

    files = []
    for material in ("W", "Ta"):
        files.append(str(tmp_path / f"{material}.h5"))
        simulate_to_file(files[-1], 3, material=material, energy_GeV=10, geometry="ild", seed=3, progress=False)
    base, grown = load("calofm-ild"), load("calofm-ild", adapters=adapters)
    assert grown.model.cfg.max_seq_len > base.model.cfg.max_seq_len  # Pb showers run longer
    for b, a in zip(logits_on(base, files), logits_on(grown, files)):
        assert torch.equal(b, a)
    assert np.array_equal(base.generate(1, material="W", energy_GeV=10, seed=2)[1],
                          grown.generate(1, material="W", energy_GeV=10, seed=2)[1])
