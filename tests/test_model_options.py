"""Model options (model/config.py): the factorized voxel head, the geometric voxel embedding and head,
and the running inputs. Their losses are the joint NLL, the cached decoding path sees what training
sees, a saved model round-trips, and a factorized decode never repeats a voxel nor leaves the grid."""

import numpy as np
import pytest
import torch
from test_model import make_corpus, make_tokenizer, tiny_model

from calofm.detector.geometry import CylindricalGrid, Geometry, Layer
from calofm.errors import CalofmError
from calofm.generation.decode import DecodeOptions, decode, draws_per_step
from calofm.generation.streams import decode_uniforms
from calofm.model import ModelConfig, get_preset
from calofm.tokenizer import ShowerTokenizer

OPTIONS = [dict(voxel_head="factorized"), dict(running_inputs=True),
           dict(voxel_head="factorized", running_inputs=True),
           dict(voxel_embedding="geometric", voxel_head="geometric")]


def test_options_are_off_by_default_and_set_by_overrides():
    cfg = get_preset("small")
    assert cfg.voxel_head == "flat" and cfg.voxel_embedding == "table" and not cfg.running_inputs
    tok = make_tokenizer()
    filled = get_preset("tiny").for_tokenizer(tok)
    assert filled.layer_cells == () and filled.layer_grid == () and filled.energy_bins is None  # a default config is saved as before
    # a saved config without the new fields loads with them off
    old = {k: v for k, v in filled.to_dict().items() if k not in ("voxel_head", "running_inputs", "layer_cells",
                                                                  "energy_bins", "voxel_embedding", "layer_grid")}
    assert ModelConfig.from_dict(old) == filled
    on = get_preset("tiny", voxel_head="factorized", running_inputs=True).for_tokenizer(tok)
    assert on.layer_cells == (225,) * 20 and on.energy_bins == tok.bins.to_dict()
    assert ModelConfig.from_dict(on.to_dict()) == on and hash(on) == hash(ModelConfig.from_dict(on.to_dict()))
    with pytest.raises(CalofmError, match="voxel_head"):
        get_preset("tiny", voxel_head="trees")
    with pytest.raises(CalofmError, match="running_inputs must be bool"):
        get_preset("tiny", running_inputs=1)


def test_factorized_loss_is_the_joint_nll_and_a_voxel_block_is_refused():
    tok = make_tokenizer()
    b = make_corpus(tok, n=6).batch(np.arange(6))
    model = tiny_model(tok, voxel_head="factorized").eval()
    terms = model(b)
    h, _ = model.hidden(b["vox_in"], b["en_in"], b["incident"], b["material"], b["particle"])
    sel = b["vox_tgt"] != -100
    logp = model.voxel_logits(h[sel])  # joint log p(layer) p(cell | layer) over the flat vocabulary
    assert torch.allclose(logp.exp().sum(-1), torch.ones(int(sel.sum())), atol=1e-5)
    ref = -logp.gather(1, b["vox_tgt"][sel][:, None]).sum()
    assert torch.allclose(terms.voxel_nll, ref, rtol=1e-5)
    assert torch.isfinite(terms.voxel_nll) and terms.voxel_nll > 0
    terms.voxel_nll.backward()
    head = model.voxel_head
    assert all(p.grad is not None for p in head.parameters())  # both the layer and the cell heads learn
    flat = tiny_model(tok)
    assert model.num_parameters() < flat.num_parameters()  # 23 + 225 outputs instead of 4503
    with pytest.raises(CalofmError, match="factorized"):
        model.add_voxel_block(10)
    flat.add_voxel_block(10)
    assert flat.cfg.voxel_blocks == (3, 4500, 10) and flat.voxel_logits(h[0]).shape[-1] == 4513
    with pytest.raises(CalofmError, match="cannot be appended"):
        ModelConfig.from_dict({**model.cfg.to_dict(), "voxel_blocks": [3, 4500, 10]})


