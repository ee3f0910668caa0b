"""The batch encoder of scored records parses back to what protobuf itself would encode."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from dataflows.core.records import EncodedKeys
from dataflows.scoring import wire
from protos import waxserve_pb2 as pb

SHARED = pb.ScoredRecord(
    data_type="wine",
    source_topic="records",
    source_partition=3,
    model_name="wine-lr",
    model_version="7",
    model_sha256="ab" * 32,
    scoring_latency_us=0.25,
    scored_at_ms=1_764_600_000_123,
    batch_size=5,
    scored_by="host/1",
)

EDGE_INTS = [0, 1, 127, 128, 16_383, 16_384, 2**31, 2**53 + 1, 2**63 - 1, -1, -(2**63)]


def _expected(key: bytes, record_id: str, offset: int, event_time: int, value: float | None):
    msg = pb.ScoredRecord()
    msg.CopyFrom(SHARED)
    msg.output_key = key.decode()
    msg.record_id = record_id
    msg.source_offset = offset
    msg.event_time_ms = event_time
    if value is not None:
        msg.value = value
    return msg


@pytest.mark.parametrize("with_values", [True, False])
def test_records_parse_to_the_same_message_as_protobufs_encoding(with_values: bool) -> None:
    offsets = np.array(EDGE_INTS, dtype=np.int64)
    event_times = np.array(EDGE_INTS[::-1], dtype=np.int64)
    values = np.array([0.0, -0.0, 5.178126058334128, -1e300, np.inf, 1e-320, 3, -7, 1, 2, 0.5])
    record_ids = ["", "r", "ü" * 100, "x" * 200, "y" * 20_000, *[str(i) for i in range(6)]]
    keys = [f"records/3/{o}/wine-lr/7".encode() for o in EDGE_INTS]
    numbers = wire.numeric_fields(offsets, event_times, values if with_values else None)
    encoded = wire.scored_record_values(
        SHARED.SerializeToString(), keys, EncodedKeys.of(record_ids), numbers
    )
    assert len(encoded) == len(EDGE_INTS)
    for i, data in enumerate(encoded):
        value = float(values[i]) if with_values else None
        expected = _expected(keys[i], record_ids[i], EDGE_INTS[i], EDGE_INTS[::-1][i], value)
        assert pb.ScoredRecord.FromString(data) == expected, i


def test_an_empty_batch_encodes_to_nothing() -> None:
    empty = np.array([], dtype=np.int64)
    assert wire.numeric_fields(empty, empty, np.array([])) == []
    assert wire.scored_record_values(b"", [], EncodedKeys.of([]), []) == []


def test_length_prefixes_are_varints() -> None:
    for n in (0, 1, 127, 128, 300, 16_383, 16_384, 2**21 + 5):
        field = b"\x0a" + wire.length_prefix(n) + b"k" * n
        assert pb.ScoredRecord.FromString(field).output_key == "k" * n


def _regression_expected(keys, record_ids, offsets, event_times, values):
    return [
        _expected(k, r, int(o), int(t), float(v))
        for k, r, o, t, v in zip(keys, record_ids, offsets, event_times, values, strict=True)
    ]


@pytest.mark.parametrize(
    "case",
    ["uniform", "offset widths differ", "time widths differ", "id widths differ", "key widths"],
)
def test_regression_records_parse_to_protobufs_encoding(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first case takes the fixed-width matrix, every other one the general path.
    n = 300
    offsets = np.arange(20_000, 20_000 + n, dtype=np.int64)  # 3-byte varints throughout
    event_times = np.full(n, 1_764_600_000_000, dtype=np.int64) + np.arange(n)
    record_ids = [f"id-{i:05d}" for i in range(n)]
    if case == "offset widths differ":
        offsets = np.arange(16_300, 16_300 + n, dtype=np.int64)  # crosses 2 -> 3 bytes
    if case == "time widths differ":
        event_times[7] = 5
    if case == "id widths differ":
        record_ids[-1] = "ü" * 3
    keys = [f"records/3/{o}/wine-lr/7".encode() for o in offsets]
    if case == "key widths":
        keys[0] = b"k" * 200  # and a two-byte length prefix
    values = np.linspace(-3.5, 9.25, n)
    values[5] = -0.0
    numbers = wire.numeric_fields(offsets, event_times, values)
    general = wire.scored_record_values(
        SHARED.SerializeToString(), keys, EncodedKeys.of(record_ids), numbers
    )
    general_calls: list[tuple[object, ...]] = []
    numeric_fields = wire.numeric_fields

    def counted(*args: Any) -> Any:
        general_calls.append(args)
        return numeric_fields(*args)

    monkeypatch.setattr(wire, "numeric_fields", counted)
    encoded = wire.regression_records(
        SHARED.SerializeToString(),
        keys,
        wire.RecordFields(EncodedKeys.of(record_ids), offsets, event_times),
        values,
    )
    assert len(general_calls) == (0 if case == "uniform" else 1)
    parsed = [pb.ScoredRecord.FromString(data) for data in encoded]
    assert parsed == _regression_expected(keys, record_ids, offsets, event_times, values)
    assert encoded == general  # byte for byte


def test_regression_records_of_edge_values() -> None:
    offsets = np.array(EDGE_INTS, dtype=np.int64)
    same = np.full(len(EDGE_INTS), 2**63 - 1, dtype=np.int64)  # ten-byte varints, one width
    keys = [b"k%02d" % i for i in range(len(EDGE_INTS))]
    ids = [f"{i:02d}" for i in range(len(EDGE_INTS))]
    values = np.array([0.0, -0.0, np.inf, -np.inf, 1e-320, 1e300, 3, -7, 1, 2, 0.5])
    for offset_column in (offsets, same):
        encoded = wire.regression_records(
            b"", keys, wire.RecordFields(EncodedKeys.of(ids), offset_column, same), values
        )
        parsed = [pb.ScoredRecord.FromString(data) for data in encoded]
        expected = [
            pb.ScoredRecord(
                output_key=k.decode(),
                record_id=r,
                source_offset=int(o),
                event_time_ms=int(t),
                value=float(v),
            )
            for k, r, o, t, v in zip(keys, ids, offset_column, same, values, strict=True)
        ]
        assert parsed == expected
    assert (
        wire.regression_records(
            b"",
            [],
            wire.RecordFields(EncodedKeys.of([]), np.array([], np.int64), same[:0]),
            values[:0],
        )
        == []
    )
