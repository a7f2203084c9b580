"""Physics evaluation: CaloChallenge-style features and metrics, with a reference-vs-reference noise floor.

features  -> per-shower physics features (any geometry)
metrics   -> separation power, Wasserstein-1, FPD, KPD
classifier-> MLP two-sample test (AUC, JSD)
compare   -> one comparison and its noise floor, input checks
plots     -> HEP-style figures
report    -> `calofm evaluate`: files in, metrics.json + figures + index.html out
"""

from calofm.evaluate.classifier import ClassifierResult, classifier_test, high_level_inputs, low_level_inputs
from calofm.evaluate.compare import Options, Prepared, check_energies, check_geometries, compare, noise_floor
from calofm.evaluate.features import Features, Profile, compute_features
from calofm.evaluate.metrics import fpd, frechet_distance, kpd, mmd2_unbiased, separation_power, wasserstein_1d
from calofm.evaluate.report import evaluate_files

__all__ = [
    "ClassifierResult", "Features", "Options", "Prepared", "Profile", "check_energies", "check_geometries",
    "classifier_test", "compare", "compute_features", "evaluate_files", "fpd", "frechet_distance",
    "high_level_inputs", "kpd", "low_level_inputs", "mmd2_unbiased", "noise_floor", "separation_power",
    "wasserstein_1d",
]
