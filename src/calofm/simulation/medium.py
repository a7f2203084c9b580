"""The calorimeter as GFlash sees it: one effective medium plus per-layer sampling response.

Grindhammer & Peters (hep-ex/0001020) describe a sampling calorimeter by the mixture of its absorber
and active material. The mixture constants follow the PDG rules ('Passage of particles through
matter', sec. 34.4.2), in consistent units: thicknesses as mass per area (g/cm2), mass fractions
w_i = d_i rho_i / sum_j d_j rho_j over the whole stack:
    1/X0 = sum w_i / X0_i,   1/R_M = (1/E_s) sum w_i E_c,i / X0_i,   E_c = X0 sum w_i E_c,i / X0_i
(X0_i in g/cm2, E_s = 21.2 MeV), converted to mm with the stack's mean density; Z_eff = sum w_i Z_i;
    F_s = X0_eff / (d_absorber + d_active)  (sampling frequency, per mean layer),
    e_hat = 1 / (1 + 0.007 (Z_absorber - Z_active))  (electron-to-MIP response ratio).
A homogeneous calorimeter (no absorber, or absorber == active) gets no sampling corrections.

Per layer (layers may differ, e.g. the ILD stack with thin and thick tungsten):
    f_mip  = MIP energy loss in the active layer / in absorber + active,
    f_vis  = e_hat * f_mip  (fraction of the deposited shower energy that is seen),
    a      = c * sqrt(d_active[mm] / f_mip)  (total sampling stochastic term, Wigmans),
and the readout of a silicon (or any active) layer, in units of the most probable MIP deposit:
    one crossing deposits a Moyal energy with the Landau-Vavilov most probable value Delta_p and the
    Landau width (FWHM 4 xi) of the active thickness (PDG sec. 34.2.9); its mean m = Delta_p + 1.27 sigma;
    a_cross^2 = m (1 + v^2) / (f_vis * 1 GeV)  is the part of a^2 that the Poisson count of crossings
    and their Landau spread carry (v = Moyal sd / mean); the rest, a_layer^2 = a^2 - a_cross^2, is the
    fluctuation of the charged track length crossing the layer, shared by its cells;
    threshold = threshold_mip * Delta_p, electronic noise sd = noise_mip * Delta_p.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calofm.detector.geometry import Geometry
from calofm.detector.materials import get_material

E_S_MEV = 21.2  # scale energy of multiple scattering, used by the Moliere radius
HOMOGENEOUS_RESOLUTION = 0.02  # photo-statistics term of a crystal calorimeter, ~2%/sqrt(E)
MOYAL_FWHM = 3.5908  # full width at half maximum of the standard Moyal density
MOYAL_MEAN = 0.5772157 + np.log(2.0)  # mean of the standard Moyal density (Euler gamma + ln 2)
MOYAL_SD = np.pi / np.sqrt(2.0)  # its standard deviation
LANDAU_FWHM_XI = 4.0  # FWHM of the Landau-Vavilov distribution in units of xi (PDG)


@dataclass(frozen=True)
class Medium:
    Z: float
    X0_mm: float
    R_M_mm: float
    E_c_MeV: float
    F_s: float  # inf for homogeneous media
    e_hat: float  # 1 for homogeneous media
    homogeneous: bool
    layer_edges_X0: np.ndarray  # (L + 1,)
    visible_fraction: np.ndarray  # (L,) f_vis
    resolution: np.ndarray  # (L,) total stochastic term a (fraction at 1 GeV)
    layer_resolution: np.ndarray  # (L,) a_layer: the part shared by the cells of a layer
    mip_mpv_MeV: np.ndarray  # (L,) most probable deposit of one crossing (the MIP unit)
    crossing_mean_MeV: np.ndarray  # (L,) mean deposit of one crossing (Moyal mean)
    crossing_scale_MeV: np.ndarray  # (L,) Moyal scale sigma
    threshold_MeV: np.ndarray  # (L,) visible-energy threshold
    noise_MeV: np.ndarray  # (L,) Gaussian electronic noise per cell (0 = off)

    @classmethod
    def from_geometry(cls, geometry: Geometry, threshold_mip: float = 0.5, noise_mip: float = 0.0) -> Medium:
        layers = geometry.layers
        homogeneous = all(l.absorber_mm == 0 or l.absorber == l.active for l in layers)
        # thickness of each material summed over the stack (mm)
        thickness: dict[str, float] = {}
        for l in layers:
            if not homogeneous and l.absorber_mm > 0:
                thickness[l.absorber] = thickness.get(l.absorber, 0.0) + l.absorber_mm
            thickness[l.active] = thickness.get(l.active, 0.0) + l.active_mm + (l.absorber_mm if homogeneous else 0)
        mats = {name: get_material(name) for name in thickness}
        mass = {n: thickness[n] / 10.0 * mats[n].density for n in mats}  # g/cm2
        w = {n: mass[n] / sum(mass.values()) for n in mats}
        density = sum(mass.values()) / (sum(thickness.values()) / 10.0)  # mean g/cm3 of the stack
        x0_g = {n: mats[n].X0_cm * mats[n].density for n in mats}  # g/cm2
        X0_g = 1.0 / sum(w[n] / x0_g[n] for n in mats)
        ec_over_x0 = sum(w[n] * mats[n].E_c_MeV / x0_g[n] for n in mats)  # MeV cm2/g
        Z = sum(w[n] * mats[n].Z for n in mats)
        X0_mm, R_M_mm = 10.0 * X0_g / density, 10.0 * E_S_MEV / ec_over_x0 / density

        # what one MIP crossing of the active layer deposits (for a homogeneous block: the whole cell)
        active_mm = np.array([l.active_mm + (l.absorber_mm if homogeneous else 0.0) for l in layers])
        act = [get_material(l.active) for l in layers]
        mpv = np.array([m.landau_mpv_MeV(d) for m, d in zip(act, active_mm)])
        scale = np.array([LANDAU_FWHM_XI * m.landau_xi_MeV(d) / MOYAL_FWHM for m, d in zip(act, active_mm)])
        mean = mpv + MOYAL_MEAN * scale

        if homogeneous:
            F_s, e_hat = np.inf, 1.0
            f_vis = np.ones(len(layers))
            res = np.full(len(layers), HOMOGENEOUS_RESOLUTION)
            layer_res = np.zeros(len(layers))
        else:
            F_s = X0_mm / (sum(thickness.values()) / len(layers))
            z_abs = np.mean([get_material(l.absorber).Z for l in layers])
            z_act = np.mean([get_material(l.active).Z for l in layers])
            e_hat = 1.0 / (1.0 + 0.007 * (z_abs - z_act))
            f_mip, res = [], []
            for l in layers:
                a, ab = get_material(l.active), get_material(l.absorber)
                mip_act = a.mip_MeV_per_mm * l.active_mm
                f = mip_act / (mip_act + ab.mip_MeV_per_mm * l.absorber_mm)
                f_mip.append(f)
                c = a.sampling_coefficient if a.sampling_coefficient is not None else 0.027
                res.append(c * np.sqrt(l.active_mm / f))
            f_vis, res = e_hat * np.asarray(f_mip), np.asarray(res)
            cross_var = mean * (1.0 + (MOYAL_SD * scale / mean) ** 2) / (f_vis * 1000.0)  # a_cross^2
            layer_res = np.sqrt(np.maximum(res**2 - cross_var, 0.0))

        return cls(
            Z=Z, X0_mm=X0_mm, R_M_mm=R_M_mm, E_c_MeV=X0_g * ec_over_x0, F_s=F_s, e_hat=e_hat,
            homogeneous=homogeneous, layer_edges_X0=geometry.layer_edges_X0, visible_fraction=f_vis,
            resolution=res, layer_resolution=layer_res, mip_mpv_MeV=mpv, crossing_mean_MeV=mean,
            crossing_scale_MeV=scale, threshold_MeV=threshold_mip * mpv, noise_MeV=noise_mip * mpv,
        )
