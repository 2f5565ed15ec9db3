"""Save and load torch flows in the backend-neutral format of ``pyroflows.checkpoint``."""

from __future__ import annotations

import numpy as np
import torch

from .. import checkpoint
from .flows import build_flow

__all__ = ["save_flow", "load_flow"]


def save_flow(flow, path) -> None:
    """Write ``flow`` (from ``build_flow``) to ``path``: its config as JSON, its state dict as arrays."""
    config = getattr(flow, "config", None)
    if not config:
        raise ValueError("save_flow needs a flow made by build_flow (it records how to rebuild it)")
    arrays = {k: v.detach().cpu().numpy() for k, v in flow.state_dict().items()}
    checkpoint.write(path, config, arrays, backend="torch")


def load_flow(path, dtype=None):
    """Rebuild the flow saved at ``path`` (by either backend) with its exact weights.

    ``dtype`` defaults to the dtype the weights were saved in.
    """
    config, arrays, _ = checkpoint.read(path)
    name, dim, kwargs = checkpoint.rebuild_arguments(config)
    flow = build_flow(name, dim, **kwargs)
    dtype = dtype or getattr(torch, checkpoint.float_dtype(arrays).name)
    flow = flow.to(dtype)
    state = flow.state_dict()
    expected = {k: (tuple(v.shape), np.dtype(str(v.dtype).replace("torch.", ""))) for k, v in state.items()}
    arrays = checkpoint.match_arrays(expected, arrays, path)
    flow.load_state_dict({k: torch.as_tensor(a).to(state[k].dtype) for k, a in arrays.items()})
    return flow
