"""Routing record batches by data type, and decoded runs as columns (dataflows/core/records.py)."""

from __future__ import annotations

import numpy as np
import pytest
from flowtools import WINE_CONTRACT, batch, parse_csv_line, wine_lines, wine_record

from dataflows.contracts.decode import ContractCodecs
from dataflows.core.records import DataTypeRouter, RawRun, record_columns

TOPIC = "records"


def test_the_data_type_comes_from_the_first_source_that_names_one() -> None:
    router = DataTypeRouter(["header", "key", "field", "topic"], topic_defaults={TOPIC: "wine"})
    values = [b'{"data_type": "beer"}', b"\x08\x01", b'{"x": 1}', b'{"data_type": "cider"}']
    b = batch(
        TOPIC,
        values,
        headers=[[("Data-Type", b"mead")], [], [], [("data-type", None)]],
    )
    b.keys = [b"ignored", b"perry", None, None]
    runs, dead = router.split(b)
    assert dead == []
    got = {run.data_type: run.offsets for run in runs}
    # header beats key; key beats field; field beats topic; a null header is no header.
    assert got == {"mead": [0], "perry": [1], "wine": [2], "cider": [3]}


def test_a_record_with_no_data_type_is_a_dead_letter() -> None:
    router = DataTypeRouter(["header", "field"])
    b = batch(TOPIC, [b"\x00\x01", b'{"data_type": null}', b"x" * 10], start=5)
    b.headers[2] = [("data-type", b"t" * 500)]
    runs, dead = router.split(b)
    assert runs == []
    assert [(d.offset, d.reason) for d in dead] == [
        (5, "no_data_type"),
        (6, "no_data_type"),
        (7, "no_data_type"),
    ]
    assert dead[0].value == b"\x00\x01"


def test_a_uniform_batch_is_one_run_without_copies() -> None:
    router = DataTypeRouter(["topic"], topic_defaults={TOPIC: "wine"})
    b = batch(TOPIC, [b"a", b"b"], partition=3, start=10)
    (run,), dead = router.split(b)
    assert dead == [] and run.values is b.values and run.offsets == [10, 11]
    assert run.partition == 3 and run.data_type == "wine"


def test_unknown_sources_are_refused() -> None:
    with pytest.raises(ValueError, match="header, key, field, topic"):
        DataTypeRouter(["headers"])


def _wine_run(values: list[bytes | None]) -> RawRun:
    n = len(values)
    return RawRun(TOPIC, 2, list(range(n)), [None] * n, values, [[] for _ in values], "wine")


def test_record_columns_pull_out_id_event_time_and_label() -> None:
    lines = wine_lines(0, 3)
    values: list[bytes | None] = [
        wine_record(parse_csv_line(lines[0]), record_id="a", event_time_ms=7),
        wine_record(parse_csv_line(lines[1])),  # no id, no time
        b"\xff\xff\xff",  # not a WineRecord
        wine_record({**parse_csv_line(lines[2]), "quality": None}, record_id="c"),
    ]
    run = _wine_run(values)
    decoded = ContractCodecs(WINE_CONTRACT).decode(run.values, run.headers)
    columns, dead = record_columns(run, WINE_CONTRACT, decoded)
    assert columns is not None
    assert [(d.offset, d.reason, d.data_type) for d in dead] == [(2, "undecodable", "wine")]
    assert columns.record_ids == ["a", f"{TOPIC}/2/1", "c"]
    assert columns.event_time_ms.tolist() == [7, 0, 0]
    assert columns.offsets.tolist() == [0, 1, 3]
    assert columns.labels[:2].tolist() == [5.0, 5.0] and np.isnan(columns.labels[2])
    alcohol = WINE_CONTRACT.columns["alcohol"].index
    assert columns.numeric[:, alcohol].tolist() == [9.4, 9.8, 9.8]
    assert columns.raw[2] is values[3]
    # take() keeps every column aligned.
    one = columns.take(np.array([False, False, True]))
    assert one.record_ids == ["c"] and one.offsets.tolist() == [3] and one.raw == [values[3]]


def test_a_run_that_decodes_to_nothing_gives_only_dead_letters() -> None:
    run = _wine_run([None, b"\xff"])
    decoded = ContractCodecs(WINE_CONTRACT).decode(run.values, run.headers)
    columns, dead = record_columns(run, WINE_CONTRACT, decoded)
    assert columns is None and [d.reason for d in dead] == ["undecodable", "undecodable"]
