"""Growing a trained model without touching it: material and particle adapters.

A new **material** gets, in every MoE layer, an expert group that starts as the group of the closest
known material (same frozen weights, by reference) plus trainable low-rank deltas on each expert's
two matrices and its own router; plus one new row in the material vocabulary. Only showers of that
material are routed to it.

A new **particle** gets a new row in the particle vocabulary (initialized from a known particle),
low-rank adapters on the q, k, v and output projections of every attention block, and a low-rank
correction of the final hidden state, i.e. of both output heads (W -> W (1 + B A), the "modular
vocabulary head" that replaces the published full new heads). All of them act only on showers of
that particle (see lora.py).

Either way the base parameters are frozen and never written, every new token gets an id after the
existing ones, and adapters are saved as their own directory:
    adapter.safetensors   the new parameters only
    manifest.json         kind, names, ranks, init_from, the base model's weight sha256, the sha256
                          of the adapters it was trained on top of (`requires`), its own max_hits,
                          training summary
An adapter is refused on any other base, or without the adapters it requires (applied before it, in
their order). Independent adapters (say a material and a particle) stack in any order: new ids are
assigned when an adapter is attached and its tensors are keyed by name.

Sequence length: a new material or particle may shower longer than anything the base saw. An adapter
records its own max_hits, fitted on its training data by the rule training uses
(ShowerTokenizer.fit_max_hits); its classes are generated (and trained) up to that cap, a class
served by two adapters (a new material with a new particle) up to the larger of theirs, and the base's
classes keep the base's cap (tokenizer.class_max_hits). The model's position tables grow to the
longest cap with their existing rows unchanged (ShowerTransformer.grow_positions), so the base's
outputs stay bit-identical. Adapters written without the field have the base's cap.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import MISSING, asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calofm.checkpoint import atomic_save_tensors, atomic_write_text, read_json_manifest, sha256_file
from calofm.detector.materials import get_material
from calofm.errors import CalofmError
from calofm.extension.lora import GatedLoRALinear, GatedResidual, LowRank, ShowerGate
from calofm.model.moe import ExpertGroup
from calofm.tokenizer import canonical_particle
from calofm.tokenizer.totals import ShowerTotals

ADAPTER_FILE, MANIFEST_FILE, FORMAT = "adapter.safetensors", "manifest.json", "calofm-adapter"


@dataclass
class AdapterSpec:
    kind: str  # "material" or "particle"
    names: list[str]  # the materials, or the one particle, it adds
    init_from: dict[str, str]  # new name -> the known name it starts from
    rank: int = 8
    alpha: float = 16.0
    head_rank: int = 16  # particle adapters: rank of the output-head correction
    base_sha256: str = ""
    requires: list[str] = field(default_factory=list)  # sha256 of the adapters it was trained on top of
    max_hits: int | None = None  # its classes' hit cap, fitted on its data; None (older adapters): the base's

    @classmethod
    def from_dict(cls, d, where: str) -> AdapterSpec:
        """The spec of an adapter manifest; unknown or missing keys are a CalofmError naming them."""
        if not isinstance(d, dict):
            raise CalofmError(f"{where}: the adapter manifest has no spec object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CalofmError(f"{where}: the adapter manifest's spec has unknown keys {unknown} (written by a newer "
                              "calofm, or edited)")
        missing = sorted(f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
                         and f.name not in d)
        if missing:
            raise CalofmError(f"{where}: the adapter manifest's spec lacks {missing}")
        return cls(**d)


# --- the new modules -------------------------------------------------------------------------------
class LowRankExpertGroup(ExpertGroup):
    """A new material's experts: a known material's experts (frozen, by reference) + low-rank deltas.
    Routing, auxiliary losses and counts are ExpertGroup's; only the experts' computation differs."""

    def __init__(self, source: ExpertGroup, rank: int, alpha: float):
        nn.Module.__init__(self)  # not ExpertGroup.__init__: the experts are the source's, not new ones
        self._source = [source]  # a list, so the source is not registered (not saved, not trained twice)
        self.top_k = source.top_k
        d, h = source.experts[0].fc1.in_features, source.experts[0].fc1.out_features
        self.delta1 = nn.ModuleList([LowRank(d, h, rank, alpha) for _ in source.experts])
        self.delta2 = nn.ModuleList([LowRank(h, d, rank, alpha) for _ in source.experts])
        self.router = None
        if source.router is not None:
            self.router = nn.Linear(d, len(source.experts), bias=False)
            self.router.weight.data.copy_(source.router.weight.data)
        self.to(source.experts[0].fc1.weight.device)

    @property
    def experts(self):
        return self._source[0].experts

    def expert_output(self, e: int, x: torch.Tensor) -> torch.Tensor:
        mlp = self._source[0].experts[e]
        h = F.gelu(mlp.fc1(x) + self.delta1[e](x).to(x.dtype))
        return mlp.fc2(h) + self.delta2[e](h).to(x.dtype)


def _append_row(tables, source_row: int) -> nn.Parameter:
    """Append a one-token block to a BlockEmbedding, initialized from an existing row; returns it."""
    tables.append_block(1)
    new = tables.tables[-1]
    with torch.no_grad():
        new.copy_(tables.weight[source_row:source_row + 1])
    return new


def attach(shower_model, spec: AdapterSpec) -> dict[str, nn.Parameter]:
    """Add the adapter's modules to a loaded ShowerModel (model and tokenizer, in place).

    Returns the new parameters by stable name (the keys of adapter.safetensors)."""
    model, tok = shower_model.model, shower_model.tokenizer
    params: dict[str, nn.Parameter] = {}
    if spec.kind == "material":
        for name in spec.names:
            src = tok.material_id(spec.init_from[name])
            tok.materials.append(f"material:{name}", names=[name])
            params[f"{name}.embedding"] = _append_row(model.material_emb, src)
            for i, block in enumerate(model.blocks):
                group = LowRankExpertGroup(block.moe.groups[src], spec.rank, spec.alpha)
                block.moe.groups.append(group)
                for pname, p in group.named_parameters():
                    params[f"{name}.layer{i}.{pname}"] = p
            model.cfg = replace(model.cfg, material_blocks=model.cfg.material_blocks + (1,),
                                moe_groups=model.cfg.moe_groups + (model.cfg.moe_groups[src],))
    elif spec.kind == "particle":
        (name,) = spec.names
        src = tok.particle_id(spec.init_from[name])
        tok.particles.append(f"particle:{name}", names=[name])
        params[f"{name}.embedding"] = _append_row(model.particle_emb, src)
        gate = ShowerGate("particle", (tok.particle_id(name),))
        for i, block in enumerate(model.blocks):
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                wrapped = GatedLoRALinear(getattr(block.attn, proj), spec.rank, spec.alpha, gate)
                setattr(block.attn, proj, wrapped)
                params[f"{name}.layer{i}.{proj}.A"], params[f"{name}.layer{i}.{proj}.B"] = wrapped.lora.A, wrapped.lora.B
        head = GatedResidual(model.ln_f, model.cfg.d_model, spec.head_rank, spec.alpha, gate)
        model.ln_f = head
        params[f"{name}.head.A"], params[f"{name}.head.B"] = head.lora.A, head.lora.B
        model.cfg = replace(model.cfg, particle_blocks=model.cfg.particle_blocks + (1,))
    else:
        raise CalofmError(f"unknown adapter kind {spec.kind!r}")
    shower_model.adapters = getattr(shower_model, "adapters", []) + [spec]
    # an adapter written without a cap of its own (or one still to be fitted: extend) has the base's
    set_max_hits(shower_model, spec, tok.max_hits if spec.max_hits is None else spec.max_hits)
    return params


def adapter_keys(spec: AdapterSpec) -> tuple[tuple[str, str], ...]:
    """The tokenizer's vocabulary entries an adapter adds, as (kind, name)."""
    return tuple((spec.kind, name) for name in spec.names)


