"""Adapters that lengthen the sequence: an adapter's own hit cap (fitted on its data, in its manifest),
per-class caps in generation, per-row caps in the decoder (eager and static), position tables that
grow without changing the base's outputs, and a particle adapter trained on several materials, one of
them served by a material adapter beneath it."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from calofm.data.showers import inspect_file
from calofm.errors import CalofmError
from calofm.extension.train import extend
from calofm.generation import load
from calofm.generation.decode import DRAWS_PER_STEP, DecodeOptions, decode
from calofm.generation.streams import decode_uniforms
from calofm.model.attention import Rotary
from calofm.tokenizer import PAD, Hits, incident_feature
from calofm.training import TrainConfig, train
from calofm.training.stream import StreamSpec
from calofm.training.data import load_corpus
from calofm.training.synthetic import write_synthetic
from calofm.data.showers import iter_showers


def quiet(*args, **kwargs):
    pass


def hit_counts(path):
    return np.concatenate([Hits.from_dense(s).counts for _, s in iter_showers(path, info=inspect_file(path))])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny base on short W and Cu photon showers; a Pb adapter on longer showers; an e- adapter on
    W and Pb electrons (longer still) trained on top of the Pb adapter."""
    d = tmp_path_factory.mktemp("length")
    f = {}
    for i, (mat, par, hits) in enumerate([("W", "gamma", 10), ("Cu", "gamma", 10), ("Pb", "gamma", 30),
                                          ("W", "e-", 45), ("Pb", "e-", 45)]):
        f[mat, par] = write_synthetic(str(d / f"{mat}_{par}.h5"), 40, material=mat, particle=par, seed=i,
                                      mean_hits=hits)
    base = str(d / "base")
    train(TrainConfig(data=(f["W", "gamma"], f["Cu", "gamma"]), out=base, preset="tiny", steps=6, batch_size=8,
                      lr=1e-2, warmup=2, eval_every=6, ckpt_every=6, log_every=6, max_val=4, device="cpu"),
          threads=1, progress=False, log=quiet)
    kw = dict(steps=4, batch_size=8, lr=1e-2, warmup=1, progress=False, log=quiet, threads=1, max_val=4)
    pb, em = str(d / "pb"), str(d / "em")
    extend("material", base, [f["Pb", "gamma"]], pb, **kw)
    extend("particle", base, [f["W", "e-"], f["Pb", "e-"]], em, adapters=(pb,), **kw)
    return dict(dir=d, files=f, base=base, pb=pb, em=em)


def spec_of(adapter):
    return json.load(open(os.path.join(adapter, "manifest.json")))["spec"]


def test_adapter_records_the_cap_fitted_on_its_data(setup):
    f, base = setup["files"], load(setup["base"])
    tok = base.tokenizer
    pb_cap, em_cap = spec_of(setup["pb"])["max_hits"], spec_of(setup["em"])["max_hits"]
    # training's rule, on the adapter's own showers (all rows of its files)
    assert pb_cap == tok.max_hits_for(hit_counts(f["Pb", "gamma"]))
    assert em_cap == tok.max_hits_for(np.concatenate([hit_counts(f["W", "e-"]), hit_counts(f["Pb", "e-"])]))
    assert tok.max_hits < pb_cap < em_cap
    assert json.load(open(os.path.join(setup["em"], "manifest.json")))["training"]["max_hits"] == em_cap


