"""Residual flows on torch only: the noise of the stochastic series comes from torch's
global generator, a Lipschitz bound that holds after torch's optimiser pushes the raw
weights past it, and a roulette flow inside Pyro. The references (numpy, LAPACK, autodiff,
Monte Carlo) run on both backends in tests/families/test_residual.py."""

import math

import pytest
import torch

import pyroflows.torch as pf
from pyroflows.torch.transforms import ResidualBlock
from tests.residual_cases import strong_weights


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _strong_block(dim=3, seed=0, **options):
    """A block with J_g close to 0.45 times a rotation (``tests.residual_cases.strong_weights``)."""
    block = ResidualBlock(dim, (8, 8), lipschitz=0.85, **options).double()
    weights, biases = strong_weights(dim, seed)
    with torch.no_grad():
        for layer, w, b in zip(block.g.net[0::2], weights, biases):
            layer.weight.copy_(torch.as_tensor(w))
            layer.bias.copy_(torch.as_tensor(b))
    return block


def _autodiff_jacobian(block, y):
    return torch.autograd.functional.jacobian(lambda v: block.inverse_and_ladj(v)[0], y)


def test_noise_comes_from_the_global_generator():
    block = _strong_block(3)
    ys = torch.randn(5, 3)
    torch.manual_seed(7)
    a = block.inverse_and_ladj(ys)[1]
    torch.manual_seed(7)
    b = block.inverse_and_ladj(ys)[1]
    c = block.inverse_and_ladj(ys)[1]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_lipschitz_bound_holds_after_training_pushes_it():
    torch.manual_seed(4)
    dim, coeff = 3, 0.9
    block = ResidualBlock(dim, (16, 16), estimator="exact", lipschitz=coeff).double()
    with torch.no_grad():  # off the zero output layer, where this objective has zero gradient
        block.g.net[4].weight.normal_(0.0, 0.1)
    opt = torch.optim.Adam(block.parameters(), lr=0.2)
    pts = torch.randn(64, dim)

    def stretch():  # mean squared Jacobian-vector product: maximising it raises Lip(g)
        weights = block.g.weights()
        _, slopes = block.g.forward_and_slopes(pts, weights)
        v = torch.nn.functional.normalize(torch.randn(64, dim), dim=-1)
        return block.g.jvp(weights, slopes, v).square().sum(-1).mean()

    for _ in range(40):
        opt.zero_grad()
        (-stretch()).backward()
        opt.step()
    n = block.g.net[2].power_iterations
    for layer in block.g.net[0::2]:
        with torch.no_grad():
            raw = float(torch.linalg.matrix_norm(layer.weight, 2))
            normalised = float(torch.linalg.matrix_norm(layer.normalized_weight(), 2))
        m = min(layer.weight.shape)
        assert raw > coeff  # training pushed past the bound ...
        assert normalised <= coeff * (1 + (m - 1) / (2 * math.e * n))  # ... and the layer stays within it
    lips = [
        float(torch.linalg.matrix_norm(_autodiff_jacobian(block, p) - torch.eye(dim), 2))
        for p in 2 * torch.randn(50, dim)
    ]
    assert max(lips) < coeff
    assert max(lips) > 0.3  # the push worked: the bound is not met trivially


def test_roulette_flow_scores_and_trains_inside_pyro():
    import pyro.distributions as dist

    torch.manual_seed(5)
    flow = pf.build_flow("residual", 2, num_layers=2, hidden_dims=(8,))
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    d = dist.TransformedDistribution(base, [flow])
    data = torch.randn(64, 2) * torch.tensor([2.0, 0.5]) + 1.0
    opt = torch.optim.Adam(flow.parameters(), lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        loss = -d.log_prob(data).mean()
        loss.backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in flow.parameters())
    x = d.rsample((16,))
    lp = d.log_prob(x)
    lp.mean().backward()
    assert torch.all(torch.isfinite(lp))
