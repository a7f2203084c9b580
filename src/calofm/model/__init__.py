"""Decoder-only next-hit transformer with material-grouped Mixture-of-Experts feed-forward layers."""

from calofm.model.config import PRESETS, ModelConfig, get_preset
from calofm.model.transformer import IGNORE, LossTerms, ShowerTransformer

__all__ = ["IGNORE", "PRESETS", "LossTerms", "ModelConfig", "ShowerTransformer", "get_preset"]
