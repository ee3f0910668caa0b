"""Model runtimes with real models: sklearn models converted to ONNX, and the wine PMML files."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from dataflows.records import WINE_FEATURES, feature_columns, record_field_for
from dataflows.runtimes import (
    ModelError,
    ModelRuntime,
    OnnxRuntime,
    PmmlRuntime,
    Prediction,
    load_runtime,
)
from protos import waxserve_pb2 as pb

REPO = Path(__file__).resolve().parents[1]
PMML_LR = REPO / "models" / "pmml" / "winequalityLinearRegression.pmml"
PMML_TREE = REPO / "models" / "pmml" / "winequalityDecisionTreeClassification.pmml"
ROW1_SCORE = 5.178126058334128


@pytest.fixture(scope="module")
def wine() -> tuple[np.ndarray, np.ndarray]:
    """Features (n, 11) in WINE_FEATURES order, and quality labels (n,)."""
    data = np.loadtxt(REPO / "models" / "data" / "winequality_red.csv", delimiter=";")
    return np.ascontiguousarray(data[:, :11]), data[:, 11].astype(np.int64)


def columns_for(runtime: ModelRuntime, features: np.ndarray) -> np.ndarray:
    """The wine feature columns a runtime's inputs name, in its input order."""
    fields = [record_field_for(name) for name in runtime.input_names]
    assert None not in fields
    return np.ascontiguousarray(features[:, feature_columns([f for f in fields if f])])


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


