"""Batched autoregressive decoding: one step, run eagerly (CPU) or as a captured static step (CUDA).

All showers of a batch advance together, one position per step, each until its own EOS (then fed PAD,
its outputs ignored) or its cap (EOS forced, the shower counted as capped): max_hits, or one per row
(a batch mixing classes whose caps differ, the base's and an adapter's: see calofm.extension). A step
(_Run._voxel, then _Run._advance) draws voxel ~ p(v | past), masking the tokens outside the voxel
block and the voxels the shower already hit (from its hit list: a dense (B, V) masked_fill took 8 ms
per step at batch 1000 on the 2-core CPU, the fill from the hit lists well under 1 ms); with
target_hits (two-stage totals) EOS is masked before a shower's target and forced at it. Then
energy ~ p(e | v, past), restricted to the energy-bin block, and the transformer runs the new position
over the KV cache. The sampler's inverse CDF reads one uniform per row and draw: each shower brings its
own table of them, (max_hits + 1, draws per step) (generation.streams: drawn from the run's seed and
the shower's index), and step t reads its column t. So a shower's tokens depend neither on the other showers of its batch nor on
which of them are still running. A factorized voxel head (model/voxel_head.py) draws the layer or EOS,
then the cell within the layer, from the joint restricted to the cells not hit yet (a rejection over
LAYER_TRIES layer draws, _Run._layer_then_cell; its table is wider: draws_per_step). With running_inputs each row carries the
visible energy of its hits so far (_Rows.energy), fed to the model with the next position.

Two ways to run the step (DecodeOptions.graph), with the same showers for a seed (bit for bit in fp32
on CPU within one batch, tests/test_fast_decode.py):
- eager (the default on CPU, and its fastest): a KV cache as wide as the filled prefix (sliced, see
  model.kv_cache), "all finished?" read at every step, and compaction: finished showers leave the batch
  and the cache rows. A mixed-material batch runs the MoE on the showers in flight only;
- static (the default on CUDA): every buffer allocated once and the position a device tensor, so the
  step is captured once as a CUDA graph and replayed with one launch per position (gpt-fast's recipe:
  on a GPU the eager step is a few hundred small kernels, each cheaper to run than to launch).
  "All finished?" is read every CHECK_EVERY steps; compaction moves the running showers into buckets
  of powers of two (one graph each; fillers write into a sink row and read its fixed uniform);
  attention reads the cache in windows of GRAPH_WINDOW slots (one graph per window and bucket). Step
  t's column of the uniforms is copied into the graph's input buffers before each replay (finished
  rows read theirs and ignore it). On CPU it runs eagerly, for tests.
A Decoder (one per ShowerModel) keeps its compiled functions and the static run of the last
one-material batch (buffers, caches of every bucket, held matrices, graphs: about twice the full static
cache of that batch), reused by the next static batch with the same material, settings, precision and
weights and at most as many showers (the spare rows start finished), until close(). Between calls the
model holds no decoding state.
`compile`: torch.compile (inductor, dynamic shapes) of the heads, the sampler's chunk sums and, for a
bf16 cache, the attention over it (eager), or of the whole step (static). About a minute per process,
precision and material on the 2-core CPU (on the H100 each new row count of the static step compiled
once more, 10-20 s); fused kernels round differently in the last bit, so the showers are equally
distributed, not bit-identical. Under bf16 autocast the KV cache is kept in bf16.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields

import torch

from calofm.generation.sampler import SamplingConfig, chunk_sums, filter_logits, sample
from calofm.model import ShowerTransformer
from calofm.model.attention import attend_over_cache
from calofm.model.moe import RoutingPlan, routing_plan
from calofm.model.precision import autocast
from calofm.model.sync import capture
from calofm.tokenizer import EOS, PAD, Block

# Eager: compact once this fraction of the rows in flight has finished (10 % and 5 %: within noise of
# 25 % on the 2-core CPU).
COMPACT_FRACTION = 0.25
# A batch never runs fewer rows: this CPU's sgemm rounds a row differently when given 1-3 rows than 4
# or more (every layer shape of calofm-small, one thread), so a smaller batch, or a batch compacted
# further, could flip a token against the same shower decoded among more. Batches of 1-3 showers are
# padded with finished rows up to it; eager compaction stops at it.
COMPACT_MIN_ROWS = 4
# Static: steps between reads of "all finished?" (each a host sync that drains the GPU's queue): at
# most 7 idle steps per batch, of ~180 for a 50 GeV shower.
CHECK_EVERY = 8
# Static: compaction buckets never hold fewer rows: each new bucket costs a capture per window (and with
# compile a compilation on the H100), while under a few dozen rows a GPU step costs the same.
GRAPH_MIN_ROWS = 32
# Static: attention reads the cache in windows of this many slots (0: all), one graph each: 6 graphs per
# bucket for calofm-small's 354 slots, and about half the cache read on average (at batch 10 000 the
# bf16 cache is 7 GB: reading all of it every step bounds the step).
GRAPH_WINDOW = 64
# Uniforms a step reads per shower, in this order in the last axis of the table (streams.decode_uniforms).
DRAW_VOXEL, DRAW_ENERGY = 0, 1
DRAWS_PER_STEP = 2  # a flat voxel head's table; a factorized head's is wider (draws_per_step)
# A factorized voxel head draws the layer up to LAYER_TRIES times (rejection, see _Run._layer_then_cell):
# its table adds the cell's uniform, the other tries' layer uniforms and one acceptance uniform per try.
LAYER_TRIES = 4
DRAW_CELL, DRAW_TRIES = 2, 3  # DRAW_TRIES: LAYER_TRIES - 1 layer uniforms, then LAYER_TRIES acceptance ones


def draws_per_step(model) -> int:
    """The last axis of the uniform table a decode of `model` reads (streams.decode_uniforms)."""
    return DRAW_TRIES + 2 * LAYER_TRIES - 1 if model.factorized else DRAWS_PER_STEP


@dataclass(frozen=True)
class DecodeOptions:
    precision: str = "fp32"  # "bf16": bf16 autocast (fp32: the caller's autocast, if any)
    compact: bool = True  # drop finished showers (eager), or move the running ones into smaller buckets (static)
    compile: bool = False  # torch.compile (see the module docstring); off by default: a compilation per process
    graph: bool | None = None  # the static step (a CUDA graph on a GPU); None: on a CUDA device

    def __post_init__(self):
        autocast(torch.device("cpu"), self.precision)  # refuses an unknown precision


@dataclass
class DecodeResult:
    voxel_tokens: torch.Tensor  # (B, max_hits), PAD after the shower's last hit
    energy_tokens: torch.Tensor  # (B, max_hits)
    n_hits: torch.Tensor  # (B,)
    capped: torch.Tensor  # (B,) bool: reached max_hits without choosing EOS


@dataclass
class _Rows:
    """The rows in flight; static: buffers whose shapes are fixed for a bucket (B rows)."""

    h: torch.Tensor | None  # (B, d) hidden state at the last position
    done: torch.Tensor  # (B,) bool: chose EOS (or is a filler row)
    hits: torch.Tensor  # (B, max_hits) the voxels hit so far, PAD after
    orig: torch.Tensor  # (B,) row of the original batch; B0 (the sink row) for static fillers
    incident: torch.Tensor  # (B,)
    material: torch.Tensor  # (B,)
    particle: torch.Tensor  # (B,)
    target: torch.Tensor | None  # (B,) hit count to hold each shower to (two-stage totals)
    energy: torch.Tensor | None  # (B,) running_inputs: visible energy (MeV) of the hits fed so far
    cap: torch.Tensor | None  # (B,) the row's hit cap, where the batch's caps differ (None: max_hits for all)
    plan: RoutingPlan | None

    def tensors(self) -> list[torch.Tensor | None]:
        return [getattr(self, f.name) for f in fields(self) if f.name != "plan"]

    def select(self, keep: torch.Tensor) -> _Rows:
        """Eager compaction: rows `keep` only (the plan is remade by the loop where it must be)."""
        return _Rows(*(None if x is None else x[keep] for x in self.tensors()), plan=self.plan)

    def empty_like(self, size: int) -> _Rows:
        return _Rows(*(None if x is None else torch.empty((size,) + x.shape[1:], dtype=x.dtype, device=x.device)
                       for x in self.tensors()), plan=None)

    def take_into(self, dst: _Rows, src: torch.Tensor, orig: torch.Tensor) -> None:
        """Static compaction: dst's buffers <- rows src of these (orig given), in place: a graph reads dst's."""
        for mine, theirs in zip(self.tensors(), dst.tensors()):
            if mine is not None and theirs is not dst.orig:
                torch.index_select(mine, 0, src, out=theirs)
        dst.orig.copy_(orig)
        dst.plan = self.plan if self.plan.one_material else routing_plan(dst.material)


def _off(n_tokens: int, block: Block, with_eos: bool, device) -> torch.Tensor:
    """The token columns sampling may never choose (specials, other blocks; few for a one-block model)."""
    ok = torch.zeros(n_tokens, dtype=torch.bool, device=device)
    ok[block.offset:block.offset + block.size] = True
    ok[EOS] = with_eos
    return (~ok).nonzero().squeeze(1)


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


def _weights_version(model: ShowerTransformer) -> tuple:
    """Changes when a parameter is replaced or updated in place (optimizer steps bump _version), or an
    adapter adds parameters: a kept run's held matrices and graphs are then stale."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def allow_recompiles(limit: int = 64) -> None:
    """Decoding meets a handful of graph variants per function (batch 1 and >1, prefill and step,
    fp32 and bf16): more than dynamo's default of 8, past which it silently runs eager."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)


def _no_autocast_cache(device: torch.device):
    """Autocast without its cache of cast weights: a graph must not read casts that the cache frees
    when autocast exits (the PyTorch docs on CUDA graphs ask for cache_enabled=False)."""
    if device.type != "cuda" or not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


class Decoder:
    """Decodes batches with one model; keeps the compiled functions and the static run of the last
    one-material batch until close() (see the module docstring)."""

    def __init__(self, model: ShowerTransformer):
        self.model = model
        self.kept: _Run | None = None
        self._compiled: dict[str, object] = {}

    def close(self) -> None:
        """Release the kept static run (buffers, caches of every bucket, held matrices, graphs and their
        memory pool) and the compiled functions; the next decode starts afresh."""
        self.kept = None
        self._compiled.clear()
        self.model.install_cache(None)
        if self.model.ln_f.weight.is_cuda:
            torch.cuda.empty_cache()  # the freed memory back to the device, not only to torch's allocator

    @property
    def draws_per_step(self) -> int:
        """The last axis of the uniform table decode() takes (streams.decode_uniforms)."""
        return draws_per_step(self.model)

    def compiled(self, name: str):
        """torch.compile (dynamic shapes: the batch shrinks on compaction) of one of the decode's
        functions, made once per decoder."""
        if name not in self._compiled:
            allow_recompiles()
            fn = {"voxel_logits": self.model.voxel_logits, "energy_logits": self.model.energy_logits,
                  "chunk_sums": chunk_sums, "attend": attend_over_cache,
                  "step": lambda run, window: run._step(window)}[name]
            self._compiled[name] = torch.compile(fn, dynamic=True)
        return self._compiled[name]

    @torch.no_grad()
    def decode(self, incident: torch.Tensor, material: torch.Tensor, particle: torch.Tensor,
               max_hits: int | torch.Tensor,
               voxel_block: Block, energy_block: Block, sampling: SamplingConfig = SamplingConfig(),
               uniforms: torch.Tensor | None = None, options: DecodeOptions | None = None,
               target_hits: torch.Tensor | None = None, energy_sampling: SamplingConfig | None = None) -> DecodeResult:
        """incident (B,) log-energy feature, material (B,), particle (B,) ids -> hit tokens.

        max_hits: the hit cap of every shower, or (B,) each row's (EOS forced there, the row counted as
        capped); the outputs are as wide as the largest. A row's showers are the same whichever other
        caps share its batch.

        sampling: how voxels are drawn, and energies too unless energy_sampling is given.
        uniforms (B, >= max_hits, draws_per_step) float32 in [0, 1): shower i's draw k at step t is
        uniforms[i, t, k] (streams.decode_uniforms); None only when both heads are greedy.
        target_hits (B,): hold shower i to exactly target_hits[i] hits (EOS masked before, forced there);
        values above max_hits are capped. The uniforms are read the same with or without it."""
        opt = options or DecodeOptions()
        device = incident.device
        energy_sampling = energy_sampling or sampling
        caps = None
        if isinstance(max_hits, torch.Tensor):
            caps = max_hits.to(device=device, dtype=torch.long).reshape(-1)
            if len(caps) != len(incident) or int(caps.min()) < 1:
                raise ValueError(f"max_hits: one positive cap per shower, got {tuple(max_hits.shape)}")
            max_hits = int(caps.max())
            if bool((caps == max_hits).all()):
                caps = None  # one cap for all: the plain decode
        if uniforms is None and max(sampling.temperature, energy_sampling.temperature) > 0:
            raise ValueError("sampling at temperature > 0 needs the showers' uniforms (streams.decode_uniforms)")
        if uniforms is not None:
            if uniforms.dim() != 3 or uniforms.shape[0] != len(incident) or uniforms.shape[1] < max_hits \
                    or uniforms.shape[2] != self.draws_per_step:
                raise ValueError(f"uniforms of shape {tuple(uniforms.shape)} for {len(incident)} showers: want "
                                 f"({len(incident)}, >= {max_hits}, {self.draws_per_step})")
            uniforms = uniforms.to(device=device, dtype=torch.float32)
        static = opt.graph if opt.graph is not None else device.type == "cuda"
        target = None if target_hits is None else target_hits.to(device=device, dtype=torch.long)
        with autocast(device, opt.precision):
            cfg = self.model.cfg
            voxel_off = (_off(cfg.voxel_blocks[0] + len(cfg.layer_cells), Block("layers", cfg.voxel_blocks[0],
                                                                                 len(cfg.layer_cells)), True, device)
                         if self.model.factorized else _off(cfg.n_voxel_tokens, voxel_block, True, device))
            settings = dict(max_hits=max_hits, voxel_off=voxel_off,
                            energy_off=_off(self.model.cfg.n_energy_tokens, energy_block, False, device),
                            sampling=sampling, energy_sampling=energy_sampling, opt=opt, static=static,
                            targeted=target is not None, row_caps=caps is not None, cache_dtype=_cache_dtype(device))
            rows = max(len(incident), COMPACT_MIN_ROWS)  # the rows past the batch start finished
            run = self._static_run(incident, material, settings) if static else _Run(self, rows, **settings)
            try:
                return (run.static if static else run.eager)(incident, material, particle, target, caps, uniforms)
            except BaseException:
                if self.kept is run:  # whatever failed (a capture, memory) must not be kept
                    self.kept = None
                raise
            finally:
                self.model.install_cache(None)  # the model holds nothing between decodes

    def _static_run(self, incident: torch.Tensor, material: torch.Tensor, settings: dict) -> _Run:
        """The kept run if what its graphs bake in (settings; device and precision; the model's weights and
        mode; the batch's material) still matches and it has at least as many rows as this batch, else a
        new one, kept if the batch is of one material (a mixed batch routes its MoE by index lists of its
        own)."""
        ids = material.unique()
        one_material = len(ids) == 1
        device = incident.device
        autocast_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        key = (tuple((k, tuple(v.tolist()) if isinstance(v, torch.Tensor) else v) for k, v in sorted(settings.items())),
               str(device), incident.dtype, autocast_dtype, _weights_version(self.model), self.model.training,
               int(ids[0]) if one_material else None)
        kept = self.kept
        if kept is not None and one_material and kept.key == key and len(material) <= kept.B0:
            return kept
        if not one_material:
            return _Run(self, max(len(incident), COMPACT_MIN_ROWS), key=key, **settings)
        self.kept = None  # free the old run's buffers and graphs before allocating new ones
        self.kept = _Run(self, max(len(incident), COMPACT_MIN_ROWS), key=key, **settings)
        return self.kept


class _Run:
    """A decode's state (the rows in flight, outputs, uniforms; static: buckets, caches, graphs) and its
    step, run eagerly (`eager`) or as a static step (`static`)."""

    def __init__(self, decoder: Decoder, B0: int, max_hits: int, voxel_off: torch.Tensor, energy_off: torch.Tensor,
                 sampling: SamplingConfig, energy_sampling: SamplingConfig, opt: DecodeOptions, static: bool,
                 targeted: bool, row_caps: bool, cache_dtype: torch.dtype | None, key: tuple = ()):
        self.decoder, self.model, self.B0, self.max_hits = decoder, decoder.model, B0, max_hits
        self.voxel_off, self.energy_off, self.sampling, self.energy_sampling = voxel_off, energy_off, sampling, energy_sampling
        # targeted, row_caps: in the key (the buffers hold targets, caps)
        self.opt, self.cache_dtype, self.key = opt, cache_dtype, key
        device = voxel_off.device
        # the heads and the sampler's chunk sums; compiled one by one only in the eager loop (the static
        # step compiles as a whole)
        compiled = opt.compile and not static
        self.voxel_logits = decoder.compiled("voxel_logits") if compiled else self.model.voxel_logits
        self.energy_logits = decoder.compiled("energy_logits") if compiled else self.model.energy_logits
        self.cdf_fn = decoder.compiled("chunk_sums") if compiled else None
        # one row more than the batch: the sink row B0 takes the static fillers' writes (and reads a fixed uniform)
        self.u_voxel, self.u_energy = (torch.full((B0 + 1, 1), 0.5, device=device) for _ in range(2))
        # a factorized head's other draws: the cell, the other layer tries, the acceptances (DRAW_CELL on)
        self.u_extra = torch.full((B0 + 1, draws_per_step(self.model) - DRAW_CELL), 0.5, device=device)
        self.out_voxel, self.out_energy = (torch.empty((B0 + 1, max_hits), dtype=torch.long, device=device)
                                           for _ in range(2))
        self.capped = torch.zeros(B0 + 1, dtype=torch.bool, device=device)
        self.t = torch.zeros(1, dtype=torch.long, device=device)  # static: the step, on the device
        self.rows: _Rows | None = None
        self.state = None  # static: the model's caches and held matrices (ShowerTransformer.setup_cache)
        self.buckets: dict[int, tuple[_Rows, list]] = {}  # static: rows -> (buffers, (keys, values) per cache)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # static: (bucket rows, window) -> step
        self.pool = None  # one memory pool for all the graphs: a step leaves nothing behind in it
        self.captures = 0  # graphs captured

    # --- the step --------------------------------------------------------------------------------
    def _voxel(self, t, n_read: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw the next voxel of every row at step t (an int, or the device counter) -> (v, is_hit) (B,).
        n_read: the columns of rows.hits that may hold a hit (t, or a static step's cache window)."""
        r = self.rows
        stop = None if r.target is None else t >= r.target  # (B,)
        v = (self._layer_then_cell if self.model.factorized else self._flat_voxel)(stop, n_read)
        if stop is not None:
            v = torch.where(stop, EOS, v)
        if r.cap is not None:  # EOS forced at the row's own cap
            over = r.cap <= t  # (B,)
            self.capped[r.orig] = self.capped[r.orig] | (over & ~r.done)
            v = torch.where(over, EOS, v)
        is_hit = ~r.done & (v != EOS)
        v = torch.where(r.done, PAD, v)
        r.done.logical_or_(v == EOS)
        return v, is_hit

    def _flat_voxel(self, stop: torch.Tensor | None, n_read: int) -> torch.Tensor:
        r = self.rows
        logits = self.voxel_logits(r.h).index_fill_(1, self.voxel_off, float("-inf"))
        if n_read:  # a voxel is hit at most once (PAD entries land on the PAD column, off anyway)
            _fill_entries(logits, r.hits[:, :n_read], float("-inf"))
        if stop is not None:
            logits[:, EOS] = torch.where(stop, logits[:, EOS], float("-inf"))
        return sample(logits, self.sampling, cdf_fn=self.cdf_fn, u=self.u_voxel[r.orig])

    def _layer_then_cell(self, stop: torch.Tensor | None, n_read: int) -> torch.Tensor:
        """Factorized head: the layer (or EOS), then the cell within it, from the joint p(layer) p(cell |
        layer) restricted to the cells not hit yet. Masking the hit cells after the layer is drawn would
        not be that: where the cell head still puts its mass on a hit cell (the shower's core, early in
        training), the layer is drawn as if the cell were free and the cell then comes from the far tail
        that is left (stray energetic hits at the grid's edge). So the layer is drawn by rejection: up to
        LAYER_TRIES draws from p(layer) (the layers whose cells are all hit masked), each accepted with
        the probability its cell head gives the free cells (EOS: always); the first accepted is a draw
        from the restricted joint, and if none is, the try with the most free mass is taken. The cell then
        comes from its layer's free cells. The tries run side by side (no host sync)."""
        r, head, K = self.rows, self.model.voxel_head, LAYER_TRIES
        S, B = head.n_specials, len(r.h)
        logits = head.layer_logits(r.h).index_fill_(1, self.voxel_off, float("-inf"))  # (B, S + L)
        hits = r.hits[:, :n_read]
        hit_class = head.token_class[hits]  # (B, n_read); PAD -> the PAD column
        if n_read:
            counts = torch.zeros(logits.shape, dtype=torch.long, device=logits.device)
            counts.scatter_add_(1, hit_class, torch.ones_like(hit_class))
            logits[:, S:].masked_fill_(counts[:, S:] >= head.layer_cells, float("-inf"))
        if stop is not None:
            logits[:, EOS] = torch.where(stop, logits[:, EOS], float("-inf"))
        extra = self.u_extra[r.orig]  # (B, 2K): cell, K - 1 layer tries, K acceptances
        u_layer = torch.cat([self.u_voxel[r.orig], extra[:, 1:K]], dim=1)  # (B, K)
        c = torch.stack([sample(logits, self.sampling, cdf_fn=self.cdf_fn, u=u_layer[:, k:k + 1])
                         for k in range(K)], dim=1)  # (B, K) class of each try
        layer = (c - S).clamp(0, head.n_layers - 1)  # EOS tries read a cell head of layer 0, unused
        cells = head.cell_logits(r.h[:, None].expand(B, K, r.h.shape[-1]), layer).float()  # (B, K, C)
        C = cells.shape[-1]
        # one column more, where the hits of other layers land
        cells = torch.cat([cells, cells.new_full((B, K, 1), float("-inf"))], dim=2)
        free = cells.clone()
        if n_read:
            cols = torch.where(hit_class[:, None, :] == c[:, :, None], head.token_cell[hits][:, None, :], C)
            _fill_entries(free.view(B * K, C + 1), cols.reshape(B * K, -1), float("-inf"))
        # the free cells' share of what the cell draw would sample from (temperature, top-k/p, min-p)
        probs = filter_logits(cells.view(B * K, C + 1), self.sampling).float().softmax(dim=-1)
        mass = torch.where(free.view(B * K, C + 1) > float("-inf"), probs, 0.0).sum(dim=-1).view(B, K)
        mass = torch.where(c >= S, mass, 1.0)
        accept = extra[:, K:] < mass  # (B, K)
        k = torch.where(accept.any(dim=1), accept.int().argmax(dim=1), mass.argmax(dim=1))  # first accepted
        c, layer = c.gather(1, k[:, None]).squeeze(1), layer.gather(1, k[:, None]).squeeze(1)
        chosen = free[torch.arange(B, device=free.device), k]  # (B, C + 1)
        cell = sample(chosen, self.sampling, cdf_fn=self.cdf_fn, u=extra[:, :1])
        return torch.where(c >= S, head.token(layer, cell.clamp(max=head.n_cells - 1)), c)

    def _advance(self, t, v: torch.Tensor, is_hit: torch.Tensor) -> torch.Tensor:
        """Draw the energies, write the step's tokens, run the new position -> v_in (B,), the voxels fed
        (PAD for finished rows and fillers); the caller records them in rows.hits."""
        r = self.rows
        e = sample(self.energy_logits(r.h, v).index_fill_(1, self.energy_off, float("-inf")), self.energy_sampling,
                   cdf_fn=self.cdf_fn, u=self.u_energy[r.orig])
        v_in, e_in = torch.where(is_hit, v, PAD), torch.where(is_hit, e, PAD)
        self.out_voxel[r.orig, t] = v_in  # static fillers write PAD into the sink row
        self.out_energy[r.orig, t] = e_in
        h, _ = self.model.hidden(v_in[:, None], e_in[:, None], r.incident, r.material, r.particle, start=t + 2,
                                 valid=is_hit[:, None], plan=r.plan, energy_before=r.energy)
        r.h.copy_(h[:, -1])
        if r.energy is not None:
            r.energy.add_(self.model.running.energy(e_in))
        return v_in

    def _draw(self, uniforms: torch.Tensor | None, t: int) -> None:
        """Step t's uniforms of both heads for the rows of the original batch (greedy reads none)."""
        n = 0 if uniforms is None else len(uniforms)
        if self.sampling.temperature > 0:
            self.u_voxel[:n, 0].copy_(uniforms[:, t, DRAW_VOXEL])
            if self.model.factorized:
                self.u_extra[:n].copy_(uniforms[:, t, DRAW_CELL:])
        if self.energy_sampling.temperature > 0:
            self.u_energy[:n, 0].copy_(uniforms[:, t, DRAW_ENERGY])

    def _result(self, B: int) -> DecodeResult:
        out_v, out_e = self.out_voxel[:B].clone(), self.out_energy[:B].clone()  # the buffers are the next batch's
        return DecodeResult(out_v, out_e, (out_v != PAD).sum(dim=1), self.capped[:B].clone())

    def _start(self, incident, material, particle, target, caps, hits_width: int) -> _Rows:
        """Clear the outputs -> the rows of a batch of B <= B0 showers, padded to B0 rows with finished
        copies of the first that write into the sink row; h is left for the prefill."""
        self.out_voxel.fill_(PAD)
        self.out_energy.fill_(PAD)
        self.capped.zero_()
        B, B0, device = len(incident), self.B0, incident.device
        pad = lambda x: None if x is None else torch.cat([x, x[:1].expand(B0 - B)])  # noqa: E731
        orig = torch.arange(B0, device=device).masked_fill_(torch.arange(B0, device=device) >= B, B0)
        rows = _Rows(torch.zeros(B0, self.model.cfg.d_model, device=device), orig == B0,
                     torch.full((B0, hits_width), PAD, dtype=torch.long, device=device), orig, pad(incident),
                     pad(material), pad(particle), pad(target),
                     torch.zeros(B0, device=device) if self.model.running is not None else None, pad(caps), None)
        rows.plan = routing_plan(rows.material)
        return rows

    # --- eager -----------------------------------------------------------------------------------
    def eager(self, incident, material, particle, target, caps, uniforms) -> DecodeResult:
        model, B0 = self.model, self.B0
        rows = self.rows = self._start(incident, material, particle, target, caps, self.max_hits)
        attend = self.decoder.compiled("attend") if self.opt.compile else None
        model.setup_cache(B0, max_len=self.max_hits + 2, dtype=self.cache_dtype, sliced=True, attend=attend)
        rows.h = model.prefill(rows.incident, rows.material, rows.particle, rows.plan)
        plan_at = (B0, 0)  # (rows in flight, finished among them) when the plan was made
        for t in range(self.max_hits + 1):
            r = self.rows
            if t == self.max_hits:  # EOS forced
                self.capped[r.orig] |= ~r.done
                break
            self._draw(uniforms, t)
            v, is_hit = self._voxel(t, t)
            B, n_done = len(r.done), int(r.done.sum())  # the one host sync per step
            if n_done == B:
                break
            if not r.plan.one_material and plan_at != (B, n_done):  # finished rows leave the MoE
                r.plan, plan_at = routing_plan(r.material, None if n_done == 0 else ~r.done), (B, n_done)
            r.hits[:, t] = self._advance(t, v, is_hit)
            if self.opt.compact and n_done >= COMPACT_FRACTION * B and B - n_done >= COMPACT_MIN_ROWS:
                keep = (~r.done).nonzero().squeeze(1)
                self.rows = r.select(keep)
                model.select_cache_rows(keep)
        return self._result(len(incident))

    # --- static ----------------------------------------------------------------------------------
    def _caches(self) -> list:
        return [attn.kv_cache for attn in self.model.attentions()]

    def _step(self, window: int) -> torch.Tensor:
        """The step over the static buffers, reading `window` cache slots -> v_in (no host sync, no shape
        that depends on data)."""
        for cache in self._caches():  # set here, so that a compiled step takes the window as an argument
            cache.window = window
        v, is_hit = self._voxel(self.t, window)
        return self._advance(self.t, v, is_hit)

    def step(self, window: int) -> None:
        """One position for every row, in place: what a CUDA graph captures."""
        if self.opt.compile:
            import torch.fx.experimental._config as fx_config

            # window and rows are symbolic sizes (dynamic=True); without duck shaping, a window that
            # happens to equal the bucket's rows or n_heads does not tie them (a recompilation later)
            with fx_config.patch(use_duck_shape=False):
                v_in = self.decoder.compiled("step")(self, window)
        else:
            v_in = self._step(window)
        # the voxels just hit, recorded outside the compiled step: inside it, inductor turned an in-place
        # write into a buffer the step also reads into a copy of the whole buffer and a copy back
        self.rows.hits.index_copy_(1, self.t, v_in[:, None])
        self.t += 1

    def _run_step(self, window: int) -> None:
        key = (len(self.rows.done), window)
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        if self.t.device.type != "cuda":
            self.step(window)
            return
        # first step of this bucket and window: the warm-up runs it, the recorded one runs at the next replay
        graph, _ = capture(lambda: self.step(window), self.pool)
        self.graphs[key] = graph  # only once captured: a failed capture must not be replayed later
        self.pool = self.pool or graph.pool()
        self.captures += 1

    def _window(self, t: int | None) -> int:
        """Cache slots read at step t (0-based): the filled t + 3, rounded up to whole windows; all
        max_hits + 2 (t None: the prefill, which reads what the eager prefill reads)."""
        w = GRAPH_WINDOW or self.max_hits + 2
        return self.max_hits + 2 if t is None else min(self.max_hits + 2, -(-(t + 3) // w) * w)

    def _use(self, size: int) -> None:
        """Make bucket `size` (allocated on first use) the rows and caches the step reads."""
        if size not in self.buckets:
            kv = [tuple(torch.empty((size,) + x.shape[1:], dtype=x.dtype, device=x.device) for x in (c.k, c.v))
                  for c in self._caches()]
            self.buckets[size] = (self.rows.empty_like(size), kv)
        rows, kv = self.buckets[size]
        for cache, (k, v) in zip(self._caches(), kv):
            cache.k, cache.v = k, v
        self.rows = rows

    def _compact(self, n_live: int) -> None:
        """Move the running rows into a bucket of the next power of two >= n_live (>= GRAPH_MIN_ROWS)."""
        B = len(self.rows.done)
        size = max(GRAPH_MIN_ROWS, 1 << max(n_live - 1, 0).bit_length())
        if size >= B:
            return
        old, caches = self.rows, [(c.k, c.v) for c in self._caches()]
        live, finished = (~old.done).nonzero().squeeze(1), old.done.nonzero().squeeze(1)
        src = torch.cat([live, finished[:1].expand(size - n_live)])  # fillers: copies of a finished row
        orig = torch.cat([old.orig[live], torch.full((size - n_live,), self.B0, device=src.device)])
        self._use(size)
        old.take_into(self.rows, src, orig)
        for (k_old, v_old), (k, v) in zip(caches, self.buckets[size][1]):
            torch.index_select(k_old, 0, src, out=k)
            torch.index_select(v_old, 0, src, out=v)

    def static(self, incident, material, particle, target, caps, uniforms) -> DecodeResult:
        """A batch of B <= B0 rows through the static step."""
        model, device, B0, B = self.model, incident.device, self.B0, incident.shape[0]
        # hits wider than any window: a compiled step then reads a strict prefix at every window (one at
        # the buffer's width recompiled)
        new = self._start(incident, material, particle, target, caps, self.max_hits + 3)
        if self.state is None:  # the first call: the model's caches and held matrices, the top bucket
            # one slot more than a window ever reads, where the model has room: then every window is a
            # strided view of the buffer, none the whole (contiguous) buffer, which a compiled step would
            # treat apart (a recompilation at the last window)
            self.state = model.setup_cache(B0, max_len=min(self.max_hits + 3, model.cfg.max_seq_len),
                                           dtype=self.cache_dtype, sliced=False)
            self.buckets[B0] = (new.empty_like(B0), [(c.k, c.v) for c in self._caches()])
        model.install_cache(self.state)
        self._use(B0)
        r = self.rows
        for buf, value in zip(r.tensors(), new.tensors()):
            if buf is not None:
                buf.copy_(value)
        r.plan = new.plan
        for cache in self._caches():
            cache.window = self._window(None)
        r.h.copy_(model.prefill(r.incident, r.material, r.particle, r.plan))
        self.t.zero_()
        on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with on_device, _no_autocast_cache(device):  # streams and graphs on the batch's GPU
            for t in range(1, self.max_hits + 1):
                self._draw(uniforms, t - 1)  # the step reads self.t = t - 1
                self._run_step(self._window(t - 1))
                if t % CHECK_EVERY and t < self.max_hits:
                    continue
                n_live = int((~self.rows.done).sum())  # a host sync, every CHECK_EVERY steps
                if n_live == 0:
                    break
                if t == self.max_hits:  # EOS forced
                    self.capped[self.rows.orig] |= ~self.rows.done
                elif self.opt.compact and 2 * n_live <= len(self.rows.done):
                    self._compact(n_live)
        return self._result(B)


def decode(model: ShowerTransformer, *args, **kwargs) -> DecodeResult:
    """Decoder(model).decode(*args, **kwargs) with a decoder of its own, closed after (nothing is kept)."""
    decoder = Decoder(model)
    try:
        return decoder.decode(*args, **kwargs)
    finally:
        decoder.close()
