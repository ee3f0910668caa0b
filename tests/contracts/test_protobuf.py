"""The protobuf codec: the producer's own message type from a descriptor set compiled here
with grpc_tools.protoc (two files, one importing the other, an enum, presence rules)."""

from __future__ import annotations

import pathlib
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, message_factory

from dataflows.contracts.codecs import ProtobufCodec, codec_for
from dataflows.contracts.codecs.protobuf import message_descriptor
from dataflows.contracts.schema import Contract, ContractError, Encoding
from protos import waxserve_pb2 as pb

COMMON = """
syntax = "proto3";
package acme.common.v1;
enum Color { COLOR_UNSPECIFIED = 0; RED = 1; WHITE = 2; }
message Location { double lat = 1; double lon = 2; }
"""
READING = """
syntax = "proto3";
package acme.v1;
import "acme/common/v1/common.proto";
import "google/protobuf/timestamp.proto";
message Reading {
  optional double temp = 1;            // explicit presence: unset is absent
  double humidity = 2;                 // implicit presence: 0 is a value
  int64 count = 3;
  optional bool ok = 4;
  string station = 5;                  // implicit: "" is a value
  acme.common.v1.Color color = 6;
  optional string note = 7;
  uint64 big = 8;
  float f32 = 9;
  sint32 delta = 10;
  optional acme.common.v1.Color tint = 11;
  repeated double xs = 12;
  acme.common.v1.Location where = 13;
  map<string, int32> tags = 14;
  google.protobuf.Timestamp at = 15;
  bytes blob = 16;
  string class = 17;                   // a Python keyword
  oneof choice { double a = 18; string b = 19; }
}
"""
FIELDS = {
    "temp": "FLOAT",
    "humidity": "FLOAT",
    "count": "INTEGER",
    "ok": "BOOLEAN",
    "station": "STRING",
    "color": "STRING",
    "note": "STRING",
    "big": "INTEGER",
    "f32": "FLOAT",
    "delta": "INTEGER",
    "tint": "STRING",
    "class": "STRING",
    "a": "FLOAT",
}
# numeric columns in contract order: temp humidity count ok big f32 delta a
# text columns: station color note tint class


def compile_protos(out: pathlib.Path, include_imports: bool = True) -> bytes:
    (out / "acme/common/v1").mkdir(parents=True, exist_ok=True)
    (out / "acme/common/v1/common.proto").write_text(COMMON)
    (out / "acme/v1").mkdir(parents=True, exist_ok=True)
    (out / "acme/v1/reading.proto").write_text(READING)
    fds = out / "reading.fds"
    command = [sys.executable, "-m", "grpc_tools.protoc", f"-I{out}", f"--descriptor_set_out={fds}"]
    command += ["--include_imports"] if include_imports else []
    subprocess.run([*command, "acme/v1/reading.proto"], check=True, cwd=out)
    return fds.read_bytes()


