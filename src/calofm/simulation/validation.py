"""Measurements a physicist makes on a shower sample; shared by the physics tests and the
validation benchmark (benchmarks/simulator_validation.py) so both measure the same way."""

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


def homogeneous_block(material: str, x0_per_layer: float = 0.25, depth_X0: float = 30.0, cells: int = 5) -> Geometry:
    """A block of one material read out in thin slices: the medium of the PDG shower formulas."""
    m = get_material(material)
    n = int(depth_X0 / x0_per_layer)
    return Geometry(f"block-{material}", tuple(Layer(material, 0.0, material, x0_per_layer * m.X0_mm) for _ in range(n)),
                    CartesianGrid(cells, cells, 8 * m.R_M_mm / cells))


def pdg_shower_max_X0(energy_GeV: float, E_c_MeV: float, particle: str) -> float:
    """PDG (Rossi approximation B): t_max = ln(E / E_c) - 0.5 for electrons, + 0.5 for photons."""
    return float(np.log(energy_GeV * 1000.0 / E_c_MeV) + (0.5 if particle == "gamma" else -0.5))


def containment_1RM(layers: tuple[Layer, ...], material: str = "W", energy_GeV: float = 50.0, particle: str = "e-",
                    n: int = 400, seed: int = 5) -> tuple[float, float]:
    """(fraction of the deposited energy within one Moliere radius of the axis, that radius in mm) for a
    stack of layers (a homogeneous block or a sampling stack, whose R_M is the mixture's), read out in
    rings at 1, 3 and 20 R_M so the cell size does not bias the answer; threshold 0."""
    L = len(layers)
    R = Medium.from_geometry(Geometry("rings", layers, CartesianGrid(1, 1, 1.0))).R_M_mm
    geometry = Geometry("rings", layers, CylindricalGrid(((0.0, R, 3 * R, 20 * R),) * L, (1,) * L))
    _, showers = simulate(n, material, particle, energy_GeV, geometry=geometry, seed=seed, threshold_mip=0.0)
    deposited = showers.reshape(n, L, 3) / Medium.from_geometry(geometry).visible_fraction[None, :, None]
    return float(deposited[:, :, 0].sum() / deposited.sum()), float(R)


def moliere_containment(material: str, energy_GeV: float = 50.0, particle: str = "e-", n: int = 400,
                        seed: int = 5) -> float:
    """Fraction of the deposited energy within one Moliere radius in a homogeneous block of `material`."""
    m = get_material(material)
    layers = tuple(Layer(material, 0.0, material, m.X0_mm) for _ in range(30))
    return containment_1RM(layers, material, energy_GeV, particle, n, seed)[0]


def outer_cell_mip(showers: np.ndarray, geometry: Geometry, centre_mm, r_min_mm: float, threshold_mip: float = 0.5):
    """Energies of the hit cells farther than r_min_mm from the axis point centre_mm, in units of the
    most probable MIP deposit of their layer; (K,)."""
    medium = Medium.from_geometry(geometry, threshold_mip)
    xy = geometry.voxel_xy_mm
    outer = np.hypot(xy[:, 0] - centre_mm[0], xy[:, 1] - centre_mm[1]) > r_min_mm
    values = showers[:, outer] / medium.mip_mpv_MeV[geometry.voxel_layer[outer]][None, :]
    return values[showers[:, outer] > 0]


def spectrum_peak(values: np.ndarray, lo: float = 0.3, hi: float = 3.0, width: float = 0.05) -> float:
    """Most populated bin centre of a histogram of values between lo and hi."""
    counts, edges = np.histogram(values, bins=np.arange(lo, hi + width / 2, width))
    return float(edges[np.argmax(counts)] + width / 2)


def mean_layer(showers: np.ndarray, geometry: Geometry) -> float:
    """Energy-weighted mean layer index of a sample."""
    per_layer = np.add.reduceat(showers, geometry.layer_offsets[:-1], axis=1).sum(0)
    return float((per_layer * np.arange(geometry.n_layers)).sum() / per_layer.sum())
