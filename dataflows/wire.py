"""Protobuf wire encoding of scored records, a batch at a time.

Building one `pb.ScoredRecord` per record and serializing it cost ~1 µs a record, the
largest per-record cost of scoring. Protobuf parses concatenated messages as one (the
later value of a field wins, fields may come in any order), so a scored record is written
here as three parts: the fields every record of a model call shares, serialized once per
call by protobuf itself; the record's two strings (output key, record id); and its numbers
(source offset, value, event time), encoded for the whole batch at once with numpy.
`tests/test_wire.py` checks the bytes parse back to the same message as protobuf's own
encoding, edge values included.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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
    record_ids: Sequence[str],
    numbers: Sequence[bytes],
) -> list[bytes]:
    """ScoredRecord bytes: the shared fields, then each record's key, id and numbers."""
    ids = [r.encode() for r in record_ids]
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
