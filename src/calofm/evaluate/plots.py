"""The report's figures, in HEP style (mplhep, CMS look), reference in black and generated in red.

Every function draws one PNG and returns its caption; `make_plots` draws them all for one
comparison. Histograms use the same reference binning as the separation power, normalized to unit
area, with a ratio panel generated / reference (error bars: statistical, both samples).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from calofm.detector.geometry import Geometry
from calofm.evaluate.features import GLOBAL, PER_LAYER, Features, feature_label, radial_binning, split_name
from calofm.evaluate.metrics import reference_edges

REF_STYLE = dict(color="black", label="reference")
GEN_STYLE = dict(color="tab:red", label="generated")
RATIO_RANGE = (0.5, 1.5)  # widened up to (0, 3) when the ratios need it
DPI = 60  # CMS-style figures are 10 in per panel: 60 dpi keeps each PNG small enough to embed


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mplhep

    mplhep.style.use("CMS")
    # no minor ticks: on these grids of log axes they were half of the drawing time
    plt.rcParams.update({"xtick.minor.visible": False, "ytick.minor.visible": False})
    return plt


def _save(fig, path: str) -> None:
    """Write the PNG atomically: a temporary file in the same folder, renamed when complete."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=os.path.dirname(path) or ".")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=DPI, format="png")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        fig.clf()
        import matplotlib.pyplot as plt

        plt.close(fig)


def _axis_label(label: str, unit: str) -> str:
    return f"{label} [{unit}]" if unit else label


def _ratio_axes(plt, n_rows: int, n_cols: int, panel: float = 8.0):
    """A grid of (main, ratio) axis pairs; returns fig and a list of (ax, rax)."""
    fig = plt.figure(figsize=(panel * n_cols, panel * n_rows))
    # fixed margins instead of constrained layout: several times faster, and these grids are regular
    outer = fig.add_gridspec(n_rows, n_cols, hspace=0.28, wspace=0.38, left=0.1 / n_cols ** 0.5 + 0.03,
                             right=0.98, top=0.97, bottom=0.12 / n_rows ** 0.5)
    pairs = []
    for i in range(n_rows * n_cols):
        inner = outer[divmod(i, n_cols)].subgridspec(2, 1, height_ratios=[3, 1], hspace=0.06)
        ax = fig.add_subplot(inner[0])
        rax = fig.add_subplot(inner[1], sharex=ax)
        ax.tick_params(labelbottom=False)
        pairs.append((ax, rax))
    return fig, pairs


def _draw_hist(ax, rax, sums_r, sq_r, sums_g, sq_g, edges, xlabel, log_x=False, log_y=False, ylabel="a.u."):
    """Two normalized histograms given per-bin sums and sums of squared weights, and their ratio."""
    width = np.diff(edges)
    norm_r, norm_g = sums_r.sum() or 1.0, sums_g.sum() or 1.0
    h_r, h_g = sums_r / norm_r / width, sums_g / norm_g / width
    e_r, e_g = np.sqrt(sq_r) / norm_r / width, np.sqrt(sq_g) / norm_g / width
    ax.stairs(h_r + e_r, edges, baseline=h_r - e_r, fill=True, color="0.8", label="reference stat.")
    ax.stairs(h_r, edges, lw=2, **REF_STYLE)
    ax.stairs(h_g, edges, lw=2, **GEN_STYLE)
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    if log_x:
        ax.set_xscale("log")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = h_g / h_r
        err = ratio * np.sqrt((e_g / h_g) ** 2 + (e_r / h_r) ** 2)
    centres = np.sqrt(edges[1:] * edges[:-1]) if log_x else 0.5 * (edges[1:] + edges[:-1])
    ok = np.isfinite(ratio) & (h_r > 0)
    _draw_ratio(rax, centres[ok], ratio[ok], err[ok])
    rax.set_xlabel(xlabel)