def test_each_class_is_generated_up_to_its_own_cap(setup):
    base = load(setup["base"])
    sm = load(setup["base"], [setup["pb"], setup["em"]])
    tok, cap = sm.tokenizer, base.tokenizer.max_hits
    pb_cap, em_cap = spec_of(setup["pb"])["max_hits"], spec_of(setup["em"])["max_hits"]
    expected = {("W", "gamma"): cap, ("Cu", "gamma"): cap, ("Pb", "gamma"): pb_cap, ("W", "e-"): em_cap,
                ("Pb", "e-"): max(pb_cap, em_cap)}
    for (material, particle), want in expected.items():
        assert tok.class_max_hits(material, particle) == want
        sm.generate(3, material=material, particle=particle, seed=2)
        assert sm.last_stats["max_hits"] == want
    assert tok.max_hits == cap  # the base's cap itself is unchanged
    # the position tables grew to the longest cap, their first rows as they were
    net = sm.model
    assert net.cfg.max_seq_len == em_cap + 3 == net.rotary.cos.shape[0] == net.causal_mask.shape[0]
    n = base.model.cfg.max_seq_len
    assert torch.equal(net.rotary.cos[:n], base.model.rotary.cos) and torch.equal(net.rotary.sin[:n], base.model.rotary.sin)
    assert torch.equal(net.causal_mask, torch.ones(em_cap + 3, em_cap + 3, dtype=torch.bool).tril())
    # a Pb photon adapter alone: Pb electrons are unknown, the base's classes keep the base's cap
    pb_only = load(setup["base"], [setup["pb"]])
    assert pb_only.tokenizer.class_max_hits("W", "gamma") == cap and pb_only.model.cfg.max_seq_len == pb_cap + 3


@pytest.mark.parametrize("adapters", [["pb"], ["pb", "em"]])
def test_base_outputs_are_bit_identical_with_longer_adapters(setup, adapters):
    """Logits on the base's own showers and generated showers, with the position tables grown."""
    known = [setup["files"]["W", "gamma"], setup["files"]["Cu", "gamma"]]
    base, grown = load(setup["base"]), load(setup["base"], [setup[a] for a in adapters])
    assert grown.model.cfg.max_seq_len > base.model.cfg.max_seq_len
    _, corpus, _, _ = load_corpus(known, tokenizer=base.tokenizer, log=quiet)
    batch = corpus.batch(np.arange(len(corpus)))
    outs = []
    for sm in (base, grown):
        with torch.no_grad():
            h, _ = sm.model.hidden(batch["vox_in"], batch["en_in"], batch["incident"], batch["material"],
                                   batch["particle"], valid=batch["valid"])
        outs.append((sm.model.voxel_logits(h), sm.generate(5, material="Cu", seed=3)[1],
                     sm.generate(5, material="W", seed=4, options=DecodeOptions(graph=True))[1]))
    for b, a in zip(*outs):
        assert (torch.equal(b, a) if isinstance(b, torch.Tensor) else np.array_equal(b, a))


def test_grown_rotary_tables_match_a_fresh_longer_table():
    short, grown, fresh = Rotary(16, 0.5, 40), Rotary(16, 0.5, 40), Rotary(16, 0.5, 300)
    grown.grow(300)
    assert torch.equal(grown.cos[:40], short.cos) and torch.equal(grown.sin[:40], short.sin)
    torch.testing.assert_close(grown.cos, fresh.cos, rtol=0, atol=1e-7)
    torch.testing.assert_close(grown.sin, fresh.sin, rtol=0, atol=1e-7)


@pytest.mark.parametrize("opt", [DecodeOptions(compact=False, graph=False), DecodeOptions(),
                                 DecodeOptions(graph=True), DecodeOptions(graph=True, compact=False)])
