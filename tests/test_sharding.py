"""Sharded generation and simulation: shard K of N (--shard K/N, or a torchrun rank) makes its range of
the run's showers into its own file, and `calofm merge` joins the shards into the one-process run's file;
merge refuses files that are not one run's shards, exactly once."""

import json
import os

import h5py
import numpy as np
import pytest
import torch.multiprocessing as mp
from conftest import train_tiny_model
from test_training import _free_port  # the training tests' DDP launcher: free port, torchrun's variables

from calofm.cli.main import main
from calofm.errors import CalofmError
from calofm.sharding import Shard, parse_shard


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shard")
    train_tiny_model(directory)
    return str(directory / "run")


def contents(path) -> dict:
    with h5py.File(path, "r") as f:
        out = {name: f[name][:] for name in f}
        out.update({f"attr:{k}": v for k, v in f.attrs.items() if k not in ("shard",)})
    return out


def same_file(a, b, ignore=()) -> None:
    ca, cb = contents(a), contents(b)
    assert sorted(set(ca) - set(ignore)) == sorted(set(cb) - set(ignore))
    for k in ca:
        if k in ignore or k not in cb:
            continue
        if isinstance(ca[k], np.ndarray):
            assert np.array_equal(ca[k], cb[k]), k
        elif k not in ("attr:mean_hits",):
            assert ca[k] == cb[k], k
    if "attr:mean_hits" in ca and "attr:mean_hits" in cb:
        assert ca["attr:mean_hits"] == pytest.approx(cb["attr:mean_hits"], rel=1e-12)


def test_shard_ranges_cover_the_run_once():
    for n, count, unit in ((10, 3, 1), (1000, 7, 1), (600, 3, 256), (1000, 4, 256), (5, 5, 1)):
        ranges = [Shard(k, count).range(n, unit) for k in range(count)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges, ranges[1:]))
        assert all(lo % unit == 0 for lo, _ in ranges)
    assert Shard(2, 8).path("out/gen.h5") == "out/gen.shard-2-of-8.h5" and Shard().path("gen.h5") == "gen.h5"
    with pytest.raises(CalofmError, match="at most one shard per"):
        Shard(0, 4).range(600, 256)  # 3 chunks
    for bad in ("3/3", "-1/2", "1", "a/b", "1/0"):
        with pytest.raises(CalofmError, match="--shard must be K/N"):
            parse_shard(bad)


def test_generate_shards_merge_into_the_one_process_file(tiny, tmp_path, capsys):
    common = ["generate", "--model", tiny, "--material", "Cu", "--n", "23", "--seed", "4", "--no-progress"]
    single = tmp_path / "single.h5"
    assert main(common + ["-o", str(single)]) == 0
    out = tmp_path / "gen.h5"
    for k, batch in ((2, "5"), (0, "64"), (1, "3")):  # any order, any batch size
        assert main(common + ["--shard", f"{k}/3", "--batch-size", batch, "-o", str(out)]) == 0
        assert f"shard {k}/3 generate: " in capsys.readouterr().out
    shards = [str(tmp_path / f"gen.shard-{k}-of-3.h5") for k in range(3)]
    with h5py.File(shards[1], "r") as f:
        shard, run = json.loads(f.attrs["shard"]), json.loads(f.attrs["run"])
    assert (shard["start"], shard["stop"], shard["index"], shard["count"]) == (7, 15, 1, 3)
    assert run["seed"] == 4 and run["material"] == "Cu" and run["n"] == 23 and len(run["model_sha256"]) == 64
    merged = tmp_path / "merged.h5"
    assert main(["merge", shards[2], shards[0], shards[1], "-o", str(merged)]) == 0
    assert "wrote 23 showers of 3 shards" in capsys.readouterr().out
    same_file(merged, single, ignore=("attr:run",))
    # a killed shard is made again alone: the same file
    os.remove(shards[1])
    assert main(["merge", *shards[::2], "-o", str(tmp_path / "m2.h5")]) == 2
    assert "showers [7, 15) of the run's 23 are in no file given" in capsys.readouterr().err
    assert main(common + ["--shard", "1/3", "-o", str(out)]) == 0
    assert main(["merge", *shards, "-o", str(merged), "--force"]) == 0
    same_file(merged, single, ignore=("attr:run",))


