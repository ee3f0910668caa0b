"""Protobuf wire encoding of scored records, a batch at a time.

Building one `pb.ScoredRecord` per record and serializing it cost ~1 µs a record, the
largest per-record cost of scoring. Protobuf parses concatenated messages as one (the
later value of a field wins, fields may come in any order), so a scored record is written
here as three parts: the fields every record of a model call shares, serialized once per
call by protobuf itself (then the model's lineage, serialized once per binding by
`dataflows.scoring.scored.lineage_field`); the record's two strings (output key, record
id); and its numbers (source offset, value, event time), encoded for the whole batch at
once with numpy. In the usual batch every record's fields have the same lengths (one
model, consecutive offsets, ids of one width): `regression_records` then lays all of them
out as the rows of one byte matrix and slices the records off it. `tests/test_wire.py`
checks the bytes parse back to the same message as protobuf's own encoding, edge values
included.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import cast

import numpy as np

from dataflows.core.records import EncodedKeys, common_length

# Tags (field number << 3 | wire type) of protos/waxserve.proto's ScoredRecord.
_TAG_OUTPUT_KEY = b"\x0a"  # 1, length-delimited
_TAG_RECORD_ID = b"\x12"  # 2, length-delimited
_TAG_SOURCE_OFFSET = 0x30  # 6, varint
_TAG_VALUE = 0x51  # 10, 64-bit
_TAG_EVENT_TIME = 0x70  # 14, varint

_VARINT_MAX_BYTES = 10
_SHIFTS = np.arange(0, 7 * _VARINT_MAX_BYTES, 7, dtype=np.uint64)
# A uint64 needs k + 1 varint bytes when it is >= 2**(7k): k = 1..9.
_BYTE_INDEX = np.arange(_VARINT_MAX_BYTES)
_THRESHOLDS = np.array([1 << (7 * k) for k in range(1, _VARINT_MAX_BYTES)], dtype=np.uint64)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_LENGTH_PREFIX = [_varint(n) for n in range(1 << 14)]
"""Varint bytes of 0..16383: string lengths, looked up instead of encoded per record."""


def length_prefix(n: int) -> bytes:
    """The varint that precedes a length-delimited field of `n` bytes."""
    return _LENGTH_PREFIX[n] if n < len(_LENGTH_PREFIX) else _varint(n)


def _varint_bytes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Varint encodings of an int64 column as a (n, 10) uint8 matrix, and each one's length.

    Negative int64 values are encoded as protobuf encodes them: as their two's-complement
    uint64, ten bytes.
    """
    unsigned = values.astype(np.int64, copy=False).view(np.uint64)
    groups = ((unsigned[:, None] >> _SHIFTS) & np.uint64(0x7F)).astype(np.uint8)
    lengths = np.searchsorted(_THRESHOLDS, unsigned, side="right") + 1
    used = lengths[:, None] > _BYTE_INDEX
    # Every byte but the last of each varint has its continuation bit set.
    groups |= (lengths[:, None] - 1 > _BYTE_INDEX).view(np.uint8) << 7
    return groups, used


def output_keys(
    topic: str, partition: int, model_name: str, model_version: str, offsets: Iterable[int]
) -> list[bytes]:
    """The records' output keys, "<topic>/<partition>/<offset>/<model name>/<model
    version>": one %-format call per offset."""
    prefix = f"{topic}/{partition}/".encode().replace(b"%", b"%%")
    key_format = prefix + b"%d" + f"/{model_name}/{model_version}".encode().replace(b"%", b"%%")
    return list(map(key_format.__mod__, offsets))


def _fixed_varints(values: np.ndarray) -> np.ndarray | None:
    """Varints of an int64 column as an (n, k) uint8 matrix when all n are k bytes long;
    None when their lengths differ."""
    unsigned = values.astype(np.int64, copy=False).view(np.uint64)
    lengths = np.searchsorted(_THRESHOLDS, [unsigned.min(), unsigned.max()], side="right") + 1
    if lengths[0] != lengths[1]:
        return None
    groups = ((unsigned[:, None] >> _SHIFTS[: lengths[0]]) & np.uint64(0x7F)).astype(np.uint8)
    groups[:, :-1] |= 0x80  # every byte but the last has its continuation bit set
    return groups


