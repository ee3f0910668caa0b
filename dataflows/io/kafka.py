"""Kafka source and sink for the dataflow, on confluent-kafka.

Why not bytewax's own KafkaSource/KafkaSink: the source emits one item per message, and
per-item overhead dominates at our rates, so ours emits one `SourceBatch` per consume();
bytewax's sink calls `flush()` after every batch, which costs a third of the throughput,
so ours produces without waiting and settles at each snapshot:

- at least once (`delivery=at-least-once`): `snapshot()` flushes, so everything written
  in an epoch is delivered before the epoch's snapshot completes, and a kill -9 repeats at
  most the output since the last snapshot;
- exactly once (`delivery=exactly-once`): output goes in Kafka transactions committed at
  each snapshot, which also record in a marker topic how far each input stream got, so a
  restart drops what committed transactions already hold (`_Transactions`).

A broker that is away holds the output back; it does not fail it: flushes and commits wait
(with a log line and `waxserve_kafka_unreachable`) until it answers again.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
import zlib
from collections.abc import Collection, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, NamedTuple, cast

from bytewax.connectors.kafka import BYTEWAX_CONSUMER_LAG_GAUGE
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    IsolationLevel,
    KafkaError,
    KafkaException,
    Message,
    Producer,
)
from confluent_kafka import TopicPartition as KafkaTopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from dataflows.core import lifecycle
from dataflows.core.config import Config, ConfigError
from dataflows.core.output import OutBatch
from dataflows.core.records import Headers, OutMessage, SourceBatch, fit_message
from dataflows.observability import metrics

log = logging.getLogger(__name__)

_IDLE_BACKOFF = timedelta(milliseconds=2)


_CLIENT_LOG = logging.getLogger("waxserve.kafka")
"""librdkafka's own log lines, through Python logging (not straight to stderr)."""


_QUIET_LOG = logging.getLogger("waxserve.kafka.startup")
"""The start-up check's client: its error says what is wrong in one line."""
_QUIET_LOG.addHandler(logging.NullHandler())
_QUIET_LOG.propagate = False


def _admin_settings(config: Config, logger: logging.Logger = _CLIENT_LOG) -> dict[str, Any]:
    return {**config.client_config(), "logger": logger}


def topic_partitions(config: Config, topic: str, timeout: float = 10.0) -> list[int]:
    """Partition ids of a topic; a clear error when the topic does not exist."""
    admin = AdminClient(_admin_settings(config))
    # All topics: a metadata request that names one may create it on brokers that allow
    # auto-creation, so a typo'd name would make an empty topic to wait on.
    metadata = admin.list_topics(timeout=timeout)
    info = metadata.topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        reason = info.error if info is not None else "not in metadata"
        raise RuntimeError(
            f"topic {topic!r} is not available on {config.brokers}: {reason} "
            "(create it with `waxserve topics`)"
        )
    return sorted(info.partitions)


class StallWatch:
    """Which input partitions have records in the broker that their fetcher has not reached
    and has not moved towards for `after_s` seconds.

    librdkafka's fetcher for a partition can stay stuck after a leader change (a broker
    fenced and back, leader epochs bumped; confluentinc/librdkafka#4492, #2625), and then
    nothing says so: the partition just returns nothing. Assigning it again restarts its
    fetcher; where that did not move it (`remedy`), a new consumer starts afresh. A
    partition whose records wait in our own buffer, or that is paused, is busy, not
    stalled. Bookkeeping only, so that it is tested without a broker.
    """

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s
        self._progress: dict[int, tuple[int, float]] = {}  # partition -> (position, since)
        self._assigned_again: dict[int, int] = {}  # partition -> offset it was assigned at

    def check(
        self,
        now: float,
        positions: Mapping[int, int],
        ends: Mapping[int, int],
        busy: Collection[int] = (),
    ) -> list[int]:
        """The partitions stalled at `now`, given each one's fetch position, the broker's
        end offset (what a read_committed reader can reach) and the busy ones; a partition
        reported is given `after_s` again before it is reported again."""
        stalled = []
        for partition, position in positions.items():
            seen = self._progress.get(partition)
            end = ends.get(partition)
            waiting = end is not None and 0 <= position < end and partition not in busy
            if seen is None or seen[0] != position or not waiting:
                self._progress[partition] = (position, now)
            elif now - seen[1] >= self.after_s:
                stalled.append(partition)
                self._progress[partition] = (position, now)
        for gone in self._progress.keys() - positions.keys():
            del self._progress[gone]
        return stalled

    def remedy(self, partition: int, offset: int) -> str:
        """What to do for a partition stalled at `offset`: "assign" it again, or, where
        that was done at this same offset and it has not moved since, a "new consumer"
        (a fetcher can stay stuck through a new assignment: the consumer keeps the
        partition's state, and in one broker-away test run all its partitions stayed
        at one offset through four)."""
        if self._assigned_again.get(partition) == offset:
            self._assigned_again.clear()  # a new consumer assigns every partition afresh
            return "new consumer"
        self._assigned_again[partition] = offset
        return "assign"


