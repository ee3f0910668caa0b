"""The waxserve dataflow: run with `python -m bytewax.run dataflows.serving:flow`.

```
control ─► decode_control ─► registry (per data type) ─► installs ─► fan_out (its shards) ─┐
records ─► route (split by data type) ─► key "<data_type>#<shard of the partition>" ───────┴► serve
serve ─► scored records ─► scored topic
      ─► stats / drift partials ─► monitor (per data type) ─► stats topic, drift topic
registry ─► model events ─► events topic
every stage ─► dead letters ─► DLQ topic
```

Records travel undecoded to their shard, where the data type's contract decodes them: the
contract is data from the control topic, held by the shard with the model. Every mixed
stream is split once, by type (`split`). Step ids are the recovery contract: renaming one
orphans its snapshots.
"""

from __future__ import annotations

import atexit
import copy
import functools
import gc
import logging
import os
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import bytewax.operators as op
from bytewax.dataflow import Dataflow, Stream
from bytewax.inputs import Source
from bytewax.operators import KeyedStream
from bytewax.outputs import Sink

from dataflows.contracts.codecs.avro import schema_registry_resolver
from dataflows.control.registry import (
    CODECS,
    ControlIn,
    Install,
    ModelInstall,
    PlanInstall,
    Registry,
    RegistryState,
    decode_control,
)
from dataflows.control.signing import TrustedKeys
from dataflows.core import lifecycle
from dataflows.core.config import Config, ConfigError, log_level
from dataflows.core.descriptors import control_message
from dataflows.core.events import NO_EVENTS, DeadLettered, DriftClosed, EventBus
from dataflows.core.output import OutBatch, SinkItem
from dataflows.core.records import (
    DataTypeRouter,
    DeadLetter,
    Headers,
    OutMessage,
    RawRun,
    SourceBatch,
)
from dataflows.io.kafka import check_topics, kafka_sinks, kafka_sources
from dataflows.monitoring.feedback import (
    FEEDBACK_CODECS,
    Feedback,
    FeedbackJoin,
    FeedbackRun,
    FeedbackState,
    JoinedPairs,
    LabelBatch,
    PredictionBatch,
    per_key_bound,
)
from dataflows.monitoring.windows import DriftPartial, MonitorState, StatsPartial
from dataflows.observability import metrics
from dataflows.observability.state import PROCESS_STATE, start_state_server
from dataflows.rollout.guards import CanaryGuards, GuardCounts, label_scale
from dataflows.rollout.judge import JudgeSettings, JudgeState, RolloutJudge
from dataflows.rollout.plans import ServingPlan, model_key
from dataflows.runtimes import java_missing, jvm_started, set_jvm_policy
from dataflows.runtimes.pmml import warm_up
from dataflows.scoring.shard import ScoredBatch, ShardScorer, ShardState
from dataflows.tools.broker import control_message_key
from protos import waxserve_pb2 as pb

log = logging.getLogger(__name__)

Clock = Callable[[], float]

SOURCE_NAMES = ("control", "records")
FEEDBACK_SOURCE = "feedback"  # optional: labels that arrive later
SINK_NAMES = ("scored", "stats", "drift", "events", "dlq")
SHADOW_SINK = "shadow"  # optional: shadow models' output
CONTROL_SINK = "control"  # optional: the rollout judge's plan commands (the control topic)


def _at(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)


