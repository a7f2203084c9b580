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
routing_plan and sliced_attention say. Graphs are captured anew for each batch (each decode call):
one eager warm-up step and one capture per window and bucket, ~5 % of a batch of 1000 on an H100.
Not supported: the exponential sampler (one Exp(1) per vocabulary entry would be drawn outside the
graph) and two-stage totals (target_hits).
On CPU, where there are no graphs, the same step runs eagerly: slower than decode.decode's sliced
path, kept so that the step is tested where CI runs (tests/test_fast_decode.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from calofm.generation.decode import prefill
from calofm.generation.sampler import SamplingConfig, sample
from calofm.model import ShowerTransformer
from calofm.model.moe import RoutingPlan, routing_plan
from calofm.model.sync import no_host_reads
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
    plan: RoutingPlan

    def take(self, src: torch.Tensor, orig: torch.Tensor) -> _Rows:
        return _Rows(self.h[src], self.done[src], self.used[src], orig, self.incident[src], self.material[src],
                     self.particle[src], routing_plan(self.material[src]))


class StaticDecoder:
    """Decodes one batch. The step's inputs and outputs are the buffers of `rows`, `u_voxel`,
    `u_energy`, `out_voxel`, `out_energy` and the step counter `t`; nothing else changes between steps,
    which is what lets a captured graph stand for the step."""

    def __init__(self, model: ShowerTransformer, voxel_off: torch.Tensor, energy_off: torch.Tensor,
                 max_hits: int, sampling: SamplingConfig, energy_sampling: SamplingConfig, options,
                 heads: tuple, cdf_fn, cache_dtype: torch.dtype | None):
        self.model, self.voxel_off, self.energy_off, self.max_hits = model, voxel_off, energy_off, max_hits
        self.sampling, self.energy_sampling, self.opt = sampling, energy_sampling, options
        self.voxel_logits, self.energy_logits = heads
        self.cdf_fn, self.cache_dtype = cdf_fn, cache_dtype
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # cache window -> the step captured for it

    def _caches(self) -> list:
        return [attn.kv_cache for block in self.model.blocks for attn in block.attentions()]

    def step(self) -> None:
        """One position for every row, in place (no host sync, no shape that depends on data)."""
        with no_host_reads():
            self._step()

    def _step(self) -> None:
        r, m = self.rows, self.model
        logits = self.voxel_logits(r.h).index_fill_(1, self.voxel_off, float("-inf")).masked_fill_(r.used, float("-inf"))
        v = sample(logits, self.sampling, cdf_fn=self.cdf_fn, u=self.u_voxel[r.orig])
        is_hit = ~r.done & (v != EOS)
        v = torch.where(r.done, PAD, v)
        r.done.logical_or_(v == EOS)
        e = sample(self.energy_logits(r.h, v).index_fill_(1, self.energy_off, float("-inf")), self.energy_sampling,
                   cdf_fn=self.cdf_fn, u=self.u_energy[r.orig])
        v_in, e_in = torch.where(is_hit, v, PAD), torch.where(is_hit, e, PAD)
        column = self.t.expand(len(v_in))
        self.out_voxel.index_put_((r.orig, column), v_in)  # fillers write PAD into the sink row
        self.out_energy.index_put_((r.orig, column), e_in)
        r.used.scatter_(1, v_in[:, None], True)  # PAD lands on the PAD column, masked anyway
        h, _ = m.hidden(v_in[:, None], e_in[:, None], r.incident, r.material, r.particle, start=self.t + 2,
                        valid=is_hit[:, None], plan=r.plan)
        r.h.copy_(h[:, -1])
        self.t += 1

    def _run_step(self, window: int) -> None:
        graph = self.graphs.get(window)
        if graph is not None:
            graph.replay()
            return
        for cache in self._caches():  # read while the step is traced (eagerly, or into a graph)
            cache.window = window
        if not self.use_graph:
            self.step()
            return
        # first step of this bucket and window: run it eagerly on a side stream (the warm-up that
        # capture needs), then record the step, which runs at the next replay
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = self.graphs[window] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step()

    def _window(self, t: int) -> int:
        """Cache slots read at step t (0-based): the filled t + 3, rounded up to whole windows."""
        w = self.opt.graph_window or self.max_hits + 2
        return min(self.max_hits + 2, -(-(t + 3) // w) * w)

    def _compact(self, n_live: int) -> None:
        """Move the running rows into a bucket of the next power of two >= n_live (>= graph_min_rows)."""
        B = len(self.rows.done)
        size = max(self.opt.graph_min_rows, 1 << max(n_live - 1, 0).bit_length())
        if size >= B:
            return
        live, finished = (~self.rows.done).nonzero().squeeze(1), self.rows.done.nonzero().squeeze(1)
        src = torch.cat([live, finished[:1].expand(size - n_live)])  # fillers: copies of a finished row
        orig = torch.cat([self.rows.orig[live], torch.full((size - n_live,), self.B0, device=src.device)])
        self.graphs = {}  # frees the old graphs' memory pools
        self.rows = self.rows.take(src, orig)
        self.model.select_cache_rows(src)  # layer by layer: one old layer at a time stays beside the new cache

    def run(self, incident, material, particle, generator) -> tuple:
        """-> (voxel tokens, energy tokens) (B0, max_hits), capped (B0,)."""
        model, device = self.model, incident.device
        B0 = self.B0 = incident.shape[0]
        self.use_graph = device.type == "cuda"
        # the sink row B0 takes the fillers' writes (and reads a fixed uniform)
        self.u_voxel, self.u_energy = (torch.full((B0 + 1, 1), 0.5, device=device) for _ in range(2))
        self.out_voxel, self.out_energy = (torch.full((B0 + 1, self.max_hits), PAD, dtype=torch.long, device=device)
                                           for _ in range(2))
        self.t = torch.zeros(1, dtype=torch.long, device=device)
        model.setup_cache(B0, max_len=self.max_hits + 2, dtype=self.cache_dtype, sliced=False,
                          fused_qkv=self.opt.fused_qkv, compiled_attention=self.opt.compile)
        plan = routing_plan(material)
        h = prefill(model, incident, material, particle, plan).contiguous()  # a buffer of its own
        V = model.cfg.n_voxel_tokens
        self.rows = _Rows(h, torch.zeros(B0, dtype=torch.bool, device=device),
                          torch.zeros((B0, V), dtype=torch.bool, device=device), torch.arange(B0, device=device),
                          incident, material, particle, plan)
        capped = torch.zeros(B0 + 1, dtype=torch.bool, device=device)
        on_device = torch.cuda.device(device) if self.use_graph else contextlib.nullcontext()
        with on_device, _no_autocast_cache(device):  # streams and graphs on the batch's GPU
            self._loop(generator, capped)
        self.graphs = {}
        return self.out_voxel[:B0], self.out_energy[:B0], capped[:B0]

    def _loop(self, generator, capped: torch.Tensor) -> None:
        B0 = self.B0
        for t in range(1, self.max_hits + 1):
            # drawn as decode.decode draws them: torch.rand is uniform_ on a fresh tensor
            self.u_voxel[:B0].uniform_(0, 1, generator=generator)
            self.u_energy[:B0].uniform_(0, 1, generator=generator)
            self._run_step(self._window(t - 1))
            if t % self.opt.check_every and t < self.max_hits:
                continue
            n_live = int((~self.rows.done).sum())  # a host sync, every check_every steps
            if n_live == 0:
                break
            if t == self.max_hits:  # EOS forced
                capped[self.rows.orig] = ~self.rows.done
            elif self.opt.compact and 2 * n_live <= len(self.rows.done):
                self._compact(n_live)


def _no_autocast_cache(device: torch.device):
    """Autocast without its cache of cast weights: a graph must not read casts that the cache frees
    when autocast exits (the PyTorch docs on CUDA graphs ask for cache_enabled=False)."""
    if device.type != "cuda" or not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
