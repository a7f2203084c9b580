"""Data subcommands: materials, geometry, simulate, merge, inspect."""

from __future__ import annotations

import os
import time

import numpy as np

from calofm.cli.args import POSITIVE, SEED, add_force, count, real


def register(sub) -> None:
    p = sub.add_parser("materials", help="table of the known materials and their constants")
    p.set_defaults(func=cmd_materials)

    p = sub.add_parser("geometry", help="describe a calorimeter geometry")
    p.add_argument("--preset", default="cpu", help="preset name (cpu, ild, calice) or a geometry .json file")
    p.add_argument("--absorber", default=None, help="swap the absorber (thicknesses stay in mm)")
    p.set_defaults(func=cmd_geometry)

    p = sub.add_parser("simulate", help="simulate showers with the embedded GFlash-style Monte Carlo")
    p.add_argument("--material", default="W", help="absorber material (see `calofm materials`)")
    p.add_argument("--particle", default="gamma", help="gamma, e- or e+")
    p.add_argument("--n", type=POSITIVE, default=1000, help="number of showers")
    p.add_argument("--energy", default="10:100", help="incident energy in GeV: E or Emin:Emax")
    p.add_argument("--spectrum", default="uniform", choices=["uniform", "log"])
    p.add_argument("--geometry", default="cpu", help="preset name or geometry .json file")
    p.add_argument("--threshold-mip", "--threshold", dest="threshold", type=real(0, 1000), default=0.5,
                   help="readout threshold per cell, in units of the most probable MIP deposit (default 0.5)")
    p.add_argument("--noise-mip", type=real(0, 1000), default=0.0,
                   help="Gaussian electronic noise per cell, sd in MIP (most probable) units (default 0: off)")
    p.add_argument("--position", default=None,
                   help="impact point X,Y in mm, or 'random' (uniform over one cell), 'random:S' (S x S mm) or "
                        "'random:SXxSY' around the default; default: the centre of a cell at the grid centre")
    p.add_argument("--angle", default=None, help="angle of incidence THETA,PHI in degrees (default 0,0: perpendicular)")
    p.add_argument("--seed", type=SEED, default=1)
    p.add_argument("--workers", type=count(1, 1024), default=None,
                   help="processes (default: all cores, at most 8; under torchrun shared among a node's ranks)")
    p.add_argument("-o", "--output", default="showers.h5", help="output HDF5 file")
    add_force(p, "an existing output file")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="simulate only shard K (0 ... N-1) of the run, whole chunks of 256 showers, into "
                        "OUTPUT.shard-K-of-N.h5 (for array jobs; under torchrun each rank is its shard by itself); "
                        "`calofm merge` joins the shards")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("merge", help="join the shard files of one `calofm generate`/`simulate` run (--shard K/N "
                       "or torchrun) into one file, in shower order")
    p.add_argument("shards", nargs="+", metavar="SHARD", help="the shard files (any order)")
    p.add_argument("-o", "--output", required=True, help="output HDF5 file")
    add_force(p, "an existing output file")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("inspect", help="summarize a shower file")
    p.add_argument("file")
    p.add_argument("--binning", default=None, help="CaloChallenge binning XML (for files without a geometry)")
    p.set_defaults(func=cmd_inspect)


def cmd_materials(args) -> None:
    from calofm.detector.materials import list_materials, source

    header = f"{'name':<12}{'kind':<9}{'Z':>6}{'A':>8}{'rho':>8}{'X0/mm':>8}{'R_M/mm':>8}{'E_c/MeV':>9}{'lam_I/mm':>10}"
    print(header + "\n" + "-" * len(header))
    for m in list_materials():
        print(f"{m.name:<12}{m.kind:<9}{m.Z:>6.1f}{m.A:>8.2f}{m.density:>8.3f}{m.X0_mm:>8.2f}{m.R_M_mm:>8.2f}"
              f"{m.E_c_MeV:>9.2f}{10 * m.lambda_I_cm:>10.1f}")
    print(f"\nsource: {source()}")


def cmd_geometry(args) -> None:
    from calofm.detector.geometry import get_geometry
    from calofm.simulation import Medium

    geometry = get_geometry(args.preset, absorber=args.absorber)
    print(geometry.describe())
    medium = Medium.from_geometry(geometry)
    print(f"  effective medium: Z = {medium.Z:.1f}, X0 = {medium.X0_mm:.2f} mm, R_M = {medium.R_M_mm:.2f} mm, "
          f"E_c = {medium.E_c_MeV:.2f} MeV, F_s = {medium.F_s:.2f}, e/mip = {medium.e_hat:.3f}")
    print(f"  visible fraction {medium.visible_fraction.min():.4f}-{medium.visible_fraction.max():.4f}, "
          f"sampling term {100 * medium.resolution.min():.1f}-{100 * medium.resolution.max():.1f} %/sqrt(E), "
          f"MIP (most probable) {1000 * medium.mip_mpv_MeV[0]:.0f} keV, "
          f"threshold 0.5 MIP = {medium.threshold_MeV[0]:.3f} MeV")
    x, y = geometry.default_impact_mm
    print(f"  default beam: perpendicular at ({x:g}, {y:g}) mm (a cell centre)")


