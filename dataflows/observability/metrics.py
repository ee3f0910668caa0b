"""waxserve's Prometheus metrics, in prometheus_client's default registry.

Bytewax serves that registry on `:3030/metrics` (with its own metrics) whenever
`BYTEWAX_DATAFLOW_API_ENABLED` is set; waxserve starts no server of its own. Every metric is
updated once per batch or per model event, never per record, so the hot path pays a few
microseconds per batch.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from dataflows.core.descriptors import FORMAT_NAMES
from dataflows.core.events import (
    BatchScored,
    ContractInstalled,
    ControlRejected,
    DeadLettered,
    DriftClosed,
    Event,
    FeedbackHeld,
    LabelsJoined,
    ModelInstalled,
    ModelServing,
    PlanChanged,
    RecordsReceived,
    ShadowCompared,
)
from dataflows.core.reasons import STAGE_REASONS
from protos import waxserve_pb2 as pb

LATENCY_BUCKETS = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3,
    1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
"""10 µs to 1 s."""

BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)

LAG_BUCKETS = (
    1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0,
)  # fmt: skip
"""1 ms to 5 min: live serving is milliseconds; a backlog being worked off is minutes."""


class BatchHistogram(Collector):
    """A histogram that takes a whole numpy array per call.

    prometheus_client's Histogram observes one value per call, which at 100k records/s
    costs more than the scoring; this one bins a batch with one `searchsorted`.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._upper = np.array([*buckets, np.inf])
        self._series: dict[tuple[str, ...], tuple[np.ndarray, list[float]]] = {}
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    def observe_many(self, labels: Sequence[str], values: np.ndarray) -> None:
        """Observe every value of a 1-D array under one label set."""
        if len(values) == 0:
            return
        # Bucket i counts values <= upper[i] (Prometheus's `le`), cumulated at collect.
        counts = np.bincount(
            np.searchsorted(self._upper, values, side="left"), minlength=len(self._upper)
        )
        total = float(values.sum())
        key = tuple(labels)
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = (np.zeros(len(self._upper), np.int64), [0.0])
            series[0][:] += counts[: len(self._upper)]
            series[1][0] += total

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        with self._lock:
            series = [(k, counts.cumsum(), total[0]) for k, (counts, total) in self._series.items()]
        for labels, cumulative, total in series:
            buckets = [
                (floatToGoString(upper), float(count))
                for upper, count in zip(self._upper, cumulative, strict=True)
            ]
            family.add_metric(list(labels), buckets, sum_value=total)
        yield family


