"""Sylvester flows and Householder reflections (JAX mirror of torch).

References:
    van den Berg, Hasenclever, Tomczak & Welling 2018, "Sylvester normalizing flows for
    variational inference", arXiv:1803.05649 (``Sylvester``).
    Tomczak & Welling 2016, "Improving variational auto-encoders using Householder
    flow", arXiv:1611.09630 (``Householder``).
"""

from __future__ import annotations

import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ...structure import SYLVESTER_VARIANTS, sylvester_num_vectors
from ..flows import register_flow
from ..nn import host_rng
from .base import ElementwiseAffine, FlowTransform, bisect_increasing, implicit_step
from .planar import _log_tanh_slope, _solver_tol

__all__ = ["Sylvester", "Householder"]

VARIANTS = SYLVESTER_VARIANTS


def _log_cosh(x):
    a = jnp.abs(x)
    return a + jax.nn.softplus(-2.0 * a) - math.log(2.0)


def expm(a: jax.Array, terms: int = 18, max_squarings: int = 40) -> jax.Array:
    """``exp(a)`` for a square matrix by scaling and squaring a Taylor polynomial.

    ``a`` is scaled by ``2^-s`` so that its 1-norm is at most 1/2, where ``terms`` = 18
    Taylor terms leave a remainder below 1e-22, then squared ``s`` times. The loops have
    fixed lengths (squarings past ``s`` are skipped by a select) and ``s`` is chosen
    without gradients, so this compiles in a fraction of a second and is differentiable in
    reverse mode (``jax.scipy.linalg.expm`` took seconds to compile per traced function).
    Accurate to about 1e-13 (float64) for entries up to ~50.

    Args:
        a: a square matrix, shape ``(n, n)``.
        terms: Taylor terms.
        max_squarings: the most squarings (the loop's fixed length).

    Returns:
        ``exp(a)``, shape ``(n, n)``.

    Example:
        >>> import jax.numpy as jnp
        >>> rotation = expm(jnp.array([[0.0, -jnp.pi / 2], [jnp.pi / 2, 0.0]]))
        >>> [[round(float(v), 4) + 0.0 for v in row] for row in rotation]
        [[0.0, -1.0], [1.0, 0.0]]
    """
    n = a.shape[-1]
    eye = jnp.eye(n, dtype=a.dtype)
    norm = jax.lax.stop_gradient(jnp.max(jnp.sum(jnp.abs(a), 0)))
    s = jnp.clip(jnp.ceil(jnp.log2(jnp.maximum(norm, jnp.finfo(a.dtype).tiny) * 2.0)), 0, max_squarings)
    scaled = a * jnp.exp2(-s)

    def horner(k, p):
        # I + x (I + x/2 (I + x/3 (...))), innermost term first.
        return eye + (scaled @ p) / (terms - k)

    def square(k, p):
        return jnp.where(k < s, p @ p, p)

    p = jax.lax.fori_loop(0, terms, horner, eye)
    return jax.lax.fori_loop(0, max_squarings, square, p)


def reflect(x: jax.Array, vectors: jax.Array, reverse: bool = False) -> jax.Array:
    """Apply ``H_1``, then ``H_2``, ... (``reverse``: ``H_K`` first) to ``x``.

    ``H_k = I - 2 v_k v_k^T / |v_k|^2`` for the rows ``v_k`` of ``vectors``. ``|v|^2`` is
    floored at the dtype's smallest normal number, so ``v = 0`` acts as the identity.
    A ``scan`` over the reflections, so compile time does not grow with their number.

    Args:
        x: points of shape ``(..., dim)``.
        vectors: the reflection vectors, shape ``(K, dim)``.
        reverse: apply them in reverse order (the inverse map).

    Returns:
        The reflected points, shape ``(..., dim)``.

    Example:
        >>> import jax.numpy as jnp
        >>> [float(v) for v in reflect(jnp.array([1.0, 2.0]), jnp.array([[1.0, 0.0]]))]
        [-1.0, 2.0]
    """
    sq = jnp.sum(vectors * vectors, -1, keepdims=True)
    units = vectors / jnp.sqrt(jnp.maximum(sq, jnp.finfo(vectors.dtype).tiny))

    def step(x, unit):
        return x - 2.0 * (x @ unit)[..., None] * unit, None

    return jax.lax.scan(step, x, units, reverse=reverse)[0]


