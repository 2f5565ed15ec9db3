"""Save and load torch flows in the backend-neutral format of ``pyroflows.checkpoint``."""

from __future__ import annotations

import os

import numpy as np
import torch

from .. import checkpoint
from .flows import build_flow
from .standardize import Standardize, with_standardize

__all__ = ["save_flow", "load_flow"]


def save_flow(flow, path: str | os.PathLike) -> None:
    """Write ``flow`` (from ``build_flow``) to ``path``: its config as JSON, its state dict as arrays.

    The file is the backend-neutral ``.npz`` of ``pyroflows.checkpoint``: either backend's
    ``load_flow`` reads it.

    Args:
        flow: a flow made by ``build_flow`` (it records how to rebuild it).
        path: the file to write, used as given (conventionally ``*.npz``).

    Raises:
        ValueError: ``flow`` was not made by ``build_flow`` (it has no config to rebuild it from).

    Example:
        >>> import os, tempfile
        >>> flow = build_flow("maf", 2, num_layers=1, hidden_dims=(4,))
        >>> path = os.path.join(tempfile.mkdtemp(), "flow.npz")
        >>> save_flow(flow, path)
        >>> load_flow(path).config == flow.config
        True
    """
    config = getattr(flow, "config", None)
    if not config:
        raise ValueError("save_flow needs a flow made by build_flow (it records how to rebuild it)")
    arrays = {k: v.detach().cpu().numpy() for k, v in flow.state_dict().items()}
    checkpoint.write(path, config, arrays, backend="torch")


def load_flow(path: str | os.PathLike, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Rebuild the flow saved at ``path`` (by either backend) with its exact weights.

    Args:
        path: a file written by ``save_flow`` of either backend.
        dtype: the torch dtype of the rebuilt flow; defaults to the dtype the weights
            were saved in.

    Returns:
        The flow, as ``build_flow`` makes it, holding the saved weights; a flow saved
        from ``fit_mle(standardize=True)`` ends in its ``Standardize`` layer again.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a pyroflows flow file, is damaged, holds non-finite
            weights, or does not match the flow its config builds (the message says
            which, and what to do).

    Example:
        >>> import os, tempfile
        >>> flow = build_flow("maf", 2, num_layers=1, hidden_dims=(4,))
        >>> path = os.path.join(tempfile.mkdtemp(), "flow.npz")
        >>> save_flow(flow, path)
        >>> loaded = load_flow(path, dtype=torch.float64)
        >>> sorted({str(v.dtype) for v in loaded.state_dict().values()})
        ['torch.float64']
        >>> all(torch.equal(a.double(), b) for a, b in zip(flow.state_dict().values(), loaded.state_dict().values()))
        True
    """
    config, arrays, _ = checkpoint.read(path)
    name, dim, kwargs = checkpoint.rebuild_arguments(config)
    try:
        flow = build_flow(name, dim, **kwargs)
    except (ValueError, TypeError, KeyError) as e:
        raise checkpoint.build_error(path, config, "torch", e) from None
    if checkpoint.is_standardized(config):
        flow = with_standardize(flow, Standardize(torch.zeros(dim), torch.ones(dim)))
    dtype = dtype or getattr(torch, checkpoint.float_dtype(arrays).name)
    flow = flow.to(dtype)
    state = flow.state_dict()
    expected = {k: (tuple(v.shape), np.dtype(str(v.dtype).replace("torch.", ""))) for k, v in state.items()}
    arrays = checkpoint.match_arrays(expected, arrays, path)
    flow.load_state_dict({k: torch.as_tensor(a).to(state[k].dtype) for k, a in arrays.items()})
    return flow
