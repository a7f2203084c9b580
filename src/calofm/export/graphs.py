"""The prefill and the one-hit decode step of one class (material, particle) as modules of explicit
tensors, for export (onnx_export.py): the KV cache, the hits so far, the position and the uniforms are
inputs; nothing is held between calls.

They reuse the model's layers (projections, rotary, layer norms, the MoE's decode, the heads) and
mirror what changes for export:
- the class is fixed: the MoE routes every row to the class's material group (routing_plan of one
  material), and each gated adapter (calofm.extension.lora) is merged for the class: its low-rank
  term is added if its gate takes the class, dropped if not. That is the branch its torch.where picks
  for such a shower, so the merged graph computes the same sums as PyTorch with the adapter loaded;
- attention reads the past slots from the cache input (slots >= the position masked, so a host may
  pass a buffer wider than the filled prefix) and the new key/value apart, so the graph never copies
  the cache; the step returns the new key and value and the host writes them at the position;
- sampling (`sample_head`, `Step.voxel`) mirrors generation.sampler.sample and generation.decode's
  _Run._voxel/_advance with ops ONNX has: searchsorted(right=True) over a sorted row is a count of the
  entries <= the target, nextafter(x, 0) for a positive normal float32 x is x * (1 - 2^-24) rounded
  to nearest, the hit list masks by a scatter. Greedy, top-k and top-p are not exported (the
  defaults, temperature 1 and min-p, are).
"""

from __future__ import annotations

import torch
from torch import nn

from calofm.errors import CalofmError
from calofm.extension.lora import GatedLoRALinear, GatedResidual
from calofm.generation.decode import _off
from calofm.generation.sampler import CHUNK
from calofm.model import ShowerTransformer
from calofm.model.attention import CausalAttention
from calofm.model.moe import routing_plan
from calofm.tokenizer import BOS, EOS, PAD, Block

# nextafter(x, 0) = x * BELOW for every positive normal float32 x (round to nearest)
BELOW = 1.0 - 2.0 ** -24


