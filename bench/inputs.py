"""The records the bench feeds its contenders: one input topic per format.

Every format is a data file of models/ read through its data type's contract, record i from
row i % rows, keyed by its record id. The records are the ones `waxserve replay` writes
(`dataflows.tools.replay.RecordEncoder`: the contract's id and event-time fields filled in, a
content-type header unless the encoding is the contract's own), on a topic whose default
data type is theirs (`WAXSERVE_RECORDS_TOPICS=<topic>=<data type>`), so without replay's
`data-type` header: a second header costs the consumer ~0.2 µs a message (librdkafka and
`Message.headers()`, measured), and the peers' input keeps the one header it always had.

- `wine-json`: data type wine, JSON; `content-type: application/json`. The peers' input.
- `wine-protobuf`: wine in the contract's own encoding, its protobuf `WineRecord`
  (models/wine/wine.proto); no headers.
- `wine-csv`: wine as CSV lines of the contract's `;` columns, which hold no id and no event
  time (waxserve then names a record "<topic>/<partition>/<offset>");
  `content-type: text/csv`.
- `wine-avro`: data type wine-avro, the bench's copy of the wine contract with Avro records
  (bench/contracts/wine-avro.json), in its own encoding; no headers.
- `penguins-json`: data type penguins, JSON (its contract's own encoding), for the
  categorical model penguins-species-onnx; no headers.

`wine-json` is the input of every peer (the hand-written loops, Bytewax, Quix Streams) and
of waxserve's main rows; the other formats are read by waxserve only. Only complete rows
are sent (every CSV column present: the penguins file lacks some measurements or the sex
of 11 penguins, which waxserve would dead-letter), so every record is scored.

Encoding 200,000 records one `RecordEncoder.encode` call at a time takes ~70 µs a record
(it reads the CSV line every time); `Feed` reads each data row once and encodes the
records a batch at a time with the same codec, and checks its first records against
`RecordEncoder` byte for byte when it is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from dataflows.contracts.codecs import codec_for
from dataflows.contracts.files import load_contract
from dataflows.contracts.schema import Contract, CsvOptions, Encoding, FieldType
from dataflows.core.descriptors import MODELS_DIR, CatalogEntry, catalog_contracts
from dataflows.tools.replay import OutHeaders, RecordEncoder, csv_lines, row_values

BENCH_DIR = Path(__file__).resolve().parent
WINE_AVRO_CONTRACT = BENCH_DIR / "contracts" / "wine-avro.json"
"""The bench's copy of the wine contract with Avro records (data type `wine-avro`)."""

Message = tuple[bytes, bytes, OutHeaders | None]
"""Key, value, headers of one input record."""


@dataclasses.dataclass(frozen=True)
class InputFormat:
    """One input topic of the bench: which records, in which encoding."""

    name: str
    data_type: str
    data_file: Path
    encoding: Encoding | None = None  # None: the contract's own
    contract_file: Path | None = None  # None: the catalog's contract of the data type
    header: bool = False  # the data file starts with a header line

    def contract(self) -> Contract:
        """The data type's contract (ValueError/KeyError when its file is not there)."""
        path = self.contract_file or catalog_contracts()[self.data_type]
        return load_contract(path)


WINE_DATA = MODELS_DIR / "data" / "winequality_red.csv"
PENGUINS_DATA = MODELS_DIR / "penguins" / "penguins.csv"

INPUTS: dict[str, InputFormat] = {
    f.name: f
    for f in (
        InputFormat("wine-json", "wine", WINE_DATA, Encoding.JSON),
        InputFormat("wine-protobuf", "wine", WINE_DATA),
        InputFormat("wine-csv", "wine", WINE_DATA, Encoding.CSV),
        InputFormat("wine-avro", "wine-avro", WINE_DATA, contract_file=WINE_AVRO_CONTRACT),
        InputFormat("penguins-json", "penguins", PENGUINS_DATA, header=True),
    )
}
SHARED_INPUT = "wine-json"
"""The input every peer reads."""
DATA_TYPE_HEADER = "data-type"
"""replay's header naming the data type (waxserve's default `data_type_header`)."""


@dataclasses.dataclass
class Reference:
    """What a model scores for each data row, by onnxruntime on its own (no waxserve code):
    values for a regressor, labels for a classifier."""

    values: np.ndarray | None = None
    labels: list[str] | None = None


