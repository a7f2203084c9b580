"""Decoder-only causal transformer over hit positions.

Input at each position: voxel embedding (a row per voxel, or with voxel_embedding="geometric" a sum of
layer and transverse-index embeddings) + energy embedding (the two streams summed; position 0 is
the conditioning vector instead), with running_inputs plus a projection of the visible energy so far
and the hit index (RunningInputs). Pre-norm blocks: x += Attn(LN(x)); x += MoE(LN(x)). With
stream_combine="cross" (the published layout) the residual stream starts from the energy embeddings
only and every block first cross-attends, causally, to the voxel-embedding stream:
x += CrossAttn(LN(x), LN(voxels)). Two heads:
next voxel from the final hidden state h, next energy from h combined with the embedding of the
next voxel (teacher-forced in training, the sampled voxel in generation), so the model learns
p(v, e | past) = p(v | past) p(e | v, past) instead of sampling the two independently. The voxel
head is one softmax over the voxels, or (voxel_head="factorized", model/voxel_head.py) a layer head
then a cell head.

Two ways to run it:
- training / scoring: `forward(batch)` over whole padded sequences (is_causal attention);
- decoding: `setup_cache(B)` (installs the KV caches and the held vocabulary matrices, and returns
  them, so that a decoder can take them away with `install_cache()` and put them back later), then
  `prefill(...)` and `hidden(...)` with `start` = position of the first new token, writing keys/values
  into the cache (attention masked to the positions filled so far, over the whole buffer or, with a
  sliced cache, over the filled prefix only). The decoding loop is calofm.generation.decode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calofm.model.attention import CausalAttention, Rotary, Showers, per_shower
from calofm.model.blocks import BlockEmbedding, BlockHead, BlockTables, GeometricVoxelEmbedding, GeometricVoxelHead
from calofm.model.config import ModelConfig
from calofm.model.kv_cache import KVCache, KVStorage
from calofm.errors import CalofmError
from calofm.model.moe import MaterialMoE, MoEAux, RoutingPlan
from calofm.model.voxel_head import FactorizedVoxelHead, HeadInput
from calofm.tokenizer import BOS, PAD
from calofm.tokenizer.energy_bins import LogEnergyBins

IGNORE = -100  # target id that the losses skip


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary):
        super().__init__()
        if cfg.stream_combine == "cross":
            self.ln_cross, self.ln_voxels = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
            self.cross = CausalAttention(cfg, rotary)
        else:
            self.cross = None
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalAttention(cfg, rotary)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.moe = MaterialMoE(cfg.d_model, int(cfg.ff_mult * cfg.d_model), cfg.moe_groups, cfg.top_k,
                               cfg.shared_expert)
        self.drop = nn.Dropout(cfg.dropout)

    def attentions(self) -> list[CausalAttention]:
        return [self.attn] if self.cross is None else [self.cross, self.attn]

    def forward(self, x, pos, showers: Showers, valid, mask, voxels=None, plan: RoutingPlan | None = None):
        """x (B, T, d); showers: the batch's ids (the material routes the MoE); valid (B, T) bool or None:
        padding skips the MoE (its output never reaches a real token: it sits after EOS, and attention
        is causal); voxels (B, T, d):
        the voxel stream, for cross-attention. plan: decoding, the MoE routes by this per-material
        plan instead (valid is then ignored: the plan says which rows run) and returns no aux."""
        B, T, d = x.shape
        if self.cross is not None:
            x = x + self.drop(self.cross(self.ln_cross(x), pos, mask, kv=self.ln_voxels(voxels), showers=showers))
        x = x + self.drop(self.attn(self.ln1(x), pos, mask, showers=showers))
        if plan is not None:
            return x + self.drop(self.moe.decode(self.ln2(x), plan).to(x.dtype)), None
        h = self.ln2(x).reshape(B * T, d)
        mat = showers.material[:, None].expand(B, T).reshape(B * T)
        if valid is None:
            y, aux = self.moe(h, mat)
        else:
            rows = valid.reshape(B * T).nonzero().squeeze(1)
            y_valid, aux = self.moe(h[rows], mat[rows])
            y = h.new_zeros(B * T, d, dtype=y_valid.dtype).index_copy(0, rows, y_valid)
        return x + self.drop(y.view(B, T, d).to(x.dtype)), aux


class RunningInputs(nn.Module):
    """What the sequence so far implies, for every hit position p >= 1 (running_inputs): the visible
    energy of the hits up to and including the token at p (energy bins' centres, specials 0) as a
    fraction f of E_inc, log1p(f), and the hits so far / max_hits -> Linear(3 -> d), added to the input."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        bins = LogEnergyBins.from_dict(cfg.energy_bins)
        centres = np.zeros(cfg.n_energy_tokens, dtype=np.float32)  # numpy: a meta-device model gets it too
        centres[cfg.energy_blocks[0]:cfg.energy_blocks[0] + bins.n_bins] = np.sqrt(bins.edges[:-1] * bins.edges[1:])
        self.register_buffer("centre_MeV", torch.as_tensor(centres), persistent=False)  # (V_e,)
        self.max_hits = cfg.max_seq_len - 3
        self.proj = nn.Linear(3, cfg.d_model)

    def energy(self, en: torch.Tensor) -> torch.Tensor:
        """Energy tokens (...) -> their visible energy in MeV (fp32; specials and PAD 0)."""
        return self.centre_MeV[en]

    def forward(self, en: torch.Tensor, incident: torch.Tensor, pos: torch.Tensor,
                before: torch.Tensor | None = None) -> torch.Tensor:
        """en (B, T) at positions pos (T,); incident (B,) the log-energy feature; before (B,): the visible
        energy (MeV) of the positions before these (None: 0) -> (B, T, d)."""
        cum = self.energy(en).cumsum(dim=1)
        if before is not None:
            cum = cum + before[:, None]
        frac = cum / torch.pow(10.0, incident.float() + 4.0)[:, None]  # E_inc in MeV
        hits = ((pos - 1).clamp(min=0).float() / self.max_hits).expand_as(frac)
        return self.proj(torch.stack([frac, torch.log1p(frac), hits], dim=-1))


@dataclass
class LossTerms:
    """Summed token losses (so data-parallel ranks can normalize by the global token count)."""

    voxel_nll: torch.Tensor  # sum over targets
    energy_nll: torch.Tensor
    n_targets: int
    lb: torch.Tensor  # mean over layers
    z: torch.Tensor
    expert_counts: torch.Tensor  # (n_layers, n_experts_total)


class ShowerTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not cfg.voxel_blocks or not cfg.moe_groups or cfg.max_seq_len <= 0:
            raise ValueError("ModelConfig needs its vocabulary sizes: use cfg.for_tokenizer(tokenizer)")
        self.cfg = cfg
        d = cfg.d_model
        self.voxel_emb = (BlockEmbedding(cfg.voxel_blocks, d) if cfg.voxel_embedding == "table"
                          else GeometricVoxelEmbedding(cfg.voxel_blocks[0], cfg.layer_grid, d))
        self.energy_emb = BlockEmbedding(cfg.energy_blocks, d)
        self.material_emb = BlockEmbedding(cfg.material_blocks, d)
        self.particle_emb = BlockEmbedding(cfg.particle_blocks, d)
        self.incident = nn.Sequential(nn.Linear(1, d), nn.GELU(), nn.Linear(d, d))  # on log10(E/10 GeV)
        self.running = RunningInputs(cfg) if cfg.running_inputs else None
        self.rotary = Rotary(cfg.head_dim, cfg.rope_fraction, cfg.max_seq_len, cfg.rope_base)
        self.blocks = nn.ModuleList([Block(cfg, self.rotary) for _ in range(cfg.n_layers)])
        self.ln_f = nn.LayerNorm(d)
        hidden = int(cfg.ff_mult * d)
        self.voxel_head = {
            "flat": lambda: BlockHead(cfg.voxel_blocks, d),
            "geometric": lambda: GeometricVoxelHead(cfg.voxel_blocks, cfg.layer_grid, d),
            "factorized": lambda: FactorizedVoxelHead(d, hidden, cfg.voxel_blocks[0], cfg.layer_cells),
        }[cfg.voxel_head]()
        self.energy_in = HeadInput(d, hidden) if cfg.energy_head_voxel_cond else None
        self.energy_head = BlockHead(cfg.energy_blocks, d)
        self.register_buffer("causal_mask", torch.ones(cfg.max_seq_len, cfg.max_seq_len, dtype=torch.bool).tril(),
                             persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)  # GPT-2: residual writes scaled by depth
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # LayerNorm and bias parameters keep their defaults
            std = residual_std if name.endswith(("o_proj.weight", "fc2.weight")) else 0.02
            nn.init.normal_(p, std=std)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # --- the network ------------------------------------------------------------------------
    def condition(self, incident: torch.Tensor, material: torch.Tensor, particle: torch.Tensor) -> torch.Tensor:
        """(B,) log-energy feature, material id, particle id -> (B, d) the position-0 input."""
        e = self.incident(incident.float()[:, None])
        return e + self.material_emb(material) + self.particle_emb(particle)

    def hidden(self, vox: torch.Tensor, en: torch.Tensor, incident: torch.Tensor, material: torch.Tensor,
               particle: torch.Tensor, start: int | torch.Tensor = 0, valid: torch.Tensor | None = None,
               plan: RoutingPlan | None = None, energy_before: torch.Tensor | None = None):
        """Tokens (B, T) at positions start..start+T-1 -> final hidden states (B, T, d), MoE aux per layer
        (None with a routing plan, see Block.forward). Position 0 (when start == 0) is the
        conditioning; its token ids are ignored. start as a (1,) device tensor: a decode step whose
        position is data, not a Python int (static caches only: the captured step of generation.decode).
        The per-shower ids reach the layers that act on some showers only (adapters) as `Showers`.
        energy_before (B,): running_inputs, the visible energy (MeV) of the hits before `start` (decoding)."""
        B, T = vox.shape
        on_device = isinstance(start, torch.Tensor)  # static decoding: the position lives on the device
        showers = Showers(material, particle, static=on_device)
        voxels = None
        if self.cfg.stream_combine == "sum":
            x = self.voxel_emb(vox) + self.energy_emb(en)
        else:
            x, voxels = self.energy_emb(en), self.voxel_emb(vox)
        pos = (start + torch.arange(T, device=vox.device) if on_device
               else torch.arange(start, start + T, device=vox.device))
        if self.running is not None:
            x = x + self.running(en, incident, pos, energy_before).to(x.dtype)
        if isinstance(start, int) and start == 0:
            cond = self.condition(incident, material, particle)[:, None].to(x.dtype)
            x = torch.cat([cond, x[:, 1:]], dim=1)
            voxels = None if voxels is None else torch.cat([cond, voxels[:, 1:]], dim=1)
        cache = self.blocks[0].attn.kv_cache
        if on_device and cache is None:
            raise ValueError("a tensor start position is for decoding with a static cache (setup_cache)")
        mask = None
        if cache is not None:
            for attn in self.attentions():
                attn.kv_cache.write_pos = pos if on_device else None
                if not on_device:
                    attn.kv_cache.fill = start + T
            mask = self.causal_mask[pos, : cache.span]  # (T, slots read): full buffer, or filled prefix
        auxes: list[MoEAux] = []
        for block in self.blocks:
            x, aux = block(x, pos, showers, valid, mask, voxels, plan)
            auxes.append(aux)
        return per_shower(self.ln_f, x, showers), auxes

    @property
    def factorized(self) -> bool:
        return self.cfg.voxel_head == "factorized"

    def voxel_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., d) -> logits over the voxel vocabulary (..., V_v); a factorized head gives the joint
        log-probabilities (log_softmax of either is the same distribution). Decoding a factorized head
        reads its layer and cell heads instead (generation/decode.py)."""
        return self.voxel_head.log_probs(h) if self.factorized else self.voxel_head(h)

    def energy_logits(self, h: torch.Tensor, next_voxel: torch.Tensor) -> torch.Tensor:
        """h (..., d) and the voxel token chosen at the same step (...,) -> energy logits (..., V_e)."""
        if self.energy_in is not None:
            h = self.energy_in(h, self.voxel_emb(next_voxel))
        return self.energy_head(h)

    def forward(self, batch: dict) -> LossTerms:
        """Teacher-forced losses of a padded batch (see training/data.py for the keys)."""
        h, auxes = self.hidden(batch["vox_in"], batch["en_in"], batch["incident"], batch["material"],
                               batch["particle"], valid=batch.get("valid"))
        tgt_v, tgt_e = batch["vox_tgt"], batch["en_tgt"]
        sel = tgt_v != IGNORE  # heads only where there is a target: padding costs nothing
        h, tgt_v, tgt_e = h[sel], tgt_v[sel], tgt_e[sel]
        if self.factorized:
            voxel_nll = self.voxel_head.nll(h, tgt_v)
        else:
            voxel_nll = F.cross_entropy(self.voxel_logits(h).float(), tgt_v, reduction="sum")
        energy_nll = F.cross_entropy(self.energy_logits(h, tgt_v).float(), tgt_e, reduction="sum")
        return LossTerms(voxel_nll, energy_nll, int(sel.sum()), torch.stack([a.lb for a in auxes]).mean(),
                         torch.stack([a.z for a in auxes]).mean(), torch.stack([a.counts for a in auxes]))

    # --- decoding ---------------------------------------------------------------------------
    def setup_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                    sliced: bool = False, attend=None) -> tuple:
        """Install a key/value cache of up to (B, H, S_max, D) in every layer, and hold the vocabulary
        matrices (see BlockTables.hold_weight); returns them for install_cache. dtype: the decode's
        compute dtype, the weights' unless given; the cache and the heads' held matrices take it (so a
        bf16 dtype is for decoding under bf16 autocast). sliced: buffers only as wide as the filled
        prefix (see KVCache); attend: the attention over a bf16 cache (a compiled
        attention.attend_over_cache)."""
        max_len = max_len or self.cfg.max_seq_len
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"cache of {max_len} positions exceeds max_seq_len {self.cfg.max_seq_len}")
        ref = self.ln_f.weight
        dtype = dtype or ref.dtype
        # sliced caches rewrite themselves into one shared spare storage (see KVCache)
        spare = KVStorage(batch_size * self.cfg.n_heads * max_len * self.cfg.head_dim, dtype,
                          ref.device) if sliced else None
        for tables in self.block_tables():  # heads in the compute dtype; embeddings feed the fp32 stream
            tables.hold_weight(dtype=dtype if isinstance(tables, BlockHead) else None)
        for attn in self.attentions():
            attn.kv_cache = KVCache(batch_size, self.cfg.n_heads, max_len, self.cfg.head_dim, dtype,
                                    ref.device, sliced=sliced, attend=attend, spare=spare)
        return [t.held for t in self.block_tables()], [a.kv_cache for a in self.attentions()]

    def install_cache(self, state: tuple | None = None) -> None:
        """Put back what setup_cache returned (a CUDA graph reads those tensors at the addresses it was
        captured with, so a decoder that replays its graphs in a later call installs the same ones
        again), or with None remove it: the model holds nothing between decodes."""
        held, caches = state or ([None] * len(self.block_tables()), [None] * len(self.attentions()))
        for tables, w in zip(self.block_tables(), held, strict=True):
            tables.held = w
        for attn, cache in zip(self.attentions(), caches, strict=True):
            attn.kv_cache = cache

    def select_cache_rows(self, rows: torch.Tensor) -> None:
        """Keep only the sequences `rows` in every layer's cache (finished showers leave the batch)."""
        for attn in self.attentions():
            attn.kv_cache.select_rows(rows)

    def prefill(self, incident: torch.Tensor, material: torch.Tensor, particle: torch.Tensor,
                plan: RoutingPlan | None = None) -> torch.Tensor:
        """Run [COND, BOS] through the installed cache -> the hidden state (B, d) the first draw reads."""
        start = torch.full((incident.shape[0], 2), PAD, dtype=torch.long, device=incident.device)
        start[:, 1] = BOS
        h, _ = self.hidden(start, start, incident, material, particle, start=0, plan=plan)
        return h[:, -1]

    def attentions(self) -> list[CausalAttention]:
        """Every attention of the network, layer by layer (each holds its own KV cache when decoding)."""
        return [a for block in self.blocks for a in block.attentions()]

    def block_tables(self) -> list[BlockTables]:
        return [m for m in self.modules() if isinstance(m, BlockTables)]

    # --- growth (continual learning) -----------------------------------------------------------
    def add_voxel_block(self, size: int) -> None:
        """Append a voxel vocabulary block (a new geometry): one embedding table and one head table.
        A factorized head or a geometric embedding is built for one geometry's layers: refused."""
        if self.factorized or "geometric" in (self.cfg.voxel_head, self.cfg.voxel_embedding):
            raise CalofmError(f"this model's voxel head ({self.cfg.voxel_head}) or embedding "
                              f"({self.cfg.voxel_embedding}) is built on one geometry's layers: a voxel "
                              "vocabulary block (a new geometry) cannot be appended to it")
        self.voxel_emb.append_block(size)
        self.voxel_head.append_block(size)
        self.cfg = replace(self.cfg, voxel_blocks=self.cfg.voxel_blocks + (size,))

    def grow_positions(self, max_seq_len: int) -> None:
        """Room for sequences of max_seq_len positions (an adapter's showers may run longer than the
        base's): the rotary tables and the causal mask grow, their existing rows unchanged, so the
        base's outputs stay bit-identical. No parameter depends on the length."""
        if max_seq_len <= self.cfg.max_seq_len:
            return
        self.rotary.grow(max_seq_len)
        self.causal_mask = torch.ones(max_seq_len, max_seq_len, dtype=torch.bool,
                                      device=self.causal_mask.device).tril()
        self.cfg = replace(self.cfg, max_seq_len=max_seq_len)

    def add_material(self, n_experts: int | None = None) -> int:
        """Append one material: one embedding row (a new vocabulary block) and one expert group per
        MoE layer. Existing parameters are untouched. Returns the new material id."""
        n_experts = n_experts or self.cfg.experts_per_material
        self.material_emb.append_block(1)
        for block in self.blocks:
            new_id = block.moe.add_group(n_experts)
        self.cfg = replace(self.cfg, material_blocks=self.cfg.material_blocks + (1,),
                           moe_groups=self.cfg.moe_groups + (n_experts,))
        return new_id