def shard_numbers(topics: Iterable[str], shards: int) -> Callable[[str, int], int]:
    """The shard number of each source partition: partition % shards, the topics' ranges
    offset from each other so that several topics spread over the shards too. Stable across
    processes and restarts (unlike Python's hash()), so a partition's records always meet
    the same state."""
    listed = list(topics)
    step = max(1, shards // max(1, len(listed)))
    offsets = {topic: i * step for i, topic in enumerate(listed)}

    def shard(topic: str, partition: int) -> int:
        offset = offsets.get(topic)
        if offset is None:
            offset = zlib.crc32(topic.encode())
        return (offset + partition) % shards

    return shard


def shard_key(data_type: str, shard: int) -> str:
    """The key of a data type's shard: the unit of scoring state and parallelism."""
    return f"{data_type}#{shard}"


def split(step_id: str, up: Stream[Any], *kinds: Any) -> list[Stream[Any]]:
    """A mixed stream split by type, one stream per kind in order (one `op.branch` per
    kind but the last, which takes the rest)."""
    out: list[Stream[Any]] = []
    rest = up
    for i, kind in enumerate(kinds[:-1]):
        branch: op.BranchOut[Any, Any] = op.branch(
            f"{step_id}_{i}", rest, functools.partial(_is_a, kind)
        )
        out.append(branch.trues)
        rest = branch.falses
    out.append(rest)
    return out


def _is_a(kind: Any, value: Any) -> bool:
    return isinstance(value, kind)


class RegistryLogic(op.StatefulBatchLogic[ControlIn, Any, RegistryState]):
    """Bytewax wrapper of `Registry`: re-sends the contract and model right after a resume,
    and polls for models loading in the background."""

    POLL = timedelta(milliseconds=5)

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def _keep(self) -> bool:
        # A data type whose control messages were all refused holds nothing: dropping its
        # registry keeps names off the wire from growing state.
        registry = self.registry
        if registry.holds_anything or registry.loading or registry.resumed:
            return op.StatefulBatchLogic.RETAIN
        return op.StatefulBatchLogic.DISCARD

    def _restored(self) -> list[Any]:
        # The first activation after a resume re-sends the current model to every shard.
        return list(self.registry.on_resume()) if self.registry.resumed else []

    def on_batch(self, values: list[ControlIn]) -> tuple[Iterable[Any], bool]:
        out = self._restored()
        out.extend(self.registry.on_control(values))
        return out, self._keep()

    def notify_at(self) -> datetime | None:
        if self.registry.resumed:
            return datetime.now(UTC)
        return datetime.now(UTC) + self.POLL if self.registry.loading else None

    def on_notify(self) -> tuple[Iterable[Any], bool]:
        out = self._restored()
        out.extend(self.registry.collect())
        return out, self._keep()

    def on_eof(self) -> tuple[Iterable[Any], bool]:
        # The input ended (a bounded run): every model read must still be installed.
        out = self._restored()
        out.extend(self.registry.collect(wait=True))
        return out, self._keep()

    def snapshot(self) -> RegistryState:
        return self.registry.snapshot()


class ServeLogic(op.StatefulBatchLogic[Install | RawRun, Any, ShardState]):
    """Bytewax wrapper of `ShardScorer`; closes stats and drift windows on time."""

    def __init__(self, scorer: ShardScorer) -> None:
        self.scorer = scorer

    def _keep(self) -> bool:
        # A shard of a data type nobody installed holds nothing once its records are
        # dead-lettered: discarding it keeps a typo in a data type from growing state.
        if self.scorer.holds_anything:
            return op.StatefulBatchLogic.RETAIN
        return op.StatefulBatchLogic.DISCARD

    def on_batch(self, values: list[Install | RawRun]) -> tuple[Iterable[Any], bool]:
        out: list[Any] = self.scorer.close_windows()
        out.extend(self.scorer.on_values(values))
        out.extend(self.scorer.release_held())
        return out, self._keep()

    def notify_at(self) -> datetime | None:
        return _at(self.scorer.next_wakeup_s())

    def on_notify(self) -> tuple[Iterable[Any], bool]:
        out = self.scorer.close_windows() + self.scorer.release_held()
        return out, self._keep()

    def on_eof(self) -> tuple[Iterable[Any], bool]:
        # Input is over for this execution: nothing more will arrive to score held records.
        out = self.scorer.release_held(force=True) + self.scorer.close_windows(everything=True)
        return out, self._keep()

    def snapshot(self) -> ShardState:
        return self.scorer.state.snapshot()


class MonitorLogic(op.StatefulBatchLogic[StatsPartial | DriftPartial, Any, MonitorState]):
    """Adds up the shards' partials per window and emits stats and drift messages.

    A window is emitted `grace_s` after it ends, giving every shard time to report. Drift
    windows of at least `min_records` records are judged at family-wise rate `alpha`.
    """

    def __init__(
        self,
        state: MonitorState | None,
        *,
        alpha: float,
        min_records: int,
        grace_s: float,
        clock: Clock = time.time,
        events: EventBus = NO_EVENTS,
    ) -> None:
        self.state = state if state is not None else MonitorState()
        self._alpha = alpha
        self._min_records = min_records
        self._grace_ms = int(grace_s * 1000)
        self._clock = clock
        self._events = events

    def _close(self, everything: bool = False) -> list[Any]:
        until = None if everything else int(self._clock() * 1000) - self._grace_ms
        closed = self.state.close(until, self._alpha, self._min_records)
        for message in closed:
            if isinstance(message, pb.DriftMetrics):
                self._events.publish(DriftClosed(message))
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


class FeedbackLogic(op.StatefulBatchLogic[PredictionBatch | LabelBatch, Any, FeedbackState]):
    """Bytewax wrapper of `FeedbackJoin`: closes quality windows and lets labels that
    waited for a prediction in vain go, on time."""

    def __init__(self, join: FeedbackJoin) -> None:
        self.join = join

    def _keep(self) -> bool:
        if self.join.holds_anything:
            return op.StatefulBatchLogic.RETAIN
        return op.StatefulBatchLogic.DISCARD

    def on_batch(self, values: list[PredictionBatch | LabelBatch]) -> tuple[Iterable[Any], bool]:
        out: list[Any] = self.join.close_windows()
        out.extend(self.join.on_values(values))
        self.join.release_pending()
        return out, self._keep()

    def notify_at(self) -> datetime | None:
        return _at(self.join.next_wakeup_s())

    def on_notify(self) -> tuple[Iterable[Any], bool]:
        self.join.release_pending()
        return self.join.close_windows(), self._keep()

    def on_eof(self) -> tuple[Iterable[Any], bool]:
        # Input is over for this execution: no prediction will come for waiting labels.
        self.join.release_pending(force=True)
        return self.join.close_windows(everything=True), self._keep()

    def snapshot(self) -> FeedbackState:
        return self.join.state.snapshot()


JudgeIn = Install | JoinedPairs | GuardCounts
"""What the rollout judge hears: plans, joined labels and canaries' label-free guards."""


class JudgeLogic(op.StatefulBatchLogic[JudgeIn, pb.PlanCommand, JudgeState]):
    """Bytewax wrapper of `RolloutJudge`, one per data type: hears its plans (the
    registry's installs), its joined labels and its canaries' guards, says plan commands."""

    def __init__(self, judge: RolloutJudge) -> None:
        self.judge = judge

    def on_batch(self, values: list[JudgeIn]) -> tuple[Iterable[Any], bool]:
        out: list[pb.PlanCommand] = []
        for value in values:
            if isinstance(value, JoinedPairs):
                out.extend(self.judge.on_pairs(value))
                continue
            if isinstance(value, GuardCounts):
                out.extend(self.judge.on_guards(value))
                continue
            found = _plan_of(value)
            if found is not None:
                self.judge.on_plan(*found)
        return out, op.StatefulBatchLogic.RETAIN

    def snapshot(self) -> JudgeState:
        return copy.deepcopy(self.judge.state)


def _plan_of(install: Install) -> tuple[ServingPlan, dict[str, float]] | None:
    """The plan an install puts in effect, and its models' reward scales (the label's
    reference std, for regressors); None for contracts and staged models."""
    if isinstance(install, PlanInstall):
        models = install.models
        plan = install.plan
    elif isinstance(install, ModelInstall) and not install.staged:
        identity = install.spec.identity
        models = (install,)
        plan = install.plan or ServingPlan.single(model_key(identity.name, identity.version))
    else:
        return None
    scales = {}
    for model in models:
        identity = model.spec.identity
        scales[model_key(identity.name, identity.version)] = label_scale(model.spec.reference)
    return plan, scales


PROTOBUF_HEADERS: Headers = [("content-type", b"application/x-protobuf")]


def _protobuf_items(
    step_id: str,
    up: Stream[Any],
    key_of: Callable[[Any], str],
    position_of: Callable[[Any], int | None],
) -> Stream[SinkItem]:
    """Protobuf messages as sink items, keyed (and routed) by `key_of(message)`: the
    stream of one key, fenced at `position_of(message)` (None: not fenced)."""

    def item(message: Any) -> SinkItem:
        key = key_of(message)
        out: list[OutMessage] = [(key.encode(), message.SerializeToString(), PROTOBUF_HEADERS)]
        position = position_of(message)
        if position is None:
            return key, OutBatch(out)
        return key, OutBatch(out, key, [position])

    return op.map(step_id, up, item)


def router_of(config: Config) -> DataTypeRouter:
    """How the dataflow tells a record's data type, from the settings."""
    return DataTypeRouter(
        config.data_type_sources,
        header_name=config.data_type_header,
        field_name=config.data_type_field,
        topic_defaults={t: d for t, d in config.record_topic_defaults.items() if d},
    )


def build_flow(
    config: Config,
    sources: Mapping[str, Source[SourceBatch]],
    sinks: Mapping[str, Sink[SinkItem]],
    *,
    clock: Clock = time.time,
    events: EventBus = NO_EVENTS,
) -> Dataflow:
    """The waxserve dataflow over the given sources and sinks.

    `sources` has "control" and "records", each emitting `SourceBatch` items. `sinks` has
    "scored", "stats", "drift", "events" and "dlq"; each receives `(route, OutBatch)` pairs:
    (key, value, headers) messages ready for Kafka, with the inputs they cover (what
    exactly-once output fences on). Metrics and the queryable state subscribe to `events`.
    """
    missing = [n for n in SOURCE_NAMES if n not in sources]
    missing += [n for n in SINK_NAMES if n not in sinks]
    if missing:
        raise ValueError(f"build_flow: missing sources/sinks {missing}")
    shards = config.shards
    flow = Dataflow("waxserve")

    # Control: decode, check per data type, fan installs out to every shard.
    trusted_keys = TrustedKeys(Path(config.trusted_keys_dir) if config.trusted_keys_dir else None)
    control_batches = op.input("control_in", flow, sources["control"])
    control_items = op.flat_map("decode_control", control_batches, decode_control)
    control, dead_control = split("control_split", control_items, ControlIn, DeadLetter)
    registry = op.stateful_batch(
        "registry",
        op.key_on("key_control", control, lambda c: c.data_type),
        lambda state: RegistryLogic(
            Registry(
                state,
                model_dir=config.model_dir,
                clock=clock,
                onnx_threads=config.onnx_threads,
                events=events,
                max_model_bytes=config.max_model_bytes,
                max_message_bytes=config.max_message_bytes,
                max_data_types=config.max_data_types,
                signature_policy=config.signature_policy,
                trusted_keys=trusted_keys,
                gate_max_latency_us=config.gate_max_latency_us,
            )
        ),
    )
    registry_out = op.map("registry_values", registry, lambda kv: kv[1])
    installs, model_events, dead_registry = split(
        "registry_split", registry_out, Install, pb.ModelEvent, DeadLetter
    )
    fanned = op.flat_map(
        "fan_out",
        installs,
        lambda m: [(shard_key(_data_type_of(m), s), m) for s in range(shards)],
    )

    # Records: split each batch by data type; a source partition always meets one shard.
    router = router_of(config)
    record_batches = op.input("records_in", flow, sources["records"])
    routed = op.flat_map("route", record_batches, lambda b: _routed(router, b))
    runs, dead_records = split("route_split", routed, RawRun, DeadLetter)
    shard_of = shard_numbers(config.record_topic_defaults, shards)
    keyed_runs = op.map(
        "key_records", runs, lambda r: (shard_key(r.data_type, shard_of(r.topic, r.partition)), r)
    )
    serve_inputs = [fanned, keyed_runs]

    # Labels that arrive later: routed like records, decoded by their shard's contract.
    with_feedback = FEEDBACK_SOURCE in sources
    dead_feedback = None
    if with_feedback:
        feedback_router = DataTypeRouter(
            config.data_type_sources,
            header_name=config.data_type_header,
            field_name=config.data_type_field,
            topic_defaults={t: d for t, d in config.feedback_topic_defaults.items() if d},
        )
        feedback_batches = op.input("feedback_in", flow, sources[FEEDBACK_SOURCE])
        feedback_routed = op.flat_map(
            "route_feedback", feedback_batches, lambda b: _feedback_routed(feedback_router, b)
        )
        feedback_runs, dead_feedback = split(
            "route_feedback_split", feedback_routed, FeedbackRun, DeadLetter
        )
        serve_inputs.append(
            op.map(
                "key_feedback",
                feedback_runs,
                lambda r: (shard_key(r.data_type, shard_of(r.topic, r.partition)), r),
            )
        )
    feedback = Feedback(config.feedback_on if with_feedback else (), shards)

    served = op.stateful_batch(
        "serve",
        cast(KeyedStream[Install | RawRun], op.merge("serve_in", *serve_inputs)),
        lambda state: ServeLogic(
            ShardScorer(
                state,
                stats_interval_s=config.stats_interval_s,
                drift_window_s=config.drift_window_s,
                no_model_wait_s=config.no_model_wait_s,
                max_held_records=config.max_held_records,
                max_held_bytes=config.max_held_bytes,
                max_message_bytes=config.max_message_bytes,
                max_data_types=config.max_data_types,
                clock=clock,
                onnx_threads=config.onnx_threads,
                monitoring=config.monitoring,
                events=events,
                feedback=feedback,
                canary_guards=CanaryGuards(
                    budget_us=config.canary_max_us_per_record,
                    compare=config.canary_max_disagreement > 0,
                    tolerance=config.canary_disagreement_tolerance,
                ),
            )
        ),
    )
    served_values = op.map("served_values", served, lambda kv: kv[1])
    judge_inputs = [op.key_on("key_judge_installs", installs, _data_type_of)]
    kinds: list[Any] = [ScoredBatch, StatsPartial | DriftPartial, DeadLetter, GuardCounts]
    if with_feedback:
        kinds.append(PredictionBatch | LabelBatch)
    scored, partials, dead_serve, guards, *feedback_out = split(
        "serve_split", served_values, *kinds
    )
    if with_feedback:
        [feedback_items] = feedback_out
        # One owner per record id: "<data_type>#<hash(id) % shards>" holds its prediction.
        joined_out = op.stateful_batch(
            "feedback",
            op.key_on("key_feedback_items", feedback_items, lambda b: b.key),
            lambda state: FeedbackLogic(
                FeedbackJoin(
                    state,
                    horizon_s=config.feedback_horizon_s,
                    label_wait_s=config.feedback_label_wait_s,
                    max_rows=per_key_bound(config.feedback_max_predictions, shards),
                    max_bytes=per_key_bound(config.feedback_max_bytes, shards),
                    stats_interval_s=config.stats_interval_s,
                    clock=clock,
                    events=events,
                    keeps=feedback.listed,
                )
            ),
        )
        feedback_values = op.map("feedback_values", joined_out, lambda kv: kv[1])
        # `_joined`: the (model, prediction, label) pairs, for consumers of online reward
        # (canary promotion, bandits); metrics and the queryable state hear of them as
        # `LabelsJoined` events.
        feedback_partials, joined = split(
            "feedback_split", feedback_values, StatsPartial, JoinedPairs
        )
        partials = op.merge("partials_in", partials, feedback_partials)
        judge_inputs.append(op.key_on("key_judge_pairs", joined, lambda p: p.identity.data_type))
    # The rollout judge: canaries promoted or rolled back on their label-free guards and on
    # labels where they come, bandits reweighted; its commands go to the control topic
    # like anyone's.
    judge_inputs.append(op.key_on("key_judge_guards", guards, lambda g: g.identity.data_type))
    settings = JudgeSettings(
        alpha=config.canary_alpha,
        margin=config.canary_margin,
        min_records=config.canary_min_records,
        max_records=config.canary_max_records,
        bandit_every=config.bandit_update_records,
        max_error_rate=config.canary_max_error_rate,
        max_slow_rate=config.canary_max_slow_rate,
        max_us_per_record=config.canary_max_us_per_record,
        max_disagreement=config.canary_max_disagreement,
        promote_without_labels=config.canary_promote_without_labels,
        labelled=feedback.listed,
    )
    judged = op.stateful_batch(
        "judge",
        cast(KeyedStream[JudgeIn], op.merge("judge_in", *judge_inputs)),
        lambda state: JudgeLogic(RolloutJudge(state, settings, clock)),
    )
    commands = op.map("judge_values", judged, lambda kv: kv[1])
    if CONTROL_SINK in sinks:
        op.output(
            "control_out", op.map("command_items", commands, _command_item), sinks[CONTROL_SINK]
        )
    # Shadow models' output: the shadow topic, never the scored one (none without a sink).
    shadow_scored = op.filter("shadow_only", scored, _is_shadow)
    scored = op.filter("primary_only", scored, lambda b: not b.shadow)
    op.output(
        "scored_out",
        op.map("scored_items", scored, _scored_item),
        sinks["scored"],
    )
    if SHADOW_SINK in sinks:
        op.output(
            "shadow_out", op.map("shadow_items", shadow_scored, _scored_item), sinks[SHADOW_SINK]
        )

    monitored = op.stateful_batch(
        "monitor",
        op.key_on("key_partials", partials, lambda p: p.model.data_type),
        lambda state: MonitorLogic(
            state,
            alpha=config.drift_alpha,
            min_records=config.drift_min_records,
            grace_s=min(2.0, config.stats_interval_s / 2),
            clock=clock,
            events=events,
        ),
    )
    monitor_values = op.map("monitor_values", monitored, lambda kv: kv[1])

    def model_key(m: pb.ServingStats | pb.DriftMetrics) -> str:
        return f"{m.data_type}/{m.model_name}/{m.model_version}"

    stats, drift = split("monitor_split", monitor_values, pb.ServingStats, pb.DriftMetrics)

    def window_start(m: pb.ServingStats | pb.DriftMetrics) -> int:
        return m.window_start_ms

    stats_items = _protobuf_items("stats_items", stats, model_key, window_start)
    drift_items = _protobuf_items("drift_items", drift, model_key, window_start)
    op.output("stats_out", stats_items, sinks["stats"])
    op.output("drift_out", drift_items, sinks["drift"])
    op.output(
        "events_out",
        _protobuf_items("event_items", model_events, lambda e: e.data_type, _event_position),
        sinks["events"],
    )

    # Each origin's dead letters are a stream of their own: each is in input order.
    limit = config.max_message_bytes
    dead_streams = [
        _dead_letter_items("dlq_control_items", dead_control, "control", events, limit),
        _dead_letter_items("dlq_registry_items", dead_registry, "registry", events, limit),
        _dead_letter_items("dlq_route_items", dead_records, "route", events, limit),
        _dead_letter_items("dlq_items", dead_serve, "serve", events, limit),
    ]
    if dead_feedback is not None:
        dead_streams.append(
            _dead_letter_items("dlq_feedback_items", dead_feedback, "route", events, limit)
        )
    dead = op.merge("dead_letters", *dead_streams)
    op.output("dlq_out", dead, sinks["dlq"])
    return flow


def _data_type_of(install: Install) -> str:
    if isinstance(install, ModelInstall):
        return install.spec.identity.data_type
    if isinstance(install, PlanInstall):
        return install.data_type
    return install.contract.data_type


def _routed(router: DataTypeRouter, batch: SourceBatch) -> list[RawRun | DeadLetter]:
    runs, dead = router.split(batch)
    return [*runs, *dead]


def _feedback_routed(router: DataTypeRouter, batch: SourceBatch) -> list[RawRun | DeadLetter]:
    runs, dead = router.split(batch)
    labels: list[RawRun | DeadLetter] = [
        FeedbackRun(
            r.topic, r.partition, r.offsets, r.keys, r.values, r.headers, data_type=r.data_type
        )
        for r in runs
    ]
    return [*labels, *dead]


def _command_item(command: pb.PlanCommand) -> SinkItem:
    key = control_message_key(command)
    return command.data_type, OutBatch([(key, control_message(command), [])])


def _is_shadow(batch: ScoredBatch) -> bool:
    return batch.shadow


def _scored_item(batch: ScoredBatch) -> SinkItem:
    # Shares its stream name with the same shard's dead letters (another sink).
    stream = f"serve:{batch.route}/{batch.data_type}"
    return batch.route, OutBatch(batch.messages, stream, batch.offsets)


def _event_position(event: pb.ModelEvent) -> int | None:
    # Numbered by the registry, so a replay numbers them alike; a "restored" event
    # reports this run's resume (0): never fenced.
    return event.sequence or None


def _dead_letter_items(
    step_id: str, up: Stream[DeadLetter], origin: str, events: EventBus, max_bytes: int
) -> Stream[SinkItem]:
    """Dead letters as sink items, routed by source partition; one stream per origin,
    source partition and data type, fenced at the source offset."""

    def item(dead: DeadLetter) -> SinkItem:
        events.publish(DeadLettered(dead.data_type, dead.stage, dead.reason))
        route = f"{dead.topic}/{dead.partition}"
        stream = f"{origin}:{route}/{dead.data_type}"
        return route, OutBatch([dead.to_message(max_bytes)], stream, [dead.offset])

    return op.map(step_id, up, item)


def process_events() -> EventBus:
    """The event bus of a dataflow process: Prometheus metrics and the queryable state."""
    return EventBus(metrics.on_event, PROCESS_STATE.on_event)


def _flow_from_env() -> Dataflow:
    try:
        level = log_level()
        config = Config.from_env()
        check_topics(config)
    except ConfigError as exc:
        # A bad setting: one line that names it, not a traceback.
        print(f"waxserve: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # First: SIGINT and SIGTERM stop the dataflow cleanly from here on, and the JVM (not
    # started yet) leaves them to Python (dataflows/core/lifecycle.py).
    lifecycle.install()
    _start_the_jvm(config.pmml)
    if config.schema_registry_url:
        CODECS.use_schema_registry(schema_registry_resolver(config.schema_registry_url))
        FEEDBACK_CODECS.use_schema_registry(schema_registry_resolver(config.schema_registry_url))
    flow = build_flow(config, kafka_sources(config), kafka_sinks(config), events=process_events())
    state_server = start_state_server(config.state_addr, config.state_peers)
    if state_server is not None:
        lifecycle.on_stop("the queryable state server", lambda _left: state_server.stop())
    _tune_gc()
    _skip_finalization_after_the_jvm()
    return flow


def _start_the_jvm(mode: str) -> None:
    """`WAXSERVE_PMML`: start the JVM and load a tiny PMML model now, on the main thread,
    before the dataflow runs (and after `lifecycle.install`, which gives it `-Xrs`), so that
    no PMML model pays for either. JPype holds the GIL for a second or two of them
    (`dataflows.runtimes.pmml.warm_up`): started by the first PMML model instead ("lazy"),
    scoring would pause that long. "auto" (the default) starts it when a Java runtime is
    installed and otherwise rejects PMML models with that reason; "on" does not run
    without it; "lazy" and "off" start nothing now."""
    set_jvm_policy(mode)
    if mode in ("lazy", "off"):
        return
    missing = java_missing() if mode == "auto" else None
    if missing is None:
        try:
            seconds = warm_up()
        except Exception as exc:
            if mode == "on":
                print(f"waxserve: WAXSERVE_PMML=on: cannot start the JVM: {exc}", file=sys.stderr)
                raise SystemExit(2) from None
            missing = f"the JVM did not start: {exc}"
        else:
            log.info("started the JVM and PMML4S in %.2f s (WAXSERVE_PMML=%s)", seconds, mode)
            return
    log.warning(
        "PMML models will be rejected: %s (install Java 17 for PMML, or set WAXSERVE_PMML=off)",
        missing,
    )
    set_jvm_policy("off", f"PMML needs a Java runtime, and this process has none: {missing}")


def _skip_finalization_after_the_jvm() -> None:
    """End a process that ran the JVM with os._exit once the dataflow has returned.

    Interpreter finalization with JPype's JVM loaded aborts now and then: a thread left
    waiting for the GIL is ended with pthread_exit, which unwinds through JPype's C++
    ("FATAL: exception not rethrown", SIGABRT; seen in 1 of 17 bounded PMML runs even
    with JPype's exit hook on). Everything worth keeping is done by then: the sinks have
    flushed and the atexit handlers before this one have run. A run that ended with an
    uncaught exception finalizes as usual, so its exit status stays non-zero. A stop by
    SIGINT or SIGTERM ends earlier, in `lifecycle.finish()`, the same way.
    """
    failed = False
    previous_hook = sys.excepthook

    def note_failure(*exc_info: Any) -> None:
        nonlocal failed
        failed = True
        previous_hook(*exc_info)

    def leave() -> None:
        if lifecycle.stopping():  # a signal came as the dataflow ended on its own
            lifecycle.LIFECYCLE.finish(clean=not failed)
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
