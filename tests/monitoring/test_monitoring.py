"""Stats and drift arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from dataflows.monitoring.drift_tests import psi
from dataflows.monitoring.windows import (
    DriftAccumulator,
    DriftPartial,
    DriftReference,
    ModelIdentity,
    MonitorState,
    OutputReference,
    StatsAccumulator,
    StatsPartial,
    drift_message,
    window_start,
)
from protos import waxserve_pb2 as pb

MODEL = ModelIdentity("wine", "m", "1", "abc", since_ms=5)


def reference() -> DriftReference:
    return DriftReference(
        features=("a",),
        edges=(np.array([0.0, 1.0]),),
        expected=(np.array([0.25, 0.5, 0.25]),),
        means=np.array([0.5]),
        stds=np.array([0.5]),
    )


def test_psi_is_zero_for_the_reference_and_grows_with_shift() -> None:
    expected = np.array([0.25, 0.5, 0.25])
    assert psi(expected, np.array([250, 500, 250])) == pytest.approx(0.0, abs=1e-5)
    small = psi(expected, np.array([30, 50, 20]))
    large = psi(expected, np.array([0, 10, 90]))
    assert 0 < small < 0.1 < 0.25 < large
    assert psi(expected, np.array([0, 0, 0])) == 0.0
    # Smoothed by half a record per bin: one record no longer reads as a PSI of 8 or 9
    # (the old 1e-4 floor on its nine empty bins did).
    deciles = np.full(10, 0.1)
    assert psi(deciles, np.eye(10, dtype=np.int64)[0]) < 1.0


def test_drift_accumulator_bins_like_the_profile() -> None:
    ref = reference()
    acc = DriftAccumulator.empty(ref)
    acc.add(ref, np.array([[-1.0], [0.0], [0.5], [1.0], [2.0]]))
    # side="right": a value on an edge goes to the bin above it.
    assert acc.counts[0].tolist() == [1, 2, 2]
    assert acc.n == 5 and acc.sums[0] == pytest.approx(2.5)


def test_a_record_lacking_a_feature_counts_for_the_others_only() -> None:
    # A model that does not use a feature scores records without it; drift must neither
    # count the gap in a bin (searchsorted puts NaN in the top one) nor average it in.
    ref = DriftReference(
        features=("a", "b"),
        edges=(np.array([0.0, 1.0]), np.array([0.0, 1.0])),
        expected=(np.array([0.25, 0.5, 0.25]), np.array([0.25, 0.5, 0.25])),
        means=np.array([0.5, 0.5]),
        stds=np.array([0.5, 0.5]),
    )
    acc = DriftAccumulator.empty(ref)
    acc.add(ref, np.array([[0.5, 0.5], [0.5, np.nan], [2.0, np.nan], [0.5, 0.25]]))
    acc.add(ref, np.array([[0.5, 0.75]]))  # a batch without gaps
    assert acc.n == 5
    assert acc.counts[0].tolist() == [0, 4, 1] and acc.counts[1].tolist() == [0, 3, 0]
    message = drift_message(DriftPartial(MODEL, ref, 0, 1000, acc))
    a, b = message.features
    assert a.mean == pytest.approx(0.8) and b.mean == pytest.approx(0.5)
    assert b.mean_shift_sigmas == pytest.approx(0.0)
    assert message.record_count == 5 and np.isfinite(message.max_psi)
    # A window where no record had the feature reports no mean for it, and no drift.
    empty = DriftAccumulator.empty(ref)
    empty.add(ref, np.array([[0.5, np.nan]]))
    _, only_gaps = drift_message(DriftPartial(MODEL, ref, 0, 1000, empty)).features
    assert only_gaps.mean == 0.0 and only_gaps.psi == 0.0 and list(only_gaps.bin_counts) == [0] * 3
    assert only_gaps.record_count == 0 and not only_gaps.HasField("p_value")  # nothing to test


def test_stats_accumulator_per_record_times() -> None:
    acc = StatsAccumulator()
    acc.add_call(10, 0.001)
    acc.add_call(1, 0.0005)
    acc.add_call(0, 1.0)
    assert acc.count == 11 and acc.total_s == pytest.approx(0.0015)
    assert acc.min_s == pytest.approx(0.0001) and acc.max_s == pytest.approx(0.0005)


def test_monitor_merges_shards_and_emits_each_window_once() -> None:
    ref = reference()
    state = MonitorState()
    for shard_values in ([[0.5]], [[2.0], [2.0]]):
        stats = StatsAccumulator()
        stats.add_call(len(shard_values), 0.001)
        state.add(StatsPartial(MODEL, 0, 1000, stats))
        drift = DriftAccumulator.empty(ref)
        drift.add(ref, np.array(shard_values))
        state.add(DriftPartial(MODEL, ref, 0, 1000, drift))
    later = StatsAccumulator()
    later.add_call(4, 0.001)
    state.add(StatsPartial(MODEL, 1000, 2000, later))
    assert state.next_close_ms() == 1000
    first = state.close(1000)
    stats_msgs = [m for m in first if isinstance(m, pb.ServingStats)]
    drift_msgs = [m for m in first if isinstance(m, pb.DriftMetrics)]
    assert [(s.window_count, s.usage_count) for s in stats_msgs] == [(3, 7)]
    assert stats_msgs[0].since_ms == 5
    assert drift_msgs[0].record_count == 3
    assert list(drift_msgs[0].features[0].bin_counts) == [0, 1, 2]
    # Two of three records in the top quarter: high PSI, but three records prove nothing.
    assert drift_msgs[0].judged and drift_msgs[0].max_psi > 0.25 and not drift_msgs[0].alarm
    assert 0.05 < drift_msgs[0].features[0].p_value <= 1
    assert state.close(1000) == []
    # The same window with a minimum of 4 records: too small to judge, no p-value.
    few = MonitorState()
    few.add(DriftPartial(MODEL, ref, 0, 1000, drift))
    (quiet,) = few.close(None, min_records=4)
    assert isinstance(quiet, pb.DriftMetrics) and not quiet.judged and not quiet.alarm
    assert not quiet.features[0].HasField("p_value") and quiet.features[0].record_count == 2
    rest = state.close(None)
    assert [m.window_count for m in rest] == [4]


def test_windows_align_to_the_epoch() -> None:
    assert window_start(12_345, 1000) == 12_000
    assert window_start(12_000, 1000) == 12_000


def test_monitor_forgets_the_oldest_models_only() -> None:
    state = MonitorState()
    models = [ModelIdentity("wine", "m", str(v), f"d{v}", since_ms=v) for v in range(40)]
    for model in models:
        stats = StatsAccumulator()
        stats.add_call(1, 0.001)
        state.add(StatsPartial(model, 0, 1000, stats))
        state.close(None)
    assert set(state.totals) == set(models[-16:])


def test_drift_bins_are_searchsorted_bins_for_every_value() -> None:
    rng = np.random.default_rng(7)
    edges = (np.array([0.0, 1.0, 2.0]), np.array([-5.0]), np.linspace(-1, 1, 9))
    reference = DriftReference(
        features=("a", "b", "c"),
        edges=edges,
        expected=tuple(np.full(len(e) + 1, 1 / (len(e) + 1)) for e in edges),
        means=np.zeros(3),
        stds=np.ones(3),
    )
    features = rng.normal(size=(500, 11)) * 3
    features[rng.random(features.shape) < 0.1] = np.nan  # absent values
    features[:10, 4] = [0.0, 1.0, 2.0, -0.0, 1e300, -1e300, 0.5, 2.5, np.nan, -1]  # on edges
    columns = [4, 0, 9]  # where the reference's features are in the record matrix
    acc = DriftAccumulator.empty(reference)
    acc.add(reference, features[:200, columns])
    acc.add(reference, features[200:, columns])
    for i, (column, e) in enumerate(zip(columns, edges, strict=True)):
        present = features[:, column][~np.isnan(features[:, column])]  # absent: not counted
        bins = np.searchsorted(e, present, side="right")
        np.testing.assert_array_equal(acc.counts[i], np.bincount(bins, minlength=len(e) + 1))
    # Absent values are left out of the sums (column 4's ±1e300 make its sum order-bound).
    np.testing.assert_allclose(acc.sums[1:], np.nansum(features[:, [0, 9]], axis=0))
    assert np.isfinite(acc.sums[0]) and acc.n == 500


def test_absurd_feature_values_never_make_the_drift_mean_infinite() -> None:
    """1e308 is a finite float every codec accepts; two of them overflow a plain sum, and
    the window's mean (and mean shift) would be infinite until it closed."""
    ref = reference()
    acc = DriftAccumulator.empty(ref)
    for _ in range(3):
        acc.add(ref, np.array([[1e308], [1e308], [0.5]]))
    assert np.isfinite(acc.sums).all()
    assert acc.counts[0].tolist() == [0, 3, 6]  # the bins see the true values
    message = drift_message(DriftPartial(MODEL, ref, 0, 10, acc))
    assert np.isfinite(message.features[0].mean)
    assert np.isfinite(message.features[0].mean_shift_sigmas)


