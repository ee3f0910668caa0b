"""Kafka source and sink for the dataflow, on confluent-kafka.

Why not bytewax's own KafkaSource/KafkaSink: the source emits one item per message, and
per-item overhead dominates at our rates, so ours emits one `SourceBatch` per consume();
bytewax's sink calls `flush()` after every batch, which costs a third of the throughput,
so ours produces without waiting and flushes in `snapshot()`: everything written in an
epoch is delivered before the epoch's snapshot completes, which keeps output
at-least-once across a kill -9 without a round trip per batch.
"""

from __future__ import annotations

import json
import logging
import threading
import zlib
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, cast

from bytewax.connectors.kafka import BYTEWAX_CONSUMER_LAG_GAUGE
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer
from confluent_kafka import TopicPartition as KafkaTopicPartition
from confluent_kafka.admin import AdminClient

from dataflows.config import Config
from dataflows.records import Headers, OutMessage, SourceBatch

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


class _BatchPartition(StatefulSourcePartition[SourceBatch, int]):
    def __init__(
        self, config: Config, topic: str, partition: int, offset: int, step_id: str
    ) -> None:
        self._topic = topic
        self._partition = partition
        self._offset = offset
        self._batch_size = config.batch_size
        self._labels = {"step_id": step_id, "topic": topic, "partition": str(partition)}
        self._eof = False
        self._idle = False
        consumer_config = {
            **config.client_config(),
            # Offsets live in Bytewax snapshots; no consumer group, no commits.
            "group.id": "waxserve",
            "enable.auto.commit": "false",
            "enable.partition.eof": str(config.stop_at_end).lower(),
            "fetch.wait.max.ms": str(config.fetch_wait_ms),
            "statistics.interval.ms": "1000",
            "stats_cb": self._on_stats,
        }
        self._consumer = Consumer(consumer_config)
        # Knowing the partition leader before assign saves librdkafka a 500 ms retry on
        # the first fetch (seen on tansu).
        self._consumer.list_topics(topic, timeout=10)
        self._consumer.assign([KafkaTopicPartition(topic, partition, offset)])

    def _on_stats(self, stats_json: str) -> None:
        stats = json.loads(stats_json)
        part = stats.get("topics", {}).get(self._topic, {}).get("partitions", {})
        end = part.get(str(self._partition), {}).get("ls_offset")
        if end is not None and self._offset >= 0:
            BYTEWAX_CONSUMER_LAG_GAUGE.labels(**self._labels).set(end - self._offset)

    def next_batch(self) -> list[SourceBatch]:
        if self._eof:
            raise StopIteration()
        messages = self._consumer.consume(self._batch_size, 0.001)
        offsets: list[int] = []
        keys: list[bytes | None] = []
        values: list[bytes | None] = []
        headers: list[list[tuple[str, bytes]]] = []
        for msg in messages:
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    self._eof = True
                    continue
                if error.fatal():
                    raise KafkaException(error)
                log.warning("consuming %s[%d]: %s", self._topic, self._partition, error)
                continue
            offsets.append(cast(int, msg.offset()))
            keys.append(msg.key())
            values.append(msg.value())
            headers.append(cast(Headers, msg.headers() or []))
        self._idle = not offsets
        if not offsets:
            return []
        self._offset = offsets[-1] + 1
        return [SourceBatch(self._topic, self._partition, offsets, keys, values, headers)]

    def next_awake(self) -> datetime | None:
        # Polling an empty partition in a tight loop burns a core; back off briefly.
        return datetime.now(UTC) + _IDLE_BACKOFF if self._idle else None

    def snapshot(self) -> int:
        return self._offset

    def close(self) -> None:
        self._consumer.close()


class KafkaBatchSource(FixedPartitionedSource[SourceBatch, int]):
    """Reads one topic, one Bytewax partition per Kafka partition, one item per consume().

    Starts at the beginning of each partition (or where the snapshot says); with
    `config.stop_at_end` it stops at the end instead of tailing.
    """

    def __init__(self, config: Config, topic: str) -> None:
        self._config = config
        self._topic = topic

    def list_parts(self) -> list[str]:
        return [str(p) for p in topic_partitions(self._config, self._topic)]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _BatchPartition:
        offset = OFFSET_BEGINNING if resume_state is None else resume_state
        return _BatchPartition(self._config, self._topic, int(for_part), offset, step_id)


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
        for key, value, headers in messages:
            while True:
                try:
                    produce(topic, value, key, headers=cast(Any, headers))
                    break
                except BufferError:
                    # Local queue full: let librdkafka drain it, then retry.
                    self.producer.poll(0.05)
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
        "models": KafkaBatchSource(config, config.models_topic),
        "records": KafkaBatchSource(config, config.records_topic),
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
