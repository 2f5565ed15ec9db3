"""The density of ``N(0, I)`` pushed through a flow: the low-level helpers that
``pyroflows.jax.train``, ``pyroflows.jax.snf`` and ``Flow`` share.

For a bijection ``f`` from base noise ``u ~ N(0, I)`` to samples ``x = f(u)``,

    log q(x) = log N(f^{-1}(x); 0, I) + log|det d f^{-1}(x) / dx|

(Papamakarios et al. 2021, "Normalizing flows for probabilistic modeling and
inference", arXiv:1912.02762, section 2.1). ``pyroflows.jax.train`` (the fitting
loops), ``pyroflows.jax.snf`` (stochastic normalizing flows) and ``Flow`` import from
here, and this module imports none of them, so train and snf never import each other
(mirrors ``pyroflows.torch.density``). It works on anything with ``dim`` and
``to_transform`` (every ``FlowTransform``) by duck typing, and holds:

- ``std_normal_log_prob``: ``log N(u; 0, I)``; ``result_float_dtype``: a module's dtype;
- ``forward_and_ladj`` and ``inverse_and_ladj``: a layer's map on a batch, with its
  log-determinant;
- ``pushforward_log_prob`` and ``pushforward_sample_and_log_prob``: ``log q`` of a
  point, and draws with their ``log q``;
- ``TransformFlow`` and ``as_trainable``: the ``pyroflows.protocols.TrainableFlow``
  protocol for a layer that lacks it (a lone ``FlowTransform``), so the training loops
  never test a flow's type;
- ``keyed_log_prob`` and ``log_prob_stop_gradient``: a protocol ``log_prob`` with an
  explicit key, and with the weights held fixed (sticking the landing).

References:
    Papamakarios, Nalisnick, Rezende, Mohamed & Lakshminarayanan 2021,
    arXiv:1912.02762.
    Roeder, Wu & Duvenaud 2017, "Sticking the landing: simple, lower-variance gradient
    estimators for variational inference", arXiv:1703.09194.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from numpyro import handlers

from ..protocols import TrainableFlow

__all__ = [
    "std_normal_log_prob",
    "result_float_dtype",
    "forward_and_ladj",
    "inverse_and_ladj",
    "pushforward_log_prob",
    "pushforward_sample_and_log_prob",
    "TransformFlow",
    "as_trainable",
    "keyed_log_prob",
    "log_prob_stop_gradient",
]


def std_normal_log_prob(u: jax.Array) -> jax.Array:
    """``log N(u; 0, I)`` over the last axis.

    Args:
        u: an array of shape ``(..., dim)``.

    Returns:
        The log-density, shape ``(...)``, in ``u``'s dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> round(float(std_normal_log_prob(jnp.zeros(2))), 4)
        -1.8379
    """
    u = jnp.asarray(u)
    return -0.5 * jnp.sum(u**2, -1) - 0.5 * u.shape[-1] * jnp.log(2 * jnp.pi).astype(u.dtype)


def result_float_dtype(module: Any) -> jnp.dtype:
    """The dtype that a module's floating-point arrays promote to together.

    Args:
        module: any pytree (a layer, a flow, a ``StochasticFlow``, their parameters).

    Returns:
        ``jnp.result_type`` of its inexact arrays, or JAX's default float dtype when it
        has none.

    Example:
        >>> import jax.numpy as jnp
        >>> str(result_float_dtype({"w": jnp.zeros(2, jnp.float32), "n": jnp.arange(3)}))
        'float32'
    """
    leaves = [a for a in jax.tree.leaves(module) if eqx.is_inexact_array(a)]
    return jnp.result_type(*leaves) if leaves else jnp.result_type(float)


def _transform(flow, key, context):
    return flow.to_transform(key=key) if context is None else flow.to_transform(key=key, context=context)


def forward_and_ladj(
    flow: Any, u: jax.Array, key: jax.Array | None = None, context: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """The flow's forward map on a batch, with its log-determinant.

    Args:
        flow: a ``FlowTransform`` (a layer or a ``Flow``).
        u: base points, shape ``(..., dim)``.
        key: feeds layers whose log-det is a random estimate; without it they take
            ``numpyro.prng_key()`` (inside ``numpyro.handlers.seed``) or raise.
        context: the context of a ``ConditionalFlow``, shape ``(..., context_dim)``.

    Returns:
        ``(x, log|det dx/du|)`` with shapes ``(..., dim)`` and ``(...)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from pyroflows.jax.transforms import ElementwiseAffine
        >>> x, ladj = forward_and_ladj(ElementwiseAffine(2), jnp.ones((3, 2)))
        >>> x.shape, ladj.shape
        ((3, 2), (3,))
    """
    return _transform(flow, key, context).call_with_intermediates(u)


def inverse_and_ladj(
    flow: Any, x: jax.Array, key: jax.Array | None = None, context: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """The flow's inverse map on a batch of points ``x`` ``(..., dim)``: ``(u, log|det du/dx|)``.

    The arguments are those of ``forward_and_ladj``.

    Example:
        >>> import jax.numpy as jnp
        >>> from pyroflows.jax.transforms import ElementwiseAffine
        >>> u, ildj = inverse_and_ladj(ElementwiseAffine(2), jnp.ones((3, 2)))
        >>> u.shape, ildj.shape
        ((3, 2), (3,))
    """
    return _transform(flow, key, context).inverse_and_ladj(x)


def pushforward_log_prob(
    flow: Any, x: jax.Array, key: jax.Array | None = None, context: jax.Array | None = None
) -> jax.Array:
    """``log q(x)`` for ``q`` = ``N(0, I)`` pushed forward through ``flow`` (one inverse pass).

    Args:
        flow: a ``FlowTransform`` (a layer or a ``Flow``).
        x: points of shape ``(..., dim)``.
        key: as in ``forward_and_ladj``.

    Returns:
        ``log q(x)``, shape ``(...)``.

    Example:
        >>> import jax.numpy as jnp
        >>> from pyroflows.jax.transforms import ElementwiseAffine
        >>> round(float(pushforward_log_prob(ElementwiseAffine(2), jnp.zeros(2))), 4)
        -1.8379
    """
    u, ildj = inverse_and_ladj(flow, x, key, context)
    return std_normal_log_prob(u) + ildj


def pushforward_sample_and_log_prob(
    flow: Any, num_samples: int, key: jax.Array, context: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Draws ``x = flow(u)``, ``u ~ N(0, I)``, and their ``log q(x)`` from the forward pass alone.

    ``log q(x) = log N(u; 0, I) - log|det dx/du|``, differentiable in the flow's weights
    (the reparametrisation gradient). The key is split once: the first half draws ``u``,
    the second feeds layers with a random log-det estimate.

    Args:
        flow: a ``FlowTransform`` (a layer or a ``Flow``).
        num_samples: how many draws.
        key: a JAX PRNG key.

    Returns:
        ``(x, log_q)`` with shapes ``(num_samples, dim)`` and ``(num_samples,)``, in the
        flow's float dtype.

    Example:
        >>> import jax
        >>> from pyroflows.jax.transforms import ElementwiseAffine
        >>> x, log_q = pushforward_sample_and_log_prob(ElementwiseAffine(2), 4, jax.random.key(0))
        >>> x.shape, log_q.shape
        ((4, 2), (4,))
    """
    noise_key, flow_key = jax.random.split(key)
    eps = jax.random.normal(noise_key, (num_samples, flow.dim), result_float_dtype(flow))
    x, ladj = forward_and_ladj(flow, eps, flow_key, context)
    return x, std_normal_log_prob(eps) - ladj


