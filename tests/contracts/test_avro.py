"""The Avro codec: fastavro's schemaless reader, Confluent framing, schema ids resolved
through a registry, and the registry resolver against a local Confluent-shaped server."""

from __future__ import annotations

import http.server
import io
import json
import re
import struct
import threading
from collections.abc import Iterator
from typing import Any

import fastavro
import numpy as np
import pytest

from dataflows.contracts.codecs import AvroCodec, codec_for, schema_registry_resolver
from dataflows.contracts.schema import Contract, ContractError, Encoding
from protos import waxserve_pb2 as pb

SCHEMA = {
    "type": "record",
    "name": "Reading",
    "namespace": "acme.v1",
    "fields": [
        {"name": "x", "type": "double"},
        {"name": "y", "type": ["null", "float"], "default": None},
        {"name": "n", "type": ["null", "long"], "default": None},
        {"name": "class", "type": {"type": "enum", "name": "Kind", "symbols": ["red", "white"]}},
        {"name": "station", "type": ["null", "string"], "default": None},
        {"name": "ok", "type": "boolean"},
        {"name": "t", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "payload", "type": "string", "default": ""},  # not a contract field
    ],
}
SCHEMA_ID = 7


def contract(schema: object = SCHEMA, *, framing: bool = False, **overrides: str) -> Contract:
    msg = pb.DataContract(data_type="reading", version=1, encoding=pb.ENCODING_AVRO)
    fields = {
        "x": pb.FIELD_TYPE_FLOAT,
        "y": pb.FIELD_TYPE_FLOAT,
        "n": pb.FIELD_TYPE_INTEGER,
        "class": pb.FIELD_TYPE_STRING,
        "station": pb.FIELD_TYPE_STRING,
        "ok": pb.FIELD_TYPE_BOOLEAN,
        "t": pb.FIELD_TYPE_INTEGER,
    }
    fields.update({name: getattr(pb, kind) for name, kind in overrides.items()})
    for name, kind in fields.items():
        msg.fields.add(name=name, type=kind)
    msg.avro.writer_schema = schema if isinstance(schema, str) else json.dumps(schema)
    msg.avro.confluent_framing = framing
    msg.avro.schema_id = SCHEMA_ID
    return Contract.from_proto(msg)


def write(record: dict, schema: Any = SCHEMA, schema_id: int | None = None) -> bytes:
    """fastavro's own writer (and the Confluent header when given an id)."""
    buffer = io.BytesIO()
    if schema_id is not None:
        buffer.write(struct.pack(">bI", 0, schema_id))
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(schema), record)
    return buffer.getvalue()


GOOD = {"x": 7.5, "y": 0.25, "n": 3, "class": "red", "station": "s1", "ok": True, "t": 1700}
GOOD_NUMERIC = [7.5, 0.25, 3, 1, 1700]
GOOD_TEXT = ["red", "s1"]


def test_round_trip_plain_and_framed() -> None:
    rows = [
        {"x": 1.5, "y": 0.5, "n": -(2**53), "class": "white", "station": "s", "ok": False, "t": 1},
        {"x": 2.0, "class": "red", "ok": True, "t": 1_760_000_000_000},
    ]
    for framing in (False, True):
        codec = codec_for(contract(framing=framing), Encoding.AVRO)
        values = codec.encode(rows)
        assert values[0].startswith(b"\0\0\0\0\x07") is framing
        decoded = codec.decode(values)
        assert decoded.errors == {}
        np.testing.assert_array_equal(
            decoded.numeric,
            [[1.5, 0.5, -(2**53), 0, 1], [2.0, np.nan, np.nan, 1, 1_760_000_000_000]],
        )
        assert decoded.text.tolist() == [["white", "s"], ["red", None]]


def test_records_written_by_fastavro_decode_and_logical_types_stay_plain() -> None:
    from datetime import UTC, datetime

    when = datetime(2026, 1, 2, tzinfo=UTC)
    value = write({**GOOD, "t": when})  # fastavro writes a datetime as epoch millis
    decoded = codec_for(contract(), Encoding.AVRO).decode([value, write(GOOD)])
    assert decoded.errors == {}
    assert decoded.numeric[0, 4] == int(when.timestamp() * 1000)  # an int, not a datetime
    np.testing.assert_array_equal(decoded.numeric[1], GOOD_NUMERIC)
    assert decoded.text[1].tolist() == GOOD_TEXT


