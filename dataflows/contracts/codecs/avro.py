"""Avro: binary Avro records written with the contract's writer schema, plain or with the
Confluent wire format (byte 0 is 0, bytes 1-4 a big-endian schema id, then the datum).

The writer schema is parsed once, with fastavro. It must be a record, and each contract
field must be one of its fields with a compatible type: float/double (or int/long) for
FLOAT, int/long for INTEGER, boolean for BOOLEAN, string or enum (the symbol) for STRING;
a union of one of those with "null" is allowed (null: absent). Logical types are read as
their underlying type (a timestamp-millis event time stays epoch milliseconds).

Framed messages whose schema id is not the contract's are decoded with that writer schema,
resolved with `schema_resolver(id) -> schema JSON` (e.g. `schema_registry_resolver`), and
the contract's schema as the reader schema (Avro schema resolution, fastavro's). Resolved
schemas are cached per id (an id names one schema forever); a failed resolution is not
cached, so a registry that was down is asked again on the next batch.
"""

from __future__ import annotations

import io
import json
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import fastavro
import numpy as np

from dataflows.contracts.codecs.base import (
    TOMBSTONE_MESSAGE,
    Codec,
    Decoded,
    Errors,
    MessageError,
    bad_rows,
    encode_row,
    gather,
    non_finite_error,
    out_of_range_error,
    unsafe_integer_rows,
)
from dataflows.contracts.schema import Contract, ContractError, Encoding, FieldType
from dataflows.core.reasons import Reason

SchemaResolver = Callable[[int], str]
"""Schema id -> the Avro schema (JSON text) registered under it; raises when unknown."""

_COMPATIBLE: dict[FieldType, frozenset[str]] = {
    FieldType.FLOAT: frozenset({"float", "double", "int", "long"}),
    FieldType.INTEGER: frozenset({"int", "long"}),
    FieldType.BOOLEAN: frozenset({"boolean"}),
    FieldType.STRING: frozenset({"string", "enum"}),
}
_HEADER_SIZE = 5  # Confluent wire format: magic byte 0, 4-byte schema id


def parse_avro_schema(text: str, what: str) -> tuple[Any, Any]:
    """(parsed schema for reading, the same with named types expanded for inspecting).

    Logical types are dropped first so fastavro returns the underlying values (an int,
    not a datetime). ValueError says what is wrong.
    """
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{what} is not JSON: {exc}") from None
    plain = _without_logical_types(schema)
    try:
        return fastavro.parse_schema(plain), fastavro.parse_schema(plain, expand=True)
    except Exception as exc:  # fastavro raises several kinds for a bad schema
        raise ValueError(f"{what} is not a valid Avro schema: {exc}") from None


def _without_logical_types(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_without_logical_types(s) for s in schema]
    if isinstance(schema, dict):
        return {
            key: value if key == "default" else _without_logical_types(value)
            for key, value in schema.items()
            if key != "logicalType"
        }
    return schema


def _field_kind(avro_type: Any) -> tuple[str, bool]:
    """(Avro type name, nullable) of a record field's type; ValueError for unions of
    several non-null types."""
    nullable = False
    if isinstance(avro_type, list):
        members = [t for t in avro_type if t != "null"]
        nullable = len(members) < len(avro_type)
        if len(members) != 1:
            raise ValueError(f"is a union of {len(members)} non-null types")
        avro_type = members[0]
    while isinstance(avro_type, dict):
        avro_type = avro_type["type"]
    return str(avro_type), nullable


