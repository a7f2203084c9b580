"""Tokenizer: vocabularies, energy bins, round trip, data-derived length, hit order."""

import numpy as np
import pytest

from calofm.detector import get_geometry
from calofm.errors import CalofmError
from calofm.simulation import simulate
from calofm.tokenizer import EOS, ORDERS, PAD, Hits, LogEnergyBins, ShowerTokenizer, Vocabulary


@pytest.fixture(scope="module")
def showers():
    incident, showers = simulate(120, material="W", particle="gamma", energy_GeV=(10, 100), geometry="cpu", seed=3)
    return incident, showers


def make_tokenizer(order="energy"):
    return ShowerTokenizer.create(get_geometry("cpu"), ["W", "Ta", "Cu"], ["gamma"], order=order)


def test_vocabulary_blocks_append_without_renumbering():
    v = Vocabulary("particle")
    v.append("particles", names=["gamma"])
    before = v.to_dict()
    block = v.append("particles-2", names=["e-", "e+"])
    assert v.id("gamma") == 0 and block.offset == 1 and v.id("e+") == 2 and len(v) == 3
    assert v.to_dict()["blocks"][0] == before["blocks"][0]
    with pytest.raises(CalofmError):
        v.append("again", names=["gamma"])  # a token cannot be defined twice
    with pytest.raises(CalofmError, match="unknown particle 'pi0'"):
        v.id("pi0")
    assert Vocabulary.from_dict(v.to_dict()).to_dict() == v.to_dict()


def test_tokenizer_vocabularies_are_modular():
    tok = make_tokenizer()
    assert [b.name for b in tok.voxels.blocks] == ["special", "geometry:cpu"]
    assert tok.voxels.id("PAD") == PAD and tok.voxels.id("EOS") == EOS == tok.energies.id("EOS")
    assert tok.voxel_block.size == 4500 and tok.energy_block.size == tok.bins.n_bins
    ids = {n: tok.material_id(n) for n in ("W", "Ta", "Cu")}
    tok.materials.append("materials-2", names=["Pb"])  # a new material later: fresh id, old ids kept
    assert {n: tok.material_id(n) for n in ("W", "Ta", "Cu")} == ids and tok.material_id("Pb") == 3
    with pytest.raises(CalofmError, match="unknown material 'Fe'"):
        tok.material_id("Fe")
    assert tok.material_id("G4_W") == tok.material_id("w") == ids["W"]  # any spelling get_material knows


def test_energy_bins_are_log_spaced_with_at_most_one_percent_width():
    bins = LogEnergyBins()
    edges = bins.edges
    assert bins.n_bins == len(edges) - 1 == 1389
    assert np.all(edges[1:] / edges[:-1] - 1 <= 0.01 + 1e-12)
    assert edges[0] == pytest.approx(0.01) and edges[-1] == pytest.approx(1e4)
    e = np.geomspace(0.011, 9e3, 5000)
    idx, under, over = bins.encode(e)
    assert under == over == 0 and np.all((edges[idx] <= e * (1 + 1e-9)) & (e <= edges[idx + 1] * (1 + 1e-9)))
    assert np.max(np.abs(bins.decode(idx) / e - 1)) <= 0.005 + 1e-6  # geometric centre: +-0.5 %
    u = bins.decode(idx, mode="uniform", rng=np.random.default_rng(0))
    assert np.all((u >= edges[idx] * (1 - 1e-6)) & (u <= edges[idx + 1] * (1 + 1e-6)))
    _, under, over = bins.encode(np.array([0.001, 5.0, 2e4]))
    assert (under, over) == (1, 1)


