"""The Record codec: waxserve.v1.Record, fields by name, each Value's kind checked."""

from __future__ import annotations

import numpy as np
import pytest

from dataflows.contracts.codecs import RecordCodec, codec_for
from dataflows.contracts.schema import Contract, Encoding
from protos import waxserve_pb2 as pb


def contract() -> Contract:
    msg = pb.DataContract(data_type="reading", version=1, encoding=pb.ENCODING_RECORD)
    msg.fields.add(name="x", type=pb.FIELD_TYPE_FLOAT)
    msg.fields.add(name="n", type=pb.FIELD_TYPE_INTEGER)
    msg.fields.add(name="ok", type=pb.FIELD_TYPE_BOOLEAN)
    msg.fields.add(name="class", type=pb.FIELD_TYPE_STRING)
    msg.fields.add(name="fixed acidity", type=pb.FIELD_TYPE_FLOAT)
    return Contract.from_proto(msg)


def record(**values: pb.Value) -> bytes:
    """protobuf's own serializer; keyword names with spaces via **{...}."""
    msg = pb.Record()
    for name, value in values.items():
        msg.fields[name].CopyFrom(value)
    return msg.SerializeToString()


GOOD = record(
    x=pb.Value(number=1.5),
    n=pb.Value(integer=-4),
    ok=pb.Value(boolean=True),
    **{"class": pb.Value(text="red"), "fixed acidity": pb.Value(integer=7), "other": pb.Value()},
)
GOOD_NUMERIC = [1.5, -4, 1, 7]
GOOD_TEXT = ["red"]


def test_round_trip() -> None:
    codec = codec_for(contract(), Encoding.RECORD)
    rows: list[dict[str, object]] = [
        {"x": 2.5, "n": 2**53, "ok": False, "class": "", "fixed acidity": 7.4},
        {"x": None, "n": float("nan")},
        {},
    ]
    values = codec.encode(rows)
    first = pb.Record.FromString(values[0])
    assert first.fields["n"].WhichOneof("kind") == "integer"
    assert first.fields["fixed acidity"].WhichOneof("kind") == "number"
    decoded = codec.decode(values)
    assert decoded.errors == {}
    nan = np.nan
    np.testing.assert_array_equal(
        decoded.numeric, [[2.5, 2**53, 0, 7.4], [nan, nan, nan, nan], [nan, nan, nan, nan]]
    )
    assert decoded.text.tolist() == [[""], [None], [None]]


def test_float_fields_take_numbers_and_integers_and_empty_values_are_absent() -> None:
    values = [
        GOOD,
        record(x=pb.Value(integer=3), n=pb.Value()),
        record(**{"class": pb.Value()}),
    ]
    decoded = RecordCodec(contract()).decode(values)
    assert decoded.errors == {}
    nan = np.nan
    np.testing.assert_array_equal(
        decoded.numeric, [GOOD_NUMERIC, [3, nan, nan, nan], [nan, nan, nan, nan]]
    )
    assert decoded.text.tolist() == [GOOD_TEXT, [None], [None]]


BAD = [
    (record(n=pb.Value(number=7.0)), "wrong_type", "'n': expected an integer Value, got number"),
    (record(x=pb.Value(text="7.4")), "wrong_type", "'x': expected a number or integer Value"),
    (record(x=pb.Value(boolean=True)), "wrong_type", "got boolean True"),
    (record(ok=pb.Value(integer=1)), "wrong_type", "'ok'"),
    (record(**{"class": pb.Value(number=1.0)}), "wrong_type", "'class'"),
    (record(x=pb.Value(number=float("nan"))), "non_finite", "'x'"),
    (record(x=pb.Value(number=float("inf"))), "non_finite", "'x'"),
    # 2**53 + 1 rounds to 2**53 in float64: the codec compares it exactly (larger ones are
    # left to the batch checks, tests/contracts/test_decode.py)
    (record(n=pb.Value(integer=2**53 + 1)), "out_of_range", "'n'"),
    (GOOD[:-2], "undecodable", "waxserve.v1.Record"),
    (b"\x0a\xff\xff\xff\xff\x0f", "undecodable", "waxserve.v1.Record"),
    (None, "undecodable", "tombstone"),
]


# Ids by position: a map's bytes differ between processes (pytest-xdist workers must agree).
@pytest.mark.parametrize(
    ("value", "reason", "mentions"), BAD, ids=[f"{i}-{bad[1]}" for i, bad in enumerate(BAD)]
)
def test_a_bad_message_is_reported_and_the_rest_decode(
    value: bytes | None, reason: str, mentions: str
) -> None:
    decoded = RecordCodec(contract()).decode([GOOD, value, GOOD])
    assert set(decoded.errors) == {1}
    assert decoded.errors[1][0] == reason
    assert mentions in decoded.errors[1][1]
    np.testing.assert_array_equal(decoded.numeric[[0, 2]], [GOOD_NUMERIC] * 2)
    assert decoded.text[[0, 2]].tolist() == [GOOD_TEXT] * 2


def test_an_empty_message_is_a_record_with_no_fields() -> None:
    decoded = RecordCodec(contract()).decode([b""])
    assert decoded.errors == {}
    assert np.isnan(decoded.numeric).all()
