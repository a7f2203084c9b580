"""`calofm demo`: simulate, generate with the shipped model and adapters, evaluate, report."""

from __future__ import annotations

from calofm.cli.args import POSITIVE, SEED, THREADS


def register(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on the embedded defaults, into one HTML report")
    p.add_argument("-o", "--output", default="demo-report", help="report directory (default demo-report/)")
    p.add_argument("--quick", action="store_true", help="a ~2-minute version with fewer showers")
    p.add_argument("--n", type=POSITIVE, default=None, help="showers per sample (default 500, quick 120)")
    p.add_argument("--model", default="calofm-small", help="shipped model name or model directory")
    p.add_argument("--batch-size", type=POSITIVE, default=500)
    p.add_argument("--threads", type=THREADS, default=None)
    p.add_argument("--seed", type=SEED, default=1)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> None:
    from calofm.demo import run_demo
    from calofm.outputs import check_output_dir

    check_output_dir(args.output, force=True, what="report folder")  # replaces only the demo's own files

    run_demo(args.output, quick=args.quick, n=args.n, seed=args.seed, model=args.model,
             batch_size=args.batch_size, threads=args.threads)
