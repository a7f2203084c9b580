"""Synthetic sparse showers for unit tests and benchmarks: structured enough to learn from (a core
with a longitudinal profile, log-normal cell energies growing with the incident energy), no physics.
Real data comes from calofm.simulation."""

from __future__ import annotations

import numpy as np

from calofm.data.showers import ShowerWriter
from calofm.detector.geometry import Geometry, get_geometry


def synthetic_showers(n: int, geometry: Geometry | str = "cpu", seed: int = 0, mean_hits: float = 60.0,
                      energy_GeV: tuple[float, float] = (10.0, 100.0), spread: float = 1.0):
    """(incident_MeV (n,), showers (n, n_voxels)) float32, cells zero or >= 0.1 MeV."""
    geometry = get_geometry(geometry) if isinstance(geometry, str) else geometry
    rng = np.random.default_rng(seed)
    incident = rng.uniform(*energy_GeV, size=n).astype(np.float32) * 1e3
    layer, xy = geometry.voxel_layer, geometry.voxel_xy_mm
    cell = float(np.median(np.diff(np.unique(xy[:, 0])))) if len(np.unique(xy[:, 0])) > 1 else 1.0
    depth = (layer + 0.5) / geometry.n_layers
    showers = np.zeros((n, geometry.n_voxels), dtype=np.float32)
    for i in range(n):
        k = int(np.clip(rng.poisson(mean_hits * (incident[i] / 5e4) ** 0.5), 1, geometry.n_voxels // 2))
        # probability of each voxel: gamma-like depth profile times a Gaussian core of width `spread` cells
        t_max = 0.3 + 0.1 * np.log10(incident[i] / 1e4)
        w = np.exp(-0.5 * ((depth - t_max) / 0.2) ** 2) * np.exp(-0.5 * (xy ** 2).sum(1) / (spread * cell) ** 2)
        w = w + 1e-6
        chosen = rng.choice(geometry.n_voxels, size=k, replace=False, p=w / w.sum())
        e = rng.lognormal(mean=np.log(incident[i] / 1e4), sigma=1.0, size=k) * w[chosen] / w.max() * 2
        showers[i, chosen] = np.maximum(e, 0.1)
    return incident, showers


def write_synthetic(path: str, n: int, material: str = "W", particle: str = "gamma", geometry: str = "cpu",
                    seed: int = 0, **kwargs) -> str:
    geo = get_geometry(geometry, absorber=material)
    incident, showers = synthetic_showers(n, geo, seed, **kwargs)
    with ShowerWriter(path, geo, material=material, particle=particle, generator="calofm synthetic", seed=seed) as w:
        w.write(incident, showers)
    return path
