"""Showers <-> token sequences.

A shower is a list of hits; each hit is a pair (voxel token, energy token) from two separate
vocabularies, so the model sees two parallel streams. A training sequence is

    position   0       1      2 .. n+1          n+2
    voxel      COND    BOS    v_1 .. v_n        EOS
    energy     COND    BOS    e_1 .. e_n        EOS

Position 0 holds the conditioning: log incident energy through a continuous embedding, plus the
material and particle ids (from their own append-only vocabularies); its token ids are PAD
placeholders. Hits come in `order`:

- "energy" (as published): descending cell energy. The first tokens carry most of
  the energy, so a length cap drops only the faintest cells, generation lays down the core before the
  halo, and the end-of-shower decision is taken among low-energy cells where it matters least.
- "spatial": ascending voxel index (layer, then y, then x); the model then has to learn when to
  stop from geometry alone and a cap would cut off the deepest layers, so truncation always keeps
  the highest-energy hits and only then reorders them.
- "layer" (the default of new models, and both shipped models'): layer by layer from the front, descending
  cell energy within a layer: each layer's core comes first, as in "energy", and the model always
  knows which layer it is filling. At equal training tokens it gives the lowest NLL per shower and the lowest classifier
  AUC of the orders (docs/model.md, "Hit order").

`max_hits` is derived from the data (`fit_max_hits`: a high percentile of the hit counts plus a
margin); showers longer than it are truncated and counted, never silently. An adapter (calofm.extension)
may bring classes that shower longer: it records a cap of its own, fitted by the same rule on its
data, kept here per vocabulary entry it adds (`adapter_max_hits`, not saved with the base model); a
class's cap (`class_max_hits`) is the largest of the adapters serving its material or its particle,
else the base's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from calofm.detector.geometry import Geometry
from calofm.detector.materials import get_material
from calofm.detector.particles import PARTICLES
from calofm.errors import CalofmError
from calofm.tokenizer.energy_bins import LogEnergyBins
from calofm.tokenizer.totals import ShowerTotals
from calofm.tokenizer.vocab import Vocabulary

SPECIALS = ("PAD", "BOS", "EOS")  # ids 0, 1, 2 in both hit streams
PAD, BOS, EOS = 0, 1, 2
ORDERS = ("energy", "spatial", "layer")
DEFAULT_ORDER = "layer"  # of new training runs: the fidelity ablation's choice (docs/model.md, "Hit order")


def check_order(order: str) -> None:
    """CalofmError naming a hit order that is not one of ORDERS."""
    if order not in ORDERS:
        raise CalofmError(f"unknown hit order {order!r}; choose one of {', '.join(ORDERS)}")


def canonical_particle(name: str) -> str:
    """The simulator's spelling (photon -> gamma, ...); names it does not know pass through, so data
    from other sources (a pion sample) still gets a particle token."""
    key = str(name).strip()
    return PARTICLES.get(key.lower(), key)


def incident_feature(incident_MeV) -> np.ndarray:
    """The scalar the incident-energy embedding sees: log10(E / 10 GeV); 10 GeV -> 0, 100 GeV -> 1."""
    return (np.log10(np.asarray(incident_MeV, dtype=np.float64)) - 4.0).astype(np.float32)


@dataclass
class Hits:
    """Showers as packed hit lists: shower i owns hits offsets[i]:offsets[i+1], energy-descending
    (ties broken by voxel index), voxel = index in the geometry, energy in MeV."""

    offsets: np.ndarray  # (n + 1,) int64
    voxel: np.ndarray  # (H,) int32
    energy: np.ndarray  # (H,) float32

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def from_dense(cls, showers: np.ndarray) -> Hits:
        showers = np.asarray(showers)
        rows, cols = np.nonzero(showers > 0)
        energy = showers[rows, cols].astype(np.float32)
        order = np.lexsort((cols, -energy, rows))  # by shower, then energy descending, then voxel
        counts = np.bincount(rows, minlength=showers.shape[0])
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(offsets, cols[order].astype(np.int32), energy[order])

    @classmethod
    def concat(cls, parts: list[Hits]) -> Hits:
        counts = np.concatenate([p.counts for p in parts])
        return cls(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                   np.concatenate([p.voxel for p in parts]), np.concatenate([p.energy for p in parts]))

    def to_dense(self, n_voxels: int) -> np.ndarray:
        out = np.zeros((len(self), n_voxels), dtype=np.float32)
        out[np.repeat(np.arange(len(self)), self.counts), self.voxel] = self.energy
        return out


@dataclass
class TokenizedShowers:
    """Packed hit tokens (no BOS/EOS/conditioning: the batch builder adds them)."""

    offsets: np.ndarray  # (n + 1,) int64
    voxel_tokens: np.ndarray  # (H,) int32
    energy_tokens: np.ndarray  # (H,) int32
    stats: dict = field(default_factory=dict)

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1


def _within_segment_index(offsets: np.ndarray) -> np.ndarray:
    counts = np.diff(offsets)
    return np.arange(offsets[-1]) - np.repeat(offsets[:-1], counts)


class ShowerTokenizer:
    def __init__(self, geometry: Geometry, voxels: Vocabulary, energies: Vocabulary, materials: Vocabulary,
                 particles: Vocabulary, bins: LogEnergyBins, order: str = DEFAULT_ORDER, max_hits: int | None = None):
        check_order(order)
        self.geometry, self.bins, self.order, self.max_hits = geometry, bins, order, max_hits
        self.voxels, self.energies, self.materials, self.particles = voxels, energies, materials, particles
        # per-class hit-count / visible-energy laws for two-stage generation (see totals.py); fitted
        # by training on its training rows, extended by adapters
        self.totals = ShowerTotals()
        # ("material" | "particle", name) -> max_hits of the adapter that added that entry (see class_max_hits)
        self.adapter_max_hits: dict[tuple[str, str], int] = {}
        self.voxel_block = voxels.block(f"geometry:{geometry.name}")
        self.energy_block = energies.block("energy:log")
        if self.voxel_block.size != geometry.n_voxels or self.energy_block.size != bins.n_bins:
            raise CalofmError("tokenizer vocabularies do not match its geometry or energy binning")

    @classmethod
    def create(cls, geometry: Geometry, materials: list[str], particles: list[str],
               bins: LogEnergyBins | None = None, order: str = DEFAULT_ORDER) -> ShowerTokenizer:
        bins = bins or LogEnergyBins()
        voxels, energies = Vocabulary("voxel"), Vocabulary("energy")
        for vocab in (voxels, energies):
            vocab.append("special", names=SPECIALS)
        voxels.append(f"geometry:{geometry.name}", size=geometry.n_voxels)
        energies.append("energy:log", size=bins.n_bins)
        mats, parts = Vocabulary("material"), Vocabulary("particle")
        mats.append("materials", names=[get_material(m).name for m in materials])
        parts.append("particles", names=[canonical_particle(p) for p in particles])
        return cls(geometry, voxels, energies, mats, parts, bins, order)

    # --- sizes -----------------------------------------------------------------------------
    @property
    def max_seq_len(self) -> int:
        """Positions a model needs: conditioning + BOS + max_hits + EOS."""
        if self.max_hits is None:
            raise CalofmError("the tokenizer has no max_hits yet; call fit_max_hits on the training data")
        return self.max_hits + 3

    @property
    def longest_seq_len(self) -> int:
        """Positions a model needs for the longest class cap (the base's or an adapter's)."""
        return max([self.max_seq_len - 3, *self.adapter_max_hits.values()]) + 3

    def class_max_hits(self, material: str, particle: str) -> int:
        """The hit cap of a (material, particle) class: the largest of the caps of the adapters that added
        its material or its particle; the base's max_hits for a class no such adapter serves."""
        if self.max_hits is None:
            raise CalofmError("the tokenizer has no max_hits yet; call fit_max_hits on the training data")
        keys = (("material", self.materials.names()[self.material_id(material)]),
                ("particle", self.particles.names()[self.particle_id(particle)]))
        caps = [self.adapter_max_hits[k] for k in keys if k in self.adapter_max_hits]
        return max(caps) if caps else self.max_hits

    def material_id(self, name: str) -> int:
        try:
            name = get_material(name).name  # any spelling the materials table knows
        except CalofmError:
            pass  # not a material at all: the vocabulary lookup below names the known ones
        return self.materials.id(str(name))

    def particle_id(self, name: str) -> int:
        return self.particles.id(canonical_particle(name))

    # --- length ------------------------------------------------------------------------------
    def fit_max_hits(self, counts: np.ndarray, percentile: float = 99.9, margin: float = 1.10,
                     multiple: int = 8) -> int:
        """max_hits = percentile of the hit counts times a margin, rounded up to a multiple of 8."""
        self.max_hits = self.max_hits_for(counts, percentile, margin, multiple)
        return self.max_hits

    def max_hits_for(self, counts: np.ndarray, percentile: float = 99.9, margin: float = 1.10,
                     multiple: int = 8) -> int:
        """The cap fit_max_hits derives from these hit counts, without setting it."""
        counts = np.asarray(counts)
        if counts.size == 0:
            raise CalofmError("cannot derive a sequence length from zero showers")
        p = float(np.percentile(counts, percentile))
        return int(min(self.geometry.n_voxels, max(multiple, math.ceil(p * margin / multiple) * multiple)))

    def fit_adapter_max_hits(self, keys, counts: np.ndarray) -> int:
        """An adapter's own cap, fitted on its data's hit counts by fit_max_hits's rule, recorded for its
        vocabulary entries `keys` (("material" | "particle", name), ...); returns it."""
        cap = self.max_hits_for(counts)
        for key in keys:
            self.adapter_max_hits[tuple(key)] = cap
        return cap

    # --- encoding ----------------------------------------------------------------------------
    def encode(self, hits: Hits, max_hits: np.ndarray | None = None) -> TokenizedShowers:
        """Hits -> tokens: cap at max_hits (keeping the highest-energy hits), order, map to ids.
        max_hits: per-shower caps (n,) (each shower's class_max_hits); None: the base's max_hits."""
        if self.max_hits is None:
            raise CalofmError("the tokenizer has no max_hits yet; call fit_max_hits on the training data")
        if len(hits.voxel) and (hits.voxel.min() < 0 or hits.voxel.max() >= self.geometry.n_voxels):
            raise CalofmError(f"voxel index outside geometry {self.geometry.name!r}")
        counts = hits.counts
        cap = self.max_hits if max_hits is None else np.asarray(max_hits, dtype=np.int64)
        cap_per_hit = cap if max_hits is None else np.repeat(cap, counts)
        keep = _within_segment_index(hits.offsets) < cap_per_hit  # input is energy-descending
        new_counts = np.minimum(counts, cap)
        offsets = np.concatenate([[0], np.cumsum(new_counts)]).astype(np.int64)
        voxel, energy = hits.voxel[keep], hits.energy[keep]
        if self.order != "energy":
            segment = np.repeat(np.arange(len(new_counts)), new_counts)
            # lexsort is stable: "layer" keeps the energy order within a layer
            key = voxel if self.order == "spatial" else self.geometry.voxel_layer[voxel]
            perm = np.lexsort((key, segment))
            voxel, energy = voxel[perm], energy[perm]
        bins, under, over = self.bins.encode(energy)
        total_energy = float(hits.energy.sum(dtype=np.float64))
        stats = {
            "n_showers": len(counts), "n_hits": int(counts.sum()),
            "n_truncated_showers": int(np.count_nonzero(counts > cap)),
            "n_dropped_hits": int(counts.sum() - new_counts.sum()),
            "dropped_energy_fraction": (float(hits.energy[~keep].sum(dtype=np.float64)) / total_energy
                                        if total_energy > 0 else 0.0),
            "energy_underflow_hits": under, "energy_overflow_hits": over,
        }
        return TokenizedShowers(offsets, (voxel + self.voxel_block.offset).astype(np.int32),
                                (bins + self.energy_block.offset).astype(np.int32), stats)

    # --- decoding ----------------------------------------------------------------------------
    def decode(self, voxel_tokens: np.ndarray, energy_tokens: np.ndarray, rows: np.ndarray, n_showers: int,
               mode: str = "center", rng: np.random.Generator | None = None, u: np.ndarray | None = None) -> np.ndarray:
        """Flat hit tokens with their shower index -> dense showers (n_showers, n_voxels) in MeV.
        mode "uniform": each energy placed log-uniformly in its bin, by u (one per token) or rng.

        Tokens that are not a voxel of this geometry or not an energy bin (specials, padding) are
        skipped; a voxel given twice keeps its last energy (generation never emits duplicates)."""
        v = np.asarray(voxel_tokens, dtype=np.int64) - self.voxel_block.offset
        e = np.asarray(energy_tokens, dtype=np.int64) - self.energy_block.offset
        ok = (v >= 0) & (v < self.voxel_block.size) & (e >= 0) & (e < self.energy_block.size)
        out = np.zeros((n_showers, self.geometry.n_voxels), dtype=np.float32)
        out[np.asarray(rows)[ok], v[ok]] = self.bins.decode(e[ok], mode=mode, rng=rng,
                                                            u=None if u is None else np.asarray(u).ravel()[ok])
        return out

    def decode_tokenized(self, tokens: TokenizedShowers, mode: str = "center",
                         rng: np.random.Generator | None = None) -> np.ndarray:
        rows = np.repeat(np.arange(len(tokens)), tokens.counts)
        return self.decode(tokens.voxel_tokens, tokens.energy_tokens, rows, len(tokens), mode, rng)

    def decode_padded(self, voxel_tokens: np.ndarray, energy_tokens: np.ndarray, mode: str = "center",
                      rng: np.random.Generator | None = None, u: np.ndarray | None = None) -> np.ndarray:
        """(n, T) token arrays, padded with PAD (or anything outside the blocks) -> dense showers;
        u: (n, T) uniforms for mode "uniform" (hit t of shower i at u[i, t])."""
        voxel_tokens, energy_tokens = np.asarray(voxel_tokens), np.asarray(energy_tokens)
        rows = np.repeat(np.arange(voxel_tokens.shape[0]), voxel_tokens.shape[1])
        return self.decode(voxel_tokens.ravel(), energy_tokens.ravel(), rows, voxel_tokens.shape[0], mode, rng, u)

    # --- serialization -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "geometry": self.geometry.to_dict(), "order": self.order, "max_hits": self.max_hits,
            "energy_bins": self.bins.to_dict(), "specials": list(SPECIALS),
            "incident_feature": "log10(E_MeV) - 4",
            "vocabularies": {v.name: v.to_dict() for v in (self.voxels, self.energies, self.materials, self.particles)},
            "totals": self.totals.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> ShowerTokenizer:
        try:
            vocabs = {k: Vocabulary.from_dict(v) for k, v in d["vocabularies"].items()}
            tok = cls(Geometry.from_dict(d["geometry"]), vocabs["voxel"], vocabs["energy"], vocabs["material"],
                      vocabs["particle"], LogEnergyBins.from_dict(d["energy_bins"]), str(d["order"]),
                      None if d.get("max_hits") is None else int(d["max_hits"]))
            tok.totals = ShowerTotals.from_dict(d.get("totals"))  # absent in models written before totals existed
            return tok
        except (KeyError, TypeError, ValueError) as exc:
            raise CalofmError(f"malformed tokenizer description: {exc!r}") from None
