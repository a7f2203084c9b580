"""Embeddings and output heads stored one table per vocabulary block.

An appended vocabulary block (a new particle, a new geometry) appends a table here; the existing
tables are separate Parameters and stay bit-identical, and can be frozen while the new one trains.
The full (V, d) matrix is the concatenation of the tables, rebuilt at each call while training (so
gradients reach each table). Decoding holds it once per decode instead (`hold_weight`): rebuilt at
every step, the concatenations of the four vocabularies cost more than the transformer's layers at
batch 100 on the 2-core CPU.
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
        self.held: torch.Tensor | None = None  # the concatenated tables while decoding (see hold_weight)

    @property
    def weight(self) -> torch.Tensor:  # (V, d)
        if self.held is not None:
            return self.held
        return self.tables[0] if len(self.tables) == 1 else torch.cat(list(self.tables), dim=0)

    def hold_weight(self, dtype: torch.dtype | None = None) -> None:
        """Keep the concatenated (V, d) matrix, in `dtype` if given, as `held` for one decode (set up and
        dropped by ShowerTransformer.setup_cache / install_cache): the tables do not change between steps
        (not for training: the held matrix carries no gradient). A head held in bf16 under bf16 autocast
        gives the same logits as the fp32 tables (autocast would round them to bf16 the same way),
        without the cast at each call."""
        self.held = None
        with torch.no_grad():
            self.held = self.weight.to(dtype or self.tables[0].dtype)

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
