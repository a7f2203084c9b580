"""--precision auto: bf16 only where the hardware computes it natively, decided by capability."""

import os
import subprocess
import sys

import pytest
import torch

from calofm.errors import CalofmError
from calofm.model.precision import autocast, cpu_has_native_bf16, describe_precision, resolve_precision

X86_BF16 = {"avx2", "avx512f", "avx512_bf16"}


@pytest.mark.parametrize("capability, flags, isa, machine, native", [
    ("AVX512", X86_BF16, "", "x86_64", True),  # AVX512-BF16 (Zen 4, Cooper Lake)
    ("AVX512", {"avx512f", "amx_bf16", "amx_tile"}, "", "x86_64", True),  # AMX (Sapphire Rapids)
    ("AVX512", {"avx2", "avx512f"}, "", "x86_64", False),  # AVX512 without bf16 (Skylake-X)
    ("AVX2", {"avx2", "fma"}, "", "x86_64", False),  # AVX2 only
    ("AVX2", X86_BF16, "", "x86_64", False),  # ATEN_CPU_CAPABILITY=avx2 on a bf16 CPU
    ("AVX512", X86_BF16, "AVX2", "x86_64", False),  # ONEDNN_MAX_CPU_ISA=AVX2
    ("AVX512", X86_BF16, "avx512_core", "x86_64", False),
    ("AVX512", X86_BF16, "AVX512_CORE_BF16", "x86_64", True),
    ("DEFAULT", {"fp", "asimd", "bf16"}, "", "aarch64", True),  # Arm with the BF16 extension
    ("DEFAULT", {"fp", "asimd"}, "", "aarch64", False),
    ("DEFAULT", set(), "", "riscv64", False),
])
def test_native_bf16_is_read_from_capabilities(capability, flags, isa, machine, native):
    assert cpu_has_native_bf16(capability, flags, isa, machine) is native


def test_resolve(monkeypatch):
    assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("fp32", "cpu") == "fp32"
    monkeypatch.setattr("calofm.model.precision.cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32" and describe_precision("auto", "cpu").startswith("fp32 (auto:")
    with torch.no_grad(), autocast(torch.device("cpu"), "auto"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    monkeypatch.setattr("calofm.model.precision.cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    with torch.no_grad(), autocast(torch.device("cpu"), "auto"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(CalofmError, match="unknown precision"):
        resolve_precision("fp8", "cpu")


def test_emulated_avx2_cpu_resolves_to_fp32():
    """The variables that narrow PyTorch and oneDNN to AVX2 make auto pick fp32 on any CPU."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    code = "from calofm.model.precision import resolve_precision; print(resolve_precision('auto', 'cpu'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "fp32"
