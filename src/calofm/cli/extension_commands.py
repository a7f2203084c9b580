"""`calofm extend material|particle`."""

from __future__ import annotations

from calofm.cli.args import FRACTION, LEARNING_RATE, POSITIVE, SEED, THREADS, add_force, count, real
from calofm.cli.model_commands import add_stream_arguments


def register(sub) -> None:
    p = sub.add_parser("extend", help="add a material or a particle to a trained model, as an adapter")
    esub = p.add_subparsers(dest="extend_kind", required=True, metavar="KIND")
    for kind in ("material", "particle"):
        e = esub.add_parser(kind, help=f"train an adapter for new {kind}(s); the base model is not modified")
        e.add_argument("--base", required=True, help="base model directory")
        e.add_argument("--adapter", action="append", default=[], help="adapters to apply first (in order)")
        e.add_argument("--data", action="append", default=[], help="shower file(s) of the new "
                       + ("material(s), one file per material" if kind == "material" else "particle"))
        add_stream_arguments(e, particle=kind == "material", geometry=None)
        e.add_argument("-o", "--output", required=True,
                       help="adapter directory to write: a new or empty directory, or an adapter to replace (--force)")
        add_force(e, "an adapter already in --output (nothing else is ever deleted)")
        if kind == "particle":
            e.add_argument("--particle", default=None,
                           help="the new particle (default: from the data file; with --simulate, the one simulated)")
            e.add_argument("--head-rank", type=count(1, 4096), default=16, help="rank of the output-head correction")
        e.add_argument("--init-from", default=None, help="known material/particle to start from "
                       "(default: the closest material by X0, R_M, E_c, Z; or the first particle)")
        e.add_argument("--rank", type=count(1, 4096), default=8)
        e.add_argument("--alpha", type=real(0, lo_open=True), default=16.0)
        e.add_argument("--steps", type=POSITIVE, default=600)
        e.add_argument("--batch-size", type=POSITIVE, default=32)
        e.add_argument("--lr", type=LEARNING_RATE, default=3e-3)
        e.add_argument("--ema", type=FRACTION, default=0.99, metavar="DECAY",
                       help="the adapter written is the moving average of its weights with this decay "
                       "(over about 1 / (1 - DECAY) steps; default 0.99); 0: the last step's weights")
        e.add_argument("--max-showers", type=POSITIVE, default=None, help="fine-tune on at most this many showers")
        e.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                       help="autocast dtype; auto (default): bf16 where the hardware runs it natively, else fp32")
        e.add_argument("--threads", type=THREADS, default=None)
        e.add_argument("--seed", type=SEED, default=0)
        e.add_argument("--no-progress", action="store_true", help="no progress bar")
        e.set_defaults(func=cmd_extend, kind=kind)



def cmd_extend(args) -> None:
    from calofm.errors import CalofmError
    from calofm.extension.train import extend
    from calofm.training.stream import StreamSpec

    data = [p for item in args.data for p in item.split(",") if p]
    stream = None
    if args.simulate:
        particle = args.particle
        if particle is None:  # extend particle: the new particle is the one to simulate
            raise CalofmError("--simulate needs --particle (the new particle to simulate)")
        stream = StreamSpec.parse(args.simulate, particle, args.energy, args.geometry or base_geometry(args.base))
    extend(args.kind, args.base, data, args.output, adapters=tuple(args.adapter),
           particle=args.particle if args.kind == "particle" else None, init_from=args.init_from, rank=args.rank,
           head_rank=getattr(args, "head_rank", 16), alpha=args.alpha, steps=args.steps, batch_size=args.batch_size,
           lr=args.lr, ema=args.ema, max_showers=args.max_showers, precision=args.precision, seed=args.seed, threads=args.threads,
           stream=stream, workers=args.workers, progress=not args.no_progress, force=args.force)


def base_geometry(base: str) -> str:
    """The readout a base model was trained on, as --geometry takes it: a preset's name, else its JSON."""
    from calofm.checkpoint import read_manifest
    from calofm.detector.geometry import PRESETS, Geometry
    from calofm.errors import CalofmError
    from calofm.pretrained import resolve_model

    try:
        geometry = Geometry.from_dict(read_manifest(resolve_model(base))["tokenizer"]["geometry"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CalofmError(f"{base}: malformed model manifest ({exc!r})") from None
    preset = PRESETS.get(geometry.name)
    if preset is not None and preset.with_absorber(geometry.layers[0].absorber).to_json() == geometry.to_json():
        return geometry.name
    return geometry.to_json()
