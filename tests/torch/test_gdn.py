"""GDN on torch only: what the shared tests (tests/families/test_gdn.py) cannot ask of JAX,
where a failed solve gives NaN under jit rather than an exception."""

import numpy as np
import pytest
import torch

from pyroflows.torch.transforms import GDN


def test_dense_solver_reports_failure_clearly():
    torch.manual_seed(0)
    layer = GDN(2, "dense").double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.5 * torch.randn_like(p))
    with pytest.raises(RuntimeError, match="Newton"):
        layer.call_and_ladj(torch.tensor([[float("nan"), 1.0]], dtype=torch.float64))
    assert np.isfinite(layer.call_and_ladj(torch.tensor([[0.5, 1.0]], dtype=torch.float64))[0].detach().numpy()).all()
