"""The fidelity targets of a model, read off a `calofm demo` report, one-stage and with the energy totals.

    calofm demo --n 5000 --seed 1000 -o runs/eval5000            # 5000 vs 5000 per class
    python benchmarks/fidelity_targets.py runs/eval5000 [--model calofm-small] \\
        [--json benchmarks/results/fidelity_targets_cpu.json]

For every class of the report: the classifier AUCs (high / low level) and their noise floor from its
metrics.json, and the response E_vis/E_inc per 10 GeV of incident energy (calofm.evaluate.metrics,
response_by_energy: worst bin's mean, IQR ratio, share beyond the simulated maximum) computed from the
report's shower files. Then the same generated showers with `--totals energy` applied
(ShowerModel.energy_given_hits, with each shower's own random stream, so exactly what `calofm generate
--totals energy --seed S` writes) are evaluated again with `calofm evaluate`'s code. The targets: AUC
high <= 0.60 (pre-trained classes) or 0.65 (adapter classes), mean within 1 %, IQR within 10 %, at most
0.5 % beyond the maximum.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import h5py
import numpy as np

from calofm.checkpoint import atomic_write_text
from provenance import provenance  # benchmarks/ is the script's directory

PRETRAINED_AUC, ADAPTER_AUC = 0.60, 0.65
MEAN_TOL, IQR_TOL, BEYOND_TOL = 0.01, 0.10, 0.005


def read(path: str) -> tuple[np.ndarray, np.ndarray, dict]:
    with h5py.File(path, "r") as f:
        return f["incident_energies"][:].reshape(-1), f["showers"][:], dict(f.attrs)


def meets(worst: dict, auc_high: float, auc_target: float) -> dict:
    return {"auc_high": auc_high <= auc_target, "mean": abs(worst["mean_rel_diff"]) <= MEAN_TOL,
            "iqr": abs(worst["iqr_ratio"] - 1) <= IQR_TOL, "beyond_max": worst["beyond_max_fraction"] <= BEYOND_TOL}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", help="a calofm demo output folder (metrics.json, data/)")
    ap.add_argument("--model", default="calofm-small", help="the model the demo ran (for its totals laws)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    import torch

    import calofm
    from calofm.evaluate.compare import Options
    from calofm.evaluate.metrics import response_by_energy
    from calofm.evaluate.report import evaluate_files
    from calofm.generation.streams import TOTALS, shower_normals
    from calofm.tokenizer.totals import class_key

    torch.set_num_threads(args.threads)
    with open(os.path.join(args.report, "metrics.json")) as fh:
        metrics = json.load(fh)
    with open(os.path.join(args.report, "summary.json")) as fh:
        summary = json.load(fh)
    model = calofm.load(args.model, adapters=summary.get("adapters", []))
    pretrained = set(model.manifest["materials"])  # the base's manifest: adapters add theirs elsewhere
    rows = []
    for label, m in metrics["materials"].items():
        inc_r, ref, _ = read(m["reference"])
        inc_g, gen, attrs = read(m["generated"])
        key = class_key(str(attrs["material"]), str(attrs["particle"]))
        auc_target = PRETRAINED_AUC if attrs["material"] in pretrained and attrs["particle"] == "gamma" else ADAPTER_AUC
        one = response_by_energy(inc_r, ref.sum(1) / inc_r, inc_g, gen.sum(1) / inc_g)
        normals = shower_normals(int(attrs["seed"]), np.arange(len(inc_g)), TOTALS, 2).numpy()
        rescaled = model.energy_given_hits(key, inc_g, gen, normals)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"{label}.h5")
            model.write(path, inc_g, rescaled, str(attrs["material"]), str(attrs["particle"]), int(attrs["seed"]))
            energy = evaluate_files([m["reference"]], [path], os.path.join(tmp, "report"), plots=False,
                                    opts=Options(seed=metrics["seed"], threads=args.threads, progress=False,
                                                 log=lambda msg: None))
        row = {"class": label, "n_reference": m["n_reference"], "n_generated": m["n_generated"],
               "auc_target": auc_target,
               "floor_auc_high": m["noise_floor"]["classifier_auc_high"],
               "floor_auc_low": m["noise_floor"]["classifier_auc_low"]}
        for mode, r, resp in (("one_stage", m, one), ("energy_totals", energy, energy["response"])):
            row[mode] = {"auc_high": r["classifier_auc_high"], "auc_high_err": r["uncertainties"]["classifier_auc_high"],
                         "auc_low": r["classifier_auc_low"], "auc_low_err": r["uncertainties"]["classifier_auc_low"],
                         "response_worst": resp["worst"],
                         "response_bins": [{k: b[k] for k in ("GeV", "mean_rel_diff", "iqr_ratio", "beyond_max_fraction")}
                                           for b in resp["bins"]],
                         "meets": meets(resp["worst"], r["classifier_auc_high"], auc_target)}
        rows.append(row)
        for mode in ("one_stage", "energy_totals"):
            r, w = row[mode], row[mode]["response_worst"]
            print(f"{label:10s} {mode:14s} AUC high {r['auc_high']:.3f} (target {auc_target}, floor "
                  f"{row['floor_auc_high']:.3f}) low {r['auc_low']:.3f}; E_vis/E_inc worst bin: mean "
                  f"{100 * w['mean_rel_diff']:+.1f} %, IQR x{w['iqr_ratio']:.2f}, "
                  f"{100 * w['beyond_max_fraction']:.2f} % beyond max; met: "
                  f"{', '.join(k for k, v in r['meets'].items() if v) or 'none'}", flush=True)
    if args.json:
        record = {"model": args.model, "adapters": summary.get("adapters", []), "report": args.report,
                  "n_per_sample": summary.get("n_per_sample"), "seed": metrics["seed"],
                  "data": "embedded simulator (not Geant4), cpu geometry, 10-100 GeV uniform",
                  "targets": {"auc_high_pretrained": PRETRAINED_AUC, "auc_high_adapters": ADAPTER_AUC,
                              "mean": MEAN_TOL, "iqr": IQR_TOL, "beyond_max": BEYOND_TOL},
                  "rows": rows, **provenance()}
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        atomic_write_text(args.json, json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
