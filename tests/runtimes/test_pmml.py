"""The PMML runtime with real documents: the wine PMMLs from JPMML-SparkML shipped in models/,
and small PMML 4.4 documents written here whose outputs are worked out by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flowtools import WINE_FEATURES

from dataflows.runtimes import (
    ModelError,
    PmmlRuntime,
    Prediction,
    canonical_name,
    jvm_started,
    load_runtime,
    start_jvm,
)
from dataflows.runtimes.pmml import utf8_document
from protos import waxserve_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
PMML_LR = REPO / "models" / "pmml" / "winequalityLinearRegression.pmml"
PMML_TREE = REPO / "models" / "pmml" / "winequalityDecisionTreeClassification.pmml"
ROW1_SCORE = 5.178126058334128

# y = 1 + 2 x + 10 n + (red 0.5 | green -1 | blue 0) + (flag true: 100). "?" is color's
# missing value and "bad" an invalid one: neither is a category.
REGRESSION_PMML = b"""<?xml version="1.0" encoding="UTF-8"?>
<PMML xmlns="http://www.dmg.org/PMML-4_4" version="4.4">
  <Header description="regression with a categorical string predictor"/>
  <DataDictionary numberOfFields="5">
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

# color == red: yes 7/8; else size > 3: yes 3/4; else yes 1/4. All exact in binary.
TREE_PMML = b"""<?xml version="1.0" encoding="UTF-8"?>
<PMML xmlns="http://www.dmg.org/PMML-4_4" version="4.4">
  <Header description="tree classifier splitting on a string field"/>
  <DataDictionary numberOfFields="3">
    <DataField name="color" optype="categorical" dataType="string">
      <Value value="red"/>
      <Value value="green"/>
      <Value value="blue"/>
    </DataField>
    <DataField name="size" optype="continuous" dataType="integer"/>
    <DataField name="class" optype="categorical" dataType="string">
      <Value value="yes"/>
      <Value value="no"/>
    </DataField>
  </DataDictionary>
  <TreeModel functionName="classification" splitCharacteristic="multiSplit">
    <MiningSchema>
      <MiningField name="color"/>
      <MiningField name="size"/>
      <MiningField name="class" usageType="target"/>
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
        <SimplePredicate field="color" operator="equal" value="red"/>
        <ScoreDistribution value="yes" recordCount="7"/>
        <ScoreDistribution value="no" recordCount="1"/>
      </Node>
      <Node id="2">
        <True/>
        <Node id="3" score="yes">
          <SimplePredicate field="size" operator="greaterThan" value="3"/>
          <ScoreDistribution value="yes" recordCount="3"/>
          <ScoreDistribution value="no" recordCount="1"/>
        </Node>
        <Node id="4" score="no">
          <True/>
          <ScoreDistribution value="yes" recordCount="1"/>
          <ScoreDistribution value="no" recordCount="3"/>
        </Node>
      </Node>
    </Node>
  </TreeModel>
</PMML>
"""


@pytest.fixture(scope="module")
def wine() -> np.ndarray:
    """Features (n, 11) in WINE_FEATURES order."""
    data = np.loadtxt(REPO / "models" / "data" / "winequality_red.csv", delimiter=";")
    return np.ascontiguousarray(data[:, :11])


def columns_for(runtime: PmmlRuntime, features: np.ndarray) -> np.ndarray:
    """The wine columns a runtime's inputs name ("fixed acidity"), in its input order."""
    index = {canonical_name(name): i for i, name in enumerate(WINE_FEATURES)}
    return np.ascontiguousarray(
        features[:, [index[canonical_name(n)] for n in runtime.input_names]]
    )


@pytest.fixture(scope="module")
def pmml_lr() -> PmmlRuntime:
    return PmmlRuntime(PMML_LR.read_bytes())


@pytest.fixture(scope="module")
def pmml_tree() -> PmmlRuntime:
    return PmmlRuntime(PMML_TREE.read_bytes())


@pytest.fixture(scope="module")
def regression() -> PmmlRuntime:
    return PmmlRuntime(REGRESSION_PMML)


@pytest.fixture(scope="module")
def tree() -> PmmlRuntime:
    return PmmlRuntime(TREE_PMML)