def _draw_ratio(rax, x, ratio, err) -> None:
    rax.errorbar(x, ratio, yerr=np.nan_to_num(err), fmt="o", ms=4, color="tab:red")
    rax.axhline(1.0, color="black", lw=1)
    finite = ratio[np.isfinite(ratio)]
    lo, hi = RATIO_RANGE
    if finite.size:
        lo = max(0.0, min(lo, float(np.min(finite)) - 0.05))
        hi = min(3.0, max(hi, float(np.max(finite)) + 0.05))
    rax.set_ylim(lo, hi)
    rax.set_ylabel("gen/ref")


def _scalar_panel(ax, rax, name: str, ref: Features, gen: Features) -> None:
    x_r, x_g = ref.scalars[name], gen.scalars[name]
    edges = reference_edges(x_r)
    k = len(edges) - 1
    i_r = np.clip(np.searchsorted(edges, x_r, side="right") - 1, 0, k - 1)
    i_g = np.clip(np.searchsorted(edges, x_g, side="right") - 1, 0, k - 1)
    c_r, c_g = np.bincount(i_r, minlength=k).astype(float), np.bincount(i_g, minlength=k).astype(float)
    label, unit = feature_label(name)
    log_x = edges[0] > 0 and edges[-1] / edges[0] > 100
    _draw_hist(ax, rax, c_r, c_r, c_g, c_g, edges, _axis_label(label, unit), log_x=log_x,
               ylabel=f"1/N dN/dx [1/{unit}]" if unit else "1/N dN/dx")


def plot_global(ref: Features, gen: Features, path: str) -> str:
    plt = _pyplot()
    fig, pairs = _ratio_axes(plt, 1, len(GLOBAL))
    for (ax, rax), name in zip(pairs, GLOBAL):
        _scalar_panel(ax, rax, name, ref, gen)
    pairs[0][0].legend(loc="best", fontsize="x-small")
    _save(fig, path)
    return ("Whole-shower features: visible over incident energy, longitudinal centre of gravity and width, "
            "hits above threshold. Values outside the reference range are counted in the first or last bin.")


def plot_layer_group(group: str, ref: Features, gen: Features, path: str, n_show: int = 6) -> str:
    plt = _pyplot()
    n_layers = sum(1 for k in ref.scalars if split_name(k)[0] == group)
    layers = np.unique(np.linspace(0, n_layers - 1, min(n_show, n_layers)).round().astype(int))
    n_cols = min(3, len(layers))
    fig, pairs = _ratio_axes(plt, int(np.ceil(len(layers) / n_cols)), n_cols)
    for (ax, rax), layer in zip(pairs, layers):
        _scalar_panel(ax, rax, f"{group}_{layer}", ref, gen)
    for ax, rax in pairs[len(layers):]:
        ax.set_visible(False)
        rax.set_visible(False)
    pairs[0][0].legend(loc="best", fontsize="x-small")
    _save(fig, path)
    label, _ = feature_label(group)
    return f"{label[0].upper() + label[1:]} in layers {', '.join(map(str, layers))} (all layers are in metrics.json)."


def plot_profiles(ref: Features, gen: Features, path: str) -> str:
    """Longitudinal and radial energy profiles and the hit-energy spectrum, pooled over showers, unit area."""
    plt = _pyplot()
    names = ("longitudinal_profile", "radial_profile", "hit_energy_spectrum")
    fig, pairs = _ratio_axes(plt, 1, len(names))
    for (ax, rax), name in zip(pairs, names):
        p_r, p_g = ref.profiles[name], gen.profiles[name]
        sums_r, sums_g = p_r.weights.sum(axis=0), p_g.weights.sum(axis=0)
        sq_r, sq_g = (p_r.weights ** 2).sum(axis=0), (p_g.weights ** 2).sum(axis=0)
        _draw_hist(ax, rax, sums_r, sq_r, sums_g, sq_g, p_r.edges, _axis_label(p_r.label, p_r.unit),
                   log_x=p_r.log_x, log_y=name != "longitudinal_profile")
        ax.set_ylabel({"longitudinal_profile": "fraction of $E_{vis}$ per layer",
                       "radial_profile": "fraction of $E_{vis}$ per mm",
                       "hit_energy_spectrum": "fraction of hits per MeV"}[name])
    pairs[0][0].legend(loc="best", fontsize="x-small")
    _save(fig, path)
    return ("Pooled profiles: longitudinal (energy fraction per layer), radial (energy fraction per mm of "
            "radius) and the hit-energy spectrum (all showers together).")


