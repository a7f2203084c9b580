"""Generation: sampling rules, per-sequence EOS, no duplicate voxels, reproducibility, output file."""

import json

import numpy as np
import pytest
import torch
from conftest import train_tiny_model

from calofm.errors import CalofmError
from calofm.generation import SamplingConfig, decode, filter_logits, sample
from calofm.generation.decode import DRAWS_PER_STEP
from calofm.generation.streams import decode_uniforms
from calofm.tokenizer import EOS, PAD, incident_feature


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return train_tiny_model(tmp_path_factory.mktemp("gen"))[0]


def draws(seed: int, n: int, max_hits: int) -> torch.Tensor:
    return decode_uniforms(seed, range(n), max_hits, DRAWS_PER_STEP)


def test_sampler_rules():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, float("-inf")]]).repeat(4000, 1)
    assert torch.all(sample(logits, SamplingConfig(temperature=0)) == 0)
    assert torch.all(sample(logits, SamplingConfig(top_k=1), g) == 0)
    assert torch.all(sample(logits, SamplingConfig(top_p=0.3), g) == 0)
    two = sample(logits, SamplingConfig(top_k=2), g)
    assert set(two.tolist()) == {0, 1}
    draws = sample(logits, SamplingConfig(), g)
    assert not torch.any(draws == 4)  # masked tokens are never drawn
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    assert torch.allclose(freq, logits[0].softmax(-1).double(), atol=0.03)
    kept = torch.isfinite(filter_logits(logits[:1], SamplingConfig(top_p=0.8)))
    assert kept.tolist() == [[True, True, False, False, False]]  # 0.63 < 0.8 <= 0.63 + 0.23
    # min-p: p / p_max = 1, e^-1, e^-1.5, e^-3: 0.2 keeps the first three
    kept = torch.isfinite(filter_logits(logits[:1], SamplingConfig(min_p=0.2)))
    assert kept.tolist() == [[True, True, True, False, False]]
    assert torch.isfinite(filter_logits(logits[:1], SamplingConfig(min_p=0.2), with_min_p=False)[0, 3])
    assert torch.all(sample(logits, SamplingConfig(min_p=1.0), g) == 0)  # only the mode is left
    for bad in (dict(min_p=-0.1), dict(min_p=1.5), dict(top_p=0.0), dict(temperature=-1.0)):
        with pytest.raises(ValueError, match="invalid sampling settings"):
            SamplingConfig(**bad)


