"""`calofm evaluate`: files in, one report folder out (metrics.json, PNG figures, index.html).

Flow: inspect every file (fail fast on bad input) -> pair generated with reference files -> refuse
other geometries and other incident-energy spectra -> features -> metrics and noise floor (once
per reference) -> figures -> index.html -> metrics.json last, so its presence means a complete
report. Every file is written atomically; nothing already in the folder is deleted.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import html
import json
import math
import os
import re
import time
from dataclasses import dataclass

import numpy as np

from calofm import __version__
from calofm.checkpoint import atomic_write_text
from calofm.data.showers import inspect_file, read_showers
from calofm.detector.geometry import Geometry, get_geometry
from calofm.errors import CalofmError
from calofm.evaluate.classifier import MIN_SHOWERS, low_level_inputs
from calofm.evaluate.compare import (
    KPD_FPD_SCALE, Options, Prepared, check_energies, check_geometries, compare, noise_floor,
)
from calofm.evaluate.features import compute_features
from calofm.evaluate.published import N_KL_BINS, OBSERVABLES
from calofm.outputs import check_output_dir, write_error

UNITS = {
    "classifier_auc": "area under the ROC curve (0.5 = indistinguishable)",
    "jsd": "bits (0 = indistinguishable, 1 = disjoint)",
    "fpd": f"Frechet distance of the reference-standardized high-level features x {KPD_FPD_SCALE:g}, [value, error], "
           "extrapolated to infinite samples and clipped at 0",
    "kpd": f"unbiased MMD^2 with the kernel (x.y/d + 1)^3 x {KPD_FPD_SCALE:g}, [median, error]",
    "separation_power": "dimensionless, 0 = identical to 1 = disjoint",
    "wasserstein": "unit of the feature: MeV (e_layer_*), mm (c*, w*), layers (long_*, longitudinal_profile), "
                   "mm (radial_profile), log10(E/MeV) (hit_energy_spectrum), none otherwise",
    "published": "the published paper's metrics (calofm.evaluate.published): wasserstein = W1 of the raw values in "
                 "the observable's unit (" + ", ".join(f"{k} {u}" for k, (_, u) in OBSERVABLES.items()) + "); kl = "
                 f"KL(reference || generated) in nats over {N_KL_BINS} reference-quantile bins",
}


@dataclass
class Sample:
    """One file, read and prepared."""
    path: str
    label: str
    incident_MeV: np.ndarray  # (N,)
    showers: np.ndarray  # (N, V)
    geometry: Geometry
    prepared: Prepared | None = None
    low_norm: tuple | None = None  # constants of the low-level classifier input (from the reference)


# --- file handling ----------------------------------------------------------------------------
def _inspect(path: str, geometry: Geometry | None, binning: str | None):
    info = inspect_file(path, binning_xml=binning)
    if info.geometry is None and geometry is not None:
        info = inspect_file(path, geometry=geometry)
    return info


def pair_files(reference: list[str], generated: list[str], ref_infos: list,
               gen_infos: list) -> list[tuple[str, int, int]]:
    """(label, reference index, generated index) per comparison.

    One reference: every generated file against it. As many references as generated files: paired by
    material when every file names a distinct one, else in the order given.
    """
    if not reference or not generated:
        raise CalofmError("give at least one --reference and one --generated file")
    if len(reference) == 1:
        pairs = [(0, j) for j in range(len(generated))]
    elif len(reference) == len(generated):
        ref_mat = [i.material for i in ref_infos]
        gen_mat = [i.material for i in gen_infos]
        distinct = None not in ref_mat and len(set(ref_mat)) == len(ref_mat)
        if distinct and None not in gen_mat and set(ref_mat) == set(gen_mat):
            pairs = [(ref_mat.index(m), j) for j, m in enumerate(gen_mat)]
        else:
            pairs = [(j, j) for j in range(len(generated))]
    else:
        raise CalofmError(f"{len(reference)} reference files for {len(generated)} generated files: give one "
                          f"reference, or one per generated file")
    def label(j: int, scheme: str) -> str | None:
        info = gen_infos[j]
        if scheme == "material":
            return info.material
        if scheme == "material_particle":
            return f"{info.material}_{info.particle}" if info.material and info.particle else None
        return os.path.splitext(os.path.basename(generated[j]))[0]

    # rows are named by the generated files' material, else material_particle, else file name:
    # the first scheme that names every row uniquely
    for scheme in ("material", "material_particle", "file"):
        labels = [label(j, scheme) for _, j in pairs]
        if None not in labels and "" not in labels and len(set(labels)) == len(labels):
            return [(lab, i, j) for lab, (i, j) in zip(labels, pairs)]
    raise CalofmError(f"generated files must have distinct names or materials, got {', '.join(generated)}")


def _safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label)


def _clean(obj):
    """JSON-safe: numpy scalars to Python, NaN/inf to null."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# --- the evaluation ---------------------------------------------------------------------------
