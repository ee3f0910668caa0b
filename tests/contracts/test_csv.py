"""The CSV codec: the column-wise batch path, quoting, strict numbers, and every error."""

from __future__ import annotations

import csv
import io
import pathlib

import numpy as np
import pytest

from dataflows.contracts.codecs import codec_for
from dataflows.contracts.schema import Contract, Encoding
from protos import waxserve_pb2 as pb

WINE = pathlib.Path(__file__).parents[2] / "models" / "data" / "winequality_red.csv"
FEATURES = (
    "fixed acidity",
    "volatile acidity",
    "citric acid",
    "residual sugar",
    "chlorides",
    "free sulfur dioxide",
    "total sulfur dioxide",
    "density",
    "pH",
    "sulphates",
    "alcohol",
)


def wine_contract(header: bool = False) -> Contract:
    """The UCI layout: ';', 11 features then quality, no id or time."""
    msg = pb.DataContract(data_type="wine", version=1, encoding=pb.ENCODING_CSV)
    for name in FEATURES:
        msg.fields.add(name=name, type=pb.FIELD_TYPE_FLOAT, required=True)
    msg.fields.add(name="quality", type=pb.FIELD_TYPE_INTEGER)
    msg.csv.delimiter = ";"
    msg.csv.header = header
    return Contract.from_proto(msg)


def mixed_contract() -> Contract:
    """Every field type; CSV columns in an order of their own, one field not a column."""
    msg = pb.DataContract(data_type="reading", version=1, encoding=pb.ENCODING_CSV)
    msg.fields.add(name="x", type=pb.FIELD_TYPE_FLOAT)
    msg.fields.add(name="station", type=pb.FIELD_TYPE_STRING)
    msg.fields.add(name="n", type=pb.FIELD_TYPE_INTEGER)
    msg.fields.add(name="ok", type=pb.FIELD_TYPE_BOOLEAN)
    msg.fields.add(name="note", type=pb.FIELD_TYPE_STRING)
    msg.fields.add(name="unused", type=pb.FIELD_TYPE_FLOAT)
    msg.csv.columns.extend(["station", "x", "ok", "n", "note"])
    msg.csv.delimiter = ";"
    msg.csv.header = True
    return Contract.from_proto(msg)


def test_the_wine_file_decodes_to_numpys_own_numbers() -> None:
    lines = WINE.read_bytes().splitlines()
    decoded = codec_for(wine_contract(), Encoding.CSV).decode(lines)
    assert decoded.errors == {}
    assert decoded.numeric.shape == (1599, 12)
    np.testing.assert_array_equal(decoded.numeric, np.loadtxt(WINE, delimiter=";"))
    assert decoded.text.shape == (1599, 0)


def test_round_trip_with_quoted_cells() -> None:
    codec = codec_for(mixed_contract(), Encoding.CSV)
    rows = [
        {"x": 7.4, "station": "a", "n": 3, "ok": True, "note": "plain"},
        {"x": -1e-7, "station": 'say "hi"; bye', "n": -(2**53), "ok": False},
        {"station": "two\nlines", "note": "comma, ok", "unused": 5.0},
        {},
    ]
    values = codec.encode(rows)
    assert values[1] == b'"say ""hi""; bye";-1e-07;false;-9007199254740992;'
    decoded = codec.decode(values)
    assert decoded.errors == {}
    # numeric columns: x, n, ok, unused (never a CSV column, so always absent)
    np.testing.assert_array_equal(
        decoded.numeric,
        [
            [7.4, 3, 1, np.nan],
            [-1e-7, -(2**53), 0, np.nan],
            [np.nan, np.nan, np.nan, np.nan],
            [np.nan, np.nan, np.nan, np.nan],
        ],
    )
    assert decoded.text.tolist() == [
        ["a", "plain"],
        ['say "hi"; bye', None],
        ["two\nlines", "comma, ok"],
        [None, None],
    ]