class ClassLayers:
    """The model's layers as one class's showers see them: gated adapters merged (see the module
    docstring), the MoE routed to the class's material group."""

    def __init__(self, model: ShowerTransformer, material: int, particle: int):
        self.model, self.material, self.particle = model, material, particle
        self.plan = routing_plan(torch.tensor([material]))

    def __call__(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """layer(x) for this class (model.attention.per_shower for a batch of the class)."""
        if isinstance(layer, (GatedLoRALinear, GatedResidual)):
            on = (self.material if layer.gate.key == "material" else self.particle) in layer.gate.ids
            y = layer.base(x) if isinstance(layer, GatedLoRALinear) else layer.module(x)
            if not on:
                return y
            return y + layer.lora(x if isinstance(layer, GatedLoRALinear) else y).to(y.dtype)
        if getattr(layer, "per_shower", False):
            raise CalofmError(f"cannot export a per-shower layer of type {type(layer).__name__}")
        return layer(x)


def attend(layers: ClassLayers, attn: CausalAttention, x: torch.Tensor, kv: torch.Tensor, pos: torch.Tensor,
           past: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Attention of x (B, T, d) at positions pos (T,) over the keys/values of kv (B, T, d) (causal) and,
    if given, the cache slots (B, H, S, D) below pos[0] -> (output (B, T, d), new k, v (B, H, T, D))."""
    B, T, _ = x.shape
    H, D = attn.n_heads, attn.head_dim
    q, k, v = (layers(proj, inp).view(B, T, H, D).transpose(1, 2)
               for proj, inp in ((attn.q_proj, x), (attn.k_proj, kv), (attn.v_proj, kv)))
    q, k = attn.rotary(q, pos), attn.rotary(k, pos)
    scale = D ** -0.5
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, T, T)
    scores = scores.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
    if past is None:
        y = scores.softmax(dim=-1) @ v
    else:
        past_k, past_v = past
        S = past_k.shape[2]
        old = (q @ past_k.transpose(-1, -2)) * scale  # (B, H, T, S)
        old = old.masked_fill(torch.arange(S, device=x.device)[None, :] >= pos[:1, None], float("-inf"))
        p = torch.cat([old, scores], dim=-1).softmax(dim=-1)
        y = p[..., :S] @ past_v + p[..., S:] @ v
    return layers(attn.o_proj, y.transpose(1, 2).reshape(B, T, H * D)), k, v


def hidden(layers: ClassLayers, vox: torch.Tensor, en: torch.Tensor, pos: torch.Tensor,
           incident: torch.Tensor | None = None, past: list | None = None):
    """ShowerTransformer.hidden for the class: tokens (B, T) at positions pos (T,) -> final hidden
    states (B, T, d), new keys and values per attention [(k, v) (B, H, T, D)]. incident (B,): the
    prefill (position 0 is the conditioning); past: the cache [(k, v) (B, H, S, D)] per attention."""
    model = layers.model
    voxels = None
    if model.cfg.stream_combine == "sum":
        x = model.voxel_emb(vox) + model.energy_emb(en)
    else:
        x, voxels = model.energy_emb(en), model.voxel_emb(vox)
    if incident is not None:
        ids = [torch.full((1,), i, dtype=torch.long, device=vox.device) for i in (layers.material, layers.particle)]
        cond = model.condition(incident, *ids)[:, None].to(x.dtype)
        x = torch.cat([cond, x[:, 1:]], dim=1)
        voxels = None if voxels is None else torch.cat([cond, voxels[:, 1:]], dim=1)
    new, slot = [], 0
    for block in model.blocks:
        if block.cross is not None:
            y, k, v = attend(layers, block.cross, block.ln_cross(x), block.ln_voxels(voxels), pos,
                             None if past is None else past[slot])
            x, slot = x + y, slot + 1
            new.append((k, v))
        h = block.ln1(x)
        y, k, v = attend(layers, block.attn, h, h, pos, None if past is None else past[slot])
        x, slot = x + y, slot + 1
        new.append((k, v))
        x = x + block.moe.decode(block.ln2(x), layers.plan).to(x.dtype)
    return layers(model.ln_f, x), new


def _weights(logits: torch.Tensor, m: torch.Tensor, log_min_p: torch.Tensor) -> torch.Tensor:
    """sampler.weights with ln(min_p) a tensor (-inf keeps every finite logit, as there)."""
    d = logits.float() - m
    return torch.where(d >= log_min_p, d.exp(), 0.0)


def _count_le(sorted_rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """torch.searchsorted(sorted_rows, target, right=True) for nondecreasing rows (B, N), target (B, 1)."""
    return (sorted_rows <= target).long().sum(dim=-1, keepdim=True)


def _below(x: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """sampler._below: x clipped into [0, limit)."""
    return torch.minimum(x.clamp(min=0), limit * BELOW)


def sample_head(logits: torch.Tensor, u: torch.Tensor, log_min_p: torch.Tensor, temperature: torch.Tensor):
    """sampler.sample (temperature > 0, min-p, no top-k/top-p): (B, V) logits (masked entries -inf),
    u (B, 1) -> (B,) token ids."""
    B, V = logits.shape
    logits = logits.float() / temperature  # sampler.filter_logits; x / 1 is x
    # sampler.chunk_sums
    m = logits.amax(dim=-1, keepdim=True).float()
    whole = V // CHUNK * CHUNK
    sums = _weights(logits[:, :whole].reshape(B, -1, CHUNK), m[:, :, None], log_min_p).sum(dim=-1)
    if whole != V:
        sums = torch.cat([sums, _weights(logits[:, whole:], m, log_min_p).sum(dim=-1, keepdim=True)], dim=1)
    chunk_cdf = sums.cumsum(dim=-1)
    target = _below(u * chunk_cdf[:, -1:], chunk_cdf[:, -1:])  # (B, 1)
    c = _count_le(chunk_cdf, target)  # (B, 1)
    before = torch.where(c > 0, chunk_cdf.gather(1, (c - 1).clamp(min=0)), 0.0)
    tokens = c * CHUNK + torch.arange(CHUNK, device=logits.device)  # (B, CHUNK)
    chunk = logits.gather(1, tokens.clamp(max=V - 1)).float().masked_fill(tokens >= V, float("-inf"))
    inside = _weights(chunk, m, log_min_p).cumsum(dim=-1)
    i = _count_le(inside, _below(target - before, inside[:, -1:]))
    i = torch.where(inside[:, -1:] > 0, i, chunk.argmax(dim=-1, keepdim=True))
    return (c * CHUNK + i).squeeze(1)


class Prefill(nn.Module):
    """incident (B,) log10(E / 10 GeV) -> h (B, d), then key_i, value_i (B, H, 2, D) per attention i:
    the cache slots 0 (conditioning) and 1 (BOS)."""

    def __init__(self, layers: ClassLayers):
        super().__init__()
        self.layers, self.net = layers, layers.model

    def forward(self, incident: torch.Tensor):
        tokens = torch.full((incident.shape[0], 2), PAD, dtype=torch.long, device=incident.device)
        tokens[:, 1] = BOS
        h, new = hidden(self.layers, tokens, tokens, torch.arange(2, device=incident.device), incident=incident)
        return (h[:, -1], *[x for kv in new for x in kv])


class Step(nn.Module):
    """One hit of every row (generation.decode's _Run._voxel, then _Run._advance):
    h (B, d) hidden state at the last position, hits (B, N) voxels hit so far (PAD elsewhere), t ()
    int64 the step (the new tokens go to position t + 2, cache slots 0..t+1 are filled), done (B,)
    bool, u (B, 2) the step's uniforms (voxel, energy), log_min_p (2,) ln(min_p) per head (-inf: off),
    temperature (1,), then past_key_i, past_value_i (B, H, S, D) per attention, S >= t + 2 ->
    voxel (B,) and energy (B,) tokens of the hit (PAD where the row stopped or had stopped), done (B,),
    h (B, d), then key_i, value_i (B, H, D) to write at slot t + 2."""

    def __init__(self, layers: ClassLayers, voxel_block: Block, energy_block: Block):
        super().__init__()
        self.layers, self.net = layers, layers.model
        cfg = self.net.cfg
        self.register_buffer("voxel_off", _off(cfg.n_voxel_tokens, voxel_block, True, "cpu"), persistent=False)
        self.register_buffer("energy_off", _off(cfg.n_energy_tokens, energy_block, False, "cpu"), persistent=False)

    def voxel(self, h, hits, done, u, log_min_p, temperature):
        """_Run._voxel (no target hits) -> (v, is_hit, done)."""
        logits = self.net.voxel_logits(h).index_fill(1, self.voxel_off, float("-inf"))
        logits = logits.scatter(1, hits, float("-inf"))  # a voxel is hit at most once (PAD is off anyway)
        v = sample_head(logits, u, log_min_p, temperature)
        is_hit = ~done & (v != EOS)
        v = torch.where(done, PAD, v)
        return v, is_hit, done | (v == EOS)

    def forward(self, h, hits, t, done, u, log_min_p, temperature, past: list[torch.Tensor]):
        v, is_hit, done = self.voxel(h, hits, done, u[:, :1], log_min_p[0], temperature)
        # _Run._advance
        logits = self.net.energy_logits(h, v).index_fill(1, self.energy_off, float("-inf"))
        e = sample_head(logits, u[:, 1:], log_min_p[1], temperature)
        v_in, e_in = torch.where(is_hit, v, PAD), torch.where(is_hit, e, PAD)
        pos = (t + 2).reshape(1)
        kv = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        h, new = hidden(self.layers, v_in[:, None], e_in[:, None], pos, past=kv)
        return (v_in, e_in, done, h[:, -1], *[x[:, :, 0] for pair in new for x in pair])


def n_attentions(model: ShowerTransformer) -> int:
    return len(model.attentions())