class Householder(FlowTransform):
    """Householder reflections ``y = H_K ... H_1 x``: JAX mirror of ``pyroflows.torch.transforms.Householder``.

    Orthogonal (log-determinant 0); the inverse applies the reflections in reverse order
    (a ``scan``, see ``reflect``).

    Args:
        dim: size of the vectors.
        num_reflections: how many reflections ``K`` (default ``dim``).
        key: JAX key for the random vectors.

    Raises:
        ValueError: ``num_reflections < 1``.

    Example:
        >>> layer = Householder(2, key=jax.random.key(0))
        >>> y, ladj = layer.call_and_ladj(jnp.array([0.6, -0.8]))
        >>> x, ildj = layer.inverse_and_ladj(y)
        >>> round(float(jnp.linalg.norm(y)), 6), [round(float(v), 4) for v in x], float(ladj), float(ildj)
        (1.0, [0.6, -0.8], 0.0, 0.0)
    """

    vectors: jax.Array
    num_reflections: int = eqx.field(static=True)

    def __init__(self, dim: int, num_reflections: int | None = None, *, key: jax.Array):
        self.dim = int(dim)
        self.num_reflections = self.dim if num_reflections is None else int(num_reflections)
        if self.num_reflections < 1:
            raise ValueError(f"num_reflections={num_reflections!r} must be a positive integer")
        # Gaussian vectors give a random orthogonal map.
        self.vectors = jnp.asarray(host_rng(key).standard_normal((self.num_reflections, self.dim)), dtype=float)

    def matrix(self) -> jax.Array:
        """The orthogonal matrix ``H_K ... H_1`` (for inspection and tests).

        Example:
            >>> import jax, jax.numpy as jnp
            >>> q = Householder(3, key=jax.random.key(0)).matrix()
            >>> bool(jnp.allclose(q @ q.T, jnp.eye(3), atol=1e-5))
            True
        """
        return reflect(jnp.eye(self.dim, dtype=self.vectors.dtype), self.vectors).T

    def call_and_ladj(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``y = H_K ... H_1 x`` and its log-determinant 0, for one vector."""
        return reflect(x, self.vectors), jnp.zeros((), x.dtype)

    def inverse_and_ladj(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``x = H_1 ... H_K y`` and its log-determinant 0, for one vector."""
        return reflect(y, self.vectors, reverse=True), jnp.zeros((), y.dtype)


class Sylvester(FlowTransform):
    """Sylvester flow ``y = x + Q R tanh(R~ Q^T x + b)``: JAX mirror of ``pyroflows.torch.transforms.Sylvester``.

    The same triangles, variants of ``Q``, log-determinant and numerical inverse as the
    torch layer, whose docstring gives the maths. Here ``expm`` forms the orthogonal
    variant's ``Q``, the triangular solve of the inverse runs in a ``fori_loop`` (one
    bisection and implicit Newton step per coordinate), and the masks and the fixed ``Q``
    of the triangular variant are boolean arrays (torch keeps float buffers under the same
    names), so NumPyro never trains them.

    Args:
        dim: size of the vectors.
        variant: ``"orthogonal"``, ``"householder"`` or ``"triangular"``.
        num_vectors: ``M`` for the orthogonal variant (default ``dim``).
        reverse: the triangular variant's ``Q`` is the reversal permutation.
        key: JAX key for the initial weights.

    Raises:
        ValueError: an unknown variant, or a ``num_vectors`` out of ``[1, dim]`` or given
            to another variant.

    Example:
        >>> layer = Sylvester(3, num_vectors=2, key=jax.random.key(0))
        >>> y, ladj = layer.call_and_ladj(jnp.array([0.5, -1.0, 2.0]))
        >>> x, ildj = layer.inverse_and_ladj(y)
        >>> layer.q().shape, [round(float(v), 4) for v in x], abs(round(float(ladj + ildj), 4))
        ((3, 2), [0.5, -1.0, 2.0], 0.0)
    """

    numerical_inverse: ClassVar[bool] = True
    inverse_tol: ClassVar[float] = 1e-10

    upper_mask: jax.Array
    r_offdiag: jax.Array
    r_tilde_offdiag: jax.Array
    raw_r_diag: jax.Array
    raw_r_tilde_diag: jax.Array
    bias: jax.Array
    skew_mask: jax.Array | None
    skew: jax.Array | None
    vectors: jax.Array | None
    q_fixed: jax.Array | None
    variant: str = eqx.field(static=True)
    num_vectors: int = eqx.field(static=True)
    reverse: bool = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        variant: str = "orthogonal",
        num_vectors: int | None = None,
        reverse: bool = False,
        *,
        key: jax.Array,
    ):
        self.dim = dim = int(dim)
        m = sylvester_num_vectors(dim, variant, num_vectors)
        self.variant, self.num_vectors, self.reverse = variant, m, bool(reverse)
        rng = host_rng(key)

        upper = np.triu(np.ones((m, m), bool), 1)
        self.upper_mask = jnp.asarray(upper)
        self.skew_mask = self.skew = self.vectors = self.q_fixed = None
        if variant == "orthogonal":
            # A random skew matrix: Q starts as a random M-frame, not the coordinate axes.
            skew_mask = np.triu(np.ones((dim, dim), bool), 1)
            self.skew_mask = jnp.asarray(skew_mask)
            self.skew = jnp.asarray(0.5 * rng.standard_normal((dim, dim)) * skew_mask, dtype=float)
        elif variant == "householder":
            self.vectors = jnp.asarray(rng.standard_normal((dim, dim)), dtype=float)
        else:
            eye = np.eye(dim, dtype=bool)
            self.q_fixed = jnp.asarray(eye[:, ::-1] if self.reverse else eye)

        # R~ sets the scale of the tanh arguments (order 1); R is small, so a fresh layer is
        # a mild perturbation of the identity.
        self.r_offdiag = jnp.asarray(0.1 * rng.standard_normal((m, m)) / math.sqrt(m) * upper, dtype=float)
        self.r_tilde_offdiag = jnp.asarray(rng.standard_normal((m, m)) / math.sqrt(m) * upper, dtype=float)
        self.raw_r_diag = jnp.asarray(0.1 * rng.standard_normal(m), dtype=float)
        self.raw_r_tilde_diag = jnp.asarray(np.ones(m), dtype=float)
        self.bias = jnp.asarray(np.zeros(m), dtype=float)

    # --- parametrisation -----------------------------------------------------------
    def q(self) -> jax.Array:
        """``Q``, ``dim x M`` with orthonormal columns.

        Example:
            >>> import jax
            >>> Sylvester(3, num_vectors=2, key=jax.random.key(0)).q().shape
            (3, 2)
        """
        if self.variant == "orthogonal":
            upper = jnp.where(self.skew_mask, self.skew, 0.0)
            return expm(upper - upper.T)[:, : self.num_vectors]
        if self.variant == "householder":
            return reflect(jnp.eye(self.dim, dtype=self.vectors.dtype), self.vectors)
        return self.q_fixed.astype(self.r_offdiag.dtype)

    def triangles(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(R, R~, log(1 + r_ii r~_ii))``: the ``M x M`` triangles and the diagonal's log-factors.

        Example:
            >>> import jax
            >>> r, r_tilde, log_one_plus_d = Sylvester(3, key=jax.random.key(0)).triangles()
            >>> r.shape, r_tilde.shape, log_one_plus_d.shape
            ((3, 3), (3, 3), (3,))
        """
        p, q = self.raw_r_diag, self.raw_r_tilde_diag
        r = jnp.where(self.upper_mask, self.r_offdiag, 0.0) + jnp.diag(jnp.tanh(p))
        r_tilde = jnp.where(self.upper_mask, self.r_tilde_offdiag, 0.0) + jnp.diag(jnp.tanh(q))
        log_one_plus_d = _log_cosh(p + q) - _log_cosh(p) - _log_cosh(q)
        return r, r_tilde, log_one_plus_d

    # --- the map ---------------------------------------------------------------------
    def call_and_ladj(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``y = x + Q R tanh(R~ Q^T x + b)`` and its log-determinant, for one vector."""
        q = self.q()
        r, r_tilde, log_one_plus_d = self.triangles()
        z = (x @ q) @ r_tilde.T + self.bias
        y = x + (jnp.tanh(z) @ r.T) @ q.T
        return y, _log_tanh_slope(z, jnp.exp(log_one_plus_d)).sum()

    def inverse_and_ladj(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The numerical inverse (a triangular solve, coordinate by coordinate) and its log-determinant."""
        q = self.q()
        r, r_tilde, log_one_plus_d = self.triangles()
        one_plus_d = jnp.exp(log_one_plus_d)
        m = self.num_vectors
        t = y @ q
        tol = _solver_tol(self, y.dtype)
        r_diag, rt_diag = jnp.diagonal(r), jnp.diagonal(r_tilde)
        dtype = jnp.result_type(t, r, r_tilde, self.bias)

        def solve(k, carry):
            # Coordinate i = m-1-k; v and h are still zero at i and before it, so the full
            # rows of the upper-triangular R~ and R only pick up the later coordinates.
            v, h = carry
            i = m - 1 - k
            c = self.bias[i] + r_tilde[i] @ v
            s = t[i] - r[i] @ h
            r_ii, rt_ii = r_diag[i], rt_diag[i]
            spread = jnp.abs(r_ii)
            v0 = bisect_increasing(
                lambda a, u: u + a[0] * jnp.tanh(a[1] * u + a[2]),
                (r_ii, rt_ii, c),
                s,
                tol=tol,
                lo=s - spread,
                hi=s + spread,
            )
            z0 = rt_ii * v0 + c
            slope = jnp.exp(_log_tanh_slope(z0, one_plus_d[i]))
            vi = implicit_step(v0, v0 + r_ii * jnp.tanh(z0), slope, s)
            return v.at[i].set(vi), h.at[i].set(jnp.tanh(rt_ii * vi + c))

        zeros = jnp.zeros(m, dtype)
        v, _ = jax.lax.fori_loop(0, m, solve, (zeros, zeros))
        z = v @ r_tilde.T + self.bias
        x = y - (jnp.tanh(z) @ r.T) @ q.T
        return x, -_log_tanh_slope(z, one_plus_d).sum()


@register_flow("sylvester")
def sylvester(dim: int, num_layers: int, variant: str, num_vectors: int | None, *, key: jax.Array) -> list[Sylvester]:
    """The ``sylvester`` family's layers: JAX mirror of ``pyroflows.torch.transforms.sylvester.sylvester``.

    Example:
        >>> [layer.reverse for layer in sylvester(2, 2, "triangular", None, key=jax.random.key(0))]
        [False, True]
    """
    # The triangular variant alternates Q = I and Q = reversal, so both triangles get mixed.
    return [
        Sylvester(dim, variant, num_vectors, reverse=(variant == "triangular" and i % 2 == 1), key=k)
        for i, k in enumerate(jax.random.split(key, num_layers))
    ]


@register_flow("householder")
def householder(
    dim: int, num_layers: int, num_reflections: int | None, *, key: jax.Array
) -> list[ElementwiseAffine | Householder]:
    """An affine map, then ``Householder`` layers: JAX mirror of ``pyroflows.torch.transforms.sylvester.householder``.

    Example:
        >>> [type(layer).__name__ for layer in householder(2, 1, None, key=jax.random.key(0))]
        ['ElementwiseAffine', 'Householder']
    """
    # The affine map first (forward = noise to sample): Q (loc + scale * x) has a full covariance.
    return [ElementwiseAffine(dim)] + [
        Householder(dim, num_reflections, key=k) for k in jax.random.split(key, num_layers)
    ]
