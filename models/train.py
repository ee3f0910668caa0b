"""Train the example ONNX wine-quality models and regenerate the model catalog.

Reads the UCI red-wine data (models/data/winequality_red.csv: 11 features then quality,
';'-separated, no header), splits it 80/20 (stratified on quality, fixed seed), trains four
scikit-learn models, converts them to ONNX with skl2onnx and scores the held-out 20% with
onnxruntime (so the metrics are those of the served artifacts). It writes, into --out:

- wine-lr.onnx, wine-gbt.onnx, wine-rf-classifier.onnx, wine-logreg-zipmap.onnx
- wine.profile.json: the waxserve.v1.ReferenceProfile of the training split (drift reference)
- catalog.json: every model the repository ships, including the two PMML models in pmml/

Every ONNX model takes one input "input", float32 [N, 11], columns in WINE_FEATURES order.

Rerun from the repository root (needs the dev extra: scikit-learn, skl2onnx):

    python models/train.py            # or: just train
    python models/train.py --out /tmp/models
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from google.protobuf import json_format  # noqa: E402
from skl2onnx import convert_sklearn  # noqa: E402
from skl2onnx.common.data_types import FloatTensorType  # noqa: E402
from sklearn.base import BaseEstimator  # noqa: E402
from sklearn.ensemble import GradientBoostingRegressor, RandomForestClassifier  # noqa: E402
from sklearn.linear_model import LinearRegression, LogisticRegression  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    accuracy_score,
    f1_score,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
)
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from dataflows.contracts.files import load_contract  # noqa: E402
from dataflows.monitoring.profiles import numeric_profile  # noqa: E402
from protos import waxserve_pb2 as pb  # noqa: E402

MODELS_DIR = REPO_ROOT / "models"
WINE_FEATURES: tuple[str, ...] = load_contract(MODELS_DIR / "wine" / "contract.json").csv_columns[
    :-1
]
"""The 11 wine features: the data file's columns but the last (quality), from its contract."""
DATA_FILE = MODELS_DIR / "data" / "winequality_red.csv"
PROFILE_FILE = "wine.profile.json"
SEED = 42
TEST_SIZE = 0.2
INPUT_NAME = "input"
# Upper bounds; skl2onnx uses the lowest opsets each graph needs. Both load in every
# onnxruntime the project allows (>= 1.20).
TARGET_OPSET = {"": 21, "ai.onnx.ml": 3}
DATA_DESCRIPTION = "the UCI red wine quality data (80% stratified training split)"

PMML_ENTRIES: list[dict[str, Any]] = [
    {
        "file": "pmml/winequalityLinearRegression.pmml",
        "name": "wine-pmml-lr",
        "version": "1",
        "format": "pmml",
        "task": "regression",
        "data_type": "wine",
        "description": (
            "Spark ML linear regression of quality on 6 features of the UCI red wine data, "
            "exported to PMML by JPMML-SparkML 1.1.7."
        ),
        "input_features": [],
        "profile": PROFILE_FILE,
        "metrics": {},
    },
    {
        "file": "pmml/winequalityDecisionTreeClassification.pmml",
        "name": "wine-pmml-tree",
        "version": "1",
        "format": "pmml",
        "task": "classification",
        "data_type": "wine",
        "description": (
            "Spark ML decision tree classifier of quality on 8 features of the UCI red wine "
            "data, exported to PMML by JPMML-SparkML 1.1.7."
        ),
        "input_features": [],
        "profile": PROFILE_FILE,
        "metrics": {},
    },
]


@dataclass(frozen=True)
class Spec:
    """One ONNX model to train."""

    name: str
    task: str  # "regression" or "classification"
    description: str
    estimator: BaseEstimator
    zipmap: bool = True  # classifiers only: keep skl2onnx's ZipMap probabilities output


