"""Material constants for showers, read from the PDG-sourced table in materials.json.

Compounds (PbWO4, BGO, CsI, polystyrene) get an effective Z and A by one rule, the one GFlash uses
for mixtures: mass-fraction weighted averages, Z_eff = sum_i w_i Z_i, A_eff = sum_i w_i A_i.
Their X0, R_M, E_c and lambda_I are the PDG values for the compound itself, not derived.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from importlib import resources

from calofm.errors import CalofmError

ELECTRON_MASS_MEV = 0.51099895
LANDAU_K_MEV_CM2_PER_MOL = 0.307075  # 4 pi N_A r_e^2 m_e c^2 (PDG)
LANDAU_J = 0.200  # constant of the most-probable-loss formula (PDG eq. 34.12)


@dataclass(frozen=True)
class Material:
    name: str
    kind: str  # absorber | crystal | active
    geant4: str
    Z: float  # effective Z for compounds
    A: float  # g/mol, effective for compounds
    density: float  # g/cm3
    X0_cm: float
    R_M_cm: float
    E_c_MeV: float
    lambda_I_cm: float
    dedx_min: float  # MeV cm2/g, minimum ionization
    sampling_coefficient: float | None = None  # active media only: a = c * sqrt(d_mm / f_mip)
    Z_over_A: float = 0.5  # <Z/A> in mol/g (mass-weighted over the elements of a compound)

    @property
    def X0_mm(self) -> float:
        return 10.0 * self.X0_cm

    @property
    def R_M_mm(self) -> float:
        return 10.0 * self.R_M_cm

    @property
    def mip_MeV_per_mm(self) -> float:
        """Mean energy a minimum-ionizing particle loses per mm."""
        return self.dedx_min * self.density / 10.0

    # --- energy-loss straggling of one minimum-ionizing crossing (PDG 'Passage of particles
    # through matter', sec. 34.2.9): Landau-Vavilov most probable loss and width ------------------
    def landau_xi_MeV(self, thickness_mm: float) -> float:
        """xi = (K/2) <Z/A> x / beta^2 with beta = 1, x in g/cm2: the scale of the Landau distribution."""
        return 0.5 * LANDAU_K_MEV_CM2_PER_MOL * self.Z_over_A * self.density * thickness_mm / 10.0

    def landau_mpv_MeV(self, thickness_mm: float) -> float:
        """Most probable energy loss of a relativistic particle (density-effect plateau):
        Delta_p = xi [ln(2 m c^2 xi / (hbar omega_p)^2) + j]; 0.145 MeV for 0.5 mm of silicon."""
        xi = self.landau_xi_MeV(thickness_mm)
        plasma_MeV = 28.816e-6 * math.sqrt(self.density * self.Z_over_A)  # hbar omega_p
        return xi * (math.log(2 * ELECTRON_MASS_MEV * xi / plasma_MeV**2) + LANDAU_J)


@cache
def _table() -> dict[str, Material]:
    raw = json.loads(resources.files("calofm.detector").joinpath("materials.json").read_text())
    elements = raw["elements"]
    table = {}
    for name, m in raw["materials"].items():
        if "composition" in m:
            masses = {el: n * elements[el][1] for el, n in m["composition"].items()}
            total = sum(masses.values())
            Z = sum(masses[el] / total * elements[el][0] for el in masses)
            A = sum(masses[el] / total * elements[el][1] for el in masses)
            z_over_a = sum(masses[el] / total * elements[el][0] / elements[el][1] for el in masses)
        else:
            Z, A = float(m["Z"]), float(m["A"])
            z_over_a = Z / A
        table[name] = Material(
            name=name, kind=m["kind"], geant4=m["geant4"], Z=Z, A=A, density=m["density"],
            X0_cm=m["X0"], R_M_cm=m["R_M"], E_c_MeV=m["E_c"], lambda_I_cm=m["lambda_I"],
            dedx_min=m["dedx_min"], sampling_coefficient=m.get("sampling_coefficient"), Z_over_A=z_over_a,
        )
    return table


def list_materials() -> list[Material]:
    return list(_table().values())


def get_material(name: str) -> Material:
    """Look a material up by its calofm name or Geant4 NIST name, case-insensitively."""
    key = str(name).strip().lower()
    for m in _table().values():
        if key in (m.name.lower(), m.geant4.lower()):
            return m
    known = ", ".join(_table())
    raise CalofmError(f"unknown material {name!r}; known materials: {known}")


def source() -> str:
    return json.loads(resources.files("calofm.detector").joinpath("materials.json").read_text())["_source"]