def test_decode_stops_per_sequence_and_never_repeats_a_voxel(model):
    tok, net = model.tokenizer, model.model
    B = 16
    inc = torch.from_numpy(incident_feature(np.linspace(1e4, 1e5, B)))
    mat = torch.tensor([tok.material_id("W"), tok.material_id("Cu")] * (B // 2))
    res = decode(net, inc, mat, torch.zeros(B, dtype=torch.long), tok.max_hits, tok.voxel_block, tok.energy_block,
                 uniforms=draws(1, B, tok.max_hits))
    v = res.voxel_tokens.numpy()
    assert len(set(res.n_hits.tolist())) > 1  # sequences end at their own EOS
    for i in range(B):
        n = int(res.n_hits[i])
        hits = v[i, :n]
        assert np.all(v[i, n:] == PAD) and len(set(hits.tolist())) == n  # no duplicate voxel
        assert np.all((hits >= tok.voxel_block.offset) & (hits < tok.voxel_block.offset + tok.voxel_block.size))
        e = res.energy_tokens.numpy()[i, :n]
        assert np.all((e >= tok.energy_block.offset) & (e < tok.energy_block.offset + tok.energy_block.size))
    # a length cap forces EOS and is counted
    capped = decode(net, inc, mat, torch.zeros(B, dtype=torch.long), 3, tok.voxel_block, tok.energy_block,
                    uniforms=draws(1, B, 3))
    assert capped.voxel_tokens.shape == (B, 3) and int(capped.capped.sum()) == int((capped.n_hits == 3).sum()) > 0
    assert EOS not in capped.voxel_tokens.tolist()


def test_api_generate_is_reproducible_and_writes_the_simulator_layout(model, tmp_path):
    e1, s1 = model.generate(12, material="Cu", energy_GeV=(10, 100), seed=4, batch_size=5)
    e2, s2 = model.generate(12, material="Cu", energy_GeV=(10, 100), seed=4, batch_size=5)
    assert np.array_equal(e1, e2) and np.array_equal(s1, s2)
    _, s3 = model.generate(12, material="Cu", energy_GeV=(10, 100), seed=5, batch_size=5)
    assert not np.array_equal(s1, s3)
    assert s1.shape == (12, 4500) and s1.dtype == np.float32 and np.all(s1 >= 0)
    assert np.all((e1 >= 1e4) & (e1 <= 1e5))
    assert model.last_stats["n_showers"] == 12
    out = tmp_path / "gen.h5"
    inc, showers = model.generate(6, material="W", energy_GeV=50, seed=1, output=str(out))
    from calofm.data import read_showers

    inc_f, showers_f, info = read_showers(str(out))
    assert np.array_equal(inc_f, inc) and np.array_equal(showers_f, showers) and np.all(inc == 5e4)
    assert info.material == "W" and info.particle == "gamma" and info.geometry.n_voxels == 4500
    with pytest.raises(CalofmError):
        model.generate(2, material="W", energy_GeV="100:10")
    with pytest.raises(CalofmError):
        model.generate(2, material="W", top_p=0.0)
    with pytest.raises(CalofmError, match="min_p"):
        model.generate(2, material="W", min_p_energy=2.0)


def test_generate_passes_each_head_its_own_min_p(model, monkeypatch, tmp_path):
    """generate's min_p_voxel / min_p_energy reach the sampler of their own head (told apart by the
    vocabulary width), defaults included, and are written to the output file."""
    import sys

    from calofm.data import read_showers
    from calofm.generation.api import ShowerModel
    from calofm.generation.sampler import DEFAULT_MIN_P

    decode_module = sys.modules["calofm.generation.decode"]  # the package exports a function of that name
    seen = {}
    real = decode_module.sample

    def spy(logits, cfg, *args, **kwargs):
        seen.setdefault(logits.shape[1], set()).add(cfg.min_p)
        return real(logits, cfg, *args, **kwargs)

    monkeypatch.setattr(decode_module, "sample", spy)
    n_voxel, n_energy = model.model.cfg.n_voxel_tokens, model.model.cfg.n_energy_tokens
    model.generate(3, material="W", seed=1, min_p_voxel=0.02, min_p_energy=0.0, output=str(tmp_path / "a.h5"))
    assert seen == {n_voxel: {0.02}, n_energy: {0.0}}
    seen.clear()
    model.generate(3, material="W", seed=1)
    assert seen == {n_voxel: {DEFAULT_MIN_P["voxel"]}, n_energy: {DEFAULT_MIN_P["energy"]}}
    attrs = read_showers(str(tmp_path / "a.h5"))[2].attrs  # dicts are stored as JSON
    assert json.loads(attrs["sampling"])["min_p"] == 0.02 and json.loads(attrs["energy_sampling"])["min_p"] == 0.0
    # a model whose manifest names its own cuts generates with them by default; an argument still wins
    own = ShowerModel(model.model, model.tokenizer, dict(model.manifest, min_p={"voxel": 0.0, "energy": 0.02}))
    seen.clear()
    own.generate(3, material="W", seed=1, output=str(tmp_path / "b.h5"))
    assert seen == {n_voxel: {0.0}, n_energy: {0.02}}
    attrs = read_showers(str(tmp_path / "b.h5"))[2].attrs
    assert json.loads(attrs["sampling"])["min_p"] == 0.0 and json.loads(attrs["energy_sampling"])["min_p"] == 0.02
    seen.clear()
    own.generate(3, material="W", seed=1, min_p_voxel=0.05)
    assert seen == {n_voxel: {0.05}, n_energy: {0.02}}
    for bad in ({"voxel": 2.0}, {"cell": 0.1}, [0.1], {"energy": "1e-2"}):
        with pytest.raises(CalofmError, match="min_p"):
            ShowerModel(model.model, model.tokenizer, dict(model.manifest, min_p=bad))


def test_a_shower_depends_on_the_seed_and_its_index_only(model):
    """300 showers in one batch, as three shards of 100 (start=...), in batches of 50 and of 7: the
    same incident energies and the same cells (tokens and in-bin energies) for every shower, fp32 CPU."""
    torch.set_num_threads(1)
    kw = dict(material="W", energy_GeV=(10, 100), spectrum="log", seed=9)
    e, s = model.generate(300, batch_size=300, **kw)
    assert model.last_stats["n_capped"] < 300 and len(np.unique((s > 0).sum(1))) > 5  # showers of many lengths
    shards = [model.generate(100, start=100 * k, batch_size=100, **kw) for k in range(3)]
    assert np.array_equal(np.concatenate([x[0] for x in shards]), e)
    assert np.array_equal(np.concatenate([x[1] for x in shards]), s)
    for batch in (50, 7):
        e_b, s_b = model.generate(300, batch_size=batch, **kw)
        assert np.array_equal(e_b, e) and np.array_equal(s_b, s), batch
    # two-stage totals too; the first showers of a run do not depend on how many follow
    e_t, s_t = model.generate(40, batch_size=40, totals=True, **kw)
    tail = model.generate(25, start=15, batch_size=6, totals=True, **kw)
    assert np.array_equal(tail[0], e_t[15:]) and np.array_equal(tail[1], s_t[15:])
    assert np.array_equal(model.generate(15, batch_size=4, totals=True, **kw)[1], s_t[:15])
    # explicit incident energies take the same streams
    _, s_given = model.generate(0, incident_MeV=e[100:130], start=100, **kw)
    assert np.array_equal(s_given, s[100:130])
    with pytest.raises(CalofmError, match="first shower index"):
        model.generate(3, start=-1)


def test_decoder_takes_a_uniform_table_per_shower(model):
    """Rows of the table belong to showers: a shower decoded with others or alone (>= 4 rows, see
    COMPACT_MIN_ROWS) gets the same tokens; greedy decoding needs no table; wrong tables are refused."""
    torch.set_num_threads(1)
    tok, net = model.tokenizer, model.model
    B = 8
    inc = torch.from_numpy(incident_feature(np.geomspace(1e4, 1e5, B)))
    zeros = torch.zeros(B, dtype=torch.long)
    table = draws(2, B, tok.max_hits)
    full = decode(net, inc, zeros, zeros, tok.max_hits, tok.voxel_block, tok.energy_block, uniforms=table)
    rows = torch.tensor([6, 1, 3, 4])
    part = decode(net, inc[rows], zeros[rows], zeros[rows], tok.max_hits, tok.voxel_block, tok.energy_block,
                  uniforms=table[rows])
    assert torch.equal(part.voxel_tokens, full.voxel_tokens[rows])
    assert torch.equal(part.energy_tokens, full.energy_tokens[rows])
    greedy = SamplingConfig(temperature=0)
    g = decode(net, inc, zeros, zeros, tok.max_hits, tok.voxel_block, tok.energy_block, greedy)
    assert torch.equal(g.voxel_tokens, decode(net, inc, zeros, zeros, tok.max_hits, tok.voxel_block, tok.energy_block,
                                              greedy, uniforms=table).voxel_tokens)
    with pytest.raises(ValueError, match="uniforms"):
        decode(net, inc, zeros, zeros, tok.max_hits, tok.voxel_block, tok.energy_block)
    for bad in (table[:5], table[:, :3], torch.rand(B, tok.max_hits + 1, DRAWS_PER_STEP - 1)):
        with pytest.raises(ValueError, match="uniforms of shape"):
            decode(net, inc, zeros, zeros, tok.max_hits, tok.voxel_block, tok.energy_block, uniforms=bad)
