"""The scale every model result is read against: noise floor and material separations on simulator data.

    python benchmarks/evaluate.py [--n 10000] [--data-dir /tmp/calofm-bench] [--json benchmarks/results/evaluate.json]

Simulates photons, 10-100 GeV uniform, cpu geometry: W twice (seeds 1, 2), Ta and Pb. Then, through
the command line as a user runs it, and timed end to end (process start, reading, features, metrics,
classifier, figures, report):
  1. W (seed 2) against W (seed 1): the full 10k-vs-10k evaluation and its noise floor;
  2. Ta and Pb against W (seed 1): one call, one table.
Prints AUCs, JSDs, FPD, KPD and wall times; writes them to --json.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from calofm.simulation import simulate_to_file
from provenance import provenance

SAMPLES = {"W_ref": ("W", 1), "W_gen": ("W", 2), "Ta": ("Ta", 3), "Pb": ("Pb", 4)}
KEYS = ("classifier_auc_low", "classifier_auc_high", "jsd_low", "jsd_high")


def row(m: dict) -> dict:
    u = m["uncertainties"]
    out = {k: [round(m[k], 4), round(u[k], 4)] for k in KEYS}
    out.update(fpd=[round(v, 1) for v in m["fpd"]], kpd=[round(v, 3) for v in m["kpd"]],
               n_reference=m["n_reference"], n_generated=m["n_generated"])
    return out


def evaluate(ref: str, gens: list[str], out: str, threads: int) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "calofm.cli.main", "evaluate", "--reference", ref, "--generated", *gens,
           "-o", out, "--quiet", "--threads", str(threads)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - start
    with open(os.path.join(out, "metrics.json")) as fh:
        return json.load(fh), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000, help="showers per sample")
    ap.add_argument("--data-dir", default="/tmp/calofm-bench")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="benchmarks/results/evaluate.json")
    args = ap.parse_args()
    os.makedirs(args.data_dir, exist_ok=True)
    paths = {}
    for name, (material, seed) in SAMPLES.items():
        paths[name] = os.path.join(args.data_dir, f"{name}_{args.n}.h5")
        if not os.path.exists(paths[name]):
            simulate_to_file(paths[name], args.n, material=material, particle="gamma", energy_GeV=(10, 100),
                             geometry="cpu", seed=seed, progress=False)

    same, t_same = evaluate(paths["W_ref"], [paths["W_gen"]], os.path.join(args.data_dir, "report_W"), args.threads)
    mats, t_mats = evaluate(paths["W_ref"], [paths["Ta"], paths["Pb"]], os.path.join(args.data_dir, "report_TaPb"),
                            args.threads)
    results = {
        "noise_floor (W half vs W half)": row(same["noise_floor"]),
        "W (seed 2) vs W": row(same),
        "Ta vs W": row(mats["materials"]["Ta"]),
        "Pb vs W": row(mats["materials"]["Pb"]),
    }
    print(f"\n{'comparison':<32}" + "".join(f"{h:>22}" for h in ("AUC low", "AUC high", "JSD low", "JSD high",
                                                                 "FPD x1e3", "KPD x1e3")))
    for name, r in results.items():
        print(f"{name:<32}" + "".join(f"{f'{r[k][0]:.4g} ± {r[k][1]:.2g}':>22}" for k in (*KEYS, "fpd", "kpd")))
    print(f"\n{args.n} vs {args.n} showers, W vs W with noise floor and all figures: {t_same:.1f} s wall "
          f"({args.threads} torch thread(s), {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f})")
    print(f"Ta and Pb vs W in one call: {t_mats:.1f} s wall")
    record = {
        **provenance(),
        "n": args.n, "particle": "gamma", "energy_GeV": [10, 100], "geometry": "cpu", "threads": args.threads,
        "seconds_10k_vs_10k": round(t_same, 1), "seconds_two_materials": round(t_mats, 1),
        "load_average_1min_after": round(os.getloadavg()[0], 2), "results": results,
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform()},
    }
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(record, fh, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