def set_max_hits(shower_model, spec: AdapterSpec, max_hits: int) -> None:
    """Record an adapter's hit cap for its classes (tokenizer.class_max_hits) and grow the model's
    position tables to the longest cap (existing rows unchanged)."""
    tok = shower_model.tokenizer
    for key in adapter_keys(spec):
        tok.adapter_max_hits[key] = int(max_hits)
    shower_model.model.grow_positions(tok.longest_seq_len)


# --- choosing where a new material starts --------------------------------------------------------
def closest_material(name: str, known: list[str]) -> str:
    """The known material nearest in (ln X0, ln R_M, ln E_c, ln Z): what governs a shower's shape."""
    def features(m):
        mat = get_material(m)
        return np.log([mat.X0_mm, mat.R_M_mm, mat.E_c_MeV, mat.Z])

    target = features(name)
    return min(known, key=lambda m: float(np.sum((features(m) - target) ** 2)))


# --- files -------------------------------------------------------------------------------------------
ADAPTER_FILES = (ADAPTER_FILE, MANIFEST_FILE)


def check_adapter_output(directory: str, force: bool = False) -> str:
    """Where an adapter may be written: a new directory, an empty one, or (with `force`) an adapter
    calofm wrote, holding nothing but its two files. Anything else (a model or run directory, a
    folder of the user's files, the current directory or one above it) is refused, force or not,
    so that replacing an adapter never deletes a file calofm did not write. Returns the absolute path."""
    path = os.path.abspath(directory)
    if os.path.basename(path) in ("", ".", "..") or os.path.dirname(path) == path:
        raise CalofmError(f"-o {directory}: name a new adapter directory, not a filesystem root")
    cwd = os.path.abspath(os.getcwd())
    if cwd == path or cwd.startswith(path + os.sep):
        raise CalofmError(f"-o {directory} is the current directory or holds it; name a new adapter directory "
                          "(e.g. -o adapters/Fe)")
    from calofm.outputs import check_parent

    check_parent(path, "adapter directory")
    if not os.path.lexists(path):
        return path
    if os.path.islink(path) or not os.path.isdir(path):
        raise CalofmError(f"-o {directory} exists and is not a directory; choose a new adapter directory")
    entries = sorted(os.listdir(path))
    if not entries:
        return path
    foreign = [e for e in entries if e not in ADAPTER_FILES]
    if foreign or not _is_adapter(path):
        shown = ", ".join((foreign or entries)[:3]) + (", ..." if len(foreign or entries) > 3 else "")
        raise CalofmError(f"-o {directory} exists and is not an adapter written by calofm (it holds {shown}); "
                          "calofm never deletes files it did not write: choose a new directory")
    if not force:
        raise CalofmError(f"-o {directory} already holds an adapter; pass --force to replace it")
    return path


