"""Train the example penguins models: the second example data type, with categorical features.

Reads the Palmer penguins data shipped inside the `palmerpenguins` package (nothing is
downloaded) and the data contract models/penguins/contract.json, which says what every
column is: its type, its categories (the one-hot encoders take them from there) and its
role. It keeps the 333 of the 344 rows that have every column, splits them 80/20 (stratified
on species, seed 42: 266 training rows, 67 held out), and writes into --out/penguins/:

- penguins.csv: the package's data as shipped (344 rows, header line), missing values
  ("NA" in the package) written as empty cells, the contract's CSV codec's "absent";
- penguins-species.onnx: one-hot island and sex, standardised measurements, year as is,
  multinomial logistic regression; probabilities as a plain [N, 3] tensor;
- penguins-mass.onnx: gradient-boosted trees (50 x depth 3) regressing body_mass_g on
  island, sex and the three other measurements;
- penguins-species.pmml: the same logistic regression as a PMML 4.4 RegressionModel,
  standardisation folded into the coefficients (written here with xml.etree);
- penguins.profile.json: the waxserve.v1.ReferenceProfile of the training rows (deciles of
  the four measurements and year, category frequencies of island and sex), computed by
  `dataflows.monitoring.profiles` as `waxserve profile` computes one;

and updates --out/catalog.json: its penguins entries and contract entry are replaced, every
other entry is kept as it is. Every ONNX graph has one input per feature, [None, 1], named
as the contract field and typed from it: string for STRING, float for FLOAT, int64 for
INTEGER. Each served artifact is checked against scikit-learn before anything is written
(onnxruntime to 1e-5, pypmml to 1e-6): a disagreement stops the script with exit code 1.

Rerun from the repository root (needs the dev extra: scikit-learn, skl2onnx,
palmerpenguins; pypmml and Java 17 for the PMML check):

    python models/train_penguins.py
    python models/train_penguins.py --out /tmp/models
"""

from __future__ import annotations

import argparse
import csv
import importlib.resources
import io
import json
import shutil
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import pandas as pd  # noqa: E402
from google.protobuf import json_format  # noqa: E402
from skl2onnx import convert_sklearn  # noqa: E402
from skl2onnx.common.data_types import (  # noqa: E402
    FloatTensorType,
    Int64TensorType,
    StringTensorType,
)
from sklearn.compose import ColumnTransformer  # noqa: E402
from sklearn.ensemble import GradientBoostingRegressor  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    accuracy_score,
    f1_score,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
)
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import OneHotEncoder, StandardScaler  # noqa: E402

from dataflows.contracts.files import load_contract  # noqa: E402
from dataflows.contracts.schema import Contract, FieldType  # noqa: E402
from dataflows.monitoring.profiles import categorical_profile, numeric_profile  # noqa: E402
from protos import waxserve_pb2 as pb  # noqa: E402

MODELS_DIR = REPO_ROOT / "models"
SUBDIR = "penguins"
CONTRACT_FILE = MODELS_DIR / SUBDIR / "contract.json"
DATA_FILE = "penguins.csv"
PROFILE_FILE = "penguins.profile.json"
SPECIES_ONNX = "penguins-species.onnx"
MASS_ONNX = "penguins-mass.onnx"
SPECIES_PMML = "penguins-species.pmml"
PACKAGE = "palmerpenguins"
PACKAGE_CSV = "data/penguins.csv"
PACKAGE_MISSING = "NA"  # how the package's CSV spells a missing value

SEED = 42
TEST_SIZE = 0.2
# Upper bounds, as in models/train.py: skl2onnx uses the lowest opsets each graph needs.
TARGET_OPSET = {"": 21, "ai.onnx.ml": 3}
ONNX_PROBA_TOLERANCE = 1e-5  # onnxruntime (float32) vs scikit-learn predict_proba
ONNX_REGRESSION_RTOL = 1e-5  # onnxruntime (float32) vs scikit-learn predict, relative
PMML_TOLERANCE = 1e-6  # pypmml (PMML4S, double) vs scikit-learn predict_proba

