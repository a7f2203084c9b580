"""Binning XML of the CaloChallenge 2022 datasets -> a cylindrical Geometry.

The XML lists, inside a `<Bin>`/`<Particle>` element with `pid` and `name`, one `<Layer>` per
readout layer with `r_edges` ("0,4.65,...", mm) and `n_bin_alpha`. Voxels are ordered
(layer, alpha, r). The XML does not name materials; we assume the Geant4 Par04 calorimeter of
datasets 2 and 3 (each readout layer = 2 x (1.4 mm W + 0.3 mm Si)). That assumption matters only
for simulating into this binning, not for reading or evaluating files.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

from calofm.detector.geometry import CylindricalGrid, Geometry, Layer
from calofm.errors import CalofmError

PID_TO_PARTICLE = {11: "e-", -11: "e+", 22: "gamma", 211: "pi+", -211: "pi-"}


def read_binning(path: str) -> tuple[Geometry, str | None]:
    """Parse a CaloChallenge binning XML; returns (geometry, particle name or None)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError, LookupError, ValueError) as exc:  # LookupError: an unknown encoding
        raise CalofmError(f"{path}: cannot read binning XML ({exc})") from None
    owner = next((el for el in root.iter() if "pid" in el.attrib), None)
    layers = [el for el in root.iter() if el.tag.lower() == "layer"]
    if not layers:
        raise CalofmError(f"{path}: no <Layer> elements; not a CaloChallenge binning file")
    r_edges, n_alpha = [], []
    try:
        for el in sorted(layers, key=lambda e: int(e.attrib.get("id", 0))):
            edges = tuple(float(v) for v in el.attrib["r_edges"].split(",") if v.strip())
            alpha = int(el.attrib.get("n_bin_alpha", 1))
            if len(edges) < 2 or not all(math.isfinite(e) for e in edges) or edges[0] < 0 or \
                    any(b <= a for a, b in zip(edges, edges[1:])):
                raise ValueError(f"r_edges {el.attrib['r_edges']!r}: need two or more finite, increasing edges >= 0")
            if alpha < 1:
                raise ValueError(f"n_bin_alpha {alpha} must be >= 1")
            r_edges.append(edges)
            n_alpha.append(alpha)
    except (KeyError, ValueError) as exc:
        raise CalofmError(f"{path}: malformed <Layer> element ({exc!r})") from None
    particle = None
    if owner is not None:
        try:
            particle = PID_TO_PARTICLE.get(int(owner.attrib["pid"]), owner.attrib.get("name"))
        except ValueError:
            particle = owner.attrib.get("name")
    geometry = Geometry(
        name=f"calochallenge:{path.rsplit('/', 1)[-1]}",
        layers=tuple(Layer("W", 2.8, "Si", 0.6) for _ in r_edges),
        grid=CylindricalGrid(tuple(r_edges), tuple(n_alpha)),
    )
    return geometry, particle
