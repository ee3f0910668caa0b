"""Records on the wire: source batches, routing by data type, decoded columns, dead letters.

Everything here is plain Python and numpy, testable without Bytewax or Kafka.

A records-topic batch is split by data type (`DataTypeRouter`) into `RawRun`s, which
travel undecoded to the shard that scores them; there the data type's contract decodes
a run into `RecordColumns`: a float64 matrix of the numeric fields (NaN for absent) and an
object matrix of the text fields (None for absent), in the contract's column layout.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast, overload

import msgspec
import numpy as np

from dataflows.contracts.codecs.base import Decoded
from dataflows.contracts.schema import Contract
from dataflows.core.reasons import Reason

CONTENT_TYPE_HEADER = "content-type"

Headers = list[tuple[str, bytes | None]]
OutMessage = tuple[bytes | None, bytes | None, Headers | None]
"""A message for a sink: key, value, headers (None: no headers)."""

MAX_DATA_TYPE_LENGTH = 128

MAX_ID_LENGTH = 1024
"""Longest record id (characters): every scored record carries it, so a longer one would
make the scored topic refuse the message. A record with a longer id is a dead letter."""

DEFAULT_MAX_MESSAGE_BYTES = 1_000_000
"""librdkafka's default message.max.bytes: the largest message a producer accepts."""

MIN_MESSAGE_BYTES = 16_384
"""The smallest usable output limit: a dead letter's own headers, key and some original."""

RECORD_OVERHEAD_BYTES = 512
"""What a record costs on the wire beyond its key, value and headers. librdkafka counts
at most ~40 bytes per record (message format v2) against message.max.bytes; the rest is
margin, so a message sized to the limit here is never refused there."""

_HEADER_OVERHEAD_BYTES = 10  # varint lengths of a header's name and value
_MAX_ERROR_MESSAGE_BYTES = 2048
_MAX_HEADER_FIELD_BYTES = 256  # data type, topic: identifiers, long only when hostile
_MAX_KEPT_KEY_BYTES = 1024
_MAX_KEPT_HEADER_BYTES = 64 << 10  # the producer's headers kept in a truncated dead letter


@dataclass
class SourceBatch:
    """Messages consumed together from one topic partition, in offset order."""

    topic: str
    partition: int
    offsets: list[int]
    keys: list[bytes | None]
    values: list[bytes | None]
    headers: list[Headers]

    def __len__(self) -> int:
        return len(self.offsets)

    def dead_letter(self, i: int, stage: str, reason: str, message: str) -> DeadLetter:
        """Dead letter for message `i`, as it arrived."""
        return DeadLetter(
            stage=stage,
            reason=reason,
            message=message,
            topic=self.topic,
            partition=self.partition,
            offset=self.offsets[i],
            key=self.keys[i],
            value=self.values[i],
            headers=self.headers[i],
        )


@dataclass
class DeadLetter:
    """An input that could not be processed, kept whole for the dead-letter topic."""

    stage: str  # "decode", "score", "model", "contract"
    reason: str  # error class, e.g. "missing_feature"
    message: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers = field(default_factory=list)
    data_type: str = ""
    # The dead-letter topic's message limit (key + value + headers); the stages that know
    # the configured max_message_bytes stamp it, the others keep librdkafka's default.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    def to_message(self, max_bytes: int | None = None) -> OutMessage:
        """The dead letter as a Kafka message: original key and bytes, error in headers.

        The message never exceeds `max_bytes` (default: `max_message_bytes`) with its
        record overhead: a producer would refuse it, and the input it stands for would stop
        the dataflow on every restart. Past the limit it keeps as much of the original as
        fits (the key up to 1 KiB, the producer's headers up to 64 KiB, then the value)
        and says so: `waxserve.truncated=true`, with `waxserve.original.size` and
        `waxserve.original.sha256` of the whole value (and of the key, when cut).
        """
        limit = self.max_message_bytes if max_bytes is None else max_bytes
        ours: Headers = [
            ("waxserve.stage", _clip(self.stage, _MAX_HEADER_FIELD_BYTES)),
            ("waxserve.error.class", _clip(self.reason, _MAX_HEADER_FIELD_BYTES)),
            ("waxserve.error.message", _clip(self.message, _MAX_ERROR_MESSAGE_BYTES)),
            ("waxserve.source.topic", _clip(self.topic, _MAX_HEADER_FIELD_BYTES)),
            ("waxserve.source.partition", str(self.partition).encode()),
            ("waxserve.source.offset", str(self.offset).encode()),
        ]
        if self.data_type:
            ours.append(("waxserve.data_type", _clip(self.data_type, _MAX_HEADER_FIELD_BYTES)))
        # Keep the producer's own headers too, after ours.
        theirs = [
            (_header_name(name), _header_value(value))
            for name, value in self.headers
            if not str(name).startswith("waxserve.")
        ]
        key, value = self.key, self.value
        if _message_size(key, value, ours + theirs) <= limit:
            return (key, value, ours + theirs)
        return fit_message((key, value, theirs), limit, ours)


