"""Streamed training data: per-step seeding, worker and rank independence, exact resume, mixing with
files, time budgets, the command line."""

import json
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from calofm.cli.main import main
from calofm.errors import CalofmError
from calofm.simulation import SIMULATOR_VERSION
from calofm.tokenizer import ShowerTokenizer
from calofm.training import TrainConfig, train
from calofm.training.feed import split_batch
from calofm.training.stream import ShowerStream, StreamReader, StreamSpec
from calofm.training.synthetic import write_synthetic
from calofm.training.trainer import BudgetClock
from test_training import _ddp_worker, _free_port  # one DDP launcher for the training tests

SPEC = StreamSpec.parse("W,Cu", "gamma", "10:50", "cpu")


def quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def tokenizer():
    tok = ShowerTokenizer.create(SPEC.readout(), list(SPEC.materials), [SPEC.particle])
    tok.max_hits = 400
    return tok


def config(out, **kw):
    base = dict(data=(), out=str(out), simulate=("W", "Cu"), energy="10:50", preset="tiny", steps=6, batch_size=6,
                lr=3e-3, warmup=2, eval_every=3, ckpt_every=3, log_every=2, max_val=3, reference_showers=16, seed=5,
                device="cpu", workers=0, precision="fp32", model={"d_model": 16, "n_heads": 2})
    base.update(kw)
    return TrainConfig(**base)


def weights(run_dir):
    return load_file(os.path.join(run_dir, "model.safetensors"))


def showers(corpus):
    """One hashable key per shower: incident energy and its token sequence."""
    t = corpus.tokens
    return {(float(corpus.incident_MeV[i]), t.voxel_tokens[t.offsets[i]:t.offsets[i + 1]].tobytes())
            for i in range(len(corpus))}


def test_spec_parsing_and_batch_shares():
    assert SPEC.sources() == [("W", "gamma"), ("Cu", "gamma")] and SPEC.energy_GeV == (10.0, 50.0)
    assert StreamSpec.from_dict(SPEC.to_dict()) == SPEC and SPEC.to_dict()["simulator_version"] == SIMULATOR_VERSION
    for bad in [("Xx",), ("W,W",), ("",)]:
        with pytest.raises(CalofmError):
            StreamSpec.parse(*bad)
    with pytest.raises(CalofmError):
        StreamSpec.parse("W", energy="100:10")
    with pytest.raises(CalofmError):
        StreamSpec.parse("W", geometry="nope")
    three = StreamSpec.parse("W,Ta,Cu")
    shares = np.array([three.step_counts(7, s) for s in range(3)])
    assert (shares.sum(1) == 7).all() and (shares.sum(0) == 7).all()  # the remainder rotates over the steps
    assert split_batch(8, 0, 3) == (0, 8) and split_batch(8, 2, 0) == (8, 0) and split_batch(8, 1, 3) == (2, 6)
    with pytest.raises(CalofmError):
        split_batch(1, 1, 1)


def test_stream_is_a_function_of_seed_step_and_rank(tokenizer):
    stream = ShowerStream(SPEC, tokenizer, n=5, seed=3)
    a, b = stream.batch(4), stream.batch(4)
    assert len(a.corpus) == 5 and showers(a.corpus) == showers(b.corpus)
    assert sorted(np.bincount(a.corpus.material).tolist()) == [2, 3]  # both sources, even shares
    # the same steps, made by two worker processes, arrive in step order and are identical
    inline = [ShowerStream(SPEC, tokenizer, n=5, seed=3, start=2).batch(s).corpus for s in range(2, 6)]
    reader = StreamReader(ShowerStream(SPEC, tokenizer, n=5, seed=3, start=2), workers=2, prefetch=1)
    try:
        pooled = [reader.next(s) for s in range(2, 6)]
        stats = reader.stats()
    finally:
        reader.close()
    assert all(showers(x) == showers(y) for x, y in zip(inline, pooled))
    assert stats["sim_showers_per_s"] > 0 and stats["sim_tokens_per_s"] > stats["sim_showers_per_s"]
    # ranks, steps and seeds draw disjoint showers
    seen = [showers(ShowerStream(SPEC, tokenizer, n=5, seed=seed, rank=rank).batch(step).corpus)
            for seed in (3, 4) for rank in (0, 1) for step in (0, 1)]
    assert sum(len(s) for s in seen) == len(set().union(*seen)) == 40


