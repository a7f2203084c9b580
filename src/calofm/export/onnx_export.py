"""`calofm export --format onnx`: one folder per class (material, particle) with

    prefill.onnx   incident (B,) -> h (B, d), present_key_i / present_value_i (B, H, 2, D): cache
                   slots 0 and 1
    step.onnx      one hit of every row: h, hits, t, done, u, log_min_p, temperature, past_key_i /
                   past_value_i (B, H, S, D) -> voxel, energy, done_out, h_out, present_key_i /
                   present_value_i (B, H, D)
    calofm.json    what a host needs besides: token ids, vocabulary blocks, energy bins (edges and
                   centres in MeV), geometry and voxel order, max_hits, cache layout, sampling defaults

(graphs.py says what the graphs compute; onnx_runtime.py is the reference host loop; docs/export.md
the layout and a host loop in pseudo-code). The graphs are fp32, exported with torch.onnx.export's
dynamo exporter (onnxscript), batch and cache width dynamic.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings

import numpy as np
import torch

from calofm.errors import CalofmError
from calofm.export.graphs import ClassLayers, Prefill, Step
from calofm.export.onnx_runtime import SPEC_FILE, WINDOW
from calofm.generation.sampler import SamplingConfig
from calofm.tokenizer import BOS, EOS, PAD, SPECIALS

FORMAT = "calofm-onnx"
OPSET = 18


def require_onnx() -> None:
    """A CalofmError naming the extra to install when the exporter's packages are missing."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise CalofmError("ONNX export needs onnx and onnxscript: pip install 'calofm[onnx]'") from None


def class_folder_name(material: str, particle: str) -> str:
    return f"{material}_{particle}".replace(os.sep, "-")


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's log lines about torchvision ops it skips (calofm uses none) off while it runs."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _export(module: torch.nn.Module, args: tuple, path: str, input_names: list[str], output_names: list[str],
            dynamic: dict[str, dict[int, str]]) -> None:
    """torch.onnx.export (dynamo) of module(*args) to path, the axes in `dynamic` symbolic."""
    from torch.export import Dim

    dims: dict[str, Dim] = {}

    def shape(name: str):
        axes = dynamic.get(name, {})
        return {axis: dims.setdefault(d, Dim(d, min=2 if d == "slots" else 1, max=1 << 20))
                for axis, d in axes.items()} or None
    # inputs past the module's named arguments come as one list (Step's cache)
    n_named = len(args) - (1 if isinstance(args[-1], list) else 0)
    shapes = tuple(shape(n) for n in input_names[:n_named])
    if n_named < len(args):
        shapes += ([shape(n) for n in input_names[n_named:]],)
    with torch.no_grad(), warnings.catch_warnings(), _quiet_exporter():
        # the exporter's notes on axis names shared by several inputs (on purpose) and pytree deprecations
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(module, args, dynamic_shapes=shapes, input_names=input_names,
                                    output_names=output_names, opset_version=OPSET, dynamo=True, optimize=True,
                                    verbose=False, report=False)
    program.save(path)


def describe(shower_model, material: str, particle: str, n_attn: int) -> dict:
    """The JSON of one exported class: what turns the graphs' tokens into cell energies."""
    tok, cfg = shower_model.tokenizer, shower_model.model.cfg
    bins, geo = tok.bins, tok.geometry
    edges = bins.edges
    order = "layer, y, x" if geo.grid.kind == "cartesian" else "layer, alpha, r"
    return {
        "format": FORMAT, "version": 1,
        "model": {"name": os.path.basename(os.path.normpath(shower_model.path or "")), "sha256": shower_model.manifest.get("weights", {}).get("sha256", ""),
                  "adapters": [vars(s) for s in getattr(shower_model, "adapters", [])]},
        "class": {"material": material, "material_id": tok.material_id(material), "particle": particle,
                  "particle_id": tok.particle_id(particle)},
        "graphs": {"prefill": "prefill.onnx", "step": "step.onnx", "opset": OPSET, "dtype": "float32"},
        "incident_feature": "log10(E_MeV) - 4, as float32 (E_MeV the incident energy in MeV)",
        "tokens": {"specials": dict(zip(SPECIALS, (PAD, BOS, EOS))),
                   "voxel_block": tok.voxel_block.to_dict(), "energy_block": tok.energy_block.to_dict(),
                   "vocabularies": {v.name: v.to_dict() for v in (tok.voxels, tok.energies, tok.materials,
                                                                   tok.particles)},
                   "voxel": "voxel index = token - voxel_block.offset", "energy": "bin = token - energy_block.offset"},
        "energy_bins": {**bins.to_dict(), "log_step": bins.log_step, "edges_MeV": edges.tolist(),
                        "centres_MeV": np.sqrt(edges[:-1] * edges[1:]).tolist(),
                        "decode": "E = e_min_MeV * exp(log_step * (bin + w)), w = 0.5 (centre) or uniform in [0, 1)"},
        "geometry": {**geo.to_dict(), "n_layers": geo.n_layers, "cells_per_layer": list(geo.cells_per_layer),
                     "n_voxels": geo.n_voxels, "voxel_order": order},
        "max_hits": tok.max_hits,
        "cache": {"n_attentions": n_attn, "n_heads": cfg.n_heads, "head_dim": cfg.head_dim, "d_model": cfg.d_model,
                  "layout": "per attention i: past_key_i, past_value_i (B, n_heads, S, head_dim); slots 0, 1 from "
                            "the prefill, slot t + 2 written by step t; S >= t + 2 (slots >= t + 2 are masked)",
                  "window": WINDOW},
        "sampling": {head: {"min_p": shower_model.min_p[head],
                            "log_min_p": SamplingConfig(min_p=shower_model.min_p[head]).log_min_p}
                     for head in ("voxel", "energy")} | {"temperature": 1.0},
        "uniforms": {"n_draws": 2, "order": ["voxel", "energy"],
                     "use": "step t reads u[:, 0] for the voxel and u[:, 1] for the energy of every row"},
    }


