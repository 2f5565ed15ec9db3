"""A fixed per-coordinate affine layer: how ``fit_mle(standardize=True)`` folds the data's
z-scoring into the flow it returns (mirrored in ``pyroflows.jax.standardize``).

``Standardize(loc, scale)`` maps ``z`` to ``x = loc + scale * z`` (log-det
``sum(log scale)``). ``loc`` and ``scale`` are buffers, not parameters, so no optimiser
moves them, and they are saved in the state dict as ``<index>.loc`` and ``<index>.scale``.
"""

from __future__ import annotations

import torch

from .transforms.base import Flow, FlowTransform

__all__ = ["Standardize", "with_standardize", "split_standardize"]


class Standardize(FlowTransform):
    """``x = loc + scale * z`` per coordinate, with fixed ``loc`` and ``scale > 0``.

    Args:
        loc: the per-coordinate shift, shape ``(dim,)`` (the data's mean).
        scale: the per-coordinate scale, shape ``(dim,)``, positive (the data's sd).
    """

    def __init__(self, loc, scale):
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

    def call_and_ladj(self, x):
        return self.loc + self.scale * x, torch.log(self.scale).sum().expand(x.shape[:-1])

    def inverse_and_ladj(self, y):
        return (y - self.loc) / self.scale, (-torch.log(self.scale).sum()).expand(y.shape[:-1])


def with_standardize(flow, layer: Standardize) -> Flow:
    """A ``Flow`` running ``flow`` and then ``layer`` (so its density is on the data's scale).

    The layers of a ``Flow`` are shared, not copied: training one trains the other. The
    config gains ``standardize=True``, which tells ``load_flow`` to append a
    ``Standardize`` layer before it loads the arrays.

    Args:
        flow: a ``Flow`` (from ``build_flow``) or any single ``TransformModule`` with ``dim``.
        layer: the fixed affine layer to append.

    Returns:
        A new ``Flow`` whose last part is ``layer``.
    """
    if isinstance(flow, Flow):
        config = dict(flow.config, standardize=True) if flow.config else {}
        return Flow(list(flow.parts) + [layer], layer.dim, config)
    return Flow([flow, layer], layer.dim, {})


def split_standardize(flow):
    """``(inner, layer)`` when ``flow`` is a ``Flow`` ending in a ``Standardize`` layer, else ``(flow, None)``.

    ``inner`` is a new ``Flow`` sharing the other layers, without ``standardize`` in its config.
    """
    if isinstance(flow, Flow) and len(flow.parts) > 1 and isinstance(flow.parts[-1], Standardize):
        config = {k: v for k, v in flow.config.items() if k != "standardize"}
        return Flow(list(flow.parts)[:-1], flow.dim, config), flow.parts[-1]
    return flow, None
