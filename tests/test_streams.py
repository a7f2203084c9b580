"""Per-shower random streams (generation.streams): the Philox engine against its published answers,
and streams that depend on (seed, shower index, purpose) only."""

import numpy as np
import pytest
import torch

from calofm.generation.streams import DECODE, INCIDENT, SMEAR, TOTALS, decode_uniforms, philox4x32, shower_normals, \
    shower_uniforms
from calofm.simulation.runner import energies_from_uniforms, sample_energies

# Random123's known-answer vectors for Philox4x32-10 (its tests/kat_vectors): counter, key, output
KAT = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
       ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
       ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]


@pytest.mark.parametrize("counter,key,want", KAT)
def test_philox_gives_the_published_known_answers(counter, key, want):
    assert philox4x32(counter, key).tolist() == list(want)  # as ints
    words = philox4x32([torch.tensor([c, c]) for c in counter], key)  # as tensors, two rows
    assert words.tolist() == [list(want)] * 2


def test_a_showers_stream_depends_on_its_seed_index_and_purpose_only():
    full = decode_uniforms(5, range(40), 30, 2)  # (40, 31, 2)
    assert full.shape == (40, 31, 2) and full.dtype == torch.float32
    some = decode_uniforms(5, [33, 2, 17], 30, 2)  # other showers around it, another order
    assert torch.equal(some, full[[33, 2, 17]])
    assert torch.equal(decode_uniforms(5, [7], 12, 2)[0], full[7, :13])  # a shorter table is a prefix
    flat = shower_uniforms(5, range(40), DECODE, 62)
    assert torch.equal(flat.view(40, 31, 2), full)  # column t, draw k: stream position 2 t + k
    assert not torch.equal(decode_uniforms(6, range(40), 30, 2), full)  # another seed
    streams = [shower_uniforms(5, range(40), p, 16) for p in (INCIDENT, TOTALS, DECODE, SMEAR)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.isclose(streams[a], streams[b]).any()  # no purpose repeats another's numbers
    big = shower_uniforms(2 ** 40 + 3, [0, 2 ** 32 - 1], DECODE, 8)  # a 64-bit seed, the last index
    assert big.shape == (2, 8) and not torch.equal(big, shower_uniforms(3, [0, 2 ** 32 - 1], DECODE, 8))
    with pytest.raises(ValueError, match="shower indices"):
        shower_uniforms(1, [2 ** 32], DECODE, 4)


def test_stream_values_are_uniform_and_normal():
    u = shower_uniforms(1, range(2000), SMEAR, 100).flatten().double()  # 200 000 float32 in [0, 1)
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.003 and abs(float(u.var()) - 1 / 12) < 0.002
    hist = torch.histc(u, bins=20, min=0, max=1) / len(u)
    assert torch.allclose(hist, torch.full((20,), 0.05, dtype=torch.float64), atol=0.002)
    d = shower_uniforms(1, range(20000), INCIDENT, 3, torch.float64).flatten()
    assert d.dtype == torch.float64 and 0 < float(d.min()) and float(d.max()) < 1
    assert abs(float(d.mean()) - 0.5) < 0.005
    z = shower_normals(1, range(20000), TOTALS, 2)  # (N, 2)
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02
    assert abs(float(torch.corrcoef(z.T)[0, 1])) < 0.03


def test_incident_energies_from_uniforms_are_numpys_uniform():
    """`calofm simulate` keeps its energies bit for bit: sample_energies goes through energies_from_uniforms."""
    for spectrum, lo, hi in (("uniform", 10.0, 100.0), ("log", np.log(10.0), np.log(100.0))):
        e = sample_energies(1000, (10.0, 100.0), spectrum, np.random.default_rng(3))
        want = np.random.default_rng(3).uniform(lo, hi, 1000)
        assert np.array_equal(e, (want if spectrum == "uniform" else np.exp(want)) * 1000.0)
    assert np.array_equal(energies_from_uniforms(np.array([0.0, 0.5]), (50.0, 50.0), "uniform"), [5e4, 5e4])
