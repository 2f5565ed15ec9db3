"""The backend-neutral table of flows: names, families, defaults and option validation.

Both backends build from this table, so a name means the same flow with the same
options on Pyro and on NumPyro. Array code lives in the backends; everything here is
plain Python so that argument errors read the same whichever backend raised them.

``SPECS`` maps each name to a ``FlowSpec``; each backend keeps a ``FlowRegistry`` of
builder functions (``pyroflows.torch.flows.REGISTRY``, ``pyroflows.jax.flows.REGISTRY``)
that validates a request against the spec before the builder sees it.

Example:
    >>> from pyroflows.registry import SPECS
    >>> SPECS["realnvp"].num_layers, SPECS["realnvp"].hidden_dims
    (4, (64, 64))
    >>> sorted(SPECS["realnvp"].options)
    ['activation', 'log_scale_bound', 'permutation']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from . import lipschitz as _lipschitz
from . import ode as _ode
from .validation import (  # re-exported: the registry's checkers are the shared ones
    boolean,
    bounded_positive_float,
    choice,
    int_list,
    non_negative_float,
    open_unit,
    optional_positive_int,
    positive_float,
    positive_int,
)

__all__ = ["Option", "FlowSpec", "SPECS", "RESERVED", "FlowRegistry", "describe", "residual_block_options"]

_MISSING = object()


@dataclasses.dataclass(frozen=True)
class Option:
    """One keyword option of a flow family: its default, the values it accepts, a doc line.

    Attributes:
        default: the value used when the caller does not pass the option.
        check: ``check(name, value) -> value``, one of the checkers of
            ``pyroflows.validation``: returns the value as a plain Python object or raises
            ``ValueError``.
        doc: one line on what the option does (``describe`` and the docs show it).

    Example:
        >>> from pyroflows.validation import positive_int
        >>> bins = Option(8, positive_int, "spline bins")
        >>> bins.validate("nsf", "count_bins", 4)
        4
    """

    default: Any
    check: Callable[[str, Any], Any]
    doc: str = ""

    def validate(self, flow: str, name: str, value: Any) -> Any:
        """``value`` checked by ``check``; an error message starts with the flow's name.

        Args:
            flow: the family's name, for the message.
            name: the option's name.
            value: what the caller passed.

        Returns:
            The checked value (a plain ``int``, ``float``, ``bool``, ``str`` or tuple).

        Raises:
            ValueError: ``value`` is not valid for this option.

        Example:
            >>> from pyroflows.validation import positive_int
            >>> Option(8, positive_int).validate("nsf", "count_bins", 0)
            Traceback (most recent call last):
            ValueError: flow 'nsf': option count_bins=0 must be a positive integer
        """
        try:
            return self.check(name, value)
        except ValueError as e:
            raise ValueError(f"flow {flow!r}: {e}") from None


def _epsilon_max(name, value):
    value = positive_float(name, value)
    if value >= 0.5:
        raise ValueError(
            f"option {name}={value!r} must lie in (0, 0.5): GDN is a bijection of R^d "
            "only when its exponent is below 1/2"
        )
    return value


def _tolerance(name, value):
    value = positive_float(name, value)
    if value >= 1:
        raise ValueError(f"option {name}={value!r} must lie strictly between 0 and 1 (a relative tolerance)")
    return value


#: Largest ``log_scale_bound``: scales reach exp(bound), and exp(50) ~ 5e21 is already past
#: any useful scale; a larger bound makes the soft clamp the identity, so scales overflow.
MAX_LOG_SCALE_BOUND = 50.0
_log_scale_bound_check = bounded_positive_float(
    MAX_LOG_SCALE_BOUND, "scales are exp(log-scale), and a larger bound lets them overflow"
)


ACTIVATIONS = ("relu", "tanh", "elu", "leaky_relu", "gelu", "silu")
_activation = Option("relu", choice(*ACTIVATIONS), "non-linearity of the conditioner networks")
_permutation = Option(
    "reverse", choice("reverse", "random"), "permutation between blocks ('random' is seeded by the global RNG)"
)
_log_scale_bound = Option(
    5.0,
    _log_scale_bound_check,
    f"log-scales are soft-clamped to (-bound, bound) by bound * tanh(s / bound); at most {MAX_LOG_SCALE_BOUND:g}",
)


@dataclasses.dataclass(frozen=True)
class FlowSpec:
    """What a registered name means, independent of the backend.

    ``num_layers`` and ``hidden_dims`` are the defaults used when ``build_flow`` gets
    ``None``; ``hidden_dims=None`` in the spec means the family has no conditioner
    network, and passing hidden dims to it is an error.

    Attributes:
        name: the registered name, e.g. ``"realnvp"``.
        family: the kind of flow (``"coupling"``, ``"autoregressive"``, ...).
        jacobian: what the Jacobian is and how its log-determinant is computed.
        inverse: how the inverse is computed (closed form, numerical, sequential).
        reference: the paper(s), with arXiv numbers.
        summary: one line on what a layer computes.
        num_layers: the default number of layers (or blocks).
        hidden_dims: the default hidden widths of the conditioner networks, or ``None``
            when the family has none.
        options: the family's keyword options by name.
        conditioner: for the conditioner x transformer families, ``"coupling"`` or
            ``"autoregressive"``; ``None`` for the others.
        transformer: for those families, the element-wise transformer's name
            (``"additive"``, ``"affine"``, ``"spline"``, ``"sigmoid"``).
        reads: the side a masked autoregressive conditioner reads: ``"input"`` (IAF's
            layout) or ``"output"`` (MAF's).
        final_scale: whether a learned diagonal scaling ends the flow (NICE).

    Example:
        >>> spec = SPECS["planar"]
        >>> spec.family, spec.num_layers, spec.hidden_dims
        ('determinant identities', 8, None)
    """

    name: str
    family: str
    jacobian: str
    inverse: str
    reference: str
    summary: str
    num_layers: int
    hidden_dims: tuple[int, ...] | None = None
    options: Mapping[str, Option] = dataclasses.field(default_factory=dict)
    #: For the conditioner x transformer families: ``"coupling"`` or ``"autoregressive"``
    #: (a MADE), the element-wise transformer's name (``transformers.TRANSFORMERS``), the
    #: side a MADE reads (``"input"``: IAF layout, ``"output"``: MAF layout), and whether a
    #: learned diagonal scaling ends the flow (NICE). Options not named ``activation``,
    #: ``permutation`` or ``conditioner`` go to the transformer.
    conditioner: str | None = None
    transformer: str | None = None
    reads: str = "input"
    final_scale: bool = False

    def resolve(self, dim: int, num_layers: int | None, hidden_dims: Any, options: Mapping[str, Any]) -> dict[str, Any]:
        """Validate a build request and fill in the family's defaults.

        Args:
            dim: the event size (checked by the caller, ``FlowRegistry.resolve``).
            num_layers: the number of layers, or ``None`` for the family's default.
            hidden_dims: hidden widths (an int or a sequence of ints), or ``None`` for the
                default; must be ``None`` for a family without a conditioner network.
            options: the family's keyword options as passed.

        Returns:
            Every option of the family (defaults filled in), ``num_layers`` and, for a
            family with a conditioner network, ``hidden_dims`` as a tuple.

        Raises:
            ValueError: an unknown option (the message lists the valid ones), a bad value,
                or ``hidden_dims`` for a family without a conditioner network.

        Example:
            >>> config = SPECS["realnvp"].resolve(2, None, [32], {"activation": "tanh"})
            >>> config["num_layers"], config["hidden_dims"], config["activation"]
            (4, (32,), 'tanh')
            >>> SPECS["realnvp"].resolve(2, None, None, {"bins": 4})
            Traceback (most recent call last):
            ValueError: flow 'realnvp' has no option 'bins'; valid options: activation, log_scale_bound, permutation
        """
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            valid = sorted(self.options) or ["(none)"]
            raise ValueError(
                f"flow {self.name!r} has no option {', '.join(map(repr, unknown))}; valid options: {', '.join(valid)}"
            )
        out = {name: opt.default for name, opt in self.options.items()}
        for name, value in options.items():
            out[name] = self.options[name].validate(self.name, name, value)
        if num_layers is None:
            out["num_layers"] = self.num_layers
        else:
            out["num_layers"] = Option(None, positive_int).validate(self.name, "num_layers", num_layers)
        if self.hidden_dims is None:
            if hidden_dims is not None:
                hint = " (it sizes its layers with hidden_factors)" if "hidden_factors" in self.options else ""
                raise ValueError(f"flow {self.name!r} has no conditioner network, so hidden_dims does not apply{hint}")
        elif hidden_dims is None:
            out["hidden_dims"] = self.hidden_dims
        else:
            out["hidden_dims"] = Option(None, int_list).validate(self.name, "hidden_dims", hidden_dims)
        return out


#: The options of the element-wise transformers (``pyroflows.<backend>.transforms.transformers``),
#: checked like the families' options when a transformer is built by hand.
TRANSFORMER_OPTIONS: dict[str, Option] = {
    "log_scale_bound": _log_scale_bound,
    "count_bins": Option(8, positive_int, "spline bins"),
    "bound": Option(3.0, positive_float, "the spline acts on [-bound, bound], identity outside"),
    "hidden_units": Option(16, positive_int, "sigmoid units of the deep sigmoidal transformer"),
}


_NETWORK_OPTIONS = {"activation": _activation, "permutation": _permutation}
_CONDITIONED = {"num_layers": 4, "hidden_dims": (64, 64), "jacobian": "triangular", "inverse": "exact"}
_MADE_REF = "MADE: Germain et al. 2015, arXiv:1502.03509"
_BISECTION = "numerical (bisection, one dimension after another)"


def _conditioned(name: str, conditioner: str, transformer: str, reference: str, summary: str, **fields) -> FlowSpec:
    """A conditioner x transformer family: its family is its conditioner; ``fields`` override
    ``_CONDITIONED`` and the options of an affine transformer."""
    options = {**_NETWORK_OPTIONS, "log_scale_bound": TRANSFORMER_OPTIONS["log_scale_bound"]}
    fields = {**_CONDITIONED, "options": options, "reference": reference, "summary": summary, **fields}
    return FlowSpec(name, conditioner, conditioner=conditioner, transformer=transformer, **fields)


_COUPLING_REF = "Dinh et al. 2015 (NICE, arXiv:1410.8516); Dinh et al. 2017 (RealNVP, arXiv:1605.08803)"

_FFJORD_OPTIONS = {
    "estimator": Option(
        "hutchinson",
        choice(*_ode.ESTIMATORS),
        "log-det: Hutchinson e^T (df/dx) e with one noise draw per sample held for the whole "
        "solve (unbiased), the exact trace (dim products per evaluation), or hollow dynamics "
        "whose divergence is exact at the cost of one pass",
    ),
    "noise": Option("gaussian", choice(*_ode.NOISES), "Hutchinson probe distribution"),
    "activation": Option("tanh", choice(*_ode.ACTIVATIONS), "smooth non-linearity of the dynamics"),
    "solver": Option(
        "rk4",
        choice(*_ode.SOLVERS),
        "Runge-Kutta method, the same tableau on both backends: fixed step "
        f"({', '.join(_ode.FIXED_STEP)}; num_steps steps) or adaptive (dopri5, bosh3; atol, rtol)",
    ),
    "num_steps": Option(8, positive_int, "steps of a fixed-step solver over [0, T]"),
    "atol": Option(1e-5, positive_float, "absolute tolerance of an adaptive solver"),
    "rtol": Option(1e-5, positive_float, "relative tolerance of an adaptive solver"),
    "adjoint": Option(
        False,
        boolean,
        "gradients by the continuous adjoint (torchdiffeq odeint_adjoint, diffrax "
        "BacksolveAdjoint): O(1) memory, gradients exact only to solver accuracy",
    ),
    "time_length": Option(1.0, positive_float, "integration time T (fixed)"),
    "kinetic_energy": Option(
        0.0,
        non_negative_float,
        "weight of the kinetic-energy regulariser integral |f|^2 dt (Finlay et al. 2020)",
    ),
    "jacobian_norm": Option(
        0.0,
        non_negative_float,
        "weight of the Jacobian Frobenius-norm regulariser integral |df/dx|_F^2 dt (Finlay et al. 2020)",
    ),
}

_RESIDUAL_OPTIONS = {
    "estimator": Option(
        "roulette",
        choice(*_lipschitz.ESTIMATORS),
        "log-det: Russian-roulette power series with a Hutchinson probe (unbiased), the "
        "truncated series (i-ResNet, biased), or the dense log-determinant (small dims)",
    ),
    "num_terms": Option(
        None,
        optional_positive_int,
        "series terms always computed: before the roulette starts (default 2), or the "
        "whole truncated series (default 10)",
    ),
    "roulette_p": Option(
        0.5,
        open_unit,
        "the roulette adds a Geometric(p) number of terms: mean (1 - p) / p, term k reweighted by 1 / P(N >= k)",
    ),
    "noise": Option("gaussian", choice(*_lipschitz.NOISES), "Hutchinson probe distribution"),
    "neumann_gradient": Option(
        True,
        boolean,
        "gradients of the series by the Neumann-series estimator (Chen et al. 2019): memory "
        "of one term instead of all; the value is unchanged",
    ),
    "lipschitz": Option(0.97, open_unit, "bound on each layer's spectral norm, so Lip(g) < 1"),
    "power_iterations": Option(
        4096,
        positive_int,
        "power-iteration steps on W^T W for each spectral norm (rounded up to a power of two), run as "
        "log2 N squarings of W^T W from scratch at every call",
    ),
    "inverse_tol": Option(1e-10, _tolerance, "fixed-point steps stop below inverse_tol * (1 + |x|); in (0, 1)"),
    "max_inverse_iter": Option(1000, positive_int, "cap on the fixed-point steps of the forward"),
}


SPECS: dict[str, FlowSpec] = {
    s.name: s
    for s in [
        FlowSpec(
            "planar",
            "determinant identities",
            "matrix determinant lemma",
            "numerical (scalar root finding)",
            "Rezende & Mohamed 2015, arXiv:1505.05770",
            "y = x + u tanh(w.x + b), with u constrained so the map is invertible",
            num_layers=8,
        ),
        FlowSpec(
            "radial",
            "determinant identities",
            "closed form",
            "closed form (quadratic in the radius)",
            "Rezende & Mohamed 2015, arXiv:1505.05770",
            "y = x + beta (x - x0) / (alpha + |x - x0|)",
            num_layers=8,
        ),
        FlowSpec(
            "sylvester",
            "determinant identities",
            "Sylvester determinant identity",
            "numerical (triangular system of scalar root finds)",
            "van den Berg et al. 2018, arXiv:1803.05649",
            "y = x + Q R tanh(R~ Q^T x + b) with orthogonal Q and triangular R, R~",
            num_layers=4,
            options={
                "variant": Option(
                    "orthogonal",
                    choice("orthogonal", "householder", "triangular"),
                    "how Q is parametrised: matrix exponential of a skew matrix, Householder reflections, "
                    "or alternating identity/reversal permutations",
                ),
                "num_vectors": Option(
                    None,
                    optional_positive_int,
                    "columns M of Q (orthogonal variant only; default: dim)",
                ),
            },
        ),
        FlowSpec(
            "householder",
            "determinant identities",
            "zero (volume preserving reflections)",
            "exact",
            "Tomczak & Welling 2016, arXiv:1611.09630",
            "an elementwise affine map followed by products of Householder reflections",
            num_layers=1,
            options={"num_reflections": Option(None, optional_positive_int, "reflections per layer (default: dim)")},
        ),
        _conditioned(
            "nice",
            "coupling",
            "additive",
            _COUPLING_REF,
            "additive couplings followed by a learned diagonal scaling",
            jacobian="triangular (volume preserving couplings, diagonal scaling)",
            options=dict(_NETWORK_OPTIONS),
            final_scale=True,
        ),
        _conditioned("realnvp", "coupling", "affine", _COUPLING_REF, "affine couplings with bounded log-scales"),
        _conditioned(
            "glow",
            "coupling",
            "affine",
            "Kingma & Dhariwal 2018, arXiv:1807.03039",
            "steps of ActNorm (data-dependent initialisation), LU InvertibleLinear and affine coupling",
            jacobian="triangular after an LU-parametrised linear map",
            options={"activation": _activation, "log_scale_bound": _log_scale_bound},
        ),
        _conditioned(
            "iaf",
            "autoregressive",
            "affine",
            "Kingma et al. 2016, arXiv:1606.04934; " + _MADE_REF,
            "affine autoregressive layers conditioned on their input: sampling is one parallel pass",
            num_layers=3,
            inverse="exact, dim sequential passes",
        ),
        _conditioned(
            "maf",
            "autoregressive",
            "affine",
            "Papamakarios et al. 2017, arXiv:1705.07057; " + _MADE_REF,
            "affine autoregressive layers conditioned on their output: density evaluation is one parallel pass",
            num_layers=5,
            inverse="exact, one parallel pass (the forward is sequential)",
            reads="output",
        ),
        _conditioned(
            "naf",
            "autoregressive",
            "sigmoid",
            "Huang et al. 2018 (deep sigmoidal flow), arXiv:1804.00779",
            "monotone sigmoidal transformers whose parameters come from a MADE",
            num_layers=3,
            inverse=_BISECTION,
            options={**_NETWORK_OPTIONS, "hidden_units": TRANSFORMER_OPTIONS["hidden_units"]},
        ),
        FlowSpec(
            "bnaf",
            "autoregressive",
            "triangular",
            _BISECTION,
            "De Cao et al. 2019, arXiv:1904.04676",
            "masked block-triangular monotone networks with a gated residual",
            num_layers=1,
            options={
                "hidden_factors": Option((8, 8), int_list, "hidden width per dimension of each block layer"),
                "permutation": _permutation,
            },
        ),
        _conditioned(
            "nsf",
            "coupling",
            "spline",
            "Durkan et al. 2019, arXiv:1906.04032",
            "rational-quadratic spline couplings with linear tails outside [-bound, bound]",
            inverse="exact (closed form per bin)",
            options={
                **_NETWORK_OPTIONS,
                "count_bins": TRANSFORMER_OPTIONS["count_bins"],
                "bound": TRANSFORMER_OPTIONS["bound"],
                "conditioner": Option(
                    "coupling",
                    choice("coupling", "autoregressive"),
                    "coupling halves, or a MADE (reads the input: the forward is one parallel pass)",
                ),
            },
        ),
        FlowSpec(
            "gaussianization",
            "diagonal",
            "diagonal after a rotation",
            "numerical (bisection) for the forward",
            "Meng et al. 2020, arXiv:2003.01941",
            "Householder rotation, mixture-of-logistics CDF and inverse normal CDF per coordinate",
            num_layers=4,
            options={
                "num_components": Option(8, positive_int, "logistic components per coordinate"),
                "num_reflections": Option(None, optional_positive_int, "Householder reflections (default: dim)"),
            },
        ),
        FlowSpec(
            "gdn",
            "diagonal",
            "diagonal, or dense when the normalisation mixes coordinates",
            "numerical (bisection or damped Newton) for the forward",
            "Balle, Laparra & Simoncelli 2016, arXiv:1511.06281",
            "generalised divisive normalisation y = z / (beta + Gamma z^2)^eps between LU linear maps",
            num_layers=3,
            options={
                "variant": Option("diagonal", choice("diagonal", "dense"), "diagonal or coordinate-mixing Gamma"),
                "max_exponent": Option(0.4, _epsilon_max, "upper bound on eps (below 1/2 keeps the map onto R^d)"),
            },
        ),
        FlowSpec(
            "ffjord",
            "unbiased estimation",
            "log|det| = integral of tr(df/dx) dt along the ODE (d log p / dt = -tr): Hutchinson "
            "estimate of the trace (unbiased), the exact trace, or the exact divergence of hollow dynamics",
            "numerical (the same ODE integrated from T back to 0; exact up to the solver's error)",
            "Grathwohl, Chen et al. 2018 (FFJORD), arXiv:1810.01367; hollow networks: "
            "Chen & Duvenaud 2019, arXiv:1912.03579",
            "dx/dt = f(x, t) with a time-conditioned MLP, integrated from t = 0 to T",
            num_layers=1,
            hidden_dims=(64, 64),
            options=_FFJORD_OPTIONS,
        ),
        FlowSpec(
            "residual",
            "unbiased estimation",
            "log det(I + J_g) = sum_k (-1)^(k+1) tr(J_g^k) / k, estimated with a Hutchinson probe by a "
            "Russian-roulette series (unbiased) or a truncated one (biased), or computed densely (exact)",
            "the data-to-noise direction (inverse) is explicit; the forward (noise to data) is a "
            "fixed-point iteration to inverse_tol, then one Newton step",
            "Behrmann et al. 2019 (i-ResNet), arXiv:1811.00995; Chen et al. 2019 (Residual Flows), arXiv:1906.02735",
            "residual blocks noise = data + g(data), g an MLP of spectrally normalised linear layers and "
            "LipSwish activations with Lip(g) < 1, each block after a learned elementwise affine map",
            num_layers=8,
            hidden_dims=(64, 64),
            options=_RESIDUAL_OPTIONS,
        ),
    ]
}
"""Every built-in family by name: the one table both backends build from."""

#: Names held for families that land in a later release of the backends.
RESERVED: dict[str, str] = {}
"""Names held for families that land in a later release, mapped to what they will be;
registering or building one raises an error that says so."""


def check_transformer(transformer: Any) -> None:
    """Validate a transformer's options in place (its dataclass fields), as ``build_flow`` would.

    Fields named in ``TRANSFORMER_OPTIONS`` are checked; others are left to their class.

    Args:
        transformer: a frozen dataclass such as ``Affine(log_scale_bound=5.0)``.

    Raises:
        ValueError: an option is non-finite, boolean or out of range; the message names it.

    Example:
        >>> import dataclasses
        >>> @dataclasses.dataclass(frozen=True)
        ... class Bins:
        ...     count_bins: int = 8
        >>> check_transformer(Bins(0))
        Traceback (most recent call last):
        ...
        ValueError: flow 'Bins': option count_bins=0 must be a positive integer
    """
    for field in dataclasses.fields(transformer):
        option = TRANSFORMER_OPTIONS.get(field.name)
        if option is None:  # a user's own option: their transformer checks it
            continue
        value = option.validate(type(transformer).__name__, field.name, getattr(transformer, field.name))
        object.__setattr__(transformer, field.name, value)


def conditional_flows() -> list[str]:
    """The families ``build_flow(..., context_dim=k)`` builds as conditional flows.

    Their context enters the conditioner networks (``FlowSpec.conditioner``).

    Example:
        >>> conditional_flows()
        ['glow', 'iaf', 'maf', 'naf', 'nice', 'nsf', 'realnvp']
    """
    return sorted(name for name, spec in SPECS.items() if spec.conditioner)


def check_context_dim(name: str, value: Any) -> int:
    """``value`` as the context size of a conditional ``name`` flow.

    Args:
        name: the family.
        value: the ``context_dim`` passed to ``build_flow``.

    Returns:
        ``int(value)``.

    Raises:
        ValueError: ``value`` is not a positive int, or ``name`` has no conditional version.

    Example:
        >>> check_context_dim("nsf", 3)
        3
        >>> check_context_dim("planar", 3)
        Traceback (most recent call last):
        ValueError: flow 'planar' has no conditional version yet (context_dim); conditional flows: glow, ...
    """
    value = positive_int("context_dim", value)
    if name not in conditional_flows():
        raise ValueError(
            f"flow {name!r} has no conditional version yet (context_dim); conditional flows: "
            + ", ".join(conditional_flows())
        )
    return value


def describe(name: str) -> str:
    """One paragraph on a registered family: what it computes, its Jacobian, inverse, options.

    ``pyroflows flows`` prints it for every family.

    Args:
        name: a name in ``SPECS``.

    Returns:
        The paragraph: summary, Jacobian, inverse, reference, defaults and options.

    Raises:
        KeyError: ``name`` is not in ``SPECS``.

    Example:
        >>> print(describe("radial"))  # doctest: +ELLIPSIS
        radial (determinant identities): y = x + beta (x - x0) / (alpha + |x - x0|). Jacobian: closed form. ...
    """
    s = SPECS[name]
    opts = "; ".join(f"{k}={v.default!r}: {v.doc}" for k, v in s.options.items()) or "none"
    return (
        f"{s.name} ({s.family}): {s.summary}. Jacobian: {s.jacobian}. Inverse: {s.inverse}. "
        f"Reference: {s.reference}. Defaults: num_layers={s.num_layers}, hidden_dims={s.hidden_dims}. "
        f"Options: {opts}."
        + (" Conditional (context_dim=k): the context enters the conditioner networks." if s.conditioner else "")
    )


def residual_block_options(**options: Any) -> dict[str, Any]:
    """Validate a residual block's options against ``SPECS["residual"]`` and fill in defaults.

    Both backends' ``ResidualBlock`` take their keyword arguments through this function,
    so an argument error reads the same on Pyro and on NumPyro, and a block built by hand
    is checked like one built by ``build_flow("residual", ...)``.

    Args:
        **options: any of the ``residual`` family's options (``estimator``, ``num_terms``,
            ``roulette_p``, ``noise``, ``neumann_gradient``, ``lipschitz``,
            ``power_iterations``, ``inverse_tol``, ``max_inverse_iter``).

    Returns:
        Every option of the family, validated, with ``num_terms=None`` replaced by the
        estimator's default (``pyroflows.lipschitz.DEFAULT_NUM_TERMS``).

    Raises:
        ValueError: an unknown option (the message lists the valid ones), or a bad value.

    Example:
        >>> opts = residual_block_options(estimator="truncated")
        >>> opts["num_terms"], opts["lipschitz"]
        (10, 0.97)
        >>> residual_block_options(lipschitz=1.0)
        Traceback (most recent call last):
        ValueError: flow 'residual': option lipschitz=1.0 must lie strictly between 0 and 1
    """
    spec = SPECS["residual"]
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ValueError(f"ResidualBlock has no option {', '.join(map(repr, unknown))}; valid: {sorted(spec.options)}")
    out = {name: opt.default for name, opt in spec.options.items()}
    out.update({name: spec.options[name].validate("residual", name, value) for name, value in options.items()})
    if out["num_terms"] is None:
        out["num_terms"] = _lipschitz.DEFAULT_NUM_TERMS[out["estimator"]]
    return out


class FlowRegistry:
    """The builders of one backend, keyed by name, validated against ``SPECS``.

    A builder is called as ``builder(dim, num_layers=..., hidden_dims=..., **options)``
    (plus backend keywords such as JAX's ``key``). For names in ``SPECS`` the options
    arrive validated and completed with defaults; a user's own builder gets what the
    caller passed.

    Args:
        backend: the backend's name, for messages (``"torch"`` or ``"jax"``).

    Example:
        >>> registry = FlowRegistry("numpy")
        >>> @registry.register("planar")
        ... def planar(dim, num_layers):
        ...     return [f"layer {i} on R^{dim}" for i in range(num_layers)]
        >>> layers, config = registry.build("planar", 3, num_layers=2)
        >>> layers
        ['layer 0 on R^3', 'layer 1 on R^3']
        >>> config == {"num_layers": 2, "dim": 3, "name": "planar"}
        True
    """

    def __init__(self, backend: str):
        self.backend = backend
        self._builders: dict[str, Callable] = {}

    def names(self) -> list[str]:
        """Every registered name, sorted.

        Example:
            >>> FlowRegistry("numpy").names()
            []
        """
        return sorted(self._builders)

    def register(self, name: str, *, replace: bool = False) -> Callable[[Callable], Callable]:
        """A decorator that registers a builder under ``name``.

        Args:
            name: the flow's name; a non-empty string, not in ``RESERVED``.
            replace: allow replacing a builder already registered under ``name``.

        Returns:
            The decorator; it returns the builder unchanged.

        Raises:
            ValueError: the name is empty, reserved, or taken (without ``replace``).

        Example:
            >>> registry = FlowRegistry("numpy")
            >>> _ = registry.register("mine")(lambda dim, num_layers, hidden_dims: [])
            >>> registry.register("mine")(lambda dim, num_layers, hidden_dims: [])
            Traceback (most recent call last):
            ValueError: a flow named 'mine' is already registered; pass replace=True to override it
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"a flow name must be a non-empty string, got {name!r}")
        if name in RESERVED:
            raise ValueError(f"the name {name!r} is reserved for {RESERVED[name]}; choose another name")
        if name in self._builders and not replace:
            raise ValueError(f"a flow named {name!r} is already registered; pass replace=True to override it")

        def decorator(builder):
            self._builders[name] = builder
            return builder

        return decorator

    def unregister(self, name: str) -> None:
        """Remove a builder that ``register`` added under ``name``.

        Args:
            name: a registered name that is not one of the built-in families (``SPECS``).

        Raises:
            ValueError: the name is not registered, or is a built-in family.

        Example:
            >>> registry = FlowRegistry("numpy")
            >>> _ = registry.register("mine")(lambda dim, num_layers, hidden_dims: [])
            >>> registry.unregister("mine"); registry.names()
            []
        """
        if name in SPECS:
            raise ValueError(f"{name!r} is a built-in family and cannot be unregistered")
        if name not in self._builders:
            raise ValueError(f"no flow named {name!r} is registered; registered: {self.names()}")
        del self._builders[name]

    def resolve(
        self,
        name: str,
        dim: int,
        num_layers: int | None = None,
        hidden_dims: Any = None,
        options: Mapping[str, Any] | None = None,
    ) -> tuple[Callable, dict[str, Any]]:
        """Return ``(builder, config)``: ``config`` holds every argument the builder gets.

        Args:
            name: a registered name.
            dim: the event size, a positive int.
            num_layers: the number of layers, or ``None`` for the family's default.
            hidden_dims: hidden widths, or ``None`` for the family's default.
            options: the family's keyword options.

        Returns:
            The builder and its keyword arguments (``dim`` included).

        Raises:
            ValueError: an unknown name (the message lists the registered ones), a bad
                ``dim``, or an option ``FlowSpec.resolve`` rejects.
            NotImplementedError: a name in ``RESERVED``.

        Example:
            >>> registry = FlowRegistry("numpy")
            >>> _ = registry.register("mine")(lambda dim, num_layers, hidden_dims: [])
            >>> builder, config = registry.resolve("mine", 2)  # not in SPECS: passed as given
            >>> config
            {'num_layers': None, 'hidden_dims': None, 'dim': 2}
            >>> registry.resolve("nsf", 2)
            Traceback (most recent call last):
            ValueError: unknown flow 'nsf'; available flows: mine
        """
        options = dict(options or {})
        context_dim = options.pop("context_dim", None)
        if name not in self._builders:
            if name in RESERVED:
                raise NotImplementedError(
                    f"flow {name!r} ({RESERVED[name]}) is not available in the {self.backend} backend yet"
                )
            raise ValueError(f"unknown flow {name!r}; available flows: {', '.join(self.names())}")
        dim = positive_int("dim", dim)
        spec = SPECS.get(name)
        if spec is None:
            config = dict(options, num_layers=num_layers, hidden_dims=hidden_dims)
        else:
            config = spec.resolve(dim, num_layers, hidden_dims, options)
        if context_dim is not None:
            config["context_dim"] = check_context_dim(name, context_dim)
        return self._builders[name], dict(config, dim=dim)

    def build(
        self, name: str, dim: int, *, num_layers: int | None = None, hidden_dims: Any = None, **options: Any
    ) -> tuple[Any, dict[str, Any]]:
        """Resolve a request and call the builder (what the backends' ``build_flow`` does).

        Args:
            name: a registered name.
            dim: the event size.
            num_layers: the number of layers, or ``None`` for the family's default.
            hidden_dims: hidden widths, or ``None`` for the family's default.
            **options: the family's keyword options.

        Returns:
            ``(layers, config)``: what the builder returned, and its arguments with
            ``name`` added (what a checkpoint records).

        Raises:
            ValueError: as ``resolve``.

        Example:
            >>> registry = FlowRegistry("numpy")
            >>> _ = registry.register("radial")(lambda dim, num_layers: ["radial"] * num_layers)
            >>> registry.build("radial", 2)[0]  # the family's default depth: 8
            ['radial', 'radial', 'radial', 'radial', 'radial', 'radial', 'radial', 'radial']
        """
        builder, config = self.resolve(name, dim, num_layers, hidden_dims, options)
        return builder(**config), dict(config, name=name)


def check_event_dim(shape: tuple[int, ...], dim: int, what: str = "input") -> None:
    """Raise ``ValueError`` unless ``shape`` ends in ``dim``.

    Args:
        shape: an array's shape.
        dim: the flow's event size.
        what: the argument's name in the message.

    Raises:
        ValueError: ``shape`` is empty or its last entry is not ``dim``.

    Example:
        >>> check_event_dim((5, 3), 3)
        >>> check_event_dim((5, 2), 3)
        Traceback (most recent call last):
        ValueError: input has shape (5, 2), but this flow acts on vectors of size 3: the last dimension must be 3
    """
    if len(shape) == 0 or shape[-1] != dim:
        raise ValueError(
            f"{what} has shape {tuple(shape)}, but this flow acts on vectors of size {dim}: "
            f"the last dimension must be {dim}"
        )
