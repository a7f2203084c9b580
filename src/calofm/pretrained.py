"""Models shipped inside the package, found by name: `calofm.load("calofm-small")`.

src/calofm/weights/<name>/ is an ordinary model directory (model.safetensors + manifest.json, written
by checkpoint.export_model) with its adapters under adapters/<adapter name>/. A name that is not a
shipped model is taken as a path, and an adapter name that is not a path is looked up among the
model's shipped adapters. Loading is calofm.load (calofm.generation.api.load).
"""

from __future__ import annotations

import os
from importlib import resources

DEFAULT_MODEL = "calofm-small"


def weights_dir() -> str:
    return str(resources.files("calofm").joinpath("weights"))


def shipped_models() -> list[str]:
    root = weights_dir()
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "manifest.json")))


def resolve_model(name_or_path: str) -> str:
    if not os.path.exists(name_or_path) and name_or_path in shipped_models():
        return os.path.join(weights_dir(), name_or_path)
    return name_or_path


def shipped_adapters(model_dir: str) -> list[str]:
    root = os.path.join(model_dir, "adapters")
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


def resolve_adapter(model_dir: str, name_or_path: str) -> str:
    if not os.path.exists(name_or_path) and name_or_path in shipped_adapters(model_dir):
        return os.path.join(model_dir, "adapters", name_or_path)
    return name_or_path
