"""Record: `waxserve.v1.Record`, a map of field name to `Value`, for producers without a
schema of their own.

A Value's kind must match its field: `number` or `integer` for FLOAT, `integer` for
INTEGER, `boolean` for BOOLEAN, `text` for STRING; any other kind is wrong_type. A field
missing from the map, or a Value with no kind set, is absent. Unknown names are ignored.

A map has no fixed layout, so this is the one codec that reads each field of each record
through protobuf's map (one lookup per field per record). It still works column by
column with C-level `map` calls rather than a Python loop per record.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from dataflows.contracts.codecs.base import (
    TOMBSTONE_MESSAGE,
    Codec,
    Decoded,
    Errors,
    encode_row,
    non_finite_error,
    out_of_range_error,
    unsafe_integer_rows,
)
from dataflows.contracts.schema import Contract, Encoding, Field, FieldType
from dataflows.core.reasons import Reason
from protos import waxserve_pb2 as pb

_KINDS: dict[FieldType, frozenset[str]] = {
    FieldType.FLOAT: frozenset({"number", "integer"}),
    FieldType.INTEGER: frozenset({"integer"}),
    FieldType.BOOLEAN: frozenset({"boolean"}),
    FieldType.STRING: frozenset({"text"}),
}
_EXPECTED = {
    FieldType.FLOAT: "a number or integer",
    FieldType.INTEGER: "an integer",
    FieldType.BOOLEAN: "a boolean",
    FieldType.STRING: "a text",
}
_which_kind = pb.Value.WhichOneof
_fields_of = operator.attrgetter("fields")


class RecordCodec(Codec):
    """`waxserve.v1.Record` messages; see the module docstring for the rules."""

    encoding = Encoding.RECORD

    def __init__(self, contract: Contract) -> None:
        super().__init__(contract)
        self._allowed: dict[str, frozenset[str | None]] = {
            f.name: _KINDS[f.type] | {None} for f in contract.fields
        }
        self._expected = {f.name: _EXPECTED[f.type] for f in contract.fields}

    def decode(self, values: Sequence[bytes | None]) -> Decoded:
        """Decode a batch: parse each message, then each field as a column of Values."""
        n = len(values)
        errors: Errors = {}
        try:
            records = list(map(pb.Record.FromString, values))
        except (DecodeError, TypeError):  # bad bytes, a tombstone
            records, errors = _decode_each(values)
        maps = list(map(_fields_of, records))
        out = Decoded.empty(self.contract, n)
        out.errors = errors
        for j, f in enumerate(self.numeric_fields):
            out.numeric[:, j] = self._numeric_column(f, maps, errors)
        for j, f in enumerate(self.text_fields):
            out.text[:, j] = self._text_column(f, maps, errors)
        return out

    def encode(self, rows: Sequence[Mapping[str, object]]) -> list[bytes]:
        """One Record per row: FLOAT as number, INTEGER as integer, BOOLEAN as boolean,
        STRING as text; absent fields left out of the map."""
        kinds = {
            FieldType.FLOAT: "number",
            FieldType.INTEGER: "integer",
            FieldType.BOOLEAN: "boolean",
            FieldType.STRING: "text",
        }
        out = []
        for row in rows:
            record = pb.Record()
            for f in self.fields:
                present = encode_row((f,), row)
                if present:
                    setattr(record.fields[f.name], kinds[f.type], present[f.name])
            out.append(record.SerializeToString())
        return out

    # --- internals ------------------------------------------------------------------

    def _column(self, f: Field, maps: list[Any], errors: Errors) -> tuple[list[Any], list[Any]]:
        """The field's Values and their kinds (None: absent); wrong kinds into `errors`."""
        # Indexing a message map inserts an empty Value for a missing key: harmless on
        # these throwaway messages, and an empty Value reads as absent.
        cells = list(map(operator.itemgetter(f.name), maps))
        kinds = list(map(_which_kind, cells, itertools.repeat("kind")))
        allowed = self._allowed[f.name]
        if not allowed.issuperset(kinds):
            for row, kind in enumerate(kinds):
                if kind not in allowed:
                    value = getattr(cells[row], kind)
                    errors.setdefault(
                        row,
                        (
                            Reason.WRONG_TYPE,
                            f"field {f.name!r}: expected {self._expected[f.name]} Value, "
                            f"got {kind} {value!r}",
                        ),
                    )
        return cells, kinds

    def _numeric_column(self, f: Field, maps: list[Any], errors: Errors) -> np.ndarray:
        n = len(maps)
        cells, kinds = self._column(f, maps, errors)
        kind_array = np.array(kinds, dtype=object)
        column = np.full(n, np.nan)
        for kind in set(kinds) & (self._allowed[f.name] - {None}):
            rows = kind_array == kind
            read = operator.attrgetter(kind)
            if rows.all():
                column = np.fromiter(map(read, cells), np.float64, n)
            else:
                column[rows] = np.fromiter(
                    map(read, itertools.compress(cells, rows)), np.float64, int(rows.sum())
                )
        if kinds.count("number") and not np.isfinite(column[kind_array == "number"]).all():
            for row in np.flatnonzero((kind_array == "number") & ~np.isfinite(column)).tolist():
                error = non_finite_error(f, column[row])
                errors.setdefault(row, (error.reason, str(error)))
        if "integer" in kinds:
            for row, _ in unsafe_integer_rows(
                column.reshape(n, 1), [0], lambda r, c: cells[r].integer
            ):
                error = out_of_range_error(f, cells[row].integer)
                errors.setdefault(row, (error.reason, str(error)))
        return column

    def _text_column(self, f: Field, maps: list[Any], errors: Errors) -> np.ndarray:
        n = len(maps)
        cells, kinds = self._column(f, maps, errors)
        column = np.fromiter(map(operator.attrgetter("text"), cells), object, n)
        if kinds.count("text") != n:
            column[np.array(kinds, dtype=object) != "text"] = None
        return column


def _decode_each(values: Sequence[bytes | None]) -> tuple[list[Any], Errors]:
    records: list[Any] = []
    errors: Errors = {}
    for i, value in enumerate(values):
        if value is None:
            errors[i] = (Reason.UNDECODABLE, TOMBSTONE_MESSAGE)
            records.append(pb.Record())
            continue
        try:
            records.append(pb.Record.FromString(value))
        except DecodeError as exc:
            errors[i] = (Reason.UNDECODABLE, f"not a waxserve.v1.Record: {exc}")
            records.append(pb.Record())
    return records, errors
