"""The published paper's W1 and KL table (docs/evaluation.md) from `calofm evaluate` / `calofm demo` output.

    calofm demo --model calofm-ild --n 2000 -o demo-ild          # or any calofm evaluate report
    python benchmarks/published_table.py demo-ild/metrics.json [--json published_ild.json]
    python benchmarks/published_table.py W_gamma=run1/metrics.json W_e-=run2/metrics.json  # one class each

Prints one Markdown table per metric: a row per observable, a column per class, each value with the
noise floor (two halves of the reference) in parentheses. Against calofm's embedded simulator, not Geant4.
"""

import argparse
import json
import os

from calofm.evaluate.published import OBSERVABLES
from provenance import provenance


def results(metrics: dict, label: str | None = None) -> dict:
    """{class label: one comparison} of a metrics.json (one material or several); label names the class
    of a one-class report in place of its material."""
    if "materials" in metrics:
        if label:
            raise SystemExit(f"LABEL={label}: a report of several classes names its own")
        return metrics["materials"]
    return {label or metrics["material"]: metrics}


def table(per_class: dict, metric: str) -> str:
    labels = list(per_class)
    lines = ["| observable | unit | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for name, (label, unit) in OBSERVABLES.items():
        cells = []
        for r in per_class.values():
            value, floor = r["published"][metric].get(name), r["noise_floor"]["published"][metric].get(name)
            cells.append("–" if value is None else f"{value:.3g} ({floor:.2g})" if floor is not None else f"{value:.3g}")
        lines.append(f"| {label} | {unit if metric == 'wasserstein' else 'nats'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("metrics", nargs="+", help="metrics.json of calofm evaluate or calofm demo; LABEL=PATH "
                   "names the class of a one-class report (several reports: one table)")
    p.add_argument("--json", default=None, help="also write the numbers, with provenance, to this file")
    args = p.parse_args()
    per_class = {}
    for arg in args.metrics:
        label, path = (None, arg) if os.path.isfile(arg) or "=" not in arg else arg.split("=", 1)
        with open(path) as fh:
            found = results(json.load(fh), label)
        clash = sorted(set(found) & set(per_class))
        if clash:
            raise SystemExit(f"{path}: class {', '.join(clash)} given twice (name it with LABEL=PATH)")
        missing = [k for k, r in found.items() if "published" not in r]
        if missing:
            raise SystemExit(f"{path}: no published metrics for {missing} (written by an older calofm)")
        per_class.update(found)
    n = {k: (r["n_reference"], r["n_generated"]) for k, r in per_class.items()}
    print(f"showers (reference, generated) per class: {n}")
    print("\nW1 (noise floor):\n" + table(per_class, "wasserstein"))
    print("\nKL(reference || generated) (noise floor):\n" + table(per_class, "kl"))
    if args.json:
        out = {**provenance(), "source": args.metrics, "n": n,
               "published": {k: {"value": r["published"], "noise_floor": r["noise_floor"]["published"]}
                             for k, r in per_class.items()}}
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