def _is_adapter(path: str) -> bool:
    try:
        with open(os.path.join(path, MANIFEST_FILE)) as fh:
            manifest = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def save_adapter(directory: str, spec: AdapterSpec, params: dict[str, nn.Parameter], training: dict,
                 totals: dict | None = None, force: bool = False) -> dict:
    """Write the adapter directory atomically: assembled under a temporary name beside it, then
    swapped in; an adapter it replaces is moved aside first and removed only once the new one is in
    place. `directory` is checked by check_adapter_output (`force`: replace an existing adapter).
    Files are 0644 and the directory 0755, like a model directory."""
    from calofm.outputs import write_error

    path = check_adapter_output(directory, force)
    parent = os.path.dirname(path)
    tmp = old = None
    try:
        tmp = tempfile.mkdtemp(prefix=".tmp-adapter-", dir=parent)
        digest = atomic_save_tensors({k: p.detach() for k, p in params.items()}, os.path.join(tmp, ADAPTER_FILE))
        manifest = {"format": FORMAT, "format_version": 1, "spec": asdict(spec),
                    "weights": {"file": ADAPTER_FILE, "sha256": digest,
                                "n_parameters": int(sum(p.numel() for p in params.values()))},
                    "training": training, "totals": totals or {}}
        atomic_write_text(os.path.join(tmp, MANIFEST_FILE), json.dumps(manifest, indent=1))
        os.chmod(tmp, 0o755)
        if os.path.isdir(path) and os.listdir(path):
            old = tempfile.mkdtemp(prefix=".old-adapter-", dir=parent)
            os.replace(path, os.path.join(old, "adapter"))
        elif os.path.isdir(path):
            os.rmdir(path)  # empty: rename cannot replace it on every system
        os.replace(tmp, path)
        tmp = None
        return manifest
    except OSError as exc:
        if old is not None and not os.path.exists(path):  # put the old adapter back
            os.replace(os.path.join(old, "adapter"), path)
        raise write_error(directory, exc) from None
    finally:
        for leftover in (tmp, old):
            if leftover is not None and os.path.exists(leftover):
                shutil.rmtree(leftover, ignore_errors=True)


def read_adapter_manifest(directory: str) -> dict:
    return read_json_manifest(os.path.join(directory, MANIFEST_FILE), FORMAT, "adapter")


def base_sha256(shower_model) -> str:
    return shower_model.manifest.get("weights", {}).get("sha256", "")


def applied_sha256(shower_model) -> list[str]:
    return list(getattr(shower_model, "adapter_sha256", []))


