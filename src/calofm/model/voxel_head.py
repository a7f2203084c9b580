"""The factorized voxel head: p(v | h) = p(layer or EOS | h) * p(cell | layer, h).

The flat head is one softmax over every voxel of the grid (4 500 for the cpu geometry, 27 000 for the
published one): its cost per token grows with the grid. Here a layer head gives logits over the
special tokens and the geometry's layers ([PAD, BOS, EOS, layer 0, ..., layer L-1]), and a cell head,
reading h combined with an embedding of the chosen layer (HeadInput, as the energy head reads the
chosen voxel), gives logits over max(cells per layer) cells, the cells beyond a layer's count masked.
Voxel token id of (layer, cell) = offset of the geometry block + first voxel of the layer + cell
(voxel order (layer, y, x), detector/geometry.py).

Training: NLL(layer or EOS) + NLL(cell | true layer) for hits (EOS: the layer term only), the same joint
quantity as the flat head's NLL; the cell head sees the true layer (teacher forcing). `log_probs`
gives the joint log-probabilities over the flat voxel vocabulary (tests, scoring); decoding draws the
layer, then the cell (generation/decode.py).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calofm.model.moe import MLP


class HeadInput(nn.Module):
    """u = h + W e; u += MLP(LN(u)); LN: a head's input, the hidden state h combined with the embedding e
    of what was chosen at the same step (the voxel for the energy head, the layer for the cell head). The
    nonlinearity lets the head's distribution depend jointly on the shower so far and on that choice (a
    linear sum would only add a per-choice bias)."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(d, d, bias=False)
        self.ln = nn.LayerNorm(d)
        self.mlp = MLP(d, hidden)
        self.ln_out = nn.LayerNorm(d)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        u = h + self.proj(emb)
        return self.ln_out(u + self.mlp(self.ln(u)))


class FactorizedVoxelHead(nn.Module):
    def __init__(self, d: int, hidden: int, n_specials: int, layer_cells: tuple[int, ...]):
        super().__init__()
        L, C = len(layer_cells), max(layer_cells)
        self.n_specials, self.n_layers, self.n_cells = n_specials, L, C
        self.layer_head = nn.Linear(d, n_specials + L, bias=False)
        self.layer_emb = nn.Embedding(L, d)
        self.cell_in = HeadInput(d, hidden)
        self.cell_head = nn.Linear(d, C, bias=False)
        # index tables built in numpy: a model made on the meta device (shapes only) gets them too
        cells = np.asarray(layer_cells, dtype=np.int64)
        first = np.concatenate([[0], np.cumsum(cells)])  # (L + 1,)
        layer_of = np.repeat(np.arange(L), cells)  # (n_voxels,)
        cell_of = np.arange(first[-1]) - first[layer_of]
        specials = np.arange(n_specials)
        tables = {
            "token_class": np.concatenate([specials, n_specials + layer_of]),  # token -> layer class (specials: own)
            "token_cell": np.concatenate([np.zeros(n_specials, dtype=np.int64), cell_of]),  # token -> cell
            "layer_token0": n_specials + first[:-1],  # (L,) the token of each layer's cell 0
            "layer_cells": cells,  # (L,)
            "cell_off": np.arange(C)[None, :] >= cells[:, None],  # (L, C) cells beyond the layer's count
            "flat_index": layer_of * C + cell_of,  # (n_voxels,) into a (L, C) grid
        }
        for name, value in tables.items():
            self.register_buffer(name, torch.as_tensor(value), persistent=False)

    def layer_logits(self, h: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., specials + L)
        return self.layer_head(h)

    def cell_logits(self, h: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
        """h (..., d), layer (...,) in 0..L-1 -> (..., C), the cells beyond the layer's count -inf."""
        logits = self.cell_head(self.cell_in(h, self.layer_emb(layer)))
        return logits.masked_fill(self.cell_off[layer], float("-inf"))

    def token(self, layer: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        return self.layer_token0[layer] + cell

    def nll(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """h (N, d), target voxel tokens or EOS (N,) -> summed NLL of the targets (fp32 scalar)."""
        cls = self.token_class[target]
        nll = F.cross_entropy(self.layer_logits(h).float(), cls, reduction="sum")
        hit = (cls >= self.n_specials).nonzero().squeeze(1)
        cell_logits = self.cell_logits(h[hit], cls[hit] - self.n_specials)
        return nll + F.cross_entropy(cell_logits.float(), self.token_cell[target[hit]], reduction="sum")

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., d) -> joint log p(v | h) over the flat voxel vocabulary (..., specials + n_voxels): the
        cell head runs once per layer, so this is for scoring, not for the decoding loop."""
        lp_class = F.log_softmax(self.layer_logits(h).float(), dim=-1)  # (..., S + L)
        u = self.cell_in(h[..., None, :].expand(*h.shape[:-1], self.n_layers, h.shape[-1]), self.layer_emb.weight)
        cell = self.cell_head(u).float().masked_fill(self.cell_off, float("-inf"))  # (..., L, C)
        lp = lp_class[..., self.n_specials:, None] + F.log_softmax(cell, dim=-1)
        return torch.cat([lp_class[..., :self.n_specials], lp.flatten(-2)[..., self.flat_index]], dim=-1)
