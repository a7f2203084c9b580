"""The calorimeter as GFlash sees it: one effective medium plus per-layer sampling response.

Grindhammer & Peters (hep-ex/0001020) describe a sampling calorimeter by the mixture of its absorber
and active material. With mass weights W_i = d_i rho_i / sum_j d_j rho_j (d_i summed over the stack):
    Z_eff = sum W_i Z_i,   1/X0_eff = sum W_i rho_eff / (X0_i rho_i),
    E_c,eff = X0_eff sum W_i E_c,i / X0_i,   R_M,eff = 21.2 MeV / sum (W_i E_c,i / X0_i),
    F_s = X0_eff / (d_absorber + d_active)  (sampling frequency, per mean layer),
    e_hat = 1 / (1 + 0.007 (Z_absorber - Z_active))  (electron-to-MIP response ratio).
A homogeneous calorimeter (no absorber, or absorber == active) gets no sampling corrections.

Per layer (layers may differ, e.g. the ILD stack with thin and thick tungsten):
    f_mip  = MIP energy loss in the active layer / in absorber + active,
    f_vis  = e_hat * f_mip  (fraction of the deposited shower energy that is seen),
    a      = c * sqrt(d_active[mm] / f_mip)  (sampling stochastic term, Wigmans),
    threshold = 0.5 MIP in the active layer (by default).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calofm.detector.geometry import Geometry
from calofm.detector.materials import get_material

E_S_MEV = 21.2  # scale energy of multiple scattering, used by the Moliere radius
HOMOGENEOUS_RESOLUTION = 0.02  # photo-statistics term of a crystal calorimeter, ~2%/sqrt(E)


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
    resolution: np.ndarray  # (L,) stochastic term a (fraction at 1 GeV)
    threshold_MeV: np.ndarray  # (L,) visible-energy threshold

    @classmethod
    def from_geometry(cls, geometry: Geometry, threshold_mip: float = 0.5) -> Medium:
        layers = geometry.layers
        homogeneous = all(l.absorber_mm == 0 or l.absorber == l.active for l in layers)
        # thickness of each material summed over the stack
        thickness: dict[str, float] = {}
        for l in layers:
            if not homogeneous and l.absorber_mm > 0:
                thickness[l.absorber] = thickness.get(l.absorber, 0.0) + l.absorber_mm
            thickness[l.active] = thickness.get(l.active, 0.0) + l.active_mm + (l.absorber_mm if homogeneous else 0)
        mats = {name: get_material(name) for name in thickness}
        mass = {n: thickness[n] * mats[n].density for n in mats}
        w = {n: mass[n] / sum(mass.values()) for n in mats}
        total_mm = sum(thickness.values())
        X0 = total_mm / sum(thickness[n] / mats[n].X0_mm for n in mats)
        ec_over_x0 = sum(w[n] * mats[n].E_c_MeV / mats[n].X0_mm for n in mats)
        Z = sum(w[n] * mats[n].Z for n in mats)

        if homogeneous:
            F_s, e_hat = np.inf, 1.0
            f_vis = np.ones(len(layers))
            res = np.full(len(layers), HOMOGENEOUS_RESOLUTION)
        else:
            F_s = X0 / (total_mm / len(layers))
            z_abs = np.mean([get_material(l.absorber).Z for l in layers])
            z_act = np.mean([get_material(l.active).Z for l in layers])
            e_hat = 1.0 / (1.0 + 0.007 * (z_abs - z_act))
            f_mip, res = [], []
            for l in layers:
                act, ab = get_material(l.active), get_material(l.absorber)
                mip_act = act.mip_MeV_per_mm * l.active_mm
                f = mip_act / (mip_act + ab.mip_MeV_per_mm * l.absorber_mm)
                f_mip.append(f)
                c = act.sampling_coefficient if act.sampling_coefficient is not None else 0.027
                res.append(c * np.sqrt(l.active_mm / f))
            f_vis, res = e_hat * np.asarray(f_mip), np.asarray(res)

        threshold = np.array([threshold_mip * get_material(l.active).mip_MeV_per_mm * l.active_mm for l in layers])
        if homogeneous:  # the whole cell is active: threshold on a MIP crossing the full cell
            threshold = np.array([threshold_mip * get_material(l.active).mip_MeV_per_mm * (l.active_mm + l.absorber_mm)
                                  for l in layers])
        return cls(
            Z=Z, X0_mm=X0, R_M_mm=E_S_MEV / ec_over_x0, E_c_MeV=X0 * ec_over_x0, F_s=F_s, e_hat=e_hat,
            homogeneous=homogeneous, layer_edges_X0=geometry.layer_edges_X0, visible_fraction=f_vis,
            resolution=res, threshold_MeV=threshold,
        )
