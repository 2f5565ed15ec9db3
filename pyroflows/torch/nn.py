"""Neural networks the flows use: MLPs (couplings), MADE (autoregressive layers), time-conditioned
and hollow ODE dynamics (ffjord), and spectral-normalised Lipschitz networks (residual).

The last layer of the MLP and MADE starts at zero, so a freshly built flow is (close to) the
identity and the guide or density it defines starts where its base distribution is.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ode import ACTIVATIONS as ODE_ACTIVATIONS
from ..ode import hollow_mask

__all__ = ["ACTIVATIONS", "activation", "MLP", "MADE", "made_degrees",
           "smooth_activation", "TimeMLP", "GroupedLinear", "HollowMLP",
           "spectral_norm", "SpectralNormLinear", "LipSwish", "LipschitzMLP"]

ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


def activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}") from None


def _uniform_init(weight: torch.Tensor, fan_in: int) -> None:
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    with torch.no_grad():
        weight.uniform_(-bound, bound)


class MaskedLinear(nn.Module):
    """``x @ (W * mask).T + b``; a mask of ones is a plain linear layer."""

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

    def forward(self, x):
        w = self.weight if self.mask is None else self.weight * self.mask
        return nn.functional.linear(x, w, self.bias)


class MLP(nn.Module):
    """A fully connected network; the output layer is initialised at zero.

    ``in_features`` may be 0 (a coupling on a 1-D input conditions on nothing): the
    network is then a learned constant.
    """

    def __init__(self, in_features: int, hidden_dims, out_features: int, activation_name: str = "relu"):
        super().__init__()
        sizes = [in_features, *hidden_dims]
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [MaskedLinear(a, b), activation(activation_name)]
        layers.append(MaskedLinear(sizes[-1], out_features, zero=True))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def made_degrees(dim: int, hidden_dims) -> list[torch.Tensor]:
    """Degrees of MADE's units (Germain et al. 2015): inputs 1..dim, hidden units cyclic.

    Hidden degrees cycle through 1..dim-1 (deterministic, so both backends agree); an
    output of degree i may see hidden units of degree < i, a hidden unit of degree k
    the units of degree <= k below it.
    """
    degrees = [torch.arange(1, dim + 1)]
    top = max(dim - 1, 1)
    for h in hidden_dims:
        degrees.append(torch.arange(h) % top + 1)
    return degrees


class MADE(nn.Module):
    """Masked autoencoder for distribution estimation (Germain et al. 2015, arXiv:1502.03509).

    Maps ``(..., dim)`` to ``(..., dim, num_params)``: the parameters of coordinate i
    depend only on coordinates ``< i`` (in the natural order; flows permute between
    layers instead). The output layer starts at zero.
    """

    def __init__(self, dim: int, hidden_dims, num_params: int, activation_name: str = "relu"):
        super().__init__()
        self.dim, self.num_params = dim, num_params
        degrees = made_degrees(dim, hidden_dims)
        layers = []
        for d_in, d_out in zip(degrees[:-1], degrees[1:]):
            mask = (d_out[:, None] >= d_in[None, :]).float()
            layers += [MaskedLinear(len(d_in), len(d_out), mask), activation(activation_name)]
        out_degrees = torch.arange(1, dim + 1).repeat_interleave(num_params)
        mask = (out_degrees[:, None] > degrees[-1][None, :]).float()
        layers.append(MaskedLinear(len(degrees[-1]), dim * num_params, mask, zero=True))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        out = self.net(x)
        return out.reshape(*out.shape[:-1], self.dim, self.num_params)


# --------------------------------------------------------------------------- ODE dynamics (ffjord)
def smooth_activation(name: str, a: torch.Tensor):
    """``(sigma(a), sigma'(a))`` for the smooth activations of CNF dynamics (``pyroflows.ode.ACTIVATIONS``).

    The divergence is computed in forward mode next to the values, which needs sigma'.
    softplus is written as ``max(a, 0) + log1p(exp(-|a|))`` (no overflow, no threshold switch).
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

    ``forward(t, x, tangents=None)`` returns ``f(x, t)`` and, for tangents ``V`` of shape
    ``(..., k, dim)``, the Jacobian-vector products ``J v_j`` (shape ``(..., k, dim)``),
    propagated alongside the values, so a trace estimate needs no second backward pass.
    The output layer starts at zero: a fresh CNF is the identity.
    """

    def __init__(self, dim: int, hidden_dims, activation_name: str = "tanh"):
        super().__init__()
        sizes = [dim, *hidden_dims, dim]
        last = len(sizes) - 2
        self.layers = nn.ModuleList(
            MaskedLinear(a + 1, b, zero=i == last) for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
        )
        self.activation_name = activation_name

    def forward(self, t, x, tangents=None):
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
    (groups, out, in) then removes inputs per group.
    """

    def __init__(self, groups: int, in_features: int, out_features: int, mask=None):
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

    def masked_weight(self):
        return self.weight if self.mask is None else self.weight * self.mask

    def forward(self, x, shared_input: bool = False):
        return grouped_matmul(self.masked_weight(), x, shared_input) + self.bias


def grouped_matmul(w, x, shared_input: bool):
    """``W[g] @ x[..., g, :]`` per group, or ``W[g] @ x[..., :]`` with ``shared_input``."""
    if shared_input:
        g, o, i = w.shape
        return (x @ w.reshape(g * o, i).T).unflatten(-1, (g, o))
    return (w @ x.unsqueeze(-1)).squeeze(-1)


class HollowMLP(nn.Module):
    """Hollow dynamics ``f_i(x, t) = tau_i(x_i, h_i)``, ``h_i = c_i(x_{-i}, t)`` (Chen & Duvenaud 2019,
    "Neural networks with cheap differential operators", arXiv:1912.03579).

    The conditioner is ``dim`` groups of an MLP with widths ``hidden_dims``; group i's
    first layer is masked so it never reads ``x_i``, so ``d h_i / d x_i = 0``. The
    transformer is ``tau_i = sum_k w_out[i, k] sigma(w_in[i, k] x_i + h_i[k]) + b_out[i]``,
    and the divergence ``sum_i d tau_i / d x_i`` is exact at the cost of one pass.
    ``forward(t, x, tangents=None)`` returns ``(f, J V, divergence)``. ``w_out`` and
    ``b_out`` start at zero: a fresh CNF is the identity.
    """

    def __init__(self, dim: int, hidden_dims, activation_name: str = "tanh"):
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

    def forward(self, t, x, tangents=None):
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
    the gradient, as power-iteration vectors are in Miyato et al. 2018 (arXiv:1802.05957).
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

    ``W_hat = W / max(1, sigma(W) / coeff)`` (Behrmann et al. 2019, arXiv:1811.00995),
    ``sigma`` from ``spectral_norm``. ``zero=True`` starts the weight and bias at zero.
    """

    def __init__(self, in_features: int, out_features: int, coeff: float = 0.97, power_iterations: int = 4096,
                 zero: bool = False):
        super().__init__()
        self.coeff, self.power_iterations = float(coeff), int(power_iterations)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        if not zero:
            _uniform_init(self.weight, in_features)
            _uniform_init(self.bias, in_features)

    def normalized_weight(self) -> torch.Tensor:
        return self.weight / (spectral_norm(self.weight, self.power_iterations) / self.coeff).clamp_min(1.0)

    def forward(self, x):
        return nn.functional.linear(x, self.normalized_weight(), self.bias)

    def extra_repr(self):
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, coeff={self.coeff}"


_SOFTPLUS_INV_ONE = math.log(math.e - 1.0)


class LipSwish(nn.Module):
    """``LipSwish(z) = z sigmoid(beta z) / 1.1``, ``beta = softplus(raw)`` (Chen et al. 2019, arXiv:1906.02735).

    ``d/dz [z sigmoid(beta z)]`` lies in (-0.0998, 1.0998) for every ``beta > 0``, so the
    activation is 1-Lipschitz. ``beta`` starts at 1 (plain swish / 1.1).
    """

    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(_SOFTPLUS_INV_ONE))

    def value_and_slope(self, z, beta=None):
        beta = nn.functional.softplus(self.beta) if beta is None else beta
        s = torch.sigmoid(beta * z)
        return z * s / 1.1, s * (1.0 + beta * z * (1.0 - s)) / 1.1

    def forward(self, z):
        return self.value_and_slope(z)[0]


class LipschitzMLP(nn.Module):
    """``g(x)``: spectrally normalised linear layers with LipSwish between them; ``Lip(g) <= coeff``.

    ``net`` alternates ``SpectralNormLinear`` and ``LipSwish``; the output layer starts
    at zero. ``weights()`` evaluates the normalised weights once, and
    ``forward_and_slopes`` / ``jvp`` / ``jacobian`` reuse them: the Jacobian is
    ``W_L diag(s_{L-1}) ... diag(s_1) W_1`` with the activation slopes ``s``, written
    out rather than taken by autograd, so series estimators need no double backward.
    """

    def __init__(self, dim: int, hidden_dims, coeff: float = 0.97, power_iterations: int = 4096):
        super().__init__()
        sizes = [dim, *hidden_dims, dim]
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i:
                layers.append(LipSwish())
            layers.append(SpectralNormLinear(a, b, coeff, power_iterations, zero=i == len(sizes) - 2))
        self.net = nn.Sequential(*layers)

    def weights(self):
        """``(linear, betas)``: ``[(W_hat, b), ...]`` and the activations' ``beta``."""
        linear = [(m.normalized_weight(), m.bias) for m in self.net[0::2]]
        betas = [nn.functional.softplus(m.beta) for m in self.net[1::2]]
        return linear, betas

    def forward_and_slopes(self, x, weights=None, slopes=True):
        linear, betas = self.weights() if weights is None else weights
        out = []
        for i, (w, b) in enumerate(linear):
            x = nn.functional.linear(x, w, b)
            if i < len(betas):
                x, s = self.net[2 * i + 1].value_and_slope(x, betas[i])
                if slopes:
                    out.append(s)
        return x, out

    def forward(self, x):
        return self.forward_and_slopes(x, slopes=False)[0]

    @staticmethod
    def jvp(weights, slopes, v):
        """``J_g v`` at the point whose ``slopes`` are given (batched like ``v``)."""
        linear, _ = weights
        for i, (w, _) in enumerate(linear):
            v = v @ w.T
            if i < len(slopes):
                v = v * slopes[i]
        return v

    @staticmethod
    def jacobian(weights, slopes):
        """The dense ``J_g``, shape ``(..., dim, dim)``."""
        linear, _ = weights
        jac = linear[0][0]
        for (w, _), s in zip(linear[1:], slopes):
            jac = w @ (s.unsqueeze(-1) * jac)
        return jac
