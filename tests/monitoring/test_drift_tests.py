"""The calibrated drift tests: their p-values under no drift, and what they catch."""

from __future__ import annotations

import numpy as np
import pytest

from dataflows.monitoring.drift_tests import (
    categorical_test,
    chi2_sf,
    draws_for,
    effective_size,
    holm,
    numeric_test,
    smoothed,
)

DECILES = np.full(10, 0.1)
SKEWED = np.array([0.4, 0.2, 0.1, 0.1, 0.05, 0.05, 0.04, 0.03, 0.02, 0.01])
CATEGORIES = np.array([0.6, 0.3, 0.09, 0.01, 0.0])  # the last: unseen in training


def null_p_values(
    expected: np.ndarray, n: int, rows: int, windows: int, test: str, seed: int = 1
) -> np.ndarray:
    """p-values of windows of n records drawn like the reference: the window from the
    truth, and, with `rows`, the reference itself from a sample of that many rows."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(windows):
        reference = rng.multinomial(rows, expected) / rows if rows else expected
        counts = rng.multinomial(n, expected)
        if test == "numeric":
            out.append(numeric_test(reference, counts, rows, draws=2000).p_value)
        else:
            out.append(categorical_test(reference, counts, rows, draws=2000).p_value)
    return np.asarray(out)


@pytest.mark.parametrize(
    ("x", "df", "p"),
    [(3.841, 1, 0.05), (5.991, 2, 0.05), (11.070, 5, 0.05), (16.919, 9, 0.05), (21.666, 9, 0.01)],
)
def test_chi_square_tail(x: float, df: int, p: float) -> None:
    assert chi2_sf(x, df) == pytest.approx(p, rel=2e-3)  # the textbook table
    assert chi2_sf(0.0, df) == 1.0 and chi2_sf(200.0, df) < 1e-30


@pytest.mark.parametrize("expected", [DECILES, SKEWED], ids=["deciles", "skewed"])
@pytest.mark.parametrize(("n", "rows"), [(20, 0), (100, 0), (2000, 0), (1000, 5000)])
def test_numeric_p_values_are_conservative_under_no_drift(
    expected: np.ndarray, n: int, rows: int
) -> None:
    """At every window size, and with a reference that is itself a sample: never more
    small p-values than their level (2,000 windows: 1% is 20 +- 4.5)."""
    p = null_p_values(expected, n, rows, 2000, "numeric")
    for level in (0.01, 0.05, 0.2):
        assert (p <= level).mean() <= level * 1.3 + 0.003, level


@pytest.mark.parametrize(("n", "rows"), [(30, 0), (300, 0), (300, 266)])
def test_categorical_p_values_are_calibrated_under_no_drift(n: int, rows: int) -> None:
    """Monte Carlo at the window's size: about as many small p-values as their level, even
    with a category of 1% and one never seen."""
    p = null_p_values(CATEGORIES, n, rows, 1000, "categorical")
    for level in (0.05, 0.2):
        assert (p <= level).mean() <= level * 1.4, level
    assert (p <= 0.2).mean() >= 0.1  # and not uselessly conservative


def test_a_shift_is_caught_and_its_size_reported() -> None:
    rng = np.random.default_rng(3)
    tilted = np.linspace(0.05, 0.15, 10)  # the top deciles fuller: a shift upwards
    counts = rng.multinomial(1000, tilted / tilted.sum())
    result = numeric_test(DECILES, counts, 1279)
    assert result.p_value < 1e-6 and 0.05 < result.distance < 0.3
    same = numeric_test(DECILES, np.full(10, 100), 1279)
    assert same.p_value == 1.0 and same.distance == pytest.approx(0.0, abs=1e-3)


def test_unseen_categories_are_drift() -> None:
    expected = np.array([0.5, 0.5, 0.0])
    seen = categorical_test(expected, np.array([50, 50, 0]), 300, draws=5000)
    assert seen.p_value > 0.5
    unseen = categorical_test(expected, np.array([45, 45, 10]), 300, draws=5000)
    assert unseen.p_value < 1e-3 and unseen.distance > 0.09


def test_monte_carlo_p_values_are_deterministic() -> None:
    counts = np.array([70, 20, 8, 2, 0])
    first = categorical_test(CATEGORIES, counts, 500, draws=3000).p_value
    categorical_test(CATEGORIES, counts + 1, 500, draws=3000)  # something else cached between
    assert categorical_test(CATEGORIES, counts, 500, draws=3000).p_value == first


def test_effective_size_and_smoothing() -> None:
    assert effective_size(1000, 0) == 1000
    assert effective_size(1000, 1000) == 500  # a reference as large as the window halves it
    p = smoothed(np.array([0.5, 0.5, 0.0]), 100)
    assert p.sum() == pytest.approx(1.0) and p[2] == pytest.approx(0.5 / 101.5)


def test_holm_controls_the_family() -> None:
    assert holm([0.001, 0.04, 0.3], 0.05) == [True, False, False]  # 0.04 > 0.05 / 2
    assert holm([0.001, 0.02, 0.3], 0.05) == [True, True, False]
    assert holm([0.02, 0.02], 0.01) == [False, False]
    assert holm([], 0.01) == []
    # Draws resolve the smallest threshold Holm can use.
    assert draws_for(0.01, 13) >= 20 * 13 / 0.01
