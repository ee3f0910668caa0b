"""Data contracts end to end in-process: any encoding, any tabular model, two data types at
once, contract versions (bytewax.testing, 1 and 2 workers)."""

from __future__ import annotations

import csv
import dataclasses
import json
from datetime import timedelta
from typing import Any

import numpy as np
import onnxruntime
import pytest
from bytewax.testing import TestingSource
from flowtools import (
    CATALOG,
    RECORDS_TOPIC,
    WINE_CONTRACT,
    WINE_FEATURES,
    batch,
    control_batch,
    descriptor,
    parse_csv_line,
    run_flow,
    test_config,
    wine_lines,
)

from dataflows.contracts.codecs import codec_for
from dataflows.contracts.files import load_contract
from dataflows.contracts.schema import AvroOptions, Contract, Encoding, FieldType
from dataflows.core.descriptors import MODELS_DIR, catalog_contracts
from dataflows.core.records import Headers
from protos import waxserve_pb2 as pb

WORKERS = [1, 2]
PAUSE = TestingSource.PAUSE
PENGUINS = load_contract(catalog_contracts()["penguins"])
PENGUINS_TOPIC = "penguins"
PENGUINS_CSV = MODELS_DIR / "penguins" / "penguins.csv"


def penguin_rows() -> list[dict[str, Any]]:
    """penguins.csv as typed rows (absent cells left out), each with an id."""
    rows = []
    with PENGUINS_CSV.open() as f:
        for i, raw in enumerate(csv.DictReader(f)):
            row: dict[str, Any] = {"penguin_id": f"p{i}"}
            for name, cell in raw.items():
                if cell == "":
                    continue
                kind = PENGUINS.field_named(name).type
                row[name] = (
                    float(cell)
                    if kind is FieldType.FLOAT
                    else int(cell)
                    if kind is FieldType.INTEGER
                    else cell
                )
            rows.append(row)
    return rows


PENGUIN_ROWS = penguin_rows()
COMPLETE = [r for r in PENGUIN_ROWS if len(r) == 9]  # every field: id + 8 columns


def two_types_config(**changes: Any) -> Any:
    return test_config(records_topics=f"{RECORDS_TOPIC}=wine,{PENGUINS_TOPIC}=penguins", **changes)


def species_reference(rows: list[dict[str, Any]]) -> list[str]:
    """Species straight from onnxruntime, one input per column, to compare the flow with."""
    session = onnxruntime.InferenceSession(str(CATALOG["penguins-species-onnx"].path()))
    feed: dict[str, np.ndarray] = {}
    for model_input in session.get_inputs():
        values = [r[model_input.name] for r in rows]
        dtype = {"tensor(string)": object, "tensor(int64)": np.int64}.get(
            model_input.type, np.float32
        )
        feed[model_input.name] = np.array(values, dtype=dtype).reshape(-1, 1)
    return [str(x) for x in session.run(None, feed)[0]]


def wine_records(encoding: Encoding, contract: Contract, lines: list[str]) -> list[bytes]:
    rows = []
    for i, line in enumerate(lines):
        values = {k: v for k, v in parse_csv_line(line).items() if v is not None}
        rows.append({**values, "record_id": f"r{i}", "event_time_ms": 1})
    return codec_for(contract, encoding).encode(rows)


