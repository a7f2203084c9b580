"""How far the classifier AUC moves when only the classifier is redrawn.

    python benchmarks/classifier_spread.py REPORT_DIR [--seeds 0-9] [--levels high] [--folds 1,5]
        [--threads 1] [--json benchmarks/results/classifier_spread_cpu.json]

REPORT_DIR: a `calofm demo` or `calofm evaluate` folder; its metrics.json names the reference and
generated files of every class. The same showers are tested again with each seed (the classifier's
split, initialization and batch order) and each number of folds (`classifier_test`: 1 is the
CaloChallenge's one split and calofm's default, 5 rotates the test split over all showers). Per class,
level and number of folds it prints the mean AUC over the seeds, their standard deviation (the spread a
single evaluation carries) and the mean quoted error (the ± a single evaluation prints).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from calofm.data.showers import read_showers
from calofm.evaluate.classifier import classifier_test, high_level_inputs, low_level_inputs
from calofm.evaluate.features import compute_features
from provenance import provenance


def seeds(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def inputs(metrics: dict, level: str, threshold_MeV: float) -> tuple[np.ndarray, np.ndarray]:
    """(reference, generated) classifier inputs of one class, prepared as `calofm evaluate` prepares them
    (calofm.evaluate.report._prepare)."""
    (e_r, s_r, info), (e_g, s_g, _) = read_showers(metrics["reference"]), read_showers(metrics["generated"])
    if level == "low":
        x_r, norm = low_level_inputs(e_r, s_r)
        return x_r, low_level_inputs(e_g, s_g, norm)[0]
    f_r = compute_features(e_r, s_r, info.geometry, threshold_MeV)
    f_g = compute_features(e_g, s_g, info.geometry, threshold_MeV, f_r.profiles["hit_energy_spectrum"].edges)
    return (high_level_inputs(f_r.incident_MeV, f_r.matrix()), high_level_inputs(f_g.incident_MeV, f_g.matrix()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", help="a calofm demo / evaluate folder with metrics.json")
    ap.add_argument("--seeds", type=seeds, default=seeds("0-9"), help="classifier seeds, FIRST-LAST")
    ap.add_argument("--levels", default="high", help="comma-separated: high, low")
    ap.add_argument("--folds", default="1,5", help="comma-separated numbers of folds")
    ap.add_argument("--classes", default="", help="comma-separated classes (default: all in the report)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    path = os.path.join(args.report, "metrics.json")
    if not os.path.isfile(path):
        sys.exit(f"{args.report}: no metrics.json; not a calofm report folder")
    with open(path) as fh:
        report = json.load(fh)
    classes = report["materials"] if "materials" in report else {report["material"]: report}
    wanted = [c for c in args.classes.split(",") if c] or list(classes)
    unknown = sorted(set(wanted) - set(classes))
    if unknown:
        sys.exit(f"{path}: no class {', '.join(unknown)} (it has {', '.join(classes)})")
    folds = [int(k) for k in args.folds.split(",")]
    rows, start = [], time.perf_counter()
    print(f"{'class':<10}{'level':<6}{'folds':>6}{'mean AUC':>10}{'std over seeds':>16}{'mean quoted ±':>15}")
    for name in wanted:
        for level in args.levels.split(","):
            x_ref, x_gen = inputs(classes[name], level, report.get("threshold_MeV", 0.0))
            for k in folds:
                runs = [classifier_test(x_ref, x_gen, standardize=level == "high", seed=s, folds=k,
                                        threads=args.threads, progress=False) for s in args.seeds]
                auc = np.array([r.auc for r in runs])
                row = {"class": name, "level": level, "folds": k, "n_showers": min(len(x_ref), len(x_gen)),
                       "auc": [round(float(a), 4) for a in auc], "mean": round(float(auc.mean()), 4),
                       "std": round(float(auc.std(ddof=1)), 4),
                       "quoted_err_mean": round(float(np.mean([r.auc_err for r in runs])), 4),
                       "seconds_per_test": round(float(np.mean([r.seconds for r in runs])), 1)}
                rows.append(row)
                print(f"{name:<10}{level:<6}{k:>6}{row['mean']:>10.3f}{row['std']:>16.3f}{row['quoted_err_mean']:>15.3f}",
                      flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({**provenance(), "report": os.path.abspath(args.report), "seeds": args.seeds,
                       "threads": args.threads, "seconds": round(time.perf_counter() - start, 1), "rows": rows},
                      fh, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
