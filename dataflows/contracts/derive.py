"""Deriving a data contract from a sample file (CSV, JSON lines, Parquet) or from a model.

A derived contract is a starting point that `waxserve contract` writes for a person to read
and edit: field names and types come from the data (or the model's declared inputs), never
from guesses about meaning. So roles (id, event time, label) are only ever set when asked
for; a column called `id` stays an ordinary field.

Sample types are inferred per column over the rows read; an absent value (an empty CSV
cell, JSON null, a Parquet null) does not vote. The rules match what the codecs accept, so
the sample's own rows decode under the derived contract:

- CSV: every cell a strict ASCII integer within ±2**53 -> INTEGER; else every cell a strict
  ASCII decimal or scientific number -> FLOAT; else every cell true/false (any case) ->
  BOOLEAN; else (and for an all-empty column) STRING. Cells are taken as they are: " 7" is
  text, as the CSV codec reads it.
- JSON lines: Python types of the parsed values: bool -> BOOLEAN, int -> INTEGER (beyond
  ±2**53: FLOAT), float or a mix of int and float -> FLOAT, str -> STRING. Objects and
  arrays are refused: contracts are flat.
- Parquet: the arrow types: floating -> FLOAT, integer -> INTEGER (FLOAT when a value
  exceeds ±2**53), bool -> BOOLEAN, string -> STRING, timestamp -> INTEGER holding epoch
  milliseconds (records must carry the timestamp converted so; the field's description
  says it).

A STRING column (not the id) with at most `max_categories` distinct values gets them as
its categories, sorted.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dataflows.contracts.schema import MAX_SAFE_INTEGER, Contract, FieldType
from dataflows.core.descriptors import format_of
from dataflows.runtimes import ModelError, load_runtime
from dataflows.runtimes.base import TEXT, ModelRuntime
from protos import waxserve_pb2 as pb

__all__ = ["Roles", "contract_version_bump", "derive_from_model", "derive_from_sample"]


@dataclass(frozen=True)
class Roles:
    """Which sample columns play which role; empty: none.

    For a model, an id or event-time field the model does not read is added as a field
    (STRING, INTEGER), and so is a label field it does not declare: role fields are never
    fed to a model, so none of them may name a model input.
    """

    id_field: str = ""
    event_time_field: str = ""
    label_field: str = ""
    required: tuple[str, ...] = ()  # fields to mark required


# --- sample files ----------------------------------------------------------------------

_SUFFIXES = {
    ".csv": "csv",
    ".tsv": "csv",
    ".txt": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_SAMPLE_FORMATS = ("csv", "jsonl", "parquet")

# As strict as the CSV codec: ASCII only, no spaces, no "nan"/"inf"/"_" (Python's int()
# and float() take all of those).
_INTEGER = re.compile(r"[+-]?[0-9]+", re.ASCII)
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
_BOOLEANS = frozenset({"true", "false"})
_DELIMITERS = ",;\t|"
_SNIFF_BYTES = 64 * 1024  # the "first lines" the delimiter and header are told from
_HEADER_ROWS = 50  # rows the header refinement compares the first row with


@dataclass(frozen=True)
class _Column:
    """One derived field before roles are applied."""

    name: str
    type: FieldType
    categories: tuple[str, ...] = ()  # every distinct value, when few enough (STRING only)
    description: str = ""
    absent: bool = False  # no row had a value: typed STRING for want of evidence


def derive_from_sample(
    path: Path,
    *,
    data_type: str,
    roles: Roles = Roles(),
    sample_format: str | None = None,
    delimiter: str | None = None,
    header: bool | None = None,
    columns: Sequence[str] | None = None,
    max_categories: int = 20,
    max_rows: int = 100_000,
) -> pb.DataContract:
    """A contract (version 1) whose fields are the columns of a sample file.

    `sample_format` is "csv", "jsonl" or "parquet"; None tells it from the suffix (.csv,
    .tsv, .txt; .jsonl, .ndjson, .json; .parquet, .pq). CSV only: `delimiter` None sniffs
    one of , ; tab | from the first lines; `header` None detects a header line; `columns`
    names the columns of a file without one (and must equal the header of a file with one).
    At most `max_rows` rows are read. CSV samples give a CSV contract (delimiter, header and
    columns as in the file), JSON lines and Parquet a JSON one.

    ValueError, naming the file and where possible the line and column, for anything that
    cannot be derived: an empty file, ragged rows, a line that is not a JSON object, a
    nested value, a role naming no column or a column of the wrong type for it.
    """
    _check_data_type(data_type)
    if max_rows < 1:
        raise ValueError(f"max_rows must be 1 or more, got {max_rows}")
    fmt = sample_format or _SUFFIXES.get(path.suffix.lower())
    if fmt not in _SAMPLE_FORMATS:
        if sample_format is not None:
            raise ValueError(
                f"unknown sample format {sample_format!r}: one of {', '.join(_SAMPLE_FORMATS)}"
            )
        raise ValueError(
            f"{path}: cannot tell the sample format from {path.suffix!r}: name it "
            f"({', '.join(_SAMPLE_FORMATS)}) or use one of {', '.join(_SUFFIXES)}"
        )
    options: pb.CsvOptions | None = None
    if fmt == "csv":
        derived, n_rows, options = _from_csv(
            path, delimiter, header, columns, max_categories, max_rows
        )
        encoding = pb.ENCODING_CSV
    elif fmt == "jsonl":
        derived, n_rows = _from_jsonl(path, max_categories, max_rows)
        encoding = pb.ENCODING_JSON
    else:
        derived, n_rows = _from_parquet(path, max_categories, max_rows)
        encoding = pb.ENCODING_JSON
    msg = pb.DataContract(
        data_type=data_type,
        version=1,
        description=f"derived from {path.name}, {n_rows} rows",
        encoding=encoding,
    )
    if options is not None:
        msg.csv.CopyFrom(options)
    _apply_roles(path, msg, derived, roles, added={})
    return _checked(path, msg)


def _check_data_type(data_type: str) -> None:
    if not data_type:
        raise ValueError("a contract needs a data_type")


def _read_error(path: Path, exc: OSError) -> ValueError:
    return ValueError(f"{path}: cannot read: {exc.strerror or exc}")


# --- CSV -------------------------------------------------------------------------------


def _from_csv(
    path: Path,
    delimiter: str | None,
    header: bool | None,
    columns: Sequence[str] | None,
    max_categories: int,
    max_rows: int,
) -> tuple[list[_Column], int, pb.CsvOptions]:
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            head = f.read(_SNIFF_BYTES)
            complete = len(head) < _SNIFF_BYTES
    except OSError as exc:
        raise _read_error(path, exc) from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}): {exc.reason}") from None
    if not head.strip():
        raise ValueError(f"{path}: the file is empty")
    if not complete and "\n" in head:  # sniff whole lines only
        head = head[: head.rindex("\n") + 1]

    if delimiter is None:
        delimiter = _sniff_delimiter(head, "\t" if path.suffix.lower() == ".tsv" else ",")
    elif len(delimiter) != 1 or delimiter in '"\r\n':
        raise ValueError(f"the CSV delimiter must be one character, got {delimiter!r}")

    rows = _csv_rows(path, delimiter, max_rows + 1)  # +1: the first may be a header
    if not rows:
        raise ValueError(f"{path}: the file has no rows")
    first_line, first = rows[0]
    if header is None:
        header = _detect_header(head, delimiter, first, [r for _, r in rows[1:_HEADER_ROWS]])
    width = len(first)
    if header:
        names = list(first)
        if columns is not None and list(columns) != names:
            raise ValueError(
                f"{path}: line {first_line} is a header naming the columns {names}, but the "
                f"columns given are {list(columns)}; the contract's CSV columns must be the "
                f"header's names (pass header=False if line {first_line} is data)"
            )
        data = rows[1:]
    else:
        if columns is None:
            raise ValueError(
                f"{path}: no header line found (line {first_line} reads as data, "
                f"{delimiter!r}-separated): pass the names of its {width} columns, or "
                f"header=True if line {first_line} names them"
            )
        names = list(columns)
        if len(names) != width:
            raise ValueError(
                f"{path}: line {first_line} has {width} {delimiter!r}-separated columns but "
                f"{len(names)} column names were given: {names}"
            )
        data = rows
    _check_names(path, names, "header" if header else "columns")
    data = data[:max_rows]
    if not data:
        raise ValueError(f"{path}: the file has a header but no data rows")
    for line, row in data:
        if len(row) != width:
            raise ValueError(
                f"{path}: line {line}: expected {width} {delimiter!r}-separated columns "
                f"({', '.join(names)}), got {len(row)}"
            )
    derived = [
        _csv_column(path, name, [row[j] for _, row in data], [line for line, _ in data])
        for j, name in enumerate(names)
    ]
    derived = [_with_categories(c, max_categories) for c in derived]
    options = pb.CsvOptions(delimiter=delimiter, columns=names, header=header)
    return derived, len(data), options


def _csv_rows(path: Path, delimiter: str, limit: int) -> list[tuple[int, list[str]]]:
    """Up to `limit` non-blank rows, each with the line it starts on."""
    rows: list[tuple[int, list[str]]] = []
    line = 1
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter, strict=True)
            for row in reader:
                start, line = line, reader.line_num + 1
                if not row:
                    continue  # a blank line
                rows.append((start, row))
                if len(rows) >= limit:
                    break
    except OSError as exc:
        raise _read_error(path, exc) from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: line {line}: not UTF-8 text: {exc.reason}") from None
    except csv.Error as exc:
        raise ValueError(f"{path}: line {line}: bad CSV: {exc}") from None
    return rows


def _sniff_delimiter(head: str, default: str) -> str:
    """csv.Sniffer's delimiter among , ; tab |; when it cannot tell, the candidate that
    splits every line of the head into the same number (>1) of columns, else `default`."""
    try:
        return csv.Sniffer().sniff(head, delimiters=_DELIMITERS).delimiter
    except csv.Error:
        pass
    best, best_width = default, 1
    for candidate in _DELIMITERS:
        try:
            widths = {len(r) for r in csv.reader(io.StringIO(head), delimiter=candidate) if r}
        except csv.Error:
            continue
        if len(widths) == 1 and (width := widths.pop()) > best_width:
            best, best_width = candidate, width
    return best


class _FixedSniffer(csv.Sniffer):
    """csv.Sniffer whose has_header splits lines with the delimiter already chosen (its
    own sniff might pick another one)."""

    def __init__(self, delimiter: str) -> None:
        super().__init__()
        self._delimiter = delimiter

    def sniff(self, sample: str, delimiters: str | None = None) -> type[csv.Dialect]:
        class Dialect(csv.excel):
            delimiter = self._delimiter

        return Dialect


def _detect_header(head: str, delimiter: str, first: list[str], later: list[list[str]]) -> bool:
    """Whether the first row is a header.

    Never when a cell of it is a number (column names are not). Otherwise when some column
    holds a name in the first row and numbers in every later row; else as
    csv.Sniffer.has_header says (it votes by cell types and lengths, and misses a header
    whose names are as long as the values below them).
    """
    if any(_NUMBER.fullmatch(cell) for cell in first):
        return False
    for j, cell in enumerate(first):
        cells = [row[j] for row in later if len(row) == len(first) and row[j]]
        if cell and cells and all(_NUMBER.fullmatch(c) for c in cells):
            return True
    try:
        return _FixedSniffer(delimiter).has_header(head)
    except (csv.Error, StopIteration):
        return False


def _csv_column(path: Path, name: str, cells: list[str], lines: list[int]) -> _Column:
    """The type of a column of CSV cells (empty cells do not vote)."""
    present = [c for c in cells if c]
    if not present:
        return _Column(name, FieldType.STRING, absent=True)
    if all(map(_INTEGER.fullmatch, present)) and all(
        len(c) < 16 or abs(int(c)) <= MAX_SAFE_INTEGER for c in present
    ):
        return _Column(name, FieldType.INTEGER)
    if all(map(_NUMBER.fullmatch, present)):
        for cell, line in zip(cells, lines, strict=True):
            if cell and math.isinf(float(cell)):  # 1e999: the codec refuses it as non_finite
                raise ValueError(
                    f"{path}: line {line}, column {name!r}: {cell!r} overflows a float64"
                )
        return _Column(name, FieldType.FLOAT)
    if all(c.lower() in _BOOLEANS for c in present):
        return _Column(name, FieldType.BOOLEAN)
    return _Column(name, FieldType.STRING, tuple(sorted(set(present))))


def _with_categories(column: _Column, max_categories: int) -> _Column:
    """Keep a STRING column's distinct values as categories only when few enough."""
    if column.type is not FieldType.STRING or len(column.categories) > max_categories:
        return _Column(column.name, column.type, (), column.description, column.absent)
    return column


