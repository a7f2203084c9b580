"""Streamed training data: fresh showers from the embedded simulator, made in background processes.

A stream is a set of sources -- (material, particle) pairs -- with an incident-energy range and a
readout geometry. The showers of training step s on DDP rank r are drawn from generators seeded by
(seed, s, r, source): the data is a function of the step alone, so a resumed run sees exactly the
showers an uninterrupted run would have seen (whatever the number of workers), ranks draw from
disjoint streams, and no shower is seen twice or written to disk.

Worker w of W (torch DataLoader workers, forked processes) makes the steps s = start + w, start + w + W,
...; the DataLoader hands its workers' batches to the trainer round-robin, that is in step order.
Each batch arrives tokenized, with the seconds its worker spent on it, from which the trainer logs
the stream's production rate beside its own consumption.

The validation set and the reference sample (max_hits, shower totals) are simulated once at start,
in memory, from seeds of their own (`sample`), never drawn by a training step.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from calofm.detector.geometry import Geometry, get_geometry
from calofm.detector.materials import get_material
from calofm.errors import CalofmError
from calofm.simulation import SIMULATOR_VERSION, canonical_particle, parse_energy, simulate
from calofm.tokenizer import Hits, ShowerTokenizer
from calofm.training.data import Corpus, FileData, _corpus

PURPOSES = {"train": 0, "validation": 1, "reference": 2}  # first seed word: the three never share a stream


def stream_seed(seed: int, purpose: str, *key: int) -> int:
    """A 32-bit simulator seed for (seed, purpose, key...), e.g. key = (step, rank, source)."""
    words = [int(seed), PURPOSES[purpose], *(int(k) for k in key)]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint32)[0])


def default_workers() -> int:
    """Stream workers by default: every core the process may use but the one the trainer drives, at most 16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(16, cores - 1))