def model_specs() -> list[Spec]:
    """The ONNX models this script builds, in catalog order."""
    return [
        Spec(
            name="wine-lr",
            task="regression",
            description=f"scikit-learn linear regression of quality on {DATA_DESCRIPTION}.",
            estimator=LinearRegression(),
        ),
        Spec(
            name="wine-gbt",
            task="regression",
            description=(
                f"scikit-learn gradient-boosted trees (150 x depth 3) regressing quality on "
                f"{DATA_DESCRIPTION}."
            ),
            estimator=GradientBoostingRegressor(
                n_estimators=150, max_depth=3, learning_rate=0.1, subsample=0.8, random_state=SEED
            ),
        ),
        Spec(
            name="wine-rf-classifier",
            task="classification",
            description=(
                f"scikit-learn random forest (40 trees, depth <= 8) classifying quality 3..8 on "
                f"{DATA_DESCRIPTION}, probabilities as a float tensor."
            ),
            estimator=RandomForestClassifier(
                n_estimators=40, max_depth=8, min_samples_leaf=2, random_state=SEED, n_jobs=1
            ),
            zipmap=False,
        ),
        Spec(
            name="wine-logreg-zipmap",
            task="classification",
            description=(
                f"scikit-learn standardised multinomial logistic regression classifying quality "
                f"3..8 on {DATA_DESCRIPTION}, probabilities as a ZipMap."
            ),
            estimator=Pipeline(
                [
                    ("scale", StandardScaler()),
                    ("logreg", LogisticRegression(max_iter=2000, random_state=SEED)),
                ]
            ),
        ),
    ]


def load_wine(path: Path = DATA_FILE) -> tuple[np.ndarray, np.ndarray]:
    """Features (float64 [N, 11], WINE_FEATURES order) and quality (int64 [N]) of the CSV."""
    data = np.loadtxt(path, delimiter=";", dtype=np.float64, ndmin=2)
    if data.shape[1] != len(WINE_FEATURES) + 1:
        raise ValueError(f"{path}: expected {len(WINE_FEATURES) + 1} columns, got {data.shape[1]}")
    return data[:, :-1], data[:, -1].astype(np.int64)


def reference_profile(x: np.ndarray, names: tuple[str, ...] = WINE_FEATURES) -> pb.ReferenceProfile:
    """The drift profile of these rows, column j named `names[j]`
    (`dataflows.monitoring.profiles.numeric_profile`: deciles, fractions, mean, population std)."""
    profile = pb.ReferenceProfile(row_count=len(x))
    for j, name in enumerate(names):
        profile.features.append(numeric_profile(name, x[:, j]))
    return profile


def to_onnx(spec: Spec, fitted: BaseEstimator) -> onnx.ModelProto:
    """The fitted estimator as ONNX: input "input" float32 [None, 11]."""
    options = None if spec.zipmap else {id(fitted): {"zipmap": False}}
    model = convert_sklearn(
        fitted,
        name=spec.name,
        initial_types=[(INPUT_NAME, FloatTensorType([None, len(WINE_FEATURES)]))],
        target_opset=TARGET_OPSET,
        options=options,
    )
    model.doc_string = spec.description
    # skl2onnx 1.20 emits opset_import in set order (which varies with PYTHONHASHSEED) and
    # sometimes lists the default domain twice: keep one entry per domain, sorted, so that
    # reruns write byte-identical files.
    opsets: dict[str, int] = {}
    for o in model.opset_import:
        opsets[o.domain] = max(o.version, opsets.get(o.domain, 0))
    del model.opset_import[:]
    for domain in sorted(opsets):
        model.opset_import.add(domain=domain, version=opsets[domain])
    onnx.checker.check_model(model, full_check=True)
    return model


def onnx_predict(model_bytes: bytes, x: np.ndarray, task: str) -> np.ndarray:
    """Score rows with onnxruntime: predicted values (regression) or labels (classification)."""
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {INPUT_NAME: x.astype(np.float32)})
    first = np.asarray(outputs[0])
    return first.reshape(-1) if task == "regression" else first.astype(np.int64)