class Feed:
    """The records of one input format: record i is data row i % rows."""

    def __init__(self, fmt: InputFormat) -> None:
        self.format = fmt
        self.contract = fmt.contract()
        self.encoding = fmt.encoding or self.contract.encoding
        contract = self.contract
        lines = [line.raw for line in csv_lines(fmt.data_file, loop=False, header=fmt.header)]
        # The data file read as `RecordEncoder` reads it: the contract's CSV columns.
        csv = CsvOptions(contract.csv.delimiter, contract.csv_columns, False)
        reader = codec_for(dataclasses.replace(contract, csv=csv), Encoding.CSV)
        decoded = reader.decode(lines)
        complete = [
            i
            for i in range(len(lines))
            if i not in decoded.errors
            and len(row_values(contract, decoded, i)) == len(contract.csv_columns)
        ]
        self.lines = [lines[i] for i in complete]
        self.numeric = decoded.numeric[complete]  # the contract's column layout
        self.text = decoded.text[complete]
        self._rows = [row_values(contract, decoded, i) for i in complete]
        self._writer = codec_for(contract, self.encoding)
        self._encoder = RecordEncoder(contract, encoding=self.encoding)
        _, replay_headers, _ = self._encoder.encode(self.lines[0], record_id="0", event_time_ms=0)
        # The topic names the data type: replay's data-type header is left out.
        kept = [h for h in replay_headers if h[0] != DATA_TYPE_HEADER]
        self.headers: OutHeaders | None = kept or None  # None: the message has no headers
        # CSV carries only the contract's CSV columns: wine's have no id and no event time.
        if self.encoding is Encoding.CSV:
            written = set(contract.csv_columns)
        else:
            written = {f.name for f in contract.fields}
        # Whether a scored record's id is the record number (else "<topic>/<partition>/<offset>").
        self.carries_ids = bool(contract.id_field) and contract.id_field in written
        self._check_against_replay()

    def __len__(self) -> int:
        """Distinct data rows."""
        return len(self.lines)

    def _row(self, i: int, event_time_ms: int) -> dict[str, object]:
        row = dict(self._rows[i % len(self._rows)])
        contract = self.contract
        if contract.id_field and contract.field_named(contract.id_field).type is FieldType.STRING:
            row[contract.id_field] = str(i)
        if contract.event_time_field:
            row[contract.event_time_field] = event_time_ms
        return row

    def messages(self, start: int, count: int, event_time_ms: int) -> Iterator[Message]:
        """Records start .. start + count - 1, encoded a batch at a time."""
        for first in range(start, start + count, 10_000):
            numbers = range(first, min(first + 10_000, start + count))
            values = self._writer.encode([self._row(i, event_time_ms) for i in numbers])
            for i, value in zip(numbers, values, strict=True):
                yield str(i).encode(), value, self.headers

    def message(self, i: int, event_time_ms: int) -> Message:
        """Record i."""
        return next(self.messages(i, 1, event_time_ms))

    def _check_against_replay(self) -> None:
        """The batch encoding must be what `waxserve replay` writes."""
        for i in (0, 1, len(self) + 7):
            value, headers, ok = self._encoder.encode(
                self.lines[i % len(self)], record_id=str(i), event_time_ms=1_764_000_000_000 + i
            )
            ours = self.message(i, 1_764_000_000_000 + i)
            headers = [h for h in headers if h[0] != DATA_TYPE_HEADER]
            if not ok or (value, headers or None) != ours[1:]:
                raise AssertionError(
                    f"{self.format.name}: record {i} differs from RecordEncoder's: "
                    f"{ours[1]!r} vs {value!r}"
                )

    @cached_property
    def columns(self) -> dict[str, Any]:
        """Each contract field's column of the data rows (float64, or object for text)."""
        return {
            name: (self.numeric if where.numeric else self.text)[:, where.index]
            for name, where in self.contract.columns.items()
        }

    def reference(self, entry: CatalogEntry) -> Reference:
        """What an ONNX model scores for each data row, by onnxruntime alone: one tensor of
        the catalog's `input_features`, or one input per contract field of its name."""
        session = ort.InferenceSession(str(entry.path()), providers=["CPUExecutionProvider"])
        inputs = session.get_inputs()
        feed: dict[str, np.ndarray] = {}
        if len(inputs) == 1 and entry.input_features:
            matrix = np.column_stack([self.columns[f] for f in entry.input_features])
            feed[inputs[0].name] = matrix.astype(_ONNX_TYPES.get(inputs[0].type, object))
        else:
            for model_input in inputs:
                column = self.columns[model_input.name]
                dtype = _ONNX_TYPES.get(model_input.type, object)
                feed[model_input.name] = column.astype(dtype).reshape(-1, 1)
        outputs = session.run(None, feed)
        if entry.task == "regression":
            return Reference(values=np.asarray(outputs[0], dtype=np.float64).reshape(-1))
        return Reference(labels=[str(x) for x in np.asarray(outputs[0]).reshape(-1).tolist()])


_ONNX_TYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(string)": object,
}
