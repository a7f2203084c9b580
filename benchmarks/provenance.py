"""What every result JSON records about how it was made: the commit, the device and the command.

    from provenance import provenance           # (benchmarks/ is the script's folder)
    json.dump({**provenance(), ...}, fh)
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys


def cpu_name() -> str:
    """The CPU's model name (platform.processor() gives only the architecture on Linux)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str | None:
    """The checkout's commit, with "-dirty" when tracked files differ from it; None outside git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def provenance(device: str | None = None) -> dict:
    """{"commit", "device", "command"}; device defaults to this CPU's name, cores, threads and torch."""
    if device is None:
        import torch

        device = (f"cpu: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
                  f"torch {torch.__version__}")
    return {"commit": commit(), "device": device,
            "command": shlex.join([os.path.relpath(sys.argv[0]) if sys.argv[0].endswith(".py") else sys.argv[0],
                                   *sys.argv[1:]])}
