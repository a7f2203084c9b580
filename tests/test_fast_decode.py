"""Fast decoding: the ways to run the decode step (eager with its sliced cache and compaction, or the
static step of a CUDA graph, with every tuning constant) never change a shower for a given seed; the
sampler draws from the right distribution."""

import importlib

import numpy as np
import pytest
import torch

import calofm
from calofm.errors import CalofmError
from calofm.generation.decode import DRAWS_PER_STEP, DecodeOptions, Decoder, decode, draws_per_step
from calofm.generation.streams import decode_uniforms
from calofm.generation.sampler import SamplingConfig, sample
from calofm.tokenizer import incident_feature

decode_module = importlib.import_module("calofm.generation.decode")  # the package exports a function of that name

@pytest.fixture(scope="module")
def small():
    return calofm.load("calofm-small", adapters=["Pb", "e-"])


def draws(seed: int, n: int, max_hits: int, model=None) -> torch.Tensor:
    """The uniform table of showers 0..n-1 of a run of this seed (what generate() passes the decoder)."""
    return decode_uniforms(seed, range(n), max_hits, DRAWS_PER_STEP if model is None else draws_per_step(model))


def assert_every_way_gives(ref, run, monkeypatch) -> None:
    """run(options) gives ref's tokens, caps and hit counts for every way of running the step (WAYS)."""
    for opt, values in WAYS:
        with monkeypatch.context() as m:
            constants(m, **values)
            res = run(opt)
        assert torch.equal(res.voxel_tokens, ref.voxel_tokens), (opt, values)
        assert torch.equal(res.energy_tokens, ref.energy_tokens), (opt, values)
        assert torch.equal(res.capped, ref.capped) and torch.equal(res.n_hits, ref.n_hits), (opt, values)


def constants(monkeypatch, **values):
    """Set the decoder's tuning constants (COMPACT_FRACTION, GRAPH_MIN_ROWS, ...) for one test."""
    for name, value in values.items():
        assert hasattr(decode_module, name)
        monkeypatch.setattr(decode_module, name, value)


PLAIN = DecodeOptions(compact=False, graph=False)  # the reference: eager, every row to the end
# (options, tuning constants): eager with compaction at three fractions; the static step (a CUDA graph
# on GPU, eager here, over an unsliced cache) with buckets down to 4 rows, without compaction and with
# the whole cache read, and with a host check every step and 16-slot windows
WAYS = [(DecodeOptions(), {}), (DecodeOptions(), dict(COMPACT_FRACTION=1.0)), (DecodeOptions(), dict(COMPACT_FRACTION=0.05)),
        (DecodeOptions(graph=True), dict(GRAPH_MIN_ROWS=4)),
        (DecodeOptions(graph=True, compact=False), dict(GRAPH_WINDOW=0)),
        (DecodeOptions(graph=True), dict(CHECK_EVERY=1, GRAPH_MIN_ROWS=4, GRAPH_WINDOW=16))]


MIN_P = (SamplingConfig(min_p=3e-3), SamplingConfig(min_p=1e-2))  # (voxel, energy)


@pytest.mark.parametrize("mats,min_p", [(["W", "Cu", "Pb", "Ta"], None),
                                        # one material: the MoE plan keeps finished rows
                                        pytest.param(["Pb"], None, marks=pytest.mark.slow),
                                        pytest.param(["W", "Pb"], MIN_P, marks=pytest.mark.slow)])
