"""Record decoding: encodings, missing vs invalid values, dead letters."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest

from dataflows.records import (
    WINE_FEATURES,
    Headers,
    RecordError,
    SourceBatch,
    canonical_name,
    decode_batch,
    parse_csv_line,
    record_field_for,
    record_to_json,
    wine_record,
)

ROW1 = "7.4;0.7;0;1.9;0.076;11;34;0.9978;3.51;0.56;9.4;5"


def one(value: bytes, content_type: str | None = None) -> SourceBatch:
    headers = [("content-type", content_type.encode())] if content_type else []
    return SourceBatch("records", 3, [42], [b"k"], [value], [headers])


def test_csv_line_parses_with_empty_fields_as_absent() -> None:
    row = parse_csv_line(ROW1)
    assert row["fixed_acidity"] == 7.4 and row["quality"] == 5.0
    empty = parse_csv_line("7.4;;0;1.9;0.076;11;34;0.9978;3.51;0.56;9.4;")
    assert empty["volatile_acidity"] is None and empty["quality"] is None
    with pytest.raises(RecordError, match="expected 12"):
        parse_csv_line("7.4;0.7")
    with pytest.raises(RecordError) as err:
        parse_csv_line(ROW1.replace("9.4", "nine"))
    assert err.value.reason == "non_numeric"
    with pytest.raises(RecordError) as err:
        parse_csv_line(ROW1.replace("9.4", "inf"))
    assert err.value.reason == "non_finite"


@pytest.mark.parametrize("encoding", ["protobuf", "json", "csv"])
def test_every_encoding_decodes_to_the_same_columns(encoding: str) -> None:
    msg = wine_record(parse_csv_line(ROW1), record_id="r1", event_time_ms=123)
    value, content_type = {
        "protobuf": (msg.SerializeToString(), None),
        "json": (record_to_json(msg), "application/json"),
        "csv": (ROW1.encode(), "text/csv"),
    }[encoding]
    (run,), dead = decode_batch(one(value, content_type))
    assert dead == []
    assert run.data_type == "wine" and run.partition == 3 and list(run.offsets) == [42]
    np.testing.assert_array_equal(run.features[0], [parse_csv_line(ROW1)[f] for f in WINE_FEATURES])
    assert run.labels[0] == 5.0
    if encoding != "csv":
        assert run.record_ids == ["r1"] and run.event_time_ms[0] == 123
    else:
        assert run.record_ids == ["records/3/42"]


def test_absent_feature_is_nan_and_label_optional() -> None:
    values = parse_csv_line(ROW1)
    values["alcohol"] = None
    values["quality"] = None
    (run,), _ = decode_batch(one(wine_record(values).SerializeToString()))
    assert math.isnan(run.features[0, WINE_FEATURES.index("alcohol")])
    assert math.isnan(run.labels[0])
    # A present 0.0 is a value, not an absence (protobuf reads both as 0.0).
    assert run.features[0, WINE_FEATURES.index("citric_acid")] == 0.0


def test_explicit_nan_in_protobuf_is_not_finite() -> None:
    record = wine_record(parse_csv_line(ROW1))
    record.ph = math.nan
    runs, (dead,) = decode_batch(one(record.SerializeToString()))
    assert runs == [] and dead.reason == "non_finite" and dead.message.startswith("ph:")


def test_good_and_bad_records_of_a_batch_keep_their_own_values() -> None:
    good = parse_csv_line(ROW1)
    values = [
        orjson.dumps({**good, "record_id": "a", "alcohol": "9.5"}),  # numeric string: fine
        b"not json",
        orjson.dumps({**good, "record_id": "c", "quality": None}),
    ]
    headers = [[("Content-Type", b"application/json; charset=utf-8")]] * 3
    batch = SourceBatch("records", 0, [0, 1, 2], [None] * 3, values, headers)
    (run,), (dead,) = decode_batch(batch)
    assert dead.offset == 1 and dead.reason == "undecodable"
    assert run.record_ids == ["a", "c"] and list(run.offsets) == [0, 2]
    assert run.features[0, WINE_FEATURES.index("alcohol")] == 9.5
    assert run.features[1, WINE_FEATURES.index("alcohol")] == good["alcohol"]
    assert run.labels[0] == 5.0 and math.isnan(run.labels[1])


def test_bad_messages_become_dead_letters_with_source_and_bytes() -> None:
    cases = {
        b"\x08\x96": (None, "undecodable"),  # truncated protobuf
        b"[1, 2]": ("application/json", "undecodable"),
        orjson.dumps({"alcohol": True}): ("application/json", "non_numeric"),
        b'{"alcohol": 1e400}': ("application/json", "undecodable"),
        b'{"alcohol": "-Infinity"}': ("application/json", "non_finite"),
        b"1;2;3": ("text/csv", "bad_csv"),
        b"x": ("application/avro", "undecodable"),
    }
    for value, (content_type, reason) in cases.items():
        runs, (dead,) = decode_batch(one(value, content_type))
        assert runs == []
        assert dead.reason == reason, value
        headers = dict(dead.to_message()[2])
        assert headers["waxserve.stage"] == b"decode"
        assert headers["waxserve.error.class"] == reason.encode()
        assert headers["waxserve.source.offset"] == b"42"
        assert dead.to_message()[:2] == (b"k", value)


def test_batch_splits_by_data_type_and_keeps_offset_order() -> None:
    values = [
        wine_record(parse_csv_line(ROW1), data_type=dt).SerializeToString()
        for dt in ["wine", "other", "wine", "other", "wine"]
    ]
    batch = SourceBatch("records", 0, [10, 11, 12, 13, 14], [None] * 5, values, [[]] * 5)
    runs, dead = decode_batch(batch)
    assert dead == []
    assert {r.data_type: list(r.offsets) for r in runs} == {"wine": [10, 12, 14], "other": [11, 13]}


def test_pmml_field_names_map_to_record_fields() -> None:
    assert canonical_name("fixed acidity") == "fixed_acidity"
    assert record_field_for("pH") == "ph"
    assert record_field_for("total sulfur dioxide") == "total_sulfur_dioxide"
    assert record_field_for("colour") is None


def test_json_and_protobuf_batches_decode_alike() -> None:
    lines = [ROW1, "7.8;0.88;0;2.6;0.098;25;67;0.9968;3.2;0.68;9.8;5"] * 25
    records = [
        wine_record(parse_csv_line(line), record_id=f"r{i}" if i % 3 else "", event_time_ms=i)
        for i, line in enumerate(lines)
    ]
    offsets = list(range(100, 150))
    as_protobuf = SourceBatch(
        "records", 1, offsets, [None] * 50, [r.SerializeToString() for r in records], [[]] * 50
    )
    as_json = SourceBatch(
        "records",
        1,
        offsets,
        [None] * 50,
        [record_to_json(r) for r in records],
        [[("content-type", b"application/json")]] * 50,
    )
    (a,), _ = decode_batch(as_protobuf)
    (b,), _ = decode_batch(as_json)
    assert a.record_ids == b.record_ids and a.record_ids[0] == "records/1/100"
    assert np.array_equal(a.features, b.features) and np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.event_time_ms, b.event_time_ms) and a.data_type == b.data_type


def test_json_record_struct_has_every_column() -> None:
    from dataflows.records import CSV_COLUMNS, _JsonRecord

    assert _JsonRecord.__struct_fields__ == (
        "record_id",
        "data_type",
        "event_time_ms",
        *CSV_COLUMNS,
    )


def _assert_agrees_with_alone(
    good: bytes, odd: bytes, headers: Headers, reason: str | None
) -> None:
    """A batch good, odd, good decodes its odd record as that record decodes alone."""
    batch = SourceBatch("records", 0, [0, 1, 2], [None] * 3, [good, odd, good], [headers] * 3)
    runs, dead = decode_batch(batch)
    alone_runs, alone_dead = decode_batch(SourceBatch("records", 0, [1], [None], [odd], [headers]))
    assert [d.reason for d in dead] == ([reason] if reason else [])
    assert [d.reason for d in alone_dead] == [d.reason for d in dead]
    (run,) = runs
    assert list(run.offsets) == ([0, 2] if reason else [0, 1, 2])
    if not reason:
        (alone,) = alone_runs
        np.testing.assert_array_equal(run.features[1], alone.features[0])
        np.testing.assert_array_equal(run.labels[1:2], alone.labels)
        assert run.record_ids[1] == alone.record_ids[0]
        assert run.data_type == alone.data_type == "wine"
        assert run.event_time_ms[1] == alone.event_time_ms[0]


GOOD_JSON = orjson.dumps({"record_id": "g", "event_time_ms": 7, **parse_csv_line(ROW1)})


@pytest.mark.parametrize(
    ("field", "raw", "reason"),
    [
        ("alcohol", b'"9.4"', None),  # a numeric string is a number
        ("alcohol", b'""', None),  # an empty string is absent
        ("alcohol", b"null", None),
        ("alcohol", b"true", "non_numeric"),
        ("alcohol", b'"nine"', "non_numeric"),
        ("alcohol", b"[9.4]", "non_numeric"),
        ("record_id", b"12", None),  # ids are strings
        ("event_time_ms", b"1.5", "undecodable"),
        ("event_time_ms", str(2**64).encode(), "undecodable"),
        ("fixed_acidity", b"1" + b"0" * 400, "undecodable"),  # not a finite double
    ],
)
def test_a_json_batch_decodes_as_each_of_its_records_would_alone(
    field: str, raw: bytes, reason: str | None
) -> None:
    """The all-JSON fast path and the per-message path agree, whichever record is odd."""
    doc = orjson.loads(GOOD_JSON)
    odd = GOOD_JSON.replace(
        f'"{field}":'.encode() + orjson.dumps(doc[field]), f'"{field}":'.encode() + raw
    )
    assert odd != GOOD_JSON
    _assert_agrees_with_alone(GOOD_JSON, odd, [("content-type", b"application/json")], reason)


def _protobuf_variants() -> list[tuple[str, bytes, str | None]]:
    good = parse_csv_line(ROW1)
    record = wine_record(good, record_id="p", event_time_ms=9)
    variants: list[tuple[str, bytes, str | None]] = [
        (
            "zeros are values",
            wine_record({**good, "alcohol": 0.0, "ph": -0.0}).SerializeToString(),
            None,
        ),
        (
            "absent fields",
            wine_record({**good, "alcohol": None, "quality": None}).SerializeToString(),
            None,
        ),
        ("no id, no data type", wine_record(good).SerializeToString(), None),
        (
            "explicit NaN",
            wine_record({**good, "alcohol": math.nan}).SerializeToString(),
            "non_finite",
        ),
        ("infinity", wine_record({**good, "ph": -math.inf}).SerializeToString(), "non_finite"),
        ("bad bytes", b"\xff\xff\xff", "undecodable"),
        ("truncated", record.SerializeToString()[:-3], "undecodable"),
    ]
    return variants


@pytest.mark.parametrize(("name", "odd", "reason"), _protobuf_variants())
def test_a_protobuf_batch_decodes_as_each_of_its_records_would_alone(
    name: str, odd: bytes, reason: str | None
) -> None:
    """The all-protobuf fast path and the per-message path agree, whichever record is odd."""
    good = wine_record(parse_csv_line(ROW1), record_id="g", event_time_ms=7).SerializeToString()
    _assert_agrees_with_alone(good, odd, [], reason)


def test_the_protobuf_fast_path_keeps_zeros_and_marks_absent_fields() -> None:
    from dataflows.records import _parse_protobuf_batch

    good = parse_csv_line(ROW1)
    values = [
        wine_record({**good, "alcohol": 0.0}, record_id="a").SerializeToString(),
        wine_record({**good, "alcohol": None}, record_id="b").SerializeToString(),
    ]
    batch = SourceBatch("records", 0, [0, 1], [None] * 2, values, [[]] * 2)
    parsed = _parse_protobuf_batch(batch)
    assert parsed is not None  # the fast path took it
    (run,), dead = decode_batch(batch)
    alcohol = WINE_FEATURES.index("alcohol")
    assert dead == [] and run.features[0, alcohol] == 0.0 and math.isnan(run.features[1, alcohol])
    assert run.features[0, WINE_FEATURES.index("citric_acid")] == 0.0  # 0 in ROW1 itself