class _Fetcher(NamedTuple):
    """A partition's fetcher, as librdkafka's statistics describe it."""

    offset: int  # the next offset it fetches
    state: str
    queued: int  # messages fetched, waiting for the worker


class _SharedConsumer:
    """One consumer per process and source topic, shared by the topic's source partitions.

    Bytewax builds one source partition per Kafka partition, and a consumer each would send
    a fetch request per partition: against tansu, four record partitions cost 4x the
    broker CPU of one consumer and multiplied end-to-end latency (p50 55 ms vs 8 ms with one
    partition, at 2,000 records/s). One consumer fetches every partition this process
    reads, and `take()` hands each partition its own messages, in order.
    """

    _registry_lock = threading.Lock()
    _shared: ClassVar[dict[str, _SharedConsumer]] = {}

    # A partition whose worker falls behind stops being fetched past this many buffered
    # messages (per batch size), so one slow worker cannot fill the process's memory.
    PAUSE_AFTER_BATCHES = 8

    def __init__(self, key: str, config: Config, topic: str, step_id: str) -> None:
        self._key = key
        self._topic = topic
        self._step_id = step_id
        self._batch_size = config.batch_size
        self._lock = threading.Lock()
        self._buffers: dict[int, collections.deque[Message]] = {}
        self._offsets: dict[int, int] = {}  # next offset each partition will return
        self._paused: set[int] = set()
        self._unreachable = False
        self._topic_gone = False
        self._next_error_log = 0.0
        self._closed = threading.Event()
        # From the statistics (served by consume(), so only while the worker polls).
        self._fetchers: dict[int, _Fetcher] = {}
        self._stats_at = time.monotonic()
        self._stalls = StallWatch(self.STALL_S)
        self._stalled: set[int] = set()  # found by the watch thread, assigned again by take()
        self._settings: dict[str, Any] = {
            # A broker that overfills a fetch (tansu sends ~5 MB per partition) makes
            # librdkafka wait fetch.queue.backoff.ms, 1 s by default, before fetching
            # again: a backlog read stalls. Yours wins (WAXSERVE_KAFKA_*).
            "fetch.queue.backoff.ms": "10",
            **config.client_config(),
            # Offsets live in Bytewax snapshots; no consumer group, no commits.
            "group.id": "waxserve",
            "enable.auto.commit": "false",
            "enable.partition.eof": str(config.stop_at_end).lower(),
            # A resume offset the partition no longer has (the topic was deleted and
            # created again, the broker lost its data, retention passed it) is reported,
            # not silently skipped to the end: see `restart`.
            "auto.offset.reset": "error",
            "fetch.wait.max.ms": str(config.fetch_wait_ms),
            "statistics.interval.ms": "1000",
            "stats_cb": self._on_stats,
        }
        self._consumer = Consumer(self._settings)
        # Knowing the partition leaders before assign saves librdkafka a 500 ms retry on
        # the first fetch (seen on tansu).
        self._consumer.list_topics(topic, timeout=10)
        threading.Thread(
            target=self._watch_topic,
            args=(config.client_config(),),
            name=f"waxserve-watch-{topic}",
            daemon=True,
        ).start()

    @classmethod
    def join(
        cls, config: Config, topic: str, step_id: str, partition: int, offset: int
    ) -> _SharedConsumer:
        """The process's consumer of `topic`, now also reading `partition` from `offset`."""
        key = repr((sorted(config.client_config().items()), topic, step_id))
        with cls._registry_lock:
            shared = cls._shared.get(key)
            if shared is None:
                shared = cls._shared[key] = cls(key, config, topic, step_id)
            shared._assign(partition, offset)
            return shared

    def _assign(self, partition: int, offset: int) -> None:
        with self._lock:
            self._assign_locked(partition, offset)

    def _assign_locked(self, partition: int, offset: int) -> None:
        if partition in self._buffers:  # rebuilt without a close (an aborted run), or stalled
            self._consumer.incremental_unassign([KafkaTopicPartition(self._topic, partition)])
        self._buffers[partition] = collections.deque()
        self._offsets[partition] = offset
        self._paused.discard(partition)
        self._consumer.incremental_assign([KafkaTopicPartition(self._topic, partition, offset)])

    def leave(self, partition: int) -> None:
        """Stop reading `partition`; the last partition to leave closes the consumer."""
        with self._registry_lock, self._lock:
            if partition not in self._buffers:
                return
            del self._buffers[partition]
            self._offsets.pop(partition, None)
            if self._buffers:
                self._consumer.incremental_unassign([KafkaTopicPartition(self._topic, partition)])
                return
            self._closed.set()
            self._consumer.close()
            self._shared.pop(self._key, None)

    def take(self, partition: int) -> list[Message]:
        """Up to a batch of `partition`'s messages (and its end-of-partition event)."""
        with self._lock:
            buffer = self._buffers[partition]
            if not buffer:
                self._fetch()
            if len(buffer) <= self._batch_size:
                taken = list(buffer)
                buffer.clear()
            else:
                taken = [buffer.popleft() for _ in range(self._batch_size)]
            if partition in self._paused and len(buffer) < self._batch_size:
                self._paused.discard(partition)
                self._consumer.resume([KafkaTopicPartition(self._topic, partition)])
            return taken

    def _fetch(self) -> None:
        if self._stalled:
            self._restart_stalled()
        # Never blocks: librdkafka fetches in the background, and a waiting worker would
        # hold up every other step of the dataflow.
        messages = self._consumer.consume(self._batch_size, 0)
        limit = self._batch_size * self.PAUSE_AFTER_BATCHES
        for msg in messages:
            buffer = self._buffers.get(cast(int, msg.partition()))
            if buffer is not None:
                buffer.append(msg)
                continue
            error = msg.error()
            if error is not None:
                self._client_error(error)
        if messages and self._unreachable and not messages[-1].error():
            self._unreachable = False
            metrics.kafka_unreachable("consumer", False)
            log.warning("consuming %s: the broker answers again", self._topic)
        for partition, buffer in self._buffers.items():
            if len(buffer) > limit and partition not in self._paused:
                self._paused.add(partition)
                self._consumer.pause([KafkaTopicPartition(self._topic, partition)])

    def _restart_stalled(self) -> None:
        """Assign the stalled partitions again where they are (a fresh fetcher each), or
        where that did not help, start a new consumer (`StallWatch.remedy`)."""
        stalled, self._stalled = self._stalled, set()
        for partition in sorted(stalled):
            buffer = self._buffers.get(partition)
            if buffer or buffer is None or partition in self._paused:
                continue  # it moved meanwhile, or left
            offset = self._offsets[partition]
            fetcher = self._fetchers.get(partition, _Fetcher(-1, "unknown", 0))
            metrics.input_partition_stalled(self._topic)
            remedy = self._stalls.remedy(partition, offset)
            log.warning(
                "input %s[%d]: no record returned for %.0f s though the broker has more "
                "(fetcher at offset %d, state %s): %s",
                self._topic,
                partition,
                self.STALL_S,
                fetcher.offset,
                fetcher.state,
                f"assigning it again at offset {offset}"
                if remedy == "assign"
                else f"assigned again at offset {offset} before, it has not moved: "
                "a new consumer for the topic",
            )
            if remedy == "new consumer":
                self._renew_consumer()  # every partition, from where each one is
                return
            self._assign_locked(partition, offset)  # take() holds the lock
            # Not paused by us (checked above): a pause librdkafka kept would survive this.
            self._consumer.resume([KafkaTopicPartition(self._topic, partition)])

    def _renew_consumer(self) -> None:
        """Replace the consumer with a new one that reads every partition from the first
        offset we do not hold yet; what the old one fetched and we did not take is
        fetched again. The old one closes on a thread of its own: a stuck client must not
        hold up the worker."""
        old = self._consumer
        self._consumer = Consumer(self._settings)
        starts = []
        for partition, buffer in self._buffers.items():
            # After the last record we hold (an end-of-partition event has no record).
            held = [m for m in buffer if m.error() is None]
            offset = cast(int, held[-1].offset()) + 1 if held else self._offsets[partition]
            starts.append(KafkaTopicPartition(self._topic, partition, offset))
        self._consumer.incremental_assign(starts)
        if self._paused:
            self._consumer.pause([KafkaTopicPartition(self._topic, p) for p in self._paused])
        self._fetchers = {}
        threading.Thread(target=old.close, name="waxserve-close-consumer", daemon=True).start()

    _UNREACHABLE = frozenset(
        {KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._RESOLVE}
    )
    _TOPIC_GONE = frozenset({KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC})

    def _client_error(self, error: KafkaError) -> None:
        """An error that concerns the consumer, not one partition's messages."""
        if error.fatal():
            raise KafkaException(error)
        code = error.code()
        now = time.monotonic()
        if code in self._UNREACHABLE:
            if not self._unreachable:
                self._unreachable = True
                metrics.kafka_unreachable("consumer", True)
        elif code in self._TOPIC_GONE:
            self._note_topic_gone(str(error))
            return
        # librdkafka retries by itself; say so now and then, not on every poll.
        if now >= self._next_error_log:
            self._next_error_log = now + 30.0
            log.warning("consuming %s: %s (retrying)", self._topic, error)

    def _note_topic_gone(self, detail: str) -> None:
        if self._topic_gone:
            return
        self._topic_gone = True
        metrics.input_topic_reset(self._topic)
        log.error(
            "input topic %s is gone from the broker (deleted?): nothing to read until it is "
            "back (%s)",
            self._topic,
            detail,
        )

    TOPIC_CHECK_S = 10.0
    STALL_S = 30.0
    """A partition with records to read whose fetcher has not moved for this long is
    assigned again (`StallWatch`)."""
    STATS_STALE_S = 5.0
    """Statistics older than this (every 1 s while the worker polls) judge nothing."""

    def _watch_topic(self, settings: dict[str, str | int | float | bool]) -> None:
        """librdkafka says nothing when an assigned topic is deleted, nor when a partition's
        fetcher is stuck: ask the broker now and then (its own client: the consumer may
        close meanwhile)."""
        admin = AdminClient(settings)
        while not self._closed.wait(self.TOPIC_CHECK_S):
            try:
                info = admin.list_topics(self._topic, timeout=5).topics.get(self._topic)
            except KafkaException:
                continue  # the broker is away: the consumer's own errors say so
            gone = info is None or (
                info.error is not None and info.error.code() in self._TOPIC_GONE
            )
            if gone:
                self._note_topic_gone(str(info.error) if info is not None else "no metadata")
                continue
            if self._topic_gone:
                self._topic_gone = False
                log.warning("input topic %s is back", self._topic)
            try:
                self._watch_stalls(admin)
            except Exception:  # this thread also watches for a deleted topic: keep it
                log.warning("input %s: checking for stalls failed", self._topic, exc_info=True)

    def _watch_stalls(self, admin: AdminClient) -> None:
        offsets = dict(self._offsets)  # a copy: the worker changes it meanwhile
        asked = {KafkaTopicPartition(self._topic, p): OffsetSpec.latest() for p in offsets}
        if not asked:
            return
        ends: dict[int, int] = {}
        try:
            futures = admin.list_offsets(
                asked, isolation_level=IsolationLevel.READ_COMMITTED, request_timeout=5
            )
            for tp, future in futures.items():
                ends[tp.partition] = future.result().offset
        except KafkaException:
            return  # the broker is away: nothing is stalled that a reconnect won't move
        fetchers = dict(self._fetchers)
        # Where each fetcher is, or where we are if that is further (the statistics come
        # every second, our offsets with every batch).
        positions = {
            p: max(fetchers[p].offset if p in fetchers else -1, offset)
            for p, offset in offsets.items()
        }
        # Busy, not stalled: records wait in our buffer or in librdkafka's queue, or the
        # partition is paused. A worker that has not polled lately (the statistics are
        # old) is busy with all of them.
        if time.monotonic() - self._stats_at > self.STATS_STALE_S:
            busy = set(offsets)
        else:
            busy = {p for p, buffer in list(self._buffers.items()) if buffer}
            busy |= {p for p, fetcher in fetchers.items() if fetcher.queued}
            busy |= set(self._paused)
        stalled = self._stalls.check(time.monotonic(), positions, ends, busy)
        if stalled:
            self._stalled = self._stalled | set(stalled)

    def restart(self, partition: int, error: KafkaError) -> None:
        """Read `partition` again from its beginning: its resume offset is out of range."""
        metrics.input_topic_reset(self._topic)
        low, high = self._consumer.get_watermark_offsets(
            KafkaTopicPartition(self._topic, partition), timeout=10
        )
        log.error(
            "input %s[%d]: resume offset %d is not in the partition (offsets %d to %d now; "
            "the topic was re-created, the broker lost its data, or retention deleted it): "
            "reading it from the beginning (%s)",
            self._topic,
            partition,
            self._offsets.get(partition, -1),
            low,
            high,
            error,
        )
        self._topic_gone = False
        self._assign(partition, OFFSET_BEGINNING)

    def advanced(self, partition: int, offset: int) -> None:
        """`partition` has returned everything before `offset` (for the lag gauge)."""
        self._offsets[partition] = offset

    def _on_stats(self, stats_json: str) -> None:
        stats = json.loads(stats_json)
        parts = stats.get("topics", {}).get(self._topic, {}).get("partitions", {})
        self._stats_at = time.monotonic()
        self._fetchers = {
            int(p): _Fetcher(
                int(part.get("next_offset", -1)),
                str(part.get("fetch_state", "")),
                int(part.get("fetchq_cnt", 0)),
            )
            for p, part in parts.items()
            if p.lstrip("-").isdigit() and int(p) >= 0
        }
        for partition, offset in list(self._offsets.items()):
            end = parts.get(str(partition), {}).get("ls_offset")
            if end is not None and offset >= 0:
                BYTEWAX_CONSUMER_LAG_GAUGE.labels(
                    step_id=self._step_id, topic=self._topic, partition=str(partition)
                ).set(end - offset)


