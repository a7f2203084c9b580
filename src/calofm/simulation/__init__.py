"""The embedded shower Monte Carlo (Grindhammer-Peters / GFlash parameterization)."""

from calofm.simulation.medium import Medium
from calofm.simulation.runner import (
    GENERATOR, SIMULATOR_VERSION, Beam, calibrated_energy, canonical_particle, parse_beam, parse_energy, simulate,
    simulate_to_file,
)

__all__ = ["GENERATOR", "SIMULATOR_VERSION", "Beam", "Medium", "calibrated_energy", "canonical_particle", "parse_beam",
           "parse_energy", "simulate", "simulate_to_file"]
