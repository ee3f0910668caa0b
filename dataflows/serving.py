"""The waxserve dataflow: run with `python -m bytewax.run dataflows.serving:flow`.

```
models  ─► decode_models ─► registry (per data type) ─► fan_out (every shard key) ─┐
records ─► decode_records ─► key "<data_type>#<partition % shards>" ───────────────┴► serve
serve ─► scored records ─► scored topic
      ─► stats / drift partials ─► monitor (per data type) ─► stats topic, drift topic
registry ─► model events ─► events topic
every stage ─► dead letters ─► DLQ topic
```

Step ids are the recovery contract: renaming one orphans its snapshots.
"""

from __future__ import annotations

import atexit
import copy
import gc
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

import bytewax.operators as op
from bytewax.dataflow import Dataflow, Stream
from bytewax.inputs import Source
from bytewax.operators import KeyedStream
from bytewax.outputs import Sink
from google.protobuf.message import DecodeError

from dataflows import metrics
from dataflows.config import Config
from dataflows.kafka_io import SinkItem, kafka_sinks, kafka_sources
from dataflows.monitoring import DriftPartial, MonitorState, StatsPartial
from dataflows.records import DeadLetter, RecordColumns, SourceBatch, decode_batch
from dataflows.runtimes import jvm_started
from dataflows.scoring import (
    DescriptorIn,
    ModelInstall,
    Registry,
    RegistryState,
    ScoredBatch,
    ShardScorer,
    ShardState,
)
from dataflows.state import PROCESS_STATE, start_state_server
from protos import waxserve_pb2 as pb

log = logging.getLogger(__name__)

T = TypeVar("T")
Clock = Callable[[], float]

SOURCE_NAMES = ("models", "records")
SINK_NAMES = ("scored", "stats", "drift", "events", "dlq")


def _at(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)


def decode_descriptors(batch: SourceBatch) -> list[DescriptorIn | DeadLetter]:
    """Models-topic messages as descriptors; undecodable ones as dead letters."""
    out: list[DescriptorIn | DeadLetter] = []
    for i, value in enumerate(batch.values):
        try:
            if value is None:
                raise DecodeError("message has no value (a tombstone)")
            descriptor = pb.ModelDescriptor.FromString(value)
        except DecodeError as exc:
            out.append(batch.dead_letter(i, "decode", "undecodable", f"model descriptor: {exc}"))
            continue
        out.append(
            DescriptorIn(
                descriptor, batch.topic, batch.partition, batch.offsets[i], batch.keys[i], value
            )
        )
    return out


class RegistryLogic(op.StatefulBatchLogic[DescriptorIn, Any, RegistryState]):
    """Bytewax wrapper of `Registry`: re-sends the model right after a resume, and polls
    for models loading in the background."""

    POLL = timedelta(milliseconds=5)

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def _restored(self) -> list[Any]:
        # The first activation after a resume re-sends the current model to every shard.
        return list(self.registry.on_resume()) if self.registry.resumed else []

    def on_batch(self, values: list[DescriptorIn]) -> tuple[Iterable[Any], bool]:
        out = self._restored()
        out.extend(self.registry.on_descriptors(values))
        return out, op.StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        if self.registry.resumed:
            return datetime.now(UTC)
        return datetime.now(UTC) + self.POLL if self.registry.loading else None

    def on_notify(self) -> tuple[Iterable[Any], bool]:
        out = self._restored()
        out.extend(self.registry.collect())
        return out, op.StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[Iterable[Any], bool]:
        # The input ended (a bounded run): every model read must still be installed.
        out = self._restored()
        out.extend(self.registry.collect(wait=True))
        return out, op.StatefulBatchLogic.RETAIN

    def snapshot(self) -> RegistryState:
        return self.registry.snapshot()


class ServeLogic(op.StatefulBatchLogic[ModelInstall | RecordColumns, Any, ShardState]):
    """Bytewax wrapper of `ShardScorer`; closes stats and drift windows on time."""

    def __init__(self, scorer: ShardScorer) -> None:
        self.scorer = scorer

    def on_batch(self, values: list[ModelInstall | RecordColumns]) -> tuple[Iterable[Any], bool]:
        out: list[Any] = self.scorer.close_windows()
        out.extend(self.scorer.on_values(values))
        out.extend(self.scorer.release_held())
        return out, op.StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        return _at(self.scorer.next_wakeup_s())

    def on_notify(self) -> tuple[Iterable[Any], bool]:
        out = self.scorer.close_windows() + self.scorer.release_held()
        return out, op.StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[Iterable[Any], bool]:
        # Input is over for this execution: nothing more will arrive to score held records.
        out = self.scorer.release_held(force=True) + self.scorer.close_windows(everything=True)
        return out, op.StatefulBatchLogic.RETAIN

    def snapshot(self) -> ShardState:
        state = self.scorer.state
        # Windows are mutated in place while scoring: hand Bytewax a copy.
        return ShardState(
            spec=state.spec,
            stats={k: copy.deepcopy(v) for k, v in state.stats.items()},
            drift={k: copy.deepcopy(v) for k, v in state.drift.items()},
            pending=list(state.pending),
            pending_since_ms=state.pending_since_ms,
        )