def export_class(shower_model, material: str, particle: str, folder: str) -> dict:
    """Write prefill.onnx, step.onnx and calofm.json of one class into `folder` (created)."""
    require_onnx()
    net, tok = shower_model.model, shower_model.tokenizer
    if net.training:
        raise CalofmError("export a model in eval mode")
    layers = ClassLayers(net, tok.material_id(material), tok.particle_id(particle))
    cfg, n_attn = net.cfg, len(net.attentions())
    B, S, N, H, D = 3, 5, tok.max_hits, cfg.n_heads, cfg.head_dim
    os.makedirs(folder, exist_ok=True)
    kv_names = [f"{kind}_{i}" for i in range(n_attn) for kind in ("key", "value")]  # the exporter names values value_N

    prefill = Prefill(layers).eval()
    _export(prefill, (torch.zeros(B),), os.path.join(folder, "prefill.onnx"), ["incident"],
            ["h", *[f"present_{n}" for n in kv_names]],
            {"incident": {0: "batch"}})

    step = Step(layers, tok.voxel_block, tok.energy_block).eval()
    past_names = [f"past_{n}" for n in kv_names]
    args = (torch.zeros(B, cfg.d_model), torch.full((B, N), PAD, dtype=torch.long), torch.tensor(1),
            torch.zeros(B, dtype=torch.bool), torch.full((B, 2), 0.5), torch.zeros(2), torch.ones(1),
            [torch.zeros(B, H, S, D) for _ in past_names])
    dynamic = {"h": {0: "batch"}, "hits": {0: "batch"}, "done": {0: "batch"}, "u": {0: "batch"},
               **{n: {0: "batch", 2: "slots"} for n in past_names}}
    _export(step, args, os.path.join(folder, "step.onnx"),
            ["h", "hits", "t", "done", "u", "log_min_p", "temperature", *past_names],
            ["voxel", "energy", "done_out", "h_out", *[f"present_{n}" for n in kv_names]], dynamic)
    spec = describe(shower_model, material, particle, n_attn)
    with open(os.path.join(folder, SPEC_FILE), "w") as fh:
        json.dump(spec, fh, indent=1)
    return spec


def export_onnx(shower_model, out: str, classes: list[tuple[str, str]], force: bool = False,
                log=print) -> list[str]:
    """Export each class (material, particle) into out/<material>_<particle>/, written in a temporary
    folder beside `out` and moved in place at the end (an existing export is replaced only with force,
    nothing else ever); out/manifest.json lists the classes."""
    from calofm.outputs import check_output_dir

    cfg = shower_model.model.cfg
    if cfg.voxel_head == "factorized" or cfg.running_inputs:
        raise CalofmError("the ONNX export covers the flat and geometric voxel heads without running inputs; "
                          f"this model has voxel_head={cfg.voxel_head!r}, running_inputs={cfg.running_inputs}")
    check_output_dir(out, force, "export folder", fmt=FORMAT)
    parent = os.path.dirname(os.path.abspath(out))
    tmp = tempfile.mkdtemp(prefix=".calofm-export-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # a folder as mkdir makes it (mkdtemp's is private)
    try:
        folders = []
        for material, particle in classes:
            name = class_folder_name(material, particle)
            export_class(shower_model, material, particle, os.path.join(tmp, name))
            folders.append(os.path.join(out, name))
            log(f"exported {material} {particle} -> {folders[-1]}")
        index = {"format": FORMAT, "classes": [{"material": m, "particle": p, "folder": class_folder_name(m, p)}
                                               for m, p in classes]}
        with open(os.path.join(tmp, "manifest.json"), "w") as fh:
            json.dump(index, fh, indent=1)
        old = None
        if os.path.exists(out):  # the earlier export steps aside until the new one is in place
            old = tempfile.mkdtemp(prefix=".calofm-export-old-", dir=parent)
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folders