class AvroCodec(Codec):
    """Avro binary records (fastavro's schemaless reader), optionally Confluent-framed."""

    encoding = Encoding.AVRO

    def __init__(self, contract: Contract, *, schema_resolver: SchemaResolver | None = None):
        super().__init__(contract)
        options = contract.avro
        name = f"contract {contract.data_type} v{contract.version}"
        if not options.writer_schema:
            raise ContractError(Reason.BAD_CONTRACT, f"{name} has no avro.writer_schema")
        try:
            self._schema, expanded = parse_avro_schema(options.writer_schema, "avro.writer_schema")
        except ValueError as exc:
            raise ContractError(Reason.BAD_CONTRACT, f"{name}: {exc}") from None
        if not isinstance(expanded, dict) or expanded.get("type") != "record":
            raise ContractError(
                Reason.BAD_CONTRACT, f"{name}: avro.writer_schema must be a record schema"
            )
        schema_fields = {f["name"]: f["type"] for f in expanded["fields"]}
        problems = []
        for f in contract.fields:
            if f.name not in schema_fields:
                problems.append(f"field {f.name!r} is not in the Avro schema")
                continue
            try:
                kind, _ = _field_kind(schema_fields[f.name])
            except ValueError as exc:
                problems.append(f"field {f.name!r} {exc}")
                continue
            if kind not in _COMPATIBLE[f.type]:
                problems.append(f"field {f.name!r} is {f.type} but Avro {kind}")
        if problems:
            raise ContractError(Reason.BAD_CONTRACT, f"{name}: " + "; ".join(problems))
        self._framed = options.confluent_framing
        self._schema_id = options.schema_id
        self._header = b"\0" + options.schema_id.to_bytes(4, "big")
        self._resolver = schema_resolver
        self._resolved: dict[int, Any] = {}  # schema id -> parsed writer schema
        self._absent = dict.fromkeys(f.name for f in contract.fields)
        self._has_header = operator.methodcaller("startswith", self._header)

    def decode(self, values: Sequence[bytes | None]) -> Decoded:
        """Decode a batch: one schemaless read per message, then columns."""
        errors: Errors = {}
        records: list[Any] | None = None
        if None not in values and (not self._framed or all(map(self._has_header, values))):
            offset = _HEADER_SIZE if self._framed else 0
            try:
                records = [self._read(value, offset, self._schema, None) for value in values]  # type: ignore[arg-type]
            except Exception:  # fastavro raises many kinds for bad bytes: look at each
                records = None
        if records is None:
            records, errors = self._decode_each(values)
        numeric = gather(records, operator.itemgetter, self.contract.numeric_fields, np.float64)
        text = gather(records, operator.itemgetter, self.contract.text_fields, object)
        self._check_numbers(records, numeric, errors)
        return Decoded(numeric, text, errors)

    def encode(self, rows: Sequence[Mapping[str, object]]) -> list[bytes]:
        """Avro binary with the contract's writer schema (Confluent-framed when the
        contract says so). Schema fields that are not contract fields get their defaults."""
        out = []
        for row in rows:
            buffer = io.BytesIO()
            if self._framed:
                buffer.write(self._header)
            fastavro.schemaless_writer(buffer, self._schema, encode_row(self.fields, row))
            out.append(buffer.getvalue())
        return out

    # --- internals ------------------------------------------------------------------

    @staticmethod
    def _read(value: bytes, offset: int, writer: Any, reader: Any) -> Any:
        buffer = io.BytesIO(value)
        buffer.seek(offset)
        record = fastavro.schemaless_reader(buffer, writer, reader)
        if buffer.tell() != len(value):  # schemaless_reader stops after the record
            raise MessageError(
                Reason.UNDECODABLE,
                f"{len(value) - buffer.tell()} bytes left over after the Avro record",
            )
        return record

    def _decode_each(self, values: Sequence[bytes | None]) -> tuple[list[Any], Errors]:
        records: list[Any] = []
        errors: Errors = {}
        failed: dict[int, str] = {}  # schema ids that did not resolve in this batch
        for i, value in enumerate(values):
            try:
                records.append(self._decode_one(value, failed))
            except MessageError as error:
                errors[i] = (error.reason, str(error))
                records.append(self._absent)
            except Exception as exc:  # fastavro: EOFError, ValueError, IndexError, ...
                errors[i] = (Reason.UNDECODABLE, f"not Avro: {type(exc).__name__}: {exc}")
                records.append(self._absent)
        return records, errors

    def _decode_one(self, value: bytes | None, failed: dict[int, str]) -> Any:
        if value is None:
            raise MessageError(Reason.UNDECODABLE, TOMBSTONE_MESSAGE)
        if not self._framed:
            return self._read(value, 0, self._schema, None)
        if len(value) < _HEADER_SIZE or value[0] != 0:
            raise MessageError(
                Reason.UNDECODABLE,
                "not Confluent-framed Avro: expected magic byte 0 and a 4-byte schema id, "
                f"got {value[:_HEADER_SIZE]!r}",
            )
        schema_id = int.from_bytes(value[1:_HEADER_SIZE], "big")
        if schema_id == self._schema_id:
            return self._read(value, _HEADER_SIZE, self._schema, None)
        writer = self._writer_schema(schema_id, failed)
        try:
            return self._read(value, _HEADER_SIZE, writer, self._schema)
        except MessageError:
            raise
        except Exception as exc:
            raise MessageError(
                Reason.UNDECODABLE,
                f"Avro with schema id {schema_id} does not decode into the contract's schema: "
                f"{type(exc).__name__}: {exc}",
            ) from None

    def _writer_schema(self, schema_id: int, failed: dict[int, str]) -> Any:
        """The parsed writer schema of another schema id, from the resolver."""
        if schema_id in self._resolved:
            return self._resolved[schema_id]
        if schema_id in failed:
            raise MessageError(Reason.UNDECODABLE, failed[schema_id])
        if self._resolver is None:
            message = (
                f"Avro schema id {schema_id} is not the contract's ({self._schema_id}) "
                "and no schema registry is configured"
            )
        else:
            try:
                schema, _ = parse_avro_schema(
                    self._resolver(schema_id), f"the schema of id {schema_id}"
                )
            except Exception as exc:  # the registry's errors, a bad schema
                message = f"Avro schema id {schema_id} could not be resolved: {exc}"
            else:
                self._resolved[schema_id] = schema
                return schema
        failed[schema_id] = message
        raise MessageError(Reason.UNDECODABLE, message)

    def _check_numbers(self, records: list[Any], numeric: np.ndarray, errors: Errors) -> None:
        """Explicit NaN/infinity (Avro floats can hold them) and integers past ±2**53."""
        names = self.contract.numeric_fields
        if numeric.size and not np.isfinite(numeric).all():
            # NaN is also what an absent (null) value became: tell them apart.
            for row, j in bad_rows(~np.isfinite(numeric)):
                value = records[row][names[j]]
                if value is not None and not math.isfinite(value) and row not in errors:
                    error = non_finite_error(self.numeric_fields[j], value)
                    errors[row] = (error.reason, str(error))
        integer_columns = [
            j for j, f in enumerate(self.numeric_fields) if f.type is FieldType.INTEGER
        ]
        for row, j in unsafe_integer_rows(
            numeric, integer_columns, lambda r, c: records[r][names[c]]
        ):
            error = out_of_range_error(self.numeric_fields[j], records[row][names[j]])
            errors.setdefault(row, (error.reason, str(error)))


def schema_registry_resolver(url: str, **client_config: Any) -> SchemaResolver:
    """A `SchemaResolver` asking a Confluent-API schema registry (GET /schemas/ids/{id}).

    `client_config` is passed to `confluent_kafka.schema_registry.SchemaRegistryClient`
    (its keys have dots: pass them as `**{"basic.auth.user.info": "user:secret"}`). The
    client caches schemas by id. Needs `confluent-kafka[schemaregistry]`.
    """
    from confluent_kafka.schema_registry import SchemaRegistryClient  # an optional extra

    client = SchemaRegistryClient({"url": url, **client_config})

    def resolve(schema_id: int) -> str:
        schema = client.get_schema(schema_id)
        if schema.schema_type not in (None, "AVRO"):
            raise ValueError(f"schema id {schema_id} is {schema.schema_type}, not Avro")
        if schema.schema_str is None:
            raise ValueError(f"schema id {schema_id} has no schema text")
        return schema.schema_str

    return resolve
