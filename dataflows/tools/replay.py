"""The building blocks `waxserve` commands share for talking to the topics.

`waxserve replay` and the demo's replay thread send the lines of a CSV file as records of a
data type with them (`csv_lines`, `RecordEncoder`, `Pacer`, `produce`, `DeliveryReport`);
`waxserve publish`, `waxserve contract publish` and the demo publish with `send_control`;
`waxserve tail` and the demo decode output messages with `PROTO_TYPES` and `header_pairs`.
Failures a command reports as one line are `CliError`s.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from google.protobuf.message import Message as ProtoMessage

from dataflows.contracts.codecs import Codec, codec_for
from dataflows.contracts.codecs.base import Decoded
from dataflows.contracts.schema import (
    CONTENT_TYPES,
    Contract,
    ContractError,
    CsvOptions,
    Encoding,
    FieldType,
)
from dataflows.core.config import Config
from dataflows.core.descriptors import control_message
from dataflows.core.reasons import Reason
from dataflows.core.records import CONTENT_TYPE_HEADER
from dataflows.monitoring.feedback import feedback_contract
from dataflows.tools.broker import control_message_key, ensure_topic, kafka_settings
from protos import waxserve_pb2 as pb

FLUSH_TIMEOUT_S = 30.0
TOPIC_ALIASES = ("control", "records", "scored", "stats", "drift", "events", "dlq")
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


class StopRequests:
    """Ctrl-C and SIGTERM as requests to stop, acted on where stopping is safe (`check`);
    a second one raises KeyboardInterrupt at once. Off the main thread it does nothing.

    Python raises KeyboardInterrupt wherever the main thread is, and C code turns it into
    other errors or lost work: confluent-kafka's `produce()` reports one raised while it
    reads the headers (`PyObject_Str` runs the signal handlers) as TypeError "expected
    header key to be unicode string" (100 of 200 Ctrl-Cs in a loop of `produce()` calls,
    and `waxserve replay` exited 1 with a traceback); one raised inside
    `Consumer.consume()` drops the messages it had taken off librdkafka's queue.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if in_main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:
        """Raise KeyboardInterrupt here if a stop was requested."""
        if self.requested:
            raise KeyboardInterrupt


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

CONTENT_TYPE_OF: dict[Encoding, str] = {}
for _name, _encoding in CONTENT_TYPES.items():
    CONTENT_TYPE_OF.setdefault(_encoding, _name)
"""The content-type header value of each encoding."""


def row_values(contract: Contract, decoded: Decoded, i: int) -> dict[str, object]:
    """Record i of decoded columns as field values (absent fields left out)."""
    row: dict[str, object] = {}
    numbers = decoded.numeric[i].tolist()
    for name, value in zip(contract.numeric_fields, numbers, strict=True):
        if value != value:  # NaN: absent
            continue
        kind = contract.field_named(name).type
        row[name] = (
            int(value)
            if kind is FieldType.INTEGER
            else bool(value)
            if kind is FieldType.BOOLEAN
            else value
        )
    for name, text in zip(contract.text_fields, decoded.text[i].tolist(), strict=True):
        if text is not None:
            row[name] = text
    return row


class RecordEncoder:
    """Turns the lines of a CSV data file into records-topic messages of one data type.

    A line is read with the contract's fields as the file's columns (`columns`, default the
    contract's CSV columns; `delimiter`, default the contract's), given the record id and
    event time the contract's id and event-time fields ask for when the file has none, and
    encoded in `encoding` (default the contract's own). Each message carries a `data-type`
    header and, unless it is in the contract's own encoding, a content-type header. A line
    that does not read goes out as its raw bytes marked text/csv, so that the dataflow
    dead-letters it with the reason instead of it being lost here.

    With `feedback`, a line becomes its label message instead, for the feedback topic: the
    contract's id, event-time and label fields only (`feedback_contract`).
    """

    def __init__(
        self,
        contract: Contract,
        *,
        encoding: Encoding | None = None,
        delimiter: str | None = None,
        columns: tuple[str, ...] | None = None,
        data_type_header: str = "data-type",
        feedback: bool = False,
    ) -> None:
        self.contract = contract
        self.encoding = encoding or contract.encoding
        csv = CsvOptions(
            delimiter or contract.csv.delimiter, columns or contract.csv_columns, False
        )
        self._reader = codec_for(dataclasses.replace(contract, csv=csv), Encoding.CSV)
        written = contract
        if feedback:
            cut = feedback_contract(contract)
            if isinstance(cut, str):
                raise ContractError(Reason.MISSING_FIELD, cut)
            written = cut
        self._writer: Codec = codec_for(written, self.encoding)
        type_header = (data_type_header, contract.data_type.encode())
        self._headers: OutHeaders = [type_header]
        if self.encoding is not contract.encoding:
            self._headers.append((CONTENT_TYPE_HEADER, CONTENT_TYPE_OF[self.encoding].encode()))
        self._raw_headers: OutHeaders = [type_header, (CONTENT_TYPE_HEADER, b"text/csv")]

    def encode(
        self, raw: bytes, *, record_id: str, event_time_ms: int
    ) -> tuple[bytes, OutHeaders, bool]:
        """A line as a message: value, headers, and whether it read."""
        decoded = self._reader.decode([raw])
        if decoded.errors:
            return raw, self._raw_headers, False
        row = row_values(self.contract, decoded, 0)
        id_field, time_field = self.contract.id_field, self.contract.event_time_field
        if id_field and id_field not in row:
            kind = self.contract.field_named(id_field).type
            if kind is FieldType.STRING:
                row[id_field] = record_id
        if time_field and time_field not in row:
            row[time_field] = event_time_ms
        return self._writer.encode([row])[0], self._headers, True


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


def send_control(
    config: Config, body: pb.ModelDescriptor | pb.DataContract | pb.PlanCommand
) -> Message:
    """Produce a descriptor, contract or plan command to the control topic (keyed as on a
    compacted one: `control_message_key`) and wait for delivery."""
    value = control_message(body)
    what = {pb.ModelDescriptor: "descriptor", pb.PlanCommand: "plan command"}.get(
        type(body), "contract"
    )
    ensure_topic(config, config.control_topic, 1)
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
            config.control_topic,
            value=value,
            key=control_message_key(body),
            on_delivery=lambda err, msg: outcome.append((err, msg)),
        )
    except (KafkaException, BufferError) as exc:
        raise CliError(f"cannot produce the {what}: {exc}") from None
    if producer.flush(FLUSH_TIMEOUT_S) or not outcome:
        raise CliError(
            f"the {what} was not delivered to {config.brokers} within {FLUSH_TIMEOUT_S:g} s"
        )
    err, msg = outcome[0]
    if err is not None:
        raise CliError(f"the broker refused the {what}: {err.name()}: {err.str()}")
    return msg


def send_descriptor(config: Config, desc: pb.ModelDescriptor) -> Message:
    """Produce a model descriptor to the control topic and wait for delivery."""
    return send_control(config, desc)


# --- consuming ---------------------------------------------------------------------------


def header_pairs(msg: Message) -> list[tuple[str, bytes | None]]:
    """A consumed message's headers as (name, value) pairs, values as bytes."""
    raw = msg.headers() or []
    items = list(raw.items()) if isinstance(raw, dict) else raw
    return [(str(k), v.encode() if isinstance(v, str) else v) for k, v in items]