def test_the_batch_path_and_the_line_path_agree() -> None:
    """A plain batch takes the joined path; one quoted line sends it line by line."""
    codec = codec_for(mixed_contract(), Encoding.CSV)
    plain = [b"s1;1.5;TRUE;7;n", b"s2;;0;;", b";2e3;False;-4;x y"]
    fast = codec.decode(plain)
    slow = codec.decode([*plain, b'"q";1;1;1;"n"'])
    assert fast.errors == slow.errors == {}
    np.testing.assert_array_equal(fast.numeric, slow.numeric[:3])
    assert fast.text.tolist() == slow.text[:3].tolist()
    np.testing.assert_array_equal(
        fast.numeric, [[1.5, 7, 1, np.nan], [np.nan, np.nan, 0, np.nan], [2000, -4, 0, np.nan]]
    )
    assert fast.text.tolist() == [["s1", "n"], ["s2", None], [None, "x y"]]


def test_line_endings_of_file_lines_are_accepted() -> None:
    decoded = codec_for(wine_contract(), Encoding.CSV).decode(
        [b"7.4;0.7;0;1.9;0.076;11;34;0.9978;3.51;0.56;9.4;5\r\n"]
    )
    assert decoded.errors == {}
    assert decoded.numeric[0, -1] == 5


GOOD = b"7.4;0.7;0;1.9;0.076;11;34;0.9978;3.51;0.56;9.4;5"
BAD_CELLS = [
    ("7_4", "wrong_type"),
    ("\uff17.4", "wrong_type"),  # full-width digit seven
    ("\u0667", "wrong_type"),  # Arabic-Indic digit seven
    ("nan", "wrong_type"),
    ("NaN", "wrong_type"),
    ("inf", "wrong_type"),
    ("-Infinity", "wrong_type"),
    (" ", "wrong_type"),
    (" 7.4", "wrong_type"),
    ("7.4 ", "wrong_type"),
    ("1e", "wrong_type"),
    ("1.2.3", "wrong_type"),
    ("0x10", "wrong_type"),
    ("1,5", "wrong_type"),
    ("+-1", "wrong_type"),
    ("1e999", "non_finite"),
    ("-1e999", "non_finite"),
]


@pytest.mark.parametrize(("cell", "reason"), BAD_CELLS)
def test_numbers_are_strict(cell: str, reason: str) -> None:
    bad = ("6.1;" + cell + ";0;1.9;0.076;11;34;0.9978;3.51;0.56;9.4;5").encode()
    decoded = codec_for(wine_contract(), Encoding.CSV).decode([GOOD, bad, GOOD])
    assert set(decoded.errors) == {1}
    assert decoded.errors[1][0] == reason
    assert "'volatile acidity'" in decoded.errors[1][1]
    np.testing.assert_array_equal(decoded.numeric[0], decoded.numeric[2])
    assert decoded.numeric[0, 0] == 7.4


@pytest.mark.parametrize("cell", ["7", "-7", "+7", ".5", "5.", "1e5", "1E-05", "+.5e+3", ""])
def test_plain_decimal_and_scientific_numbers_are_accepted(cell: str) -> None:
    line = ("6.1;" + cell + ";0;1.9;0.076;11;34;0.9978;3.51;0.56;9.4;5").encode()
    decoded = codec_for(wine_contract(), Encoding.CSV).decode([line])
    assert decoded.errors == {}
    expected = float(cell) if cell else np.nan
    np.testing.assert_array_equal(decoded.numeric[0, 1], expected)


@pytest.mark.parametrize(
    ("cell", "expected"), [("true", 1.0), ("TRUE", 1.0), ("False", 0.0), ("1", 1.0), ("0", 0.0)]
)
def test_booleans(cell: str, expected: float) -> None:
    decoded = codec_for(mixed_contract(), Encoding.CSV).decode([f"s;1;{cell};1;n".encode()])
    assert decoded.errors == {}
    assert decoded.numeric[0, 2] == expected