SPECIES_FEATURES = (
    "island",
    "sex",
    "bill_length_mm",
    "bill_depth_mm",
    "flipper_length_mm",
    "body_mass_g",
    "year",
)
MASS_FEATURES = ("island", "sex", "bill_length_mm", "bill_depth_mm", "flipper_length_mm")
MASS_TARGET = "body_mass_g"
PROFILE_FEATURES = ("bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g", "year")
PROFILE_CATEGORIES = ("island", "sex")
DATA_DESCRIPTION = "the Palmer penguins data (80% stratified training split of the complete rows)"
SPECIES_LR_DESCRIPTION = (
    "multinomial logistic regression classifying species (Adelie, Chinstrap, Gentoo) from "
    "one-hot island and sex, the four standardised measurements and year"
)


class CheckFailed(RuntimeError):
    """A served artifact disagrees with the scikit-learn model it was made from."""


# --- data -----------------------------------------------------------------------------------


def package_csv() -> str:
    """The penguins CSV as the palmerpenguins package ships it."""
    return (importlib.resources.files(PACKAGE) / PACKAGE_CSV).read_text(encoding="utf-8")


def read_rows(text: str, contract: Contract) -> list[list[str]]:
    """The data rows of the package CSV, as text; checks its header is the contract's columns."""
    header, *rows = csv.reader(io.StringIO(text))
    if tuple(header) != contract.csv_columns:
        raise ValueError(
            f"{PACKAGE} {PACKAGE_CSV} columns {header} are not the contract's CSV columns "
            f"{list(contract.csv_columns)}"
        )
    bad = [i for i, row in enumerate(rows, 2) if len(row) != len(header)]
    if bad:
        raise ValueError(f"{PACKAGE} {PACKAGE_CSV}: wrong number of cells on lines {bad[:5]}")
    return rows


def data_csv(rows: list[list[str]], contract: Contract) -> str:
    """The rows as penguins.csv: header line, cells as shipped, missing values empty."""
    out = io.StringIO()
    writer = csv.writer(out, delimiter=contract.csv.delimiter, lineterminator="\n")
    writer.writerow(contract.csv_columns)
    writer.writerows([["" if c == PACKAGE_MISSING else c for c in row] for row in rows])
    return out.getvalue()


def complete_frame(rows: list[list[str]], contract: Contract) -> pd.DataFrame:
    """The rows with every column present, typed by the contract (STRING: str, FLOAT:
    float64, INTEGER: int64); checks every text value is one of its field's categories."""
    complete = [row for row in rows if PACKAGE_MISSING not in row]
    frame = pd.DataFrame(complete, columns=list(contract.csv_columns))
    for name in contract.csv_columns:
        field = contract.field_named(name)
        if field.type is FieldType.FLOAT:
            frame[name] = frame[name].astype(np.float64)
        elif field.type is FieldType.INTEGER:
            frame[name] = frame[name].astype(np.int64)
        elif field.type is FieldType.STRING:
            frame[name] = frame[name].astype(object)
            unknown = set(frame[name]) - set(field.categories) if field.categories else set()
            if unknown:
                raise ValueError(f"{name}: values {sorted(unknown)} are not contract categories")
        else:
            raise ValueError(f"{name}: {field.type} columns are not handled here")
    return frame


# --- models ---------------------------------------------------------------------------------


def check_inputs(contract: Contract, features: tuple[str, ...]) -> None:
    """Every model input is a feature field of the contract (so never its label)."""
    for name in features:
        field = contract.field_for(name)
        if field is None or field.name != name:
            raise ValueError(f"model input {name!r} is not a feature field of the contract")


def preprocessor(
    contract: Contract, features: tuple[str, ...], *, scale: bool
) -> ColumnTransformer:
    """One-hot STRING features (categories from the contract, unknown ones refused), and
    FLOAT features standardised (`scale`) or as they are; INTEGER features as they are."""
    text = [n for n in features if contract.field_named(n).type is FieldType.STRING]
    floats = [n for n in features if contract.field_named(n).type is FieldType.FLOAT]
    integers = [n for n in features if contract.field_named(n).type is FieldType.INTEGER]
    categories = [list(contract.field_named(n).categories) for n in text]
    steps: list[tuple[str, Any, list[str]]] = [
        (
            "onehot",
            OneHotEncoder(categories=categories, handle_unknown="error", sparse_output=False),
            text,
        ),
        ("scale" if scale else "floats", StandardScaler() if scale else "passthrough", floats),
    ]
    if integers:
        steps.append(("integers", "passthrough", integers))
    return ColumnTransformer(steps)