def test_merge_refuses_what_is_not_one_runs_shards(tiny, tmp_path, capsys):
    def gen(name, *extra, shard="0/2"):
        argv = ["generate", "--model", tiny, "--n", "8", "--seed", "1", "--no-progress", "-o", str(tmp_path / name),
                *extra]
        assert main(argv + (["--shard", shard] if shard else [])) == 0
        return str(tmp_path / name).replace(".h5", f".shard-{shard.replace('/', '-of-')}.h5") if shard else \
            str(tmp_path / name)

    a0, a1 = gen("a.h5"), gen("a.h5", shard="1/2")
    refusals = {
        "seed": ([a0, gen("s.h5", "--seed", "2", shard="1/2")], "seed: 2 here, 1 there"),
        "class": ([a0, gen("c.h5", "--material", "Cu", shard="1/2")], "material: 'Cu' here, 'W' there"),
        "sampling": ([a0, gen("t.h5", "--temperature", "0.5", shard="1/2")], "sampling"),
        "run size": ([a0, gen("n.h5", "--n", "9", shard="1/2")], "n: 9 here, 8 there"),
        "overlap": ([a0, a1, gen("o.h5", shard="0/3")], "overlaps"),
        "missing": ([a1], "showers [0, 4) of the run's 8 are in no file given"),
        "twice": ([a0, a0, a1], "given twice"),
        "not a shard": ([a0, gen("whole.h5", shard=None)], "not a shard file"),
    }
    for what, (files, message) in refusals.items():
        out = tmp_path / f"m-{what}.h5"
        assert main(["merge", *files, "-o", str(out)]) == 2, what
        err = capsys.readouterr().err
        assert message in err and ("overlap" in what or "missing" in what or "twice" in what
                                   or os.path.basename(files[-1]) in err), (what, err)
        assert not out.exists()
    # a differing model: another model's digest in the run record
    with h5py.File(a1, "r+") as f:
        run = json.loads(f.attrs["run"])
        f.attrs["run"] = json.dumps({**run, "model_sha256": "0" * 64})
    assert main(["merge", a0, a1, "-o", str(tmp_path / "m.h5")]) == 2
    assert "model_sha256" in capsys.readouterr().err
    # never overwrites without --force, and never one of its inputs
    existing = tmp_path / "exists.h5"
    existing.write_bytes(b"keep")
    assert main(["merge", a0, gen("b.h5", shard="1/2"), "-o", str(existing)]) == 2
    assert "pass --force" in capsys.readouterr().err and existing.read_bytes() == b"keep"
    assert main(["merge", a0, a1, "-o", a0, "--force"]) == 2
    assert "is one of the shards" in capsys.readouterr().err


def test_simulate_shards_merge_into_the_one_process_file(tmp_path, capsys):
    common = ["simulate", "--material", "Pb", "--particle", "e-", "--n", "600", "--seed", "3", "--workers", "1",
              "--position", "random"]
    single = tmp_path / "single.h5"
    assert main(common + ["-o", str(single)]) == 0
    for k in range(3):
        assert main(common + ["--shard", f"{k}/3", "-o", str(tmp_path / "sim.h5")]) == 0
    shards = [str(tmp_path / f"sim.shard-{k}-of-3.h5") for k in range(3)]
    with h5py.File(shards[2], "r") as f:
        assert json.loads(f.attrs["shard"])["start"] == 512 and len(f["showers"]) == 88  # whole chunks
    merged = tmp_path / "merged.h5"
    assert main(["merge", *shards, "-o", str(merged)]) == 0
    same_file(merged, single, ignore=("attr:run",))
    assert main(common + ["--shard", "3/3", "-o", str(tmp_path / "x.h5")]) == 2
    assert main(common + ["--shard", "0/4", "-o", str(tmp_path / "x.h5")]) == 2  # 3 chunks of 256
    assert "at most one shard per block" in capsys.readouterr().err


def _torchrun_rank(rank, world, port, argv):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    assert main(argv) == 0


@pytest.mark.slow
def test_generate_under_torchrun_with_two_processes(tiny, tmp_path, capfd):
    """Two ranks of a (gloo, CPU) torchrun job: each writes its shard, rank 0 prints every rank's rate."""
    argv = ["generate", "--model", tiny, "--n", "10", "--seed", "6", "--threads", "1", "--no-progress"]
    mp.spawn(_torchrun_rank, args=(2, _free_port(), argv + ["-o", str(tmp_path / "g.h5")]), nprocs=2, join=True)
    out = capfd.readouterr().out
    assert "rank 0: 5 showers" in out and "rank 1: 5 showers" in out and "all 2 ranks: 10 showers" in out
    assert main(argv + ["-o", str(tmp_path / "single.h5")]) == 0
    shards = [str(tmp_path / f"g.shard-{k}-of-2.h5") for k in range(2)]
    assert main(["merge", *shards, "-o", str(tmp_path / "merged.h5")]) == 0
    same_file(tmp_path / "merged.h5", tmp_path / "single.h5", ignore=("attr:run",))
    # simulation too: two chunks of 256, one per rank
    sim = ["simulate", "--n", "300", "--seed", "2", "--workers", "1"]
    mp.spawn(_torchrun_rank, args=(2, _free_port(), sim + ["-o", str(tmp_path / "s.h5")]), nprocs=2, join=True)
    assert "all 2 ranks: 300 showers" in capfd.readouterr().out
    assert main(sim + ["-o", str(tmp_path / "s1.h5")]) == 0
    shards = [str(tmp_path / f"s.shard-{k}-of-2.h5") for k in range(2)]
    assert main(["merge", *shards, "-o", str(tmp_path / "sm.h5")]) == 0
    same_file(tmp_path / "sm.h5", tmp_path / "s1.h5", ignore=("attr:run",))
    with pytest.raises(CalofmError, match="--shard and torchrun"):
        os.environ["WORLD_SIZE"] = "2"
        try:
            parse_shard("0/2")
        finally:
            del os.environ["WORLD_SIZE"]