def test_an_avro_int_field_may_feed_a_float_field() -> None:
    codec = codec_for(contract(n="FIELD_TYPE_FLOAT"), Encoding.AVRO)
    assert codec.decode([write(GOOD)]).numeric[0, 2] == 3.0


@pytest.mark.parametrize(
    ("schema", "overrides", "complaint"),
    [
        ("{not json", {}, "not JSON"),
        ({"type": "record", "name": "R", "fields": [{"name": "x", "type": "nope"}]}, {}, "valid"),
        ({"type": "array", "items": "double"}, {}, "must be a record"),
        ({**SCHEMA, "fields": SCHEMA["fields"][1:]}, {}, "'x' is not in the Avro schema"),
        (SCHEMA, {"station": "FIELD_TYPE_FLOAT"}, "'station' is float but Avro string"),
        (SCHEMA, {"x": "FIELD_TYPE_INTEGER"}, "'x' is integer but Avro double"),
        (SCHEMA, {"ok": "FIELD_TYPE_INTEGER"}, "'ok' is integer but Avro boolean"),
        (
            {**SCHEMA, "fields": [*SCHEMA["fields"], {"name": "blob", "type": "bytes"}]},
            {"blob": "FIELD_TYPE_STRING"},
            "'blob' is string but Avro bytes",
        ),
        (
            {**SCHEMA, "fields": [{"name": "x", "type": ["null", "double", "string"]}]},
            {},
            "union of 2 non-null types",
        ),
    ],
)
def test_a_contract_whose_schema_cannot_work_is_refused(
    schema: object, overrides: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ContractError) as caught:
        AvroCodec(contract(schema, **overrides))
    assert caught.value.reason == "bad_contract"
    assert complaint in str(caught.value)


def test_an_avro_contract_needs_a_schema() -> None:
    plain = Contract.from_proto(
        pb.DataContract(
            data_type="d",
            version=1,
            encoding=pb.ENCODING_JSON,
            fields=[pb.FieldSpec(name="x", type=pb.FIELD_TYPE_FLOAT)],
        )
    )
    with pytest.raises(ContractError, match="writer_schema"):
        codec_for(plain, Encoding.AVRO)


BAD = [
    (write(GOOD)[:-3], "undecodable", "not Avro"),  # truncated
    (write(GOOD) + b"\x00\x01", "undecodable", "2 bytes left over"),
    (b"", "undecodable", "not Avro"),
    (b"\xff" * 12, "undecodable", "not Avro"),
    (write({**GOOD, "class": "white"})[:8] + b"\x7f" + write(GOOD)[9:], "undecodable", "Avro"),
    (write({**GOOD, "x": float("nan")}), "non_finite", "'x'"),
    (write({**GOOD, "y": float("-inf")}), "non_finite", "'y'"),
    (write({**GOOD, "n": 2**53 + 1}), "out_of_range", "'n'"),
    (None, "undecodable", "tombstone"),
]


@pytest.mark.parametrize(("value", "reason", "mentions"), BAD)
def test_a_bad_message_is_reported_and_the_rest_decode(
    value: bytes | None, reason: str, mentions: str
) -> None:
    good = write(GOOD)
    decoded = codec_for(contract(), Encoding.AVRO).decode([good, value, good])
    assert set(decoded.errors) == {1}
    assert decoded.errors[1][0] == reason
    assert mentions in decoded.errors[1][1]
    np.testing.assert_array_equal(decoded.numeric[[0, 2]], [GOOD_NUMERIC] * 2)
    assert decoded.text[[0, 2]].tolist() == [GOOD_TEXT] * 2


def test_framing_errors() -> None:
    codec = codec_for(contract(framing=True), Encoding.AVRO)
    good = write(GOOD, schema_id=SCHEMA_ID)
    unframed = write({**GOOD, "x": 1.1})  # its first byte is not 0
    values = [good, unframed, b"\0\0\0", write(GOOD, schema_id=99), good]
    decoded = codec.decode(values)
    assert set(decoded.errors) == {1, 2, 3}
    assert "magic byte 0" in decoded.errors[1][1]
    assert "magic byte 0" in decoded.errors[2][1]
    assert decoded.errors[3] == (
        "undecodable",
        "Avro schema id 99 is not the contract's (7) and no schema registry is configured",
    )
    np.testing.assert_array_equal(decoded.numeric[[0, 4]], [GOOD_NUMERIC] * 2)


