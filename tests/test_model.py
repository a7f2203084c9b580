"""Model: KV cache equivalence, material routing, growth, presets, overfitting."""

import numpy as np
import pytest
import torch

from calofm.detector import get_geometry
from calofm.errors import CalofmError
from calofm.model import ModelConfig, ShowerTransformer, get_preset
from calofm.tokenizer import Hits, ShowerTokenizer
from calofm.training.data import Corpus
from calofm.training.synthetic import synthetic_showers


def make_tokenizer(max_hits=40):
    tok = ShowerTokenizer.create(get_geometry("cpu"), ["W", "Ta", "Cu"], ["gamma"])
    tok.max_hits = max_hits
    return tok


def make_corpus(tok, n=8, seed=0, mean_hits=20):
    incident, dense = synthetic_showers(n, "cpu", seed=seed, mean_hits=mean_hits)
    tokens = tok.encode(Hits.from_dense(dense))
    material = np.arange(n) % len(tok.materials)
    return Corpus(incident, material.astype(np.int64), np.zeros(n, dtype=np.int64), tokens)


def tiny_model(tok, seed=0, **overrides):
    torch.manual_seed(seed)
    return ShowerTransformer(get_preset("tiny", **overrides).for_tokenizer(tok))


@pytest.mark.parametrize("combine", ["sum", "cross"])
def test_kv_cached_logits_match_uncached(combine):
    tok = make_tokenizer()
    corpus = make_corpus(tok, n=6)
    model = tiny_model(tok, stream_combine=combine).eval()
    b = corpus.batch(np.arange(6))
    B, T = b["vox_in"].shape
    with torch.no_grad():
        h, _ = model.hidden(b["vox_in"], b["en_in"], b["incident"], b["material"], b["particle"])
        next_v = b["vox_tgt"].clamp(min=0)
        ref_v, ref_e = model.voxel_logits(h), model.energy_logits(h, next_v)
        model.setup_cache(B)
        # prefill [COND, BOS] plus two hits, then one token per step
        hc, _ = model.hidden(b["vox_in"][:, :4], b["en_in"][:, :4], b["incident"], b["material"], b["particle"])
        steps = [hc]
        for t in range(4, T):
            ht, _ = model.hidden(b["vox_in"][:, t:t + 1], b["en_in"][:, t:t + 1], b["incident"], b["material"],
                                 b["particle"], start=t)
            steps.append(ht)
        model.install_cache(None)
    hc = torch.cat(steps, dim=1)
    valid = b["valid"]  # padding positions differ (skipped by the MoE) and are never used
    dv = (model.voxel_logits(hc) - ref_v)[valid].abs().max().item()
    de = (model.energy_logits(hc, next_v) - ref_e)[valid].abs().max().item()
    print(f"\nKV-cached vs uncached ({combine}): max |diff| voxel logits {dv:.2e}, energy logits {de:.2e}")
    assert dv < 1e-5 and de < 1e-5


def test_routing_never_leaves_the_material_group():
    tok = make_tokenizer()
    corpus = make_corpus(tok, n=9)
    model = tiny_model(tok)
    seen = {}  # (layer, group) -> number of tokens its experts received
    hooks = []
    for li, block in enumerate(model.blocks):
        for g, group in enumerate(block.moe.groups):
            for expert in group.experts:
                hooks.append(expert.register_forward_hook(
                    lambda m, inp, out, key=(li, g): seen.__setitem__(key, seen.get(key, 0) + inp[0].shape[0])))
    only_ta = np.flatnonzero(corpus.material == 1)
    terms = model(corpus.batch(only_ta))
    (terms.voxel_nll + terms.energy_nll + terms.lb + terms.z).backward()
    assert set(g for _, g in seen) == {1}  # only Ta's experts ran
    for block in model.blocks:
        for g, group in enumerate(block.moe.groups):
            grads = [p.grad for p in group.parameters()]
            assert all(x is None for x in grads) if g != 1 else all(x is not None for x in grads)
    # a mixed batch: each group receives exactly its material's tokens (top-1: one expert per token)
    seen.clear()
    b = corpus.batch(np.arange(9))
    model(b)
    per_material = [int(b["valid"][b["material"] == m].sum()) for m in range(3)]
    for li in range(len(model.blocks)):
        assert [seen.get((li, g), 0) for g in range(3)] == per_material
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("top_k", [1, 2])
def test_decode_routing_plan_matches_forward(top_k):
    """MaterialMoE.decode (a per-material plan, every expert of the group run and gated) gives forward's
    output on the rows it computes and 0 on the rows it leaves out; rows of a new material (an added
    group) go to its experts only."""
    from calofm.model.moe import routing_plan

    tok = make_tokenizer()
    model = tiny_model(tok, top_k=top_k).eval()
    new_id = model.add_material()
    torch.manual_seed(1)
    B, d = 11, model.cfg.d_model
    material = torch.tensor([0, 2, 2, 1, new_id, 0, 1, 2, new_id, 0, 2])
    live = torch.tensor([True, True, False, True, True, True, False, True, True, True, True])
    x = torch.randn(B, 1, d)
    for block in model.blocks:
        for group in block.moe.groups:
            torch.nn.init.normal_(group.router.weight, std=1.0)  # routers that pick both experts
    moe = model.blocks[0].moe
    with torch.no_grad():
        ref, _ = moe(x[:, 0], material)
        for plan_live in (None, live):
            y = moe.decode(x, routing_plan(material, plan_live))[:, 0]
            rows = torch.ones(B, dtype=torch.bool) if plan_live is None else plan_live
            assert torch.allclose(y[rows], ref[rows], atol=1e-6, rtol=1e-5)
            assert torch.equal(y[~rows], torch.zeros_like(y[~rows]))
        # a material's rows change only through its own group: zeroing another group changes nothing
        plan = routing_plan(material)
        before = moe.decode(x, plan)
        torch.nn.init.zeros_(moe.groups[1].experts[0].fc2.weight)
        after = moe.decode(x, plan)
    changed = (before != after).any(-1).any(-1)
    assert changed.any() and torch.equal(changed, (material == 1) & changed)
    single = routing_plan(torch.full((4,), 2))
    assert single.rows is None and single.groups == [(2, None)]


