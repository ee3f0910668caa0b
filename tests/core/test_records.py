"""Routing record batches by data type, and decoded runs as columns (dataflows/core/records.py)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from flowtools import WINE_CONTRACT, batch, parse_csv_line, wine_lines, wine_record

from dataflows.contracts.decode import ContractCodecs
from dataflows.core.records import (
    MAX_ID_LENGTH,
    MIN_MESSAGE_BYTES,
    RECORD_OVERHEAD_BYTES,
    DataTypeRouter,
    DeadLetter,
    Headers,
    RawRun,
    record_columns,
    valid_data_type,
)

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
    assert one.record_ids == ["c"] and one.offsets.tolist() == [3] and list(one.raw) == [values[3]]
    # A take of a take, after the ids' bytes were encoded: the dead letter of the one
    # record left still carries its own key, value and headers, and its encoded id.
    assert columns.encoded_ids().items == [b"a", f"{TOPIC}/2/1".encode(), b"c"]
    last_two = columns.take(np.array([1, 2]))
    last = last_two.take(np.array([False, True]))
    assert last.encoded_ids().items == [b"c"] and last.encoded_ids().joined == b"c"
    letter = last.dead_letter(0, "score", "score_failed", "x")
    assert (letter.offset, letter.value, letter.headers) == (3, values[3], [])
    assert last_two.raw[:] == [values[1], values[3]] and len(last.raw) == 1


def test_a_run_that_decodes_to_nothing_gives_only_dead_letters() -> None:
    run = _wine_run([None, b"\xff"])
    decoded = ContractCodecs(WINE_CONTRACT).decode(run.values, run.headers)
    columns, dead = record_columns(run, WINE_CONTRACT, decoded)
    assert columns is None and [d.reason for d in dead] == ["undecodable", "undecodable"]


# --- dead letters as messages: never larger than the output limit ------------------------

LIMIT = 20_000


def _dead(
    value: bytes | None, *, key: bytes | None = None, headers: Headers | None = None
) -> DeadLetter:
    return DeadLetter(
        stage="decode",
        reason="undecodable",
        message="not a record " * 1000,  # a long error: cut in its header
        topic=TOPIC,
        partition=1,
        offset=42,
        key=key,
        value=value,
        headers=list(headers or []),
        data_type="wine",
        max_message_bytes=LIMIT,
    )


def _size(message: tuple[bytes | None, bytes | None, Headers | None]) -> int:
    key, value, headers = message
    size = len(key or b"") + len(value or b"")
    return size + sum(len(n.encode()) + len(v or b"") for n, v in headers or [])


def test_a_dead_letter_that_fits_is_kept_whole_with_its_headers() -> None:
    key, value, headers = _dead(b"x" * 1000, key=b"k", headers=[("trace", b"t")]).to_message()
    assert key == b"k" and value == b"x" * 1000
    named = dict(headers or [])
    assert named["waxserve.error.class"] == b"undecodable" and named["trace"] == b"t"
    assert "waxserve.truncated" not in named
    assert len(named["waxserve.error.message"] or b"") <= 2048  # the long error, cut


@pytest.mark.parametrize("size", [LIMIT - 3000, LIMIT, LIMIT + 1, 10 * LIMIT, 2_000_000])
def test_a_value_past_the_limit_keeps_its_head_and_says_how_it_was(size: int) -> None:
    value = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    message = _dead(value).to_message()
    assert _size(message) + RECORD_OVERHEAD_BYTES <= LIMIT
    _, kept, headers = message
    named = dict(headers or [])
    if kept == value:  # small enough after all
        assert "waxserve.truncated" not in named
        return
    assert kept is not None and value.startswith(kept) and len(kept) > LIMIT // 2
    assert named["waxserve.truncated"] == b"true"
    assert named["waxserve.original.size"] == str(size).encode()
    assert named["waxserve.original.sha256"] == hashlib.sha256(value).hexdigest().encode()


def test_a_huge_key_or_huge_headers_are_cut_too() -> None:
    key = b"k" * (5 * LIMIT)
    message = _dead(b"v", key=key, headers=[("big", b"h" * LIMIT), ("small", b"s")]).to_message()
    assert _size(message) + RECORD_OVERHEAD_BYTES <= LIMIT
    kept_key, value, headers = message
    named = dict(headers or [])
    assert value == b"v" and kept_key is not None and key.startswith(kept_key)
    assert named["waxserve.original.key.size"] == str(len(key)).encode()
    assert named["waxserve.original.key.sha256"] == hashlib.sha256(key).hexdigest().encode()
    assert named["small"] == b"s" and "big" not in named
    assert named["waxserve.headers.dropped"] == b"1"
    # The configured limit, or one given by the caller.
    assert _size(_dead(b"x" * 50_000).to_message(max_bytes=MIN_MESSAGE_BYTES)) <= MIN_MESSAGE_BYTES


def test_odd_headers_tombstones_and_names_never_raise() -> None:
    dead = _dead(None, headers=[("content-type", None), ("\udcff", b"\xff"), ("data-type", b"")])
    dead.data_type = "t\udcfft"  # a lone surrogate, as from a careless decode
    key, value, headers = dead.to_message()
    assert value is None and key is None
    names = [name for name, _ in headers or []]
    assert all(name.encode() for name in names)  # every name encodes as UTF-8
    assert ("content-type", None) in (headers or [])
    assert dict(headers or [])["waxserve.data_type"] == b"t?t"


def test_a_tombstone_with_a_huge_key_stays_a_tombstone() -> None:
    _, value, headers = _dead(None, key=b"k" * (2 * LIMIT)).to_message()
    assert value is None and dict(headers or [])["waxserve.original.size"] == b"0"


def test_a_record_with_a_longer_id_than_the_outputs_can_carry_is_a_dead_letter() -> None:
    lines = wine_lines(0, 2)
    values: list[bytes | None] = [
        wine_record(parse_csv_line(lines[0]), record_id="i" * (MAX_ID_LENGTH + 1)),
        wine_record(parse_csv_line(lines[1]), record_id="i" * MAX_ID_LENGTH),
    ]
    run = _wine_run(values)
    decoded = ContractCodecs(WINE_CONTRACT).decode(run.values, run.headers)
    columns, dead = record_columns(run, WINE_CONTRACT, decoded)
    assert columns is not None and columns.offsets.tolist() == [1]
    assert [(d.offset, d.reason) for d in dead] == [(0, "out_of_range")]
    assert f"more than {MAX_ID_LENGTH}" in dead[0].message


def test_a_held_run_costs_its_keys_values_and_headers() -> None:
    run = RawRun(TOPIC, 0, [0, 1], [b"kk", None], [b"vvv", None], [[("h", b"12")], []], "t")
    assert run.size_bytes == 2 + 3 + (1 + 2 + 10)
    assert valid_data_type("wine") and not valid_data_type("") and not valid_data_type("x\ud800")
