"""The embedded shower Monte Carlo (Grindhammer-Peters / GFlash parameterization)."""

from calofm.simulation.medium import Medium
from calofm.simulation.runner import (
    GENERATOR, SIMULATOR_VERSION, calibrated_energy, canonical_particle, parse_energy, simulate, simulate_to_file,
)

__all__ = ["GENERATOR", "SIMULATOR_VERSION", "Medium", "calibrated_energy", "canonical_particle", "parse_energy", "simulate",
           "simulate_to_file"]
