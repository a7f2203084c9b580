"""Whether int8 weight-only matmuls pay on this CPU (issue 6: "optionally int8 weight-only on CPU if it
pays"): the layer shapes of calofm-small (d = 128: QKV, the expert projections, the voxel head) at the
row counts a decode step meets, timed as fp32, bf16 and int8 weights with per-channel scales
(`torch.ops.aten._weight_int8pack_mm`, gpt-fast's CPU path, bf16 activations). Medians of 5 runs of
200 calls, 1 thread; also the largest error of the int8 result against fp32.

    python benchmarks/int8_weights.py --json benchmarks/results/int8_weights.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from calofm.checkpoint import atomic_write_text

SHAPES = {"qkv (128 -> 384)": (128, 384), "expert in (128 -> 256)": (128, 256),
          "expert out (256 -> 128)": (256, 128), "voxel head (128 -> 4503)": (128, 4503)}


def cpu_name() -> str:
    """The CPU's model name (platform.processor() gives only the architecture on Linux)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_us(fn, calls: int = 200, runs: int = 5) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="4,25,100,1000")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for m in (int(r) for r in args.rows.split(",")):
        for name, (k, n) in SHAPES.items():
            x, w = torch.randn(m, k), torch.randn(n, k) / k ** 0.5
            xb, wb = x.bfloat16(), w.bfloat16()
            scale = w.abs().amax(1) / 127  # per output channel
            wq = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
            sb = scale.bfloat16()
            exact = F.linear(x, w)
            row = {"rows": m, "layer": name,
                   "fp32_us": median_us(lambda: F.linear(x, w)),
                   "bf16_us": median_us(lambda: F.linear(xb, wb)),
                   "int8_us": median_us(lambda: torch.ops.aten._weight_int8pack_mm(xb, wq, sb)),
                   "int8_max_abs_err": float((torch.ops.aten._weight_int8pack_mm(xb, wq, sb).float() - exact).abs().max()),
                   "bf16_max_abs_err": float((F.linear(xb, wb).float() - exact).abs().max())}
            row["int8_over_bf16"] = row["int8_us"] / row["bf16_us"]
            rows.append(row)
            print(f"{m:5d} rows  {name:26s} fp32 {row['fp32_us']:8.1f} us  bf16 {row['bf16_us']:8.1f} us  "
                  f"int8 {row['int8_us']:8.1f} us  (int8/bf16 x{row['int8_over_bf16']:.2f})", flush=True)
    if args.json:
        out = {"device": cpu_name(), "threads": args.threads,
               "torch": torch.__version__, "rows": rows}
        atomic_write_text(args.json, json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
