"""What every hand-written contender needs besides its own loop: arguments, client
settings, signal handling. The stdlib and confluent-kafka only, so that the Quix Streams
contender can import it from its own virtual environment too.
"""

from __future__ import annotations

import argparse
import signal
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

FEATURES: tuple[str, ...] = (
    "fixed_acidity",
    "volatile_acidity",
    "citric_acid",
    "residual_sugar",
    "chlorides",
    "free_sulfur_dioxide",
    "total_sulfur_dioxide",
    "density",
    "ph",
    "sulphates",
    "alcohol",
)
"""The model inputs in column order: the wine contract's CSV columns but the last (quality),
wine-lr's `input_features` in the catalog (a test checks they agree). The contenders in the
Quix venv cannot import dataflows."""

FETCH_WAIT_MS = 5
"""librdkafka fetch.wait.max.ms of every contender: waxserve's default, so latencies differ by
the processing, not by this setting (librdkafka's default of 500 ms would dominate them)."""
LINGER_MS = 5
"""Producer linger.ms of every contender, waxserve's default (0 overloads tansu)."""
PARTITIONER = "murmur2_random"
"""Producer partitioner of every contender, waxserve's default (the Java client's; it
hashes keys faster than librdkafka's default CRC32)."""
BATCH = 1000
"""Messages per consume() for the batched contenders, like waxserve's default batch size."""
FETCH_QUEUE_BACKOFF_MS = 10
"""librdkafka fetch.queue.backoff.ms of every consumer, waxserve's included. tansu ignores
max.partition.fetch.bytes and answers a fetch with up to ~5 MB per partition, which
overflows librdkafka's queued.min.messages while a backlog is read; librdkafka then waits
its default 1,000 ms before fetching again: a stall of up to 1 s at a random point of a
throughput run. 10 ms keeps the backlog flowing (no effect on a live stream)."""
CONSUME_TIMEOUT_S = 0.001
"""consume() waits for a whole batch or this timeout: short, so a live stream is not held
back waiting for a full batch (the same 1 ms as waxserve's source)."""


def parse_args(
    description: str | None, *, model: bool = True, report: bool = False
) -> argparse.Namespace:
    """The arguments every contender takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--brokers", required=True, help="Kafka bootstrap servers")
    parser.add_argument("--input", required=True, help="topic of JSON wine records")
    if not report:
        parser.add_argument("--output", required=True, help="topic to write a message per record")
    if model:
        parser.add_argument("--model", required=True, help="model file")
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help="exit once N records are done (default: run until SIGINT/SIGTERM)",
    )
    if report:
        parser.add_argument("--report", required=True, help="file to write the JSON report to")
    return parser.parse_args()


def consumer_config(brokers: str) -> dict[str, Any]:
    """A consumer that is assigned partitions (no group join) and never commits."""
    return {
        "bootstrap.servers": brokers,
        "group.id": "bench",  # required by the client; unused with assign()
        "enable.auto.commit": False,
        "fetch.wait.max.ms": FETCH_WAIT_MS,
        "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,
    }


def producer_config(brokers: str) -> dict[str, Any]:
    """The contenders' producer settings."""
    return {"bootstrap.servers": brokers, "linger.ms": LINGER_MS, "partitioner": PARTITIONER}


def assign_from_beginning(consumer: Consumer, topic: str) -> None:
    """Assign every partition of `topic` from its first offset."""
    # Metadata first: librdkafka otherwise retries the first fetch after 500 ms on tansu.
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(partitions)])


def produce(producer: Producer, topic: str, key: bytes | None, value: bytes | None) -> None:
    """Produce one message, waiting while the local queue is full."""
    while True:
        try:
            producer.produce(topic, value, key)
            return
        except BufferError:
            producer.poll(0.01)


def is_json(headers: object) -> bool:
    """Whether a message's headers (`Message.headers()`) say its content type is JSON."""
    for name, value in headers if isinstance(headers, list) else ():
        if name == "content-type":
            return bool(value == b"application/json")
    return False


def stop_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so the loop's `finally` flushes either way."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def done(written: int, stop_after: int | None) -> bool:
    """Whether a contender with `--stop-after` has written enough."""
    return stop_after is not None and written >= stop_after
