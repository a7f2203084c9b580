"""Model directories: safetensors + manifest, hash verification, clear errors, no pickle."""

import json
import os
import shutil

import pytest
import torch

from calofm.checkpoint import load_model, save_model
from calofm.cli.main import main
from calofm.errors import CalofmError
from calofm.training import TrainConfig, train
from calofm.training.synthetic import write_synthetic


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    data = [write_synthetic(str(d / f"{m}.h5"), 24, material=m, seed=i, mean_hits=15) for i, m in enumerate(["W", "Cu"])]
    cfg = TrainConfig(data=tuple(data), out=str(d / "run"), preset="tiny", steps=4, batch_size=4, eval_every=4,
                      ckpt_every=1, log_every=2, max_val=2, device="cpu", keep_checkpoints=2)
    train(cfg, threads=1, progress=False, log=lambda *a, **k: None)
    return str(d / "run")


def copy(run_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(run_dir, dst)
    return str(dst)


def test_round_trip_and_layout(run_dir, tmp_path):
    model, tok, manifest = load_model(run_dir)
    assert manifest["format"] == "calofm-model" and manifest["materials"] == ["W", "Cu"]
    assert manifest["particles"] == ["gamma"] and manifest["geometry"] == "cpu"
    assert {"config", "tokenizer", "training", "weights"} <= set(manifest)
    out = tmp_path / "again"
    save_model(str(out), model, tok, manifest["training"])
    again, _, m2 = load_model(str(out))
    assert m2["weights"]["sha256"] == manifest["weights"]["sha256"]  # deterministic bytes
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    # checkpoints are pruned to the last two, `latest` names the newest, and nothing is pickled
    ckpts = sorted(d for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.startswith("step-"))
    assert ckpts == ["step-00000003", "step-00000004"]
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read().strip() == "step-00000004"
    for root, _, files in os.walk(run_dir):
        for f in files:
            assert f.endswith((".safetensors", ".json", ".jsonl")) or f in ("latest", ".lock"), f
            assert not f.startswith(".tmp-")


def test_missing_weight_file(run_dir, tmp_path, capsys):
    d = copy(run_dir, tmp_path)
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(CalofmError, match="missing"):
        load_model(d)
    assert main(["generate", "--model", d, "--n", "2", "-o", str(tmp_path / "g.h5")]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors is missing" in err and "Traceback" not in err


def test_altered_weight_file(run_dir, tmp_path, capsys):
    d = copy(run_dir, tmp_path)
    path = os.path.join(d, "model.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0x01  # one flipped bit in a weight
    open(path, "wb").write(bytes(data))
    with pytest.raises(CalofmError, match="sha256"):
        load_model(d)
    assert main(["info", d]) == 2
    assert "sha256 does not match" in capsys.readouterr().err


def test_bad_manifest_and_directory(run_dir, tmp_path):
    with pytest.raises(CalofmError, match="no such model directory"):
        load_model(str(tmp_path / "absent"))
    d = copy(run_dir, tmp_path)
    with open(os.path.join(d, "manifest.json"), "w") as fh:
        fh.write("{not json")
    with pytest.raises(CalofmError, match="unreadable manifest"):
        load_model(d)
    d2 = tmp_path / "other"
    shutil.copytree(run_dir, d2)
    m = json.load(open(d2 / "manifest.json"))
    m["config"]["d_model"] = 64  # weights no longer fit the described model
    json.dump(m, open(d2 / "manifest.json", "w"))
    with pytest.raises(CalofmError, match="do not fit"):
        load_model(str(d2))


def test_unknown_material_or_particle_is_refused(run_dir, tmp_path, capsys):
    out = str(tmp_path / "g.h5")
    assert main(["generate", "--model", run_dir, "--material", "Ta", "--n", "2", "-o", out]) == 2
    assert "unknown material 'Ta'" in capsys.readouterr().err
    assert main(["generate", "--model", run_dir, "--particle", "e-", "--n", "2", "-o", out]) == 2
    assert "unknown particle 'e-'" in capsys.readouterr().err
    assert not os.path.exists(out)


def _mid_publish(run_dir, tmp_path):
    """A copy of the run directory as a writer leaves it between its two writes: the weights of the
    newest checkpoint beside the manifest of the one before."""
    d = copy(run_dir, tmp_path)
    older = os.path.join(d, "checkpoints", "step-00000003")
    shutil.copyfile(os.path.join(d, "checkpoints", "step-00000004", "model.safetensors"),
                    os.path.join(d, "model.safetensors"))
    shutil.copyfile(os.path.join(older, "manifest.json"), os.path.join(d, "manifest.json"))
    return d


def test_a_load_during_publication_waits_for_the_manifest(run_dir, tmp_path):
    import threading

    d = _mid_publish(run_dir, tmp_path)
    newest = os.path.join(d, "checkpoints", "step-00000004", "manifest.json")
    writer = threading.Timer(0.1, shutil.copyfile, (newest, os.path.join(d, "manifest.json")))
    writer.start()
    try:
        _, _, manifest = load_model(d)
    finally:
        writer.join()
    assert manifest["weights"]["sha256"] == json.load(open(newest))["weights"]["sha256"]


def test_a_run_killed_between_weights_and_manifest_is_explained(run_dir, tmp_path):
    d = _mid_publish(run_dir, tmp_path)
    with pytest.raises(CalofmError, match="stopped between writing the weights and the manifest") as err:
        load_model(d)
    assert "step-00000004" in str(err.value) and "altered" not in str(err.value)


def test_one_writer_per_run_directory(tmp_path):
    from calofm.checkpoint import run_lock

    d = str(tmp_path / "run")
    with run_lock(d):
        with pytest.raises(CalofmError, match=f"pid {os.getpid()}"):
            with run_lock(d):
                pass
    with run_lock(d):  # released when the first run ended
        pass


def test_a_second_training_into_a_running_directory_is_refused(tmp_path, capsys):
    from calofm.checkpoint import run_lock

    out = tmp_path / "run"
    with run_lock(str(out)):  # a run in progress (here: this process) holds the directory
        rc = main(["train", "--simulate", "W", "--preset", "tiny", "-o", str(out), "--steps", "2", "--batch-size", "2",
                   "--workers", "0", "--max-val", "2", "--threads", "1", "--no-progress"])
    assert rc == 2
    assert "another run is writing this directory" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == [".lock"]  # nothing written beside the lock
