"""calofm: a next-token foundation model for calorimeter showers.

Folders follow the architecture: detector (materials, geometry) -> simulation (embedded GFlash-style
Monte Carlo) -> data (HDF5 I/O) -> tokenizer -> model -> training -> generation -> evaluation,
with the command line in cli.
"""

__version__ = "0.1.0"


def load(name_or_path: str = "calofm-small", adapters=(), device: str = "cpu"):
    """Load a model: a shipped one by name ("calofm-small") or a model directory, plus adapters.

        model = calofm.load("calofm-small", adapters=["Pb", "e-"])
        incident_MeV, showers = model.generate(1000, material="Pb", particle="e-", energy_GeV=(10, 100))
    """
    from calofm.pretrained import load as _load

    return _load(name_or_path, adapters, device)
