"""Grindhammer-Peters (GFlash) electromagnetic showers, vectorized over a batch of showers.

Reference: G. Grindhammer and S. Peters, hep-ex/0001020; constants as tabulated there and in
Geant4's GFlash tuning classes. Units: depth t in X0 of the effective medium, radius in its
Moliere radius, y = E / E_c.

One shower, step by step:
1. (ln T, ln alpha) drawn as a correlated Gaussian (homogeneous values and sampling-shifted values
   from the same two normal numbers): this carries the shower-to-shower fluctuations.
2. Photons first travel an exponential conversion depth (mean 9/7 X0); electrons start at t = 0.
3. Energy per layer = E * (Gamma-CDF difference over the layer) for the energy profile.
4. Energy spots: N_spot = 93 ln Z (E/GeV)^0.876, spread over layers by the (narrower) spot profile;
   each spot in a layer carries that layer's energy / its number of spots.
5. Each spot gets a radius from the core + tail profile at its layer's tau = t / T, and a uniform
   azimuth; spots are binned into cells (outside the grid = lateral leakage).
6. Sampling fluctuations: a cell holding deposit D gets Gamma(mean D, variance a^2 * D[GeV]) — the
   sum over independent spots of GFlash's per-spot Gamma smearing, drawn once per cell.
7. Visible energy = f_vis(layer) * fluctuated deposit; cells below threshold read zero.
"""

from __future__ import annotations

import numpy as np
from scipy.special import gammainc

from calofm.detector.geometry import Geometry
from calofm.simulation.medium import Medium

PHOTON_CONVERSION_X0 = 9.0 / 7.0


def _sigma(a: float, b: float, ln_y: np.ndarray) -> np.ndarray:
    """1 / (a + b ln y), capped at 0.5 as in GFlash (and for y too small for the fit)."""
    denom = a + b * ln_y
    return np.where(denom > 2.0, 1.0 / np.maximum(denom, 2.0), 0.5)


def longitudinal_parameters(energy_MeV: np.ndarray, medium: Medium, rng: np.random.Generator):
    """Per-shower (T, alpha) of the energy profile and (T, alpha) of the spot profile; each (N,)."""
    ln_y = np.log(energy_MeV / medium.E_c_MeV)
    mean_ln_T_h = np.log(np.maximum(ln_y - 0.812, 0.1))
    mean_ln_a_h = np.log(np.maximum(0.81 + (0.458 + 2.26 / medium.Z) * ln_y, 0.1))
    sig_T_h, sig_a_h = _sigma(-1.4, 1.26, ln_y), _sigma(-0.58, 0.86, ln_y)
    rho_h = 0.705 - 0.023 * ln_y
    if medium.homogeneous:
        mean_ln_T, mean_ln_a, sig_T, sig_a, rho = mean_ln_T_h, mean_ln_a_h, sig_T_h, sig_a_h, rho_h
    else:
        shift_T = -0.55 / medium.F_s - 0.69 * (1 - medium.e_hat)
        mean_ln_T = np.maximum(0.1, np.log(np.maximum(np.exp(mean_ln_T_h) + shift_T, 1e-3)))
        mean_ln_a = np.maximum(0.1, np.log(np.maximum(np.exp(mean_ln_a_h) - 0.476 / medium.F_s, 1e-3)))
        sig_T, sig_a = _sigma(-2.5, 1.25, ln_y), _sigma(-0.82, 0.79, ln_y)
        rho = 0.784 - 0.023 * ln_y

    z1, z2 = rng.standard_normal((2, len(energy_MeV)))

    def draw(mean_T, mean_a, s_T, s_a, r):
        c1, c2 = np.sqrt((1 + r) / 2), np.sqrt((1 - r) / 2)
        return np.exp(mean_T + s_T * (c1 * z1 + c2 * z2)), np.exp(mean_a + s_a * (c1 * z1 - c2 * z2))

    T, alpha = draw(mean_ln_T, mean_ln_a, sig_T, sig_a, rho)
    T, alpha = np.maximum(T, 1.0 if not medium.homogeneous else 0.5), np.maximum(alpha, 1.1)
    T_h, alpha_h = draw(mean_ln_T_h, mean_ln_a_h, sig_T_h, sig_a_h, rho_h)
    T_spot = np.maximum(0.5, T_h * (0.698 + 0.00212 * medium.Z))
    alpha_spot = np.maximum(1.1, alpha_h * (0.639 + 0.00334 * medium.Z))
    # tau = t / T, rescaled by <alpha>/(<alpha>-1) * (alpha-1)/alpha so that it tracks the centre of gravity
    mean_a = np.exp(mean_ln_a)
    tau_scale = (alpha - 1) / alpha * mean_a / (mean_a - 1) / T
    return T, alpha, T_spot, alpha_spot, tau_scale


def profile_fractions(t_start: np.ndarray, T: np.ndarray, alpha: np.ndarray, edges_X0: np.ndarray) -> np.ndarray:
    """Fraction of a Gamma(alpha, beta = (alpha-1)/T) profile starting at t_start inside each layer; (N, L)."""
    beta = (alpha - 1.0) / T
    x = np.maximum(edges_X0[None, :] - t_start[:, None], 0.0) * beta[:, None]
    return np.diff(gammainc(alpha[:, None], x), axis=1)


