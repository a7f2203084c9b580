"""The diffusion baseline trains, samples (DDPM and DDIM), saves and reloads on a tiny config."""

import numpy as np
import pytest
import torch

from calofm.baselines.diffusion import DiffusionBaseline, DiffusionConfig, cosine_alpha_bar, train_diffusion
from calofm.errors import CalofmError
from calofm.simulation import simulate_to_file


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("diffusion")
    files = []
    for material in ("W", "Pb"):
        path = str(d / f"{material}.h5")
        simulate_to_file(path, 64, material, "gamma", (10, 100), seed=1, workers=1, progress=False)
        files.append(path)
    model = train_diffusion(files, str(d / "model"), channels=8, steps=150, batch_size=16, lr=5e-3, progress=False)
    return d, files, model


def test_schedule_is_monotone():
    a = cosine_alpha_bar(400)
    assert a[0] == pytest.approx(1.0) and a[-1] < 1e-3 and torch.all(torch.diff(a) < 0)


def test_preprocessing_round_trip(tiny_run):
    _, files, model = tiny_run
    from calofm.data import read_showers

    _, showers, _ = read_showers(files[0], stop=8)
    back = model.from_image(model.to_image(showers))
    assert np.allclose(back, showers, rtol=1e-4, atol=1e-6)


def test_training_reduces_the_denoising_loss(tiny_run):
    d, _, model = tiny_run
    import json

    training = json.load(open(d / "model" / "manifest.json"))["training"]
    assert training["materials"] == ["W", "Pb"] and training["n_showers"] == 128
    # zero-initialized output: the first losses are E[v^2] = E[a] E[noise^2] + E[1 - a] E[x0^2], with x0
    # mostly -1 (empty cells), so a little under 1 (the first 10 steps already learn a little)
    assert 0.6 < training["initial_loss"] < 1.1
    assert training["final_loss"] < 0.8 * training["initial_loss"]


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_prediction_inverts_the_forward_process(prediction):
    """From x_t and the exact network target, clean_and_noise recovers x0 and the noise."""
    model = DiffusionBaseline(DiffusionConfig(channels=8, prediction=prediction))
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((3, 20, 16, 16), generator=g) * 2 - 1
    noise = torch.randn((3, 20, 16, 16), generator=g)
    for t in (1, 150, 399):
        a = model.alpha_bar[t]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = noise if prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * x0
        got_x0, got_noise = model.clean_and_noise(target, xt, a)
        tol = 1e-4 if prediction == "v" or t < 399 else 2e-2  # eps: x0 = noise error x sqrt((1 - a) / a)
        assert torch.allclose(got_x0, x0, atol=tol) and torch.allclose(got_noise, noise, atol=tol)
    with pytest.raises(CalofmError, match="prediction"):
        DiffusionConfig(prediction="x0")


@pytest.mark.parametrize("steps", [None, 5])
def test_sampling_gives_valid_showers(tiny_run, steps):
    _, _, model = tiny_run
    incident = np.array([20e3, 80e3, 50e3])
    showers = model.sample(incident, np.array([0, 1, 1]), steps=steps, seed=3, batch_size=2, bf16=False)
    assert showers.shape == (3, 4500) and np.all(np.isfinite(showers)) and np.all(showers >= 0)
    nonzero = showers[showers > 0]
    assert nonzero.size == 0 or nonzero.min() >= model.cfg.threshold_MeV


def test_save_load_reproduces_samples_and_refuses_tampering(tiny_run):
    d, _, model = tiny_run
    loaded, geometry = DiffusionBaseline.load(str(d / "model"))
    assert geometry.n_voxels == 4500
    args = (np.array([30e3, 60e3]), np.array([0, 1]))
    assert np.array_equal(model.sample(*args, steps=4, seed=9, bf16=False),
                          loaded.sample(*args, steps=4, seed=9, bf16=False))
    weights = d / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    tampered = d / "tampered"
    tampered.mkdir()
    (tampered / "model.safetensors").write_bytes(bytes(data))
    (tampered / "manifest.json").write_text((d / "model" / "manifest.json").read_text())
    with pytest.raises(CalofmError, match="sha256"):
        DiffusionBaseline.load(str(tampered))


def test_refuses_non_cartesian_or_mixed_geometries(tmp_path, tiny_run):
    _, files, _ = tiny_run
    ild = str(tmp_path / "ild.h5")
    simulate_to_file(ild, 4, "W", "gamma", 50, geometry="ild", seed=1, workers=1, progress=False)
    with pytest.raises(CalofmError, match="geometry differs"):
        train_diffusion([files[0], ild], str(tmp_path / "m"), channels=8, steps=1, progress=False)