def species_pipeline(contract: Contract) -> Pipeline:
    """Standardised multinomial logistic regression of species."""
    return Pipeline(
        [
            ("prep", preprocessor(contract, SPECIES_FEATURES, scale=True)),
            ("logreg", LogisticRegression(max_iter=10_000, random_state=SEED)),
        ]
    )


def mass_pipeline(contract: Contract) -> Pipeline:
    """Gradient-boosted trees regressing body mass."""
    return Pipeline(
        [
            ("prep", preprocessor(contract, MASS_FEATURES, scale=False)),
            (
                "gbt",
                GradientBoostingRegressor(
                    n_estimators=50, max_depth=3, learning_rate=0.1, random_state=SEED
                ),
            ),
        ]
    )


_TENSOR_TYPES: dict[FieldType, Any] = {
    FieldType.STRING: StringTensorType,
    FieldType.FLOAT: FloatTensorType,
    FieldType.INTEGER: Int64TensorType,
}
_FEED_DTYPES: dict[FieldType, Any] = {
    FieldType.STRING: object,
    FieldType.FLOAT: np.float32,
    FieldType.INTEGER: np.int64,
}


def to_onnx(
    name: str,
    description: str,
    fitted: Pipeline,
    contract: Contract,
    features: tuple[str, ...],
) -> onnx.ModelProto:
    """The fitted pipeline as ONNX: one [None, 1] input per feature, named as the field and
    typed from the contract; a classifier's probabilities as a plain tensor (no ZipMap)."""
    initial_types = [(n, _TENSOR_TYPES[contract.field_named(n).type]([None, 1])) for n in features]
    estimator = fitted.steps[-1][1]
    options = {id(estimator): {"zipmap": False}} if hasattr(estimator, "classes_") else None
    model = convert_sklearn(
        fitted,
        name=name,
        initial_types=initial_types,
        target_opset=TARGET_OPSET,
        options=options,
    )
    model.doc_string = description
    # As in models/train.py: skl2onnx emits opset_import in set order (varies with
    # PYTHONHASHSEED) and may list a domain twice; keep one entry per domain, sorted.
    opsets: dict[str, int] = {}
    for o in model.opset_import:
        opsets[o.domain] = max(o.version, opsets.get(o.domain, 0))
    del model.opset_import[:]
    for domain in sorted(opsets):
        model.opset_import.add(domain=domain, version=opsets[domain])
    onnx.checker.check_model(model, full_check=True)
    return model


def onnx_feed(
    frame: pd.DataFrame, contract: Contract, features: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """One [N, 1] array per graph input, in the graph's element type."""
    return {
        n: frame[[n]].to_numpy().astype(_FEED_DTYPES[contract.field_named(n).type])
        for n in features
    }


def as_served(frame: pd.DataFrame, contract: Contract) -> pd.DataFrame:
    """The rows with FLOAT columns rounded to float32, as the ONNX graphs receive them."""
    out = frame.copy()
    for f in contract.fields:
        if f.type is FieldType.FLOAT and f.name in out:
            out[f.name] = out[f.name].astype(np.float32).astype(np.float64)
    return out


def run_onnx(
    model_bytes: bytes, frame: pd.DataFrame, contract: Contract, features: tuple[str, ...]
) -> list[np.ndarray]:
    """Every output of the graph for these rows."""
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in session.run(None, onnx_feed(frame, contract, features))]


def onnx_signature(model_bytes: bytes) -> tuple[list[str], list[str]]:
    """Inputs and outputs as onnxruntime reports them: "name: type shape"."""
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return (
        [f"{i.name}: {i.type} {i.shape}" for i in session.get_inputs()],
        [f"{o.name}: {o.type} {o.shape}" for o in session.get_outputs()],
    )


def check_onnx_classifier(
    name: str, fitted: Pipeline, frame: pd.DataFrame, labels: np.ndarray, proba: np.ndarray
) -> float:
    """onnxruntime's probabilities equal predict_proba (on the float32-rounded inputs the
    graph sees) to ONNX_PROBA_TOLERANCE and its labels equal predict; the largest difference."""
    expected = fitted.predict_proba(frame)
    worst = float(np.max(np.abs(expected - proba)))
    agree = float(np.mean(fitted.predict(frame) == labels))
    if worst > ONNX_PROBA_TOLERANCE or agree < 1.0:
        raise CheckFailed(
            f"{name}: onnxruntime probabilities differ from scikit-learn by up to {worst:.3g} "
            f"(allowed {ONNX_PROBA_TOLERANCE:g}); labels agree on {agree:.1%}"
        )
    return worst


