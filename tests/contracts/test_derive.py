"""Deriving contracts from real sample files (CSV, JSON lines, Parquet written here) and from
real models (the shipped wine models, an skl2onnx pipeline trained here, hand-built graphs
and PMML documents). Every derived contract must install (`Contract.from_proto`), and the
sample's own rows must decode under it with the contract's codec."""

from __future__ import annotations

import csv
import io
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from dataflows.contracts.derive import (
    Roles,
    contract_version_bump,
    derive_from_model,
    derive_from_sample,
)
from dataflows.contracts.schema import Contract, FieldType
from protos import waxserve_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
WINE_CSV = REPO / "models" / "data" / "winequality_red.csv"
WINE_COLUMNS = (
    "fixed_acidity",
    "volatile_acidity",
    "citric_acid",
    "residual_sugar",
    "chlorides",
    "free_sulfur_dioxide",
    "total_sulfur_dioxide",
    "density",
    "ph",
    "sulphates",
    "alcohol",
    "quality",
)
F, N, B, S = FieldType.FLOAT, FieldType.INTEGER, FieldType.BOOLEAN, FieldType.STRING


def installed(msg: pb.DataContract) -> Contract:
    """The derived message as an installed contract: it must pass from_proto, and survive
    the trip back to its message unchanged."""
    contract = Contract.from_proto(msg)
    assert contract.to_proto() == Contract.from_proto(contract.to_proto()).to_proto()
    assert Contract.from_proto(contract.to_proto()) == contract
    return contract


def types(contract: Contract) -> dict[str, FieldType]:
    return {f.name: f.type for f in contract.fields}


def categories(contract: Contract) -> dict[str, tuple[str, ...]]:
    return {f.name: f.categories for f in contract.fields if f.categories}


def assert_decodes(msg: pb.DataContract, messages: Sequence[bytes]) -> None:
    """The contract's codec decodes every message with no error (skipped while the codecs
    are not importable)."""
    try:
        from dataflows.contracts.decode import ContractCodecs
    except ImportError:  # pragma: no cover - the codecs are written in parallel
        return
    decoded = ContractCodecs(Contract.from_proto(msg)).decode(
        list(messages), [[] for _ in messages]
    )
    assert decoded.errors == {}
    assert len(decoded) == len(messages)