def plot_layer_means(ref: Features, gen: Features, path: str) -> str:
    """Mean and RMS of the energy in every layer."""
    plt = _pyplot()
    n_layers = sum(1 for k in ref.scalars if split_name(k)[0] == "e_layer")
    e_r = np.stack([ref.scalars[f"e_layer_{i}"] for i in range(n_layers)], axis=1)  # (N, L)
    e_g = np.stack([gen.scalars[f"e_layer_{i}"] for i in range(n_layers)], axis=1)
    fig, pairs = _ratio_axes(plt, 1, 2, panel=10.0)
    layers = np.arange(n_layers)
    for (ax, rax), (what, f) in zip(pairs, (("mean", np.mean), ("RMS", np.std))):
        v_r, v_g = f(e_r, axis=0), f(e_g, axis=0)
        # standard errors: sigma/sqrt(N) for the mean, sigma/sqrt(2N) for the RMS (Gaussian approximation)
        k = 1.0 if what == "mean" else np.sqrt(2.0)
        s_r, s_g = e_r.std(axis=0) / np.sqrt(len(e_r)) / k, e_g.std(axis=0) / np.sqrt(len(e_g)) / k
        ax.errorbar(layers, v_r, yerr=s_r, fmt="s", ms=6, **REF_STYLE)
        ax.errorbar(layers, v_g, yerr=s_g, fmt="o", ms=6, **GEN_STYLE)
        ax.set_yscale("log")
        ax.set_ylabel(f"{what} of energy in layer [MeV]")
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = v_g / v_r
            err = ratio * np.sqrt((s_g / v_g) ** 2 + (s_r / v_r) ** 2)
        _draw_ratio(rax, layers, ratio, err)
        rax.set_xlabel("layer")
    pairs[0][0].legend(loc="best", fontsize="x-small")
    _save(fig, path)
    return "Mean and RMS of the energy deposited in each layer (error bars: statistical)."


def _image(ax, geometry: Geometry, layer: int, values: np.ndarray, norm, cmap):
    """Draw one layer's cell values (cells of that layer, in voxel order) on a Cartesian or polar axis."""
    if geometry.is_cartesian:
        g = geometry.grid
        half_x, half_y = g.nx * g.cell_mm / 2, g.ny * g.cell_mm / 2
        return ax.imshow(values.reshape(g.ny, g.nx), origin="lower", extent=(-half_x, half_x, -half_y, half_y),
                         norm=norm, cmap=cmap, interpolation="nearest")
    r_edges = np.asarray(geometry.grid.r_edges_mm[layer])
    n_alpha = geometry.grid.n_alpha[layer]
    theta = np.linspace(0, 2 * np.pi, n_alpha + 1)
    return ax.pcolormesh(theta, r_edges, values.reshape(n_alpha, len(r_edges) - 1).T, norm=norm, cmap=cmap)


def _image_axes(plt, geometry: Geometry, n_rows: int, n_cols: int, panel: float = 6.0):
    kw = {} if geometry.is_cartesian else {"projection": "polar"}
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(panel * n_cols + 2, panel * n_rows), subplot_kw=kw,
                             squeeze=False, layout="constrained")
    return fig, axes


