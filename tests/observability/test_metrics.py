"""Prometheus metrics move with what the flow does (in-process, default registry)."""

from __future__ import annotations

import math
from datetime import timedelta

import numpy as np
import pytest
from bytewax.testing import TestingSource
from flowtools import (
    ERROR_CSV,
    RECORDS_TOPIC,
    batch,
    csv_batch,
    descriptor,
    model_batch,
    record_bytes,
    run_flow,
    test_config,
    wine_lines,
)
from prometheus_client import REGISTRY, CollectorRegistry, Histogram

from dataflows.core.events import EventBus, Quality
from dataflows.monitoring.windows import (
    ModelIdentity,
    StatsAccumulator,
    StatsPartial,
    stats_message,
)
from dataflows.observability.metrics import (
    DEAD_LETTER_CLASSES,
    LAG_BUCKETS,
    RETIRED_MODELS_WITH_SERIES,
    UNKNOWN_DATA_TYPE,
    BatchHistogram,
    on_event,
)
from dataflows.runtimes import Prediction
from dataflows.scoring.shard import labelled_quality


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def wine_dead(stage: str, reason: str) -> dict[str, str]:
    """The labels of a wine dead letter's series."""
    return {"data_type": "wine", "stage": stage, "reason": reason}


def test_metrics_count_scoring_dead_letters_and_model_events() -> None:
    scored = dict(data_type="wine", model="wine-lr", version="1")
    before = {
        "scored": value("waxserve_records_scored_total", **scored),
        "latency": value("waxserve_scoring_latency_seconds_count", **scored),
        "batches": value("waxserve_batch_size_records_count", data_type="wine"),
        "missing": value("waxserve_dead_letters_total", **wine_dead("score", "missing_feature")),
        "bad_csv": value("waxserve_dead_letters_total", **wine_dead("decode", "bad_csv")),
        "digest": value("waxserve_dead_letters_total", **wine_dead("model", "digest_mismatch")),
        "installs": value("waxserve_model_installs_total", data_type="wine"),
        "received": value("waxserve_records_received_total", data_type="wine"),
        "lag": value("waxserve_end_to_end_lag_seconds_count", data_type="wine"),
        "labelled": value("waxserve_labelled_records_total", **scored),
        "rejections": value(
            "waxserve_model_rejections_total", data_type="wine", reason="digest_mismatch"
        ),
    }
    lr = descriptor("wine-lr")
    tampered = descriptor("wine-gbt", version="2", sha256="0" * 64)
    models = [
        model_batch(lr),
        TestingSource.PAUSE(timedelta(seconds=0.3)),
        model_batch(tampered, start=1),
    ]
    records = [
        TestingSource.PAUSE(timedelta(seconds=0.6)),
        batch(RECORDS_TOPIC, record_bytes(wine_lines()[::8]), partition=1),
        csv_batch(ERROR_CSV.read_text().splitlines()),
    ]
    run_flow(test_config(), models, records, events=EventBus(on_event))
    assert value("waxserve_records_scored_total", **scored) - before["scored"] == 200 + 2
    latency = value("waxserve_scoring_latency_seconds_count", **scored)
    assert latency - before["latency"] == 2  # one observation per model call
    assert value("waxserve_batch_size_records_count", data_type="wine") - before["batches"] == 2
    # Every decoded record is received; every scored one has a lag; the labelled ones count.
    received = value("waxserve_records_received_total", data_type="wine") - before["received"]
    assert received == 202 + 11
    assert value("waxserve_end_to_end_lag_seconds_count", data_type="wine") - before["lag"] == 202
    # The error file's good row and 200 wine rows carry quality; its no-quality row does not.
    assert value("waxserve_labelled_records_total", **scored) - before["labelled"] == 201
    dead = {
        (stage, reason): value("waxserve_dead_letters_total", **wine_dead(stage, reason))
        for stage, reason in (
            ("score", "missing_feature"),
            ("decode", "bad_csv"),
            ("model", "digest_mismatch"),
        )
    }
    assert dead[("score", "missing_feature")] - before["missing"] == 11
    assert dead[("decode", "bad_csv")] - before["bad_csv"] == 1
    assert dead[("model", "digest_mismatch")] - before["digest"] == 1
    assert value("waxserve_model_installs_total", data_type="wine") - before["installs"] == 1
    assert (
        value("waxserve_model_rejections_total", data_type="wine", reason="digest_mismatch")
        - before["rejections"]
        == 1
    )
    # Every dead-letter class is exported from the start (for data types with no contract
    # here, and for each data type from its first contract or model), and the list is
    # complete.
    samples = next(m for m in REGISTRY.collect() if m.name == "waxserve_dead_letters").samples
    for data_type in (UNKNOWN_DATA_TYPE, "wine"):
        classes = {
            (s.labels["stage"], s.labels["reason"])
            for s in samples
            if s.labels["data_type"] == data_type and s.name.endswith("_total")
        }
        assert classes == set(DEAD_LETTER_CLASSES), data_type
    # The serving model, and only it, in model_info.
    info = next(s for s in REGISTRY.collect() if s.name == "waxserve_model_info").samples
    serving = [s.labels for s in info if s.labels["data_type"] == "wine"]
    assert serving == [
        {
            "data_type": "wine",
            "model": "wine-lr",
            "version": "1",
            "sha256": lr.sha256,
            "format": "onnx",
        }
    ]
    # The drift window closed at end of input with 200 records: judged, its gauges set,
    # per quantity with the model's name and version as labels.
    version = {"data_type": "wine", "model": "wine-lr", "version": "1"}
    alcohol = {**version, "quantity": "feature", "feature": "alcohol"}
    assert value("waxserve_drift_window_records", **version) >= 200  # and good error rows
    assert value("waxserve_drift_judged", **version) == 1
    assert value("waxserve_drift_alarm", **version) in (0.0, 1.0)
    assert value("waxserve_drift_psi", **alcohol) > 0
    assert 0 < value("waxserve_drift_p_value", **alcohol) <= 1
    assert value("waxserve_drift_mean_shift_sigmas", **alcohol) != 0
    prediction = {**version, "quantity": "prediction", "feature": "prediction"}
    assert 0 < value("waxserve_drift_p_value", **prediction) <= 1


