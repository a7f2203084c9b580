"""Batched autoregressive decoding with the static KV cache.

All sequences of a batch advance together, one position per step; each stops at its own EOS (after
which it is fed PAD and skipped by the MoE) and the loop ends when all have stopped or max_hits is
reached (then EOS is forced and the shower counted as capped). At each step:
    voxel  ~ p(v | past), with PAD/BOS, voxels outside the model's geometry block and voxels already
             used by this shower masked out (a voxel is hit at most once);
    energy ~ p(e | v, past), restricted to the energy-bin block.

Speed switches (DecodeOptions; see docs/speed.md for what each gains). With a given seed the showers
do not depend on sliced_attention / compact / fused_qkv (tests/test_fast_decode.py); the sampler
changes which random numbers are drawn, so it gives other (equally distributed) showers:
- sliced_attention: attend to the filled cache prefix without a mask instead of the masked full
  static cache (keep it off for static shapes, e.g. CUDA graphs);
- sampler: "cdf" (inverse CDF, one uniform per row) or "exp" (exponential race, one Exp(1) per
  vocabulary entry);
- compact: once a fraction `compact_fraction` of the batch has finished, drop the finished showers
  from the batch and from the cache rows, so they stop costing compute. Random numbers are drawn
  for the original batch and indexed, so every shower sees the same draws as without compaction;
- fused_qkv: one (3d, d) projection for q, k, v, built at decode time from the separate weights
  (the state dict is unchanged; projections wrapped by a LoRA adapter keep the separate path);
- compile: torch.compile (inductor, dynamic batch) of the per-step work on the vocabularies - the two
  heads with their masks and the running sums the sampler searches - which is most of a step at
  d = 128. Off by default: it costs a compilation per process, and fused kernels round differently
  in the last bit, so the showers are equally distributed but not bit-identical to the eager path.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from calofm.generation.sampler import SAMPLERS, SamplingConfig, sample
from calofm.model import ShowerTransformer
from calofm.tokenizer import BOS, EOS, PAD, Block


@dataclass(frozen=True)
class DecodeOptions:
    sliced_attention: bool = True
    sampler: str = "cdf"  # "cdf" | "exp"
    compact: bool = True
    compact_fraction: float = 0.25  # compact once this fraction of the current batch has finished
    fused_qkv: bool = True
    compile: bool = False

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r} ({', '.join(SAMPLERS)})")
        if not 0 < self.compact_fraction <= 1:
            raise ValueError(f"compact_fraction must be in (0, 1], got {self.compact_fraction}")

    def plain(self) -> DecodeOptions:
        """The same sampler with every other optimization off (the reference the fast path must match)."""
        return replace(self, sliced_attention=False, compact=False, fused_qkv=False, compile=False)


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
    """Compiled heads and running sums, kept on the model (compilation is the slow part)."""
    from calofm.generation.sampler import unnormalized_cdf

    if getattr(model, "_compiled_decode", None) is None:
        compile_ = lambda fn: torch.compile(fn, dynamic=True)  # noqa: E731  (the batch shrinks on compaction)
        model._compiled_decode = (compile_(model.voxel_logits), compile_(model.energy_logits),
                                  compile_(unnormalized_cdf))
    return model._compiled_decode


@torch.no_grad()
def decode(model: ShowerTransformer, incident: torch.Tensor, material: torch.Tensor, particle: torch.Tensor,
           max_hits: int, voxel_block: Block, energy_block: Block, sampling: SamplingConfig = SamplingConfig(),
           generator: torch.Generator | None = None, options: DecodeOptions | None = None,
           target_hits: torch.Tensor | None = None) -> DecodeResult:
    """incident (B,) log-energy feature, material (B,), particle (B,) ids -> hit tokens.

    target_hits (B,): hold shower i to exactly target_hits[i] hits (EOS masked before, forced there);
    values above max_hits are capped. The random stream is the same with or without it."""
    opt = options or DecodeOptions()
    B0, device = incident.shape[0], incident.device
    B = B0  # rows in flight (fewer than B0 after compaction)
    orig: torch.Tensor | None = None  # (B,) original row of each row in flight; None = identity
    rows = torch.arange(B, device=device)
    blocked = ~_allowed(model.cfg.n_voxel_tokens, voxel_block, True, device)[None, :].expand(B, -1).clone()  # (B, V_v)
    energy_blocked = ~_allowed(model.cfg.n_energy_tokens, energy_block, False, device)  # (V_e,)
    out_v = torch.full((B0, max_hits), PAD, dtype=torch.long, device=device)
    out_e = torch.full((B0, max_hits), PAD, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    capped = torch.zeros(B0, dtype=torch.bool, device=device)

    voxel_logits, energy_logits, cdf_fn = model.voxel_logits, model.energy_logits, None
    if opt.compile:
        voxel_logits, energy_logits, cdf_fn = _compiled(model)

    def draw(logits: torch.Tensor) -> torch.Tensor:
        return sample(logits, sampling, generator, opt.sampler, orig, B0, cdf_fn)

    model.setup_cache(B, max_len=max_hits + 2, sliced=opt.sliced_attention, fused_qkv=opt.fused_qkv)
    try:
        start = torch.full((B, 2), PAD, dtype=torch.long, device=device)
        start[:, 1] = BOS
        h, _ = model.hidden(start, start, incident, material, particle, start=0)  # prefill [COND, BOS]
        h = h[:, -1]
        for t in range(max_hits + 1):
            if t == max_hits:  # EOS forced
                capped[rows if orig is None else orig] = ~done
                break
            logits = voxel_logits(h).float().masked_fill(blocked, float("-inf"))
            if target_hits is not None:
                stop = t >= (target_hits if orig is None else target_hits[orig])  # (B,)
                logits[:, EOS] = torch.where(stop, logits[:, EOS], float("-inf"))
            v = draw(logits)
            if target_hits is not None:
                v = torch.where(stop, EOS, v)
            is_hit = ~done & (v != EOS)
            v = torch.where(done, PAD, v)
            done = done | (v == EOS)
            n_done = int(done.sum())  # the one host sync per step
            if n_done == B:
                break
            e = draw(energy_logits(h, v).float().masked_fill(energy_blocked, float("-inf")))
            v_in, e_in = torch.where(is_hit, v, PAD), torch.where(is_hit, e, PAD)
            if orig is None:
                out_v[:, t], out_e[:, t] = v_in, e_in
            else:
                out_v[orig, t], out_e[orig, t] = v_in, e_in
            blocked[rows, v_in] |= is_hit  # PAD is blocked anyway, so finished rows change nothing
            h, _ = model.hidden(v_in[:, None], e_in[:, None], incident, material, particle, start=t + 2,
                                valid=is_hit[:, None])
            h = h[:, -1]
            if opt.compact and n_done > 0 and n_done >= opt.compact_fraction * B:
                keep = (~done).nonzero().squeeze(1)
                orig = keep if orig is None else orig[keep]
                h, blocked, done = h[keep], blocked[keep], done[keep]
                incident, material, particle = incident[keep], material[keep], particle[keep]
                model.select_cache_rows(keep)
                # adapters read the per-shower ids of the batch in flight (the heads run before the
                # next hidden() call refreshes them)
                model.context["material"], model.context["particle"] = material, particle
                B = len(keep)
                rows = torch.arange(B, device=device)
    finally:
        model.clear_cache()
    return DecodeResult(out_v, out_e, (out_v != PAD).sum(dim=1), capped)