@pytest.mark.parametrize("workers", WORKERS)
def test_two_data_types_from_two_topics_in_two_encodings(workers: int) -> None:
    wine = wine_records(Encoding.PROTOBUF, WINE_CONTRACT, wine_lines(0, 100))
    penguins = codec_for(PENGUINS, Encoding.JSON).encode(PENGUIN_ROWS)
    control = [
        control_batch(
            WINE_CONTRACT.to_proto(),
            PENGUINS.to_proto(),
            descriptor("wine-lr"),
            descriptor("penguins-species-onnx"),
        )
    ]
    records = [
        PAUSE(timedelta(seconds=0.5)),
        batch(RECORDS_TOPIC, wine[:50]),
        batch(PENGUINS_TOPIC, penguins, partition=1),  # no header: the topic's data type
        batch(RECORDS_TOPIC, wine[50:], start=50),
    ]
    out = run_flow(two_types_config(), control, records, workers=workers)
    scored = out.scored()
    by_type = {t: [s for s in scored if s.data_type == t] for t in ("wine", "penguins")}
    assert len(by_type["wine"]) == 100
    # Every complete penguin is scored, by the model's own answer; the others are dead
    # letters with a reason: no sex (the model needs it) or no measurements (required).
    species = {s.record_id: s for s in by_type["penguins"]}
    assert set(species) == {r["penguin_id"] for r in COMPLETE}
    expected = species_reference(COMPLETE)
    assert [species[r["penguin_id"]].label for r in COMPLETE] == expected
    assert all(abs(sum(s.probabilities.values()) - 1) < 1e-5 for s in species.values())
    dead = out.dead_letters()
    reasons = sorted((h["waxserve.data_type"], h["waxserve.error.class"]) for h, _ in dead)
    incomplete = len(PENGUIN_ROWS) - len(COMPLETE)
    no_measurements = sum(1 for r in PENGUIN_ROWS if "bill_length_mm" not in r)
    assert len(dead) == incomplete
    assert reasons.count(("penguins", "missing_field")) == no_measurements
    assert reasons.count(("penguins", "missing_feature")) == incomplete - no_measurements
    # Online accuracy against the contract's label field (a string), per data type.
    (penguin_stats,) = [s for s in out.stats() if s.data_type == "penguins"]
    right = sum(species[r["penguin_id"]].label == r["species"] for r in COMPLETE)
    assert penguin_stats.window_labelled_count == len(COMPLETE)
    assert penguin_stats.window_accuracy == pytest.approx(right / len(COMPLETE))
    assert not penguin_stats.HasField("window_rmse")
    # Drift follows the contract: categorical features count their categories.
    (penguin_drift,) = [d for d in out.drift() if d.data_type == "penguins"]
    island = next(f for f in penguin_drift.features if f.feature == "island")
    assert island.categorical and sum(island.bin_counts) == len(COMPLETE)
    assert island.unseen_count == 0 and penguin_drift.record_count == len(COMPLETE)
    kinds = sorted((e.data_type, e.kind) for e in out.events())
    assert kinds == [
        ("penguins", "contract_installed"),
        ("penguins", "installed"),
        ("wine", "contract_installed"),
        ("wine", "installed"),
    ]


def test_pmml_with_a_categorical_field_serves_the_same_species() -> None:
    penguins = codec_for(PENGUINS, Encoding.JSON).encode(COMPLETE)
    out = run_flow(
        two_types_config(),
        [control_batch(PENGUINS.to_proto(), descriptor("penguins-species-pmml"))],
        [PAUSE(timedelta(seconds=0.5)), batch(PENGUINS_TOPIC, penguins)],
    )
    species = {s.record_id: s.label for s in out.scored()}
    assert [species[r["penguin_id"]] for r in COMPLETE] == species_reference(COMPLETE)
    assert out.dead_letters() == []


AVRO_SCHEMA = {
    "type": "record",
    "name": "Wine",
    "fields": [
        {"name": "record_id", "type": "string"},
        {"name": "event_time_ms", "type": "long"},
        *({"name": f, "type": ["null", "double"], "default": None} for f in WINE_FEATURES),
        {"name": "quality", "type": ["null", "double"], "default": None},
    ],
}
WINE_AVRO = dataclasses.replace(
    WINE_CONTRACT,
    encoding=Encoding.AVRO,
    avro=AvroOptions(json.dumps(AVRO_SCHEMA), confluent_framing=True, schema_id=7),
)


