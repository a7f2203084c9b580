"""Design measurements for the next-token model: each variant trains from the same seed on the same
data for the same steps (equal tokens); we report per-material validation NLL (nats per predicted
token), training throughput and, with --auc N, the classifier AUC of N generated against N simulated
showers per material (benchmarks/learning_curve.py's evaluation).

Two studies:
- `streams`: how the two hit streams are combined ("sum" of embeddings vs the published
  energy->space "cross"-attention) and whether the energy head sees the chosen voxel, on files:

    python benchmarks/train_ablation.py --study streams --data runs/data/W.h5 runs/data/Ta.h5 runs/data/Cu.h5 \\
        --steps 300 --batch-size 16 --threads 1 --json benchmarks/results/train_ablation.json

- `fidelity`: the running visible energy and hit index as inputs, the factorized (layer, then cell)
  voxel head, the geometric voxel embedding and head, and the layer-by-layer hit order, on streamed
  simulation:

    python benchmarks/train_ablation.py --study fidelity --simulate W,Ta,Cu --steps 500 --batch-size 32 \\
        --warmup 50 --seed 11 --runs runs/ablation --auc 1000 --json benchmarks/results/fidelity_ablation.json

With --runs DIR each variant's run is kept in DIR/<variant> and a finished one is not trained again
(a killed study is rerun with the same command), so variants can also run in parallel processes
(--only NAME).
"""

import argparse
import json
import os
import tempfile

from calofm.checkpoint import atomic_write_text
from calofm.training import TrainConfig, train
from provenance import provenance  # benchmarks/ is the script's directory

STUDIES = {
    "streams": {
        "sum + voxel-conditioned energy head (default)": {},
        "cross-attention + voxel-conditioned energy head": {"stream_combine": "cross"},
        "sum + independent energy head": {"energy_head_voxel_cond": False},
    },
    "fidelity": {
        "base": {},
        "running": {"running_inputs": True},
        "factorized": {"voxel_head": "factorized"},
        "factorized+running": {"voxel_head": "factorized", "running_inputs": True},
        "geometric embedding": {"voxel_embedding": "geometric"},
        "geometric embedding+head": {"voxel_embedding": "geometric", "voxel_head": "geometric"},
        "layer order": {"order": "layer"},  # the hit order (TrainConfig.order), not a model option
        "layer order+running": {"order": "layer", "running_inputs": True},
    },
}


def _log(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def run_variant(args, name: str, overrides: dict, run_dir: str) -> dict:
    finished = lambda: [e for e in _log(run_dir) if e["event"] == "val" and e["step"] == args.steps]  # noqa: E731
    if not finished():
        model = {k: v for k, v in overrides.items() if k != "order"}
        # the studies' baseline is the energy order, whatever the default of new runs
        cfg = TrainConfig(data=tuple(args.data), simulate=tuple(args.simulate.split(",")) if args.simulate else (),
                          order=overrides.get("order", "energy"),
                          out=run_dir, preset=args.preset, model=model, steps=args.steps,
                          batch_size=args.batch_size, lr=args.lr, warmup=args.warmup or min(100, args.steps // 10),
                          eval_every=args.steps, ckpt_every=args.steps, log_every=max(1, args.steps // 25),
                          max_val=args.max_val, seed=args.seed, workers=args.workers, device="cpu")
        resume = os.path.exists(os.path.join(run_dir, "checkpoints"))
        train(cfg, resume_dir=run_dir if resume else None, threads=args.threads, progress=False,
              log=lambda *a, **k: None)
    final = finished()[-1]
    rates = [e["tokens_per_s"] for e in _log(run_dir) if e["event"] == "train"][1:]
    with open(os.path.join(run_dir, "manifest.json")) as fh:
        manifest = json.load(fh)
    row = {"variant": name, "overrides": overrides, "n_parameters": manifest["weights"]["n_parameters"],
           "tokens_seen": manifest.get("training", {}).get("tokens_seen"),
           "tokens_per_s": round(sum(rates) / max(1, len(rates)), 1), "wall_time_s": final["elapsed_s"],
           "val": {m: {k: round(v, 4) for k, v in r.items()} for m, r in final["val"].items()}}
    if args.auc:
        from learning_curve import evaluate_point

        work = os.path.join(os.path.dirname(run_dir), "eval")
        os.makedirs(work, exist_ok=True)
        row["auc"] = {m: {k: p[k] for k in ("auc_high", "auc_high_err", "auc_low", "auc_low_err", "fpd")}
                      for m in args.materials.split(",")
                      for p in [evaluate_point(run_dir, m, args.auc, work, args.threads)]}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", choices=sorted(STUDIES), default="fidelity")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all of the study)")
    ap.add_argument("--data", nargs="*", default=[])
    ap.add_argument("--simulate", default="", help="stream these materials instead of (or beside) --data")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=0, help="0: min(100, steps / 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="stream worker processes")
    ap.add_argument("--max-val", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", default="", help="keep the runs here (default: temporary)")
    ap.add_argument("--auc", type=int, default=0, help="generated and simulated showers per material for the AUC")
    ap.add_argument("--materials", default="W,Ta,Cu", help="materials of the AUC evaluation")
    ap.add_argument("--json", default="benchmarks/results/train_ablation.json")
    args = ap.parse_args()
    if not args.data and not args.simulate:
        ap.error("give --data files or --simulate materials")
    import torch

    torch.set_num_threads(args.threads)
    variants = STUDIES[args.study]
    names = args.only.split(",") if args.only else list(variants)
    record = {"results": []}
    if args.json and os.path.exists(args.json):
        with open(args.json) as fh:
            record = json.load(fh)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            run_dir = os.path.join(args.runs or tmp, name.replace(" ", "_"))
            row = run_variant(args, name, variants[name], run_dir)
            print(f"{name:30s} {row['n_parameters'] / 1e6:5.2f}M  {row['tokens_per_s']:7.0f} tok/s  " +
                  "  ".join(f"{m} {r['nll']:.4f} (voxel {r['voxel_nll']:.3f}, energy {r['energy_nll']:.3f})"
                            for m, r in row["val"].items()) +
                  "".join(f"  {m} AUC {a['auc_high']:.3f}/{a['auc_low']:.3f}" for m, a in row.get("auc", {}).items()),
                  flush=True)
            if args.json:
                record["results"] = [r for r in record["results"] if r["variant"] != name] + [row]
                record.update(provenance(), study=args.study, preset=args.preset, steps=args.steps,
                              batch_size=args.batch_size, lr=args.lr, seed=args.seed, threads=args.threads,
                              data=args.data, simulate=args.simulate)
                os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
                atomic_write_text(args.json, json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
