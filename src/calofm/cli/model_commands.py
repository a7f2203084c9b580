"""Model subcommands: train, generate, info."""

from __future__ import annotations

import json
import os
import time

from calofm.cli.args import (
    FRACTION, LEARNING_RATE, MIN_P, NON_NEGATIVE, POSITIVE, PROBABILITY, SEED, THREADS, add_force, count,
    json_object, real,
)


def register(sub) -> None:
    p = sub.add_parser("train", help="pre-train the next-token shower model (DDP-ready: torchrun works)")
    p.add_argument("--data", nargs="+", default=None, metavar="FILE",
                   help="calofm shower files, one material/particle each (e.g. W.h5 Ta.h5 Cu.h5)")
    add_stream_arguments(p)
    p.add_argument("--preset", default=None, help="model preset: tiny, small (default), base")
    p.add_argument("-o", "--output", required=True, help="run directory (model, checkpoints, log.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    p.add_argument("--init-from", default=None, metavar="MODEL",
                   help="start from this model's weights and tokenizer (a model directory or shipped name, "
                        "e.g. calofm-small) instead of a fresh initialization; --preset/--model are then ignored, "
                        "and the hit order is the start model's unless --order is given")
    p.add_argument("--steps", type=POSITIVE, default=None,
                   help="optimizer steps (default 3000; with --max-minutes: fitted to the budget after the warm-up)")
    p.add_argument("--max-minutes", type=real(0, lo_open=True), default=None, metavar="MIN",
                   help="stop after this much wall time (data preparation included), with a checkpoint that "
                        "--resume continues; the final evaluation and checkpoint come on top")
    p.add_argument("--batch-size", type=POSITIVE, default=None, help="global batch size in showers (default 32)")
    p.add_argument("--lr", type=LEARNING_RATE, default=None, help="peak learning rate (AdamW; default 2e-3)")
    p.add_argument("--warmup", type=NON_NEGATIVE, default=None,
                   help="linear warm-up steps before the cosine decay (default 100)")
    p.add_argument("--weight-decay", type=real(0, 10), default=None, help="default 0.1")
    p.add_argument("--grad-clip", type=real(0, lo_open=True), default=None, help="default 1.0")
    p.add_argument("--ema", type=FRACTION, default=None, metavar="DECAY",
                   help="the run exports the moving average of its weights, over about 1/(1-DECAY) steps "
                        "(default 0.998; 0: the last step's weights; docs/model.md)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=None,
                   help="autocast dtype; auto (default): bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16, "
                        "AMX, Arm BF16), else fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training (pays off on a GPU)")
    p.add_argument("--order", choices=("energy", "spatial", "layer"),  # tokenizer.ORDERS (tested)
                   default=None, help="hit order (default layer, or with --init-from the start model's; "
                   "docs/model.md)")
    p.add_argument("--max-hits", type=count(1, 100_000), default=None,
                   help="hits per shower kept (default: 1.1 x the 99.9th percentile of the data; truncation is counted)")
    p.add_argument("--val-fraction", type=FRACTION, default=None, help="validation share of each file (default 0.05)")
    p.add_argument("--max-val", type=POSITIVE, default=None,
                   help="at most this many validation showers per file (simulated for each streamed source; "
                        "default 1000)")
    p.add_argument("--eval-every", type=POSITIVE, default=None, help="default 500")
    p.add_argument("--ckpt-every", type=POSITIVE, default=None, help="default 500")
    p.add_argument("--log-every", type=POSITIVE, default=None, help="default 20")
    p.add_argument("--seed", type=SEED, default=None, help="default 0")
    p.add_argument("--model", type=json_object, default=None, metavar="JSON",
                   help='overrides of the preset, e.g. \'{"d_model": 192}\'')
    p.add_argument("--device", default=None, help="cpu, cuda or auto (default)")
    p.add_argument("--threads", type=THREADS, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="generate showers with a trained model")
    p.add_argument("--model", required=True, help="shipped model name (calofm-small) or model directory")
    p.add_argument("--material", default="W")
    p.add_argument("--particle", default="gamma")
    p.add_argument("--n", type=POSITIVE, default=1000, help="number of showers")
    p.add_argument("--energy", default="10:100", help="incident energy in GeV: E or Emin:Emax")
    p.add_argument("--spectrum", default="uniform", choices=["uniform", "log"])
    p.add_argument("--seed", type=SEED, default=1)
    p.add_argument("--temperature", type=real(0, 100), default=1.0, help="0: greedy (most probable token)")
    p.add_argument("--top-k", type=NON_NEGATIVE, default=0, help="0: off")
    p.add_argument("--top-p", type=PROBABILITY, default=1.0, help="1: off")
    p.add_argument("--min-p-voxel", type=MIN_P, default=None,
                   help="drop voxels less probable than this fraction of the most probable one "
                        "(0: off; default: the model's own, tuned for its weights, see docs/model.md)")
    p.add_argument("--min-p-energy", type=MIN_P, default=None, help="the same for the energy bins")
    p.add_argument("--batch-size", type=POSITIVE, default=256, help="showers decoded together")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="fp32",
                   help="decode dtype (default fp32, the bit-reproducible reference); auto: bf16 on CUDA and on "
                        "CPUs with native bf16, else fp32")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=THREADS, default=None, help="torch CPU threads")
    p.add_argument("-o", "--output", default="generated.h5", help="output HDF5 file (CaloChallenge layout)")
    add_force(p, "an existing output file")
    p.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="adapter directory to compose with the model (repeat to stack, in order)")
    p.add_argument("--totals", nargs="?", const="hits+energy", default="off",
                   choices=("off", "energy", "hits+energy"),  # tokenizer.totals.TOTALS_MODES (tested)
                   help="the model's fitted shower totals: 'energy' draws each decoded shower's energy sum "
                        "given its hit count, 'hits+energy' (the bare flag) draws both before decoding "
                        "(default: off; see docs/model.md for when each helps)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (heads, sampler and, with --precision bf16, the attention "
                        "over the KV cache); pays off from a few hundred showers, see docs/speed.md")
    p.add_argument("--graph", action="store_true",
                   help="decode with the static-shape step captured as a CUDA graph (the default on a GPU; "
                        "on CPU it runs eagerly and is slower), see docs/speed.md")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="make only shard K (0 ... N-1) of the run's showers, into OUTPUT.shard-K-of-N.h5 (for array "
                        "jobs; under torchrun each rank is its shard by itself); `calofm merge` joins the shards")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("fit-totals", help="fit the hit-count / visible-energy laws of the classes in --data "
                       "(two-stage generation) on their training rows and store them in the model's manifest, "
                       "or in the last --adapter's; weights are not touched")
    p.add_argument("--model", required=True, help="model directory or shipped name")
    p.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="adapters to compose first; the last one receives the totals")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE", help="the files the model (adapter) was trained on")
    p.set_defaults(func=cmd_fit_totals)

    p = sub.add_parser("info", help="describe a trained model directory (verifies its weights)")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print the whole manifest")
    p.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="adapter directory to compose with the model (repeat to stack, in order)")
    p.set_defaults(func=cmd_info)


