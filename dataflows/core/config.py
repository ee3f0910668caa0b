"""Settings, read from `WAXSERVE_*` environment variables with defaults for a local run."""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

DELIVERY_MODES = ("at-least-once", "exactly-once")
"""The output delivery guarantees `Config.delivery` can ask for."""

PMML_MODES = ("auto", "on", "lazy", "off")
"""When `Config.pmml` starts the JVM that scores PMML (dataflows/runtimes/pmml.py)."""

SIGNATURE_POLICIES = ("require", "warn", "off")
"""What `Config.signature_policy` can ask of model descriptors (dataflows/control/signing.py)."""


OTHER_VARIABLES = {
    "WAXSERVE_LOG_LEVEL": "the dataflow's log level (DEBUG, INFO, WARNING, ERROR)",
    "WAXSERVE_CACHE_DIR": "where the Apache Kafka jars are kept (dataflows/tools/kafka_server)",
}
"""WAXSERVE_* variables that are not Config fields, read where they are used."""

REMOVED_VARIABLES = {
    "WAXSERVE_DRIFT_PSI_THRESHOLD": "drift alarms come from calibrated tests now: set the "
    "family-wise false-alarm rate with WAXSERVE_DRIFT_ALPHA instead",
}
"""Settings that are gone, and what replaces them: setting one fails at start-up, so
nobody believes it still does something."""

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_INTEGER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")

# What each number may be: (lowest, highest or None, what to say). Checked at start-up, so
# a bad value stops the process in one line instead of misbehaving later.
_BOUNDS: dict[str, tuple[float, float | None, str]] = {
    "shards": (1, None, "an integer >= 1"),
    "batch_size": (1, None, "an integer >= 1"),
    "fetch_wait_ms": (0, None, "milliseconds >= 0"),
    "linger_ms": (0, None, "milliseconds >= 0"),
    "stats_interval_s": (1e-3, None, "seconds > 0"),
    "drift_window_s": (1e-3, None, "seconds > 0"),
    "drift_alpha": (1e-6, 0.5, "a probability from 1e-06 to 0.5"),
    "drift_min_records": (0, None, "a record count >= 0"),
    "no_model_wait_s": (0, None, "seconds >= 0"),
    "onnx_threads": (1, 1024, "an integer from 1 to 1024"),
    "max_data_types": (1, None, "an integer >= 1"),
    "max_held_records": (0, None, "an integer >= 0"),
    "max_held_bytes": (0, None, "bytes >= 0"),
    "max_model_bytes": (1024, None, "bytes >= 1024"),
    "topic_replication_factor": (1, None, "an integer >= 1"),
    "feedback_horizon_s": (1e-3, None, "seconds > 0"),
    "feedback_label_wait_s": (0, None, "seconds >= 0"),
    "feedback_max_predictions": (1, None, "an integer >= 1"),
    "feedback_max_bytes": (1024, None, "bytes >= 1024"),
    "gate_max_latency_us": (1, None, "microseconds >= 1"),
    "canary_alpha": (1e-6, 0.5, "a probability from 1e-06 to 0.5"),
    "canary_margin": (1e-9, None, "a loss > 0"),
    "canary_min_records": (1, None, "a record count >= 1"),
    "canary_max_records": (1, None, "a record count >= 1"),
    "bandit_update_records": (1, None, "a record count >= 1"),
    "canary_max_error_rate": (1e-6, 0.999, "a rate from 1e-06 to 0.999"),
    "canary_max_slow_rate": (1e-6, 0.999, "a rate from 1e-06 to 0.999"),
    "canary_max_us_per_record": (0, None, "microseconds >= 0 (0: no time guard)"),
    "canary_max_disagreement": (0, 0.999, "a rate from 0 (no disagreement guard) to 0.999"),
    "canary_disagreement_tolerance": (0, None, "label standard deviations >= 0"),
}


class ConfigError(ValueError):
    """A setting has a value that cannot be used."""


