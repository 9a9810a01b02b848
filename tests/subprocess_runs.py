"""Shared by the tests that run `python -m pmsn_jax.main` in subprocesses on real data."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = os.environ.get("PMSN_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")

# Slow (seconds to minutes each) and needing the demo data.
MARKS = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(os.path.join(FMNIST, "train-images-idx3-ubyte.gz")),
                       reason="needs Debian's dataset-fashion-mnist (make data)"),
]