def add_stream_arguments(p, particle: bool = True, geometry: str | None = "cpu") -> None:
    """The streamed-simulation options of `calofm train` and `calofm extend` (particle=False: the
    command has its own --particle; geometry None: the default is the base model's readout)."""
    p.add_argument("--simulate", default=None, metavar="MATERIALS",
                   help="stream fresh showers of these materials (comma-separated, e.g. W,Ta,Cu) from the embedded "
                        "simulator in background processes; alone or beside --data")
    if particle:
        p.add_argument("--particle", default="gamma", help="streamed particle (default gamma)")
    p.add_argument("--energy", default="10:100", help="streamed incident energies in GeV, uniform: E or Emin:Emax")
    p.add_argument("--geometry", default=geometry, help="streamed readout geometry (default "
                   + (f"{geometry})" if geometry else "the base model's)"))
    p.add_argument("--workers", type=count(0, 1024), default=None,
                   help="simulation worker processes (default: one per core but the trainer's, at most 16; 0: inline)")


def stream_fields(args) -> dict:
    """TrainConfig fields of the streamed-simulation options."""
    materials = tuple(m for m in (args.simulate or "").split(",") if m.strip())
    return dict(simulate=materials, particle=args.particle, energy=args.energy, geometry=args.geometry)


# options of `calofm train` that are TrainConfig fields of the same name; their parser default is None,
# so that a value counts only when given (TrainConfig holds the defaults)
RUN_OPTIONS = ("preset", "model", "steps", "batch_size", "lr", "warmup", "weight_decay", "grad_clip", "ema", "precision",
               "seed", "order", "max_hits", "val_fraction", "max_val", "eval_every", "ckpt_every", "log_every",
               "device", "init_from", "max_minutes", "workers")


