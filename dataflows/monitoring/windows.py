"""Serving stats and drift: accumulation per shard, merging per data type, the decision.

Shards accumulate per window and send partial results; the `monitor` step adds the
partials of all shards for a window and emits one message per model and window. Drift is
judged per quantity (feature, prediction, label) by a calibrated test at the window's size
(`dataflows.monitoring.drift_tests`), the window's family of tests by Holm's procedure.
All of it is plain numpy, testable without Bytewax.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from dataflows.monitoring.drift_tests import (
    TestResult,
    categorical_test,
    draws_for,
    holm,
    numeric_test,
    psi,
)
from dataflows.monitoring.quality import QualityAccumulator
from protos import waxserve_pb2 as pb

DEFAULT_ALPHA = 0.005
"""Family-wise false-alarm rate per window (WAXSERVE_DRIFT_ALPHA's default)."""

FEATURE, PREDICTION, LABEL = "feature", "prediction", "label"
"""What a drift quantity is (`FeatureDrift.quantity`)."""

MAX_SUMMED = 1e150
"""Feature values are summed (for the window's mean) no larger than this in magnitude:
two records of 1e308 (finite, accepted) would make the sum, and so every later mean of the
window, infinite. No real feature comes near it; the bins still see the true value."""


@dataclass(frozen=True)
class OutputReference:
    """Reference of the model's predictions or of the label over the training rows: bins
    of a numeric one, or category frequencies (then 0 for "unseen") of a categorical one."""

    name: str
    expected: np.ndarray
    edges: np.ndarray | None = None  # numeric: inner bin edges
    categories: tuple[str, ...] | None = None  # categorical
    mean: float = 0.0
    std: float = 0.0

    @property
    def categorical(self) -> bool:
        """Whether it is category frequencies."""
        return self.categories is not None

    @property
    def bins(self) -> int:
        """Number of bins (categorical: categories and unseen)."""
        return len(self.expected)

    def count(self, values: np.ndarray | Sequence[object]) -> tuple[np.ndarray, float]:
        """Bin counts of values (NaN, None: absent, not counted) and their sum (numeric)."""
        if self.categories is not None:
            index = {c: k for k, c in enumerate(self.categories)}
            unseen = len(self.categories)
            bins = [index.get(str(v), unseen) for v in values if v is not None]
            return np.bincount(bins, minlength=unseen + 1).astype(np.int64), 0.0
        assert self.edges is not None
        column = np.asarray(values, dtype=np.float64)
        column = column[~np.isnan(column)]
        found = np.searchsorted(self.edges, column, side="right")
        total = float(np.clip(column, -MAX_SUMMED, MAX_SUMMED).sum())
        return np.bincount(found, minlength=len(self.edges) + 1).astype(np.int64), total

    def __deepcopy__(self, memo: dict[int, object]) -> OutputReference:
        return self  # immutable


@dataclass(frozen=True)
class DriftReference:
    """Reference of what a model's training data looked like (from its descriptor): bins
    of the numeric features, category frequencies of the categorical ones, and, when the
    profile has them, of the model's predictions and of the label. `rows` is how many
    training rows the profile came from (0: unknown)."""

    features: tuple[str, ...]  # numeric contract fields
    edges: tuple[np.ndarray, ...]  # inner bin edges per feature
    expected: tuple[np.ndarray, ...]  # expected fraction per bin per feature
    means: np.ndarray
    stds: np.ndarray
    text_features: tuple[str, ...] = ()  # categorical (string) contract fields
    categories: tuple[tuple[str, ...], ...] = ()  # per text feature, as profiled
    # Per text feature: expected fraction per category, then 0 for "unseen".
    text_expected: tuple[np.ndarray, ...] = ()
    rows: int = 0
    prediction: OutputReference | None = None
    label: OutputReference | None = None

    @property
    def bin_counts(self) -> tuple[int, ...]:
        """Number of bins per numeric feature."""
        return tuple(len(e) + 1 for e in self.edges)

    def __deepcopy__(self, memo: dict[int, object]) -> DriftReference:
        return self  # immutable


@dataclass
class DriftAccumulator:
    """Bin counts and sums of the features of the records one model scored in a window,
    and of its predictions and their labels when the reference has them."""

    counts: list[np.ndarray]  # per numeric feature, int64 (bins,)
    sums: np.ndarray  # per numeric feature
    n: int = 0
    text_counts: list[np.ndarray] = field(default_factory=list)  # per category, then unseen
    prediction_counts: np.ndarray | None = None
    prediction_sum: float = 0.0
    label_counts: np.ndarray | None = None
    label_sum: float = 0.0

    @classmethod
    def empty(cls, reference: DriftReference) -> DriftAccumulator:
        """An accumulator with no records."""
        prediction, label = reference.prediction, reference.label
        return cls(
            counts=[np.zeros(b, dtype=np.int64) for b in reference.bin_counts],
            sums=np.zeros(len(reference.features)),
            text_counts=[np.zeros(len(c) + 1, dtype=np.int64) for c in reference.categories],
            prediction_counts=None if prediction is None else np.zeros(prediction.bins, np.int64),
            label_counts=None if label is None else np.zeros(label.bins, np.int64),
        )

    def add_outputs(
        self,
        reference: DriftReference,
        prediction: np.ndarray | Sequence[object] | None,
        labels: np.ndarray | None,
    ) -> None:
        """Count the scored records' predictions (values for a numeric reference, class
        labels for a categorical one) and the labels of those that carry one (NaN, None:
        no label). None, or values of the wrong kind for the reference: not counted."""
        ref = reference.prediction
        counted = self.prediction_counts
        fits = ref is not None and (ref.categorical or _numeric(prediction))
        if fits and ref is not None and prediction is not None and counted is not None:
            counts, total = ref.count(prediction)
            counted += counts
            self.prediction_sum += total
        ref, counted = reference.label, self.label_counts
        # A label column is object (text) or float (numeric), as its contract field is.
        fits = (
            ref is not None and labels is not None and ref.categorical == (labels.dtype == object)
        )
        if fits and ref is not None and labels is not None and counted is not None:
            counts, total = ref.count(labels)
            counted += counts
            self.label_sum += total

    def add(
        self, reference: DriftReference, features: np.ndarray, text: np.ndarray | None = None
    ) -> None:
        """Count the rows of a (n, len(reference.features)) matrix of the reference's
        numeric features and, with text features, a (n, len(reference.text_features))
        object matrix of them.

        A record may lack a feature that its model does not use (NaN, None): it counts for
        the features it has, so each feature's bins hold the records that had it.
        """
        if len(features) == 0:
            return
        # Feature-major: searchsorted then reads contiguous rows, and the sums are one call.
        values = np.ascontiguousarray(features.T)
        absent = np.isnan(values)
        lacking = absent.any(axis=1).tolist()  # per feature
        for i, (edges, column) in enumerate(zip(reference.edges, values, strict=True)):
            if lacking[i]:  # searchsorted would count NaN in the top bin
                column = column[~absent[i]]
            bins = np.searchsorted(edges, column, side="right")
            self.counts[i] += np.bincount(bins, minlength=len(edges) + 1)
        with np.errstate(over="ignore"):  # an overflow is caught just below
            sums = np.where(absent, 0.0, values).sum(axis=1) if any(lacking) else values.sum(1)
        if not (np.abs(sums) <= MAX_SUMMED).all():  # absurd values only: else nothing to pay
            sums = np.clip(np.where(absent, 0.0, values), -MAX_SUMMED, MAX_SUMMED).sum(axis=1)
        self.sums += sums
        if text is not None:
            for j, categories in enumerate(reference.categories):
                index = {c: k for k, c in enumerate(categories)}
                unseen = len(categories)
                bins = [index.get(v, unseen) for v in text[:, j].tolist() if v is not None]
                self.text_counts[j] += np.bincount(bins, minlength=unseen + 1)
        self.n += len(features)

    def merge(self, other: DriftAccumulator) -> None:
        """Add another accumulator of the same reference into this one."""
        for mine, theirs in zip(self.counts, other.counts, strict=True):
            mine += theirs
        for mine, theirs in zip(self.text_counts, other.text_counts, strict=True):
            mine += theirs
        self.sums += other.sums
        self.n += other.n
        if self.prediction_counts is not None and other.prediction_counts is not None:
            self.prediction_counts += other.prediction_counts
            self.prediction_sum += other.prediction_sum
        if self.label_counts is not None and other.label_counts is not None:
            self.label_counts += other.label_counts
            self.label_sum += other.label_sum


def _numeric(values: np.ndarray | Sequence[object] | None) -> bool:
    return isinstance(values, np.ndarray) and values.dtype.kind == "f"


MAX_AGREEMENT_CLASSES = 32
"""Labels a shadow's confusion matrix against the active model holds at most."""


@dataclass
class AgreementAccumulator:
    """A shadow model's outputs against the active model's on the records both scored:
    the sums behind mean absolute difference (regressors), agreement rate and a confusion
    matrix (classifiers)."""

    primary_name: str
    primary_version: str
    compared: int = 0
    absolute_difference: float = 0.0
    agree: int = 0
    classifier: bool = False
    pairs: dict[tuple[str, str], int] = field(default_factory=dict)

    def add_values(self, active: np.ndarray, shadow: np.ndarray) -> None:
        """Regressors: the two models' values for the same records."""
        self.compared += len(active)
        self.absolute_difference += float(np.abs(shadow - active).sum())

    def add_labels(self, active: Sequence[str], shadow: Sequence[str]) -> None:
        """Classifiers: the two models' labels for the same records."""
        self.classifier = True
        self.compared += len(active)
        pairs = Counter(zip(active, shadow, strict=True))  # one count per distinct pair
        self.agree += sum(n for (a, s), n in pairs.items() if a == s)
        self._add_pairs(pairs)

    def _add_pairs(self, pairs: Mapping[tuple[str, str], int]) -> None:
        """Count pairs into the confusion matrix, up to MAX_AGREEMENT_CLASSES labels."""
        classes = {c for pair in self.pairs for c in pair}
        for pair, n in pairs.items():
            if pair not in self.pairs:
                if len(classes | set(pair)) > MAX_AGREEMENT_CLASSES:
                    continue
                classes.update(pair)
            self.pairs[pair] = self.pairs.get(pair, 0) + n

    def merge(self, other: AgreementAccumulator) -> None:
        """Add another accumulator (of the same shadow) into this one."""
        self.compared += other.compared
        self.absolute_difference += other.absolute_difference
        self.agree += other.agree
        self.classifier = self.classifier or other.classifier
        self._add_pairs(other.pairs)

    def to_proto(self) -> pb.ShadowAgreement:
        """The stats message's `shadow_window`."""
        message = pb.ShadowAgreement(
            primary_name=self.primary_name,
            primary_version=self.primary_version,
            compared_count=self.compared,
            absolute_difference_sum=self.absolute_difference,
            agree_count=self.agree,
        )
        if self.compared and self.classifier:
            message.agreement_rate = self.agree / self.compared
            classes = sorted({c for pair in self.pairs for c in pair})
            index = {c: i for i, c in enumerate(classes)}
            counts = [0] * (len(classes) * len(classes))
            for (active, shadow), n in self.pairs.items():
                counts[index[active] * len(classes) + index[shadow]] += n
            message.confusion.CopyFrom(pb.ConfusionMatrix(classes=classes, counts=counts))
        elif self.compared:
            message.mean_absolute_difference = self.absolute_difference / self.compared
        return message


@dataclass
class StatsAccumulator:
    """Count and scoring time of the records one model scored, and how well it did on
    the records that carried a label."""

    count: int = 0
    total_s: float = 0.0
    min_s: float = math.inf
    max_s: float = 0.0
    labelled: int = 0
    squared_error: float = 0.0
    squared_count: int = 0  # labelled records with a numeric label and prediction
    correct: int = 0
    classifier: bool = False
    # Quality against labels that came later (the feedback join); None: no pairs or
    # label outcomes. The fields above are the labels inside records only.
    feedback: QualityAccumulator | None = None
    # A shadow model: its outputs against the active model's (serving plans).
    agreement: AgreementAccumulator | None = None

    def add_call(self, n: int, seconds: float) -> None:
        """One model call that scored n records in `seconds`."""
        if n == 0:
            return
        per_record = seconds / n
        self.count += n
        self.total_s += seconds
        self.min_s = min(self.min_s, per_record)
        self.max_s = max(self.max_s, per_record)

    def add_labelled(
        self, n: int, squared_error: float, correct: int | None, squared_count: int | None = None
    ) -> None:
        """n labelled records; `correct` is None for regressors; `squared_error` is over
        `squared_count` of them (default: all n), those whose label is a number."""
        self.labelled += n
        self.squared_error += squared_error
        self.squared_count += n if squared_count is None else squared_count
        if correct is not None:
            self.classifier = True
            self.correct += correct

    @property
    def rmse(self) -> float | None:
        """Root mean squared error over the labelled records; None without any."""
        if not self.squared_count:
            return None
        return math.sqrt(self.squared_error / self.squared_count)

    @property
    def accuracy(self) -> float | None:
        """Classifiers: the fraction of labelled records predicted right; else None."""
        return self.correct / self.labelled if self.labelled and self.classifier else None

    def merge(self, other: StatsAccumulator) -> None:
        """Add another accumulator into this one."""
        self.count += other.count
        self.total_s += other.total_s
        self.min_s = min(self.min_s, other.min_s)
        self.max_s = max(self.max_s, other.max_s)
        self.add_labelled(
            other.labelled,
            other.squared_error,
            other.correct if other.classifier else None,
            other.squared_count,
        )
        if other.feedback is not None:
            if self.feedback is None:
                self.feedback = QualityAccumulator()
            self.feedback.merge(other.feedback)
        if other.agreement is not None:
            if self.agreement is None:
                mine = other.agreement
                self.agreement = AgreementAccumulator(mine.primary_name, mine.primary_version)
            self.agreement.merge(other.agreement)


@dataclass(frozen=True)
class ModelIdentity:
    """Which model: what stats and drift are reported against."""

    data_type: str
    name: str
    version: str
    sha256: str
    description: str = ""
    format: int = 0
    since_ms: int = 0


@dataclass
class StatsPartial:
    """One shard's stats of one model for one interval."""

    model: ModelIdentity
    window_start_ms: int
    window_end_ms: int
    stats: StatsAccumulator


@dataclass
class DriftPartial:
    """One shard's drift counts of one model for one window."""

    model: ModelIdentity
    reference: DriftReference
    window_start_ms: int
    window_end_ms: int
    drift: DriftAccumulator


def window_start(now_ms: int, length_ms: int) -> int:
    """Start of the tumbling window (aligned to the epoch) that contains now_ms."""
    return now_ms - now_ms % length_ms


@dataclass
class _Quantity:
    """One tested quantity of a window, while its message is built."""

    message: pb.FeatureDrift
    expected: np.ndarray
    counts: np.ndarray


def _numeric_quantity(
    name: str,
    kind: str,
    expected: np.ndarray,
    counts: np.ndarray,
    total: float,
    mean: float,
    std: float,
    rows: int,
) -> _Quantity:
    had_it = int(counts.sum())  # the records of the window that had it
    window_mean = total / had_it if had_it else 0.0
    shift = (window_mean - mean) / std if std > 0 and had_it else 0.0
    message = pb.FeatureDrift(
        feature=name,
        quantity=kind,
        record_count=had_it,
        psi=psi(expected, counts, rows),
        mean=window_mean,
        mean_shift_sigmas=shift,
        bin_counts=[int(c) for c in counts],
    )
    return _Quantity(message, expected, counts)


def _categorical_quantity(
    name: str, kind: str, expected: np.ndarray, counts: np.ndarray, rows: int
) -> _Quantity:
    message = pb.FeatureDrift(
        feature=name,
        quantity=kind,
        record_count=int(counts.sum()),
        psi=psi(expected, counts, rows),
        bin_counts=[int(c) for c in counts],
        unseen_count=int(counts[-1]),
        categorical=True,
    )
    return _Quantity(message, expected, counts)


def _quantities(ref: DriftReference, acc: DriftAccumulator) -> list[_Quantity]:
    rows = ref.rows
    out = [
        _numeric_quantity(
            name,
            FEATURE,
            ref.expected[i],
            acc.counts[i],
            float(acc.sums[i]),
            float(ref.means[i]),
            float(ref.stds[i]),
            rows,
        )
        for i, name in enumerate(ref.features)
    ]
    out += [
        _categorical_quantity(name, FEATURE, ref.text_expected[j], acc.text_counts[j], rows)
        for j, name in enumerate(ref.text_features)
    ]
    outputs = (
        (PREDICTION, ref.prediction, acc.prediction_counts, acc.prediction_sum),
        (LABEL, ref.label, acc.label_counts, acc.label_sum),
    )
    for kind, output, counts, total in outputs:
        if output is None or counts is None:
            continue
        if output.categorical:
            out.append(_categorical_quantity(output.name, kind, output.expected, counts, rows))
        else:
            out.append(
                _numeric_quantity(
                    output.name,
                    kind,
                    output.expected,
                    counts,
                    total,
                    output.mean,
                    output.std,
                    rows,
                )
            )
    return out


def drift_message(
    partial: DriftPartial, alpha: float = DEFAULT_ALPHA, min_records: int = 0
) -> pb.DriftMetrics:
    """The drift topic message for a (merged) window.

    A window of at least `min_records` records is judged: each quantity with at least
    `min_records` records of its own (the label: records that carry one) gets a calibrated
    p-value, and Holm's procedure over them at family-wise rate `alpha` says which drifted;
    the window alarms when any did. A smaller window is too small to judge: it reports its
    counts and PSI, no p-value, and no alarm. PSI is descriptive only.
    """
    ref, acc = partial.reference, partial.drift
    quantities = _quantities(ref, acc)
    judged = acc.n >= min_records
    tested = [q for q in quantities if judged and q.message.record_count >= max(min_records, 1)]
    draws = draws_for(alpha, len(tested))
    results: list[TestResult] = []
    for q in tested:
        if q.message.categorical:
            results.append(categorical_test(q.expected, q.counts, ref.rows, draws))
        else:
            results.append(numeric_test(q.expected, q.counts, ref.rows, draws))
    for q, result, drifted in zip(
        tested, results, holm([r.p_value for r in results], alpha), strict=True
    ):
        q.message.p_value = result.p_value
        q.message.distance = result.distance
        q.message.drifted = drifted
    features = [q.message for q in quantities]
    return pb.DriftMetrics(
        data_type=partial.model.data_type,
        model_name=partial.model.name,
        model_version=partial.model.version,
        window_start_ms=partial.window_start_ms,
        window_end_ms=partial.window_end_ms,
        record_count=acc.n,
        features=features,
        max_psi=max((f.psi for f in features if f.quantity == FEATURE), default=0.0),
        alarm=any(f.drifted for f in features),
        judged=judged,
        alpha=alpha,
    )


def stats_message(
    model: ModelIdentity, total: StatsAccumulator, window: StatsPartial
) -> pb.ServingStats:
    """The stats topic message: totals since install plus this interval's count and
    online quality."""
    window_stats = window.stats
    message = pb.ServingStats(
        data_type=model.data_type,
        model_name=model.name,
        model_version=model.version,
        model_sha256=model.sha256,
        description=model.description,
        format=model.format,  # type: ignore[arg-type]
        since_ms=model.since_ms,
        usage_count=total.count,
        total_duration_ms=total.total_s * 1e3,
        min_duration_us=total.min_s * 1e6 if total.count else 0.0,
        max_duration_us=total.max_s * 1e6,
        mean_duration_us=total.total_s / total.count * 1e6 if total.count else 0.0,
        window_start_ms=window.window_start_ms,
        window_end_ms=window.window_end_ms,
        window_count=window_stats.count,
        window_labelled_count=window_stats.labelled,
    )
    if window_stats.rmse is not None:
        message.window_rmse = window_stats.rmse
    if window_stats.accuracy is not None:
        message.window_accuracy = window_stats.accuracy
    if window_stats.feedback is not None:
        message.feedback_window.CopyFrom(window_stats.feedback.to_proto())
    if total.feedback is not None:
        message.feedback_total.CopyFrom(total.feedback.to_proto())
    if window_stats.agreement is not None:
        message.shadow_window.CopyFrom(window_stats.agreement.to_proto())
    return message


MAX_MODELS_REMEMBERED = 16
"""Stats totals kept per data type: the newest models, plus any with open windows."""


@dataclass
class MonitorState:
    """Per data type: stats totals per model, and windows still collecting partials."""

    totals: dict[ModelIdentity, StatsAccumulator] = field(default_factory=dict)
    stats_windows: dict[tuple[ModelIdentity, int], StatsPartial] = field(default_factory=dict)
    drift_windows: dict[tuple[ModelIdentity, int], DriftPartial] = field(default_factory=dict)

    def add(self, partial: StatsPartial | DriftPartial) -> None:
        """Fold a shard's partial into its window."""
        if isinstance(partial, StatsPartial):
            self.totals.setdefault(partial.model, StatsAccumulator()).merge(partial.stats)
            key = (partial.model, partial.window_start_ms)
            open_window = self.stats_windows.get(key)
            if open_window is None:
                self.stats_windows[key] = StatsPartial(
                    partial.model,
                    partial.window_start_ms,
                    partial.window_end_ms,
                    StatsAccumulator(),
                )
                open_window = self.stats_windows[key]
            open_window.stats.merge(partial.stats)
        else:
            key = (partial.model, partial.window_start_ms)
            open_drift = self.drift_windows.get(key)
            if open_drift is None:
                self.drift_windows[key] = DriftPartial(
                    partial.model,
                    partial.reference,
                    partial.window_start_ms,
                    partial.window_end_ms,
                    DriftAccumulator.empty(partial.reference),
                )
                open_drift = self.drift_windows[key]
            open_drift.drift.merge(partial.drift)

    def close(
        self, until_ms: int | None, alpha: float = DEFAULT_ALPHA, min_records: int = 0
    ) -> list[pb.ServingStats | pb.DriftMetrics]:
        """Messages for every window that ended at or before until_ms (None: all of them)."""
        out: list[pb.ServingStats | pb.DriftMetrics] = []
        for key, stats in sorted(self.stats_windows.items(), key=lambda kv: kv[0][1]):
            if until_ms is None or stats.window_end_ms <= until_ms:
                del self.stats_windows[key]
                out.append(stats_message(stats.model, self.totals[stats.model], stats))
        for key, drift in sorted(self.drift_windows.items(), key=lambda kv: kv[0][1]):
            if until_ms is None or drift.window_end_ms <= until_ms:
                del self.drift_windows[key]
                out.append(drift_message(drift, alpha, min_records))
        self._forget_old_models()
        return out

    def _forget_old_models(self) -> None:
        # Every model version ever installed would otherwise stay here forever.
        if len(self.totals) <= MAX_MODELS_REMEMBERED:
            return
        active = {model for model, _ in self.stats_windows}
        by_age = sorted(self.totals, key=lambda m: m.since_ms)
        for model in by_age[: len(by_age) - MAX_MODELS_REMEMBERED]:
            if model not in active:
                del self.totals[model]

    def next_close_ms(self) -> int | None:
        """End of the earliest open window."""
        ends = [w.window_end_ms for w in self.stats_windows.values()]
        ends += [w.window_end_ms for w in self.drift_windows.values()]
        return min(ends, default=None)