def evaluate_files(reference: list[str], generated: list[str], outdir: str, *, geometry: str | None = None,
                   binning: str | None = None, threshold_MeV: float = 0.0, max_showers: int | None = None,
                   allow_energy_mismatch: bool = False, plots: bool = True, opts: Options | None = None,
                   sections: list[tuple[str, str]] | None = None) -> dict:
    """Compare generated files with reference files and write the report; returns metrics.json's content.

    sections: extra (title, HTML) blocks for index.html, after the metrics table (e.g. speed figures).
    """
    opts = opts or Options()
    log = opts.log
    t_start = time.perf_counter()
    check_output_dir(outdir, force=True, what="report folder")  # a folder (or nothing) in a writable one
    if threshold_MeV < 0:
        raise CalofmError(f"the hit threshold must be >= 0 MeV, got {threshold_MeV:g}")
    if max_showers is not None and max_showers <= 0:
        raise CalofmError(f"--max-showers must be > 0, got {max_showers}")
    user_geometry = get_geometry(geometry) if geometry else None

    # 1. inspect everything first: bad files fail before any long computation
    ref_infos = [_inspect(p, user_geometry, binning) for p in reference]
    gen_infos = [_inspect(p, user_geometry, binning) for p in generated]
    pairs = pair_files(reference, generated, ref_infos, gen_infos)
    warnings = []
    for label, i, j in pairs:
        warnings += check_geometries(ref_infos[i].geometry, gen_infos[j].geometry, reference[i], generated[j])
        if ref_infos[i].particle and gen_infos[j].particle and ref_infos[i].particle != gen_infos[j].particle:
            warnings.append(f"{generated[j]} holds {gen_infos[j].particle} showers, "
                            f"the reference {ref_infos[i].particle}")
    for w in warnings:
        log(f"warning: {w}")

    # 2. read, check sizes and energies
    def read(path, info, minimum, role):
        e, s, _ = read_showers(path, stop=max_showers, binning_xml=binning,
                               geometry=None if (info.attrs.get("geometry") or binning) else info.geometry)
        if len(e) < minimum:
            raise CalofmError(f"{path}: {len(e)} showers; a {role} sample needs at least {minimum}")
        return Sample(path, os.path.basename(path), e, s, info.geometry)

    t = time.perf_counter()
    refs = [read(p, info, 2 * MIN_SHOWERS, "reference (two halves for the noise floor)")
            for p, info in zip(reference, ref_infos)]
    gens = [read(p, info, MIN_SHOWERS, "generated") for p, info in zip(generated, gen_infos)]
    energy_ks = {}
    for label, i, j in pairs:
        try:
            energy_ks[label] = check_energies(refs[i].incident_MeV, gens[j].incident_MeV, reference[i], generated[j])
        except CalofmError as exc:
            if not allow_energy_mismatch:
                raise
            log(f"warning: {exc}")
    log(f"read {sum(len(s.incident_MeV) for s in refs + gens)} showers from {len(refs) + len(gens)} files "
        f"in {time.perf_counter() - t:.1f} s")

    # 3. features (generated ones binned like their reference) and classifier inputs
    t = time.perf_counter()
    for s in refs:
        _prepare(s, threshold_MeV, None, opts.classifier)
    for label, i, j in pairs:
        _prepare(gens[j], threshold_MeV, refs[i], opts.classifier)
    log(f"features in {time.perf_counter() - t:.1f} s")

    # 4. metrics: the noise floor once per reference, then each comparison
    floors, results, figures = {}, {}, {}
    _mark_incomplete(outdir)
    for label, i, j in pairs:
        ref, gen = refs[i], gens[j]
        t = time.perf_counter()
        if i not in floors:
            floors[i] = noise_floor(ref.prepared, opts)
            log(f"noise floor of {reference[i]} in {time.perf_counter() - t:.1f} s")
            t = time.perf_counter()
        result = compare(ref.prepared, gen.prepared, opts, what=f"{label} vs reference")
        result["noise_floor"] = floors[i]
        result["material"], result["reference"], result["generated"] = label, reference[i], generated[j]
        result["energy_ks_distance"] = energy_ks.get(label)
        results[label] = result
        log(f"{label}: metrics in {time.perf_counter() - t:.1f} s — " + _summary_line(result))
        if plots:
            t = time.perf_counter()
            sub = outdir if len(pairs) == 1 else os.path.join(outdir, _safe_name(label))
            figures[label] = [(os.path.join(os.path.relpath(sub, outdir), name) if sub != outdir else name, cap)
                              for name, cap in _plots(sub, ref, gen, result, opts.seed)]
            log(f"{label}: figures in {time.perf_counter() - t:.1f} s")

    # 5. the report: index.html, then metrics.json (last: its presence means the report is complete)
    seconds = time.perf_counter() - t_start
    meta = {
        "calofm_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threshold_MeV": threshold_MeV, "seed": opts.seed, "seconds": round(seconds, 1),
        "units": UNITS, "warnings": warnings,
    }
    if len(pairs) == 1:
        metrics = {**results[pairs[0][0]], **meta}
    else:
        metrics = {"materials": results, **meta}
    metrics = _clean(metrics)
    atomic_write_text(os.path.join(outdir, "index.html"), render_html(results, figures, outdir, meta, sections))
    atomic_write_text(os.path.join(outdir, "metrics.json"), json.dumps(metrics, indent=1) + "\n")
    return metrics