def cmd_train(args) -> None:
    from calofm.errors import CalofmError
    from calofm.training import TrainConfig, train

    given = {k: getattr(args, k) for k in RUN_OPTIONS if getattr(args, k) is not None}
    if args.compile:
        given["compile"] = True
    if args.resume:
        cfg = TrainConfig(data=tuple(args.data or ()), out=args.output) if args.data else None
        if args.simulate:
            given["simulate"] = stream_fields(args)["simulate"]
        # the trainer keeps what a resumed run may change (its length in steps, time budget, workers, logging)
        # and refuses, by name, any other option that differs from the run's
        summary = train(cfg, resume_dir=args.output, threads=args.threads, progress=not args.no_progress,
                        session=given)
    else:
        if not args.data and not args.simulate:
            raise CalofmError("--data and/or --simulate is required (unless --resume)")
        from calofm.model import get_preset

        get_preset(given.get("preset", "small"), **given.get("model", {}))  # fail early on a bad preset
        if "steps" not in given and "max_minutes" not in given:
            given["steps"] = 3000
        elif "steps" not in given:
            given["steps"] = None  # fitted to the time budget
        cfg = TrainConfig(data=tuple(args.data or ()), out=args.output, **given, **stream_fields(args))
        summary = train(cfg, threads=args.threads, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {summary['steps']} steps in {summary['wall_time_s']:.0f} s -> {args.output}")
        for material, r in summary.get("val", {}).items():
            print(f"  val {material}: {r['nll']:.4f} nats/token (voxel {r['voxel_nll']:.4f}, energy {r['energy_nll']:.4f})")


def cmd_generate(args) -> None:
    import torch

    from calofm.data.shards import shard_attrs
    from calofm.generation import DecodeOptions, load
    from calofm.generation.sampler import head_samplings
    from calofm.model.precision import resolve_precision
    from calofm.outputs import check_free_space, check_memory, check_output_file, shower_file_bytes
    from calofm.sharding import device_for, join_group, parse_shard, summarize
    from calofm.simulation.runner import parse_energy

    shard = parse_shard(args.shard)
    start, stop = shard.range(args.n)  # the whole run when not sharded
    n, output = stop - start, shard.path(args.output)
    if args.threads:
        torch.set_num_threads(args.threads)
    check_output_file(output, args.force)
    model = load(args.model, args.adapter, device=device_for(shard, args.device))
    join_group(shard, str(model.device))
    n_voxels = model.geometry.n_voxels
    # the showers are held in memory (float32, and once more when joined) before the file is written
    check_memory(2 * 4 * n * n_voxels, f"--n {n} ({n_voxels} voxels per shower)")
    check_free_space(output, shower_file_bytes(n, n_voxels), f"{n} showers")
    options = DecodeOptions(resolve_precision(args.precision, model.device), compile=args.compile,
                            graph=True if args.graph else None)
    t0 = time.perf_counter()
    incident, showers = model.generate(
        n, material=args.material, particle=args.particle, energy_GeV=args.energy, spectrum=args.spectrum,
        seed=args.seed, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p_voxel=args.min_p_voxel, min_p_energy=args.min_p_energy, batch_size=args.batch_size,
        output=output if shard.alone else None, progress=not args.no_progress, totals=args.totals, options=options,
        start=start, progress_tag=shard.tag)
    seconds = time.perf_counter() - t0
    if not shard.alone:  # the file says which showers of which run it holds (calofm merge checks)
        sampling, energy_sampling = head_samplings(args.temperature, args.top_k, args.top_p, args.min_p_voxel,
                                                   args.min_p_energy, model.min_p)
        material = model.materials[model.tokenizer.material_id(args.material)]
        particle = model.particles[model.tokenizer.particle_id(args.particle)]
        run = {"command": "generate", "model_sha256": model.manifest.get("weights", {}).get("sha256", ""),
               "adapter_sha256": list(getattr(model, "adapter_sha256", [])), "seed": args.seed,
               "material": material, "particle": particle,
               "geometry": model.geometry.with_absorber(material).to_json(),
               "energy_GeV": list(parse_energy(args.energy)), "spectrum": args.spectrum, "sampling": vars(sampling),
               "energy_sampling": vars(energy_sampling), "totals": args.totals, "precision": options.precision,
               "n": args.n}
        model.write(output, incident, showers, material, particle, args.seed, sampling, energy_sampling,
                    attrs=shard_attrs(run, shard.index, shard.count, start, stop, seconds))
    s = model.last_stats
    stages = {"off": "one-stage", "energy": "energy sum given the hit count from the fitted totals",
              "hits+energy": "two-stage: hit count and energy sum from the fitted totals"}[s["totals"]]
    print(f"{shard.tag}wrote {s['n_showers']} showers{'' if shard.alone else f' [{start}, {stop})'} to {output} "
          f"in {seconds:.1f} s ({s['mean_hits']:.1f} hits on average; {s['n_capped']} reached max_hits "
          f"{s['max_hits']}; {stages})")
    summarize(shard, {"n": n, "seconds": seconds}, "generate")


def cmd_fit_totals(args) -> None:
    from calofm.checkpoint import atomic_write_text, read_manifest
    from calofm.extension.adapters import read_adapter_manifest
    from calofm.generation import load
    from calofm.pretrained import resolve_adapter, resolve_model
    from calofm.training.data import load_corpus

    model_dir = resolve_model(args.model)
    shower_model = load(model_dir, args.adapter)
    # the same train / validation split as training, so the laws come from the training rows only
    _, train_set, _, _ = load_corpus(list(args.data), tokenizer=shower_model.tokenizer, log=lambda *a, **k: None)
    totals = train_set.fit_totals(shower_model.tokenizer)
    target = resolve_adapter(model_dir, args.adapter[-1]) if args.adapter else model_dir
    path = os.path.join(target, "manifest.json")
    manifest = read_adapter_manifest(target) if args.adapter else read_manifest(target)
    stored = manifest.setdefault("totals", {}) if args.adapter else manifest["tokenizer"].setdefault("totals", {})
    stored.update(totals.to_dict())
    atomic_write_text(path, json.dumps(manifest, indent=1))
    print(f"wrote shower totals for {', '.join(totals.keys())} into {path}")


def cmd_info(args) -> None:
    from calofm.generation import load

    model = load(args.model, args.adapter)
    m = model.manifest
    if args.json:
        print(json.dumps(m, indent=1))
        return
    cfg, tr = m["config"], m.get("training", {})
    print(repr(model))
    print(f"  width {cfg['d_model']}, {cfg['n_layers']} layers, {cfg['n_heads']} heads, experts per material "
          f"{cfg['moe_groups']}, shared expert {cfg['shared_expert']}, max sequence {cfg['max_seq_len']}")
    print(f"  hit order {m['tokenizer']['order']}, max_hits {m['tokenizer']['max_hits']}, energy bins "
          f"{m['tokenizer']['energy_bins']}")
    print(f"  weights sha256 {m['weights']['sha256']}")
    print(f"  min-p cuts (sampling defaults): energy {model.min_p['energy']:g}, voxel {model.min_p['voxel']:g}"
          f"{'' if 'min_p' in m else ' (calofm defaults: the model names none)'}")
    if tr:
        print(f"  trained {tr.get('steps')} steps, {tr.get('tokens_seen')} tokens, {tr.get('wall_time_s')} s; "
              f"simulator version {tr.get('simulator_version', 'not recorded (files, or before v2)')}")
        if "init_from" in tr:
            print(f"  started from {tr['init_from']['model']} ({tr['init_from']['tokens_seen_total']} tokens): "
                  f"{tr.get('tokens_seen_total')} tokens, {tr.get('wall_time_s_total')} s in all")
        print("  weights: " + averaged(tr.get("train_config", {}).get("ema", 0.0)))
        for material, r in tr.get("val", {}).items():
            print(f"  val {material}: {r['nll']:.4f} nats/token")
    n_base = m["weights"]["n_parameters"]
    manifests = getattr(model, "adapter_manifests", [])
    for path, am in zip(args.adapter, manifests):
        spec, n = am["spec"], am["weights"]["n_parameters"]
        cap = spec.get("max_hits") or f"{m['tokenizer']['max_hits']} (the base's)"
        print(f"  adapter {path}: {spec['kind']} {', '.join(spec['names'])} (initialized from {spec['init_from']}), "
              f"rank {spec['rank']}, {n:,} trainable parameters = {100 * n / n_base:.2f}% of the base, max_hits {cap}; "
              f"weights: {averaged(am.get('training', {}).get('ema', 0.0))}")
    totals = model.tokenizer.totals.keys()
    print(f"  two-stage totals (hit count, E_vis) for: {', '.join(totals) if totals else 'none (one-stage generation)'}")


def averaged(ema: float) -> str:
    """How a model's or adapter's weights were exported, from its --ema."""
    return f"moving average over about {1 / (1 - ema):.0f} steps (--ema {ema:g})" if ema else \
        "the last step's (no moving average)"
