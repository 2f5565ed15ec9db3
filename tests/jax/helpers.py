"""Helpers and small layers shared by the JAX tests (tests/jax and the backend-neutral tests)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import pyroflows.jax as pf
from pyroflows.jax.transforms.base import Flow, FlowTransform, astype


def perturbed(layer, scale=0.5, seed=0):
    """``layer`` in float64 with every float array moved by ``scale`` * N(0, 1)."""
    rng = np.random.default_rng(seed)
    params, static = eqx.partition(astype(layer, jnp.float64), eqx.is_inexact_array)
    params = jax.tree.map(lambda a: a + scale * rng.standard_normal(a.shape), params)
    return eqx.combine(params, static)


class RawScale(FlowTransform):
    """y = scale * x with log|det| = sum(log scale), unclamped: NaN once a scale turns negative."""

    scale: jax.Array

    def __init__(self, scale):
        self.dim = 2
        self.scale = jnp.full(2, float(scale))

    def call_and_ladj(self, x):
        return self.scale * x, jnp.sum(jnp.log(self.scale))

    def inverse_and_ladj(self, y):
        return y / self.scale, -jnp.sum(jnp.log(self.scale))


class Sentinel(FlowTransform):
    """The identity, whose log-det is NaN at points whose first coordinate exceeds 100."""

    def __init__(self, dim):
        self.dim = dim

    def call_and_ladj(self, x):
        return x, jnp.where(x[0] > 100, jnp.nan, 0.0)

    def inverse_and_ladj(self, y):
        return y, jnp.where(y[0] > 100, jnp.nan, 0.0)


def sentinel_flow():
    maf = pf.build_flow("maf", 2, num_layers=1, hidden_dims=(8,), key=jax.random.key(0))
    return Flow(tuple(maf.parts) + (Sentinel(2),), 2)


def uses_activation(layer, name):
    """Whether ``layer``'s MADE applies the activation ``name`` after its first layer."""
    return layer.made.net[1].name == name
