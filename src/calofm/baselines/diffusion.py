"""A CaloDiffusion-style baseline: denoising diffusion on the voxel grid.

The standard generative approach that calofm's next-token model is compared against, trained on the
same files and judged by the same `calofm evaluate`. Following CaloDiffusion (arXiv:2308.03876) in
kind, not in code:
- the shower is an image: layers are channels, (y, x) the image plane (Cartesian geometries only);
- voxel energies are preprocessed to u = 2 log1p(E / eps) / log1p(E_max / eps) - 1, so empty cells
  sit at -1 and the heavy-tailed cell spectrum becomes roughly uniform;
- a small U-Net, conditioned (FiLM) on the diffusion time, log E_inc and the material, predicts
  v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho's velocity; `prediction="v"`, the default for new
  models) or the noise eps (`prediction="eps"`, the first baselines). With eps the clean image is
  eps's error amplified by sqrt((1 - a) / a), up to ~300x at the start of sampling: an undertrained
  eps-model's first steps put signal in most empty cells and the chain never removes it (2 400 cells
  above threshold where the data have 185). v keeps the x0 error bounded at every noise level;
- cosine noise schedule over 400 steps (CaloDiffusion's usual count);
- sampling by DDPM ancestral steps (all 400) or by deterministic DDIM with fewer steps; the clean
  image is clipped to [-1, 1] at each step and the noise re-derived from the clipped image;
- after sampling, cells below the readout threshold seen in the training data are set to zero.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from calofm.detector.geometry import Geometry
from calofm.errors import CalofmError

EPS_MEV = 0.01  # energy scale of the log transform, well below the 0.1 MeV readout threshold
PREDICTIONS = ("eps", "v")


@dataclass
class DiffusionConfig:
    n_layers: int = 20
    ny: int = 15
    nx: int = 15
    materials: list[str] = field(default_factory=lambda: ["W"])
    channels: int = 64
    timesteps: int = 400
    log_max: float = 10.0  # log1p(E_max / eps), from the training data
    threshold_MeV: float = 0.05  # smallest non-zero cell in the training data
    log_e_min: float = math.log(10.0)  # GeV, range of the conditioning energy
    log_e_max: float = math.log(100.0)
    prediction: str = "eps"  # what the network outputs: "eps" (noise) or "v" (velocity)

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise CalofmError(f"unknown diffusion prediction {self.prediction!r} ({', '.join(PREDICTIONS)})")

    @property
    def size(self) -> int:  # padded image side: the U-Net halves it twice
        return 4 * math.ceil(max(self.ny, self.nx) / 4)


def cosine_alpha_bar(timesteps: int) -> torch.Tensor:
    """Cumulative signal fraction alpha_bar(t), t = 1..T (Nichol & Dhariwal's cosine schedule); (T + 1,)."""
    s = 0.008
    t = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (f / f[0]).clamp(min=1e-5).float()


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, c_cond: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(c_cond, 2 * c_out)
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, cond):  # x (B, C, H, W), cond (B, c_cond)
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(cond)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class DiffusionUNet(nn.Module):
    """Two-level U-Net over (layers as channels) x (y, x); predicts the noise."""

    def __init__(self, cfg: DiffusionConfig):
        super().__init__()
        self.cfg = cfg
        c, cc = cfg.channels, 4 * cfg.channels
        self.material_emb = nn.Embedding(len(cfg.materials), cc)
        self.cond = nn.Sequential(nn.Linear(2 * 32 + cc, cc), nn.SiLU(), nn.Linear(cc, cc))
        self.inp = nn.Conv2d(cfg.n_layers, c, 3, padding=1)
        self.down1, self.down2 = ResBlock(c, c, cc), ResBlock(c, 2 * c, cc)
        self.mid1, self.mid2 = ResBlock(2 * c, 2 * c, cc), ResBlock(2 * c, 2 * c, cc)
        self.up2, self.up1 = ResBlock(4 * c, c, cc), ResBlock(2 * c, c, cc)
        self.out = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, cfg.n_layers, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    @staticmethod
    def _fourier(x: torch.Tensor, n: int = 32) -> torch.Tensor:  # (B,) -> (B, n)
        freqs = torch.exp(torch.linspace(0, math.log(1000.0), n // 2, device=x.device))
        angles = x[:, None] * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    def forward(self, x, t, log_e, material):  # x (B, L, S, S); t in [0, 1]; log_e normalized to [0, 1]
        cond = self.cond(torch.cat([self._fourier(t), self._fourier(log_e), self.material_emb(material)], 1))
        h0 = self.down1(self.inp(x), cond)  # (B, c, S, S)
        h1 = self.down2(F.avg_pool2d(h0, 2), cond)  # (B, 2c, S/2, S/2)
        m = self.mid2(self.mid1(F.avg_pool2d(h1, 2), cond), cond)  # (B, 2c, S/4, S/4)
        u1 = self.up2(torch.cat([F.interpolate(m, scale_factor=2), h1], 1), cond)
        u0 = self.up1(torch.cat([F.interpolate(u1, scale_factor=2), h0], 1), cond)
        return self.out(u0)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class DiffusionBaseline:
    """Preprocessing, training step and samplers around a DiffusionUNet."""

    def __init__(self, cfg: DiffusionConfig, device: str = "cpu"):
        self.cfg, self.device = cfg, torch.device(device)
        self.net = DiffusionUNet(cfg).to(self.device)
        self.alpha_bar = cosine_alpha_bar(cfg.timesteps).to(self.device)
        self._graph = None  # (shape key, CUDA graph, its input buffers, its output) of sample(graph=True)

    # --- data <-> network space ------------------------------------------------------------------
    def to_image(self, showers: np.ndarray) -> torch.Tensor:
        """(N, n_voxels) MeV -> (N, L, S, S) in [-1, 1], zero-padded to S (padding = empty = -1)."""
        cfg = self.cfg
        u = np.log1p(showers.reshape(-1, cfg.n_layers, cfg.ny, cfg.nx) / EPS_MEV) / cfg.log_max * 2 - 1
        img = np.full((len(showers), cfg.n_layers, cfg.size, cfg.size), -1.0, dtype=np.float32)
        img[:, :, :cfg.ny, :cfg.nx] = u
        return torch.from_numpy(img)

    def from_image(self, img: torch.Tensor) -> np.ndarray:
        cfg = self.cfg
        u = img[:, :, :cfg.ny, :cfg.nx].float().clamp(-1, 1).cpu().numpy()
        energy = EPS_MEV * np.expm1((u + 1) / 2 * cfg.log_max)
        energy[energy < cfg.threshold_MeV] = 0.0
        return energy.reshape(len(img), -1).astype(np.float32)

    def condition(self, incident_MeV: np.ndarray, materials: np.ndarray):
        cfg = self.cfg
        log_e = (np.log(incident_MeV / 1000.0) - cfg.log_e_min) / max(cfg.log_e_max - cfg.log_e_min, 1e-6)
        return (torch.as_tensor(log_e, dtype=torch.float32, device=self.device),
                torch.as_tensor(materials, dtype=torch.long, device=self.device))

    # --- training --------------------------------------------------------------------------------
    def loss(self, x0: torch.Tensor, log_e: torch.Tensor, material: torch.Tensor) -> torch.Tensor:
        b = len(x0)
        t = torch.randint(1, self.cfg.timesteps + 1, (b,), device=self.device)
        a = self.alpha_bar[t][:, None, None, None]
        noise = torch.randn_like(x0)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = self.net(xt, t.float() / self.cfg.timesteps, log_e, material)
        target = noise if self.cfg.prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * x0
        return F.mse_loss(pred.float(), target)

    def clean_and_noise(self, out: torch.Tensor, x: torch.Tensor, a: torch.Tensor):
        """Network output at x_t (signal fraction a) -> (x0 clipped to [-1, 1], the noise that with it
        gives x_t). Re-deriving the noise keeps a DDIM step consistent with the clipped image."""
        if self.cfg.prediction == "eps":
            x0 = (x - (1 - a).sqrt() * out) / a.sqrt()
        else:
            x0 = a.sqrt() * x - (1 - a).sqrt() * out
        x0 = x0.clamp(-1, 1)
        return x0, (x - a.sqrt() * x0) / (1 - a).sqrt()

    # --- sampling --------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, incident_MeV: np.ndarray, materials: np.ndarray, steps: int | None = None,
               seed: int = 0, batch_size: int = 500, bf16: bool = True, progress: bool = False,
               graph: bool = False) -> np.ndarray:
        """Showers (N, n_voxels) MeV. steps = timesteps: DDPM ancestral; fewer: DDIM (eta = 0).
        graph (CUDA only): the U-Net evaluation captured once per batch size as a CUDA graph and
        replayed (what calofm's decoder does with its step; the same numbers, fewer launches)."""
        cfg = self.cfg
        self.net.eval()
        steps = steps or cfg.timesteps
        if not 1 <= steps <= cfg.timesteps:
            raise CalofmError(f"sampling steps must be in 1..{cfg.timesteps}, got {steps}")
        gen = torch.Generator(device=self.device).manual_seed(seed)
        out = []
        bar = tqdm(total=len(incident_MeV), unit="shower", desc=f"diffusion ({steps} steps)", disable=not progress)
        # the time grid as Python ints: a device tensor would cost a host read at every step's branch
        grid = torch.linspace(cfg.timesteps, 0, steps + 1).round().long().tolist()
        for lo in range(0, len(incident_MeV), batch_size):
            log_e, mat = self.condition(incident_MeV[lo:lo + batch_size], materials[lo:lo + batch_size])
            x = torch.randn((len(log_e), cfg.n_layers, cfg.size, cfg.size), generator=gen, device=self.device)
            net = self._captured(x, log_e, mat, bf16) if graph and self.device.type == "cuda" else self._net(bf16)
            for t, t_next in zip(grid[:-1], grid[1:]):
                pred = net(x, torch.full((len(x),), float(t), device=self.device) / cfg.timesteps, log_e, mat)
                a, a_next = self.alpha_bar[t], self.alpha_bar[t_next]
                x0, eps = self.clean_and_noise(pred, x, a)
                if steps == cfg.timesteps and t_next > 0:  # DDPM posterior q(x_{t-1} | x_t, x0)
                    beta = 1 - a / a_next
                    mean = (a_next.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - a_next) * x) / (1 - a)
                    var = beta * (1 - a_next) / (1 - a)
                    x = mean + var.sqrt() * torch.randn(x.shape, generator=gen, device=self.device)
                else:  # DDIM, deterministic
                    x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps if t_next > 0 else x0
            out.append(self.from_image(x))
            bar.update(len(x))
        bar.close()
        return np.concatenate(out)

    def _net(self, bf16: bool, cache: bool = True):
        """The U-Net as sampling calls it: (x, t, log_e, material) -> fp32 prediction. cache=False:
        autocast keeps no casts of the weights (a graph must not read casts freed when it exits)."""
        def run(x, t, log_e, mat):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=cache):
                return self.net(x, t, log_e, mat).float()
        return run

    def _captured(self, x, log_e, mat, bf16: bool):
        """_net(bf16) captured as a CUDA graph over static input buffers shaped like these (the graph
        of the last shape and precision is kept, so later batches of that shape replay it: its pool
        holds a whole U-Net pass of activations); returns a function like _net's (its output is the
        graph's buffer, read before the next call)."""
        from calofm.model.sync import capture

        key = (tuple(x.shape), bf16)
        if self._graph is None or self._graph[0] != key:
            self._graph = None  # the old graph's memory goes before the new one is captured
            net = self._net(bf16, cache=False)
            inputs = [x.clone(), torch.zeros(len(x), device=x.device), log_e.clone(), mat.clone()]
            graph, output = capture(lambda: net(*inputs))
            self._graph = (key, graph, inputs, output)
        _, graph, inputs, output = self._graph

        def replay(*args):
            for buf, value in zip(inputs, args):
                buf.copy_(value)
            graph.replay()
            return output
        return replay

    # --- files -----------------------------------------------------------------------------------
    def save(self, directory: str, geometry: Geometry, training: dict) -> None:
        from calofm.checkpoint import atomic_save_tensors, atomic_write_text

        os.makedirs(directory, exist_ok=True)
        digest = atomic_save_tensors(self.net.state_dict(), os.path.join(directory, "model.safetensors"))
        manifest = {"format": "calofm-diffusion-baseline", "config": asdict(self.cfg), "geometry": geometry.to_dict(),
                    "weights": {"file": "model.safetensors", "sha256": digest,
                                "n_parameters": self.net.num_parameters()},
                    "training": training}
        atomic_write_text(os.path.join(directory, "manifest.json"), json.dumps(manifest, indent=1))

    @classmethod
    def load(cls, directory: str, device: str = "cpu") -> tuple[DiffusionBaseline, Geometry]:
        from safetensors.torch import load_file

        from calofm.checkpoint import sha256_file

        path = os.path.join(directory, "manifest.json")
        try:
            with open(path) as fh:
                manifest = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise CalofmError(f"{directory}: not a diffusion baseline directory ({exc})") from None
        if manifest.get("format") != "calofm-diffusion-baseline":
            raise CalofmError(f"{path}: not a diffusion baseline manifest")
        weights = os.path.join(directory, manifest["weights"]["file"])
        if not os.path.exists(weights) or sha256_file(weights) != manifest["weights"]["sha256"]:
            raise CalofmError(f"{weights}: missing, or its sha256 does not match the manifest")
        model = cls(DiffusionConfig(**manifest["config"]), device)
        model.net.load_state_dict(load_file(weights))
        return model, Geometry.from_dict(manifest["geometry"])


