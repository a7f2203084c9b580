"""A warm start for voxel_embedding="geometric" from a model trained with a row per voxel.

    python benchmarks/geometric_start.py runs/ild runs/ild-geo-start
    calofm train --init-from runs/ild-geo-start ...

Every weight but the voxel input table is copied. The table is replaced by its least-squares additive
fit over the grid, table[l, a, b] ~ layer[l] + row[a] + col[b] (the two-way means of a full grid), which
keeps what the table learned in common along layers, rows and columns and drops the rest. The script
prints the share of the table's variance the fit explains, so one sees what is lost. The manifest's
training record is kept, so the warm start counts the compute behind it.
"""
import argparse
import sys

import torch

from calofm.checkpoint import load_model, save_model
from calofm.errors import CalofmError
from calofm.model import ModelConfig, ShowerTransformer


def additive_fit(table: torch.Tensor, layer_grid: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """(layer, row, col) whose sums fit table (n_voxels, d) best in the least-squares sense; every
    layer must have the same transverse grid, as the published ILD grid has."""
    n_a, n_b = set(layer_grid[::2]), set(layer_grid[1::2])
    if len(n_a) != 1 or len(n_b) != 1:
        raise CalofmError("the additive fit needs one transverse grid for every layer")
    t = table.reshape(len(layer_grid) // 2, n_a.pop(), n_b.pop(), -1)
    mean = t.mean((0, 1, 2))
    return t.mean((1, 2)) - 2 * mean, t.mean((0, 2)), t.mean((0, 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source", help="model or run directory trained with voxel_embedding='table'")
    ap.add_argument("out", help="directory for the converted model")
    args = ap.parse_args(argv)
    model, tokenizer, manifest = load_model(args.source)
    if model.cfg.voxel_embedding != "table":
        raise CalofmError(f"{args.source}: voxel_embedding is already {model.cfg.voxel_embedding!r}")
    # the vocabulary sizes left empty, so that for_tokenizer fills them in with the geometry's layer grids
    cfg = ModelConfig.from_dict(model.cfg.to_dict() | {"voxel_embedding": "geometric", "voxel_blocks": ()})
    new = ShowerTransformer(cfg.for_tokenizer(tokenizer))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("voxel_emb.")}
    table = model.voxel_emb.tables[1].detach().float()  # (n_voxels, d): the voxels' block
    layer, row, col = additive_fit(table, tuple(new.cfg.layer_grid))
    state |= {"voxel_emb.tables.0": model.voxel_emb.tables[0].detach(),
              "voxel_emb.grid.layer": layer, "voxel_emb.grid.row": row, "voxel_emb.grid.col": col}
    new.load_state_dict(state)
    residual = table - new.voxel_emb.grid().detach()
    explained = 1 - residual.var() / (table - table.mean(0)).var()
    save_model(args.out, new, tokenizer, training=manifest.get("training"))
    print(f"{args.out}: {new.num_parameters():,} parameters (from {model.num_parameters():,}); the additive fit "
          f"explains {100 * explained:.1f}% of the voxel table's variance")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CalofmError as exc:
        sys.exit(f"error: {exc}")
