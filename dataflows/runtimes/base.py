"""The runtime interface every model format implements, and the helpers they share.

A runtime is built from model bytes, scores a batch in one call and returns a `Prediction`
of numpy columns. Features come in two arrays: the numeric ones as one float64 matrix (the
fast path, unchanged for all-numeric models) and the text ones as an object matrix of str.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

REGRESSION = "regression"
CLASSIFICATION = "classification"

NUMERIC = "numeric"
TEXT = "text"


def canonical_name(name: str) -> str:
    """Field name normalised for matching model inputs to record fields.

    PMML names its fields "fixed acidity" and "pH"; records say `fixed_acidity` and `ph`.
    Lower-casing and folding every run of non-alphanumerics to `_` maps one onto the other.
    """
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


class ModelError(Exception):
    """A model that cannot be installed. `reason` is a short error class for the dead-letter topic.

    Reasons: "load_failed" (unreadable bytes, runtime refused the model), "bad_inputs" (the
    descriptor's input_features do not fit the model), "unsupported_model" (loads, but is not
    a shape of model waxserve can score, or refers to data outside its bytes). The registry
    raises it with its own reasons too (`dataflows.core.reasons.Reason`, e.g. model_too_large).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ModelFeature:
    """One feature a model consumes.

    `name` is spelled as the model (PMML field, ONNX input) or the descriptor names it.
    `kind` is "numeric" (fed as float64, cast by the runtime to what the model wants) or
    "text" (fed as str). `categories` are, for text features, the values the model knows
    when it declares them (PMML valid values, an ONNX encoder's categories); None when
    unknown or any string is accepted.
    """

    name: str
    kind: str
    categories: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Prediction:
    """Scores for a batch of n rows.

    `values[i]` is the regression output, or for classifiers the predicted label as a number
    (NaN when the label is not numeric). `valid[i]` is False where the model produced no usable
    prediction; such rows have value NaN, label "" and all-NaN probabilities.
    """

    values: np.ndarray  # float64 (n,)
    labels: list[str] | None  # classifiers: predicted label per row; None for regressors
    probabilities: np.ndarray | None  # classifiers: float64 (n, len(class_labels))
    class_labels: tuple[str, ...]  # classifiers: labels of the probability columns
    valid: np.ndarray  # bool (n,)


class ModelRuntime(ABC):
    """A loaded model that scores batches of numeric and text features.

    `features` lists every feature in the model's order; `predict()` takes the numeric ones
    as columns of one float64 matrix and the text ones as columns of an object matrix, each
    in that same relative order (`numeric_features`, `text_features`).
    """

    format: str
    task: str
    features: tuple[ModelFeature, ...]
    class_labels: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    # Column counts predict() checks on every batch: cached so the hot path does no Python
    # iteration over the features (set by _set_features).
    _n_numeric: int = 0
    _n_text: int = 0

    @property
    def input_names(self) -> tuple[str, ...]:
        """Names of all features, in the model's order."""
        return tuple(f.name for f in self.features)

    @property
    def numeric_features(self) -> tuple[str, ...]:
        """Names of the numeric features: the columns of predict()'s `numeric`, in order."""
        return tuple(f.name for f in self.features if f.kind == NUMERIC)

    @property
    def text_features(self) -> tuple[str, ...]:
        """Names of the text features: the columns of predict()'s `text`, in order."""
        return tuple(f.name for f in self.features if f.kind == TEXT)

    @abstractmethod
    def predict(self, numeric: np.ndarray, text: np.ndarray | None = None) -> Prediction:
        """Score a batch of n rows (n may be 0).

        numeric: float64 C-contiguous (n, len(numeric_features)), columns in numeric_features
        order (integers and booleans arrive as float64 0/1 values; the runtime casts to what the
        model wants); text: object array (n, len(text_features)) of str, or None when the model
        has no text features. No NaN/None are passed (the caller dead-letters missing values
        first). A row the model cannot score comes back invalid; nothing raises for data.
        """

    def close(self) -> None:  # noqa: B027 - optional hook; subclasses release their resources
        """Release the model's resources. Idempotent."""

    def describe(self) -> dict[str, object]:
        """Format, task, inputs, class labels and outputs, for logs and queryable state."""
        return {
            "format": self.format,
            "task": self.task,
            "input_names": list(self.input_names),
            "features": [
                {
                    "name": f.name,
                    "kind": f.kind,
                    "categories": None if f.categories is None else list(f.categories),
                }
                for f in self.features
            ],
            "class_labels": list(self.class_labels),
            "output_names": list(self.output_names),
        }

    def _set_features(self, features: Iterable[ModelFeature]) -> None:
        self.features = tuple(features)
        self._n_numeric = sum(f.kind == NUMERIC for f in self.features)
        self._n_text = len(self.features) - self._n_numeric

    def _check_batch(self, numeric: np.ndarray, text: np.ndarray | None) -> int:
        """The batch's row count; ValueError (a caller bug, not a data problem) on bad shapes."""
        if numeric.ndim != 2 or numeric.shape[1] != self._n_numeric:
            raise ValueError(
                f"expected numeric features of shape (n, {self._n_numeric}) for "
                f"{list(self.numeric_features)}, got {numeric.shape}"
            )
        n = numeric.shape[0]
        if self._n_text:
            if text is None or text.ndim != 2 or text.shape != (n, self._n_text):
                raise ValueError(
                    f"expected text features of shape ({n}, {self._n_text}) for "
                    f"{list(self.text_features)}, got "
                    f"{None if text is None else text.shape}"
                )
        elif text is not None and text.size:
            raise ValueError(f"the model has no text features, got text of shape {text.shape}")
        return int(n)

    def _empty(self) -> Prediction:
        classifier = self.task == CLASSIFICATION
        return Prediction(
            values=np.empty(0, dtype=np.float64),
            labels=[] if classifier else None,
            probabilities=np.empty((0, len(self.class_labels))) if classifier else None,
            class_labels=self.class_labels,
            valid=np.empty(0, dtype=bool),
        )