def outputs_reference() -> DriftReference:
    """A feature, a classifier's classes and a numeric label, from 1,000 training rows."""
    return DriftReference(
        features=("a",),
        edges=(np.array([-1.2816, -0.8416, -0.5244, -0.2533, 0, 0.2533, 0.5244, 0.8416, 1.2816]),),
        # (standard normal deciles)
        expected=(np.full(10, 0.1),),
        means=np.array([0.0]),
        stds=np.array([1.0]),
        rows=1000,
        prediction=OutputReference(
            "prediction", np.array([0.7, 0.3, 0.0]), categories=("good", "bad")
        ),
        label=OutputReference(
            "quality", np.array([0.25, 0.5, 0.25]), edges=np.array([5.0, 6.0]), mean=5.5, std=1
        ),
    )


def window(
    ref: DriftReference, rng: np.random.Generator, n: int, shift: float = 0.0, bad: float = 0.3
) -> DriftAccumulator:
    acc = DriftAccumulator.empty(ref)
    acc.add(ref, rng.normal(shift, 1.0, (n, 1)))
    predicted = rng.choice(np.array(["good", "bad"], dtype=object), n, p=[1 - bad, bad])
    labels = rng.choice([4.0, 5.0, 6.0, np.nan], n, p=[0.2, 0.4, 0.2, 0.2])  # some unlabelled
    acc.add_outputs(ref, list(predicted), labels)
    return acc


