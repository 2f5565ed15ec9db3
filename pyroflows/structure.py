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
    "SYLVESTER_VARIANTS",
    "sylvester_num_vectors",
    "GDN_VARIANTS",
    "gdn_initial_parameters",
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
#: The choices of ``Q`` of a Sylvester layer.
SYLVESTER_VARIANTS = ("orthogonal", "householder", "triangular")
#: The GDN variants: ``gamma`` diagonal or a full matrix.
GDN_VARIANTS = ("diagonal", "dense")


def made_degrees(dim: int, hidden_dims: Sequence[int], lowest: int = 1) -> list[np.ndarray]:
    """Degrees of MADE's units (Germain et al. 2015): inputs ``1..dim``, hidden units cyclic.

    Hidden degrees cycle through ``lowest..dim-1`` (deterministic, so both backends agree).

    Args:
        dim: the number of inputs.
        hidden_dims: the hidden layer widths.
        lowest: the smallest hidden degree: 1, or 0 for a conditional MADE (units of
            degree 0 read the context only, and feed the first coordinate).

    Returns:
        One integer array per layer, inputs first.

    References:
        Germain, Gregor, Murray & Larochelle 2015, "MADE", arXiv:1502.03509.

    Example:
        >>> [d.tolist() for d in made_degrees(3, [4])]
        [[1, 2, 3], [1, 2, 1, 2]]
    """
    top = max(dim - 1, 1)
    return [np.arange(1, dim + 1)] + [np.arange(h) % (top - lowest + 1) + lowest for h in hidden_dims]


def made_masks(dim: int, hidden_dims: Sequence[int], num_params: int, context_dim: int = 0) -> list[np.ndarray]:
    """The boolean weight masks of a MADE with ``num_params`` outputs per coordinate.

    A hidden unit of degree k sees the units of degree ``<= k`` below it; output i (each
    of its ``num_params`` entries, in coordinate-major order) sees hidden units of degree
    ``< i``. So the outputs of coordinate i depend on inputs ``< i`` only. Context inputs
    (appended after the ``dim`` coordinates) have degree 0, so every unit sees them, and a
    conditional MADE's hidden degrees start at 0, so the first coordinate's outputs read
    the context too (through hidden units that see nothing else).

    Args:
        dim: the number of inputs (and of output coordinates).
        hidden_dims: the hidden layer widths.
        num_params: outputs per coordinate.
        context_dim: the number of context inputs of a conditional MADE.

    Returns:
        One ``(out, in)`` boolean mask per linear layer.

    Example:
        >>> [m.shape for m in made_masks(3, [4], 2)]
        [(4, 3), (6, 4)]
        >>> bool(made_masks(3, [4], 2)[-1][:2].any())  # coordinate 1 sees nothing
        False
        >>> bool(made_masks(3, [4], 2, context_dim=1)[0][:, 3].all())  # all see the context
        True
        >>> bool(made_masks(3, [4], 2, context_dim=1)[-1][:2].any())  # coordinate 1 reads it
        True
    """
    degrees = made_degrees(dim, hidden_dims, lowest=0 if context_dim else 1)
    degrees[0] = np.concatenate([degrees[0], np.zeros(context_dim, dtype=degrees[0].dtype)])
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


def sylvester_num_vectors(dim: int, variant: str, num_vectors: int | None) -> int:
    """The number ``M`` of columns of a Sylvester layer's ``Q``, after checking the variant.

    Args:
        dim: size of the vectors.
        variant: one of ``SYLVESTER_VARIANTS``.
        num_vectors: ``M`` for the orthogonal variant (None: ``dim``); must be None otherwise.

    Returns:
        ``M``, in ``[1, dim]``.

    Raises:
        ValueError: an unknown variant, or a ``num_vectors`` out of ``[1, dim]`` or given
            to another variant.

    Example:
        >>> sylvester_num_vectors(3, "orthogonal", 2), sylvester_num_vectors(3, "triangular", None)
        (2, 3)
    """
    if variant not in SYLVESTER_VARIANTS:
        raise ValueError(f"variant={variant!r} is not one of {list(SYLVESTER_VARIANTS)}")
    if variant != "orthogonal":
        if num_vectors is not None:
            raise ValueError(
                f"num_vectors applies only to the 'orthogonal' variant; the {variant!r} variant uses M = dim"
            )
        return dim
    m = dim if num_vectors is None else int(num_vectors)
    if not 1 <= m <= dim:
        raise ValueError(f"num_vectors={num_vectors!r} must lie in [1, dim={dim}] for the orthogonal variant")
    return m


def gdn_initial_parameters(
    dim: int, variant: str, max_exponent: float, beta_min: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The unconstrained starting parameters of a GDN layer, after checking its options.

    A fresh layer is near the identity: ``beta = 1``, a weak ``gamma`` (0.1 on the
    diagonal, 0.01 off it in the dense variant) and ``eps`` a quarter of its bound.

    Args:
        dim: size of the vectors.
        variant: one of ``GDN_VARIANTS``.
        max_exponent: upper bound on ``eps``, in ``(0, 1/2)``.
        beta_min: lower bound on ``beta``.

    Returns:
        ``(beta, gamma, exponent)`` before their softplus / sigmoid maps (float64):
        shapes ``(dim,)``, ``(dim,)`` or ``(dim, dim)``, and ``(dim,)``.

    Raises:
        ValueError: an unknown variant, or ``max_exponent`` outside ``(0, 1/2)`` (where
            the map would not be a bijection).

    References:
        Balle, Laparra & Simoncelli 2016, "Density modeling of images using a
        generalized normalization transformation", arXiv:1511.06281.

    Example:
        >>> beta, gamma, exponent = gdn_initial_parameters(2, "dense", 0.4, 1e-3)
        >>> beta.shape, gamma.shape, exponent.shape
        ((2,), (2, 2), (2,))
    """
    if variant not in GDN_VARIANTS:
        raise ValueError(f"GDN variant {variant!r} is not one of {list(GDN_VARIANTS)}")
    if not 0.0 < max_exponent < 0.5:
        raise ValueError(f"GDN max_exponent={max_exponent!r} must lie in (0, 0.5) for the map to be a bijection")

    def softplus_inverse(value):
        return math.log(math.expm1(value))

    beta = np.full(dim, softplus_inverse(1.0 - beta_min))
    if variant == "diagonal":
        gamma = np.full(dim, softplus_inverse(0.1))
    else:
        gamma = np.full((dim, dim), softplus_inverse(0.01))
        np.fill_diagonal(gamma, softplus_inverse(0.1))
    return beta, gamma, np.full(dim, math.log(1.0 / 3.0))  # sigmoid(log 1/3) = 1/4