def plot_average_showers(geometry: Geometry, showers_ref: np.ndarray, showers_gen: np.ndarray, path: str,
                         n_show: int = 5) -> str:
    """Mean cell energies of selected layers: reference, generated, and their ratio."""
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    mean_r, mean_g = showers_ref.mean(axis=0), showers_gen.mean(axis=0)  # (V,)
    layer_e = np.add.reduceat(mean_r, geometry.layer_offsets[:-1])
    peak = int(np.argmax(layer_e))
    layers = np.unique(np.clip(np.linspace(0, geometry.n_layers - 1, n_show).round().astype(int).tolist() + [peak],
                               0, geometry.n_layers - 1))[:n_show + 1]
    positive = np.concatenate([mean_r[mean_r > 0], mean_g[mean_g > 0]])
    norm = LogNorm(vmin=max(positive.min(), positive.max() * 1e-5), vmax=positive.max()) if positive.size else None
    fig, axes = _image_axes(plt, geometry, 3, len(layers))
    for c, layer in enumerate(layers):
        lo, hi = geometry.layer_offsets[layer], geometry.layer_offsets[layer + 1]
        im = _image(axes[0, c], geometry, layer, mean_r[lo:hi], norm, "viridis")
        _image(axes[1, c], geometry, layer, mean_g[lo:hi], norm, "viridis")
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(mean_r[lo:hi] > 0, mean_g[lo:hi] / mean_r[lo:hi], np.nan)
        rim = _image(axes[2, c], geometry, layer, ratio, LogNorm(vmin=0.5, vmax=2.0), "RdBu_r")
        axes[0, c].set_title(f"layer {layer}", fontsize="small")
    for r, name in enumerate(("reference", "generated", "gen/ref")):
        axes[r, 0].set_ylabel(f"{name}\ny [mm]" if geometry.is_cartesian else name, fontsize="small")
    if geometry.is_cartesian:
        for ax in axes[-1]:
            ax.set_xlabel("x [mm]", fontsize="small")
    for ax in axes.ravel():
        ax.tick_params(labelsize="x-small")
    fig.colorbar(im, ax=axes[:2].ravel().tolist(), label="mean cell energy [MeV]")
    fig.colorbar(rim, ax=axes[2].ravel().tolist(), label="gen/ref")
    _save(fig, path)
    return (f"Average shower: mean cell energy in layers {', '.join(map(str, layers))} "
            f"(layer {peak} holds the most energy), and the ratio generated / reference.")