def test_ways_to_run_the_step_give_identical_tokens(small, monkeypatch, mats, min_p):
    torch.set_num_threads(1)
    net, tok = small.model, small.tokenizer
    B = 12
    inc = torch.from_numpy(incident_feature(np.geomspace(1e4, 1e5, B).astype(np.float32)))
    mat = torch.tensor([tok.material_id(mats[i % len(mats)]) for i in range(B)])
    par = torch.tensor([tok.particle_id("e-" if i % 3 == 0 else "gamma") for i in range(B)])  # LoRA on some rows

    voxel_sampling, energy_sampling = min_p or (SamplingConfig(), None)

    def run(opt):
        return decode(net, inc, mat, par, tok.max_hits, tok.voxel_block, tok.energy_block, voxel_sampling,
                      uniforms=draws(7, B, tok.max_hits), options=opt, energy_sampling=energy_sampling)

    ref = run(PLAIN)
    assert len(set(ref.n_hits.tolist())) > 1  # showers finish at different steps: compaction happens
    assert_every_way_gives(ref, run, monkeypatch)
    # a length cap with compaction: capped showers are reported at their original rows
    constants(monkeypatch, GRAPH_MIN_ROWS=4, CHECK_EVERY=3)
    capped = [decode(net, inc, mat, par, 40, tok.voxel_block, tok.energy_block,
                     uniforms=draws(7, B, 40), options=o)
              for o in (PLAIN, DecodeOptions(), DecodeOptions(graph=True))]
    assert capped[0].capped.any()
    for other in capped[1:]:
        assert torch.equal(capped[0].voxel_tokens, other.voxel_tokens)
        assert torch.equal(capped[0].capped, other.capped)


@pytest.mark.parametrize("options", [dict(voxel_head="factorized"), dict(running_inputs=True),
                                     dict(voxel_head="factorized", running_inputs=True)])
def test_ways_to_run_the_step_give_identical_tokens_with_model_options(monkeypatch, options):
    """The same for a tiny untrained model with the factorized voxel head (a second uniform per step, the
    layer and cell masks) and/or the running inputs (a running energy per row, carried through eager
    compaction and the static buckets); showers held to spread hit counts so that rows finish apart."""
    from test_model import make_tokenizer, tiny_model

    torch.set_num_threads(1)
    tok = make_tokenizer(max_hits=40)
    net = tiny_model(tok, **options).eval()
    B = 12
    inc = torch.from_numpy(incident_feature(np.geomspace(1e4, 1e5, B).astype(np.float32)))
    mat = torch.arange(B) % 3
    par = torch.zeros(B, dtype=torch.long)
    target = torch.tensor([1, 3, 5, 9, 12, 17, 20, 26, 31, 38, 40, 45])  # the last two reach the cap

    def run(opt):
        return decode(net, inc, mat, par, 40, tok.voxel_block, tok.energy_block, SamplingConfig(),
                      uniforms=draws(5, B, 40, net), options=opt, target_hits=target)

    ref = run(PLAIN)
    assert ref.n_hits.tolist() == target.clamp(max=40).tolist() and ref.capped[-2:].all()
    assert_every_way_gives(ref, run, monkeypatch)


def test_graph_decoder_compacts_into_power_of_two_buckets(small, monkeypatch):
    """The static step moves the running showers into ever smaller buckets (powers of two, not below
    GRAPH_MIN_ROWS), copying their cache rows; the showers stay those of the plain decoder."""
    net, tok = small.model, small.tokenizer
    sizes = []
    compact = decode_module._Run._compact

    def spy(self, n_live):
        before = len(self.rows.done)
        compact(self, n_live)
        if len(self.rows.done) != before:
            sizes.append((n_live, len(self.rows.done), self.model.blocks[0].attn.kv_cache.k.shape[0]))

    monkeypatch.setattr(decode_module._Run, "_compact", spy)
    constants(monkeypatch, GRAPH_MIN_ROWS=4, CHECK_EVERY=4)
    B = 40
    inc = torch.from_numpy(incident_feature(np.geomspace(1e3, 1e5, B).astype(np.float32)))  # 1-100 GeV: lengths spread
    mat, par = torch.full((B,), tok.material_id("Ta")), torch.full((B,), tok.particle_id("gamma"))

    def run(opt):
        return decode(net, inc, mat, par, tok.max_hits, tok.voxel_block, tok.energy_block,
                      uniforms=draws(11, B, tok.max_hits), options=opt)

    res = run(DecodeOptions(graph=True))
    assert len(sizes) >= 2, sizes
    for n_live, rows, cache_rows in sizes:
        assert cache_rows == rows and rows >= max(4, n_live) and rows & (rows - 1) == 0 and rows < 2 * max(n_live, 4)
    assert [b for _, b, _ in sizes] == sorted({b for _, b, _ in sizes}, reverse=True)  # shrinking only
    ref = run(PLAIN)
    assert torch.equal(res.voxel_tokens, ref.voxel_tokens) and torch.equal(res.energy_tokens, ref.energy_tokens)


