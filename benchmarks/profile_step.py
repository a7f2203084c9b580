"""Where a decode step's GPU time goes: the torch profiler over one batch decoded by the graph
decoder (its graphs captured in an untimed first call, so the profile shows replays), and over single
eager steps of the same decoder at its full batch and a mid-shower cache window, kernel by kernel.

    python benchmarks/profile_step.py --device cuda --batches 1000,10000 --json profile.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

import calofm
from calofm.generation.decode import DecodeOptions


def top_kernels(prof, n: int = 15) -> list[dict]:
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0 and e.key and not e.key.startswith(("ProfilerStep", "cudaGraph")):
            rows.append({"name": e.key[:120], "count": e.count, "device_us": t, "self_device_us": getattr(e, "self_device_time_total", t)})
    rows.sort(key=lambda r: -r["self_device_us"])
    return rows[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="1000,10000")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--window", type=int, default=192, help="cache slots read in the eager-step profile")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sm = calofm.load("calofm-small", device=args.device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if sm.device.type == "cuda" else [])
    opt = DecodeOptions(graph=True, compile=args.compile)
    out = {"device": torch.cuda.get_device_name() if sm.device.type == "cuda" else "cpu", "precision": args.precision,
           "compile": args.compile, "batches": {}}

    def sync():
        if sm.device.type == "cuda":
            torch.cuda.synchronize()

    for B in (int(b) for b in args.batches.split(",")):
        gen = lambda: sm.generate(B, material="W", seed=3, batch_size=B, precision=args.precision, options=opt)  # noqa: E731
        gen()  # captures (and compiles)
        sync()
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            gen()
            sync()
            wall = time.perf_counter() - t0
        dec = sm.model.static_decoder
        steps = int(dec.t)
        replay = top_kernels(prof)
        total = sum(r["self_device_us"] for r in top_kernels(prof, 10 ** 6))
        # eager steps at the full batch: every kernel of a step, at one window
        sm.model.restore_decode_state(dec.state)
        dec._use(dec.buckets[B])
        dec.use_graph = False
        window = min(args.window, dec.max_hits + 2)
        from calofm.model.precision import autocast
        with autocast(sm.device, args.precision), torch.no_grad():
            dec.t.fill_(window - 9)  # a mid-shower position inside the window (the batch ended later, or capped)
            dec.step(window)
            sync()
            with profile(activities=acts) as prof_step:
                for _ in range(5):
                    dec.step(window)
                sync()
        sm.model.clear_cache()
        step_rows = top_kernels(prof_step, 25)
        n_kernels = sum(r["count"] for r in top_kernels(prof_step, 10 ** 6) if not r["name"].startswith("aten::")) / 5
        out["batches"][B] = {"wall_s": wall, "steps": steps, "device_us_per_step": total / max(steps, 1),
                             "top_kernels_replay": replay, "eager_step_top": step_rows,
                             "eager_step_kernels_approx": n_kernels}
        print(f"batch {B}: {wall:.3f} s for {steps} steps, device time {total / max(steps, 1):.0f} us per step")
        print(prof.key_averages().table(sort_by="self_device_time_total" if hasattr(prof.key_averages()[0], "self_device_time_total") else "self_cuda_time_total", row_limit=25, max_name_column_width=70))
        print(f"eager steps at batch {B}, window {args.window}:")
        print(prof_step.key_averages().table(sort_by="self_device_time_total" if hasattr(prof_step.key_averages()[0], "self_device_time_total") else "self_cuda_time_total", row_limit=30, max_name_column_width=70))
        torch.cuda.empty_cache() if sm.device.type == "cuda" else None
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