def test_geometric_embedding_and_head_share_rows_columns_and_layers():
    """A voxel's geometric embedding is layer + row + column of its position in the grid (voxel order
    (layer, y, x) on the Cartesian grid, (layer, alpha, r) on the cylindrical one); the geometric head adds
    the same kind of sum to its flat rows; both refuse a new voxel block, and a model without them loads
    as before."""
    tok = make_tokenizer()
    model = tiny_model(tok, voxel_embedding="geometric", voxel_head="geometric")
    assert model.cfg.layer_grid == (15, 15) * 20
    emb, head = model.voxel_emb, model.voxel_head
    w = emb.weight
    assert w.shape == (4503, 32)
    geo = tok.geometry
    layer = 7
    xy = geo.voxel_xy_mm[geo.layer_offsets[layer]:geo.layer_offsets[layer + 1]]
    for cell in (0, 17, 224):
        a, b = divmod(cell, 15)  # row = y index, column = x index
        assert xy[cell, 1] == pytest.approx((a - 7) * geo.grid.cell_mm)
        assert xy[cell, 0] == pytest.approx((b - 7) * geo.grid.cell_mm)
        ref = emb.grid.layer[layer] + emb.grid.row[a] + emb.grid.col[b]
        assert torch.allclose(w[3 + geo.layer_offsets[layer] + cell], ref)
    flat = torch.cat(list(head.tables))
    assert torch.allclose(head.weight[:3], flat[:3])  # special tokens: their own rows only
    assert torch.allclose(head.weight[3 + 17] - flat[3 + 17], head.grid.layer[0] + head.grid.row[1] + head.grid.col[2])
    table = tiny_model(tok)
    assert table.num_parameters() - model.num_parameters() > 4000 * 32  # no row per voxel in the input
    with pytest.raises(CalofmError, match="cannot be appended"):
        model.add_voxel_block(10)
    # cylindrical: (alpha, r) per layer, layers of different sizes
    cyl = Geometry("mini", (Layer("W", 3.5, "Si", 0.5),) * 2, CylindricalGrid(((0.0, 10.0, 20.0), (0.0, 10.0)), (2, 3)))
    assert cyl.layer_grid == ((2, 2), (3, 1))
    ctok = ShowerTokenizer.create(cyl, ["W"], ["gamma"])
    ctok.max_hits = 8
    from calofm.model import ShowerTransformer

    cmodel = ShowerTransformer(get_preset("tiny", voxel_embedding="geometric").for_tokenizer(ctok))
    g = cmodel.voxel_emb.grid
    assert g.voxel_layer.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert g.voxel_row.tolist() == [0, 0, 1, 1, 0, 1, 2] and g.voxel_col.tolist() == [0, 1, 0, 1, 0, 0, 0]
    assert ModelConfig.from_dict(cmodel.cfg.to_dict()) == cmodel.cfg
    with pytest.raises(CalofmError, match="per-layer grids"):
        ModelConfig.from_dict({**cmodel.cfg.to_dict(), "layer_grid": [2, 2, 3, 2]})
    with pytest.raises(CalofmError, match="voxel_embedding"):
        get_preset("tiny", voxel_embedding="hash")


@pytest.mark.parametrize("options", OPTIONS)
def test_cached_steps_match_the_training_pass(options):
    """The decoding path (KV cache, one position per call, the visible energy so far carried in
    energy_before) gives the hidden states of the whole-sequence pass."""
    tok = make_tokenizer()
    b = make_corpus(tok, n=4).batch(np.arange(4))
    model = tiny_model(tok, **options).eval()
    B, T = b["vox_in"].shape
    args = (b["incident"], b["material"], b["particle"])
    with torch.no_grad():
        ref, _ = model.hidden(b["vox_in"], b["en_in"], *args)
        model.setup_cache(B)
        steps = [model.hidden(b["vox_in"][:, :2], b["en_in"][:, :2], *args)[0]]
        before = torch.zeros(B)
        for t in range(2, T):
            steps.append(model.hidden(b["vox_in"][:, t:t + 1], b["en_in"][:, t:t + 1], *args, start=t,
                                      energy_before=before if model.running is not None else None)[0])
            if model.running is not None:
                before = before + model.running.energy(b["en_in"][:, t])
        model.install_cache(None)
    got = torch.cat(steps, dim=1)
    valid = b["valid"]
    assert (got - ref)[valid].abs().max() < 1e-5


def test_running_inputs_are_the_visible_energy_fraction_and_the_hit_index():
    tok = make_tokenizer()
    b = make_corpus(tok, n=3).batch(np.arange(3))
    model = tiny_model(tok, running_inputs=True).eval()
    seen = []
    model.running.proj.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    model.hidden(b["vox_in"], b["en_in"], b["incident"], b["material"], b["particle"])
    feats = seen[0]  # (B, T, 3)
    off = tok.energy_block.offset
    en = b["en_in"].numpy()
    e_MeV = np.where(en >= off, tok.bins.decode(np.clip(en - off, 0, None)), 0.0)  # bins' centres; specials 0
    frac = np.cumsum(e_MeV, axis=1) / 10 ** (b["incident"].numpy()[:, None] + 4.0)
    assert np.allclose(feats[..., 0].numpy()[:, 1:], frac[:, 1:], rtol=1e-5)
    assert np.allclose(feats[..., 1].numpy(), np.log1p(feats[..., 0].numpy()))
    n = b["valid"].sum(1)  # BOS + hits: the last hit's position holds n - 1 hits so far
    for i in range(3):
        assert feats[i, int(n[i]) - 1, 2].item() == pytest.approx((int(n[i]) - 2) / tok.max_hits)
    assert feats[:, 1].abs().sum() == 0  # BOS: nothing seen yet


