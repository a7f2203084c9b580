"""Training: schedule, exact resume, DDP equivalence, end-to-end command line."""

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from calofm.cli.main import main
from calofm.errors import CalofmError
from calofm.training import TrainConfig, train
from calofm.training.schedule import BatchSampler, lr_at
from calofm.training.synthetic import write_synthetic


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return [write_synthetic(str(d / f"{m}.h5"), 40, material=m, seed=i, mean_hits=20)
            for i, m in enumerate(["W", "Ta", "Cu"])]


def quiet(*args, **kwargs):
    pass


def config(data, out, **kw):
    base = dict(data=tuple(data), out=str(out), preset="tiny", steps=8, batch_size=8, lr=3e-3, warmup=2,
                eval_every=4, ckpt_every=3, log_every=2, max_val=4, seed=5, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def weights(run_dir):
    return load_file(os.path.join(run_dir, "model.safetensors"))


def test_schedule_and_sampler():
    assert lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 10, 100, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(55, 1.0, 10, 100, min_ratio=0.0) == pytest.approx(0.5)
    a = BatchSampler(10, 4, seed=1)
    seq, states = [], []
    for _ in range(5):
        seq.append(a.next())
        states.append(a.state())
    assert all(len(s) == 4 for s in seq) and len(set(np.concatenate(seq[:2]))) == 8  # no repeats in an epoch
    assert states[3] == {"epoch": 1, "cursor": 8}  # the incomplete tail of an epoch is dropped
    resumed = BatchSampler(10, 4, seed=1, **states[3])
    assert np.array_equal(resumed.next(), seq[4])
    with pytest.raises(CalofmError):
        BatchSampler(3, 4, seed=0)


@pytest.mark.parametrize("precision", ["bf16"])
def test_resume_reproduces_uninterrupted_run(data, tmp_path, precision):
    full = tmp_path / "full"
    train(config(data, full, precision=precision), threads=1, progress=False, log=quiet)
    cut = tmp_path / "cut"
    # killed after 5 steps: the last checkpoint is at step 3, steps 4-5 are lost and redone
    train(config(data, cut, precision=precision), threads=1, progress=False, stop_after=5, log=quiet)
    with open(cut / "checkpoints" / "latest") as fh:
        assert fh.read().strip() == "step-00000003"
    with pytest.raises(CalofmError, match="already holds a training run"):
        train(config(data, cut), threads=1, progress=False, log=quiet)
    summary = train(None, resume_dir=str(cut), threads=1, progress=False, log=quiet)
    assert summary["steps"] == 8
    a, b = weights(full), weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in open(cut / "log.jsonl")]
    assert steps == sorted(steps) and len(steps) == len(set((s, e) for s, e in zip(
        steps, [json.loads(line)["event"] for line in open(cut / "log.jsonl")])))  # no duplicated events
    # the manifest reports the data and the derived length
    manifest = json.load(open(cut / "manifest.json"))
    assert manifest["training"]["max_hits"] == manifest["tokenizer"]["max_hits"]
    assert manifest["training"]["train_tokenization"]["n_truncated_showers"] >= 0
    assert set(manifest["training"]["val"]) == {"W", "Ta", "Cu"}


def test_resume_may_shorten_the_schedule(data, tmp_path):
    # a run planned for 8 steps, killed after 5 (checkpoint at 3), finished at 6: the cosine ends at 6
    cut = tmp_path / "cut"
    train(config(data, cut), threads=1, progress=False, stop_after=5, log=quiet)
    with pytest.raises(CalofmError, match="done 3 steps already"):
        train(None, resume_dir=str(cut), threads=1, progress=False, log=quiet, session={"steps": 3})
    summary = train(None, resume_dir=str(cut), threads=1, progress=False, log=quiet, session={"steps": 6})
    assert summary["steps"] == 6
    assert json.load(open(cut / "manifest.json"))["training"]["steps"] == 6
    events = [json.loads(line) for line in open(cut / "log.jsonl")]
    lrs = {e["step"]: e["lr"] for e in events if e["event"] == "train"}
    assert max(lrs) == 6
    cfg = config(data, cut)
    for step in (4, 6):  # the step-th optimizer step used the rate of schedule index step - 1
        assert lrs[step] == pytest.approx(lr_at(step - 1, cfg.lr, cfg.warmup, 6, cfg.min_lr_ratio))
    assert lrs[6] < 0.5 * lr_at(5, cfg.lr, cfg.warmup, 8, cfg.min_lr_ratio)  # decays faster than planned


