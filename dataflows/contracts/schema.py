"""Data contracts: a data type's fields, their roles and its encoding, as data.

A `Contract` is the validated, immutable form of a `pb.DataContract` from the control
topic. Everything the engine knows about a data type's records comes from it: which
fields are numbers and which are text (the column layout of `RecordColumns`), which field
is the id, the event time and the label, and how messages are encoded. The engine never
names a feature.

Column layout: every FLOAT, INTEGER and BOOLEAN field is a column of one float64 matrix
(`numeric`, NaN when absent; booleans are 0/1), every STRING field a column of one object
matrix (`text`, None when absent), each in the contract's field order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

from protos import waxserve_pb2 as pb


class ContractError(ValueError):
    """A contract that cannot be installed; `reason` is the dead-letter error class."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class FieldType(StrEnum):
    """What a field holds."""

    FLOAT = "float"
    INTEGER = "integer"
    BOOLEAN = "boolean"
    STRING = "string"

    @property
    def numeric(self) -> bool:
        """Whether the field is a column of the numeric matrix."""
        return self is not FieldType.STRING


class Encoding(StrEnum):
    """How records are encoded on the wire."""

    JSON = "json"
    CSV = "csv"
    AVRO = "avro"
    PROTOBUF = "protobuf"
    RECORD = "record"  # waxserve.v1.Record


CONTENT_TYPES: dict[str, Encoding] = {
    "application/json": Encoding.JSON,
    "text/csv": Encoding.CSV,
    "application/avro": Encoding.AVRO,
    "avro/binary": Encoding.AVRO,
    "application/vnd.waxserve.record+protobuf": Encoding.RECORD,
    "application/x-protobuf": Encoding.PROTOBUF,
    "application/protobuf": Encoding.PROTOBUF,
}
"""content-type header values a message can name its encoding with."""

_FIELD_TYPES = {
    pb.FIELD_TYPE_FLOAT: FieldType.FLOAT,
    pb.FIELD_TYPE_INTEGER: FieldType.INTEGER,
    pb.FIELD_TYPE_BOOLEAN: FieldType.BOOLEAN,
    pb.FIELD_TYPE_STRING: FieldType.STRING,
}
_FIELD_TYPE_VALUES = {v: k for k, v in _FIELD_TYPES.items()}
_ENCODINGS = {
    pb.ENCODING_JSON: Encoding.JSON,
    pb.ENCODING_CSV: Encoding.CSV,
    pb.ENCODING_AVRO: Encoding.AVRO,
    pb.ENCODING_PROTOBUF: Encoding.PROTOBUF,
    pb.ENCODING_RECORD: Encoding.RECORD,
}
_ENCODING_VALUES = {v: k for k, v in _ENCODINGS.items()}

MAX_SAFE_INTEGER = 2**53
"""Integers are float64 columns: exact up to this magnitude; larger ones are refused."""

MAX_FIELDS = 10_000
"""Most fields a contract may have: each is a column, a struct attribute, a drift feature."""
MAX_FIELD_NAME_LENGTH = 256
"""Longest field name: names are in drift messages and error messages."""


def canonical_name(name: str) -> str:
    """A field name normalised for matching model inputs to contract fields.

    PMML names its fields "fixed acidity" and "pH"; records say `fixed_acidity` and `ph`.
    Lower-casing and folding every run of non-alphanumerics to `_` maps one onto the other.
    """
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


@dataclass(frozen=True)
class Field:
    """One field of a data type's records."""

    name: str
    type: FieldType
    required: bool = False
    categories: tuple[str, ...] = ()  # STRING: allowed values; empty allows any
    description: str = ""


@dataclass(frozen=True)
class CsvOptions:
    """How a CSV line maps to fields."""

    delimiter: str = ","
    columns: tuple[str, ...] = ()  # field names in column order
    header: bool = False


@dataclass(frozen=True)
class AvroOptions:
    """The writer schema of Avro records, and whether they are Confluent-framed."""

    writer_schema: str = ""
    confluent_framing: bool = False
    schema_id: int = 0


@dataclass(frozen=True)
class ProtobufOptions:
    """The producer's own protobuf message type."""

    file_descriptor_set: bytes = b""
    message_name: str = ""


@dataclass(frozen=True)
class Column:
    """Where a field lives in `RecordColumns`: the numeric or the text matrix, and which column."""

    numeric: bool
    index: int


