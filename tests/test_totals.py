"""Shower totals: the fitted laws of hit count and visible energy, and their use in decoding (the energy
sum given the decoded count, or both drawn before decoding)."""

import json

import numpy as np
import pytest
import torch
from conftest import train_tiny_model

from calofm.errors import CalofmError
from calofm.generation import decode, load
from calofm.generation.decode import DRAWS_PER_STEP
from calofm.generation.streams import TOTALS, decode_uniforms, shower_normals
from calofm.tokenizer import incident_feature
from calofm.tokenizer.totals import TOTALS_MODES, ShowerTotals, rescale_to_total, totals_mode


def synthetic_law(n: int, rho: float, seed: int):
    """Incident energies 10-100 GeV; n grows with log E, r = E_vis/E_inc fluctuates 5 %; corr rho."""
    rng = np.random.default_rng(seed)
    inc = rng.uniform(1e4, 1e5, n)
    z1 = rng.standard_normal(n)
    z2 = rho * z1 + np.sqrt(1 - rho * rho) * rng.standard_normal(n)
    hits = np.rint(100 + 50 * np.log(inc / 1e4) + 10 * z1)
    return inc, hits, 0.0165 * (1 + 0.05 * z2) * inc


def test_fit_and_sample_reproduce_the_law():
    inc, hits, e_vis = synthetic_law(40_000, rho=0.6, seed=0)
    totals = ShowerTotals.fit("W/gamma", inc, hits, e_vis, min_hit_MeV=0.1)
    totals = ShowerTotals.from_dict(json.loads(json.dumps(totals.to_dict())))  # survives the manifest
    for energy in (15e3, 50e3, 90e3):
        n, r = totals.sample("W/gamma", np.full(20_000, energy), np.random.default_rng(1))
        assert n.dtype == np.int64 and np.all(n >= 1)
        assert abs(n.mean() - (100 + 50 * np.log(energy / 1e4))) < 1.5
        assert abs(n.std() - 10) < 1.0  # the within-bin trend must not widen it much
        assert abs(r.mean() - 0.0165) < 1e-4 and abs(r.std() / 0.0165 - 0.05) < 0.005
        assert abs(np.corrcoef(n, r)[0, 1] - 0.6) < 0.05  # the copula keeps n and E_vis correlated
    with pytest.raises(CalofmError, match="no shower totals for Pb/gamma"):
        totals.sample("Pb/gamma", np.array([1e4]), np.random.default_rng(0))


def test_energy_given_the_hit_count_follows_the_conditional_law():
    """Given a count, r is drawn from r | n: with rho = 0.9 its mean moves with n's normal score as
    rho * sigma_r * z_n and its spread shrinks to sqrt(1 - rho^2); averaged over the count law, r's
    own law comes back."""
    inc, hits, e_vis = synthetic_law(40_000, rho=0.9, seed=0)
    totals = ShowerTotals.fit("W/gamma", inc, hits, e_vis, min_hit_MeV=0.1)
    rng = np.random.default_rng(2)
    energy = np.full(20_000, 50e3)
    mean_n = 100 + 50 * np.log(5.0)
    for z_n in (-1.0, 0.0, 1.5):
        n = np.full(len(energy), np.rint(mean_n + 10 * z_n))
        r = totals.sample_ratio_given_hits("W/gamma", energy, n, rng.standard_normal((len(energy), 2)))
        assert abs(r.mean() / 0.0165 - 1 - 0.05 * 0.9 * z_n) < 0.006
        assert abs(r.std() / 0.0165 - 0.05 * np.sqrt(1 - 0.81)) < 0.006
    n_free, _ = totals.sample("W/gamma", energy, rng)
    r = totals.sample_ratio_given_hits("W/gamma", energy, n_free, rng.standard_normal((len(energy), 2)))
    assert abs(r.std() / 0.0165 - 0.05) < 0.005 and abs(np.corrcoef(n_free, r)[0, 1] - 0.9) < 0.03
    far = totals.sample_ratio_given_hits("W/gamma", energy[:10], np.full(10, 10_000), rng.standard_normal((10, 2)))
    assert np.all(far < 0.0165 * 1.3)  # a count beyond the fitted range stays at the law's edge
    assert totals_mode(True) == "hits+energy" and totals_mode(False) == "off" and totals_mode("energy") == "energy"
    with pytest.raises(CalofmError, match="totals must be one of"):
        totals_mode("hits")


