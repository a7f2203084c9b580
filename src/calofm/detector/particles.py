"""Incident particle names: the simulator's spelling of each accepted alias."""

from __future__ import annotations

from calofm.errors import CalofmError

PARTICLES = {"gamma": "gamma", "photon": "gamma", "e-": "e-", "electron": "e-", "e+": "e+", "positron": "e+"}


def canonical_particle(name: str) -> str:
    """A particle the simulator knows, in its spelling (photon -> gamma, ...); others are refused."""
    try:
        return PARTICLES[str(name).strip().lower()]
    except KeyError:
        raise CalofmError(f"unknown particle {name!r}; known: gamma, e-, e+") from None
