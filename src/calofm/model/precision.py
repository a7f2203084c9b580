"""Mixed precision: bf16 autocast (CPU AMX / AVX512-BF16, CUDA) or plain fp32."""

from __future__ import annotations

import contextlib

import torch

from calofm.errors import CalofmError

PRECISIONS = ("bf16", "fp32")


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise CalofmError(f"unknown precision {precision!r} ({', '.join(PRECISIONS)})")
