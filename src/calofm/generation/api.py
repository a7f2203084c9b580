"""Python API, mirroring the command line:

    import calofm
    model = calofm.load("calofm-small", adapters=["Pb", "e-"])   # a shipped model by name, or a directory
    model = calofm.load("runs/base")                    # verifies the weight hash
    incident_MeV, showers = model.generate(1000, material="W", particle="gamma",
                                           energy_GeV=(10, 100), seed=1)
    model.generate(10000, material="Ta", output="gen.h5")  # same HDF5 layout as `calofm simulate`
    model.close()                                       # releases the decoder's caches (and CUDA graphs)
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from calofm import __version__
from calofm.checkpoint import load_model
from calofm.data.showers import ShowerWriter
from calofm.detector.geometry import Geometry
from calofm.device import pick_device
from calofm.errors import CalofmError
from calofm.extension.adapters import apply_adapter
from calofm.generation.decode import DecodeOptions, Decoder
from calofm.generation.sampler import SamplingConfig, head_samplings, min_p_defaults
from calofm.generation.streams import INCIDENT, SMEAR, TOTALS, decode_uniforms, shower_normals, shower_uniforms
from calofm.model import ShowerTransformer
from calofm.pretrained import DEFAULT_MODEL, resolve_adapter, resolve_model
from calofm.simulation.runner import energies_from_uniforms, parse_energy
from calofm.tokenizer import ShowerTokenizer, canonical_particle, incident_feature
from calofm.tokenizer.totals import class_key, rescale_to_total, totals_mode


class ShowerModel:
    """A trained model with its tokenizer and manifest, and the decoder that generates with it."""

    def __init__(self, model: ShowerTransformer, tokenizer: ShowerTokenizer, manifest: dict, path: str | None = None):
        self.model, self.tokenizer, self.manifest, self.path = model.eval(), tokenizer, manifest, path
        try:  # the min-p cuts tuned for these weights (docs/model.md, "Min-p truncation"), else the defaults
            self.min_p = min_p_defaults(manifest.get("min_p"), f"{path or 'model'} manifest")
        except ValueError as err:
            raise CalofmError(str(err)) from None
        self.decoder = Decoder(model)
        self.last_stats: dict = {}

    def close(self) -> None:
        """Release what the decoder keeps between calls (on a GPU: the static step's caches and graphs,
        about twice the KV cache of the largest batch); generate() works again after."""
        self.decoder.close()

    @property
    def materials(self) -> list[str]:
        return self.tokenizer.materials.names()

    @property
    def particles(self) -> list[str]:
        return self.tokenizer.particles.names()

    @property
    def geometry(self) -> Geometry:
        return self.tokenizer.geometry

    @property
    def device(self) -> torch.device:
        return self.model.ln_f.weight.device

    def generate(self, n: int, material: str = "W", particle: str = "gamma", energy_GeV=(10.0, 100.0),
                 spectrum: str = "uniform", seed: int = 0, incident_MeV: np.ndarray | None = None,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 min_p_voxel: float | None = None, min_p_energy: float | None = None, batch_size: int = 256,
                 output: str | None = None, progress: bool = False, options: DecodeOptions | None = None,
                 totals: bool | str = False, start: int = 0, progress_tag: str = "") -> tuple[np.ndarray, np.ndarray]:
        """Generate n showers: (incident energies (n,) MeV, cell energies (n, n_voxels) MeV), float32.

        Showers start, ..., start + n - 1 of the run of this seed: shower i draws every random number
        (its incident energy, its totals, its tokens, its energies inside their bins) from (seed, i)
        alone (calofm.generation.streams), so it does not depend on batch_size or on how the run is
        split into shards (in fp32 on CPU, token for token; tests/test_generation.py).

        Incident energies are drawn like `calofm simulate` does (energy_GeV 'E' or (Emin, Emax),
        spectrum 'uniform' or 'log') unless given explicitly. Cell energies are decoded log-uniformly
        within their bins. With `output`, the showers are also written to that HDF5 file. `options`:
        how to decode, calofm.generation.DecodeOptions (default: fp32, compaction, no torch.compile, the
        static CUDA-graph step on a CUDA device).
        temperature, top_k, top_p apply to both heads; min_p_voxel / min_p_energy drop each head's
        tokens less probable than that fraction of its most probable one (None: the model's own, self.min_p,
        chosen by a fidelity study; 0 turns it off). The output file
        records the voxel head's settings as `sampling`, the energy head's as `energy_sampling`.
        `totals` (calofm.tokenizer.totals, docs/model.md; the modes in TOTALS_MODES): "energy" decodes
        freely, then draws each shower's visible energy from the fitted law of E_vis given its hit
        count and rescales the hits to it; "hits+energy" (or True) draws both first and holds the
        decoder to that count, which hurts the shower shape where showers leak (Cu: high-level AUC
        0.65 -> 0.86). False / "off": one stage. progress_tag: the progress line's prefix."""
        totals = totals_mode(totals)
        if not 0 <= start <= 2 ** 32 - max(n, 1):
            raise CalofmError(f"first shower index must be within [0, 2^32 - n], got {start}")
        mat_id, par_id = self.tokenizer.material_id(material), self.tokenizer.particle_id(particle)
        material = self.materials[mat_id]  # canonical spelling (names are listed in id order)
        key = class_key(material, self.particles[par_id])
        max_hits = self.tokenizer.class_max_hits(material, particle)  # an adapter's class: the adapter's cap
        if totals != "off" and key not in self.tokenizer.totals:
            raise CalofmError(f"the model has no shower totals for {key} (calofm fit-totals adds them)")
        if incident_MeV is None:
            if n <= 0:
                raise CalofmError(f"number of showers must be > 0, got {n}")
            energy = parse_energy(energy_GeV)
            u = shower_uniforms(seed, np.arange(start, start + n), INCIDENT, 1, torch.float64)[:, 0].numpy()
            incident_MeV = energies_from_uniforms(u, energy, spectrum)
        incident_MeV = np.asarray(incident_MeV, dtype=np.float32).reshape(-1)
        index = np.arange(start, start + len(incident_MeV))  # the showers' indices in the run
        if len(incident_MeV) == 0 or not np.all(np.isfinite(incident_MeV)) or np.any(incident_MeV <= 0):
            raise CalofmError("incident energies must be finite and > 0")
        if batch_size <= 0:
            raise CalofmError(f"batch size must be > 0, got {batch_size}")
        try:
            sampling, energy_sampling = head_samplings(temperature, top_k, top_p, min_p_voxel, min_p_energy,
                                                       self.min_p)
        except ValueError as err:
            raise CalofmError(str(err)) from None
        greedy = max(sampling.temperature, energy_sampling.temperature) == 0
        if totals != "off":
            normals = shower_normals(seed, index, TOTALS, 2).numpy()
        if totals == "hits+energy":
            target_hits, ratio = self.tokenizer.totals.sample(key, incident_MeV, normals=normals)
            target_hits = np.minimum(target_hits, max_hits)
        showers, n_capped, n_hits = [], 0, 0
        bar = tqdm(total=len(incident_MeV), unit="shower", desc=f"{progress_tag}generate {material} {particle}",
                   dynamic_ncols=True, disable=not progress)
        for lo in range(0, len(incident_MeV), batch_size):
            e, rows = incident_MeV[lo:lo + batch_size], index[lo:lo + batch_size]
            b = len(e)
            uniforms = None if greedy else decode_uniforms(seed, rows, max_hits, self.decoder.draws_per_step,
                                                           self.device)
            res = self.decoder.decode(
                torch.from_numpy(incident_feature(e)).to(self.device), torch.full((b,), mat_id, device=self.device),
                torch.full((b,), par_id, device=self.device), max_hits, self.tokenizer.voxel_block,
                self.tokenizer.energy_block, sampling, uniforms, options,
                torch.from_numpy(target_hits[lo:lo + b]).to(self.device) if totals == "hits+energy" else None,
                energy_sampling)
            batch = self.tokenizer.decode_padded(res.voxel_tokens.cpu().numpy(), res.energy_tokens.cpu().numpy(),
                                                 mode="uniform", u=shower_uniforms(seed, rows, SMEAR, max_hits).numpy())
            if totals == "energy":
                batch = self.energy_given_hits(key, e, batch, normals[lo:lo + b])
            elif totals == "hits+energy":
                batch = rescale_to_total(batch, ratio[lo:lo + b] * e, self.tokenizer.totals.min_hit_MeV(key))
            showers.append(batch)
            n_capped += int(res.capped.sum())
            n_hits += int(res.n_hits.sum())
            bar.update(b)
        bar.close()
        showers = np.concatenate(showers)
        self.last_stats = {"n_showers": len(showers), "mean_hits": n_hits / len(showers), "n_capped": n_capped,
                           "max_hits": max_hits, "totals": totals}
        if output is not None:
            self.write(output, incident_MeV, showers, material, particle, seed, sampling, energy_sampling)
        return incident_MeV, showers

    def energy_given_hits(self, key: str, incident_MeV: np.ndarray, showers: np.ndarray,
                          normals: np.ndarray) -> np.ndarray:
        """totals="energy" on decoded showers (N, n_voxels) of class `key` ("material/particle"): each one's
        hits rescaled to E_vis drawn from the fitted totals law given its hit count, with two standard
        normals per shower (N, 2); generate() passes those of the shower's own random stream."""
        ratio = self.tokenizer.totals.sample_ratio_given_hits(key, incident_MeV, (showers > 0).sum(1), normals)
        return rescale_to_total(showers, ratio * incident_MeV, self.tokenizer.totals.min_hit_MeV(key))

    def write(self, path: str, incident_MeV, showers, material: str, particle: str, seed: int,
              sampling: SamplingConfig | None = None, energy_sampling: SamplingConfig | None = None,
              attrs: dict | None = None) -> None:
        """Write showers as generate(output=...) does; attrs: more file attributes (a shard's)."""
        energy_sampling = energy_sampling or sampling  # one config: both heads
        digest = self.manifest.get("weights", {}).get("sha256", "")[:12]
        extra = {"model_sha256": self.manifest.get("weights", {}).get("sha256", ""),
                 "sampling": {} if sampling is None else vars(sampling),
                 "energy_sampling": {} if energy_sampling is None else vars(energy_sampling), **self.last_stats,
                 **(attrs or {})}
        with ShowerWriter(path, self.geometry.with_absorber(material), material, canonical_particle(particle),
                          f"calofm {__version__} next-token model {digest}", seed, extra_attrs=extra) as w:
            w.write(incident_MeV, showers)

    def __repr__(self) -> str:
        return (f"ShowerModel({self.path!r}: {self.model.num_parameters() / 1e6:.2f}M parameters, materials "
                f"{self.materials}, particles {self.particles}, geometry {self.geometry.name!r})")


def load(name_or_path: str = DEFAULT_MODEL, adapters: list[str] | tuple[str, ...] = (), device: str = "cpu") -> ShowerModel:
    """A shipped model by name (calofm.pretrained) or a model directory written by `calofm train` (or its
    run directory), after checking its weight hash, with adapter directories (or the names of the
    model's shipped adapters) applied in order."""
    path = resolve_model(name_or_path)
    model, tokenizer, manifest = load_model(path, pick_device(device))
    shower_model = ShowerModel(model, tokenizer, manifest, path)
    for adapter in adapters:
        apply_adapter(shower_model, resolve_adapter(path, adapter))
    shower_model.model.eval()
    return shower_model
