"""The backend-neutral training pieces: data checks, splits, early stopping, option errors."""

import numpy as np
import pytest

from pyroflows.fitting import (
    EarlyStopping, History, anneal_factor, check_data, check_finite_loss, check_fit_options,
    check_latent_sites, split_indices,
)


def test_check_data_names_the_problem():
    assert check_data(np.zeros((4, 2)), 2).shape == (4, 2)
    with pytest.raises(ValueError, match=r"shape \(num_points, dim\)"):
        check_data(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="3 columns but the flow has dim=2"):
        check_data(np.zeros((5, 3)), 2)
    data = np.zeros((6, 2))
    data[4, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf in 1 row\(s\) \(rows 4\)"):
        check_data(data, 2)


def test_split_is_a_partition():
    train, val = split_indices(103, 0.2, seed=3)
    assert len(val) == 21 and sorted(np.concatenate([train, val]).tolist()) == list(range(103))
    assert split_indices(10, 0.0)[1].size == 0


def test_early_stopping_counts_evaluations_without_improvement():
    stop = EarlyStopping(patience=2)
    assert stop.update(3.0, 0) and stop.update(2.0, 1)
    assert not stop.update(2.5, 2) and not stop.should_stop
    assert not stop.update(2.1, 3) and stop.should_stop
    assert stop.best == 2.0 and stop.best_step == 1
    assert not EarlyStopping(None).should_stop


def test_history_records():
    h = History()
    h.record(0, 1.5, 2.0)
    h.record(10, 1.0)
    assert h.as_dict()["loss"] == [1.5, 1.0] and h.validation_loss == [2.0]


def test_options_and_losses_fail_with_a_clear_message():
    check_fit_options("fit_mle", num_steps=3, lr=0.1, validation_fraction=0.0, patience=None, anneal_steps=0)
    with pytest.raises(ValueError, match="fit_mle: lr=-1 must be a positive number"):
        check_fit_options("fit_mle", lr=-1)
    with pytest.raises(ValueError, match=r"validation_fraction=1.0 must lie in \[0, 1\)"):
        check_fit_options("fit_mle", validation_fraction=1.0)
    with pytest.raises(ValueError, match="was NaN at step 12"):
        check_finite_loss(float("nan"), 12, "fit_reverse_kl: the target log-density")
    assert anneal_factor(0, 4) == 0.25 and anneal_factor(10, 4) == 1.0 and anneal_factor(5, 0) == 1.0


def test_latent_site_errors():
    with pytest.raises(ValueError, match="no latent sample sites"):
        check_latent_sites([])
    with pytest.raises(ValueError, match="site 'k' is discrete"):
        check_latent_sites([("a", False, "Normal"), ("k", True, "Categorical")])
