"""Pre-training loop: AdamW, warm-up + cosine, gradient clipping, autocast in the precision the
hardware runs natively (model.precision), per-material validation, atomic checkpoints, exact resume,
JSON-lines log, optional DDP (see distributed.py), optional torch.compile and wall-clock budget.
The run exports (and validates as "val") the moving average of its weights (ema.py); the weights being
trained are validated as "val_raw" and kept in each checkpoint beside the optimizer state.

Data: shower files and/or showers streamed from the simulator (feed.py, stream.py); the log's train
events carry the stream's production rate (sim_showers_per_s, sim_tokens_per_s) beside the
trainer's tokens_per_s, and data_wait_s, the time the trainer waited for showers.

Loss = (sum of voxel and energy negative log-likelihoods over all predicted tokens) / (number of
predicted tokens in the *global* batch) + lb_coef * load-balance + z_coef * router z-loss.
Normalizing by the global token count (every rank knows the file part of the global batch; the
streamed part's count is summed over ranks) makes the DDP-averaged gradient equal to the
single-process gradient of the same batch.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from calofm.checkpoint import (
    LOCK_FILE, MANIFEST_FILE, MODEL_FILE, load_checkpoint, load_model, optimizer_from_tensors, run_lock,
    save_checkpoint, trained_weights,
)
from calofm.errors import CalofmError
from calofm.model import ShowerTransformer, get_preset
from calofm.model.precision import CHOICES, autocast, describe_precision, resolve_precision
from calofm.simulation import SIMULATOR_VERSION
from calofm.tokenizer import DEFAULT_ORDER, check_order
from calofm.training.data import Corpus, prepare_data
from calofm.training.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, shutdown
from calofm.training.ema import WeightAverage
from calofm.training.feed import BatchFeed
from calofm.training.schedule import lr_at
from calofm.training.stream import StreamSpec, default_workers

# run-time settings a resumed run may change (they do not change what is computed)
SESSION_FIELDS = ("max_minutes", "workers", "compile", "device", "eval_every", "ckpt_every", "log_every")
# a resumed run may also change its length: any number of steps above those done (the cosine decay is
# stretched or compressed to the new end, e.g. to finish within a session's time)
LENGTH_FIELDS = ("steps",)


@dataclass
class TrainConfig:
    data: tuple[str, ...]
    out: str
    preset: str = "small"
    model: dict = field(default_factory=dict)  # overrides of the preset's fields
    steps: int | None = 3000  # None (with max_minutes): fitted to the time budget at the end of warm-up
    batch_size: int = 32  # global, in showers
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    beta2: float = 0.95
    grad_clip: float = 1.0
    ema: float = 0.998  # decay of the exported weights' moving average (ema.py); 0: the last step's weights
    precision: str = "auto"  # bf16 autocast, fp32, or auto (bf16 where the hardware runs it natively)
    seed: int = 0
    # streamed simulation (training/stream.py): materials, particle, incident energy range GeV, geometry
    simulate: tuple[str, ...] = ()
    particle: str = "gamma"
    energy: str = "10:100"
    geometry: str = "cpu"
    reference_showers: int = 2000  # simulated once per streamed source: max_hits and shower totals
    workers: int | None = None  # stream worker processes; None: one per core but the trainer's, 0: inline
    max_minutes: float | None = None  # stop (with a checkpoint) after this much wall time of one invocation
    compile: bool = False  # torch.compile the model's forward and backward
    order: str | None = None  # hit order; None: DEFAULT_ORDER, or with init_from the start model's
    max_hits: int | None = None  # None: derived from the data
    val_fraction: float = 0.05
    max_val: int = 1000  # validation showers per file at most
    eval_every: int = 500
    eval_batch_size: int = 64
    ckpt_every: int = 500
    log_every: int = 20
    keep_checkpoints: int = 2
    device: str = "auto"
    init_from: str | None = None  # warm start: a model directory or shipped name (weights + tokenizer)

    def __post_init__(self):
        self.data = tuple(os.path.abspath(str(p)) for p in self.data)  # resumable from any directory
        self.simulate = tuple(self.simulate)
        if self.precision not in CHOICES:
            raise CalofmError(f"unknown precision {self.precision!r} ({', '.join(CHOICES)})")
        if self.steps is None and self.max_minutes is None:
            raise CalofmError("give the number of steps, or a time budget (max_minutes) to fit them to")
        for name in ("steps", "batch_size", "eval_every", "ckpt_every", "log_every", "eval_batch_size", "max_minutes"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise CalofmError(f"{name} must be positive, got {getattr(self, name)}")
        if self.workers is not None and self.workers < 0:
            raise CalofmError(f"workers must be >= 0, got {self.workers}")
        if self.order is not None:
            check_order(self.order)
        if not 0.0 <= self.ema < 1.0:
            raise CalofmError(f"ema must be in [0, 1), got {self.ema}")
        if self.reference_showers < 1:
            raise CalofmError(f"reference_showers must be positive, got {self.reference_showers}")
        self.stream()  # fail early on a bad material, particle, energy range or geometry

    def stream(self) -> StreamSpec | None:
        return StreamSpec.parse(self.simulate, self.particle, self.energy, self.geometry) if self.simulate else None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices (linear weights, embedding tables), not on norms and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, cfg.beta2))


@torch.no_grad()
def evaluate(model: ShowerTransformer, val_sets: dict[str, Corpus], cfg: TrainConfig, info: DistInfo,
             precision: str | None = None) -> dict:
    """Per-material validation NLL per predicted token (nats), voxel and energy parts; ranks share the work."""
    was_training = model.training
    model.eval()
    out = {}
    for material, corpus in val_sets.items():
        idx = np.arange(len(corpus))[info.rank::info.world]
        sums = torch.zeros(3, dtype=torch.float64, device=info.device)
        for lo in range(0, len(idx), cfg.eval_batch_size):
            with autocast(info.device, precision or cfg.precision):
                t = model(corpus.batch(idx[lo:lo + cfg.eval_batch_size], info.device))
            sums += torch.stack([t.voxel_nll.double(), t.energy_nll.double(), torch.tensor(t.n_targets).double()
                                 .to(info.device)])
        v, e, n = all_reduce_sum(sums, info).tolist()
        out[material] = {"nll": (v + e) / n, "voxel_nll": v / n, "energy_nll": e / n,
                         "nll_per_shower": (v + e) / len(corpus), "n_showers": len(corpus)}
    model.train(was_training)
    return out


def _expert_utilization(counts: torch.Tensor, model: ShowerTransformer, materials: list[str]) -> dict:
    """(n_layers, n_experts_total) token counts -> {material: per-layer fractions of its tokens}."""
    out, lo = {}, 0
    for material, n_exp in zip(materials, model.cfg.moe_groups):
        c = counts[:, lo:lo + n_exp].double()
        lo += n_exp
        total = c.sum(dim=1, keepdim=True).clamp(min=1)
        out[material] = [[round(x, 4) for x in row] for row in (c / total).tolist()]
    return out


def _truncate_log(path: str, step: int) -> None:
    """On resume, forget log events after the checkpoint (they will be redone)."""
    if not os.path.exists(path):
        return
    with open(path) as fh:
        keep = [line for line in fh if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path, "w") as fh:
        fh.writelines(keep)


def _check_new_run_dir(run_dir: str) -> None:
    """A new run writes model.safetensors, manifest.json, log.jsonl and checkpoints/ into its
    directory: refuse a directory where one of them is not a run's (a model or adapter directory, a
    user's log), so that no file calofm did not write is replaced. A run's directory (its .lock or
    checkpoints/latest beside them) is left to the resume check."""
    own = [n for n in (MODEL_FILE, MANIFEST_FILE, "log.jsonl", "checkpoints")
           if os.path.exists(os.path.join(run_dir, n))]
    is_run = any(os.path.exists(os.path.join(run_dir, n)) for n in (LOCK_FILE, os.path.join("checkpoints", "latest")))
    if own and not is_run:
        raise CalofmError(f"{run_dir} holds {', '.join(own)} not written by a calofm training run; choose a new "
                          "output directory")


def _resume_changes(stored: TrainConfig, given: dict, step: int) -> dict:
    """The settings given on resume that the run takes: SESSION_FIELDS, and a length above the steps done.
    Any other setting must equal the run's; a different value is refused by its option name."""
    changes = {}
    for key, value in given.items():
        old = getattr(stored, key, None)
        if key in SESSION_FIELDS:
            changes[key] = value
        elif key in LENGTH_FIELDS:
            if value <= step:
                raise CalofmError(f"--steps {value}: the run being resumed has done {step} steps already; "
                                  f"give more than that")
            changes[key] = value
        elif key not in {f.name for f in fields(TrainConfig)}:
            raise CalofmError(f"a resumed run has no setting {key!r}")
        elif (tuple(value) if isinstance(value, list) else value) != old:
            flag = "--" + key.replace("_", "-")
            raise CalofmError(f"{flag} {value!r}: a resumed run cannot change it (the run has {old!r}); it may "
                              "change only --steps (above the steps done), --max-minutes, --workers, --compile, "
                              "--device and the logging intervals; start a new run for the rest, e.g. with "
                              "--init-from")
    return changes


