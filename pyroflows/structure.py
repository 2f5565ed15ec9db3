"""Fixed structure of the flows, computed once in numpy and read by both backends.

Masks, degrees, permutations and the constant offsets of the element-wise
transformers are not trained and do not depend on the backend, so they are built
here: a mask means the same thing on Pyro and on NumPyro because it is the same array.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "made_degrees",
    "made_masks",
    "block_masks",
    "reverse_permutation",
    "sigmoid_offset",
    "spline_num_params",
    "MIN_BIN_WIDTH",
    "MIN_BIN_HEIGHT",
    "MIN_DERIVATIVE",
    "DERIVATIVE_SHIFT",
    "MIN_SLOPE",
]

#: Smallest bin width of a rational-quadratic spline (a fraction of the interval).
MIN_BIN_WIDTH = 1e-3
#: Smallest bin height of a rational-quadratic spline (a fraction of the interval).
MIN_BIN_HEIGHT = 1e-3
#: Smallest knot derivative of a spline.
MIN_DERIVATIVE = 1e-3
#: Added to the raw knot derivatives before the softplus: ``softplus(DERIVATIVE_SHIFT) +
#: MIN_DERIVATIVE == 1``, so all-zero spline parameters give unit slopes (the identity).
DERIVATIVE_SHIFT = math.log(math.expm1(1.0 - MIN_DERIVATIVE))
#: Smallest slope of a unit of the deep sigmoidal transformer: keeps it > 0 where softplus underflows.
MIN_SLOPE = 1e-3


def made_degrees(dim: int, hidden_dims: Sequence[int]) -> list[np.ndarray]:
    """Degrees of MADE's units (Germain et al. 2015): inputs ``1..dim``, hidden units cyclic.

    Hidden degrees cycle through ``1..dim-1`` (deterministic, so both backends agree).

    Args:
        dim: the number of inputs.
        hidden_dims: the hidden layer widths.

    Returns:
        One integer array per layer, inputs first.

    References:
        Germain, Gregor, Murray & Larochelle 2015, "MADE", arXiv:1502.03509.

    Example:
        >>> [d.tolist() for d in made_degrees(3, [4])]
        [[1, 2, 3], [1, 2, 1, 2]]
    """
    top = max(dim - 1, 1)
    return [np.arange(1, dim + 1)] + [np.arange(h) % top + 1 for h in hidden_dims]


def made_masks(dim: int, hidden_dims: Sequence[int], num_params: int) -> list[np.ndarray]:
    """The boolean weight masks of a MADE with ``num_params`` outputs per coordinate.

    A hidden unit of degree k sees the units of degree ``<= k`` below it; output i (each
    of its ``num_params`` entries, in coordinate-major order) sees hidden units of degree
    ``< i``. So the outputs of coordinate i depend on inputs ``< i`` only.

    Args:
        dim: the number of inputs (and of output coordinates).
        hidden_dims: the hidden layer widths.
        num_params: outputs per coordinate.

    Returns:
        One ``(out, in)`` boolean mask per linear layer.

    Example:
        >>> [m.shape for m in made_masks(3, [4], 2)]
        [(4, 3), (6, 4)]
        >>> bool(made_masks(3, [4], 2)[-1][:2].any())  # coordinate 1 sees nothing
        False
    """
    degrees = made_degrees(dim, hidden_dims)
    masks = [d_out[:, None] >= d_in[None, :] for d_in, d_out in zip(degrees[:-1], degrees[1:])]
    out_degrees = np.repeat(np.arange(1, dim + 1), num_params)
    masks.append(out_degrees[:, None] > degrees[-1][None, :])
    return masks


def block_masks(dim: int, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks of a ``(dim*a) -> (dim*b)`` block lower-triangular matrix with ``b x a`` blocks.

    Args:
        dim: the number of blocks along each side.
        a: block width (inputs per coordinate).
        b: block height (outputs per coordinate).

    Returns:
        ``(diagonal, below)``: boolean masks of the diagonal blocks and of the blocks
        below the diagonal, each ``(dim*b, dim*a)``.

    References:
        De Cao, Titov & Aziz 2019, "Block Neural Autoregressive Flow", arXiv:1904.04676.

    Example:
        >>> diag, below = block_masks(2, 1, 2)
        >>> diag.astype(int).tolist(), below.astype(int).tolist()
        ([[1, 0], [1, 0], [0, 1], [0, 1]], [[0, 0], [0, 0], [1, 0], [1, 0]])
    """
    blocks = np.arange(dim)
    row = np.repeat(blocks, b)[:, None]
    col = np.repeat(blocks, a)[None, :]
    return row == col, row > col


def reverse_permutation(dim: int) -> np.ndarray:
    """The permutation that reverses the coordinates.

    Args:
        dim: the number of coordinates.

    Returns:
        ``[dim - 1, ..., 1, 0]``, an integer array.

    Example:
        >>> reverse_permutation(3).tolist()
        [2, 1, 0]
    """
    return np.arange(dim - 1, -1, -1)


def sigmoid_offset(hidden_units: int) -> np.ndarray:
    """Offsets added to the parameters of the deep sigmoidal transformer (float64).

    ``(a0 * ones(K), linspace(-1, 1, K), zeros(K))`` with ``softplus(a0) + MIN_SLOPE = 1``:
    all-zero network outputs then give unit slopes and biases spread over ``[-1, 1]``, a
    smooth near-identity map whose units differ (identical units would get identical
    gradients forever).

    Args:
        hidden_units: the number of sigmoid units K.

    Returns:
        The ``3K`` offsets: slopes, biases, log-weights.

    References:
        Huang, Krueger, Lacoste & Courville 2018, "Neural Autoregressive Flows", arXiv:1804.00779.

    Example:
        >>> sigmoid_offset(2).round(3).tolist()
        [0.54, 0.54, -1.0, 1.0, 0.0, 0.0]
    """
    k = int(hidden_units)
    a0 = math.log(math.expm1(1.0 - MIN_SLOPE))
    b0 = np.linspace(-1.0, 1.0, k) if k > 1 else np.zeros(1)
    return np.concatenate([np.full(k, a0), b0, np.zeros(k)])


def spline_num_params(count_bins: int) -> int:
    """``3K - 1`` parameters per coordinate: K widths, K heights, K - 1 interior derivatives.

    Args:
        count_bins: the number of bins K.

    Returns:
        The number of spline parameters per coordinate.

    References:
        Durkan, Bekasov, Murray & Papamakarios 2019, "Neural Spline Flows", arXiv:1906.04032.

    Example:
        >>> spline_num_params(8)
        23
    """
    return 3 * int(count_bins) - 1
