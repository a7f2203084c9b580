"""calofm used carelessly or with hostile input: bad arguments, bad output paths, other people's
folders, concurrent and resumed runs, a full disk, a kill while writing. Every case ends in exit
code 2 (or 130 when killed) with one line naming the argument or file, no traceback, and nothing
overwritten, deleted or left half-written. See docs/reliability.md."""

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from calofm.cli.main import main
from calofm.errors import CalofmError

SIM = ["simulate", "--n", "5", "--workers", "1", "--energy", "20"]


def snapshot(root):
    """{relative path: (size, mtime_ns, mode)} of everything under root (files and folders), but a run
    directory's .lock (which names the last process that held it)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + [f for f in filenames if f != ".lock"]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            out[os.path.relpath(path, root)] = (st.st_size if stat.S_ISREG(st.st_mode) else 0, st.st_mtime_ns,
                                                st.st_mode)
    return out


def refused(capsys, argv, *words):
    """Run the CLI in-process: exit code 2, one stderr line naming `words`, no traceback."""
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = [line for line in err.splitlines() if "%|" not in line]  # progress bars (tqdm) aside
    assert len(lines) == 1, err
    err = lines[0]
    assert "Traceback" not in err
    for w in words:
        assert w in err, err
    return err


# --- arguments: each range-checked where it is parsed, the message names the option ----------------
ARGUMENTS = [
    (["simulate", "--seed", "-1"], "--seed"),
    (["simulate", "--n", "0"], "--n"),
    (["simulate", "--n", "10^12"], "--n"),
    (["simulate", "--energy", "1e9"], "10000 GeV"),
    (["simulate", "--workers", "-1"], "--workers"),
    (["simulate", "--threshold-mip", "-1"], "--threshold-mip"),
    (["simulate", "--noise-mip", "nan"], "--noise-mip"),
    (["generate", "--model", "calofm-small", "--seed", "-1"], "--seed"),
    (["generate", "--model", "calofm-small", "--threads", "-1"], "--threads"),
    (["generate", "--model", "calofm-small", "--temperature", "-1"], "--temperature"),
    (["generate", "--model", "calofm-small", "--top-p", "0"], "--top-p"),
    (["generate", "--model", "calofm-small", "--top-k", "-3"], "--top-k"),
    (["generate", "--model", "calofm-small", "--min-p-voxel", "2"], "--min-p-voxel"),
    (["generate", "--model", "calofm-small", "--batch-size", "0"], "--batch-size"),
    (["train", "--data", "x.h5", "-o", "run", "--lr", "-1"], "--lr"),
    (["train", "--data", "x.h5", "-o", "run", "--lr", "nan"], "--lr"),
    (["train", "--data", "x.h5", "-o", "run", "--val-fraction", "2"], "--val-fraction"),
    (["train", "--data", "x.h5", "-o", "run", "--max-hits", "0"], "--max-hits"),
    (["train", "--data", "x.h5", "-o", "run", "--seed", "-1"], "--seed"),
    (["train", "--data", "x.h5", "-o", "run", "--threads", "-1"], "--threads"),
    (["train", "--data", "x.h5", "-o", "run", "--steps", "0"], "--steps"),
    (["train", "--data", "x.h5", "-o", "run", "--model", '{"bogus": 1}'], "bogus"),
    (["train", "--data", "x.h5", "-o", "run", "--model", "[1]"], "--model"),
    (["train", "--data", "x.h5", "-o", "run", "--model", '{"d_model": "wide"}'], "d_model"),
    (["train", "--data", "x.h5", "-o", "run", "--model", '{"n_layers": -2}'], "n_layers"),
    (["evaluate", "--reference", "a.h5", "--generated", "b.h5", "-o", "r", "--threads", "-1"], "--threads"),
    (["evaluate", "--reference", "a.h5", "--generated", "b.h5", "-o", "r", "--seed", "-1"], "--seed"),
    (["evaluate", "--reference", "a.h5", "--generated", "b.h5", "-o", "r", "--bootstrap", "0"], "--bootstrap"),
    (["evaluate", "--reference", "a.h5", "--generated", "b.h5", "-o", "r", "--folds", "6"], "--folds"),
    (["extend", "material", "--base", "m", "-o", "a", "--rank", "0"], "--rank"),
    (["extend", "material", "--base", "m", "-o", "a", "--lr", "-1"], "--lr"),
    (["extend", "particle", "--base", "m", "-o", "a", "--seed", "-1"], "--seed"),
    (["baseline", "train", "--data", "x.h5", "-o", "b", "--lr", "0"], "--lr"),
    (["baseline", "generate", "--model", "b", "--material", "W", "-o", "g.h5", "--n", "-5"], "--n"),
    (["bench", "generate", "--batches", "0"], "--batches"),
    (["bench", "generate", "--energies", "abc"], "--energies"),
    (["demo", "--threads", "0"], "--threads"),
]


@pytest.mark.parametrize("argv, word", ARGUMENTS, ids=[" ".join(a) for a, _ in ARGUMENTS])
def test_bad_arguments_are_refused_by_name(argv, word, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:  # argparse exits; CalofmError cases return 2
        if main(argv) == 2:
            raise SystemExit(2)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and word in err, err
    assert os.listdir(tmp_path) == []


def test_too_many_showers_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(capsys, [*SIM, "--n", "1000000000000", "-o", "big.h5"], "big.h5", "free")
    refused(capsys, ["generate", "--model", "calofm-small", "--n", "2e8", "-o", "big.h5"], "--n", "memory")
    assert os.listdir(tmp_path) == []


# --- output paths ----------------------------------------------------------------------------------
def _fifo(path):
    os.mkfifo(path)


def _dir(path):
    os.mkdir(path)


def _device(path):
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 7))  # a copy of /dev/full
    except PermissionError:
        pytest.skip("creating a device node needs root (mknod)")


@pytest.mark.parametrize("make, word", [(_fifo, "FIFO"), (_dir, "directory"), (_device, "device")])
@pytest.mark.parametrize("command", ["simulate", "generate", "bench", "baseline", "merge"])
def test_outputs_must_be_regular_files(tmp_path, capsys, make, word, command):
    target = tmp_path / "out"
    make(str(target))
    before = snapshot(tmp_path)
    argv = {"simulate": [*SIM, "-o", str(target)],
            "generate": ["generate", "--model", "calofm-small", "--n", "2", "-o", str(target)],
            "bench": ["bench", "generate", "--json", str(target)],
            "baseline": ["baseline", "generate", "--model", str(tmp_path / "nomodel"), "--material", "W",
                         "-o", str(target)],
            "merge": ["merge", str(tmp_path / "a.shard-0-of-2.h5"), "-o", str(target)]}[command]
    refused(capsys, argv, str(target), word)
    refused(capsys, [*argv, "--force"], str(target), word)  # --force never turns a node into a file
    assert snapshot(tmp_path) == before


def test_existing_output_needs_force(tmp_path, capsys):
    out = tmp_path / "s.h5"
    out.write_bytes(b"the user's data")
    refused(capsys, [*SIM, "-o", str(out)], str(out), "--force")
    refused(capsys, ["generate", "--model", "calofm-small", "--n", "2", "-o", str(out)], str(out), "--force")
    assert out.read_bytes() == b"the user's data"
    assert main([*SIM, "-o", str(out), "--force"]) == 0
    assert out.read_bytes()[:4] == b"\x89HDF" and oct(out.stat().st_mode & 0o777) == "0o644"
    assert sorted(os.listdir(tmp_path)) == ["s.h5"]


def test_output_directory_is_checked_before_the_work(tmp_path, capsys):
    refused(capsys, [*SIM, "-o", str(tmp_path / "missing" / "s.h5")], "does not exist")
    refused(capsys, ["evaluate", "--reference", "a.h5", "--generated", "b.h5", "-o",
                     str(tmp_path / "missing" / "rep")], "does not exist")
    assert os.listdir(tmp_path) == []


# --- adapters: -o never deletes what calofm did not write ------------------------------------------
def _fake_adapter(directory, payload="old"):
    from calofm.extension.adapters import FORMAT

    os.makedirs(directory)
    (directory / "manifest.json").write_text(json.dumps({"format": FORMAT, "payload": payload}))
    (directory / "adapter.safetensors").write_bytes(b"weights")


def _save(directory, force=False):
    import torch

    from calofm.extension.adapters import AdapterSpec, save_adapter

    spec = AdapterSpec("material", ["Fe"], {"Fe": "W"})
    return save_adapter(str(directory), spec, {"Fe.embedding": torch.nn.Parameter(torch.ones(1, 4))}, {}, force=force)


def _model_run_dir(path):
    os.makedirs(path / "checkpoints" / "step-00000010")
    (path / "manifest.json").write_text(json.dumps({"format": "calofm-model"}))
    (path / "model.safetensors").write_bytes(b"weights")
    (path / "log.jsonl").write_text("{}\n")
    (path / "checkpoints" / "latest").write_text("step-00000010\n")


def _user_folder(path):
    os.makedirs(path)
    (path / "notes.txt").write_text("my notes")
    (path / "data.h5").write_bytes(b"my data")


@pytest.mark.parametrize("make", [_model_run_dir, _user_folder])
@pytest.mark.parametrize("force", [False, True])
def test_extend_refuses_folders_it_did_not_write(tmp_path, capsys, make, force):
    target = tmp_path / "target"
    make(target)
    before = snapshot(tmp_path)
    argv = ["extend", "material", "--base", str(target), "--data", "x.h5", "-o", str(target)]
    refused(capsys, argv + (["--force"] if force else []), str(target), "not an adapter written by calofm")
    with pytest.raises(CalofmError, match="never deletes"):
        _save(target, force=force)
    assert snapshot(tmp_path) == before


def test_extend_into_current_directory_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    for out in (".", "./", str(tmp_path), ".."):
        refused(capsys, ["extend", "particle", "--base", "m", "--data", "x.h5", "-o", out], "current directory")
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_adapter_replacement_is_atomic_and_needs_force(tmp_path, monkeypatch):
    target = tmp_path / "Fe"
    _fake_adapter(target)
    with pytest.raises(CalofmError, match="--force"):
        _save(target)
    (target / "extra.txt").write_text("the user's")  # a file calofm did not write: refused, force or not
    with pytest.raises(CalofmError, match="extra.txt"):
        _save(target, force=True)
    os.remove(target / "extra.txt")

    # a full disk while the new adapter is assembled: the old adapter stays whole, nothing is left over
    import calofm.extension.adapters as adapters

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(adapters, "atomic_write_text", full)
    with pytest.raises(CalofmError, match="no space left"):
        _save(target, force=True)
    assert json.loads((target / "manifest.json").read_text())["payload"] == "old"
    assert sorted(os.listdir(tmp_path)) == ["Fe"]
    monkeypatch.undo()

    manifest = _save(target, force=True)
    assert sorted(os.listdir(tmp_path)) == ["Fe"] and sorted(os.listdir(target)) == ["adapter.safetensors",
                                                                                     "manifest.json"]
    assert json.loads((target / "manifest.json").read_text())["weights"]["sha256"] == manifest["weights"]["sha256"]
    assert oct(target.stat().st_mode & 0o777) == "0o755"  # readable by others, like a model directory
    for name in os.listdir(target):
        assert oct((target / name).stat().st_mode & 0o777) == "0o644"
    os.makedirs(tmp_path / "empty-ok")
    _save(tmp_path / "empty-ok")  # an empty folder is fine
    assert sorted(os.listdir(tmp_path / "empty-ok")) == ["adapter.safetensors", "manifest.json"]


@pytest.mark.parametrize("kwargs, word", [({"temperature": -1}, "--temperature"), ({"top_p": 0}, "--top-p"),
                                          ({"top_k": -1}, "--top-k"), ({"min_p_voxel": 2}, "--min-p-voxel"),
                                          ({"min_p_energy": -1}, "--min-p-energy")])
def test_sampling_errors_name_the_setting(kwargs, word):
    from calofm.generation.sampler import head_samplings

    with pytest.raises(ValueError) as err:
        head_samplings(**kwargs)
    assert word in str(err.value) and all(w not in str(err.value) for w in ("--temperature", "--top-p", "--top-k",
                                                                            "--min-p-voxel", "--min-p-energy")
                                          if w != word)


def test_adapter_manifest_with_unknown_key_is_refused(tmp_path):
    from calofm.extension.adapters import AdapterSpec

    with pytest.raises(CalofmError, match="unknown keys"):
        AdapterSpec.from_dict({"kind": "material", "names": ["Fe"], "init_from": {"Fe": "W"}, "bogus": 1}, "a")
    with pytest.raises(CalofmError, match="lacks"):
        AdapterSpec.from_dict({"kind": "material"}, "a")


# --- training runs: new, concurrent, resumed -------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run of 4 steps on synthetic W photons: (run dir, data file)."""
    from calofm.training import TrainConfig, train
    from calofm.training.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("hostile-run")
    data = write_synthetic(str(root / "W.h5"), 24, material="W", seed=0, mean_hits=15)
    cfg = TrainConfig(data=(data,), out=str(root / "run"), preset="tiny", steps=4, batch_size=8, lr=1e-2, warmup=1,
                      eval_every=4, ckpt_every=2, log_every=2, max_val=2, device="cpu", precision="fp32")
    train(cfg, threads=1, progress=False, log=lambda *a, **k: None)
    return str(root / "run"), data


