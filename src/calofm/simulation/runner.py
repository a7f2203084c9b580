"""Public entry points of the shower Monte Carlo: in memory, or streamed to an HDF5 file.

Reproducibility: showers are made in fixed-size chunks and chunk k draws from
numpy.random.default_rng([seed, k]); a file is therefore bit-identical for the same seed whatever
the number of worker processes, and its first showers do not depend on how many follow.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
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
SIMULATOR_VERSION = 1
GENERATOR = f"calofm-sim {__version__} v{SIMULATOR_VERSION} (Grindhammer-Peters parameterization)"


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
    return lo, hi


def sample_energies(n: int, energy_GeV: tuple[float, float], spectrum: str, rng: np.random.Generator) -> np.ndarray:
    """Incident energies in MeV; (n,) float64."""
    lo, hi = energy_GeV
    if spectrum == "uniform":
        e = rng.uniform(lo, hi, n)
    elif spectrum == "log":
        e = np.exp(rng.uniform(np.log(lo), np.log(hi), n))
    else:
        raise CalofmError(f"unknown spectrum {spectrum!r}; use 'uniform' or 'log'")
    return e * 1000.0


def _chunk(k: int, n: int, seed: int, geometry: Geometry, medium: Medium, particle: str,
           energy_GeV: tuple[float, float], spectrum: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, k])
    energies = sample_energies(n, energy_GeV, spectrum, rng)
    return energies.astype(np.float32), simulate_batch(energies, geometry, medium, particle, rng)


def _setup(material, particle, energy_GeV, spectrum, geometry, threshold_mip):
    geometry = get_geometry(geometry, absorber=get_material(material).name)
    particle = canonical_particle(particle)
    energy = parse_energy(energy_GeV)
    if spectrum not in ("uniform", "log"):
        raise CalofmError(f"unknown spectrum {spectrum!r}; use 'uniform' or 'log'")
    if not threshold_mip >= 0:
        raise CalofmError(f"threshold must be >= 0 MIP, got {threshold_mip}")
    return geometry, particle, energy, Medium.from_geometry(geometry, threshold_mip)


def _chunks(n: int, seed: int, workers: int, progress: bool, desc: str, **kw):
    sizes = [min(CHUNK, n - lo) for lo in range(0, n, CHUNK)]
    jobs = [partial(_chunk, k, size, seed, **kw) for k, size in enumerate(sizes)]
    bar = tqdm(total=n, unit="shower", desc=desc, disable=not progress, dynamic_ncols=True)
    if workers <= 1 or len(jobs) <= 2:
        results = (job() for job in jobs)
        pool = None
    else:
        pool = ProcessPoolExecutor(max_workers=workers)
        # bounded look-ahead keeps memory flat: at most 2 * workers chunks in flight
        results = _ordered(pool, jobs, 2 * workers)
    try:
        for energies, showers in results:
            bar.update(len(energies))
            yield energies, showers
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
             threshold_mip: float = 0.5, workers: int = 1, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Simulate n showers in memory: (incident energies (n,) MeV, visible cell energies (n, n_voxels) MeV)."""
    if n <= 0:
        raise CalofmError(f"number of showers must be > 0, got {n}")
    geometry, particle, energy, medium = _setup(material, particle, energy_GeV, spectrum, geometry, threshold_mip)
    parts = list(_chunks(n, seed, workers, progress, "simulate", geometry=geometry, medium=medium,
                         particle=particle, energy_GeV=energy, spectrum=spectrum))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def simulate_to_file(path: str, n: int, material: str = "W", particle: str = "gamma", energy_GeV=(10.0, 100.0),
                     spectrum: str = "uniform", geometry: str | Geometry = "cpu", seed: int = 0,
                     threshold_mip: float = 0.5, workers: int | None = None, progress: bool = True) -> Geometry:
    """Stream n simulated showers into a CaloChallenge-layout HDF5 file (atomic; memory ~ one chunk per worker)."""
    from calofm.data.showers import ShowerWriter

    if n <= 0:
        raise CalofmError(f"number of showers must be > 0, got {n}")
    geometry, particle, energy, medium = _setup(material, particle, energy_GeV, spectrum, geometry, threshold_mip)
    workers = workers or min(os.cpu_count() or 1, 8)
    extra = {"energy_GeV": f"{energy[0]:g}:{energy[1]:g}", "spectrum": spectrum, "threshold_mip": threshold_mip}
    with ShowerWriter(path, geometry, geometry.absorber, particle, GENERATOR, seed, expected=n, extra_attrs=extra) as w:
        for energies, showers in _chunks(n, seed, workers, progress, f"simulate {geometry.absorber} {particle}",
                                         geometry=geometry, medium=medium, particle=particle, energy_GeV=energy,
                                         spectrum=spectrum):
            w.write(energies, showers)
    return geometry


def calibrated_energy(showers: np.ndarray, geometry: Geometry, threshold_mip: float = 0.5) -> np.ndarray:
    """Deposited-energy estimate sum_l E_vis,l / f_vis,l in MeV — the layer-weighted sum an experiment
    reconstructs (e.g. ILD weights its thick-tungsten layers twice); (N,)."""
    medium = Medium.from_geometry(geometry, threshold_mip)
    per_layer = np.add.reduceat(showers, geometry.layer_offsets[:-1], axis=1)  # (N, L)
    return per_layer @ (1.0 / medium.visible_fraction)