def _check_names(path: Path, names: Sequence[str], where: str) -> None:
    for j, name in enumerate(names):
        if not name:
            raise ValueError(f"{path}: column {j + 1} of the {where} has no name")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{path}: the {where} names columns more than once: {duplicates}")


# --- JSON lines ------------------------------------------------------------------------


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _from_jsonl(path: Path, max_categories: int, max_rows: int) -> tuple[list[_Column], int]:
    # name -> the Python types seen, with the first line of each; and the strings seen.
    kinds: dict[str, dict[type, int]] = {}
    strings: dict[str, set[str]] = {}
    n_rows = 0
    try:
        with path.open(encoding="utf-8-sig") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line, parse_constant=_refuse_constant)
                except ValueError as exc:
                    raise ValueError(
                        f"{path}: line {line_number}: not JSON (JSON lines hold one object "
                        f"per line): {exc}"
                    ) from None
                if not isinstance(doc, dict):
                    raise ValueError(
                        f"{path}: line {line_number}: a record must be a JSON object, got "
                        f"{_json_kind(doc)}"
                    )
                for name, value in doc.items():
                    seen = kinds.setdefault(name, {})
                    if value is None:
                        continue
                    if isinstance(value, dict | list):
                        raise ValueError(
                            f"{path}: line {line_number}, field {name!r}: a nested "
                            f"{_json_kind(value)}; contracts are flat (one value per field)"
                        )
                    kind = type(value)
                    if kind is int and abs(value) > MAX_SAFE_INTEGER:
                        kind = float  # a float64 column cannot hold it exactly
                    seen.setdefault(kind, line_number)
                    if kind is str:
                        values = strings.setdefault(name, set())
                        if len(values) <= max_categories:  # one more says "too many"
                            values.add(value)
                n_rows += 1
                if n_rows >= max_rows:
                    break
    except OSError as exc:
        raise _read_error(path, exc) from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text: {exc.reason}") from None
    if not n_rows:
        raise ValueError(f"{path}: the file is empty")
    derived = []
    for name, seen in kinds.items():
        if not name:
            raise ValueError(f"{path}: a field has an empty name")
        derived.append(_json_column(path, name, seen, strings.get(name, set())))
    return [_with_categories(c, max_categories) for c in derived], n_rows


