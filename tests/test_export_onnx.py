"""ONNX export of the decode step (calofm export, calofm.export): the graphs pass onnx.checker, and the
onnxruntime host loop reproduces the PyTorch decoder's showers token for token in fp32 when given the
uniforms the decoder draws, on the tiny preset and on the shipped model with its adapters merged."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import train_tiny_model

MISSING = "the onnx extra is not installed (pip install 'calofm[onnx]')"
onnx = pytest.importorskip("onnx", reason=MISSING)
pytest.importorskip("onnxscript", reason=MISSING)
pytest.importorskip("onnxruntime", reason=MISSING)

import calofm  # noqa: E402
from calofm.cli.main import main  # noqa: E402
from calofm.export.onnx_export import export_onnx  # noqa: E402
from calofm.export.onnx_runtime import OnnxDecoder  # noqa: E402
from calofm.generation.decode import DRAWS_PER_STEP, DecodeOptions, decode  # noqa: E402
from calofm.generation.sampler import head_samplings  # noqa: E402
from calofm.generation.streams import decode_uniforms  # noqa: E402
from calofm.tokenizer import PAD, incident_feature  # noqa: E402


def pytorch_and_onnx(sm, folder, material, particle, B, seed=3, temperature=1.0, min_p=(None, None)):
    """The same B showers decoded by PyTorch (eager, fp32) and by the onnxruntime loop, from the uniforms of
    showers 0..B-1 of the run of `seed` (generation.streams); min_p None: the model's own cuts."""
    tok = sm.tokenizer
    inc = incident_feature(np.geomspace(1e4, 1e5, B).astype(np.float32))
    voxel_sampling, energy_sampling = head_samplings(temperature, min_p_voxel=min_p[0], min_p_energy=min_p[1],
                                                     defaults=sm.min_p)  # the export's defaults: the model's
    torch.set_num_threads(1)
    uniforms = decode_uniforms(seed, np.arange(B), tok.max_hits, DRAWS_PER_STEP)
    ref = decode(sm.model, torch.from_numpy(inc), torch.full((B,), tok.material_id(material)),
                 torch.full((B,), tok.particle_id(particle)), tok.max_hits, tok.voxel_block, tok.energy_block,
                 voxel_sampling, uniforms, DecodeOptions(graph=False),
                 energy_sampling=energy_sampling)
    run = OnnxDecoder(folder)
    res = run.decode(inc, uniforms.numpy(), *min_p, temperature=temperature)
    return ref, res, run