def assert_consistent(p: Prediction, n: int) -> None:
    assert p.values.dtype == np.float64 and p.values.shape == (n,)
    assert p.valid.dtype == bool and p.valid.shape == (n,)
    if p.labels is not None:
        assert len(p.labels) == n
        assert p.probabilities is not None and p.probabilities.shape == (n, len(p.class_labels))


def text(*rows: tuple[str, ...]) -> np.ndarray:
    return np.array(rows, dtype=object).reshape(len(rows), -1)


# --- the shipped wine PMMLs ----------------------------------------------------------------


def test_wine_regression_reference_value_alone_and_in_a_batch(pmml_lr, wine) -> None:
    assert pmml_lr.format == "pmml" and pmml_lr.task == "regression"
    assert pmml_lr.input_names == (
        "fixed acidity",
        "volatile acidity",
        "chlorides",
        "total sulfur dioxide",
        "sulphates",
        "alcohol",
    )
    assert pmml_lr.numeric_features == pmml_lr.input_names and pmml_lr.text_features == ()
    features = columns_for(pmml_lr, wine)
    alone = pmml_lr.predict(features[:1])
    assert_consistent(alone, 1)
    assert alone.values[0] == pytest.approx(ROW1_SCORE, rel=1e-9)
    batch = pmml_lr.predict(features)
    assert_consistent(batch, len(features))
    assert batch.values[0] == pytest.approx(ROW1_SCORE, rel=1e-9)
    assert batch.valid.all()
    per_record = np.array([pmml_lr.predict(features[i : i + 1]).values[0] for i in range(300)])
    np.testing.assert_array_equal(batch.values[:300], per_record)


def test_wine_regression_matches_its_coefficients(pmml_lr, wine) -> None:
    features = columns_for(pmml_lr, wine)
    coefficients = np.array(
        [
            0.0022749888223266997,
            -0.9766327107221001,
            -0.28614341184874237,
            -9.71748496814966e-4,
            0.4897192785787167,
            0.2492508640175212,
        ]
    )
    expected = 3.282519468977813 + features @ coefficients
    np.testing.assert_allclose(pmml_lr.predict(features).values, expected, rtol=1e-12)


def test_wine_tree_probabilities_and_argmax(pmml_tree, wine) -> None:
    assert pmml_tree.task == "classification"
    assert pmml_tree.class_labels == ("3", "4", "5", "6", "7", "8")
    features = columns_for(pmml_tree, wine)
    p = pmml_tree.predict(features)
    assert_consistent(p, len(features))
    assert p.valid.all()
    assert p.probabilities is not None and p.labels is not None
    # Classes absent from a leaf's ScoreDistribution come back NaN from pypmml: 0 here.
    assert not np.isnan(p.probabilities).any()
    np.testing.assert_allclose(p.probabilities.sum(axis=1), 1.0, rtol=1e-12)
    best = np.argmax(p.probabilities, axis=1)
    assert p.labels == [p.class_labels[b] for b in best]
    np.testing.assert_array_equal(p.values, np.array(p.labels, dtype=float))
    # Row 1 falls in a leaf dominated by quality 5.
    assert p.labels[0] == "5" and p.probabilities[0, 2] == pytest.approx(0.8302752293577982)
    for i in range(0, len(features), 97):
        one = pmml_tree.predict(features[i : i + 1])
        assert one.labels == [p.labels[i]]
        np.testing.assert_array_equal(one.probabilities[0], p.probabilities[i])


def test_nan_inputs_give_invalid_rows_without_raising(pmml_lr, pmml_tree, wine) -> None:
    features = columns_for(pmml_lr, wine)[:3].copy()
    features[1, 0] = np.nan
    p = pmml_lr.predict(features)
    assert p.valid.tolist() == [True, False, True]
    assert np.isnan(p.values[1]) and p.values[0] == pytest.approx(ROW1_SCORE, rel=1e-9)

    nothing = np.full((2, len(pmml_tree.input_names)), np.nan)
    p = pmml_tree.predict(nothing)
    assert_consistent(p, 2)
    assert p.valid.tolist() == [False, False]
    assert p.labels == ["", ""]
    assert np.isnan(p.values).all() and np.isnan(p.probabilities).all()


