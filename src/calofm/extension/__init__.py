"""Growing a trained model: new materials as expert groups, new particles as gated LoRA adapters."""

from calofm.extension.adapters import AdapterSpec, apply_adapter, closest_material

__all__ = ["AdapterSpec", "apply_adapter", "closest_material"]
