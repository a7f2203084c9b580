"""Model directories and training checkpoints: safetensors + JSON, never pickle.

A model directory holds
    model.safetensors   the weights
    manifest.json       format, model config, tokenizer (vocabularies, energy bins, order, max_hits,
                        geometry), materials, particles, training summary, and the sha256 of the
                        weight file, which `load_model` verifies (an altered file is refused).

A training run directory is a model directory (the latest weights, usable by `calofm generate`
while training goes on) plus
    checkpoints/step-NNNNNNNN/   model.safetensors, manifest.json, optimizer.safetensors (AdamW
                                 moments and RNG states, flattened), train_state.json
    checkpoints/latest           name of the newest complete checkpoint
    log.jsonl                    one JSON object per log/eval event
    .lock                        held (flock) by the run writing the directory; see `run_lock`

Every file is written to a temporary name and renamed (os.replace) once complete; a checkpoint
directory is assembled under a temporary name and renamed, and only then does `latest` point to it,
so a run killed at any moment resumes from a complete checkpoint. The run directory's own weights
are published before its manifest; `load_model` re-reads until the two agree, and names the complete
checkpoint when a run was killed between the two writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file

from calofm import __version__
from calofm.errors import CalofmError
from calofm.model import ModelConfig, ShowerTransformer
from calofm.outputs import write_error
from calofm.tokenizer import ShowerTokenizer

MODEL_FILE, MANIFEST_FILE = "model.safetensors", "manifest.json"
OPTIMIZER_FILE, STATE_FILE = "optimizer.safetensors", "train_state.json"
FORMAT, FORMAT_VERSION = "calofm-model", 1


# --- atomic files ------------------------------------------------------------------------------
def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tmp_path(path: str) -> str:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=os.path.dirname(path) or ".")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; model files are ordinary readable files
    return tmp


def atomic_write_text(path: str, text: str) -> None:
    """Write a text file atomically; a failed write (full disk) is a CalofmError and leaves no file."""
    tmp = None
    try:
        tmp = _tmp_path(path)
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise write_error(path, exc) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str) -> str:
    """Write a safetensors file atomically; returns its sha256. A failed write is a CalofmError."""
    tmp = None
    try:
        tmp = _tmp_path(path)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
        os.chmod(tmp, 0o644)  # safetensors recreates the file as 0600; weights are readable like any model file
        digest = sha256_file(tmp)
        os.replace(tmp, path)
        return digest
    except OSError as exc:
        raise write_error(path, exc) from None
    except SafetensorError as exc:  # safetensors reports its I/O errors this way
        raise write_error(path, OSError(str(exc))) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _load_tensors(path: str, what: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CalofmError(f"{path}: cannot read {what} ({exc})") from None


# --- model directories -------------------------------------------------------------------------
def save_model(directory: str, model, tokenizer, training: dict | None = None, min_p: dict | None = None) -> dict:
    """Write model.safetensors then manifest.json (with the weight hash) into `directory`; min_p, the
    sampling cuts chosen for these weights ({"voxel": x, "energy": y}), becomes the manifest's "min_p"."""
    os.makedirs(directory, exist_ok=True)
    digest = atomic_save_tensors(model.state_dict(), os.path.join(directory, MODEL_FILE))
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "calofm_version": __version__,
        "weights": {"file": MODEL_FILE, "sha256": digest, "n_parameters": model.num_parameters()},
        "config": model.cfg.to_dict(),
        "materials": tokenizer.materials.names(), "particles": tokenizer.particles.names(),
        "geometry": tokenizer.geometry.name,
        "tokenizer": tokenizer.to_dict(),
        "training": training or {},
    }
    if min_p is not None:
        manifest["min_p"] = dict(min_p)
    atomic_write_text(os.path.join(directory, MANIFEST_FILE), json.dumps(manifest, indent=1))
    return manifest


