"""Models shipped inside the package, loadable by name: `calofm.load("calofm-small")`.

src/calofm/weights/<name>/ is an ordinary model directory (model.safetensors + manifest.json) with
its adapters under adapters/<adapter name>/. A name that is not a shipped model is taken as a path,
and an adapter name that is not a path is looked up among the model's shipped adapters.
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


def load(name_or_path: str = DEFAULT_MODEL, adapters: list[str] | tuple[str, ...] = (), device: str = "cpu"):
    """A shipped model by name (or a model directory), with adapters composed in order."""
    from calofm.extension.adapters import load_with_adapters

    return load_with_adapters(name_or_path, adapters, device=device)


def export(run_dir: str, destination: str, dtype: str = "bf16") -> dict:
    """Copy a trained model into a shippable directory, weights rounded to bf16 (half the bytes).

    The exported weights load into an fp32 model as usual; adapters must be trained against the
    exported model (its weight hash is what they name as their base)."""
    import torch

    from calofm.checkpoint import load_model, save_model

    model, tokenizer, manifest = load_model(run_dir)
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    elif dtype != "fp32":
        raise ValueError(f"dtype must be bf16 or fp32, got {dtype!r}")
    training = dict(manifest.get("training", {}), exported_from=os.path.abspath(run_dir),
                    source_sha256=manifest["weights"]["sha256"], stored_dtype=dtype)
    return save_model(destination, model, tokenizer, training)
