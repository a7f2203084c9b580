"""`calofm bench generate`: generation speed on this machine (showers/s, tokens/s, fraction of the
measured matmul peak in the precision used, memory, cost vs incident energy), the decoder's ablation
(compaction, torch.compile, bf16, two-stage totals), the diffusion baseline and the embedded simulator
for comparison. See docs/speed.md."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from dataclasses import replace

from calofm.cli.args import POSITIVE, SEED, THREADS, add_force, listed, real


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (bench generate: generation speed)")
    bsub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    g = bsub.add_parser("generate", help="generation speed of a model, vs the diffusion baseline and the simulator")
    g.add_argument("--model", default="calofm-small", help="shipped model name or model directory")
    g.add_argument("--adapter", action="append", default=[], help="adapter to load (repeatable)")
    g.add_argument("--baseline", default=None, help="diffusion baseline directory (calofm baseline train)")
    g.add_argument("--material", default="W")
    g.add_argument("--particle", default="gamma")
    g.add_argument("--batches", type=listed(POSITIVE), default=[1, 100, 1000], help="batch sizes (default 1,100,1000)")
    g.add_argument("--n", type=POSITIVE, default=None,
                   help="showers per batch-size point (default: the batch, 8 for batch 1)")
    g.add_argument("--energies", type=listed(real(0, 10_000, lo_open=True), allow_empty=True),
                   default=[10.0, 50.0, 100.0], help="GeV points for the cost-vs-energy scan")
    g.add_argument("--energy-n", type=POSITIVE, default=50, help="showers per energy point")
    g.add_argument("--baseline-steps", type=listed(POSITIVE), default=[400, 20],
                   help="diffusion sampling steps to time")
    g.add_argument("--baseline-batches", type=listed(POSITIVE), default=[100],
                   help="diffusion batch sizes to time (one batch of that many showers each)")
    g.add_argument("--baseline-graph", action="store_true",
                   help="also time the baseline with its U-Net replayed as a CUDA graph (GPU; captured untimed)")
    g.add_argument("--baseline-repeats", type=POSITIVE, default=1, help="timed repeats per baseline point (median)")
    g.add_argument("--ablation", action="store_true",
                   help="time the eager decoder with compaction off, bf16, (--compile) torch.compile and two-stage "
                        "totals against its defaults")
    g.add_argument("--ablation-n", type=POSITIVE, default=100, help="showers (one batch) per ablation point")
    g.add_argument("--compile", action="store_true",
                   help="add torch.compile of the decode step to the ablation (compiled once, untimed; ~1 min on CPU)")
    g.add_argument("--decode", default="fp32",
                   help="decode set-ups timed at every batch size, comma-separated: a precision (fp32, bf16), then "
                        "any of +compile, +graph (the CUDA-graph step; on CPU it runs eagerly), +nocompact, "
                        "e.g. fp32,bf16+compile,bf16+graph (default fp32)")
    g.add_argument("--runtime", default="torch", choices=["torch", "onnx"],
                   help="onnx: also export the class's decode step (calofm export, untimed) and time the "
                        "onnxruntime reference loop (calofm.export.onnx_runtime) at every batch size, beside the "
                        "PyTorch set-ups (default torch: PyTorch only)")
    g.add_argument("--sim-n", type=POSITIVE, default=None,
                   help="showers to time the simulator on (default: the largest batch)")
    g.add_argument("--repeats", type=POSITIVE, default=1, help="timed repeats per point (median)")
    g.add_argument("--threads", type=THREADS, default=None)
    g.add_argument("--device", default="cpu")
    g.add_argument("--seed", type=SEED, default=0)
    g.add_argument("--json", default=None, help="write the results to this JSON file")
    add_force(g, "an existing --json file")
    g.set_defaults(func=cmd_bench_generate)


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, precision: str, seconds: float = 1.0) -> float:
    """Measured matmul FLOP/s in `precision` (fp32 or bf16) on this device, in about `seconds`: square
    products from n = 256 up, doubling while one takes under a tenth of `seconds` (up to 2048 on CPU,
    8192 on a GPU, where a smaller product does not fill the chip), then repeated at the last size until
    `seconds` have passed; the best rate. A precision the machine runs slowly (bf16 on a CPU without
    bf16 instructions: ~100x slower than fp32) stops at a small product instead of taking minutes."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    n_max = 8192 if device.type == "cuda" else 2048
    start, n, dt, best = time.perf_counter(), 128, 0.0, 0.0
    while best == 0 or time.perf_counter() - start < seconds:
        if dt < seconds / 10 and n < n_max:  # a larger product, until one takes a tenth of the time
            n *= 2
            a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
            a @ b  # warm-up (kernel choice, first touch)
            _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        dt = time.perf_counter() - t0
        best = max(best, 2 * n ** 3 / dt)
    return best