def _read_spec(directory: str, manifest: dict) -> AdapterSpec:
    """The manifest's AdapterSpec, with every field of the type attach() needs; CalofmError otherwise."""
    spec = AdapterSpec.from_dict(manifest.get("spec"), directory)  # unknown or missing keys

    def positive_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    def strings(v):
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    ok = (spec.kind in ("material", "particle") and strings(spec.names) and len(spec.names) > 0
          and (spec.kind == "material" or len(spec.names) == 1)
          and isinstance(spec.init_from, dict) and all(isinstance(spec.init_from.get(n), str) for n in spec.names)
          and positive_int(spec.rank) and positive_int(spec.head_rank)
          and isinstance(spec.alpha, (int, float)) and not isinstance(spec.alpha, bool) and np.isfinite(spec.alpha)
          and isinstance(spec.base_sha256, str) and strings(spec.requires)
          and (spec.max_hits is None or positive_int(spec.max_hits)))
    if not ok:
        raise CalofmError(f"{directory}: malformed adapter manifest: \"spec\" needs kind material/particle, a list "
                          f"of names, init_from for each, positive integer ranks, a finite alpha, max_hits absent "
                          f"or a positive integer ({manifest['spec']})")
    return spec


def apply_adapter(shower_model, directory: str) -> dict:
    """Load an adapter directory onto a ShowerModel (after checking it belongs there); returns its manifest."""
    from calofm.checkpoint import _load_tensors

    manifest = read_adapter_manifest(directory)
    spec = _read_spec(directory, manifest)
    if spec.base_sha256 != base_sha256(shower_model):
        raise CalofmError(f"{directory}: adapter made for another base model (base sha256 {spec.base_sha256[:12]}, "
                          f"this model {base_sha256(shower_model)[:12]})")
    applied = applied_sha256(shower_model)
    if [s for s in applied if s in spec.requires] != spec.requires:
        raise CalofmError(f"{directory}: adapter was trained on top of adapters {[s[:12] for s in spec.requires]}, "
                          f"but {[s[:12] for s in applied]} are applied; give those first, in that order")
    n_voxels = shower_model.tokenizer.geometry.n_voxels
    if spec.max_hits is not None and spec.max_hits > n_voxels:  # bounds the position tables attach grows
        raise CalofmError(f"{directory}: max_hits {spec.max_hits} exceeds the model's {n_voxels} voxels")
    weights = os.path.join(directory, manifest["weights"]["file"])
    if not os.path.isfile(weights) or sha256_file(weights) != manifest["weights"]["sha256"]:
        raise CalofmError(f"{weights}: missing, or its sha256 does not match the adapter manifest")
    known = shower_model.tokenizer.materials.names() if spec.kind == "material" else shower_model.tokenizer.particles.names()
    clash = [n for n in spec.names if n in known]
    if clash:
        raise CalofmError(f"{directory}: the model already knows {clash}")
    try:
        totals = ShowerTotals.from_dict(manifest.get("totals"))
        for name in spec.names:  # the known class each new one starts from
            (shower_model.tokenizer.material_id if spec.kind == "material" else shower_model.tokenizer.particle_id)(
                spec.init_from[name])
    except (AttributeError, CalofmError) as exc:
        raise CalofmError(f"{directory}: malformed adapter manifest ({exc})") from None
    tensors = _load_tensors(weights, "adapter weights")
    largest = max((max(t.shape, default=1) for t in tensors.values()), default=0)
    if max(spec.rank, spec.head_rank if spec.kind == "particle" else 0) > largest:  # bounds what attach allocates
        raise CalofmError(f"{directory}: rank {spec.rank} / head_rank {spec.head_rank} exceed every tensor in {weights}")
    try:
        params = attach(shower_model, spec)
    except CalofmError as exc:  # e.g. a name given twice
        raise CalofmError(f"{directory}: cannot attach the adapter ({exc})") from None
    if set(tensors) != set(params) or any(tensors[k].shape != params[k].shape for k in params):
        raise CalofmError(f"{weights}: tensors do not match the adapter's modules")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k])
            p.requires_grad_(False)
    # the new classes' hit-count / E_vis laws (two-stage generation); adapters from before have none
    shower_model.tokenizer.totals.update(totals)
    shower_model.adapter_sha256 = applied_sha256(shower_model) + [manifest["weights"]["sha256"]]
    shower_model.adapter_manifests = getattr(shower_model, "adapter_manifests", []) + [manifest]
    return manifest


def check_new_names(shower_model, kind: str, names: list[str]) -> list[str]:
    """Canonical names, refusing ones the model already knows."""
    if kind == "material":
        canon = [get_material(n).name for n in names]
        known = shower_model.tokenizer.materials.names()
    else:
        canon = [canonical_particle(n) for n in names]
        known = shower_model.tokenizer.particles.names()
    clash = [n for n in canon if n in known]
    if clash:
        raise CalofmError(f"the model already knows {kind} {', '.join(clash)}; extend with something new")
    if len(set(canon)) != len(canon):
        raise CalofmError(f"{kind} given twice: {canon}")
    return canon
