"""Min-p truncation of the voxel and energy heads: which setting gives showers closest to the simulator's.

    python benchmarks/min_p_study.py [--model calofm-small] [--energy 0,3e-3,1e-2] [--voxel 0,3e-4,1e-3,3e-3]
        [--n 1000] [--tune W:1,W:2,Ta:1,Cu:1] [--check W:3,Ta:2,Cu:2] [--tolerance 0.03] [--folds 1]
        [--ref-dir runs/data/ref] [--data-dir /tmp/calofm-minp] [--json benchmarks/results/min_p_study.json]

Min-p keeps a token only if its probability is at least min_p times that of the row's most probable
token (calofm.generation.sampler). The study generates `--n` photons (10-100 GeV, `--model`, fp32,
batch 1000) for every (energy, voxel) pair and every tuning sample (MATERIAL:SEED), evaluates each
against the reference file `--ref-dir/MATERIAL.h5` (10 000 simulated showers; simulated into
--data-dir when absent) with `calofm evaluate`'s metrics, and picks, among the pairs that make no
material's mean AUC worse than min-p off by more than --tolerance (about the AUC uncertainty at 1000
showers), the one with the lowest mean of (AUC low + AUC high) / 2 over the tuning samples. The pick
and min-p off are then evaluated on samples not used to choose (`--check`). `--folds K` measures each
AUC as `calofm evaluate --folds K` does (the mean over K test splits, docs/evaluation.md): a single
split at 1000 showers scatters by up to 0.07, five folds by 0.01-0.02. Besides the AUCs, FPD and
KPD, each row has the physics summary of `physics` (resolution, hit count, tail, transverse spread).
All on the embedded simulator's showers, not Geant4.
"""

import argparse
import functools
import json
import os
import time

import numpy as np
import torch

import calofm
from calofm.checkpoint import atomic_write_text
from calofm.data.showers import inspect_file, read_showers
from calofm.evaluate.classifier import N_PARTS
from calofm.evaluate.compare import Options
from calofm.evaluate.features import compute_features
from calofm.evaluate.report import evaluate_files
from calofm.simulation import simulate_to_file
from provenance import provenance

REF_SEED = 101  # the seed of runs/data/ref/*.h5 (calofm simulate --n 10000 --seed 101)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def reference(material: str, args) -> str:
    path = os.path.join(args.ref_dir, f"{material}.h5")
    if os.path.exists(path):
        return path
    path = os.path.join(args.data_dir, f"ref_{material}.h5")
    if not os.path.exists(path):
        simulate_to_file(path, args.n_ref, material=material, particle="gamma", energy_GeV=(10, 100),
                         geometry="cpu", seed=REF_SEED, progress=False)
    return path


@functools.lru_cache(maxsize=None)
def load(path: str):
    """Incident energies (N,), showers (N, V) and their features; each file read once."""
    e, s, info = read_showers(path)
    return e, s, compute_features(e, s, info.geometry)


def physics(ref_path: str, gen_path: str) -> dict:
    """What a physicist reads off first, generated vs reference: the visible-energy fraction's relative
    spread (the resolution), the hit count, the tail (showers with a cell above the reference's largest
    cell fraction, largest E_vis / E_inc), and the median over layers of the generated / reference ratio
    of the spread of the transverse centre (cx) and of the mean and spread of the width (wx)."""
    (e_ref, s_ref, f_ref), (e_gen, s_gen, f_gen) = load(ref_path), load(gen_path)
    cx = [n for n in f_ref.names if n.startswith("cx_")]
    wx = [n for n in f_ref.names if n.startswith("wx_")]

    def ratio(names, stat):  # over the layers where the reference's value is not 0 (empty deep Cu layers)
        pairs = [(stat(f_gen.scalars[n]), stat(f_ref.scalars[n])) for n in names]
        return round(float(np.median([g / r for g, r in pairs if r > 0])), 3)

    def spread(e, s):
        frac = s.sum(axis=1) / e
        return round(float(frac.std() / frac.mean()), 4)

    hits_ref, hits_gen = (s_ref > 0).sum(axis=1), (s_gen > 0).sum(axis=1)
    return {"evis_rel_spread": spread(e_gen, s_gen), "ref_evis_rel_spread": spread(e_ref, s_ref),
            "hits_mean_sd": [round(float(hits_gen.mean()), 1), round(float(hits_gen.std()), 1)],
            "ref_hits_mean_sd": [round(float(hits_ref.mean()), 1), round(float(hits_ref.std()), 1)],
            "showers_above_ref_max_cell": int(np.count_nonzero(
                s_gen.max(axis=1) / e_gen > (s_ref.max(axis=1) / e_ref).max())),
            "evis_fraction_max": round(float((s_gen.sum(axis=1) / e_gen).max()), 5),
            "ref_evis_fraction_max": round(float((s_ref.sum(axis=1) / e_ref).max()), 5),
            "cx_sd_ratio": ratio(cx, np.std), "wx_mean_ratio": ratio(wx, np.mean), "wx_sd_ratio": ratio(wx, np.std)}