def test_run_exports_the_moving_average_of_its_weights(data, tmp_path):
    # the average never feeds back into training: with and without it the trained weights are the same
    train(config(data, tmp_path / "last", ema=0.0), threads=1, progress=False, log=quiet)
    train(config(data, tmp_path / "avg", ema=0.9), threads=1, progress=False, log=quiet)
    last, avg = weights(tmp_path / "last"), weights(tmp_path / "avg")
    opt = load_file(str(tmp_path / "avg" / "checkpoints" / "step-00000008" / "optimizer.safetensors"))
    trained = {k[len("weights."):]: v for k, v in opt.items() if k.startswith("weights.")}
    assert trained.keys() == avg.keys() == last.keys()
    assert all(torch.equal(trained[k], last[k]) for k in last)
    assert any(not torch.equal(avg[k], last[k]) for k in last)
    # "val" is the exported (averaged) model's, "val_raw" the trained weights'
    val = lambda run: [e for e in map(json.loads, open(tmp_path / run / "log.jsonl")) if e["event"] == "val"][-1]
    assert val("avg")["val_raw"] == val("last")["val"] == val("last")["val_raw"]
    assert val("avg")["val"] != val("avg")["val_raw"]
    with pytest.raises(CalofmError, match="ema must be in"):
        config(data, tmp_path / "bad", ema=1.0)


def test_checkpoint_without_trained_weights_resumes_from_its_model_file(data, tmp_path):
    # with --ema 0 the exported weights are the trained ones, stored once: the checkpoint's model file;
    # a checkpoint written before the weight average existed is the same, without an update count
    train(config(data, tmp_path / "full", ema=0.0), threads=1, progress=False, log=quiet)
    cut = tmp_path / "cut"
    train(config(data, cut, ema=0.0), threads=1, progress=False, stop_after=5, log=quiet)
    ckpt = cut / "checkpoints" / "step-00000003"
    assert not any(k.startswith("weights.") for k in load_file(str(ckpt / "optimizer.safetensors")))
    state = json.load(open(ckpt / "train_state.json"))
    state.pop("ema_updates")
    json.dump(state, open(ckpt / "train_state.json", "w"))
    train(None, resume_dir=str(cut), threads=1, progress=False, log=quiet)
    a, b = weights(tmp_path / "full"), weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_weight_average_follows_its_formula():
    from calofm.training.ema import WeightAverage

    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    average, expected = WeightAverage(model, decay=0.5), 0.0
    for n, w in enumerate([4.0, 8.0, -2.0, 6.0], start=1):
        with torch.no_grad():
            model.weight.fill_(w)
        average.update(model)
        d = min(0.5, n / (n + 9))  # the warm-up: 0.1, 0.18, 0.25, then the decay 0.5
        expected = d * expected + (1 - d) * w
        assert average.model.weight.item() == pytest.approx(expected)
    assert average.n == 4 and not average.model.weight.requires_grad
    last = WeightAverage(model, decay=0.0)
    last.update(model)
    assert torch.equal(last.model.weight, model.weight)
    # only what trains is averaged; copy_to puts the average back into those parameters alone
    two = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False))
    frozen, trained = two[0].weight, two[1].weight
    frozen.requires_grad_(False)
    average = WeightAverage(two, decay=0.5)
    with torch.no_grad():
        frozen.fill_(3.0)  # a frozen parameter changed behind the average's back is not followed
        trained.fill_(5.0)
    before = average.model[1].weight.item()
    average.update(two)
    assert average.model[0].weight.item() != 3.0 and average.model[1].weight.item() == pytest.approx(0.1 * before + 0.9 * 5.0)
    average.copy_to(two)
    assert frozen.item() == 3.0 and trained.item() == average.model[1].weight.item()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, cfg_dict):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    train(TrainConfig.from_dict(cfg_dict), threads=1, progress=False, log=quiet)



