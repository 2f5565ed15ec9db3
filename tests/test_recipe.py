"""``fit_posterior``'s schedule, option checks and report (backend-neutral, numpy only)."""

import math
import warnings

import numpy as np
import pytest

from pyroflows.recipe import (
    RECIPE,
    PlateauSchedule,
    Recipe,
    TailIterates,
    best_iterate,
    check_posterior_options,
    make_report,
)


def run(schedule, window_losses):
    """Feed windows until the schedule stops; the rate used in each window."""
    rates = []
    for losses in window_losses:
        n = schedule.next_window()
        if not n:
            break
        rates.append(schedule.lr)
        schedule.update(losses[:n])
    return rates


def test_a_fixed_number_of_steps_decays_the_rate_exponentially_to_lr_final():
    recipe = Recipe(window=100, lr=2e-3, lr_final=1e-4)
    schedule = PlateauSchedule(recipe, num_steps=1000)
    rates = run(schedule, [np.zeros(100)] * 20)
    assert len(rates) == 10 and schedule.step == 1000 and schedule.reason == "num_steps"
    np.testing.assert_allclose(rates, [2e-3 * 0.05 ** (k / 10) for k in range(10)], rtol=1e-12)
    assert math.isclose(schedule.lr, 1e-4, rel_tol=1e-12)


def test_a_plateau_halves_the_rate_and_the_fit_stops_below_lr_final():
    recipe = Recipe(window=50, patience=2, lr=2e-3, lr_final=1e-4, decay=0.5)
    rng = np.random.default_rng(0)
    schedule = PlateauSchedule(recipe, num_steps=None)
    rates = run(schedule, [rng.normal(10.0, 1.0, 50) for _ in range(100)])
    # flat noise: the first window sets the best, then every `patience` windows the rate halves,
    # 2e-3 -> 1e-3 -> 5e-4 -> 2.5e-4 -> 1.25e-4, and the next halving would pass lr_final
    assert schedule.reason == "plateau"
    assert sorted(set(rates), reverse=True) == pytest.approx([2e-3, 1e-3, 5e-4, 2.5e-4, 1.25e-4])
    assert len(rates) == 1 + 2 * 5


def test_a_falling_loss_keeps_the_rate_until_max_steps():
    recipe = Recipe(window=10, max_steps=200)
    schedule = PlateauSchedule(recipe, num_steps=None)
    rates = run(schedule, [np.full(10, 100.0 - 5 * k) + np.linspace(0, 0.1, 10) for k in range(100)])
    assert set(rates) == {RECIPE.lr} and schedule.reason == "max_steps" and schedule.step == 200


def test_skipped_steps_do_not_count_as_losses():
    schedule = PlateauSchedule(Recipe(window=4, patience=1), num_steps=None)
    schedule.update([5.0, 5.0, 5.0, 5.0])
    schedule.update([np.nan, np.inf, 1.0, 1.0])  # the finite mean 1.0 beats 5.0
    assert schedule.lr == RECIPE.lr and schedule.best == 1.0


def tail_of_window_ends(schedule, window_losses):
    """Run the schedule, handing it the step number as each window-end 'iterate'; the tail kept."""
    tail = TailIterates(schedule)
    for losses in window_losses:
        n = schedule.next_window()
        if not n:
            break
        schedule.update(losses[:n])
        tail.add(schedule.step, n)
    return tail.iterates


def test_the_plateau_tail_is_the_windows_after_the_last_improvement_at_the_final_rate():
    recipe = Recipe(window=10, patience=2, lr=1e-3, lr_final=5e-4, decay=0.5)
    falling = [np.full(10, 100.0 - 10 * k) for k in range(3)]  # windows 1-3 improve
    flat = [np.full(10, 85.0)] * 2  # windows 4-5: no improvement, the rate halves to 5e-4
    lower = [np.full(10, 60.0), np.full(10, 50.0)]  # windows 6-7 improve at 5e-4
    tail = [np.full(10, 50.0)] * 2  # windows 8-9: the plateau that stops the fit
    schedule = PlateauSchedule(recipe, num_steps=None)
    assert tail_of_window_ends(schedule, falling + flat + lower + tail + tail) == [70, 80, 90]
    assert schedule.reason == "plateau" and schedule.step == 90


def test_a_fixed_run_keeps_the_windows_that_start_in_its_last_window_times_patience_steps_or_half():
    windows = [np.zeros(10)] * 20
    assert tail_of_window_ends(PlateauSchedule(Recipe(window=10, patience=3), num_steps=100), windows) == [80, 90, 100]
    assert tail_of_window_ends(PlateauSchedule(Recipe(window=10, patience=3), num_steps=25), windows) == [25]
    assert tail_of_window_ends(PlateauSchedule(Recipe(window=10), num_steps=1), windows) == [1]


def test_the_best_iterate_has_the_lowest_khat_and_nan_scores_worst():
    assert best_iterate([0.5, 0.2, 0.9]) == 1
    assert best_iterate([math.nan, 0.9]) == 1 and best_iterate([math.inf, math.nan, 3.0]) == 2


@pytest.mark.parametrize(
    "options, match",
    [
        ({"lr": -1.0}, "lr=-1.0 must be a positive number"),
        ({"lr_final": 1.0}, "lr_final=1.0 must not exceed lr"),
        ({"decay": 1.5}, "decay=1.5 must lie strictly between 0 and 1"),
        ({"window": 0}, "eval_every=0"),
        ({"num_particles": True}, "num_particles=True"),
        ({"select": "yes"}, "select='yes'"),
        ({"max_steps": float("inf")}, "num_steps=inf"),
        ({"learning_rate": 1e-3}, r"unknown option\(s\) \['learning_rate'\]"),
    ],
)
def test_bad_recipe_options_name_the_problem(options, match):
    with pytest.raises(ValueError, match=match):
        check_posterior_options(None, options)


def test_bad_num_steps_name_the_problem():
    with pytest.raises(ValueError, match="num_steps=0 must be a positive integer"):
        check_posterior_options(0, {})


def test_the_report_warns_above_khat_0_7_and_says_what_to_try():
    schedule = PlateauSchedule(RECIPE, None)
    diag = {"elbo": -3.0, "iwelbo": -2.5, "khat": 0.9, "ess": 12.0, "ess_fraction": 0.006}
    with pytest.warns(UserWarning, match=r"k-hat 0.90 > 0.7.*not trustworthy.*num_steps.*flow='nsf'.*non-centred"):
        report = make_report(diag, 1.5, schedule, "start")
    assert report["khat"] == 0.9 and report["seconds"] == 1.5 and report["start"] == "start"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_report({**diag, "khat": 0.5}, 1.0, schedule, "start")
    with pytest.warns(UserWarning, match="k-hat inf"):
        make_report({**diag, "khat": math.inf}, 1.0, schedule, "start")
