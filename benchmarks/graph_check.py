"""GPU check of the CUDA-graph decoder (generation/static_decode.py) against the eager one, same seed.

On CPU, tests/test_fast_decode.py shows the static step gives the plain decoder's showers bit for bit;
this script asks the same on a GPU, where the step is captured and replayed: the fraction of showers
whose tokens are identical (cuBLAS may pick other kernels for other row counts, so a few may differ in
the last bit and then diverge), the mean hit counts of both, and one decode's time each.

    python benchmarks/graph_check.py --device cuda --json graph_check.json
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import numpy as np
import torch

import calofm
from calofm.generation.decode import DecodeOptions, decode
from calofm.generation.sampler import DEFAULT_MIN_P, SamplingConfig
from calofm.model.precision import autocast
from calofm.tokenizer import incident_feature


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sm = calofm.load("calofm-small", device=args.device)
    net, tok, dev = sm.model, sm.tokenizer, sm.device
    B = args.batch
    inc = torch.from_numpy(incident_feature(np.geomspace(1e4, 1e5, B).astype(np.float32))).to(dev)
    mat = torch.full((B,), tok.material_id("W"), device=dev)
    par = torch.full((B,), tok.particle_id("gamma"), device=dev)
    out = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "batch": B}

    def run(opt, precision):
        with autocast(dev, precision):
            t0 = time.perf_counter()
            res = decode(net, inc, mat, par, tok.max_hits, tok.voxel_block, tok.energy_block,
                         SamplingConfig(min_p=DEFAULT_MIN_P["voxel"]), torch.Generator(device=dev).manual_seed(5),
                         opt, energy_sampling=SamplingConfig(min_p=DEFAULT_MIN_P["energy"]))
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return res, time.perf_counter() - t0

    for precision in ("fp32", "bf16"):
        try:
            run(DecodeOptions(), precision)  # warm-up
            ref, t_ref = run(DecodeOptions(), precision)
            run(DecodeOptions(graph=True), precision)
            res, t_graph = run(DecodeOptions(graph=True), precision)
            same = ((res.voxel_tokens == ref.voxel_tokens).all(1) & (res.energy_tokens == ref.energy_tokens).all(1))
            row = {"identical_showers": float(same.float().mean()), "mean_hits_eager": float(ref.n_hits.float().mean()),
                   "mean_hits_graph": float(res.n_hits.float().mean()), "seconds_eager": t_ref,
                   "seconds_graph": t_graph, "capped_graph": int(res.capped.sum())}
        except Exception as err:  # report and go on: the other precision may still work
            traceback.print_exc()
            row = {"error": f"{type(err).__name__}: {err}"}
        out[precision] = row
        print(precision, row, flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
