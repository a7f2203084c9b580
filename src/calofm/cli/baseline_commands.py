"""`calofm baseline train|generate`: the CaloDiffusion-style comparison model."""

from __future__ import annotations

import time

from calofm.cli.args import LEARNING_RATE, POSITIVE, SEED, add_force, count


def register(sub) -> None:
    p = sub.add_parser("baseline", help="the diffusion baseline (train, generate)")
    bsub = p.add_subparsers(dest="baseline_command", required=True, metavar="ACTION")

    t = bsub.add_parser("train", help="train the diffusion baseline on shower files (one per material)")
    t.add_argument("--data", nargs="+", required=True, help="HDF5 files, one per material, same geometry")
    t.add_argument("-o", "--output", required=True, help="output model directory")
    add_force(t, "a diffusion baseline already in --output")
    t.add_argument("--steps", type=POSITIVE, default=3000)
    t.add_argument("--batch-size", type=POSITIVE, default=64)
    t.add_argument("--channels", type=count(1, 4096), default=64)
    t.add_argument("--lr", type=LEARNING_RATE, default=2e-4)
    t.add_argument("--max-showers", type=POSITIVE, default=None, help="per file")
    t.add_argument("--seed", type=SEED, default=0)
    t.add_argument("--prediction", choices=["v", "eps"], default="v",
                   help="network output: velocity v (default) or noise eps (the first baselines)")
    t.set_defaults(func=cmd_train)

    g = bsub.add_parser("generate", help="sample showers from a trained diffusion baseline")
    g.add_argument("--model", required=True)
    g.add_argument("--material", required=True)
    g.add_argument("--particle", default="gamma")
    g.add_argument("--n", type=POSITIVE, default=1000)
    g.add_argument("--energy", default="10:100", help="GeV: E or Emin:Emax (uniform)")
    g.add_argument("--steps", type=POSITIVE, default=None, help="sampling steps (default: all 400, DDPM)")
    g.add_argument("--batch-size", type=POSITIVE, default=500)
    g.add_argument("--seed", type=SEED, default=1)
    g.add_argument("-o", "--output", required=True)
    add_force(g, "an existing output file")
    g.set_defaults(func=cmd_generate)


def cmd_train(args) -> None:
    from calofm.baselines.diffusion import train_diffusion
    from calofm.outputs import check_output_dir

    check_output_dir(args.output, args.force, "baseline directory", fmt="calofm-diffusion-baseline")
    model = train_diffusion(args.data, args.output, channels=args.channels, steps=args.steps,
                            batch_size=args.batch_size, lr=args.lr, seed=args.seed, max_showers=args.max_showers,
                            prediction=args.prediction)
    print(f"wrote {args.output} ({model.net.num_parameters() / 1e6:.2f} M parameters)")


def cmd_generate(args) -> None:
    import numpy as np

    from calofm.baselines.diffusion import DiffusionBaseline
    from calofm.data.showers import ShowerWriter
    from calofm.errors import CalofmError
    from calofm.outputs import check_free_space, check_memory, check_output_file, shower_file_bytes
    from calofm.simulation.runner import canonical_particle, parse_energy, sample_energies

    check_output_file(args.output, args.force)
    model, geometry = DiffusionBaseline.load(args.model)
    if args.material not in model.cfg.materials:
        raise CalofmError(f"the baseline knows materials {model.cfg.materials}, not {args.material!r}")
    check_memory(2 * 4 * args.n * geometry.n_voxels, f"--n {args.n} ({geometry.n_voxels} voxels per shower)")
    check_free_space(args.output, shower_file_bytes(args.n, geometry.n_voxels), f"{args.n} showers")
    incident = sample_energies(args.n, parse_energy(args.energy), "uniform", np.random.default_rng(args.seed))
    materials = np.full(args.n, model.cfg.materials.index(args.material))
    start = time.perf_counter()
    showers = model.sample(incident, materials, steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                           progress=True)
    elapsed = time.perf_counter() - start
    with ShowerWriter(args.output, geometry.with_absorber(args.material), args.material,
                      canonical_particle(args.particle), "calofm-diffusion-baseline", args.seed) as w:
        w.write(incident.astype(np.float32), showers)
    print(f"wrote {args.n} showers to {args.output} in {elapsed:.1f} s ({1000 * elapsed / args.n:.1f} ms/shower)")