def test_init_from_starts_at_the_given_weights(data, tmp_path):
    first = tmp_path / "first"
    train(config(data, first, steps=3, order="energy"), threads=1, progress=False, log=quiet)
    # with lr 0 (and so no decay) the continued run must end exactly where it started
    second = tmp_path / "second"
    train(config(data, second, steps=2, lr=0.0, init_from=str(first), seed=6), threads=1, progress=False, log=quiet)
    w1, w2 = weights(first), weights(second)
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    trained = tmp_path / "trained"
    train(config(data, trained, steps=2, init_from=str(first), seed=6, order="layer"), threads=1, progress=False,
          log=quiet)
    assert any(not torch.equal(w1[k], weights(trained)[k]) for k in w1)
    with open(first / "manifest.json") as f1, open(second / "manifest.json") as f2:
        t1, t2 = json.load(f1)["tokenizer"], json.load(f2)["tokenizer"]
    assert t1["vocabularies"] == t2["vocabularies"] and t1["max_hits"] == t2["max_hits"]
    # the hit order: the start model's unless given, and then the new one with the same vocabularies
    with open(trained / "manifest.json") as f3:
        t3 = json.load(f3)["tokenizer"]
    assert (t1["order"], t2["order"], t3["order"]) == ("energy", "energy", "layer")
    assert t3["vocabularies"] == t1["vocabularies"] and t3["max_hits"] == t1["max_hits"]
    # the manifest states the whole compute: the start model's tokens and time plus its own, also twice over
    third = tmp_path / "third"
    train(config(data, third, steps=1, init_from=str(trained), seed=7), threads=1, progress=False, log=quiet)
    runs = {}
    for name in ("first", "trained", "third"):
        with open(tmp_path / name / "manifest.json") as fh:
            runs[name] = json.load(fh)["training"]
    assert "init_from" not in runs["first"]
    assert runs["trained"]["init_from"]["tokens_seen_total"] == runs["first"]["tokens_seen"] > 0
    assert runs["third"]["init_from"]["sha256"] == json.load(open(trained / "manifest.json"))["weights"]["sha256"]
    assert runs["third"]["tokens_seen_total"] == sum(runs[n]["tokens_seen"] for n in runs)
    assert runs["third"]["wall_time_s_total"] >= runs["first"]["wall_time_s"] + runs["trained"]["wall_time_s"]

def test_two_process_ddp_matches_single_process(data, tmp_path):
    # aux losses are per-rank estimates (the load-balance loss is not additive over tokens), so they are
    # switched off here; the token losses are normalized by the global token count and must agree
    kw = dict(steps=3, ckpt_every=3, eval_every=3, precision="fp32", model={"lb_coef": 0.0, "z_coef": 0.0})
    train(config(data, tmp_path / "one", **kw), threads=1, progress=False, log=quiet)
    cfg = config(data, tmp_path / "two", **kw).to_dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg), nprocs=2, join=True)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((a[k] - b0).abs().max().item() for k, b0 in load_file(
        str(tmp_path / "one" / "checkpoints" / "step-00000003" / "model.safetensors")).items())
    print(f"\nDDP 2 processes vs 1: max |param diff| {diff:.2e}")
    assert diff < 1e-5
    val_one = json.load(open(tmp_path / "one" / "manifest.json"))["training"]["val"]
    val_two = json.load(open(tmp_path / "two" / "manifest.json"))["training"]["val"]
    for m in val_one:
        assert val_one[m]["nll"] == pytest.approx(val_two[m]["nll"], rel=1e-5)
    assert moved == 0.0  # the run dir exports its last checkpoint


def test_command_line_train_generate_info(data, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--data", *data, "--preset", "tiny", "-o", str(out), "--steps", "4", "--batch-size", "6",
               "--eval-every", "4", "--ckpt-every", "2", "--log-every", "2", "--threads", "1", "--no-progress",
               "--model", '{"d_model": 16, "n_heads": 2}'])
    assert rc == 0
    assert sorted(os.listdir(out)) == [".lock", "checkpoints", "log.jsonl", "manifest.json", "model.safetensors"]
    events = [json.loads(line) for line in open(out / "log.jsonl")]
    assert {e["event"] for e in events} == {"train", "val"}
    assert set(events[0]["expert_utilization"]) == {"W", "Ta", "Cu"}
    gen = tmp_path / "gen.h5"
    rc = main(["generate", "--model", str(out), "--material", "Ta", "--n", "5", "--energy", "20:40", "--seed", "2",
               "--threads", "1", "--no-progress", "-o", str(gen)])
    assert rc == 0
    from calofm.data import read_showers

    incident, showers, info = read_showers(str(gen))
    assert showers.shape == (5, 4500) and info.material == "Ta" and info.particle == "gamma"
    assert info.geometry.absorber == "Ta" and np.all((incident >= 2e4) & (incident <= 4e4))
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    shown = capsys.readouterr()
    assert "d_model" not in shown.err
    assert "min-p cuts (sampling defaults): energy 0.003, voxel 0.003 (calofm defaults" in shown.out
    assert "weights: moving average over about 500 steps (--ema 0.998)" in shown.out
    assert main(["train", "--data", *data, "--preset", "nope", "-o", str(tmp_path / "x")]) == 2
    assert main(["train", "-o", str(tmp_path / "y")]) == 2  # no data, no resume
    assert main(["train", "--resume", "-o", str(tmp_path / "nothing")]) == 2
