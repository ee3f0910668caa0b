"""Online quality of a model over joined (prediction, label) pairs, without Bytewax.

The feedback join (`dataflows.monitoring.feedback`) pairs each delayed label with the
prediction made for its record; `QualityAccumulator` adds up those pairs per model and
window, and windows merge over shards (the `monitor` step) into the figures of the stats
topic: RMSE and MAE for regressors, accuracy, log loss and a confusion matrix for
classifiers. Every figure is a ratio of sums kept here, so merging windows is exact and
Prometheus can compute the same figures from the counters of the same sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from protos import waxserve_pb2 as pb

MAX_LABEL_MAGNITUDE = 1e12
"""Largest label (in magnitude) online quality takes, inside a record or on the feedback
topic. Labels are for RMSE and accuracy only; one of 1e300 would make the squared-error
sum infinite for good. A larger label (or a non-finite one) makes its message a dead
letter (bad_label); a prediction beyond it is scored but left out of RMSE."""

LOG_LOSS_EPSILON = 1e-15
"""The probability a classifier gave the true class is clipped to [this, 1] before its
log: a confident wrong answer (p = 0, or a NaN PMML leaves for a class its leaf lacks)
costs -log(1e-15) = 34.5 rather than infinity."""

MAX_CONFUSION_CLASSES = 32
"""Classifiers with more classes than this get no confusion matrix (it would have
(classes + 1) x classes cells in every stats message)."""

MAX_PREDICTION_MAGNITUDE = 1e12
"""A regressor's prediction counts in RMSE and MAE clipped to this magnitude (labels are
already bounded by it): one prediction of 1e300 would make the sums infinite for good."""


@dataclass
class LabelCounts:
    """What became of the labels of a data type: joined, or why not.

    `unknown`: no prediction was ever held for the id (within the label wait); `expired`:
    its prediction was held but is older than the horizon; `evicted`: its prediction was
    dropped, oldest first, to keep within the store's bounds; `duplicate`: the prediction
    was joined to a label already. Undecodable labels are dead letters, not counted here.
    """

    matched: int = 0
    unknown: int = 0
    expired: int = 0
    evicted: int = 0
    duplicate: int = 0

    def merge(self, other: LabelCounts) -> None:
        """Add another count into this one."""
        self.matched += other.matched
        self.unknown += other.unknown
        self.expired += other.expired
        self.evicted += other.evicted
        self.duplicate += other.duplicate

    @property
    def total(self) -> int:
        """Every label counted."""
        return self.matched + self.unknown + self.expired + self.evicted + self.duplicate

    def to_proto(self) -> pb.LabelOutcomes:
        """As its protobuf message."""
        return pb.LabelOutcomes(
            matched=self.matched,
            unknown=self.unknown,
            expired=self.expired,
            evicted=self.evicted,
            duplicate=self.duplicate,
        )


@dataclass
class QualityAccumulator:
    """Sums over the joined pairs of one model: what every online figure is made of.

    Regressors: `error_count` pairs with a numeric label, their squared and absolute
    errors. Classifiers: `correct` pairs whose predicted class is the label; `log_loss`,
    the sum of -log(p(true class)) over `log_loss_count` pairs whose model gave
    probabilities; `confusion` (rows: the true class, the last row for a label that is
    none of the model's classes; columns: the predicted class) when the model has at most
    MAX_CONFUSION_CLASSES classes.
    """

    pairs: int = 0
    error_count: int = 0
    squared_error: float = 0.0
    absolute_error: float = 0.0
    classes: tuple[str, ...] = ()
    correct: int = 0
    log_loss: float = 0.0
    log_loss_count: int = 0
    confusion: np.ndarray | None = None  # int64 (len(classes) + 1, len(classes))
    labels: LabelCounts = field(default_factory=LabelCounts)

    @property
    def classifier(self) -> bool:
        """Whether these pairs are a classifier's."""
        return bool(self.classes)

    def add_regression(self, predicted: np.ndarray, labels: np.ndarray) -> None:
        """Pairs of a regressor: predicted values and labels (NaN: not a number)."""
        self.pairs += len(predicted)
        numeric = ~np.isnan(labels)
        if not numeric.all():
            predicted, labels = predicted[numeric], labels[numeric]
        clipped = np.clip(predicted, -MAX_PREDICTION_MAGNITUDE, MAX_PREDICTION_MAGNITUDE)
        error = clipped - labels
        self.error_count += len(error)
        self.squared_error += float(np.square(error).sum())
        self.absolute_error += float(np.abs(error).sum())

    def add_classification(
        self,
        classes: tuple[str, ...],
        predicted: np.ndarray,
        truth: np.ndarray,
        probabilities: np.ndarray | None,
    ) -> None:
        """Pairs of a classifier with these classes: predicted and true class indices (-1:
        a label none of the classes), and the probabilities per class (or None)."""
        self._classes(classes)
        n = len(predicted)
        self.pairs += n
        self.correct += int(((predicted == truth) & (truth >= 0)).sum())
        if probabilities is not None and n:
            self.log_loss += float(log_losses(probabilities, truth).sum())
            self.log_loss_count += n
        if self.confusion is not None and n:
            k = len(classes)
            rows = np.where(truth >= 0, truth, k)
            cells = rows * k + np.clip(predicted, 0, k - 1)
            self.confusion += np.bincount(cells, minlength=(k + 1) * k).reshape(k + 1, k)

    def _classes(self, classes: tuple[str, ...]) -> None:
        if self.classes == classes:
            return
        if self.classes:  # one model has one set of classes; a mix is a bug upstream
            raise ValueError(f"classes {classes} after {self.classes}")
        self.classes = classes
        if len(classes) <= MAX_CONFUSION_CLASSES:
            self.confusion = np.zeros((len(classes) + 1, len(classes)), dtype=np.int64)

    def merge(self, other: QualityAccumulator) -> None:
        """Add another accumulator of the same model into this one."""
        self.pairs += other.pairs
        self.error_count += other.error_count
        self.squared_error += other.squared_error
        self.absolute_error += other.absolute_error
        if other.classes:
            self._classes(other.classes)
            self.correct += other.correct
            self.log_loss += other.log_loss
            self.log_loss_count += other.log_loss_count
            if self.confusion is not None and other.confusion is not None:
                self.confusion += other.confusion
        self.labels.merge(other.labels)

    @property
    def rmse(self) -> float | None:
        """Root mean squared error (regressors); None without a numeric pair."""
        return math.sqrt(self.squared_error / self.error_count) if self.error_count else None

    @property
    def mae(self) -> float | None:
        """Mean absolute error (regressors); None without a numeric pair."""
        return self.absolute_error / self.error_count if self.error_count else None

    @property
    def accuracy(self) -> float | None:
        """Fraction of pairs predicted right (classifiers); None without any."""
        return self.correct / self.pairs if self.classifier and self.pairs else None

    @property
    def mean_log_loss(self) -> float | None:
        """Mean of -log(p(true class)), p clipped at LOG_LOSS_EPSILON (classifiers with
        probabilities); None without any."""
        return self.log_loss / self.log_loss_count if self.log_loss_count else None

    def to_proto(self) -> pb.OnlineQuality:
        """As its protobuf message (figures, the sums behind them, label outcomes)."""
        message = pb.OnlineQuality(
            labelled_count=self.pairs,
            error_count=self.error_count,
            squared_error_sum=self.squared_error,
            absolute_error_sum=self.absolute_error,
            correct_count=self.correct,
            log_loss_sum=self.log_loss,
            log_loss_count=self.log_loss_count,
            labels=self.labels.to_proto(),
        )
        for name in ("rmse", "mae", "accuracy"):
            value = getattr(self, name)
            if value is not None:
                setattr(message, name, value)
        if self.mean_log_loss is not None:
            message.log_loss = self.mean_log_loss
        if self.confusion is not None:
            message.confusion.classes.extend(self.classes)
            message.confusion.counts.extend(self.confusion.ravel().tolist())
        return message

    def to_json(self) -> dict[str, object]:
        """JSON-ready figures and counts (the queryable state)."""
        out: dict[str, object] = {
            "labelled_count": self.pairs,
            "rmse": self.rmse,
            "mae": self.mae,
            "accuracy": self.accuracy,
            "log_loss": self.mean_log_loss,
        }
        if self.confusion is not None:
            out["confusion"] = {"classes": list(self.classes), "counts": self.confusion.tolist()}
        return out


def log_losses(probabilities: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """-log(p) of each row's true class (`truth`: column index, -1 for none: p = 0), p
    clipped to [LOG_LOSS_EPSILON, 1]; NaN probabilities count as 0."""
    rows = np.arange(len(truth))
    p = np.where(truth >= 0, probabilities[rows, np.maximum(truth, 0)], 0.0)
    p = np.nan_to_num(p, nan=0.0)
    return -np.log(np.clip(p, LOG_LOSS_EPSILON, 1.0))


def class_indices(classes: tuple[str, ...], labels: np.ndarray) -> np.ndarray:
    """Each label's index in `classes` (-1: none of them), int64. Text labels match a
    class by name; numeric labels match a class whose name is that number ("5" or "5.0")."""
    if labels.dtype == object:
        index = {c: i for i, c in enumerate(classes)}
        return np.fromiter((index.get(v, -1) for v in labels.tolist()), np.int64, len(labels))
    numbers: dict[float, int] = {}
    for i, c in enumerate(classes):
        try:
            numbers.setdefault(float(c), i)
        except ValueError:
            continue
    return np.fromiter((numbers.get(v, -1) for v in labels.tolist()), np.int64, len(labels))
