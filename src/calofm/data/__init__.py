"""Shower files in the CaloChallenge HDF5 layout: reading, streaming, validating and writing."""

from calofm.data.showers import (
    ShowerFileInfo, ShowerWriter, check_shower_values, inspect_file, iter_showers, read_beam, read_showers,
)

__all__ = ["ShowerFileInfo", "ShowerWriter", "check_shower_values", "inspect_file", "iter_showers", "read_beam",
           "read_showers"]