@pytest.mark.parametrize("cell", ["yes", "2", "t", "1.0", " true"])
def test_other_booleans_are_wrong_type(cell: str) -> None:
    decoded = codec_for(mixed_contract(), Encoding.CSV).decode(
        [b"s;1;1;1;n", f"s;1;{cell};1;n".encode()]
    )
    assert set(decoded.errors) == {1}
    assert decoded.errors[1][0] == "wrong_type"
    assert "'ok'" in decoded.errors[1][1]


def test_an_integer_just_past_2_53_is_out_of_range_though_float64_rounds_it() -> None:
    codec = codec_for(mixed_contract(), Encoding.CSV)
    decoded = codec.decode(
        [b"s;1;1;9007199254740992;n", b"s;1;1;9007199254740993;n", b"s;1;1;-9007199254740993;n"]
    )
    assert set(decoded.errors) == {1, 2}
    assert {reason for reason, _ in decoded.errors.values()} == {"out_of_range"}


LINE_ERRORS = [
    (b"7.4;0.7;0", "bad_csv", "expected 12 ';'-separated columns (fixed acidity,"),
    (GOOD + b";1", "bad_csv", "got 13"),
    (b"", "bad_csv", "got 1"),
    (b'7.4;"0.7"x;0;1.9;0.076;11;34;0.9978;3.51;0.56;9.4;5', "bad_csv", "quoting"),
    (b'7.4;"0.7;0;1.9;0.076;11;34;0.9978;3.51;0.56;9.4;5', "bad_csv", "quoting"),
    (b"7.4;0.7\n;0;1.9;0.076;11;34;0.9978;3.51;0.56;9.4;5", "bad_csv", "line break"),
    (b"7.4;\xff;0;1.9;0.076;11;34;0.9978;3.51;0.56;9.4;5", "undecodable", "UTF-8"),
    (None, "undecodable", "tombstone"),
]


@pytest.mark.parametrize(("value", "reason", "mentions"), LINE_ERRORS)
def test_bad_lines(value: bytes | None, reason: str, mentions: str) -> None:
    decoded = codec_for(wine_contract(), Encoding.CSV).decode([GOOD, value, GOOD])
    assert set(decoded.errors) == {1}
    assert decoded.errors[1][0] == reason
    assert mentions in decoded.errors[1][1]
    np.testing.assert_array_equal(decoded.numeric[0], decoded.numeric[2])
    assert decoded.numeric[2, 0] == 7.4


def test_a_quoted_number_is_a_number() -> None:
    decoded = codec_for(wine_contract(), Encoding.CSV).decode(
        [b'"7.4";0.7;0;1.9;0.076;11;34;0.9978;3.51;0.56;9.4;"5"']
    )
    assert decoded.errors == {}
    assert decoded.numeric[0, 0] == 7.4


def test_the_header_line_is_refused_when_the_contract_has_one() -> None:
    header = ";".join((*FEATURES, "quality")).encode()
    quoted = io.StringIO()
    csv.writer(quoted, delimiter=";", quoting=csv.QUOTE_ALL, lineterminator="").writerow(
        (*FEATURES, "quality")
    )
    values = [header, GOOD, quoted.getvalue().encode(), header + b"\n"]
    decoded = codec_for(wine_contract(header=True), Encoding.CSV).decode(values)
    assert set(decoded.errors) == {0, 2, 3}
    assert {reason for reason, _ in decoded.errors.values()} == {"csv_header"}
    assert "fixed acidity;volatile acidity" in decoded.errors[0][1]
    assert decoded.numeric[1, 0] == 7.4
    # without the header option it is just a line of non-numbers
    decoded = codec_for(wine_contract(), Encoding.CSV).decode([header])
    assert decoded.errors[0][0] == "wrong_type"


def test_a_single_column_contract() -> None:
    msg = pb.DataContract(data_type="one", version=1, encoding=pb.ENCODING_CSV)
    msg.fields.add(name="x", type=pb.FIELD_TYPE_FLOAT)
    codec = codec_for(Contract.from_proto(msg), Encoding.CSV)
    decoded = codec.decode([b"1", b"", b"2.5"])
    assert decoded.errors == {}
    np.testing.assert_array_equal(decoded.numeric[:, 0], [1, np.nan, 2.5])
