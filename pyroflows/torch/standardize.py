"""A fixed per-coordinate affine layer: how ``fit_mle(standardize=True)`` folds the data's
z-scoring into the flow it returns (mirrored in ``pyroflows.jax.standardize``).

``Standardize(loc, scale)`` maps ``z`` to ``x = loc + scale * z`` (log-det
``sum(log scale)``). ``loc`` and ``scale`` are buffers, not parameters, so no optimiser
moves them, and they are saved in the state dict as ``<index>.loc`` and ``<index>.scale``.
"""

from __future__ import annotations

from typing import Any

import torch

from .transforms.base import Flow, FlowTransform

__all__ = ["Standardize", "with_standardize", "split_standardize"]


class Standardize(FlowTransform):
    """``x = loc + scale * z`` per coordinate, with fixed ``loc`` and ``scale > 0``.

    The log-determinant is ``sum(log scale)``; ``loc`` and ``scale`` are buffers.

    Args:
        loc: the per-coordinate shift, shape ``(dim,)`` (the data's mean).
        scale: the per-coordinate scale, shape ``(dim,)``, positive (the data's sd).

    Raises:
        ValueError: shapes other than ``(dim,)``, a non-finite ``loc`` or a ``scale`` that
            is not finite and positive.

    Example:
        >>> layer = Standardize(torch.tensor([1.0, -1.0]), torch.tensor([2.0, 0.5]))
        >>> x, ladj = layer.call_and_ladj(torch.ones(3, 2))
        >>> x[0].tolist(), round(ladj[0].item(), 4)
        ([3.0, -0.5], 0.0)
    """

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor):
        loc = torch.as_tensor(loc)
        scale = torch.as_tensor(scale, dtype=loc.dtype, device=loc.device)
        if loc.ndim != 1 or scale.shape != loc.shape:
            raise ValueError(
                "Standardize: loc and scale must both have shape (dim,), "
                f"got {tuple(loc.shape)} and {tuple(scale.shape)}"
            )
        if not bool(torch.isfinite(loc).all()) or not bool((torch.isfinite(scale) & (scale > 0)).all()):
            raise ValueError("Standardize: loc must be finite and scale finite and positive")
        super().__init__(loc.shape[0])
        self.register_buffer("loc", loc.detach().clone())
        self.register_buffer("scale", scale.detach().clone())

    def call_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loc + self.scale * x, torch.log(self.scale).sum().expand(x.shape[:-1])

    def inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (y - self.loc) / self.scale, (-torch.log(self.scale).sum()).expand(y.shape[:-1])


def with_standardize(flow: FlowTransform | Flow, layer: Standardize) -> Flow:
    """A ``Flow`` running ``flow`` and then ``layer`` (so its density is on the data's scale).

    The layers of a ``Flow`` are shared, not copied: training one trains the other. The
    config gains ``standardize=True``, which tells ``load_flow`` to append a
    ``Standardize`` layer before it loads the arrays.

    Args:
        flow: a ``Flow`` (from ``build_flow``) or any single ``TransformModule`` with ``dim``.
        layer: the fixed affine layer to append.

    Returns:
        A new ``Flow`` whose last part is ``layer``.

    Example:
        >>> from pyroflows.torch import build_flow
        >>> flow = build_flow("realnvp", 2, num_layers=1, hidden_dims=(8,))
        >>> fitted = with_standardize(flow, Standardize(torch.zeros(2), torch.ones(2)))
        >>> len(fitted.parts) == len(flow.parts) + 1, fitted.config["standardize"]
        (True, True)
    """
    if isinstance(flow, Flow):
        config = dict(flow.config, standardize=True) if flow.config else {}
        return flow.with_parts(list(flow.parts) + [layer], config)
    return Flow([flow, layer], layer.dim, {})


def split_standardize(flow: Any) -> tuple[Any, Standardize | None]:
    """``(inner, layer)`` when ``flow`` is a ``Flow`` ending in a ``Standardize`` layer, else ``(flow, None)``.

    The inverse of ``with_standardize``.

    Args:
        flow: a ``Flow`` or any other flow.

    Returns:
        ``(inner, layer)``: ``inner`` is a new ``Flow`` sharing the other layers, without
        ``standardize`` in its config; or ``(flow, None)``.

    Example:
        >>> from pyroflows.torch import build_flow
        >>> flow = build_flow("realnvp", 2, num_layers=1, hidden_dims=(8,))
        >>> inner, layer = split_standardize(with_standardize(flow, Standardize(torch.zeros(2), torch.ones(2))))
        >>> list(inner.parts) == list(flow.parts), type(layer).__name__
        (True, 'Standardize')
        >>> split_standardize(flow)[1] is None
        True
    """
    if isinstance(flow, Flow) and len(flow.parts) > 1 and isinstance(flow.parts[-1], Standardize):
        config = {k: v for k, v in flow.config.items() if k != "standardize"}
        return flow.with_parts(list(flow.parts)[:-1], config), flow.parts[-1]
    return flow, None
