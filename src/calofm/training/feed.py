"""The showers of each training step: file rows, streamed simulation, or both.

Every source class counts alike: with F shower files and S streamed (material, particle) sources, a
rank's share of the global batch takes round(F / (F + S)) of its showers from the files (the same
global permutation on every rank, each rank its slice, see schedule.BatchSampler) and the rest from
its own stream. The state to resume is the file sampler's (epoch, cursor) and the step, which seeds
the stream.
"""

from __future__ import annotations

import numpy as np

from calofm.errors import CalofmError
from calofm.tokenizer import ShowerTokenizer
from calofm.training.data import Corpus
from calofm.training.schedule import BatchSampler
from calofm.training.stream import ShowerStream, StreamReader, StreamSpec


def split_batch(per_rank: int, n_files: int, n_sources: int) -> tuple[int, int]:
    """(file showers, streamed showers) of one rank's batch."""
    if n_sources == 0:
        return per_rank, 0
    if n_files == 0:
        return 0, per_rank
    if per_rank < 2:
        raise CalofmError(f"a batch of {per_rank} shower(s) per process cannot mix files and simulation")
    n_file = min(per_rank - 1, max(1, round(per_rank * n_files / (n_files + n_sources))))
    return n_file, per_rank - n_file


class BatchFeed:
    def __init__(self, train_set: Corpus | None, n_files: int, stream: StreamSpec | None,
                 tokenizer: ShowerTokenizer, batch_size: int, seed: int, rank: int, world: int, step: int,
                 workers: int = 0, sampler_state: dict | None = None):
        if batch_size % world:
            raise CalofmError(f"batch size {batch_size} is not divisible by the {world} processes")
        per_rank = batch_size // world
        self.n_file, self.n_stream = split_batch(per_rank, n_files if train_set is not None else 0,
                                                 len(stream.sources()) if stream is not None else 0)
        self.train_set, self.rank = train_set, rank
        self.sampler = (BatchSampler(len(train_set), self.n_file * world, seed, **(sampler_state or {}))
                        if self.n_file else None)
        self.reader = (StreamReader(ShowerStream(stream, tokenizer, self.n_stream, seed, rank, step), workers)
                       if self.n_stream else None)

    def next(self, step: int) -> tuple[Corpus, int, int]:
        """(this rank's showers of the step, predicted tokens of the global file batch, of this rank's
        streamed showers). The global token count is the first plus the second summed over ranks."""
        parts, file_targets, stream_targets = [], 0, 0
        if self.sampler is not None:
            global_idx = self.sampler.next()
            file_targets = self.train_set.n_targets(global_idx)
            parts.append(self.train_set.subset(global_idx[self.rank * self.n_file:(self.rank + 1) * self.n_file]))
        if self.reader is not None:
            streamed = self.reader.next(step)
            stream_targets = streamed.n_targets(np.arange(len(streamed)))
            parts.append(streamed)
        return Corpus.concat(parts), file_targets, stream_targets

    def state(self) -> dict:
        return self.sampler.state() if self.sampler is not None else {}

    def stats(self) -> dict:
        """The stream's production since the last call ({} without a stream)."""
        if self.reader is None:
            return {}
        out = self.reader.stats()
        self.reader.reset_stats()
        return out

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
