"""FFJORD (CNF) on torch only: the fixed-step solvers are torchdiffeq's (the JAX backend
runs the same tableaux, ``pyroflows.ode.TABLEAUX``). Everything else is checked on both
backends in tests/families/test_ffjord.py."""

import numpy as np
import pytest
import torch
from torchdiffeq import odeint

from pyroflows.ode import TABLEAUX


@pytest.mark.parametrize("solver", sorted(TABLEAUX))
def test_fixed_step_solvers_use_torchdiffeqs_tableaux(solver):
    """One step of torchdiffeq's method equals the tableau that the JAX backend runs."""
    a, b, c = TABLEAUX[solver]

    def f(t, y):
        return torch.sin(3 * y) * (1 + t) + y**2

    y0, h = torch.tensor([0.3, -0.7], dtype=torch.float64), 0.4
    ks = []
    for i, ci in enumerate(c):
        yi = y0 + h * sum(w * k for w, k in zip(a[i - 1], ks)) if i else y0
        ks.append(f(torch.tensor(ci * h, dtype=torch.float64), yi))
    expected = y0 + h * sum(w * k for w, k in zip(b, ks))
    got = odeint(f, y0, torch.tensor([0.0, h], dtype=torch.float64), method=solver)[-1]
    np.testing.assert_allclose(got, expected, atol=1e-15)