@pytest.mark.parametrize("option, value", [("--lr", "0.5"), ("--preset", "base"), ("--precision", "bf16"),
                                           ("--seed", "7"), ("--batch-size", "4"), ("--steps", "3")])
def test_resume_refuses_what_cannot_change(run, capsys, option, value):
    run_dir, _ = run
    before = snapshot(run_dir)
    refused(capsys, ["train", "--resume", "-o", run_dir, "--no-progress", option, value], option)
    assert snapshot(run_dir) == before


def test_resume_takes_more_steps_and_cleans_stale_temporaries(run, capsys):
    run_dir, _ = run
    stale = os.path.join(run_dir, "checkpoints", ".tmp-step-00000003-killed")
    os.makedirs(stale)
    open(os.path.join(run_dir, ".tmp-x1model.safetensors"), "w").close()
    open(os.path.join(run_dir, ".tmp-notes.txt"), "w").close()  # not calofm's: kept
    assert main(["train", "--resume", "-o", run_dir, "--steps", "6", "--no-progress", "--threads", "1",
                 "--lr", "1e-2", "--seed", "0"]) == 0  # the run's own values may be repeated
    assert json.loads(open(os.path.join(run_dir, "manifest.json")).read())["training"]["steps"] == 6
    assert [n for n in os.listdir(run_dir) if n.startswith(".tmp-")] == [".tmp-notes.txt"]
    assert not [n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.startswith(".tmp-")]


