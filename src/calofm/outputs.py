"""What calofm checks before it writes a user-named output, and how a failed write ends.

Every command that writes a file or a folder calls one of these before its work starts, so a bad
path fails in a second, not after an hour of simulation or training:

    check_output_file(path, force)   a regular file (or nothing) in an existing, writable directory;
                                     an existing file only with force (--force)
    check_output_dir(path, force)    the same for a report / model folder
    check_free_space(path, n_bytes)  at least this much room on the output's filesystem
    check_memory(n_bytes, what)      at least this much memory available, for work held in memory
    write_error(path, exc)           an OSError while writing (full disk, quota, I/O) as one CalofmError

Devices, FIFOs and sockets are never outputs: writing into /dev/full or renaming a temporary file
onto /dev/null would replace a device node with a regular file.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat

from calofm.errors import CalofmError


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_parent(path: str, what: str = "output") -> str:
    """The existing, writable directory that will hold `path` (returned absolute)."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CalofmError(f"{what} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CalofmError(f"{what} {path}: directory {parent} is not writable")
    return parent


def check_output_file(path: str, force: bool = False, what: str = "output") -> str:
    """Refuse an output file that is not a regular file, that exists (unless `force`), or whose
    directory is missing or read-only. Returns the path."""
    if not path or path.endswith(os.sep):
        raise CalofmError(f"{what} {path!r}: not a file name")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise CalofmError(f"{what} {path}: cannot check it ({exc.strerror})") from None
    if mode is not None:
        if not stat.S_ISREG(mode):
            raise CalofmError(f"{what} {path} is {_kind(mode)}; calofm writes regular files only")
        if not force:
            raise CalofmError(f"{what} {path} exists; pass --force to replace it")
    check_parent(path, what)
    return path


def check_output_dir(path: str, force: bool = False, what: str = "output folder", fmt: str | None = None) -> str:
    """Refuse an output folder that is something else than a directory, or a non-empty directory
    (unless `force`: the command then replaces only its own files there); its parent must exist and
    be writable. `fmt`: a non-empty folder must also hold a manifest.json of that "format" (what the
    command wrote there before), force or not. Returns the path."""
    if os.path.exists(path):
        mode = os.stat(path).st_mode
        if not stat.S_ISDIR(mode):
            raise CalofmError(f"{what} {path} is {'a file' if stat.S_ISREG(mode) else _kind(mode)}, not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise CalofmError(f"{what} {path} is not writable")
        if os.listdir(path) and fmt is not None and _manifest_format(path) != fmt:
            raise CalofmError(f"{what} {path} exists and holds something else than a {fmt}; calofm never "
                              "replaces files it did not write: choose a new folder")
        if os.listdir(path) and not force:
            raise CalofmError(f"{what} {path} exists and is not empty; pass --force to replace calofm's files in it")
        return path
    check_parent(path, what)
    return path


def _manifest_format(directory: str) -> str | None:
    try:
        with open(os.path.join(directory, "manifest.json")) as fh:
            manifest = json.load(fh)
    except (OSError, ValueError):
        return None
    return manifest.get("format") if isinstance(manifest, dict) else None


def check_free_space(path: str, n_bytes: float, what: str = "the output") -> None:
    """Refuse when the filesystem that will hold `path` has less than `n_bytes` free."""
    parent = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(parent).free
    if n_bytes > free:
        raise CalofmError(f"{path}: {what} take at least {_size(n_bytes)}, but {parent} has {_size(free)} free")


def shower_file_bytes(n_showers: int, n_voxels: int) -> int:
    """A floor on the size of a shower file: compressed calofm files take 2-3 kB per shower (cpu
    geometry, 10-100 GeV photons in W), so 1 kB per shower (or the raw size, if smaller) is sure."""
    return int(n_showers) * min(4 * n_voxels + 4, 1000)


def check_memory(n_bytes: float, what: str) -> None:
    """Refuse work whose arrays would not fit in the memory available now."""
    available = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return
    if n_bytes > available:
        raise CalofmError(f"{what} needs about {_size(n_bytes)} of memory, {_size(available)} is available; "
                          "use a smaller --n (and several files)")


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def write_error(path: str, exc: OSError) -> CalofmError:
    """One clear CalofmError for an OSError met while writing `path` (nothing was published)."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "no space left on the device (disk full or quota reached)"
    return CalofmError(f"cannot write {path}: {reason}; nothing was written")
