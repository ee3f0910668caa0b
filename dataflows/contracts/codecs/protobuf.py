"""Protobuf: the producer's own message type, from a FileDescriptorSet in the contract.

The descriptor set is loaded into a private descriptor pool (so two contracts may carry
different versions of the same file), and the message class is built once. A contract
field is the message field of the same name, of a compatible type: double/float (or any
integer type) for FLOAT; int32/int64/uint32/uint64/sint*/fixed*/sfixed* for INTEGER;
bool for BOOLEAN; string or enum (the value's name) for STRING. Repeated, map and message
fields cannot be contract fields.

Presence follows protobuf: a field with explicit presence (proto3 `optional`, proto2,
oneof members) that is unset is absent; an implicit-presence scalar reads as its value
(0, "" and false are values, since the wire cannot tell them from unset).
"""

from __future__ import annotations

import importlib
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from dataflows.contracts.codecs.base import (
    TOMBSTONE_MESSAGE,
    Codec,
    Decoded,
    Errors,
    bad_rows,
    encode_row,
    gather,
    non_finite_error,
    out_of_range_error,
    unsafe_integer_rows,
)
from dataflows.contracts.schema import Contract, ContractError, Encoding, FieldType
from dataflows.core.reasons import Reason

_FD = FieldDescriptor
_FLOATS = {_FD.TYPE_DOUBLE, _FD.TYPE_FLOAT}
_INTEGERS = {
    _FD.TYPE_INT32,
    _FD.TYPE_INT64,
    _FD.TYPE_UINT32,
    _FD.TYPE_UINT64,
    _FD.TYPE_SINT32,
    _FD.TYPE_SINT64,
    _FD.TYPE_FIXED32,
    _FD.TYPE_FIXED64,
    _FD.TYPE_SFIXED32,
    _FD.TYPE_SFIXED64,
}
_COMPATIBLE: dict[FieldType, set[int]] = {
    FieldType.FLOAT: _FLOATS | _INTEGERS,
    FieldType.INTEGER: _INTEGERS,
    FieldType.BOOLEAN: {_FD.TYPE_BOOL},
    FieldType.STRING: {_FD.TYPE_STRING, _FD.TYPE_ENUM},
}
_TYPE_NAMES = {
    value: name.removeprefix("TYPE_").lower()
    for name, value in vars(_FD).items()
    if name.startswith("TYPE_")
}


def message_descriptor(file_descriptor_set: bytes, message_name: str) -> Descriptor:
    """The descriptor of `message_name` from a serialized FileDescriptorSet, loaded into a
    pool of its own. ValueError says what is wrong.

    Files are added dependencies first. A dependency missing from the set is taken from
    protobuf's own well-known types (google/protobuf/*.proto) when it is one of them.
    """
    try:
        files = descriptor_pb2.FileDescriptorSet.FromString(file_descriptor_set).file
    except DecodeError as exc:
        raise ValueError(f"protobuf.file_descriptor_set does not parse: {exc}") from None
    by_name = {f.name: f for f in files}
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str, chain: tuple[str, ...]) -> None:
        if name in added:
            return
        if name in chain:
            raise ValueError(f"import cycle: {' -> '.join((*chain, name))}")
        proto = by_name.get(name)
        if proto is None:
            proto = _well_known(name)
            if proto is None:
                raise ValueError(
                    f"{chain[-1]} imports {name}, which the descriptor set lacks "
                    "(build it with protoc --include_imports)"
                )
        for dependency in proto.dependency:
            add(dependency, (*chain, name))
        try:
            pool.Add(proto)
        except Exception as exc:  # TypeError, ValueError from the pool's checks
            raise ValueError(f"{name} does not load: {exc}") from None
        added.add(name)

    for f in files:
        add(f.name, ())
    try:
        return pool.FindMessageTypeByName(message_name)
    except KeyError:
        names = sorted(
            f"{f.package}.{m.name}" if f.package else m.name for f in files for m in f.message_type
        )
        raise ValueError(
            f"message {message_name!r} is not in the descriptor set (it has {names})"
        ) from None


def _well_known(name: str) -> descriptor_pb2.FileDescriptorProto | None:
    """A google/protobuf/*.proto file as protobuf's own generated module has it."""
    if not (name.startswith("google/protobuf/") and name.endswith(".proto")):
        return None
    try:
        module = importlib.import_module(name.removesuffix(".proto").replace("/", ".") + "_pb2")
    except ImportError:
        return None
    proto = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(proto)
    return proto