def test_batch_histogram_matches_prometheus_histogram() -> None:
    registry = CollectorRegistry()
    batched = BatchHistogram("lag_batched_seconds", "x", ["data_type"], LAG_BUCKETS, registry)
    single = Histogram(
        "lag_single_seconds", "x", ["data_type"], buckets=LAG_BUCKETS, registry=registry
    )
    values = np.array([0.0, 0.001, 0.0011, 0.05, 0.3, 7.0, 1e6, *LAG_BUCKETS])
    for half in (values[:5], values[5:]):
        batched.observe_many(("wine",), half)
    for v in values:
        single.labels("wine").observe(float(v))
    batched_samples = {
        (s.name.replace("batched", "single"), tuple(sorted(s.labels.items()))): s.value
        for m in batched.collect()
        for s in m.samples
    }
    single_samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for m in registry.collect()
        if m.name == "lag_single_seconds"
        for s in m.samples
        if not s.name.endswith("_created")
    }
    assert batched_samples == pytest.approx(single_samples)


def test_online_quality_of_a_classifier_and_a_regressor() -> None:
    labels = np.array([5.0, 6.0, np.nan, 7.0])
    classifier = Prediction(
        values=np.array([5.0, 5.0, 6.0, np.nan]),
        labels=["5", "5", "6", ""],
        probabilities=None,
        class_labels=(),
        valid=np.array([True, True, True, False]),
    )
    # Row 2 has no label, row 3 no prediction: two labelled, one right, squared errors 0 + 1.
    assert labelled_quality(classifier, labels) == Quality(2, 1.0, 2, 1)
    regressor = Prediction(
        values=np.array([5.5, 6.0, 6.0, 6.0]),
        labels=None,
        probabilities=None,
        class_labels=(),
        valid=np.ones(4, dtype=bool),
    )
    assert labelled_quality(regressor, labels) == Quality(3, 0.25 + 0 + 1.0, 3, None)
    assert labelled_quality(regressor, np.full(4, np.nan)) is None
    # A text label (a contract's STRING label field): accuracy only, no RMSE.
    species = np.array(["Adelie", None, "Gentoo"], dtype=object)
    text = Prediction(
        values=np.full(3, np.nan),
        labels=["Adelie", "Adelie", "Adelie"],
        probabilities=None,
        class_labels=(),
        valid=np.ones(3, dtype=bool),
    )
    assert labelled_quality(text, species) == Quality(2, 0.0, 0, 1)
    text_stats = StatsAccumulator()
    Quality(2, 0.0, 0, 1).add_to(text_stats)
    assert text_stats.rmse is None and text_stats.accuracy == 0.5

    model = ModelIdentity("wine", "wine-rf", "1", "0" * 64)
    stats = StatsAccumulator()
    stats.add_labelled(2, 1.0, 1)
    other = StatsAccumulator()
    other.add_labelled(2, 3.0, 2)
    stats.merge(other)
    message = stats_message(model, stats, StatsPartial(model, 0, 10, stats))
    assert message.window_labelled_count == 4
    assert message.window_rmse == pytest.approx(math.sqrt(4.0 / 4))
    assert message.window_accuracy == pytest.approx(3 / 4)


