"""One run of `calofm generate` or `calofm simulate` split over processes: shard K of N.

Shard K of a run of n showers makes a contiguous range of them and writes it to its own file
(OUT.shard-K-of-N.h5, calofm.data.shards records the range and the run), which `calofm merge` joins in
shower order. Because a shower depends only on the seed and its index (calofm.generation.streams;
the simulator's chunks, simulation.runner), the merged file is the one-process run's, whatever N.

Two ways to be shard K of N:
- `--shard K/N` (K = 0 ... N-1): independent processes, e.g. a Slurm or HTCondor array job; a failed
  shard is rerun alone;
- under torchrun (RANK / WORLD_SIZE / LOCAL_RANK, any number of nodes): K = RANK, N = WORLD_SIZE, one
  GPU per process (LOCAL_RANK) on CUDA; the processes join a process group (gloo on CPU, nccl on CUDA)
  only for rank 0's summary of every rank's rate.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from calofm.errors import CalofmError


@dataclass(frozen=True)
class Shard:
    index: int = 0  # K
    count: int = 1  # N
    local_rank: int = 0
    torchrun: bool = False  # a process of a torchrun job: its group gathers the summary

    @property
    def alone(self) -> bool:
        return self.count == 1

    @property
    def tag(self) -> str:
        """The progress lines' prefix: 'shard 2/8 ' ('' for a run of one)."""
        return "" if self.alone else f"shard {self.index}/{self.count} "

    def range(self, n: int, unit: int = 1) -> tuple[int, int]:
        """[start, stop) of this shard among n showers made in blocks of `unit` (the simulator's chunks):
        the blocks are shared out as evenly as whole blocks allow, shard K getting blocks
        [K * B // N, (K + 1) * B // N) of B."""
        blocks = -(-n // unit)
        if self.count > blocks:
            what = "showers" if unit == 1 else f"blocks of {unit} showers"
            raise CalofmError(f"{self.count} shards for {blocks} {what}: at most one shard per "
                              f"{'shower' if unit == 1 else 'block'}")
        return (min(n, unit * (self.index * blocks // self.count)),
                min(n, unit * ((self.index + 1) * blocks // self.count)))

    def path(self, output: str) -> str:
        """The shard's own file next to `output`: gen.h5 -> gen.shard-2-of-8.h5 (output itself when alone)."""
        if self.alone:
            return output
        root, ext = os.path.splitext(output)
        return f"{root}.shard-{self.index}-of-{self.count}{ext or '.h5'}"


def parse_shard(text: str | None) -> Shard:
    """'K/N' -> Shard(K, N) (0 <= K < N); None -> torchrun's rank and world size, or a run of one."""
    env = os.environ.get("WORLD_SIZE")
    if text is not None:
        if env is not None and int(env) > 1:
            raise CalofmError("--shard and torchrun both split the run: use one of them")
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m or not 0 <= int(m[1]) < int(m[2]):
            raise CalofmError(f"--shard must be K/N with 0 <= K < N (e.g. 3/8 for the 4th of 8), got {text!r}")
        return Shard(int(m[1]), int(m[2]))
    if env is None or int(env) <= 1:
        return Shard()
    return Shard(int(os.environ["RANK"]), int(env), int(os.environ.get("LOCAL_RANK", "0")), torchrun=True)


def device_for(shard: Shard, device: str) -> str:
    """The device name a shard runs on: under torchrun, a CUDA device is the process's LOCAL_RANK."""
    if shard.torchrun and device in ("cuda", "auto"):
        import torch

        if device == "cuda" or torch.cuda.is_available():
            return f"cuda:{shard.local_rank}"
    return device


def join_group(shard: Shard, device: str) -> None:
    """Under torchrun: join the job's process group (nccl on CUDA, gloo on CPU)."""
    if not shard.torchrun:
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")


def summarize(shard: Shard, mine: dict, what: str) -> None:
    """Print a shard's summary line (nothing for a run of one: its command says it); under torchrun
    rank 0 also gathers every rank's {"n", "seconds"} and prints them with the total (all showers over
    the slowest rank's time)."""
    if shard.alone:
        return
    rate = mine["n"] / max(mine["seconds"], 1e-9)
    print(f"{shard.tag}{what}: {mine['n']} showers in {mine['seconds']:.1f} s ({rate:.2f} showers/s)", flush=True)
    if not shard.torchrun:
        return
    import torch.distributed as dist

    everyone = [None] * shard.count
    dist.all_gather_object(everyone, mine)
    if shard.index == 0:
        for k, r in enumerate(everyone):
            print(f"  rank {k}: {r['n']} showers, {r['n'] / max(r['seconds'], 1e-9):.2f} showers/s")
        total, slowest = sum(r["n"] for r in everyone), max(r["seconds"] for r in everyone)
        print(f"  all {shard.count} ranks: {total} showers in {slowest:.1f} s ({total / max(slowest, 1e-9):.2f} "
              "showers/s)", flush=True)
    dist.barrier()
    dist.destroy_process_group()
