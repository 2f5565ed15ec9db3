"""The `pyroflows demo` command (what `make demo` runs), at a few steps."""

import math
import re

import pytest

from pyroflows.cli import main


def test_demo_prints_a_table_of_elbos(capsys):
    main(["demo", "--flow", "realnvp", "--steps", "30", "--no-progress"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["AutoNormal (mean field)", "pyroflows 'realnvp'"]
    for row in rows:
        elbo = float(row.split("|")[2])
        assert math.isfinite(elbo) and elbo < 0
    assert re.search(r"30 SVI steps", out)


def test_demo_rejects_an_unknown_flow():
    with pytest.raises(SystemExit, match="unknown flow 'nope'"):
        main(["demo", "--flow", "nope", "--steps", "1"])


def test_demo_model_scores_vectorised_particles_like_single_ones():
    """The demo model broadcasts correctly under Pyro's particle plate."""
    import numpy as np
    import pyro
    import torch
    from pyro.infer import Trace_ELBO
    from pyro.infer.autoguide import AutoNormal

    from pyroflows.data import breast_cancer
    from pyroflows.torch.demo import logistic_regression

    x, y = (torch.as_tensor(a, dtype=torch.float64) for a in breast_cancer())
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(logistic_regression)
    guide(x, y)
    single = [Trace_ELBO().loss(logistic_regression, guide, x, y) for _ in range(200)]
    vectorised = Trace_ELBO(num_particles=200, vectorize_particles=True, max_plate_nesting=1).loss(
        logistic_regression, guide, x, y
    )
    assert abs(vectorised - np.mean(single)) < 4 * np.std(single) / np.sqrt(200) + 1e-6
