"""The batch encoder of scored records parses back to what protobuf itself would encode."""

from __future__ import annotations

import numpy as np
import pytest

from dataflows import wire
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
    encoded = wire.scored_record_values(SHARED.SerializeToString(), keys, record_ids, numbers)
    assert len(encoded) == len(EDGE_INTS)
    for i, data in enumerate(encoded):
        value = float(values[i]) if with_values else None
        expected = _expected(keys[i], record_ids[i], EDGE_INTS[i], EDGE_INTS[::-1][i], value)
        assert pb.ScoredRecord.FromString(data) == expected, i


def test_an_empty_batch_encodes_to_nothing() -> None:
    empty = np.array([], dtype=np.int64)
    assert wire.numeric_fields(empty, empty, np.array([])) == []
    assert wire.scored_record_values(b"", [], [], []) == []


def test_length_prefixes_are_varints() -> None:
    for n in (0, 1, 127, 128, 300, 16_383, 16_384, 2**21 + 5):
        field = b"\x0a" + wire.length_prefix(n) + b"k" * n
        assert pb.ScoredRecord.FromString(field).output_key == "k" * n