def train(cfg: TrainConfig | None = None, resume_dir: str | None = None, threads: int | None = None,
          progress: bool = True, stop_after: int | None = None, log=print, session: dict | None = None) -> dict:
    """Train (or resume the run in `resume_dir`); returns the training summary.

    session: on resume, the settings given again: new values of SESSION_FIELDS (e.g. this invocation's
    max_minutes) and a new length (steps, above those done) are taken; any other that differs from the
    run's is refused.
    stop_after: stop after that many optimizer steps of this invocation without a final checkpoint,
    as if the process had been killed (for resume tests)."""
    if threads:
        torch.set_num_threads(threads)
    if resume_dir is None:
        _check_new_run_dir(cfg.out)
    # a resumed run's device: the one given again (session), else auto
    info = init_distributed(cfg.device if cfg is not None and resume_dir is None
                            else (session or {}).get("device", "auto"))
    try:
        # one run per run directory: the writing rank holds its lock until the run ends or dies
        with run_lock(resume_dir or cfg.out) if info.is_main else contextlib.nullcontext():
            return _train(cfg, resume_dir, info, progress, stop_after, log, session or {})
    finally:
        shutdown(info)


def _train(cfg, resume_dir, info: DistInfo, progress, stop_after, log, session) -> dict:
    t0 = time.time()  # wall time counts data loading too
    log = log if info.is_main else (lambda *a, **k: None)
    state, tokenizer = None, None
    if resume_dir is not None:
        ckpt, state, opt_tensors = load_checkpoint(resume_dir)
        stored = TrainConfig.from_dict(state["config"])
        if cfg is not None and cfg.data and tuple(cfg.data) != stored.data:
            raise CalofmError(f"--data differs from the run being resumed ({', '.join(stored.data)})")
        session = _resume_changes(stored, session, state["step"])
        stored.out = resume_dir  # the run directory may have moved since
        cfg = TrainConfig.from_dict(dict(stored.to_dict(), **session))
        version = state.get("simulator_version")
        if cfg.simulate and version != SIMULATOR_VERSION:
            raise CalofmError(f"{resume_dir} streams simulator version {version}, this calofm simulates version "
                              f"{SIMULATOR_VERSION}; the run cannot continue on other showers (start a new run, "
                              "e.g. with --init-from)")
        model, tokenizer, _ = load_model(ckpt)  # the averaged weights; the trained ones are in opt_tensors
        log(f"resuming {resume_dir} from {os.path.basename(ckpt)}")
    elif os.path.exists(os.path.join(cfg.out, "checkpoints", "latest")):
        raise CalofmError(f"{cfg.out} already holds a training run; pass --resume to continue it or choose "
                          "another output directory")
    init_model = None
    lineage = state.get("init_from") if state else None  # the start model's training compute (init_from)
    if state is None and cfg.init_from:
        # continued pre-training keeps the tokenizer (vocabularies, max_hits, bins) of the start model;
        # the optimizer and schedule start afresh
        from calofm.pretrained import resolve_model
        init_model, tokenizer, init_manifest = load_model(resolve_model(cfg.init_from))
        log(f"starting from {cfg.init_from} (weights sha256 {init_manifest['weights']['sha256'][:12]})")
        lineage = _lineage(cfg.init_from, init_manifest)
        if cfg.order is not None and cfg.order != tokenizer.order:
            # the hit order is a convention of the sequences, not of the vocabularies: the start model's
            # weights are kept and learn the new order (e.g. an `energy`-order model continued in `layer`)
            log(f"hit order {cfg.order} (the start model's: {tokenizer.order})")
            tokenizer.order = cfg.order
    device = info.device
    run_dir = cfg.out
    if info.is_main:
        os.makedirs(run_dir, exist_ok=True)
    stream = cfg.stream()
    workers = default_workers() if cfg.workers is None else cfg.workers
    data = prepare_data(list(cfg.data), tokenizer, cfg.order or DEFAULT_ORDER, cfg.max_hits, cfg.val_fraction,
                        cfg.max_val, log=log, stream=stream, seed=cfg.seed, n_reference=cfg.reference_showers,
                        workers=max(1, workers))
    tokenizer, train_set, val_sets, data_summary = data.tokenizer, data.train, data.val, data.summary
    tokenizer.totals.update(data.fit_totals())  # the laws of n_hits and E_vis (two-stage generation)
    trunc = data_summary["train_tokenization"]
    log(f"max_hits {tokenizer.max_hits} (hit counts: mean {data_summary['hit_counts']['mean']:.0f}, "
        f"p99.9 {data_summary['hit_counts']['p99.9']:.0f}, max {data_summary['hit_counts']['max']}); "
        f"truncated {trunc['n_truncated_showers']} showers, {trunc['n_dropped_hits']} hits, "
        f"{100 * trunc['dropped_energy_fraction']:.4f}% of the energy; energy bins under/overflow "
        f"{trunc['energy_underflow_hits']}/{trunc['energy_overflow_hits']} hits")

    precision = resolve_precision(cfg.precision, device)
    log(f"precision {describe_precision(cfg.precision, device)}")
    if state is None:
        torch.manual_seed(cfg.seed)
        model = init_model.float() if init_model is not None else ShowerTransformer(
            get_preset(cfg.preset, **cfg.model).for_tokenizer(tokenizer))
    model.to(device).train()
    average = WeightAverage(model, cfg.ema, n=state.get("ema_updates", 0) if state else 0)
    trained = trained_weights(opt_tensors) if state else {}
    if trained:  # a checkpoint written before the average existed holds only the trained weights
        model.load_state_dict(trained)
    optimizer = make_optimizer(model, cfg)
    if state is not None:
        optimizer_from_tensors(optimizer, {k: v for k, v in opt_tensors.items() if k.startswith("state.")},
                               state["optimizer"])
        torch.set_rng_state(opt_tensors["rng.torch"])
        if device.type == "cuda" and f"rng.cuda.{device.index or 0}" in opt_tensors:
            torch.cuda.set_rng_state(opt_tensors[f"rng.cuda.{device.index or 0}"], device)
    net = model
    if info.enabled:
        # a rank may see no token of some material in a step: its experts are then unused there
        net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True,
                                                        device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net, dynamic=True)
    step = state["step"] if state else 0
    feed = BatchFeed(train_set, len(cfg.data), stream, tokenizer, cfg.batch_size, cfg.seed, info.rank, info.world,
                     step, workers, state["sampler"] if state else None)
    elapsed0, tokens_seen = (state["elapsed_s"], state["tokens_seen"]) if state else (0.0, 0)
    last_eval = state.get("last_eval", {}) if state else {}
    materials = tokenizer.materials.names()
    log_path = os.path.join(run_dir, "log.jsonl")
    if info.is_main:
        if state is None and os.path.exists(log_path):
            os.remove(log_path)
        _truncate_log(log_path, step)
        log(f"model: preset {cfg.preset}, {model.num_parameters() / 1e6:.2f}M parameters, "
            f"materials {materials}, {info.world} process(es) on {device}, precision {precision}"
            + (f"; streaming {', '.join('/'.join(s) for s in stream.sources())} from {workers} worker process(es)"
               if stream is not None else ""))

    def emit(event: dict) -> None:
        if info.is_main:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(event) + "\n")

    def summary() -> dict:
        wall = round(elapsed0 + time.time() - t0, 1)
        totals = {} if lineage is None else {"init_from": lineage,
                                             "tokens_seen_total": lineage["tokens_seen_total"] + tokens_seen,
                                             "wall_time_s_total": round(lineage["wall_time_s_total"] + wall, 1)}
        return dict(data_summary, preset=cfg.preset, train_config=cfg.to_dict(), steps=step, tokens_seen=tokens_seen,
                    wall_time_s=wall, world_size=info.world, val=last_eval, precision=precision,
                    device=_device_name(device),
                    command=" ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv)), **totals)

    def checkpoint() -> None:
        if info.is_main:
            save_checkpoint(run_dir, step, average.model, tokenizer, optimizer,
                            {"config": cfg.to_dict(), "sampler": feed.state(), "last_eval": last_eval,
                             "ema_updates": average.n,
                             "elapsed_s": elapsed0 + time.time() - t0, "tokens_seen": tokens_seen, "init_from": lineage,
                             "simulator_version": SIMULATOR_VERSION if stream is not None else None},
                            summary(), keep=cfg.keep_checkpoints, trained=model if cfg.ema else None)  # --ema 0: one copy
        barrier(info)

    n_exp_total = sum(model.cfg.moe_groups)
    acc = torch.zeros(5, dtype=torch.float64, device=device)  # voxel nll, energy nll, targets, lb, z
    acc_counts = torch.zeros(model.cfg.n_layers, n_exp_total, dtype=torch.float64, device=device)
    acc_steps, t_log = 0, time.time()
    bar = None
    if progress and info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    budget = BudgetClock(cfg, t0, step)
    steps_this_run = 0
    try:
        while cfg.steps is None or step < cfg.steps:
            local, file_targets, stream_targets = feed.next(step)
            n_global = file_targets
            if stream is not None and info.enabled:  # each rank knows only its own streamed showers
                n_global += int(all_reduce_sum(torch.tensor([stream_targets], device=device), info).item())
            else:
                n_global += stream_targets
            batch = local.batch(np.arange(len(local)), device)
            lr = lr_at(step, cfg.lr, cfg.warmup, cfg.steps or budget.PLACEHOLDER_STEPS, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(device, precision):
                terms = net(batch)
            nll = (terms.voxel_nll + terms.energy_nll) / n_global * info.world
            loss = nll + model.cfg.lb_coef * terms.lb + model.cfg.z_coef * terms.z
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            average.update(model)
            step += 1
            steps_this_run += 1
            tokens_seen += n_global
            acc += torch.stack([terms.voxel_nll.detach().double(), terms.energy_nll.detach().double(),
                                torch.tensor(float(terms.n_targets), dtype=torch.float64, device=device),
                                terms.lb.detach().double() / info.world, terms.z.detach().double() / info.world])
            acc_counts += terms.expert_counts.double()
            acc_steps += 1
            if cfg.steps is None and budget.fit_steps(step, info):
                cfg.steps = budget.steps
                log(f"time budget {cfg.max_minutes:g} min: {budget.rate:.2f} steps/s after warm-up, "
                    f"so the schedule runs {cfg.steps} steps")
                if bar is not None:
                    bar.total = cfg.steps
            out_of_time = budget.out_of_time(info)
            last = step == cfg.steps or out_of_time
            if step % cfg.log_every == 0 or last:
                all_reduce_sum(acc, info)
                all_reduce_sum(acc_counts, info)
                v, e, n, lb, z = acc.tolist()
                now = time.time()
                event = {"event": "train", "step": step, "lr": lr, "loss": (v + e) / n, "voxel_nll": v / n,
                         "energy_nll": e / n, "lb": lb / acc_steps, "z": z / acc_steps,
                         "grad_norm": float(grad_norm), "tokens_per_s": round(n / (now - t_log), 1),
                         **feed.stats(), "elapsed_s": round(elapsed0 + now - t0, 1),
                         "expert_utilization": _expert_utilization(acc_counts, model, materials)}
                emit(event)
                if bar is not None:
                    bar.set_postfix(loss=f"{event['loss']:.3f}", tok_s=f"{event['tokens_per_s']:.0f}",
                                    **({"sim_tok_s": f"{event['sim_tokens_per_s']:.0f}"} if stream is not None else {}))
                acc.zero_()
                acc_counts.zero_()
                acc_steps, t_log = 0, now
            if bar is not None:
                bar.update(1)
            if step % cfg.eval_every == 0 or last:
                last_eval = evaluate(average.model, val_sets, cfg, info, precision)
                raw = evaluate(model, val_sets, cfg, info, precision) if cfg.ema else last_eval
                emit({"event": "val", "step": step, "elapsed_s": round(elapsed0 + time.time() - t0, 1), "val": last_eval,
                      "val_raw": raw})
                log(f"step {step}: val nll/token (averaged weights; trained weights) " + ", ".join(
                    f"{m} {r['nll']:.4f}; {raw[m]['nll']:.4f}" for m, r in last_eval.items()))
            if step % cfg.ckpt_every == 0 or last:
                checkpoint()
            if out_of_time:
                log(f"stopped at step {step} of {cfg.steps}: time budget of {cfg.max_minutes:g} min reached "
                    "(--resume continues)")
                break
            if stop_after is not None and steps_this_run >= stop_after and not last:
                break  # simulated kill: no final checkpoint
    finally:
        feed.close()
        if bar is not None:
            bar.close()
    return summary()


class BudgetClock:
    """Wall-clock budget of one invocation (cfg.max_minutes), and the number of steps it affords.

    The stop is checked after every step (and agreed between ranks). Without cfg.steps the schedule's
    length is fitted once, at the end of the warm-up, from the step rate measured over its second half
    (after compilation): steps = done + 0.9 * rate * time left. It is then part of the run's config,
    so the rest of the run and any resume follow a fixed schedule."""

    PLACEHOLDER_STEPS = 10**9  # schedule length before the fit (the warm-up does not depend on it)

    def __init__(self, cfg: TrainConfig, t0: float, step: int):
        self.limit_s = None if cfg.max_minutes is None else 60.0 * cfg.max_minutes
        self.t0, self.start_step = t0, step
        self.k0 = step + max(2, cfg.warmup // 2)
        self.k1 = max(self.k0 + 3, step + cfg.warmup)
        self.t_k0 = self.rate = self.steps = None

    def fit_steps(self, step: int, info: DistInfo) -> bool:
        if step == self.k0:
            self.t_k0 = time.time()
        if step != self.k1:
            return False
        now = time.time()
        self.rate = (self.k1 - self.k0) / max(now - self.t_k0, 1e-9)
        steps = step + max(1, int(0.9 * self.rate * max(0.0, self.limit_s - (now - self.t0))))
        if info.enabled:  # the ranks agree on rank 0's figure
            t = torch.tensor([float(steps if info.is_main else 0)], dtype=torch.float64, device=info.device)
            steps = int(all_reduce_sum(t, info).item())
        self.steps = steps
        return True

    def out_of_time(self, info: DistInfo) -> bool:
        if self.limit_s is None:
            return False
        late = time.time() - self.t0 >= self.limit_s
        if info.enabled:  # any rank out of time stops all
            late = all_reduce_sum(torch.tensor([float(late)], device=info.device), info).item() > 0
        return late


def _lineage(name: str, manifest: dict) -> dict:
    """What a warm start (init_from) began from: the model, its weights, and the training compute behind
    it (its own totals when it was itself a warm start), so the new manifest states the whole compute."""
    training = manifest.get("training", {})
    return {"model": name, "sha256": manifest["weights"]["sha256"],
            "tokens_seen_total": int(training.get("tokens_seen_total", training.get("tokens_seen", 0))),
            "wall_time_s_total": float(training.get("wall_time_s_total", training.get("wall_time_s", 0.0)))}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"
