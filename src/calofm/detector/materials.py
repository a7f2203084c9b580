"""Material constants for showers, read from the PDG-sourced table in materials.json.

Compounds (PbWO4, BGO, CsI, polystyrene) get an effective Z and A by one rule, the one GFlash uses
for mixtures: mass-fraction weighted averages, Z_eff = sum_i w_i Z_i, A_eff = sum_i w_i A_i.
Their X0, R_M, E_c and lambda_I are the PDG values for the compound itself, not derived.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

from calofm.errors import CalofmError


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
        else:
            Z, A = float(m["Z"]), float(m["A"])
        table[name] = Material(
            name=name, kind=m["kind"], geant4=m["geant4"], Z=Z, A=A, density=m["density"],
            X0_cm=m["X0"], R_M_cm=m["R_M"], E_c_MeV=m["E_c"], lambda_I_cm=m["lambda_I"],
            dedx_min=m["dedx_min"], sampling_coefficient=m.get("sampling_coefficient"),
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
