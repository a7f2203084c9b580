"""Detector description: materials (PDG constants) and layered calorimeter geometries."""

from calofm.detector.geometry import PRESETS, CartesianGrid, CylindricalGrid, Geometry, Layer, get_geometry
from calofm.detector.materials import Material, get_material, list_materials

__all__ = [
    "PRESETS", "CartesianGrid", "CylindricalGrid", "Geometry", "Layer", "get_geometry",
    "Material", "get_material", "list_materials",
]
