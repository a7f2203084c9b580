"""The data commands as a user runs them: output, exit codes, one-line errors, no leftovers."""

import subprocess
import sys

import pytest

from calofm.cli.main import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "calofm.cli.main", *args], capture_output=True, text=True)


def test_simulate_then_inspect(tmp_path, capsys):
    out = tmp_path / "s.h5"
    assert main(["simulate", "--material", "Pb", "--particle", "e-", "--n", "300", "--energy", "20:40",
                 "--seed", "2", "--workers", "1", "-o", str(out)]) == 0
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "material:   Pb" in text and "particle: e-" in text and "20.0" in text and "mean hits" in text


def test_materials_and_geometry_commands(capsys):
    assert main(["materials"]) == 0
    table = capsys.readouterr().out
    for name in ("W", "Ta", "Pb", "Cu", "Fe", "Mo", "PbWO4", "BGO", "CsI", "Si", "LAr", "Polystyrene"):
        assert f"\n{name} " in table
    assert main(["geometry", "--preset", "ild", "--absorber", "Pb"]) == 0
    text = capsys.readouterr().out
    assert "20 x (2.1 mm Pb + 0.5 mm Si)" in text and "27000 voxels" in text


@pytest.mark.parametrize("args, message", [
    (["simulate", "--material", "unobtainium"], "unknown material"),
    (["simulate", "--particle", "muon"], "unknown particle"),
    (["simulate", "--energy", "0"], "> 0 GeV"),
    (["simulate", "--energy", "100:10"], "inverted energy range"),
    (["simulate", "--energy", "abc"], "energy must be"),
    (["geometry", "--preset", "nonexistent"], "unknown geometry"),
])
def test_bad_input_gives_one_clear_error(tmp_path, args, message):
    out = tmp_path / "never.h5"
    result = run_cli(*args, *(["-o", str(out)] if args[0] == "simulate" else []))
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_inspect_refuses_garbage(tmp_path):
    bad = tmp_path / "x.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    result = run_cli("inspect", str(bad))
    assert result.returncode == 2 and "not a readable HDF5" in result.stderr and "Traceback" not in result.stderr