def assert_same_tokens(ref, res):
    np.testing.assert_array_equal(res.voxel_tokens, ref.voxel_tokens.numpy())
    np.testing.assert_array_equal(res.energy_tokens, ref.energy_tokens.numpy())
    np.testing.assert_array_equal(res.n_hits, ref.n_hits.numpy())
    np.testing.assert_array_equal(res.capped, ref.capped.numpy())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model exported by the command line, class (W, gamma)."""
    d = tmp_path_factory.mktemp("onnx")
    sm, _ = train_tiny_model(d)
    out = str(d / "export")
    assert main(["export", "--model", str(d / "run"), "-o", out, "--material", "w", "--particle", "photon"]) == 0
    return sm, out


def test_tiny_export_passes_the_checker_and_describes_the_tokens(tiny):
    sm, out = tiny
    index = json.load(open(os.path.join(out, "manifest.json")))
    assert [(c["material"], c["particle"]) for c in index["classes"]] == [("W", "gamma")]
    folder = os.path.join(out, index["classes"][0]["folder"])
    for graph in ("prefill.onnx", "step.onnx"):
        onnx.checker.check_model(os.path.join(folder, graph), full_check=True)
    spec = json.load(open(os.path.join(folder, "calofm.json")))
    tok = sm.tokenizer
    assert spec["max_hits"] == tok.max_hits and spec["class"]["material_id"] == tok.material_id("W")
    assert spec["tokens"]["specials"]["PAD"] == PAD
    assert spec["tokens"]["voxel_block"]["offset"] == tok.voxel_block.offset
    assert spec["geometry"]["n_voxels"] == tok.geometry.n_voxels == sum(spec["geometry"]["cells_per_layer"])
    np.testing.assert_allclose(spec["energy_bins"]["edges_MeV"], tok.bins.edges)
    assert len(spec["energy_bins"]["centres_MeV"]) == tok.bins.n_bins == spec["tokens"]["energy_block"]["size"]
    assert spec["sampling"]["voxel"]["min_p"] > 0 and spec["cache"]["n_attentions"] == len(sm.model.attentions())
    step = onnx.load(os.path.join(folder, "step.onnx"))
    names = [i.name for i in step.graph.input]
    assert names[:7] == ["h", "hits", "t", "done", "u", "log_min_p", "temperature"]
    assert names[7:] == [f"past_{k}_{i}" for i in range(len(sm.model.attentions())) for k in ("key", "value")]


@pytest.mark.parametrize("temperature,min_p", [(1.0, (None, None)), (0.8, (0.0, 1e-2))])
def test_tiny_onnx_loop_reproduces_pytorch_token_for_token(tiny, temperature, min_p):
    sm, out = tiny
    ref, res, run = pytorch_and_onnx(sm, os.path.join(out, "W_gamma"), "W", "gamma", 8, temperature=temperature,
                                     min_p=min_p)
    assert len(set(ref.n_hits.tolist())) > 1  # showers end at different steps: the loop compacts
    assert_same_tokens(ref, res)
    # compaction changes nothing; the cells decoded from the JSON are the tokenizer's
    uniforms = decode_uniforms(3, np.arange(8), sm.tokenizer.max_hits, DRAWS_PER_STEP).numpy()
    inc = incident_feature(np.geomspace(1e4, 1e5, 8).astype(np.float32))
    whole = run.decode(inc, uniforms, *min_p, temperature=temperature, compact=False)
    np.testing.assert_array_equal(whole.voxel_tokens, res.voxel_tokens)
    # the cells from the JSON alone: calofm generate's showers of the same seed
    sampling = dict(temperature=temperature, min_p_voxel=min_p[0], min_p_energy=min_p[1])
    incident, generated = sm.generate(8, material="W", particle="gamma", seed=3, batch_size=5, **sampling)
    onnx_incident, cells, _ = run.generate(8, seed=3, batch_size=5, **sampling)
    np.testing.assert_array_equal(onnx_incident, incident)
    # onnxruntime's kernels round the last bits differently: a uniform that lands between the two
    # engines' cumulative sums (about once in 10^4 draws) picks the neighbouring token
    same = (cells == generated).all(axis=1)
    assert same.sum() >= len(same) - 1, f"showers {np.flatnonzero(~same)} differ"
    centres = sm.tokenizer.decode_padded(res.voxel_tokens, res.energy_tokens, mode="center")
    np.testing.assert_array_equal(run.cells(res), centres)


def test_export_refuses_bad_requests_and_keeps_what_is_there(tiny, tmp_path, capsys):
    sm, out = tiny
    model = os.path.dirname(out) + "/run"
    before = sorted(os.listdir(out))
    # an existing export without --force; a folder of other files even with it; an unknown class
    assert main(["export", "--model", model, "-o", out, "--material", "W", "--particle", "gamma"]) == 2
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["export", "--model", model, "-o", str(other), "--force", "--material", "W"]) == 2
    assert main(["export", "--model", model, "-o", str(tmp_path / "x"), "--material", "Unobtainium"]) == 2
    err = capsys.readouterr().err
    assert "pass --force" in err and "never replaces" in err and "Unobtainium" in err
    assert sorted(os.listdir(out)) == before and (other / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "x").exists()
    run = OnnxDecoder(os.path.join(out, "W_gamma"))
    with pytest.raises(calofm.errors.CalofmError, match="uniforms"):
        run.decode(np.zeros(2, np.float32), np.zeros((3, 4, 2), np.float32))


@pytest.mark.slow
def test_shipped_model_with_adapters_merged_matches_pytorch(tmp_path):
    """calofm-small with its Pb (material) and e- (particle) adapters: the class (Pb, e-) export merges
    both, and reproduces PyTorch with the adapters loaded."""
    sm = calofm.load("calofm-small", adapters=["Pb", "e-"])
    out = str(tmp_path / "export")
    export_onnx(sm, out, [("Pb", "e-")], log=lambda *a: None)
    ref, res, _ = pytorch_and_onnx(sm, os.path.join(out, "Pb_e-"), "Pb", "e-", 4)
    assert_same_tokens(ref, res)


@pytest.mark.slow
def test_bench_times_the_onnx_loop_beside_pytorch(tiny, tmp_path):
    sm, out = tiny
    model, report = os.path.dirname(out) + "/run", tmp_path / "bench.json"
    assert main(["bench", "generate", "--model", model, "--runtime", "onnx", "--batches", "1,3", "--n", "3",
                 "--energies", "", "--sim-n", "2", "--threads", "1", "--json", str(report)]) == 0
    rows = json.loads(report.read_text())["results"]
    onnx_rows = [r for r in rows if r.get("runtime") == "onnx"]
    assert [r["batch"] for r in onnx_rows] == [1, 3] and len(rows) == 4
    for r in onnx_rows:
        assert r["ms_per_shower"] > 0 and r["export_seconds"] > 0 and r["mean_hits"] > 0
        assert r["identical_to_torch"] == 1.0  # the same showers as the fp32 PyTorch row's


@pytest.mark.slow
@pytest.mark.parametrize("layout", [dict(stream_combine="cross", shared_expert=False, experts_per_material=1),
                                    dict(voxel_embedding="geometric", voxel_head="geometric")])
def test_other_layouts_export_and_match(tiny, tmp_path, layout):
    """The published layout (energy stream cross-attending to the voxel stream, its own caches), one
    expert per material, no shared expert; and the geometric voxel embedding and head: untrained weights,
    so every shower runs to max_hits."""
    from calofm.generation.api import ShowerModel
    from calofm.model import ShowerTransformer
    from calofm.model.config import get_preset

    sm, _ = tiny
    torch.manual_seed(0)
    cfg = get_preset("tiny", **layout)
    cross = ShowerModel(ShowerTransformer(cfg.for_tokenizer(sm.tokenizer)), sm.tokenizer, sm.manifest)
    export_onnx(cross, str(tmp_path / "export"), [("Cu", "gamma")], log=lambda *a: None)
    run = OnnxDecoder(str(tmp_path / "export" / "Cu_gamma"))
    assert run.n_attn == (2 if cfg.stream_combine == "cross" else 1) * cfg.n_layers
    _, cells = cross.generate(4, material="Cu", seed=2)
    _, onnx_cells, last = run.generate(4, seed=2)
    assert last.capped.all() and cross.last_stats["n_capped"] == 4
    np.testing.assert_array_equal(onnx_cells, cells)


def test_force_replaces_an_earlier_export_whole(tiny, tmp_path, monkeypatch):
    """--force swaps the new export in and removes the old one (no mixed folder is ever left); a failed
    export leaves the old one as it was. The graphs themselves are stubbed: this is about the folders."""
    import shutil

    from calofm.export import onnx_export

    sm, out = tiny
    old = str(tmp_path / "old")
    shutil.copytree(out, old)

    def stub(shower_model, material, particle, folder):
        os.makedirs(folder)
        open(os.path.join(folder, "calofm.json"), "w").write("{}")
    monkeypatch.setattr(onnx_export, "export_class", stub)
    export_onnx(sm, old, [("Cu", "gamma")], force=True, log=lambda *a: None)
    assert sorted(os.listdir(old)) == ["Cu_gamma", "manifest.json"]
    assert oct(os.stat(old).st_mode & 0o777) == oct(0o777 & ~_umask())

    def failing(*args):
        raise RuntimeError("export failed")
    monkeypatch.setattr(onnx_export, "export_class", failing)
    with pytest.raises(RuntimeError):
        export_onnx(sm, old, [("W", "gamma")], force=True, log=lambda *a: None)
    assert sorted(os.listdir(old)) == ["Cu_gamma", "manifest.json"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".calofm-export")]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
