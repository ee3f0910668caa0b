"""waxserve's Prometheus metrics, in prometheus_client's default registry.

Bytewax serves that registry on `:3030/metrics` (with its own metrics) whenever
`BYTEWAX_DATAFLOW_API_ENABLED` is set; waxserve starts no server of its own. Every metric is
updated once per batch or per model event, never per record, so the hot path pays a few
microseconds per batch.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from dataflows.descriptors import FORMAT_NAMES
from protos import waxserve_pb2 as pb

LATENCY_BUCKETS = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3,
    1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
"""10 µs to 1 s."""

BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)

RECORDS_SCORED = Counter(
    "waxserve_records_scored",
    "Records scored, by data type and model.",
    ["data_type", "model", "version"],
)
SCORING_LATENCY = Histogram(
    "waxserve_scoring_latency_seconds",
    "Model time per record: each model call observes its duration divided by its records.",
    ["data_type", "model"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "waxserve_batch_size_records",
    "Records per model call.",
    ["data_type"],
    buckets=BATCH_BUCKETS,
)
MODEL_INSTALLS = Counter(
    "waxserve_model_installs",
    "Models installed (validated and loaded) by the registry.",
    ["data_type"],
)
MODEL_REJECTIONS = Counter(
    "waxserve_model_rejections",
    "Model descriptors rejected by the registry, by reason.",
    ["data_type", "reason"],
)
MODEL_INFO = Gauge(
    "waxserve_model_info",
    "1 for the model serving each data type (reported by the process holding its registry).",
    ["data_type", "model", "version", "sha256", "format"],
)
DEAD_LETTERS = Counter(
    "waxserve_dead_letters",
    "Inputs sent to the dead-letter topic, by stage and error class.",
    ["stage", "reason"],
)
DRIFT = Gauge(
    "waxserve_drift",
    "Drift of each feature in the last closed window: metric is psi or mean_shift_sigmas.",
    ["data_type", "model", "feature", "metric"],
)
DRIFT_ALARM = Gauge(
    "waxserve_drift_alarm",
    "1 when the last closed drift window of a model raised the alarm.",
    ["data_type", "model"],
)


def model_installed(data_type: str, name: str, version: str, sha256: str, fmt: int) -> None:
    """A model now serves `data_type`: count it and make it the data type's model_info."""
    for labels in list(MODEL_INFO._metrics):  # the previous model of this data type
        if labels[0] == data_type:
            MODEL_INFO.remove(*labels)
    MODEL_INFO.labels(data_type, name, version, sha256, FORMAT_NAMES.get(fmt, "unknown")).set(1)


def drift_window_closed(message: pb.DriftMetrics) -> None:
    """Publish a closed drift window's per-feature PSI and mean shift, and its alarm."""
    model = f"{message.model_name}:{message.model_version}"
    for feature in message.features:
        DRIFT.labels(message.data_type, model, feature.feature, "psi").set(feature.psi)
        DRIFT.labels(message.data_type, model, feature.feature, "mean_shift_sigmas").set(
            feature.mean_shift_sigmas
        )
    DRIFT_ALARM.labels(message.data_type, model).set(1 if message.alarm else 0)
