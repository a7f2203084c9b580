"""The torch device a command runs on, from its name (cpu, cuda, auto)."""

from __future__ import annotations

import torch

from calofm.errors import CalofmError


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """cpu, cuda (device local_rank), cuda:N or auto (cuda if there is one)."""
    if name.startswith("cuda:") and name[5:].isdigit():
        name, local_rank = "cuda", int(name[5:])
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise CalofmError("--device cuda requested but no CUDA device is available")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise CalofmError(f"unknown device {name!r} (cpu, cuda, auto)")
    return torch.device("cpu")