# A later version of the producer's schema: a field more, one fewer (with a default in the
# contract's schema), another order. Avro schema resolution reads it into the contract's.
EVOLVED = {
    "type": "record",
    "name": "Reading",
    "namespace": "acme.v1",
    "fields": [
        {"name": "extra", "type": "string"},
        {"name": "t", "type": "long"},
        {"name": "ok", "type": "boolean"},
        {"name": "station", "type": ["null", "string"], "default": None},
        {"name": "class", "type": {"type": "enum", "name": "Kind", "symbols": ["red", "white"]}},
        {"name": "n", "type": ["null", "long"], "default": None},
        {"name": "x", "type": "double"},
    ],
}


def test_other_schema_ids_are_resolved_once_and_read_into_the_contracts_schema() -> None:
    asked: list[int] = []

    def resolver(schema_id: int) -> str:
        asked.append(schema_id)
        if schema_id == 8:
            return json.dumps(EVOLVED)
        if schema_id == 9:
            return json.dumps({"type": "record", "name": "Other", "fields": []})
        raise LookupError(f"no schema {schema_id}")

    codec = codec_for(contract(framing=True), Encoding.AVRO, schema_resolver=resolver)
    evolved = write({**GOOD, "extra": "e"}, EVOLVED, schema_id=8)
    values = [evolved, write(GOOD, schema_id=SCHEMA_ID), evolved]
    values += [
        write({}, {"type": "record", "name": "Other", "fields": []}, 9),
        write(GOOD, schema_id=5),
    ]
    decoded = codec.decode(values)
    assert set(decoded.errors) == {3, 4}
    assert "schema id 9 does not decode into the contract's schema" in decoded.errors[3][1]
    assert decoded.errors[4] == (
        "undecodable",
        "Avro schema id 5 could not be resolved: no schema 5",
    )
    expected = [7.5, np.nan, 3, 1, 1700]  # y: not in the evolved schema, its default
    np.testing.assert_array_equal(decoded.numeric[[0, 2]], [expected] * 2)
    np.testing.assert_array_equal(decoded.numeric[1], GOOD_NUMERIC)
    assert decoded.text[0].tolist() == GOOD_TEXT
    codec.decode([evolved, evolved])
    assert sorted(asked) == [5, 8, 9]  # 8 and 9 cached; 5 failed, asked again next batch
    codec.decode([write(GOOD, schema_id=5)])
    assert sorted(asked) == [5, 5, 8, 9]


# --- the schema registry resolver ------------------------------------------------------


class _Registry(http.server.BaseHTTPRequestHandler):
    """GET /schemas/ids/{id}, as Confluent's (and Karapace's, Apicurio's ccompat) API."""

    schemas: dict[int, dict] = {}  # noqa: RUF012
    requests: list[str] = []  # noqa: RUF012

    def do_GET(self) -> None:
        self.requests.append(self.path)
        found = re.match(r"/schemas/ids/(\d+)(\?|$)", self.path)
        schema = self.schemas.get(int(found.group(1))) if found else None
        if schema is None:
            status, body = 404, {"error_code": 40403, "message": "Schema not found"}
        else:
            status, body = 200, schema
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def registry_url() -> Iterator[str]:
    _Registry.schemas = {
        8: {"schema": json.dumps(EVOLVED)},
        12: {"schema": '{"type": "string"}', "schemaType": "JSON"},
    }
    _Registry.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Registry)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_schema_registry_resolver(registry_url: str) -> None:
    resolve = schema_registry_resolver(registry_url)
    assert json.loads(resolve(8)) == EVOLVED
    assert json.loads(resolve(8)) == EVOLVED
    assert len(_Registry.requests) == 1  # the client caches by id
    assert _Registry.requests[0].startswith("/schemas/ids/8")
    with pytest.raises(Exception, match="not found"):
        resolve(404)
    with pytest.raises(ValueError, match="JSON, not Avro"):
        resolve(12)


def test_a_codec_resolving_through_the_registry(registry_url: str) -> None:
    codec = codec_for(
        contract(framing=True),
        Encoding.AVRO,
        schema_resolver=schema_registry_resolver(registry_url),
    )
    decoded = codec.decode(
        [write({**GOOD, "extra": "e"}, EVOLVED, schema_id=8), write(GOOD, schema_id=3)]
    )
    assert set(decoded.errors) == {1}
    assert "schema id 3 could not be resolved" in decoded.errors[1][1]
    np.testing.assert_array_equal(decoded.numeric[0], [7.5, np.nan, 3, 1, 1700])