class _BatchPartition(StatefulSourcePartition[SourceBatch, int]):
    def __init__(
        self, config: Config, topic: str, partition: int, offset: int, step_id: str
    ) -> None:
        self._topic = topic
        self._partition = partition
        self._offset = offset
        self._eof = False
        self._idle = False
        self._consumer = _SharedConsumer.join(config, topic, step_id, partition, offset)

    def next_batch(self) -> list[SourceBatch]:
        if self._eof:
            raise StopIteration()
        messages = self._consumer.take(self._partition)
        # map over the methods: one C loop a column instead of a Python loop.
        if any(map(Message.error, messages)):  # a KafkaError is truthy
            messages = self._without_errors(messages)
        offsets = cast(list[int], list(map(Message.offset, messages)))
        keys = list(map(Message.key, messages))
        values = list(map(Message.value, messages))
        headers = cast(list[Headers], list(map(Message.headers, messages)))
        if None in headers:  # a message without headers
            headers = [h or [] for h in headers]
        self._idle = not offsets
        if not offsets:
            return []
        self._offset = offsets[-1] + 1
        self._consumer.advanced(self._partition, self._offset)
        return [SourceBatch(self._topic, self._partition, offsets, keys, values, headers)]

    def _without_errors(self, messages: list[Message]) -> list[Message]:
        kept = []
        for msg in messages:
            error = msg.error()
            if error is None:
                kept.append(msg)
            elif error.code() == KafkaError._PARTITION_EOF:
                self._eof = True
            elif error.code() == KafkaError._AUTO_OFFSET_RESET:
                self._consumer.restart(self._partition, error)
                return []
            elif error.fatal():
                raise KafkaException(error)
            else:
                log.warning("consuming %s[%d]: %s", self._topic, self._partition, error)
        return kept

    def next_awake(self) -> datetime | None:
        # Polling an empty partition in a tight loop burns a core; back off briefly.
        return datetime.now(UTC) + _IDLE_BACKOFF if self._idle else None

    def snapshot(self) -> int:
        return self._offset

    def close(self) -> None:
        self._consumer.leave(self._partition)