@pytest.fixture(scope="module")
def onnx_models(wine, tmp_path_factory) -> dict[str, tuple[object, bytes]]:
    """Tiny sklearn models trained on wine, each with its ONNX bytes (written to a temp dir)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features, quality = wine
    out = tmp_path_factory.mktemp("onnx")
    linear = LinearRegression().fit(features, quality.astype(float))
    forest = RandomForestClassifier(n_estimators=10, max_depth=5, random_state=0)
    forest.fit(features, quality)
    logistic = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    logistic.fit(features, quality)
    named = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    named.fit(features, np.array([f"q{q}" for q in quality]))
    models = {
        "linear": (linear, to_onnx_bytes(linear, 11)),
        "linear64": (linear, to_onnx_bytes(linear, 11, double=True)),
        "forest": (forest, to_onnx_bytes(forest, 11, zipmap=False)),
        "logistic_zipmap": (logistic, to_onnx_bytes(logistic, 11)),
        "named_zipmap": (named, to_onnx_bytes(named, 11)),
    }
    for name, (_, blob) in models.items():
        (out / f"{name}.onnx").write_bytes(blob)
    return {
        name: (model, (out / f"{name}.onnx").read_bytes()) for name, (model, _) in models.items()
    }


@pytest.fixture(scope="module")
def pmml_lr() -> PmmlRuntime:
    return PmmlRuntime(PMML_LR.read_bytes())


@pytest.fixture(scope="module")
def pmml_tree() -> PmmlRuntime:
    return PmmlRuntime(PMML_TREE.read_bytes())


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


# --- ONNX ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "linear64"])
def test_onnx_regressor_matches_sklearn(onnx_models, wine, name) -> None:
    model, blob = onnx_models[name]
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
def test_onnx_classifier_matches_sklearn(onnx_models, wine, name) -> None:
    model, blob = onnx_models[name]
    features, _ = wine
    runtime = OnnxRuntime(blob, WINE_FEATURES)
    assert runtime.task == "classification"
    classes = [str(c) for c in model.classes_]
    assert runtime.class_labels == tuple(classes)
    p = runtime.predict(features)
    assert_consistent(p, len(features))
    assert p.valid.all()
    expected = model.predict_proba(features)
    np.testing.assert_allclose(p.probabilities, expected, rtol=0, atol=1e-5)
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


def test_onnx_class_labels_sort_numerically_for_zipmap(tmp_path) -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 2))
    y = np.where(x[:, 0] > 0.5, 10, np.where(x[:, 0] < -0.5, 2, 3))
    model = LogisticRegression().fit(x, y)
    runtime = OnnxRuntime(to_onnx_bytes(model, 2), ["a", "b"])
    assert runtime.class_labels == ("2", "3", "10")
    p = runtime.predict(x)
    np.testing.assert_allclose(p.probabilities, model.predict_proba(x), atol=1e-5)


def test_onnx_nan_input_gives_invalid_rows(onnx_models, wine) -> None:
    _, blob = onnx_models["linear64"]
    runtime = OnnxRuntime(blob, WINE_FEATURES)
    features = wine[0][:4].copy()
    features[2, 5] = np.nan
    p = runtime.predict(features)
    assert p.valid.tolist() == [True, True, False, True]
    assert np.isnan(p.values[2]) and np.isfinite(p.values[[0, 1, 3]]).all()


def test_onnx_input_features_must_match_the_input_width(onnx_models) -> None:
    _, blob = onnx_models["linear"]
    with pytest.raises(ModelError, match=r"11 columns .* 3 input_features") as err:
        OnnxRuntime(blob, ["alcohol", "ph", "density"])
    assert err.value.reason == "bad_inputs"
    with pytest.raises(ModelError) as err:
        load_runtime(pb.MODEL_FORMAT_ONNX, blob, [])
    assert err.value.reason == "bad_inputs"


def test_onnx_graph_that_is_neither_regressor_nor_classifier() -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "passthrough",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with pytest.raises(ModelError) as err:
        OnnxRuntime(model.SerializeToString(), ["a", "b", "c"])
    assert err.value.reason == "unsupported_model"


def test_onnx_bad_bytes_fail_to_load() -> None:
    with pytest.raises(ModelError) as err:
        OnnxRuntime(b"definitely not an onnx model \x00\xff", ["a"])
    assert err.value.reason == "load_failed"
    with pytest.raises(ModelError) as err:
        load_runtime(pb.MODEL_FORMAT_ONNX, PMML_LR.read_bytes(), ["a"])
    assert err.value.reason == "load_failed"


# --- PMML ------------------------------------------------------------------------------


def test_pmml_regression_reference_value_alone_and_in_a_batch(pmml_lr, wine) -> None:
    assert pmml_lr.format == "pmml" and pmml_lr.task == "regression"
    assert pmml_lr.input_names == (
        "fixed acidity",
        "volatile acidity",
        "chlorides",
        "total sulfur dioxide",
        "sulphates",
        "alcohol",
    )
    features = columns_for(pmml_lr, wine[0])
    alone = pmml_lr.predict(features[:1])
    assert_consistent(alone, 1)
    assert alone.values[0] == pytest.approx(ROW1_SCORE, rel=1e-9)
    batch = pmml_lr.predict(features)
    assert_consistent(batch, len(features))
    assert batch.values[0] == pytest.approx(ROW1_SCORE, rel=1e-9)
    assert batch.valid.all()
    per_record = np.array([pmml_lr.predict(features[i : i + 1]).values[0] for i in range(300)])
    np.testing.assert_array_equal(batch.values[:300], per_record)


def test_pmml_regression_matches_its_coefficients(pmml_lr, wine) -> None:
    features = columns_for(pmml_lr, wine[0])
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


def test_pmml_tree_probabilities_and_argmax(pmml_tree, wine) -> None:
    assert pmml_tree.task == "classification"
    assert pmml_tree.class_labels == ("3", "4", "5", "6", "7", "8")
    features = columns_for(pmml_tree, wine[0])
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


def test_pmml_nan_inputs_give_invalid_rows_without_raising(pmml_lr, pmml_tree, wine) -> None:
    features = columns_for(pmml_lr, wine[0])[:3].copy()
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


def test_pmml_rows_the_model_refuses_are_invalid(wine) -> None:
    text = PMML_LR.read_text().replace(
        '<MiningField name="fixed acidity"/>',
        '<MiningField name="fixed acidity" missingValueTreatment="returnInvalid"/>',
    )
    runtime = PmmlRuntime(text.encode())
    features = columns_for(runtime, wine[0])[:3].copy()
    features[0, 0] = np.nan
    p = runtime.predict(features)
    assert p.valid.tolist() == [False, True, True]
    assert np.isfinite(p.values[1:]).all()


def test_pmml_a_failing_batch_call_is_retried_row_by_row(wine) -> None:
    runtime = PmmlRuntime(PMML_LR.read_bytes())
    real = runtime._model

    class Flaky:
        """pypmml's Model, but any call that carries the value 999 raises (as Java would)."""

        def predict(self, request: str) -> str:
            if "999.0" in request:
                raise RuntimeError("scoring failed")
            return real.predict(request)

    runtime._model = Flaky()
    features = columns_for(runtime, wine[0])[:4].copy()
    features[2, 1] = 999.0
    p = runtime.predict(features)
    assert p.valid.tolist() == [True, True, False, True]
    assert p.values[0] == pytest.approx(ROW1_SCORE, rel=1e-9) and np.isnan(p.values[2])


