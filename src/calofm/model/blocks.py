"""Embeddings and output heads stored one table per vocabulary block.

An appended vocabulary block (a new particle, a new geometry) appends a table here; the existing
tables are separate Parameters and stay bit-identical, and can be frozen while the new one trains.
The full (V, d) matrix is the concatenation of the tables, rebuilt at each call (cheap next to the
rest of the model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BlockTables(nn.Module):
    def __init__(self, block_sizes: tuple[int, ...], dim: int):
        super().__init__()
        self.dim = dim
        self.tables = nn.ParameterList([nn.Parameter(torch.randn(n, dim) * 0.02) for n in block_sizes])

    @property
    def weight(self) -> torch.Tensor:  # (V, d)
        return self.tables[0] if len(self.tables) == 1 else torch.cat(list(self.tables), dim=0)

    def append_block(self, size: int) -> None:
        ref = self.tables[0]
        self.tables.append(nn.Parameter(torch.randn(size, self.dim, device=ref.device, dtype=ref.dtype) * 0.02))


class BlockEmbedding(BlockTables):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (...,) -> (..., d)
        return F.embedding(ids, self.weight)


class BlockHead(BlockTables):
    """Logits over a block-structured vocabulary (no bias)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., V)
        return F.linear(x, self.weight)