@dataclass(frozen=True)
class Contract:
    """A validated data contract. Build it with `Contract.from_proto` (which checks it)."""

    data_type: str
    version: int
    fields: tuple[Field, ...]
    encoding: Encoding
    id_field: str = ""
    event_time_field: str = ""
    label_field: str = ""
    description: str = ""
    csv: CsvOptions = CsvOptions()
    avro: AvroOptions = AvroOptions()
    protobuf: ProtobufOptions = ProtobufOptions()
    created_at_ms: int = 0
    # Derived in __post_init__: the column layout.
    numeric_fields: tuple[str, ...] = field(init=False)
    text_fields: tuple[str, ...] = field(init=False)
    columns: dict[str, Column] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        numeric = tuple(f.name for f in self.fields if f.type.numeric)
        text = tuple(f.name for f in self.fields if not f.type.numeric)
        columns = {name: Column(True, i) for i, name in enumerate(numeric)}
        columns.update({name: Column(False, i) for i, name in enumerate(text)})
        object.__setattr__(self, "numeric_fields", numeric)
        object.__setattr__(self, "text_fields", text)
        object.__setattr__(self, "columns", columns)

    def __deepcopy__(self, memo: dict[int, object]) -> Contract:
        return self  # immutable

    @property
    def key(self) -> tuple[str, int]:
        """(data type, version): which contract this is."""
        return self.data_type, self.version

    def field_named(self, name: str) -> Field:
        """The field of this name; KeyError when there is none."""
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    @property
    def feature_fields(self) -> tuple[Field, ...]:
        """Fields a model may take as inputs: all but the id, event time and label."""
        roles = {self.id_field, self.event_time_field, self.label_field} - {""}
        return tuple(f for f in self.fields if f.name not in roles)

    @property
    def csv_columns(self) -> tuple[str, ...]:
        """Field names in CSV column order."""
        return self.csv.columns or tuple(f.name for f in self.fields)

    def field_for(self, model_input: str) -> Field | None:
        """The feature field that feeds a model input of this name: the same name, else the
        same canonical name (PMML's "fixed acidity" is the record's `fixed_acidity`)."""
        features = self.feature_fields
        for f in features:
            if f.name == model_input:
                return f
        wanted = canonical_name(model_input)
        matches = [f for f in features if canonical_name(f.name) == wanted]
        return matches[0] if len(matches) == 1 else None

    # --- protobuf form ----------------------------------------------------------------

    @classmethod
    def from_proto(cls, msg: pb.DataContract) -> Contract:
        """Check a contract message and build the contract; ContractError says what is wrong.

        Checks the contract's own consistency; whether its encoding options work (an Avro
        schema, a protobuf descriptor set) is checked by building its codec.
        """
        if not msg.data_type:
            raise ContractError("bad_contract", "contract has no data_type")
        if msg.version < 1:
            raise ContractError("bad_contract", "contract version must be 1 or more")
        if not msg.fields:
            raise ContractError("bad_contract", "contract has no fields")
        if len(msg.fields) > MAX_FIELDS:
            raise ContractError(
                "bad_contract", f"contract has {len(msg.fields)} fields, more than {MAX_FIELDS}"
            )
        fields = []
        seen: set[str] = set()
        for spec in msg.fields:
            if not spec.name:
                raise ContractError("bad_contract", "a field has no name")
            if len(spec.name) > MAX_FIELD_NAME_LENGTH:
                raise ContractError(
                    "bad_contract",
                    f"a field name is {len(spec.name)} characters, more than "
                    f"{MAX_FIELD_NAME_LENGTH}",
                )
            if spec.name in seen:
                raise ContractError("bad_contract", f"field {spec.name!r} appears twice")
            seen.add(spec.name)
            kind = _FIELD_TYPES.get(spec.type)
            if kind is None:
                raise ContractError("bad_contract", f"field {spec.name!r} has no type")
            if spec.categories and kind is not FieldType.STRING:
                raise ContractError(
                    "bad_contract", f"field {spec.name!r}: only string fields have categories"
                )
            if len(set(spec.categories)) != len(spec.categories):
                raise ContractError(
                    "bad_contract", f"field {spec.name!r}: categories has duplicates"
                )
            fields.append(
                Field(spec.name, kind, spec.required, tuple(spec.categories), spec.description)
            )
        by_name = {f.name: f for f in fields}
        roles = {
            "id_field": (msg.id_field, {FieldType.STRING, FieldType.INTEGER}),
            "event_time_field": (msg.event_time_field, {FieldType.INTEGER}),
            "label_field": (msg.label_field, set(FieldType)),
        }
        for role, (name, allowed) in roles.items():
            if not name:
                continue
            if name not in by_name:
                raise ContractError("bad_contract", f"{role} {name!r} is not a field")
            if by_name[name].type not in allowed:
                raise ContractError(
                    "bad_contract",
                    f"{role} {name!r} is {by_name[name].type}; it must be "
                    + " or ".join(sorted(allowed)),
                )
        encoding = _ENCODINGS.get(msg.encoding)
        if encoding is None:
            raise ContractError("bad_contract", "contract has no encoding")
        delimiter = msg.csv.delimiter or ","
        if len(delimiter) != 1 or delimiter in '"\r\n':
            raise ContractError(
                "bad_contract", f"CSV delimiter must be one character, got {delimiter!r}"
            )
        unknown = [c for c in msg.csv.columns if c not in by_name]
        if unknown:
            raise ContractError("bad_contract", f"CSV columns name no field: {unknown}")
        if len(set(msg.csv.columns)) != len(msg.csv.columns):
            raise ContractError("bad_contract", "CSV columns has duplicates")
        if encoding is Encoding.AVRO and not msg.avro.writer_schema:
            raise ContractError("bad_contract", "Avro contracts need avro.writer_schema")
        if encoding is Encoding.PROTOBUF and not (
            msg.protobuf.file_descriptor_set and msg.protobuf.message_name
        ):
            raise ContractError(
                "bad_contract",
                "protobuf contracts need protobuf.file_descriptor_set and protobuf.message_name",
            )
        return cls(
            data_type=msg.data_type,
            version=msg.version,
            fields=tuple(fields),
            encoding=encoding,
            id_field=msg.id_field,
            event_time_field=msg.event_time_field,
            label_field=msg.label_field,
            description=msg.description,
            csv=CsvOptions(delimiter, tuple(msg.csv.columns), msg.csv.header),
            avro=AvroOptions(
                msg.avro.writer_schema, msg.avro.confluent_framing, msg.avro.schema_id
            ),
            protobuf=ProtobufOptions(msg.protobuf.file_descriptor_set, msg.protobuf.message_name),
            created_at_ms=msg.created_at_ms,
        )

    def to_proto(self) -> pb.DataContract:
        """The contract as its control-topic message."""
        msg = pb.DataContract(
            data_type=self.data_type,
            version=self.version,
            description=self.description,
            id_field=self.id_field,
            event_time_field=self.event_time_field,
            label_field=self.label_field,
            encoding=_ENCODING_VALUES[self.encoding],
            created_at_ms=self.created_at_ms,
        )
        for f in self.fields:
            msg.fields.add(
                name=f.name,
                type=_FIELD_TYPE_VALUES[f.type],
                required=f.required,
                categories=list(f.categories),
                description=f.description,
            )
        msg.csv.delimiter = self.csv.delimiter
        msg.csv.columns.extend(self.csv.columns)
        msg.csv.header = self.csv.header
        if self.avro.writer_schema:
            msg.avro.writer_schema = self.avro.writer_schema
            msg.avro.confluent_framing = self.avro.confluent_framing
            msg.avro.schema_id = self.avro.schema_id
        if self.protobuf.file_descriptor_set:
            msg.protobuf.file_descriptor_set = self.protobuf.file_descriptor_set
            msg.protobuf.message_name = self.protobuf.message_name
        return msg