def test_resume_with_stream_is_exact(tmp_path):
    full = tmp_path / "full"
    train(config(full), threads=1, progress=False, log=quiet)
    cut = tmp_path / "cut"
    # killed after 4 steps (the checkpoint is at step 3); resumed with another number of workers
    train(config(cut, workers=1), threads=1, progress=False, stop_after=4, log=quiet)
    summary = train(None, resume_dir=str(cut), threads=1, progress=False, log=quiet, session={"workers": 2})
    assert summary["steps"] == 6
    a, b = weights(full), weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    manifest = json.load(open(cut / "manifest.json"))["training"]
    assert manifest["simulator_version"] == SIMULATOR_VERSION
    assert manifest["stream"]["materials"] == ["W", "Cu"] and manifest["stream"]["energy_GeV"] == [10.0, 50.0]
    assert manifest["stream"]["seed"] == 5 and manifest["precision"] == "fp32"
    assert set(manifest["val"]) == {"W", "Cu"} and manifest["val"]["W"]["n_showers"] == 3
    events = [json.loads(line) for line in open(cut / "log.jsonl")]
    train_events = [e for e in events if e["event"] == "train"]
    assert all(e["sim_tokens_per_s"] > 0 and e["stream_workers"] in (1, 2) for e in train_events)
    with pytest.raises(CalofmError, match="cannot change"):
        train(None, resume_dir=str(cut), threads=1, progress=False, log=quiet, session={"lr": 1.0})
    # a run cannot continue on another simulator's showers
    state_path = cut / "checkpoints" / "step-00000006" / "train_state.json"
    state = json.load(open(state_path))
    state["simulator_version"] = SIMULATOR_VERSION - 1
    json.dump(state, open(state_path, "w"))
    with pytest.raises(CalofmError, match="simulator version"):
        train(None, resume_dir=str(cut), threads=1, progress=False, log=quiet)


def test_files_mixed_with_stream(tmp_path):
    ta = write_synthetic(str(tmp_path / "Ta.h5"), 30, material="Ta", seed=1, mean_hits=20)
    out = tmp_path / "mixed"
    summary = train(config(out, data=(ta,), steps=2, ckpt_every=2, eval_every=2), threads=1, progress=False, log=quiet)
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["materials"] == ["Ta", "W", "Cu"] and set(summary["val"]) == {"Ta", "W", "Cu"}
    assert summary["files"][0]["material"] == "Ta" and summary["stream"]["materials"] == ["W", "Cu"]
    assert set(manifest["tokenizer"]["totals"]) == {"Ta/gamma", "W/gamma", "Cu/gamma"}


@pytest.mark.slow
def test_ddp_ranks_stream_their_own_showers(tmp_path, tokenizer):
    cfg = config(tmp_path / "ddp", steps=2, ckpt_every=2, eval_every=2, batch_size=4)
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg.to_dict()), nprocs=2, join=True)
    manifest = json.load(open(tmp_path / "ddp" / "manifest.json"))["training"]
    # the global token count sums both ranks' streams: rank r's showers of step s are ShowerStream(rank=r).batch(s)
    tok = ShowerTokenizer.from_dict(json.load(open(tmp_path / "ddp" / "manifest.json"))["tokenizer"])
    expected = 0
    for rank in (0, 1):
        stream = ShowerStream(SPEC, tok, n=2, seed=5, rank=rank)
        expected += sum(b.n_targets(np.arange(len(b))) for b in (stream.batch(s).corpus for s in (0, 1)))
    assert manifest["tokens_seen"] == expected and manifest["world_size"] == 2