@pytest.mark.parametrize(
    "encoding", [Encoding.PROTOBUF, Encoding.JSON, Encoding.CSV, Encoding.AVRO, Encoding.RECORD]
)
def test_every_encoding_scores_the_same_and_dead_letters_its_garbage(
    encoding: Encoding,
) -> None:
    contract = WINE_AVRO if encoding is Encoding.AVRO else WINE_CONTRACT
    lines = wine_lines(0, 40)
    values = wine_records(encoding, contract, lines)
    if encoding is Encoding.CSV:  # CSV carries no id or time: the contract's columns only
        values = [line.encode() for line in lines]
    content_type = {
        Encoding.JSON: b"application/json",
        Encoding.CSV: b"text/csv",
        Encoding.RECORD: b"application/vnd.waxserve.record+protobuf",
    }.get(encoding)
    headers: list[Headers] = [[("content-type", content_type)]] if content_type else [[]]
    garbage: list[bytes | None] = [b"\x00\x01garbage\xff", b"", None]
    out = run_flow(
        test_config(),
        [control_batch(contract.to_proto(), descriptor("wine-lr"))],
        [
            PAUSE(timedelta(seconds=0.5)),
            batch(RECORDS_TOPIC, values, headers=headers * len(values)),
            batch(RECORDS_TOPIC, garbage, start=40, headers=headers * len(garbage)),
        ],
    )
    scored = sorted(out.scored(), key=lambda s: s.source_offset)
    assert len(scored) == 40
    session = onnxruntime.InferenceSession(str(CATALOG["wine-lr"].path()))
    x = np.array(
        [[parse_csv_line(line)[f] for f in WINE_FEATURES] for line in lines], dtype=np.float32
    )
    expected = session.run(None, {"input": x})[0].ravel()
    np.testing.assert_allclose([s.value for s in scored], expected, rtol=1e-6)
    dead = {int(h["waxserve.source.offset"]): h for h, _ in out.dead_letters()}
    assert 40 in dead and 42 in dead  # garbage, a tombstone
    assert dead[42]["waxserve.error.class"] == "undecodable"
    assert all(h["waxserve.stage"] in ("decode", "score") for h in dead.values())
    assert {h["waxserve.data_type"] for h in dead.values()} == {"wine"}


def test_wrong_types_out_of_range_and_unknown_categories_are_dead_letters() -> None:
    good = dict(COMPLETE[0])
    cases = {
        "wrong_type": {**good, "bill_length_mm": "long"},
        "out_of_range": {**good, "year": 2**60},
        "unknown_category": {**good, "island": "Atlantis"},
        "missing_field": {k: v for k, v in good.items() if k != "island"},
    }
    values = [json.dumps(v).encode() for v in cases.values()]
    out = run_flow(
        two_types_config(),
        [control_batch(PENGUINS.to_proto(), descriptor("penguins-species-onnx"))],
        [
            PAUSE(timedelta(seconds=0.5)),
            batch(PENGUINS_TOPIC, [*values, json.dumps(good).encode()]),
        ],
    )
    assert len(out.scored()) == 1
    reasons = [h["waxserve.error.class"] for h, _ in out.dead_letters()]
    assert sorted(reasons) == sorted(cases)
    messages = {
        h["waxserve.error.class"]: h["waxserve.error.message"] for h, _ in out.dead_letters()
    }
    assert "Atlantis" in messages["unknown_category"]
    assert "bill_length_mm" in messages["wrong_type"]