def test_static_run_is_kept_for_the_next_batch_until_close(small, monkeypatch):
    """A one-material batch leaves its static run (buffers, the caches of every bucket; on a GPU the
    graphs) in the decoder, not on the model. The next batch of that size or smaller (a last, partial
    batch: its spare rows start finished) refills it and still gets the plain decoder's showers;
    changed weights make a new run, a mixed-material batch one that is not kept; close() drops it."""
    net, tok = small.model, small.tokenizer
    constants(monkeypatch, GRAPH_MIN_ROWS=4, CHECK_EVERY=4)
    decoder = Decoder(net)
    B = 16
    par = torch.full((B,), tok.particle_id("gamma"))
    opt = DecodeOptions(graph=True)

    def run(energies, seed, options, material=torch.full((B,), tok.material_id("W")), n=B):
        inc = torch.from_numpy(incident_feature(np.geomspace(*energies, n).astype(np.float32)))
        return decoder.decode(inc, material[:n], par[:n], tok.max_hits, tok.voxel_block, tok.energy_block,
                              uniforms=draws(seed, n, tok.max_hits), options=options)

    batches = [((1e3, 1e5), 1), ((2e4, 5e4), 2)]
    first = run(*batches[0], opt)
    kept = decoder.kept
    assert kept is not None and len(kept.buckets) >= 2  # compacted at least once: its bucket is kept
    assert all(a.kv_cache is None for a in net.attentions()) and all(t.held is None for t in net.block_tables())
    buffers = {size: rows.h.data_ptr() for size, (rows, _) in kept.buckets.items()}
    second = run(*batches[1], opt)
    assert decoder.kept is kept
    assert all(kept.buckets[size][0].h.data_ptr() == ptr for size, ptr in buffers.items())
    assert not torch.equal(first.voxel_tokens, second.voxel_tokens)
    partial = run((1e4, 1e5), 3, opt, n=11)
    assert decoder.kept is kept and partial.voxel_tokens.shape[0] == 11
    for res, batch, n in zip((first, second, partial), batches + [((1e4, 1e5), 3)], (B, B, 11)):
        # the first result was not overwritten by the later batches
        ref = run(*batch, PLAIN, n=n)
        assert torch.equal(res.voxel_tokens, ref.voxel_tokens) and torch.equal(res.energy_tokens, ref.energy_tokens)
        assert torch.equal(res.n_hits, ref.n_hits) and torch.equal(res.capped, ref.capped)
    with torch.no_grad():
        net.ln_f.weight.mul_(1.0)  # an in-place update: the held matrices and graphs could be stale
    run(*batches[1], opt)
    assert decoder.kept is not kept and decoder.kept is not None
    kept = decoder.kept
    mixed = torch.tensor([tok.material_id("W" if i % 2 else "Pb") for i in range(B)])
    run(*batches[1], opt, material=mixed)
    assert decoder.kept is kept  # the mixed batch's run (its MoE plan is its own) is not kept
    decoder.close()
    assert decoder.kept is None


