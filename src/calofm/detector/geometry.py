"""Layered sampling calorimeters: which material sits where, and how each layer is read out.

A geometry is a stack of layers (absorber then active, thicknesses in mm) and a transverse grid:
- Cartesian: nx * ny square cells of `cell_mm`, centred on the beam axis; voxel order (layer, y, x).
- Cylindrical (the CaloChallenge binning): per layer, radial bin edges in mm and a number of
  azimuthal bins; voxel order (layer, alpha, r), as the CaloChallenge files use.
Swapping the absorber keeps every thickness in mm, so the depth in X0 changes as in a real detector.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from functools import cached_property

import numpy as np

from calofm.detector.materials import get_material
from calofm.errors import CalofmError


@dataclass(frozen=True)
class Layer:
    absorber: str
    absorber_mm: float
    active: str
    active_mm: float

    @property
    def depth_X0(self) -> float:
        return self.absorber_mm / get_material(self.absorber).X0_mm + self.active_mm / get_material(self.active).X0_mm


@dataclass(frozen=True)
class CartesianGrid:
    nx: int
    ny: int
    cell_mm: float
    kind: str = "cartesian"

    def cells(self, layer: int) -> int:
        return self.nx * self.ny


@dataclass(frozen=True)
class CylindricalGrid:
    r_edges_mm: tuple[tuple[float, ...], ...]  # per layer, n_r + 1 edges starting at 0
    n_alpha: tuple[int, ...]  # per layer
    kind: str = "cylindrical"

    def cells(self, layer: int) -> int:
        return (len(self.r_edges_mm[layer]) - 1) * self.n_alpha[layer]


@dataclass(frozen=True)
class Geometry:
    name: str
    layers: tuple[Layer, ...]
    grid: CartesianGrid | CylindricalGrid

    def __post_init__(self):
        if not self.layers:
            raise CalofmError("a geometry needs at least one layer")
        for layer in self.layers:
            get_material(layer.absorber), get_material(layer.active)  # fail early on unknown names
            if layer.absorber_mm < 0 or layer.active_mm <= 0:
                raise CalofmError(f"layer thicknesses must be positive, got {layer}")
        if isinstance(self.grid, CylindricalGrid) and (
            len(self.grid.r_edges_mm) != len(self.layers) or len(self.grid.n_alpha) != len(self.layers)
        ):
            raise CalofmError("a cylindrical grid needs r_edges and n_alpha for every layer")

    # --- sizes -------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @cached_property
    def cells_per_layer(self) -> tuple[int, ...]:
        return tuple(self.grid.cells(i) for i in range(self.n_layers))

    @cached_property
    def layer_grid(self) -> tuple[tuple[int, int], ...]:
        """Each layer's cells as a grid (n_a, n_b) in voxel order: Cartesian (ny, nx), cylindrical
        (n_alpha, n_r); a layer's cell c sits at a = c // n_b, b = c % n_b."""
        if self.is_cartesian:
            return ((self.grid.ny, self.grid.nx),) * self.n_layers
        return tuple((self.grid.n_alpha[i], len(self.grid.r_edges_mm[i]) - 1) for i in range(self.n_layers))

    @cached_property
    def layer_offsets(self) -> np.ndarray:
        """Index of each layer's first voxel; (n_layers + 1,), the last entry is n_voxels."""
        return np.concatenate([[0], np.cumsum(self.cells_per_layer)]).astype(np.int64)

    @property
    def n_voxels(self) -> int:
        return int(self.layer_offsets[-1])

    @property
    def is_cartesian(self) -> bool:
        return isinstance(self.grid, CartesianGrid)

    # --- materials and depth ---------------------------------------------------------------------
    @property
    def absorber(self) -> str:
        """The absorber name when all layers share one (the usual case), else 'mixed'."""
        names = {layer.absorber for layer in self.layers}
        return names.pop() if len(names) == 1 else "mixed"

    def with_absorber(self, material: str) -> Geometry:
        name = get_material(material).name
        return replace(self, layers=tuple(replace(layer, absorber=name) for layer in self.layers))

    @cached_property
    def layer_edges_X0(self) -> np.ndarray:
        """Depth of each layer boundary in radiation lengths; (n_layers + 1,)."""
        return np.concatenate([[0.0], np.cumsum([layer.depth_X0 for layer in self.layers])])

    @cached_property
    def layer_edges_mm(self) -> np.ndarray:
        return np.concatenate([[0.0], np.cumsum([l.absorber_mm + l.active_mm for l in self.layers])])

    @cached_property
    def active_depth_mm(self) -> np.ndarray:
        """Depth of the middle of each layer's active sheet behind the front face (mm); (n_layers,)."""
        return self.layer_edges_mm[1:] - 0.5 * np.array([l.active_mm for l in self.layers])

    @property
    def default_impact_mm(self) -> tuple[float, float]:
        """Where the beam enters by default: the centre of a cell, next to the grid centre (a Cartesian
        grid with an even number of cells has a cell corner on its axis; the beam goes half a cell off)."""
        if not self.is_cartesian:
            return (0.0, 0.0)
        g = self.grid
        return (0.5 * g.cell_mm * (1 - g.nx % 2), 0.5 * g.cell_mm * (1 - g.ny % 2))

    # --- voxel positions ---------------------------------------------------------------------
    @cached_property
    def voxel_layer(self) -> np.ndarray:
        return np.repeat(np.arange(self.n_layers), self.cells_per_layer)

    @cached_property
    def voxel_xy_mm(self) -> np.ndarray:
        """Transverse centre of every voxel in mm; (n_voxels, 2)."""
        out = []
        for i in range(self.n_layers):
            if self.is_cartesian:
                g = self.grid
                xs = (np.arange(g.nx) - (g.nx - 1) / 2) * g.cell_mm
                ys = (np.arange(g.ny) - (g.ny - 1) / 2) * g.cell_mm
                yy, xx = np.meshgrid(ys, xs, indexing="ij")  # order (y, x)
                out.append(np.stack([xx.ravel(), yy.ravel()], axis=1))
            else:
                edges = np.asarray(self.grid.r_edges_mm[i])
                n_alpha = self.grid.n_alpha[i]
                r_mid = 0.5 * (edges[1:] + edges[:-1])
                a_mid = (np.arange(n_alpha) + 0.5) * 2 * np.pi / n_alpha
                aa, rr = np.meshgrid(a_mid, r_mid, indexing="ij")  # order (alpha, r)
                out.append(np.stack([(rr * np.cos(aa)).ravel(), (rr * np.sin(aa)).ravel()], axis=1))
        return np.concatenate(out)

    def locate(self, layer: np.ndarray, x_mm: np.ndarray, y_mm: np.ndarray) -> np.ndarray:
        """Voxel index of points (layer, x, y); -1 where the point falls outside the grid."""
        layer = np.asarray(layer)
        if self.is_cartesian:
            g = self.grid
            # float32 and one comparison pass: this is the simulator's hot loop (millions of spots)
            fx = np.asarray(x_mm, dtype=np.float32) * np.float32(1 / g.cell_mm) + np.float32(g.nx / 2)
            fy = np.asarray(y_mm, dtype=np.float32) * np.float32(1 / g.cell_mm) + np.float32(g.ny / 2)
            inside = (fx >= 0) & (fx < g.nx) & (fy >= 0) & (fy < g.ny)
            idx = layer * (g.nx * g.ny) + fy.astype(np.int64) * g.nx + fx.astype(np.int64)
            return np.where(inside, idx, -1)
        idx = np.full(layer.shape, -1, dtype=np.int64)
        r = np.hypot(x_mm, y_mm)
        alpha = np.mod(np.arctan2(y_mm, x_mm), 2 * np.pi)
        for i in np.unique(layer):
            sel = layer == i
            edges = np.asarray(self.grid.r_edges_mm[i])
            n_alpha = self.grid.n_alpha[i]
            ir = np.searchsorted(edges, r[sel], side="right") - 1
            ia = np.minimum((alpha[sel] * n_alpha / (2 * np.pi)).astype(np.int64), n_alpha - 1)
            ok = (ir >= 0) & (ir < len(edges) - 1)
            idx[sel] = np.where(ok, self.layer_offsets[i] + ia * (len(edges) - 1) + ir, -1)
        return idx

    # --- serialization -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"name": self.name, "layers": [asdict(l) for l in self.layers], "grid": asdict(self.grid)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        try:
            grid = dict(d["grid"])
            kind = grid.pop("kind", "cartesian")
            if kind == "cartesian":
                grid_obj = CartesianGrid(int(grid["nx"]), int(grid["ny"]), float(grid["cell_mm"]))
            elif kind == "cylindrical":
                grid_obj = CylindricalGrid(
                    tuple(tuple(float(e) for e in edges) for edges in grid["r_edges_mm"]),
                    tuple(int(n) for n in grid["n_alpha"]),
                )
            else:
                raise CalofmError(f"unknown grid kind {kind!r}")
            layers = tuple(Layer(str(l["absorber"]), float(l["absorber_mm"]), str(l["active"]), float(l["active_mm"]))
                           for l in d["layers"])
            return cls(str(d.get("name", "custom")), layers, grid_obj)
        except (KeyError, TypeError, ValueError) as exc:
            raise CalofmError(f"malformed geometry description: {exc!r}") from None

    @classmethod
    def from_json(cls, text: str) -> Geometry:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise CalofmError(f"geometry is not valid JSON: {exc}") from None

    def describe(self) -> str:
        lines = [f"geometry {self.name!r}: {self.n_layers} layers, {self.n_voxels} voxels"]
        if self.is_cartesian:
            g = self.grid
            lines.append(f"  grid: Cartesian {g.nx} x {g.ny} cells of {g.cell_mm:g} mm "
                         f"({g.nx * g.cell_mm:g} x {g.ny * g.cell_mm:g} mm)")
        else:
            lines.append(f"  grid: cylindrical, {len(self.grid.r_edges_mm[0]) - 1} radial x "
                         f"{self.grid.n_alpha[0]} angular bins (layer 0)")
        blocks = []  # runs of identical layers
        for layer in self.layers:
            if blocks and blocks[-1][0] == layer:
                blocks[-1][1] += 1
            else:
                blocks.append([layer, 1])
        for layer, n in blocks:
            lines.append(f"  {n:3d} x ({layer.absorber_mm:g} mm {layer.absorber} + {layer.active_mm:g} mm "
                         f"{layer.active}) = {n * layer.depth_X0:.2f} X0")
        absorber = get_material(self.layers[0].absorber)
        lines.append(f"  total depth: {self.layer_edges_mm[-1]:.1f} mm = {self.layer_edges_X0[-1]:.2f} X0 "
                     f"(absorber {self.absorber}: X0 = {absorber.X0_mm:.3f} mm, R_M = {absorber.R_M_mm:.2f} mm)")
        return "\n".join(lines)


