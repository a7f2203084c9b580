"""Speed and occupancy of the embedded shower Monte Carlo.

    python benchmarks/simulate.py [--geometry cpu,ild] [--material W] [--n 4000] [--workers 1]
                                  [--json benchmarks/results/simulate.json]

Prints showers/s (median of repeats; one process by default, i.e. one core) at 10, 50 and 100 GeV for
each geometry, both per wall-clock second and per CPU second of the process (the same on an idle
core; on a shared machine the CPU-time figure is the one that does not depend on the neighbours),
and the distribution of cells above threshold per shower. The target is >= 1000 showers/s at
50 GeV in the `cpu` geometry on one core.
"""

import argparse
import json
import os
import statistics
import time

import numpy as np

from calofm.simulation import SIMULATOR_VERSION, simulate
from provenance import cpu_name, provenance  # benchmarks/ is the script's directory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometry", default="cpu,ild", help="comma-separated presets")
    ap.add_argument("--material", default="W")
    ap.add_argument("--particle", default="gamma")
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1, help="processes (1 = one core)")
    ap.add_argument("--json", default="benchmarks/results/simulate.json")
    args = ap.parse_args()

    results = []
    print(f"{args.material} {args.particle}, {args.n} showers x {args.repeats}, {args.workers} process(es), {cpu_name()}")
    print(f"{'geometry':>8} {'E/GeV':>6} {'showers/s':>10} {'per CPU s':>10} {'hits p10':>9} {'median':>7} {'p90':>5}")
    for geometry in args.geometry.split(","):
        for energy in (10, 50, 100):
            rates, cpu_rates = [], []
            simulate(256, args.material, args.particle, energy, geometry=geometry, seed=99)  # warm-up
            for r in range(args.repeats):
                start, cpu_start = time.perf_counter(), time.process_time()
                _, showers = simulate(args.n, args.material, args.particle, energy, geometry=geometry,
                                      seed=r, workers=args.workers)
                rates.append(args.n / (time.perf_counter() - start))
                cpu_rates.append(args.n / (time.process_time() - cpu_start))
            hits = (showers > 0).sum(1)
            row = {"geometry": geometry, "energy_GeV": energy, "workers": args.workers,
                   "showers_per_s": statistics.median(rates),
                   "showers_per_cpu_s": statistics.median(cpu_rates) if args.workers == 1 else None,
                   "hits_p10": float(np.percentile(hits, 10)),
                   "hits_median": float(np.median(hits)), "hits_p90": float(np.percentile(hits, 90)),
                   "hits_max": int(hits.max())}
            results.append(row)
            cpu = f"{row['showers_per_cpu_s']:>10.0f}" if row["showers_per_cpu_s"] else f"{'-':>10}"
            print(f"{geometry:>8} {energy:>6} {row['showers_per_s']:>10.0f} {cpu} {row['hits_p10']:>9.0f} "
                  f"{row['hits_median']:>7.0f} {row['hits_p90']:>5.0f}")
    out = {**provenance(), "simulator_version": SIMULATOR_VERSION, "material": args.material,
           "particle": args.particle, "n": args.n, "workers": args.workers, "results": results}
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
