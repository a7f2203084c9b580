"""Shard files of one run, and `calofm merge`, which joins them into the run's file.

A shard file (calofm.sharding) is an ordinary shower file with two more attributes, JSON:
- `run`: what makes the run (generator, model and adapter digests, seed, class, geometry, energies,
  sampling, the run's size n, ...); every shard of a run has the same;
- `shard`: {"index", "count", "start", "stop", "seconds"}: this file holds showers [start, stop) of
  the run, made in `seconds`.
merge_shards checks that the files are shards of one run that cover [0, n) exactly, once, and writes
them in shower order through ShowerWriter (atomic; the beam datasets too where the shards have them),
with the attributes of the first shard less `shard`, and the per-file statistics (`n_showers`,
`mean_hits`, `n_capped`) recomputed for the whole run.
"""

from __future__ import annotations

import json

import numpy as np

from calofm.data.showers import ShowerWriter, inspect_file, iter_showers, read_beam
from calofm.errors import CalofmError

RUN, SHARD = "run", "shard"


def shard_attrs(run: dict, index: int, count: int, start: int, stop: int, seconds: float) -> dict:
    """The attributes that make a shower file shard `index` of `count` of a run."""
    return {RUN: run, SHARD: {"index": index, "count": count, "start": start, "stop": stop,
                              "seconds": round(float(seconds), 3)}}


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_attr(info, key: str) -> dict:
    value = info.attrs.get(key)
    try:
        value = json.loads(value) if isinstance(value, (str, bytes)) else None
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise CalofmError(f"{info.path}: not a shard file of calofm generate/simulate (no '{key}' attribute; "
                          "shards are written with --shard K/N or under torchrun)")
    return value


def _shard_range(info, shard: dict) -> tuple[int, int]:
    try:
        start, stop = int(shard["start"]), int(shard["stop"])
    except (KeyError, TypeError, ValueError):
        raise CalofmError(f"{info.path}: malformed 'shard' attribute {shard}") from None
    if stop - start != info.n_showers or start < 0:
        raise CalofmError(f"{info.path}: holds {info.n_showers} showers, its 'shard' attribute says "
                          f"[{start}, {stop})")
    return start, stop


def check_shards(paths: list[str]) -> list:
    """The files' infos in shower order, or CalofmError naming the first file that does not fit: another
    run (the differing entries), a range that overlaps another's, or showers of the run no file holds."""
    if not paths:
        raise CalofmError("no shard files given")
    infos = [inspect_file(p) for p in paths]
    first, run = infos[0], _json_attr(infos[0], RUN)
    ranges = {}
    for info in infos:
        other = _json_attr(info, RUN)
        if other != run:
            diff = sorted(k for k in set(run) | set(other) if run.get(k) != other.get(k))
            shown = "; ".join(f"{k}: {_short(other.get(k))} here, {_short(run.get(k))} there" for k in diff[:4])
            raise CalofmError(f"{info.path} is a shard of another run than {first.path} ({shown})")
        ranges[info.path] = _shard_range(info, _json_attr(info, SHARD))
    if len(set(ranges)) < len(infos):
        raise CalofmError(f"a file is given twice: {', '.join(p for p in ranges if paths.count(p) > 1)}")
    n = int(run.get("n", -1))
    order = sorted(infos, key=lambda i: ranges[i.path])
    at = 0
    for info in order:
        start, stop = ranges[info.path]
        if start < at:
            prev = next(i.path for i in order if ranges[i.path][0] < stop and ranges[i.path][1] > start
                        and i is not info)
            raise CalofmError(f"{info.path} (showers [{start}, {stop})) overlaps {prev} (showers "
                              f"[{ranges[prev][0]}, {ranges[prev][1]}))")
        if start > at:
            raise CalofmError(f"showers [{at}, {start}) of the run's {n} are in no file given (the shard before "
                              f"{info.path} is missing)")
        at = stop
    if at != n:
        raise CalofmError(f"showers [{at}, {n}) of the run's {n} are in no file given (the shard after "
                          f"{order[-1].path} is missing)")
    return order


def merge_shards(paths: list[str], output: str) -> dict:
    """Join shard files of one run into `output` in shower order -> {"n", "shards": [(path, n, seconds)]}.
    The caller checks that `output` may be written (calofm.outputs)."""
    order = check_shards(paths)
    first = order[0]
    if first.geometry is None:
        raise CalofmError(f"{first.path}: no geometry attribute")
    # JSON attributes stay the strings they are; ShowerWriter sets the five it takes as arguments
    attrs = {k: v for k, v in first.attrs.items()
             if k not in (SHARD, "material", "particle", "geometry", "generator", "seed")}
    stats = [i.attrs for i in order]
    n = sum(i.n_showers for i in order)
    if all("mean_hits" in s and "n_capped" in s for s in stats):
        attrs["mean_hits"] = float(sum(float(s["mean_hits"]) * i.n_showers for s, i in zip(stats, order)) / n)
        attrs["n_capped"] = int(sum(int(s["n_capped"]) for s in stats))
    if "n_showers" in attrs:
        attrs["n_showers"] = n
    beam = first.has_beam
    if any(i.has_beam != beam for i in order):
        raise CalofmError(f"{next(i.path for i in order if i.has_beam != beam)}: beam datasets unlike {first.path}'s")
    with ShowerWriter(output, first.geometry, first.material, first.particle, first.generator, first.seed,
                      expected=n, extra_attrs=attrs, beam=beam) as w:
        for info in order:
            positions, angles = read_beam(info.path) if beam else (None, None)
            at = 0
            for energies, showers in iter_showers(info.path, info=info):
                rows = slice(at, at + len(energies))
                w.write(energies, showers, None if positions is None else positions[rows],
                        None if angles is None else angles[rows])
                at += len(energies)
    return {"n": n, "shards": [(i.path, i.n_showers, float(_json_attr(i, SHARD).get("seconds", np.nan)))
                               for i in order]}