class MonitorLogic(op.StatefulBatchLogic[StatsPartial | DriftPartial, Any, MonitorState]):
    """Adds up the shards' partials per window and emits stats and drift messages.

    A window is emitted `grace_s` after it ends, giving every shard time to report.
    """

    def __init__(
        self,
        state: MonitorState | None,
        *,
        threshold: float,
        min_records: int,
        grace_s: float,
        clock: Clock = time.time,
    ) -> None:
        self.state = state if state is not None else MonitorState()
        self._threshold = threshold
        self._min_records = min_records
        self._grace_ms = int(grace_s * 1000)
        self._clock = clock

    def _close(self, everything: bool = False) -> list[Any]:
        until = None if everything else int(self._clock() * 1000) - self._grace_ms
        closed = self.state.close(until, self._threshold, self._min_records)
        for message in closed:
            if isinstance(message, pb.DriftMetrics):
                metrics.drift_window_closed(message)
                PROCESS_STATE.drift_closed(message)
        return closed

    def on_batch(self, values: list[StatsPartial | DriftPartial]) -> tuple[Iterable[Any], bool]:
        for partial in values:
            self.state.add(partial)
        return self._close(), op.StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        end = self.state.next_close_ms()
        return None if end is None else _at((end + self._grace_ms) / 1000)

    def on_notify(self) -> tuple[Iterable[Any], bool]:
        return self._close(), op.StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[Iterable[Any], bool]:
        return self._close(everything=True), op.StatefulBatchLogic.RETAIN

    def snapshot(self) -> MonitorState:
        return copy.deepcopy(self.state)


def _only(step_id: str, up: Stream[Any], kind: type[T]) -> Stream[T]:
    return op.filter_map(step_id, up, lambda x: x if isinstance(x, kind) else None)


PROTOBUF_HEADERS = [("content-type", b"application/x-protobuf")]


def _protobuf_items(
    step_id: str, up: Stream[Any], key_of: Callable[[Any], str]
) -> Stream[SinkItem]:
    """Protobuf messages as sink items, keyed (and routed) by `key_of(message)`."""

    def item(message: Any) -> SinkItem:
        key = key_of(message)
        return key, [(key.encode(), message.SerializeToString(), PROTOBUF_HEADERS)]

    return op.map(step_id, up, item)