def _mark_incomplete(outdir: str) -> None:
    """Before the first new file: the folder's earlier metrics.json goes and index.html says that a
    report is being written, so a run stopped half-way never leaves old metrics beside new figures.
    (metrics.json is written last: its presence means the report is complete.)"""
    try:
        os.makedirs(outdir, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(outdir, "metrics.json"))
    except OSError as exc:
        raise write_error(outdir, exc) from None
    atomic_write_text(os.path.join(outdir, "index.html"),
                      "<!doctype html><title>calofm report: incomplete</title><p>This report is being written, or "
                      "its run was stopped before the end: it is incomplete (no metrics.json). Run calofm "
                      "evaluate again.</p>\n")


def _prepare(sample: Sample, threshold_MeV: float, ref: Sample | None, classifier: bool) -> None:
    """Features and classifier input of a sample; a generated one is binned and scaled like its reference."""
    hit_edges = None if ref is None else ref.prepared.features.profiles["hit_energy_spectrum"].edges
    features = compute_features(sample.incident_MeV, sample.showers, sample.geometry, threshold_MeV, hit_edges)
    low = None
    if classifier:
        low, sample.low_norm = low_level_inputs(sample.incident_MeV, sample.showers,
                                                None if ref is None else ref.low_norm)
    sample.prepared = Prepared(features, low)


