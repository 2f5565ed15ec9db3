"""The backend-neutral training pieces: data checks, splits, early stopping, option errors,
the non-finite guard and the standardisation statistics."""

import math

import numpy as np
import pytest

from pyroflows.fitting import (
    MAX_BAD_STEPS,
    EarlyStopping,
    History,
    NonFiniteGuard,
    anneal_factor,
    check_data,
    check_finite_loss,
    check_first_log_density,
    check_fit_options,
    check_latent_sites,
    split_indices,
    standardization,
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
    # None in an object array is a missing value: reported as NaN
    with pytest.raises(ValueError, match=r"NaN or inf in 1 row\(s\) \(rows 1\)"):
        check_data(np.array([[1.0, 2.0], [None, 3.0], [4.0, 5.0]], dtype=object), 2)
    with pytest.raises(ValueError, match="my_fit: data is boolean"):
        check_data(np.zeros((4, 2), dtype=bool), 2, caller="my_fit")
    with pytest.raises(ValueError, match="data must be numeric, got an array of dtype <U1"):
        check_data([["a", "b"], ["c", "d"]])
    with pytest.raises(ValueError, match=r"data has shape \(3, 0\): no columns"):
        check_data(np.zeros((3, 0)))
    with pytest.raises(ValueError, match="data needs at least 2 rows"):
        check_data(np.zeros((1, 2)), 2)
    out = check_data(np.arange(6, dtype=np.int64), 1)  # integers cast to float; 1-D data for dim=1
    assert out.dtype == np.float64 and out.shape == (6, 1)


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
    assert h.as_dict()["skipped_steps"] == 0


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


def test_new_options_are_checked():
    check_fit_options("fit_mle", max_bad_steps=1, standardize=False)
    for value in (0, -3, 2.5, float("nan"), True):
        with pytest.raises(ValueError, match=rf"fit_mle: max_bad_steps={value!r} must be a positive integer"):
            check_fit_options("fit_mle", max_bad_steps=value)
    for value in (1, None, "yes"):
        with pytest.raises(ValueError, match=rf"fit_mle: standardize={value!r} must be True or False"):
            check_fit_options("fit_mle", standardize=value)
    for value in (float("inf"), float("nan"), True, 0.0):
        with pytest.raises(ValueError, match=rf"fit_mle: lr={value!r} must be a positive number"):
            check_fit_options("fit_mle", lr=value)


def test_standardization_is_the_mean_and_population_sd_of_each_column():
    x = np.array([[1.0, 10.0], [3.0, 10.0], [5.0, 40.0]])
    loc, scale = standardization(x)
    np.testing.assert_allclose(loc, [3.0, 20.0])
    np.testing.assert_allclose(scale, [math.sqrt(8 / 3), math.sqrt(200)])  # ddof 0: sum of squares / n


def test_standardization_warns_about_constant_columns_and_keeps_scale_one():
    x = np.stack([np.linspace(0, 1, 5), np.full(5, 7.0), 1e9 + np.full(5, 1e-3)], -1)
    with pytest.warns(RuntimeWarning, match=r"column\(s\) \[1, 2\] of the training data are constant.*Drop"):
        loc, scale = standardization(x)
    np.testing.assert_allclose(scale[1:], 1.0)
    np.testing.assert_allclose(loc[1], 7.0)
    with pytest.raises(ValueError, match="too large to standardise"):
        standardization(np.array([[1e300, 0.0], [-1e300, 1.0]]))


def test_first_log_density_error():
    check_first_log_density(0, 10, False)
    with pytest.raises(
        ValueError,
        match=r"returned NaN at 3 of 10 draws at its first evaluation \(step 1, before "
        r"any update\): the target is broken",
    ):
        check_first_log_density(3, 10, True)


def test_guard_skips_counts_and_resets():
    h = History()
    guard = NonFiniteGuard("fit_mle", 1e-3, h, max_bad_steps=3)
    assert guard.update(1, True, True)
    assert not guard.update(2, False) and not guard.update(3, True, False)  # two bad steps in a row
    assert guard.update(4, True, True)  # a good one resets the count
    assert not guard.update(5, False) and not guard.update(6, False)
    assert h.skipped_steps == 4 and guard.consecutive == 2
    assert MAX_BAD_STEPS == 20 and NonFiniteGuard("f", 1.0, History()).max_bad_steps == 20


def test_guard_names_the_cause():
    def fail(caller, steps, lr=1e-2):
        guard = NonFiniteGuard(caller, lr, History(), max_bad_steps=3)
        with pytest.raises(ValueError) as info:
            for step, args in enumerate(steps, 1):
                guard.update(step, *args)
        return str(info.value)

    # the target was not finite in the run of bad steps
    msg = fail("fit_reverse_kl", [(True, True), (False, True, 5), (False, True, 0), (False, True, 1)])
    assert msg.startswith("fit_reverse_kl: 3 consecutive steps (steps 2 to 4) were skipped because the loss was NaN")
    assert "target log-density returned NaN or inf at some of the flow's draws in 2 of them" in msg
    # no update has succeeded: the data (MLE) or the flow (reverse KL)
    assert "before any update: the flow's log-density is not finite on the data" in fail("fit_mle", [(False,)] * 3)
    assert "the flow's log-density of its own samples" in fail("fit_reverse_kl", [(False,)] * 3)
    # otherwise the learning rate, with a value to try
    msg = fail("fit_mle", [(True, True), (True, False), (False,), (True, False)], lr=0.03)
    assert "the loss was NaN or inf at 1 of them, only the gradient at 2" in msg
    assert "the learning rate lr=0.03 is too large for this flow" in msg and msg.endswith("Try lr=0.003")