class KafkaBatchSource(FixedPartitionedSource[SourceBatch, int]):
    """Reads topics, one Bytewax partition ("<topic>/<n>") per Kafka partition, one item
    per consume().

    Starts at the beginning of each partition (or where the snapshot says); with
    `config.stop_at_end` it stops at the end instead of tailing.
    """

    def __init__(self, config: Config, topics: str | list[str]) -> None:
        self._config = config
        self._topics = [topics] if isinstance(topics, str) else list(topics)

    def list_parts(self) -> list[str]:
        # Bytewax lists partitions on its workers, which exist only once every process of
        # the cluster is connected: from here on the dataflow runs (`/healthz`).
        lifecycle.mark_running()
        return [
            f"{topic}/{p}" for topic in self._topics for p in topic_partitions(self._config, topic)
        ]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _BatchPartition:
        offset = OFFSET_BEGINNING if resume_state is None else resume_state
        topic, _, partition = for_part.rpartition("/")
        return _BatchPartition(self._config, topic, int(partition), offset, step_id)


# --- output ------------------------------------------------------------------------------

# librdkafka's own default message.max.bytes; a message over it fails in produce().
DEFAULT_MAX_MESSAGE_BYTES = 1_000_000


def _too_large(exc: KafkaException) -> bool:
    error = exc.args[0] if exc.args else None
    return isinstance(error, KafkaError) and error.code() == KafkaError.MSG_SIZE_TOO_LARGE