def test_metrics_follow_events_without_a_dataflow() -> None:
    from dataflows.core.events import BatchScored, ControlRejected, DeadLettered, ModelInstalled

    model = ModelIdentity("metrics-unit", "m", "3", "f" * 64, format=1)
    labels = dict(data_type="metrics-unit", model="m", version="3")
    bus = EventBus(on_event)
    bus.publish(ModelInstalled(model))
    bus.publish(BatchScored(model, 9, 10, 0.01, np.full(9, 0.5), Quality(4, 2.0, 4, None)))
    bus.publish(ControlRejected("metrics-unit", "contract", "incompatible_contract"))
    bus.publish(DeadLettered("metrics-unit", "decode", "no_data_type"))
    assert value("waxserve_records_scored_total", **labels) == 9
    assert value("waxserve_labelled_records_total", **labels) == 4
    assert value("waxserve_prediction_squared_error_total", **labels) == 2.0
    assert value("waxserve_model_installs_total", data_type="metrics-unit") == 1
    assert (
        value(
            "waxserve_model_rejections_total",
            data_type="metrics-unit",
            reason="incompatible_contract",
        )
        == 1
    )
    assert value("waxserve_end_to_end_lag_seconds_count", data_type="metrics-unit") == 9
    # A handler that fails is logged and skipped: the next one still runs.
    seen: list[object] = []

    def fail(_event: object) -> None:
        raise ZeroDivisionError

    EventBus(fail, seen.append).publish(DeadLettered("x", "decode", "undecodable"))
    assert len(seen) == 1


def _series(name: str, data_type: str) -> list[dict[str, str]]:
    return [
        s.labels
        for m in REGISTRY.collect()
        if m.name == name
        for s in m.samples
        if s.labels.get("data_type") == data_type and not s.name.endswith("_created")
    ]