def _json_kind(value: object) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return {str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), type(value).__name__
    )


def _json_column(path: Path, name: str, seen: dict[type, int], strings: set[str]) -> _Column:
    kinds = set(seen)
    if not kinds:
        return _Column(name, FieldType.STRING, absent=True)
    if kinds == {bool}:
        return _Column(name, FieldType.BOOLEAN)
    if kinds == {int}:
        return _Column(name, FieldType.INTEGER)
    if kinds <= {int, float}:
        return _Column(name, FieldType.FLOAT)
    if kinds == {str}:
        return _Column(name, FieldType.STRING, tuple(sorted(strings)))
    found = ", ".join(
        f"{_json_kind(kind())} on line {line}" for kind, line in sorted(seen.items(), key=_second)
    )
    raise ValueError(f"{path}: field {name!r} has values of more than one type: {found}")


def _second(item: tuple[type, int]) -> int:
    return item[1]


# --- Parquet ---------------------------------------------------------------------------


def _from_parquet(path: Path, max_categories: int, max_rows: int) -> tuple[list[_Column], int]:
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        with pq.ParquetFile(path) as parquet:
            batches = []
            n_rows = 0
            for batch in parquet.iter_batches(batch_size=min(max_rows, 64 * 1024)):
                batches.append(batch.slice(0, max_rows - n_rows))
                n_rows += len(batches[-1])
                if n_rows >= max_rows:
                    break
            table = pa.Table.from_batches(batches, schema=parquet.schema_arrow)
    except (OSError, pa.ArrowException) as exc:  # ArrowInvalid: not a Parquet file
        raise ValueError(f"{path}: cannot read as Parquet: {exc}") from None
    if not table.num_rows:
        raise ValueError(f"{path}: the file has no rows")
    _check_names(path, table.column_names, "schema")
    derived = []
    for name in table.column_names:
        column = table.column(name)
        arrow_type = column.type
        if pa.types.is_dictionary(arrow_type):
            arrow_type = arrow_type.value_type
            column = column.cast(arrow_type)
        derived.append(_parquet_column(path, name, column, arrow_type, pa, pc))
    return [_with_categories(c, max_categories) for c in derived], table.num_rows


