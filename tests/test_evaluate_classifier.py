"""Classifier two-sample test and the full comparison: identical samples look identical, W and Pb do not."""

import numpy as np
import pytest

from calofm.detector.geometry import get_geometry
from calofm.errors import CalofmError
from calofm.evaluate.classifier import classifier_test, jsd_from_probabilities, low_level_inputs
from calofm.evaluate.compare import Options, Prepared, compare, noise_floor
from calofm.evaluate.features import compute_features
from calofm.simulation import simulate

FAST = dict(max_epochs=8, patience=3, n_boot=30, progress=False)


def test_jsd_from_probabilities_by_hand():
    labels = np.array([1, 1, 0, 0])
    assert jsd_from_probabilities(np.full(4, 0.5), labels) == pytest.approx(0.0)
    # perfect and confident: log2(2 * 1) = 1 on both sides
    assert jsd_from_probabilities(np.array([1.0, 1.0, 0.0, 0.0]), labels) == pytest.approx(1.0)
    # p = 3/4 for reference, 1/4 for generated: log2(1.5) on both sides
    assert jsd_from_probabilities(np.array([0.75, 0.75, 0.25, 0.25]), labels) == pytest.approx(np.log2(1.5))


def test_identical_samples_give_auc_one_half():
    x = np.random.default_rng(0).normal(size=(600, 10)).astype(np.float32)
    r = classifier_test(x, x.copy(), seed=0, **FAST)
    assert abs(r.auc - 0.5) < 0.06 and abs(r.jsd) < 0.05
    assert 0 < r.auc_err < 0.1 and r.n_train == 360 and r.n_test == 120


def test_separated_samples_give_high_auc():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(600, 10)).astype(np.float32)
    b = (rng.normal(size=(600, 10)) + 1.0).astype(np.float32)
    r = classifier_test(a, b, seed=0, **FAST)
    assert r.auc > 0.95 and r.jsd > 0.5


def test_folds_rotate_the_test_split_over_every_shower():
    """Fold 0 is the single split; five folds test each shower once, the AUC their mean, its error the
    standard error of that mean."""
    rng = np.random.default_rng(2)
    a = rng.normal(size=(500, 6)).astype(np.float32)
    b = (rng.normal(size=(500, 6)) + 0.3).astype(np.float32)
    one = classifier_test(a, b, seed=3, **FAST)
    five = classifier_test(a, b, seed=3, folds=5, **FAST)
    assert one.folds == 1 and one.fold_aucs == [one.auc]
    assert five.folds == 5 and len(five.fold_aucs) == 5 and five.fold_aucs[0] == one.auc
    assert len(set(five.fold_aucs)) == 5  # five classifiers on five test splits
    assert five.n_test == 500 and five.n_train == one.n_train == 300
    assert five.auc == pytest.approx(np.mean(five.fold_aucs))
    assert five.auc_err == pytest.approx(np.std(five.fold_aucs, ddof=1) / np.sqrt(5))
    assert 0.55 < five.auc < 0.8  # a shift of 0.3 sigma in each of 6 inputs: separable, not fully
    for bad in (0, 6):
        with pytest.raises(CalofmError, match="1 to 5 folds"):
            classifier_test(a, b, folds=bad, **FAST)


def test_too_few_showers_refused():
    x = np.zeros((10, 3), np.float32)
    with pytest.raises(CalofmError, match="at least"):
        classifier_test(x, x, **FAST)


def _prepared(material: str, n: int, seed: int, norm=None, hit_edges=None):
    geometry = get_geometry("cpu", absorber=material)
    e, s = simulate(n, material=material, energy_GeV=(10, 100), geometry="cpu", seed=seed)
    low, norm = low_level_inputs(e, s, norm)
    return Prepared(compute_features(e, s, geometry, hit_edges=hit_edges), low), norm


def test_w_vs_pb_separable_and_noise_floor_is_not():
    w, norm = _prepared("W", 300, seed=1)
    pb, _ = _prepared("Pb", 300, seed=2, norm=norm, hit_edges=w.features.profiles["hit_energy_spectrum"].edges)
    opts = Options(n_boot=10, max_epochs=8, patience=3, progress=False, log=lambda m: None)
    res = compare(w, pb, opts, what="Pb vs W")
    assert res["classifier_auc_low"] > 0.9 and res["classifier_auc_high"] > 0.9
    assert res["separation_power"]["e_ratio"] > 0.3  # Pb samples a larger visible fraction

    same = compare(w, w, opts, what="W vs W")  # identical samples
    assert abs(same["classifier_auc_low"] - 0.5) < 0.1 and abs(same["classifier_auc_high"] - 0.5) < 0.1
    assert max(same["separation_power"].values()) == 0.0
    assert res["fpd"][0] > 10 * max(same["fpd"][0], 1.0) and res["kpd"][0] > 10 * max(same["kpd"][0], 1e-3)

    floor = noise_floor(w, opts)
    assert floor["n_reference"] == floor["n_generated"] == 150
    assert floor["classifier_auc_high"] < 0.75 and res["classifier_auc_high"] > floor["classifier_auc_high"] + 0.2
    assert np.median(list(floor["separation_power"].values())) < np.median(list(res["separation_power"].values()))
