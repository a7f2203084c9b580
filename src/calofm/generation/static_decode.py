"""Static-shape decoding: one decode step over buffers allocated once, replayed as a CUDA graph.

On a GPU the eager decoder (decode.decode) is bound by launches, not arithmetic: a step of
calofm-small is a few hundred small kernels, each cheaper to run than to launch from Python. Here the
whole step (both heads, both draws, the bookkeeping and the transformer's pass over the new position)
reads and writes fixed buffers, and the position is a device tensor, so the step can be captured once
into a CUDA graph and replayed with one launch per position (gpt-fast's recipe; torch.compile's
mode="reduce-overhead" captures the same way, but would re-trace for every batch size that compaction
makes).

What differs from decode.decode:
- random numbers: the cdf sampler's uniforms are drawn outside the graph, into a buffer, from the same
  generator and in the same order as decode.decode draws them, so with the same seed a batch gives the
  same showers (bit for bit in fp32 on CPU, tests/test_fast_decode.py). Only within one batch: the
  steps run after the last shower finished (below) still draw, so the generator's state at the end,
  and with it the next batch of a multi-batch generate(), differs;
- stopping: whether every shower has finished is read every `check_every` steps, not every step (each
  read is a host sync that drains the GPU's queue); the extra steps feed finished showers PAD and write
  nothing;
- compaction in buckets: when at most half the rows are still running, they move into new buffers of
  the next power of two (at least `graph_min_rows` rows) and a graph is captured for that size; finished
  rows fill the spare places and write into a sink row of the outputs;
- attention reads the cache up to a window of `graph_window` slots covering the filled ones (one graph
  per window and bucket), not the full max_hits + 2 of a static cache: at batch 10 000 the cache is 7 GB
  in bf16, and reading all of it every step would bound the step;
- hit voxels are masked from a (B, V) bool buffer instead of a hit list that grows every step;
- the MoE always runs on a plan made once per bucket (model.moe.RoutingPlan over all its rows).
The step always uses the MoE routing plan and a static (unsliced) cache, whatever the options'
routing_plan and sliced_attention say.

Kept between calls: a batch of one material leaves its decoder on the model (`static_decoder`), with
its buffers, the caches of every bucket, the held vocabulary matrices and the captured graphs (which
share one memory pool). The next call with the same material, sampling, options, precision, weights
and mode (a parameter changed in place, or an adapter added, makes another decoder) and at most as
many showers refills the buffers and replays the graphs; the spare rows of a smaller batch (the last
of a multi-batch generate) start finished. So a graph is captured once for each bucket and window met,
not once per batch, as long as the batches keep their material; another material or a larger batch
replaces the decoder. The price is memory: the caches of all buckets stay allocated (about twice the
full static cache of the batch) until then, or `release(model)`. A mixed-material batch routes its MoE
by index lists of its own, so its decoder is used once and not kept.

With `options.compile`, the whole step goes through torch.compile (inductor, dynamic shapes, the
cache window an argument), and the graph captures its fused kernels: a step is then tens of kernels
instead of a few hundred. On CPU that is one compilation per process, precision and material (dynamo
specializes on the material's expert group; one more when a batch has a single row), whatever the
batch sizes, buckets and windows. On the H100 (stop 17, benchmarks/recompile_probe.py) the windows
share it too, but every distinct row count (batch size or compaction bucket) compiles once more,
10-20 s each: the row dimension comes out specialized there, for a reason not yet found.
Not supported: the exponential sampler (one Exp(1) per vocabulary entry would be drawn outside the
graph) and two-stage totals (target_hits).
On CPU, where there are no graphs, the same step runs eagerly: slower than decode.decode's sliced
path, kept so that the step is tested where CI runs (tests/test_fast_decode.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields

import torch

from calofm.generation.decode import prefill
from calofm.generation.sampler import SamplingConfig, sample
from calofm.model import ShowerTransformer
from calofm.model.moe import RoutingPlan, routing_plan
from calofm.model.sync import capture, no_host_reads
from calofm.tokenizer import EOS, PAD


@dataclass
class _Rows:
    """The buffers of the rows in flight; their shapes are fixed for a bucket (B rows)."""

    h: torch.Tensor  # (B, d) hidden state at the last position
    done: torch.Tensor  # (B,) bool: chose EOS (or is a filler row)
    used: torch.Tensor  # (B, V_voxel) bool: voxels already hit
    orig: torch.Tensor  # (B,) row of the original batch; B0 (the sink row) for fillers
    incident: torch.Tensor  # (B,)
    material: torch.Tensor  # (B,)
    particle: torch.Tensor  # (B,)
    plan: RoutingPlan | None

    @staticmethod
    def empty_like(rows: _Rows, size: int) -> _Rows:
        return _Rows(*(torch.empty((size,) + t.shape[1:], dtype=t.dtype, device=t.device)
                       for t in rows.tensors()), plan=None)

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self) if f.name != "plan"]

    def take_into(self, dst: _Rows, src: torch.Tensor, orig: torch.Tensor) -> None:
        """dst's buffers <- rows src of these (orig given), in place: a captured graph reads dst's."""
        for mine, theirs in zip(self.tensors(), dst.tensors()):
            if theirs is not dst.orig:
                torch.index_select(mine, 0, src, out=theirs)
        dst.orig.copy_(orig)
        dst.plan = self.plan if self.plan.one_material else routing_plan(dst.material)


@dataclass
class _Bucket:
    rows: _Rows
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per cache (layer, attention): its (keys, values) buffers


def _weights_version(model: ShowerTransformer) -> tuple:
    """Changes when a parameter is replaced or updated in place (optimizer steps bump _version), or an
    adapter adds parameters: a decoder's held matrices and graphs are then stale."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def static_decoder(model: ShowerTransformer, incident: torch.Tensor, material: torch.Tensor, **kwargs) -> StaticDecoder:
    """The decoder for this batch: the one kept on the model if what its graphs bake in (kwargs:
    sampling, options, blocks, max_hits; the device and precision; the model's weights and mode; the
    batch's material) still matches and it has at least as many rows as this batch (the spare rows
    start finished), else a new one, kept if the batch is of one material. kwargs: StaticDecoder's."""
    ids = material.unique()
    one_material = len(ids) == 1
    device = incident.device
    autocast_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    key = (tuple((k, tuple(v.tolist()) if isinstance(v, torch.Tensor) else v) for k, v in sorted(kwargs.items())),
           str(device), incident.dtype, autocast_dtype, _weights_version(model), model.training,
           int(ids[0]) if one_material else None)
    held = model.static_decoder
    if held is not None and one_material and held.key == key and len(material) <= held.B0:
        return held
    if one_material:
        release(model)  # free the old decoder's buffers and graphs before allocating new ones
    dec = StaticDecoder(model, key=key, **kwargs)
    if one_material:
        model.static_decoder = dec
    return dec