def _uniform(name, n_layers, absorber_mm, grid, absorber="W", active="Si", active_mm=0.5):
    return Geometry(name, tuple(Layer(absorber, absorber_mm, active, active_mm) for _ in range(n_layers)), grid)


PRESETS: dict[str, Geometry] = {
    # The ILD Si-W ECAL of the published study: 20 thin + 10 thick tungsten layers, 5.08 mm cells.
    "ild": Geometry(
        "ild",
        tuple([Layer("W", 2.1, "Si", 0.5)] * 20 + [Layer("W", 4.2, "Si", 0.5)] * 10),
        CartesianGrid(30, 30, 5.08),
    ),
    # The CALICE Si-W ECAL physics prototype (NIM A 608 (2009) 372): three sections of 10 layers with
    # 1.4, 2.8 and 4.2 mm W, 0.525 mm Si, 1 x 1 cm2 pads (18 x 18 of the central wafers; PCB and
    # support plates are not modelled).
    "calice": Geometry(
        "calice",
        tuple([Layer("W", 1.4, "Si", 0.525)] * 10 + [Layer("W", 2.8, "Si", 0.525)] * 10
              + [Layer("W", 4.2, "Si", 0.525)] * 10),
        CartesianGrid(18, 18, 10.0),
    ),
    # CPU default: same materials, coarser and shallower so sequences stay short on a laptop.
    "cpu": _uniform("cpu", 20, 3.5, CartesianGrid(15, 15, 10.0)),
}
DEFAULT_GEOMETRY = "cpu"


def get_geometry(name_or_json: str | Geometry | None = None, absorber: str | None = None) -> Geometry:
    """A preset by name, a JSON file path or JSON text; optionally with another absorber."""
    if isinstance(name_or_json, Geometry):
        geometry = name_or_json
    else:
        key = DEFAULT_GEOMETRY if name_or_json is None else str(name_or_json)
        if key in PRESETS:
            geometry = PRESETS[key]
        elif key.lstrip().startswith("{"):
            geometry = Geometry.from_json(key)
        elif key.endswith(".json"):
            try:
                with open(key) as fh:
                    geometry = Geometry.from_json(fh.read())
            except OSError as exc:
                raise CalofmError(f"cannot read geometry file {key}: {exc.strerror}") from None
        else:
            raise CalofmError(f"unknown geometry {key!r}; presets: {', '.join(PRESETS)} (or a .json file)")
    return geometry.with_absorber(absorber) if absorber else geometry