def test_concurrent_run_is_refused(run, capsys):
    from calofm.checkpoint import run_lock

    run_dir, data = run
    before = snapshot(run_dir)
    with run_lock(run_dir):
        before = snapshot(run_dir)
        refused(capsys, ["train", "--resume", "-o", run_dir, "--steps", "8", "--no-progress"], "another run",
                f"pid {os.getpid()}")
    assert snapshot(run_dir) == before


def test_full_disk_at_a_checkpoint_keeps_the_last_one(run, capsys, monkeypatch):
    import calofm.checkpoint as ckpt

    run_dir, _ = run
    latest = open(os.path.join(run_dir, "checkpoints", "latest")).read()
    weights = open(os.path.join(run_dir, "model.safetensors"), "rb").read()

    def full(tensors, path):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ckpt, "save_file", full)
    refused(capsys, ["train", "--resume", "-o", run_dir, "--steps", "8", "--no-progress", "--threads", "1"],
            "no space left")
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read() == latest
    assert open(os.path.join(run_dir, "model.safetensors"), "rb").read() == weights
    for folder in (run_dir, os.path.join(run_dir, "checkpoints")):
        assert not [n for n in os.listdir(folder) if n.startswith(".tmp-") and n != ".tmp-notes.txt"]


def test_new_run_refuses_a_model_folder(tmp_path, capsys, run):
    _, data = run
    target = tmp_path / "model"
    os.makedirs(target)
    (target / "manifest.json").write_text("{}")
    (target / "log.jsonl").write_text("my log\n")
    before = snapshot(tmp_path)
    refused(capsys, ["train", "--data", data, "-o", str(target), "--preset", "tiny", "--steps", "1",
                     "--no-progress"], str(target), "not written by a calofm training run")
    assert snapshot(tmp_path) == before


