"""The ONNX runtime with real models: skl2onnx conversions trained here, hand-built graphs for
shapes skl2onnx does not emit, and the wine models shipped in models/."""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from flowtools import WINE_FEATURES
from onnx import OperatorSetIdProto, TensorProto, helper, numpy_helper

from dataflows.runtimes import ModelError, OnnxRuntime, Prediction, load_runtime
from protos import waxserve_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ["wine-lr", "wine-gbt", "wine-rf-classifier", "wine-logreg-zipmap"]


@pytest.fixture(autouse=True)
def _quiet_sklearn():
    # Convergence and feature-name warnings from tiny training runs say nothing here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def wine() -> tuple[np.ndarray, np.ndarray]:
    """Features (n, 11) in WINE_FEATURES order, and quality labels (n,)."""
    data = np.loadtxt(REPO / "models" / "data" / "winequality_red.csv", delimiter=";")
    return np.ascontiguousarray(data[:, :11]), data[:, 11].astype(np.int64)


@pytest.fixture(scope="module")
def iris() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_iris

    x, y = load_iris(return_X_y=True)
    return np.ascontiguousarray(x), y


def assert_consistent(p: Prediction, n: int) -> None:
    assert p.values.dtype == np.float64 and p.values.shape == (n,)
    assert p.valid.dtype == bool and p.valid.shape == (n,)
    if p.labels is None:
        assert p.probabilities is None and p.class_labels == ()
    else:
        assert len(p.labels) == n
        assert p.probabilities is not None
        assert p.probabilities.dtype == np.float64
        assert p.probabilities.shape == (n, len(p.class_labels))


def probabilities(p: Prediction) -> np.ndarray:
    """A classifier's probabilities (a regressor has none)."""
    assert p.probabilities is not None
    return p.probabilities


def to_onnx_bytes(model: object, n_features: int, *, double: bool = False, **options: object):
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType

    tensor = DoubleTensorType if double else FloatTensorType
    onx = to_onnx(
        model,
        initial_types=[("input", tensor([None, n_features]))],
        options={id(model): options} if options else None,
    )
    return onx.SerializeToString()


ROWS = numpy_helper.from_array(np.array([1], dtype=np.int64), "rows")
"""Axes input of a ReduceSum over each row's columns."""


def make_model(nodes, inputs, outputs, initializers=(), *, opset: int = 17) -> bytes:
    """Serialized ONNX model of a hand-built graph (ai.onnx.ml opset 2)."""
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("ai.onnx.ml", 2)],
    )
    model.ir_version = 8
    return model.SerializeToString()


def classlabel_attributes(blob: bytes) -> list[str]:
    import onnx

    graph = onnx.load_model_from_string(blob).graph
    return [a.name for n in graph.node for a in n.attribute if a.name.startswith("classlabels")]


# --- the shipped wine models -------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_wine_models_score_as_onnxruntime_does(wine, name) -> None:
    blob = (REPO / "models" / f"{name}.onnx").read_bytes()
    runtime = load_runtime(pb.MODEL_FORMAT_ONNX, blob, WINE_FEATURES)
    assert runtime.input_names == runtime.numeric_features == WINE_FEATURES
    assert runtime.text_features == ()
    assert all(f.kind == "numeric" and f.categories is None for f in runtime.features)
    x = wine[0][:1000]
    p = runtime.predict(x)
    assert_consistent(p, len(x))
    assert p.valid.all()

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # as the runtime's: tree sums are ordered by threads
    session = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.astype(np.float32)}
    direct = session.run(None, feed)
    if runtime.task == "regression":
        np.testing.assert_array_equal(p.values, np.asarray(direct[0], np.float64).reshape(-1))
        return
    assert p.labels == [str(x) for x in direct[0].tolist()]
    if isinstance(direct[1], list):  # ZipMap
        expected = np.array([[m[int(c)] for c in runtime.class_labels] for m in direct[1]])
    else:
        expected = np.asarray(direct[1], np.float64)
    np.testing.assert_array_equal(p.probabilities, expected)


# --- sklearn regressors and classifiers --------------------------------------------------