def check_onnx_regressor(
    name: str, fitted: Pipeline, frame: pd.DataFrame, predicted: np.ndarray
) -> float:
    """onnxruntime's predictions equal predict to ONNX_REGRESSION_RTOL (relative); the
    largest relative difference."""
    expected = fitted.predict(frame)
    worst = float(np.max(np.abs(expected - predicted) / np.abs(expected)))
    if worst > ONNX_REGRESSION_RTOL:
        raise CheckFailed(
            f"{name}: onnxruntime predictions differ from scikit-learn by up to {worst:.3g} "
            f"relative (allowed {ONNX_REGRESSION_RTOL:g})"
        )
    return worst


# --- PMML -----------------------------------------------------------------------------------

PMML_NS = "http://www.dmg.org/PMML-4_4"
_PMML_DATA_TYPES = {FieldType.FLOAT: "double", FieldType.INTEGER: "integer"}


def _number(value: float) -> str:
    """A double as the shortest text that reads back as the same double."""
    return repr(float(value))


def pmml_document(
    name: str, description: str, fitted: Pipeline, contract: Contract, features: tuple[str, ...]
) -> bytes:
    """The fitted species pipeline as a PMML 4.4 RegressionModel (classification, softmax).

    Per class k: intercept b_k - sum_j w_kj * mean_j / scale_j, a NumericPredictor
    w_kj / scale_j per standardised FLOAT feature j, a NumericPredictor w_kj per INTEGER
    feature, and a CategoricalPredictor per one-hot category of each STRING feature: softmax
    of these is exactly predict_proba's softmax of the standardised model.
    """
    prep: ColumnTransformer = fitted.named_steps["prep"]
    logreg: LogisticRegression = fitted.named_steps["logreg"]
    target = contract.field_named(contract.label_field)
    classes = [str(c) for c in logreg.classes_]
    if set(classes) - set(target.categories):
        raise ValueError(f"classes {classes} are not all categories of {target.name}")
    columns = {c: i for i, c in enumerate(prep.get_feature_names_out())}
    scaler: StandardScaler = prep.named_transformers_["scale"]
    scaled = list(prep.transformers_[1][2])
    onehot: OneHotEncoder = prep.named_transformers_["onehot"]
    text = list(prep.transformers_[0][2])
    integers = [n for n in features if contract.field_named(n).type is FieldType.INTEGER]

    root = ET.Element("PMML", {"xmlns": PMML_NS, "version": "4.4"})
    header = ET.SubElement(root, "Header", {"description": description})
    ET.SubElement(header, "Application", {"name": "waxserve models/train_penguins.py"})
    dictionary = ET.SubElement(root, "DataDictionary", {"numberOfFields": str(len(features) + 1)})
    for n in (*features, target.name):
        field = contract.field_named(n)
        if field.type is FieldType.STRING:
            element = ET.SubElement(
                dictionary,
                "DataField",
                {"name": n, "optype": "categorical", "dataType": "string"},
            )
            values = classes if n == target.name else list(field.categories)
            for value in values:
                ET.SubElement(element, "Value", {"value": value})
        else:
            ET.SubElement(
                dictionary,
                "DataField",
                {"name": n, "optype": "continuous", "dataType": _PMML_DATA_TYPES[field.type]},
            )
    model = ET.SubElement(
        root,
        "RegressionModel",
        {
            "modelName": name,
            "functionName": "classification",
            "algorithmName": "LogisticRegression",
            "normalizationMethod": "softmax",
        },
    )
    schema = ET.SubElement(model, "MiningSchema")
    for n in features:
        ET.SubElement(schema, "MiningField", {"name": n})
    ET.SubElement(schema, "MiningField", {"name": target.name, "usageType": "target"})
    output = ET.SubElement(model, "Output")
    ET.SubElement(
        output,
        "OutputField",
        {
            "name": f"predicted_{target.name}",
            "optype": "categorical",
            "dataType": "string",
            "feature": "predictedValue",
        },
    )
    for k in classes:
        ET.SubElement(
            output,
            "OutputField",
            {
                "name": f"probability({k})",
                "optype": "continuous",
                "dataType": "double",
                "feature": "probability",
                "value": k,
            },
        )
    for row, k in enumerate(classes):
        weights = logreg.coef_[row]
        intercept = float(logreg.intercept_[row])
        numeric: list[tuple[str, float]] = []
        for j, n in enumerate(scaled):
            w = float(weights[columns[f"scale__{n}"]])
            numeric.append((n, w / scaler.scale_[j]))
            intercept -= w * scaler.mean_[j] / scaler.scale_[j]
        numeric += [(n, float(weights[columns[f"integers__{n}"]])) for n in integers]
        table = ET.SubElement(
            model, "RegressionTable", {"intercept": _number(intercept), "targetCategory": k}
        )
        for n, w in numeric:
            ET.SubElement(table, "NumericPredictor", {"name": n, "coefficient": _number(w)})
        for n, categories in zip(text, onehot.categories_, strict=True):
            for value in categories:
                w = float(weights[columns[f"onehot__{n}_{value}"]])
                ET.SubElement(
                    table,
                    "CategoricalPredictor",
                    {"name": n, "value": str(value), "coefficient": _number(w)},
                )
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def run_pmml(
    document: bytes, frame: pd.DataFrame, contract: Contract, features: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Score the rows with pypmml: predicted labels, probabilities [N, C] in the order of the
    probability output fields, and those fields' class labels.

    Rows go in one call in PMML4S's JSON "split" form, numbers as doubles (year too), as
    waxserve's PMML runtime sends them.
    """
    from pypmml import Model

    model = Model.fromString(document.decode())
    try:
        probability_fields = [
            (str(f.name), str(f.value))
            for f in model.outputFields
            if str(f.feature) == "probability"
        ]
        label_field = next(
            str(f.name) for f in model.outputFields if str(f.feature) == "predictedValue"
        )
        data = [
            [
                row[n] if contract.field_named(n).type is FieldType.STRING else float(row[n])
                for n in features
            ]
            for row in frame[list(features)].to_dict("records")
        ]
        request = json.dumps({"columns": list(features), "data": data})
        response = json.loads(str(model.predict(request)))
    finally:
        Model.close()
    columns: list[str] = response["columns"]
    rows = response["data"]
    if len(rows) != len(frame):
        raise CheckFailed(f"pypmml returned {len(rows)} rows for {len(frame)}")
    index = [columns.index(n) for n, _ in probability_fields]
    proba = np.array([[r[i] for i in index] for r in rows], dtype=np.float64)
    labels = np.array([r[columns.index(label_field)] for r in rows], dtype=object)
    return labels, proba, [k for _, k in probability_fields]


def check_pmml(
    name: str,
    fitted: Pipeline,
    frame: pd.DataFrame,
    labels: np.ndarray,
    proba: np.ndarray,
    classes: list[str],
) -> float:
    """pypmml's probabilities equal predict_proba to PMML_TOLERANCE and its predicted labels
    equal predict; the largest difference."""
    order = [list(fitted.classes_).index(k) for k in classes]
    expected = fitted.predict_proba(frame)[:, order]
    worst = float(np.max(np.abs(expected - proba))) if proba.size else float("inf")
    agree = float(np.mean(fitted.predict(frame) == labels))
    if not np.isfinite(worst) or worst > PMML_TOLERANCE or agree < 1.0:
        raise CheckFailed(
            f"{name}: pypmml probabilities differ from scikit-learn by up to {worst:.3g} "
            f"(allowed {PMML_TOLERANCE:g}); predicted labels agree on {agree:.1%}"
        )
    return worst


# --- profile and catalog --------------------------------------------------------------------


def reference_profile(frame: pd.DataFrame) -> pb.ReferenceProfile:
    """Deciles, fractions, mean and std of the numeric features, category frequencies of
    the categorical ones (`dataflows.monitoring.profiles`)."""
    profile = pb.ReferenceProfile(row_count=len(frame))
    for name in PROFILE_FEATURES:
        column = frame[name].to_numpy(dtype=np.float64)
        profile.features.append(numeric_profile(name, column))
    for name in PROFILE_CATEGORIES:
        profile.features.append(categorical_profile(name, frame[name].tolist()))
    return profile


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    return {
        "rmse": float(np.sqrt(mean_squared_error(y_true, y_pred))),
        "mae": float(mean_absolute_error(y_true, y_pred)),
        "r2": float(r2_score(y_true, y_pred)),
    }


def catalog_entry(
    file: str, name: str, fmt: str, task: str, description: str, metrics: dict[str, float]
) -> dict[str, Any]:
    """A catalog.json entry (fields of dataflows.core.descriptors.CatalogEntry). input_features is
    empty: the graph inputs and the PMML mining schema name the fields themselves."""
    return {
        "file": f"{SUBDIR}/{file}",
        "name": name,
        "version": "1",
        "format": fmt,
        "task": task,
        "data_type": "penguins",
        "description": description,
        "input_features": [],
        "profile": f"{SUBDIR}/{PROFILE_FILE}",
        "metrics": {k: round(v, 6) for k, v in metrics.items()},
    }


def update_catalog(path: Path, data_type: str, entries: list[dict[str, Any]]) -> None:
    """Replace the data type's contract and model entries of catalog.json (appended at the
    end); every other entry stays as it is."""
    doc: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    contracts = [c for c in doc.get("contracts", []) if c.get("data_type") != data_type]
    contracts.append({"data_type": data_type, "file": f"{SUBDIR}/contract.json"})
    models = [m for m in doc.get("models", []) if m.get("data_type") != data_type]
    doc["contracts"] = contracts
    doc["models"] = models + entries
    path.write_text(json.dumps(doc, indent=2) + "\n")


def print_table(results: list[tuple[str, dict[str, float]]]) -> None:
    """The held-out metrics as a fixed-width table."""
    columns = ["accuracy", "macro_f1", "rmse", "mae", "r2"]
    print(f"\n{'model':<26}" + "".join(f"{c:>10}" for c in columns))
    for name, metrics in results:
        cells = "".join(f"{metrics[c]:>10.4f}" if c in metrics else f"{'-':>10}" for c in columns)
        print(f"{name:<26}{cells}")


# --- main -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """The complete rows, split: training rows, held-out rows (also as the ONNX graphs see
    them: FLOAT columns rounded to float32)."""

    contract: Contract
    train: pd.DataFrame
    test: pd.DataFrame
    served_test: pd.DataFrame

    def target(self, rows: pd.DataFrame, name: str = "") -> pd.Series:
        return rows[name or self.contract.label_field]


@dataclass(frozen=True)
class Artifact:
    """A model file, checked against its scikit-learn original, and its catalog entry."""

    file: str
    data: bytes
    entry: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.entry["name"])


def species_onnx(split: Split) -> tuple[Artifact, Pipeline]:
    """penguins-species-onnx, and the fitted pipeline (the PMML model is the same fit)."""
    contract, train, test = split.contract, split.train, split.test
    fitted = species_pipeline(contract).fit(train[list(SPECIES_FEATURES)], split.target(train))
    name = "penguins-species-onnx"
    description = (
        f"scikit-learn {SPECIES_LR_DESCRIPTION}, on {DATA_DESCRIPTION}; one input per field, "
        "probabilities as a float tensor."
    )
    data = to_onnx(name, description, fitted, contract, SPECIES_FEATURES).SerializeToString()
    labels, proba = run_onnx(data, test, contract, SPECIES_FEATURES)
    worst = check_onnx_classifier(name, fitted, split.served_test, labels, proba)
    print(f"{name}: onnxruntime vs scikit-learn probabilities: max |diff| {worst:.2e}")
    metrics = classification_metrics(split.target(test).to_numpy(), labels)
    entry = catalog_entry(SPECIES_ONNX, name, "onnx", "classification", description, metrics)
    return Artifact(SPECIES_ONNX, data, entry), fitted


def mass_onnx(split: Split) -> Artifact:
    """penguins-mass-onnx."""
    contract, train, test = split.contract, split.train, split.test
    fitted = mass_pipeline(contract).fit(
        train[list(MASS_FEATURES)], split.target(train, MASS_TARGET)
    )
    name = "penguins-mass-onnx"
    description = (
        "scikit-learn gradient-boosted trees (50 x depth 3) regressing body_mass_g from one-hot "
        f"island and sex and the bill and flipper measurements, on {DATA_DESCRIPTION}; "
        "one input per field."
    )
    data = to_onnx(name, description, fitted, contract, MASS_FEATURES).SerializeToString()
    (predicted,) = run_onnx(data, test, contract, MASS_FEATURES)
    predicted = predicted.reshape(-1)
    worst = check_onnx_regressor(name, fitted, split.served_test, predicted)
    print(f"{name}: onnxruntime vs scikit-learn predictions: max relative diff {worst:.2e}")
    metrics = regression_metrics(split.target(test, MASS_TARGET).to_numpy(), predicted)
    entry = catalog_entry(MASS_ONNX, name, "onnx", "regression", description, metrics)
    return Artifact(MASS_ONNX, data, entry)


def species_pmml(split: Split, fitted: Pipeline) -> Artifact:
    """penguins-species-pmml: the fitted species pipeline written as PMML."""
    name = "penguins-species-pmml"
    description = (
        "The fitted logistic regression of penguins-species-onnx as a PMML 4.4 "
        "RegressionModel (softmax), the standardisation folded into the coefficients: "
        f"{SPECIES_LR_DESCRIPTION}, on {DATA_DESCRIPTION}."
    )
    data = pmml_document(name, description, fitted, split.contract, SPECIES_FEATURES)
    labels, proba, classes = run_pmml(data, split.test, split.contract, SPECIES_FEATURES)
    worst = check_pmml(name, fitted, split.test, labels, proba, classes)
    print(f"{name}: pypmml vs scikit-learn probabilities: max |diff| {worst:.2e}")
    metrics = classification_metrics(split.target(split.test).to_numpy(), labels)
    entry = catalog_entry(SPECIES_PMML, name, "pmml", "classification", description, metrics)
    return Artifact(SPECIES_PMML, data, entry)


def print_baselines(split: Split) -> None:
    """What the metrics compare with: the majority class, the training mean body mass."""
    majority = split.target(split.train).mode()[0]
    accuracy = float(np.mean(split.target(split.test) == majority))
    mass_test = split.target(split.test, MASS_TARGET)
    mass_mean = split.target(split.train, MASS_TARGET).mean()
    rmse = float(np.sqrt(np.mean((mass_test - mass_mean) ** 2)))
    print(
        f"\nbaselines on the held-out rows: always {majority}: accuracy {accuracy:.4f}; "
        f"the training mean body mass: RMSE {rmse:.1f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=MODELS_DIR, help="models folder to write (default: models/)"
    )
    args = parser.parse_args(argv)
    out_dir: Path = args.out / SUBDIR

    contract = load_contract(CONTRACT_FILE)
    for features in (SPECIES_FEATURES, MASS_FEATURES):
        check_inputs(contract, features)
    rows = read_rows(package_csv(), contract)
    frame = complete_frame(rows, contract)
    train, test = train_test_split(
        frame, test_size=TEST_SIZE, random_state=SEED, stratify=frame[contract.label_field]
    )
    split = Split(contract, train, test, as_served(test, contract))
    print(
        f"data: {len(rows)} rows from {PACKAGE} {PACKAGE_CSV}, {len(frame)} complete; "
        f"train {len(train)}, held out {len(test)}"
    )

    species, species_fitted = species_onnx(split)
    models = [species, mass_onnx(split), species_pmml(split, species_fitted)]
    profile = reference_profile(train)
    profile_json = json_format.MessageToJson(profile, preserving_proto_field_name=True, indent=2)
    files = {
        DATA_FILE: data_csv(rows, contract).encode(),
        **{m.file: m.data for m in models},
        PROFILE_FILE: (profile_json + "\n").encode(),
    }

    # Everything checked: write.
    out_dir.mkdir(parents=True, exist_ok=True)
    for file, data in files.items():
        (out_dir / file).write_bytes(data)
        print(f"wrote {out_dir / file} ({len(data):,} bytes)")
    if out_dir / "contract.json" != CONTRACT_FILE:
        shutil.copyfile(CONTRACT_FILE, out_dir / "contract.json")
    update_catalog(args.out / "catalog.json", contract.data_type, [m.entry for m in models])
    print(f"catalog: {args.out / 'catalog.json'} (penguins: {len(models)} models, 1 contract)")
    for file in (SPECIES_ONNX, MASS_ONNX):
        inputs, outputs = onnx_signature(files[file])
        print(f"{file}: inputs {'; '.join(inputs)}\n  outputs {'; '.join(outputs)}")

    print_table([(m.name, m.entry["metrics"]) for m in models])
    print_baselines(split)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CheckFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