def read_json_manifest(path: str, fmt: str, what: str) -> dict:
    """A manifest.json whose "format" must be `fmt`; CalofmError naming the problem otherwise."""
    if not os.path.isfile(path):
        raise CalofmError(f"{os.path.dirname(path)}: no {os.path.basename(path)}; not a calofm {what} directory")
    try:
        with open(path) as fh:
            manifest = json.load(fh)
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or not UTF-8
        raise CalofmError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise CalofmError(f"{path}: not a calofm {what} manifest")
    weights = manifest.get("weights")
    if not (isinstance(weights, dict) and isinstance(weights.get("file"), str) and weights["file"]
            and isinstance(weights.get("sha256"), str)):
        raise CalofmError(f"{path}: \"weights\" must name the weight file and its sha256")
    return manifest


def read_manifest(directory: str) -> dict:
    if not os.path.isdir(directory):
        raise CalofmError(f"{directory}: no such model directory")
    path = os.path.join(directory, MANIFEST_FILE)
    manifest = read_json_manifest(path, FORMAT, "model")
    version = manifest.get("format_version", 0)
    if not isinstance(version, int):
        raise CalofmError(f"{path}: format_version must be an integer, found {version!r}")
    if version > FORMAT_VERSION:
        raise CalofmError(f"{path}: format version {manifest['format_version']} is newer than this calofm reads")
    return manifest


def _read_weights(directory: str, manifest: dict) -> tuple[str, bytes | None]:
    """(path, bytes) of the weight file the manifest names, or (path, None) when it is missing.

    The file is read once, so the bytes hashed are the bytes loaded even while a writer replaces it."""
    weights = os.path.join(directory, manifest["weights"]["file"])
    try:
        with open(weights, "rb") as fh:
            return weights, fh.read()
    except (FileNotFoundError, IsADirectoryError):
        return weights, None
    except OSError as exc:
        raise CalofmError(f"{weights}: cannot read model weights ({exc})") from None


def _consistent_weights(directory: str, attempts: int = 5) -> tuple[dict, str, bytes]:
    """Manifest and weight bytes whose sha256 agree.

    A training run publishes its run directory's weights first and the manifest (which names their
    hash) last, so a reader can meet new weights beside the old manifest for a moment: read again.
    If they still disagree and the directory is a training run's, a run was killed between the two
    writes; its newest checkpoint is complete, and the message says so."""
    for attempt in range(attempts):
        manifest = read_manifest(directory)
        weights, data = _read_weights(directory, manifest)
        if data is not None and hashlib.sha256(data).hexdigest() == manifest.get("weights", {}).get("sha256"):
            return manifest, weights, data
        if attempt + 1 < attempts:
            time.sleep(0.05 * 2 ** attempt)
    if data is None:
        raise CalofmError(f"{directory}: weight file {os.path.basename(weights)} is missing")
    latest = os.path.join(directory, "checkpoints", "latest")
    if os.path.exists(latest):
        with open(latest) as fh:
            ckpt = os.path.join(directory, "checkpoints", fh.read().strip())
        raise CalofmError(f"{weights}: sha256 does not match the manifest; the training run writing this "
                          f"directory was stopped between writing the weights and the manifest. Its newest "
                          f"checkpoint is complete: load {ckpt}, or continue the run with --resume")
    raise CalofmError(f"{weights}: sha256 does not match the manifest; the weight file was altered or "
                      "belongs to another model")


def _check_config(cfg: ModelConfig, tokenizer: ShowerTokenizer, n_tensors: int) -> None:
    """The model config agrees with the tokenizer and is no larger than the weight file (so building the
    model, even only its shapes, stays bounded)."""
    for name, vocab in (("voxel", tokenizer.voxels), ("energy", tokenizer.energies),
                        ("material", tokenizer.materials), ("particle", tokenizer.particles)):
        if tuple(getattr(cfg, f"{name}_blocks")) != vocab.block_sizes():
            raise CalofmError(f"config {name}_blocks {getattr(cfg, f'{name}_blocks')} do not match the tokenizer's "
                              f"{name} vocabulary {vocab.block_sizes()}")
    if len(cfg.moe_groups) != len(tokenizer.materials) or cfg.max_seq_len != tokenizer.max_seq_len:
        raise CalofmError("config moe_groups / max_seq_len do not match the tokenizer")
    if not all(isinstance(v, int) and v > 0 for v in (cfg.d_model, cfg.n_layers, cfg.n_heads, *cfg.moe_groups)):
        raise CalofmError("config d_model, n_layers, n_heads and moe_groups must be positive integers")
    if cfg.n_layers * (1 + sum(cfg.moe_groups)) > n_tensors:  # every layer has >= 1 tensor per expert
        raise CalofmError(f"config asks for {cfg.n_layers} layers of {sum(cfg.moe_groups)} experts; the weight file "
                          f"holds {n_tensors} tensors")


