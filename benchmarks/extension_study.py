"""Fidelity of a new material (or particle) against the number of fine-tuning showers.

    python benchmarks/extension_study.py --kind material --base calofm-small \
        --data runs/data/Pb.h5 --reference runs/data/ref/Pb.h5 --budgets 1000 10000 all \
        --out runs/study-Pb --json benchmarks/results/extension_study_Pb.json

For each budget: `calofm extend` on that many showers, generate, `calofm evaluate` against the
reference. Two references bracket the result: the base model used zero-shot (the closest known
material's experts, or the particle it starts from) as the lower one, and optionally (--upper DIR) a
model pre-trained with the new material included as the upper one. Writes JSON and a Markdown table.
"""

import argparse
import json
import os
import time

from calofm.data.showers import inspect_file
from calofm.evaluate.compare import Options
from calofm.evaluate.report import evaluate_files
from calofm.extension.adapters import closest_material
from calofm.extension.train import extend
from calofm.generation import load
from provenance import provenance

KEYS = ("classifier_auc_low", "classifier_auc_high", "fpd", "kpd")


def evaluate(reference: str, generated: str, outdir: str, seed: int) -> dict:
    m = evaluate_files([reference], [generated], outdir, plots=False,
                       opts=Options(seed=seed, n_boot=20, max_epochs=20, progress=False, log=lambda *a: None))
    return {k: m[k] for k in KEYS} | {"noise_floor": {k: m["noise_floor"][k] for k in KEYS}}


def generate(model_dir: str, adapters: list[str], material: str, particle: str, n: int, path: str, seed: int,
             no_min_p: bool = False) -> float:
    sm = load(model_dir, adapters)
    t = time.perf_counter()
    cut = 0.0 if no_min_p else None  # None: generate's default min-p
    sm.generate(n, material=material, particle=particle, energy_GeV=(10, 100), seed=seed, output=path,
                batch_size=500, min_p_voxel=cut, min_p_energy=cut)
    return time.perf_counter() - t


def upper_row(args, material: str, particle: str) -> dict:
    gen = os.path.join(args.out, "upper.h5")
    wall = generate(args.upper, [], material, particle, args.n_gen, gen, args.seed, args.no_min_p)
    return {"setting": "pre-trained with it (upper)", "showers": None, "trainable": None, "train_s": None,
            "gen_s": wall, **evaluate(args.reference, gen, os.path.join(args.out, "eval_upper"), args.seed)}


def write_table(rows: list[dict], json_path: str) -> None:
    lines = ["| setting | fine-tune showers | trainable params | train s | AUC low | AUC high | FPD ×10³ | KPD ×10³ |",
             "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: f"{v[0]:.3f} ± {v[1]:.3f}" if isinstance(v, (list, tuple)) else f"{v:.3f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['setting']} | {r['showers']} | {r['trainable']} | "
                     f"{'' if r['train_s'] is None else round(r['train_s'])} | {fmt(r['classifier_auc_low'])} | "
                     f"{fmt(r['classifier_auc_high'])} | {fmt(r['fpd'])} | {fmt(r['kpd'])} |")
    floor = rows[0]["noise_floor"]
    lines.append(f"| noise floor (ref vs ref) | | | | {fmt(floor['classifier_auc_low'])} | "
                 f"{fmt(floor['classifier_auc_high'])} | {fmt(floor['fpd'])} | {fmt(floor['kpd'])} |")
    with open(os.path.splitext(json_path)[0] + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=["material", "particle"], required=True)
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", action="append", default=[], help="adapters applied before (e.g. a material)")
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--reference", required=True, help="independent reference file of the new material/particle")
    ap.add_argument("--budgets", nargs="+", default=["1000", "10000", "all"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank of the adapters trained here")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--n-gen", type=int, default=1000)
    ap.add_argument("--trained", action="append", default=[], metavar="BUDGET=DIR",
                    help="reuse an adapter already trained for that budget (e.g. all=.../adapters/Pb)")
    ap.add_argument("--upper", default=None, help="model pre-trained with the new material (upper reference)")
    ap.add_argument("--upper-only", action="store_true",
                    help="add the --upper row to the existing --json result instead of rerunning everything")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-min-p", action="store_true",
                    help="sample without min-p truncation (how the committed results were made, before it "
                         "was the default)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()

    os.makedirs(args.out, exist_ok=True)
    trained = dict(item.split("=", 1) for item in args.trained)
    ref_info = inspect_file(args.reference)
    material, particle = ref_info.material, ref_info.particle
    if args.upper_only:
        with open(args.json) as fh:
            result = json.load(fh)
        rows = [r for r in result["rows"] if not r["setting"].startswith("pre-trained with it")]
        rows.append(upper_row(args, material, particle))
        result["rows"], result["upper"] = rows, args.upper
        result.update(provenance())
        result.setdefault("base_sha256", load(args.base).manifest["weights"]["sha256"])
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
        write_table(rows, args.json)
        return
    base = load(args.base, args.adapter)
    rows = []

    # lower reference: zero-shot with what the base already has
    if args.kind == "material":
        proxy = closest_material(material, base.materials)
        zero_shot = {"material": proxy, "particle": particle}
    else:
        proxy = base.particles[0]
        zero_shot = {"material": material, "particle": proxy}
    gen = os.path.join(args.out, "zero_shot.h5")
    wall = generate(args.base, args.adapter, zero_shot["material"], zero_shot["particle"], args.n_gen, gen, args.seed,
                    args.no_min_p)
    rows.append({"setting": f"zero-shot ({proxy})", "showers": 0, "trainable": 0, "train_s": 0.0,
                 "gen_s": wall, **evaluate(args.reference, gen, os.path.join(args.out, "eval_zero_shot"), args.seed)})
    print(rows[-1])

    for budget in args.budgets:
        n = None if budget == "all" else int(budget)
        adapter = trained.get(budget) or os.path.join(args.out, f"adapter_{budget}")
        if budget in trained:
            with open(os.path.join(adapter, "manifest.json")) as fh:
                t = json.load(fh)["training"]
        else:
            t = extend(args.kind, args.base, args.data, adapter, adapters=tuple(args.adapter), max_showers=n,
                       rank=args.rank, steps=args.steps, batch_size=args.batch_size, seed=args.seed, threads=args.threads,
                       progress=True)
        gen = os.path.join(args.out, f"gen_{budget}.h5")
        wall = generate(args.base, args.adapter + [adapter], material, particle, args.n_gen, gen, args.seed,
                        args.no_min_p)
        rows.append({"setting": f"adapter, {budget} showers, {t['steps']} steps", "showers": t["n_train_showers"],
                     "trainable": t["trainable_parameters"], "trainable_fraction": t["trainable_fraction"],
                     "train_s": t["wall_time_s"], "gen_s": wall,
                     **evaluate(args.reference, gen, os.path.join(args.out, f"eval_{budget}"), args.seed)})
        print(rows[-1])

    if args.upper:
        rows.append(upper_row(args, material, particle))

    result = {**provenance(), "kind": args.kind, "new": material if args.kind == "material" else particle, "base": args.base,
              "base_sha256": base.manifest["weights"]["sha256"], "upper": args.upper,
              "adapters_before": args.adapter, "steps": args.steps, "n_gen": args.n_gen, "rows": rows}
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=1)
    write_table(rows, args.json)


if __name__ == "__main__":
    main()
