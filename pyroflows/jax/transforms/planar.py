"""Planar and radial flows: one-unit residual maps whose Jacobian determinant is a scalar (JAX mirror of torch).

Both layers move every point along one direction (planar) or one radius (radial), so the
matrix determinant lemma gives log|det J| in O(dim).

References:
    Rezende & Mohamed 2015, "Variational inference with normalizing flows",
    arXiv:1505.05770.
"""

from __future__ import annotations

import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from ..flows import register_flow
from ..nn import host_rng
from .base import FlowTransform, bisect_increasing, implicit_step

__all__ = ["Planar", "Radial"]

#: Positive quantities (softplus outputs) are kept at or above this, so that a layer
#: never becomes exactly singular when a raw parameter runs off to -infinity.
_FLOOR = 1e-6
#: |w|^2 is floored at this before dividing by it, so that w = 0 gives the identity, not 0/0.
_W_EPS = 1e-12


def _solver_tol(layer, dtype):
    # Bisection cannot resolve below the dtype's spacing; the implicit Newton step after
    # it recovers most of the remaining digits.
    return max(layer.inverse_tol, 8 * float(jnp.finfo(dtype).eps))


def _safe_log(x):
    return jnp.log(jnp.maximum(x, jnp.finfo(x.dtype).tiny))


def _log_tanh_slope(z, one_plus_c):
    """``log(1 + c tanh'(z))`` as ``log(tanh^2 z + (1 + c) sech^2 z)``, accurate near ``c = -1`` (Sylvester too)."""
    th2 = jnp.square(jnp.tanh(z))
    return _safe_log(th2 + one_plus_c * (1.0 - th2))


def _safe_norm(v):
    """``|v|`` with a zero (not NaN) gradient at ``v = 0``, like torch's ``vector_norm``."""
    sq = jnp.sum(v * v)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


