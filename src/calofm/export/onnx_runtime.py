"""The reference host loop: decode showers with onnxruntime from an exported class folder
(onnx_export.py), given the uniforms, token for token as generation.decode does in PyTorch (fp32).

    run = OnnxDecoder("export/W_gamma")                      # prefill.onnx, step.onnx, calofm.json
    u = decode_uniforms(seed, showers, run.max_hits, DRAWS_PER_STEP).numpy()  # generation.streams
    result = run.decode(incident_feature(incident_MeV), u)   # voxel/energy tokens (B, max_hits), ...
    cells = run.cells(result, shower_uniforms(seed, showers, SMEAR, run.max_hits).numpy())  # (B, n_voxels) MeV

The uniforms are the decoder's table (B, steps, draws per step): shower i's draws at step t are
[i, t, DRAW_VOXEL] and [i, t, DRAW_ENERGY] (generation.decode); steps >= the steps decoded (max_hits
covers every shower). With the tables of generation.streams, the showers are calofm generate's.
What a C++ host does is the same loop (docs/export.md):
- the cache of each attention is an array (B, H, W, D), W a multiple of WINDOW slots covering the
  filled ones (prefill fills slots 0 and 1, step t writes slot t + 2), widened by WINDOW slots when
  full: every step reads it in place, and attention skips most of the empty slots;
- finished showers leave the batch (their rows of every array) once COMPACT_FRACTION of the rows in
  flight have finished, as the eager PyTorch decoder does.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from calofm.errors import CalofmError
from calofm.generation.decode import COMPACT_FRACTION, COMPACT_MIN_ROWS, DRAW_ENERGY, DRAW_VOXEL, DRAWS_PER_STEP
from calofm.generation.streams import INCIDENT, SMEAR, decode_uniforms, shower_uniforms
from calofm.simulation.runner import energies_from_uniforms, parse_energy
from calofm.tokenizer import PAD, incident_feature

WINDOW = 64  # cache slots added at a time
SPEC_FILE = "calofm.json"


@dataclass
class OnnxResult:
    """As generation.decode.DecodeResult, in numpy."""

    voxel_tokens: np.ndarray  # (B, max_hits) int64, PAD after the shower's last hit
    energy_tokens: np.ndarray  # (B, max_hits)
    n_hits: np.ndarray  # (B,)
    capped: np.ndarray  # (B,) bool: reached max_hits without choosing EOS


def ort_session(path: str, threads: int = 1):
    """An onnxruntime CPU session of one graph, all graph optimizations on."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise CalofmError("onnxruntime is not installed: pip install 'calofm[onnx]'") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


