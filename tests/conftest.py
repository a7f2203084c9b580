import os

# Tests share a 2-core machine; keep BLAS/torch from oversubscribing it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def train_tiny_model(directory, n_showers: int = 24, steps: int = 20, materials=("W", "Cu")):
    """A `tiny` model trained a few steps on synthetic W and Cu photons: (loaded ShowerModel, data files)."""
    from calofm.generation import load
    from calofm.training import TrainConfig, train
    from calofm.training.synthetic import write_synthetic

    data = [write_synthetic(str(directory / f"{m}.h5"), n_showers, material=m, seed=i, mean_hits=15)
            for i, m in enumerate(materials)]
    cfg = TrainConfig(data=tuple(data), out=str(directory / "run"), preset="tiny", steps=steps, batch_size=8, lr=1e-2,
                      warmup=2, eval_every=steps, ckpt_every=steps, log_every=10, max_val=2, device="cpu")
    train(cfg, threads=1, progress=False, log=lambda *a, **k: None)
    return load(str(directory / "run")), data