def test_per_row_caps_force_eos_at_each_rows_cap(setup, opt, monkeypatch):
    """A batch mixing caps: a row with the largest cap decodes as without per-row caps; a row with a
    smaller cap is that row cut at its cap (EOS forced, counted as capped when it had not stopped)."""
    import importlib

    monkeypatch.setattr(importlib.import_module("calofm.generation.decode"), "GRAPH_MIN_ROWS", 4)
    torch.set_num_threads(1)
    sm = load(setup["base"], [setup["pb"], setup["em"]])
    net, tok = sm.model, sm.tokenizer
    B, width = 12, tok.longest_seq_len - 3
    inc = torch.from_numpy(incident_feature(np.geomspace(1e4, 1e5, B).astype(np.float32)))
    mat = torch.tensor([tok.material_id(("W", "Cu", "Pb")[i % 3]) for i in range(B)])
    par = torch.tensor([tok.particle_id("e-" if i % 2 else "gamma") for i in range(B)])

    def run(max_hits, options):
        return decode(net, inc, mat, par, max_hits, tok.voxel_block, tok.energy_block,
                      uniforms=decode_uniforms(4, range(B), width, DRAWS_PER_STEP), options=options)

    ref = run(width, DecodeOptions(compact=False, graph=False))
    caps = torch.tensor([3, width, 6, width, 1, 9] * 2)
    res = run(caps, opt)
    assert res.voxel_tokens.shape == (B, width) and (caps < ref.n_hits).any()
    for i, c in enumerate(caps.tolist()):
        for got, want in ((res.voxel_tokens[i], ref.voxel_tokens[i]), (res.energy_tokens[i], ref.energy_tokens[i])):
            assert torch.equal(got[:c], want[:c]) and bool((got[c:] == PAD).all())
        assert int(res.n_hits[i]) == min(c, int(ref.n_hits[i]))
        assert bool(res.capped[i]) == (int(ref.n_hits[i]) >= c if c < width else bool(ref.capped[i]))
    # one cap for every row is the plain decode
    same = run(torch.full((B,), width), opt)
    assert torch.equal(same.voxel_tokens, ref.voxel_tokens) and torch.equal(same.capped, ref.capped)
    with pytest.raises(ValueError, match="one positive cap per shower"):
        run(torch.zeros(B, dtype=torch.long), opt)


def test_adapters_without_a_cap_keep_the_base_cap(setup, tmp_path):
    old = str(tmp_path / "pb_old")
    shutil.copytree(setup["pb"], old)
    manifest = json.load(open(os.path.join(old, "manifest.json")))
    del manifest["spec"]["max_hits"]
    json.dump(manifest, open(os.path.join(old, "manifest.json"), "w"))
    base, sm = load(setup["base"]), load(setup["base"], [old])
    assert sm.tokenizer.class_max_hits("Pb", "gamma") == base.tokenizer.max_hits
    assert sm.model.cfg.max_seq_len == base.model.cfg.max_seq_len
    # stacked with an adapter that has a cap: a class both serve gets the larger of the two
    em_cap = spec_of(setup["em"])["max_hits"]
    both = load(setup["base"], [old, setup["em"]]).tokenizer
    assert both.class_max_hits("Pb", "e-") == max(em_cap, base.tokenizer.max_hits)
    assert both.class_max_hits("Pb", "gamma") == base.tokenizer.max_hits
    for bad in (0, -3, "40", 1.5, True, 10 ** 9):
        manifest["spec"]["max_hits"] = bad
        json.dump(manifest, open(os.path.join(old, "manifest.json"), "w"))
        with pytest.raises(CalofmError, match="max_hits"):
            load(setup["base"], [old])


def test_particle_adapter_on_streamed_materials_one_from_a_material_adapter(setup, tmp_path):
    """`calofm extend particle --adapter PB --particle e- --simulate W,Pb`: Pb is known only through the
    material adapter beneath; the stream's readout defaults to the base model's."""
    from calofm.cli.extension_commands import base_geometry

    out = str(tmp_path / "em_stream")
    assert base_geometry(setup["base"]) == "cpu"
    stream = StreamSpec.parse("W,Pb", "e-", "1:2", base_geometry(setup["base"]))
    extend("particle", setup["base"], [], out, adapters=(setup["pb"],), particle="e-", stream=stream, steps=2,
           batch_size=4, warmup=1, progress=False, log=quiet, threads=1, workers=0, max_val=3, n_reference=16,
           precision="fp32")
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    summary = manifest["training"]["data_summary"]
    assert summary["stream"]["materials"] == ["W", "Pb"] and summary["stream"]["geometry"] == "cpu"
    assert set(manifest["training"]["validation"]) == {"W", "Pb"}
    assert manifest["spec"]["max_hits"] == summary["adapter_max_hits"] > 0
    assert manifest["spec"]["requires"] == [json.load(open(os.path.join(setup["pb"], "manifest.json")))["weights"]["sha256"]]
    sm = load(setup["base"], [setup["pb"], out])
    assert {"W/e-", "Pb/e-"} <= set(sm.tokenizer.totals.keys())
    _, showers = sm.generate(2, material="Pb", particle="e-", seed=1)
    assert showers.shape == (2, sm.geometry.n_voxels)