def test_rows_the_model_refuses_are_invalid(wine) -> None:
    doc = PMML_LR.read_text().replace(
        '<MiningField name="fixed acidity"/>',
        '<MiningField name="fixed acidity" missingValueTreatment="returnInvalid"/>',
    )
    runtime = PmmlRuntime(doc.encode())
    features = columns_for(runtime, wine)[:3].copy()
    features[0, 0] = np.nan
    p = runtime.predict(features)
    assert p.valid.tolist() == [False, True, True]
    assert np.isfinite(p.values[1:]).all()


class Flaky:
    """pypmml's Model, but any call whose request contains `poison` raises (as Java would)."""

    def __init__(self, real: object, poison: str) -> None:
        self.real, self.poison = real, poison

    def predict(self, request: str) -> str:
        if self.poison in request:
            raise RuntimeError("scoring failed")
        return self.real.predict(request)  # type: ignore[attr-defined]


def test_a_failing_batch_call_is_retried_row_by_row(wine) -> None:
    runtime = PmmlRuntime(PMML_LR.read_bytes())
    runtime._model = Flaky(runtime._model, "999.0")
    features = columns_for(runtime, wine)[:4].copy()
    features[2, 1] = 999.0
    p = runtime.predict(features)
    assert p.valid.tolist() == [True, True, False, True]
    assert p.values[0] == pytest.approx(ROW1_SCORE, rel=1e-9) and np.isnan(p.values[2])


def test_runs_on_the_in_process_jvm(pmml_lr) -> None:
    import jpype
    from pypmml.base import PMMLContext

    assert jpype.isJVMStarted()
    assert PMMLContext.gateway() == "JPype"
    assert jvm_started()
    start_jvm()  # public, for start-up; a second call is a no-op
    assert jvm_started()


def test_input_features_are_checked_by_canonical_name() -> None:
    blob = PMML_LR.read_bytes()
    fields = ["alcohol", "sulphates", "total_sulfur_dioxide", "chlorides", "volatile_acidity"]
    runtime = PmmlRuntime(blob, [*fields, "fixed_acidity"])
    assert runtime.input_names[0] == "fixed acidity"  # mining-schema order, PMML spelling
    with pytest.raises(ModelError, match="missing: \\['fixed_acidity'\\]") as err:
        PmmlRuntime(blob, [*fields, "density"])
    assert err.value.reason == "bad_inputs"
    with pytest.raises(ModelError) as err:
        load_runtime(pb.MODEL_FORMAT_PMML, blob, fields)
    assert err.value.reason == "bad_inputs"


@pytest.mark.parametrize(
    "blob",
    [
        b"\x00\x01 not xml",
        b"<PMML>truncated",
        PMML_LR.read_bytes().replace(b"<RegressionModel", b"<Regression"),
    ],
)
def test_bad_bytes_fail_to_load(blob) -> None:
    with pytest.raises(ModelError) as err:
        load_runtime(pb.MODEL_FORMAT_PMML, blob, ())
    assert err.value.reason == "load_failed"