def csv_messages(path: Path, contract: Contract) -> list[bytes]:
    """The sample's data rows, one CSV message each (the header line dropped)."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = [r for r in csv.reader(f, delimiter=contract.csv.delimiter) if r]
    if contract.csv.header:
        rows = rows[1:]
    out = []
    for row in rows:
        buffer = io.StringIO()
        csv.writer(buffer, delimiter=contract.csv.delimiter, lineterminator="").writerow(row)
        out.append(buffer.getvalue().encode())
    return out


def jsonl_messages(path: Path) -> list[bytes]:
    return [line.encode() for line in path.read_text().splitlines() if line.strip()]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- CSV ---------------------------------------------------------------------------------


def test_the_wine_csv_has_no_header_so_it_needs_column_names() -> None:
    with pytest.raises(ValueError, match=r"red\.csv: no header line found .*its 12 columns"):
        derive_from_sample(WINE_CSV, data_type="wine")


def test_the_wine_csv_with_column_names() -> None:
    msg = derive_from_sample(
        WINE_CSV, data_type="wine", columns=WINE_COLUMNS, roles=Roles(label_field="quality")
    )
    contract = installed(msg)
    assert (contract.data_type, contract.version) == ("wine", 1)
    assert contract.encoding == "csv"
    assert contract.csv.delimiter == ";"  # sniffed
    assert contract.csv.header is False
    assert contract.csv.columns == WINE_COLUMNS
    assert tuple(types(contract)) == WINE_COLUMNS  # the file's column order
    assert types(contract) == {**dict.fromkeys(WINE_COLUMNS[:-1], F), "quality": N}
    assert (contract.id_field, contract.event_time_field, contract.label_field) == (
        "",
        "",
        "quality",
    )
    assert contract.description == "derived from winequality_red.csv, 1599 rows"
    assert_decodes(msg, csv_messages(WINE_CSV, contract))


def test_wine_column_names_must_match_the_width() -> None:
    with pytest.raises(ValueError, match=r"line 1 has 12 ';'-separated columns but 11"):
        derive_from_sample(WINE_CSV, data_type="wine", columns=WINE_COLUMNS[:-1])


PENGUINS = (
    "record_id,event_time_ms,species,island,bill_length_mm,body_mass_g,is_male,note,id,"
    "empty,ratio\n"
    'p1,1700000000000,Adelie,Torgersen,39.1,3750,TRUE,"said ""hi"", left",7,,1e3\n'
    "p2,1700000001000,Gentoo,Biscoe,,5000,false,plain,8,,-2.5E-3\n"
    "\n"
    'p3,1700000002000,Adelie,"Dream",40.3,,true,"a,b",9,,.5\n'
    "p4,1700000003000,Gentoo,Biscoe,41,3900,False,plain,10,,+7\n"
)


def test_a_csv_with_header_quotes_empty_cells_booleans_and_categories(tmp_path) -> None:
    path = write(tmp_path, "penguins.csv", PENGUINS)
    msg = derive_from_sample(
        path,
        data_type="penguins",
        roles=Roles(
            id_field="record_id",
            event_time_field="event_time_ms",
            label_field="species",
            required=("is_male", "island"),
        ),
    )
    contract = installed(msg)
    assert types(contract) == {
        "record_id": S,
        "event_time_ms": N,
        "species": S,
        "island": S,
        "bill_length_mm": F,  # 41 among decimals: a number all the same
        "body_mass_g": N,  # an empty cell does not vote
        "is_male": B,  # any case
        "note": S,
        "id": N,
        "empty": S,  # no value at all: text for want of evidence
        "ratio": F,  # scientific, signed, leading dot
    }
    assert categories(contract) == {
        # The id is never categorical however few its values.
        "species": ("Adelie", "Gentoo"),
        "island": ("Biscoe", "Dream", "Torgersen"),
        "note": ("a,b", "plain", 'said "hi", left'),  # the quotes are CSV's, not the value's
    }
    assert (contract.id_field, contract.event_time_field, contract.label_field) == (
        "record_id",
        "event_time_ms",
        "species",
    )
    assert [f.name for f in contract.fields if f.required] == ["island", "is_male"]
    assert contract.encoding == "csv"
    assert contract.csv.delimiter == ","
    assert contract.csv.header is True
    assert contract.csv.columns == tuple(types(contract))
    assert contract.description == "derived from penguins.csv, 4 rows"
    assert_decodes(msg, csv_messages(path, contract))


def test_a_column_called_id_is_not_made_the_id(tmp_path) -> None:
    contract = installed(
        derive_from_sample(write(tmp_path, "p.csv", PENGUINS), data_type="penguins")
    )
    assert (contract.id_field, contract.event_time_field, contract.label_field) == ("", "", "")
    assert not any(f.required for f in contract.fields)
    assert_decodes(contract.to_proto(), csv_messages(tmp_path / "p.csv", contract))


@pytest.mark.parametrize(
    ("cells", "expected"),
    [
        (["1", "-2", "+3", "007"], N),
        (["0", "1", "1"], N),  # 0/1 are numbers, not booleans
        (["9007199254740992", "-9007199254740992"], N),  # ±2**53: exact in a float64
        (["9007199254740993", "1"], F),  # beyond: only a float column can take it
        (["1", "2.5"], F),
        (["1e5", "-1.5E-3", ".5", "5."], F),
        (["true", "FALSE", "True"], B),
        (["true", "1"], S),
        (["nan", "1.0"], S),  # Python's float() takes these; the codec does not
        (["inf", "1"], S),
        (["1_000", "2"], S),
        (["\u0663", "1"], S),  # ARABIC-INDIC DIGIT THREE
        ([" 7", "8"], S),  # taken as it is, as the CSV codec reads it
        (["", ""], S),
    ],
)
def test_csv_cell_types(tmp_path, cells, expected) -> None:
    text = "name,value\n" + "".join(f"row{i},{c}\n" for i, c in enumerate(cells))
    path = write(tmp_path, "cells.csv", text)
    msg = derive_from_sample(path, data_type="t", header=True)
    contract = installed(msg)
    assert contract.field_named("value").type is expected
    assert_decodes(msg, csv_messages(path, contract))


def test_a_number_that_overflows_a_float64_is_refused(tmp_path) -> None:
    path = write(tmp_path, "big.csv", "a,b\n1,1.5\n2,1e999\n")
    with pytest.raises(ValueError, match=r"big\.csv: line 3, column 'b': '1e999' overflows"):
        derive_from_sample(path, data_type="t")


def test_max_categories_is_inclusive(tmp_path) -> None:
    path = write(tmp_path, "c.csv", "k,x\n" + "".join(f"v{i % 3},{i}\n" for i in range(9)))
    three = installed(derive_from_sample(path, data_type="t", max_categories=3))
    assert categories(three) == {"k": ("v0", "v1", "v2")}
    two = installed(derive_from_sample(path, data_type="t", max_categories=2))
    assert categories(two) == {}
    none = installed(derive_from_sample(path, data_type="t", max_categories=0))
    assert categories(none) == {}


def test_max_rows_limits_the_rows_read(tmp_path) -> None:
    # Row 4 is ragged and row 3 would make x a float: neither is read.
    path = write(tmp_path, "m.csv", "k,x\na,1\nb,2\nc,2.5\nd\n")
    msg = derive_from_sample(path, data_type="t", max_rows=2)
    contract = installed(msg)
    assert types(contract) == {"k": S, "x": N}
    assert categories(contract) == {"k": ("a", "b")}
    assert contract.description == "derived from m.csv, 2 rows"
    with pytest.raises(ValueError, match="max_rows"):
        derive_from_sample(path, data_type="t", max_rows=0)


@pytest.mark.parametrize(
    ("name", "text", "delimiter"),
    [
        ("t.tsv", "a\tb\tc\n1\t2\tx\n3\t4\ty\n", "\t"),
        ("t.txt", "a|b|c\n1|2|x\n3|4|y\n", "|"),
        ("t.csv", "a;b;c\n1,5;2;x\n3,5;4;y\n", ";"),  # decimal commas inside
        ("one.csv", "only\nx\ny\n", ","),  # one column: no delimiter to find
    ],
)
def test_the_delimiter_is_sniffed(tmp_path, name, text, delimiter) -> None:
    path = write(tmp_path, name, text)
    msg = derive_from_sample(path, data_type="t")
    contract = installed(msg)
    assert contract.csv.delimiter == delimiter
    assert contract.csv.header is True
    assert_decodes(msg, csv_messages(path, contract))


def test_a_given_delimiter_is_used(tmp_path) -> None:
    path = write(tmp_path, "d.csv", "a,b;c\n1,2;3\n4,5;6\n")
    contract = installed(derive_from_sample(path, data_type="t", delimiter=";"))
    assert contract.csv.columns == ("a,b", "c")
    assert types(contract) == {"a,b": S, "c": N}
    for bad in ("", ";;", '"', "\n"):
        with pytest.raises(ValueError, match="delimiter must be one character"):
            derive_from_sample(path, data_type="t", delimiter=bad)


def test_a_header_csv_sniffer_misses_is_found(tmp_path) -> None:
    # csv.Sniffer.has_header votes no here: "abc" is as long as the values below it.
    text = "abc,xyz\nabc,1\ndef,2\nghi,3\n"
    assert csv.Sniffer().has_header(text) is False
    contract = installed(derive_from_sample(write(tmp_path, "h.csv", text), data_type="t"))
    assert contract.csv.header is True
    assert types(contract) == {"abc": S, "xyz": N}


def test_an_all_text_header_is_found_by_csv_sniffer(tmp_path) -> None:
    # Every value below is three characters long; the names are not.
    text = "name,colour\nabc,red\nxyz,tan\n"
    contract = installed(derive_from_sample(write(tmp_path, "h.csv", text), data_type="t"))
    assert contract.csv.header is True
    assert contract.csv.columns == ("name", "colour")


def test_an_all_text_header_nothing_tells_apart_must_be_given(tmp_path) -> None:
    path = write(tmp_path, "h.csv", "name,colour\nalice,red\nbob,blue\n")
    with pytest.raises(ValueError, match=r"h\.csv: no header line found .*or header=True"):
        derive_from_sample(path, data_type="t")
    contract = installed(derive_from_sample(path, data_type="t", header=True))
    assert contract.csv.columns == ("name", "colour")
    assert categories(contract) == {"name": ("alice", "bob"), "colour": ("blue", "red")}


def test_header_can_be_given(tmp_path) -> None:
    path = write(tmp_path, "h.csv", "abc,xyz\nabc,1\ndef,2\n")
    contract = installed(
        derive_from_sample(path, data_type="t", header=False, columns=["word", "v"])
    )
    assert contract.csv.header is False
    assert types(contract) == {"word": S, "v": S}  # "xyz" is data now
    assert contract.description == "derived from h.csv, 3 rows"
    with pytest.raises(ValueError, match="line 1 is a header naming the columns"):
        derive_from_sample(path, data_type="t", columns=["word", "v"])
    same = installed(derive_from_sample(path, data_type="t", columns=["abc", "xyz"]))
    assert same.csv.header is True


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"e\.csv: the file is empty"),
        ("\n  \n", r"e\.csv: the file is empty"),
        ("a,b\n", r"e\.csv: the file has a header but no data rows"),
        ("a,b\n1,2\n3\n", r"e\.csv: line 3: expected 2 ','-separated columns \(a, b\), got 1"),
        ("a,b\n1,2\n\n3,4,5\n", r"e\.csv: line 4: expected 2 ','-separated columns \(a, b\)"),
        ('a,b\n1,"2\n', r"e\.csv: line 2: bad CSV"),
        ("a,a\nx,1\ny,2\n", r"e\.csv: the header names columns more than once: \['a'\]"),
        ("a,,c\nx,1,2\ny,3,4\n", r"e\.csv: column 2 of the header has no name"),
    ],
)
def test_csv_that_cannot_be_derived(tmp_path, text, message) -> None:
    with pytest.raises(ValueError, match=message):
        derive_from_sample(write(tmp_path, "e.csv", text), data_type="t")


def test_a_file_that_is_not_utf8(tmp_path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("name,x\ncaf\u00e9,1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.csv: .*not UTF-8"):
        derive_from_sample(path, data_type="t")


def test_a_byte_order_mark_is_not_part_of_the_first_name(tmp_path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffa,b\n1,2\n".encode())
    contract = installed(derive_from_sample(path, data_type="t"))
    assert contract.csv.columns == ("a", "b")


@pytest.mark.parametrize(
    ("roles", "message"),
    [
        (Roles(id_field="nope"), r"r\.csv: id_field 'nope' is not a column; the columns are"),
        (Roles(label_field="nope"), r"label_field 'nope' is not a column"),
        (Roles(id_field="x"), r"id_field 'x' is a float column .*must be integer or string"),
        (Roles(id_field="big"), r"id_field 'big' is a float column \(integers beyond"),
        (Roles(id_field="flag"), r"id_field 'flag' is a boolean column"),
        (Roles(event_time_field="k"), r"event_time_field 'k' is a string column; it must be"),
        (Roles(event_time_field="gone"), r"'gone' is a string column \(no row has a value\)"),
        (Roles(event_time_field="x"), r"event_time_field 'x' is a float column"),
        (Roles(id_field="n", label_field="n"), r"'n' cannot be both id_field and label_field"),
        (Roles(required=("k", "zz")), r"required names no column: \['zz'\]"),
    ],
)
def test_roles_must_name_columns_of_the_right_type(tmp_path, roles, message) -> None:
    text = "k,n,x,big,flag,gone\na,1,1.5,9007199254740993,true,\nb,2,2.5,1,false,\n"
    with pytest.raises(ValueError, match=message):
        derive_from_sample(write(tmp_path, "r.csv", text), data_type="t", roles=roles)


def test_an_integer_id_and_any_label_type(tmp_path) -> None:
    text = "n,x,flag\n1,1.5,true\n2,2.5,false\n"
    msg = derive_from_sample(
        write(tmp_path, "r.csv", text),
        data_type="t",
        roles=Roles(id_field="n", event_time_field="", label_field="flag"),
    )
    contract = installed(msg)
    assert (contract.id_field, contract.label_field) == ("n", "flag")


def test_a_data_type_is_needed(tmp_path) -> None:
    with pytest.raises(ValueError, match="a contract needs a data_type"):
        derive_from_sample(write(tmp_path, "a.csv", "a\n1\n"), data_type="")
    with pytest.raises(ValueError, match="a contract needs a data_type"):
        derive_from_model(REPO / "models" / "wine-lr.onnx", data_type="")


def test_the_sample_format(tmp_path) -> None:
    path = write(tmp_path, "data.dat", "a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"data\.dat: cannot tell the sample format from '\.dat'"):
        derive_from_sample(path, data_type="t")
    contract = installed(derive_from_sample(path, data_type="t", sample_format="csv"))
    assert types(contract) == {"a": N, "b": N}
    with pytest.raises(ValueError, match="unknown sample format 'xml'"):
        derive_from_sample(path, data_type="t", sample_format="xml")
    with pytest.raises(ValueError, match=r"missing\.csv: cannot read"):
        derive_from_sample(tmp_path / "missing.csv", data_type="t")


# --- JSON lines --------------------------------------------------------------------------

JSONL = (
    '{"id": "a", "t": 1700000000000, "x": 1, "y": 2.5, "ok": true, "kind": "cat", "extra": null}\n'
    '{"id": "b", "t": 1700000001000, "x": 2.0, "y": null, "ok": false, "kind": "dog"}\n'
    "\n"
    '{"id": "c", "t": 1700000002000, "x": 3, "ok": null, "kind": "cat", "late": "z",'
    ' "big": 9007199254740993, "n": 4}\n'
    '{"kind": "cat", "id": "d", "n": -5, "ok": true, "big": 1}\n'
)


@pytest.mark.parametrize("name", ["s.jsonl", "s.ndjson", "s.json"])
def test_json_lines_with_nulls_and_mixed_numbers(tmp_path, name) -> None:
    path = write(tmp_path, name, JSONL)
    msg = derive_from_sample(
        path, data_type="t", roles=Roles(id_field="id", event_time_field="t", label_field="ok")
    )
    contract = installed(msg)
    assert types(contract) == {
        "id": S,
        "t": N,
        "x": F,  # 1, 2.0, 3: a mix is a float
        "y": F,  # null does not vote
        "ok": B,  # not an integer, though bool is an int in Python
        "kind": S,
        "extra": S,  # never a value
        "late": S,  # first seen on a later line: after the others
        "big": F,  # beyond ±2**53
        "n": N,
    }
    assert categories(contract) == {"kind": ("cat", "dog"), "late": ("z",)}
    assert (contract.id_field, contract.event_time_field, contract.label_field) == (
        "id",
        "t",
        "ok",
    )
    assert contract.encoding == "json"
    assert contract.description == f"derived from {name}, 4 rows"
    assert_decodes(msg, jsonl_messages(path))


def test_json_lines_max_rows_and_categories(tmp_path) -> None:
    lines = "".join(json.dumps({"k": f"v{i}", "x": i}) + "\n" for i in range(30))
    path = write(tmp_path, "m.jsonl", lines + '{"k": 1}\n')
    contract = installed(derive_from_sample(path, data_type="t", max_rows=30))
    assert types(contract) == {"k": S, "x": N}
    assert categories(contract) == {}  # 30 distinct values: more than 20
    small = installed(derive_from_sample(path, data_type="t", max_rows=5))
    assert categories(small) == {"k": ("v0", "v1", "v2", "v3", "v4")}
    assert small.description == "derived from m.jsonl, 5 rows"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"j\.jsonl: the file is empty"),
        ("\n\n", r"j\.jsonl: the file is empty"),
        ('{"a": 1}\n{"a": {"b": 2}}\n', r"j\.jsonl: line 2, field 'a': a nested object"),
        ('{"a": [1, 2]}\n', r"line 1, field 'a': a nested array; contracts are flat"),
        ('{"a": 1}\n[1, 2]\n', r"line 2: a record must be a JSON object, got array"),
        ('"text"\n', r"line 1: a record must be a JSON object, got string"),
        ('{"a": 1}\n{"a": \n', r"line 2: not JSON"),
        ('{"a": NaN}\n', r"line 1: not JSON .*NaN is not a JSON number"),
        (
            '{"a": 1}\n{"a": "x"}\n{"a": true}\n',
            r"field 'a' has values of more than one type: number on line 1, string on line 2, "
            r"boolean on line 3",
        ),
        ('{"": 1}\n', r"a field has an empty name"),
    ],
)
def test_json_lines_that_cannot_be_derived(tmp_path, text, message) -> None:
    with pytest.raises(ValueError, match=message):
        derive_from_sample(write(tmp_path, "j.jsonl", text), data_type="t")


def test_a_pretty_printed_json_file_is_not_json_lines(tmp_path) -> None:
    path = write(tmp_path, "doc.json", json.dumps({"a": 1, "b": "x"}, indent=2))
    with pytest.raises(ValueError, match=r"doc\.json: line 1: not JSON \(JSON lines hold one"):
        derive_from_sample(path, data_type="t")


# --- Parquet -----------------------------------------------------------------------------


@pytest.fixture
def parquet_table():
    pa = pytest.importorskip("pyarrow")
    ts = pa.array([1_700_000_000_000, 1_700_000_001_000, None, 1_700_000_003_000])
    return pa.table(
        {
            "record_id": pa.array(["a", "b", "c", "d"]),
            "when": ts.cast(pa.timestamp("ms", tz="UTC")),
            "x": pa.array([1.5, None, 2.5, 3.0], pa.float32()),
            "n": pa.array([1, 2, None, 4], pa.int32()),
            "big": pa.array([1, 2**60, 3, 4], pa.uint64()),
            "ok": pa.array([True, False, None, True]),
            "kind": pa.array(["cat", "dog", "cat", None]).dictionary_encode(),
            "name": pa.array(["w", "x", "y", "z"], pa.large_string()),
            "nothing": pa.nulls(4),
        }
    )


def parquet_messages(table) -> list[bytes]:
    """The table's rows as JSON records, timestamps as epoch milliseconds (as the contract
    says they are carried)."""
    pa = pytest.importorskip("pyarrow")
    columns = {}
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_timestamp(column.type):
            column = column.cast(pa.timestamp("ms", tz=column.type.tz)).cast(pa.int64())
        columns[name] = column
    rows = pa.table(columns).to_pylist()
    return [json.dumps({k: v for k, v in row.items() if v is not None}).encode() for row in rows]


def test_parquet(tmp_path, parquet_table) -> None:
    import pyarrow.parquet as pq

    path = tmp_path / "sample.parquet"
    pq.write_table(parquet_table, path)
    msg = derive_from_sample(
        path, data_type="t", roles=Roles(id_field="record_id", event_time_field="when")
    )
    contract = installed(msg)
    assert types(contract) == {
        "record_id": S,
        "when": N,
        "x": F,
        "n": N,
        "big": F,  # 2**60 does not fit a float64 exactly
        "ok": B,
        "kind": S,  # dictionary-encoded strings
        "name": S,
        "nothing": S,  # a null column: no values to type it by
    }
    assert contract.field_named("when").description == (
        "Unix epoch milliseconds (the sample's timestamp[ms, UTC] column)"
    )
    assert categories(contract) == {"kind": ("cat", "dog"), "name": ("w", "x", "y", "z")}
    assert (contract.id_field, contract.event_time_field) == ("record_id", "when")
    assert contract.encoding == "json"
    assert contract.description == "derived from sample.parquet, 4 rows"
    assert_decodes(msg, parquet_messages(parquet_table))


def test_parquet_max_rows_across_row_groups(tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"k": [f"v{i % 4}" for i in range(100)], "x": list(range(100))})
    path = tmp_path / "groups.pq"
    pq.write_table(table, path, row_group_size=7)
    contract = installed(derive_from_sample(path, data_type="t", max_rows=10))
    assert contract.description == "derived from groups.pq, 10 rows"
    assert types(contract) == {"k": S, "x": N}
    assert categories(contract) == {"k": ("v0", "v1", "v2", "v3")}
    assert_decodes(contract.to_proto(), parquet_messages(table.slice(0, 10)))


@pytest.mark.parametrize(
    ("column", "message"),
    [
        ("nested_list", r"column 'bad' is list<.*int64>: a nested column; contracts are flat"),
        ("nested_struct", r"column 'bad' is struct<.*>: a nested column"),
        ("date", r"column 'bad' is date32\[day\]: a field is a float, integer, boolean, string"),
        ("binary", r"column 'bad' is binary"),
    ],
)
def test_parquet_columns_that_cannot_be_fields(tmp_path, column, message) -> None:
    pa = pytest.importorskip("pyarrow")
    import datetime

    import pyarrow.parquet as pq

    values = {
        "nested_list": pa.array([[1, 2], [3]]),
        "nested_struct": pa.array([{"a": 1}, {"a": 2}]),
        "date": pa.array([datetime.date(2024, 1, 1), datetime.date(2024, 1, 2)]),
        "binary": pa.array([b"x", b"y"]),
    }[column]
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"ok": [1, 2], "bad": values}), path)
    with pytest.raises(ValueError, match=r"bad\.parquet: " + message):
        derive_from_sample(path, data_type="t")


def test_parquet_errors(tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    not_parquet = write(tmp_path, "text.parquet", "a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"text\.parquet: cannot read as Parquet"):
        derive_from_sample(not_parquet, data_type="t")
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"a": pa.array([], pa.int64())}), empty)
    with pytest.raises(ValueError, match=r"empty\.parquet: the file has no rows"):
        derive_from_sample(empty, data_type="t")
    roles = tmp_path / "roles.parquet"
    pq.write_table(pa.table({"a": [1.5]}), roles)
    with pytest.raises(ValueError, match=r"roles\.parquet: event_time_field 'a' is a float"):
        derive_from_sample(roles, data_type="t", roles=Roles(event_time_field="a"))


def test_parquet_without_pyarrow(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="reading Parquet needs pyarrow: pip install pyarrow"):
        derive_from_sample(path, data_type="t")


# --- models ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _quiet_sklearn():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_a_grouped_onnx_input_needs_names() -> None:
    with pytest.raises(ValueError, match=r"wine-lr\.onnx: .*'input' holds 11 columns.*input_"):
        derive_from_model(REPO / "models" / "wine-lr.onnx", data_type="wine")


@pytest.fixture(scope="module")
def per_column_onnx(tmp_path_factory) -> Path:
    """A classifier over per-column inputs: two strings (one-hot encoded), two floats and
    an int64, trained and converted here."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, Int64TensorType, StringTensorType
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    rng = np.random.default_rng(1)
    n = 200
    table = np.empty((n, 5), dtype=object)
    table[:, 0] = rng.choice(["red", "green", "blue"], n)
    table[:, 1] = rng.choice(["S", "M", "L"], n)
    table[:, 2], table[:, 3] = rng.normal(size=n), rng.normal(size=n)
    table[:, 4] = rng.integers(0, 5, n)
    target = np.where((table[:, 0] == "red") | (table[:, 2] > 0.3), "yes", "no")
    pipeline = Pipeline(
        [
            (
                "columns",
                ColumnTransformer(
                    [
                        ("onehot", OneHotEncoder(handle_unknown="ignore"), [0, 1]),
                        ("scale", StandardScaler(), [2, 3]),
                        ("keep", "passthrough", [4]),
                    ]
                ),
            ),
            ("model", LogisticRegression()),
        ]
    ).fit(table, target)
    onx = convert_sklearn(
        pipeline,
        initial_types=[
            ("color", StringTensorType([None, 1])),
            ("size", StringTensorType([None, 1])),
            ("a", FloatTensorType([None, 1])),
            ("b", FloatTensorType([None, 1])),
            ("k", Int64TensorType([None, 1])),
        ],
        options={LogisticRegression: {"zipmap": False}},
        target_opset=17,
    )
    path = tmp_path_factory.mktemp("onnx") / "mixed.onnx"
    path.write_bytes(onx.SerializeToString())
    return path