@pytest.mark.slow
def test_compiled_graph_step(small, monkeypatch):
    """With compile, the whole static step goes through torch.compile, once for all buckets and cache
    windows. Fused kernels may round differently in the last bit, after which a shower can take another
    path: the showers are compared row by row, most must be the eager step's."""
    import torch._dynamo

    net, tok = small.model, small.tokenizer
    constants(monkeypatch, GRAPH_MIN_ROWS=4, CHECK_EVERY=4, GRAPH_WINDOW=32)
    B = 16
    inc = torch.from_numpy(incident_feature(np.geomspace(5e2, 2e4, B).astype(np.float32)))  # most finish, two reach 176
    mat, par = torch.full((B,), tok.material_id("Ta")), torch.full((B,), tok.particle_id("gamma"))
    decoder = Decoder(net)

    def run(compile):
        return decoder.decode(inc, mat, par, 176, tok.voxel_block, tok.energy_block,
                              uniforms=draws(5, B, 176),
                              options=DecodeOptions(graph=True, compile=compile))

    eager = run(False)
    torch._dynamo.reset()
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    compiled = run(True)
    assert sorted(decoder.kept.buckets) == [4, 8, 16]  # compacted twice
    assert torch._dynamo.utils.counters["frames"]["ok"] - frames == 1  # for six windows (32 ... 160, 178) and three buckets
    same = (compiled.voxel_tokens == eager.voxel_tokens).all(dim=1) & (compiled.energy_tokens == eager.energy_tokens).all(dim=1)
    assert int(same.sum()) >= B - 2, same
    assert compiled.capped.sum() > 0 and torch.equal(compiled.n_hits > 0, eager.n_hits > 0)  # some reach the last window
    decoder.close()


def test_graph_step_reads_nothing_back_from_the_device(small, monkeypatch):
    """A CUDA graph's capture fails at any host read; on CPU the step runs eagerly, so reads are caught
    here by making every read inside the step raise (adapters on some rows: LoRA gates; two materials)."""
    inside = []
    step = decode_module._Run.step

    def guarded_step(self, window):
        inside.append(window)
        try:
            return step(self, window)
        finally:
            inside.remove(window)

    def forbid(name):
        original = getattr(torch.Tensor, name)

        def guarded(self, *args, **kwargs):
            assert not inside, f"host read ({name}) inside the graph step"
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, guarded)

    steps = []
    monkeypatch.setattr(decode_module._Run, "step", lambda self, window: (steps.append(window), guarded_step(self, window)))
    for name in ("__bool__", "item", "tolist", "nonzero", "__int__", "__float__", "unique"):
        forbid(name)
    constants(monkeypatch, GRAPH_MIN_ROWS=4, CHECK_EVERY=2)
    net, tok = small.model, small.tokenizer
    B = 8
    inc = torch.from_numpy(incident_feature(np.geomspace(1e4, 1e5, B).astype(np.float32)))
    mat = torch.tensor([tok.material_id("W" if i % 2 else "Pb") for i in range(B)])
    par = torch.tensor([tok.particle_id("e-" if i % 3 == 0 else "gamma") for i in range(B)])
    res = decode(net, inc, mat, par, 24, tok.voxel_block, tok.energy_block, uniforms=draws(1, B, 24),
                 options=DecodeOptions(graph=True))
    assert int((res.n_hits > 0).sum()) == B and len(steps) >= 12


def test_both_ways_hold_showers_to_their_target_hits(small, monkeypatch):
    """Two-stage totals in both ways of running the step: exactly target_hits hits (capped at max_hits),
    the same tokens, and nothing left on the model."""
    net, tok = small.model, small.tokenizer
    constants(monkeypatch, GRAPH_MIN_ROWS=4, CHECK_EVERY=3)
    B = 10
    inc = torch.from_numpy(incident_feature(np.geomspace(1e4, 1e5, B).astype(np.float32)))
    mat, par = torch.full((B,), tok.material_id("W")), torch.full((B,), tok.particle_id("gamma"))
    target = torch.tensor([5, 90, 17, 30, 1, 60, 45, 8, 70, 300])
    res = [decode(net, inc, mat, par, 80, tok.voxel_block, tok.energy_block, uniforms=draws(4, B, 80),
                  options=o, target_hits=target) for o in (PLAIN, DecodeOptions(), DecodeOptions(graph=True))]
    assert torch.equal(res[0].n_hits, target.clamp(max=80))
    assert torch.equal(res[0].capped, target > 80)
    for other in res[1:]:
        assert torch.equal(other.voxel_tokens, res[0].voxel_tokens) and torch.equal(other.energy_tokens, res[0].energy_tokens)
        assert torch.equal(other.capped, res[0].capped)
    assert net.blocks[0].attn.kv_cache is None  # nothing left set up


