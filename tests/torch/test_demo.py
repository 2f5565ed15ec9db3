"""The torch demo model."""


def test_demo_model_scores_vectorised_particles_like_single_ones():
    """The demo model broadcasts correctly under Pyro's particle plate."""
    import numpy as np
    import pyro
    import torch
    from pyro.infer import Trace_ELBO
    from pyro.infer.autoguide import AutoNormal

    from pyroflows.demo import breast_cancer
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
