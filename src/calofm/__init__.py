"""calofm: a next-token foundation model for calorimeter showers.

Folders follow the architecture: detector (materials, geometry) -> simulation (embedded GFlash-style
Monte Carlo) -> data (HDF5 I/O) -> tokenizer -> model -> training -> generation -> evaluation,
with the command line in cli.
"""

__version__ = "0.1.0"
