"""`calofm demo`: the whole pipeline on the embedded defaults, in one command.

1. load a model (default the shipped `calofm-small`; `--model calofm-ild`, or any model directory) with
   every adapter shipped beside it (adapters/<name>/, each after the adapters it requires): for
   `calofm-small` the Pb material and e- particle adapters;
2. simulate reference showers with the embedded Monte Carlo, in the model's own readout geometry,
   10-100 GeV, for every (material, particle) class the model and its adapters were trained on (the
   classes of their fitted shower totals): for `calofm-small` W, Ta, Cu photons (pre-training), Pb
   photons (material adapter) and W electrons (particle adapter);
3. generate the same number of showers for each, timing the model and the simulator;
4. evaluate everything with `calofm evaluate` into one report: per-sample metrics table with noise
   floors, plots, and the speed figures; `summary.json` holds the speed rows and the stage times.

500 showers per sample by default: the whole demo then takes 3-6 minutes on 2 CPU cores, with or
without bf16 instructions (the evaluation is half of it). `--n 1000` halves the AUC uncertainty
(about ±0.02 instead of ±0.03) for twice the time.
"""

from __future__ import annotations

import html
import json
import os
import time

import torch

from calofm.checkpoint import atomic_write_text
from calofm.errors import CalofmError

DEFAULT_N, QUICK_N = 500, 120  # showers per sample


def speed_table(rows: list[dict]) -> str:
    esc = html.escape
    out = ["<table><tr><th>sample</th><th>model showers/s</th><th>ms/shower</th><th>mean hits</th>"
           "<th>simulator showers/s</th></tr>"]
    for r in rows:
        out.append(f"<tr><td>{esc(r['sample'])}</td><td>{r['model_showers_per_s']:.1f}</td>"
                   f"<td>{r['model_ms_per_shower']:.1f}</td><td>{r['mean_hits']:.0f}</td>"
                   f"<td>{r['simulator_showers_per_s']:.0f}</td></tr>")
    out.append("</table>")
    return "".join(out)


def demo_adapters(model_dir: str) -> list[str]:
    """The adapters shipped beside a model (adapters/<name>/), ordered so that each comes after the
    adapters it was trained on top of (its manifest's `requires`), else by name."""
    from calofm.extension.adapters import read_adapter_manifest
    from calofm.pretrained import shipped_adapters

    names = shipped_adapters(model_dir)
    manifests = {n: read_adapter_manifest(os.path.join(model_dir, "adapters", n)) for n in names}
    digest = {manifests[n]["weights"]["sha256"]: n for n in names}
    ordered: list[str] = []

    def visit(name: str, path: tuple = ()) -> None:
        if name in ordered:
            return
        if name in path:
            raise CalofmError(f"{model_dir}: shipped adapters require each other in a circle ({', '.join(path)})")
        for sha in manifests[name]["spec"].get("requires", []):
            if sha in digest:
                visit(digest[sha], path + (name,))
        ordered.append(name)

    for name in names:
        visit(name)
    return ordered


def demo_samples(shower_model) -> list[tuple[str, str]]:
    """The (material, particle) classes a model and its adapters were trained on: the classes of their
    shower totals (fitted on the training data), in the order they were added; a model without any
    falls back to its materials with its first particle."""
    from calofm.tokenizer.totals import class_key

    materials, particles = shower_model.materials, shower_model.particles
    known = {class_key(m, p): (m, p) for m in materials for p in particles}
    samples = [known[k] for k in shower_model.tokenizer.totals.keys() if k in known]
    return samples or [(m, particles[0]) for m in materials]


def run_demo(output: str = "demo-report", quick: bool = False, n: int | None = None, seed: int = 1,
             model: str = "calofm-small", batch_size: int = 500, threads: int | None = None, log=print) -> dict:
    from calofm.evaluate.compare import Options
    from calofm.evaluate.report import evaluate_files
    from calofm.generation import load
    from calofm.simulation import simulate_to_file

    if threads:
        torch.set_num_threads(threads)
    n = n or (QUICK_N if quick else DEFAULT_N)
    if n < 100:
        raise CalofmError("the demo needs at least 100 showers per sample (--n)")
    t_total = time.perf_counter()
    data = os.path.join(output, "data")
    os.makedirs(data, exist_ok=True)

    from calofm.pretrained import resolve_model

    adapters = demo_adapters(resolve_model(model))
    log(f"[1/4] loading the model {model!r} with adapters {', '.join(adapters) or '(none)'}")
    shower_model = load(model, adapters=adapters)
    samples = demo_samples(shower_model)
    log(f"      {shower_model!r}; classes {', '.join(f'{m} {p}' for m, p in samples)}")

    refs, gens, speed = [], [], []
    for i, (material, particle) in enumerate(samples):
        label = f"{material}_{particle}"
        ref_path, gen_path = os.path.join(data, f"ref_{label}.h5"), os.path.join(data, f"{label}.h5")
        log(f"[2/4] {label}: simulating {n} reference showers")
        t = time.perf_counter()
        simulate_to_file(ref_path, n, material, particle, (10, 100), geometry=shower_model.geometry,
                         seed=seed + 100 + i, progress=False)
        sim_rate = n / (time.perf_counter() - t)
        log(f"[3/4] {label}: generating {n} showers with the model")
        t = time.perf_counter()
        shower_model.generate(n, material=material, particle=particle, energy_GeV=(10, 100), seed=seed + i,
                              batch_size=batch_size, output=gen_path, progress=True)
        elapsed = time.perf_counter() - t
        speed.append({"sample": label, "model_showers_per_s": n / elapsed, "model_ms_per_shower": 1000 * elapsed / n,
                      "mean_hits": shower_model.last_stats["mean_hits"], "simulator_showers_per_s": sim_rate})
        refs.append(ref_path)
        gens.append(gen_path)

    t_generate = time.perf_counter() - t_total
    log(f"[4/4] evaluating {len(gens)} samples against their references")
    opts = Options(seed=seed, n_boot=20 if quick else 50, max_epochs=8 if quick else 30, log=log)
    sections = [("Speed (this machine, "
                 f"{torch.get_num_threads()} threads, batch {batch_size})", speed_table(speed))]
    metrics = evaluate_files(refs, gens, output, opts=opts, sections=sections)
    seconds = time.perf_counter() - t_total
    summary = {"model": model, "adapters": adapters, "geometry": shower_model.geometry.name,
               "samples": [f"{m}_{p}" for m, p in samples], "n_per_sample": n, "speed": speed, "seconds": seconds,
               "seconds_load_simulate_generate": t_generate, "seconds_evaluate": seconds - t_generate,
               "threads": torch.get_num_threads(), "report": os.path.join(output, "index.html"),
               "auc_high": {k: v.get("classifier_auc_high") for k, v in metrics.get("materials", {}).items()}}
    atomic_write_text(os.path.join(output, "summary.json"), json.dumps(summary, indent=1) + "\n")
    log(f"demo finished in {summary['seconds']:.0f} s; open {summary['report']}")
    return summary