@pytest.fixture(scope="module")
def wine_models(wine) -> dict[str, tuple[object, bytes]]:
    """Small sklearn models trained on wine, each with its ONNX bytes."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features, quality = wine
    linear = LinearRegression().fit(features, quality.astype(float))
    forest = RandomForestClassifier(n_estimators=10, max_depth=5, random_state=0)
    forest.fit(features, quality)
    logistic = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    logistic.fit(features, quality)
    named = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    named.fit(features, np.array([f"q{q}" for q in quality]))
    return {
        "linear": (linear, to_onnx_bytes(linear, 11)),
        "linear64": (linear, to_onnx_bytes(linear, 11, double=True)),
        "forest": (forest, to_onnx_bytes(forest, 11, zipmap=False)),
        "logistic_zipmap": (logistic, to_onnx_bytes(logistic, 11)),
        "named_zipmap": (named, to_onnx_bytes(named, 11)),
    }


@pytest.mark.parametrize("name", ["linear", "linear64"])
def test_regressor_matches_sklearn(wine_models, wine, name) -> None:
    model, blob = wine_models[name]
    features, _ = wine
    runtime = load_runtime(pb.MODEL_FORMAT_ONNX, blob, WINE_FEATURES)
    assert isinstance(runtime, OnnxRuntime)
    assert (runtime.format, runtime.task, runtime.input_names) == (
        "onnx",
        "regression",
        WINE_FEATURES,
    )
    p = runtime.predict(features)
    assert_consistent(p, len(features))
    tolerance = 1e-9 if name == "linear64" else 1e-4
    np.testing.assert_allclose(p.values, model.predict(features), rtol=0, atol=tolerance)
    assert p.valid.all()


@pytest.mark.parametrize("name", ["forest", "logistic_zipmap", "named_zipmap"])
def test_wine_classifier_matches_sklearn(wine_models, wine, name) -> None:
    model, blob = wine_models[name]
    features, _ = wine
    runtime = OnnxRuntime(blob, WINE_FEATURES)
    assert runtime.task == "classification"
    assert runtime.class_labels == tuple(str(c) for c in model.classes_)
    p = runtime.predict(features)
    assert_consistent(p, len(features))
    assert p.valid.all()
    expected = model.predict_proba(features)
    np.testing.assert_allclose(probabilities(p), expected, rtol=0, atol=1e-5)
    # Labels agree wherever float32 rounding cannot flip the argmax.
    top2 = np.sort(expected, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4
    assert clear.mean() > 0.9
    predicted = np.array([str(x) for x in model.predict(features)])
    np.testing.assert_array_equal(np.array(p.labels)[clear], predicted[clear])
    if name == "named_zipmap":  # non-numeric labels have no numeric value
        assert np.isnan(p.values).all()
    else:
        np.testing.assert_array_equal(p.values, np.array(p.labels, dtype=float))


def _iris_classifier(kind: str):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import GaussianNB
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier

    return {
        "logistic": lambda: LogisticRegression(max_iter=500),
        "forest": lambda: RandomForestClassifier(n_estimators=5, max_depth=3, random_state=0),
        "naive_bayes": GaussianNB,
        "knn": lambda: KNeighborsClassifier(5),
        "mlp": lambda: MLPClassifier((6,), max_iter=200, random_state=0),
    }[kind]()


# (estimator, skl2onnx options, where the class labels come from). What skl2onnx 1.20 emits:
# LogisticRegression / RandomForest: a LinearClassifier / TreeEnsembleClassifier node with
# classlabels_* (plus a ZipMap with the same keys by default); GaussianNB, KNeighbors and MLP:
# no classlabels_* at all, the label is ArrayFeatureExtractor(<class constant>, ArgMax(...));
# `output_class_labels` adds a third output, the classes as a constant [C] tensor.
CLASSIFIER_CASES = [
    ("logistic", {}, "zipmap"),
    ("logistic", {"zipmap": False}, "classlabels"),
    ("forest", {}, "zipmap"),
    ("forest", {"zipmap": False}, "classlabels"),
    ("naive_bayes", {"zipmap": False}, "constant"),
    ("knn", {"zipmap": False}, "constant"),
    ("mlp", {"zipmap": False}, "constant"),
    ("logistic", {"zipmap": False, "output_class_labels": True}, "classes_output"),
]


@pytest.mark.parametrize("labels", ["int", "str"])
@pytest.mark.parametrize(("kind", "options", "source"), CLASSIFIER_CASES)
def test_classifier_label_sources(iris, kind, options, source, labels) -> None:
    x, y = iris
    target = y if labels == "int" else np.array(["setosa", "versicolor", "virginica"])[y]
    model = _iris_classifier(kind).fit(x, target)
    blob = to_onnx_bytes(model, 4, **options)
    runtime = OnnxRuntime(blob, ["sl", "sw", "pl", "pw"])
    assert runtime.task == "classification"
    assert runtime.class_labels == tuple(str(c) for c in model.classes_)
    attributes = classlabel_attributes(blob)
    if source == "constant":
        assert attributes == []  # the labels can only have come from the class constant
    if source == "classes_output":
        assert runtime._classes_output in runtime.output_names
        assert len(runtime.output_names) == 3
    p = runtime.predict(x)
    assert_consistent(p, len(x))
    assert p.valid.all()
    # Float32 distances can break k-NN ties differently from sklearn on a row or two.
    close = np.abs(p.probabilities - model.predict_proba(x)).max(axis=1) < 1e-5
    assert close.mean() > 0.98
    assert (np.array(p.labels) == model.predict(x).astype(str)).mean() > 0.98
    if labels == "int":
        np.testing.assert_array_equal(p.values, np.array(p.labels, dtype=float))
    else:
        assert np.isnan(p.values).all()


def test_class_labels_from_a_constant_node_through_gather() -> None:
    """A label picked by Gather from a Constant node (not an initializer) of string labels."""
    classes = numpy_helper.from_array(np.array(["lo", "mid", "hi"], dtype=object), "classes")
    nodes = [
        helper.make_node("Constant", [], ["classes"], value=classes),
        helper.make_node("Softmax", ["x"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["probabilities"], ["best"], axis=1, keepdims=0),
        helper.make_node("Gather", ["classes", "best"], ["picked"], axis=0),
        helper.make_node("Identity", ["picked"], ["label"]),
    ]
    blob = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
        [
            helper.make_tensor_value_info("label", TensorProto.STRING, [None]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 3]),
        ],
    )
    runtime = OnnxRuntime(blob, ["a", "b", "c"])
    assert runtime.class_labels == ("lo", "mid", "hi")
    p = runtime.predict(np.array([[0.0, 5.0, 1.0], [9.0, 0.0, 0.0]]))
    assert p.labels == ["mid", "lo"]
    assert np.argmax(probabilities(p), axis=1).tolist() == [1, 0]


def test_class_labels_sort_numerically_for_zipmap() -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 2))
    y = np.where(x[:, 0] > 0.5, 10, np.where(x[:, 0] < -0.5, 2, 3))
    model = LogisticRegression().fit(x, y)
    runtime = OnnxRuntime(to_onnx_bytes(model, 2), ["a", "b"])
    assert runtime.class_labels == ("2", "3", "10")
    p = runtime.predict(x)
    np.testing.assert_allclose(probabilities(p), model.predict_proba(x), atol=1e-5)


# --- several inputs: per-column pipelines, grouped inputs, every element type -----------------


@pytest.fixture(scope="module")
def mixed_data() -> dict[str, np.ndarray]:
    """Two string columns, two float columns and an int column, with a target."""
    rng = np.random.default_rng(1)
    n = 300
    color = rng.choice(["red", "green", "blue"], n).astype(object)
    size = rng.choice(["S", "M", "L"], n).astype(object)
    a, b = rng.normal(size=n), rng.normal(size=n)
    k = rng.integers(0, 5, n)
    score = a + 1.5 * (color == "red") - 0.8 * (size == "S") + 0.3 * k - 0.5 + 0.3 * b
    table = np.empty((n, 5), dtype=object)
    table[:, 0], table[:, 1], table[:, 2], table[:, 3], table[:, 4] = color, size, a, b, k
    return {
        "table": table,
        "target": np.where(score > 0.5, "yes", "no"),
        "numeric": np.ascontiguousarray(np.stack([a, b, k.astype(np.float64)], axis=1)),
        "text": np.stack([color, size], axis=1),
    }


def _column_pipeline(estimator: object, data: dict[str, np.ndarray], **encoder: object):
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    transform = ColumnTransformer(
        [
            ("onehot", OneHotEncoder(**encoder), [0, 1]),
            ("scale", StandardScaler(), [2, 3]),
            ("keep", "passthrough", [4]),
        ]
    )
    return Pipeline([("columns", transform), ("model", estimator)]).fit(
        data["table"], data["target"]
    )


def _per_column_onnx(pipeline: object, **options: object) -> bytes:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, Int64TensorType, StringTensorType

    types = [
        ("color", StringTensorType([None, 1])),
        ("size", StringTensorType([None, 1])),
        ("a", FloatTensorType([None, 1])),
        ("b", FloatTensorType([None, 1])),
        ("k", Int64TensorType([None, 1])),
    ]
    estimator = pipeline.steps[-1][1]  # type: ignore[attr-defined]
    onx = convert_sklearn(
        pipeline, initial_types=types, options={type(estimator): options}, target_opset=17
    )
    return onx.SerializeToString()


# skl2onnx emits, for this pipeline: one OneHotEncoder (cats_strings) per string input behind
# a Gather, a Scaler over Concat(a, b), a Cast of k, a Concat of everything, then the
# classifier node with classlabels_strings ["no", "yes"] (and a ZipMap unless zipmap=False).
@pytest.mark.parametrize("estimator", ["logistic", "forest"])
@pytest.mark.parametrize("zipmap", [True, False])
def test_per_column_pipeline_with_string_and_int_inputs(mixed_data, estimator, zipmap) -> None:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    model = (
        LogisticRegression()
        if estimator == "logistic"
        else RandomForestClassifier(n_estimators=5, max_depth=4, random_state=0)
    )
    pipeline = _column_pipeline(model, mixed_data, handle_unknown="ignore")
    runtime = OnnxRuntime(_per_column_onnx(pipeline, zipmap=zipmap), [])
    assert runtime.input_names == ("color", "size", "a", "b", "k")
    assert runtime.numeric_features == ("a", "b", "k")
    assert runtime.text_features == ("color", "size")
    assert [f.categories for f in runtime.features] == [
        ("blue", "green", "red"),
        ("L", "M", "S"),
        None,
        None,
        None,
    ]
    assert runtime.class_labels == ("no", "yes")
    p = runtime.predict(mixed_data["numeric"], mixed_data["text"])
    assert_consistent(p, len(mixed_data["numeric"]))
    assert p.valid.all()
    expected = pipeline.predict_proba(mixed_data["table"])
    np.testing.assert_allclose(probabilities(p), expected, rtol=0, atol=1e-5)
    clear = np.abs(expected[:, 1] - 0.5) > 1e-4
    np.testing.assert_array_equal(
        np.array(p.labels)[clear], pipeline.predict(mixed_data["table"])[clear]
    )


def test_per_column_names_can_come_from_input_features(mixed_data) -> None:
    from sklearn.linear_model import LogisticRegression

    pipeline = _column_pipeline(LogisticRegression(), mixed_data, handle_unknown="ignore")
    blob = _per_column_onnx(pipeline, zipmap=False)
    names = ["colour", "size_code", "alpha", "beta", "count"]
    runtime = OnnxRuntime(blob, names)
    assert runtime.input_names == tuple(names)
    assert runtime.text_features == ("colour", "size_code")
    with pytest.raises(ModelError, match=r"5 columns .*color: tensor\(string\)") as err:
        OnnxRuntime(blob, names[:4])
    assert err.value.reason == "bad_inputs"


def test_grouped_string_input_reports_each_columns_categories(mixed_data) -> None:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import StringTensorType
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder

    text = mixed_data["text"]
    for encoder in (OneHotEncoder(handle_unknown="ignore"), OrdinalEncoder()):
        pipeline = Pipeline([("encode", encoder), ("model", LogisticRegression())])
        pipeline.fit(text, mixed_data["target"])
        blob = convert_sklearn(
            pipeline, initial_types=[("s", StringTensorType([None, 2]))], target_opset=17
        ).SerializeToString()
        with pytest.raises(ModelError, match="'s' holds 2 columns") as err:
            OnnxRuntime(blob, [])
        assert err.value.reason == "bad_inputs"
        runtime = OnnxRuntime(blob, ["color", "size"])
        # OneHotEncoder: cats_strings behind a Gather per column; OrdinalEncoder: a
        # LabelEncoder (keys_strings) behind an ArrayFeatureExtractor per column.
        assert [f.categories for f in runtime.features] == [
            ("blue", "green", "red"),
            ("L", "M", "S"),
        ]
        p = runtime.predict(np.empty((len(text), 0)), text)
        np.testing.assert_allclose(probabilities(p), pipeline.predict_proba(text), atol=1e-5)


def _every_type_model() -> bytes:
    """A regressor over inputs of every element type, grouped and single, [N] and [N, 1].

    y = Concat(num (3), LabelEncoder(color), k, flag, tags -> 2 LabelEncoders, i32, d) @ w
    """
    f, d = TensorProto.FLOAT, TensorProto.DOUBLE
    as_column = numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), "as_column")
    first = numpy_helper.from_array(np.array([0], dtype=np.int64), "first")
    second = numpy_helper.from_array(np.array([1], dtype=np.int64), "second")
    weights = numpy_helper.from_array(
        np.array([[1.0], [3.0], [7.0], [11.0], [13.0], [17.0], [19.0], [23.0], [29.0], [31.0]]),
        "weights",
    )

    def encoder(source: str, out: str, keys: list[str], values: list[float]):
        return helper.make_node(
            "LabelEncoder",
            [source],
            [out],
            domain="ai.onnx.ml",
            keys_strings=keys,
            values_floats=values,
            default_float=-1.0,
        )

    nodes = [
        helper.make_node("Cast", ["num"], ["num_d"], to=d),
        encoder("color", "color_f", ["red", "green", "blue"], [1.0, 2.0, 3.0]),
        helper.make_node("Cast", ["color_f"], ["color_d"], to=d),
        helper.make_node("Cast", ["k"], ["k_d1"], to=d),
        helper.make_node("Reshape", ["k_d1", "as_column"], ["k_d"]),
        helper.make_node("Cast", ["flag"], ["flag_d"], to=d),
        helper.make_node("Gather", ["tags", "first"], ["tag0"], axis=1),
        helper.make_node("Gather", ["tags", "second"], ["tag1"], axis=1),
        encoder("tag0", "tag0_f", ["a", "b"], [10.0, 20.0]),
        encoder("tag1", "tag1_f", ["x", "y"], [100.0, 200.0]),
        helper.make_node("Cast", ["tag0_f"], ["tag0_d"], to=d),
        helper.make_node("Cast", ["tag1_f"], ["tag1_d"], to=d),
        helper.make_node("Cast", ["i32"], ["i32_d"], to=d),
        helper.make_node(
            "Concat",
            ["num_d", "color_d", "k_d", "flag_d", "tag0_d", "tag1_d", "i32_d", "dbl"],
            ["all"],
            axis=1,
        ),
        helper.make_node("MatMul", ["all", "weights"], ["y"]),
    ]
    inputs = [
        helper.make_tensor_value_info("num", f, [None, 3]),
        helper.make_tensor_value_info("color", TensorProto.STRING, [None, 1]),
        helper.make_tensor_value_info("k", TensorProto.INT64, [None]),
        helper.make_tensor_value_info("flag", TensorProto.BOOL, [None, 1]),
        helper.make_tensor_value_info("tags", TensorProto.STRING, [None, 2]),
        helper.make_tensor_value_info("i32", TensorProto.INT32, [None, 1]),
        helper.make_tensor_value_info("dbl", d, ["N", 1]),
    ]
    outputs = [helper.make_tensor_value_info("y", d, [None, 1])]
    return make_model(nodes, inputs, outputs, [as_column, first, second, weights])


EVERY_TYPE_NAMES = ["n0", "n1", "n2", "color", "k", "flag", "tag_a", "tag_b", "i32", "dbl"]


def test_every_input_type_is_fed_from_its_columns() -> None:
    runtime = OnnxRuntime(_every_type_model(), EVERY_TYPE_NAMES)
    assert runtime.input_names == tuple(EVERY_TYPE_NAMES)
    assert runtime.numeric_features == ("n0", "n1", "n2", "k", "flag", "i32", "dbl")
    assert runtime.text_features == ("color", "tag_a", "tag_b")
    categories = {f.name: f.categories for f in runtime.features}
    assert categories == {
        **{name: None for name in runtime.numeric_features},
        "color": ("red", "green", "blue"),
        "tag_a": ("a", "b"),
        "tag_b": ("x", "y"),
    }
    numeric = np.array(
        [
            [1.0, 2.0, 3.0, 4.0, 1.0, -5.0, 0.5],
            [0.0, -1.0, 0.25, 0.0, 0.0, 7.0, -2.0],
            [8.0, 8.0, 8.0, 123456789.0, 1.0, 2.0, 0.0],
        ]
    )
    text = np.array([["green", "b", "x"], ["blue", "a", "y"], ["mauve", "z", "x"]], dtype=object)
    p = runtime.predict(numeric, text)
    assert_consistent(p, 3)
    assert p.valid.all()
    color = {"red": 1.0, "green": 2.0, "blue": 3.0}
    tag_a, tag_b = {"a": 10.0, "b": 20.0}, {"x": 100.0, "y": 200.0}
    weights = np.array([1.0, 3.0, 7.0, 11.0, 13.0, 17.0, 19.0, 23.0, 29.0, 31.0])
    for i in range(3):
        row = [
            *numeric[i, :3],
            color.get(text[i, 0], -1.0),
            numeric[i, 3],
            numeric[i, 4],
            tag_a.get(text[i, 1], -1.0),
            tag_b.get(text[i, 2], -1.0),
            numeric[i, 5],
            numeric[i, 6],
        ]
        assert p.values[i] == float(np.dot(row, weights))


def test_input_features_must_name_every_column_of_every_input() -> None:
    blob = _every_type_model()
    with pytest.raises(ModelError) as err:
        OnnxRuntime(blob, [])
    assert err.value.reason == "bad_inputs"
    assert "'num' holds 3 columns" in str(err.value)
    with pytest.raises(ModelError, match=r"10 columns .*tags: tensor\(string\)") as err:
        OnnxRuntime(blob, EVERY_TYPE_NAMES[:-1])
    assert err.value.reason == "bad_inputs"
    with pytest.raises(ModelError, match="duplicates") as err:
        OnnxRuntime(blob, [*EVERY_TYPE_NAMES[:-1], "n0"])
    assert err.value.reason == "bad_inputs"


def test_an_input_of_unfixed_width_takes_the_named_columns_the_others_leave() -> None:
    nodes = [
        helper.make_node("Concat", ["x", "z"], ["xz"], axis=1),
        helper.make_node("ReduceSum", ["xz", "rows"], ["y"], keepdims=0),
    ]
    blob = make_model(
        nodes,
        [
            helper.make_tensor_value_info("x", TensorProto.DOUBLE, [None, "k"]),
            helper.make_tensor_value_info("z", TensorProto.DOUBLE, [None, 1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [None])],
        [ROWS],
    )
    runtime = OnnxRuntime(blob, ["a", "b", "c"])
    assert runtime.input_names == ("a", "b", "c")
    p = runtime.predict(np.array([[1.0, 2.0, 4.0]]))
    assert p.values.tolist() == [7.0]
    with pytest.raises(ModelError) as err:
        OnnxRuntime(blob, ["a"])
    assert err.value.reason == "bad_inputs"


def test_categories_are_unknown_when_a_text_feature_is_used_otherwise() -> None:
    """Through Concat to one LabelEncoder: both columns get its keys. A string compared with
    Equal: the model may accept any string, so no categories."""
    red = numpy_helper.from_array(np.array(["red"], dtype=object), "red")
    nodes = [
        helper.make_node("Concat", ["s1", "s2"], ["both"], axis=1),
        helper.make_node(
            "LabelEncoder",
            ["both"],
            ["codes"],
            domain="ai.onnx.ml",
            keys_strings=["p", "q"],
            values_floats=[1.0, 2.0],
        ),
        helper.make_node("ReduceSum", ["codes", "rows"], ["coded"], keepdims=0),
        helper.make_node("Equal", ["s3", "red"], ["is_red"]),
        helper.make_node("Cast", ["is_red"], ["red_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["red_f", "rows"], ["red_sum"], keepdims=0),
        helper.make_node("Add", ["coded", "red_sum"], ["y"]),
    ]
    string = TensorProto.STRING
    blob = make_model(
        nodes,
        [helper.make_tensor_value_info(name, string, [None, 1]) for name in ("s1", "s2", "s3")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        [red, ROWS],
        opset=19,  # Equal on strings
    )
    runtime = OnnxRuntime(blob, [])
    assert [f.categories for f in runtime.features] == [("p", "q"), ("p", "q"), None]
    p = runtime.predict(np.empty((2, 0)), np.array([["p", "q", "red"], ["q", "q", "x"]], object))
    assert p.values.tolist() == [4.0, 4.0]


# --- bad rows ------------------------------------------------------------------------------


def test_a_row_that_fails_the_batch_is_isolated(mixed_data) -> None:
    """OneHotEncoder(handle_unknown="error") makes onnxruntime fail the whole call on an unknown
    category: the runtime retries row by row and only that row comes back invalid. (It loads
    at all because the self-test row uses each text feature's first known category.)"""
    from sklearn.linear_model import LogisticRegression

    pipeline = _column_pipeline(LogisticRegression(), mixed_data, handle_unknown="error")
    runtime = OnnxRuntime(_per_column_onnx(pipeline, zipmap=False), [])
    numeric = mixed_data["numeric"][:5].copy()
    text = mixed_data["text"][:5].copy()
    text[2, 0] = "purple"
    p = runtime.predict(numeric, text)
    assert_consistent(p, 5)
    assert p.valid.tolist() == [True, True, False, True, True]
    assert p.labels is not None and p.labels[2] == "" and np.isnan(probabilities(p)[2]).all()
    good = [0, 1, 3, 4]
    expected = pipeline.predict_proba(mixed_data["table"][good])
    np.testing.assert_allclose(probabilities(p)[good], expected, rtol=0, atol=1e-5)


def test_nan_input_gives_invalid_rows(wine_models, wine) -> None:
    _, blob = wine_models["linear64"]
    runtime = OnnxRuntime(blob, WINE_FEATURES)
    features = wine[0][:4].copy()
    features[2, 5] = np.nan
    p = runtime.predict(features)
    assert p.valid.tolist() == [True, True, False, True]
    assert np.isnan(p.values[2]) and np.isfinite(p.values[[0, 1, 3]]).all()


# --- refused models -------------------------------------------------------------------------


def test_input_features_must_match_the_input_width(wine_models) -> None:
    _, blob = wine_models["linear"]
    with pytest.raises(ModelError, match=r"11 columns .* 3 input_features") as err:
        OnnxRuntime(blob, ["alcohol", "ph", "density"])
    assert err.value.reason == "bad_inputs"
    with pytest.raises(ModelError, match="'input' holds 11 columns") as err:
        load_runtime(pb.MODEL_FORMAT_ONNX, blob, [])
    assert err.value.reason == "bad_inputs"


def test_graph_that_is_neither_regressor_nor_classifier() -> None:
    blob = make_model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
    )
    with pytest.raises(ModelError) as err:
        OnnxRuntime(blob, ["a", "b", "c"])
    assert err.value.reason == "unsupported_model"


