"""`calofm export`: the model's decode step as ONNX graphs for a host program (see docs/export.md)."""

from __future__ import annotations

from calofm.cli.args import THREADS, add_force


def register(sub) -> None:
    p = sub.add_parser("export", help="export the prefill and the one-hit decode step as ONNX graphs, one folder "
                       "per class (material, particle), with a JSON describing tokens, energy bins and geometry")
    p.add_argument("--model", required=True, help="shipped model name (calofm-small) or model directory")
    p.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="adapter to merge into the graphs of the classes it acts on (repeat to stack, in order)")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="graph format (onnx)")
    p.add_argument("-o", "--output", required=True, help="export folder: one subfolder per class")
    p.add_argument("--material", default=None, help="export this material only (default: every material)")
    p.add_argument("--particle", default=None, help="export this particle only (default: every particle)")
    add_force(p, "an earlier export in --output (nothing else is ever deleted)")
    p.add_argument("--threads", type=THREADS, default=None, help="torch CPU threads")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> None:
    import torch

    import calofm
    from calofm.export.onnx_export import export_onnx, require_onnx
    from calofm.outputs import check_output_dir

    require_onnx()
    check_output_dir(args.output, args.force, "export folder", fmt="calofm-onnx")  # before loading anything
    if args.threads:
        torch.set_num_threads(args.threads)
    sm = calofm.load(args.model, adapters=args.adapter)
    materials = sm.materials if args.material is None else [sm.materials[sm.tokenizer.material_id(args.material)]]
    particles = sm.particles if args.particle is None else [sm.particles[sm.tokenizer.particle_id(args.particle)]]
    export_onnx(sm, args.output, [(m, p) for m in materials for p in particles], force=args.force)