@pytest.mark.slow  # the benchmark measures a matmul peak: seconds here, minutes on a CPU without bf16
def test_bench_generate_command_writes_the_promised_keys(tiny_run, tmp_path):
    """The benchmark command end to end on tiny settings (figures are not asserted: timing is not a test)."""
    import json

    from calofm.cli.main import main

    d, _, _ = tiny_run
    out = tmp_path / "bench.json"
    assert main(["bench", "generate", "--model", "calofm-small", "--batches", "1,3", "--n", "3", "--energies", "50",
                 "--energy-n", "2", "--ablation", "--ablation-n", "2", "--baseline", str(d / "model"),
                 "--baseline-steps", "3,2", "--baseline-batches", "2", "--threads", "1", "--decode", "fp32,bf16+graph",
                 "--baseline-graph", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert {"device", "model_params", "results", "baseline", "simulator_showers_per_s"} <= set(res)
    assert [(r["decode"], r["batch"]) for r in res["results"]] == [("fp32", 1), ("fp32", 3), ("bf16+graph", 1),
                                                                   ("bf16+graph", 3)]
    assert [r["graph"] for r in res["results"]] == [False, False, True, True]
    # each row's FLOP/s against the matmul peak of its own precision (fp32 decode, bf16+graph, the bf16
    # baseline), so no row's fraction depends on how fast this CPU runs bf16
    assert set(res["matmul_peak_flops"]) == {"fp32", "bf16"} and min(res["matmul_peak_flops"].values()) > 0
    for r in res["results"] + res["baseline"]:
        assert {"batch", "showers_per_s", "ms_per_shower", "tokens_per_s", "flops_fraction"} <= set(r)
        assert r["showers_per_s"] > 0 and r["flops_per_s"] > 0
        assert r["flops_fraction"] == pytest.approx(r["flops_per_s"] / res["matmul_peak_flops"][r["precision"]])
        if r["precision"] == "fp32":  # a small model's decode is far from fp32 matmul speed
            assert r["flops_fraction"] < 1
    # --baseline-graph: each point eager and replayed (on CPU the replay runs eagerly)
    assert [(r["batch"], r["steps"], r["graph"]) for r in res["baseline"]] == [(2, 3, False), (2, 3, True),
                                                                             (2, 2, False), (2, 2, True)]
    assert {a["variant"] for a in res["ablation"]} == {"all on", "compact off", "all on + bf16 autocast",
                                                      "two-stage (totals on)"}
    assert res["complete"] and not (tmp_path / "bench.json.tmp").exists()
    # graph set-ups time their first call (captures) apart from the repeats
    assert all((r["first_call_seconds"] is not None) == r["graph"] for r in res["results"])


@pytest.mark.slow  # the benchmark measures a matmul peak: seconds here, minutes on a CPU without bf16
def test_bench_json_is_written_after_every_row(tiny_run, tmp_path, monkeypatch):
    """A benchmark stopped by a time limit keeps the rows it timed: the JSON is rewritten (atomically)
    after each one, marked incomplete until the end."""
    import json

    import calofm.cli.bench_commands as bench
    from calofm.cli.main import main

    out = tmp_path / "bench.json"
    seen = []
    median = bench._median_time

    def spy(fn, repeats):  # what the file holds when each timing starts
        seen.append(json.loads(out.read_text()) if out.exists() else None)
        return median(fn, repeats)

    monkeypatch.setattr(bench, "_median_time", spy)
    assert main(["bench", "generate", "--model", "calofm-small", "--batches", "1,2", "--n", "2", "--energies", "",
                 "--threads", "1", "--sim-n", "2", "--json", str(out)]) == 0
    partial = [s for s in seen if s is not None]
    assert partial and not partial[0]["complete"] and len(partial[0]["results"]) == 1
    assert json.loads(out.read_text())["complete"]


@pytest.mark.parametrize("setup", ["fp16", "bf16+graph+graph", "fp32+cuda", "graph"])
def test_bench_refuses_an_unknown_decode_setup(tmp_path, setup):
    from calofm.cli.main import main

    out = tmp_path / "bench.json"
    assert main(["bench", "generate", "--decode", setup, "--batches", "1", "--json", str(out)]) != 0
    assert not out.exists()


def test_bench_decode_setups_name_precision_then_switches():
    from calofm.cli.bench_commands import parse_setup

    opt = parse_setup("bf16+graph+nocompact")
    assert opt.precision == "bf16" and opt.graph and not opt.compact and not opt.compile
    opt = parse_setup("fp32+compile")
    assert opt.precision == "fp32" and opt.compile and opt.graph is False and opt.compact


def test_baseline_generate_command_checks_its_output(tiny_run, tmp_path, capsys):
    from calofm.cli.main import main
    from calofm.data.showers import read_showers

    d, _, _ = tiny_run
    out = tmp_path / "gen.h5"
    argv = ["baseline", "generate", "--model", str(d / "model"), "--material", "W", "--n", "6", "--steps", "2",
            "-o", str(out)]
    assert main(argv) == 0
    assert read_showers(str(out))[1].shape[0] == 6
    size = out.stat().st_size
    capsys.readouterr()
    assert main(argv) == 2 and "--force" in capsys.readouterr().err  # an existing output needs --force
    assert main([*argv[:-4], "--n", "1000000000000", "-o", str(tmp_path / "big.h5")]) == 2
    assert "memory" in capsys.readouterr().err and not (tmp_path / "big.h5").exists()
    assert main([*argv, "--force"]) == 0 and out.stat().st_size > 0 and size > 0
