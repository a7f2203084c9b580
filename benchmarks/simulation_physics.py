"""Physics figures of the embedded Monte Carlo, as quoted in the docs (the tests assert the bounds).

    python benchmarks/simulation_physics.py [--n 3000] [--json benchmarks/results/simulation_physics.json]
"""

import argparse
import json
import os

import numpy as np

from calofm.detector import get_geometry
from calofm.simulation import calibrated_energy, simulate
from calofm.simulation.validation import (
    deep_stack, depth_profile, fit_resolution, mean_layer, moliere_containment, shower_max_X0,
)
from provenance import provenance

ENERGIES = np.array([10.0, 20.0, 50.0, 100.0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--json", default="benchmarks/results/simulation_physics.json")
    args = ap.parse_args()
    out = {**provenance(), "n_per_point": args.n, "energies_GeV": ENERGIES.tolist(), "deep_stack": {}, "ild_W": {}}

    for material in ("W", "Pb", "Cu"):
        geometry = deep_stack(material)
        for particle in ("gamma", "e-"):
            t_max, response, sigma = [], [], []
            for E in ENERGIES:
                _, showers = simulate(args.n, material, particle, E, geometry=geometry, seed=int(E), workers=2)
                t_max.append(shower_max_X0(depth_profile(showers, geometry), geometry))
                reco = calibrated_energy(showers, geometry) / (E * 1000)
                response.append(reco.mean())
                sigma.append(reco.std() / reco.mean())
            a, b = fit_resolution(ENERGIES, np.array(sigma))
            row = {"t_max_X0": t_max, "slope_X0_per_lnE": float(np.polyfit(np.log(ENERGIES), t_max, 1)[0]),
                   "response": response, "linearity_max_dev": float(np.max(np.abs(np.array(response) / np.mean(response) - 1))),
                   "stochastic": a, "constant": b}
            out["deep_stack"][f"{material} {particle}"] = row
            print(f"deep {material:2s} {particle:5s}: t_max {np.round(t_max, 2)} X0, slope {row['slope_X0_per_lnE']:.2f}, "
                  f"linearity {100 * row['linearity_max_dev']:.2f}%, resolution {100 * a:.1f}%/sqrt(E) (+) {100 * b:.1f}%")
    for material in ("W", "Pb", "PbWO4"):
        c = moliere_containment(material, n=1000)
        out.setdefault("containment_1RM", {})[material] = c
        print(f"containment within 1 R_M, homogeneous {material}: {100 * c:.1f}%")

    ild = get_geometry("ild")
    for particle in ("gamma", "e-"):
        sigma, response = [], []
        for E in ENERGIES:
            _, showers = simulate(args.n, "W", particle, E, geometry=ild, seed=int(E), workers=2)
            reco = calibrated_energy(showers, ild) / (E * 1000)
            sigma.append(reco.std() / reco.mean())
            response.append(reco.mean())
        a, b = fit_resolution(ENERGIES, np.array(sigma))
        out["ild_W"][particle] = {"stochastic": a, "constant": b, "response": response}
        print(f"ild W {particle:5s}: resolution {100 * a:.1f}%/sqrt(E) (+) {100 * b:.1f}%, response {np.round(response, 4)}")

    cpu = get_geometry("cpu")
    for material in ("W", "Pb"):
        _, showers = simulate(args.n, material, "gamma", 50, geometry=cpu.with_absorber(material), seed=1, workers=2)
        out.setdefault("cpu_mean_layer_50GeV_gamma", {})[material] = mean_layer(showers, cpu.with_absorber(material))
    print(f"cpu geometry, 50 GeV photons, mean layer: {out['cpu_mean_layer_50GeV_gamma']}")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