@dataclass(frozen=True)
class Config:
    """All waxserve settings. `Config.from_env()` reads `WAXSERVE_<FIELD NAME IN CAPS>`.

    Kafka client settings beyond these go in `WAXSERVE_KAFKA_<librdkafka key with _ for .>`,
    e.g. `WAXSERVE_KAFKA_SECURITY_PROTOCOL=SASL_SSL`, `WAXSERVE_KAFKA_SASL_MECHANISM=PLAIN`.
    """

    brokers: str = "127.0.0.1:19092"
    # Contracts, model descriptors and serving commands, keyed by data type; one partition.
    control_topic: str = "waxserve-control"
    # The record topics, comma-separated; `topic=data_type` gives a topic's default data type.
    records_topics: str = "waxserve-records"
    # Where a record's data type comes from, tried in order: `header` (data_type_header),
    # `key` (the message key), `topic` (the topic's default in records_topics), `field` (a
    # JSON record's data_type_field: last by default, since it decodes every record once
    # more). A record with none is a dead letter.
    data_type_from: str = "header,topic,field"
    data_type_header: str = "data-type"
    data_type_field: str = "data_type"
    # A Confluent-API schema registry for Confluent-framed Avro records whose schema id is
    # not their contract's; empty: such records are dead letters.
    schema_registry_url: str = ""
    scored_topic: str = "waxserve-scored"
    stats_topic: str = "waxserve-stats"
    drift_topic: str = "waxserve-drift"
    events_topic: str = "waxserve-events"
    dlq_topic: str = "waxserve-dlq"
    # Serving plans: what shadow models score (ScoredRecord, variant_role "shadow").
    shadow_topic: str = "waxserve-shadow"
    # Delayed labels (README "Labels that arrive later"): messages carrying a record's id
    # and label, in its data type's encoding, read when feedback_data_types names any.
    feedback_topic: str = "waxserve-feedback"
    # Data types whose predictions are kept to join later labels to, comma-separated, or
    # "*" for every data type whose contract names an id and a label field; empty: none
    # (scoring then pays nothing for it). With exactly one, it is also the default data
    # type of the feedback topic's messages (the `topic` of data_type_from).
    feedback_data_types: str = ""
    # How long a prediction waits for its label (processing time); later labels are
    # counted as expired.
    feedback_horizon_s: float = 3600.0
    # How long a label with no prediction (yet) waits for one, then counts as unknown.
    feedback_label_wait_s: float = 30.0
    # Predictions kept per data type over the cluster, by count and bytes (each of the
    # `shards` feedback keys keeps its share); past either the oldest are evicted.
    feedback_max_predictions: int = 1_000_000
    feedback_max_bytes: int = 256 << 20
    # Serving plans judged on those labels (dataflows/rollout/judge.py): a canary is
    # promoted or rolled back by a sequential test at error rate `canary_alpha`; it may be
    # at most `canary_margin` worse in loss (0/1 error for classifiers; for regressors the
    # bounded error (e/s)^2 / (1 + (e/s)^2), s the label's reference std) and be promoted;
    # it decides after `canary_min_records` labelled records per model at the earliest,
    # and rolls back at `canary_max_records` without a decision. A bandit's weights move
    # every `bandit_update_records` labels.
    canary_alpha: float = 0.05
    canary_margin: float = 0.05
    canary_min_records: int = 200
    canary_max_records: int = 20_000
    bandit_update_records: int = 500
    # A canary's label-free guards (dataflows/rollout/guards.py), tested at the same error
    # rate: rolled back on evidence that it fails to score more than `canary_max_error_rate`
    # of its records, or (with a budget) scores more than `canary_max_slow_rate` of them
    # slower than `canary_max_us_per_record`, or (with a limit: the active model then scores
    # the canary's records too) answers more than `canary_max_disagreement` of them
    # otherwise than the active model: another class, or for regressors a value more than
    # `canary_disagreement_tolerance` label standard deviations away. Without labels,
    # promoted on evidence that it stays below every guard only with
    # `canary_promote_without_labels` (a canary someone watches by hand must not be
    # promoted behind their back).
    canary_max_error_rate: float = 0.01
    canary_max_slow_rate: float = 0.05
    canary_max_us_per_record: float = 0.0
    canary_max_disagreement: float = 0.0
    canary_disagreement_tolerance: float = 0.5
    canary_promote_without_labels: bool = False
    # How `waxserve topics` creates the topics that do not exist yet (existing ones are left
    # alone). Replication factor: 3 on a production cluster, 1 on a single broker.
    topic_replication_factor: int = 1
    # retention.ms of the record and output topics (Kafka's own default: 7 days); -1 keeps
    # them forever. Compacted topics keep the latest message per key whatever its age.
    topic_retention_ms: int = 604_800_000
    # cleanup.policy of the output topics: "delete" (by retention), "compact" or
    # "compact,delete". The control and marker topics are always compacted.
    output_cleanup_policy: str = "delete"
    # Records are keyed "<data_type>#<shard>"; shard = source partition % shards.
    # More shards than workers spreads the scoring over all of them.
    shards: int = 8
    # Max messages one consume() returns, i.e. the largest batch a model call scores.
    batch_size: int = 1000
    # librdkafka fetch.wait.max.ms: lower means lower latency, smaller batches.
    fetch_wait_ms: int = 5
    # Producer linger.ms: how long output waits to fill a produce request.
    linger_ms: int = 5
    # Serving stats are emitted once per interval; drift once per tumbling window.
    stats_interval_s: float = 10.0
    drift_window_s: float = 60.0
    # Family-wise false-alarm rate of a drift window: the chance that a window with no
    # drift raises the alarm, over all its features, prediction and label (README "Drift").
    drift_alpha: float = 0.005
    # Windows with fewer records are too small to judge: counts and PSI, no test, no alarm.
    drift_min_records: int = 100
    # Records that arrive before any model for their data type wait this long for one,
    # then go to the dead-letter topic.
    no_model_wait_s: float = 30.0
    # --- Limits: what one message, model or data type may cost (README "Limits") ---
    # Largest message the dataflow writes (key + value + headers): librdkafka's default
    # message.max.bytes. A dead letter past it keeps as much of the original as fits.
    max_message_bytes: int = 1_000_000
    # Largest control message (a descriptor with its model, a contract) and largest model
    # file at a file:// location; larger ones are rejected (model_too_large).
    max_model_bytes: int = 256 << 20
    # Data types a process holds state for (registries, and shards, each counted apart);
    # control messages and records of a new data type past it are refused (too_many_data_types).
    max_data_types: int = 1000
    # Records held for a contract or model, over all the shards of a process, by count and
    # by bytes (keys, values, headers); past either the newest are dead letters (held_overflow).
    max_held_records: int = 100_000
    max_held_bytes: int = 64 << 20
    # Directory that `file://` model locations must resolve into; empty refuses all locations.
    model_dir: str = ""
    # Model descriptors' signatures (README "Signed models"): "require" (unsigned, unknown
    # key or bad signature: rejected), "warn" (logged and in the model event) or "off".
    signature_policy: str = "warn"
    # Directory of the trusted Ed25519 public keys (*.pub, *.pem; a mounted Secret), read
    # again when it changes; empty: none trusted.
    trusted_keys_dir: str = ""
    # The quality gate's latency budget: mean model time per record on its test batch,
    # microseconds, unless the descriptor's golden set sets its own.
    gate_max_latency_us: float = 10_000.0
    # Output delivery: "at-least-once" (after a crash, output since the last snapshot is
    # written again) or "exactly-once" (Kafka transactions fenced by marker_topic; needs
    # recovery, README "Exactly-once output").
    delivery: str = "at-least-once"
    # Compacted topic where exactly-once output records what each transaction covered. It
    # also names the transactional producers, so each dataflow needs its own.
    marker_topic: str = "waxserve-markers"
    # Stop at the end of the input topics instead of tailing (tests, backfills).
    stop_at_end: bool = False
    # Serving stats and drift windows (stats and drift topics); off only to measure their cost.
    monitoring: bool = True
    # onnxruntime threads per session; 1 leaves the cores to the Bytewax workers.
    onnx_threads: int = 1
    # PMML's in-process JVM: "on" starts it at process start, before the dataflow runs;
    # "auto" when the first PMML model loads (off the scoring path, 1-4 s); "off" never
    # (PMML models are rejected: unsupported_model).
    pmml: str = "auto"
    # Queryable state (GET /models, /state/<data_type>, /processes): host:port to bind,
    # empty for none; loopback by default, since it is unauthenticated.
    state_addr: str = "127.0.0.1:3040"
    # Other processes' state addresses, comma-separated; empty: each `-a` host, same port.
    state_peers: str = ""
    kafka: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from dataflows.core.records import DATA_TYPE_SOURCES

        if not self.brokers.strip():
            raise ConfigError("WAXSERVE_BROKERS='': name at least one host:port")
        for name, (lowest, highest, allowed) in _BOUNDS.items():
            value = getattr(self, name)
            in_range = math.isfinite(value) and value >= lowest
            if not in_range or (highest is not None and value > highest):
                raise ConfigError(f"WAXSERVE_{name.upper()}={value!r}: must be {allowed}")
        if self.canary_max_records < self.canary_min_records:
            raise ConfigError(
                f"WAXSERVE_CANARY_MAX_RECORDS={self.canary_max_records!r}: must be at least "
                f"WAXSERVE_CANARY_MIN_RECORDS ({self.canary_min_records})"
            )
        if self.topic_retention_ms != -1 and self.topic_retention_ms < 1:
            raise ConfigError(
                f"WAXSERVE_TOPIC_RETENTION_MS={self.topic_retention_ms!r}: must be -1 "
                "(forever) or milliseconds >= 1"
            )
        if not self.record_topic_defaults:
            raise ConfigError(
                f"WAXSERVE_RECORDS_TOPICS={self.records_topics!r}: name at least one topic "
                "(topic or topic=data_type, comma-separated)"
            )
        sources = self.data_type_sources
        unknown = [s for s in sources if s not in DATA_TYPE_SOURCES]
        if unknown or not sources:
            raise ConfigError(
                f"WAXSERVE_DATA_TYPE_FROM={self.data_type_from!r}: each of "
                f"{', '.join(DATA_TYPE_SOURCES)}, comma-separated"
            )
        if self.pmml not in PMML_MODES:
            raise ConfigError(f"WAXSERVE_PMML={self.pmml!r}: one of {', '.join(PMML_MODES)}")
        if self.delivery not in DELIVERY_MODES:
            raise ConfigError(
                f"WAXSERVE_DELIVERY={self.delivery!r}: one of {', '.join(DELIVERY_MODES)}"
            )
        if self.signature_policy not in SIGNATURE_POLICIES:
            raise ConfigError(
                f"WAXSERVE_SIGNATURE_POLICY={self.signature_policy!r}: one of "
                f"{', '.join(SIGNATURE_POLICIES)}"
            )
        # Under "warn" the directory may be an optional Secret that is not there (yet):
        # nothing is trusted, and the log says so. Under "require" nothing could install.
        keys_dir = Path(self.trusted_keys_dir) if self.trusted_keys_dir else None
        if keys_dir is not None and keys_dir.exists() and not keys_dir.is_dir():
            raise ConfigError(
                f"WAXSERVE_TRUSTED_KEYS_DIR={self.trusted_keys_dir!r}: not a directory"
            )
        if self.signature_policy == "require" and (keys_dir is None or not keys_dir.is_dir()):
            raise ConfigError(
                f"WAXSERVE_SIGNATURE_POLICY=require needs WAXSERVE_TRUSTED_KEYS_DIR, a "
                f"directory of trusted public keys (waxserve keys generate writes them); "
                f"it is {self.trusted_keys_dir!r}"
            )
        if self.model_dir and not Path(self.model_dir).is_dir():
            raise ConfigError(f"WAXSERVE_MODEL_DIR={self.model_dir!r}: not a directory")
        # Limits: each usable, and the output limit within the producer's.
        from dataflows.core.records import MIN_MESSAGE_BYTES

        if self.max_message_bytes < MIN_MESSAGE_BYTES:
            raise ConfigError(
                f"WAXSERVE_MAX_MESSAGE_BYTES={self.max_message_bytes!r}: must be bytes >= "
                f"{MIN_MESSAGE_BYTES}"
            )
        # A message librdkafka refuses would stop the dataflow: never ask for more.
        producer = str(self.kafka.get("message.max.bytes", ""))
        if producer.isascii() and producer.isdigit() and self.max_message_bytes > int(producer):
            raise ConfigError(
                f"WAXSERVE_MAX_MESSAGE_BYTES={self.max_message_bytes!r}: must not be above "
                f"the producer's message.max.bytes ({producer}, WAXSERVE_KAFKA_MESSAGE_MAX_BYTES)"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Settings from `WAXSERVE_*` variables in `env` (default: the process environment)."""
        env = os.environ if env is None else env
        _check_names(env)
        values: dict[str, object] = {}
        for f in fields(cls):
            if f.name == "kafka":
                continue
            raw = env.get(f"WAXSERVE_{f.name.upper()}")
            if raw is None:
                continue
            values[f.name] = _parse(f.name, str(f.type), raw)
        prefix = "WAXSERVE_KAFKA_"
        values["kafka"] = {
            k[len(prefix) :].lower().replace("_", "."): v
            for k, v in env.items()
            if k.startswith(prefix)
        }
        return cls(**values)  # type: ignore[arg-type]

    def client_config(self) -> dict[str, str | int | float | bool]:
        """librdkafka settings shared by every consumer and producer (brokers, SASL, TLS)."""
        return {"bootstrap.servers": self.brokers, **self.kafka}

    @property
    def record_topic_defaults(self) -> dict[str, str]:
        """Each record topic with its default data type ("" when it has none)."""
        out: dict[str, str] = {}
        for item in self.records_topics.split(","):
            topic, _, data_type = item.strip().partition("=")
            if topic.strip():
                out[topic.strip()] = data_type.strip()
        return out

    @property
    def records_topic(self) -> str:
        """The first record topic: where tools send records unless told otherwise."""
        return next(iter(self.record_topic_defaults))

    @property
    def data_type_sources(self) -> tuple[str, ...]:
        """data_type_from as a tuple."""
        return tuple(s.strip() for s in self.data_type_from.split(",") if s.strip())

    @property
    def feedback_on(self) -> tuple[str, ...]:
        """feedback_data_types as a tuple ("*" for all); empty when feedback is off."""
        return tuple(s.strip() for s in self.feedback_data_types.split(",") if s.strip())

    @property
    def feedback_topic_defaults(self) -> dict[str, str]:
        """The feedback topic with its default data type (the one feedback data type)."""
        on = self.feedback_on
        return {self.feedback_topic: on[0] if len(on) == 1 and on[0] != "*" else ""}

    @property
    def output_topics(self) -> tuple[str, ...]:
        """Every topic the dataflow writes."""
        return (
            self.scored_topic,
            self.stats_topic,
            self.drift_topic,
            self.events_topic,
            self.dlq_topic,
            self.shadow_topic,
        )


def _check_names(env: Mapping[str, str]) -> None:
    """A WAXSERVE_* variable that no setting reads is a typo: say which one was meant."""
    known = {f"WAXSERVE_{f.name.upper()}" for f in fields(Config) if f.name != "kafka"}
    known |= set(OTHER_VARIABLES)
    for name in sorted(env):
        if not name.startswith("WAXSERVE_") or name in known:
            continue
        if name.startswith("WAXSERVE_KAFKA_") and len(name) > len("WAXSERVE_KAFKA_"):
            continue
        if name in REMOVED_VARIABLES:
            raise ConfigError(f"{name} is no longer a waxserve setting: {REMOVED_VARIABLES[name]}")
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(
            f'{name} is not a waxserve setting{hint} (README "Configuration"; librdkafka '
            "settings go in WAXSERVE_KAFKA_<key with _ for .>)"
        )


def log_level(env: Mapping[str, str] | None = None) -> str:
    """WAXSERVE_LOG_LEVEL, in any case, as a logging level name (default INFO)."""
    env = os.environ if env is None else env
    raw = env.get("WAXSERVE_LOG_LEVEL", "INFO")
    level = raw.strip().upper()
    if level == "WARN":
        level = "WARNING"
    if level not in LOG_LEVELS:
        raise ConfigError(f"WAXSERVE_LOG_LEVEL={raw!r}: one of {', '.join(LOG_LEVELS)}")
    return logging.getLevelName(logging.getLevelName(level))


def _parse(name: str, type_name: str, raw: str) -> object:
    # Python's int() and float() also take "7_4", full-width digits, "nan" and "inf": a
    # setting takes plain ASCII numbers only.
    text = raw.strip()
    try:
        if type_name == "int":
            if not _INTEGER.fullmatch(text):
                raise ValueError(raw)
            return int(text)
        if type_name == "float":
            if not _DECIMAL.fullmatch(text):
                raise ValueError(raw)
            return float(text)
        if type_name == "bool":
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
    except ValueError:
        what = {"int": "an integer", "float": "a number", "bool": "true or false"}[type_name]
        raise ConfigError(f"WAXSERVE_{name.upper()}={raw!r}: expected {what}") from None
    return raw