def test_generate_graph_flag(small, tmp_path, monkeypatch):
    """--graph decodes on CPU too (eagerly), with --totals as well, and gives the eager showers, in one
    batch or several (every shower reads its own uniforms)."""
    from calofm.cli.main import main

    for extra in ([], ["--totals"]):
        out = tmp_path / f"g{len(extra)}.h5"
        assert main(["generate", "--model", "calofm-small", "--n", "3", "--graph", "--no-progress", "-o", str(out)]
                    + extra) == 0
        assert out.exists()
    constants(monkeypatch, GRAPH_MIN_ROWS=4)
    plain = small.generate(5, material="W", seed=4, batch_size=5, options=PLAIN)[1]
    graph = small.generate(5, material="W", seed=4, batch_size=5, options=DecodeOptions(graph=True))[1]
    assert np.array_equal(plain, graph)
    constants(monkeypatch, GRAPH_MIN_ROWS=4)
    graph = small.generate(5, material="W", seed=4, batch_size=4, options=DecodeOptions(graph=True))[1]
    assert np.array_equal(plain, graph)  # the kept run's second, partial batch
    small.close()


def test_compaction_keeps_at_least_the_minimum_rows(small, monkeypatch):
    """Compaction stops at COMPACT_MIN_ROWS rows (the sgemm kernels round 1-3 rows differently)."""
    from calofm.generation.decode import COMPACT_MIN_ROWS

    net, tok = small.model, small.tokenizer
    kept = []
    select = type(net).select_cache_rows
    monkeypatch.setattr(type(net), "select_cache_rows", lambda self, rows: (kept.append(len(rows)), select(self, rows)))
    constants(monkeypatch, COMPACT_FRACTION=0.05)
    B = 10
    inc = torch.from_numpy(incident_feature(np.geomspace(1e4, 1e5, B).astype(np.float32)))
    decode(net, inc, torch.full((B,), tok.material_id("W")), torch.full((B,), tok.particle_id("gamma")),
           tok.max_hits, tok.voxel_block, tok.energy_block, uniforms=draws(3, B, tok.max_hits))
    assert len(kept) >= 3 and min(kept) >= COMPACT_MIN_ROWS  # compacted often, never below the floor


@pytest.mark.parametrize("graph", [False, True])
def test_small_batches_run_at_least_the_minimum_rows(small, monkeypatch, graph):
    """A batch of 1-3 showers runs padded to COMPACT_MIN_ROWS rows (finished fillers): its tokens are
    those of the same showers decoded among more, whatever the batch size."""
    from calofm.generation.decode import COMPACT_MIN_ROWS

    torch.set_num_threads(1)
    net, tok = small.model, small.tokenizer
    seen = []
    heads = net.voxel_logits
    monkeypatch.setattr(net, "voxel_logits", lambda h: (seen.append(len(h)), heads(h))[1])
    B = 6
    inc = torch.from_numpy(incident_feature(np.geomspace(1e4, 5e4, B).astype(np.float32)))
    mat, par = torch.full((B,), tok.material_id("W")), torch.full((B,), tok.particle_id("gamma"))
    table = draws(8, B, 60)
    opt = DecodeOptions(graph=graph)
    ref = decode(net, inc, mat, par, 60, tok.voxel_block, tok.energy_block, uniforms=table, options=opt)
    for rows in ([0], [4, 1], [5, 2, 3]):
        seen.clear()
        res = decode(net, inc[rows], mat[rows], par[rows], 60, tok.voxel_block, tok.energy_block, uniforms=table[rows],
                     options=opt)
        assert min(seen) >= COMPACT_MIN_ROWS and res.voxel_tokens.shape[0] == len(rows)
        assert torch.equal(res.voxel_tokens, ref.voxel_tokens[rows]) and torch.equal(res.energy_tokens, ref.energy_tokens[rows])
        assert torch.equal(res.n_hits, ref.n_hits[rows]) and torch.equal(res.capped, ref.capped[rows])