def release(model: ShowerTransformer) -> None:
    """Drop the decoder kept on the model (its caches, buffers and graphs)."""
    model.static_decoder = None


_compiled_step = None


def compiled_step():
    """StaticDecoder._step through torch.compile, made once per process (compiled per precision and
    material, and on a GPU per row count: see the module docstring)."""
    global _compiled_step
    if _compiled_step is None:
        from calofm.model.attention import allow_recompiles

        allow_recompiles()
        _compiled_step = torch.compile(lambda dec, window: dec._step(window), dynamic=True)
    return _compiled_step


class StaticDecoder:
    """Decodes batches of one size. The step's inputs and outputs are the buffers of `rows`,
    `u_voxel`, `u_energy`, `out_voxel`, `out_energy` and the step counter `t`; nothing else changes
    between steps, which is what lets a captured graph stand for the step. Buffers, caches and graphs
    are made on first use and kept for the next batch (see the module docstring)."""

    def __init__(self, model: ShowerTransformer, voxel_off: torch.Tensor, energy_off: torch.Tensor,
                 max_hits: int, sampling: SamplingConfig, energy_sampling: SamplingConfig, options,
                 cache_dtype: torch.dtype | None, key: tuple = ()):
        self.model, self.voxel_off, self.energy_off, self.max_hits = model, voxel_off, energy_off, max_hits
        self.sampling, self.energy_sampling, self.opt = sampling, energy_sampling, options
        self.cache_dtype, self.key = cache_dtype, key
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (bucket rows, cache window) -> step
        self.pool = None  # one memory pool for all the graphs: a step leaves nothing behind in it
        self.buckets: dict[int, _Bucket] = {}
        self.state = None  # the model's decode set-up (caches, held matrices), see restore_decode_state
        self.captures = 0  # graphs captured

    def _caches(self) -> list:
        return [attn.kv_cache for attn in self.model.attentions()]

    def step(self, window: int) -> None:
        """One position for every row, reading `window` cache slots, in place (no host sync, no shape
        that depends on data)."""
        import torch.fx.experimental._config as fx_config

        with no_host_reads():
            if self.opt.compile:
                # window and rows are symbolic sizes (dynamic=True); without duck shaping, a window that
                # happens to equal the bucket's rows or n_heads does not tie them (a recompilation later)
                with fx_config.patch(use_duck_shape=False):
                    v_in = compiled_step()(self, window)
            else:
                v_in = self._step(window)
            # the voxels just hit, marked outside the compiled step: inside it, inductor turned this
            # in-place scatter (into a mask the step also reads) into a copy of the whole mask and a copy
            # back, two (B, V) passes per step (7 of 17.6 ms per step at 100 rows on CPU).
            # PAD lands on the PAD column, masked anyway
            self.rows.used.scatter_(1, v_in[:, None], True)

    def _step(self, window: int) -> torch.Tensor:
        """Everything a step does but marking `rows.used` (see step) -> v_in (B,), the voxel tokens fed
        at this step (PAD for finished rows and fillers)."""
        r, m = self.rows, self.model
        for cache in self._caches():  # set here, so that a compiled step takes the window as an argument
            cache.window = window
        logits = m.voxel_logits(r.h).index_fill_(1, self.voxel_off, float("-inf")).masked_fill_(r.used, float("-inf"))
        v = sample(logits, self.sampling, u=self.u_voxel[r.orig])
        is_hit = ~r.done & (v != EOS)
        v = torch.where(r.done, PAD, v)
        r.done.logical_or_(v == EOS)
        e = sample(m.energy_logits(r.h, v).index_fill_(1, self.energy_off, float("-inf")), self.energy_sampling,
                   u=self.u_energy[r.orig])
        v_in, e_in = torch.where(is_hit, v, PAD), torch.where(is_hit, e, PAD)
        column = self.t.expand(len(v_in))
        self.out_voxel.index_put_((r.orig, column), v_in)  # fillers write PAD into the sink row
        self.out_energy.index_put_((r.orig, column), e_in)
        h, _ = m.hidden(v_in[:, None], e_in[:, None], r.incident, r.material, r.particle, start=self.t + 2,
                        valid=is_hit[:, None], plan=r.plan)
        r.h.copy_(h[:, -1])
        self.t += 1
        return v_in

    def _run_step(self, window: int) -> None:
        key = (len(self.rows.done), window)
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        if not self.use_graph:
            self.step(window)
            return
        # first step of this bucket and window: the warm-up runs it, the recorded one runs at the next replay
        graph, _ = capture(lambda: self.step(window), self.pool)
        self.graphs[key] = graph  # only once captured: a failed capture must not be replayed later
        self.pool = self.pool or graph.pool()
        self.captures += 1

    def _window(self, t: int | None) -> int:
        """Cache slots read at step t (0-based): the filled t + 3, rounded up to whole windows; all
        max_hits + 2 (t None: the prefill, which reads what decode.decode's reads)."""
        w = self.opt.graph_window or self.max_hits + 2
        return self.max_hits + 2 if t is None else min(self.max_hits + 2, -(-(t + 3) // w) * w)

    def _bucket(self, size: int) -> _Bucket:
        bucket = self.buckets.get(size)
        if bucket is None:
            kv = [tuple(torch.empty((size,) + t.shape[1:], dtype=t.dtype, device=t.device) for t in (c.k, c.v))
                  for c in self._caches()]
            bucket = self.buckets[size] = _Bucket(_Rows.empty_like(self.rows, size), kv)
        return bucket

    def _use(self, bucket: _Bucket) -> None:
        for cache, (k, v) in zip(self._caches(), bucket.kv):
            cache.k, cache.v = k, v
        self.rows = bucket.rows

    def _compact(self, n_live: int) -> None:
        """Move the running rows into a bucket of the next power of two >= n_live (>= graph_min_rows)."""
        B = len(self.rows.done)
        size = max(self.opt.graph_min_rows, 1 << max(n_live - 1, 0).bit_length())
        if size >= B:
            return
        live, finished = (~self.rows.done).nonzero().squeeze(1), self.rows.done.nonzero().squeeze(1)
        src = torch.cat([live, finished[:1].expand(size - n_live)])  # fillers: copies of a finished row
        orig = torch.cat([self.rows.orig[live], torch.full((size - n_live,), self.B0, device=src.device)])
        bucket = self._bucket(size)
        self.rows.take_into(bucket.rows, src, orig)
        for cache, (k, v) in zip(self._caches(), bucket.kv):
            torch.index_select(cache.k, 0, src, out=k)
            torch.index_select(cache.v, 0, src, out=v)
        self._use(bucket)

    def _set_up(self, incident: torch.Tensor) -> None:
        """The first call: the model's caches and held matrices, the top bucket, the output buffers."""
        model, device, B0 = self.model, incident.device, self.B0
        # the sink row B0 takes the fillers' writes (and reads a fixed uniform)
        self.u_voxel, self.u_energy = (torch.full((B0 + 1, 1), 0.5, device=device) for _ in range(2))
        self.out_voxel, self.out_energy = (torch.empty((B0 + 1, self.max_hits), dtype=torch.long, device=device)
                                           for _ in range(2))
        self.t = torch.zeros(1, dtype=torch.long, device=device)
        self.capped = torch.zeros(B0 + 1, dtype=torch.bool, device=device)
        # one slot more than a window ever reads, where the model has room: then every window is a
        # strided view of the buffer, none the whole (contiguous) buffer, which a compiled step would
        # treat apart (a recompilation at the last window)
        model.setup_cache(B0, max_len=min(self.max_hits + 3, model.cfg.max_seq_len), dtype=self.cache_dtype,
                          sliced=False, fused_qkv=self.opt.fused_qkv)
        self.state = model.decode_state()
        V, d = model.cfg.n_voxel_tokens, model.cfg.d_model
        long = dict(dtype=torch.long, device=device)
        rows = _Rows(torch.empty(B0, d, device=device), torch.empty(B0, dtype=torch.bool, device=device),
                     torch.empty((B0, V), dtype=torch.bool, device=device), torch.empty(B0, **long),
                     torch.empty(B0, dtype=incident.dtype, device=device), torch.empty(B0, **long),
                     torch.empty(B0, **long), None)
        self.buckets[B0] = _Bucket(rows, [(c.k, c.v) for c in self._caches()])

    def run(self, incident, material, particle, generator) -> tuple:
        """-> (voxel tokens, energy tokens) (B, max_hits), capped (B,) for a batch of B <= B0 rows."""
        try:
            return self._run(incident, material, particle, generator)
        except BaseException:
            if self.model.static_decoder is self:  # whatever failed (a capture, memory) must not be kept
                release(self.model)
            raise

    def _run(self, incident, material, particle, generator) -> tuple:
        model, device = self.model, incident.device
        self.use_graph = device.type == "cuda"
        if self.state is None:
            self.B0 = incident.shape[0]
            self._set_up(incident)
        B0, B = self.B0, incident.shape[0]
        self.B = B
        model.restore_decode_state(self.state)
        top = self.buckets[B0]
        self._use(top)
        r = top.rows
        for buf, value in ((r.incident, incident), (r.material, material), (r.particle, particle)):
            buf[:B].copy_(value)
            buf[B:].copy_(value[:1].expand(B0 - B))  # spare rows: copies of the first, finished from the start
        r.done.zero_()
        r.done[B:] = True
        r.used.zero_()
        torch.arange(B0, device=device, out=r.orig)
        r.orig[B:] = B0  # the spare rows write into the sink row
        r.plan = routing_plan(r.material)
        for cache in self._caches():
            cache.window = self._window(None)
        r.h.copy_(prefill(model, r.incident, r.material, r.particle, r.plan))
        self.out_voxel.fill_(PAD)
        self.out_energy.fill_(PAD)
        self.t.zero_()
        self.capped.zero_()
        on_device = torch.cuda.device(device) if self.use_graph else contextlib.nullcontext()
        with on_device, _no_autocast_cache(device):  # streams and graphs on the batch's GPU
            self._loop(generator)
        # copies: the buffers are the next batch's
        return self.out_voxel[:B].clone(), self.out_energy[:B].clone(), self.capped[:B].clone()

    def _loop(self, generator) -> None:
        B = self.B
        for t in range(1, self.max_hits + 1):
            # drawn as decode.decode draws them for B rows: torch.rand is uniform_ on a fresh tensor
            self.u_voxel[:B].uniform_(0, 1, generator=generator)
            self.u_energy[:B].uniform_(0, 1, generator=generator)
            self._run_step(self._window(t - 1))
            if t % self.opt.check_every and t < self.max_hits:
                continue
            n_live = int((~self.rows.done).sum())  # a host sync, every check_every steps
            if n_live == 0:
                break
            if t == self.max_hits:  # EOS forced
                self.capped[self.rows.orig] = ~self.rows.done
            elif self.opt.compact and 2 * n_live <= len(self.rows.done):
                self._compact(n_live)


def _no_autocast_cache(device: torch.device):
    """Autocast without its cache of cast weights: a graph must not read casts that the cache frees
    when autocast exits (the PyTorch docs on CUDA graphs ask for cache_enabled=False)."""
    if device.type != "cuda" or not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