class ProtobufCodec(Codec):
    """The producer's own protobuf message; see the module docstring for the rules."""

    encoding = Encoding.PROTOBUF

    def __init__(self, contract: Contract) -> None:
        super().__init__(contract)
        options = contract.protobuf
        name = f"contract {contract.data_type} v{contract.version}"
        if not (options.file_descriptor_set and options.message_name):
            raise ContractError(
                Reason.BAD_CONTRACT,
                f"{name} has no protobuf.file_descriptor_set and protobuf.message_name",
            )
        try:
            descriptor = message_descriptor(options.file_descriptor_set, options.message_name)
        except ValueError as exc:
            raise ContractError(Reason.BAD_CONTRACT, f"{name}: {exc}") from None
        problems = []
        self._descriptors: dict[str, FieldDescriptor] = {}
        for f in contract.fields:
            fd = descriptor.fields_by_name.get(f.name)
            if fd is None:
                problems.append(f"field {f.name!r} is not in {descriptor.full_name}")
            elif fd.is_repeated:
                problems.append(f"field {f.name!r} is repeated (or a map)")
            elif fd.type not in _COMPATIBLE[f.type]:
                problems.append(f"field {f.name!r} is {f.type} but {_TYPE_NAMES[fd.type]}")
            else:
                self._descriptors[f.name] = fd
        if problems:
            raise ContractError(Reason.BAD_CONTRACT, f"{name}: " + "; ".join(problems))
        self._class: type[Message] = message_factory.GetMessageClass(descriptor)
        self._parse = self._class.FromString
        numeric, text = contract.numeric_fields, contract.text_fields
        has_presence = {n for n, fd in self._descriptors.items() if fd.has_presence}
        self._numeric_presence = [(j, n) for j, n in enumerate(numeric) if n in has_presence]
        self._text_presence = [(j, n) for j, n in enumerate(text) if n in has_presence]
        # STRING fields that are enums: number -> name (the matrix holds names).
        self._enum_names = {
            j: {v.number: v.name for v in self._descriptors[n].enum_type.values}
            for j, n in enumerate(text)
            if self._descriptors[n].type == _FD.TYPE_ENUM
        }
        self._float_columns = [
            j for j, f in enumerate(self.numeric_fields) if f.type is FieldType.FLOAT
        ]
        self._integer_columns = [
            j for j, f in enumerate(self.numeric_fields) if f.type is FieldType.INTEGER
        ]

    def decode(self, values: Sequence[bytes | None]) -> Decoded:
        """Decode a batch: parse each message (C), read all columns with one attrgetter
        per message, then ask HasField only about the zero values of presence fields."""
        errors: Errors = {}
        try:
            messages = list(map(self._parse, values))
        except (DecodeError, TypeError):  # bad bytes, a tombstone
            messages, errors = self._decode_each(values)
        numeric = gather(messages, operator.attrgetter, self.contract.numeric_fields, np.float64)
        text = gather(messages, operator.attrgetter, self.contract.text_fields, object)
        if self._float_columns:  # absent reads 0.0: any NaN or inf was sent as such
            floats = numeric[:, self._float_columns]
            if not np.isfinite(floats).all():
                for row, k in bad_rows(~np.isfinite(floats)):
                    j = self._float_columns[k]
                    error = non_finite_error(self.numeric_fields[j], numeric[row, j])
                    errors.setdefault(row, (error.reason, str(error)))
        for row, j in unsafe_integer_rows(
            numeric,
            self._integer_columns,
            lambda r, c: getattr(messages[r], self.contract.numeric_fields[c]),
        ):
            value = getattr(messages[row], self.contract.numeric_fields[j])
            error = out_of_range_error(self.numeric_fields[j], value)
            errors.setdefault(row, (error.reason, str(error)))
        for j, name in self._numeric_presence:  # only a zero can be unset
            for row in np.flatnonzero(numeric[:, j] == 0.0).tolist():
                if not messages[row].HasField(name):
                    numeric[row, j] = np.nan
        for j, name in self._text_presence:
            column = text[:, j]
            zero = 0 if j in self._enum_names else ""
            for row in np.flatnonzero(column == zero).tolist():
                if not messages[row].HasField(name):
                    column[row] = None
        for j, names in self._enum_names.items():
            self._enum_column(text, j, names, errors)
        return Decoded(numeric, text, errors)

    def encode(self, rows: Sequence[Mapping[str, object]]) -> list[bytes]:
        """The message type's own serialization; absent fields unset."""
        out = []
        for row in rows:
            message = self._class()
            for name, value in encode_row(self.fields, row).items():
                fd = self._descriptors[name]
                if fd.type == _FD.TYPE_ENUM:
                    enum_value = fd.enum_type.values_by_name.get(str(value))
                    if enum_value is None:
                        raise ValueError(f"field {name!r}: {value!r} is not a value of the enum")
                    value = enum_value.number
                setattr(message, name, value)
            out.append(message.SerializeToString())
        return out

    def _decode_each(self, values: Sequence[bytes | None]) -> tuple[list[Any], Errors]:
        messages: list[Any] = []
        errors: Errors = {}
        for i, value in enumerate(values):
            if value is None:
                errors[i] = (Reason.UNDECODABLE, TOMBSTONE_MESSAGE)
                messages.append(self._class())
                continue
            try:
                messages.append(self._parse(value))
            except DecodeError as exc:
                errors[i] = (
                    Reason.UNDECODABLE,
                    f"not a {self._class.DESCRIPTOR.full_name}: {exc}",
                )
                messages.append(self._class())
        return messages, errors

    def _enum_column(self, text: np.ndarray, j: int, names: dict[int, str], errors: Errors) -> None:
        column = text[:, j].tolist()
        named = list(map(names.get, column))  # None stays None (absent)
        if named.count(None) == column.count(None):
            text[:, j] = named
            return
        for row, (number, name) in enumerate(zip(column, named, strict=True)):
            if name is None and number is not None:  # an open enum's unnamed number
                field_name = self.contract.text_fields[j]
                errors.setdefault(
                    row,
                    (
                        Reason.WRONG_TYPE,
                        f"field {field_name!r}: enum number {number} has no name",
                    ),
                )
        text[:, j] = named