def _plots(sub: str, ref: Sample, gen: Sample, result: dict, seed: int) -> list[tuple[str, str]]:
    from calofm.evaluate.plots import make_plots

    return make_plots(sub, ref.geometry, ref.prepared.features, gen.prepared.features, ref.incident_MeV,
                      ref.showers, gen.incident_MeV, gen.showers, result, seed=seed)


# --- text -------------------------------------------------------------------------------------
def _fmt(value, err=None, digits=3) -> str:
    if value is None:
        return "–"
    text = f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return text if err is None else f"{text} ± {err:.2g}"


def _summary_line(r: dict) -> str:
    u = r["uncertainties"]
    parts = [f"AUC low {_fmt(r['classifier_auc_low'], u['classifier_auc_low'])}",
             f"AUC high {_fmt(r['classifier_auc_high'], u['classifier_auc_high'])}",
             f"FPD {_fmt(*r['fpd'])}", f"KPD {_fmt(*r['kpd'])}", f"E_vis/E_inc worst bin: {response_text(r)}"]
    return ", ".join(parts)


def response_text(r: dict) -> str:
    """The response's worst bin in a few words: mean off by, IQR ratio, share beyond the simulated maximum."""
    w = r["response"]["worst"]
    if w["mean_rel_diff"] is None:
        return "–"
    iqr = w["iqr_ratio"]
    return (f"mean {100 * w['mean_rel_diff']:+.1f} %, IQR ×{'–' if iqr is None else f'{iqr:.2f}'}, "
            f"{100 * w['beyond_max_fraction']:.1f} % beyond max")


def summary_rows(results: dict) -> list[dict]:
    """One row per material: the headline metrics and their noise floors (used by the table and the CLI)."""
    rows = []
    for label, r in results.items():
        nf, u, nu = r["noise_floor"], r["uncertainties"], r["noise_floor"]["uncertainties"]
        sp = r["separation_power"]
        worst = max(sp, key=sp.get)
        rows.append({
            "material": label, "n_reference": r["n_reference"], "n_generated": r["n_generated"],
            **{k: (_fmt(r[k], u[k]), _fmt(nf[k], nu[k])) for k in
               ("classifier_auc_low", "classifier_auc_high", "jsd_low", "jsd_high")},
            "fpd": (_fmt(*r["fpd"]), _fmt(*nf["fpd"])), "kpd": (_fmt(*r["kpd"]), _fmt(*nf["kpd"])),
            "median_separation_power": (_fmt(float(np.median(list(sp.values())))),
                                        _fmt(float(np.median(list(nf["separation_power"].values()))))),
            "worst_feature": f"{worst} ({_fmt(sp[worst])}; floor {_fmt(nf['separation_power'][worst])})",
            "response": (response_text(r), response_text(nf)),
        })
    return rows


def published_table(r: dict) -> str:
    """The published paper's W1 and KL of one comparison, beside its noise floor, as an HTML table."""
    esc = html.escape
    p, nf = r["published"], r["noise_floor"].get("published", {"wasserstein": {}, "kl": {}})
    rows = ["<h3>The published paper's metrics</h3><table><tr><th>observable</th><th>unit</th><th>W1</th>"
            "<th>floor</th><th>KL(ref‖gen)</th><th>floor</th></tr>"]
    for k, (label, unit) in OBSERVABLES.items():
        rows.append(f"<tr><td>{esc(label)}</td><td>{esc(unit)}</td><td>{_fmt(p['wasserstein'].get(k))}</td>"
                    f"<td>{_fmt(nf['wasserstein'].get(k))}</td><td>{_fmt(p['kl'].get(k))}</td>"
                    f"<td>{_fmt(nf['kl'].get(k))}</td></tr>")
    rows.append(f"</table><p class='floor'>W1 of the raw values; KL in nats over {N_KL_BINS} bins at quantiles of "
                "the reference (definitions: docs/evaluation.md). Against calofm's embedded simulator, not Geant4: "
                "not the same numbers as the paper's.</p>")
    return "\n".join(rows)


