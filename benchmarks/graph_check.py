"""GPU check of the static CUDA-graph step (generation/decode.py) against the eager one, same seed.

On CPU, tests/test_fast_decode.py shows the static step gives the eager step's showers bit for bit;
this script asks the same on a GPU, where the step is captured and replayed: the fraction of showers
whose tokens are identical (cuBLAS may pick other kernels for other row counts, so a few may differ in
the last bit and then diverge), the mean hit counts of both, and one decode's time each. The same for
the compiled step (graph + compile), and for each a second call, which must replay the graphs the
first captured and the decoder kept (captures_second = 0) and give the same showers again.

    python benchmarks/graph_check.py --device cuda --json graph_check.json
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from dataclasses import replace

import numpy as np
import torch

import calofm
from calofm.checkpoint import atomic_write_text
from calofm.generation.decode import DecodeOptions
from calofm.generation.sampler import head_samplings
from calofm.generation.streams import decode_uniforms
from calofm.tokenizer import incident_feature


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--json", default=None)
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated, of fp32 and bf16")
    ap.add_argument("--setups", default="graph,graph_compile", help="comma-separated, of graph and graph_compile")
    args = ap.parse_args()
    sm = calofm.load("calofm-small", device=args.device)
    tok, dev = sm.tokenizer, sm.device
    B = args.batch
    inc = torch.from_numpy(incident_feature(np.geomspace(1e4, 1e5, B).astype(np.float32))).to(dev)
    mat = torch.full((B,), tok.material_id("W"), device=dev)
    par = torch.full((B,), tok.particle_id("gamma"), device=dev)
    out = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "batch": B}

    voxel_sampling, energy_sampling = head_samplings(defaults=sm.min_p)  # generate()'s defaults

    def run(opt, precision):
        t0 = time.perf_counter()
        res = sm.decoder.decode(inc, mat, par, tok.max_hits, tok.voxel_block, tok.energy_block, voxel_sampling,
                                decode_uniforms(5, range(B), tok.max_hits, sm.decoder.draws_per_step, dev),
                                replace(opt, precision=precision),
                                energy_sampling=energy_sampling)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return res, time.perf_counter() - t0

    def compare(res, ref) -> dict:
        same = (res.voxel_tokens == ref.voxel_tokens).all(1) & (res.energy_tokens == ref.energy_tokens).all(1)
        return {"identical_showers": float(same.float().mean()), "mean_hits": float(res.n_hits.float().mean()),
                "capped": int(res.capped.sum())}

    refs = {}

    def write():  # after every set-up: a time limit keeps the earlier ones
        if args.json:
            atomic_write_text(args.json, json.dumps(out, indent=1))

    # the plain graph step for both precisions first, then the compiled one (its compilation is the
    # slow part): a time limit hit while compiling keeps the first results, written after each step
    setups = {"graph": DecodeOptions(graph=True), "graph_compile": DecodeOptions(graph=True, compile=True)}
    eager = DecodeOptions(graph=False)
    for name in args.setups.split(","):
        opt = setups[name]
        for precision in args.precisions.split(","):
            row = out.setdefault(precision, {})
            try:
                if precision not in refs:
                    run(eager, precision)  # warm-up
                    refs[precision], row["seconds_eager"] = run(eager, precision)
                    row["mean_hits_eager"] = float(refs[precision].n_hits.float().mean())
                # the first call captures (and compiles); the second replays the run the decoder kept
                _, row[f"seconds_{name}_first"] = run(opt, precision)
                kept = sm.decoder.kept
                captures = kept.captures
                res, row[f"seconds_{name}"] = run(opt, precision)
                row[name] = {**compare(res, refs[precision]), "captures_first": captures,
                             "captures_second": kept.captures - captures, "kept": sm.decoder.kept is kept}
            except Exception as err:  # report and go on: the other set-ups may still work
                traceback.print_exc()
                row[f"error_{name}"] = f"{type(err).__name__}: {err}"
            print(precision, name, row, flush=True)
            write()
    sm.close()  # the kept run's caches and graphs


if __name__ == "__main__":
    main()