def test_predictions_and_labels_are_tested_beside_the_features() -> None:
    ref = outputs_reference()
    rng = np.random.default_rng(5)
    quiet = drift_message(DriftPartial(MODEL, ref, 0, 1, window(ref, rng, 2000)), 0.01, 100)
    by_quantity = {f.quantity: f for f in quiet.features}
    assert set(by_quantity) == {"feature", "prediction", "label"}
    prediction, label = by_quantity["prediction"], by_quantity["label"]
    assert prediction.categorical and prediction.record_count == 2000
    assert list(prediction.bin_counts)[-1] == 0  # no unseen class
    assert label.feature == "quality" and 1500 < label.record_count < 1700  # labelled only
    assert label.mean == pytest.approx(5.0, abs=0.1) and label.mean_shift_sigmas < 0
    assert quiet.judged and not quiet.alarm
    assert all(f.HasField("p_value") and not f.drifted for f in quiet.features)
    # The model predicts "bad" twice as often: its prediction drifted, nothing else.
    drifted = drift_message(
        DriftPartial(MODEL, ref, 0, 1, window(ref, rng, 2000, bad=0.6)), 0.01, 100
    )
    assert drifted.alarm
    assert [f.quantity for f in drifted.features if f.drifted] == ["prediction"]


def test_a_window_too_small_to_judge_says_so_and_never_alarms() -> None:
    ref = outputs_reference()
    rng = np.random.default_rng(6)
    one = window(ref, rng, 1, shift=5.0)
    message = drift_message(DriftPartial(MODEL, ref, 0, 1, one), 0.01, 100)
    assert not message.judged and not message.alarm and message.record_count == 1
    assert message.alpha == 0.01
    assert not any(f.HasField("p_value") or f.drifted for f in message.features)
    # Judged, but the label had fewer records than the minimum: the label is not tested.
    acc = window(ref, rng, 150)
    acc.label_counts = np.array([10, 20, 10])
    message = drift_message(DriftPartial(MODEL, ref, 0, 1, acc), 0.01, 100)
    tested = {f.quantity: f.HasField("p_value") for f in message.features}
    assert message.judged and tested == {"feature": True, "prediction": True, "label": False}


def test_shards_merge_prediction_and_label_counts() -> None:
    ref = outputs_reference()
    rng = np.random.default_rng(7)
    a, b = window(ref, rng, 100), window(ref, rng, 50)
    assert a.prediction_counts is not None and b.prediction_counts is not None
    total = a.prediction_counts + b.prediction_counts
    state = MonitorState()
    state.add(DriftPartial(MODEL, ref, 0, 1000, a))
    state.add(DriftPartial(MODEL, ref, 0, 1000, b))
    (message,) = state.close(None, 0.01, 100)
    assert isinstance(message, pb.DriftMetrics) and message.record_count == 150
    prediction = next(f for f in message.features if f.quantity == "prediction")
    assert list(prediction.bin_counts) == total.tolist()
    # Labels of the wrong kind for the reference (text against a numeric one): not counted.
    acc = DriftAccumulator.empty(ref)
    acc.add_outputs(ref, None, np.array(["x"], dtype=object))
    assert acc.label_counts is not None and acc.label_counts.sum() == 0
