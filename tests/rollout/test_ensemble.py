"""Combining an ensemble's members (dataflows/rollout/ensemble.py)."""

from __future__ import annotations

import numpy as np
import pytest

from dataflows.rollout.ensemble import EnsembleError, combine
from dataflows.runtimes import Prediction

NAN = float("nan")


def regressor(*values: float) -> Prediction:
    array = np.array(values, dtype=np.float64)
    return Prediction(array, None, None, (), ~np.isnan(array))


def classifier(labels: list[str], probabilities: list[list[float]] | None = None) -> Prediction:
    p = np.array(probabilities, dtype=np.float64) if probabilities is not None else None
    valid = np.array([bool(label) for label in labels])
    values = np.full(len(labels), NAN)
    return Prediction(values, labels, p, ("a", "b") if p is not None else (), valid)


def test_regressors_mean_and_median_skip_members_that_did_not_score() -> None:
    members = [regressor(1.0, 2.0, NAN), regressor(3.0, NAN, NAN), regressor(8.0, 4.0, NAN)]
    mean = combine(members, "mean")
    assert mean.values[:2].tolist() == [4.0, 3.0] and mean.valid.tolist() == [True, True, False]
    assert combine(members, "median").values[:2].tolist() == [3.0, 3.0]


def test_majority_ties_go_to_the_first_member_in_plan_order() -> None:
    members = [classifier(["a", "b", ""]), classifier(["b", "a", ""]), classifier(["b", "", ""])]
    out = combine(members, "majority")
    assert out.labels == ["b", "b", ""] and out.valid.tolist() == [True, True, False]


def test_mean_probabilities_and_first_confident() -> None:
    sure = classifier(["a", "b"], [[0.9, 0.1], [0.4, 0.6]])
    other = classifier(["b", "b"], [[0.3, 0.7], [0.2, 0.8]])
    mean = combine([sure, other], "mean")
    assert mean.labels == ["a", "b"]
    assert mean.probabilities is not None
    assert np.allclose(mean.probabilities, [[0.6, 0.4], [0.3, 0.7]])
    # The first member is confident enough on row 0 only; row 1 goes to the last member.
    assert combine([sure, other], "first_confident", 0.8).labels == ["a", "b"]


def test_members_that_cannot_be_combined_say_why() -> None:
    with pytest.raises(EnsembleError, match="mixes regressors and classifiers"):
        combine([regressor(1.0), classifier(["a"])], "mean")
    with pytest.raises(EnsembleError, match="regressors take mean or median"):
        combine([regressor(1.0), regressor(2.0)], "majority")
