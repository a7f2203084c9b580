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


class GridSum(nn.Module):
    """One vector per voxel of a geometry, layer[l] + row[a] + col[b] for a voxel in layer l at transverse
    indices (a, b) of its layer's grid (Cartesian (y, x), cylindrical (alpha, r); detector/geometry.py,
    layer_grid = (n_a, n_b) per layer, flattened). Cells that share a layer, row or column share what
    they learn, and the parameters grow with L + n_a + n_b instead of the number of voxels."""

    def __init__(self, layer_grid: tuple[int, ...], dim: int, std: float = 0.02):
        super().__init__()
        n_a, n_b = layer_grid[::2], layer_grid[1::2]
        self.layer = nn.Parameter(torch.randn(len(n_a), dim) * std)
        self.row = nn.Parameter(torch.randn(max(n_a), dim) * std)
        self.col = nn.Parameter(torch.randn(max(n_b), dim) * std)
        idx = [(l, c // b, c % b) for l, (a, b) in enumerate(zip(n_a, n_b)) for c in range(a * b)]
        for name, column in zip(("voxel_layer", "voxel_row", "voxel_col"), zip(*idx)):
            self.register_buffer(name, torch.tensor(column, dtype=torch.long), persistent=False)  # (n_voxels,)

    def forward(self) -> torch.Tensor:  # (n_voxels, d)
        return self.layer[self.voxel_layer] + self.row[self.voxel_row] + self.col[self.voxel_col]


class GeometricVoxelEmbedding(BlockEmbedding):
    """voxel_embedding="geometric": the special tokens keep a row each (`tables`, one block), a voxel's
    embedding is its GridSum, so a rarely hit cell far from the axis starts from its row's and column's
    embeddings, and the table stops growing with the grid (27 000 voxels on the published grid)."""

    def __init__(self, n_specials: int, layer_grid: tuple[int, ...], dim: int):
        super().__init__((n_specials,), dim)
        self.grid = GridSum(layer_grid, dim)

    @property
    def weight(self) -> torch.Tensor:  # (V, d); rebuilt at each call while training, held while decoding
        if self.held is not None:
            return self.held
        return torch.cat([self.tables[0], self.grid()], dim=0)

    def append_block(self, size: int) -> None:
        raise ValueError("a geometric voxel embedding is built for one geometry: no voxel block can be appended")


class GeometricVoxelHead(BlockHead):
    """voxel_head="geometric": the flat head (a row per token) plus a GridSum added to the voxels' rows,
    logit(l, a, b) = h . (w_v + layer[l] + row[a] + col[b]): what the head learns of one cell also moves
    its layer, row and column, which is most of what a rarely hit cell needs."""

    def __init__(self, block_sizes: tuple[int, ...], layer_grid: tuple[int, ...], dim: int):
        super().__init__(block_sizes, dim)
        self.grid = GridSum(layer_grid, dim)

    @property
    def weight(self) -> torch.Tensor:  # (V, d)
        if self.held is not None:
            return self.held
        flat = BlockTables.weight.fget(self)  # the concatenated tables
        n_specials = self.tables[0].shape[0]
        return torch.cat([flat[:n_specials], flat[n_specials:] + self.grid()], dim=0)

    def append_block(self, size: int) -> None:
        raise ValueError("a geometric voxel head is built for one geometry: no voxel block can be appended")