def train_diffusion(files: list[str], output: str, channels: int = 64, steps: int = 3000, batch_size: int = 64,
                    lr: float = 2e-4, seed: int = 0, bf16: bool = True, max_showers: int | None = None,
                    progress: bool = True, prediction: str = "v") -> DiffusionBaseline:
    """Train the baseline on one file per material (same geometry); writes `output/` atomically."""
    from calofm.data.showers import read_showers

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    images, energies, mats, materials, geometry = [], [], [], [], None
    for i, path in enumerate(files):
        e, s, info = read_showers(path, stop=max_showers)
        if info.geometry is None or not info.geometry.is_cartesian:
            raise CalofmError(f"{path}: the diffusion baseline needs a Cartesian calofm geometry")
        if geometry is not None and info.geometry.to_dict()["grid"] != geometry.to_dict()["grid"]:
            raise CalofmError(f"{path}: geometry differs from {files[0]}")
        geometry = geometry or info.geometry
        material = info.material or f"file{i}"
        if material in materials:
            raise CalofmError(f"{path}: material {material} given twice")
        materials.append(material)
        energies.append(e)
        images.append(s)
        mats.append(np.full(len(e), i))
    showers = np.concatenate(images)
    incident = np.concatenate(energies)
    g = geometry.grid
    nonzero = showers[showers > 0]
    cfg = DiffusionConfig(
        n_layers=geometry.n_layers, ny=g.ny, nx=g.nx, materials=materials, channels=channels,
        log_max=float(np.log1p(nonzero.max() / EPS_MEV) * 1.05), threshold_MeV=float(nonzero.min()),
        log_e_min=float(np.log(incident.min() / 1000)), log_e_max=float(np.log(incident.max() / 1000)),
        prediction=prediction,
    )
    model = DiffusionBaseline(cfg)
    x_all = model.to_image(showers)
    log_e_all, mat_all = model.condition(incident, np.concatenate(mats))
    opt = torch.optim.AdamW(model.net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    start, losses = time.perf_counter(), []
    bar = tqdm(range(steps), desc="train diffusion", disable=not progress)
    model.net.train()
    for _ in bar:
        idx = torch.from_numpy(rng.integers(0, len(x_all), batch_size))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(x_all[idx], log_e_all[idx], mat_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.net.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    window = max(1, min(100, steps // 5))
    training = {"files": files, "materials": materials, "n_showers": int(len(showers)), "steps": steps,
                "batch_size": batch_size, "lr": lr, "seed": seed, "bf16": bf16,
                "wall_time_s": time.perf_counter() - start, "initial_loss": float(np.mean(losses[:10])),
                "final_loss": float(np.mean(losses[-window:]))}
    model.save(output, geometry, training)
    return model