# --- a full disk and a kill while writing ----------------------------------------------------------
def test_full_disk_while_writing_showers(tmp_path, capsys, monkeypatch):
    import h5py

    out = tmp_path / "s.h5"
    out.write_bytes(b"previous")

    def full(self, key, value):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(h5py.Dataset, "__setitem__", full)
    refused(capsys, [*SIM, "-o", str(out), "--force"], str(out), "no space left")
    assert out.read_bytes() == b"previous" and os.listdir(tmp_path) == ["s.h5"]


def test_full_disk_while_saving_a_model(tmp_path, monkeypatch):
    import torch

    import calofm.checkpoint as ckpt

    def full(tensors, path):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(CalofmError, match="no space left"):
        ckpt.atomic_save_tensors({"w": torch.ones(3)}, str(tmp_path / "model.safetensors"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("command", ["simulate", "generate"])
def test_free_space_is_checked_up_front(tmp_path, capsys, monkeypatch, command):
    import shutil
    from collections import namedtuple

    import calofm.generation.api as api

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    monkeypatch.setattr(api.ShowerModel, "generate", lambda *a, **k: pytest.fail("generated before the check"))
    argv = {"simulate": [*SIM, "--n", "100"], "generate": ["generate", "--model", "calofm-small", "--n", "100"]}
    refused(capsys, [*argv[command], "-o", str(tmp_path / "s.h5")], "s.h5", "free")
    assert os.listdir(tmp_path) == []


def test_sigterm_removes_the_temporary_file(tmp_path):
    out = tmp_path / "s.h5"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "calofm.cli.main", "simulate", "--n", "2000000", "--workers", "1",
                             "-o", str(out)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    deadline = time.time() + 60
    while not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")] and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # some showers written
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and "interrupted" in err
    assert os.listdir(tmp_path) == []


# --- reports ---------------------------------------------------------------------------------------
def test_interrupted_report_never_keeps_old_metrics(tmp_path, monkeypatch):
    import calofm.evaluate.report as report
    from calofm.evaluate.compare import Options
    from calofm.training.synthetic import write_synthetic

    a = write_synthetic(str(tmp_path / "a.h5"), 60, seed=1, mean_hits=15)
    b = write_synthetic(str(tmp_path / "b.h5"), 60, seed=2, mean_hits=15)
    out = tmp_path / "rep"
    out.mkdir()
    (out / "metrics.json").write_text("old")
    (out / "notes.txt").write_text("mine")

    def stop(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(report, "compare", stop)
    with pytest.raises(KeyboardInterrupt):
        report.evaluate_files([a], [b], str(out), plots=False, opts=Options(n_boot=2, classifier=False,
                                                                            log=lambda m: None))
    assert sorted(os.listdir(out)) == ["index.html", "notes.txt"]
    assert "incomplete" in (out / "index.html").read_text()


def test_fpd_of_identical_samples_is_not_negative():
    import numpy as np

    from calofm.evaluate import metrics as M

    x = np.random.default_rng(0).normal(size=(400, 6))
    for seed in range(5):
        value, err = M.fpd(x, x.copy(), seed=seed)
        assert value >= 0 and err > 0
