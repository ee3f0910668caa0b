"""What every runtime does alike (shapes, empty batches, describe, threads, close), the shared
helpers, and the package's public names."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flowtools import WINE_FEATURES
from onnx import TensorProto, helper, numpy_helper

import dataflows.runtimes as runtimes
from dataflows.runtimes import (
    CLASSIFICATION,
    REGRESSION,
    ModelError,
    ModelFeature,
    ModelRuntime,
    OnnxRuntime,
    PmmlRuntime,
    Prediction,
    canonical_name,
    load_runtime,
)
from dataflows.runtimes.base import _classification, _label_str, _regression, _sorted_labels
from protos import waxserve_pb2 as pb

REPO = Path(__file__).resolve().parents[2]

# y = 2 x + (a: 1 | b: 2); any other word is invalid (the values are declared).
TEXT_PMML = b"""<?xml version="1.0" encoding="UTF-8"?>
<PMML xmlns="http://www.dmg.org/PMML-4_4" version="4.4">
  <Header/>
  <DataDictionary numberOfFields="3">
    <DataField name="word" optype="categorical" dataType="string">
      <Value value="a"/>
      <Value value="b"/>
    </DataField>
    <DataField name="x" optype="continuous" dataType="double"/>
    <DataField name="y" optype="continuous" dataType="double"/>
  </DataDictionary>
  <RegressionModel functionName="regression">
    <MiningSchema>
      <MiningField name="word"/>
      <MiningField name="x"/>
      <MiningField name="y" usageType="target"/>
    </MiningSchema>
    <RegressionTable intercept="0">
      <NumericPredictor name="x" coefficient="2"/>
      <CategoricalPredictor name="word" value="a" coefficient="1"/>
      <CategoricalPredictor name="word" value="b" coefficient="2"/>
    </RegressionTable>
  </RegressionModel>
