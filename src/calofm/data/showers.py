"""HDF5 shower files in the CaloChallenge layout.

Layout: `incident_energies` (N, 1) float32 MeV, `showers` (N, n_voxels) float32 MeV, gzip.
calofm files also carry the attributes `material`, `particle`, `geometry` (JSON), `generator`, `seed`,
so a file says by itself what it holds, and simulated files the beam of every shower:
`incident_positions` (N, 2) float32 mm (impact x, y on the front face) and `incident_angles` (N, 2)
float32 degrees (theta from the axis, phi). Files without them (older calofm files, other
producers) read the same; read_beam then returns None. Files without them (the CaloChallenge datasets) need the
binning XML, which supplies the geometry.

Every reader validates: structure, shape agreement with the geometry, and values (no NaN, no
negative cell energies, incident energies > 0). Every writer is atomic: it writes a temporary file
next to the target and renames it only when complete, so a crash never leaves half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import h5py
import numpy as np

from calofm.detector.geometry import Geometry
from calofm.errors import CalofmError
from calofm.outputs import write_error

DEFAULT_CHUNK = 4096
BEAM_DATASETS = ("incident_positions", "incident_angles")
# what h5py raises on a corrupt file or an object of an unexpected kind (KeyError: a broken link or header)
H5_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError)
NUMERIC_KINDS = "fiu"  # float, signed and unsigned integer datasets; strings, compounds, bools are refused


@dataclass
class ShowerFileInfo:
    path: str
    n_showers: int
    n_voxels: int
    geometry: Geometry | None
    material: str | None = None
    particle: str | None = None
    generator: str | None = None
    seed: int | None = None
    attrs: dict = field(default_factory=dict)
    has_beam: bool = False  # per-shower incident_positions and incident_angles present


def _open(path: str) -> h5py.File:
    if not os.path.exists(path):
        raise CalofmError(f"{path}: no such file")
    try:
        return h5py.File(path, "r")
    except H5_ERRORS:
        raise CalofmError(f"{path}: not a readable HDF5 file (truncated, corrupt or another format)") from None


def _decode(value):
    return value.decode() if isinstance(value, bytes) else value


def inspect_file(path: str, binning_xml: str | None = None, geometry: Geometry | None = None) -> ShowerFileInfo:
    """Read a file's header and check its structure; raises CalofmError naming the problem."""
    with _open(path) as f:
        try:
            for name in ("incident_energies", "showers"):
                if name not in f or not isinstance(f[name], h5py.Dataset):
                    raise CalofmError(f"{path}: no '{name}' dataset; not a shower file in the CaloChallenge layout")
                if f[name].shape is None or f[name].dtype.kind not in NUMERIC_KINDS:
                    raise CalofmError(f"{path}: '{name}' must hold numbers, found {f[name].dtype} of shape "
                                      f"{f[name].shape}")
            e_shape, s_shape = f["incident_energies"].shape, f["showers"].shape
            attrs = {k: _decode(v) for k, v in f.attrs.items()}
            has_beam = all(name in f and isinstance(f[name], h5py.Dataset) and f[name].shape == (e_shape[:1] + (2,))
                           and f[name].dtype.kind in NUMERIC_KINDS for name in BEAM_DATASETS)
        except H5_ERRORS as exc:
            raise CalofmError(f"{path}: cannot read the file's structure (truncated or corrupt file: {exc})") from None
    if len(s_shape) != 2:
        raise CalofmError(f"{path}: 'showers' must be 2-D (N, n_voxels), found shape {s_shape}")
    if len(e_shape) not in (1, 2) or (len(e_shape) == 2 and e_shape[1] != 1):
        raise CalofmError(f"{path}: 'incident_energies' must have shape (N, 1), found {e_shape}")
    if e_shape[0] != s_shape[0]:
        raise CalofmError(f"{path}: {e_shape[0]} incident energies but {s_shape[0]} showers")
    if s_shape[0] == 0:
        raise CalofmError(f"{path}: the file holds no showers")
    for key in ("material", "particle", "generator", "geometry"):
        if key in attrs and not isinstance(attrs[key], str):
            raise CalofmError(f"{path}: attribute '{key}' must be a string, found {attrs[key]!r}")

    particle = attrs.get("particle")
    try:
        if geometry is None and binning_xml is not None:
            from calofm.data.calochallenge import read_binning

            geometry, xml_particle = read_binning(binning_xml)
            particle = particle or xml_particle
        if geometry is None and "geometry" in attrs:
            geometry = Geometry.from_json(attrs["geometry"])
    except CalofmError as exc:
        raise CalofmError(exc.args[0] if binning_xml is not None else f"{path}: attribute 'geometry': {exc}") from None
    if geometry is not None and geometry.n_voxels != s_shape[1]:
        raise CalofmError(
            f"{path}: showers have {s_shape[1]} voxels but geometry {geometry.name!r} has {geometry.n_voxels}"
        )
    seed = attrs.get("seed")
    try:
        seed = None if seed is None or seed == "" else int(seed)
    except (TypeError, ValueError):
        raise CalofmError(f"{path}: attribute 'seed' must be an integer, found {seed!r}") from None
    return ShowerFileInfo(
        path=path, n_showers=int(s_shape[0]), n_voxels=int(s_shape[1]), geometry=geometry,
        material=attrs.get("material"), particle=particle, generator=attrs.get("generator"),
        seed=seed, attrs=attrs, has_beam=has_beam,
    )


