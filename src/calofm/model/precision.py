"""Mixed precision: bf16 autocast or plain fp32, and `auto`, which picks by what the hardware runs natively.

bf16 pays only where the matrix units take it natively: CUDA GPUs with bf16 (Ampere and later),
x86 CPUs with AVX512-BF16 or AMX, Arm CPUs with the BF16 extension. Elsewhere -- an AVX2-only CPU,
say -- bf16 matrix products are emulated and run about 100x slower than fp32, so `auto` picks fp32.
The decision reads capabilities, not timings, so it is instant and the same on every call; it
honours the two variables that narrow what the libraries may use: ATEN_CPU_CAPABILITY (PyTorch's
vector kernels) and ONEDNN_MAX_CPU_ISA (oneDNN's matrix kernels).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform

import torch

from calofm.errors import CalofmError

PRECISIONS = ("bf16", "fp32")
CHOICES = ("auto", *PRECISIONS)
# oneDNN ISA levels (ONEDNN_MAX_CPU_ISA) below which bf16 matrix products are not native
_ONEDNN_NO_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


@functools.lru_cache(maxsize=1)
def _cpuinfo_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (x86 'flags', Arm 'Features'); empty where unreadable."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16(capability: str | None = None, flags: set[str] | frozenset[str] | None = None,
                        onednn_max_isa: str | None = None, machine: str | None = None) -> bool:
    """Whether this CPU runs bf16 matrix products natively (the arguments override what is read from
    the machine, for tests)."""
    machine = (machine or platform.machine()).lower()
    flags = _cpuinfo_flags() if flags is None else flags
    isa = (os.environ.get("ONEDNN_MAX_CPU_ISA", "") if onednn_max_isa is None else onednn_max_isa).strip().upper()
    if isa in _ONEDNN_NO_BF16:
        return False
    if machine in ("aarch64", "arm64"):
        return "bf16" in flags
    if machine not in ("x86_64", "amd64"):
        return False
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    if not capability.upper().startswith("AVX512"):  # DEFAULT, AVX2: PyTorch's kernels were narrowed
        return False
    if flags:
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """'auto' -> 'bf16' where `device` computes bf16 natively, else 'fp32'; 'bf16' / 'fp32' pass through."""
    if precision in PRECISIONS:
        return precision
    if precision != "auto":
        raise CalofmError(f"unknown precision {precision!r} ({', '.join(CHOICES)})")
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def describe_precision(precision: str, device: torch.device | str) -> str:
    """One line for logs: the precision in use and, for 'auto', why."""
    resolved = resolve_precision(precision, device)
    if precision != "auto":
        return resolved
    device = torch.device(device)
    why = ("CUDA" if device.type == "cuda" else
           f"CPU {torch.backends.cpu.get_cpu_capability()}, native bf16 {'yes' if resolved == 'bf16' else 'no'}")
    return f"{resolved} (auto: {why})"


def autocast(device: torch.device, precision: str):
    precision = resolve_precision(precision, device)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
