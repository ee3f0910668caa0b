"""JSON: one JSON object per message, keyed by field name.

Decoding is msgspec's typed decoding into a Struct built once per contract: msgspec checks
every field's type in C while it parses, and builds no dict per record. A JSON null and a
missing key are both "absent"; unknown keys are ignored. Types are strict: a FLOAT takes
a JSON number (integers included), an INTEGER a JSON integer literal (7.0 and 7.5 are
wrong_type) of at most 2**53 in magnitude, a BOOLEAN only true/false, a STRING only a
JSON string. JSON has no NaN or infinity; producers that write Python's `NaN`/`Infinity`
extensions, or a number that overflows (1e400), get "non_finite".
"""

from __future__ import annotations

import json
import operator
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import msgspec
import numpy as np

from dataflows.contracts.codecs.base import (
    TOMBSTONE_MESSAGE,
    Codec,
    Decoded,
    Errors,
    MessageError,
    check_value,
    encode_row,
    gather,
)
from dataflows.contracts.schema import MAX_SAFE_INTEGER, Contract, Encoding, FieldType
from dataflows.core.reasons import Reason

_SafeInt = Annotated[int, msgspec.Meta(ge=-MAX_SAFE_INTEGER, le=MAX_SAFE_INTEGER)]

_STRUCT_TYPES: dict[FieldType, Any] = {
    FieldType.FLOAT: float | None,  # msgspec takes JSON ints here, refuses true/false
    FieldType.INTEGER: _SafeInt | None,
    FieldType.BOOLEAN: bool | None,
    FieldType.STRING: str | None,
}


class JsonCodec(Codec):
    """One JSON object per message; see the module docstring for the typing rules."""

    encoding = Encoding.JSON

    def __init__(self, contract: Contract) -> None:
        super().__init__(contract)
        # Struct attributes are f0, f1, ... renamed to the field names: contract field
        # names can be anything ("fixed acidity", "class", "__init__").
        attrs = {f.name: f"f{i}" for i, f in enumerate(contract.fields)}
        struct = msgspec.defstruct(
            "JsonRecord",
            [(attrs[f.name], _STRUCT_TYPES[f.type], None) for f in contract.fields],
            rename={attrs[f.name]: f.name for f in contract.fields},
            gc=False,  # flat records of scalars: no cycles, cheaper to allocate
        )
        self._decode_one = msgspec.json.Decoder(struct).decode
        self._absent = struct()
        self._numeric_attrs = [attrs[name] for name in contract.numeric_fields]
        self._text_attrs = [attrs[name] for name in contract.text_fields]
        self._encode_one = msgspec.json.Encoder().encode

    def decode(self, values: Sequence[bytes | None]) -> Decoded:
        """Decode a batch: one msgspec call per message (in C via `map`), then columns.

        When any message fails, the batch is decoded again message by message so the
        good ones still decode and each bad one says why.
        """
        errors: Errors = {}
        try:
            records = list(map(self._decode_one, values))  # type: ignore[arg-type]
        except (msgspec.DecodeError, TypeError):  # bad JSON, a wrong type, a tombstone
            records, errors = self._decode_each(values)
        numeric = gather(records, operator.attrgetter, self._numeric_attrs, np.float64)
        text = gather(records, operator.attrgetter, self._text_attrs, object)
        return Decoded(numeric, text, errors)

    def encode(self, rows: Sequence[Mapping[str, object]]) -> list[bytes]:
        """One JSON object per row, absent fields omitted."""
        return [self._encode_one(encode_row(self.fields, row)) for row in rows]

    def _decode_each(self, values: Sequence[bytes | None]) -> tuple[list[Any], Errors]:
        records: list[Any] = []
        errors: Errors = {}
        for i, value in enumerate(values):
            try:
                records.append(self._decode_one(value))  # type: ignore[arg-type]
            except (msgspec.DecodeError, TypeError) as exc:
                error = self._explain(value, exc)
                errors[i] = (error.reason, str(error))
                records.append(self._absent)
        return records, errors

    def _explain(self, value: bytes | None, exc: Exception) -> MessageError:
        """Why msgspec refused a message, field by field (the slow path, bad messages only).

        The stdlib parser reads Python's NaN/Infinity extensions and overflows to inf, so
        those can be told apart from garbage.
        """
        if value is None:
            return MessageError(Reason.UNDECODABLE, TOMBSTONE_MESSAGE)
        try:
            doc = json.loads(value, parse_constant=float)
        except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError
            return MessageError(Reason.UNDECODABLE, f"not JSON: {exc}")
        if not isinstance(doc, dict):
            return MessageError(
                Reason.UNDECODABLE, f"a JSON record must be an object, got {type(doc).__name__}"
            )
        try:
            for f in self.fields:
                field_value = doc.get(f.name)
                if field_value is not None:
                    check_value(f, field_value)
        except MessageError as error:
            return error
        # What the stdlib accepted field by field msgspec did not (e.g. a duplicate key
        # whose first value was of the wrong type): msgspec's own words.
        reason = (
            Reason.WRONG_TYPE if isinstance(exc, msgspec.ValidationError) else Reason.UNDECODABLE
        )
        return MessageError(reason, str(exc))
