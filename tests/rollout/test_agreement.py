"""A shadow model's agreement with the active model (dataflows/monitoring/windows.py)."""

from __future__ import annotations

import numpy as np
import pytest

from dataflows.monitoring.windows import AgreementAccumulator


def test_classifiers_agreement_rate_and_confusion_add_up_over_shards() -> None:
    one = AgreementAccumulator("lr", "1")
    one.add_labels(["a", "a", "b"], ["a", "b", "b"])
    two = AgreementAccumulator("lr", "1")
    two.add_labels(["c"], ["a"])
    one.merge(two)
    message = one.to_proto()
    assert (message.compared_count, message.agree_count) == (4, 2)
    assert message.agreement_rate == 0.5
    assert list(message.confusion.classes) == ["a", "b", "c"]
    # rows: the active model's label; columns: the shadow's
    assert list(message.confusion.counts) == [1, 1, 0, 0, 1, 0, 1, 0, 0]
    assert not message.HasField("mean_absolute_difference")


def test_regressors_mean_absolute_difference() -> None:
    acc = AgreementAccumulator("lr", "1")
    acc.add_values(np.array([1.0, 2.0, 3.0]), np.array([1.5, 2.0, 2.0]))
    message = acc.to_proto()
    assert message.mean_absolute_difference == pytest.approx(0.5)
    assert not message.HasField("agreement_rate")


def test_the_confusion_matrix_stops_growing_past_32_labels() -> None:
    acc = AgreementAccumulator("lr", "1")
    labels = [f"c{i}" for i in range(40)]
    acc.add_labels(labels, labels)
    message = acc.to_proto()
    assert message.compared_count == 40 and message.agree_count == 40
    assert len(message.confusion.classes) == 32 and sum(message.confusion.counts) == 32
