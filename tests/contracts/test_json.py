"""The JSON codec: msgspec's typed decoding, and the per-message path that says why."""

from __future__ import annotations

import json

import msgspec
import numpy as np
import pytest

from dataflows.contracts.codecs import JsonCodec, codec_for
from dataflows.contracts.schema import Contract, Encoding
from protos import waxserve_pb2 as pb


def contract() -> Contract:
    """Field names that are not Python identifiers, or are keywords, on purpose."""
    msg = pb.DataContract(data_type="wine", version=1, encoding=pb.ENCODING_JSON)
    msg.fields.add(name="fixed acidity", type=pb.FIELD_TYPE_FLOAT, required=True)
    msg.fields.add(name="class", type=pb.FIELD_TYPE_STRING)
    msg.fields.add(name="quality", type=pb.FIELD_TYPE_INTEGER)
    msg.fields.add(name="ok", type=pb.FIELD_TYPE_BOOLEAN)
    msg.fields.add(name="__init__", type=pb.FIELD_TYPE_FLOAT)
    return Contract.from_proto(msg)


GOOD = [
    b'{"fixed acidity": 7.4, "class": "red", "quality": 5, "ok": true, "__init__": 1}',
    b'{"fixed acidity": 8, "class": null, "ok": false, "extra": [1, {"x": 2}]}',
]
GOOD_NUMERIC = [[7.4, 5.0, 1.0, 1.0], [8.0, np.nan, 0.0, np.nan]]
GOOD_TEXT = [["red"], [None]]


def test_round_trip_keeps_values_and_absence() -> None:
    codec = codec_for(contract(), Encoding.JSON)
    rows: list[dict[str, object]] = [
        {"fixed acidity": 7.4, "class": "red", "quality": 5, "ok": True, "__init__": -0.5},
        {"fixed acidity": 1e-300, "quality": -(2**53), "ok": False},
        {"class": "", "quality": None, "__init__": float("nan")},  # NaN: absent
    ]
    values = codec.encode(rows)
    assert json.loads(values[1]) == {"fixed acidity": 1e-300, "quality": -(2**53), "ok": False}
    decoded = codec.decode(values)
    assert decoded.errors == {}
    np.testing.assert_array_equal(
        decoded.numeric,
        [[7.4, 5, 1, -0.5], [1e-300, -(2**53), 0, np.nan], [np.nan, np.nan, np.nan, np.nan]],
    )
    assert decoded.text.tolist() == [["red"], [None], [""]]


def test_encode_refuses_values_its_fields_cannot_hold() -> None:
    codec = codec_for(contract(), Encoding.JSON)
    for row in ({"quality": 7.5}, {"ok": 2}, {"class": 3}, {"fixed acidity": float("inf")}):
        with pytest.raises(ValueError):
            codec.encode([row])


def test_unknown_fields_are_ignored_and_null_is_absent() -> None:
    decoded = codec_for(contract(), Encoding.JSON).decode(GOOD)
    assert decoded.errors == {}
    np.testing.assert_array_equal(decoded.numeric, GOOD_NUMERIC)
    assert decoded.text.tolist() == GOOD_TEXT


def test_msgspec_refuses_a_bool_for_a_float_and_an_int_for_a_bool() -> None:
    """What the fast path relies on (msgspec takes JSON ints for floats, nothing else)."""
    decode = msgspec.json.Decoder(float | None).decode
    assert decode(b"7") == 7.0
    with pytest.raises(msgspec.ValidationError):
        decode(b"true")
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.Decoder(bool | None).decode(b"1")


BAD = [
    (b'{"fixed acidity": "7.4"}', "wrong_type", "'fixed acidity'"),
    (b'{"fixed acidity": true}', "wrong_type", "bool"),
    (b'{"quality": 7.5}', "wrong_type", "'quality'"),
    (b'{"quality": 7.0}', "wrong_type", "integer"),
    (b'{"ok": 1}', "wrong_type", "'ok'"),
    (b'{"class": 5}', "wrong_type", "'class'"),
    (b'{"quality": 9007199254740993}', "out_of_range", "'quality'"),
    (b'{"quality": -99999999999999999999999}', "out_of_range", "'quality'"),
    (b'{"fixed acidity": NaN}', "non_finite", "nan"),
    (b'{"fixed acidity": -Infinity}', "non_finite", "inf"),
    (b'{"fixed acidity": 1e400}', "non_finite", "inf"),
    # An integer literal past float64's range overflows like 1e400 (Python's int would not).
    (b'{"fixed acidity": ' + b"9" * 400 + b"}", "non_finite", "'fixed acidity'"),
    # Python's float() takes these; JSON (and so waxserve) does not.
    (b'{"fixed acidity": 7_4}', "undecodable", "not JSON"),
    ('{"fixed acidity": \uff17\uff14}'.encode(), "undecodable", "not JSON"),
    (b'{"fixed acidity": 0x1F}', "undecodable", "not JSON"),
    (b'{"fixed acidity": 7.4', "undecodable", "not JSON"),
    (b'{"fixed acidity": 7.4} trailing', "undecodable", "not JSON"),
    (b"\xff\xfe\x00garbage", "undecodable", "not JSON"),
    (b"", "undecodable", "not JSON"),
    (b"[7.4]", "undecodable", "object"),
    (b'"7.4"', "undecodable", "object"),
    (None, "undecodable", "tombstone"),
]


@pytest.mark.parametrize(("value", "reason", "mentions"), BAD)
def test_a_bad_message_is_reported_and_the_rest_decode(
    value: bytes | None, reason: str, mentions: str
) -> None:
    decoded = codec_for(contract(), Encoding.JSON).decode([GOOD[0], value, GOOD[1]])
    assert set(decoded.errors) == {1}
    got_reason, message = decoded.errors[1]
    assert got_reason == reason
    assert mentions in message
    np.testing.assert_array_equal(decoded.numeric[[0, 2]], GOOD_NUMERIC)
    assert decoded.text[[0, 2]].tolist() == GOOD_TEXT


def test_every_bad_message_of_a_batch_is_found() -> None:
    values = [v for v, _, _ in BAD]
    decoded = codec_for(contract(), Encoding.JSON).decode(values)
    assert {i: r for i, (r, _) in decoded.errors.items()} == {
        i: reason for i, (_, reason, _) in enumerate(BAD)
    }


def test_codec_is_built_once_per_contract() -> None:
    codec = JsonCodec(contract())
    assert codec.decode([]).numeric.shape == (0, 4)
    assert codec.decode([]).text.shape == (0, 1)