@pytest.mark.parametrize(
    ("element", "shape"),
    [
        (TensorProto.FLOAT16, [None, 2]),
        (TensorProto.UINT8, [None, 2]),
        (TensorProto.FLOAT, [None, 2, 2]),
    ],
)
def test_inputs_of_other_types_or_ranks_are_unsupported(element, shape) -> None:
    blob = make_model(
        [
            helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", ["xf", "rows"], ["y"], keepdims=0),
        ],
        [helper.make_tensor_value_info("x", element, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        [ROWS],
    )
    with pytest.raises(ModelError, match="'x'") as err:
        OnnxRuntime(blob, ["a", "b"])
    assert err.value.reason == "unsupported_model"


def test_bad_bytes_fail_to_load() -> None:
    with pytest.raises(ModelError) as err:
        OnnxRuntime(b"definitely not an onnx model \x00\xff", ["a"])
    assert err.value.reason == "load_failed"
    pmml = (REPO / "models" / "pmml" / "winequalityLinearRegression.pmml").read_bytes()
    with pytest.raises(ModelError) as err:
        load_runtime(pb.MODEL_FORMAT_ONNX, pmml, ["a"])
    assert err.value.reason == "load_failed"


# --- external data ---------------------------------------------------------------------------

SECRET = np.array([1.5, 2.5, 3.5, 4.5], dtype=np.float32)


def _external(name: str) -> TensorProto:
    """A float [4] tensor whose data is 16 bytes of the file "secret.bin"."""
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[4])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "secret.bin"), ("offset", "0"), ("length", "16")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _opset(domain: str, version: int) -> OperatorSetIdProto:
    return helper.make_opsetid(domain, version)