</PMML>
"""


def text_onnx() -> bytes:
    """y = 2 x + LabelEncoder(word: a 1, b 2, else 0), with the string input first."""
    nodes = [
        helper.make_node(
            "LabelEncoder",
            ["word"],
            ["code"],
            domain="ai.onnx.ml",
            keys_strings=["a", "b"],
            values_floats=[1.0, 2.0],
            default_float=0.0,
        ),
        helper.make_node("Mul", ["x", "two"], ["twice"]),
        helper.make_node("Add", ["twice", "code"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "text",
        [
            helper.make_tensor_value_info("word", TensorProto.STRING, [None]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [None]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        initializer=[numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 2)]
    )
    model.ir_version = 8
    return model.SerializeToString()


@pytest.fixture(scope="module")
def wine() -> np.ndarray:
    data = np.loadtxt(REPO / "models" / "data" / "winequality_red.csv", delimiter=";")
    return np.ascontiguousarray(data[:200, :11])


Batch = tuple[np.ndarray, np.ndarray | None]


@pytest.fixture(
    scope="module",
    params=[
        "onnx:wine-lr",
        "onnx:wine-rf-classifier",
        "onnx:wine-logreg-zipmap",
        "onnx:text",
        "pmml:lr",
        "pmml:tree",
        "pmml:text",
    ],
)
def loaded(request, wine) -> tuple[ModelRuntime, Batch]:
    """A runtime and a batch it can score."""
    kind, name = request.param.split(":")
    words = np.array([["a"], ["b"]] * 50, dtype=object)
    xs = np.arange(100, dtype=np.float64).reshape(-1, 1)
    runtime: ModelRuntime
    if name == "text":
        blob = text_onnx() if kind == "onnx" else TEXT_PMML
        runtime = load_runtime(
            pb.MODEL_FORMAT_ONNX if kind == "onnx" else pb.MODEL_FORMAT_PMML, blob, ()
        )
        return runtime, (xs, words)
    if kind == "onnx":
        blob = (REPO / "models" / f"{name}.onnx").read_bytes()
        runtime = load_runtime(pb.MODEL_FORMAT_ONNX, blob, WINE_FEATURES)
        return runtime, (wine, None)
    path = {"lr": "winequalityLinearRegression", "tree": "winequalityDecisionTreeClassification"}
    runtime = PmmlRuntime((REPO / "models" / "pmml" / f"{path[name]}.pmml").read_bytes())
    index = {canonical_name(f): i for i, f in enumerate(WINE_FEATURES)}
    columns = [index[canonical_name(n)] for n in runtime.input_names]
    return runtime, (np.ascontiguousarray(wine[:, columns]), None)


def assert_consistent(p: Prediction, n: int, runtime: ModelRuntime) -> None:
    assert p.values.dtype == np.float64 and p.values.shape == (n,)
    assert p.valid.dtype == bool and p.valid.shape == (n,)
    assert p.class_labels == runtime.class_labels
    if runtime.task == REGRESSION:
        assert p.labels is None and p.probabilities is None and p.class_labels == ()
    else:
        assert p.labels is not None and len(p.labels) == n
        assert p.probabilities is not None and p.probabilities.dtype == np.float64
        assert p.probabilities.shape == (n, len(p.class_labels))


# --- every runtime ----------------------------------------------------------------------------


def test_feature_views_agree(loaded) -> None:
    runtime, _ = loaded
    assert runtime.input_names == tuple(f.name for f in runtime.features)
    assert set(runtime.numeric_features) | set(runtime.text_features) == set(runtime.input_names)
    order = {name: i for i, name in enumerate(runtime.input_names)}
    for view in (runtime.numeric_features, runtime.text_features):
        assert [order[x] for x in view] == sorted(order[x] for x in view)
    assert runtime.task in (REGRESSION, CLASSIFICATION)


def test_a_batch_scores(loaded) -> None:
    runtime, (numeric, text) = loaded
    p = runtime.predict(numeric, text)
    assert_consistent(p, len(numeric), runtime)
    assert p.valid.all()


@pytest.mark.parametrize("kind", ["onnx", "pmml"])
def test_text_models_score_their_words(kind) -> None:
    runtime = OnnxRuntime(text_onnx(), ()) if kind == "onnx" else PmmlRuntime(TEXT_PMML)
    assert runtime.text_features == ("word",) and runtime.numeric_features == ("x",)
    assert runtime.features[0] == ModelFeature("word", "text", ("a", "b"))
    words = np.array([["a"], ["b"], ["a"]], dtype=object)
    p = runtime.predict(np.array([[0.0], [1.0], [2.0]]), words)
    assert p.values.tolist() == [1.0, 4.0, 5.0]


def test_empty_batch(loaded) -> None:
    runtime, (numeric, text) = loaded
    p = runtime.predict(numeric[:0], None if text is None else text[:0])
    assert_consistent(p, 0, runtime)


def test_wrong_shapes_are_caller_errors(loaded) -> None:
    runtime, (numeric, text) = loaded
    with pytest.raises(ValueError, match="shape"):
        runtime.predict(np.zeros((2, numeric.shape[1] + 1)), None if text is None else text[:2])
    with pytest.raises(ValueError, match="shape"):
        runtime.predict(numeric[:, 0], text)
    if text is not None:
        with pytest.raises(ValueError, match="text features"):
            runtime.predict(numeric[:2], None)
        with pytest.raises(ValueError, match="text features"):
            runtime.predict(numeric[:2], text[:3])
    else:
        with pytest.raises(ValueError, match="no text features"):
            runtime.predict(numeric[:2], np.array([["a"], ["b"]], dtype=object))
        # An empty text matrix is the same as none.
        assert runtime.predict(numeric[:2], np.empty((2, 0), dtype=object)).valid.all()


def test_describe(loaded) -> None:
    runtime, _ = loaded
    info = runtime.describe()
    assert info["format"] == runtime.format and info["task"] == runtime.task
    assert info["input_names"] == list(runtime.input_names)
    assert info["features"] == [
        {
            "name": f.name,
            "kind": f.kind,
            "categories": None if f.categories is None else list(f.categories),
        }
        for f in runtime.features
    ]
    assert info["class_labels"] == list(runtime.class_labels)
    assert info["output_names"]
    assert bool(info["class_labels"]) == (runtime.task == CLASSIFICATION)


def test_concurrent_predicts_agree(loaded) -> None:
    runtime, (numeric, text) = loaded
    expected = runtime.predict(numeric, text)
    failures: list[str] = []

    def work() -> None:
        for _ in range(5):
            p = runtime.predict(numeric, text)
            if not np.array_equal(p.values, expected.values, equal_nan=True):
                failures.append("values differ")

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


@pytest.mark.parametrize(
    "make",
    [
        lambda: OnnxRuntime((REPO / "models" / "wine-lr.onnx").read_bytes(), WINE_FEATURES),
        lambda: OnnxRuntime(text_onnx(), ()),
        lambda: PmmlRuntime(TEXT_PMML),
    ],
)
def test_close_is_idempotent(make: Callable[[], ModelRuntime]) -> None:
    runtime = make()
    runtime.close()
    runtime.close()
    words = np.array([["a"]] * len(runtime.text_features), dtype=object).reshape(1, -1)
    with pytest.raises(RuntimeError, match="closed"):
        runtime.predict(np.zeros((1, len(runtime.numeric_features))), words)


def test_unknown_format_is_unsupported() -> None:
    with pytest.raises(ModelError) as err:
        load_runtime(pb.MODEL_FORMAT_UNSPECIFIED, b"", ())
    assert err.value.reason == "unsupported_model"


# --- the package and its helpers -------------------------------------------------------------


def test_public_names() -> None:
    for name in (
        "ModelError",
        "ModelRuntime",
        "ModelFeature",
        "Prediction",
        "REGRESSION",
        "CLASSIFICATION",
        "load_runtime",
        "jvm_started",
        "start_jvm",
        "OnnxRuntime",
        "PmmlRuntime",
        "canonical_name",
    ):
        assert hasattr(runtimes, name), name
    assert (REGRESSION, CLASSIFICATION) == ("regression", "classification")
    feature = ModelFeature("color", "text")
    assert feature.categories is None
    with pytest.raises(AttributeError):
        feature.name = "colour"  # type: ignore[misc]


def test_canonical_name() -> None:
    assert canonical_name("fixed acidity") == "fixed_acidity"
    assert canonical_name("pH") == "ph"
    assert canonical_name("  Total--Sulfur  dioxide ") == "total_sulfur_dioxide"


def test_label_helpers() -> None:
    assert _label_str(5.0) == "5" and _label_str(5.5) == "5.5"
    assert _label_str(b"yes") == "yes" and _label_str(3) == "3"
    assert _sorted_labels(["10", "3", "2"]) == ("2", "3", "10")
    assert _sorted_labels(["b", "10", "a"]) == ("10", "a", "b")


def test_regression_helper_marks_non_finite_values_invalid() -> None:
    p = _regression(np.array([[1.0], [np.inf], [np.nan], [2.0]], dtype=np.float32))
    assert p.valid.tolist() == [True, False, False, True]
    assert p.values[0] == 1.0 and np.isnan(p.values[1:3]).all()


def test_classification_helper() -> None:
    labels = ("3", "5")
    values = np.array([3.0, 5.0])
    probabilities = np.array([[0.2, 0.8], [np.nan, np.nan], [0.6, np.nan]])
    p = _classification(probabilities, labels, values)
    assert p.valid.tolist() == [True, False, True]
    assert p.labels == ["5", "", "3"]
    assert p.values[0] == 5.0 and np.isnan(p.values[1]) and p.values[2] == 3.0
    # A class a valid row has no probability for gets 0 (PMML4S leaves it NaN).
    assert p.probabilities is not None and p.probabilities[2].tolist() == [0.6, 0.0]
    given = _classification(probabilities, labels, values, ["3", "5", "3"])
    assert given.labels == ["3", "", "3"]
    assert given.values[0] == 3.0 and np.isnan(given.values[1])