@pytest.fixture(scope="module")
def descriptor_set(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return compile_protos(tmp_path_factory.mktemp("protos"))


def contract(descriptor_set: bytes, message: str = "acme.v1.Reading", **overrides: str) -> Contract:
    msg = pb.DataContract(data_type="reading", version=1, encoding=pb.ENCODING_PROTOBUF)
    for name, kind in {**FIELDS, **overrides}.items():
        msg.fields.add(name=name, type=getattr(pb, f"FIELD_TYPE_{kind}"))
    msg.protobuf.file_descriptor_set = descriptor_set
    msg.protobuf.message_name = message
    return Contract.from_proto(msg)


def message_class(descriptor_set: bytes) -> Any:
    """The producer's class, from protobuf itself (its own serializer writes the tests'
    messages)."""
    return message_factory.GetMessageClass(message_descriptor(descriptor_set, "acme.v1.Reading"))


def test_the_descriptor_set_holds_both_files_dependencies_first(descriptor_set: bytes) -> None:
    names = [f.name for f in descriptor_pb2.FileDescriptorSet.FromString(descriptor_set).file]
    assert names[-1] == "acme/v1/reading.proto"
    assert "acme/common/v1/common.proto" in names


def test_presence_enums_and_round_trip(descriptor_set: bytes) -> None:
    Reading = message_class(descriptor_set)
    full = Reading(
        temp=21.5,
        humidity=0.5,
        count=-3,
        ok=False,
        station="s1",
        color=1,
        note="n",
        big=2**53,
        f32=0.25,
        delta=-7,
        tint=2,
        a=1.5,
    )
    full_class = Reading()
    setattr(full_class, "class", "c")  # a Python keyword
    zeros = Reading(temp=0.0, ok=False, note="", tint=0, a=0.0)
    empty = Reading(b="text")  # the oneof's other member
    values = [
        full.SerializeToString(),
        full_class.SerializeToString(),
        zeros.SerializeToString(),
        empty.SerializeToString(),
    ]
    decoded = codec_for(contract(descriptor_set), Encoding.PROTOBUF).decode(values)
    assert decoded.errors == {}
    nan = np.nan
    np.testing.assert_array_equal(
        decoded.numeric,
        [
            [21.5, 0.5, -3, 0, 2**53, 0.25, -7, 1.5],
            [nan, 0, 0, nan, 0, 0, 0, nan],  # implicit presence: zeros are values
            [0.0, 0, 0, 0, 0, 0, 0, 0.0],  # explicitly set zeros are present
            [nan, 0, 0, nan, 0, 0, 0, nan],
        ],
    )
    assert decoded.text.tolist() == [
        ["s1", "RED", "n", "WHITE", ""],
        ["", "COLOR_UNSPECIFIED", None, None, "c"],
        ["", "COLOR_UNSPECIFIED", "", "COLOR_UNSPECIFIED", ""],
        ["", "COLOR_UNSPECIFIED", None, None, ""],
    ]
    codec = ProtobufCodec(contract(descriptor_set))
    rows = [
        {"temp": 1.0, "count": 4, "ok": True, "color": "WHITE", "class": "k", "tint": "RED"},
        {"humidity": 2.0, "note": "x"},
    ]
    again = codec.decode(codec.encode(rows))
    assert again.errors == {}
    np.testing.assert_array_equal(
        again.numeric, [[1.0, 0, 4, 1, 0, 0, 0, nan], [nan, 2.0, 0, nan, 0, 0, 0, nan]]
    )
    assert again.text.tolist() == [
        ["", "WHITE", None, "RED", "k"],
        ["", "COLOR_UNSPECIFIED", "x", None, ""],
    ]
    with pytest.raises(ValueError, match="not a value of the enum"):
        codec.encode([{"color": "BLUE"}])


def test_bad_messages(descriptor_set: bytes) -> None:
    Reading = message_class(descriptor_set)
    good = Reading(temp=1.0, count=2, station="s").SerializeToString()
    values = [
        good,
        good[:-1],  # truncated
        b"\xff\xff\xff\xff",  # garbage
        Reading(temp=float("nan")).SerializeToString(),
        Reading(humidity=float("inf")).SerializeToString(),
        Reading(f32=float("-inf")).SerializeToString(),
        Reading(count=2**53 + 1).SerializeToString(),
        Reading(delta=-(2**31)).SerializeToString(),  # fine
        Reading(color=7).SerializeToString(),  # open enum: a number without a name
        None,
        b"",  # a message with every field unset: valid protobuf
        good,
    ]
    decoded = codec_for(contract(descriptor_set), Encoding.PROTOBUF).decode(values)
    reasons = {i: reason for i, (reason, _) in decoded.errors.items()}
    assert reasons == {
        1: "undecodable",
        2: "undecodable",
        3: "non_finite",
        4: "non_finite",
        5: "non_finite",
        6: "out_of_range",
        8: "wrong_type",
        9: "undecodable",
    }
    assert "acme.v1.Reading" in decoded.errors[1][1]
    assert "'temp'" in decoded.errors[3][1]
    assert "'humidity'" in decoded.errors[4][1]
    assert "'count'" in decoded.errors[6][1]
    assert "enum number 7" in decoded.errors[8][1]
    assert "tombstone" in decoded.errors[9][1]
    np.testing.assert_array_equal(decoded.numeric[0], decoded.numeric[11])
    assert decoded.numeric[0, 0] == 1.0
    assert decoded.numeric[7, 6] == -(2**31)
    assert np.isnan(decoded.numeric[10, 0])


@pytest.mark.parametrize(
    ("message", "overrides", "complaint"),
    [
        ("acme.v1.Nope", {}, "'acme.v1.Nope' is not in the descriptor set"),
        ("acme.v1.Reading", {"missing": "FLOAT"}, "'missing' is not in acme.v1.Reading"),
        ("acme.v1.Reading", {"xs": "FLOAT"}, "'xs' is repeated"),
        ("acme.v1.Reading", {"tags": "STRING"}, "'tags' is repeated (or a map)"),
        ("acme.v1.Reading", {"where": "FLOAT"}, "'where' is float but message"),
        ("acme.v1.Reading", {"at": "INTEGER"}, "'at' is integer but message"),
        ("acme.v1.Reading", {"station": "FLOAT"}, "'station' is float but string"),
        ("acme.v1.Reading", {"temp": "INTEGER"}, "'temp' is integer but double"),
        ("acme.v1.Reading", {"ok": "INTEGER"}, "'ok' is integer but bool"),
        ("acme.v1.Reading", {"blob": "STRING"}, "'blob' is string but bytes"),
    ],
)
def test_contracts_the_message_cannot_serve_are_refused(
    descriptor_set: bytes, message: str, overrides: dict[str, str], complaint: str
) -> None:
    with pytest.raises(ContractError) as caught:
        ProtobufCodec(contract(descriptor_set, message, **overrides))
    assert caught.value.reason == "bad_contract"
    assert complaint in str(caught.value)


def test_an_integer_field_may_feed_a_float_field(descriptor_set: bytes) -> None:
    codec = ProtobufCodec(contract(descriptor_set, count="FLOAT"))
    value = message_class(descriptor_set)(count=5).SerializeToString()
    assert codec.decode([value]).numeric[0, 2] == 5.0


def test_a_descriptor_set_without_its_imports_is_refused(tmp_path: pathlib.Path) -> None:
    lacking = compile_protos(tmp_path, include_imports=False)
    with pytest.raises(
        ContractError, match=r"imports acme/common/v1/common.proto.*include_imports"
    ):
        ProtobufCodec(contract(lacking))


def test_well_known_imports_may_be_left_out(tmp_path: pathlib.Path) -> None:
    """google/protobuf/*.proto come from protobuf itself when the set lacks them."""
    full = descriptor_pb2.FileDescriptorSet.FromString(compile_protos(tmp_path))
    kept = descriptor_pb2.FileDescriptorSet(
        file=[f for f in full.file if not f.name.startswith("google/")]
    )
    codec = ProtobufCodec(contract(kept.SerializeToString()))
    assert codec.decode([b""]).errors == {}


def test_garbage_descriptor_sets_are_refused() -> None:
    with pytest.raises(ContractError, match="does not parse"):
        ProtobufCodec(contract(b"\xff\xff\xff"))


def test_a_protobuf_contract_needs_its_options() -> None:
    plain = Contract.from_proto(
        pb.DataContract(
            data_type="d",
            version=1,
            encoding=pb.ENCODING_JSON,
            fields=[pb.FieldSpec(name="x", type=pb.FIELD_TYPE_FLOAT)],
        )
    )
    with pytest.raises(ContractError, match="file_descriptor_set"):
        codec_for(plain, Encoding.PROTOBUF)