class _Waiting:
    """Says, once a while and in a metric, that the broker has not taken our output yet.

    A context manager: the metric goes back down however the wait ends."""

    LOG_EVERY_S = 30.0
    DOWN_AFTER_S = 10.0

    def __init__(self, what: str) -> None:
        self._what = what
        self._started = time.monotonic()
        self._next_log = self.DOWN_AFTER_S
        self._down = False

    def still(self, detail: str) -> None:
        waited = time.monotonic() - self._started
        if waited < self._next_log:
            return
        if not self._down:
            self._down = True
            metrics.kafka_unreachable("producer", True)
        self._next_log = waited + self.LOG_EVERY_S
        log.warning("%s: waiting %.0f s for the broker (%s)", self._what, waited, detail)

    def __enter__(self) -> _Waiting:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._down:
            metrics.kafka_unreachable("producer", False)
            waited = time.monotonic() - self._started
            log.warning("%s: the broker answered after %.0f s", self._what, waited)


def _out_of_time() -> bool:
    """Stopping, and the stop's deadline leaves no time to wait for a broker."""
    return lifecycle.stopping() and lifecycle.flush_timeout(1.0) <= 0


def _produce_all(producer: Producer, topic: str, messages: list[OutMessage], limit: int) -> None:
    """Produce `messages` in order; a full local queue waits for room, a message too large
    is cut to fit (`fit_message`)."""
    produce = producer.produce
    pending = messages
    while pending:
        done = 0
        try:
            for key, value, headers in pending:
                # Passing headers at all, even empty, costs librdkafka a headers object.
                if headers:
                    produce(topic, value, key, headers=cast(Any, headers))
                else:
                    produce(topic, value, key)
                done += 1
        except BufferError:
            # Local queue full: let librdkafka drain it, then go on where it stopped.
            if _out_of_time():
                log.error("stopping: %d messages for %s not produced", len(pending), topic)
                return
            producer.poll(0.05)
        except KafkaException as exc:
            if not _too_large(exc):
                raise
            key, value, headers = fit_message(pending[done], limit)
            log.warning(
                "a message for %s is over %d bytes: written cut to fit (%s)", topic, limit, exc
            )
            produce(topic, value, key, headers=cast(Any, headers))
            done += 1
        pending = pending[done:]
    producer.poll(0)


def _producer_settings(config: Config) -> dict[str, str | int | float | bool]:
    return {
        # The Java client's partitioner, so that keys land where Java producers and
        # Kafka Streams put them; it also hashes a key faster than librdkafka's
        # default CRC32 (2% of the worker's time). Yours wins (WAXSERVE_KAFKA_*).
        "partitioner": "murmur2_random",
        # A broker that is away for minutes holds the output, it does not fail it: the
        # flush at the snapshot waits (and says so) until the broker is back.
        "message.timeout.ms": "0",
        **config.client_config(),
        "linger.ms": str(config.linger_ms),
        # Kafka's idempotent producer keeps retries from duplicating or reordering.
        "enable.idempotence": "true",
    }


