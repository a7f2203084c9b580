"""Training data: shower files and/or simulated samples -> tokenized corpus -> padded batches.

Each file holds one material and one particle (the HDF5 attributes say which). All hits are read
once into packed arrays (a few bytes per hit), the tokenizer's max_hits is derived from the hit
counts of all files, and every file is split into train / validation by position (the last showers
are validation; files are i.i.d. samples, so this is a random split that needs no seed).

With a simulated stream (training/stream.py) the training showers of each step are made on the fly;
what must exist before the first step is simulated once, in memory, with seeds of its own: a
validation set per source, and a reference sample per source that fixes max_hits (with the files'
hit counts) and the shower totals of the streamed classes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from calofm.data.showers import inspect_file, iter_showers
from calofm.detector.materials import get_material
from calofm.errors import CalofmError
from calofm.model.transformer import IGNORE
from calofm.tokenizer import (BOS, DEFAULT_ORDER, EOS, PAD, Hits, ShowerTokenizer, TokenizedShowers, canonical_particle,
                              incident_feature)
from calofm.tokenizer.totals import ShowerTotals, class_key


@dataclass
class Corpus:
    """Tokenized showers with their conditioning, indexable by shower."""

    incident_MeV: np.ndarray  # (N,) float32
    material: np.ndarray  # (N,) int64 material id
    particle: np.ndarray  # (N,) int64 particle id
    tokens: TokenizedShowers
    e_vis_MeV: np.ndarray | None = None  # (N,) float64 sum of all hits (before any max_hits cut)
    min_hit_MeV: np.ndarray | None = None  # (N,) float32 smallest hit (the readout threshold seen)

    def __len__(self) -> int:
        return len(self.incident_MeV)

    @classmethod
    def concat(cls, parts: list[Corpus]) -> Corpus:
        """The showers of all parts, in order (token arrays re-packed)."""
        if len(parts) == 1:
            return parts[0]
        toks = [p.tokens for p in parts]
        counts = np.concatenate([t.counts for t in toks])
        tokens = TokenizedShowers(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                                  np.concatenate([t.voxel_tokens for t in toks]),
                                  np.concatenate([t.energy_tokens for t in toks]))
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        optional = lambda name: None if any(getattr(p, name) is None for p in parts) else cat(name)  # noqa: E731
        return Corpus(cat("incident_MeV"), cat("material"), cat("particle"), tokens, optional("e_vis_MeV"),
                      optional("min_hit_MeV"))

    def subset(self, idx: np.ndarray) -> Corpus:
        """The showers idx (token arrays re-packed)."""
        tok = self.tokens
        counts = tok.counts[idx]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        flat = np.repeat(tok.offsets[idx], counts) + (np.arange(offsets[-1]) - np.repeat(offsets[:-1], counts))
        sub = TokenizedShowers(**{**tok.__dict__, "offsets": offsets, "voxel_tokens": tok.voxel_tokens[flat],
                                  "energy_tokens": tok.energy_tokens[flat]})
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return Corpus(self.incident_MeV[idx], self.material[idx], self.particle[idx], sub,
                      pick(self.e_vis_MeV), pick(self.min_hit_MeV))

    def fit_totals(self, tokenizer: ShowerTokenizer) -> ShowerTotals:
        """Hit-count / visible-energy statistics of every (material, particle) class in the corpus."""
        if self.e_vis_MeV is None or self.min_hit_MeV is None:
            raise CalofmError("this corpus was built without visible energies; cannot fit shower totals")
        totals = ShowerTotals()
        materials, particles = tokenizer.materials.names(), tokenizer.particles.names()
        for m, p in sorted(set(zip(self.material.tolist(), self.particle.tolist()))):
            rows = (self.material == m) & (self.particle == p)
            ok = rows & (self.tokens.counts > 0)
            totals.update(ShowerTotals.fit(class_key(materials[m], particles[p]), self.incident_MeV[ok],
                                           self.tokens.counts[ok], self.e_vis_MeV[ok],
                                           float(self.min_hit_MeV[ok].min())))
        return totals

    def n_targets(self, idx: np.ndarray) -> int:
        """Predicted tokens of these showers: every hit plus EOS."""
        return int((self.tokens.counts[idx] + 1).sum())

    def batch(self, idx: np.ndarray, device: torch.device | str = "cpu") -> dict:
        """Padded tensors for showers idx. Full sequence [COND, BOS, hits, EOS, PAD...]; inputs drop
        the last position, targets drop the first and skip BOS and padding."""
        idx = np.asarray(idx)
        counts = self.tokens.counts[idx]
        B, L = len(idx), int(counts.max(initial=0)) + 3
        seq_v = np.full((B, L), PAD, dtype=np.int64)
        seq_e = np.full((B, L), PAD, dtype=np.int64)
        seq_v[:, 1] = seq_e[:, 1] = BOS
        within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        src = np.repeat(self.tokens.offsets[idx], counts) + within
        rows = np.repeat(np.arange(B), counts)
        seq_v[rows, 2 + within] = self.tokens.voxel_tokens[src]
        seq_e[rows, 2 + within] = self.tokens.energy_tokens[src]
        seq_v[np.arange(B), 2 + counts] = seq_e[np.arange(B), 2 + counts] = EOS
        tgt_v, tgt_e = seq_v[:, 1:].copy(), seq_e[:, 1:].copy()
        ignore = (tgt_v == PAD) | (np.arange(L - 1) == 0)[None, :]
        tgt_v[ignore] = tgt_e[ignore] = IGNORE
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
        return {
            "vox_in": as_t(seq_v[:, :-1]), "en_in": as_t(seq_e[:, :-1]), "vox_tgt": as_t(tgt_v), "en_tgt": as_t(tgt_e),
            "valid": as_t(np.arange(L - 1)[None, :] < (counts + 2)[:, None]),
            "incident": as_t(incident_feature(self.incident_MeV[idx])),
            "material": as_t(self.material[idx]), "particle": as_t(self.particle[idx]),
        }


@dataclass
class FileData:
    path: str
    material: str
    particle: str
    incident_MeV: np.ndarray
    hits: Hits


def read_file(path: str) -> tuple[FileData, object]:
    """All showers of one file as hits; requires the calofm attributes (material, particle, geometry)."""
    info = inspect_file(path)
    missing = [k for k in ("material", "particle") if not getattr(info, k)]
    if missing or info.geometry is None:
        raise CalofmError(f"{path}: the file does not say its {', '.join(missing or ['geometry'])}; "
                          "training needs calofm shower files (calofm simulate writes them)")
    energies, parts = [], []
    for e, showers in iter_showers(path, info=info):
        energies.append(e)
        parts.append(Hits.from_dense(showers))
    data = FileData(path, get_material(info.material).name, canonical_particle(info.particle),
                    np.concatenate(energies), Hits.concat(parts))
    return data, info


def _corpus(tokenizer: ShowerTokenizer, files: list[FileData], rows: list[slice]) -> tuple[Corpus, dict]:
    hits = Hits.concat([_slice_hits(f.hits, r) for f, r in zip(files, rows)])
    caps = None  # each shower at its class's cap, where an adapter's differs from the base's
    if tokenizer.adapter_max_hits:
        caps = np.concatenate([np.full(r.stop - r.start, tokenizer.class_max_hits(f.material, f.particle))
                               for f, r in zip(files, rows)])
    tokens = tokenizer.encode(hits, caps)
    mat = np.concatenate([np.full(r.stop - r.start, tokenizer.material_id(f.material)) for f, r in zip(files, rows)])
    par = np.concatenate([np.full(r.stop - r.start, tokenizer.particle_id(f.particle)) for f, r in zip(files, rows)])
    inc = np.concatenate([f.incident_MeV[r] for f, r in zip(files, rows)]).astype(np.float32)
    starts = hits.offsets[:-1][hits.counts > 0]
    e_vis, e_min = np.zeros(len(hits)), np.zeros(len(hits), dtype=np.float32)
    e_vis[hits.counts > 0] = np.add.reduceat(hits.energy.astype(np.float64), starts)
    e_min[hits.counts > 0] = np.minimum.reduceat(hits.energy, starts)
    return Corpus(inc, mat.astype(np.int64), par.astype(np.int64), tokens, e_vis, e_min), tokens.stats


def _slice_hits(hits: Hits, rows: slice) -> Hits:
    lo, hi = hits.offsets[rows.start], hits.offsets[rows.stop]
    return Hits(hits.offsets[rows.start:rows.stop + 1] - lo, hits.voxel[lo:hi], hits.energy[lo:hi])


@dataclass
class TrainingData:
    """What training needs before its first step."""

    tokenizer: ShowerTokenizer
    train: Corpus | None  # the files' training rows; None without files (streamed showers only)
    val: dict[str, Corpus]  # validation showers per material (files' last rows, simulated sets)
    reference: Corpus | None  # simulated reference sample of the streamed classes
    summary: dict

    def fit_totals(self) -> ShowerTotals:
        """Hit-count / E_vis laws of every class: from the files' training rows, and for streamed classes
        from the reference sample (which wins for a class both supply)."""
        totals = ShowerTotals()
        for corpus in (self.train, self.reference):
            if corpus is not None:
                totals.update(corpus.fit_totals(self.tokenizer))
        return totals


def load_corpus(paths: list[str], tokenizer: ShowerTokenizer | None = None, order: str = DEFAULT_ORDER,
                max_hits: int | None = None, val_fraction: float = 0.05, max_val: int = 1000,
                log=print) -> tuple[ShowerTokenizer, Corpus, dict[str, Corpus], dict]:
    """Read files, build (or reuse) the tokenizer, split, tokenize.

    Returns the tokenizer, the training corpus, one validation corpus per material, and a summary
    (files, hit-count statistics, derived max_hits, truncation and energy-range counts)."""
    if not paths:
        raise CalofmError("no training data given (--data FILE ...)")
    d = prepare_data(paths, tokenizer, order, max_hits, val_fraction, max_val, log=log)
    return d.tokenizer, d.train, d.val, d.summary


def prepare_data(paths: list[str], tokenizer: ShowerTokenizer | None = None, order: str = DEFAULT_ORDER,
                 max_hits: int | None = None, val_fraction: float = 0.05, max_val: int = 1000, log=print,
                 stream=None, seed: int = 0, n_reference: int = 2000, workers: int = 1,
                 adapter_keys: tuple = ()) -> TrainingData:
    """Files and/or a simulated stream (a training.stream.StreamSpec) -> tokenizer, corpora, summary.

    adapter_keys: with a given tokenizer, the vocabulary entries ((kind, name), ...) of an adapter being
    trained; its own max_hits is fitted on this data's hit counts (tokenizer.fit_adapter_max_hits)
    before anything is tokenized.

    For the stream, `max_val` validation showers and `n_reference` reference showers per source are
    simulated here (seeded by `seed`, apart from the training stream's seeds)."""
    if not paths and stream is None:
        raise CalofmError("no training data given (--data FILE ... and/or --simulate MATERIALS)")
    files, geometry = [], stream.readout() if stream is not None else None
    for path in paths:
        data, info = read_file(path)
        if geometry is None:
            geometry = info.geometry
        elif info.geometry.with_absorber(geometry.layers[0].absorber).to_json() != geometry.to_json():
            # the absorber differs between files by design; the readout must not
            raise CalofmError(f"{path}: geometry {info.geometry.name!r} differs from the "
                              f"{'stream' if stream is not None else 'first file'}'s {geometry.name!r} "
                              "(beyond the absorber); one model serves one readout geometry")
        files.append(data)
        log(f"read {path}: {len(data.incident_MeV)} {data.particle} showers in {data.material}, "
            f"{int(data.hits.counts.mean())} hits on average")
    val_sim, ref_sim = [], []
    if stream is not None:
        t0 = time.time()
        val_sim = stream.sample("validation", max_val, seed, workers)
        ref_sim = stream.sample("reference", n_reference, seed, workers)
        log(f"simulated {max_val} validation and {n_reference} reference showers for each of "
            f"{', '.join('/'.join(s) for s in stream.sources())} in {time.time() - t0:.1f} s")
    counts = np.concatenate([f.hits.counts for f in files + ref_sim])
    if tokenizer is None:
        unique = lambda xs: list(dict.fromkeys(xs))  # noqa: E731  (first-seen order)
        tokenizer = ShowerTokenizer.create(geometry, unique(f.material for f in files + ref_sim),
                                           unique(f.particle for f in files + ref_sim), order=order)
        if max_hits is not None:
            tokenizer.max_hits = int(max_hits)
        else:
            tokenizer.fit_max_hits(counts)
    elif tokenizer.geometry.n_voxels != geometry.n_voxels:
        raise CalofmError(f"data geometry {geometry.name!r} does not match the model's {tokenizer.geometry.name!r}")
    elif adapter_keys:
        tokenizer.fit_adapter_max_hits(adapter_keys, counts)

    train_rows, val_rows = [], []
    for f in files:
        n = len(f.incident_MeV)
        n_val = min(max_val, int(round(val_fraction * n))) if n > 1 else 0
        train_rows.append(slice(0, n - n_val))
        val_rows.append(slice(n - n_val, n))
    train, train_stats = _corpus(tokenizer, files, train_rows) if files else (None, None)
    reference, ref_stats = _corpus(tokenizer, ref_sim, _all_rows(ref_sim)) if ref_sim else (None, None)
    val = {}
    val_parts = list(zip(files, val_rows)) + list(zip(val_sim, _all_rows(val_sim)))
    for mat in dict.fromkeys(f.material for f, _ in val_parts):
        sel = [(f, r) for f, r in val_parts if f.material == mat and r.stop > r.start]
        if sel:
            val[mat], _ = _corpus(tokenizer, [s[0] for s in sel], [s[1] for s in sel])
    summary = {
        "files": [{"path": f.path, "material": f.material, "particle": f.particle, "n_showers": len(f.incident_MeV),
                   "n_train": r.stop - r.start, "n_val": v.stop - v.start,
                   "incident_GeV_range": [float(f.incident_MeV.min()) / 1e3, float(f.incident_MeV.max()) / 1e3]}
                  for f, r, v in zip(files, train_rows, val_rows)],
        "hit_counts": {"mean": float(counts.mean()), "p50": float(np.percentile(counts, 50)),
                       "p99": float(np.percentile(counts, 99)), "p99.9": float(np.percentile(counts, 99.9)),
                       "max": int(counts.max())},
        "max_hits": tokenizer.max_hits,
        **({"adapter_max_hits": tokenizer.adapter_max_hits[tuple(adapter_keys[0])]} if adapter_keys else {}),
        "max_hits_rule": "ceil(1.10 * p99.9 / 8) * 8" if max_hits is None else "set by user",
        # truncation and energy-range counts: of the files' training rows, else of the simulated reference
        "train_tokenization": train_stats if train_stats is not None else ref_stats,
    }
    if stream is not None:
        summary["stream"] = dict(stream.to_dict(), seed=seed, n_validation_per_source=max_val,
                                 n_reference_per_source=n_reference, reference_tokenization=ref_stats)
        summary["simulator_version"] = stream.simulator_version
    return TrainingData(tokenizer, train, val, reference, summary)


def _all_rows(files: list[FileData]) -> list[slice]:
    return [slice(0, len(f.incident_MeV)) for f in files]
