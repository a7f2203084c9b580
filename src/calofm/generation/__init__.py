"""KV-cached batched generation and the Python API (`calofm.load`)."""

from calofm.generation.api import ShowerModel, load
from calofm.generation.decode import DecodeOptions, DecodeResult, Decoder, decode
from calofm.generation.sampler import SamplingConfig, filter_logits, sample

__all__ = ["DecodeOptions", "DecodeResult", "Decoder", "SamplingConfig", "ShowerModel", "decode", "filter_logits",
           "load", "sample"]