def check_against_sklearn(
    spec: Spec, fitted: BaseEstimator, x: np.ndarray, onnx_predicted: np.ndarray
) -> None:
    """Warn when the ONNX graph disagrees with the estimator it was converted from."""
    expected = fitted.predict(x.astype(np.float32))
    if spec.task == "regression":
        worst = float(np.max(np.abs(expected - onnx_predicted)))
        if worst > 1e-3:
            print(f"warning: {spec.name}: ONNX differs from sklearn by up to {worst:.2g}")
    else:
        agree = float(np.mean(expected == onnx_predicted))
        if agree < 0.99:
            print(f"warning: {spec.name}: ONNX labels agree with sklearn on {agree:.1%} only")


def evaluate(task: str, y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Held-out metrics: RMSE/MAE/R² for regressors, accuracy/macro-F1 for classifiers."""
    if task == "regression":
        return {
            "rmse": float(np.sqrt(mean_squared_error(y_true, y_pred))),
            "mae": float(mean_absolute_error(y_true, y_pred)),
            "r2": float(r2_score(y_true, y_pred)),
        }
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }


def catalog_entry(spec: Spec, metrics: dict[str, float]) -> dict[str, Any]:
    """The catalog.json entry of an ONNX model (the fields of `CatalogEntry`)."""
    return {
        "file": f"{spec.name}.onnx",
        "name": spec.name,
        "version": "1",
        "format": "onnx",
        "task": spec.task,
        "data_type": "wine",
        "description": spec.description,
        "input_features": list(WINE_FEATURES),
        "profile": PROFILE_FILE,
        "metrics": {k: round(v, 6) for k, v in metrics.items()},
    }


def print_table(results: list[tuple[str, dict[str, float]]]) -> None:
    """The held-out metrics as a fixed-width table."""
    columns = ["rmse", "mae", "r2", "accuracy", "macro_f1"]
    print(f"\n{'model':<20}" + "".join(f"{c:>10}" for c in columns))
    for name, metrics in results:
        cells = "".join(f"{metrics[c]:>10.4f}" if c in metrics else f"{'-':>10}" for c in columns)
        print(f"{name:<20}{cells}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=MODELS_DIR, help="output folder (default: models/)"
    )
    parser.add_argument("--data", type=Path, default=DATA_FILE, help="wine CSV to train on")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    x, y = load_wine(args.data)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_SIZE, random_state=SEED, stratify=y
    )
    print(f"data: {len(x)} rows from {args.data}; train {len(x_train)}, held out {len(x_test)}")

    profile = reference_profile(x_train)
    profile_json = json_format.MessageToJson(profile, preserving_proto_field_name=True, indent=2)
    (out / PROFILE_FILE).write_text(profile_json + "\n")
    print(f"profile: {out / PROFILE_FILE} ({len(profile.features)} features)")

    entries: list[dict[str, Any]] = []
    results: list[tuple[str, dict[str, float]]] = []
    for spec in model_specs():
        target = y_train.astype(np.float64) if spec.task == "regression" else y_train
        fitted = spec.estimator.fit(x_train, target)
        model_bytes = to_onnx(spec, fitted).SerializeToString()
        path = out / f"{spec.name}.onnx"
        path.write_bytes(model_bytes)
        predicted = onnx_predict(model_bytes, x_test, spec.task)
        check_against_sklearn(spec, fitted, x_test, predicted)
        metrics = evaluate(spec.task, y_test, predicted)
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        print(f"trained {spec.name}: {path.name} {len(model_bytes):,} bytes; held out: {shown}")
        entries.append(catalog_entry(spec, metrics))
        results.append((spec.name, metrics))

    # Keep what this script does not make (contracts, other data types' models).
    path = out / "catalog.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    made = {e["name"] for e in entries + PMML_ENTRIES}
    others = [e for e in previous.get("models", []) if e["name"] not in made]
    catalog = {
        "contracts": previous.get("contracts", []),
        "models": entries + PMML_ENTRIES + others,
    }
    path.write_text(json.dumps(catalog, indent=2) + "\n")
    print(f"catalog: {out / 'catalog.json'} ({len(catalog['models'])} models)")
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