def made_by(path: str, model, min_p_energy: float, min_p_voxel: float) -> bool:
    """Whether a file kept from an earlier run is this model's sample with these cuts."""
    if not os.path.exists(path):
        return False
    attrs = inspect_file(path).attrs
    if not all(k in attrs for k in ("model_sha256", "sampling", "energy_sampling")):
        return False
    return (attrs["model_sha256"] == model.manifest["weights"]["sha256"]
            and json.loads(attrs["sampling"])["min_p"] == min_p_voxel
            and json.loads(attrs["energy_sampling"])["min_p"] == min_p_energy)


def generate(model, material: str, seed: int, min_p_energy: float, min_p_voxel: float, args) -> str:
    path = os.path.join(args.data_dir, f"{material}_n{args.n}_e{min_p_energy:g}_v{min_p_voxel:g}_s{seed}.h5")
    if not made_by(path, model, min_p_energy, min_p_voxel):  # kept between runs: a rerun only re-evaluates
        model.generate(args.n, material=material, seed=seed, batch_size=1000, min_p_voxel=min_p_voxel,
                       min_p_energy=min_p_energy, output=path + ".tmp")
        os.replace(path + ".tmp", path)
    return path


def evaluate(model, material: str, runs: list[tuple[int, float, float]], args) -> list[dict]:
    """Generate (seed, min_p_energy, min_p_voxel) samples of one material; one evaluation against its
    reference (whose features and noise floor are then computed once)."""
    paths = [generate(model, material, *run, args) for run in runs]
    ref = reference(material, args)
    m = evaluate_files([ref], paths, os.path.join(args.data_dir, f"eval_{material}_{len(paths)}"), plots=False,
                       opts=Options(seed=0, folds=args.folds, progress=False, log=lambda *a: None))
    by_file = {r["generated"]: r for r in (m["materials"].values() if "materials" in m else [m])}
    rows = []
    for (seed, min_p_energy, min_p_voxel), path in zip(runs, paths):
        r = by_file[path]
        row = {"material": material, "seed": seed, "min_p_energy": min_p_energy, "min_p_voxel": min_p_voxel,
               "auc_low": round(r["classifier_auc_low"], 4), "auc_high": round(r["classifier_auc_high"], 4),
               "auc_error": round(max(r["uncertainties"]["classifier_auc_low"],
                                      r["uncertainties"]["classifier_auc_high"]), 4),
               "fpd": [round(v, 1) for v in r["fpd"]], "kpd": [round(v, 2) for v in r["kpd"]], **physics(ref, path)}
        rows.append(row)
        print(f"{material} seed {seed} min-p energy {min_p_energy:g} voxel {min_p_voxel:g}: AUC {row['auc_low']:.3f} / "
              f"{row['auc_high']:.3f}  FPD {row['fpd'][0]:.0f}  KPD {row['kpd'][0]:.1f}  E_vis spread "
              f"{row['evis_rel_spread']:.3f} (ref {row['ref_evis_rel_spread']:.3f})  "
              f"{row['showers_above_ref_max_cell']} showers above the reference's largest cell", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="calofm-small", help="shipped model name or model directory")
    ap.add_argument("--energy", default="0,3e-3,1e-2", help="min-p values of the energy head")
    ap.add_argument("--voxel", default="0,3e-4,1e-3,3e-3", help="min-p values of the voxel head")
    ap.add_argument("--n", type=int, default=1000, help="generated showers per sample")
    ap.add_argument("--n-ref", type=int, default=10000, help="simulated reference showers, when simulated here")
    ap.add_argument("--tune", default="W:1,W:2,Ta:1,Cu:1", help="tuning samples MATERIAL:SEED")
    ap.add_argument("--check", default="W:3,Ta:2,Cu:2", help="held-out samples MATERIAL:SEED ('' = none)")
    ap.add_argument("--tolerance", type=float, default=0.03,
                    help="largest allowed rise of a material's mean AUC over min-p off")
    ap.add_argument("--folds", type=int, default=1, choices=range(1, N_PARTS + 1),
                    help="classifier test splits per AUC (calofm evaluate --folds)")
    ap.add_argument("--ref-dir", default="runs/data/ref")
    ap.add_argument("--data-dir", default="/tmp/calofm-minp")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="benchmarks/results/min_p_study.json")
    args = ap.parse_args()
    os.makedirs(args.data_dir, exist_ok=True)
    torch.set_num_threads(args.threads)
    model = calofm.load(args.model)
    start = time.time()
    grid = [(e, v) for e in floats(args.energy) for v in floats(args.voxel)]
    if (0.0, 0.0) not in grid:
        raise SystemExit("the grid must contain min-p off (0 for both heads): the choice is measured against it")

    def samples(text: str) -> dict[str, list[int]]:
        out = {}
        for item in filter(None, text.split(",")):
            material, seed = item.split(":")
            out.setdefault(material, []).append(int(seed))
        return out

    tune = [row for material, seeds in samples(args.tune).items()
            for row in evaluate(model, material, [(s, e, v) for e, v in grid for s in seeds], args)]

    def auc(pair, material=None):  # mean of (AUC low + AUC high) / 2 over the tuning samples
        rows = [r for r in tune if (r["min_p_energy"], r["min_p_voxel"]) == pair
                and material in (None, r["material"])]
        return float(np.mean([(r["auc_low"] + r["auc_high"]) / 2 for r in rows]))

    materials = list(samples(args.tune))
    allowed = [p for p in grid if all(auc(p, m) <= auc((0.0, 0.0), m) + args.tolerance for m in materials)]
    best = min(allowed, key=auc)
    print(f"chosen on {args.tune}: min-p energy {best[0]:g}, voxel {best[1]:g} (mean AUC {auc(best):.3f}; "
          f"off: {auc((0.0, 0.0)):.3f}; per material " +
          ", ".join(f"{m} {auc(best, m):.3f} vs {auc((0.0, 0.0), m):.3f}" for m in materials) + ")")
    checks = [row for material, seeds in samples(args.check).items()
              for row in evaluate(model, material, [(s, *p) for s in seeds for p in dict.fromkeys([best, (0.0, 0.0)])],
                                  args)]
    refs = {m: reference(m, args) for m in {*samples(args.tune), *samples(args.check)}}
    result = {"model": args.model, "weights_sha256": model.manifest["weights"]["sha256"],
              "data": "embedded GFlash-style simulator (not Geant4), cpu geometry, photons 10-100 GeV",
              "n_generated": args.n, "references": refs, "classifier_folds": args.folds,
              "selection": f"lowest mean of (AUC low + AUC high) / 2 over the tuning samples ({args.tune}), among "
                           f"the pairs whose mean AUC for every material is at most {args.tolerance} above min-p off",
              "chosen": {"min_p_energy": best[0], "min_p_voxel": best[1], "mean_auc": round(auc(best), 4),
                         "mean_auc_off": round(auc((0.0, 0.0)), 4),
                         "per_material": {m: [round(auc(best, m), 4), round(auc((0.0, 0.0), m), 4)]
                                          for m in materials}},
              "mean_auc_per_pair": {f"{e:g},{v:g}": {m: round(auc((e, v), m), 4) for m in materials}
                                    for e, v in grid},
              "excluded_by_tolerance": [list(p) for p in grid if p not in allowed],
              "model_default": model.min_p, "tuning": tune, "held_out": checks,
              "seconds": round(time.time() - start), "threads": args.threads, **provenance()}
    atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