def test_generate_options_plumbing(small):
    """generate's defaults (eager on CPU, compaction) over several batches give the plain decoder's showers."""
    torch.set_num_threads(1)
    fast = small.generate(6, material="Pb", particle="e-", seed=2, batch_size=4)[1]
    plain = small.generate(6, material="Pb", particle="e-", seed=2, batch_size=4, options=PLAIN)
    assert np.array_equal(fast, plain[1])
    other_seed = small.generate(6, material="Pb", particle="e-", seed=3, batch_size=4)[1]
    assert not np.array_equal(fast, other_seed)
    with pytest.raises(CalofmError, match="precision"):
        small.generate(2, options=DecodeOptions("fp16"))


def test_sampler_distribution_and_given_uniforms():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, float("-inf"), 0.5, -1.0, float("-inf")]]).repeat(20000, 1)
    draws = sample(logits, SamplingConfig(), g)
    assert not torch.any((draws == 2) | (draws == 5))  # masked tokens are never drawn
    freq = torch.bincount(draws, minlength=6).double() / len(draws)
    assert torch.allclose(freq, logits[0].softmax(-1).double(), atol=0.015)
    # uniforms given (as the decoder gives each row its shower's) are read as the generator's, row by row
    full = sample(logits[:10], SamplingConfig(), torch.Generator().manual_seed(3))
    u = torch.empty(11, 1).uniform_(0, 1, generator=torch.Generator().manual_seed(3))  # torch.rand's stream
    assert torch.equal(sample(logits[:10], SamplingConfig(), u=u[:10]), full)
    rows = torch.tensor([1, 4, 9])
    assert torch.equal(sample(logits[rows], SamplingConfig(), u=u[rows]), full[rows])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_min_p_drops_the_tokens_below_its_fraction_of_the_mode(dtype):
    """Tokens with p < min_p * p_max are never drawn, the others keep their relative frequencies. The
    cdf sampler must cut in both of its levels: a chunk holding only cut tokens (with more mass than
    all kept ones together) must get no weight, and inside a chosen chunk a cut token placed before a
    kept one must not be drawn."""
    from calofm.generation.sampler import CHUNK, chunk_sums

    V = 4 * CHUNK + 7
    ratio = {0: 1.0, CHUNK + 2: 0.25, CHUNK + 9: 0.5, 3 * CHUNK + 1: 0.005, 3 * CHUNK + 4: 0.35, V - 1: 0.4}
    ratio.update({2 * CHUNK + i: 0.25 for i in range(1, 11)})  # chunk 2: cut tokens only, mass 2.5
    row = torch.full((V,), float("-inf"))
    for i, r in ratio.items():
        row[i] = float(np.log(r))
    row = row.to(dtype)  # bf16: the logits of a bf16 decode (rounding keeps every ratio on its side of 0.3)
    cfg = SamplingConfig(min_p=0.3)
    kept = [i for i, r in ratio.items() if r >= 0.3]
    draws = sample(row.repeat(40000, 1), cfg, torch.Generator().manual_seed(2))
    assert set(draws.unique().tolist()) <= set(kept)
    want = torch.tensor([ratio[i] for i in kept], dtype=torch.float64)
    freq = torch.bincount(draws, minlength=V).double()[kept] / len(draws)
    assert torch.allclose(freq, want / want.sum(), atol=0.01)
    m, sums = chunk_sums(row[None], cfg.log_min_p)  # exactly the kept weights, chunk by chunk
    w = (row.float() - row.float().max()).exp()
    expect = torch.zeros(5)
    for i in kept:
        expect[i // CHUNK] += w[i]
    assert float(m) == float(row.float().max()) and torch.allclose(sums[0], expect, rtol=1e-6, atol=0)


@pytest.mark.slow
def test_compiled_step_matches_eager_numerically_and_decodes(small):
    """torch.compile of the heads, the sampler's weights and the cached attention: same values up to
    rounding (fused kernels may differ in the last bit, so tokens are compared by distribution, not
    identity)."""
    from calofm.generation.sampler import chunk_sums
    from calofm.model.attention import attend_over_cache

    torch.set_num_threads(1)
    net, tok = small.model, small.tokenizer
    decoder = Decoder(net)
    voxel_logits, energy_logits, cdf_fn = (decoder.compiled(f) for f in ("voxel_logits", "energy_logits", "chunk_sums"))
    h = torch.randn(5, net.cfg.d_model)
    v = torch.full((5,), tok.voxel_block.offset + 7)
    assert torch.allclose(voxel_logits(h), net.voxel_logits(h), atol=1e-4)
    assert torch.allclose(energy_logits(h, v), net.energy_logits(h, v), atol=1e-4)
    logits = torch.randn(5, 300).masked_fill(torch.rand(5, 300) < 0.3, float("-inf"))
    for x in (logits, logits.bfloat16()):  # bf16: the logits of a bf16 decode, read as they are
        for log_min_p in (float("-inf"), np.log(0.05)):  # min-p off and on
            for got, want in zip(cdf_fn(x, log_min_p), chunk_sums(x, log_min_p)):
                assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=1e-5)
    q, k, v = torch.randn(3, 4, 1, 32), torch.randn(3, 4, 40, 32), torch.randn(3, 4, 40, 32)
    mask = torch.arange(40)[None] < 33  # (1, S): the last slots are not filled yet
    want = (q @ k.transpose(-1, -2) / 32 ** 0.5).masked_fill(~mask, float("-inf")).softmax(-1) @ v
    assert torch.allclose(attend_over_cache(q, k, v, mask), want, atol=1e-5)
    assert torch.allclose(decoder.compiled("attend")(q, k, v, mask), want, atol=1e-5)
    B = 6
    inc = torch.from_numpy(incident_feature(np.full(B, 3e4, dtype=np.float32)))
    mat = torch.full((B,), tok.material_id("W"))
    for precision in ("fp32", "bf16"):  # bf16: the compiled attention reads the bf16 cache
        res = decoder.decode(inc, mat, torch.zeros(B, dtype=torch.long), 40, tok.voxel_block, tok.energy_block,
                             uniforms=draws(3, B, 40), options=DecodeOptions(precision, compile=True))
        n = res.n_hits
        assert torch.all(n > 0)
        for i in range(B):  # valid, distinct voxels, like the eager path
            hits = res.voxel_tokens[i, :n[i]]
            assert len(set(hits.tolist())) == int(n[i]) and bool(torch.all(hits >= tok.voxel_block.offset))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_level_cdf_sampler_over_a_large_masked_vocabulary(dtype):
    """The chunked inverse-CDF search: whole chunks masked, masks at chunk edges, a near-zero
    probability next to large ones - masked tokens are never drawn and frequencies match softmax
    (bf16: the logits of a bf16 decode, read as they are)."""
    from calofm.generation.sampler import CHUNK

    g = torch.Generator().manual_seed(1)
    V = 5 * CHUNK + 11  # not a multiple of the chunk: the padding must never be drawn
    row = torch.full((V,), float("-inf"))
    allowed = torch.tensor([3, CHUNK - 1, CHUNK, 3 * CHUNK + 5, V - 1])  # chunk 2 and 4 fully masked
    row[allowed] = torch.tensor([1.0, 0.0, 2.0, -30.0, 0.5])
    draws = sample(row.repeat(40000, 1).to(dtype), SamplingConfig(), g)
    assert set(draws.unique().tolist()) <= set(allowed.tolist())
    freq = torch.bincount(draws, minlength=V).double()[allowed] / len(draws)
    assert torch.allclose(freq, row[allowed].softmax(-1).double(), atol=0.01)