class TransformFlow(eqx.Module):
    """``N(0, I)`` pushed forward through a lone layer, as a ``TrainableFlow``.

    The adapter that lets ``fit_mle`` and ``fit_reverse_kl`` train a layer that does not
    implement ``pyroflows.protocols.TrainableFlow`` itself (any ``FlowTransform``, a
    user's own included). The layer is its only array-holding field, so the fits train
    its weights and hand back ``adapter.transform``.

    Args:
        transform: a ``FlowTransform`` (anything with ``dim`` and ``to_transform``).

    Attributes:
        transform: the wrapped layer.
        dim: its event size.
        standardizable: always True: a fixed affine layer may follow the layer.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from pyroflows.jax.transforms import ElementwiseAffine
        >>> flow = TransformFlow(ElementwiseAffine(2))
        >>> flow.log_prob(jnp.zeros((3, 2))).shape
        (3,)
        >>> x, log_q = flow.sample_and_log_prob(4, jax.random.key(0))
        >>> x.shape, log_q.shape
        ((4, 2), (4,))
    """

    transform: Any
    dim: int = eqx.field(static=True)
    standardizable: ClassVar[bool] = True

    def __init__(self, transform: Any):
        self.transform = transform
        self.dim = int(transform.dim)

    def log_prob(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """``pushforward_log_prob`` of the layer: ``log q(x)``, shape ``(...)``; ``key`` as there."""
        return pushforward_log_prob(self.transform, x, key)

    def sample_and_log_prob(self, num_samples: int, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``pushforward_sample_and_log_prob`` of the layer: ``num_samples`` draws and their ``log q``."""
        return pushforward_sample_and_log_prob(self.transform, num_samples, key)

    def fit_target(
        self, log_density: Callable[[jax.Array], jax.Array] | None, stick_the_landing: bool
    ) -> Callable[[jax.Array], jax.Array] | None:
        """The user's ``log_density`` unchanged: a pushforward density fits any target.

        Example:
            >>> from pyroflows.jax.transforms import ElementwiseAffine
            >>> target = lambda x: -(x**2).sum(-1)
            >>> TransformFlow(ElementwiseAffine(2)).fit_target(target, True) is target
            True
        """
        return log_density


def as_trainable(flow: Any) -> TrainableFlow:
    """``flow`` itself when it implements ``TrainableFlow``, else ``TransformFlow(flow)``.

    A structural check (the protocol's members), never a test of the flow's class.

    Args:
        flow: a ``Flow``, a ``StochasticFlow``, any other object with the protocol's
            members, or a lone ``FlowTransform`` layer.

    Returns:
        An object with ``dim``, ``standardizable``, ``log_prob``, ``sample_and_log_prob``
        and ``fit_target``.

    Example:
        >>> import jax, pyroflows.jax as pf
        >>> from pyroflows.jax.transforms import ElementwiseAffine
        >>> flow = pf.build_flow("householder", 2, key=jax.random.key(0))
        >>> as_trainable(flow) is flow
        True
        >>> type(as_trainable(ElementwiseAffine(2))).__name__
        'TransformFlow'
    """
    return flow if isinstance(flow, TrainableFlow) else TransformFlow(flow)


def keyed_log_prob(
    flow: TrainableFlow, x: jax.Array, key: jax.Array | None = None, context: jax.Array | None = None
) -> jax.Array:
    """``flow.log_prob(x)`` with ``key`` feeding the noise its layers draw.

    The protocol's ``log_prob`` takes no key; a JAX flow that draws noise takes it from
    ``numpyro.prng_key()``, which ``numpyro.handlers.seed(rng_seed=key)`` supplies here
    (an outer seed handler does when ``key`` is None). Pure in the flow's arrays and the
    key, so it traces under ``jit``.

    Args:
        flow: a ``TrainableFlow``.
        x: points of shape ``(..., dim)``.
        key: a JAX PRNG key, or None.
        context: the contexts of a conditional flow (``flow.log_prob(x, context)``), or None.

    Returns:
        ``flow.log_prob(x)``, shape ``(...)``.

    Example:
        >>> import jax, jax.numpy as jnp, pyroflows.jax as pf
        >>> flow = pf.build_flow("householder", 2, key=jax.random.key(0))
        >>> keyed_log_prob(flow, jnp.zeros((3, 2)), jax.random.key(1)).shape
        (3,)
    """
    args = (x,) if context is None else (x, context)
    if key is None:
        return flow.log_prob(*args)
    with handlers.seed(rng_seed=key):
        return flow.log_prob(*args)


def log_prob_stop_gradient(flow: Any, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """``log q(x)`` with the flow's weights held fixed: gradients reach ``x`` only.

    The path-derivative ("sticking the landing") estimator scores a reparametrised
    sample this way (Roeder, Wu & Duvenaud 2017).

    Args:
        flow: a ``TrainableFlow`` or a lone ``FlowTransform`` (wrapped by ``as_trainable``).
        x: points of shape ``(..., dim)``.
        key: as in ``keyed_log_prob``.

    Returns:
        ``log q(x)``, shape ``(...)``, with no gradient to the flow's weights.

    References:
        Roeder, Wu & Duvenaud 2017, "Sticking the landing: simple, lower-variance
        gradient estimators for variational inference", arXiv:1703.09194.

    Example:
        >>> import jax, jax.numpy as jnp, pyroflows.jax as pf
        >>> flow = pf.build_flow("householder", 2, key=jax.random.key(0))
        >>> g = jax.grad(lambda f: log_prob_stop_gradient(f, jnp.ones((1, 2))).sum())(flow)
        >>> float(sum(abs(a).sum() for a in jax.tree.leaves(g)))
        0.0
    """
    return keyed_log_prob(jax.lax.stop_gradient(as_trainable(flow)), x, key)
