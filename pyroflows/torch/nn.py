"""Neural networks the flows use: MLPs (couplings), MADE (autoregressive layers), time-conditioned
and hollow ODE dynamics (ffjord), and spectral-normalised Lipschitz networks (residual).

The last layer of the MLP and MADE starts at zero, so a freshly built flow is (close to) the
identity and the guide or density it defines starts where its base distribution is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..ode import ACTIVATIONS as ODE_ACTIVATIONS
from ..ode import hollow_mask
from ..structure import made_masks

__all__ = [
    "ACTIVATIONS",
    "activation",
    "MLP",
    "MADE",
    "smooth_activation",
    "TimeMLP",
    "GroupedLinear",
    "HollowMLP",
    "spectral_norm",
    "SpectralNormLinear",
    "LipSwish",
    "LipschitzMLP",
]

#: The activations of ``MLP`` and ``MADE`` by name (``activation_name``), as module classes.
ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


def activation(name: str) -> nn.Module:
    """A fresh activation module from its name in ``ACTIVATIONS``.

    Args:
        name: one of ``"relu"``, ``"tanh"``, ``"elu"``, ``"leaky_relu"``, ``"gelu"``, ``"silu"``.

    Returns:
        The ``torch.nn`` module, e.g. ``nn.Tanh()``.

    Raises:
        ValueError: ``name`` is not a key of ``ACTIVATIONS``.

    Example:
        >>> activation("tanh")
        Tanh()
    """
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}") from None


def _uniform_init(weight: torch.Tensor, fan_in: int) -> None:
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    with torch.no_grad():
        weight.uniform_(-bound, bound)


class MaskedLinear(nn.Module):
    """A linear layer ``x @ (W * mask).T + b`` whose mask removes connections.

    ``W`` has shape ``(out, in)`` and starts uniform in ``+-1/sqrt(fan_in)``, where
    ``fan_in`` is the largest number of inputs a masked row keeps (the bias likewise);
    ``zero=True`` starts both at zero instead (the output layer of ``MLP`` and ``MADE``).
    Without a mask it is a plain linear layer.

    Args:
        in_features: input size.
        out_features: output size.
        mask: an ``(out, in)`` 0/1 tensor, kept as a buffer; ``None`` keeps every weight.
        zero: start the weight and the bias at zero.

    Example:
        >>> layer = MaskedLinear(2, 2, mask=torch.eye(2), zero=True)
        >>> _ = torch.nn.init.ones_(layer.weight)
        >>> layer(torch.tensor([[2.0, 3.0]])).tolist()  # the mask keeps the diagonal only
        [[2.0, 3.0]]
    """

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor | None = None, zero: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        if mask is None:
            self.mask = None
            fan_in = in_features
        else:
            self.register_buffer("mask", mask.to(self.weight.dtype))
            fan_in = int(mask.sum(-1).max().item()) if mask.numel() else 0
        if not zero:
            _uniform_init(self.weight, fan_in)
            _uniform_init(self.bias, fan_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ (W * mask).T + b`` for ``x`` of shape ``(..., in_features)``.

        Example:
            >>> MaskedLinear(3, 2, zero=True)(torch.ones(4, 3)).shape
            torch.Size([4, 2])
        """
        w = self.weight if self.mask is None else self.weight * self.mask
        return nn.functional.linear(x, w, self.bias)


