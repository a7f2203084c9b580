"""The embedded shower Monte Carlo (Grindhammer-Peters / GFlash parameterization)."""