def test_a_per_column_onnx_pipeline(per_column_onnx) -> None:
    msg = derive_from_model(per_column_onnx, data_type="mixed")
    contract = installed(msg)
    assert types(contract) == {"color": S, "size": S, "a": F, "b": F, "k": N}
    assert categories(contract) == {"color": ("blue", "green", "red"), "size": ("L", "M", "S")}
    assert (contract.id_field, contract.event_time_field, contract.label_field) == ("", "", "")
    assert contract.encoding == "json"
    assert contract.description == "derived from mixed.onnx, a onnx classification model"
    rows = [b'{"color": "red", "size": "S", "a": 0.5, "b": -1, "k": 3}']
    assert_decodes(msg, rows)


def test_role_fields_a_model_does_not_read_are_added(per_column_onnx) -> None:
    roles = Roles(
        id_field="record_id",
        event_time_field="event_time_ms",
        label_field="outcome",
        required=("color", "record_id"),
    )
    contract = installed(derive_from_model(per_column_onnx, data_type="mixed", roles=roles))
    assert types(contract) == {
        "record_id": S,
        "event_time_ms": N,
        "color": S,
        "size": S,
        "a": F,
        "b": F,
        "k": N,
        "outcome": S,  # the classifier's labels are text
    }
    assert contract.field_named("outcome").categories == ("no", "yes")
    assert contract.field_named("record_id").categories == ()
    assert (contract.id_field, contract.event_time_field, contract.label_field) == (
        "record_id",
        "event_time_ms",
        "outcome",
    )
    assert [f.name for f in contract.fields if f.required] == ["record_id", "color"]
    assert [f.name for f in contract.feature_fields] == ["color", "size", "a", "b", "k"]


