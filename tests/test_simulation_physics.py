"""The embedded Monte Carlo against published shower behaviour (not against its own code).

Published facts checked (Grindhammer-Peters hep-ex/0001020; PDG 'Passage of particles through
matter' sec. on EM cascades; CALICE Si-W ECAL NIM A 608 (2009) 372):
- depth of maximum grows like ln E, slope ~1 X0 per e-fold;
- photons peak about one X0 deeper than electrons (mean conversion depth 9/7 X0);
- >= ~90% of the energy lies within one Moliere radius (homogeneous medium);
- the calibrated response is linear in E, and the resolution falls like 1/sqrt(E), with a
  stochastic term near 15-20%/sqrt(E) for a Si-W ECAL of the ILD kind;
- with thicknesses fixed in mm, a lower-Z absorber (longer X0) spreads the shower over more layers.
"""

import numpy as np
import pytest

from calofm.detector import get_geometry
from calofm.simulation import calibrated_energy, simulate
from calofm.simulation.validation import (
    deep_stack, depth_profile, fit_resolution, mean_layer, moliere_containment, shower_max_X0,
)

MATERIALS = ["W", "Pb"]
PARTICLES = ["gamma", "e-"]


@pytest.fixture(scope="module")
def deep_runs():
    """Mean profiles and calibrated energies for W/Pb x gamma/e- at fixed energies."""
    out = {}
    for material in MATERIALS:
        geometry = deep_stack(material)
        for particle in PARTICLES:
            for E in (10, 30, 100):
                _, showers = simulate(1500, material, particle, E, geometry=geometry, seed=E)
                out[material, particle, E] = (depth_profile(showers, geometry),
                                              calibrated_energy(showers, geometry) / (E * 1000.0), geometry)
    return out


@pytest.mark.parametrize("material", MATERIALS)
@pytest.mark.parametrize("particle", PARTICLES)
def test_shower_maximum_grows_like_log_energy(deep_runs, material, particle):
    energies = np.array([10, 30, 100])
    t_max = [shower_max_X0(deep_runs[material, particle, E][0], deep_runs[material, particle, E][2]) for E in energies]
    slope = np.polyfit(np.log(energies), t_max, 1)[0]
    assert 0.8 < slope < 1.25, f"dt_max/dlnE = {slope:.2f} X0 (expected ~1)"


@pytest.mark.parametrize("material", MATERIALS)
def test_photons_peak_deeper_than_electrons(deep_runs, material):
    for E in (10, 30, 100):
        g = deep_runs[material, "gamma", E][2]
        shift = shower_max_X0(deep_runs[material, "gamma", E][0], g) - shower_max_X0(deep_runs[material, "e-", E][0], g)
        assert 0.5 < shift < 2.0, f"{material} {E} GeV: photon - electron maximum = {shift:.2f} X0 (expected ~1)"


@pytest.mark.parametrize("material", MATERIALS)
@pytest.mark.parametrize("particle", PARTICLES)
def test_response_is_linear(deep_runs, material, particle):
    response = np.array([deep_runs[material, particle, E][1].mean() for E in (10, 30, 100)])
    assert np.all(np.abs(response / response.mean() - 1) < 0.02), f"E_reco/E = {response}"


@pytest.mark.parametrize("material", MATERIALS)
@pytest.mark.parametrize("particle", PARTICLES)
def test_resolution_falls_like_inverse_sqrt_energy(deep_runs, material, particle):
    energies = np.array([10.0, 30.0, 100.0])
    sigma = np.array([np.std(deep_runs[material, particle, E][1]) / np.mean(deep_runs[material, particle, E][1])
                      for E in energies])
    assert np.all(np.diff(sigma) < 0)
    # sigma * sqrt(E) is the stochastic term: roughly constant when 1/sqrt(E) dominates
    stochastic = sigma * np.sqrt(energies)
    assert stochastic.max() / stochastic.min() < 1.35, f"sigma*sqrt(E) = {stochastic}"


@pytest.mark.parametrize("particle", PARTICLES)
def test_ild_stochastic_term_matches_silicon_tungsten(particle):
    geometry = get_geometry("ild")
    energies = np.array([10.0, 20.0, 50.0, 100.0])
    rel = []
    for E in energies:
        _, showers = simulate(1200, "W", particle, E, geometry=geometry, seed=int(E))
        reco = calibrated_energy(showers, geometry)
        rel.append(reco.std() / reco.mean())
    a, _ = fit_resolution(energies, np.array(rel))
    assert 0.14 < a < 0.21, f"stochastic term {100 * a:.1f}%/sqrt(E) (published Si-W: ~16-17%)"


@pytest.mark.parametrize("material", MATERIALS + ["PbWO4"])
def test_moliere_radius_containment_in_homogeneous_medium(material):
    inside = moliere_containment(material)
    assert inside >= 0.85, f"{material}: {100 * inside:.1f}% inside 1 R_M"


def test_lower_density_absorber_spreads_over_more_layers():
    depth = {}
    for material in ("W", "Pb"):
        geometry = get_geometry("cpu", absorber=material)
        _, showers = simulate(1000, material, "gamma", 50, geometry=geometry, seed=11)
        depth[material] = mean_layer(showers, geometry)
    assert depth["Pb"] > depth["W"] + 1.0, depth


def test_cpu_default_geometry_keeps_showers_short():
    _, showers = simulate(500, "W", "gamma", 50, geometry="cpu", seed=2)
    hits = (showers > 0).sum(1)
    assert 50 < np.median(hits) <= 300
