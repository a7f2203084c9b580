"""How often the compiled graph step (generation/static_decode.py, `graph + compile`) compiles as the
batch size and the compaction buckets change, and what that costs: for each batch size in turn, one
first call (captures, and compilations if any) and three timed calls, in one process, with dynamo's
count of compiled frames after each.

On CPU the step compiles once per process, precision and material. On the H100 (stop 17) it compiled
once per distinct row count (dynamo: "tensor 'dec.rows.h' size mismatch at index 0"), with SDPA and
with the explicit attention alike; this script is what found that, and is what to rerun with
`--inductor KEY=VALUE` settings to find the specializing pass:

    TORCH_LOGS=recompiles python benchmarks/recompile_probe.py --device cuda --batches 4,100,1000
    python benchmarks/recompile_probe.py --device cuda --batches 4,100 --inductor shape_padding=False

`--attention explicit` routes the cached attention of the GPU path through attention.attend_over_cache
(fused by the compiled step) instead of SDPA, for comparison: every masked SDPA call of calofm's
attention, so the prefill's too (eager, outside the compiled step); no dropout (decoding has none).
`--min-rows N` keeps the compaction buckets at N rows or more (DecodeOptions.graph_min_rows): fewer
row counts, so fewer compilations, for an A/B at a large batch within a short lease. `--window` sets
DecodeOptions.graph_window. On CPU (`--device cpu --threads 1`) the same script times the compiled
graph step against the eager decoder's figures of `calofm bench generate`.
Each batch's row is written to the JSON after its first call and again after its timed calls.
"""

from __future__ import annotations

import argparse
import ast
import json

import torch
import torch.nn.functional as F

import calofm
import calofm.model.attention as attention
from calofm.checkpoint import atomic_write_text
from calofm.cli.bench_commands import _median_time, _sync
from calofm.generation.decode import DecodeOptions


class _ExplicitAttention:
    """Stands in for torch.nn.functional inside calofm.model.attention: SDPA with a mask (the cached
    attention on a GPU) becomes attend_over_cache; everything else is F's."""

    def __getattr__(self, name):
        return getattr(F, name)

    @staticmethod
    def scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
        if attn_mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, dropout_p=dropout_p)
        return attention.attend_over_cache(q, k, v, attn_mask).to(q.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="4,100,1000,10000")
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    ap.add_argument("--attention", default="sdpa", choices=("sdpa", "explicit"))
    ap.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                    help="a torch._inductor.config setting, e.g. shape_padding=False (repeatable)")
    ap.add_argument("--min-rows", type=int, default=None, help="graph_min_rows (default: DecodeOptions')")
    ap.add_argument("--window", type=int, default=None, help="graph_window (default: DecodeOptions')")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch._inductor.config as inductor_config

    for setting in args.inductor:
        key, value = setting.split("=", 1)
        setattr(inductor_config, key, ast.literal_eval(value))
    if args.attention == "explicit":
        attention.F = _ExplicitAttention()
    sm = calofm.load("calofm-small", device=args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = {k: v for k, v in (("graph_min_rows", args.min_rows), ("graph_window", args.window)) if v is not None}
    options = DecodeOptions(graph=True, compile=True, **sizes)
    frames = torch._dynamo.utils.counters["frames"]

    def run(batch):  # timed as calofm bench generate times a graph set-up: a first call, then a median of 3
        sm.generate(batch, material="W", seed=0, options=options, precision=args.precision, batch_size=batch)
        _sync(sm.device)

    out = {"device": torch.cuda.get_device_name() if sm.device.type == "cuda" else "cpu", "torch": torch.__version__,
           "attention": args.attention, "inductor": args.inductor, "precision": args.precision,
           "graph_min_rows": options.graph_min_rows, "graph_window": options.graph_window,
           "threads": torch.get_num_threads(), "rows": []}

    def write():  # after every call that took long: a time limit keeps what was measured
        if args.json:
            atomic_write_text(args.json, json.dumps(out, indent=1))

    for batch in (int(b) for b in args.batches.split(",")):
        row = {"batch": batch, "first_call_seconds": _median_time(lambda: run(batch), 1),
               "compiled_frames_so_far": frames["ok"]}
        out["rows"].append(row)
        write()
        row.update(showers_per_s=batch / _median_time(lambda: run(batch), 3), mean_hits=sm.last_stats["mean_hits"])
        print(json.dumps(row), flush=True)
        write()


if __name__ == "__main__":
    main()