def flops_per_position(net, mean_context: float) -> float:
    """Model FLOPs per decoded hit position (one voxel + one energy token): 2 x the parameters a token
    actually uses (attention projections, shared + top-k routed experts and router per layer, both
    heads, the energy-head input) + attention over the mean context (QK^T and AV: 4 d L per layer)."""
    d = net.cfg.d_model

    def n(m):
        return sum(p.numel() for p in m.parameters())

    active = 0
    for block in net.blocks:
        for attn in block.attentions():
            active += sum(n(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
        moe = block.moe
        active += n(moe.shared) if moe.shared is not None else 0
        group = moe.groups[0]
        active += n(group.experts[0]) * min(moe.top_k, len(group.experts))
        active += n(group.router) if group.router is not None else 0
    active += n(net.voxel_head) + n(net.energy_head) + (n(net.energy_in) if net.energy_in is not None else 0)
    attn_flops = 4 * d * mean_context * len(net.attentions())
    return 2.0 * active + attn_flops


def _peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if platform.system() == "Darwin" else rss / 2 ** 10


SETUP_FLAGS = ("compile", "graph", "nocompact")


def parse_setup(name: str):
    """'bf16+graph' -> DecodeOptions("bf16", graph=True): a precision, then any of SETUP_FLAGS
    (torch.compile, the static CUDA-graph step of generation.decode, compaction off); without +graph
    the eager step, on a GPU too."""
    from calofm.errors import CalofmError
    from calofm.generation.decode import DecodeOptions

    precision, *flags = name.split("+")
    if precision not in ("fp32", "bf16") or any(f not in SETUP_FLAGS for f in flags) or len(set(flags)) < len(flags):
        raise CalofmError(f"unknown decode set-up {name!r}: fp32 or bf16, then any of "
                          f"{', '.join('+' + f for f in SETUP_FLAGS)}")
    return DecodeOptions(precision, compile="compile" in flags, graph="graph" in flags, compact="nocompact" not in flags)


def cmd_bench_generate(args) -> None:
    import torch

    import calofm
    from calofm.checkpoint import atomic_write_text
    from calofm.generation.decode import DecodeOptions
    from calofm.outputs import check_output_file

    if args.json:
        check_output_file(args.json, args.force, "--json")
    setups = {s.strip(): parse_setup(s.strip()) for s in args.decode.split(",") if s.strip()}
    if args.threads:
        torch.set_num_threads(args.threads)
    sm = calofm.load(args.model, adapters=args.adapter, device=args.device)
    device = sm.device
    net = sm.model
    batches = args.batches
    print(f"calofm bench generate: {sm!r}")
    peaks: dict[str, float] = {}

    def peak(precision: str) -> float:
        """The matmul peak of a precision, measured when first needed."""
        if precision not in peaks:
            peaks[precision] = matmul_peak(device, precision)
            print(f"{precision} matmul peak on {device.type} ({torch.get_num_threads()} threads): "
                  f"{peaks[precision] / 1e9:.1f} GFLOP/s")
        return peaks[precision]

    compiled_for = set()  # decode set-ups whose compiled functions exist already
    showers = {}  # (options, batch) -> the showers of the last timed PyTorch run (the ONNX rows compare with fp32's)

    def timed(n, batch, options, energy=(10.0, 100.0), totals=None):
        flops_peak = peak(options.precision)
        if options.compile and options not in compiled_for:
            # compile outside the timing (once per process, precision and step)
            sm.generate(4, material=args.material, particle=args.particle, seed=args.seed, options=options)
            compiled_for.add(options)

        def run():
            showers[options, batch] = sm.generate(n, material=args.material, particle=args.particle, energy_GeV=energy,
                                         seed=args.seed, batch_size=batch, options=options, totals=totals)[1]
            _sync(device)
        first = None
        if options.graph:
            # the graph decoder captures its graphs in its first batch and keeps them for the next
            # (generation.decode): the repeats time the kept run, the first call is recorded apart
            first = _median_time(run, 1)
        dt = _median_time(run, args.repeats)
        stats = sm.last_stats
        hits = stats["mean_hits"] * n
        fl = flops_per_position(net, stats["mean_hits"] / 2) * hits / dt
        return {"batch": batch, "n": n, "seconds": dt, "showers_per_s": n / dt, "ms_per_shower": 1e3 * dt / n,
                "tokens_per_s": 2 * hits / dt, "positions_per_s": hits / dt, "mean_hits": stats["mean_hits"],
                "flops_per_s": fl, "flops_fraction": fl / flops_peak, "first_call_seconds": first}

    results, energy_scan, ablation, baseline, sim_rate = [], [], None, None, None

    def report(complete: bool) -> dict:
        """The JSON as it stands; written after every timed row too (complete: false), so that a run
        stopped by a time limit keeps what it measured."""
        timed_rows = [r for r in results if "error" not in r] or energy_scan
        mean_hits = timed_rows[-1]["mean_hits"] if timed_rows else 0.0
        out = {"device": f"{device.type}: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
                         + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
               "torch": torch.__version__, "model": args.model, "adapters": args.adapter,
               "geometry": sm.geometry.name,
               "model_params": net.num_parameters(), "material": args.material, "particle": args.particle,
               "matmul_peak_flops": dict(peaks), "flops_per_position": flops_per_position(net, mean_hits / 2),
               "results": results, "energy_scan": energy_scan, "ablation": ablation, "baseline": baseline,
               "simulator_showers_per_s": sim_rate, "peak_memory_MB": _peak_memory_mb(device), "complete": complete,
               "notes": "tokens = 2 per hit (voxel + energy); flops_fraction = model FLOP/s over the measured matmul "
                        "peak of the row's precision (matmul_peak_flops); decoding runs in fp32 unless the row says "
                        "bf16, the diffusion baseline in bf16"}
        if args.json:
            atomic_write_text(args.json, json.dumps(out, indent=1))
        return out

    sm.generate(2, material=args.material, particle=args.particle, seed=args.seed)  # warm-up
    for s, opt in setups.items():
        for b in batches:
            n = args.n or (8 if b == 1 else b)
            r = {"decode": s, "precision": opt.precision, "compile": opt.compile, "graph": opt.graph,
                 "compact": opt.compact}
            try:
                r.update(timed(n, b, opt))
            except RuntimeError as err:  # one failing set-up must not lose the others
                results.append({**r, "batch": b, "error": f"{type(err).__name__}: {err}"[:500]})
                print(f"{s:18s} batch {b:5d}: failed: {results[-1]['error']}")
                break
            results.append(r)
            report(complete=False)
            print(f"{s:18s} batch {b:5d}: {r['showers_per_s']:8.2f} showers/s  {r['ms_per_shower']:8.2f} ms/shower  "
                  f"{r['tokens_per_s']:9.0f} tokens/s  {100 * r['flops_fraction']:.2f}% of {opt.precision} peak"
                  + (f"  (first call {r['n'] / r['first_call_seconds']:.2f} showers/s)" if r["first_call_seconds"] else ""))
    if args.runtime == "onnx":
        fp32 = {b: cells for (opt, b), cells in showers.items() if opt == setups.get("fp32")}
        _bench_onnx(args, sm, batches, results, fp32, report)
    for e in args.energies:
        r = timed(args.energy_n, args.energy_n, DecodeOptions(graph=False), energy=e)  # fp32 eager defaults
        energy_scan.append({"energy_GeV": e, "decode": "fp32", **r})
        print(f"{e:6.0f} GeV: {r['ms_per_shower']:8.2f} ms/shower ({r['mean_hits']:.0f} hits)")

    if args.ablation:
        n = args.ablation_n
        # name -> (decoder options, two-stage totals), the eager step; timed in this order, the defaults
        # ("all on") first
        eager = DecodeOptions(graph=False)
        variants = {"all on": (eager, None), "compact off": (replace(eager, compact=False), None)}
        if args.compile:
            variants["all on + torch.compile"] = (replace(eager, compile=True), None)
        variants["all on + bf16 autocast"] = (replace(eager, precision="bf16"), None)
        if args.compile:
            variants["all on + bf16 + torch.compile"] = (replace(eager, precision="bf16", compile=True), None)
        variants["two-stage (totals on)"] = (eager, True)
        ablation = []
        on = None
        for name, (opt, totals) in variants.items():
            r = timed(n, n, opt, totals=totals)
            on = on or r["seconds"]
            ablation.append({"variant": name, "options": vars(opt), "precision": opt.precision, **r,
                             "slowdown_vs_all_on": r["seconds"] / on})
            print(f"ablation {name:29s}: {r['showers_per_s']:7.2f} showers/s  x{r['seconds'] / on:.2f} time vs all on")

    from calofm.simulation import simulate

    n_sim = args.sim_n or max(batches)
    sim_dt = _median_time(lambda: simulate(n_sim, material=args.material, particle=args.particle,
                                           energy_GeV=(10, 100), geometry=sm.geometry, seed=args.seed), args.repeats)
    print(f"simulator ({sm.geometry.name} geometry, one process): {n_sim / sim_dt:.1f} showers/s")

    if args.baseline:
        baseline = _bench_baseline(args, device, peak("bf16"))

    sim_rate = n_sim / sim_dt
    out = report(complete=True)
    print(f"peak memory {out['peak_memory_MB']:.0f} MB")
    if args.json:
        print(f"wrote {args.json}")


def _bench_baseline(args, device, peak: float) -> list[dict]:
    """The diffusion baseline (sampled in bf16 autocast); peak: the bf16 matmul peak."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from calofm.baselines.diffusion import DiffusionBaseline

    model, _ = DiffusionBaseline.load(args.baseline, device=device.type)
    mats = model.cfg.materials
    mat = mats.index(args.material) if args.material in mats else 0
    batches = args.baseline_batches
    # FLOPs of one network evaluation per shower, counted by torch
    cfg = model.cfg
    x = torch.zeros((1, cfg.n_layers, cfg.size, cfg.size), device=device)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.net(x, torch.zeros(1, device=device), torch.zeros(1, device=device),
                  torch.zeros(1, dtype=torch.long, device=device))
    per_eval = fc.get_total_flops()
    rows = []
    for n in batches:
        inc = np.random.default_rng(args.seed).uniform(1e4, 1e5, n).astype(np.float32)
        materials = np.full(n, mat)
        for steps in args.baseline_steps:
            for graph in (False, True) if args.baseline_graph else (False,):
                # warm-up outside the timing: the capture (calofm's decoder keeps its graphs too), and
                # for the eager path the kernels' first-use set-up
                model.sample(inc, materials, steps=1, seed=args.seed, batch_size=n, graph=graph)

                def run():
                    model.sample(inc, materials, steps=steps, seed=args.seed, batch_size=n, graph=graph)
                    _sync(device)
                dt = _median_time(run, args.baseline_repeats)
                fl = per_eval * steps * n / dt
                rows.append({"batch": n, "steps": steps, "graph": graph, "precision": "bf16", "showers_per_s": n / dt,
                             "ms_per_shower": 1e3 * dt / n, "tokens_per_s": None, "flops_per_s": fl,
                             "flops_fraction": fl / peak})
                print(f"diffusion baseline, batch {n}, {steps} steps{' (graph)' if graph else ''}: {n / dt:.2f} "
                      f"showers/s  {1e3 * dt / n:.1f} ms/shower  {100 * fl / peak:.1f}% of bf16 peak")
    return rows


def _bench_onnx(args, sm, batches, results: list, reference: dict, report) -> None:
    """The class's graphs exported to a temporary folder (timed apart), then the onnxruntime loop's
    showers at each batch size, as calofm generate makes them (OnnxDecoder.generate), with as many
    onnxruntime threads as torch uses; `identical_to_torch`: the share of showers equal, cell for
    cell, to the fp32 PyTorch row's at that batch size (when timed)."""
    import shutil
    import tempfile

    import numpy as np
    import torch

    from calofm.export.onnx_export import export_onnx, require_onnx
    from calofm.export.onnx_runtime import OnnxDecoder

    require_onnx()
    tmp = tempfile.mkdtemp(prefix="calofm-bench-onnx-")
    try:
        start = time.perf_counter()
        folder = export_onnx(sm, os.path.join(tmp, "export"), [(args.material, args.particle)], log=lambda *a: None)[0]
        export_s = time.perf_counter() - start
        run = OnnxDecoder(folder, threads=torch.get_num_threads())
        run.generate(2, seed=args.seed)  # warm-up
        for b in batches:
            n = args.n or (8 if b == 1 else b)
            out = {}

            def once():
                out["cells"] = run.generate(n, seed=args.seed, batch_size=b)[1]
            dt = _median_time(once, args.repeats)
            mean_hits = float((out["cells"] > 0).sum(axis=1).mean())
            same = None
            if b in reference and len(reference[b]) == n:
                same = float(np.mean(np.all(out["cells"] == reference[b], axis=1)))
            r = {"decode": "onnxruntime fp32", "runtime": "onnx", "precision": "fp32", "batch": b, "n": n,
                 "seconds": dt, "showers_per_s": n / dt, "ms_per_shower": 1e3 * dt / n,
                 "tokens_per_s": 2 * mean_hits * n / dt, "positions_per_s": mean_hits * n / dt, "mean_hits": mean_hits,
                 "export_seconds": export_s, "onnxruntime_threads": torch.get_num_threads(),
                 "identical_to_torch": same}
            results.append(r)
            report(complete=False)
            print(f"{'onnxruntime fp32':18s} batch {b:5d}: {r['showers_per_s']:8.2f} showers/s  "
                  f"{r['ms_per_shower']:8.2f} ms/shower  {r['tokens_per_s']:9.0f} tokens/s"
                  + ("" if same is None else f"  {100 * same:.1f}% of the showers identical to PyTorch's"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
