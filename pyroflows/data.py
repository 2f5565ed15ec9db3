"""Small data sets that ship with the project's dependencies (no downloads), as numpy arrays.

Example:
    >>> from pyroflows.data import breast_cancer
    >>> x, y = breast_cancer()
    >>> x.shape
    (569, 30)
"""

from __future__ import annotations

import numpy as np

__all__ = ["breast_cancer"]


def breast_cancer() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's breast-cancer data: 569 x 30 standardised features and 0/1 labels.

    The same numbers as ``pyroflows.demo.breast_cancer``, which reads the copy shipped
    with the package instead of scikit-learn.

    Returns:
        ``(x, y)``: float64 features of shape ``(569, 30)``, each column with mean 0 and
        sd 1, and float64 labels of shape ``(569,)`` (1 = benign).

    Raises:
        ImportError: scikit-learn is not installed (it is in the ``dev`` extra).

    Example:
        >>> x, y = breast_cancer()
        >>> bool(abs(x.mean(0)).max() < 1e-12), y.shape
        (True, (569,))
    """
    try:
        from sklearn.datasets import load_breast_cancer
    except ImportError as e:  # pragma: no cover - dev extra
        raise ImportError("the demo data needs scikit-learn: pip install 'pyroflows[dev]'") from e
    data = load_breast_cancer()
    x = data.data.astype(np.float64)
    x = (x - x.mean(0)) / x.std(0)
    return x, data.target.astype(np.float64)