def build_flow(
    config: Config,
    sources: Mapping[str, Source[SourceBatch]],
    sinks: Mapping[str, Sink[SinkItem]],
    *,
    clock: Clock = time.time,
) -> Dataflow:
    """The waxserve dataflow over the given sources and sinks.

    `sources` has "models" and "records", each emitting `SourceBatch` items. `sinks` has
    "scored", "stats", "drift", "events" and "dlq"; each receives `(route_key, messages)`
    pairs where messages are (key, value, headers) tuples ready for Kafka.
    """
    missing = [n for n in SOURCE_NAMES if n not in sources]
    missing += [n for n in SINK_NAMES if n not in sinks]
    if missing:
        raise ValueError(f"build_flow: missing sources/sinks {missing}")
    shards = config.shards
    flow = Dataflow("waxserve")

    # Models: decode, validate per data type, fan out to every shard of the data type.
    model_batches = op.input("models_in", flow, sources["models"])
    model_items = op.flat_map("decode_models", model_batches, decode_descriptors)
    descriptors = _only("descriptors", model_items, DescriptorIn)
    registry = op.stateful_batch(
        "registry",
        op.key_on("key_models", descriptors, lambda d: d.data_type),
        lambda state: RegistryLogic(
            Registry(
                state, model_dir=config.model_dir, clock=clock, onnx_threads=config.onnx_threads
            )
        ),
    )
    registry_out = op.map("registry_values", registry, lambda kv: kv[1])
    installs = op.flat_map(
        "fan_out",
        _only("installs", registry_out, ModelInstall),
        lambda m: [(f"{m.spec.identity.data_type}#{s}", m) for s in range(shards)],
    )

    # Records: decode a batch into runs per data type, keyed by shard.
    record_batches = op.input("records_in", flow, sources["records"])
    record_items = op.flat_map("decode_records", record_batches, _decode)
    runs = op.filter_map(
        "key_records",
        record_items,
        lambda r: (
            (f"{r.data_type}#{r.partition % shards}", r) if isinstance(r, RecordColumns) else None
        ),
    )

    served = op.stateful_batch(
        "serve",
        cast(KeyedStream[ModelInstall | RecordColumns], op.merge("serve_in", installs, runs)),
        lambda state: ServeLogic(
            ShardScorer(
                state,
                stats_interval_s=config.stats_interval_s,
                drift_window_s=config.drift_window_s,
                no_model_wait_s=config.no_model_wait_s,
                clock=clock,
                onnx_threads=config.onnx_threads,
                monitoring=config.monitoring,
            )
        ),
    )
    served_values = op.map("served_values", served, lambda kv: kv[1])

    scored = _only("scored", served_values, ScoredBatch)
    op.output(
        "scored_out",
        op.map("scored_items", scored, lambda b: (b.route, b.messages)),
        sinks["scored"],
    )

    partials = op.filter_map(
        "partials",
        served_values,
        lambda p: (p.model.data_type, p) if isinstance(p, StatsPartial | DriftPartial) else None,
    )
    monitored = op.stateful_batch(
        "monitor",
        partials,
        lambda state: MonitorLogic(
            state,
            threshold=config.drift_psi_threshold,
            min_records=config.drift_min_records,
            grace_s=min(2.0, config.stats_interval_s / 2),
            clock=clock,
        ),
    )
    monitor_values = op.map("monitor_values", monitored, lambda kv: kv[1])

    def model_key(m: pb.ServingStats | pb.DriftMetrics) -> str:
        return f"{m.data_type}/{m.model_name}/{m.model_version}"

    stats = _only("stats", monitor_values, pb.ServingStats)
    op.output("stats_out", _protobuf_items("stats_items", stats, model_key), sinks["stats"])
    drift = _only("drift", monitor_values, pb.DriftMetrics)
    op.output("drift_out", _protobuf_items("drift_items", drift, model_key), sinks["drift"])
    events = _only("events", registry_out, pb.ModelEvent)
    op.output(
        "events_out", _protobuf_items("event_items", events, lambda e: e.data_type), sinks["events"]
    )

    dead = op.merge(
        "dead_letters",
        _only("dead_models", model_items, DeadLetter),
        _only("dead_registry", registry_out, DeadLetter),
        _only("dead_records", record_items, DeadLetter),
        _only("dead_serve", served_values, DeadLetter),
    )
    op.output("dlq_out", op.map("dlq_items", dead, _dead_letter_item), sinks["dlq"])
    return flow


def _dead_letter_item(dead: DeadLetter) -> SinkItem:
    metrics.DEAD_LETTERS.labels(dead.stage, dead.reason).inc()
    return f"{dead.topic}/{dead.partition}", [dead.to_message()]


def _decode(batch: SourceBatch) -> list[RecordColumns | DeadLetter]:
    runs, dead = decode_batch(batch)
    for run in runs:
        metrics.RECORDS_RECEIVED.labels(run.data_type).inc(len(run))
    return [*runs, *dead]


def _flow_from_env() -> Dataflow:
    logging.basicConfig(
        level=os.environ.get("WAXSERVE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    config = Config.from_env()
    flow = build_flow(config, kafka_sources(config), kafka_sinks(config))
    start_state_server(config.state_addr, config.state_peers)
    _tune_gc()
    _skip_finalization_after_the_jvm()
    return flow


def _skip_finalization_after_the_jvm() -> None:
    """End a process that ran the JVM with os._exit once the dataflow has returned.

    Interpreter finalization with JPype's JVM loaded aborts now and then: a thread left
    waiting for the GIL is ended with pthread_exit, which unwinds through JPype's C++
    ("FATAL: exception not rethrown", SIGABRT; seen in 1 of 17 bounded PMML runs even
    with JPype's exit hook on). Everything worth keeping is done by then: the sinks have
    flushed and the atexit handlers before this one have run. A run that ended with an
    uncaught exception finalizes as usual, so its exit status stays non-zero.
    """
    failed = False
    previous_hook = sys.excepthook

    def note_failure(*exc_info: Any) -> None:
        nonlocal failed
        failed = True
        previous_hook(*exc_info)

    def leave() -> None:
        if failed or not jvm_started():
            return
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    sys.excepthook = note_failure
    atexit.register(leave)


def _tune_gc() -> None:
    """Collect garbage cycles less often. Every batch allocates thousands of objects (a
    Kafka message is one, and tracked), and CPython's default first-generation threshold
    of 700 then runs the cycle collector over them several times per batch: 5% of the
    worker's time (py-spy, bench/README.md). Scoring creates no cycles; the collector
    still runs, after 50,000 allocations instead of 700. What was loaded at start-up is
    frozen out of every collection."""
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(50_000, second, third)


def __getattr__(name: str) -> Dataflow:
    # `flow` is built on first access, so importing this module (tests, tools) needs no
    # environment and no broker; `python -m bytewax.run dataflows.serving:flow` reads it.
    if name == "flow":
        value = _flow_from_env()
        globals()["flow"] = value
        return value
    raise AttributeError(name)
