"""Design measurements for the next-token model: how the two hit streams are combined ("sum" of
embeddings vs the published energy->space "cross"-attention) and whether the energy head sees the
chosen voxel. Each variant trains from the same seed on the same data for the same steps; we
report per-material validation NLL (nats per predicted token) and training throughput.

    python benchmarks/train_ablation.py --data runs/data/W.h5 runs/data/Ta.h5 runs/data/Cu.h5 \\
        --steps 300 --batch-size 16 --threads 1 --json benchmarks/results/train_ablation.json
"""

import argparse
import json
import os
import tempfile

from calofm.training import TrainConfig, train
from provenance import provenance

VARIANTS = {
    "sum + voxel-conditioned energy head (default)": {},
    "cross-attention + voxel-conditioned energy head": {"stream_combine": "cross"},
    "sum + independent energy head": {"energy_head_voxel_cond": False},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-val", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="benchmarks/results/train_ablation.json")
    args = ap.parse_args()
    results = []
    for name, overrides in VARIANTS.items():
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(data=tuple(args.data), out=os.path.join(tmp, "run"), preset=args.preset, model=overrides,
                              steps=args.steps, batch_size=args.batch_size, warmup=min(100, args.steps // 10),
                              eval_every=args.steps, ckpt_every=args.steps, log_every=max(1, args.steps // 10),
                              max_val=args.max_val, device="cpu")
            summary = train(cfg, threads=args.threads, progress=False, log=lambda *a, **k: None)
            with open(os.path.join(tmp, "run", "log.jsonl")) as fh:
                rates = [e["tokens_per_s"] for e in map(json.loads, fh) if e["event"] == "train"][1:]
            with open(os.path.join(tmp, "run", "manifest.json")) as fh:
                n_params = json.load(fh)["weights"]["n_parameters"]
        row = {"variant": name, "overrides": overrides, "n_parameters": n_params,
               "tokens_per_s": sum(rates) / max(1, len(rates)), "wall_time_s": summary["wall_time_s"],
               "val": {m: {k: round(v, 4) for k, v in r.items()} for m, r in summary["val"].items()}}
        results.append(row)
        print(f"{name:50s} {n_params / 1e6:5.2f}M  {row['tokens_per_s']:7.0f} tok/s  " +
              "  ".join(f"{m} {r['nll']:.4f} (voxel {r['voxel_nll']:.3f}, energy {r['energy_nll']:.3f})"
                        for m, r in summary["val"].items()), flush=True)
    if args.json:
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({**provenance(), "preset": args.preset,
                       "steps": args.steps, "batch_size": args.batch_size, "threads": args.threads,
                       "data": args.data, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