class MLP(nn.Module):
    """A fully connected network whose output layer starts at zero.

    ``net`` is an ``nn.Sequential`` of ``MaskedLinear`` layers (without masks) with an
    activation after each hidden one. Because the last layer is zero, a fresh network
    outputs zeros, so a coupling layer built on it starts at its transformer's identity.
    ``in_features`` may be 0 (a coupling on a 1-D input conditions on nothing): the
    network is then a learned constant.

    Args:
        in_features: input size (0 allowed).
        hidden_dims: widths of the hidden layers.
        out_features: output size.
        activation_name: a key of ``ACTIVATIONS``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = MLP(2, [8], 3)
        >>> out = net(torch.ones(4, 2))
        >>> tuple(out.shape), bool((out == 0).all())  # the zero output layer
        ((4, 3), True)
    """

    def __init__(self, in_features: int, hidden_dims: Sequence[int], out_features: int, activation_name: str = "relu"):
        super().__init__()
        sizes = [in_features, *hidden_dims]
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [MaskedLinear(a, b), activation(activation_name)]
        layers.append(MaskedLinear(sizes[-1], out_features, zero=True))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The network on ``x`` of shape ``(..., in_features)``: shape ``(..., out_features)``.

        Example:
            >>> MLP(0, [4], 2)(torch.zeros(3, 0)).shape  # no inputs: a learned constant
            torch.Size([3, 2])
        """
        return self.net(x)


class MADE(nn.Module):
    """Masked autoencoder for distribution estimation: the autoregressive conditioner.

    Maps ``(..., dim)`` to ``(..., dim, num_params)``: the parameters of coordinate i
    depend only on coordinates ``< i`` (in the natural order; flows permute between
    layers instead). The masks come from ``pyroflows.structure.made_masks``; the output
    layer starts at zero.

    Args:
        dim: the number of coordinates.
        hidden_dims: widths of the hidden layers.
        num_params: outputs per coordinate.
        activation_name: a key of ``ACTIVATIONS``.
        context_dim: the size of a context that every output may read (a conditional
            flow's), appended to the input.

    References:
        Germain, Gregor, Murray & Larochelle 2015, "MADE: Masked Autoencoder for
        Distribution Estimation", arXiv:1502.03509.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> made = MADE(3, [8], 2)
        >>> _ = torch.nn.init.normal_(made.net[-1].weight)  # leave the zero start
        >>> jac = torch.autograd.functional.jacobian(lambda x: made(x)[:, 0], torch.randn(3))
        >>> bool((torch.triu(jac) == 0).all())  # output i reads inputs < i only
        True
    """

    def __init__(
        self, dim: int, hidden_dims: Sequence[int], num_params: int, activation_name: str = "relu", context_dim: int = 0
    ):
        super().__init__()
        self.dim, self.num_params = dim, num_params
        masks = made_masks(dim, hidden_dims, num_params, context_dim)
        masks = [torch.as_tensor(m, dtype=torch.get_default_dtype()) for m in masks]
        layers = []
        for mask in masks[:-1]:
            layers += [MaskedLinear(mask.shape[1], mask.shape[0], mask), activation(activation_name)]
        layers.append(MaskedLinear(masks[-1].shape[1], masks[-1].shape[0], masks[-1], zero=True))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The parameters ``(..., dim, num_params)`` for inputs ``(..., dim)`` (and a context ``(..., context_dim)``).

        Example:
            >>> MADE(3, [8], 2)(torch.zeros(5, 3)).shape
            torch.Size([5, 3, 2])
        """
        out = self.net(x if context is None else torch.cat([x, context], -1))
        return out.reshape(*out.shape[:-1], self.dim, self.num_params)


# --------------------------------------------------------------------------- ODE dynamics (ffjord)
def smooth_activation(name: str, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An activation of CNF dynamics and its derivative, ``(sigma(a), sigma'(a))``.

    The dynamics propagate Jacobian-vector products in forward mode next to the values,
    which needs ``sigma'``. softplus is written as ``max(a, 0) + log1p(exp(-|a|))`` (no
    overflow, no threshold switch).

    Args:
        name: ``"tanh"``, ``"softplus"`` or ``"silu"`` (``pyroflows.ode.ACTIVATIONS``).
        a: pre-activations, any shape.

    Returns:
        ``(sigma(a), sigma'(a))``, each shaped like ``a``.

    Raises:
        ValueError: ``name`` is not one of the smooth activations.

    Example:
        >>> value, slope = smooth_activation("tanh", torch.zeros(2))
        >>> value.tolist(), slope.tolist()
        ([0.0, 0.0], [1.0, 1.0])
    """
    if name == "tanh":
        h = torch.tanh(a)
        return h, 1.0 - h * h
    s = torch.sigmoid(a)
    if name == "softplus":
        return a.clamp_min(0.0) + torch.log1p(torch.exp(-a.abs())), s
    if name == "silu":
        return a * s, s * (1.0 + a * (1.0 - s))
    raise ValueError(f"unknown activation {name!r} for ODE dynamics; valid: {list(ODE_ACTIVATIONS)}")


class TimeMLP(nn.Module):
    """Time-conditioned dynamics ``f(x, t)``: an MLP that reads ``t`` beside its input at every layer.

    Each layer sees ``[h, t]`` (one extra input column). Tangents are pushed through
    the same layers, so the Jacobian-vector products a trace estimator needs come out
    of the forward pass with no second backward pass. The output layer starts at zero:
    a fresh CNF is the identity.

    Args:
        dim: the state size.
        hidden_dims: widths of the hidden layers.
        activation_name: a smooth activation (see ``smooth_activation``).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> f = TimeMLP(2, [8])
        >>> value, jv = f(torch.tensor(0.5), torch.ones(4, 2), torch.eye(2).expand(4, 2, 2))
        >>> tuple(value.shape), tuple(jv.shape)
        ((4, 2), (4, 2, 2))
    """

    def __init__(self, dim: int, hidden_dims: Sequence[int], activation_name: str = "tanh"):
        super().__init__()
        sizes = [dim, *hidden_dims, dim]
        last = len(sizes) - 2
        self.layers = nn.ModuleList(
            MaskedLinear(a + 1, b, zero=i == last) for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
        )
        self.activation_name = activation_name

    def forward(
        self, t: torch.Tensor, x: torch.Tensor, tangents: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``f(x, t)`` and the products ``J v_j`` of its Jacobian in ``x`` with the tangents.

        Args:
            t: the time, a scalar tensor.
            x: states, shape ``(..., dim)``.
            tangents: ``k`` tangent vectors per state, shape ``(..., k, dim)``, or ``None``.

        Returns:
            ``(f, JV)``: ``f`` shaped like ``x``; ``JV`` shaped like ``tangents`` (``None``
            without them).

        Example:
            >>> value, jv = TimeMLP(2, [4])(torch.tensor(0.0), torch.zeros(2))
            >>> value.tolist(), jv is None  # a fresh network is zero
            ([0.0, 0.0], True)
        """
        h, v = x, tangents
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            a = layer(torch.cat([h, t.expand(h.shape[:-1] + (1,))], -1))
            if v is not None:
                v = v @ layer.weight[:, :-1].T  # the time column carries no tangent
            if i < last:
                h, slope = smooth_activation(self.activation_name, a)
                v = None if v is None else v * slope.unsqueeze(-2)
            else:
                h = a
        return h, v


class GroupedLinear(nn.Module):
    """``groups`` independent linear maps: ``out[..., g, :] = W[g] @ in[..., g, :] + b[g]``.

    With ``shared_input=True`` every group reads the same vector ``in[..., :]``; ``mask``
    then removes inputs per group (``HollowMLP`` hides coordinate g from group g this
    way). Weights and biases start uniform in ``+-1/sqrt(fan_in)``.

    Args:
        groups: the number of maps.
        in_features: input size of each map.
        out_features: output size of each map.
        mask: a ``(groups, out, in)`` 0/1 array, or ``None``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> layer = GroupedLinear(3, 2, 4)
        >>> layer(torch.ones(5, 3, 2)).shape, layer(torch.ones(5, 2), shared_input=True).shape
        (torch.Size([5, 3, 4]), torch.Size([5, 3, 4]))
    """

    def __init__(self, groups: int, in_features: int, out_features: int, mask: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(groups, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(groups, out_features))
        if mask is None:
            self.mask = None
            fan_in = in_features
        else:
            self.register_buffer("mask", torch.as_tensor(mask).to(self.weight.dtype))
            fan_in = int(self.mask.sum(-1).max().item())
        _uniform_init(self.weight, fan_in)
        _uniform_init(self.bias, fan_in)

    def masked_weight(self) -> torch.Tensor:
        """The weights ``(groups, out, in)`` with the mask applied.

        Example:
            >>> layer = GroupedLinear(2, 2, 1, mask=torch.tensor([[[0, 1]], [[1, 0]]]))
            >>> (layer.masked_weight() == 0).tolist()
            [[[True, False]], [[False, True]]]
        """
        return self.weight if self.mask is None else self.weight * self.mask

    def forward(self, x: torch.Tensor, shared_input: bool = False) -> torch.Tensor:
        """The ``groups`` maps: ``(..., groups, in)`` (or ``(..., in)`` when shared) to ``(..., groups, out)``.

        Example:
            >>> GroupedLinear(3, 2, 4)(torch.ones(2), shared_input=True).shape
            torch.Size([3, 4])
        """
        return grouped_matmul(self.masked_weight(), x, shared_input) + self.bias


def grouped_matmul(w: torch.Tensor, x: torch.Tensor, shared_input: bool) -> torch.Tensor:
    """``W[g] @ x[..., g, :]`` per group, or ``W[g] @ x[..., :]`` with ``shared_input``.

    Example:
        >>> w = torch.stack([torch.eye(2), 2 * torch.eye(2)])
        >>> grouped_matmul(w, torch.tensor([1.0, 3.0]), shared_input=True).tolist()
        [[1.0, 3.0], [2.0, 6.0]]
    """
    if shared_input:
        g, o, i = w.shape
        return (x @ w.reshape(g * o, i).T).unflatten(-1, (g, o))
    return (w @ x.unsqueeze(-1)).squeeze(-1)


class HollowMLP(nn.Module):
    """Hollow dynamics ``f_i(x, t) = tau_i(x_i, h_i)``, ``h_i = c_i(x_{-i}, t)``, with an exact divergence.

    The conditioner is ``dim`` groups of an MLP with widths ``hidden_dims``; group i's
    first layer is masked so it never reads ``x_i``, so ``d h_i / d x_i = 0``. The
    transformer is ``tau_i = sum_k w_out[i, k] sigma(w_in[i, k] x_i + h_i[k]) + b_out[i]``,
    and the divergence ``sum_i d tau_i / d x_i`` is exact at the cost of one pass.
    ``w_out`` and ``b_out`` start at zero: a fresh CNF is the identity.

    Args:
        dim: the state size.
        hidden_dims: widths of each group's conditioner layers.
        activation_name: a smooth activation (see ``smooth_activation``).

    References:
        Chen & Duvenaud 2019, "Neural Networks with Cheap Differential Operators",
        arXiv:1912.03579.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> f = HollowMLP(3, [8])
        >>> _ = torch.nn.init.normal_(f.w_out)  # leave the zero start
        >>> x, t = torch.randn(3), torch.tensor(0.3)
        >>> _, _, divergence = f(t, x)
        >>> jac = torch.autograd.functional.jacobian(lambda v: f(t, v)[0], x)
        >>> bool(torch.allclose(divergence, torch.trace(jac), atol=1e-5))
        True
    """

    def __init__(self, dim: int, hidden_dims: Sequence[int], activation_name: str = "tanh"):
        super().__init__()
        sizes = [dim + 1, *hidden_dims]
        self.layers = nn.ModuleList(
            GroupedLinear(dim, a, b, hollow_mask(dim, b) if i == 0 else None)
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
        )
        width = sizes[-1]
        self.w_in = nn.Parameter(torch.zeros(dim, width))
        _uniform_init(self.w_in, 1)
        self.w_out = nn.Parameter(torch.zeros(dim, width))
        self.b_out = nn.Parameter(torch.zeros(dim))
        self.activation_name = activation_name

    def forward(
        self, t: torch.Tensor, x: torch.Tensor, tangents: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``f(x, t)``, the products ``J v_j`` with the tangents, and the exact divergence.

        Args:
            t: the time, a scalar tensor.
            x: states, shape ``(..., dim)``.
            tangents: tangent vectors, shape ``(..., k, dim)``, or ``None``.

        Returns:
            ``(f, JV, divergence)`` with shapes ``(..., dim)``, ``(..., k, dim)`` (``None``
            without tangents) and ``(...)``.

        Example:
            >>> f, jv, divergence = HollowMLP(2, [4])(torch.tensor(0.0), torch.zeros(5, 2), torch.ones(5, 1, 2))
            >>> tuple(f.shape), tuple(jv.shape), tuple(divergence.shape)
            ((5, 2), (5, 1, 2), (5,))
        """
        name, v = self.activation_name, tangents
        h = torch.cat([x, t.expand(x.shape[:-1] + (1,))], -1)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            a = layer(h, shared_input=i == 0)
            if v is not None:
                w = layer.masked_weight()
                v = grouped_matmul(w[..., :-1], v, shared_input=True) if i == 0 else grouped_matmul(w, v, False)
            if i < last:
                h, slope = smooth_activation(name, a)
                v = None if v is None else v * slope.unsqueeze(-3)
            else:
                h = a
        u = self.w_in * x.unsqueeze(-1) + h  # (..., dim, width)
        s, slope = smooth_activation(name, u)
        f = (self.w_out * s).sum(-1) + self.b_out
        divergence = (self.w_out * slope * self.w_in).sum((-2, -1))
        if v is not None:
            du = self.w_in * tangents.unsqueeze(-1) + v
            v = (self.w_out * slope.unsqueeze(-3) * du).sum(-1)
        return f, v, divergence


# --------------------------------------------------------------------------- Lipschitz networks (residual)
def spectral_norm(weight: torch.Tensor, power_iterations: int) -> torch.Tensor:
    """The largest singular value of ``weight``, by power iteration, differentiable in ``weight``.

    Power iteration on the Gram matrix ``A`` (``W^T W`` or ``W W^T``, the smaller) for
    ``N = power_iterations`` steps (rounded up to a power of two), run as the matrix
    power ``P = A^N / tr(A^N)`` by ``log2 N`` squarings, each divided by its trace (no
    overflow; a zero matrix gives zero), from no start vector: the result is a function
    of ``W`` alone and needs no stored state. ``tr(W P W^T)`` is a weighted mean of the
    eigenvalues of ``A`` with weights ``lambda^N``, short of ``sigma_max^2`` by at most a
    relative ``(m - 1) / (e N)`` (``m`` the Gram matrix's size). ``P`` is held fixed for
    the gradient, as power-iteration vectors are in spectral normalisation.

    Args:
        weight: a matrix ``(out, in)``.
        power_iterations: the number of power-iteration steps ``N``.

    Returns:
        ``sigma_max(weight)`` (from below), a scalar tensor; 0 for a zero matrix.

    References:
        Miyato, Kataoka, Koyama & Yoshida 2018, "Spectral Normalization for Generative
        Adversarial Networks", arXiv:1802.05957.

    Example:
        >>> round(spectral_norm(torch.tensor([[3.0, 0.0], [0.0, 1.0]]), 64).item(), 4)
        3.0
    """
    tall = weight.shape[1] <= weight.shape[0]
    with torch.no_grad():
        w = weight.detach()
        tiny = torch.finfo(w.dtype).tiny

        def normalise(p):
            return p / torch.diagonal(p).sum().clamp_min(tiny)

        p = normalise(w.T @ w if tall else w @ w.T)
        for _ in range(max(int(power_iterations) - 1, 0).bit_length()):
            p = normalise(p @ p)
    sq = ((weight @ p) * weight).sum() if tall else ((p @ weight) * weight).sum()
    # sqrt with a zero (not infinite) gradient at a zero matrix, e.g. an output layer at init
    positive = sq > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, sq, torch.ones_like(sq))), torch.zeros_like(sq))


class SpectralNormLinear(nn.Module):
    """A linear layer whose weight is scaled to spectral norm at most ``coeff``.

    ``W_hat = W / max(1, sigma(W) / coeff)``, ``sigma`` from ``spectral_norm``, so the
    layer is ``coeff``-Lipschitz (up to the power iteration's tolerance), as the residual
    blocks of an invertible ResNet need.

    Args:
        in_features: input size.
        out_features: output size.
        coeff: the bound on the spectral norm.
        power_iterations: steps of ``spectral_norm``.
        zero: start the weight and the bias at zero.

    References:
        Behrmann, Grathwohl, Chen, Duvenaud & Jacobsen 2019, "Invertible Residual
        Networks", arXiv:1811.00995.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> layer = SpectralNormLinear(3, 3, coeff=0.5)
        >>> bool(torch.linalg.matrix_norm(layer.normalized_weight(), ord=2) <= 0.5 + 1e-3)
        True
    """

    def __init__(
        self, in_features: int, out_features: int, coeff: float = 0.97, power_iterations: int = 4096, zero: bool = False
    ):
        super().__init__()
        self.coeff, self.power_iterations = float(coeff), int(power_iterations)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        if not zero:
            _uniform_init(self.weight, in_features)
            _uniform_init(self.bias, in_features)

    def normalized_weight(self) -> torch.Tensor:
        """``W_hat = W / max(1, sigma(W) / coeff)``, differentiable in ``W``.

        Example:
            >>> layer = SpectralNormLinear(2, 2, coeff=1.0)
            >>> _ = torch.nn.init.eye_(layer.weight)
            >>> layer.normalized_weight().tolist()  # norm 1 already: unchanged
            [[1.0, 0.0], [0.0, 1.0]]
        """
        return self.weight / (spectral_norm(self.weight, self.power_iterations) / self.coeff).clamp_min(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W_hat.T + b`` for ``x`` of shape ``(..., in_features)``.

        Example:
            >>> SpectralNormLinear(3, 2, zero=True)(torch.ones(4, 3)).shape
            torch.Size([4, 2])
        """
        return nn.functional.linear(x, self.normalized_weight(), self.bias)

    def extra_repr(self) -> str:
        """The sizes and ``coeff``, for the module's ``repr``.

        Example:
            >>> SpectralNormLinear(3, 2).extra_repr()
            '3, 2, coeff=0.97'
        """
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, coeff={self.coeff}"


_SOFTPLUS_INV_ONE = math.log(math.e - 1.0)


class LipSwish(nn.Module):
    """The 1-Lipschitz activation ``LipSwish(z) = z sigmoid(beta z) / 1.1``, ``beta = softplus(raw)``.

    ``d/dz [z sigmoid(beta z)]`` lies in (-0.0998, 1.0998) for every ``beta > 0``, so the
    activation is 1-Lipschitz. ``beta`` (the parameter ``self.beta`` holds its raw,
    pre-softplus value) starts at 1: plain swish / 1.1.

    References:
        Chen, Behrmann, Duvenaud & Jacobsen 2019, "Residual Flows for Invertible
        Generative Modeling", arXiv:1906.02735.

    Example:
        >>> [round(v, 3) for v in LipSwish()(torch.tensor([0.0, 10.0])).tolist()]
        [0.0, 9.09]
    """

    def __init__(self) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(_SOFTPLUS_INV_ONE))

    def value_and_slope(self, z: torch.Tensor, beta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The activation and its derivative at ``z``, elementwise.

        Args:
            z: pre-activations, any shape.
            beta: ``softplus(raw)`` when the caller has it already (``LipschitzMLP.weights``).

        Returns:
            ``(LipSwish(z), LipSwish'(z))``, each shaped like ``z``.

        Example:
            >>> value, slope = LipSwish().value_and_slope(torch.zeros(1))
            >>> value.tolist(), round(slope.item(), 4)
            ([0.0], 0.4545)
        """
        beta = nn.functional.softplus(self.beta) if beta is None else beta
        s = torch.sigmoid(beta * z)
        return z * s / 1.1, s * (1.0 + beta * z * (1.0 - s)) / 1.1

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``LipSwish(z)``, elementwise.

        Example:
            >>> LipSwish()(torch.zeros(2)).tolist()
            [0.0, 0.0]
        """
        return self.value_and_slope(z)[0]


class LipschitzMLP(nn.Module):
    """The residual branch ``g(x)`` of an invertible ResNet block, with ``Lip(g) <= coeff``.

    ``net`` alternates ``SpectralNormLinear`` and ``LipSwish``; the output layer starts
    at zero. ``weights()`` evaluates the normalised weights once, and
    ``forward_and_slopes`` / ``jvp`` / ``jacobian`` reuse them: the Jacobian is
    ``W_L diag(s_{L-1}) ... diag(s_1) W_1`` with the activation slopes ``s``, written
    out rather than taken by autograd, so series estimators need no double backward.

    Args:
        dim: input and output size.
        hidden_dims: widths of the hidden layers.
        coeff: the Lipschitz bound of each linear layer (``< 1`` for invertibility).
        power_iterations: steps of ``spectral_norm``.

    References:
        Behrmann et al. 2019, "Invertible Residual Networks", arXiv:1811.00995; Chen et
        al. 2019, "Residual Flows for Invertible Generative Modeling", arXiv:1906.02735.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> g = LipschitzMLP(2, [8])
        >>> _ = torch.nn.init.normal_(g.net[-1].weight)  # leave the zero start
        >>> x, weights = torch.randn(2), g.weights()
        >>> _, slopes = g.forward_and_slopes(x, weights)
        >>> jac = LipschitzMLP.jacobian(weights, slopes)
        >>> bool(torch.allclose(jac, torch.autograd.functional.jacobian(g, x), atol=1e-6))
        True
    """

    def __init__(self, dim: int, hidden_dims: Sequence[int], coeff: float = 0.97, power_iterations: int = 4096):
        super().__init__()
        sizes = [dim, *hidden_dims, dim]
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i:
                layers.append(LipSwish())
            layers.append(SpectralNormLinear(a, b, coeff, power_iterations, zero=i == len(sizes) - 2))
        self.net = nn.Sequential(*layers)

    def weights(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
        """The normalised weights and activation parameters, evaluated once for reuse.

        Returns:
            ``(linear, betas)``: ``[(W_hat, b), ...]`` per linear layer and the
            activations' ``beta = softplus(raw)``.

        Example:
            >>> linear, betas = LipschitzMLP(2, [4, 4]).weights()
            >>> [tuple(w.shape) for w, _ in linear], len(betas)
            ([(4, 2), (4, 4), (2, 4)], 2)
        """
        linear = [(m.normalized_weight(), m.bias) for m in self.net[0::2]]
        betas = [nn.functional.softplus(m.beta) for m in self.net[1::2]]
        return linear, betas

    def forward_and_slopes(
        self, x: torch.Tensor, weights: tuple | None = None, slopes: bool = True
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``g(x)`` and the activation slopes at ``x``, which ``jvp`` and ``jacobian`` take.

        Args:
            x: inputs, shape ``(..., dim)``.
            weights: ``self.weights()``, when the caller has it already.
            slopes: also return the slopes (else an empty list).

        Returns:
            ``(g(x), slopes)``: one slope tensor per activation, shaped like its layer's output.

        Example:
            >>> y, slopes = LipschitzMLP(2, [4]).forward_and_slopes(torch.zeros(3, 2))
            >>> y.tolist(), [tuple(s.shape) for s in slopes]  # a zero output layer
            ([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]], [(3, 4)])
        """
        linear, betas = self.weights() if weights is None else weights
        out = []
        for i, (w, b) in enumerate(linear):
            x = nn.functional.linear(x, w, b)
            if i < len(betas):
                x, s = self.net[2 * i + 1].value_and_slope(x, betas[i])
                if slopes:
                    out.append(s)
        return x, out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``g(x)`` for ``x`` of shape ``(..., dim)``.

        Example:
            >>> LipschitzMLP(3, [4])(torch.ones(2, 3)).shape
            torch.Size([2, 3])
        """
        return self.forward_and_slopes(x, slopes=False)[0]

    @staticmethod
    def jvp(weights: tuple, slopes: list[torch.Tensor], v: torch.Tensor) -> torch.Tensor:
        """``J_g v`` at the point whose ``slopes`` are given (batched like ``v``).

        Args:
            weights: ``LipschitzMLP.weights()``.
            slopes: the slopes ``forward_and_slopes`` returned at the point.
            v: vectors, shape ``(..., dim)``.

        Returns:
            ``J_g v``, shaped like ``v``.

        Example:
            >>> _ = torch.manual_seed(0)
            >>> g = LipschitzMLP(2, [4])
            >>> weights = g.weights()
            >>> _, slopes = g.forward_and_slopes(torch.zeros(2), weights)
            >>> LipschitzMLP.jvp(weights, slopes, torch.ones(2)).tolist()  # the zero output layer
            [0.0, 0.0]
        """
        linear, _ = weights
        for i, (w, _) in enumerate(linear):
            v = v @ w.T
            if i < len(slopes):
                v = v * slopes[i]
        return v

    @staticmethod
    def jacobian(weights: tuple, slopes: list[torch.Tensor]) -> torch.Tensor:
        """The dense ``J_g`` at the point whose ``slopes`` are given, shape ``(..., dim, dim)``.

        Args:
            weights: ``LipschitzMLP.weights()``.
            slopes: the slopes ``forward_and_slopes`` returned at the point(s).

        Returns:
            The Jacobian matrices.

        Example:
            >>> g = LipschitzMLP(2, [4])
            >>> weights = g.weights()
            >>> _, slopes = g.forward_and_slopes(torch.zeros(5, 2), weights)
            >>> LipschitzMLP.jacobian(weights, slopes).shape
            torch.Size([5, 2, 2])
        """
        linear, _ = weights
        jac = linear[0][0]
        for (w, _), s in zip(linear[1:], slopes):
            jac = w @ (s.unsqueeze(-1) * jac)
        return jac