def _parquet_column(
    path: Path, name: str, column: Any, arrow_type: Any, pa: Any, pc: Any
) -> _Column:
    types = pa.types
    if types.is_null(arrow_type):  # the writer saw no value at all: no declared type
        return _Column(name, FieldType.STRING, absent=True)
    if types.is_floating(arrow_type):
        return _Column(name, FieldType.FLOAT)
    if types.is_integer(arrow_type):
        bounds = pc.min_max(column)
        low, high = bounds["min"].as_py(), bounds["max"].as_py()
        if low is not None and max(-low, high) > MAX_SAFE_INTEGER:
            return _Column(name, FieldType.FLOAT)  # a float64 column cannot hold it exactly
        return _Column(name, FieldType.INTEGER)
    if types.is_boolean(arrow_type):
        return _Column(name, FieldType.BOOLEAN)
    if (
        types.is_string(arrow_type)
        or types.is_large_string(arrow_type)
        or _is_string_view(types, arrow_type)
    ):
        distinct = pc.unique(column.drop_null()).to_pylist()
        return _Column(name, FieldType.STRING, tuple(sorted(distinct)))
    if types.is_timestamp(arrow_type):
        zone = f", {arrow_type.tz}" if arrow_type.tz else ""
        return _Column(
            name,
            FieldType.INTEGER,
            description=f"Unix epoch milliseconds (the sample's timestamp[{arrow_type.unit}"
            f"{zone}] column)",
        )
    if types.is_nested(arrow_type):
        raise ValueError(
            f"{path}: column {name!r} is {arrow_type}: a nested column; contracts are flat "
            f"(one value per field)"
        )
    raise ValueError(
        f"{path}: column {name!r} is {arrow_type}: a field is a float, integer, boolean, "
        f"string or timestamp column"
    )