def cmd_simulate(args) -> None:
    from calofm.detector.geometry import get_geometry
    from calofm.outputs import check_free_space, check_output_file, shower_file_bytes
    from calofm.sharding import join_group, parse_shard, summarize
    from calofm.simulation import simulate_to_file
    from calofm.simulation.runner import CHUNK, parse_energy

    parse_energy(args.energy)  # a bad energy fails before the output is touched
    shard = parse_shard(args.shard)
    lo, hi = shard.range(args.n, CHUNK)
    output = shard.path(args.output)
    check_output_file(output, args.force)
    check_free_space(output, shower_file_bytes(hi - lo, get_geometry(args.geometry).n_voxels), f"{hi - lo} showers")
    join_group(shard, "cpu")
    workers = args.workers
    if workers is None and shard.torchrun:  # the node's cores shared among its ranks
        workers = max(1, min(os.cpu_count() or 1, 8) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    start = time.perf_counter()
    simulate_to_file(output, args.n, material=args.material, particle=args.particle,
                     energy_GeV=args.energy, spectrum=args.spectrum, geometry=args.geometry, seed=args.seed,
                     threshold_mip=args.threshold, workers=workers, noise_mip=args.noise_mip,
                     position=args.position, angle=args.angle, shard=None if shard.alone else shard)
    elapsed = time.perf_counter() - start
    print(f"{shard.tag}wrote {hi - lo} showers{'' if shard.alone else f' [{lo}, {hi})'} to {output} in "
          f"{elapsed:.1f} s ({(hi - lo) / elapsed:.0f} showers/s)")
    if shard.alone:
        _summary(output, None)
    summarize(shard, {"n": hi - lo, "seconds": elapsed}, "simulate")


def cmd_merge(args) -> None:
    from calofm.data.shards import merge_shards
    from calofm.errors import CalofmError
    from calofm.outputs import check_free_space, check_output_file

    check_output_file(args.output, args.force)
    inputs = {os.path.realpath(p) for p in args.shards}
    if os.path.realpath(args.output) in inputs:
        raise CalofmError(f"output {args.output} is one of the shards; write the merged file elsewhere")
    check_free_space(args.output, sum(os.path.getsize(p) for p in args.shards if os.path.isfile(p)),
                     f"{len(args.shards)} shards")
    start = time.perf_counter()
    done = merge_shards(list(args.shards), args.output)
    for path, n, seconds in done["shards"]:
        print(f"  {path}: {n} showers, {n / max(seconds, 1e-3):.2f} showers/s")
    total_rate = sum(n / max(seconds, 1e-3) for _, n, seconds in done["shards"])
    print(f"wrote {done['n']} showers of {len(done['shards'])} shards to {args.output} in "
          f"{time.perf_counter() - start:.1f} s; the shards together made {total_rate:.2f} showers/s "
          "(the sum of their rates, for shards run side by side)")


def cmd_inspect(args) -> None:
    _summary(args.file, args.binning)


def _summary(path: str, binning: str | None) -> None:
    from calofm.data.showers import inspect_file, iter_showers, read_beam

    info = inspect_file(path, binning_xml=binning)
    e_min, e_max, hits, visible, n = np.inf, 0.0, 0.0, 0.0, 0
    for energies, showers in iter_showers(path, info=info):
        e_min, e_max = min(e_min, float(energies.min())), max(e_max, float(energies.max()))
        hits += float((showers > 0).sum())
        visible += float((showers.sum(1) / energies).sum())
        n += len(energies)
    g = info.geometry
    print(f"file:       {path}")
    print(f"showers:    {info.n_showers} x {info.n_voxels} voxels"
          + (f" (geometry {g.name!r}: {g.n_layers} layers, {g.cells_per_layer[0]} cells/layer)" if g else ""))
    print(f"material:   {info.material or 'unknown'}    particle: {info.particle or 'unknown'}")
    print(f"generator:  {info.generator or 'unknown'}    seed: {info.seed}")
    print(f"energy:     {e_min / 1000:.2f} - {e_max / 1000:.2f} GeV")
    print(f"mean hits:  {hits / n:.1f} cells above threshold")
    beam = read_beam(path) if info.has_beam else None
    if beam is not None:
        pos, ang = beam
        print(f"beam:       x {pos[:, 0].min():.1f} - {pos[:, 0].max():.1f} mm, y {pos[:, 1].min():.1f} - "
              f"{pos[:, 1].max():.1f} mm, theta {ang[:, 0].min():g} - {ang[:, 0].max():g} deg, "
              f"phi {ang[:, 1].min():g} - {ang[:, 1].max():g} deg")
    print(f"mean E_vis/E_inc: {visible / n:.4f}")
