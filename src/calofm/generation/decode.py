"""Batched autoregressive decoding with the static KV cache.

All sequences of a batch advance together, one position per step; each stops at its own EOS (after
which it is fed PAD, and its outputs are ignored) and the loop ends when all have stopped or max_hits is
reached (then EOS is forced and the shower counted as capped). At each step:
    voxel  ~ p(v | past), with PAD/BOS, voxels outside the model's geometry block and voxels already
             used by this shower masked out (a voxel is hit at most once);
    energy ~ p(e | v, past), restricted to the energy-bin block.

Speed switches (DecodeOptions; see docs/speed.md for what each gains). With a given seed the showers
do not depend on sliced_attention / compact / fused_qkv (tests/test_fast_decode.py); the sampler
changes which random numbers are drawn and routing_plan the last bits of the MoE output, so they give
other (equally distributed) showers:
- sliced_attention: a KV cache only as wide as the filled prefix (rounded up to 16 slots, contiguous,
  see model.kv_cache.KVCache) instead of the masked full static cache (keep it off for static
  shapes, e.g. CUDA graphs);
- sampler: "cdf" (inverse CDF, one uniform per row) or "exp" (exponential race, one Exp(1) per
  vocabulary entry);
- compact: once a fraction `compact_fraction` of the batch has finished, drop the finished showers
  from the batch and from the cache rows, so they stop costing compute. Random numbers are drawn
  for the original batch and indexed, so every shower sees the same draws as without compaction;
- routing_plan: the MoE finds its rows once (a model.moe.RoutingPlan) instead of by a nonzero per
  group, layer and step, runs every expert of the group on those rows (gated, see model.moe) and
  computes no auxiliary loss. A one-material batch runs all its rows, finished ones (fed PAD)
  included, with one plan for the whole decode; a mixed batch runs the showers still in flight, its
  plan remade when one finishes;
- fused_qkv: one (3d, d) projection for q, k, v, built at decode time from the separate weights
  (the state dict is unchanged; projections wrapped by a LoRA adapter keep the separate path);
- graph: the step over static buffers of static_decode, captured once as a CUDA graph on a GPU and
  replayed (on CPU it runs eagerly, for tests); compaction there moves the running showers into
  power-of-two buckets. Gives the same showers as the plain decoder for a single batch;
- compile: torch.compile (inductor, dynamic shapes) of the two heads, of the sampler's chunk sums
  and, for a bf16 cache, of the attention over the KV cache (one fused pass over the cache instead
  of two batched matmuls, see model.attention.attend_over_cache); with graph, of the whole step. Off by default: it costs a
  compilation per process (about a minute on the 2-core CPU), and fused kernels round differently in
  the last bit, so the showers are equally distributed but not bit-identical to the eager path.
Precision: under bf16 autocast (`generate(precision="bf16")`) the KV cache is kept in bf16 (half the
bytes per step) and attention reads it through attend_over_cache; the sampler reads the bf16 logits
and accumulates in fp32 (an fp32 copy of the (B, V) logits cost a pass over memory per head and step).
Masking: the voxels a shower already hit are written to -inf from its hit list (B x t entries per
step, see _fill_entries) and the tokens outside the blocks by a fill of those few columns, instead of
a dense (B, V) mask (a masked_fill over 1000 x 4503 logits took 8 ms per step on the 2-core CPU, the
fill from the hit lists well under 1 ms).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from calofm.generation.sampler import SAMPLERS, SamplingConfig, sample
from calofm.model import ShowerTransformer
from calofm.model.moe import routing_plan
from calofm.tokenizer import BOS, EOS, PAD, Block


# compaction never leaves fewer rows than this: the CPU sgemm kernels round a row differently when
# given 1-3 rows than when given 4 or more (observed with this CPU's BLAS on one thread, for every
# layer shape of calofm-small; GPU BLAS picks kernels by row count too, with no such floor known), so
# a smaller compacted batch could flip a token against the uncompacted decode
COMPACT_MIN_ROWS = 4


@dataclass(frozen=True)
class DecodeOptions:
    sliced_attention: bool = True
    sampler: str = "cdf"  # "cdf" | "exp"
    compact: bool = True
    compact_fraction: float = 0.25  # compact once this fraction of the current batch has finished
    fused_qkv: bool = True
    routing_plan: bool = True
    compile: bool = False
    graph: bool = False  # static-shape step, a CUDA graph on GPU (see static_decode; always routing_plan, unsliced)
    check_every: int = 8  # graph: steps between reads of "all finished?" (host syncs)
    graph_min_rows: int = 32  # graph: compaction buckets never smaller than this
    graph_window: int = 64  # graph: attention reads the cache in windows of this many slots (0: all)

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r} ({', '.join(SAMPLERS)})")
        if not 0 < self.compact_fraction <= 1:
            raise ValueError(f"compact_fraction must be in (0, 1], got {self.compact_fraction}")
        if self.graph and self.sampler != "cdf":
            raise ValueError("graph decoding draws its uniforms outside the graph: it needs the cdf sampler")
        if self.check_every < 1 or self.graph_min_rows < 1 or self.graph_window < 0:
            raise ValueError("check_every and graph_min_rows must be >= 1, graph_window >= 0")

    def plain(self) -> DecodeOptions:
        """The same sampler and MoE routing with every other optimization off (the reference the fast
        path must match bit for bit). The routing is kept: the plan runs the experts over other row
        subsets, and the CPU matmul kernels round a row differently depending on how many rows they
        get, so it changes the last bits (tests/test_model.py compares the two MoE paths)."""
        return replace(self, sliced_attention=False, compact=False, fused_qkv=False, compile=False, graph=False)


@dataclass
class DecodeResult:
    voxel_tokens: torch.Tensor  # (B, max_hits), PAD after the shower's last hit
    energy_tokens: torch.Tensor  # (B, max_hits)
    n_hits: torch.Tensor  # (B,)
    capped: torch.Tensor  # (B,) bool: reached max_hits without choosing EOS


def _allowed(n_tokens: int, block: Block, with_eos: bool, device) -> torch.Tensor:
    """(V,) True for the tokens sampling may choose."""
    ok = torch.zeros(n_tokens, dtype=torch.bool, device=device)
    ok[block.offset:block.offset + block.size] = True
    if with_eos:
        ok[EOS] = True
    return ok


def _compiled(model: ShowerTransformer) -> tuple:
    """Compiled heads and sampler weights, kept on the model (compilation is the slow part)."""
    from calofm.generation.sampler import chunk_sums
    from calofm.model.attention import allow_recompiles

    if getattr(model, "_compiled_decode", None) is None:
        allow_recompiles()
        compile_ = lambda fn: torch.compile(fn, dynamic=True)  # noqa: E731  (the batch shrinks on compaction)
        model._compiled_decode = (compile_(model.voxel_logits), compile_(model.energy_logits),
                                  compile_(chunk_sums))
    return model._compiled_decode


def prefill(model: ShowerTransformer, incident: torch.Tensor, material: torch.Tensor, particle: torch.Tensor,
            plan) -> torch.Tensor:
    """Run [COND, BOS] through the set-up cache -> the hidden state (B, d) the first draw reads."""
    start = torch.full((incident.shape[0], 2), PAD, dtype=torch.long, device=incident.device)
    start[:, 1] = BOS
    h, _ = model.hidden(start, start, incident, material, particle, start=0, plan=plan)
    return h[:, -1]


def _fill_entries(x: torch.Tensor, columns: torch.Tensor, value: float) -> None:
    """x[i, columns[i, j]] = value for all i, j, in place: an index_fill_ over the flattened rows, which
    on CPU ran 10x faster than scatter_ with a scalar on bf16 logits (1000 x 4503: 0.34 vs 3.5 ms)."""
    rows = torch.arange(x.shape[0], device=x.device)[:, None] * x.shape[1]
    x.view(-1).index_fill_(0, (columns + rows).flatten(), value)


def _cache_dtype(device: torch.device) -> torch.dtype | None:
    """The KV cache follows the compute dtype: bf16 under bf16 autocast, else the weights' dtype."""
    if torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.bfloat16:
        return torch.bfloat16
    return None