def fit_message(message: OutMessage, limit: int, ours: Headers | None = None) -> OutMessage:
    """`message` cut to fit `limit` bytes with its record overhead, headers `ours` first.

    It keeps the key up to 1 KiB, the message's headers up to 64 KiB, then as much of the
    value as fits, and says so: `waxserve.truncated=true`, `waxserve.original.size` and
    `waxserve.original.sha256` of the whole value (and of the key, when cut),
    `waxserve.headers.dropped`. A message is never dropped for its size.
    """
    key, original, headers = message
    theirs = headers or []
    value = original or b""
    marks: Headers = [
        *(ours or []),
        ("waxserve.truncated", b"true"),
        ("waxserve.original.size", str(len(value)).encode()),
        ("waxserve.original.sha256", hashlib.sha256(value).hexdigest().encode()),
    ]
    if key is not None and len(key) > _MAX_KEPT_KEY_BYTES:
        marks.append(("waxserve.original.key.size", str(len(key)).encode()))
        marks.append(("waxserve.original.key.sha256", hashlib.sha256(key).hexdigest().encode()))
        key = key[:_MAX_KEPT_KEY_BYTES]
    room = limit - RECORD_OVERHEAD_BYTES - _headers_size(marks) - 64  # 64: the count below
    room -= len(key) if key is not None else 0
    kept: Headers = []
    header_room = min(room, _MAX_KEPT_HEADER_BYTES)
    for header in theirs:
        size = _headers_size([header])
        if size <= header_room:
            kept.append(header)
            header_room -= size
            room -= size
    if len(kept) < len(theirs):
        marks.append(("waxserve.headers.dropped", str(len(theirs) - len(kept)).encode()))
    kept_value = None if original is None else value[: max(0, room)]
    return (key, kept_value, marks + kept)


@dataclass
class RawRun(SourceBatch):
    """Undecoded messages of one data type from one source partition, in offset order."""

    data_type: str = ""

    @property
    def size_bytes(self) -> int:
        """The bytes of its values, keys and headers (what holding it costs, roughly)."""
        size = sum(len(v) for v in self.values if v is not None)
        size += sum(len(k) for k in self.keys if k is not None)
        if self.headers and self.headers.count(self.headers[0]) == len(self.headers):
            return size + len(self.headers) * _headers_size(self.headers[0])  # the usual case
        return size + sum(map(_headers_size, self.headers))

    def dead_letter(self, i: int, stage: str, reason: str, message: str) -> DeadLetter:
        """Dead letter for message `i`, as it arrived, with its data type."""
        dead = super().dead_letter(i, stage, reason, message)
        dead.data_type = self.data_type
        return dead

    def dead_letters(self, stage: str, reason: str, message: str) -> list[DeadLetter]:
        """Every message of the run as a dead letter with the same reason."""
        return [self.dead_letter(i, stage, reason, message) for i in range(len(self))]


# --- which data type a message is --------------------------------------------------------

DATA_TYPE_SOURCES = ("header", "key", "field", "topic")
"""Where a record's data type can come from, tried in the configured order."""


