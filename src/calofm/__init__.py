"""calofm: a next-token foundation model for calorimeter showers.

Folders follow the architecture: detector (materials, geometry) -> simulation (embedded GFlash-style
Monte Carlo) -> data (HDF5 I/O) -> tokenizer -> model -> training -> generation -> evaluation,
with the command line in cli.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`calofm.load` is calofm.generation.api.load, imported on first use (`import calofm` stays light):

        model = calofm.load("calofm-small", adapters=["Pb", "e-"])   # a shipped model, or a directory
        incident_MeV, showers = model.generate(1000, material="Pb", particle="e-", energy_GeV=(10, 100))
    """
    if name == "load":
        from calofm.generation.api import load

        return load
    raise AttributeError(f"module 'calofm' has no attribute {name!r}")
