"""Public entry points of the shower Monte Carlo: in memory, or streamed to an HDF5 file.

Reproducibility: showers are made in fixed-size chunks and chunk k draws from
numpy.random.default_rng([seed, k]); a file is therefore bit-identical for the same seed whatever
the number of worker processes. Shower i depends on the seed and i (its chunk, its place there), and
on the run's size n only in the last chunk when n is not a whole number of chunks (a short chunk
draws its random numbers in another order). A shard (calofm.sharding) therefore makes whole chunks:
its showers are the one-process run's.

The beam: an impact point on the front face (mm; by default the centre of a cell next to the grid
centre) or a uniform spread over a rectangle, and an angle of incidence (theta from the axis, phi
azimuth, degrees). Every shower's impact point and angles are returned / written with it.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
from tqdm import tqdm

from calofm import __version__
from calofm.detector.geometry import Geometry, get_geometry
from calofm.detector.materials import get_material
from calofm.detector.particles import canonical_particle
from calofm.errors import CalofmError
from calofm.simulation.gflash import simulate_batch
from calofm.simulation.medium import Medium

CHUNK = 256  # showers per chunk: small enough to stay in cache, large enough to vectorize
# Bumped whenever the simulated showers change for a given seed; models record the version they
# were trained on (manifest key "simulator_version").
SIMULATOR_VERSION = 2
GENERATOR = f"calofm-sim {__version__} v{SIMULATOR_VERSION} (Grindhammer-Peters parameterization)"


MAX_ENERGY_GEV = 10_000.0  # 10 TeV: beyond every CaloChallenge dataset (the spot count grows ~ E^0.88)


def parse_energy(text: str | float | tuple) -> tuple[float, float]:
    """'50' -> (50, 50); '10:100' -> (10, 100) in GeV; refuses non-positive or inverted ranges."""
    try:
        if isinstance(text, (int, float)):
            lo = hi = float(text)
        elif isinstance(text, (tuple, list)):
            lo, hi = (float(v) for v in text)
        else:
            parts = str(text).split(":")
            if len(parts) not in (1, 2):
                raise ValueError
            lo, hi = float(parts[0]), float(parts[-1])
    except ValueError:
        raise CalofmError(f"energy must be 'E' or 'Emin:Emax' in GeV, got {text!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo <= 0 or hi <= 0:
        raise CalofmError(f"energies must be finite and > 0 GeV, got {text!r}")
    if hi < lo:
        raise CalofmError(f"inverted energy range {lo:g}:{hi:g} GeV (minimum above maximum)")
    if hi > MAX_ENERGY_GEV:
        raise CalofmError(f"energy {hi:g} GeV is above the {MAX_ENERGY_GEV:g} GeV the simulator and models cover")
    return lo, hi


@dataclass(frozen=True)
class Beam:
    """Where and how the particles enter: centre of the impact area (mm), its size (uniform over a
    rectangle; 0 = a fixed point) and the angle of incidence (degrees)."""

    position_mm: tuple[float, float]
    spread_mm: tuple[float, float] = (0.0, 0.0)
    angle_deg: tuple[float, float] = (0.0, 0.0)  # (theta, phi)

    def describe(self) -> str:
        x, y = self.position_mm
        where = f"({x:g}, {y:g}) mm" if self.spread_mm == (0.0, 0.0) else \
            f"uniform over {self.spread_mm[0]:g} x {self.spread_mm[1]:g} mm around ({x:g}, {y:g}) mm"
        return f"{where}, theta {self.angle_deg[0]:g} deg, phi {self.angle_deg[1]:g} deg"


MAX_THETA_DEG = 80.0


def _pair(text, what: str) -> tuple[float, float]:
    try:
        if isinstance(text, str):
            parts = [float(v) for v in text.replace(" ", "").split(",")]
        else:
            parts = [float(v) for v in text]
        if len(parts) != 2 or not all(np.isfinite(parts)):
            raise ValueError
    except (TypeError, ValueError):
        raise CalofmError(f"{what} must be two numbers 'A,B', got {text!r}") from None
    return parts[0], parts[1]


def parse_beam(geometry: Geometry, position=None, angle=None) -> Beam:
    """position: None (default cell centre), 'X,Y' or (x, y) in mm, 'random' (uniform over the cell
    around the default point), 'random:S' (an S x S mm square) or 'random:SXxSY'; angle: None
    (perpendicular), 'THETA,PHI' or (theta, phi) in degrees, 0 <= theta <= 80."""
    centre, spread = geometry.default_impact_mm, (0.0, 0.0)
    if position is not None and str(position).strip().lower().startswith("random"):
        size = str(position).strip().lower()[len("random"):].lstrip(":")
        if not size:
            if not geometry.is_cartesian:
                raise CalofmError("--position random needs an area on a cylindrical grid: random:SIZE (mm)")
            spread = (geometry.grid.cell_mm, geometry.grid.cell_mm)
        else:
            spread = _pair(size.replace("x", ",") if "x" in size else f"{size},{size}", "random area 'SX' or 'SXxSY'")
            if min(spread) <= 0:
                raise CalofmError(f"random impact area must be > 0 mm, got {position!r}")
    elif position is not None:
        centre = _pair(position, "position 'X,Y' (mm)")
    theta, phi = (0.0, 0.0) if angle is None else _pair(angle, "angle 'THETA,PHI' (degrees)")
    if not 0.0 <= theta <= MAX_THETA_DEG:
        raise CalofmError(f"polar angle theta must be within 0-{MAX_THETA_DEG:g} degrees, got {theta:g}")
    return Beam((float(centre[0]), float(centre[1])), (float(spread[0]), float(spread[1])), (theta, phi))


def sample_energies(n: int, energy_GeV: tuple[float, float], spectrum: str, rng: np.random.Generator) -> np.ndarray:
    """Incident energies in MeV; (n,) float64."""
    return energies_from_uniforms(rng.random(n), energy_GeV, spectrum)


def energies_from_uniforms(u: np.ndarray, energy_GeV: tuple[float, float], spectrum: str) -> np.ndarray:
    """Incident energies in MeV (float64) from uniforms u in [0, 1): lo + (hi - lo) u in GeV for the
    uniform spectrum, its logarithm's for the log one (numpy's uniform(lo, hi) computes the same)."""
    lo, hi = energy_GeV
    if spectrum == "uniform":
        e = lo + (hi - lo) * np.asarray(u, dtype=np.float64)
    elif spectrum == "log":
        e = np.exp(np.log(lo) + (np.log(hi) - np.log(lo)) * np.asarray(u, dtype=np.float64))
    else:
        raise CalofmError(f"unknown spectrum {spectrum!r}; use 'uniform' or 'log'")
    return e * 1000.0


def _chunk(k: int, n: int, seed: int, geometry: Geometry, medium: Medium, particle: str,
           energy_GeV: tuple[float, float], spectrum: str, beam: Beam):
    """(energies (n,), showers (n, V), impact points (n, 2) mm, angles (n, 2) degrees)."""
    rng = np.random.default_rng([seed, k])
    energies = sample_energies(n, energy_GeV, spectrum, rng)
    position = np.broadcast_to(np.asarray(beam.position_mm), (n, 2))
    if beam.spread_mm != (0.0, 0.0):
        position = position + (rng.random((n, 2)) - 0.5) * np.asarray(beam.spread_mm)
    angle = np.broadcast_to(np.asarray(beam.angle_deg), (n, 2))
    showers = simulate_batch(energies, geometry, medium, particle, rng, position, np.radians(angle))
    return energies.astype(np.float32), showers, position.astype(np.float32), angle.astype(np.float32)


def _setup(material, particle, energy_GeV, spectrum, geometry, threshold_mip, noise_mip, position, angle):
    geometry = get_geometry(geometry, absorber=get_material(material).name)
    particle = canonical_particle(particle)
    energy = parse_energy(energy_GeV)
    if spectrum not in ("uniform", "log"):
        raise CalofmError(f"unknown spectrum {spectrum!r}; use 'uniform' or 'log'")
    if not threshold_mip >= 0:
        raise CalofmError(f"threshold must be >= 0 MIP, got {threshold_mip}")
    if not noise_mip >= 0:
        raise CalofmError(f"noise must be >= 0 MIP, got {noise_mip}")
    beam = parse_beam(geometry, position, angle)
    return geometry, particle, energy, Medium.from_geometry(geometry, threshold_mip, noise_mip), beam


def _chunks(n: int, seed: int, workers: int, progress: bool, desc: str, start: int = 0, stop: int | None = None,
            **kw):
    """The chunks of a run of n showers that make showers [start, stop) (start a whole number of chunks)."""
    stop = n if stop is None else stop
    sizes = {lo // CHUNK: min(CHUNK, n - lo) for lo in range(start, stop, CHUNK)}
    jobs = [partial(_chunk, k, size, seed, **kw) for k, size in sizes.items()]
    bar = tqdm(total=stop - start, unit="shower", desc=desc, disable=not progress, dynamic_ncols=True)
    if workers <= 1 or len(jobs) <= 2:
        results = (job() for job in jobs)
        pool = None
    else:
        pool = ProcessPoolExecutor(max_workers=workers)
        # bounded look-ahead keeps memory flat: at most 2 * workers chunks in flight
        results = _ordered(pool, jobs, 2 * workers)
    try:
        for part in results:
            bar.update(len(part[0]))
            yield part
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _ordered(pool, jobs, depth):
    pending = [pool.submit(job) for job in jobs[:depth]]
    for i in range(len(jobs)):
        result = pending.pop(0).result()
        if i + depth < len(jobs):
            pending.append(pool.submit(jobs[i + depth]))
        yield result


def simulate(n: int, material: str = "W", particle: str = "gamma", energy_GeV=(10.0, 100.0),
             spectrum: str = "uniform", geometry: str | Geometry = "cpu", seed: int = 0,
             threshold_mip: float = 0.5, workers: int = 1, progress: bool = False, noise_mip: float = 0.0,
             position=None, angle=None, return_beam: bool = False):
    """Simulate n showers in memory: (incident energies (n,) MeV, visible cell energies (n, n_voxels) MeV),
    plus (impact points (n, 2) mm, angles (n, 2) degrees) when return_beam. Beam: see parse_beam."""
    if n <= 0:
        raise CalofmError(f"number of showers must be > 0, got {n}")
    geometry, particle, energy, medium, beam = _setup(material, particle, energy_GeV, spectrum, geometry,
                                                      threshold_mip, noise_mip, position, angle)
    parts = list(_chunks(n, seed, workers, progress, "simulate", geometry=geometry, medium=medium,
                         particle=particle, energy_GeV=energy, spectrum=spectrum, beam=beam))
    out = tuple(np.concatenate([p[i] for p in parts]) for i in range(4))
    return out if return_beam else out[:2]


def simulate_to_file(path: str, n: int, material: str = "W", particle: str = "gamma", energy_GeV=(10.0, 100.0),
                     spectrum: str = "uniform", geometry: str | Geometry = "cpu", seed: int = 0,
                     threshold_mip: float = 0.5, workers: int | None = None, progress: bool = True,
                     noise_mip: float = 0.0, position=None, angle=None, shard=None) -> Geometry:
    """Stream n simulated showers into a CaloChallenge-layout HDF5 file (atomic; memory ~ one chunk per
    worker), with each shower's impact point and angles beside its incident energy.
    shard (calofm.sharding.Shard): only that shard's showers, whole chunks of the run
    (shard.range(n, CHUNK)), with the attributes `calofm merge` reads (calofm.data.shards)."""
    from calofm.data.shards import shard_attrs
    from calofm.data.showers import ShowerWriter

    if n <= 0:
        raise CalofmError(f"number of showers must be > 0, got {n}")
    geometry, particle, energy, medium, beam = _setup(material, particle, energy_GeV, spectrum, geometry,
                                                      threshold_mip, noise_mip, position, angle)
    workers = workers or min(os.cpu_count() or 1, 8)
    extra = {"energy_GeV": f"{energy[0]:g}:{energy[1]:g}", "spectrum": spectrum, "threshold_mip": threshold_mip,
             "noise_mip": noise_mip, "beam": beam.describe(), "simulator_version": SIMULATOR_VERSION}
    start, stop = (0, n) if shard is None else shard.range(n, CHUNK)
    run = {"command": "simulate", "generator": GENERATOR, "seed": int(seed), "material": geometry.absorber,
           "particle": particle, "geometry": geometry.to_json(), **extra, "n": n}
    t0 = time.perf_counter()
    with ShowerWriter(path, geometry, geometry.absorber, particle, GENERATOR, seed, expected=stop - start,
                      extra_attrs=extra, beam=True) as w:
        for energies, showers, positions, angles in _chunks(
                n, seed, workers, progress, f"{'' if shard is None else shard.tag}simulate {geometry.absorber} "
                f"{particle}", start, stop, geometry=geometry, medium=medium, particle=particle, energy_GeV=energy,
                spectrum=spectrum, beam=beam):
            w.write(energies, showers, positions, angles)
        if shard is not None and not shard.alone:
            w.set_attrs(shard_attrs(run, shard.index, shard.count, start, stop, time.perf_counter() - t0))
    return geometry


def calibrated_energy(showers: np.ndarray, geometry: Geometry, threshold_mip: float = 0.5) -> np.ndarray:
    """Deposited-energy estimate sum_l E_vis,l / f_vis,l in MeV — the layer-weighted sum an experiment
    reconstructs (e.g. ILD weights its thick-tungsten layers twice); (N,)."""
    medium = Medium.from_geometry(geometry, threshold_mip)
    per_layer = np.add.reduceat(showers, geometry.layer_offsets[:-1], axis=1)  # (N, L)
    return per_layer @ (1.0 / medium.visible_fraction)
