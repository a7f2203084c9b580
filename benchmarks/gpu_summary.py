"""Collect one GPU run's results (benchmarks/gpu_session.sh and any reruns) into one small JSON: the
speeds at each batch for each decode set-up, the diffusion baseline's, their ratios, and the AUCs of
the GPU-generated files evaluated on CPU (calofm evaluate). Reads only JSON files; prints a table.

    python benchmarks/gpu_summary.py --bench B.json --baseline B.json --compile C.json --check G.json \
        --metrics runs/gpu/eval/metrics.json --diffusion-auc benchmarks/results/speed_auc.json -o out.json
"""

from __future__ import annotations

import argparse
import json

from provenance import provenance


def load(path):
    with open(path) as fh:
        return json.load(fh)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", required=True)
    ap.add_argument("--baseline", required=True)
    ap.add_argument("--compile", default=None)
    ap.add_argument("--check", default=None)
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--diffusion-auc", required=True, help="speed_auc.json of the CPU study (same diffusion model)")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    bench, base = load(args.bench), load(args.baseline)
    rows = [r for r in bench["results"] if "error" not in r]
    if args.compile:
        rows += [r for r in load(args.compile)["results"] if "error" not in r]
    # eager and graph-replayed baseline rows apart (older files have no "graph" key: eager)
    baseline = {(r["batch"], r["steps"], bool(r.get("graph"))): r["showers_per_s"] for r in base["baseline"]}
    speeds = {}
    for r in rows:
        speeds.setdefault(r["decode"], {})[r["batch"]] = round(r["showers_per_s"], 1)
    ratios = {}
    for name, by_batch in speeds.items():
        for b, v in by_batch.items():
            for (bb, steps, graph), rate in baseline.items():
                if bb == b:
                    key = f"{steps}{' graph' if graph else ''}"
                    ratios.setdefault(name, {}).setdefault(str(b), {})[key] = round(v / rate, 2)
    metrics = load(args.metrics)
    # one material's metrics.json holds its figures at the top level, several under "materials"
    metrics = metrics["materials"] if "materials" in metrics else {metrics["material"]: metrics}
    auc = {k: {"auc_low": round(v["classifier_auc_low"], 3), "auc_high": round(v["classifier_auc_high"], 3),
               "auc_low_unc": round(v["classifier"]["low"]["auc_err"], 3),
               "auc_high_unc": round(v["classifier"]["high"]["auc_err"], 3),
               "fpd": [round(x, 1) for x in v["fpd"]], "n_generated": v["n_generated"], "reference": v["reference"]}
           for k, v in metrics.items()}
    diff = {k: {"auc_low": v["auc_low"], "auc_high": v["auc_high"]} for k, v in load(args.diffusion_auc)["rows"].items()
            if k.startswith("diffusion")}
    out = {**provenance(bench["device"]), "torch": bench["torch"], "matmul_peak_flops": bench["matmul_peak_flops"],
           "model": bench["model"], "model_params": bench["model_params"],
           "showers_per_s": speeds,
           "flops_fraction": {r["decode"] + f" @ {r['batch']}": round(r["flops_fraction"], 5) for r in rows},
           "baseline_showers_per_s": {f"batch {b}, {s} steps{', graph' if g else ''}": round(v, 1)
                                      for (b, s, g), v in baseline.items()},
           "speedup_vs_baseline": ratios,
           "simulator_showers_per_s": bench["simulator_showers_per_s"],
           "peak_memory_MB": bench["peak_memory_MB"],
           "energy_scan_ms_per_shower": {str(r["energy_GeV"]): round(r["ms_per_shower"], 2) for r in bench["energy_scan"]},
           "auc_gpu_generated": auc, "auc_diffusion_cpu_generated": diff,
           "graph_check": load(args.check) if args.check else None}
    with open(args.output, "w") as fh:
        json.dump(out, fh, indent=1)
    for name, by_batch in speeds.items():
        print(f"{name:22s}", "  ".join(f"{b}: {v:8.1f}" for b, v in sorted(by_batch.items())))
    for key, v in out["baseline_showers_per_s"].items():
        print(f"diffusion {key:22s} {v:8.1f}")
    print(json.dumps(auc, indent=1))


if __name__ == "__main__":
    main()
