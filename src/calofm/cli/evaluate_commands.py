"""`calofm evaluate`: compare generated showers with reference showers, write a report folder."""

from __future__ import annotations

import os
import sys
import time

from calofm.cli.args import POSITIVE, SEED, THREADS, real


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="physics evaluation of generated showers against reference showers",
                       description="Compare generated with reference showers (CaloChallenge metrics plus "
                                   "reference-vs-reference noise floor); writes metrics.json, PNG figures and "
                                   "index.html into the output folder. Several generated files (materials) give "
                                   "one table with a row per material.")
    p.add_argument("--reference", nargs="+", required=True, metavar="H5",
                   help="reference shower file(s): one for all generated files, or one per generated file "
                        "(paired by material)")
    p.add_argument("--generated", nargs="+", required=True, metavar="H5", help="generated shower file(s)")
    p.add_argument("-o", "--output", required=True,
                   help="report folder (created; in an existing one calofm replaces its own files and nothing else; "
                        "metrics.json is written last, so a folder without it holds an incomplete report)")
    p.add_argument("--geometry", default=None, help="geometry of files that do not carry one (preset or .json)")
    p.add_argument("--binning", default=None, help="CaloChallenge binning XML for files without a geometry")
    p.add_argument("--threshold", type=real(0), default=0.0,
                   help="hit threshold in MeV: voxels at or below it count as empty (default 0)")
    p.add_argument("--max-showers", type=POSITIVE, default=None, help="use at most this many showers per file")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--bootstrap", type=POSITIVE, default=50, help="bootstrap replicas for per-feature errors")
    p.add_argument("--epochs", type=POSITIVE, default=30, help="maximum classifier epochs (early stopping)")
    p.add_argument("--folds", type=int, choices=range(1, 6), default=1, metavar="{1..5}",
                   help="classifier test splits measured in turn, each with a classifier trained afresh (default 1, "
                        "the CaloChallenge's one split; 5 tests every shower once and puts the retraining spread "
                        "into the error, at 5x the classifier time)")
    p.add_argument("--no-classifier", action="store_true", help="skip the classifier test (fast)")
    p.add_argument("--no-plots", action="store_true", help="metrics only")
    p.add_argument("--allow-energy-mismatch", action="store_true",
                   help="compare even when the incident-energy spectra clearly differ")
    p.add_argument("--threads", type=THREADS, default=1,
                   help="torch threads for the classifier (default 1: on a shared 2-core machine two threads "
                        "measured 4x slower; raise it on an idle many-core machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> int:
    from calofm.evaluate.compare import Options
    from calofm.evaluate.report import evaluate_files, summary_rows

    threads = args.threads
    start = time.perf_counter()
    opts = Options(seed=args.seed, n_boot=args.bootstrap, classifier=not args.no_classifier,
                   max_epochs=args.epochs, folds=args.folds, threads=threads,
                   progress=not args.quiet and sys.stderr.isatty(),
                   log=lambda msg: print(msg, flush=True))
    metrics = evaluate_files(args.reference, args.generated, args.output, geometry=args.geometry,
                             binning=args.binning, threshold_MeV=args.threshold, max_showers=args.max_showers,
                             allow_energy_mismatch=args.allow_energy_mismatch, plots=not args.no_plots, opts=opts)
    results = metrics["materials"] if "materials" in metrics else {metrics["material"]: metrics}
    print(f"\n{'material':<10}{'AUC low':>22}{'AUC high':>22}{'FPD x1e3':>22}{'KPD x1e3':>22}")
    for row in summary_rows(results):
        print(f"{row['material']:<10}" + "".join(
            f"{row[k][0]:>22}" for k in ("classifier_auc_low", "classifier_auc_high", "fpd", "kpd")))
        print(f"{'  floor':<10}" + "".join(
            f"{row[k][1]:>22}" for k in ("classifier_auc_low", "classifier_auc_high", "fpd", "kpd")))
        print(f"{'':<10}E_vis/E_inc, worst 10 GeV bin: {row['response'][0]} (floor: {row['response'][1]})")
    print(f"\nwrote {os.path.join(args.output, 'metrics.json')} and index.html in {time.perf_counter() - start:.1f} s "
          f"({threads} threads)")
    return 0