def test_round_trip_keeps_voxels_and_energy_within_quantization(showers):
    incident, dense = showers
    tok = make_tokenizer()
    hits = Hits.from_dense(dense)
    tok.fit_max_hits(hits.counts)
    tokens = tok.encode(hits)
    assert tokens.stats["n_truncated_showers"] == 0
    back = tok.decode_tokenized(tokens)
    assert np.array_equal(back > 0, dense > 0)  # every voxel position kept, no new ones
    cell_err = np.abs(back[dense > 0] / dense[dense > 0] - 1)
    total_err = np.abs(back.sum(1) / dense.sum(1) - 1)
    assert cell_err.max() <= 0.005 + 1e-6
    assert total_err.max() <= 0.005 + 1e-6
    print(f"\nround trip: cell energy |rel err| max {cell_err.max():.2e}; shower total |rel err| "
          f"mean {total_err.mean():.2e}, max {total_err.max():.2e}")


def test_max_hits_comes_from_data_and_truncation_is_counted(showers):
    _, dense = showers
    hits = Hits.from_dense(dense)
    tok = make_tokenizer()
    max_hits = tok.fit_max_hits(hits.counts)
    assert max_hits >= np.percentile(hits.counts, 99.9) and max_hits % 8 == 0
    assert tok.max_seq_len == max_hits + 3
    tok.max_hits = 50  # a user cap below the data: counted, keeps the highest-energy hits
    tokens = tok.encode(hits)
    n_long = int(np.count_nonzero(hits.counts > 50))
    assert n_long > 0 and tokens.stats["n_truncated_showers"] == n_long
    assert tokens.stats["n_dropped_hits"] == int(np.maximum(hits.counts - 50, 0).sum())
    assert 0 < tokens.stats["dropped_energy_fraction"] < 0.5
    back = tok.decode_tokenized(tokens)
    i = int(np.argmax(hits.counts))
    kept = dense[i][back[i] > 0]
    assert kept.min() >= np.sort(dense[i])[-50]  # the 50 most energetic cells survive


def test_hit_orders(showers):
    _, dense = showers
    hits = Hits.from_dense(dense[:10])
    energy_tok, spatial_tok, layer_tok = make_tokenizer("energy"), make_tokenizer("spatial"), make_tokenizer("layer")
    for t in (energy_tok, spatial_tok, layer_tok):
        t.fit_max_hits(hits.counts)
    a, b, c = energy_tok.encode(hits), spatial_tok.encode(hits), layer_tok.encode(hits)
    layer_of = energy_tok.geometry.voxel_layer
    for i in range(10):
        sa, sb, sc = (slice(x.offsets[i], x.offsets[i + 1]) for x in (a, b, c))
        energies = dense[i][a.voxel_tokens[sa] - energy_tok.voxel_block.offset]
        assert np.all(np.diff(energies) <= 0)  # energy-descending
        assert np.all(np.diff(b.voxel_tokens[sb]) > 0)  # spatial: ascending voxel index
        voxels = c.voxel_tokens[sc] - layer_tok.voxel_block.offset
        layers, e = layer_of[voxels], dense[i][voxels]
        assert np.all(np.diff(layers) >= 0) and len(set(layers)) > 1  # layer by layer from the front,
        assert np.all(np.diff(e)[np.diff(layers) == 0] <= 0)  # energy-descending within a layer
        assert set(a.voxel_tokens[sa]) == set(b.voxel_tokens[sb]) == set(c.voxel_tokens[sc])
    with pytest.raises(CalofmError, match="unknown hit order"):
        ShowerTokenizer.create(get_geometry("cpu"), ["W"], ["gamma"], order="random")


def test_train_command_offers_every_hit_order():
    from calofm.cli.main import build_parser

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    assert [a for a in train._actions if a.dest == "order"][0].choices == ORDERS


def test_serialization_round_trip(showers):
    tok = make_tokenizer("spatial")
    tok.fit_max_hits(Hits.from_dense(showers[1]).counts)
    again = ShowerTokenizer.from_dict(tok.to_dict())
    assert again.to_dict() == tok.to_dict() and again.max_hits == tok.max_hits and again.order == "spatial"
    with pytest.raises(CalofmError, match="max_hits"):
        make_tokenizer().encode(Hits.from_dense(showers[1][:2]))  # no length fitted yet