def _max_message_bytes(config: Config) -> int:
    return int(config.kafka.get("message.max.bytes", DEFAULT_MAX_MESSAGE_BYTES))


class _SharedProducer:
    """At-least-once output: one producer per process and client config, shared by every
    sink partition; delivery is confirmed at each snapshot."""

    _lock = threading.Lock()
    _producers: ClassVar[dict[str, _SharedProducer]] = {}

    def __init__(self, settings: dict[str, str | int | float | bool], limit: int) -> None:
        self.errors: list[str] = []
        self.limit = limit
        self.producer = Producer(
            {
                **settings,
                # Delivery reports for failures only, through one producer-wide callback:
                # a Python call per delivered message would cost more than producing it.
                "delivery.report.only.error": True,
                "on_delivery": self.on_delivery,
            }
        )

    @classmethod
    def get(cls, config: Config) -> _SharedProducer:
        settings = _producer_settings(config)
        key = repr(sorted(settings.items()))
        with cls._lock:
            shared = cls._producers.get(key)
            if shared is None:
                shared = cls._producers[key] = cls(settings, _max_message_bytes(config))
            return shared

    def on_delivery(self, err: KafkaError | None, _msg: object) -> None:
        if err is not None:
            self.errors.append(str(err))

    def produce(self, topic: str, messages: list[OutMessage]) -> None:
        _produce_all(self.producer, topic, messages, self.limit)

    def flush(self) -> None:
        """Wait until everything produced so far is delivered, however long the broker is
        away; raise if anything failed. While stopping, only until the stop's deadline:
        then say what was not delivered, and never raise (Bytewax is unwinding)."""
        with _Waiting("output") as waiting:
            while remaining := self.producer.flush(lifecycle.flush_timeout(1.0)):
                if _out_of_time():
                    log.error("stopping: %d messages not delivered in time", remaining)
                    break
                waiting.still(f"{remaining} messages not delivered yet")
        if self.errors:
            errors, self.errors = self.errors, []
            message = f"{len(errors)} messages failed delivery: {errors[:3]}"
            if lifecycle.stopping():
                log.error("stopping: %s", message)
                return
            # Raising fails the epoch, so recovery re-sends from the last snapshot.
            raise RuntimeError(message)


class _SinkPartition(StatefulSinkPartition[OutBatch, None]):
    def __init__(self, producer: _SharedProducer, topic: str) -> None:
        self._producer = producer
        self._topic = topic

    def write_batch(self, values: list[OutBatch]) -> None:
        for batch in values:
            self._producer.produce(self._topic, batch.messages)

    def snapshot(self) -> None:
        self._producer.flush()

    def close(self) -> None:
        # Bytewax closes partitions while it unwinds: an exception here aborts the process.
        try:
            self._producer.flush()
        except Exception:
            log.exception("output to %s not flushed at close", self._topic)


_PROBE_KEY = b"waxserve.probe"
"""The key of the aborted record each transactional producer writes at start."""