@pytest.mark.parametrize(
    ("roles", "role"),
    [
        (Roles(id_field="k"), "id_field"),
        (Roles(event_time_field="k"), "event_time_field"),
        (Roles(label_field="k"), "label_field"),
    ],
)
def test_a_role_cannot_name_a_model_input(per_column_onnx, roles, role) -> None:
    with pytest.raises(ValueError, match=rf"mixed\.onnx: {role} 'k' is a model input"):
        derive_from_model(per_column_onnx, data_type="mixed", roles=roles)


def test_onnx_element_types(tmp_path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("Cast", ["n"], ["n64"], to=TensorProto.DOUBLE),
        helper.make_node("Cast", ["flag"], ["flag64"], to=TensorProto.DOUBLE),
        helper.make_node("Concat", ["x", "n64", "flag64"], ["all"], axis=1),
        helper.make_node("ReduceSum", ["all", "axes"], ["y"], keepdims=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.DOUBLE, [None, 1]),
            helper.make_tensor_value_info("n", TensorProto.INT32, [None, 1]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, [None, 1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [None, 1])],
        initializer=[axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "typed.onnx"
    path.write_bytes(model.SerializeToString())
    contract = installed(derive_from_model(path, data_type="t", roles=Roles(label_field="target")))
    assert types(contract) == {"x": F, "n": N, "flag": B, "target": F}  # a regressor's label
    assert contract.label_field == "target"
    assert_decodes(contract.to_proto(), [b'{"x": 1.5, "n": 2, "flag": true, "target": 4.5}'])


def test_the_wine_pmml_regression() -> None:
    path = REPO / "models" / "pmml" / "winequalityLinearRegression.pmml"
    msg = derive_from_model(path, data_type="wine")
    contract = installed(msg)
    assert types(contract) == {
        "fixed acidity": F,  # the PMML's spelling
        "volatile acidity": F,
        "chlorides": F,
        "total sulfur dioxide": F,
        "sulphates": F,
        "alcohol": F,
        "quality": F,  # the target, last
    }
    assert contract.label_field == "quality"
    assert [f.name for f in contract.feature_fields] == list(types(contract))[:-1]
    assert contract.description == (
        "derived from winequalityLinearRegression.pmml, a pmml regression model"
    )
    assert_decodes(msg, [b'{"fixed acidity": 7.4, "alcohol": 9.4, "quality": 5}'])


REGRESSION_PMML = """<?xml version="1.0" encoding="UTF-8"?>
<PMML xmlns="http://www.dmg.org/PMML-4_4" version="4.4">
  <Header/>
  <DataDictionary numberOfFields="6">
    <DataField name="x" optype="continuous" dataType="double"/>
    <DataField name="color" optype="categorical" dataType="string">
      <Value value="red"/>
      <Value value="green"/>
      <Value value="blue" property="valid"/>
      <Value value="?" property="missing"/>
      <Value value="bad" property="invalid"/>
    </DataField>
    <DataField name="n" optype="continuous" dataType="integer"/>
    <DataField name="flag" optype="categorical" dataType="boolean"/>
    <DataField name="unused" optype="continuous" dataType="float"/>
    <DataField name="y" optype="continuous" dataType="double"/>
  </DataDictionary>
  <RegressionModel functionName="regression">
    <MiningSchema>
      <MiningField name="x"/>
      <MiningField name="color"/>
      <MiningField name="n"/>
      <MiningField name="flag"/>
      <MiningField name="y" usageType="target"/>
    </MiningSchema>
    <RegressionTable intercept="1.0">
      <NumericPredictor name="x" coefficient="2.0"/>
      <NumericPredictor name="n" coefficient="10.0"/>
      <CategoricalPredictor name="color" value="red" coefficient="0.5"/>
      <CategoricalPredictor name="color" value="green" coefficient="-1.0"/>
      <CategoricalPredictor name="color" value="blue" coefficient="0.0"/>
      <CategoricalPredictor name="flag" value="true" coefficient="100.0"/>
      <CategoricalPredictor name="flag" value="false" coefficient="0.0"/>
    </RegressionTable>
  </RegressionModel>
</PMML>
"""

TREE_PMML = """<?xml version="1.0" encoding="UTF-8"?>
<PMML xmlns="http://www.dmg.org/PMML-4_3" version="4.3">
  <Header/>
  <DataDictionary numberOfFields="2">
    <DataField name="size" optype="continuous" dataType="integer"/>
    <DataField name="class" optype="categorical" dataType="string">
      <Value value="yes"/>
      <Value value="no"/>
    </DataField>
  </DataDictionary>
  <TreeModel functionName="classification">
    <MiningSchema>
      <MiningField name="class" usageType="predicted"/>
      <MiningField name="size"/>
    </MiningSchema>
    <Output>
      <OutputField name="p_yes" optype="continuous" dataType="double"
                   feature="probability" value="yes"/>
      <OutputField name="p_no" optype="continuous" dataType="double"
                   feature="probability" value="no"/>
    </Output>
    <Node id="0">
      <True/>
      <Node id="1" score="yes">
        <SimplePredicate field="size" operator="greaterThan" value="3"/>
        <ScoreDistribution value="yes" recordCount="3"/>
        <ScoreDistribution value="no" recordCount="1"/>
      </Node>
      <Node id="2" score="no">
        <True/>
        <ScoreDistribution value="yes" recordCount="1"/>
        <ScoreDistribution value="no" recordCount="3"/>
      </Node>
    </Node>
  </TreeModel>
</PMML>
"""


def test_pmml_data_types_and_valid_values(tmp_path) -> None:
    path = write(tmp_path, "reg.pmml", REGRESSION_PMML)
    msg = derive_from_model(path, data_type="t", roles=Roles(id_field="rid"))
    contract = installed(msg)
    # "unused" is in the DataDictionary but no model input: not a field.
    assert types(contract) == {"rid": S, "x": F, "color": S, "n": N, "flag": B, "y": F}
    assert categories(contract) == {"color": ("red", "green", "blue")}  # not "?" nor "bad"
    assert (contract.id_field, contract.label_field) == ("rid", "y")
    row = b'{"rid": "r1", "x": 1.0, "color": "blue", "n": 2, "flag": false, "y": 21.0}'
    assert_decodes(msg, [row])


def test_a_pmml_classifier_target_and_a_label_named_otherwise(tmp_path) -> None:
    path = write(tmp_path, "tree.xml", TREE_PMML)
    contract = installed(derive_from_model(path, data_type="t"))
    assert types(contract) == {"size": N, "class": S}
    assert categories(contract) == {"class": ("yes", "no")}
    assert contract.label_field == "class"
    other = installed(derive_from_model(path, data_type="t", roles=Roles(label_field="truth")))
    # The declared target stays a field; the named label is added (the classifier's labels).
    assert types(other) == {"size": N, "class": S, "truth": S}
    assert other.label_field == "truth"
    assert other.field_named("truth").categories == ("no", "yes")


@pytest.mark.parametrize(
    ("name", "blob", "message"),
    [
        ("broken.onnx", b"not a model", r"broken\.onnx: not an ONNX model"),
        ("broken.pmml", b"<PMML>truncated", r"broken\.pmml: pypmml cannot load the model"),
        ("model.bin", b"", r"model\.bin: cannot tell the model format"),
    ],
)
def test_a_model_that_does_not_load(tmp_path, name, blob, message) -> None:
    path = tmp_path / name
    path.write_bytes(blob)
    with pytest.raises(ValueError, match=message):
        derive_from_model(path, data_type="t")


# --- versions ----------------------------------------------------------------------------


def test_contract_version_bump(tmp_path) -> None:
    new = derive_from_sample(write(tmp_path, "v.csv", "a,b\n1,x\n"), data_type="t")
    first = contract_version_bump(None, new)
    assert first.version == 1
    old = pb.DataContract()
    old.CopyFrom(new)
    old.version = 3
    bumped = contract_version_bump(old, new)
    assert bumped.version == 4
    assert new.version == 1  # not changed in place
    bumped.version = new.version
    assert bumped == new
    installed(contract_version_bump(old, new))
    old.data_type = "other"
    with pytest.raises(ValueError, match="cannot follow data type 'other'"):
        contract_version_bump(old, new)
