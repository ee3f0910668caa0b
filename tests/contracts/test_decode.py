"""ContractCodecs: the encoding of each message by its content-type header, grouping and
scattering, and the contract's own checks over the whole batch."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dataflows.contracts.codecs import codec_for
from dataflows.contracts.codecs.base import Decoded
from dataflows.contracts.decode import ContractCodecs, _Checks
from dataflows.contracts.schema import (
    MAX_FIELD_NAME_LENGTH,
    MAX_FIELDS,
    Contract,
    ContractError,
    Encoding,
)
from dataflows.core.records import Headers
from protos import waxserve_pb2 as pb

JSON_TYPE: Headers = [("content-type", b"application/json")]
CSV_TYPE: Headers = [("Content-Type", b"TEXT/CSV; charset=utf-8")]
RECORD_TYPE: Headers = [("content-type", b"application/vnd.waxserve.record+protobuf")]


def contract(encoding: pb.Encoding = pb.ENCODING_JSON) -> Contract:
    msg = pb.DataContract(
        data_type="wine", version=1, encoding=encoding, id_field="id", event_time_field="t"
    )
    msg.fields.add(name="alcohol", type=pb.FIELD_TYPE_FLOAT, required=True)
    msg.fields.add(name="quality", type=pb.FIELD_TYPE_INTEGER)
    msg.fields.add(name="sparkling", type=pb.FIELD_TYPE_BOOLEAN)
    msg.fields.add(name="colour", type=pb.FIELD_TYPE_STRING, categories=["red", "white"])
    msg.fields.add(name="id", type=pb.FIELD_TYPE_STRING, required=True)
    msg.fields.add(name="t", type=pb.FIELD_TYPE_INTEGER)
    msg.csv.delimiter = ";"
    return Contract.from_proto(msg)


ROWS = [
    {"alcohol": 9.4, "quality": 5, "sparkling": False, "colour": "red", "id": "a", "t": 1},
    {"alcohol": 10.5, "colour": "white", "id": "b", "t": 2},
    {"alcohol": 12.0, "quality": 7, "sparkling": True, "id": "c"},
]
NUMERIC = [[9.4, 5, 0, 1], [10.5, np.nan, np.nan, 2], [12.0, 7, 1, np.nan]]
TEXT = [["red", "a"], ["white", "b"], [None, "c"]]


def encoded(encoding: Encoding) -> list[bytes]:
    return codec_for(contract(), encoding).encode(ROWS)


def test_without_headers_the_contracts_encoding_is_used() -> None:
    for encoding, proto in [(Encoding.JSON, pb.ENCODING_JSON), (Encoding.CSV, pb.ENCODING_CSV)]:
        decoded = ContractCodecs(contract(proto)).decode(encoded(encoding), [[]] * 3)
        assert decoded.errors == {}
        np.testing.assert_array_equal(decoded.numeric, NUMERIC)
        assert decoded.text.tolist() == TEXT


def test_a_mixed_batch_is_decoded_by_each_messages_header() -> None:
    json_values, csv_values, record_values = (
        encoded(Encoding.JSON),
        encoded(Encoding.CSV),
        encoded(Encoding.RECORD),
    )
    values = [json_values[0], csv_values[1], record_values[2], csv_values[0], json_values[1]]
    headers: list[Headers] = [
        JSON_TYPE,
        CSV_TYPE,
        RECORD_TYPE,
        CSV_TYPE,
        [("other", b"x")],
    ]  # last: default
    decoded = ContractCodecs(contract()).decode(values, headers)
    assert decoded.errors == {}
    np.testing.assert_array_equal(
        decoded.numeric, [NUMERIC[0], NUMERIC[1], NUMERIC[2], NUMERIC[0], NUMERIC[1]]
    )
    assert decoded.text.tolist() == [TEXT[0], TEXT[1], TEXT[2], TEXT[0], TEXT[1]]


def test_headers_that_differ_only_in_other_names() -> None:
    """Trace ids differ on every message; the content type decides."""
    headers = [[("trace-id", str(i).encode()), *JSON_TYPE] for i in range(3)]
    decoded = ContractCodecs(contract(pb.ENCODING_CSV)).decode(encoded(Encoding.JSON), headers)
    assert decoded.errors == {}
    np.testing.assert_array_equal(decoded.numeric, NUMERIC)


def test_headers_and_values_must_pair_up() -> None:
    with pytest.raises(ValueError, match="3 values but 2 header lists"):
        ContractCodecs(contract()).decode(encoded(Encoding.JSON), [[], []])


def test_two_encodings_with_bad_messages_in_each() -> None:
    good_json, good_csv = encoded(Encoding.JSON)[0], encoded(Encoding.CSV)[0]
    values = [good_json, b"9.4;x;;;a;1", good_csv, b'{"alcohol": "9.4", "id": "z"}', None]
    headers = [JSON_TYPE, CSV_TYPE, CSV_TYPE, JSON_TYPE, CSV_TYPE]
    decoded = ContractCodecs(contract()).decode(values, headers)
    assert {i: reason for i, (reason, _) in decoded.errors.items()} == {
        1: "wrong_type",
        3: "wrong_type",
        4: "undecodable",
    }
    assert "'quality'" in decoded.errors[1][1]
    assert "'alcohol'" in decoded.errors[3][1]
    np.testing.assert_array_equal(decoded.numeric[[0, 2]], [NUMERIC[0], NUMERIC[0]])


@pytest.mark.parametrize(
    ("headers", "complaint"),
    [
        ([("content-type", b"application/xml")], "unsupported content-type 'application/xml'"),
        ([("content-type", None)], "content-type header has no value"),
        (
            [("content-type", b"application/json"), ("Content-Type", b"text/csv")],
            "conflicting content-type headers: ['application/json', 'text/csv']",
        ),
        (
            [("content-type", b"application/x-protobuf")],
            "content-type 'application/x-protobuf': cannot decode protobuf records",
        ),
        ([("content-type", b"avro/binary")], "content-type 'avro/binary'"),
    ],
)
def test_messages_whose_header_cannot_be_decoded(
    headers: list[tuple[str, bytes | None]], complaint: str
) -> None:
    good = encoded(Encoding.JSON)
    codecs = ContractCodecs(contract())
    decoded = codecs.decode(good, [JSON_TYPE, headers, []])
    assert set(decoded.errors) == {1}
    assert decoded.errors[1][0] == "undecodable"
    assert complaint in decoded.errors[1][1]
    np.testing.assert_array_equal(decoded.numeric[[0, 2]], [NUMERIC[0], NUMERIC[2]])
    # the same headers on every message of a batch (the uniform path)
    decoded = codecs.decode(good, [headers] * 3)
    assert set(decoded.errors) == {0, 1, 2}
    assert complaint in decoded.errors[2][1]


def test_identical_duplicate_headers_are_harmless() -> None:
    headers = [[*JSON_TYPE, ("Content-Type", b"application/json; charset=utf-8")]] * 3
    decoded = ContractCodecs(contract(pb.ENCODING_CSV)).decode(encoded(Encoding.JSON), headers)
    assert decoded.errors == {}


def test_tombstones() -> None:
    good = encoded(Encoding.JSON)
    for headers in ([JSON_TYPE] * 4, [JSON_TYPE, [], JSON_TYPE, CSV_TYPE]):
        decoded = ContractCodecs(contract()).decode([good[0], None, good[2], None], headers)
        assert decoded.errors == {
            1: ("undecodable", "message has no value (a tombstone)"),
            3: ("undecodable", "message has no value (a tombstone)"),
        }
        np.testing.assert_array_equal(decoded.numeric[[0, 2]], [NUMERIC[0], NUMERIC[2]])


def test_the_contracts_checks() -> None:
    values = [
        b'{"alcohol": 9.4, "id": "ok"}',
        b'{"quality": 5}',  # alcohol and id missing
        b'{"alcohol": 9.4}',  # id missing
        b'{"alcohol": 9.4, "id": "x", "colour": "rose"}',
        b"9.4;7.5;;;x;",  # CSV: an integer that is not integral
        b"9.4;1e300;;;x;",  # CSV: an integral float way past 2**53
        b'{"alcohol": 9.4, "id": "x", "t": 9007199254740993}',
        b'{"quality": 9.5}',  # the codec's reason wins over missing fields
    ]
    headers = [JSON_TYPE] * 4 + [CSV_TYPE] * 2 + [JSON_TYPE] * 2
    decoded = ContractCodecs(contract()).decode(values, headers)
    assert decoded.errors == {
        1: ("missing_field", "required fields missing: 'alcohol', 'id'"),
        2: ("missing_field", "required field missing: 'id'"),
        3: ("unknown_category", "field 'colour': 'rose' is not one of ['red', 'white']"),
        4: ("wrong_type", "field 'quality': expected an integer, got 7.5"),
        5: (
            "out_of_range",
            "field 'quality': integer 1.0000000000000001e+300 is beyond ±2**53 "
            "(integers must be exact as float64)",
        ),
        6: ("out_of_range", decoded.errors[6][1]),
        7: ("wrong_type", decoded.errors[7][1]),
    }
    assert "'t'" in decoded.errors[6][1]
    assert "'quality'" in decoded.errors[7][1]


def test_integer_magnitudes_past_2_53_from_any_codec() -> None:
    record = pb.Record()
    record.fields["alcohol"].number = 1.0
    record.fields["id"].text = "r"
    record.fields["t"].integer = -(2**63)
    decoded = ContractCodecs(contract()).decode([record.SerializeToString()], [RECORD_TYPE])
    assert decoded.errors[0][0] == "out_of_range"
    assert "'t'" in decoded.errors[0][1]


def test_boolean_and_infinity_checks_catch_a_codec_that_let_them_through() -> None:
    """No codec yields these; the batch checks are the second line."""
    checks = _Checks(contract())
    decoded = Decoded(
        np.array([[1.0, 5, 2.0, 1], [np.inf, 5, 1, 1], [1.0, 5, 0.5, 1], [1.0, 5, 1, 1]]),
        np.array([["red", "a"]] * 4, dtype=object),
        {},
    )
    checks.apply(decoded)
    assert decoded.errors == {
        0: ("wrong_type", "field 'sparkling': expected a boolean (0 or 1), got 2.0"),
        1: ("non_finite", "field 'alcohol': value inf is not finite"),
        2: ("wrong_type", "field 'sparkling': expected a boolean (0 or 1), got 0.5"),
    }


def test_the_contracts_own_codec_is_built_eagerly() -> None:
    msg = contract().to_proto()
    msg.encoding = pb.ENCODING_AVRO
    msg.avro.writer_schema = json.dumps({"type": "record", "name": "W", "fields": []})
    with pytest.raises(ContractError, match="'alcohol' is not in the Avro schema"):
        ContractCodecs(Contract.from_proto(msg))


def test_avro_by_header_uses_the_schema_resolver() -> None:
    schema = {
        "type": "record",
        "name": "W",
        "fields": [
            {"name": "alcohol", "type": "double"},
            {"name": "quality", "type": ["null", "long"]},
            {"name": "sparkling", "type": ["null", "boolean"]},
            {"name": "colour", "type": ["null", "string"]},
            {"name": "id", "type": "string"},
            {"name": "t", "type": ["null", "long"]},
        ],
    }
    msg = contract().to_proto()
    msg.avro.writer_schema = json.dumps(schema)
    msg.avro.confluent_framing = True
    msg.avro.schema_id = 1
    avro_type: Headers = [("content-type", b"application/avro")]
    asked: list[int] = []

    def resolve(schema_id: int) -> str:
        asked.append(schema_id)
        return json.dumps(schema)

    codecs = ContractCodecs(Contract.from_proto(msg), schema_resolver=resolve)
    framed = codec_for(Contract.from_proto(msg), Encoding.AVRO).encode(ROWS)
    other_id = b"\0\0\0\0\x02" + framed[1][5:]
    decoded = codecs.decode(
        [framed[0], other_id, encoded(Encoding.JSON)[2]],
        [avro_type, avro_type, []],
    )
    assert decoded.errors == {}
    assert asked == [2]
    np.testing.assert_array_equal(decoded.numeric, NUMERIC)


def test_an_empty_batch() -> None:
    decoded = ContractCodecs(contract()).decode([], [])
    assert decoded.numeric.shape == (0, 4)
    assert decoded.text.shape == (0, 2)
    assert decoded.errors == {}


def test_a_contract_too_big_to_be_a_column_layout_is_refused() -> None:
    msg = pb.DataContract(data_type="wide", version=1, encoding=pb.ENCODING_JSON)
    for i in range(MAX_FIELDS + 1):
        msg.fields.add(name=f"f{i}", type=pb.FIELD_TYPE_FLOAT)
    with pytest.raises(ContractError, match="more than 10000") as err:
        Contract.from_proto(msg)
    assert err.value.reason == "bad_contract"
    del msg.fields[1:]
    msg.fields[0].name = "n" * (MAX_FIELD_NAME_LENGTH + 1)
    with pytest.raises(ContractError, match="field name is 257 characters"):
        Contract.from_proto(msg)


@pytest.mark.parametrize(
    "headers",
    [
        [("content-type", None)],  # a null value
        [("content-type", b"\xff\xfe\x00")],  # not text
        [("content-type", b"")],
        [("content-type", b"application/json"), ("content-type", b"text/csv")],  # two
        [("content-type", None), ("content-type", b"application/json")],
    ],
)
def test_any_content_type_header_is_a_reason_never_an_exception(
    headers: list[tuple[str, bytes | None]],
) -> None:
    good = encoded(Encoding.JSON)
    for batch_headers in ([headers] * 3, [JSON_TYPE, headers, JSON_TYPE]):
        decoded = ContractCodecs(contract()).decode(good, batch_headers)
        assert 1 in decoded.errors and decoded.errors[1][0] == "undecodable"