class _Transactions:
    """Exactly-once output of sink partition number `part` of every sink.

    Bytewax assigns a partition to a worker from the list of partitions alone, and every
    sink lists the same ones, so partition n of each sink lives on the same worker: they
    share one transactional producer. Each transaction also writes, per (topic, stream),
    the last position it covered to the marker topic (partition n, compacted). A restart
    fences the previous producer, reads its committed markers, and drops what they cover:
    Bytewax resumes from its own snapshot, which can be older than a committed transaction
    when the process died between the two commits.

    Bytewax builds a sink partition when its first item arrives, and fencing plus reading
    the markers takes a second or more: that runs in a thread of its own while the batches
    written meanwhile wait, in order, in memory; a snapshot waits for it.
    """

    _registry_lock = threading.Lock()
    _shared: ClassVar[dict[tuple[str, int], _Transactions]] = {}

    COMMIT_TIMEOUT_S = 10.0

    def __init__(self, config: Config, part: int) -> None:
        self._config = config
        self._part = part
        self._lock = threading.Lock()
        self.limit = _max_message_bytes(config)
        settings = _producer_settings(config)
        timeout_ms = str(config.kafka.get("transaction.timeout.ms", "600000"))
        self._producer = Producer(
            {
                **settings,
                # An open transaction holds back every read_committed reader: a crashed
                # producer's is aborted when its successor starts (same id), or after this.
                "transaction.timeout.ms": timeout_ms,
                "message.timeout.ms": timeout_ms,
                "transactional.id": f"{config.marker_topic}.{part}",
            }
        )
        markers = len(topic_partitions(config, config.marker_topic))
        if markers <= part:
            # Shared marker partitions would make a restart wait for another producer's
            # open transaction there, on this same worker: up to transaction.timeout.ms.
            raise RuntimeError(
                f"marker topic {config.marker_topic!r} has {markers} partitions; exactly-once "
                f"output needs one per shard ({config.shards}): create it with "
                "`waxserve topics`, or add partitions"
            )
        self._marker_partition = part
        self._committed: dict[tuple[str, str], int] = {}
        self._covered: dict[tuple[str, str], int] = {}
        self._dirty: set[str] = set()
        self._pending: list[tuple[str, OutBatch]] = []
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        threading.Thread(target=self._start, name=f"waxserve-eos-{part}", daemon=True).start()

    def _start(self) -> None:
        try:
            with _Waiting(f"transactional producer {self._part}") as waiting:
                while True:
                    try:
                        # Fences the previous run's producer and aborts its open transaction.
                        self._producer.init_transactions(self.COMMIT_TIMEOUT_S)
                        break
                    except KafkaException as exc:
                        if not exc.args[0].retriable():
                            raise
                        waiting.still(str(exc))
            # An aborted record no read_committed reader may see: `_read_markers` checks.
            self._producer.begin_transaction()
            self._producer.produce(
                self._config.marker_topic, b"", _PROBE_KEY, partition=self._marker_partition
            )
            self._producer.flush(self.COMMIT_TIMEOUT_S)  # abort would drop it unsent
            self._producer.abort_transaction(self.COMMIT_TIMEOUT_S)
            markers = self._read_markers()
            with self._lock:
                self._committed = markers
            log.info(
                "exactly-once output %d: %d streams fenced by committed markers",
                self._part,
                len(markers),
            )
        except BaseException as exc:  # raised on the worker, at its next write or snapshot
            self._failure = exc
        finally:
            self._ready.set()

    def _check_started(self) -> None:
        if self._failure is not None:
            raise RuntimeError(
                f"exactly-once output {self._part} could not start: {self._failure}"
            ) from self._failure

    @classmethod
    def get(cls, config: Config, part: int) -> _Transactions:
        key = (repr(sorted(_producer_settings(config).items())) + config.marker_topic, part)
        with cls._registry_lock:
            shared = cls._shared.get(key)
            if shared is None:
                shared = cls._shared[key] = cls(config, part)
            return shared

    def _read_markers(self) -> dict[tuple[str, str], int]:
        """The last position of each (topic, stream) that committed output covers."""
        consumer = Consumer(
            {
                **self._config.client_config(),
                "group.id": "waxserve-markers",
                "enable.auto.commit": "false",
                "enable.partition.eof": "true",
                "isolation.level": "read_committed",
                "fetch.wait.max.ms": "10",
            }
        )
        markers: dict[tuple[str, str], int] = {}
        partition = KafkaTopicPartition(self._config.marker_topic, self._marker_partition)
        try:
            partition.offset = OFFSET_BEGINNING
            consumer.assign([partition])
            with _Waiting("reading the markers") as waiting:
                while True:
                    msg = consumer.poll(0.2)
                    if msg is None:
                        waiting.still("no end of the marker partition yet")
                        continue
                    error = msg.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            break
                        if error.fatal():
                            raise KafkaException(error)
                        waiting.still(str(error))
                        continue
                    if msg.key() == _PROBE_KEY:
                        raise RuntimeError(
                            f"the broker at {self._config.brokers} shows an aborted transaction's "
                            "record to a read_committed reader: it does not implement Kafka "
                            "transactions (tansu does not), so exactly-once output is impossible "
                            "on it; use WAXSERVE_DELIVERY=at-least-once"
                        )
                    topic, _, stream = (msg.key() or b"").decode().partition(" ")
                    value = msg.value()
                    if value is None:
                        markers.pop((topic, stream), None)
                    else:
                        markers[(topic, stream)] = int(value)
        finally:
            consumer.close()
        return markers

    def write(self, topic: str, batch: OutBatch) -> None:
        """Produce `batch` into the open transaction, without what committed output covers
        (kept in order until the producer has started)."""
        with self._lock:
            if not self._ready.is_set():
                self._pending.append((topic, batch))
                return
            self._drain()
            self._write(topic, batch)

    def _drain(self) -> None:
        self._check_started()
        pending, self._pending = self._pending, []
        for topic, batch in pending:
            self._write(topic, batch)

    def _write(self, topic: str, batch: OutBatch) -> None:
        if self._committed and batch.stream:
            mark = self._committed.get((topic, batch.stream))
            if mark is not None:
                if batch.positions and batch.positions[0] > mark:
                    del self._committed[(topic, batch.stream)]  # the stream is past it
                else:
                    batch = batch.after(mark)
        if not batch.messages:
            return
        if not self._dirty:
            self._producer.begin_transaction()
        self._dirty.add(topic)
        _produce_all(self._producer, topic, batch.messages, self.limit)
        if batch.stream and batch.positions:
            self._covered[(topic, batch.stream)] = batch.positions[-1]

    def commit(self, topic: str) -> None:
        """Commit the open transaction if it holds anything `topic`'s partition wrote: a
        sink partition's snapshot returns only once its output is committed. While
        stopping, only until the stop's deadline: what is not committed then is aborted by
        the next start (which scores it again), and nothing raises."""
        while not self._ready.wait(0.1):
            if _out_of_time():
                log.error("stopping: exactly-once output %d never started", self._part)
                return
        with self._lock:
            self._drain()
            if topic not in self._dirty:
                return
            marker_topic = self._config.marker_topic
            for (out_topic, stream), position in self._covered.items():
                self._producer.produce(
                    marker_topic,
                    str(position).encode(),
                    f"{out_topic} {stream}".encode(),
                    partition=self._marker_partition,
                )
            with _Waiting(f"committing output {self._part}") as waiting:
                while True:
                    timeout = lifecycle.flush_timeout(self.COMMIT_TIMEOUT_S)
                    if timeout <= 0:
                        log.error("stopping: output %d left uncommitted", self._part)
                        return
                    try:
                        self._producer.commit_transaction(timeout)
                        break
                    except KafkaException as exc:
                        error = exc.args[0]
                        if error.retriable():
                            waiting.still(str(error))
                            continue
                        if error.txn_requires_abort():
                            self._producer.abort_transaction(self.COMMIT_TIMEOUT_S)
                            self._dirty.clear()
                            self._covered.clear()
                        # Failing the epoch makes Bytewax resume from its last snapshot;
                        # the markers fence what earlier transactions committed.
                        raise
            self._dirty.clear()
            self._covered.clear()


