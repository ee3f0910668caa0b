"""Kafka source and sink for the dataflow, on confluent-kafka.

Why not bytewax's own KafkaSource/KafkaSink: the source emits one item per message, and
per-item overhead dominates at our rates, so ours emits one `SourceBatch` per consume();
bytewax's sink calls `flush()` after every batch, which costs a third of the throughput,
so ours produces without waiting and flushes in `snapshot()`: everything written in an
epoch is delivered before the epoch's snapshot completes, which keeps output
at-least-once across a kill -9 without a round trip per batch.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import zlib
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, cast

from bytewax.connectors.kafka import BYTEWAX_CONSUMER_LAG_GAUGE
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
)
from confluent_kafka import TopicPartition as KafkaTopicPartition
from confluent_kafka.admin import AdminClient

from dataflows.core.config import Config
from dataflows.core.records import Headers, OutMessage, SourceBatch

log = logging.getLogger(__name__)

SinkItem = tuple[str, list[OutMessage]]
"""What sinks receive: a routing key (spreads writing over sink partitions) and messages."""

_IDLE_BACKOFF = timedelta(milliseconds=2)


def topic_partitions(config: Config, topic: str, timeout: float = 10.0) -> list[int]:
    """Partition ids of a topic; a clear error when the topic does not exist."""
    admin = AdminClient(config.client_config())
    metadata = admin.list_topics(topic, timeout=timeout)
    info = metadata.topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        reason = info.error if info is not None else "not in metadata"
        raise RuntimeError(
            f"topic {topic!r} is not available on {config.brokers}: {reason} "
            "(create it with `waxserve topics`)"
        )
    return sorted(info.partitions)


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
        self._consumer = Consumer(
            {
                # A broker that overfills a fetch (tansu sends ~5 MB per partition) makes
                # librdkafka wait fetch.queue.backoff.ms, 1 s by default, before fetching
                # again: a backlog read stalls. Yours wins (WAXSERVE_KAFKA_*).
                "fetch.queue.backoff.ms": "10",
                **config.client_config(),
                # Offsets live in Bytewax snapshots; no consumer group, no commits.
                "group.id": "waxserve",
                "enable.auto.commit": "false",
                "enable.partition.eof": str(config.stop_at_end).lower(),
                "fetch.wait.max.ms": str(config.fetch_wait_ms),
                "statistics.interval.ms": "1000",
                "stats_cb": self._on_stats,
            }
        )
        # Knowing the partition leaders before assign saves librdkafka a 500 ms retry on
        # the first fetch (seen on tansu).
        self._consumer.list_topics(topic, timeout=10)

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
            if partition in self._buffers:  # rebuilt without a close (an aborted run)
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
            if error is not None and error.fatal():
                raise KafkaException(error)
            if error is not None:
                log.warning("consuming %s: %s", self._topic, error)
        for partition, buffer in self._buffers.items():
            if len(buffer) > limit and partition not in self._paused:
                self._paused.add(partition)
                self._consumer.pause([KafkaTopicPartition(self._topic, partition)])

    def advanced(self, partition: int, offset: int) -> None:
        """`partition` has returned everything before `offset` (for the lag gauge)."""
        self._offsets[partition] = offset

    def _on_stats(self, stats_json: str) -> None:
        stats = json.loads(stats_json)
        parts = stats.get("topics", {}).get(self._topic, {}).get("partitions", {})
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
        return [
            f"{topic}/{p}" for topic in self._topics for p in topic_partitions(self._config, topic)
        ]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _BatchPartition:
        offset = OFFSET_BEGINNING if resume_state is None else resume_state
        topic, _, partition = for_part.rpartition("/")
        return _BatchPartition(self._config, topic, int(partition), offset, step_id)


class _SharedProducer:
    """One producer per process and client config, shared by every sink partition."""

    _lock = threading.Lock()
    _producers: ClassVar[dict[str, _SharedProducer]] = {}

    def __init__(self, settings: dict[str, str | int | float | bool]) -> None:
        self.errors: list[str] = []
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
        settings = {
            # The Java client's partitioner, so that keys land where Java producers and
            # Kafka Streams put them; it also hashes a key faster than librdkafka's
            # default CRC32 (2% of the worker's time). Yours wins (WAXSERVE_KAFKA_*).
            "partitioner": "murmur2_random",
            **config.client_config(),
            "linger.ms": str(config.linger_ms),
            # Kafka's idempotent producer keeps retries from duplicating or reordering.
            "enable.idempotence": "true",
        }
        key = repr(sorted(settings.items()))
        with cls._lock:
            shared = cls._producers.get(key)
            if shared is None:
                shared = cls._producers[key] = cls(settings)
            return shared

    def on_delivery(self, err: KafkaError | None, _msg: object) -> None:
        if err is not None:
            self.errors.append(str(err))

    def produce(self, topic: str, messages: list[OutMessage]) -> None:
        produce = self.producer.produce
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
                self.producer.poll(0.05)
            pending = pending[done:]
        self.producer.poll(0)

    def flush(self) -> None:
        """Wait until everything produced so far is delivered; raise if anything failed."""
        remaining = self.producer.flush(60)
        if remaining:
            raise RuntimeError(f"{remaining} messages not delivered within 60 s")
        if self.errors:
            errors, self.errors = self.errors, []
            # Raising fails the epoch, so recovery re-sends from the last snapshot.
            raise RuntimeError(f"{len(errors)} messages failed delivery: {errors[:3]}")


class _SinkPartition(StatefulSinkPartition[list[OutMessage], None]):
    def __init__(self, producer: _SharedProducer, topic: str) -> None:
        self._producer = producer
        self._topic = topic

    def write_batch(self, values: list[list[OutMessage]]) -> None:
        for messages in values:
            self._producer.produce(self._topic, messages)

    def snapshot(self) -> None:
        self._producer.flush()

    def close(self) -> None:
        self._producer.flush()


class KafkaBatchSink(FixedPartitionedSink[list[OutMessage], None]):
    """Writes `(route_key, [messages])` items to one topic; delivery is confirmed at each
    snapshot. Messages keep their own keys, so Kafka partitions by message key."""

    def __init__(self, config: Config, topic: str, parts: int) -> None:
        self._config = config
        self._topic = topic
        self._parts = parts

    def list_parts(self) -> list[str]:
        return [str(i) for i in range(self._parts)]

    def part_fn(self, item_key: str) -> int:
        return zlib.crc32(item_key.encode())

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _SinkPartition:
        return _SinkPartition(_SharedProducer.get(self._config), self._topic)


def kafka_sources(config: Config) -> dict[str, KafkaBatchSource]:
    """The dataflow's inputs on Kafka."""
    return {
        "control": KafkaBatchSource(config, config.control_topic),
        "records": KafkaBatchSource(config, list(config.record_topic_defaults)),
    }


def kafka_sinks(config: Config) -> dict[str, KafkaBatchSink]:
    """The dataflow's outputs on Kafka."""
    topics = {
        "scored": config.scored_topic,
        "stats": config.stats_topic,
        "drift": config.drift_topic,
        "events": config.events_topic,
        "dlq": config.dlq_topic,
    }
    return {name: KafkaBatchSink(config, topic, config.shards) for name, topic in topics.items()}