@pytest.mark.parametrize("static", [False, True])
def test_factorized_decode_fills_a_small_grid_without_repeating_a_voxel(static):
    """Two layers of 4 and 3 cells (cells beyond a layer's count masked): held to 7 hits, every shower
    must hit each voxel once, so full layers and hit cells are masked, eagerly and in the static step."""
    geo = Geometry("mini", (Layer("W", 3.5, "Si", 0.5),) * 2,
                   CylindricalGrid(((0.0, 10.0, 20.0), (0.0, 10.0)), (2, 3)))
    tok = ShowerTokenizer.create(geo, ["W"], ["gamma"])
    tok.max_hits = 8
    torch.manual_seed(0)
    from calofm.model import ShowerTransformer

    model = ShowerTransformer(get_preset("tiny", voxel_head="factorized").for_tokenizer(tok)).eval()
    assert model.voxel_head.n_cells == 4 and model.voxel_head.cell_off.sum() == 1
    B = 6
    res = decode(model, torch.linspace(0, 1, B), torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long),
                 8, tok.voxel_block, tok.energy_block, uniforms=decode_uniforms(1, range(B), 8, draws_per_step(model)),
                 options=DecodeOptions(graph=static), target_hits=torch.full((B,), 7))
    assert (res.n_hits == 7).all() and not res.capped.any()
    for row in res.voxel_tokens:
        assert sorted(row[:7].tolist()) == list(range(3, 10)) and row[7] == 0


def test_factorized_decode_draws_the_layer_from_the_free_cells():
    """A cell head sure of a cell the shower already hit must not make its layer draw that layer's far tail:
    the layer is drawn from the joint restricted to the free cells. Here every layer's cell head puts all
    but ~1e-8 of its mass on cell 0 and the two layers are equally likely: after the first hit, the second
    must be cell 0 of the other layer (a row misses only if all LAYER_TRIES tries draw the used layer,
    1/16; drawing the layer first and then masking the hit cell misses in half the rows)."""
    geo = Geometry("mini", (Layer("W", 3.5, "Si", 0.5),) * 2,
                   CylindricalGrid(((0.0, 10.0, 20.0), (0.0, 10.0)), (2, 3)))
    tok = ShowerTokenizer.create(geo, ["W"], ["gamma"])
    tok.max_hits = 8
    from calofm.model import ShowerTransformer

    model = ShowerTransformer(get_preset("tiny", voxel_head="factorized").for_tokenizer(tok)).eval()
    head = model.voxel_head
    with torch.no_grad():
        head.layer_head.weight.zero_()  # PAD, BOS, EOS, layer 0, layer 1 equally likely (EOS held off)
        head.cell_in.ln_out.weight.zero_()
        head.cell_in.ln_out.bias.copy_(torch.eye(model.cfg.d_model)[0])
        head.cell_head.weight.zero_()
        head.cell_head.weight[0, 0] = 20.0  # cell 0: logit 20, the others 0
    B = 400
    res = decode(model, torch.zeros(B), torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long), 8,
                 tok.voxel_block, tok.energy_block, uniforms=decode_uniforms(2, range(B), 8, draws_per_step(model)),
                 target_hits=torch.full((B,), 2))
    first, second = res.voxel_tokens[:, 0], res.voxel_tokens[:, 1]
    assert set(first.tolist()) == {3, 7}  # cell 0 of layer 0 or of layer 1
    both = ((first == 3) & (second == 7)) | ((first == 7) & (second == 3))
    assert both.float().mean() > 0.85


@pytest.mark.parametrize("options", [{"voxel_head": "factorized", "running_inputs": True},
                                     {"voxel_head": "geometric", "voxel_embedding": "geometric"}])
def test_trained_model_with_options_saves_loads_and_generates(tmp_path, options):
    from calofm.generation import load
    from calofm.training import TrainConfig, train
    from calofm.training.synthetic import write_synthetic

    data = write_synthetic(str(tmp_path / "W.h5"), 16, material="W", seed=0, mean_hits=15)
    cfg = TrainConfig(data=(data,), out=str(tmp_path / "run"), preset="tiny", steps=4, batch_size=8, lr=1e-2,
                      warmup=1, eval_every=4, ckpt_every=4, log_every=4, max_val=2, device="cpu",
                      model=options)
    train(cfg, threads=1, progress=False, log=lambda *a, **k: None)
    sm = load(str(tmp_path / "run"))
    assert sm.model.cfg.voxel_head == options["voxel_head"]
    assert (sm.model.running is not None) == options.get("running_inputs", False)
    assert sm.model.cfg.voxel_embedding == options.get("voxel_embedding", "table")
    inc = np.array([2e4, 4e4, 6e4, 8e4], dtype=np.float32)
    _, showers = sm.generate(4, material="W", incident_MeV=inc, seed=3)
    assert showers.shape == (4, 4500) and np.isfinite(showers).all() and (showers >= 0).all()
    assert (showers > 0).sum() > 0
    _, again = sm.generate(4, material="W", incident_MeV=inc, seed=3)
    assert np.array_equal(showers, again)
