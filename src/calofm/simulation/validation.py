"""Measurements a physicist makes on a shower sample; shared by the physics tests and the
validation benchmark (benchmarks/simulation_physics.py) so both measure the same way."""

from __future__ import annotations

import numpy as np

from calofm.detector import CartesianGrid, CylindricalGrid, Geometry, Layer, get_material
from calofm.simulation.medium import Medium
from calofm.simulation.runner import simulate


def deep_stack(absorber: str, x0_per_layer: float = 0.5, depth_X0: float = 36.0, cells: int = 5) -> Geometry:
    """A Si-sampled stack deep enough to contain 100 GeV showers and fine enough to locate their maximum."""
    m = get_material(absorber)
    n = int(depth_X0 / x0_per_layer)
    return Geometry(f"deep-{absorber}", tuple(Layer(absorber, x0_per_layer * m.X0_mm, "Si", 0.5) for _ in range(n)),
                    CartesianGrid(cells, cells, 8 * m.R_M_mm / cells))


def depth_profile(showers: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Mean deposited energy per layer (visible / sampling fraction) in MeV; (L,)."""
    per_layer = np.add.reduceat(showers, geometry.layer_offsets[:-1], axis=1)
    return (per_layer / Medium.from_geometry(geometry).visible_fraction).mean(0)


def shower_max_X0(profile: np.ndarray, geometry: Geometry) -> float:
    """Depth of the maximum of a mean profile: parabola through the peak layer and two neighbours each side."""
    centres = 0.5 * (geometry.layer_edges_X0[1:] + geometry.layer_edges_X0[:-1])
    i = int(np.clip(np.argmax(profile), 2, len(profile) - 3))
    coef = np.polyfit(centres[i - 2:i + 3], profile[i - 2:i + 3], 2)
    return float(-coef[1] / (2 * coef[0]))


def fit_resolution(energies_GeV: np.ndarray, relative_sigma: np.ndarray) -> tuple[float, float]:
    """Fit sigma/E = a/sqrt(E) (+) b (in quadrature); returns (a, b) as fractions."""
    energies_GeV = np.asarray(energies_GeV, dtype=float)
    design = np.stack([1 / energies_GeV, np.ones_like(energies_GeV)], 1)
    a2, b2 = np.linalg.lstsq(design, np.square(relative_sigma), rcond=None)[0]
    return float(np.sqrt(max(a2, 0.0))), float(np.sqrt(max(b2, 0.0)))


def moliere_containment(material: str, energy_GeV: float = 50.0, particle: str = "e-", n: int = 400,
                        seed: int = 5) -> float:
    """Fraction of the deposited energy within one Moliere radius in a homogeneous block of `material`."""
    m = get_material(material)
    layers = tuple(Layer(material, 0.0, material, m.X0_mm) for _ in range(30))
    r_edges = (0.0, m.R_M_mm, 3 * m.R_M_mm, 20 * m.R_M_mm)
    geometry = Geometry("homogeneous", layers, CylindricalGrid((r_edges,) * 30, (1,) * 30))
    _, showers = simulate(n, material, particle, energy_GeV, geometry=geometry, seed=seed, threshold_mip=0.0)
    return float(showers.reshape(n, 30, 3)[:, :, 0].sum() / showers.sum())


def mean_layer(showers: np.ndarray, geometry: Geometry) -> float:
    """Energy-weighted mean layer index of a sample."""
    per_layer = np.add.reduceat(showers, geometry.layer_offsets[:-1], axis=1).sum(0)
    return float((per_layer * np.arange(geometry.n_layers)).sum() / per_layer.sum())