CSS = """body{font-family:sans-serif;margin:2em;max-width:1500px}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}th{background:#eee}td:first-child{text-align:left}
.floor{color:#777;font-size:85%}figure{margin:1.5em 0}img{max-width:100%;border:1px solid #ddd}
figcaption{color:#333;margin-top:.3em}details{margin:1em 0}"""


def render_html(results: dict, figures: dict, outdir: str, meta: dict,
                sections: list[tuple[str, str]] | None = None) -> str:
    """One self-contained page: the metrics table, per-material figures embedded as base64 PNG."""
    esc = html.escape
    heads = ["material", "N ref", "N gen", "AUC low", "AUC high", "JSD low", "JSD high", "FPD ×10³", "KPD ×10³",
             "median sep. power", "E_vis/E_inc, worst 10 GeV bin", "worst feature"]
    keys = ["classifier_auc_low", "classifier_auc_high", "jsd_low", "jsd_high", "fpd", "kpd", "median_separation_power",
            "response"]
    lines = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>calofm evaluation</title>",
             f"<style>{CSS}</style></head><body>", "<h1>calofm evaluation report</h1>",
             f"<p>calofm {esc(meta['calofm_version'])}, {esc(meta['created'])}, hit threshold "
             f"{meta['threshold_MeV']:g} MeV, seed {meta['seed']}, {meta['seconds']:.0f} s.</p>"]
    for w in meta["warnings"]:
        lines.append(f"<p><b>warning:</b> {esc(w)}</p>")
    lines.append("<table><tr>" + "".join(f"<th>{h}</th>" for h in heads) + "</tr>")
    for row in summary_rows(results):
        cells = [esc(row["material"]), str(row["n_reference"]), str(row["n_generated"])]
        cells += [f"{esc(row[k][0])}<br><span class='floor'>floor {esc(row[k][1])}</span>" for k in keys]
        cells.append(esc(row["worst_feature"]))
        lines.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    lines.append("</table>")
    lines.append("<p class='floor'>floor: the same metric for two disjoint halves of the reference (what a perfect "
                 "generator scores, at half the statistics). Errors: bootstrap of the classifier's test split (AUC, "
                 "JSD), linear-fit error (FPD), 16–84% spread over batches (KPD), bootstrap of both samples "
                 "(separation power). Definitions: docs/evaluation.md.</p>")
    for title, block in sections or []:  # caller-provided HTML, trusted
        lines.append(f"<h2>{esc(title)}</h2>{block}")
    for label, r in results.items():
        lines.append(f"<h2>{esc(label)}</h2><p>reference {esc(r['reference'])} ({r['n_reference']} showers), "
                     f"generated {esc(r['generated'])} ({r['n_generated']} showers)</p>")
        for name, caption in figures.get(label, []):
            with open(os.path.join(outdir, name), "rb") as fh:
                data = base64.b64encode(fh.read()).decode("ascii")
            lines.append(f"<figure><img alt='{esc(name)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{esc(caption)} <span class='floor'>({esc(name)})</span></figcaption></figure>")
        lines.append("<details><summary>all features: separation power and Wasserstein distance</summary><table>"
                     "<tr><th>feature</th><th>separation power</th><th>floor</th><th>W1</th><th>floor</th></tr>")
        nf, u = r["noise_floor"], r["uncertainties"]
        for k in r["separation_power"]:
            lines.append(f"<tr><td>{esc(k)}</td><td>{_fmt(r['separation_power'][k], u['separation_power'][k])}</td>"
                         f"<td>{_fmt(nf['separation_power'][k])}</td>"
                         f"<td>{_fmt(r['wasserstein'][k], u['wasserstein'][k])}</td>"
                         f"<td>{_fmt(nf['wasserstein'][k])}</td></tr>")
        lines.append("</table></details>")
        if "published" in r:
            lines.append(published_table(r))
    lines.append("</body></html>")
    return "\n".join(lines) + "\n"