@dataclass(frozen=True)
class StreamSpec:
    materials: tuple[str, ...]
    particle: str = "gamma"
    energy_GeV: tuple[float, float] = (10.0, 100.0)
    geometry: str = "cpu"
    spectrum: str = "uniform"
    threshold_mip: float = 0.5

    @classmethod
    def parse(cls, materials, particle: str = "gamma", energy="10:100", geometry: str = "cpu",
              spectrum: str = "uniform", threshold_mip: float = 0.5) -> StreamSpec:
        """'W,Ta,Cu' (or a list), 'gamma', '10:100' GeV, 'cpu' -> a checked spec (CalofmError naming the problem)."""
        names = [m.strip() for m in (materials.split(",") if isinstance(materials, str) else materials) if m.strip()]
        if not names:
            raise CalofmError("--simulate needs at least one material, e.g. W,Ta,Cu")
        names = [get_material(m).name for m in names]
        if len(set(names)) < len(names):
            raise CalofmError(f"--simulate names a material twice: {','.join(names)}")
        if spectrum not in ("uniform", "log"):
            raise CalofmError(f"unknown spectrum {spectrum!r}; use 'uniform' or 'log'")
        spec = cls(tuple(names), canonical_particle(particle), parse_energy(energy), str(geometry), spectrum,
                   float(threshold_mip))
        spec.geometry_of(names[0])  # fail early on an unknown geometry
        return spec

    @classmethod
    def from_dict(cls, d: dict) -> StreamSpec:
        return cls.parse(d["materials"], d["particle"], tuple(d["energy_GeV"]), d["geometry"], d.get("spectrum", "uniform"),
                         d.get("threshold_mip", 0.5))

    def to_dict(self) -> dict:
        return dict(asdict(self), materials=list(self.materials), energy_GeV=list(self.energy_GeV),
                    simulator_version=SIMULATOR_VERSION)

    @property
    def simulator_version(self) -> int:
        return SIMULATOR_VERSION

    def sources(self) -> list[tuple[str, str]]:
        return [(m, self.particle) for m in self.materials]

    def geometry_of(self, material: str) -> Geometry:
        return get_geometry(self.geometry, absorber=material)

    def readout(self) -> Geometry:
        """The stream's geometry (with the first material as absorber; the readout is the same for all)."""
        return self.geometry_of(self.materials[0])

    def simulate(self, source: int, n: int, seed: int, workers: int = 1) -> FileData:
        """n showers of one source, in memory, as hits."""
        material, particle = self.sources()[source]
        energies, showers = simulate(n, material, particle, self.energy_GeV, self.spectrum, self.geometry, seed,
                                     self.threshold_mip, workers=workers)
        return FileData(f"simulated:{material}/{particle}", material, particle, energies, Hits.from_dense(showers))

    def sample(self, purpose: str, n: int, seed: int, workers: int = 1) -> list[FileData]:
        """The fixed validation or reference sample: n showers per source."""
        return [self.simulate(i, n, stream_seed(seed, purpose, i), workers) for i in range(len(self.sources())) if n > 0]

    def step_counts(self, n: int, step: int) -> list[int]:
        """Showers per source in a batch of n: even shares, the remainder rotating with the step."""
        k = len(self.materials)
        return [n // k + ((i - step) % k < n % k) for i in range(k)]


@dataclass
class StreamBatch:
    step: int
    corpus: Corpus  # this rank's streamed showers of the step, tokenized
    seconds: float  # worker time spent simulating and tokenizing them


class ShowerStream(torch.utils.data.IterableDataset):
    """Tokenized batches of `n` fresh showers per step for one rank, from step `start` on, forever."""

    def __init__(self, spec: StreamSpec, tokenizer: ShowerTokenizer, n: int, seed: int, rank: int = 0,
                 start: int = 0):
        super().__init__()
        self.spec, self.tokenizer, self.n, self.seed, self.rank, self.start = spec, tokenizer, n, seed, rank, start

    def batch(self, step: int) -> StreamBatch:
        t0 = time.perf_counter()
        parts = [self.spec.simulate(i, k, stream_seed(self.seed, "train", step, self.rank, i))
                 for i, k in enumerate(self.spec.step_counts(self.n, step)) if k > 0]
        corpus, _ = _corpus(self.tokenizer, parts, [slice(0, len(p.incident_MeV)) for p in parts])
        return StreamBatch(step, corpus, time.perf_counter() - t0)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for step in itertools.count(self.start + worker, n_workers):
            yield self.batch(step)


def _as_is(x):
    return x


def _one_thread(worker_id: int) -> None:
    """A worker is one simulation process: no native thread pools beside it (torch sets its own to 1)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


class StreamReader:
    """The trainer's end of a stream: `next(step)` returns that step's batch; production statistics."""

    def __init__(self, stream: ShowerStream, workers: int, prefetch: int = 4):
        self.workers = max(0, int(workers))
        if self.workers:
            loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.workers,
                                                 collate_fn=_as_is, prefetch_factor=prefetch,
                                                 worker_init_fn=_one_thread)
            self._it = iter(loader)
        else:  # simulate inline, in the training process
            self._it = iter(stream)
        self.reset_stats()

    def reset_stats(self) -> None:
        self.showers = self.tokens = 0
        self.busy_s = self.wait_s = 0.0

    def next(self, step: int) -> Corpus:
        t0 = time.perf_counter()
        b = next(self._it)
        self.wait_s += time.perf_counter() - t0
        if b.step != step:
            raise RuntimeError(f"stream out of order: expected step {step}, got {b.step}")
        self.showers += len(b.corpus)
        self.tokens += b.corpus.n_targets(np.arange(len(b.corpus)))
        self.busy_s += b.seconds
        return b.corpus

    def stats(self) -> dict:
        """Since the last reset: production capacity (all workers, from their busy time) and the time the
        trainer waited for data."""
        parallel = max(1, self.workers)
        rate = parallel / self.busy_s if self.busy_s > 0 else 0.0
        return {"sim_showers_per_s": round(self.showers * rate, 1), "sim_tokens_per_s": round(self.tokens * rate, 1),
                "data_wait_s": round(self.wait_s, 3), "stream_workers": self.workers}

    def close(self) -> None:
        it, self._it = self._it, None
        if hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        del it
