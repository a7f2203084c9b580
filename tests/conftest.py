import os

# Tests share a 2-core machine; keep BLAS/torch from oversubscribing it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