class DataTypeRouter:
    """Splits a source batch into runs per data type.

    Each message's data type is the first of the configured sources that has one: a
    header (`header_name`), the message key, a top-level string field of a JSON record
    (`field_name`), or the topic's default data type. A message with none is a dead letter
    (no_data_type).
    """

    def __init__(
        self,
        sources: Sequence[str],
        *,
        header_name: str = "data-type",
        field_name: str = "data_type",
        topic_defaults: Mapping[str, str] | None = None,
    ) -> None:
        unknown = [s for s in sources if s not in DATA_TYPE_SOURCES]
        if unknown or not sources:
            raise ValueError(
                f"data type sources must be some of {', '.join(DATA_TYPE_SOURCES)}, "
                f"got {list(sources)}"
            )
        self._sources = tuple(sources)
        self._header = header_name.lower()
        self._topic_defaults = dict(topic_defaults or {})
        peek = msgspec.defstruct(
            "DataTypePeek", [("value", str | None, None)], rename={"value": field_name}
        )
        self._peek = msgspec.json.Decoder(peek).decode

    def _from_header(self, headers: Headers) -> str | None:
        for name, value in headers:
            if name.lower() == self._header and value:
                return value.decode("utf-8", "replace")
        return None

    def _from_field(self, value: bytes | None) -> str | None:
        if not value or value[:1] != b"{":
            return None
        try:
            found: Any = self._peek(value)
        except msgspec.DecodeError:
            return None
        return found.value or None

    def _resolve(self, batch: SourceBatch) -> list[str | None]:
        n = len(batch)
        found: list[str | None] = [None] * n
        for source in self._sources:
            if source == "topic":
                default = self._topic_defaults.get(batch.topic)
                if default is not None:
                    found = [d or default for d in found]
            elif source == "header":
                first = batch.headers[0]
                if batch.headers.count(first) == n:  # producers send the same headers
                    value = self._from_header(first)
                    found = [d or value for d in found]
                else:
                    found = [
                        d or self._from_header(h) for d, h in zip(found, batch.headers, strict=True)
                    ]
            elif source == "key":
                found = [
                    d or (k.decode("utf-8", "replace") if k else None)
                    for d, k in zip(found, batch.keys, strict=True)
                ]
            else:
                found = [d or self._from_field(v) for d, v in zip(found, batch.values, strict=True)]
            if None not in found:
                break
        return found

    def split(self, batch: SourceBatch) -> tuple[list[RawRun], list[DeadLetter]]:
        """Runs per data type (in order of first appearance) and dead letters."""
        if len(batch) == 0:
            return [], []
        data_types = self._resolve(batch)
        first = data_types[0]
        if first is not None and data_types.count(first) == len(batch) and _valid(first):
            run = RawRun(
                batch.topic,
                batch.partition,
                batch.offsets,
                batch.keys,
                batch.values,
                batch.headers,
                data_type=first,
            )
            return [run], []
        rows: dict[str, list[int]] = {}
        dead: list[DeadLetter] = []
        for i, data_type in enumerate(data_types):
            if data_type is None:
                dead.append(
                    batch.dead_letter(
                        i,
                        "decode",
                        Reason.NO_DATA_TYPE,
                        f"no data type: none of {', '.join(self._sources)} named one",
                    )
                )
            elif not _valid(data_type):
                dead.append(
                    batch.dead_letter(
                        i,
                        "decode",
                        Reason.NO_DATA_TYPE,
                        f"data type {data_type[:MAX_DATA_TYPE_LENGTH]!r}... is longer than "
                        f"{MAX_DATA_TYPE_LENGTH} characters or empty",
                    )
                )
            else:
                rows.setdefault(data_type, []).append(i)
        runs = [
            RawRun(
                batch.topic,
                batch.partition,
                [batch.offsets[i] for i in index],
                [batch.keys[i] for i in index],
                [batch.values[i] for i in index],
                [batch.headers[i] for i in index],
                data_type=data_type,
            )
            for data_type, index in rows.items()
        ]
        return runs, dead


def _valid(data_type: str) -> bool:
    return 0 < len(data_type) <= MAX_DATA_TYPE_LENGTH


def valid_data_type(data_type: str) -> bool:
    """Whether a name can be a data type: 1 to MAX_DATA_TYPE_LENGTH characters, UTF-8."""
    if not _valid(data_type):
        return False
    try:
        data_type.encode()
    except UnicodeEncodeError:  # a lone surrogate: no Kafka key or Bytewax key can hold it
        return False
    return True


# --- sizes of outgoing messages ----------------------------------------------------------


def _clip(text: str, limit: int) -> bytes:
    """`text` as UTF-8 (unencodable characters replaced), cut to `limit` bytes."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return data
    return data[: limit - 3].decode("utf-8", "ignore").encode() + b"..."


def _header_name(name: object) -> str:
    """A header name the producer can encode (it encodes names as UTF-8)."""
    text = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    try:
        text.encode()
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode()
    return text


def _header_value(value: object) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "replace")


def _headers_size(headers: Sequence[tuple[str, bytes | None]]) -> int:
    return sum(
        len(name.encode("utf-8", "replace")) + len(value or b"") + _HEADER_OVERHEAD_BYTES
        for name, value in headers
    )


def _message_size(key: bytes | None, value: bytes | None, headers: Headers) -> int:
    """What a message counts against the producer's message.max.bytes, with margin."""
    size = RECORD_OVERHEAD_BYTES + _headers_size(headers)
    return size + (len(key) if key is not None else 0) + (len(value) if value is not None else 0)