def _is_string_view(types: Any, arrow_type: Any) -> bool:
    check = getattr(types, "is_string_view", None)  # pyarrow 16 and later
    return bool(check and check(arrow_type))


# --- models ----------------------------------------------------------------------------

# ONNX TensorProto element types of the inputs the ONNX runtime can feed.
_ONNX_TYPES = {
    1: FieldType.FLOAT,  # FLOAT
    11: FieldType.FLOAT,  # DOUBLE
    7: FieldType.INTEGER,  # INT64
    6: FieldType.INTEGER,  # INT32
    9: FieldType.BOOLEAN,  # BOOL
    8: FieldType.STRING,  # STRING
}
_PMML_TYPES = {
    "double": FieldType.FLOAT,
    "float": FieldType.FLOAT,
    "integer": FieldType.INTEGER,
    "boolean": FieldType.BOOLEAN,
    "string": FieldType.STRING,
}


def derive_from_model(path: Path, *, data_type: str, roles: Roles = Roles()) -> pb.DataContract:
    """A contract (version 1, JSON encoding) with one field per input of a model.

    ONNX: each graph input's element type (float, double -> FLOAT; int64, int32 -> INTEGER;
    bool -> BOOLEAN; string -> STRING with the categories of the encoder it feeds, when they
    can be traced). A grouped [N, k] input has no column names: ValueError. PMML: each
    active field's DataDictionary type (double, float -> FLOAT; integer -> INTEGER; boolean
    -> BOOLEAN; string -> STRING with its valid `Value`s), plus the MiningSchema's target,
    which is the label field unless `roles` names another one. Field names are spelled as
    the model spells them ("fixed acidity"); waxserve matches them to records by canonical
    name. ValueError, naming the file, when the model does not load.
    """
    _check_data_type(data_type)
    try:
        model_format = format_of(path)
        blob = path.read_bytes()
    except OSError as exc:
        raise _read_error(path, exc) from None
    try:
        runtime = load_runtime(model_format, blob, ())
    except ModelError as exc:
        raise ValueError(f"{path}: {exc}") from None
    targets: list[_Column] = []
    try:
        if model_format == pb.MODEL_FORMAT_ONNX:
            derived = _onnx_columns(blob, runtime)
        else:
            derived, targets = _pmml_columns(path, blob, runtime)
    finally:
        runtime.close()

    roles = _model_roles(path, roles, derived, targets)
    added = {
        roles.id_field: _Column(roles.id_field, FieldType.STRING),
        roles.event_time_field: _Column(
            roles.event_time_field, FieldType.INTEGER, description="Unix epoch milliseconds"
        ),
        roles.label_field: _label_column(roles.label_field, runtime),
    }
    msg = pb.DataContract(
        data_type=data_type,
        version=1,
        description=f"derived from {path.name}, a {runtime.format} {runtime.task} model",
        encoding=pb.ENCODING_JSON,
    )
    _apply_roles(path, msg, derived + targets, roles, added)
    return _checked(path, msg)