@dataclass
class RecordFields:
    """The fields of a batch's ScoredRecords that do not depend on the model: each record's
    id, source offset and event time. Their encodings are computed on first use and kept,
    so that every model scoring the same records (a shadow beside the active model, an
    ensemble's members) encodes them once."""

    ids: EncodedKeys
    offsets: np.ndarray
    event_times_ms: np.ndarray

    @cached_property
    def offset_list(self) -> list[int]:
        """The source offsets as Python ints (for the output keys)."""
        return cast(list[int], self.offsets.tolist())

    @cached_property
    def fixed_varints(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The offsets' and the event times' varints as (n, k) uint8 matrices, when each
        column's varints are of one length; None when not."""
        offsets = _fixed_varints(self.offsets)
        times = _fixed_varints(self.event_times_ms) if offsets is not None else None
        return None if offsets is None or times is None else (offsets, times)

    @cached_property
    def offset_and_time_fields(self) -> list[bytes]:
        """Per record, its encoded source offset and event time fields (no value)."""
        return numeric_fields(self.offsets, self.event_times_ms, None)


def regression_records(
    shared: bytes,
    output_keys: Sequence[bytes],
    fields: RecordFields,
    values: np.ndarray,
) -> list[bytes]:
    """ScoredRecord bytes of a regressor's records: the shared fields, then each record's
    output key, record id, source offset, value and event time."""
    ids = fields.ids
    n = len(ids)
    key_width, id_width = common_length(output_keys), ids.width
    fixed = fields.fixed_varints if key_width is not None and id_width is not None else None
    if key_width is None or id_width is None or fixed is None:
        numbers = numeric_fields(fields.offsets, fields.event_times_ms, values)
        return _join_records(shared, output_keys, ids.items, numbers)
    offset_bytes, time_bytes = fixed

    def constant(data: bytes) -> np.ndarray:
        return np.broadcast_to(np.frombuffer(data, np.uint8), (n, len(data)))

    def rows(joined: bytes, width: int) -> np.ndarray:
        return np.frombuffer(joined, np.uint8).reshape(n, width)

    doubles = np.ascontiguousarray(values, dtype="<f8").view(np.uint8).reshape(n, 8)
    matrix = np.concatenate(
        [
            constant(shared + _TAG_OUTPUT_KEY + length_prefix(key_width)),
            rows(b"".join(output_keys), key_width),
            constant(_TAG_RECORD_ID + length_prefix(id_width)),
            ids.matrix(),
            constant(bytes([_TAG_SOURCE_OFFSET])),
            offset_bytes,
            constant(bytes([_TAG_VALUE])),
            doubles,
            constant(bytes([_TAG_EVENT_TIME])),
            time_bytes,
        ],
        axis=1,
    )
    flat, width = matrix.tobytes(), matrix.shape[1]
    return [flat[i : i + width] for i in range(0, n * width, width)]


def numeric_fields(
    source_offsets: np.ndarray, event_times_ms: np.ndarray, values: np.ndarray | None
) -> list[bytes]:
    """Per record, the encoded `source_offset`, `value` (when `values` is given) and
    `event_time_ms` fields of a ScoredRecord."""
    n = len(source_offsets)
    if n == 0:
        return []
    offset_bytes, offset_used = _varint_bytes(source_offsets)
    time_bytes, time_used = _varint_bytes(event_times_ms)
    tag = np.ones((n, 1), bool)
    parts: list[np.ndarray] = [np.full((n, 1), _TAG_SOURCE_OFFSET, np.uint8), offset_bytes]
    masks: list[np.ndarray] = [tag, offset_used]
    if values is not None:
        doubles = np.ascontiguousarray(values, dtype="<f8").view(np.uint8).reshape(n, 8)
        parts += [np.full((n, 1), _TAG_VALUE, np.uint8), doubles]
        masks += [np.ones((n, 9), bool)]
    parts += [np.full((n, 1), _TAG_EVENT_TIME, np.uint8), time_bytes]
    masks += [tag, time_used]
    matrix = np.concatenate(parts, axis=1)
    mask = np.concatenate(masks, axis=1)
    flat = matrix[mask].tobytes()
    ends = np.cumsum(mask.sum(axis=1)).tolist()
    starts = [0, *ends[:-1]]
    return [flat[s:e] for s, e in zip(starts, ends, strict=True)]


def scored_record_values(
    shared: bytes,
    output_keys: Sequence[bytes],
    record_ids: EncodedKeys,
    numbers: Sequence[bytes],
) -> list[bytes]:
    """ScoredRecord bytes: the shared fields, then each record's key, id and numbers."""
    return _join_records(shared, output_keys, record_ids.items, numbers)


def _join_records(
    shared: bytes, output_keys: Sequence[bytes], ids: list[bytes], numbers: Sequence[bytes]
) -> list[bytes]:
    try:
        key_lengths = [_LENGTH_PREFIX[n] for n in map(len, output_keys)]
        id_lengths = [_LENGTH_PREFIX[n] for n in map(len, ids)]
    except IndexError:  # a string of 16 KiB or more
        key_lengths = [length_prefix(len(k)) for k in output_keys]
        id_lengths = [length_prefix(len(r)) for r in ids]
    n = len(ids)
    return list(
        map(
            b"".join,
            zip(
                [shared + _TAG_OUTPUT_KEY] * n,
                key_lengths,
                output_keys,
                [_TAG_RECORD_ID] * n,
                id_lengths,
                ids,
                numbers,
                strict=True,
            ),
        )
    )
