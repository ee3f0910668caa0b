"""The building blocks `waxserve` commands share for talking to the topics.

`waxserve replay` and the demo's replay thread send the lines of a wine CSV file with them
(`csv_lines`, `encode_line`, `Pacer`, `produce`, `DeliveryReport`); `waxserve publish` and
the demo publish models with `send_descriptor`; `waxserve tail` and the demo decode output
messages with `PROTO_TYPES` and `header_pairs`. Failures a command reports as one line are
`CliError`s.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from google.protobuf.message import Message as ProtoMessage

from dataflows.broker import ensure_topic, kafka_settings
from dataflows.config import Config
from dataflows.records import (
    CONTENT_TYPE_CSV,
    CONTENT_TYPE_HEADER,
    CONTENT_TYPE_JSON,
    RecordError,
    parse_csv_line,
    record_to_json,
    wine_record,
)
from protos import waxserve_pb2 as pb

FLUSH_TIMEOUT_S = 30.0
TOPIC_ALIASES = ("models", "records", "scored", "stats", "drift", "events", "dlq")
"""Short names `tail` accepts for the configured topics."""

PROTO_TYPES: dict[str, type[ProtoMessage]] = {
    "scored": pb.ScoredRecord,
    "stats": pb.ServingStats,
    "drift": pb.DriftMetrics,
    "events": pb.ModelEvent,
}


class CliError(Exception):
    """An expected failure: printed as one line on stderr, exit code 1."""


def in_main_thread() -> bool:
    """Whether this is the main thread: the only one that may set signal handlers."""
    return threading.current_thread() is threading.main_thread()


# --- producing ---------------------------------------------------------------------------


class Pacer:
    """Spaces events `1/rate` seconds apart on a schedule, so errors do not add up.

    A stall does not buy a long burst afterwards: at most `max_burst_s` seconds of missed
    schedule are made up.
    """

    def __init__(self, rate: float, *, max_burst_s: float = 0.1) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.max_burst_s = max_burst_s
        self._next: float | None = None

    def wait(self, idle: Callable[[], object] = lambda: None) -> None:
        """Block until the next event is due, calling `idle` at least every 0.1 s meanwhile."""
        if not self.interval:
            return
        now = time.monotonic()
        if self._next is None or self._next < now - self.max_burst_s:
            self._next = now if self._next is None else now - self.max_burst_s
        while True:
            idle()
            delay = self._next - time.monotonic()
            if delay <= 0:
                break
            time.sleep(min(delay, 0.1))
        self._next += self.interval


@dataclasses.dataclass
class CsvLine:
    """A non-blank line of a CSV file, without its line break."""

    pass_no: int  # 0 on the first pass through the file
    line_no: int  # 1-based
    raw: bytes


def csv_lines(path: Path, *, loop: bool, header: bool) -> Iterator[CsvLine]:
    """The non-blank lines of a CSV file (without the first with `header`); with `loop`,
    pass after pass, forever (unless the file has none)."""
    pass_no = 0
    while True:
        seen = False
        with path.open("rb") as f:
            for line_no, raw in enumerate(f, 1):
                if header and line_no == 1:
                    continue
                raw = raw.rstrip(b"\r\n")
                if not raw.strip():
                    continue
                seen = True
                yield CsvLine(pass_no, line_no, raw)
        if not loop or not seen:
            return
        pass_no += 1


def count_lines(path: Path, header: bool) -> int:
    """How many lines `csv_lines` yields in one pass."""
    with path.open("rb") as f:
        return sum(1 for i, raw in enumerate(f, 1) if raw.strip() and not (header and i == 1))


OutHeaders = list[tuple[str, str | bytes | None]]
"""Headers of a produced message."""
_CSV_HEADERS: OutHeaders = [(CONTENT_TYPE_HEADER, CONTENT_TYPE_CSV.encode())]
_JSON_HEADERS: OutHeaders = [(CONTENT_TYPE_HEADER, CONTENT_TYPE_JSON.encode())]


def encode_line(
    raw: bytes, *, fmt: str, record_id: str, data_type: str, event_time_ms: int
) -> tuple[bytes, OutHeaders | None, bool]:
    """A CSV line as a records-topic message: value, headers, and whether it parsed.

    A line that does not parse goes out as its raw bytes marked text/csv, whatever `fmt`,
    so that the dataflow dead-letters it instead of it being lost here.
    """
    try:
        values = parse_csv_line(raw.decode("utf-8"))
    except (RecordError, UnicodeDecodeError):
        return raw, _CSV_HEADERS, False
    if fmt == "csv":
        return raw, _CSV_HEADERS, True
    msg = wine_record(values, record_id=record_id, data_type=data_type, event_time_ms=event_time_ms)
    if fmt == "json":
        return record_to_json(msg), _JSON_HEADERS, True
    return msg.SerializeToString(), None, True


@dataclasses.dataclass
class DeliveryReport:
    """A producer's `on_delivery` callback that counts deliveries and failures."""

    delivered: int = 0
    failed: int = 0
    first_error: str = ""

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.delivered += 1
            return
        self.failed += 1
        if not self.first_error:
            self.first_error = f"{err.name()}: {err.str()}"


def produce(
    producer: Producer,
    topic: str,
    key: bytes,
    value: bytes,
    headers: OutHeaders | None,
    report: DeliveryReport,
) -> None:
    """Produce one message, waiting while the producer's local queue is full."""
    while True:
        try:
            producer.produce(topic, value=value, key=key, headers=headers, on_delivery=report)
            return
        except BufferError:  # the local queue is full: let deliveries drain it
            producer.poll(0.05)
        except KafkaException as exc:
            raise CliError(f"cannot produce to {topic}: {exc}") from None


def send_descriptor(config: Config, desc: pb.ModelDescriptor) -> Message:
    """Produce a descriptor to the models topic (key: its data type) and wait for delivery."""
    value = desc.SerializeToString()
    ensure_topic(config, config.models_topic, 1)
    producer = Producer(
        kafka_settings(
            config,
            **{
                "linger.ms": config.linger_ms,
                # Descriptors carry whole models: allow messages beyond librdkafka's 1 MB.
                "message.max.bytes": max(1_000_000, len(value) + 65_536),
            },
        )
    )
    outcome: list[tuple[KafkaError | None, Message]] = []
    try:
        producer.produce(
            config.models_topic,
            value=value,
            key=desc.data_type.encode(),
            on_delivery=lambda err, msg: outcome.append((err, msg)),
        )
    except (KafkaException, BufferError) as exc:
        raise CliError(f"cannot produce the descriptor: {exc}") from None
    if producer.flush(FLUSH_TIMEOUT_S) or not outcome:
        raise CliError(
            f"the descriptor was not delivered to {config.brokers} within {FLUSH_TIMEOUT_S:g} s"
        )
    err, msg = outcome[0]
    if err is not None:
        raise CliError(f"the broker refused the descriptor: {err.name()}: {err.str()}")
    return msg


# --- consuming ---------------------------------------------------------------------------


def header_pairs(msg: Message) -> list[tuple[str, bytes | None]]:
    """A consumed message's headers as (name, value) pairs, values as bytes."""
    raw = msg.headers() or []
    items = list(raw.items()) if isinstance(raw, dict) else raw
    return [(str(k), v.encode() if isinstance(v, str) else v) for k, v in items]
