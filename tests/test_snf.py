"""Stochastic normalizing flows on both backends, where the test is the same: the errors
name the problem. The rest is in tests/torch/test_snf.py and tests/jax/test_snf.py."""

import pytest

from pyroflows import toys
from tests.conformance.backends import ADAPTERS


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda a: a.name)
def test_errors_name_the_problem(adapter):
    snf, pf = adapter.module("snf"), adapter.pf
    double_well = toys.log_density("double_well", adapter.name)
    with pytest.raises(ValueError, match="step_size"):
        snf.MALA(-0.1)
    with pytest.raises(ValueError, match="num_leapfrog"):
        snf.HMC(0.1, 0)
    with pytest.raises(ValueError, match="schedule"):
        snf.StochasticFlow([snf.MALA(0.1)], 2, double_well, schedule="cosine")
    with pytest.raises(ValueError, match="one value per block"):
        snf.StochasticFlow([snf.MALA(0.1)], 2, double_well, schedule=[0.5, 1.0])
    with pytest.raises(ValueError, match="neither a flow layer nor a stochastic block"):
        snf.StochasticFlow([lambda x: x], 2, double_well)
    flow = snf.StochasticFlow([adapter.transforms().ElementwiseAffine(2), snf.MALA(0.1)], 2, double_well)
    with pytest.raises(ValueError, match="own target_log_density"):
        pf.fit_reverse_kl(flow, lambda x: -(x**2).sum(-1), num_steps=1, progress=False)
    with pytest.raises(ValueError, match="stick_the_landing"):
        pf.fit_reverse_kl(flow, stick_the_landing=True, num_steps=1, progress=False)
    # a target of the wrong shape: torch's targets take a batch, JAX's one point (and its
    # draws take a key first)
    if adapter.name == "jax":
        target, key = (lambda x: x), [adapter.jax.random.key(0)]
    else:
        target, key = (lambda x: x.sum()), []
    with pytest.raises(ValueError, match="shape"):
        snf.StochasticFlow([snf.MALA(0.1)], 2, target, schedule="target").sample_and_log_weight(*key, 3)
    # a per-coordinate target (shape (n, dim), or (dim,) for JAX's one point) is named by
    # the blocks too, not only where the path's weight is scored
    flow = snf.StochasticFlow(
        [adapter.transforms().ElementwiseAffine(2), snf.MALA(0.1)], 2, lambda x: -0.5 * x**2, schedule="target"
    )
    with pytest.raises(ValueError, match=r"target_log_density must map an array of shape \(n, 2\) to shape \(n,\)"):
        pf.fit_reverse_kl(flow, num_steps=1, num_samples=8, progress=False)