def _side_view(geometry: Geometry, shower: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Energy per (radial bin, layer) of one shower; (edges, (K, L))."""
    edges, voxel_bin = radial_binning(geometry)
    out = np.zeros((len(edges) - 1, geometry.n_layers))
    np.add.at(out, (voxel_bin, geometry.voxel_layer), shower)
    return edges, out


def plot_single_showers(geometry: Geometry, inc_ref: np.ndarray, showers_ref: np.ndarray, inc_gen: np.ndarray,
                        showers_gen: np.ndarray, path: str, n_show: int = 3, seed: int = 0) -> str:
    """A few reference showers and, next to each, the generated shower closest in incident energy."""
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    rng = np.random.default_rng(seed)
    pick_r = rng.choice(len(showers_ref), min(n_show, len(showers_ref)), replace=False)
    pick_g = [int(np.argmin(np.abs(inc_gen - inc_ref[i]))) for i in pick_r]
    chosen = [("reference", inc_ref[i], showers_ref[i]) for i in pick_r] + \
             [("generated", inc_gen[i], showers_gen[i]) for i in pick_g]
    positive = np.concatenate([s[s > 0] for _, _, s in chosen] + [np.zeros(0)])
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size else None
    n = len(pick_r)
    n_rows = 4 if geometry.is_cartesian else 2  # side views, then top views on a Cartesian grid
    fig, axes = plt.subplots(n_rows, n, figsize=(7 * n + 2, 6 * n_rows), squeeze=False, layout="constrained")
    layer_edges = np.arange(geometry.n_layers + 1) - 0.5
    for k, (name, e_inc, shower) in enumerate(chosen):
        row, col = divmod(k, n)
        ax = axes[row, col]
        r_edges, side = _side_view(geometry, shower)
        im = ax.pcolormesh(layer_edges, r_edges, np.where(side > 0, side, np.nan), norm=norm, cmap="viridis")
        ax.set_title(f"{name}, {e_inc / 1e3:.1f} GeV", fontsize="small")
        ax.set_xlabel("layer", fontsize="small")
        ax.set_ylabel("r [mm]", fontsize="small")
        if geometry.is_cartesian:  # top view: energy summed over layers
            g = geometry.grid
            top = shower.reshape(geometry.n_layers, g.ny, g.nx).sum(axis=0)
            half_x, half_y = g.nx * g.cell_mm / 2, g.ny * g.cell_mm / 2
            tax = axes[row + 2, col]
            tax.imshow(np.where(top > 0, top, np.nan), origin="lower", extent=(-half_x, half_x, -half_y, half_y),
                       norm=norm, cmap="viridis", interpolation="nearest")
            tax.set_title(f"{name}, all layers", fontsize="small")
            tax.set_xlabel("x [mm]", fontsize="small")
            tax.set_ylabel("y [mm]", fontsize="small")
    for ax in axes.ravel():
        ax.tick_params(labelsize="x-small")
    fig.colorbar(im, ax=axes.ravel().tolist(), label="energy [MeV]")
    _save(fig, path)
    return ("Single showers: side views (energy per layer and radial bin) of reference showers and of the "
            "generated showers closest in incident energy" + (", and their top views." if geometry.is_cartesian
                                                               else "."))


def plot_separation_power(result: dict, path: str) -> str:
    """Separation power of every feature against the noise floor: one panel per per-layer group
    (versus layer) and one for the whole-shower features and profiles."""
    plt = _pyplot()
    sp, err = result["separation_power"], result["uncertainties"]["separation_power"]
    floor = result["noise_floor"]["separation_power"]
    fig, axes = plt.subplots(3, 3, figsize=(24, 18), layout="constrained", squeeze=False)
    axes = axes.ravel()
    singles = [k for k in sp if split_name(k)[1] is None]
    for ax, group in zip(axes, list(PER_LAYER) + ["whole shower"]):
        names = singles if group == "whole shower" else [k for k in sp if split_name(k)[0] == group]
        x = np.arange(len(names))
        ax.errorbar(x, [max(sp[k], 1e-6) for k in names], yerr=[err[k] for k in names], fmt="o", ms=5,
                    color="tab:red", label="generated vs ref")
        ax.plot(x, [max(floor[k], 1e-6) for k in names], "_", ms=14, mew=2, color="0.4", label="noise floor")
        ax.set_yscale("log")
        ax.set_ylabel("separation power", fontsize="small")
        if group == "whole shower":
            ax.set_xticks(x, names, rotation=45, ha="right", fontsize="xx-small")
        else:
            ax.set_xlabel("layer", fontsize="small")
        ax.set_title(group if group == "whole shower" else feature_label(group)[0], fontsize="small")
        ax.tick_params(labelsize="x-small")
    axes[0].legend(fontsize="x-small")
    _save(fig, path)
    return ("Separation power of every feature (red, bootstrap errors) and its noise floor, the same for two "
            "halves of the reference (grey).")


def make_plots(outdir: str, geometry: Geometry, ref: Features, gen: Features, inc_ref: np.ndarray,
               showers_ref: np.ndarray, inc_gen: np.ndarray, showers_gen: np.ndarray, result: dict,
               seed: int = 0) -> list[tuple[str, str]]:
    """Draw every figure of one comparison into outdir; returns [(file name, caption)] in report order."""
    os.makedirs(outdir, exist_ok=True)
    jobs = [
        ("separation_power.png", lambda p: plot_separation_power(result, p)),
        ("global_features.png", lambda p: plot_global(ref, gen, p)),
        ("profiles.png", lambda p: plot_profiles(ref, gen, p)),
        ("layer_energy_means.png", lambda p: plot_layer_means(ref, gen, p)),
        *[(f"layers_{g}.png", lambda p, g=g: plot_layer_group(g, ref, gen, p)) for g in PER_LAYER],
        ("average_shower.png", lambda p: plot_average_showers(geometry, showers_ref, showers_gen, p)),
        ("single_showers.png", lambda p: plot_single_showers(geometry, inc_ref, showers_ref, inc_gen, showers_gen,
                                                             p, seed=seed)),
    ]
    return [(name, job(os.path.join(outdir, name))) for name, job in jobs]
