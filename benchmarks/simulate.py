"""Speed and occupancy of the embedded shower Monte Carlo.

    python benchmarks/simulate.py [--geometry cpu] [--material W] [--n 4000] [--json benchmarks/results/simulate.json]

Prints showers/s (median of repeats, 1 process and all cores) at 10, 50 and 100 GeV, and the
distribution of cells above threshold per shower.
"""

import argparse
import json
import os
import statistics
import time

import numpy as np

from calofm.simulation import simulate
from provenance import provenance


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometry", default="cpu")
    ap.add_argument("--material", default="W")
    ap.add_argument("--particle", default="gamma")
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="benchmarks/results/simulate.json")
    args = ap.parse_args()

    cores = os.cpu_count() or 1
    results = []
    print(f"{args.material} {args.particle} on geometry {args.geometry!r}, {cores} cores, {args.n} showers x {args.repeats}")
    print(f"{'E/GeV':>6} {'workers':>7} {'showers/s':>10} {'hits p10':>9} {'median':>7} {'p90':>5}")
    for energy in (10, 50, 100):
        for workers in sorted({1, cores}):
            rates = []
            for r in range(args.repeats):
                start = time.perf_counter()
                _, showers = simulate(args.n, args.material, args.particle, energy, geometry=args.geometry,
                                      seed=r, workers=workers)
                rates.append(args.n / (time.perf_counter() - start))
            hits = (showers > 0).sum(1)
            row = {"energy_GeV": energy, "workers": workers, "showers_per_s": statistics.median(rates),
                   "hits_p10": float(np.percentile(hits, 10)), "hits_median": float(np.median(hits)),
                   "hits_p90": float(np.percentile(hits, 90)), "hits_max": int(hits.max())}
            results.append(row)
            print(f"{energy:>6} {workers:>7} {row['showers_per_s']:>10.0f} {row['hits_p10']:>9.0f} "
                  f"{row['hits_median']:>7.0f} {row['hits_p90']:>5.0f}")
    out = {**provenance(), "geometry": args.geometry,
           "material": args.material, "particle": args.particle, "n": args.n, "results": results}
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