def _leaking_model(where: str) -> bytes:
    """y = x + c, where c comes from secret.bin by way of `where`."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    add = helper.make_node("Add", ["x", "c"], ["y"])
    if where == "initializer":
        return make_model([add], [x], [y], [_external("c")])
    if where == "constant":
        constant = helper.make_node("Constant", [], ["c"], value=_external("v"), name="exfil")
        return make_model([constant, add], [x], [y])
    if where == "constant_of_shape":  # a tensor attribute of a node other than Constant
        shape = numpy_helper.from_array(np.array([4], dtype=np.int64), "shape")
        fill = _external("fill")
        fill.dims[:] = [1]
        fill.external_data[2].value = "4"
        node = helper.make_node("ConstantOfShape", ["shape"], ["c"], value=fill, name="exfil")
        return make_model([node, add], [x], [y], [shape])
    if where == "sparse_initializer":
        values = _external("c_values")
        indices = numpy_helper.from_array(np.arange(4, dtype=np.int64), "c_indices")
        sparse = helper.make_sparse_tensor(values, indices, [4])
        sparse.values.name = "c"
        graph = helper.make_graph([add], "g", [x], [y], sparse_initializer=[sparse])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model.SerializeToString()
    if where == "function":  # a Constant in the body of a model-local function
        body = [
            helper.make_node("Constant", [], ["k"], value=_external("v"), name="in_function"),
            helper.make_node("Add", ["a", "k"], ["b"]),
        ]
        leak = helper.make_function("local", "Leak", ["a"], ["b"], body, [_opset("", 17)])
        call = helper.make_node("Leak", ["x"], ["y"], domain="local")
        graph = helper.make_graph([call], "g", [x], [y])
        opsets = [_opset("", 17), _opset("local", 1)]
        model = helper.make_model(graph, opset_imports=opsets, functions=[leak])
        model.ir_version = 8
        return model.SerializeToString()
    assert where == "if_branch"  # a Constant inside a subgraph
    cond = numpy_helper.from_array(np.array(True), "cond")
    branch_out = helper.make_tensor_value_info("c", TensorProto.FLOAT, [4])
    then = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=_external("v"), name="deep")],
        "then",
        [],
        [branch_out],
    )
    other = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(SECRET * 0, "z"))],
        "else",
        [],
        [branch_out],
    )
    choose = helper.make_node("If", ["cond"], ["c"], then_branch=then, else_branch=other)
    return make_model([choose, add], [x], [y], [cond])


@pytest.mark.parametrize(
    "where",
    ["initializer", "constant", "constant_of_shape", "sparse_initializer", "if_branch", "function"],
)
def test_models_referring_to_external_data_are_refused(where, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(SECRET.tobytes())
    blob = _leaking_model(where)
    if where in ("initializer", "constant"):
        # The threat is real: onnxruntime itself (without graph optimizations, which happen to
        # trip over it) reads the file next to it and serves its bytes as model output.
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(blob, sess_options=options)
        leaked = session.run(None, {"x": np.zeros((1, 4), np.float32)})[0]
        np.testing.assert_array_equal(leaked[0], SECRET)
    before = secret.stat()
    os.utime(secret, ns=(0, before.st_mtime_ns))  # atime 0: a read would move it (relatime)
    with pytest.raises(ModelError, match="external") as err:
        OnnxRuntime(blob, ["a", "b", "c", "d"])
    assert err.value.reason == "unsupported_model"
    if where in ("constant", "constant_of_shape", "if_branch"):
        assert "node" in str(err.value)
    assert "secret.bin" in str(err.value)
    assert secret.stat().st_atime_ns == 0


@pytest.mark.parametrize("where", ["constant", "if_branch", "function", "constant_of_shape"])
def test_the_file_an_external_reference_names_is_never_opened(where, tmp_path, monkeypatch) -> None:
    """The file is a FIFO: opening it for reading blocks until a writer comes, so a load
    that opened it would never return (the thread is let go and the test fails)."""
    monkeypatch.chdir(tmp_path)
    os.mkfifo(tmp_path / "secret.bin")
    outcome: list[BaseException] = []

    def load() -> None:
        try:
            OnnxRuntime(_leaking_model(where), ["a", "b", "c", "d"])
        except ModelError as exc:
            outcome.append(exc)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    loader.join(60)  # only a regression waits this long
    if loader.is_alive():
        writer = os.open(tmp_path / "secret.bin", os.O_WRONLY | os.O_NONBLOCK)
        os.close(writer)  # the reader sees end of file and the load goes on
        pytest.fail(f"the model's external file was opened ({where})")
    (error,) = outcome
    assert error.reason == "unsupported_model" and "secret.bin" in str(error)  # type: ignore[attr-defined]


def test_ort_format_bytes_are_refused_before_onnxruntime_sees_them() -> None:
    with pytest.raises(ModelError, match="ORT-format") as err:
        OnnxRuntime(b"\x00\x00\x00\x00ORTM" + b"\x00" * 64, ["a"])
    assert err.value.reason == "unsupported_model"


def test_onnxruntime_gets_the_model_as_checked_without_unknown_fields() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])
    blob = make_model([helper.make_node("Identity", ["x"], ["y"])], [x], [y])
    # Field 999 is not in this onnx's ModelProto: an unknown field, dropped unread.
    runtime = OnnxRuntime(blob + b"\xba\x3e\x03abc", ["a"])
    assert runtime.predict(np.array([[2.5]])).values.tolist() == [2.5]


def test_close_then_predict_is_a_caller_error(wine_models) -> None:
    runtime = OnnxRuntime(wine_models["linear"][1], WINE_FEATURES)
    runtime.close()
    runtime.close()
    with pytest.raises(RuntimeError, match="closed"):
        runtime.predict(np.zeros((1, 11)))
