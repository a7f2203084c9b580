"""Sharded generation: N processes x 1 thread under torchrun against 1 process x N threads.

Runs `calofm generate` in one process with --threads N, under torchrun with N ranks of one thread
each (gloo, CPU), and, for scale, in one process with one thread, on the same showers (model, seed,
n); merges the shards and checks that the merged file holds the one-process showers. Records the
generation rate each prints (showers/s over the generation itself; under torchrun all showers over
the slowest rank's time) and the wall time of each command (start-up and model loading included).
Repeats alternate the set-ups. Prints a table and writes JSON (commit, device, command).

    python benchmarks/shard_rate.py --model calofm-small --n 200 --processes 2 --repeats 2 \\
        --json benchmarks/results/shard_rate_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np

from calofm.checkpoint import atomic_write_text
from provenance import provenance  # benchmarks/ is the script's directory

# the summary lines of calofm.sharding.summarize: torchrun's rank 0 total, or a lone process's own line
TOTAL = re.compile(r"all \d+ ranks: \d+ showers in [\d.]+ s \(([\d.]+) showers/s\)")
ALONE = re.compile(r"^wrote (\d+) showers to \S+ in ([\d.]+) s", re.M)


def run(cmd: list[str], threads: int) -> tuple[float, float, str]:
    """(generation showers/s from the command's summary, wall s, stdout)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    total, alone = TOTAL.search(out.stdout), ALONE.search(out.stdout)
    return float(total[1]) if total else int(alone[1]) / float(alone[2]), wall, out.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="calofm-small")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    N = args.processes
    calofm = [sys.executable, "-m", "calofm.cli.main"]
    gen = ["generate", "--model", args.model, "--n", str(args.n), "--seed", str(args.seed), "--no-progress"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        single, sharded = os.path.join(tmp, "single.h5"), os.path.join(tmp, "sharded.h5")
        for r in range(args.repeats):
            rate1, wall1, _ = run(calofm + gen + ["--threads", str(N), "-o", single, "--force"], N)
            rate_one, wall_one, _ = run(calofm + gen + ["--threads", "1", "-o", single + ".1", "--force"], 1)
            # "--": torchrun would take calofm's --n for an abbreviation of one of its own options
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(N), "-m", "--",
                        "calofm.cli.main"]
            rateN, wallN, out = run(torchrun + gen + ["--threads", "1", "-o", sharded, "--force"], 1)
            rows.append({"repeat": r, "one_process_showers_per_s": rate1, "one_process_wall_s": round(wall1, 2),
                         "one_thread_showers_per_s": rate_one, "one_thread_wall_s": round(wall_one, 2),
                         "torchrun_showers_per_s": rateN, "torchrun_wall_s": round(wallN, 2),
                         "ratio": round(rateN / rate1, 3), "torchrun_stdout": out.strip().splitlines()[-N - 1:]})
            print(f"repeat {r}: 1 x {N} threads {rate1:.2f} showers/s ({wall1:.1f} s wall), torchrun {N} x 1 thread "
                  f"{rateN:.2f} showers/s ({wallN:.1f} s wall): x{rateN / rate1:.3f}; 1 x 1 thread {rate_one:.2f} "
                  f"showers/s ({wall_one:.1f} s wall)", flush=True)
        merged = os.path.join(tmp, "merged.h5")
        shards = [os.path.join(tmp, f"sharded.shard-{k}-of-{N}.h5") for k in range(N)]
        subprocess.run(calofm + ["merge", *shards, "-o", merged], check=True, capture_output=True)
        with h5py.File(single, "r") as a, h5py.File(merged, "r") as b:
            identical = bool(np.array_equal(a["showers"][:], b["showers"][:])
                             and np.array_equal(a["incident_energies"][:], b["incident_energies"][:]))
    mean = lambda k: float(np.mean([r[k] for r in rows]))  # noqa: E731
    result = {**provenance(), "model": args.model, "n": args.n, "processes": N, "rows": rows,
              "one_process_showers_per_s": round(mean("one_process_showers_per_s"), 2),
              "torchrun_showers_per_s": round(mean("torchrun_showers_per_s"), 2),
              "one_thread_showers_per_s": round(mean("one_thread_showers_per_s"), 2),
              "ratio": round(mean("torchrun_showers_per_s") / mean("one_process_showers_per_s"), 3),
              "identical_showers": identical}
    print(f"mean: 1 x {N} threads {result['one_process_showers_per_s']:.2f} showers/s, torchrun {N} x 1 thread "
          f"{result['torchrun_showers_per_s']:.2f} showers/s (x{result['ratio']:.3f}), 1 x 1 thread "
          f"{result['one_thread_showers_per_s']:.2f} showers/s; merged shards identical to "
          f"the one-process file: {identical}")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
