"""Prometheus metrics move with what the flow does (in-process, default registry)."""

from __future__ import annotations

from datetime import timedelta

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
from prometheus_client import REGISTRY


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_metrics_count_scoring_dead_letters_and_model_events() -> None:
    scored = dict(data_type="wine", model="wine-lr", version="1")
    before = {
        "scored": value("waxserve_records_scored_total", **scored),
        "latency": value(
            "waxserve_scoring_latency_seconds_count", data_type="wine", model="wine-lr"
        ),
        "batches": value("waxserve_batch_size_records_count", data_type="wine"),
        "missing": value("waxserve_dead_letters_total", stage="score", reason="missing_feature"),
        "bad_csv": value("waxserve_dead_letters_total", stage="decode", reason="bad_csv"),
        "digest": value("waxserve_dead_letters_total", stage="model", reason="digest_mismatch"),
        "installs": value("waxserve_model_installs_total", data_type="wine"),
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
    run_flow(test_config(), models, records)
    assert value("waxserve_records_scored_total", **scored) - before["scored"] == 200 + 2
    latency = value("waxserve_scoring_latency_seconds_count", data_type="wine", model="wine-lr")
    assert latency - before["latency"] == 2  # one observation per model call
    assert value("waxserve_batch_size_records_count", data_type="wine") - before["batches"] == 2
    assert (
        value("waxserve_dead_letters_total", stage="score", reason="missing_feature")
        - before["missing"]
        == 11
    )
    assert (
        value("waxserve_dead_letters_total", stage="decode", reason="bad_csv") - before["bad_csv"]
        == 1
    )
    assert (
        value("waxserve_dead_letters_total", stage="model", reason="digest_mismatch")
        - before["digest"]
        == 1
    )
    assert value("waxserve_model_installs_total", data_type="wine") - before["installs"] == 1
    assert (
        value("waxserve_model_rejections_total", data_type="wine", reason="digest_mismatch")
        - before["rejections"]
        == 1
    )
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
    # The drift window closed at end of input; its gauges are set.
    assert (
        value(
            "waxserve_drift", data_type="wine", model="wine-lr:1", feature="alcohol", metric="psi"
        )
        > 0
    )
    assert REGISTRY.get_sample_value(
        "waxserve_drift_alarm", {"data_type": "wine", "model": "wine-lr:1"}
    ) in (0.0, 1.0)