def _onnx_columns(blob: bytes, runtime: ModelRuntime) -> list[_Column]:
    """One column per runtime feature, typed by its graph input's element type."""
    import onnx

    graph = onnx.load_model_from_string(blob).graph
    element_types = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    derived = []
    for feature in runtime.features:
        kind = _ONNX_TYPES.get(element_types.get(feature.name, 0))
        if kind is None:  # cannot happen for a model the runtime loaded without names
            kind = FieldType.STRING if feature.kind == TEXT else FieldType.FLOAT
        categories = _unique(feature.categories or ()) if kind is FieldType.STRING else ()
        derived.append(_Column(feature.name, kind, categories))
    return derived


def _pmml_columns(
    path: Path, blob: bytes, runtime: ModelRuntime
) -> tuple[list[_Column], list[_Column]]:
    """The active fields (in the runtime's order) and the targets, typed by the
    DataDictionary. The runtime has already refused DOCTYPEs, so the parser meets no
    entities."""
    try:
        root = ElementTree.fromstring(blob)
    except ElementTree.ParseError as exc:
        raise ValueError(f"{path}: not XML: {exc}") from None
    dictionary = {
        field.get("name", ""): field
        for section in root
        if _local(section.tag) == "DataDictionary"
        for field in section
        if _local(field.tag) == "DataField"
    }
    targets = []
    for model in root:
        schema = next((c for c in model if _local(c.tag) == "MiningSchema"), None)
        if schema is None:
            continue
        for mining_field in schema:
            if mining_field.get("usageType") in ("target", "predicted"):
                targets.append(mining_field.get("name", ""))
        break  # the top-level model's schema; segments' are internal to it

    def column(name: str, categories: Sequence[str] | None) -> _Column:
        field = dictionary.get(name)
        if field is None:
            raise ValueError(f"{path}: field {name!r} is not in the DataDictionary")
        data_type = field.get("dataType", "")
        kind = _PMML_TYPES.get(data_type)
        if kind is None:
            raise ValueError(
                f"{path}: field {name!r} is {data_type or 'untyped'}: a field is double, "
                f"float, integer, boolean or string"
            )
        if kind is not FieldType.STRING:
            return _Column(name, kind)
        values = [
            v.get("value", "")
            for v in field
            if _local(v.tag) == "Value" and v.get("property", "valid") == "valid"
        ]
        return _Column(name, kind, _unique(values or categories or ()))

    inputs = [column(f.name, f.categories) for f in runtime.features]
    return inputs, [column(name, None) for name in targets]


def _local(tag: str) -> str:
    """An XML tag without its namespace (PMML 4.x versions differ only in it)."""
    return tag.rpartition("}")[2]


def _unique(values: Sequence[str]) -> tuple[str, ...]:
    """Values in order without repeats (a contract refuses duplicate categories)."""
    return tuple(dict.fromkeys(values))


def _model_roles(path: Path, roles: Roles, derived: list[_Column], targets: list[_Column]) -> Roles:
    """The roles, with the PMML target as the label unless one is named; refuses a role
    naming a model input (role fields are not features, so the model could not be fed)."""
    inputs = {c.name for c in derived}
    for role, name in (
        ("id_field", roles.id_field),
        ("event_time_field", roles.event_time_field),
        ("label_field", roles.label_field),
    ):
        if name in inputs:
            raise ValueError(
                f"{path}: {role} {name!r} is a model input; a role field is never fed to the model"
            )
    if not roles.label_field and targets:
        return Roles(roles.id_field, roles.event_time_field, targets[0].name, roles.required)
    return roles