def test_an_external_entity_is_refused(tmp_path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("do-not-read")
    doc = (
        f'<?xml version="1.0"?>\n<!DOCTYPE PMML [<!ENTITY x SYSTEM "file://{secret}">]>\n'
        + PMML_LR.read_text().replace('version="1.1.7"', 'version="&x;"')
    )
    with pytest.raises(ModelError) as err:
        PmmlRuntime(doc.encode())
    assert err.value.reason == "load_failed"
    assert "do-not-read" not in str(err.value)


# Every way an XML parser could be told a document's encoding: a BOM, the byte pattern of
# UTF-16/32 without one, the declaration. (codec, declared encoding or None).
ENCODINGS = [
    ("utf-8", None),
    ("utf-8", "UTF-8"),
    ("utf-8-sig", None),  # a BOM
    ("utf-16", "UTF-16"),  # BOM, little-endian here
    ("utf-16-le", "UTF-16"),  # no BOM
    ("utf-16-be", None),
    ("utf-32", "UTF-32"),
    ("utf-32-be", "UTF-32"),
    ("iso-8859-1", "ISO-8859-1"),
    ("cp1252", "windows-1252"),
]
DOCTYPES = [
    '<!DOCTYPE PMML [<!ENTITY x SYSTEM "file://{secret}">]>\n',
    '<!DOCTYPE PMML SYSTEM "file://{secret}">\n',
    '<!-- a comment first --><!doctype PMML [<!ENTITY x SYSTEM "file://{secret}">]>\n',
]


def _document(codec: str, declared: str | None, prologue: str = "") -> bytes:
    body = PMML_LR.read_text()
    declaration = f'<?xml version="1.0" encoding="{declared}"?>\n' if declared else ""
    return (declaration + prologue + body).encode(codec)


@pytest.mark.parametrize(("codec", "declared"), ENCODINGS)
@pytest.mark.parametrize("doctype", DOCTYPES)
def test_a_dtd_is_refused_in_every_encoding_before_pmml4s_sees_it(
    codec: str, declared: str | None, doctype: str, tmp_path: Path, monkeypatch
) -> None:
    import pypmml

    secret = tmp_path / "secret.txt"
    secret.write_text("do-not-read")

    def parse(_: bytes) -> None:
        raise AssertionError("the document reached PMML4S")

    monkeypatch.setattr(pypmml.Model, "fromBytes", parse)
    with pytest.raises(ModelError, match="DOCTYPE") as err:
        PmmlRuntime(_document(codec, declared, doctype.format(secret=secret)))
    assert err.value.reason == "load_failed"


@pytest.mark.parametrize(("codec", "declared"), ENCODINGS)
def test_a_pmml_document_loads_in_every_accepted_encoding(codec: str, declared: str | None) -> None:
    expected = PmmlRuntime(PMML_LR.read_bytes()).predict(np.ones((1, 6))).values
    runtime = PmmlRuntime(_document(codec, declared))
    assert runtime.predict(np.ones((1, 6))).values.tolist() == expected.tolist()


@pytest.mark.parametrize(
    "document",
    [
        # UTF-7 can spell "<!DOCTYPE" as "+ADwAIQ-DOCTYPE": no check of bytes would see it.
        b'<?xml version="1.0" encoding="UTF-7"?>\n+ADwAIQ-DOCTYPE PMML+AD4-<PMML/>',
        '<?xml version="1.0" encoding="IBM037"?><PMML/>'.encode("cp037"),  # EBCDIC
        b'<?xml version="1.0" encoding="UTF-16"?><PMML/>',  # says UTF-16, is not
        b'\xef\xbb\xbf<?xml version="1.0" encoding="UTF-16"?><PMML/>',  # BOM says UTF-8
        b"\xff\xfe<\x00\x00\xd8",  # a lone surrogate in UTF-16
        b"<PMML>\x00</PMML>",
        b'<PMML/><?xml version="1.0" encoding="UTF-7"?>',  # a second declaration
    ],
)
def test_documents_whose_text_cannot_be_checked_are_refused(document: bytes) -> None:
    with pytest.raises(ModelError) as err:
        utf8_document(document)
    assert err.value.reason == "load_failed"


# --- string (categorical) fields ---------------------------------------------------------------


def test_string_fields_are_text_features_with_their_valid_values(regression) -> None:
    assert regression.input_names == ("x", "color", "n", "flag")
    assert regression.numeric_features == ("x", "n", "flag")
    assert regression.text_features == ("color",)
    assert [(f.kind, f.categories) for f in regression.features] == [
        ("numeric", None),
        ("text", ("red", "green", "blue")),  # not the missing "?" nor the invalid "bad"
        ("numeric", None),
        ("numeric", None),  # a boolean: fed as 0/1
    ]


def test_categorical_regression_scores_as_computed_by_hand(regression) -> None:
    numeric = np.array([[3.0, 0.0, 0.0], [-1.0, 1.0, 1.0], [0.25, 2.0, 1.0], [0.5, 0.0, 0.0]])
    colors = text(("red",), ("green",), ("blue",), ("blue",))
    p = regression.predict(numeric, colors)
    assert_consistent(p, 4)
    assert p.valid.all()
    assert p.values.tolist() == [
        1 + 2 * 3.0 + 0.5,
        1 + 2 * -1.0 + 10 * 1 - 1.0 + 100,
        1 + 2 * 0.25 + 10 * 2 + 0.0 + 100,
        1 + 2 * 0.5,
    ]
    # Row by row gives the same.
    for i in range(4):
        assert regression.predict(numeric[i : i + 1], colors[i : i + 1]).values[0] == p.values[i]


def test_the_request_carries_strings_numbers_and_booleans_in_field_order(regression) -> None:
    numeric = np.array([[3.0, 2.0, 1.0], [-1.5, 0.0, 0.0]])
    data = regression._rows(numeric, text(("red",), ("blue",)))
    assert data == b'[[3.0,"red",2.0,true],[-1.5,"blue",0.0,false]]'
    assert regression._request_prefix == b'{"columns":["x","color","n","flag"],"data":'


def test_unknown_and_invalid_categories_give_invalid_rows(regression) -> None:
    numeric = np.zeros((3, 3))
    p = regression.predict(numeric, text(("purple",), ("bad",), ("red",)))
    assert p.valid.tolist() == [False, False, True]
    assert p.values[2] == 1.5


def test_tree_classifier_on_a_string_split_as_computed_by_hand(tree) -> None:
    assert tree.task == "classification"
    assert tree.class_labels == ("no", "yes")
    assert tree.output_names == ("p_no", "p_yes")
    assert tree.text_features == ("color",) and tree.numeric_features == ("size",)
    assert tree.features[0].categories == ("red", "green", "blue")
    numeric = np.array([[1.0], [5.0], [2.0], [3.0], [9.0]])
    colors = text(("red",), ("green",), ("blue",), ("green",), ("purple",))
    p = tree.predict(numeric, colors)
    assert_consistent(p, 5)
    assert p.valid.tolist() == [True, True, True, True, False]
    assert p.labels == ["yes", "yes", "no", "no", ""]
    np.testing.assert_array_equal(
        p.probabilities[:4], [[0.125, 0.875], [0.25, 0.75], [0.75, 0.25], [0.75, 0.25]]
    )
    assert np.isnan(p.probabilities[4]).all()
    assert np.isnan(p.values).all()  # "yes"/"no" have no numeric value


def _without_values(doc: bytes) -> bytes:
    return b"\n".join(line for line in doc.split(b"\n") if b"<Value " not in line)


def test_a_string_field_without_values_has_unknown_categories() -> None:
    """PMML4S makes up valid values from the values the model mentions (red; red, green, blue)
    when the DataDictionary declares none, yet scores any string: no categories then."""
    runtime = PmmlRuntime(_without_values(TREE_PMML))
    assert runtime.features[0].kind == "text" and runtime.features[0].categories is None
    p = runtime.predict(np.array([[1.0], [1.0]]), text(("red",), ("mauve",)))
    assert p.valid.all()
    assert p.labels == ["yes", "no"]  # any string goes; "mauve" is simply not red

    runtime = PmmlRuntime(_without_values(REGRESSION_PMML))
    assert [f.categories for f in runtime.features] == [None, None, None, None]
    p = runtime.predict(np.zeros((2, 3)), text(("red",), ("mauve",)))
    assert p.valid.all() and p.values.tolist() == [1.5, 1.0]


def test_a_failing_batch_with_text_is_retried_row_by_row(tree) -> None:
    runtime = PmmlRuntime(TREE_PMML)
    runtime._model = Flaky(runtime._model, '"blue"')
    p = runtime.predict(np.array([[1.0], [2.0], [5.0]]), text(("red",), ("blue",), ("green",)))
    assert p.valid.tolist() == [True, False, True]
    assert p.labels == ["yes", "", "yes"]


def test_text_features_are_required_in_the_right_shape(tree) -> None:
    with pytest.raises(ValueError, match="text features"):
        tree.predict(np.array([[1.0]]))
    with pytest.raises(ValueError, match="text features"):
        tree.predict(np.array([[1.0]]), text(("red", "extra")))


def test_field_types_other_than_numbers_strings_and_booleans_are_unsupported() -> None:
    doc = REGRESSION_PMML.replace(
        b'name="x" optype="continuous" dataType="double"',
        b'name="x" optype="continuous" dataType="date"',
    ).replace(b'<NumericPredictor name="x" coefficient="2.0"/>', b"")
    with pytest.raises(ModelError, match=r"x \(date\)") as err:
        PmmlRuntime(doc)
    assert err.value.reason == "unsupported_model"