# --- decoded columns ---------------------------------------------------------------------


def common_length(items: Sequence[bytes]) -> int | None:
    """The length every item has, or None when they differ (or there is none)."""
    lengths = set(map(len, items))
    return lengths.pop() if len(lengths) == 1 else None


@dataclass(frozen=True)
class EncodedKeys:
    """Strings as UTF-8 bytes, encoded once for everything that needs their bytes: the
    scored records' ids and a split's entity hash (`dataflows.rollout.assign`). `width` is
    their common length in bytes (None when they differ), and then `joined` holds all of
    them back to back, ready to view as an (n, width) byte matrix."""

    items: list[bytes]
    width: int | None
    joined: bytes

    @classmethod
    def of(cls, strings: Sequence[str]) -> EncodedKeys:
        """The strings, encoded."""
        return cls.of_bytes([s.encode() for s in strings])

    @classmethod
    def of_bytes(cls, items: list[bytes]) -> EncodedKeys:
        """Byte strings as they are."""
        width = common_length(items)
        return cls(items, width, b"".join(items) if width is not None else b"")

    def __len__(self) -> int:
        return len(self.items)

    def take(self, at: list[int]) -> EncodedKeys:
        """The keys at these positions."""
        items = list(map(self.items.__getitem__, at))
        if self.width is None:
            return EncodedKeys.of_bytes(items)  # the rows taken may share a width
        return EncodedKeys(items, self.width, b"".join(items))

    def matrix(self) -> np.ndarray:
        """The keys as the rows of an (n, width) uint8 matrix; only when they share a width."""
        assert self.width is not None
        return np.frombuffer(self.joined, np.uint8).reshape(len(self.items), self.width)


_ENCODED_IDS = "encoded ids"
T = TypeVar("T")


class Picked(Sequence[T]):
    """Some items of a sequence, by position, without copying them: what a run taken from
    another keeps of the records as they arrived (keys, values, headers), which only a dead
    letter reads. A split takes a run apart for every batch; copying these cost a third of
    its takes."""

    __slots__ = ("_at", "_items")

    def __init__(self, items: Sequence[T], at: list[int]):
        self._items = items
        self._at = at

    def __len__(self) -> int:
        return len(self._at)

    @overload
    def __getitem__(self, i: int) -> T: ...
    @overload
    def __getitem__(self, i: slice) -> list[T]: ...
    def __getitem__(self, i: int | slice) -> T | list[T]:
        if isinstance(i, slice):
            return [self._items[j] for j in self._at[i]]
        return self._items[self._at[i]]


@dataclass
class RecordColumns:
    """Decoded records of one data type from one source partition, as columns.

    `numeric[i, j]` is the contract's numeric field j of record i (NaN when absent),
    `text[i, j]` its text field j (None when absent). `labels` is the label field's column
    (float64 with NaN, or object with None), all-absent when the contract has no label.
    `raw[i]`, `keys[i]` and `headers[i]` are record i as it arrived, for dead letters.
    """

    data_type: str
    contract_version: int
    topic: str
    partition: int
    offsets: np.ndarray  # int64 (n,)
    record_ids: list[str]
    event_time_ms: np.ndarray  # int64 (n,)
    numeric: np.ndarray  # float64 (n, len(contract.numeric_fields))
    text: np.ndarray  # object (n, len(contract.text_fields))
    labels: np.ndarray  # float64 or object (n,)
    keys: Sequence[bytes | None]
    raw: Sequence[bytes | None]
    headers: Sequence[Headers]
    # What `memo` has derived from this run: its model calls share it.
    _memo: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.record_ids)

    def memo(self, name: str, compute: Callable[[], T]) -> T:
        """What `compute` derives from this run alone, computed on first use: the model
        calls of one run (a shadow and the active model, an ensemble's members) share it."""
        if name not in self._memo:
            self._memo[name] = compute()
        return cast(T, self._memo[name])

    def encoded_ids(self) -> EncodedKeys:
        """The record ids as UTF-8 bytes: encoded once for every model call and entity
        hash of this run, and carried into the runs `take` makes of it."""
        return self.memo(_ENCODED_IDS, lambda: EncodedKeys.of(self.record_ids))

    def take(self, rows: np.ndarray) -> RecordColumns:
        """The records at these row indices (a boolean mask or integer indices)."""
        index = np.flatnonzero(rows) if rows.dtype == bool else rows
        at = index.tolist()  # Python ints: indexing a list by numpy ints is slower
        encoded = self._memo.get(_ENCODED_IDS)
        return RecordColumns(
            data_type=self.data_type,
            contract_version=self.contract_version,
            topic=self.topic,
            partition=self.partition,
            offsets=self.offsets[index],
            record_ids=[self.record_ids[i] for i in at],
            event_time_ms=self.event_time_ms[index],
            numeric=self.numeric[index],
            text=self.text[index],
            labels=self.labels[index],
            keys=Picked(self.keys, at),
            raw=Picked(self.raw, at),
            headers=Picked(self.headers, at),
            _memo={_ENCODED_IDS: encoded.take(at)} if encoded is not None else {},
        )

    def dead_letter(self, row: int, stage: str, reason: str, message: str) -> DeadLetter:
        """Dead letter for record `row`."""
        return DeadLetter(
            stage=stage,
            reason=reason,
            message=message,
            topic=self.topic,
            partition=self.partition,
            offset=int(self.offsets[row]),
            key=self.keys[row],
            value=self.raw[row],
            headers=self.headers[row],
            data_type=self.data_type,
        )


