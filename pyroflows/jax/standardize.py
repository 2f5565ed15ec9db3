"""A fixed per-coordinate affine layer: how ``fit_mle(standardize=True)`` folds the data's
z-scoring into the flow it returns (mirrored in ``pyroflows.torch.standardize``).

``Standardize(loc, scale)`` maps ``z`` to ``x = loc + scale * z`` (log-det
``sum(log scale)``). Its arrays pass through ``stop_gradient``, so no optimiser (``fit_mle``,
``fit_reverse_kl``, NumPyro's ``eqx_module`` under SVI) moves them; in a saved file they
are named ``<index>.loc`` and ``<index>.scale``, as the torch buffers are.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .transforms.base import Flow, FlowTransform

__all__ = ["Standardize", "with_standardize", "split_standardize"]


class Standardize(FlowTransform):
    """``x = loc + scale * z`` per coordinate, with fixed ``loc`` and ``scale > 0``.

    The log-determinant is ``sum(log scale)``. Both arrays pass through
    ``stop_gradient``, so no optimiser moves them.

    Args:
        loc: the per-coordinate shift, shape ``(dim,)`` (the data's mean).
        scale: the per-coordinate scale, shape ``(dim,)``, positive (the data's sd).
        dtype: the arrays' dtype (default: JAX's default float).

    Raises:
        ValueError: shapes other than ``(dim,)``, a non-finite ``loc`` or a ``scale`` that
            is not finite and positive.

    Example:
        >>> import jax.numpy as jnp
        >>> layer = Standardize([1.0, -1.0], [2.0, 0.5])
        >>> x, ladj = layer.call_and_ladj(jnp.ones(2))
        >>> [round(float(v), 4) for v in x], round(float(ladj), 4)
        ([3.0, -0.5], 0.0)
    """

    loc: jax.Array
    scale: jax.Array

    def __init__(self, loc: Any, scale: Any, dtype: Any = None):
        loc_np, scale_np = np.asarray(loc, dtype=float), np.asarray(scale, dtype=float)
        if loc_np.ndim != 1 or scale_np.shape != loc_np.shape:
            raise ValueError(
                f"Standardize: loc and scale must both have shape (dim,), got {loc_np.shape} and {scale_np.shape}"
            )
        if not np.isfinite(loc_np).all() or not (np.isfinite(scale_np) & (scale_np > 0)).all():
            raise ValueError("Standardize: loc must be finite and scale finite and positive")
        dtype = dtype or jnp.result_type(float)
        self.dim = int(loc_np.shape[0])
        self.loc = jnp.asarray(loc_np, dtype)
        self.scale = jnp.asarray(scale_np, dtype)

    def _fixed(self):
        return jax.lax.stop_gradient(self.loc), jax.lax.stop_gradient(self.scale)

    def call_and_ladj(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(loc + scale * x, sum(log scale))`` for one vector ``x`` of shape ``(dim,)``.

        Example:
            >>> import jax.numpy as jnp
            >>> x, ladj = Standardize([0.0, 0.0], [1.0, 1.0]).call_and_ladj(jnp.ones(2))
            >>> x.shape, ladj.shape
            ((2,), ())
        """
        loc, scale = self._fixed()
        return loc + scale * x, jnp.sum(jnp.log(scale))

    def inverse_and_ladj(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``((y - loc) / scale, -sum(log scale))`` for one vector ``y`` of shape ``(dim,)``.

        Example:
            >>> import jax.numpy as jnp
            >>> z, ladj = Standardize([1.0, 1.0], [2.0, 2.0]).inverse_and_ladj(jnp.full(2, 3.0))
            >>> [round(float(v), 4) for v in z]
            [1.0, 1.0]
        """
        loc, scale = self._fixed()
        return (y - loc) / scale, -jnp.sum(jnp.log(scale))


def with_standardize(flow: FlowTransform, layer: Standardize) -> Flow:
    """A ``Flow`` running ``flow`` and then ``layer`` (so its density is on the data's scale).

    The config gains ``standardize=True``, which tells ``load_flow`` to append a
    ``Standardize`` layer before it loads the arrays.

    Args:
        flow: a ``Flow`` (from ``build_flow``) or any single ``FlowTransform`` layer.
        layer: the fixed affine layer to append.

    Returns:
        A new ``Flow`` whose last part is ``layer``.

    Example:
        >>> from pyroflows.jax.transforms import ElementwiseAffine
        >>> flow = with_standardize(ElementwiseAffine(2), Standardize([0.0, 0.0], [1.0, 2.0]))
        >>> [type(p).__name__ for p in flow.parts]
        ['ElementwiseAffine', 'Standardize']
    """
    if isinstance(flow, Flow):
        config = dict(flow.config, standardize=True) if flow.config else {}
        return flow.with_parts(tuple(flow.parts) + (layer,), config)
    return Flow((flow, layer), layer.dim, {})


def split_standardize(flow: FlowTransform) -> tuple[FlowTransform, Standardize | None]:
    """Take a trailing ``Standardize`` layer off a flow (the inverse of ``with_standardize``).

    Args:
        flow: a ``Flow`` or any layer.

    Returns:
        ``(inner, layer)`` when ``flow`` is a ``Flow`` ending in a ``Standardize`` layer
        (``inner`` without it, and without ``standardize`` in its config), else
        ``(flow, None)``.

    Example:
        >>> from pyroflows.jax.transforms import ElementwiseAffine
        >>> flow = with_standardize(ElementwiseAffine(2), Standardize([0.0, 0.0], [1.0, 2.0]))
        >>> inner, layer = split_standardize(flow)
        >>> len(inner.parts), type(layer).__name__
        (1, 'Standardize')
    """
    if isinstance(flow, Flow) and len(flow.parts) > 1 and isinstance(flow.parts[-1], Standardize):
        config = {k: v for k, v in flow.config.items() if k != "standardize"}
        return flow.with_parts(flow.parts[:-1], config), flow.parts[-1]
    return flow, None