def check_shower_values(energies: np.ndarray, showers: np.ndarray, where: str = "input") -> None:
    """Refuse NaN/inf, negative cell energies and non-positive incident energies."""
    if not np.all(np.isfinite(energies)) or not np.all(np.isfinite(showers)):
        raise CalofmError(f"{where}: contains NaN or infinite energies")
    if np.any(energies <= 0):
        raise CalofmError(f"{where}: incident energies must be > 0 MeV (found {float(energies.min()):g})")
    if np.any(showers < 0):
        raise CalofmError(f"{where}: contains negative cell energies (min {float(showers.min()):g} MeV)")


def iter_showers(path: str, chunk_size: int = DEFAULT_CHUNK, info: ShowerFileInfo | None = None,
                 start: int = 0, stop: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (incident_energies (n,), showers (n, n_voxels)) in MeV, chunk by chunk, validated."""
    info = info or inspect_file(path)
    stop = info.n_showers if stop is None else min(stop, info.n_showers)
    with _open(path) as f:
        e_ds, s_ds = f["incident_energies"], f["showers"]
        for lo in range(start, stop, chunk_size):
            hi = min(lo + chunk_size, stop)
            try:
                energies = np.asarray(e_ds[lo:hi], dtype=np.float32).reshape(-1)
                showers = np.asarray(s_ds[lo:hi], dtype=np.float32)
            except H5_ERRORS as exc:
                raise CalofmError(f"{path}: cannot read showers {lo}-{hi} (truncated or corrupt file: {exc})") from None
            check_shower_values(energies, showers, f"{path} (showers {lo}-{hi})")
            yield energies, showers


def read_showers(path: str, start: int = 0, stop: int | None = None, binning_xml: str | None = None,
                 geometry: Geometry | None = None) -> tuple[np.ndarray, np.ndarray, ShowerFileInfo]:
    """Read (a slice of) a file into memory: (incident_energies (N,), showers (N, V), info)."""
    info = inspect_file(path, binning_xml=binning_xml, geometry=geometry)
    parts = list(iter_showers(path, chunk_size=65536, info=info, start=start, stop=stop))
    if not parts:
        raise CalofmError(f"{path}: no showers in the requested range {start}:{stop}")
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), info


def read_beam(path: str, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """(impact points (N, 2) mm, angles (N, 2) degrees) of a slice of a file, or None for a file
    without them."""
    info = inspect_file(path)
    if not info.has_beam:
        return None
    with _open(path) as f:
        try:
            pos, ang = (np.asarray(f[name][start:stop], dtype=np.float32) for name in BEAM_DATASETS)
        except H5_ERRORS as exc:
            raise CalofmError(f"{path}: cannot read the beam datasets ({exc})") from None
    if not (np.all(np.isfinite(pos)) and np.all(np.isfinite(ang))):
        raise CalofmError(f"{path}: incident positions or angles contain NaN or infinite values")
    return pos, ang


class ShowerWriter:
    """Write showers chunk by chunk into a temporary file, renamed onto `path` only on success.

    with ShowerWriter("out.h5", geometry, material="W", particle="gamma", generator=..., seed=1) as w:
        w.write(incident_energies_MeV, showers_MeV)

    With beam=True the file also gets incident_positions and incident_angles, and every write()
    must pass them.
    """

    def __init__(self, path: str, geometry: Geometry, material: str, particle: str, generator: str,
                 seed: int | None = None, expected: int | None = None, extra_attrs: dict | None = None,
                 beam: bool = False):
        self.path, self.geometry, self.n_written = str(path), geometry, 0
        self.tmp_path, self.file = None, None
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise CalofmError(f"output directory {directory} does not exist")
        if os.path.exists(self.path) and not os.path.isfile(self.path):
            raise CalofmError(f"output {self.path} exists and is not a regular file (a directory or a device); "
                              "calofm writes regular files only")
        try:
            fd, self.tmp_path = tempfile.mkstemp(prefix=".tmp-", suffix=".h5", dir=directory)
            os.close(fd)
            self.file = h5py.File(self.tmp_path, "w")
            self._create(geometry, material, particle, generator, seed, extra_attrs, beam)
        except OSError as exc:
            self.abort()
            raise write_error(self.path, exc) from None
        self.expected = expected

    def _create(self, geometry, material, particle, generator, seed, extra_attrs, beam) -> None:
        v = geometry.n_voxels
        chunk_rows = max(1, min(1024, (1 << 20) // (4 * v)))
        self.e_ds = self.file.create_dataset("incident_energies", shape=(0, 1), maxshape=(None, 1), dtype="f4",
                                             chunks=(max(chunk_rows, 256), 1), compression="gzip")
        self.s_ds = self.file.create_dataset("showers", shape=(0, v), maxshape=(None, v), dtype="f4",
                                             chunks=(chunk_rows, v), compression="gzip", compression_opts=4,
                                             shuffle=True)
        self.beam_ds = [self.file.create_dataset(name, shape=(0, 2), maxshape=(None, 2), dtype="f4",
                                                 chunks=(max(chunk_rows, 256), 2), compression="gzip")
                        for name in BEAM_DATASETS] if beam else None
        attrs = {"material": material, "particle": particle, "geometry": geometry.to_json(),
                 "generator": generator, "seed": "" if seed is None else int(seed)}
        attrs.update(extra_attrs or {})
        self.set_attrs(attrs)

    def set_attrs(self, attrs: dict) -> None:
        """More file attributes (dicts and lists as JSON), before the file is closed: what is known only
        once the showers are written (a shard's time)."""
        try:
            for key, value in attrs.items():
                self.file.attrs[key] = value if not isinstance(value, (dict, list)) else json.dumps(value)
        except OSError as exc:
            self.abort()
            raise write_error(self.path, exc) from None

    def write(self, energies: np.ndarray, showers: np.ndarray, positions: np.ndarray | None = None,
              angles: np.ndarray | None = None) -> None:
        energies = np.asarray(energies, dtype=np.float32).reshape(-1, 1)
        showers = np.asarray(showers, dtype=np.float32)
        if showers.ndim != 2 or showers.shape[1] != self.geometry.n_voxels or showers.shape[0] != energies.shape[0]:
            raise CalofmError(f"showers of shape {showers.shape} do not fit geometry {self.geometry.name!r} "
                              f"({self.geometry.n_voxels} voxels) with {energies.shape[0]} energies")
        check_shower_values(energies, showers, "showers to write")
        n0, n1 = self.n_written, self.n_written + len(energies)
        beam = None
        if self.beam_ds is not None:
            beam = [np.asarray(v, dtype=np.float32) if v is not None else None for v in (positions, angles)]
            if any(v is None or v.shape != (len(energies), 2) or not np.all(np.isfinite(v)) for v in beam):
                raise CalofmError(f"this file records the beam: positions and angles must be finite (N, 2) arrays "
                                  f"for the {len(energies)} showers")
        try:
            for ds, v in zip(self.beam_ds or (), beam or ()):
                ds.resize((n1, 2))
                ds[n0:n1] = v
            self.e_ds.resize((n1, 1))
            self.s_ds.resize((n1, self.geometry.n_voxels))
            self.e_ds[n0:n1] = energies
            self.s_ds[n0:n1] = showers
        except OSError as exc:  # full disk, quota, I/O error: the temporary file goes, nothing is published
            self.abort()
            raise write_error(self.path, exc) from None
        self.n_written = n1

    def close(self) -> None:
        try:
            self.file.close()
        except OSError as exc:
            self.abort()
            raise write_error(self.path, exc) from None
        if self.expected is not None and self.n_written != self.expected:
            self.abort()
            raise CalofmError(f"wrote {self.n_written} showers, expected {self.expected}; nothing written")
        if os.path.exists(self.path) and not os.path.isfile(self.path):  # appeared while writing
            self.abort()
            raise CalofmError(f"output {self.path} is not a regular file; nothing written")
        try:
            os.chmod(self.tmp_path, 0o644)  # mkstemp creates 0600; a data file should be readable like any other
            os.replace(self.tmp_path, self.path)
        except OSError as exc:
            self.abort()
            raise write_error(self.path, exc) from None

    def abort(self) -> None:
        """Drop the temporary file (on any failure, Ctrl-C or SIGTERM); never raises for a closed file."""
        try:
            if self.file is not None:
                with contextlib.suppress(Exception):
                    self.file.close()
        finally:
            if self.tmp_path is not None and os.path.exists(self.tmp_path):
                os.remove(self.tmp_path)

    def __enter__(self) -> ShowerWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