@torch.no_grad()
def decode(model: ShowerTransformer, incident: torch.Tensor, material: torch.Tensor, particle: torch.Tensor,
           max_hits: int, voxel_block: Block, energy_block: Block, sampling: SamplingConfig = SamplingConfig(),
           generator: torch.Generator | None = None, options: DecodeOptions | None = None,
           target_hits: torch.Tensor | None = None, energy_sampling: SamplingConfig | None = None) -> DecodeResult:
    """incident (B,) log-energy feature, material (B,), particle (B,) ids -> hit tokens.

    sampling: how voxels are drawn, and energies too unless energy_sampling is given.
    target_hits (B,): hold shower i to exactly target_hits[i] hits (EOS masked before, forced there);
    values above max_hits are capped. The random stream is the same with or without it."""
    opt = options or DecodeOptions()
    B0, device = incident.shape[0], incident.device
    # token columns sampling may never choose (specials, other blocks); few for a one-block model
    voxel_off = (~_allowed(model.cfg.n_voxel_tokens, voxel_block, True, device)).nonzero().squeeze(1)
    energy_off = (~_allowed(model.cfg.n_energy_tokens, energy_block, False, device)).nonzero().squeeze(1)
    energy_sampling = energy_sampling or sampling
    if opt.graph:
        if target_hits is not None:
            raise ValueError("graph decoding does not support two-stage totals (target_hits)")
        from calofm.generation.static_decode import static_decoder

        dec = static_decoder(model, incident, material, voxel_off=voxel_off, energy_off=energy_off,
                             max_hits=max_hits, sampling=sampling, energy_sampling=energy_sampling, options=opt,
                             cache_dtype=_cache_dtype(device))
        try:
            out_v, out_e, capped = dec.run(incident, material, particle, generator)
        finally:
            model.clear_cache()
        return DecodeResult(out_v, out_e, (out_v != PAD).sum(dim=1), capped)

    B = B0  # rows in flight (fewer than B0 after compaction)
    orig: torch.Tensor | None = None  # (B,) original row of each row in flight; None = identity
    hit_voxels = torch.full((B, max_hits), PAD, dtype=torch.long, device=device)  # per row in flight
    out_v = torch.full((B0, max_hits), PAD, dtype=torch.long, device=device)
    out_e = torch.full((B0, max_hits), PAD, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    capped = torch.zeros(B0, dtype=torch.bool, device=device)
    voxel_logits, energy_logits, cdf_fn = model.voxel_logits, model.energy_logits, None
    if opt.compile:
        voxel_logits, energy_logits, cdf_fn = _compiled(model)

    def draw(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
        return sample(logits, cfg, generator, opt.sampler, orig, B0, cdf_fn)

    plan = routing_plan(material) if opt.routing_plan else None
    plan_at = (B, 0)  # (rows in flight, finished among them) when the plan was made
    try:  # setup_cache inside: clear_cache also undoes a partial set-up (held matrices, caches)
        model.setup_cache(B, max_len=max_hits + 2, dtype=_cache_dtype(device), sliced=opt.sliced_attention,
                          fused_qkv=opt.fused_qkv, compiled_attention=opt.compile)
        h = prefill(model, incident, material, particle, plan)
        for t in range(max_hits + 1):
            if t == max_hits:  # EOS forced
                capped[slice(None) if orig is None else orig] = ~done
                break
            logits = voxel_logits(h).index_fill_(1, voxel_off, float("-inf"))
            if t > 0:  # a voxel is hit at most once (PAD entries land on the PAD column, off anyway)
                _fill_entries(logits, hit_voxels[:, :t], float("-inf"))
            if target_hits is not None:
                stop = t >= (target_hits if orig is None else target_hits[orig])  # (B,)
                logits[:, EOS] = torch.where(stop, logits[:, EOS], float("-inf"))
            v = draw(logits, sampling)
            if target_hits is not None:
                v = torch.where(stop, EOS, v)
            is_hit = ~done & (v != EOS)
            v = torch.where(done, PAD, v)
            done = done | (v == EOS)
            n_done = int(done.sum())  # the one host sync per step
            if n_done == B:
                break
            e = draw(energy_logits(h, v).index_fill_(1, energy_off, float("-inf")), energy_sampling)
            v_in, e_in = torch.where(is_hit, v, PAD), torch.where(is_hit, e, PAD)
            if orig is None:
                out_v[:, t], out_e[:, t] = v_in, e_in
            else:
                out_v[orig, t], out_e[orig, t] = v_in, e_in
            hit_voxels[:, t] = v_in
            if plan is not None and not plan.one_material and plan_at != (B, n_done):  # finished rows leave
                plan, plan_at = routing_plan(material, None if n_done == 0 else ~done), (B, n_done)
            h, _ = model.hidden(v_in[:, None], e_in[:, None], incident, material, particle, start=t + 2,
                                valid=is_hit[:, None], plan=plan)
            h = h[:, -1]
            if opt.compact and n_done >= opt.compact_fraction * B and B - n_done >= COMPACT_MIN_ROWS:
                keep = (~done).nonzero().squeeze(1)
                orig = keep if orig is None else orig[keep]
                h, hit_voxels, done = h[keep], hit_voxels[keep], done[keep]
                incident, material, particle = incident[keep], material[keep], particle[keep]
                model.select_cache_rows(keep)
                # adapters read the per-shower ids of the batch in flight (the heads run before the
                # next hidden() call refreshes them)
                model.context["material"], model.context["particle"] = material, particle
                B = len(keep)
    finally:
        model.clear_cache()
    return DecodeResult(out_v, out_e, (out_v != PAD).sum(dim=1), capped)
