"""Small data sets that ship with the project's dependencies (no downloads), as numpy arrays."""

from __future__ import annotations

import numpy as np

__all__ = ["breast_cancer"]


def breast_cancer():
    """sklearn's breast-cancer data: 569 x 30 standardised features and 0/1 labels."""
    try:
        from sklearn.datasets import load_breast_cancer
    except ImportError as e:  # pragma: no cover - dev extra
        raise ImportError("the demo data needs scikit-learn: pip install 'pyroflows[dev]'") from e
    data = load_breast_cancer()
    x = data.data.astype(np.float64)
    x = (x - x.mean(0)) / x.std(0)
    return x, data.target.astype(np.float64)