def test_cdf_sampler_stays_inside_a_chunk_whose_recomputed_weights_underflow():
    """The chunk is chosen from cdf_fn's sums (compiled: its own exp), the token from an eager
    recomputation; if they disagree near underflow, the token must still be a finite one of that chunk."""
    from calofm.generation.sampler import CHUNK, chunk_sums

    V = 3 * CHUNK + 8
    row = torch.full((V,), float("-inf"))
    row[5] = 0.0
    row[2 * CHUNK + 2:2 * CHUNK + 9] = -200.0  # finite, but exp(-200) is 0 in fp32
    logits = row.repeat(50, 1)

    def disagreeing(x, log_min_p):  # claims all the weight is in chunk 2
        m, sums = chunk_sums(x, log_min_p)
        return m, torch.zeros_like(sums).index_fill_(1, torch.tensor([2]), 1.0)

    tokens = sample(logits, SamplingConfig(), torch.Generator().manual_seed(0), cdf_fn=disagreeing)
    assert bool(torch.all(torch.isfinite(row[tokens])))
    assert bool(torch.all((tokens >= 2 * CHUNK) & (tokens < 3 * CHUNK)))


def test_bf16_decode_uses_a_bf16_cache_and_gives_valid_showers(small):
    torch.set_num_threads(1)
    net, tok = small.model, small.tokenizer
    seen = []
    orig = net.setup_cache

    def spy(*a, **kw):
        seen.append(kw.get("dtype"))
        return orig(*a, **kw)

    net.setup_cache = spy
    try:
        B = 6
        inc = torch.from_numpy(incident_feature(np.full(B, 3e4, dtype=np.float32)))
        res = decode(net, inc, torch.full((B,), tok.material_id("W")), torch.zeros(B, dtype=torch.long), 60,
                     tok.voxel_block, tok.energy_block, uniforms=draws(3, B, 60),
                     options=DecodeOptions("bf16"))
    finally:
        del net.setup_cache
    assert seen == [torch.bfloat16]
    n = res.n_hits
    assert torch.all(n > 0)
    for i in range(B):
        hits = res.voxel_tokens[i, :n[i]]
        assert len(set(hits.tolist())) == int(n[i]) and bool(torch.all(hits >= tok.voxel_block.offset))
        e = res.energy_tokens[i, :n[i]]
        assert bool(torch.all((e >= tok.energy_block.offset) & (e < tok.energy_block.offset + tok.energy_block.size)))


