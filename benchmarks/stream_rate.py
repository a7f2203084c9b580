"""Streamed training: the simulation's production rate against the trainer's consumption.

For each worker count, trains `--preset` on `--simulate W,Ta,Cu` (gamma, 10-100 GeV, cpu geometry)
for `--minutes` of wall time and reads the training log: the trainer's tokens/s, the stream's
production capacity (showers/s and tokens/s of all workers, from their busy time) and the time the
trainer waited for data. Prints a table and writes JSON (commit, device, command).

    python benchmarks/stream_rate.py --workers 1,2 --minutes 1.5 --threads 1 --json runs/stream_rate_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from calofm.checkpoint import atomic_write_text
from calofm.training import TrainConfig, train
from provenance import provenance  # benchmarks/ is the script's directory


def run(workers: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(data=(), out=os.path.join(tmp, "run"), preset=args.preset, simulate=("W", "Ta", "Cu"),
                          steps=100000, max_minutes=args.minutes, batch_size=args.batch_size, workers=workers,
                          max_val=args.max_val, reference_showers=args.max_val, eval_every=100000,
                          ckpt_every=100000, log_every=args.log_every, device=args.device)
        summary = train(cfg, threads=args.threads, progress=False, log=lambda *a, **k: None)
        events = [json.loads(line) for line in open(os.path.join(cfg.out, "log.jsonl"))]
    tr = [e for e in events if e["event"] == "train"][1:]  # the first interval holds the warm-up of the workers
    mean = lambda k: sum(e[k] for e in tr) / len(tr)  # noqa: E731
    return {"workers": workers, "steps": summary["steps"], "precision": summary["precision"],
            "trainer_tokens_per_s": round(mean("tokens_per_s"), 1),
            "sim_showers_per_s": round(mean("sim_showers_per_s"), 1), "sim_tokens_per_s": round(mean("sim_tokens_per_s"), 1),
            "sim_over_trainer": round(mean("sim_tokens_per_s") / mean("tokens_per_s"), 2),
            "data_wait_s": round(sum(e["data_wait_s"] for e in tr), 2),
            "wall_s": round(tr[-1]["elapsed_s"] - tr[0]["elapsed_s"], 1) if tr else 0.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", default="1,2", help="worker counts, comma-separated")
    p.add_argument("--preset", default="small")
    p.add_argument("--minutes", type=float, default=1.5, help="wall time per worker count")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-val", type=int, default=50, help="validation and reference showers per source")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads of the trainer")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = [run(int(w), args) for w in args.workers.split(",")]
    print(f"{'workers':>8}{'trainer tok/s':>15}{'sim tok/s':>12}{'sim showers/s':>15}{'ratio':>8}{'wait s':>8}")
    for r in rows:
        print(f"{r['workers']:>8}{r['trainer_tokens_per_s']:>15.0f}{r['sim_tokens_per_s']:>12.0f}"
              f"{r['sim_showers_per_s']:>15.0f}{r['sim_over_trainer']:>8.1f}{r['data_wait_s']:>8.1f}")
    if args.json:
        gpu = torch.cuda.is_available() and args.device != "cpu"
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        atomic_write_text(args.json, json.dumps({**provenance(torch.cuda.get_device_name() if gpu else None),
                                                 "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
