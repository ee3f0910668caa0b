"""Decoding a batch of one data type's messages by its contract, whatever their encodings.

Each message's encoding is its `content-type` header when it has one, else the contract's
encoding. Messages are grouped by encoding (almost always one group), each group is
decoded by its codec, and then the checks that do not depend on the encoding run once,
column-wise, over the whole batch: required fields present, INTEGER values integral and
within ±2**53, BOOLEAN values 0/1, STRING values within their categories.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dataflows.contracts.codecs import Codec, codec_for
from dataflows.contracts.codecs.base import TOMBSTONE_MESSAGE, Decoded, Errors, bad_rows
from dataflows.contracts.schema import (
    CONTENT_TYPES,
    MAX_SAFE_INTEGER,
    Contract,
    ContractError,
    Encoding,
    FieldType,
)
from dataflows.core.reasons import Reason

CONTENT_TYPE_HEADER = "content-type"

Headers = Sequence[tuple[str, bytes | None]]


class ContractCodecs:
    """The codecs of one contract, built once (per process) and reused for every batch.

    The contract's own encoding's codec is built here, so a contract whose options cannot
    work fails at once with ContractError; codecs for other encodings (named by a
    message's content-type header) are built the first time one is needed.
    """

    def __init__(
        self, contract: Contract, *, schema_resolver: Callable[[int], str] | None = None
    ) -> None:
        self.contract = contract
        self._schema_resolver = schema_resolver
        self._codecs: dict[Encoding, Codec | str] = {}  # str: why it cannot be built
        self._codecs[contract.encoding] = self._build(contract.encoding)
        self._checks = _Checks(contract)

    def codec(self, encoding: Encoding) -> Codec:
        """The codec of `encoding`, built on first use; ContractError if it cannot be."""
        codec = self._codecs.get(encoding)
        if codec is None:
            try:
                codec = self._codecs[encoding] = self._build(encoding)
            except ContractError as exc:
                self._codecs[encoding] = str(exc)
                raise
        if isinstance(codec, str):
            raise ContractError(Reason.BAD_CONTRACT, codec)
        return codec

    def decode(
        self,
        values: Sequence[bytes | None],
        headers: Sequence[list[tuple[str, bytes | None]]],
    ) -> Decoded:
        """Decode a batch into the contract's column layout, with every bad message in
        `errors` (index -> (reason, message)) and the rest decoded."""
        n = len(values)
        if len(headers) != n:
            raise ValueError(f"{n} values but {len(headers)} header lists")
        if n == 0:
            return Decoded.empty(self.contract, 0)
        errors: Errors = {}
        groups: dict[Encoding, list[int]] = {}
        if headers.count(headers[0]) == n:  # producers send the same headers every time
            encoding = self._encoding(_content_types(headers[0]))
            if isinstance(encoding, Encoding):
                groups[encoding] = list(range(n))
            else:
                errors = {i: (Reason.UNDECODABLE, encoding) for i in range(n)}
        else:
            # Keyed by the content-type values alone: other headers (trace ids) may differ
            # on every message.
            seen: dict[tuple[bytes | str | None, ...], Encoding | str] = {}
            for i, message_headers in enumerate(headers):
                key = _content_types(message_headers)
                found = seen.get(key)
                if found is None:
                    found = seen[key] = self._encoding(key)
                if isinstance(found, Encoding):
                    groups.setdefault(found, []).append(i)
                else:
                    errors[i] = (Reason.UNDECODABLE, found)
        if None in values:  # tombstones: no codec needs to see them
            for i, value in enumerate(values):
                if value is None and i not in errors:
                    errors[i] = (Reason.UNDECODABLE, TOMBSTONE_MESSAGE)
            groups = {
                encoding: [i for i in rows if values[i] is not None]
                for encoding, rows in groups.items()
            }
        decoded = self._decode_groups(values, groups, errors, n)
        self._checks.apply(decoded)
        return decoded

    # --- internals ------------------------------------------------------------------

    def _build(self, encoding: Encoding) -> Codec:
        options: dict[str, Any] = {}
        if encoding is Encoding.AVRO:
            options["schema_resolver"] = self._schema_resolver
        return codec_for(self.contract, encoding, **options)

    def _encoding(self, found: tuple[bytes | str | None, ...]) -> Encoding | str:
        """The encoding of messages with these content-type header values, or why they
        cannot be decoded (a plain str; an Encoding is a str too: test isinstance Encoding)."""
        if not found:
            encoding = self.contract.encoding
            content_type = f"{encoding} (the contract's encoding)"
        else:
            if None in found:
                return "the content-type header has no value"
            types = {_media_type(value) for value in found if value is not None}
            if len(types) > 1:
                return f"conflicting content-type headers: {sorted(types)}"
            content_type = types.pop()
            known = CONTENT_TYPES.get(content_type)
            if known is None:
                return f"unsupported content-type {content_type!r}"
            encoding = known
        try:
            self.codec(encoding)
        except ContractError as exc:
            return f"content-type {content_type!r}: cannot decode {encoding} records: {exc}"
        return encoding

    def _decode_groups(
        self,
        values: Sequence[bytes | None],
        groups: dict[Encoding, list[int]],
        errors: Errors,
        n: int,
    ) -> Decoded:
        if len(groups) == 1:
            ((encoding, rows),) = groups.items()
            if len(rows) == n:  # the common case: one encoding, nothing refused
                return self.codec(encoding).decode(values)
        out = Decoded.empty(self.contract, n)
        out.errors = errors
        for encoding, rows in groups.items():
            if not rows:
                continue
            part = self.codec(encoding).decode([values[i] for i in rows])
            index = np.asarray(rows)
            out.numeric[index] = part.numeric
            out.text[index] = part.text
            errors.update((rows[row], error) for row, error in part.errors.items())
        return out


def _content_types(headers: Headers) -> tuple[bytes | str | None, ...]:
    """The values of a message's content-type headers (the name is case-insensitive)."""
    return tuple(value for name, value in headers if name.lower() == CONTENT_TYPE_HEADER)


def _media_type(value: bytes | str) -> str:
    """The media type of a content-type value: "Application/JSON; charset=utf-8" gives
    "application/json"."""
    text = value if isinstance(value, str) else value.decode("latin-1")
    return text.split(";", 1)[0].strip().lower()


class _Checks:
    """The contract's own checks, column-wise over a decoded batch (independent of the
    encoding). A message already refused by its codec keeps its codec's reason."""

    def __init__(self, contract: Contract) -> None:
        self.contract = contract
        numeric = {name: j for j, name in enumerate(contract.numeric_fields)}
        text = {name: j for j, name in enumerate(contract.text_fields)}
        self.required_numeric = [
            numeric[f.name] for f in contract.fields if f.required and f.type.numeric
        ]
        self.required_text = [
            text[f.name] for f in contract.fields if f.required and not f.type.numeric
        ]
        self.integers = [numeric[f.name] for f in contract.fields if f.type is FieldType.INTEGER]
        self.booleans = [numeric[f.name] for f in contract.fields if f.type is FieldType.BOOLEAN]
        self.categories = [
            (text[f.name], f.name, frozenset(f.categories), f.categories)
            for f in contract.fields
            if f.categories
        ]

    def apply(self, decoded: Decoded) -> None:
        """Add the contract's errors to `decoded.errors` (never replacing one)."""
        numeric, text, errors = decoded.numeric, decoded.text, decoded.errors
        if numeric.size and np.isinf(numeric).any():  # codecs refuse these; belt and braces
            for row, j in bad_rows(np.isinf(numeric)):
                name = self.contract.numeric_fields[j]
                errors.setdefault(
                    row,
                    (Reason.NON_FINITE, f"field {name!r}: value {numeric[row, j]} is not finite"),
                )
        self._missing(numeric, text, errors)
        if self.integers:
            values = numeric[:, self.integers]
            present = ~np.isnan(values)
            self._flag(
                present & (np.abs(values) > MAX_SAFE_INTEGER),
                self.integers,
                numeric,
                errors,
                Reason.OUT_OF_RANGE,
                "integer {value:.17g} is beyond ±2**53 (integers must be exact as float64)",
            )
            self._flag(
                present & (values != np.trunc(values)),
                self.integers,
                numeric,
                errors,
                Reason.WRONG_TYPE,
                "expected an integer, got {value!r}",
            )
        if self.booleans:
            values = numeric[:, self.booleans]
            self._flag(
                ~np.isnan(values) & (values != 0.0) & (values != 1.0),
                self.booleans,
                numeric,
                errors,
                Reason.WRONG_TYPE,
                "expected a boolean (0 or 1), got {value!r}",
            )
        for j, name, allowed, listed in self.categories:
            column = text[:, j]
            unknown = set(column.tolist()) - allowed - {None}
            if not unknown:
                continue
            for row, value in enumerate(column.tolist()):
                if value in unknown:
                    errors.setdefault(
                        row,
                        (
                            Reason.UNKNOWN_CATEGORY,
                            f"field {name!r}: {value!r} is not one of {list(listed)}",
                        ),
                    )

    def _missing(self, numeric: np.ndarray, text: np.ndarray, errors: Errors) -> None:
        n = len(numeric)
        missing = np.zeros((n, 0), dtype=bool)
        columns: list[str] = []
        if self.required_numeric:
            missing = np.isnan(numeric[:, self.required_numeric])
            columns = [self.contract.numeric_fields[j] for j in self.required_numeric]
        if self.required_text:
            missing = np.hstack([missing, text[:, self.required_text] == None])  # noqa: E711
            columns += [self.contract.text_fields[j] for j in self.required_text]
        if not missing.any():
            return
        for row in np.flatnonzero(missing.any(axis=1)).tolist():
            names = [name for name, gone in zip(columns, missing[row], strict=True) if gone]
            errors.setdefault(
                row,
                (
                    Reason.MISSING_FIELD,
                    f"required field{'s' if len(names) > 1 else ''} missing: "
                    + ", ".join(repr(name) for name in names),
                ),
            )

    def _flag(
        self,
        mask: np.ndarray,
        columns: list[int],
        numeric: np.ndarray,
        errors: Errors,
        reason: Reason,
        template: str,
    ) -> None:
        if not mask.any():
            return
        for row, k in bad_rows(mask):
            j = columns[k]
            name = self.contract.numeric_fields[j]
            message = f"field {name!r}: " + template.format(value=float(numeric[row, j]))
            errors.setdefault(row, (reason, message))
