"""Fidelity against training compute: classifier AUC of snapshots of one training run.

    python benchmarks/learning_curve.py MODEL_DIR [MODEL_DIR ...] --run LABEL [--materials W,Ta,Cu] [--n 1000]
        [--min-p ENERGY,VOXEL] [--json benchmarks/results/learning_curve_cpu.json] [--plot docs/img/learning_curve.png]

Each MODEL_DIR is a model directory (a run directory, one of its checkpoints/step-N, or a copy of
one); its manifest says how many tokens it had seen, with those of the model a warm start began from.
For every model and material: generate --n
showers (fp32, seed 1, 10-100 GeV uniform, cpu geometry), simulate as many reference showers with a
seed no training stream uses, and run `calofm evaluate --no-plots` on them, as a user would. Rows are
keyed by (weights sha256, material, run) and merged into --json, so points can be added as a run goes on;
each row also records --run (which training run the snapshot belongs to) and the generation's min-p
cuts. The figure shows the high-level (left) and low-level (right) AUC against tokens seen, a colour
per material and a line style per run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from calofm.checkpoint import atomic_write_text, read_manifest
from provenance import provenance  # benchmarks/ is the script's directory

STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "v"), ((0, (5, 1, 1, 1)), "D"), ((0, (1, 1)), "P"))
REFERENCE_SEED = 424242  # simulation seed of the reference showers; no training stream starts from it


def evaluate_point(model_dir: str, material: str, n: int, work: str, threads: int, run: str,
                   min_p: dict[str, float] | None = None) -> dict:
    """One point; min_p {"energy", "voxel"}: the generation's cuts (None: the model's own)."""
    from calofm.generation import load
    from calofm.simulation import SIMULATOR_VERSION, simulate_to_file

    manifest = read_manifest(model_dir)
    ref = os.path.join(work, f"ref_{material}_{n}_v{SIMULATOR_VERSION}.h5")
    if not os.path.exists(ref):
        simulate_to_file(ref, n, material=material, particle="gamma", energy_GeV=(10, 100), geometry="cpu",
                         seed=REFERENCE_SEED, progress=False)
    sha = manifest["weights"]["sha256"]
    gen = os.path.join(work, f"gen_{sha[:12]}_{material}.h5")
    start = time.perf_counter()
    model = load(model_dir)
    cuts = dict(model.min_p if min_p is None else min_p)
    model.generate(n, material=material, particle="gamma", energy_GeV=(10, 100), seed=1, output=gen, progress=False,
                   min_p_energy=cuts["energy"], min_p_voxel=cuts["voxel"])
    gen_s = time.perf_counter() - start
    report = os.path.join(work, f"report_{sha[:12]}_{material}")
    subprocess.run([sys.executable, "-m", "calofm.cli.main", "evaluate", "--reference", ref, "--generated", gen,
                    "-o", report, "--no-plots", "--quiet", "--threads", str(threads)], check=True)
    with open(os.path.join(report, "metrics.json")) as fh:
        m = json.load(fh)
    training = manifest.get("training", {})
    u = m["uncertainties"]
    return {"run": run, "model": os.path.abspath(model_dir), "sha256": sha, "material": material,
            # a warm start (--init-from) counts the compute of the model it started from
            "tokens_seen": training.get("tokens_seen_total", training.get("tokens_seen")), "steps": training.get("steps"),
            "wall_time_s": training.get("wall_time_s_total", training.get("wall_time_s")),
            "init_from": training.get("init_from", {}).get("sha256"), "simulator_version": training.get("simulator_version"),
            "response": m.get("response", {}).get("worst"),
            "min_p": cuts, "n": n,
            "auc_high": round(m["classifier_auc_high"], 4), "auc_high_err": round(u["classifier_auc_high"], 4),
            "auc_low": round(m["classifier_auc_low"], 4), "auc_low_err": round(u["classifier_auc_low"], 4),
            "fpd": [round(v, 1) for v in m["fpd"]], "generate_s": round(gen_s, 1)}


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 2, figsize=(10, 5.2), sharey=True)
    runs = list(dict.fromkeys(r["run"] for r in rows))  # in the order of the JSON
    materials = sorted({r["material"] for r in rows})
    style = {run: STYLES[j % len(STYLES)] for j, run in enumerate(runs)}  # (line style, marker) per run
    for ax, key, name in ((axes[0], "auc_high", "high-level"), (axes[1], "auc_low", "low-level")):
        for run in runs:
            for i, material in enumerate(materials):
                pts = sorted((r for r in rows if r["material"] == material and r["run"] == run),
                             key=lambda r: r["tokens_seen"])
                if not pts:
                    continue
                x = [r["tokens_seen"] / 1e6 for r in pts]
                ls, marker = style[run]
                ax.errorbar(x, [r[key] for r in pts], [r[key + "_err"] for r in pts], color=f"C{i}", ls=ls,
                            marker=marker, ms=4)
        ax.axhline(0.6, color="k", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.text(0.98, 0.605, "target 0.60", transform=ax.get_yaxis_transform(), ha="right", va="bottom", fontsize=8)
        ax.set_xlabel("training tokens seen [millions]")
        ax.set_title(f"{name} classifier", fontsize=9)
    axes[0].set_ylabel("classifier AUC (generated vs simulated)")
    axes[0].set_ylim(0.45, 1.0)
    # one legend below both panels: a colour per material, a line style and marker per run
    handles = [Line2D([], [], color=f"C{i}", lw=6, label=f"{m} γ") for i, m in enumerate(materials)]
    handles += [Line2D([], [], color="k", ls=ls, marker=marker, ms=4, label=run)
                for run, (ls, marker) in style.items()]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.02 + 0.035 * ((len(handles) + 1) // 2), 1, 1))
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="model directories (snapshots of one run)")
    ap.add_argument("--run", required=True, help="label of the training run, e.g. 'energy order'")
    ap.add_argument("--materials", default="W,Ta,Cu")
    ap.add_argument("--n", type=int, default=1000, help="generated and simulated showers per point")
    ap.add_argument("--work", default="/tmp/calofm-learning-curve", help="folder for the shower files and reports")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-p", default=None, metavar="ENERGY,VOXEL",
                    help="the generation's min-p cuts (default: each model's own, ShowerModel.min_p), e.g. to "
                         "measure a run's snapshots with the cuts of the model it became")
    ap.add_argument("--json", default="benchmarks/results/learning_curve_cpu.json")
    ap.add_argument("--plot", default="docs/img/learning_curve_cpu.png", help="'' = no figure")
    ap.add_argument("--title", default="calofm-small, 1000 generated vs 1000 simulated per point (embedded "
                                       "simulator), cpu geometry, 10-100 GeV photons")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from calofm.generation.sampler import min_p_defaults

    min_p = None
    if args.min_p is not None:
        try:
            energy, voxel = (float(x) for x in args.min_p.split(","))
            min_p = min_p_defaults({"energy": energy, "voxel": voxel}, "--min-p")
        except ValueError as err:
            ap.error(f"--min-p {args.min_p!r}: give ENERGY,VOXEL, each a number in [0, 1] ({err})")
    os.makedirs(args.work, exist_ok=True)
    record = {"rows": []}
    if os.path.exists(args.json):
        with open(args.json) as fh:
            record = json.load(fh)
    for model_dir in args.models:
        for material in args.materials.split(","):
            row = evaluate_point(model_dir, material, args.n, args.work, args.threads, args.run, min_p)
            key = (row["sha256"], material, args.run)
            record["rows"] = [r for r in record["rows"] if (r["sha256"], r["material"], r["run"]) != key]
            record["rows"].append(row)
            record["rows"].sort(key=lambda r: (r["run"], r["material"], r["tokens_seen"] or 0))
            record.update(provenance())
            os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
            atomic_write_text(args.json, json.dumps(record, indent=1) + "\n")
            print(f"{material} {row['tokens_seen'] / 1e6:7.2f} M tokens: AUC high {row['auc_high']:.3f} "
                  f"± {row['auc_high_err']:.3f}, low {row['auc_low']:.3f}  ({model_dir})", flush=True)
    if args.plot:
        plot(record["rows"], args.plot, args.title)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