def test_a_category_the_model_does_not_know_is_a_dead_letter_not_a_failed_batch() -> None:
    # A contract that allows any island: the model's one-hot encoder knows three.
    open_islands = dataclasses.replace(
        PENGUINS,
        fields=tuple(
            dataclasses.replace(f, categories=()) if f.name == "island" else f
            for f in PENGUINS.fields
        ),
    )
    rows = [*COMPLETE[:5], {**COMPLETE[5], "island": "Atlantis"}]
    out = run_flow(
        two_types_config(),
        [control_batch(open_islands.to_proto(), descriptor("penguins-species-onnx"))],
        [
            PAUSE(timedelta(seconds=0.5)),
            batch(PENGUINS_TOPIC, codec_for(PENGUINS, Encoding.JSON).encode(rows)),
        ],
    )
    assert len(out.scored()) == 5
    ((headers, _),) = out.dead_letters()
    assert (headers["waxserve.stage"], headers["waxserve.error.class"]) == (
        "score",
        "unknown_category",
    )
    assert "Atlantis" in headers["waxserve.error.message"]


def _contract(**changes: Any) -> pb.DataContract:
    message = WINE_CONTRACT.to_proto()
    for key, value in changes.items():
        setattr(message, key, value)
    return message


def test_contract_versions_models_and_their_rejections() -> None:
    v2 = _contract(version=2)
    # A new optional field (the wine message has it, unused so far): compatible.
    v2.fields.add(name="data_type", type=pb.FIELD_TYPE_STRING)
    retyped = _contract(version=3)
    retyped.fields[2].type = pb.FIELD_TYPE_STRING  # fixed_acidity: incompatible
    dropped = _contract(version=3)
    del dropped.fields[12]  # alcohol, which wine-lr reads
    dropped.csv.columns.remove("alcohol")
    wrong_model = descriptor("penguins-species-onnx")
    wrong_model.data_type = "wine"  # its inputs are no wine fields
    from_the_future = descriptor("wine-gbt", contract_version=9)
    control = [
        control_batch(descriptor("wine-lr")),  # before any contract
        control_batch(WINE_CONTRACT.to_proto(), start=1),
        control_batch(descriptor("wine-lr"), start=2),
        PAUSE(timedelta(seconds=0.3)),
        control_batch(v2, retyped, dropped, wrong_model, from_the_future, start=3),
        PAUSE(timedelta(seconds=0.3)),
        control_batch(_contract(version=2), start=8),  # not above the installed v2
    ]
    lines = wine_lines(0, 20)
    out = run_flow(
        test_config(),
        control,
        [PAUSE(timedelta(seconds=1.5)), batch(RECORDS_TOPIC, wine_records(
            Encoding.PROTOBUF, WINE_CONTRACT, lines
        ))],
    )  # fmt: skip
    assert {(s.model_name, s.data_type) for s in out.scored()} == {("wine-lr", "wine")}
    assert len(out.scored()) == 20
    events = [(e.kind, e.reason, e.contract_version, e.source_offset) for e in out.events()]
    assert events == [
        # A model before any contract waits for one (a compacted control topic can put a
        # model before the newer contract it needs), and installs with it.
        ("awaiting_contract", "", 0, 0),
        ("contract_installed", "", 1, 1),
        ("installed", "", 1, 0),
        ("installed", "", 1, 2),
        ("contract_installed", "", 2, 3),
        ("contract_rejected", "incompatible_contract", 3, 4),
        ("contract_rejected", "incompatible_contract", 3, 5),
        ("rejected", "bad_inputs", 0, 6),
        ("awaiting_contract", "", 0, 7),  # trained on a contract v9 nobody published yet
        ("contract_rejected", "incompatible_contract", 2, 8),
    ]
    # (offset + 1) * 16 + rank: the contract at offset 1 also installs the waiting model.
    assert [e.sequence for e in out.events()] == [16, 32, 33, 48, 64, 80, 96, 112, 128, 144]
    assert "v9" in out.events()[8].message
    messages = {
        int(h["waxserve.source.offset"]): h["waxserve.error.message"] for h, _ in out.dead_letters()
    }
    assert sorted(messages) == [4, 5, 6, 8]
    assert "fixed_acidity" in messages[4] and "changes type" in messages[4]
    assert "alcohol" in messages[5]
    assert "island" in messages[6] or "sex" in messages[6]
    assert "not above" in messages[8]
