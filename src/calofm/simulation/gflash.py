"""Grindhammer-Peters (GFlash) electromagnetic showers, vectorized over a batch of showers.

Reference: G. Grindhammer and S. Peters, hep-ex/0001020; constants as tabulated there and in
Geant4's GFlash tuning classes. Units: depth t in X0 of the effective medium, radius in its
Moliere radius, y = E / E_c.

One shower, step by step:
1. The beam enters at an impact point (x, y) on the front face with polar and azimuthal angles
   (theta, phi); depths are counted along that axis (a layer is 1/cos(theta) thicker on it).
2. A photon travels an exponential conversion depth (mean 9/7 X0) and converts into an e+ e- pair
   sharing its energy by the Bethe-Heitler distribution dsigma/dx ~ 1 - 4/3 x (1 - x) (complete
   screening, PDG sec. 34.4.1); each lepton showers by the electron parameterization from there.
   An electron or positron is one lepton starting at t = 0.
3. Per lepton, (ln T, ln alpha) drawn as a correlated Gaussian (homogeneous values and sampling-shifted
   values from the same two normal numbers): this carries the shower-to-shower fluctuations.
4. Energy per layer = E * (Gamma-CDF difference over the layer) for the energy profile.
5. Energy spots: N_spot = 93 ln Z (E_primary/GeV)^0.876 (split between the pair leptons in proportion
   to their energy), spread over layers by the (narrower) spot profile; each spot in a layer carries
   that layer's energy / its number of spots.
6. Each spot gets a radius from the core + tail profile at its layer's tau = t / T and a uniform
   azimuth, in the plane perpendicular to the axis, projected onto the layer around the point where
   the axis crosses its active sheet; spots are binned into cells (outside the grid = lateral leakage).
7. Readout (cell_response): a sampling layer's deposit is seen as a Poisson number of charged-particle
   crossings of its active sheet, each with a Landau (Moyal) energy; the track-length fluctuation of
   the layer beyond that is shared by its cells. Optional Gaussian noise; cells below threshold read zero.
   A homogeneous block keeps GFlash's Gamma smearing of each cell's deposit.
"""

from __future__ import annotations

import numpy as np
from scipy.special import gammainc, ndtr, ndtri

from calofm.detector.geometry import Geometry
from calofm.simulation.medium import MOYAL_MEAN, MOYAL_SD, Medium

PHOTON_CONVERSION_X0 = 9.0 / 7.0  # mean free path of a high-energy photon (PDG)
MIN_SHOWER_Y = 20.0  # a pair lepton below 20 E_c gets the profile shapes of a 20 E_c shower (the fits'
# lower end; its energy is what it is)
EXACT_CROSSINGS = 10  # cells with up to this many crossings get each crossing's Landau deposit drawn


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
    """Fraction of a Gamma(alpha, beta = (alpha-1)/T) profile starting at t_start inside each layer; (N, L).
    edges_X0: layer boundaries along the shower axis, (L + 1,) or per shower (N, L + 1)."""
    beta = (alpha - 1.0) / T
    x = np.maximum(np.atleast_2d(edges_X0) - t_start[:, None], 0.0) * beta[:, None]
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


def pair_energy_fraction(n: int, rng: np.random.Generator) -> np.ndarray:
    """Energy fraction of one lepton of a converted photon, drawn from 1 - 4/3 x (1 - x) on (0, 1); (n,)."""
    out, filled = np.empty(n), 0
    while filled < n:  # rejection sampling, acceptance 7/9
        x, u = rng.random((2, int(1.3 * (n - filled)) + 8))
        x = x[u < 1.0 - 4.0 / 3.0 * x * (1.0 - x)][: n - filled]
        out[filled:filled + len(x)] = x
        filled += len(x)
    return out