def record_columns(
    run: RawRun, contract: Contract, decoded: Decoded
) -> tuple[RecordColumns | None, list[DeadLetter]]:
    """A decoded run as columns, with the contract's id, event time and label pulled out;
    messages that failed decoding as dead letters."""
    n = len(run)
    dead = [
        run.dead_letter(i, "decode", reason, message)
        for i, (reason, message) in sorted(decoded.errors.items())
    ]
    numeric, text = decoded.numeric, decoded.text
    offsets = np.asarray(run.offsets, dtype=np.int64)
    keys, raw, headers = run.keys, run.values, run.headers
    if dead:
        keep = np.ones(n, dtype=bool)
        keep[list(decoded.errors)] = False
        index = np.flatnonzero(keep)
        if len(index) == 0:
            return None, dead
        numeric, text, offsets = numeric[index], text[index], offsets[index]
        keys = [keys[i] for i in index]
        raw = [raw[i] for i in index]
        headers = [headers[i] for i in index]
    columns = contract.columns
    record_ids = _record_ids(run, contract, numeric, text, offsets)
    if contract.event_time_field:
        times = numeric[:, columns[contract.event_time_field].index]
        event_times = np.where(np.isnan(times), 0, times).astype(np.int64)
    else:
        event_times = np.zeros(len(offsets), dtype=np.int64)
    if contract.label_field:
        where = columns[contract.label_field]
        labels = (numeric if where.numeric else text)[:, where.index]
    else:
        labels = np.full(len(offsets), np.nan)
    out = RecordColumns(
        data_type=run.data_type,
        contract_version=contract.version,
        topic=run.topic,
        partition=run.partition,
        offsets=offsets,
        record_ids=record_ids,
        event_time_ms=event_times,
        numeric=numeric,
        text=text,
        labels=labels,
        keys=keys,
        raw=raw,
        headers=headers,
    )
    if record_ids and max(map(len, record_ids)) > MAX_ID_LENGTH:  # one C pass; rare
        too_long = np.fromiter((len(i) > MAX_ID_LENGTH for i in record_ids), bool, len(out))
        dead.extend(
            out.dead_letter(
                row,
                "decode",
                Reason.OUT_OF_RANGE,
                f"id field {contract.id_field!r} is {len(record_ids[row])} characters, "
                f"more than {MAX_ID_LENGTH}",
            )
            for row in np.flatnonzero(too_long).tolist()
        )
        if too_long.all():
            return None, dead
        out = out.take(~too_long)
    return out, dead


def _record_ids(
    run: RawRun, contract: Contract, numeric: np.ndarray, text: np.ndarray, offsets: np.ndarray
) -> list[str]:
    """Each record's id field as text; "<topic>/<partition>/<offset>" where it has none."""
    prefix = f"{run.topic}/{run.partition}/"
    if not contract.id_field:
        return [f"{prefix}{o}" for o in offsets.tolist()]
    where = contract.columns[contract.id_field]
    if where.numeric:
        column = numeric[:, where.index]
        if not np.isnan(column).any():
            return list(map(str, column.astype(np.int64).tolist()))
        return [
            f"{prefix}{o}" if v != v else str(int(v))
            for v, o in zip(column.tolist(), offsets.tolist(), strict=True)
        ]
    ids: list[Any] = text[:, where.index].tolist()
    if None in ids or "" in ids:
        return [i or f"{prefix}{o}" for i, o in zip(ids, offsets.tolist(), strict=True)]
    return ids