# --- shared helpers --------------------------------------------------------------------


def _label_str(label: object) -> str:
    """A class label as text: 5 and 5.0 both become "5"; bytes are decoded."""
    if isinstance(label, bytes):
        return label.decode()
    if isinstance(label, float) and label.is_integer():
        return str(int(label))
    return str(label)


_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
"""A label that is a number: ASCII decimal or scientific notation only. Python's float()
also takes "7_4", "nan", full-width digits and surrounding spaces, which are not."""


def _label_number(label: str) -> float:
    """A class label's value as a number, NaN when the label is not a (finite) number."""
    if not _DECIMAL.fullmatch(label):
        return math.nan
    number = float(label)
    return number if math.isfinite(number) else math.nan


def _sorted_labels(labels: Iterable[str]) -> tuple[str, ...]:
    """Labels sorted numerically when all are numbers ("3" < "10"), else as text."""
    unique = set(labels)
    if all(not math.isnan(_label_number(x)) for x in unique):
        return tuple(sorted(unique, key=lambda x: (_label_number(x), x)))
    return tuple(sorted(unique))


def _regression(values: np.ndarray) -> Prediction:
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    valid = np.isfinite(values)
    if not valid.all():
        values = np.where(valid, values, np.nan)
    return Prediction(values=values, labels=None, probabilities=None, class_labels=(), valid=valid)


def _classification(
    probabilities: np.ndarray,
    class_labels: tuple[str, ...],
    label_values: np.ndarray,
    predicted: Sequence[str] | None = None,
) -> Prediction:
    """A classifier's prediction from its probability matrix.

    A row with no probability at all is invalid. In a valid row, a class the model gave no
    probability for (NaN: PMML4S reports a class missing from a tree node's ScoreDistribution
    that way) gets 0.0, which is what the PMML spec means. Without `predicted` (the model's
    own labels), the label is the argmax of the row's probabilities.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    missing = np.isnan(probabilities)
    valid = ~missing.all(axis=1)
    if missing.any():
        probabilities = np.where(missing & valid[:, None], 0.0, probabilities)
    if predicted is None:
        best = np.argmax(np.where(valid[:, None], probabilities, 0.0), axis=1)
        labels = [class_labels[b] if ok else "" for b, ok in zip(best.tolist(), valid, strict=True)]
        values = np.where(valid, label_values[best], np.nan)
    else:
        labels = [label if ok else "" for label, ok in zip(predicted, valid, strict=True)]
        numbers = dict(zip(class_labels, label_values.tolist(), strict=True))
        values = np.array(
            [numbers[x] if x in numbers else _label_number(x) for x in labels], dtype=np.float64
        ).reshape(-1)
        values[~valid] = np.nan
    return Prediction(
        values=values.astype(np.float64, copy=False),
        labels=labels,
        probabilities=probabilities,
        class_labels=class_labels,
        valid=valid,
    )
