"""Model hyper-parameters, with named presets.

Vocabulary sizes are not hyper-parameters: they come from the tokenizer (`for_tokenizer`), as tuples
of block sizes so that an appended vocabulary block becomes an appended embedding table.
`moe_groups` lists the number of experts of each material group, in material-id order; appending a
material appends one entry.

Four options, off by default (a saved config without them loads as the model it was):
- voxel_head="factorized": p(v | h) = p(layer or EOS | h) p(cell | layer, h) (model/voxel_head.py), its
  cost per token independent of the grid's size; needs the geometry's cells per layer (`layer_cells`);
- voxel_embedding="geometric": a voxel's input embedding is the sum of an embedding of its layer and
  of its two transverse indices (model/blocks.py, GeometricVoxelEmbedding) instead of a row of its own:
  neighbouring cells share what they learn and the table stops growing with the grid; needs the
  geometry's per-layer grids (`layer_grid`);
- voxel_head="geometric": the flat head with the same layer + row + column sum added to each voxel's row;
- running_inputs: every hit position also sees the visible energy so far (a fraction of E_inc) and the
  hit index (model/transformer.py, RunningInputs); needs the energy binning (`energy_bins`, a
  LogEnergyBins dict) for the bins' centres.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from calofm.errors import CalofmError


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ff_mult: float = 2.0  # expert hidden width = ff_mult * d_model (published: GELU MLP x2)
    experts_per_material: int = 1
    top_k: int = 1  # experts per token inside its material's group
    shared_expert: bool = True  # one expert every token goes through, whatever its material
    stream_combine: str = "sum"  # "sum": voxel + energy embeddings; "cross": energy stream cross-attends to voxels
    rope_fraction: float = 0.5  # partial RoPE: rotate this fraction of each head's dimensions
    rope_base: float = 10000.0
    dropout: float = 0.0
    energy_head_voxel_cond: bool = True  # energy head sees the (teacher-forced / sampled) next voxel
    lb_coef: float = 0.01  # Switch load-balance loss weight (within material groups)
    z_coef: float = 1e-3  # router z-loss weight
    voxel_head: str = "flat"  # "flat": one softmax over the voxels (+ "geometric": a layer/row/column sum); "factorized": layer, then cell
    voxel_embedding: str = "table"  # "table": a row per voxel; "geometric": layer + two transverse index embeddings
    running_inputs: bool = False  # hit positions see the visible energy so far / E_inc and the hit index
    # filled from the tokenizer
    voxel_blocks: tuple[int, ...] = ()
    energy_blocks: tuple[int, ...] = ()
    material_blocks: tuple[int, ...] = ()
    particle_blocks: tuple[int, ...] = ()
    moe_groups: tuple[int, ...] = ()
    max_seq_len: int = 0
    layer_cells: tuple[int, ...] = ()  # cells of each geometry layer (voxel_head="factorized")
    layer_grid: tuple[int, ...] = ()  # (n_a, n_b) of each layer, flattened (the geometric embedding and head)
    energy_bins: dict | None = field(default=None, hash=False)  # LogEnergyBins.to_dict() (running_inputs)

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise CalofmError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise CalofmError("the head dimension must be even for RoPE")
        if self.stream_combine not in ("sum", "cross"):
            raise CalofmError(f"stream_combine must be 'sum' or 'cross', got {self.stream_combine!r}")
        if not 1 <= self.top_k <= self.experts_per_material:
            raise CalofmError(f"top_k must be in 1..experts_per_material, got {self.top_k}")
        if self.voxel_head not in ("flat", "geometric", "factorized"):
            raise CalofmError(f"voxel_head must be 'flat', 'geometric' or 'factorized', got {self.voxel_head!r}")
        if self.voxel_head == "factorized" and self.voxel_blocks and (
                len(self.voxel_blocks) != 2 or sum(self.layer_cells) != self.voxel_blocks[1]
                or min(self.layer_cells, default=0) <= 0):
            raise CalofmError(f"a factorized voxel head covers the special tokens and one geometry whose layers "
                              f"have {list(self.layer_cells)} cells; got voxel vocabulary blocks "
                              f"{list(self.voxel_blocks)} (a voxel vocabulary block cannot be appended to it)")
        if self.voxel_embedding not in ("table", "geometric"):
            raise CalofmError(f"voxel_embedding must be 'table' or 'geometric', got {self.voxel_embedding!r}")
        if "geometric" in (self.voxel_embedding, self.voxel_head) and self.voxel_blocks and (
                len(self.voxel_blocks) != 2 or len(self.layer_grid) % 2 or min(self.layer_grid, default=0) <= 0
                or sum(a * b for a, b in zip(self.layer_grid[::2], self.layer_grid[1::2])) != self.voxel_blocks[1]):
            raise CalofmError(f"a geometric voxel embedding or head covers the special tokens and one geometry with the "
                              f"per-layer grids {list(self.layer_grid)}; got voxel vocabulary blocks "
                              f"{list(self.voxel_blocks)} (a voxel vocabulary block cannot be appended to it)")
        if self.running_inputs and self.energy_blocks and not isinstance(self.energy_bins, dict):
            raise CalofmError("running_inputs needs the energy binning (energy_bins, a LogEnergyBins dict)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_voxel_tokens(self) -> int:
        return sum(self.voxel_blocks)

    @property
    def n_energy_tokens(self) -> int:
        return sum(self.energy_blocks)

    def for_tokenizer(self, tokenizer) -> ModelConfig:
        n_materials = len(tokenizer.materials)
        return replace(
            self, voxel_blocks=tokenizer.voxels.block_sizes(), energy_blocks=tokenizer.energies.block_sizes(),
            material_blocks=tokenizer.materials.block_sizes(), particle_blocks=tokenizer.particles.block_sizes(),
            moe_groups=(self.experts_per_material,) * n_materials, max_seq_len=tokenizer.max_seq_len,
            layer_cells=tuple(tokenizer.geometry.cells_per_layer) if self.voxel_head == "factorized" else (),
            layer_grid=(tuple(n for grid in tokenizer.geometry.layer_grid for n in grid)
                        if "geometric" in (self.voxel_embedding, self.voxel_head) else ()),
            energy_bins=tokenizer.bins.to_dict() if self.running_inputs else None,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise CalofmError(f"model config has unknown fields {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


PRESETS: dict[str, ModelConfig] = {
    # unit tests: a few thousand parameters besides the embeddings; two experts per material so
    # that top-k routing and the load-balance loss are exercised
    "tiny": ModelConfig(d_model=32, n_layers=2, n_heads=2, ff_mult=2.0, experts_per_material=2, top_k=1),
    # CPU default: ~4M parameters, trains on two cores in under an hour; summed streams (cheapest per token)
    "small": ModelConfig(d_model=128, n_layers=4, n_heads=4, ff_mult=2.0, experts_per_material=2, top_k=1),
    # published scale and layout: width 256, 3 blocks with energy->space cross-attention, one expert
    # per material, no shared expert (cross-attention: lower loss per step, 1.5x the cost per token;
    # see docs/model.md)
    "base": ModelConfig(d_model=256, n_layers=3, n_heads=8, ff_mult=2.0, experts_per_material=1, top_k=1,
                        shared_expert=False, stream_combine="cross"),
}


# the overridable architecture fields (the rest are set from the tokenizer) and their value ranges
_OVERRIDE_RANGES = {"d_model": (8, 8192), "n_layers": (1, 256), "n_heads": (1, 256), "ff_mult": (0.1, 64.0),
                    "experts_per_material": (1, 256), "top_k": (1, 256), "rope_fraction": (0.0, 1.0),
                    "rope_base": (1.0, 1e9), "dropout": (0.0, 0.99), "lb_coef": (0.0, 100.0), "z_coef": (0.0, 100.0)}


def get_preset(name: str, **overrides) -> ModelConfig:
    """A preset, with `overrides` of its architecture fields (each name, type and range checked)."""
    if name not in PRESETS:
        raise CalofmError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
    base = PRESETS[name]
    allowed = sorted(set(_OVERRIDE_RANGES) | {"shared_expert", "stream_combine", "energy_head_voxel_cond", "voxel_head",
                                              "voxel_embedding", "running_inputs"})
    for key, value in overrides.items():
        if key not in allowed:
            raise CalofmError(f"--model: unknown field {key!r}; overridable: {', '.join(allowed)}")
        kind = type(getattr(base, key))
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok, value = True, float(value)
        if not ok:
            raise CalofmError(f"--model: {key} must be {kind.__name__}, got {value!r}")
        lo, hi = _OVERRIDE_RANGES.get(key, (None, None))
        if lo is not None and not lo <= value <= hi:
            raise CalofmError(f"--model: {key} must be within {lo:g}-{hi:g}, got {value!r}")
        overrides[key] = value
    return replace(base, **overrides)