def radial_parameters(energy_MeV: np.ndarray, tau: np.ndarray, medium: Medium):
    """Core radius, tail radius (in R_M) and core weight for every (shower, layer); each (N, L)."""
    ln_E = np.log(energy_MeV / 1000.0)[:, None]
    Z = medium.Z
    r_core = 0.0251 + 0.00319 * ln_E + (0.1162 - 0.000381 * Z) * tau
    p1, p2, p3 = 2.632 - 0.00094 * Z, 0.401 + 0.00187 * Z, 1.313 - 0.0686 * ln_E
    u = (p2 - tau) / p3
    p_core = p1 * np.exp(u - np.exp(u))
    k1, k2, k3, k4 = 0.659 - 0.00309 * Z, 0.645, -2.59, 0.3585 + 0.0412 * ln_E
    r_tail = k1 * (np.exp(k3 * (tau - k2)) + np.exp(k4 * (tau - k2)))
    if not medium.homogeneous:
        one_minus_e = 1.0 - medium.e_hat
        r_core = r_core - 0.0203 * one_minus_e + 0.0397 / medium.F_s * np.exp(-tau)
        p_core = p_core + one_minus_e * (0.348 - 0.642 / medium.F_s * np.exp(-((tau - 1.0) ** 2)))
        r_tail = r_tail - 0.14 * one_minus_e - 0.495 / medium.F_s * np.exp(-tau)
    r_core = np.maximum(r_core, 1e-3)
    return r_core, np.maximum(r_tail, r_core), np.clip(p_core, 0.0, 1.0)


def simulate_batch(energy_MeV: np.ndarray, geometry: Geometry, medium: Medium, particle: str,
                   rng: np.random.Generator, impact_mm: tuple[float, float] = (0.0, 0.0),
                   spot_scale: float = 1.0) -> np.ndarray:
    """Visible cell energies in MeV for a batch of showers; (N, n_voxels) float32."""
    n, n_layers, n_vox = len(energy_MeV), geometry.n_layers, geometry.n_voxels
    edges = medium.layer_edges_X0
    T, alpha, T_spot, alpha_spot, tau_scale = longitudinal_parameters(energy_MeV, medium, rng)
    if particle == "gamma":
        t_start = rng.exponential(PHOTON_CONVERSION_X0, n)
    else:  # e- and e+ share the electron parameterization
        t_start = np.zeros(n)

    layer_energy = energy_MeV[:, None] * profile_fractions(t_start, T, alpha, edges)  # (N, L)
    n_spot_total = spot_scale * 93.0 * np.log(medium.Z) * (energy_MeV / 1000.0) ** 0.876
    spot_mean = n_spot_total[:, None] * profile_fractions(t_start, T_spot, alpha_spot, edges)
    n_spots = rng.poisson(spot_mean)
    n_spots = np.where((layer_energy > 0) & (n_spots == 0), 1, n_spots)  # a layer with energy has >= 1 spot
    n_spots = np.where(layer_energy > 0, n_spots, 0)

    # radial shape per (shower, layer), evaluated at the layer centre
    t_mid = 0.5 * (edges[1:] + edges[:-1])
    tau = np.maximum(t_mid[None, :] - t_start[:, None], 0.0) * tau_scale[:, None]
    r_core, r_tail, p_core = radial_parameters(energy_MeV, tau, medium)

    # one row per spot: which (shower, layer) entry of the (N, L) tables it belongs to. float32
    # throughout: this loop runs over ~10^4 spots per shower and dominates the run time.
    flat = np.repeat(np.arange(n * n_layers, dtype=np.int32), n_spots.ravel())
    m = len(flat)
    u_core, u_r, u_phi = rng.random((3, m), dtype=np.float32)
    r_core, r_tail = (r_core * medium.R_M_mm).astype(np.float32).ravel(), (r_tail * medium.R_M_mm).astype(np.float32).ravel()
    radius = np.where(u_core < p_core.astype(np.float32).ravel()[flat], r_core[flat], r_tail[flat])
    np.minimum(u_r, np.float32(0.999999), out=u_r)
    radius *= np.sqrt(u_r / (np.float32(1) - u_r))  # inverse CDF of 2 r R^2 / (r^2 + R^2)^2
    u_phi *= np.float32(2 * np.pi)
    x = radius * np.cos(u_phi) + np.float32(impact_mm[0])
    y = radius * np.sin(u_phi) + np.float32(impact_mm[1])
    voxel = geometry.locate(flat % n_layers, x, y)
    inside = voxel >= 0
    spot_energy = (layer_energy / np.maximum(n_spots, 1)).ravel()[flat[inside]]
    cell = (flat[inside] // n_layers).astype(np.int64) * n_vox + voxel[inside]
    deposit = np.bincount(cell, weights=spot_energy, minlength=n * n_vox).reshape(n, n_vox)

    # sampling fluctuations and response, only on cells that received energy
    rows, cols = np.nonzero(deposit)
    vox_layer = geometry.voxel_layer[cols]
    scale = 1000.0 * medium.resolution[vox_layer] ** 2  # MeV: Var(D) = a^2 * 1 GeV * D
    fluctuated = rng.gamma(deposit[rows, cols] / scale, scale)
    visible = fluctuated * medium.visible_fraction[vox_layer]
    visible = np.where(visible >= medium.threshold_MeV[vox_layer], visible, 0.0)
    out = np.zeros((n, n_vox), dtype=np.float32)
    out[rows, cols] = visible
    return out
