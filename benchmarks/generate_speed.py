"""Generation throughput of a trained model (static KV cache, batched decoding), and the cost of
decoding without the cache (recomputing the whole prefix every step) for comparison.

    python benchmarks/generate_speed.py --model runs/small-wtacu --material W --n 256 --threads 1
"""

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from calofm.generation import load
from calofm.tokenizer import BOS, EOS, PAD, incident_feature


@torch.no_grad()
def uncached_steps(model, n_steps: int, batch: int) -> float:
    """Seconds per decoded position when every step reruns the full prefix (greedy, no masking)."""
    net, tok = model.model, model.tokenizer
    inc = torch.from_numpy(incident_feature(np.full(batch, 5e4)))
    mat = torch.full((batch,), tok.material_id(model.materials[0]))
    par = torch.zeros(batch, dtype=torch.long)
    vox = torch.full((batch, 2), PAD)
    vox[:, 1] = BOS
    en = vox.clone()
    start = time.perf_counter()
    for _ in range(n_steps):
        h, _ = net.hidden(vox, en, inc, mat, par)
        v = net.voxel_logits(h[:, -1]).argmax(-1).clamp(min=EOS + 1)
        e = net.energy_logits(h[:, -1], v).argmax(-1).clamp(min=EOS + 1)
        vox, en = torch.cat([vox, v[:, None]], 1), torch.cat([en, e[:, None]], 1)
    return (time.perf_counter() - start) / n_steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--material", default="W")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-sizes", default="64,256")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="benchmarks/results/generate_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load(args.model)
    rows = []
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        start = time.perf_counter()
        model.generate(args.n, material=args.material, energy_GeV=(10, 100), seed=0, batch_size=bs)
        dt = time.perf_counter() - start
        rows.append({"batch_size": bs, "showers_per_s": args.n / dt, "mean_hits": model.last_stats["mean_hits"]})
        print(f"KV cache, batch {bs:4d}: {args.n / dt:7.1f} showers/s ({model.last_stats['mean_hits']:.0f} hits/shower)")
    hits = int(model.last_stats["mean_hits"])
    per_step = uncached_steps(model, hits, 64)
    print(f"no cache, batch 64: {1 / (per_step * hits) * 64:7.1f} showers/s (same length, full prefix each step)")
    rows.append({"batch_size": 64, "no_cache": True, "showers_per_s": 64 / (per_step * hits)})
    if args.json:
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"machine": platform.processor() or platform.machine(), "threads": args.threads,
                       "model": args.model, "material": args.material, "results": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