def shower_deposits(energy_MeV: np.ndarray, geometry: Geometry, medium: Medium, particle: str,
                    rng: np.random.Generator, impact_mm: np.ndarray, angle_rad: np.ndarray,
                    spot_scale: float = 1.0) -> np.ndarray:
    """Energy deposited (absorber + active) in every cell, in MeV; (N, n_voxels) float64.
    impact_mm: (N, 2) entry point on the front face; angle_rad: (N, 2) polar and azimuthal angle."""
    n, n_layers, n_vox = len(energy_MeV), geometry.n_layers, geometry.n_voxels
    # leptons that shower: a photon's pair after its conversion depth, or the primary e-/e+ itself
    if particle == "gamma":
        t_conv = rng.exponential(PHOTON_CONVERSION_X0, n)
        x = pair_energy_fraction(n, rng)
        parent, frac, t_start = np.repeat(np.arange(n), 2), np.stack([x, 1.0 - x], 1).ravel(), np.repeat(t_conv, 2)
    else:
        parent, frac, t_start = np.arange(n), np.ones(n), np.zeros(n)
    m = len(parent)
    e_lep = energy_MeV[parent] * frac
    theta, phi = angle_rad[:, 0], angle_rad[:, 1]
    tilted = bool(np.any(theta != 0))
    edges = medium.layer_edges_X0[None, :] / np.cos(theta)[parent][:, None]  # (M, L + 1) along the axis

    e_shape = np.maximum(e_lep, MIN_SHOWER_Y * medium.E_c_MeV)  # energy the profile shapes are taken at
    T, alpha, T_spot, alpha_spot, tau_scale = longitudinal_parameters(e_shape, medium, rng)
    layer_energy = e_lep[:, None] * profile_fractions(t_start, T, alpha, edges)  # (M, L)
    n_spot_total = spot_scale * 93.0 * np.log(medium.Z) * (energy_MeV[parent] / 1000.0) ** 0.876 * frac
    spot_mean = n_spot_total[:, None] * profile_fractions(t_start, T_spot, alpha_spot, edges)
    n_spots = rng.poisson(spot_mean)
    n_spots = np.where((layer_energy > 0) & (n_spots == 0), 1, n_spots)  # a layer with energy has >= 1 spot
    n_spots = np.where(layer_energy > 0, n_spots, 0)

    # radial shape per (lepton, layer), evaluated at the layer centre
    t_mid = 0.5 * (edges[:, 1:] + edges[:, :-1])
    tau = np.maximum(t_mid - t_start[:, None], 0.0) * tau_scale[:, None]
    r_core, r_tail, p_core = radial_parameters(e_shape, tau, medium)
    # where the axis crosses each layer's active sheet; (M, L)
    slope = np.tan(theta)[parent][:, None] * geometry.active_depth_mm[None, :]
    axis_x = (impact_mm[parent, 0][:, None] + slope * np.cos(phi)[parent][:, None]).astype(np.float32).ravel()
    axis_y = (impact_mm[parent, 1][:, None] + slope * np.sin(phi)[parent][:, None]).astype(np.float32).ravel()

    # one row per spot: which (lepton, layer) entry of the (M, L) tables it belongs to. float32
    # throughout: this loop runs over ~10^4 spots per shower and dominates the run time.
    flat = np.repeat(np.arange(m * n_layers, dtype=np.int32), n_spots.ravel())
    u_core, u_r, u_phi = rng.random((3, len(flat)), dtype=np.float32)
    r_core, r_tail = (r_core * medium.R_M_mm).astype(np.float32).ravel(), (r_tail * medium.R_M_mm).astype(np.float32).ravel()
    radius = np.where(u_core < p_core.astype(np.float32).ravel()[flat], r_core[flat], r_tail[flat])
    np.minimum(u_r, np.float32(0.999999), out=u_r)
    radius *= np.sqrt(u_r / (np.float32(1) - u_r))  # inverse CDF of 2 r R^2 / (r^2 + R^2)^2
    u_phi *= np.float32(2 * np.pi)
    u, w = radius * np.cos(u_phi), radius * np.sin(u_phi)
    if tilted:  # u along the tilt direction is stretched by 1/cos(theta) on the layer plane
        lep = flat // n_layers
        cos_p, sin_p = np.cos(phi).astype(np.float32)[parent][lep], np.sin(phi).astype(np.float32)[parent][lep]
        u /= np.cos(theta).astype(np.float32)[parent][lep]
        u, w = u * cos_p - w * sin_p, u * sin_p + w * cos_p
    if tilted or np.any(impact_mm != impact_mm[0]):
        x, y = u + axis_x[flat], w + axis_y[flat]
    else:  # one impact point for the whole batch: add it as a scalar (saves two gathers per spot)
        x, y = u + axis_x[0], w + axis_y[0]
    voxel = geometry.locate(flat % n_layers, x, y)
    inside = voxel >= 0
    spot_energy = (layer_energy / np.maximum(n_spots, 1)).ravel()[flat[inside]]
    cell = parent[flat[inside] // n_layers].astype(np.int64) * n_vox + voxel[inside]
    return np.bincount(cell, weights=spot_energy, minlength=n * n_vox).reshape(n, n_vox)


def landau_sums(crossings: np.ndarray, mpv: np.ndarray, scale: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Total energy of `crossings` Moyal(mpv, scale) deposits per cell; all arguments (K,), result (K,).
    Up to EXACT_CROSSINGS every crossing is drawn (Moyal = mpv - 2 scale ln|z|, z standard normal);
    above, the sum is Gaussian with the summed mean and variance (central limit)."""
    few = np.nonzero((crossings > 0) & (crossings <= EXACT_CROSSINGS))[0]
    cell = np.repeat(few, crossings[few])
    z = np.abs(rng.standard_normal(len(cell)))
    each = mpv[cell] - 2.0 * scale[cell] * np.log(np.maximum(z, 1e-300))
    total = np.bincount(cell, weights=each, minlength=len(crossings))
    many = np.nonzero(crossings > EXACT_CROSSINGS)[0]
    k = crossings[many]
    mean, sd = mpv[many] + MOYAL_MEAN * scale[many], MOYAL_SD * scale[many]
    total[many] = np.maximum(k * mean + np.sqrt(k) * sd * rng.standard_normal(len(many)), 0.0)
    return total


def cell_response(deposit: np.ndarray, geometry: Geometry, medium: Medium, rng: np.random.Generator) -> np.ndarray:
    """Visible cell energies in MeV from deposited ones; (N, n_voxels) -> (N, n_voxels) float32."""
    n, n_vox = deposit.shape
    n_layers = geometry.n_layers
    rows, cols = np.nonzero(deposit)
    dep = deposit[rows, cols]
    layer = geometry.voxel_layer[cols]
    if medium.homogeneous:  # GFlash: Gamma(mean D, variance a^2 * 1 GeV * D) per cell
        scale = 1000.0 * medium.resolution[layer] ** 2
        visible = rng.gamma(dep / scale, scale)
    else:
        # the track length crossing a layer fluctuates beyond the crossing count: a Gamma factor of
        # mean 1 and variance a_layer^2 * 1 GeV / E_layer, shared by the cells of the layer
        key = rows * n_layers + layer
        e_layer = np.bincount(key, weights=dep, minlength=n * n_layers)
        factor = np.ones(n * n_layers)
        a2 = medium.layer_resolution[np.arange(n * n_layers) % n_layers] ** 2
        hit = np.nonzero((e_layer > 0) & (a2 > 0))[0]
        var = 1000.0 * a2[hit] / e_layer[hit]
        factor[hit] = rng.gamma(1.0 / var, var)
        mean_crossings = factor[key] * dep * medium.visible_fraction[layer] / medium.crossing_mean_MeV[layer]
        crossings = rng.poisson(mean_crossings)
        visible = landau_sums(crossings, medium.mip_mpv_MeV[layer], medium.crossing_scale_MeV[layer], rng)
    out = np.zeros((n, n_vox), dtype=np.float32)
    threshold = medium.threshold_MeV[layer]
    if np.any(medium.noise_MeV > 0):
        noise = medium.noise_MeV[layer]
        visible = visible + noise * rng.standard_normal(len(visible))
        _noise_hits(out, deposit, geometry, medium, rng)
    out[rows, cols] = np.where((visible >= threshold) & (visible > 0), visible, 0.0)
    return out


def _noise_hits(out: np.ndarray, deposit: np.ndarray, geometry: Geometry, medium: Medium,
                rng: np.random.Generator) -> None:
    """Cells without deposit that read noise above threshold: per (shower, layer) a binomial count of
    the layer's cells, at uniform positions (those landing on a cell with deposit are dropped), with
    values from the Gaussian tail above threshold. Writes into out (N, n_voxels)."""
    n = deposit.shape[0]
    sigma, threshold = medium.noise_MeV, medium.threshold_MeV
    p = np.where(sigma > 0, ndtr(-threshold / np.maximum(sigma, 1e-30)), 0.0)  # (L,) tail probability
    cells = np.asarray(geometry.cells_per_layer)
    k = rng.binomial(np.broadcast_to(cells, (n, len(cells))), np.broadcast_to(p, (n, len(cells))))  # (N, L)
    shower = np.repeat(np.repeat(np.arange(n), len(cells)), k.ravel())
    layer = np.repeat(np.tile(np.arange(len(cells)), n), k.ravel())
    col = geometry.layer_offsets[layer] + (rng.random(len(layer)) * cells[layer]).astype(np.int64)
    value = sigma[layer] * -ndtri(np.maximum(rng.random(len(layer)), 1e-12) * p[layer])
    empty = deposit[shower, col] == 0
    out[shower[empty], col[empty]] = value[empty]


def simulate_batch(energy_MeV: np.ndarray, geometry: Geometry, medium: Medium, particle: str,
                   rng: np.random.Generator, impact_mm=None, angle_rad=None, spot_scale: float = 1.0) -> np.ndarray:
    """Visible cell energies in MeV for a batch of showers; (N, n_voxels) float32.
    impact_mm: (2,) or (N, 2) entry point in mm (default: the geometry's default, a cell centre);
    angle_rad: (2,) or (N, 2) polar and azimuthal angle of the beam in radians (default perpendicular)."""
    n = len(energy_MeV)
    impact = np.broadcast_to(np.asarray(geometry.default_impact_mm if impact_mm is None else impact_mm, float), (n, 2))
    angle = np.broadcast_to(np.asarray((0.0, 0.0) if angle_rad is None else angle_rad, float), (n, 2))
    deposit = shower_deposits(np.asarray(energy_MeV, float), geometry, medium, particle, rng, impact, angle, spot_scale)
    return cell_response(deposit, geometry, medium, rng)