class Planar(FlowTransform):
    """Planar flow ``y = x + u_hat * tanh(w.x + b)``: JAX mirror of ``pyroflows.torch.transforms.Planar``.

    The same parametrisation (``w.u_hat > -1`` for every parameter value), log-determinant
    and numerical inverse as the torch layer, whose docstring gives the maths; here the
    bisection along ``w`` runs in a ``while_loop`` that is never differentiated, and one
    implicit Newton step after it gives exact first derivatives.

    Args:
        dim: size of the vectors.
        key: JAX key for the initial weights.

    Example:
        >>> layer = Planar(2, key=jax.random.key(0))
        >>> y, ladj = layer.call_and_ladj(jnp.array([0.5, -1.0]))
        >>> x, ildj = layer.inverse_and_ladj(y)
        >>> [round(float(v), 4) for v in x], abs(round(float(ladj + ildj), 4)), y.shape, ladj.shape
        ([0.5, -1.0], 0.0, (2,), ())
    """

    numerical_inverse: ClassVar[bool] = True
    inverse_tol: ClassVar[float] = 1e-10

    u: jax.Array
    w: jax.Array
    b: jax.Array

    def __init__(self, dim: int, *, key: jax.Array):
        self.dim = int(dim)
        rng = host_rng(key)
        w = rng.standard_normal(dim)
        w = w / max(np.linalg.norm(w), 1e-3)
        v = 0.1 * rng.standard_normal(dim) / math.sqrt(dim)
        # Start at u_hat = (the part of v orthogonal to w): m(w.u) = 0 needs w.u = log(e - 1),
        # so a fresh layer is a small volume-preserving shear, close to the identity.
        a0 = math.log(math.e - 1.0)
        u = v - (w @ v) * w + a0 * w
        self.u = jnp.asarray(u, dtype=float)
        self.w = jnp.asarray(w, dtype=float)
        self.b = jnp.asarray(np.zeros(()), dtype=float)

    def constrained(self) -> tuple[jax.Array, jax.Array]:
        """The invertible parametrisation: ``(u_hat, 1 + w.u_hat)``, the second without cancellation.

        Returns:
            ``u_hat`` of shape ``(dim,)`` and the scalar ``1 + w.u_hat`` (positive).

        Example:
            >>> import jax
            >>> u_hat, one_plus_c = Planar(2, key=jax.random.key(0)).constrained()
            >>> u_hat.shape, bool(one_plus_c > 0)
            ((2,), True)
        """
        w, u = self.w, self.u
        a = w @ u
        w_sq = w @ w
        denom = jnp.maximum(w_sq, _W_EPS)
        sp = jnp.maximum(jax.nn.softplus(a), _FLOOR)
        u_hat = u + ((sp - 1.0) - a) / denom * w
        # 1 + w.u_hat = (1 + a) (1 - s) + softplus(a) s with s = |w|^2 / max(|w|^2, eps),
        # which is softplus(a) itself (no cancellation) unless |w|^2 < eps.
        one_plus_c = (1.0 + a) * ((denom - w_sq) / denom) + sp * (w_sq / denom)
        return u_hat, one_plus_c

    def u_hat(self) -> jax.Array:
        """``u_hat``, the direction the layer moves points along (``constrained()[0]``).

        Example:
            >>> import jax
            >>> Planar(3, key=jax.random.key(0)).u_hat().shape
            (3,)
        """
        return self.constrained()[0]

    def call_and_ladj(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``y = x + u_hat tanh(w.x + b)`` and its log-determinant, for one vector."""
        u_hat, one_plus_c = self.constrained()
        z = x @ self.w + self.b
        y = x + jnp.tanh(z) * u_hat
        return y, _log_tanh_slope(z, one_plus_c)

    def inverse_and_ladj(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The numerical inverse (bisection along ``w``, one implicit Newton step) and its log-determinant."""
        u_hat, one_plus_c = self.constrained()
        c = one_plus_c - 1.0
        target = y @ self.w
        b = self.b
        spread = jnp.abs(c)
        a0 = bisect_increasing(
            lambda cb, a: a + cb[0] * jnp.tanh(a + cb[1]),
            (c, b),
            target,
            tol=_solver_tol(self, y.dtype),
            lo=target - spread,
            hi=target + spread,
        )
        slope = jnp.exp(_log_tanh_slope(a0 + b, one_plus_c))
        a = implicit_step(a0, a0 + c * jnp.tanh(a0 + b), slope, target)
        x = y - jnp.tanh(a + b) * u_hat
        return x, -_log_tanh_slope(a + b, one_plus_c)


class Radial(FlowTransform):
    """Radial flow ``y = x + beta_hat (x - x0) / (alpha + r)``: JAX mirror of ``pyroflows.torch.transforms.Radial``.

    The same parametrisation (``beta_hat > -alpha``), log-determinant and closed-form
    inverse as the torch layer, whose docstring gives the maths. The norm has a zero
    gradient at ``x = x0``, as torch's ``vector_norm``.

    Args:
        dim: size of the vectors.
        key: JAX key for the initial centre ``x0`` and ``raw_beta``.

    Example:
        >>> layer = Radial(2, key=jax.random.key(0))
        >>> y, ladj = layer.call_and_ladj(layer.x0)  # the centre stays put
        >>> x, ildj = layer.inverse_and_ladj(y)  # in closed form, exact at y = x0
        >>> bool(jnp.all(y == layer.x0)), bool(jnp.all(x == layer.x0)), abs(round(float(ladj + ildj), 6))
        (True, True, 0.0)
    """

    x0: jax.Array
    raw_alpha: jax.Array
    raw_beta: jax.Array

    def __init__(self, dim: int, *, key: jax.Array):
        self.dim = int(dim)
        rng = host_rng(key)
        self.x0 = jnp.asarray(rng.standard_normal(dim), dtype=float)
        self.raw_alpha = jnp.asarray(np.zeros(()), dtype=float)
        # raw_beta near raw_alpha gives beta_hat near 0: a mild radial contraction or expansion.
        self.raw_beta = jnp.asarray(0.1 * rng.standard_normal(()), dtype=float)

    def constrained(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The invertible parametrisation: ``(alpha, beta_hat, s = alpha + beta_hat)``, ``s > 0``.

        Returns:
            Three scalars.

        Example:
            >>> import jax
            >>> alpha, beta_hat, s = Radial(2, key=jax.random.key(0)).constrained()
            >>> bool(alpha > 0), bool(s > 0)
            (True, True)
        """
        alpha = jnp.maximum(jax.nn.softplus(self.raw_alpha), _FLOOR)
        s = jnp.maximum(jax.nn.softplus(self.raw_beta), _FLOOR)
        return alpha, s - alpha, s

    def _ladj(self, r, alpha, s):
        log_ar = jnp.log(alpha + r)
        radial = jnp.log(r * (r + 2.0 * alpha) + alpha * s) - 2.0 * log_ar
        return (self.dim - 1) * (jnp.log(r + s) - log_ar) + radial

    def call_and_ladj(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``y = x + beta_hat (x - x0) / (alpha + |x - x0|)`` and its log-determinant, for one vector."""
        alpha, beta, s = self.constrained()
        diff = x - self.x0
        r = _safe_norm(diff)
        y = x + (beta / (alpha + r)) * diff
        return y, self._ladj(r, alpha, s)

    def inverse_and_ladj(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The closed-form inverse (the radius from a quadratic) and its log-determinant."""
        alpha, _, s = self.constrained()
        diff = y - self.x0
        r_y = _safe_norm(diff)
        # Root of r^2 + B r - alpha r_y = 0 with B = s - r_y. Each branch sees only the
        # sign of B it is accurate for, so neither can divide by zero (nor leak NaN grads).
        B = s - r_y
        B_pos, B_neg = jnp.maximum(B, 0.0), jnp.minimum(B, 0.0)
        four_ac = 4.0 * alpha * r_y
        use_pos = B >= 0
        r_pos = 2.0 * alpha * r_y / (B_pos + jnp.sqrt(jnp.square(B_pos) + four_ac))
        # The unused branch gets +1 under its square root: at y = x0 it would be sqrt(0).
        r_neg = 0.5 * (jnp.sqrt(jnp.square(B_neg) + four_ac + use_pos.astype(B.dtype)) - B_neg)
        r = jnp.where(use_pos, r_pos, r_neg)
        x = self.x0 + ((alpha + r) / (r + s)) * diff
        return x, -self._ladj(r, alpha, s)


@register_flow("planar")
def planar(dim: int, num_layers: int, *, key: jax.Array) -> list[Planar]:
    """The ``planar`` family's layers: JAX mirror of ``pyroflows.torch.transforms.planar.planar``.

    Example:
        >>> [type(layer).__name__ for layer in planar(2, 2, key=jax.random.key(0))]
        ['Planar', 'Planar']
    """
    return [Planar(dim, key=k) for k in jax.random.split(key, num_layers)]


@register_flow("radial")
def radial(dim: int, num_layers: int, *, key: jax.Array) -> list[Radial]:
    """The ``radial`` family's layers: JAX mirror of ``pyroflows.torch.transforms.planar.radial``.

    Example:
        >>> len(radial(3, 4, key=jax.random.key(0)))
        4
    """
    return [Radial(dim, key=k) for k in jax.random.split(key, num_layers)]