def test_retired_models_lose_their_series_and_unknown_data_types_make_none() -> None:
    from dataflows.core.events import (
        BatchScored,
        ControlRejected,
        DeadLettered,
        DriftClosed,
        ModelServing,
    )
    from protos import waxserve_pb2 as pb

    bus = EventBus(on_event)
    models = [ModelIdentity("series-unit", "m", str(v), "a" * 64) for v in range(1, 5)]
    previous = None
    for model in models:  # each model serves in turn, scores and closes a drift window
        bus.publish(ModelServing(model, previous))
        bus.publish(BatchScored(model, 3, 3, 0.01, np.zeros(3), Quality(3, 1.0, 3, None)))
        drift = pb.DriftMetrics(
            data_type="series-unit", model_name="m", model_version=model.version, judged=True
        )
        drift.features.add(feature="f", psi=0.1, p_value=0.5, quantity="feature")
        bus.publish(DriftClosed(drift))
        previous = model
    # The serving model and the RETIRED_MODELS_WITH_SERIES before it keep their series.
    kept = {str(v) for v in range(5 - 1 - RETIRED_MODELS_WITH_SERIES, 5)}
    for name in (
        "waxserve_records_scored",
        "waxserve_labelled_records",
        "waxserve_prediction_squared_error",
    ):
        assert {s["version"] for s in _series(name, "series-unit")} == kept, name
    for name in ("waxserve_drift_alarm", "waxserve_drift_window_records", "waxserve_drift_psi"):
        assert {s["version"] for s in _series(name, "series-unit")} == kept, name
    assert {
        s["version"] for s in _series("waxserve_scoring_latency_seconds", "series-unit")
    } == kept
    # A rejection for a data type with no contract here: counted, under one label for all.
    before = value("waxserve_model_rejections_total", data_type=UNKNOWN_DATA_TYPE, reason="x")
    for i in range(5):
        bus.publish(ControlRejected(f"made-up-{i}", "model", "x"))
    after = value("waxserve_model_rejections_total", data_type=UNKNOWN_DATA_TYPE, reason="x")
    assert after - before == 5
    assert _series("waxserve_model_rejections", "made-up-0") == []
    # So with dead letters: a data type off the wire makes no series of its own.
    labels = {"stage": "score", "reason": "no_contract"}
    before = value("waxserve_dead_letters_total", data_type=UNKNOWN_DATA_TYPE, **labels)
    for i in range(5):
        bus.publish(DeadLettered(f"made-up-{i}", "score", "no_contract"))
    after = value("waxserve_dead_letters_total", data_type=UNKNOWN_DATA_TYPE, **labels)
    assert after - before == 5
    assert _series("waxserve_dead_letters", "made-up-0") == []
    # A known data type's dead letters are its own, every class exported at 0 first.
    assert value("waxserve_dead_letters_total", data_type="series-unit", **labels) == 0
    assert len(_series("waxserve_dead_letters", "series-unit")) == len(DEAD_LETTER_CLASSES)


def test_a_window_too_small_to_judge_keeps_the_last_judged_values() -> None:
    """The gauges per quantity show the last judged window; a one-record window after it
    shows only in the window's record count, judged 0 and alarm 0."""
    from dataflows.core.events import DriftClosed
    from protos import waxserve_pb2 as pb

    bus = EventBus(on_event)
    version = {"data_type": "small-unit", "model": "m", "version": "1"}
    alcohol = {**version, "quantity": "feature", "feature": "alcohol"}
    judged = pb.DriftMetrics(
        data_type="small-unit", model_name="m", model_version="1", record_count=500,
        judged=True, alarm=True,
    )  # fmt: skip
    judged.features.add(
        feature="alcohol", quantity="feature", psi=0.3, p_value=1e-6, mean_shift_sigmas=0.4
    )
    bus.publish(DriftClosed(judged))
    small = pb.DriftMetrics(data_type="small-unit", model_name="m", model_version="1")
    small.record_count = 1
    small.features.add(feature="alcohol", quantity="feature", psi=8.9, mean_shift_sigmas=3.0)
    bus.publish(DriftClosed(small))
    assert value("waxserve_drift_window_records", **version) == 1
    assert value("waxserve_drift_judged", **version) == 0
    assert value("waxserve_drift_alarm", **version) == 0
    assert value("waxserve_drift_psi", **alcohol) == 0.3
    assert value("waxserve_drift_p_value", **alcohol) == 1e-6
    assert value("waxserve_drift_mean_shift_sigmas", **alcohol) == 0.4