def test_rescale_hits_to_a_total_keeps_them_above_threshold_and_in_order():
    rng = np.random.default_rng(0)
    showers = np.where(rng.random((50, 300)) < 0.3, 0.1 + rng.exponential(5.0, (50, 300)), 0.0).astype(np.float32)
    showers[:, :3] = 0.02  # hits below the threshold (a sampled bin can lie there) must not go negative
    target = showers.sum(1) * rng.uniform(0.8, 3.0, 50)
    out = rescale_to_total(showers, target, threshold_MeV=0.1)
    assert np.allclose(out.sum(1), target, rtol=1e-5)
    assert np.array_equal(out > 0, showers > 0) and np.all(out[showers > 0] >= 0.1 - 1e-6)
    for i in range(5):  # energy order of the hits is kept
        hit = showers[i] > 0
        assert np.array_equal(np.argsort(showers[i][hit], kind="stable"), np.argsort(out[i][hit], kind="stable"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    shower_model, data = train_tiny_model(tmp_path_factory.mktemp("totals"), n_showers=40, steps=10)
    shower_model.test_data = data
    return shower_model


def test_training_fits_totals_per_class_and_saves_them(model):
    assert sorted(model.tokenizer.totals.keys()) == ["Cu/gamma", "W/gamma"]
    with open(model.path + "/manifest.json") as fh:
        assert set(json.load(fh)["tokenizer"]["totals"]) == {"Cu/gamma", "W/gamma"}


def test_decoder_holds_each_shower_to_its_target_length(model):
    tok, B = model.tokenizer, 12
    inc = torch.from_numpy(incident_feature(np.linspace(1e4, 1e5, B)))
    target = torch.tensor([1, 2, 3, 5, 8, 13, 21, 1, 4, 9, 16, tok.max_hits])
    res = decode(model.model, inc, torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long), tok.max_hits,
                 tok.voxel_block, tok.energy_block, uniforms=decode_uniforms(0, range(B), tok.max_hits, DRAWS_PER_STEP),
                 target_hits=target)
    assert res.n_hits.tolist() == target.tolist()


def test_two_stage_generation_follows_the_drawn_totals(model):
    inc, showers = model.generate(30, material="W", seed=3, batch_size=7, totals=True)
    assert model.last_stats["totals"] == "hits+energy"
    normals = shower_normals(3, np.arange(30), TOTALS, 2).numpy()  # what generate() draws
    n_target, ratio = model.tokenizer.totals.sample("W/gamma", inc, normals=normals)
    assert np.array_equal((showers > 0).sum(1), np.minimum(n_target, model.tokenizer.max_hits))
    assert np.allclose(showers.sum(1), ratio * inc, rtol=1e-4)
    _, one_stage = model.generate(30, material="W", seed=3, batch_size=7)  # the default
    assert model.last_stats["totals"] == "off" and not np.array_equal(one_stage, showers)
    # energy only: the decoded showers of the default, their hits rescaled to E_vis drawn given their count
    _, given = model.generate(30, material="W", seed=3, batch_size=7, totals="energy")
    assert model.last_stats["totals"] == "energy"
    assert np.array_equal(given > 0, one_stage > 0)
    n = (one_stage > 0).sum(1)
    ratio = model.tokenizer.totals.sample_ratio_given_hits("W/gamma", inc, n, normals)
    thr = model.tokenizer.totals.min_hit_MeV("W/gamma")
    # rescale_to_total's contract: a shower without hits stays empty; below n * thr every hit sits at thr
    reachable = (n > 0) & (ratio * inc >= n * thr)
    assert reachable.sum() >= 20
    assert np.allclose(given.sum(1)[reachable], (ratio * inc)[reachable], rtol=1e-4)
    assert np.allclose(given[~reachable][given[~reachable] > 0], thr)
    model.tokenizer.totals.tables.pop("Cu/gamma")
    with pytest.raises(CalofmError, match="no shower totals for Cu/gamma"):
        model.generate(2, material="Cu", totals=True)
    model.generate(2, material="Cu")  # one-stage needs no totals
    assert model.last_stats["totals"] == "off"
    from calofm.cli.main import build_parser

    args = build_parser().parse_args(["generate", "--model", model.path, "--totals"])
    assert args.totals == "hits+energy"
    assert [a for a in build_parser()._subparsers._group_actions[0].choices["generate"]._actions
            if a.dest == "totals"][0].choices == TOTALS_MODES


def test_fit_totals_command_writes_the_manifest_only(model, tmp_path):
    import shutil

    from calofm.checkpoint import sha256_file
    from calofm.cli.main import main

    copy = tmp_path / "model"
    shutil.copytree(model.path, copy, ignore=shutil.ignore_patterns("checkpoints", "log.jsonl"))
    manifest = json.loads((copy / "manifest.json").read_text())
    fitted = manifest["tokenizer"].pop("totals")
    (copy / "manifest.json").write_text(json.dumps(manifest))  # a model from before totals existed
    assert len(load(str(copy)).tokenizer.totals) == 0
    weights = sha256_file(str(copy / "model.safetensors"))
    assert main(["fit-totals", "--model", str(copy), "--data", *model.test_data]) == 0
    again = load(str(copy))
    assert again.tokenizer.totals.to_dict() == fitted  # same rows, same laws as training fitted
    assert sha256_file(str(copy / "model.safetensors")) == weights
    assert main(["fit-totals", "--model", str(copy), "--data", str(tmp_path / "missing.h5")]) != 0