def load_model(directory: str, device: str | torch.device = "cpu"):
    """(model, tokenizer, manifest) from a model directory, after checking the weight hash."""
    manifest, weights, data = _consistent_weights(directory)
    try:
        state = load_bytes(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CalofmError(f"{weights}: cannot read model weights ({exc})") from None
    try:
        tokenizer = ShowerTokenizer.from_dict(manifest["tokenizer"])
        cfg = ModelConfig.from_dict(manifest["config"])
        _check_config(cfg, tokenizer, len(state))
        with torch.device("meta"):  # shapes only: a config that does not fit the file allocates nothing
            expected = {k: v.shape for k, v in ShowerTransformer(cfg).state_dict().items()}
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError, RuntimeError,
            CalofmError) as exc:
        raise CalofmError(f"{directory}: malformed manifest ({exc if isinstance(exc, CalofmError) else repr(exc)})") from None
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    bad_shape = [k for k in set(state) & set(expected) if state[k].shape != expected[k]]
    if missing or unexpected or bad_shape:
        raise CalofmError(f"{weights}: weights do not fit the manifest's model (missing {sorted(missing)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]}, wrong shape {sorted(bad_shape)[:3]})")
    model = ShowerTransformer(cfg)
    model.load_state_dict(state)
    return model.to(device).eval(), tokenizer, manifest


# --- one writer per run directory ----------------------------------------------------------------
LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_lock(run_dir: str):
    """Hold an exclusive OS lock on `run_dir` for the life of a run (released when the process dies).

    A second run into the same directory is refused with the holder's pid and command."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK_FILE)
    fh = open(path, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise CalofmError(f"{run_dir}: another run is writing this directory ({holder}); wait for it to "
                          "finish or choose another --out") from None
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)[:200]}\n")
        fh.flush()
        remove_stale_temporaries(run_dir)
        yield
    finally:
        fh.close()  # closing the descriptor releases the lock; the file stays (a later run reuses it)


def remove_stale_temporaries(run_dir: str) -> list[str]:
    """Remove what killed runs left half-written in `run_dir`: the temporary copies of its weights and
    manifest (`.tmp-*model.safetensors`, `.tmp-*manifest.json`) and checkpoint directories
    (`checkpoints/.tmp-step-*`); nothing else. Only the lock holder calls this, so none is in use.
    Returns the removed paths."""
    removed = []
    stale = [(run_dir, name) for name in _listdir(run_dir)
             if name.startswith(".tmp-") and name.endswith((MODEL_FILE, MANIFEST_FILE))]
    ckpt_root = os.path.join(run_dir, "checkpoints")
    stale += [(ckpt_root, name) for name in _listdir(ckpt_root) if name.startswith(".tmp-step-")]
    for folder, name in stale:
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        removed.append(path)
    return removed


def _listdir(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []


# --- training checkpoints ----------------------------------------------------------------------
def export_model(run_dir: str, destination: str, dtype: str = "bf16", min_p: dict | None = None) -> dict:
    """Copy a trained model into a shippable directory (src/calofm/weights/<name>/), weights rounded to
    bf16 (half the bytes), with the min-p cuts chosen for it (save_model). The exported weights load into
    an fp32 model as usual; adapters must be trained against the exported model (its weight hash is what
    they name as their base)."""
    model, tokenizer, manifest = load_model(run_dir)
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    elif dtype != "fp32":
        raise ValueError(f"dtype must be bf16 or fp32, got {dtype!r}")
    training = dict(manifest.get("training", {}), exported_from=os.path.abspath(run_dir),
                    source_sha256=manifest["weights"]["sha256"], stored_dtype=dtype)
    return save_model(destination, model, tokenizer, training, min_p)


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an optimizer state dict: tensors by 'state.<param>.<key>', the rest as JSON."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


TRAINED_PREFIX = "weights."  # the trained (not averaged) weights among a checkpoint's optimizer tensors


def trained_weights(opt_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trained weights stored beside the optimizer state by save_checkpoint (empty for a checkpoint
    written before the weight average: its model file is then the trained weights)."""
    return {k[len(TRAINED_PREFIX):]: v for k, v in opt_tensors.items() if k.startswith(TRAINED_PREFIX)}