class OnnxDecoder:
    """The exported graphs of one class in onnxruntime, and the host loop around them."""

    def __init__(self, folder: str, threads: int = 1):
        path = os.path.join(folder, SPEC_FILE)
        try:
            with open(path) as fh:
                self.spec = json.load(fh)
        except (OSError, ValueError) as exc:
            raise CalofmError(f"{folder}: no readable {SPEC_FILE} ({exc}); write one with calofm export") from None
        self.prefill = ort_session(os.path.join(folder, self.spec["graphs"]["prefill"]), threads)
        self.step = ort_session(os.path.join(folder, self.spec["graphs"]["step"]), threads)
        cache = self.spec["cache"]
        self.n_attn, self.n_heads, self.head_dim = cache["n_attentions"], cache["n_heads"], cache["head_dim"]
        self.max_hits = self.spec["max_hits"]
        self.sampling = self.spec["sampling"]

    def decode(self, incident: np.ndarray, uniforms: np.ndarray, min_p_voxel: float | None = None,
               min_p_energy: float | None = None, temperature: float = 1.0, compact: bool = True) -> OnnxResult:
        """incident (B,) float32 log10(E / 10 GeV) (tokenizer.incident_feature), uniforms (B, steps, draws)
        float32 -> tokens. min_p per head: None takes the export's default (the model's, ShowerModel.min_p)."""
        incident = np.ascontiguousarray(incident, dtype=np.float32).reshape(-1)
        B, max_hits = len(incident), self.max_hits
        uniforms = np.asarray(uniforms, dtype=np.float32)
        if uniforms.ndim != 3 or uniforms.shape[0] != B or uniforms.shape[2] < 2:
            raise CalofmError(f"uniforms must be (B={B}, steps, draws per step >= 2), got {uniforms.shape}")
        uniforms = uniforms[:, :, [DRAW_VOXEL, DRAW_ENERGY]]  # the step's u: (voxel, energy)
        if not temperature > 0:
            raise CalofmError(f"the exported step samples with a temperature > 0, got {temperature}")
        lmp = []
        for head, value in (("voxel", min_p_voxel), ("energy", min_p_energy)):
            value = self.sampling[head]["min_p"] if value is None else value
            if not 0 <= value <= 1:
                raise CalofmError(f"min_p_{head} must be within [0, 1], got {value}")
            lmp.append(math.log(value) if value > 0 else -math.inf)  # SamplingConfig.log_min_p, rounded to fp32
        fixed = {"log_min_p": np.array(lmp, dtype=np.float32), "temperature": np.array([temperature], dtype=np.float32)}

        # as the PyTorch decoder: at least COMPACT_MIN_ROWS rows (the CPU's matrix kernels may round 1-3
        # rows differently), the extra rows finished from the start
        B0 = max(B, COMPACT_MIN_ROWS)
        incident = np.concatenate([incident, np.repeat(incident[:1], B0 - B)])
        uniforms = np.concatenate([uniforms, np.repeat(uniforms[:1], B0 - B, axis=0)])
        h, *kv = self.prefill.run(None, {"incident": incident})
        width = WINDOW
        cache = [np.zeros((B0, self.n_heads, width, self.head_dim), dtype=np.float32) for _ in kv]
        for buf, x in zip(cache, kv):
            buf[:, :, :2] = x
        hits = np.full((B0, max_hits), PAD, dtype=np.int64)
        done = np.arange(B0) >= B
        rows = np.arange(B0)  # the original row of each row in flight
        out_v, out_e = (np.full((B0, max_hits), PAD, dtype=np.int64) for _ in range(2))
        capped = np.zeros(B0, dtype=bool)
        for t in range(max_hits + 1):
            if t == max_hits:  # EOS forced
                capped[rows] = ~done
                break
            if t >= uniforms.shape[1]:
                raise CalofmError(f"uniforms for {uniforms.shape[1]} steps, the decode needs more")
            if t + 3 > width:  # slot t + 2 is written: widen the cache
                width += WINDOW
                cache = [np.concatenate([c, np.zeros(c.shape[:2] + (WINDOW,) + c.shape[3:], np.float32)], axis=2)
                         for c in cache]
            feeds = {"h": h, "hits": hits, "t": np.array(t, dtype=np.int64), "done": done,
                     "u": np.ascontiguousarray(uniforms[rows, t]), **fixed}
            for i in range(self.n_attn):
                feeds[f"past_key_{i}"], feeds[f"past_value_{i}"] = cache[2 * i], cache[2 * i + 1]
            v, e, done, h, *new = self.step.run(None, feeds)
            n_done = int(done.sum())
            if n_done == len(done):
                break
            out_v[rows, t], out_e[rows, t], hits[:, t] = v, e, v
            for buf, x in zip(cache, new):
                buf[:, :, t + 2] = x
            if compact and n_done >= COMPACT_FRACTION * len(done) and len(done) - n_done >= COMPACT_MIN_ROWS:
                keep = ~done
                rows, h, hits, done = rows[keep], h[keep], hits[keep], done[keep]
                cache = [np.ascontiguousarray(c[keep]) for c in cache]
        out_v, out_e, capped = out_v[:B], out_e[:B], capped[:B]
        return OnnxResult(out_v, out_e, (out_v != PAD).sum(axis=1), capped)

    def cells(self, result: OnnxResult, u: np.ndarray | None = None) -> np.ndarray:
        """Tokens -> cell energies (B, n_voxels) MeV from the JSON alone: each energy at position u
        (B, max_hits) inside its bin's logarithm (calofm generate's: the SMEAR stream of
        generation.streams), or at the bin's centre without u (tokenizer.decode_padded)."""
        vox, en = self.spec["tokens"]["voxel_block"], self.spec["tokens"]["energy_block"]
        bins = self.spec["energy_bins"]
        v, e = result.voxel_tokens - vox["offset"], result.energy_tokens - en["offset"]
        ok = (v >= 0) & (v < vox["size"]) & (e >= 0) & (e < en["size"])
        w = 0.5 if u is None else np.asarray(u, dtype=np.float64)[ok]
        out = np.zeros((len(v), vox["size"]), dtype=np.float32)
        rows = np.broadcast_to(np.arange(len(v))[:, None], v.shape)
        out[rows[ok], v[ok]] = (bins["e_min_MeV"] * np.exp(bins["log_step"] * (e[ok] + w))).astype(np.float32)
        return out

    def generate(self, n: int, seed: int = 0, energy_GeV=(10.0, 100.0), spectrum: str = "uniform",
                 batch_size: int = 256, start: int = 0, **sampling) -> tuple[np.ndarray, np.ndarray, OnnxResult]:
        """calofm generate's showers start..start+n-1 of the run of `seed` for this class, through the
        graphs (every random number from generation.streams, as ShowerModel.generate draws it) ->
        (incident energies (n,) MeV, cells (n, n_voxels) MeV, the last batch's tokens). sampling: decode's
        min_p_voxel, min_p_energy, temperature."""
        index = np.arange(start, start + n)
        u = shower_uniforms(seed, index, INCIDENT, 1, torch.float64)
        incident = energies_from_uniforms(u[:, 0].numpy(), parse_energy(energy_GeV), spectrum).astype(np.float32)
        cells, result = [], None
        for lo in range(0, n, batch_size):
            rows = index[lo:lo + batch_size]
            table = decode_uniforms(seed, rows, self.max_hits, DRAWS_PER_STEP).numpy()
            result = self.decode(incident_feature(incident[lo:lo + batch_size]), table, **sampling)
            cells.append(self.cells(result, shower_uniforms(seed, rows, SMEAR, self.max_hits).numpy()))
        return incident, np.concatenate(cells), result
