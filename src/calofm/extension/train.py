"""Training an adapter: everything the model had is frozen; only the adapter's parameters learn.

Same objective as pre-training (next voxel + next energy NLL per predicted token, plus the MoE
load-balance and z-losses), AdamW with warm-up + cosine, autocast in the precision the hardware runs
best (model.precision), gradient clipping. The showers come from files and/or a simulated stream
(training.stream), as in pre-training. The adapter written is the moving average of its weights over
the last ~1 / (1 - ema) steps (training.ema), as pre-training exports.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from calofm.data.showers import inspect_file
from calofm.errors import CalofmError
from calofm.extension.adapters import (
    AdapterSpec, adapter_keys, applied_sha256, attach, base_sha256, check_adapter_output, check_new_names,
    closest_material, save_adapter, set_max_hits,
)
from calofm.generation.api import load
from calofm.model.precision import autocast, describe_precision, resolve_precision
from calofm.training.data import prepare_data
from calofm.training.distributed import DistInfo
from calofm.training.ema import WeightAverage
from calofm.training.feed import BatchFeed
from calofm.training.schedule import lr_at
from calofm.training.stream import StreamSpec, default_workers
from calofm.training.trainer import evaluate


def _check_geometry(shower_model, path: str, geometry=None) -> None:
    """Same readout (cells, layer thicknesses, active material) as the model; the absorber may differ.
    `path` names the file (or stream) whose geometry is given, or read from the file."""
    geometry = geometry or inspect_file(path).geometry
    if geometry is None:
        raise CalofmError(f"{path}: the file has no geometry attribute; extension needs calofm shower files")
    ours = shower_model.geometry
    if geometry.with_absorber(ours.layers[0].absorber).to_json() != ours.to_json():
        raise CalofmError(f"{path}: geometry {geometry.name!r} differs from the model's {ours.name!r} "
                          "(beyond the absorber)")


def extend(kind: str, base: str, data: list[str], output: str, adapters: tuple[str, ...] = (),
           particle: str | None = None, init_from: str | None = None, rank: int = 8, head_rank: int = 16,
           alpha: float = 16.0, steps: int = 600, batch_size: int = 32, lr: float = 3e-3, warmup: int = 30,
           max_showers: int | None = None, precision: str = "auto", seed: int = 0, threads: int | None = None,
           progress: bool = True, log=print, stream: StreamSpec | None = None, workers: int | None = None,
           max_val: int = 1000, n_reference: int = 2000, ema: float = 0.99, force: bool = False) -> dict:
    """Train one adapter (new materials, or one new particle) on `data` files and/or showers streamed
    from the simulator (`stream`); write it to `output` (a new directory, or with `force` an adapter
    calofm wrote: see adapters.check_adapter_output, checked here before any work)."""
    check_adapter_output(output, force)
    if not 0.0 <= ema < 1.0:
        raise CalofmError(f"ema must be in [0, 1), got {ema}")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    if not data and stream is None:
        raise CalofmError("no data given (--data FILE ... and/or --simulate MATERIALS)")
    shower_model = load(base, adapters)
    infos = []
    for path in data:
        _check_geometry(shower_model, path)
        infos.append(inspect_file(path))
    if stream is not None:
        _check_geometry(shower_model, f"--geometry {stream.geometry}", stream.readout())
    # the (material, particle) classes of the data, files first
    classes = [(i.material, i.particle) for i in infos] + (stream.sources() if stream is not None else [])
    tok = shower_model.tokenizer

    if kind == "material":
        names = check_new_names(shower_model, "material", list(dict.fromkeys(m for m, _ in classes)))
        known = tok.materials.names()
        if init_from is not None:
            source = {n: check_source(init_from, known) for n in names}
        else:
            source = {n: closest_material(n, known) for n in names}
        unknown_particles = {p for _, p in classes} - set(tok.particles.names())
        if unknown_particles:
            raise CalofmError(f"the data holds particles {sorted(unknown_particles)} the model does not know; "
                              "add the particle first (calofm extend particle)")
        spec = AdapterSpec("material", names, source, rank=rank, alpha=alpha)
    elif kind == "particle":
        if particle is None:
            particle = classes[0][1]
        (name,) = check_new_names(shower_model, "particle", [particle])
        wrong = [p for p, i in zip(data, infos) if i.particle != name]
        if wrong:
            raise CalofmError(f"{wrong[0]}: holds {inspect_file(wrong[0]).particle} showers, not {name}")
        if stream is not None and stream.particle != name:
            raise CalofmError(f"the stream simulates {stream.particle}, not the new particle {name}")
        missing = {m for m, _ in classes} - set(tok.materials.names())
        if missing:
            raise CalofmError(f"the data holds materials {sorted(missing)} the model does not know")
        source = init_from or tok.particles.names()[0]
        spec = AdapterSpec("particle", [name], {name: check_source(source, tok.particles.names())}, rank=rank,
                           alpha=alpha, head_rank=head_rank)
    else:
        raise CalofmError(f"unknown extension kind {kind!r}")
    spec.base_sha256, spec.requires = base_sha256(shower_model), applied_sha256(shower_model)

    model = shower_model.model
    for p in model.parameters():
        p.requires_grad_(False)
    n_base = sum(p.numel() for p in model.parameters())
    params = attach(shower_model, spec)
    for p in params.values():
        p.requires_grad_(True)
    n_train = sum(p.numel() for p in params.values())
    log(f"{kind} adapter {spec.names} from {spec.init_from}: {n_train} trainable parameters = "
        f"{100 * n_train / n_base:.2f}% of the base model's {n_base}")

    paths = list(data)
    workers = default_workers() if workers is None else workers
    # the adapter's own hit cap is fitted on its data (files and the streamed classes' reference sample)
    # before anything is tokenized; its classes are trained and generated up to it
    d = prepare_data(paths, tokenizer=tok, max_val=max_val, log=log, stream=stream, seed=seed,
                     n_reference=n_reference, workers=max(1, workers), adapter_keys=adapter_keys(spec))
    tokenizer, train_set, val_sets, summary = d.tokenizer, d.train, d.val, d.summary
    spec.max_hits = summary["adapter_max_hits"]
    set_max_hits(shower_model, spec, spec.max_hits)
    log(f"max_hits {spec.max_hits} for {'+'.join(spec.names)} (base {tok.max_hits}; hit counts: mean "
        f"{summary['hit_counts']['mean']:.0f}, p99.9 {summary['hit_counts']['p99.9']:.0f}, "
        f"max {summary['hit_counts']['max']})")
    if max_showers is not None:  # the fine-tuning budget (e.g. 1k showers) counts training showers only
        if train_set is None:
            raise CalofmError("--max-showers limits the showers read from --data files; a stream has no such limit")
        keep = np.random.default_rng(seed).permutation(len(train_set))[:max_showers]
        train_set = d.train = train_set.subset(np.sort(keep))
    # the new classes' hit-count / E_vis laws, from the same (possibly reduced) training showers
    totals = d.fit_totals()
    device = shower_model.device
    precision_used = resolve_precision(precision, device)
    log(f"precision {describe_precision(precision, device)}")
    opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    feed = BatchFeed(train_set, len(paths), stream, tokenizer,
                     batch_size if stream is not None else min(batch_size, len(train_set)), seed, 0, 1, 0, workers)
    cfg = model.cfg
    average = WeightAverage(model, ema)  # averages the adapter's parameters only: the base's are frozen
    start, losses = time.perf_counter(), []
    model.train()
    bar = tqdm(range(steps), desc=f"extend {kind} {'+'.join(spec.names)}", disable=not progress, dynamic_ncols=True)
    try:
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, lr, warmup, steps)
            local, _, _ = feed.next(step)
            batch = local.batch(np.arange(len(local)), device)
            with autocast(device, precision_used):
                t = model(batch)
            loss = (t.voxel_nll + t.energy_nll) / max(t.n_targets, 1) + cfg.lb_coef * t.lb + cfg.z_coef * t.z
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            opt.step()
            average.update(model)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        sim_stats = feed.stats()
    finally:
        feed.close()
    model.eval()
    wall = time.perf_counter() - start
    val_cfg, dist = SimpleNamespace(eval_batch_size=64, precision=precision_used), DistInfo(device=device)
    val_raw = evaluate(model, val_sets, val_cfg, dist) if ema else None
    average.copy_to(model)  # the adapter's parameters (the tensors in `params`) now hold the average
    val = evaluate(model, val_sets, val_cfg, dist)
    n_streamed = steps * feed.n_stream
    training = {"data": [str(p) for p in paths], "n_train_showers": (len(train_set) if train_set is not None else 0)
                + n_streamed, "n_streamed_showers": n_streamed, "steps": steps,
                "batch_size": batch_size, "lr": lr, "ema": ema, "rank": rank, "seed": seed, "max_hits": spec.max_hits, "precision": precision_used,
                "precision_requested": precision, **({"stream_rate": sim_stats} if sim_stats else {}),
                "wall_time_s": wall, "initial_loss": float(np.mean(losses[:10])), "final_loss": float(np.mean(losses[-20:])),
                "validation": val, **({"validation_trained": val_raw} if val_raw else {}), "trainable_parameters": n_train, "base_parameters": n_base,
                "trainable_fraction": n_train / n_base, "data_summary": summary,
                **({"simulator_version": stream.simulator_version} if stream is not None else {})}
    save_adapter(output, spec, params, training, totals.to_dict(), force=force)
    log(f"wrote adapter {output}: {n_train} parameters ({100 * n_train / n_base:.2f}% of base), "
        f"{wall:.0f} s; validation NLL/token " + ", ".join(f"{m} {v['nll']:.4f}" for m, v in val.items())
        + ("" if val_raw is None else " (the trained weights of the last step: " + ", ".join(
            f"{m} {v['nll']:.4f}" for m, v in val_raw.items()) + ")"))
    return training


def check_source(name: str, known: list[str]) -> str:
    from calofm.tokenizer import canonical_particle
    from calofm.detector.materials import get_material

    for canon in (lambda n: get_material(n).name, canonical_particle):
        try:
            c = canon(name)
        except CalofmError:
            continue
        if c in known:
            return c
    raise CalofmError(f"--init-from {name!r} is not known to the model (known: {', '.join(known)})")


