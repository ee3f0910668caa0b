"""What every codec shares: the decoded column layout, the `Codec` interface, and helpers.

A codec turns one batch of messages of one encoding into the contract's column layout
(`Decoded`): every FLOAT, INTEGER and BOOLEAN field a column of one float64 matrix (NaN
when absent), every STRING field a column of one object matrix (None when absent). Bad
messages do not stop a batch: each is reported in `Decoded.errors` with a reason and a
message, and the rest of the batch decodes as usual.

Codecs report what they alone can see: bytes that do not parse ("undecodable"), a value
of the wrong type for its field ("wrong_type"), an explicit NaN or infinity
("non_finite"). The checks that are the same for every encoding (required fields, integral
integers, 0/1 booleans, categories) run once per batch, column-wise, in
`dataflows.contracts.decode`.
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from dataflows.contracts.schema import MAX_SAFE_INTEGER, Contract, Encoding, Field, FieldType
from dataflows.core.reasons import Reason

_MAX_FLOAT_INTEGER = int(np.finfo(np.float64).max)
"""Integers larger than this overflow float64 (to infinity)."""

Errors = dict[int, tuple[str, str]]
"""Message index -> (reason, human-readable message)."""

TOMBSTONE_MESSAGE = "message has no value (a tombstone)"


@dataclass
class Decoded:
    """Messages decoded into the contract's column layout.

    `numeric[i, j]` is field `contract.numeric_fields[j]` of message i (NaN: absent;
    booleans 0.0/1.0), `text[i, j]` field `contract.text_fields[j]` (None: absent, else a
    str). A message in `errors` is refused; its row's values are meaningless.
    """

    numeric: np.ndarray  # float64 (n, len(contract.numeric_fields))
    text: np.ndarray  # object (n, len(contract.text_fields))
    errors: Errors = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.numeric)

    @classmethod
    def empty(cls, contract: Contract, n: int) -> Decoded:
        """n messages with every field absent and no errors."""
        return cls(
            np.full((n, len(contract.numeric_fields)), np.nan),
            np.full((n, len(contract.text_fields)), None, dtype=object),
            {},
        )


class MessageError(ValueError):
    """One message that cannot be decoded; `reason` is its dead-letter error class."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Codec(ABC):
    """Decodes and encodes one data type's records in one encoding.

    Built once per contract (per process) and reused for every batch: everything that
    depends only on the contract (a msgspec struct type, a parsed Avro schema, a protobuf
    message class) is prepared in `__init__`, which raises ContractError("bad_contract")
    when the contract's options cannot work.
    """

    encoding: ClassVar[Encoding]

    def __init__(self, contract: Contract) -> None:
        self.contract = contract
        self.fields: tuple[Field, ...] = contract.fields
        self.by_name: dict[str, Field] = {f.name: f for f in contract.fields}
        self.numeric_fields = tuple(self.by_name[name] for name in contract.numeric_fields)
        self.text_fields = tuple(self.by_name[name] for name in contract.text_fields)

    @abstractmethod
    def decode(self, values: Sequence[bytes | None]) -> Decoded:
        """Decode a batch of message values; bad messages are reported in `errors`."""

    @abstractmethod
    def encode(self, rows: Sequence[Mapping[str, object]]) -> list[bytes]:
        """Encode records given as field name -> value; absent (None or NaN) fields are
        omitted, unknown names ignored. ValueError for a value its field cannot hold."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.contract.data_type} v{self.contract.version})"


# --- helpers shared by the codecs -------------------------------------------------------


def gather(
    items: Sequence[Any],
    getter: Callable[..., Callable[[Any], Any]],
    names: Sequence[str],
    dtype: type | np.dtype[Any],
) -> np.ndarray:
    """An (n, len(names)) matrix of each item's `names`, read with `getter(*names)`
    (`operator.attrgetter` or `itemgetter`): one pass in C, no Python code per row.

    For float64, None becomes NaN (numpy's conversion), True/False 1.0/0.0.
    """
    n, k = len(items), len(names)
    if k == 0:
        return np.empty((n, 0), dtype=dtype)
    if k == 1:  # a one-name getter returns the value itself, not a 1-tuple
        return np.fromiter(map(getter(names[0]), items), dtype, n).reshape(n, 1)
    flat = itertools.chain.from_iterable(map(getter(*names), items))
    return np.fromiter(flat, dtype, n * k).reshape(n, k)


def bad_rows(mask: np.ndarray) -> Iterable[tuple[int, int]]:
    """(row, column) of every true cell of a 2-d mask, as Python ints."""
    rows, columns = np.nonzero(mask)
    return zip(rows.tolist(), columns.tolist(), strict=True)


def describe(value: object, limit: int = 40) -> str:
    """A value for an error message: its repr, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def type_error(f: Field, value: object) -> MessageError:
    """The wrong_type error of a value its field cannot hold."""
    wanted = {
        FieldType.FLOAT: "a number",
        FieldType.INTEGER: "an integer",
        FieldType.BOOLEAN: "a boolean",
        FieldType.STRING: "a string",
    }[f.type]
    return MessageError(
        Reason.WRONG_TYPE,
        f"field {f.name!r}: expected {wanted}, got {type(value).__name__} {describe(value)}",
    )


def non_finite_error(f: Field, value: object) -> MessageError:
    """The non_finite error of an explicit NaN or infinity (or a number past float64's range)."""
    return MessageError(
        Reason.NON_FINITE, f"field {f.name!r}: value {describe(value)} is not finite"
    )


def out_of_range_error(f: Field, value: object) -> MessageError:
    """The out_of_range error of an integer too large for a float64 column."""
    return MessageError(
        Reason.OUT_OF_RANGE,
        f"field {f.name!r}: integer {describe(value)} is beyond ±2**53 "
        "(integers must be exact as float64)",
    )


def check_value(f: Field, value: object) -> None:
    """Raise MessageError unless `value` (a decoded Python value, not None) fits field `f`.

    The slow, explaining path of codecs whose values arrive as Python objects (JSON,
    Avro, Record): a bool is not a number, a float is not an integer, NaN and infinities
    are refused (so is an integer literal that overflows float64, as 1e400 does), integers
    beyond ±2**53 are out of range.
    """
    kind = type(value)
    if f.type is FieldType.FLOAT:
        if kind is bool or not isinstance(value, int | float):
            raise type_error(f, value)
        if isinstance(value, float) and not math.isfinite(value):
            raise non_finite_error(f, value)
        if isinstance(value, int) and abs(value) > _MAX_FLOAT_INTEGER:
            raise non_finite_error(f, value)
    elif f.type is FieldType.INTEGER:
        if kind is bool or not isinstance(value, int):
            raise type_error(f, value)
        if abs(value) > MAX_SAFE_INTEGER:
            raise out_of_range_error(f, value)
    elif f.type is FieldType.BOOLEAN:
        if kind is not bool:
            raise type_error(f, value)
    elif not isinstance(value, str):
        raise type_error(f, value)


def unsafe_integer_rows(
    numeric: np.ndarray,
    integer_columns: Sequence[int],
    original: Callable[[int, int], object],
) -> list[tuple[int, int]]:
    """(row, column) of integer cells whose exact value is beyond ±2**53.

    float64 rounds 2**53 + 1 to 2**53, so "magnitude > 2**53" cannot be seen in the matrix
    for that one neighbour: cells equal to ±2**53 are looked up with `original(row,
    column)` (the value as decoded, an int or a decimal string) and compared exactly.
    Everything larger is > 2**53 after rounding too, and left to the batch checks.
    """
    if not integer_columns:
        return []
    columns = np.asarray(integer_columns)
    edge = np.abs(numeric[:, columns]) == float(MAX_SAFE_INTEGER)
    if not edge.any():
        return []
    found = []
    for row, j in bad_rows(edge):
        value = original(row, int(columns[j]))
        exact = int(value) if isinstance(value, int) else _exact_integer(str(value))
        if exact is None or abs(exact) > MAX_SAFE_INTEGER:
            found.append((row, int(columns[j])))
    return found


def _exact_integer(text: str) -> int | None:
    """An integral decimal string as an exact int, None if it is not integral."""
    from decimal import Decimal, InvalidOperation

    try:
        number = Decimal(text)
    except InvalidOperation:
        return None
    return int(number) if number == number.to_integral_value() else None


def encode_value(f: Field, value: object) -> object:
    """A record value as the Python type of its field, None when absent (None or NaN).

    Accepts what a decoded matrix holds (an INTEGER as an integral float, a BOOLEAN as
    0.0/1.0), so decoded batches can be re-encoded (replay). ValueError otherwise.
    """
    if value is None:
        return None
    if isinstance(value, float | np.floating) and math.isnan(value):
        return None
    if f.type is FieldType.STRING:
        if not isinstance(value, str):
            raise ValueError(f"field {f.name!r}: expected a string, got {describe(value)}")
        return value
    if isinstance(value, str) or not isinstance(value, int | float | np.number):
        raise ValueError(f"field {f.name!r}: expected a number, got {describe(value)}")
    if not math.isfinite(value):
        raise ValueError(f"field {f.name!r}: value {value!r} is not finite")
    if f.type is FieldType.FLOAT:
        return float(value)
    if f.type is FieldType.BOOLEAN:
        if value not in (0, 1):
            raise ValueError(f"field {f.name!r}: expected a boolean, got {describe(value)}")
        return bool(value)
    if value != int(value):
        raise ValueError(f"field {f.name!r}: expected an integer, got {describe(value)}")
    return int(value)


def encode_row(fields: Sequence[Field], row: Mapping[str, object]) -> dict[str, object]:
    """The present fields of a row, in contract order, as their fields' Python types."""
    out = {}
    for f in fields:
        value = encode_value(f, row.get(f.name))
        if value is not None:
            out[f.name] = value
    return out