def test_decode_holds_vocabulary_matrices_in_the_compute_dtype():
    tok = make_tokenizer()
    model = tiny_model(tok).eval()
    h = torch.randn(3, model.cfg.d_model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model.voxel_logits(h)
        model.setup_cache(3, 8, dtype=torch.bfloat16)
        try:
            assert model.voxel_head.held.dtype == torch.bfloat16  # heads: no cast at every step
            assert model.voxel_emb.held.dtype == torch.float32  # embeddings: the fp32 residual stream
            assert torch.equal(model.voxel_emb.held, torch.cat(list(model.voxel_emb.tables)))
            held = model.voxel_logits(h)
        finally:
            model.install_cache(None)
    assert torch.equal(held, ref)  # autocast rounds the fp32 tables to bf16 the same way
    assert all(t.held is None for t in model.block_tables())
    assert not any("held" in k for k in model.state_dict())


def test_add_material_keeps_old_parameters_bit_identical():
    tok = make_tokenizer()
    model = tiny_model(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    objects = {k: p for k, p in model.named_parameters()}
    new_id = model.add_material()
    assert new_id == 3 and model.cfg.moe_groups == (2, 2, 2, 2)
    after = dict(model.named_parameters())
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v)
    for k, p in objects.items():
        assert after[k] is p  # same Parameter objects: an optimizer over only the new ones leaves them alone
    new = set(after) - set(objects)
    assert new and all(".groups.3." in k or k.startswith("material_emb.tables.1") for k in new)
    corpus = make_corpus(tok, n=2)
    corpus.material[:] = new_id
    terms = model(corpus.batch(np.arange(2)))
    assert torch.isfinite(terms.voxel_nll)


def test_moe_aux_losses_and_utilization():
    tok = make_tokenizer()
    model = tiny_model(tok)
    for block in model.blocks:
        for group in block.moe.groups:
            torch.nn.init.zeros_(group.router.weight)  # uniform router: balanced probabilities
    corpus = make_corpus(tok, n=6)
    terms = model(corpus.batch(np.arange(6)))
    # all tokens take expert 0 (tie): f = (1, 0), P = (1/2, 1/2) -> N * sum f P = 1; z = log(2)^2
    assert terms.lb.item() == pytest.approx(1.0, abs=1e-6)
    assert terms.z.item() == pytest.approx(np.log(2) ** 2, rel=1e-5)
    assert terms.expert_counts.shape == (2, 6) and int(terms.expert_counts[0].sum()) == int(corpus.batch(
        np.arange(6))["valid"].sum())


def test_presets():
    tok = make_tokenizer(max_hits=352)
    sizes = {}
    for name in ("tiny", "small", "base"):
        cfg = get_preset(name).for_tokenizer(tok)
        sizes[name] = ShowerTransformer(cfg).num_parameters()
    assert sizes["tiny"] < sizes["small"] < sizes["base"]
    assert 2e6 < sizes["small"] < 8e6
    assert get_preset("base").d_model == 256
    cfg = get_preset("small").for_tokenizer(tok)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(CalofmError):
        get_preset("huge")
    with pytest.raises(CalofmError):
        get_preset("tiny", d_model=30)  # not divisible by the heads


def test_tiny_model_overfits_a_handful_of_showers():
    tok = make_tokenizer()
    corpus = make_corpus(tok, n=4, mean_hits=15)
    model = tiny_model(tok, seed=1, dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    b = corpus.batch(np.arange(4))
    losses = []
    for _ in range(150):
        t = model(b)
        loss = (t.voxel_nll + t.energy_nll) / t.n_targets
        (loss + 0.01 * t.lb + 1e-3 * t.z).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    print(f"\noverfit tiny: loss {losses[0]:.3f} -> {losses[-1]:.3f} nats/token")
    assert losses[-1] < 0.2 * losses[0]
