"""Backend-neutral pieces of residual flows: estimator names, series lengths, layer options.

Both backends' ``ResidualBlock`` take their keyword arguments through
``block_options``, so an argument error reads the same on Pyro and on NumPyro, and a
layer built by hand is checked like one built by ``build_flow("residual", ...)``.
"""

from __future__ import annotations

__all__ = ["ESTIMATORS", "NOISES", "DEFAULT_NUM_TERMS", "block_options"]

#: "roulette": Russian-roulette series (unbiased); "truncated": n-term series (biased);
#: "exact": dense log-determinant (small dims).
ESTIMATORS = ("roulette", "truncated", "exact")
NOISES = ("gaussian", "rademacher")
#: ``num_terms=None`` means: 2 terms always computed before the roulette starts (Chen et
#: al. 2019), or a 10-term truncated series.
DEFAULT_NUM_TERMS = {"roulette": 2, "truncated": 10, "exact": 0}


def block_options(**options) -> dict:
    """Validate a residual block's options against ``SPECS["residual"]`` and fill in defaults.

    Raises ``ValueError`` naming the option and its valid values; ``num_terms=None``
    becomes the estimator's default (``DEFAULT_NUM_TERMS``).
    """
    from .registry import SPECS

    spec = SPECS["residual"]
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ValueError(f"ResidualBlock has no option {', '.join(map(repr, unknown))}; valid: {sorted(spec.options)}")
    out = {name: opt.default for name, opt in spec.options.items()}
    out.update({name: spec.options[name].validate("residual", name, value) for name, value in options.items()})
    if out["num_terms"] is None:
        out["num_terms"] = DEFAULT_NUM_TERMS[out["estimator"]]
    return out