def check_compatible(old: Contract, new: Contract) -> None:
    """Raise ContractError("incompatible_contract") unless `new` may replace `old`.

    The rule: records written for the old contract must still decode under the new one,
    and nothing a model reads may change meaning. So a new version must be higher; a
    field never changes type; no new field is required and no optional field becomes
    required; a categorical field keeps every category it allowed (it may add some, and
    may not start restricting one that allowed any). Adding optional fields, removing a
    field (the registry separately refuses removing one its serving model reads), changing
    the id, event-time or label field and changing the encoding are compatible.
    """
    problems = []
    if new.version <= old.version:
        problems.append(f"version {new.version} is not above the installed {old.version}")
    old_fields = {f.name: f for f in old.fields}
    for f in new.fields:
        before = old_fields.get(f.name)
        if before is None:
            if f.required:
                problems.append(f"new field {f.name!r} is required")
            continue
        if f.type is not before.type:
            problems.append(f"field {f.name!r} changes type {before.type} -> {f.type}")
        if f.required and not before.required:
            problems.append(f"field {f.name!r} becomes required")
        if f.categories:
            dropped = sorted(set(before.categories) - set(f.categories))
            if not before.categories:
                problems.append(f"field {f.name!r} restricts its categories")
            elif dropped:
                problems.append(f"field {f.name!r} drops categories {dropped}")
    if problems:
        raise ContractError(
            "incompatible_contract",
            f"contract {new.data_type} v{new.version} cannot replace v{old.version}: "
            + "; ".join(problems),
        )
