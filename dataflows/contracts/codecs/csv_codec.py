"""CSV: one delimited line per message, columns in `contract.csv_columns` order.

An empty cell is an absent field. Cells may be quoted the RFC 4180 way (a quoted cell may
hold the delimiter, a doubled quote or a line break); only lines that contain a quote go
through the csv module. Numbers are strict: ASCII decimal or scientific notation only,
no surrounding spaces ("7_4", full-width digits, "nan", "inf", " 7" are all wrong_type,
although Python's float() takes them). Booleans are "true"/"false"/"1"/"0" in any case.
An INTEGER cell is any number; the batch checks refuse one that is not integral.

A batch is decoded column-wise: all lines are joined and split once, each column is a
slice of the cells, checked with one regex search and converted with one `map(float)`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import operator
import re
from collections.abc import Mapping, Sequence

import numpy as np

from dataflows.contracts.codecs.base import (
    TOMBSTONE_MESSAGE,
    Codec,
    Decoded,
    Errors,
    MessageError,
    describe,
    encode_row,
    non_finite_error,
    out_of_range_error,
    unsafe_integer_rows,
)
from dataflows.contracts.schema import Contract, Encoding, Field, FieldType
from dataflows.core.reasons import Reason

# A character no ASCII decimal/scientific number has. With none of them in a cell,
# float() succeeding means the cell is such a number: float() takes "nan", "inf",
# "7_4", non-ASCII digits and surrounding spaces, all of which contain one.
_NOT_NUMERIC = re.compile(r"[^0-9.eE+\-]")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_BOOLEANS = {"": math.nan, "true": 1.0, "false": 0.0, "1": 1.0, "0": 0.0}


class CsvCodec(Codec):
    """One delimited line per message; see the module docstring for the rules."""

    encoding = Encoding.CSV

    def __init__(self, contract: Contract) -> None:
        super().__init__(contract)
        self.columns = contract.csv_columns
        self.delimiter = contract.csv.delimiter
        self._delimiter_bytes = self.delimiter.encode()
        self._header = list(self.columns) if contract.csv.header else None
        self._header_bytes = self.delimiter.join(self.columns).encode()
        # Where each CSV column lands: (CSV column, matrix column, field).
        self._numeric_targets: list[tuple[int, int, Field]] = []
        self._text_targets: list[tuple[int, int, Field]] = []
        for position, name in enumerate(self.columns):
            column = contract.columns[name]
            targets = self._numeric_targets if column.numeric else self._text_targets
            targets.append((position, column.index, self.by_name[name]))
        self._count_delimiters = operator.methodcaller("count", self._delimiter_bytes)

    # --- decode ---------------------------------------------------------------------

    def decode(self, values: Sequence[bytes | None]) -> Decoded:
        """Decode a batch: split all lines at once when they are plain (no quotes, no
        line breaks, the right number of columns), else line by line."""
        n = len(values)
        cells = self._split_batch(values)
        if cells is not None:
            return self._convert(cells, n)
        errors: Errors = {}
        good: list[int] = []
        flat: list[str] = []
        for i, value in enumerate(values):
            try:
                flat.extend(self._split_line(value))
            except MessageError as error:
                errors[i] = (error.reason, str(error))
            else:
                good.append(i)
        if len(good) == n:
            return self._convert(flat, n)
        decoded = self._convert(flat, len(good))
        out = Decoded.empty(self.contract, n)
        out.numeric[good] = decoded.numeric
        out.text[good] = decoded.text
        errors.update((good[row], error) for row, error in decoded.errors.items())
        out.errors = errors
        return out

    def _split_batch(self, values: Sequence[bytes | None]) -> list[str] | None:
        """Every cell of a plain batch, row-major, from one join and one split; None when
        any line needs the careful path."""
        if not values or None in values:
            return None
        joined = self._delimiter_bytes.join(values)  # type: ignore[arg-type]
        if b'"' in joined or b"\n" in joined or b"\r" in joined:
            return None
        if self._header is not None and self._header_bytes in values:
            return None
        counts = list(map(self._count_delimiters, values))
        if counts.count(len(self.columns) - 1) != len(values):
            return None
        try:
            text = joined.decode()
        except UnicodeDecodeError:
            return None
        return text.split(self.delimiter)

    def _split_line(self, value: bytes | None) -> list[str]:
        """The cells of one message, or MessageError."""
        if value is None:
            raise MessageError(Reason.UNDECODABLE, TOMBSTONE_MESSAGE)
        try:
            line = value.decode()
        except UnicodeDecodeError as exc:
            raise MessageError(Reason.UNDECODABLE, f"not UTF-8 text: {exc}") from None
        line = line.rstrip("\r\n")  # a line read from a file keeps its line ending
        if '"' in line:
            try:
                rows = list(csv.reader([line], delimiter=self.delimiter, strict=True))
            except csv.Error as exc:
                raise MessageError(Reason.BAD_CSV, f"bad CSV quoting: {exc}") from None
            if len(rows) != 1:
                raise MessageError(Reason.BAD_CSV, f"expected one CSV line, got {len(rows)}")
            cells = rows[0]
        elif "\n" in line or "\r" in line:
            raise MessageError(Reason.BAD_CSV, "expected one CSV line, got a line break")
        else:
            cells = line.split(self.delimiter)
        if len(cells) != len(self.columns):
            raise MessageError(
                Reason.BAD_CSV,
                f"expected {len(self.columns)} {self.delimiter!r}-separated columns "
                f"({', '.join(self.columns)}), got {len(cells)}",
            )
        if cells == self._header:
            raise MessageError(
                Reason.CSV_HEADER,
                f"message is the CSV header line ({self.delimiter.join(self.columns)!r})",
            )
        return cells

    def _convert(self, cells: list[str], n: int) -> Decoded:
        """n rows of cells (row-major) into the column layout, column by column."""
        out = Decoded.empty(self.contract, n)
        width = len(self.columns)
        errors = out.errors
        integer_columns = []
        for position, j, f in self._numeric_targets:
            column = cells[position::width]
            if f.type is FieldType.BOOLEAN:
                out.numeric[:, j] = _booleans(f, column, errors)
            else:
                out.numeric[:, j] = _numbers(f, column, errors)
            if f.type is FieldType.INTEGER:
                integer_columns.append(j)
        if integer_columns:  # 2**53 + 1 rounds to 2**53: compare the text exactly
            positions = {j: p for p, j, _ in self._numeric_targets}
            for row, j in unsafe_integer_rows(
                out.numeric, integer_columns, lambda r, c: cells[r * width + positions[c]]
            ):
                f = self.numeric_fields[j]
                error = out_of_range_error(f, cells[row * width + positions[j]])
                errors.setdefault(row, (error.reason, str(error)))
        for position, j, _ in self._text_targets:
            strings = np.array(cells[position::width], dtype=object)
            strings[strings == ""] = None  # an empty cell is absent
            out.text[:, j] = strings
        return out

    # --- encode ---------------------------------------------------------------------

    def encode(self, rows: Sequence[Mapping[str, object]]) -> list[bytes]:
        """One line per row (no line terminator); quoted only where a cell needs it.

        An absent field is an empty cell, so an empty string reads back as absent.
        """
        buffer = io.StringIO()
        writer = csv.writer(buffer, delimiter=self.delimiter, lineterminator="\n")
        out = []
        for row in rows:
            present = encode_row(self.fields, row)
            buffer.seek(0)
            buffer.truncate()
            writer.writerow([_cell(present.get(name)) for name in self.columns])
            out.append(buffer.getvalue()[:-1].encode())
        return out


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def _numbers(f: Field, column: list[str], errors: Errors) -> np.ndarray:
    """A column of number cells as float64 (NaN for empty cells); bad cells into `errors`."""
    n = len(column)
    values = None
    if not _NOT_NUMERIC.search("".join(column)):
        cells = [c or "nan" for c in column] if "" in column else column
        with contextlib.suppress(ValueError):  # "1e", "1.2.3", "+-": look at each cell
            values = np.fromiter(map(float, cells), np.float64, n)
    if values is None:
        values = np.full(n, np.nan)
        for row, cell in enumerate(column):
            if not cell:
                continue
            if _NUMBER.fullmatch(cell):
                values[row] = float(cell)
            else:
                errors.setdefault(
                    row,
                    (
                        Reason.WRONG_TYPE,
                        f"field {f.name!r}: expected a number, got {describe(cell)}",
                    ),
                )
    infinite = np.isinf(values)
    if infinite.any():  # "1e999" overflows
        for row in np.flatnonzero(infinite).tolist():
            error = non_finite_error(f, column[row])
            errors.setdefault(row, (error.reason, str(error)))
    return values


def _booleans(f: Field, column: list[str], errors: Errors) -> np.ndarray:
    """A column of boolean cells as 0.0/1.0 (NaN for empty cells); bad cells into `errors`."""
    numbers = list(map(_BOOLEANS.get, map(str.lower, column)))
    if None in numbers:
        for row, number in enumerate(numbers):
            if number is None:
                errors.setdefault(
                    row,
                    (
                        Reason.WRONG_TYPE,
                        f"field {f.name!r}: expected true/false/1/0, got {describe(column[row])}",
                    ),
                )
                numbers[row] = math.nan
    return np.array(numbers, dtype=np.float64)