def test_time_budget_fits_the_schedule(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("calofm.training.trainer.time.time", lambda: clock[0])
    cfg = config("unused", steps=None, max_minutes=1.0, warmup=10)
    from calofm.training.distributed import DistInfo

    budget = BudgetClock(cfg, t0=100.0, step=0)
    for step in range(1, 11):
        clock[0] += 0.5  # 2 steps/s
        fitted = budget.fit_steps(step, DistInfo())
        assert fitted == (step == 10)
        assert not budget.out_of_time(DistInfo())
    # 55 s left at 2 steps/s, 10% held back
    assert budget.rate == pytest.approx(2.0) and budget.steps == 10 + int(0.9 * 2.0 * 55.0)
    clock[0] = 160.0
    assert budget.out_of_time(DistInfo())
    with pytest.raises(CalofmError, match="time budget"):
        config("unused", steps=None)


def test_time_budget_stops_with_a_checkpoint_and_resumes(tmp_path):
    out = tmp_path / "budget"
    # a budget already spent before the first step ends: one step per invocation, each checkpointed
    summary = train(config(out, steps=None, max_minutes=1e-6), threads=1, progress=False, log=quiet)
    assert summary["steps"] == 1 and open(out / "checkpoints" / "latest").read().strip() == "step-00000001"
    summary = train(None, resume_dir=str(out), threads=1, progress=False, log=quiet, session={"max_minutes": 1e-6})
    assert summary["steps"] == 2 and summary["train_config"]["steps"] is None


def test_command_line_streaming(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--simulate", "W,Cu", "--energy", "10:50", "--preset", "tiny", "-o", str(out), "--steps", "2",
            "--batch-size", "4", "--eval-every", "2", "--ckpt-every", "2", "--log-every", "1", "--max-val", "2",
            "--workers", "1", "--threads", "1", "--no-progress", "--precision", "fp32",
            "--model", '{"d_model": 16, "n_heads": 2}']
    assert main(args) == 0
    events = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [e["step"] for e in events if e["event"] == "train"] == [1, 2]
    assert all(e["stream_workers"] == 1 and e["sim_showers_per_s"] > 0 for e in events if e["event"] == "train")
    capsys.readouterr()
    assert main(["train", "--resume", "-o", str(out), "--max-minutes", "1", "--no-progress"]) == 0  # already done
    assert main(["train", "--simulate", "W,Unobtainium", "-o", str(tmp_path / "x")]) == 2
    assert "Unobtainium" in capsys.readouterr().err
    assert main(["train", "--simulate", "W", "--energy", "100:10", "-o", str(tmp_path / "y")]) == 2
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")


def test_extend_on_streamed_showers(tmp_path):
    from calofm.generation import load
    from calofm.extension.train import extend

    base = tmp_path / "base"
    train(config(base, steps=2, ckpt_every=2, eval_every=2), threads=1, progress=False, log=quiet)
    kw = dict(steps=2, batch_size=4, warmup=1, progress=False, log=quiet, threads=1, workers=0, max_val=3,
              n_reference=16, precision="fp32")
    ta = tmp_path / "ta"
    training = extend("material", str(base), [], str(ta), stream=StreamSpec.parse("Ta", energy="10:50"), **kw)
    assert training["simulator_version"] == SIMULATOR_VERSION and training["n_streamed_showers"] == 8
    assert training["data_summary"]["stream"]["materials"] == ["Ta"] and set(training["validation"]) == {"Ta"}
    model = load(str(base), [str(ta)])
    assert "Ta" in model.tokenizer.materials.names() and "Ta/gamma" in model.tokenizer.totals.keys()
    with pytest.raises(CalofmError, match="not the new particle"):
        extend("particle", str(base), [], str(tmp_path / "em"), particle="e-",
               stream=StreamSpec.parse("W", "gamma"), **kw)
    with pytest.raises(CalofmError, match="no data given"):
        extend("material", str(base), [], str(tmp_path / "none"), **kw)