def _label_column(name: str, runtime: ModelRuntime) -> _Column:
    """A label field the model does not declare: a regressor's is FLOAT, a classifier's
    INTEGER when its class labels are integers, else STRING with them as categories."""
    labels = runtime.class_labels
    if runtime.task != "classification" or not labels:
        return _Column(name, FieldType.FLOAT)
    if all(_INTEGER.fullmatch(x) for x in labels):
        return _Column(name, FieldType.INTEGER)
    return _Column(name, FieldType.STRING, _unique(labels))


# --- shared ----------------------------------------------------------------------------


def _apply_roles(
    path: Path,
    msg: pb.DataContract,
    derived: list[_Column],
    roles: Roles,
    added: dict[str, _Column],
) -> None:
    """Add the fields to `msg` and set its roles.

    A role naming no derived column is added from `added` (models) or refused (samples).
    """
    by_name = {c.name: c for c in derived}
    leading: list[_Column] = []  # added id and event-time fields lead a record
    trailing: list[_Column] = []  # an added label follows the features
    named = [
        ("id_field", roles.id_field, {FieldType.STRING, FieldType.INTEGER}),
        ("event_time_field", roles.event_time_field, {FieldType.INTEGER}),
        ("label_field", roles.label_field, set(FieldType)),
    ]
    for role, name, allowed in named:
        if not name:
            continue
        others = [r for r, n, _ in named if n == name and r != role]
        if others:
            raise ValueError(f"{path}: {name!r} cannot be both {role} and {others[0]}")
        column = by_name.get(name)
        if column is None:
            if name not in added:
                raise ValueError(
                    f"{path}: {role} {name!r} is not a column; the columns are "
                    f"{[c.name for c in derived]}"
                )
            column = by_name[name] = added[name]
            (trailing if role == "label_field" else leading).append(column)
        if column.type not in allowed:
            if column.absent:
                hint = " (no row has a value)"
            elif column.type is FieldType.FLOAT:
                hint = " (integers beyond ±2**53 read as float)"
            else:
                hint = ""
            raise ValueError(
                f"{path}: {role} {name!r} is a {column.type} column{hint}; it must be "
                + " or ".join(sorted(allowed))
            )
        setattr(msg, role, name)
    unknown = [name for name in roles.required if name not in by_name]
    if unknown:
        raise ValueError(
            f"{path}: required names no column: {unknown}; the columns are {list(by_name)}"
        )
    for column in leading + derived + trailing:
        categories = column.categories if column.name != roles.id_field else ()
        msg.fields.add(
            name=column.name,
            type=_FIELD_TYPES[column.type],
            required=column.name in roles.required,
            categories=list(categories),
            description=column.description,
        )


_FIELD_TYPES = {
    FieldType.FLOAT: pb.FIELD_TYPE_FLOAT,
    FieldType.INTEGER: pb.FIELD_TYPE_INTEGER,
    FieldType.BOOLEAN: pb.FIELD_TYPE_BOOLEAN,
    FieldType.STRING: pb.FIELD_TYPE_STRING,
}


def _checked(path: Path, msg: pb.DataContract) -> pb.DataContract:
    """The message, once `Contract.from_proto` accepts it (a derived contract always
    installs)."""
    try:
        Contract.from_proto(msg)
    except ValueError as exc:
        raise ValueError(f"{path}: the derived contract is not valid: {exc}") from None
    return msg


def contract_version_bump(old: pb.DataContract | None, new: pb.DataContract) -> pb.DataContract:
    """A copy of `new` with version `old.version + 1` (1 when there is no old contract).

    ValueError when `old` is another data type's contract.
    """
    if old is not None and old.data_type != new.data_type:
        raise ValueError(
            f"cannot follow data type {old.data_type!r}'s contract with one for {new.data_type!r}"
        )
    bumped = pb.DataContract()
    bumped.CopyFrom(new)
    bumped.version = 1 if old is None else old.version + 1
    return bumped
