"""Classifier two-sample test: how well can an MLP tell generated showers from reference ones?

As in the CaloChallenge 2022: an MLP (3 x 512, LeakyReLU) trained with Adam (lr 2e-4) on balanced
reference (label 1) and generated (label 0) showers, early-stopped on a validation split, its output
calibrated by isotonic regression on that validation split, and judged on a held-out test split by
- AUC of the ROC curve: 0.5 = indistinguishable, 1 = perfectly separable;
- JSD (bits) from the calibrated probability p = P(reference | x):
  JSD = 1/2 E_ref[log2(2 p)] + 1/2 E_gen[log2(2 (1 - p))], 0 = indistinguishable, 1 = disjoint.
Errors: standard deviation over bootstrap resamplings of the test split (training is not repeated,
so the spread from retraining is not included). With `folds` > 1 the five 20% parts take the test role
in turn, a classifier trained afresh for each (with 5 every shower is tested once), and the errors are
the standard error of the mean over the folds, retraining included.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np

from calofm.errors import CalofmError

MIN_SHOWERS = 25  # per class; below this the 60/20/20 split leaves too few to train or test


@dataclass
class ClassifierResult:
    auc: float
    auc_err: float
    jsd: float
    jsd_err: float
    n_train: int  # per class
    n_test: int  # per class
    epochs: int
    best_epoch: int
    seconds: float
    folds: int = 1  # test splits measured in turn (classifier_test)
    fold_aucs: list[float] | None = None  # the AUC of each

    def to_dict(self) -> dict:
        return asdict(self)


def low_level_inputs(incident_MeV: np.ndarray, showers: np.ndarray,
                     norm: tuple[float, float, float] | None = None) -> tuple[np.ndarray, tuple[float, float, float]]:
    """[log10 E_inc, voxels / E_inc] per shower, as the CaloChallenge classifier reads them; (N, 1 + V) float32.

    Both parts are brought to O(1) by constants (mean and std of log10 E_inc, std of voxels / E_inc):
    pass the reference's `norm` when preparing the generated sample, so both get the same transformation.
    """
    log_e = np.log10(np.asarray(incident_MeV, dtype=np.float64))
    frac = showers / np.asarray(incident_MeV, dtype=np.float32)[:, None]  # (N, V)
    if norm is None:
        norm = (float(log_e.mean()), float(max(log_e.std(), 1e-3)), float(max(frac.std(), 1e-12)))
    x = np.empty((len(showers), 1 + showers.shape[1]), dtype=np.float32)
    x[:, 0] = (log_e - norm[0]) / norm[1]
    x[:, 1:] = frac / norm[2]
    return x, norm


def high_level_inputs(incident_MeV: np.ndarray, feature_matrix: np.ndarray) -> np.ndarray:
    """[log10 E_inc, high-level features] per shower; (N, 1 + F), standardized by the classifier."""
    return np.concatenate([np.log10(incident_MeV)[:, None], feature_matrix], axis=1).astype(np.float32)


def _mlp(n_in: int, hidden: int):
    import torch.nn as nn

    return nn.Sequential(
        nn.Linear(n_in, hidden), nn.LeakyReLU(),
        nn.Linear(hidden, hidden), nn.LeakyReLU(),
        nn.Linear(hidden, hidden), nn.LeakyReLU(),
        nn.Linear(hidden, 1),
    )


def jsd_from_probabilities(p: np.ndarray, labels: np.ndarray) -> float:
    """JSD in bits from calibrated P(reference | x) on a balanced sample; labels 1 = reference."""
    ref, gen = p[labels == 1], p[labels == 0]
    return float(0.5 * np.mean(np.log2(2 * ref)) + 0.5 * np.mean(np.log2(2 * (1 - gen))))


def classifier_test(x_ref: np.ndarray, x_gen: np.ndarray, *, standardize: bool = True, seed: int = 0,
                    max_epochs: int = 30, patience: int = 5, batch_size: int = 512, lr: float = 2e-4,
                    hidden: int = 512, n_boot: int = 200, folds: int = 1, bf16: bool | None = None,
                    threads: int | None = 1, progress: bool = True, desc: str = "classifier") -> ClassifierResult:
    """Train reference-vs-generated on 60%, early-stop and calibrate on 20%, measure on 20% (per class).

    x_ref (n_ref, D), x_gen (n_gen, D): classifier inputs; the larger sample is subsampled to balance.
    standardize: scale each input column by its training mean and std (for high-level features).
    folds: how many of the five 20% parts serve in turn as the test split (1-5), each with a classifier
    trained afresh on three of the others and calibrated on the fifth. folds=1 is the CaloChallenge's one
    split; with more, the AUC and JSD are the means over the folds and their errors the standard error of
    that mean, which holds the spread from retraining that a single split's bootstrap leaves out.
    bf16: bfloat16 autocast of the matrix products (about 2x faster on CPUs with AVX512-BF16, 4x slower
    on AVX2-only CPUs; the loss, the optimizer state and the reported probabilities stay float32).
    None: bf16 where the CPU runs it natively (`calofm.model.precision.cpu_has_native_bf16`), else float32.
    threads: torch threads while training (restored afterwards); None keeps the current setting.
    One is the default: on 2 cores shared with other work, two OpenMP threads measured 4-10x slower.
    """
    if not 1 <= folds <= N_PARTS:
        raise CalofmError(f"the classifier test takes 1 to {N_PARTS} folds, got {folds}")
    if bf16 is None:
        from calofm.model.precision import cpu_has_native_bf16

        bf16 = cpu_has_native_bf16()
    with _torch_threads(threads):
        return _train_and_measure(x_ref, x_gen, standardize=standardize, seed=seed, max_epochs=max_epochs,
                                  patience=patience, batch_size=batch_size, lr=lr, hidden=hidden, n_boot=n_boot,
                                  folds=folds, bf16=bf16, progress=progress, desc=desc)


@contextmanager
def _torch_threads(n: int | None):
    import torch

    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


N_PARTS = 5  # the showers' parts: three train, one validates and calibrates, one tests


def _train_and_measure(x_ref, x_gen, *, standardize, seed, max_epochs, patience, batch_size, lr, hidden, n_boot,
                       folds, bf16, progress, desc) -> ClassifierResult:
    import torch

    t0 = time.perf_counter()
    n = min(len(x_ref), len(x_gen))
    if n < MIN_SHOWERS:
        raise CalofmError(f"the classifier test needs at least {MIN_SHOWERS} showers per sample, got {n}")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    n_train, n_val = int(0.6 * n), int(0.2 * n)
    bounds = [int(0.2 * n), int(0.4 * n), n_train, n_train + n_val]  # the five parts of the permutation
    # one split permutation for both classes: if both samples hold the same showers in the same order,
    # each shower lands in the same part in both, so no test shower was seen in training with the
    # other label (which would push the AUC below 0.5)
    perm = rng.permutation(n)
    parts = []  # per class: (x, label, its five index parts)
    for x, label in ((x_ref, 1.0), (x_gen, 0.0)):
        idx = (np.sort(rng.choice(len(x), n, replace=False)) if len(x) > n else np.arange(n))[perm]
        parts.append((x, label, np.split(idx, bounds)))

    runs = []
    for fold in range(folds):  # fold 0: parts 0-2 train, 3 validates, 4 tests
        test, val = N_PARTS - 1 - fold, (N_PARTS - 2 - fold) % N_PARTS
        roles = {"train": [i for i in range(N_PARTS) if i not in (test, val)], "val": [val], "test": [test]}
        data = {}
        for name, which in roles.items():
            xs, ys = [], []
            for x, label, p in parts:
                xs.append(x[np.concatenate([p[i] for i in which])])
                ys.append(np.full(len(xs[-1]), label, dtype=np.float32))
            data[name] = (np.concatenate(xs), np.concatenate(ys))
        fold_desc = desc if folds == 1 else f"{desc}, fold {fold + 1}/{folds}"
        runs.append(_fit_and_score(data, rng, standardize=standardize, max_epochs=max_epochs, patience=patience,
                                   batch_size=batch_size, lr=lr, hidden=hidden, n_boot=n_boot, bf16=bf16,
                                   progress=progress, desc=fold_desc))
    aucs, jsds = np.array([r["auc"] for r in runs]), np.array([r["jsd"] for r in runs])
    if folds == 1:
        auc_err, jsd_err = runs[0]["auc_err"], runs[0]["jsd_err"]
    else:  # standard error of the mean over the folds
        auc_err, jsd_err = float(aucs.std(ddof=1) / np.sqrt(folds)), float(jsds.std(ddof=1) / np.sqrt(folds))
    return ClassifierResult(
        auc=float(aucs.mean()), auc_err=float(auc_err), jsd=float(jsds.mean()), jsd_err=float(jsd_err),
        n_train=len(data["train"][1]) // 2, n_test=sum(r["n_test"] for r in runs), epochs=runs[-1]["epochs"],
        best_epoch=runs[-1]["best_epoch"], seconds=time.perf_counter() - t0, folds=folds,
        fold_aucs=[float(a) for a in aucs],
    )


def _fit_and_score(data, rng, *, standardize, max_epochs, patience, batch_size, lr, hidden, n_boot, bf16,
                   progress, desc) -> dict:
    """One classifier trained on data["train"], early-stopped and calibrated on data["val"], scored on
    data["test"] ((x, labels) each): AUC and JSD with their bootstrap errors over the test split."""
    import torch
    from sklearn.isotonic import IsotonicRegression
    from sklearn.metrics import roc_auc_score
    from tqdm.auto import tqdm

    x_train = data["train"][0]
    if standardize:
        mean, std = x_train.mean(axis=0), x_train.std(axis=0)
        std = np.where(std > 0, std, 1.0)
    else:
        mean, std = np.zeros(x_train.shape[1], np.float32), np.ones(x_train.shape[1], np.float32)
    tensors = {k: (torch.from_numpy(((x - mean) / std).astype(np.float32)), torch.from_numpy(y))
               for k, (x, y) in data.items()}

    model = _mlp(x_train.shape[1], hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def predict(x):  # logits for (N, D) in batches; (N,) float32
        model.eval()
        with torch.no_grad(), autocast():
            return torch.cat([model(x[i:i + 4096]).squeeze(1).float() for i in range(0, len(x), 4096)])

    xt, yt = tensors["train"]
    xv, yv = tensors["val"]
    batch_size = min(batch_size, max(32, len(xt) // 10))  # at least ~10 steps per epoch on small samples
    best = (float("inf"), 0, copy.deepcopy(model.state_dict()))
    bar = tqdm(range(1, max_epochs + 1), desc=desc, unit="epoch", disable=not progress, leave=False)
    epoch = 0
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), batch_size):
            b = perm[i:i + batch_size]
            with autocast():
                logits = model(xt[b]).squeeze(1)
            loss = loss_fn(logits.float(), yt[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        val_loss = float(loss_fn(predict(xv), yv))
        bar.set_postfix(val_loss=f"{val_loss:.4f}")
        if val_loss < best[0]:
            best = (val_loss, epoch, copy.deepcopy(model.state_dict()))
        elif epoch - best[1] >= patience:
            break
    bar.close()
    model.load_state_dict(best[2])

    p_val = torch.sigmoid(predict(xv)).numpy()
    x_test, y_test = tensors["test"]
    p_test = torch.sigmoid(predict(x_test)).numpy()
    y_test = y_test.numpy()
    calib = IsotonicRegression(out_of_bounds="clip").fit(p_val, yv.numpy())
    eps = 0.5 / len(p_val)  # calibration on n_val points cannot resolve probabilities finer than this
    p_cal = np.clip(calib.predict(p_test), eps, 1 - eps)

    auc, jsd = roc_auc_score(y_test, p_test), jsd_from_probabilities(p_cal, y_test)
    ref_i, gen_i = np.flatnonzero(y_test == 1), np.flatnonzero(y_test == 0)
    boot_auc, boot_jsd = [], []
    for _ in range(n_boot):  # stratified bootstrap of the test split
        b = np.concatenate([rng.choice(ref_i, len(ref_i)), rng.choice(gen_i, len(gen_i))])
        boot_auc.append(roc_auc_score(y_test[b], p_test[b]))
        boot_jsd.append(jsd_from_probabilities(p_cal[b], y_test[b]))
    return {"auc": float(auc), "auc_err": float(np.std(boot_auc)), "jsd": jsd, "jsd_err": float(np.std(boot_jsd)),
            "n_test": len(ref_i), "epochs": epoch, "best_epoch": best[1]}