RECORDS_SCORED = Counter(
    "waxserve_records_scored",
    "Records scored, by data type and model.",
    ["data_type", "model", "version"],
)
SCORING_LATENCY = Histogram(
    "waxserve_scoring_latency_seconds",
    "Model time per record: each model call observes its duration divided by its records.",
    ["data_type", "model", "version"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "waxserve_batch_size_records",
    "Records per model call.",
    ["data_type"],
    buckets=BATCH_BUCKETS,
)
RECORDS_RECEIVED = Counter(
    "waxserve_records_received",
    "Records decoded from the records topic, by data type (before validation and scoring).",
    ["data_type"],
)
END_TO_END_LAG = BatchHistogram(
    "waxserve_end_to_end_lag_seconds",
    "Time from a record's event_time_ms to its scoring, per record.",
    ["data_type"],
    LAG_BUCKETS,
)
LABELLED_RECORDS = Counter(
    "waxserve_labelled_records",
    "Scored records that carried a label (the contract's label field), by model.",
    ["data_type", "model", "version"],
)
SQUARED_ERROR = Counter(
    "waxserve_prediction_squared_error",
    "Sum of (prediction - label)^2 over labelled records; RMSE = sqrt(this / labelled).",
    ["data_type", "model", "version"],
)
CORRECT_PREDICTIONS = Counter(
    "waxserve_correct_predictions",
    "Classifiers: labelled records whose predicted class equals the label; accuracy = "
    "this / labelled.",
    ["data_type", "model", "version"],
)
SHADOW_COMPARED = Counter(
    "waxserve_shadow_compared_records",
    "Records a shadow (or a canary with a disagreement guard) and the active model both "
    "scored (serving plans).",
    ["data_type", "model", "version"],
)
SHADOW_AGREEMENTS = Counter(
    "waxserve_shadow_agreements",
    "Classifiers: compared records on which the shadow gave the active model's label.",
    ["data_type", "model", "version"],
)
SHADOW_ABSOLUTE_DIFFERENCE = Counter(
    "waxserve_shadow_absolute_difference",
    "Regressors: the sum of |shadow - active| over the compared records (divide by "
    "waxserve_shadow_compared_records_total for the mean).",
    ["data_type", "model", "version"],
)
PLAN_CHANGES = Counter(
    "waxserve_plan_changes",
    "Serving-plan changes by the registry, by the action that made them and by whom: "
    "`judge` (the rollout judge, automatic) or `operator` (anyone else; a new active model "
    "is action `install`).",
    ["data_type", "action", "by"],
)
PLAN_NUMBER = Gauge(
    "waxserve_plan_number",
    "The number of the serving plan in effect (it rises with every change).",
    ["data_type"],
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
    "Inputs sent to the dead-letter topic, by data type, stage and error class (data_type "
    '"(other)": a data type with no contract or model on this process).',
    ["data_type", "stage", "reason"],
)
DEAD_LETTER_CLASSES: tuple[tuple[str, str], ...] = tuple(
    (str(stage), str(reason)) for stage, reasons in STAGE_REASONS.items() for reason in reasons
)
"""Every (stage, reason) a dead letter can have."""


def _dead_letter_series(data_type: str) -> None:
    """Export every (stage, reason) of a data type at 0: rate() and increase() cannot see
    a counter's first event when the series appears with it."""
    for stage, reason in DEAD_LETTER_CLASSES:
        DEAD_LETTERS.labels(data_type, stage, reason)


# Drift (README "Drift"). Per quantity (feature, prediction, label) of a model version,
# the values of the last window that was judged: a window too small to judge leaves them.
_DRIFT_LABELS = ["data_type", "model", "version", "quantity", "feature"]
DRIFT_P_VALUE = Gauge(
    "waxserve_drift_p_value",
    "Calibrated p-value of no drift, in the last judged window (feature: the quantity's name).",
    _DRIFT_LABELS,
)
DRIFT_PSI = Gauge(
    "waxserve_drift_psi",
    "Population stability index in the last judged window: descriptive, never alarms.",
    _DRIFT_LABELS,
)
DRIFT_DRIFTED = Gauge(
    "waxserve_drift_drifted",
    "1 when the quantity drifted in the last judged window (Holm at WAXSERVE_DRIFT_ALPHA).",
    _DRIFT_LABELS,
)
DRIFT_MEAN_SHIFT = Gauge(
    "waxserve_drift_mean_shift_sigmas",
    "(window mean - reference mean) / reference std of a numeric quantity, last judged window.",
    _DRIFT_LABELS,
)
DRIFT_QUANTITY_GAUGES = (DRIFT_P_VALUE, DRIFT_DRIFTED, DRIFT_PSI, DRIFT_MEAN_SHIFT)
# Per model version, every closed window.
DRIFT_WINDOW_RECORDS = Gauge(
    "waxserve_drift_window_records",
    "Records in the last closed drift window of a model version.",
    ["data_type", "model", "version"],
)
DRIFT_JUDGED = Gauge(
    "waxserve_drift_judged",
    "1 when the last closed drift window had WAXSERVE_DRIFT_MIN_RECORDS records (was tested).",
    ["data_type", "model", "version"],
)
DRIFT_ALARM = Gauge(
    "waxserve_drift_alarm",
    "1 when the last closed drift window raised the alarm: a quantity drifted at the "
    "family-wise WAXSERVE_DRIFT_ALPHA (0 for a window too small to judge).",
    ["data_type", "model", "version"],
)
DRIFT_WINDOW_GAUGES = (DRIFT_WINDOW_RECORDS, DRIFT_JUDGED, DRIFT_ALARM)

# --- labels that arrive later (the feedback join): counters of the sums behind every
# online figure, so Prometheus computes the figures the stats topic carries ---------------
FEEDBACK_LABELS = Counter(
    "waxserve_feedback_labels",
    "Labels from the feedback topic by outcome: matched, unknown, expired, evicted, duplicate.",
    ["data_type", "outcome"],
)
FEEDBACK_OUTCOMES = ("matched", "unknown", "expired", "evicted", "duplicate")
FEEDBACK_PAIRS = Counter(
    "waxserve_feedback_pairs",
    "(prediction, label) pairs joined, by model.",
    ["data_type", "model", "version"],
)
FEEDBACK_SQUARED_ERROR = Counter(
    "waxserve_feedback_squared_error",
    "Regressors: sum of (prediction - label)^2 over joined pairs; RMSE = sqrt(this / pairs).",
    ["data_type", "model", "version"],
)
FEEDBACK_ABSOLUTE_ERROR = Counter(
    "waxserve_feedback_absolute_error",
    "Regressors: sum of |prediction - label| over joined pairs; MAE = this / pairs.",
    ["data_type", "model", "version"],
)
FEEDBACK_CORRECT = Counter(
    "waxserve_feedback_correct",
    "Classifiers: joined pairs predicted right; accuracy = this / pairs.",
    ["data_type", "model", "version"],
)
FEEDBACK_LOG_LOSS = Counter(
    "waxserve_feedback_log_loss",
    "Classifiers: sum of -ln p(true class), p clipped to [1e-15, 1]; log loss = this / pairs.",
    ["data_type", "model", "version"],
)
FEEDBACK_HELD = Gauge(
    "waxserve_feedback_held_predictions",
    "Predictions a feedback key of this process holds for labels to come.",
    ["data_type", "key"],
)
FEEDBACK_HELD_BYTES = Gauge(
    "waxserve_feedback_held_bytes",
    "Bytes of the predictions a feedback key of this process holds.",
    ["data_type", "key"],
)
FEEDBACK_MODEL_COUNTERS = (
    FEEDBACK_PAIRS,
    FEEDBACK_SQUARED_ERROR,
    FEEDBACK_ABSOLUTE_ERROR,
    FEEDBACK_CORRECT,
    FEEDBACK_LOG_LOSS,
)


def labels_joined(event: LabelsJoined) -> None:
    """Count a feedback key's label outcomes and the sums of its joined pairs."""
    counts = vars(event.counts)
    for outcome in FEEDBACK_OUTCOMES:
        # Every outcome's series exists from the first label on (rate() sees the first).
        FEEDBACK_LABELS.labels(event.data_type, outcome).inc(counts[outcome])
    for pairs in event.pairs:
        quality = pairs.quality()
        labels = (pairs.identity.data_type, pairs.identity.name, pairs.identity.version)
        FEEDBACK_PAIRS.labels(*labels).inc(quality.pairs)
        if quality.classifier:
            FEEDBACK_CORRECT.labels(*labels).inc(quality.correct)
            if quality.log_loss_count:
                FEEDBACK_LOG_LOSS.labels(*labels).inc(quality.log_loss)
        else:
            FEEDBACK_SQUARED_ERROR.labels(*labels).inc(quality.squared_error)
            FEEDBACK_ABSOLUTE_ERROR.labels(*labels).inc(quality.absolute_error)


def model_installed(data_type: str, name: str, version: str, sha256: str, fmt: int) -> None:
    """A model now serves `data_type`: count it and make it the data type's model_info."""
    for labels in list(MODEL_INFO._metrics):  # the previous model of this data type
        if labels[0] == data_type:
            MODEL_INFO.remove(*labels)
    MODEL_INFO.labels(data_type, name, version, sha256, FORMAT_NAMES.get(fmt, "unknown")).set(1)


def drift_window_closed(message: pb.DriftMetrics) -> None:
    """Publish a closed drift window: its records, whether it was judged and alarmed, and,
    when judged, each tested quantity's p-value, PSI and mean shift."""
    model = (message.data_type, message.model_name, message.model_version)
    DRIFT_WINDOW_RECORDS.labels(*model).set(message.record_count)
    DRIFT_JUDGED.labels(*model).set(1 if message.judged else 0)
    DRIFT_ALARM.labels(*model).set(1 if message.alarm else 0)
    for feature in message.features:
        if not feature.HasField("p_value"):  # not tested: its last tested values stand
            continue
        labels = (*model, feature.quantity or "feature", feature.feature)
        DRIFT_P_VALUE.labels(*labels).set(feature.p_value)
        DRIFT_DRIFTED.labels(*labels).set(1 if feature.drifted else 0)
        DRIFT_PSI.labels(*labels).set(feature.psi)
        if not feature.categorical:
            DRIFT_MEAN_SHIFT.labels(*labels).set(feature.mean_shift_sigmas)


CONTRACT_INSTALLS = Counter(
    "waxserve_contract_installs",
    "Data contracts installed by the registry.",
    ["data_type"],
)


RETIRED_MODELS_WITH_SERIES = 2
"""Models per data type that keep their series after newer ones took over: a scrape right
after a swap still sees the old model's last counts. Older ones' series are removed, so
a data type that swaps models every hour does not grow /metrics for good."""

UNKNOWN_DATA_TYPE = "(other)"
"""The data_type label of a rejection or dead letter of a data type with no contract or
model here: names off the wire must not each make a series (the events and dead-letter
topics name them). Series per data type are bounded by the registry's max_data_types."""
_dead_letter_series(UNKNOWN_DATA_TYPE)


class _SeriesBook:
    """Which models of each data type have series, most recently used last; thread-safe."""

    def __init__(self, kept: int) -> None:
        self._kept = kept
        self._models: dict[str, OrderedDict[tuple[str, str], None]] = {}
        self.data_types: set[str] = set()  # data types with a contract or model here
        self._lock = threading.Lock()

    def add_data_type(self, data_type: str) -> None:
        """A data type has a contract or a model here: it gets series of its own."""
        with self._lock:
            new = data_type not in self.data_types
            self.data_types.add(data_type)
        if new:
            _dead_letter_series(data_type)

    def touch(self, data_type: str, name: str, version: str) -> None:
        """A model of `data_type` serves or scored; retire the series of the oldest others."""
        self.add_data_type(data_type)
        with self._lock:
            models = self._models.setdefault(data_type, OrderedDict())
            models[(name, version)] = None
            models.move_to_end((name, version))
            evicted = []
            while len(models) > 1 + self._kept:
                evicted.append(models.popitem(last=False)[0])
        for old_name, old_version in evicted:
            _remove_model_series(data_type, old_name, old_version)


SERIES = _SeriesBook(RETIRED_MODELS_WITH_SERIES)
"""The models and data types this process's metrics have series for."""


def _remove_model_series(data_type: str, name: str, version: str) -> None:
    """Remove every series of one model of a data type."""
    for counter in (RECORDS_SCORED, LABELLED_RECORDS, SQUARED_ERROR, CORRECT_PREDICTIONS):
        _remove(counter, data_type, name, version)
    for counter in FEEDBACK_MODEL_COUNTERS:
        _remove(counter, data_type, name, version)
    _remove(SCORING_LATENCY, data_type, name, version)
    for gauge in DRIFT_WINDOW_GAUGES:
        _remove(gauge, data_type, name, version)
    for gauge in DRIFT_QUANTITY_GAUGES:
        for labels in list(gauge._metrics):
            if labels[:3] == (data_type, name, version):
                _remove(gauge, *labels)
    for labels in list(MODEL_INFO._metrics):
        if labels[:3] == (data_type, name, version):
            _remove(MODEL_INFO, *labels)


def _remove(metric: Counter | Gauge | Histogram, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # never had that series
        metric.remove(*labels)


def on_event(event: Event) -> None:
    """Update the metrics an event concerns: the event bus's Prometheus subscriber."""
    match event:
        case BatchScored(identity=identity, scored=scored, rows=rows, seconds=seconds):
            labels = (identity.data_type, identity.name, identity.version)
            SERIES.touch(*labels)
            RECORDS_SCORED.labels(*labels).inc(scored)
            SCORING_LATENCY.labels(*labels).observe(seconds / rows)
            BATCH_SIZE.labels(identity.data_type).observe(rows)
            END_TO_END_LAG.observe_many((identity.data_type,), event.lags_s)
            quality = event.quality
            if quality is not None:
                LABELLED_RECORDS.labels(*labels).inc(quality.labelled)
                SQUARED_ERROR.labels(*labels).inc(quality.squared_error)
                if quality.correct is not None:
                    CORRECT_PREDICTIONS.labels(*labels).inc(quality.correct)
        case RecordsReceived(data_type=data_type, count=count):
            RECORDS_RECEIVED.labels(data_type).inc(count)
        case ModelServing(identity=identity):
            SERIES.touch(identity.data_type, identity.name, identity.version)
        case ModelInstalled(identity=identity, restored=restored):
            SERIES.touch(identity.data_type, identity.name, identity.version)
            if not restored:
                MODEL_INSTALLS.labels(identity.data_type).inc()
            model_installed(
                identity.data_type,
                identity.name,
                identity.version,
                identity.sha256,
                identity.format,
            )
        case ControlRejected(data_type=data_type, reason=reason):
            known = data_type in SERIES.data_types
            MODEL_REJECTIONS.labels(data_type if known else UNKNOWN_DATA_TYPE, reason).inc()
        case ShadowCompared(shadow=shadow, agreement=agreement):
            labels = (shadow.data_type, shadow.name, shadow.version)
            SHADOW_COMPARED.labels(*labels).inc(agreement.compared)
            if agreement.classifier:
                SHADOW_AGREEMENTS.labels(*labels).inc(agreement.agree)
            else:
                SHADOW_ABSOLUTE_DIFFERENCE.labels(*labels).inc(agreement.absolute_difference)
        case PlanChanged(data_type=data_type, action=action, number=number):
            by = "judge" if event.automatic else "operator"
            PLAN_CHANGES.labels(data_type, action, by).inc()
            PLAN_NUMBER.labels(data_type).set(number)
        case ContractInstalled(data_type=data_type):
            SERIES.add_data_type(data_type)
            CONTRACT_INSTALLS.labels(data_type).inc()
        case DeadLettered(data_type=data_type, stage=stage, reason=reason):
            known = data_type in SERIES.data_types
            DEAD_LETTERS.labels(data_type if known else UNKNOWN_DATA_TYPE, stage, reason).inc()
        case DriftClosed(message=message):
            SERIES.touch(message.data_type, message.model_name, message.model_version)
            drift_window_closed(message)
        case LabelsJoined():
            labels_joined(event)
        case FeedbackHeld(data_type=data_type, key=key):
            FEEDBACK_HELD.labels(data_type, key).set(event.predictions)
            FEEDBACK_HELD_BYTES.labels(data_type, key).set(event.nbytes)
        case _:
            pass


# --- broker health: called by the Kafka I/O code (dataflows/io/kafka.py) ----------------------

KAFKA_CLIENTS = ("producer", "consumer")
"""The `client` label values of waxserve_kafka_unreachable."""

KAFKA_UNREACHABLE = Gauge(
    "waxserve_kafka_unreachable",
    "1 while a Kafka producer or consumer of this process cannot reach any broker, else 0.",
    ["client"],
)
INPUT_TOPIC_RESETS = Counter(
    "waxserve_input_topic_resets",
    "Times an input topic was deleted or re-created, or its offsets went backwards, under "
    "the dataflow.",
    ["topic"],
)
INPUT_PARTITION_STALLS = Counter(
    "waxserve_input_partition_stalls",
    "Times an input partition had records to read but returned none for a while, and was "
    "assigned again, or read by a new consumer where that did not move it (librdkafka's "
    "fetcher can stay stuck after a leader change).",
    ["topic"],
)
# Exported at 0 from the start: "reachable" is a value the alert compares with, not a gap.
for _client in KAFKA_CLIENTS:
    KAFKA_UNREACHABLE.labels(_client).set(0)

_unreachable_lock = threading.Lock()
_unreachable_count = dict.fromkeys(KAFKA_CLIENTS, 0)


def kafka_unreachable(client: str, down: bool) -> None:
    """A producer or consumer ("producer" or "consumer") lost every broker (`down`), or
    reaches one again.

    A process has several consumers (one per source topic) and flushes from several
    workers: calls are transitions of one client instance (each `down=True` is followed by
    one `down=False` of the same instance), counted, so the gauge is 1 while any is down.
    """
    with _unreachable_lock:
        count = max(0, _unreachable_count.get(client, 0) + (1 if down else -1))
        _unreachable_count[client] = count
        KAFKA_UNREACHABLE.labels(client).set(1 if count else 0)


def unreachable_clients() -> list[str]:
    """The Kafka clients ("producer", "consumer") of this process that reach no broker now
    (what waxserve_kafka_unreachable shows): the health endpoint's readiness asks."""
    with _unreachable_lock:
        return [client for client, count in _unreachable_count.items() if count]


def input_partition_stalled(topic: str) -> None:
    """An input partition of `topic` stopped returning records it has: assigned again."""
    INPUT_PARTITION_STALLS.labels(topic).inc()


def input_topic_reset(topic: str) -> None:
    """An input topic was deleted or re-created, or its offsets went backwards under us:
    records may have been skipped or will be read again."""
    INPUT_TOPIC_RESETS.labels(topic).inc()