class _TransactionalPartition(StatefulSinkPartition[OutBatch, None]):
    def __init__(self, transactions: _Transactions, topic: str) -> None:
        self._transactions = transactions
        self._topic = topic

    def write_batch(self, values: list[OutBatch]) -> None:
        for batch in values:
            self._transactions.write(self._topic, batch)

    def snapshot(self) -> None:
        self._transactions.commit(self._topic)

    def close(self) -> None:
        # Bytewax closes partitions while it unwinds: an exception here aborts the process.
        try:
            self._transactions.commit(self._topic)
        except Exception:
            log.exception("output to %s not committed at close", self._topic)


class KafkaBatchSink(FixedPartitionedSink[OutBatch, None]):
    """Writes `OutBatch` items to one topic, at least once (delivery confirmed at each
    snapshot) or exactly once (a transaction committed at each snapshot), as
    `config.delivery` says. Messages keep their own keys, so Kafka partitions by key."""

    def __init__(self, config: Config, topic: str, parts: int) -> None:
        self._config = config
        self._topic = topic
        self._parts = parts

    def list_parts(self) -> list[str]:
        return [str(i) for i in range(self._parts)]

    def part_fn(self, item_key: str) -> int:
        return zlib.crc32(item_key.encode())

    def build_part(
        self, step_id: str, for_part: str, resume_state: None
    ) -> _SinkPartition | _TransactionalPartition:
        if self._config.delivery == "exactly-once":
            return _TransactionalPartition(
                _Transactions.get(self._config, int(for_part)), self._topic
            )
        return _SinkPartition(_SharedProducer.get(self._config), self._topic)


def check_topics(config: Config, timeout: float = 10.0) -> None:
    """Before the dataflow starts: a broker answers and every topic it reads and writes
    exists. ConfigError, in one line, otherwise: a typo in a topic setting must not make
    an empty topic for the dataflow to idle on."""
    admin = AdminClient(_admin_settings(config, _QUIET_LOG))
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        error = exc.args[0] if exc.args else exc
        detail = error.str() if isinstance(error, KafkaError) else str(error)
        raise ConfigError(
            f"WAXSERVE_BROKERS={config.brokers!r}: no Kafka broker answered within "
            f"{timeout:g} s ({detail}); check it and the WAXSERVE_KAFKA_* settings"
        ) from None
    wanted = [config.control_topic, *config.record_topic_defaults, *config.output_topics]
    if config.feedback_on:
        wanted.append(config.feedback_topic)
    if config.delivery == "exactly-once":
        wanted.append(config.marker_topic)
    missing = [topic for topic in wanted if topic not in metadata.topics]
    if missing:
        raise ConfigError(
            f"no topic {', '.join(repr(t) for t in missing)} on {config.brokers}: create "
            "the topics with `waxserve topics`, or fix the WAXSERVE_*_TOPIC(S) setting"
        )


def kafka_sources(config: Config) -> dict[str, KafkaBatchSource]:
    """The dataflow's inputs on Kafka; the feedback topic only when feedback is on for some
    data type (an idle consumer is not free)."""
    sources = {
        "control": KafkaBatchSource(config, config.control_topic),
        "records": KafkaBatchSource(config, list(config.record_topic_defaults)),
    }
    if config.feedback_on:
        sources["feedback"] = KafkaBatchSource(config, config.feedback_topic)
    return sources


def kafka_sinks(config: Config) -> dict[str, KafkaBatchSink]:
    """The dataflow's outputs on Kafka."""
    topics = {
        "scored": config.scored_topic,
        "stats": config.stats_topic,
        "drift": config.drift_topic,
        "events": config.events_topic,
        "dlq": config.dlq_topic,
        "shadow": config.shadow_topic,
    }
    sinks = {name: KafkaBatchSink(config, topic, config.shards) for name, topic in topics.items()}
    sinks["control"] = KafkaBatchSink(config, config.control_topic, 1)  # the rollout judge
    return sinks