def save_checkpoint(run_dir: str, step: int, model, tokenizer, optimizer, train_state: dict,
                    training_summary: dict, keep: int = 2, trained=None) -> str:
    """Write checkpoints/step-N atomically, point `latest` at it, prune old ones, export the model.

    `model` is what the run exports (its weights' moving average); `trained`, the model being trained
    when it differs, is stored beside the optimizer state as 'weights.<name>' tensors."""
    ckpt_root = os.path.join(run_dir, "checkpoints")
    os.makedirs(ckpt_root, exist_ok=True)
    name = f"step-{step:08d}"
    try:
        tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=ckpt_root)
    except OSError as exc:
        raise write_error(os.path.join(ckpt_root, name), exc) from None
    try:
        save_model(tmp, model, tokenizer, training_summary)
        opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
        if trained is not None:
            opt_tensors.update({TRAINED_PREFIX + k: v for k, v in trained.state_dict().items()})
        opt_tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                opt_tensors[f"rng.cuda.{i}"] = s
        digest = atomic_save_tensors(opt_tensors, os.path.join(tmp, OPTIMIZER_FILE))
        state = dict(train_state, step=step, optimizer=opt_meta, optimizer_sha256=digest)
        atomic_write_text(os.path.join(tmp, STATE_FILE), json.dumps(state, indent=1))
        final = os.path.join(ckpt_root, name)
        if os.path.exists(final):  # the same step again after a resume: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    atomic_write_text(os.path.join(ckpt_root, "latest"), name + "\n")
    old = sorted(d for d in os.listdir(ckpt_root) if d.startswith("step-") and d != name)
    for d in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(os.path.join(ckpt_root, d), ignore_errors=True)
    # the run directory itself is a usable model directory: weights first, manifest (hash) last
    for fname in (MODEL_FILE, MANIFEST_FILE):
        tmp_file = None
        try:
            tmp_file = _tmp_path(os.path.join(run_dir, fname))
            shutil.copyfile(os.path.join(final, fname), tmp_file)
            os.replace(tmp_file, os.path.join(run_dir, fname))
        except OSError as exc:
            raise write_error(os.path.join(run_dir, fname), exc) from None
        finally:
            if tmp_file is not None and os.path.exists(tmp_file):
                os.remove(tmp_file)
    return final


def load_checkpoint(run_dir: str) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(checkpoint directory, train_state, optimizer tensors) of the newest complete checkpoint."""
    pointer = os.path.join(run_dir, "checkpoints", "latest")
    if not os.path.exists(pointer):
        raise CalofmError(f"{run_dir}: no checkpoint to resume from (checkpoints/latest missing)")
    with open(pointer) as fh:
        ckpt = os.path.join(run_dir, "checkpoints", fh.read().strip())
    try:
        with open(os.path.join(ckpt, STATE_FILE)) as fh:
            state = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise CalofmError(f"{ckpt}: unreadable training state ({exc})") from None
    opt_path = os.path.join(ckpt, OPTIMIZER_FILE)
    if not os.path.exists(opt_path) or sha256_file(opt_path) != state.get("optimizer_sha256"):
        raise CalofmError(f"{opt_path}: missing or does not match its training state")
    return ckpt, state, _load_tensors(opt_path, "optimizer state")