def test_pmml_runs_on_the_in_process_jvm(pmml_lr) -> None:
    import jpype
    from pypmml.base import PMMLContext

    assert jpype.isJVMStarted()
    assert PMMLContext.gateway() == "JPype"


def test_pmml_input_features_are_checked_by_canonical_name(wine) -> None:
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
def test_pmml_bad_bytes_fail_to_load(blob) -> None:
    with pytest.raises(ModelError) as err:
        load_runtime(pb.MODEL_FORMAT_PMML, blob, ())
    assert err.value.reason == "load_failed"


def test_pmml_with_an_external_entity_is_refused(tmp_path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("do-not-read")
    text = PMML_LR.read_text()
    doc = (
        f'<?xml version="1.0"?>\n<!DOCTYPE PMML [<!ENTITY x SYSTEM "file://{secret}">]>\n'
        + text.replace('version="1.1.7"', 'version="&x;"')
    )
    with pytest.raises(ModelError) as err:
        PmmlRuntime(doc.encode())
    assert err.value.reason == "load_failed"
    assert "do-not-read" not in str(err.value)


# --- every runtime -------------------------------------------------------------------


@pytest.fixture(
    params=["onnx:linear", "onnx:forest", "onnx:logistic_zipmap", "pmml:lr", "pmml:tree"]
)
def any_runtime(request, onnx_models, pmml_lr, pmml_tree) -> ModelRuntime:
    kind, name = request.param.split(":")
    if kind == "onnx":
        return OnnxRuntime(onnx_models[name][1], WINE_FEATURES)
    return pmml_lr if name == "lr" else pmml_tree


def test_empty_batch(any_runtime) -> None:
    p = any_runtime.predict(np.empty((0, len(any_runtime.input_names))))
    assert_consistent(p, 0)
    assert p.class_labels == any_runtime.class_labels


def test_wrong_feature_width_is_a_caller_error(any_runtime) -> None:
    with pytest.raises(ValueError, match="shape"):
        any_runtime.predict(np.zeros((2, len(any_runtime.input_names) + 1)))


def test_describe(any_runtime) -> None:
    info = any_runtime.describe()
    assert info["format"] == any_runtime.format and info["task"] == any_runtime.task
    assert info["input_names"] == list(any_runtime.input_names)
    assert info["class_labels"] == list(any_runtime.class_labels)
    assert info["output_names"]
    assert bool(info["class_labels"]) == (any_runtime.task == "classification")


def test_concurrent_predicts_agree(any_runtime, wine) -> None:
    features = columns_for(any_runtime, wine[0])
    expected = any_runtime.predict(features)
    failures: list[str] = []

    def work() -> None:
        for _ in range(5):
            p = any_runtime.predict(features)
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
        lambda models: OnnxRuntime(models["linear"][1], WINE_FEATURES),
        lambda models: PmmlRuntime(PMML_LR.read_bytes()),
    ],
)
def test_close_is_idempotent(onnx_models, make: Callable[[dict], ModelRuntime]) -> None:
    runtime = make(onnx_models)
    runtime.close()
    runtime.close()
    with pytest.raises(RuntimeError, match="closed"):
        runtime.predict(np.zeros((1, len(runtime.input_names))))


def test_unknown_format_is_unsupported() -> None:
    with pytest.raises(ModelError) as err:
        load_runtime(pb.MODEL_FORMAT_UNSPECIFIED, b"", ())
    assert err.value.reason == "unsupported_model"