def test_sliced_cache_widens_and_drops_rows_through_a_shared_spare():
    """Two sliced caches sharing one spare storage hold what a static cache holds, in buffers exactly
    as wide as the aligned fill, after widenings and row drops; slots not yet written read as zeros."""
    from calofm.model.kv_cache import SLICE_ALIGN, KVCache, KVStorage

    B, H, S, D = 5, 2, 40, 3
    spare = KVStorage(B * H * S * D, torch.float32, "cpu")
    sliced = [KVCache(B, H, S, D, sliced=True, spare=spare) for _ in range(2)]
    static = [KVCache(B, H, S, D) for _ in range(2)]
    rows = torch.arange(B)
    g = torch.Generator().manual_seed(0)
    for step in range(S - 1):
        T = 2 if step == 0 else 1
        kv = [(torch.randn(B, H, T, D, generator=g)[rows], torch.randn(B, H, T, D, generator=g)[rows])
              for _ in range(2)]
        for caches in (sliced, static):
            for cache, (k, v) in zip(caches, kv):
                cache.fill = step + 2  # the prefill writes slots 0-1, each later step one slot
                cache.update(k, v)
        for a, b in zip(sliced, static):
            width = -(-a.fill // SLICE_ALIGN) * SLICE_ALIGN
            assert a.k.shape == (len(rows), H, min(width, S), D) and a.k.is_contiguous()
            assert torch.equal(a.k, b.k[:, :, :a.span]) and torch.equal(a.v, b.v[:, :, :a.span])
            assert not a.k[:, :, a.fill:].any()  # empty slots are zeros, not leftovers of the spare
        if step in (10, 25):  # drop rows, as decoding does when showers finish
            keep = torch.tensor([0, 2, 3]) if step == 10 else torch.tensor([0, 2])
            rows = rows[keep]
            for cache in (*sliced, *static):
                cache.select_rows(keep)
    assert len({sliced[0].storage.k.data_ptr(), sliced[1].storage.k.data_ptr(), spare.k.data_ptr()}) == 3
