"""The quality gate: a model scores a test batch before it may serve a single record.

A model that loads can still be wrong: PMML4S returns NaN for the classes of a Spark random
forest on every row, a converter can change a model's numbers, a model can be far too slow.
The registry runs the gate after loading and binding a model, off the scoring path, and a
model that fails it is rejected like any other (the previous model keeps serving).

What it scores:
- the descriptor's golden set (`pb.GoldenSet`): sample records and, usually, the outputs the
  trainer's own evaluator gave for them. Each served output must be within the tolerance
  of the expected one (values and class probabilities: |served - expected| <= tol * (1 +
  |expected|); labels equal);
- without a golden set, rows built from the model's reference profile (bin edges and
  midpoints of each numeric feature, each category of the categorical ones), so that a
  model that cannot score plausible inputs never serves.

Either way, every row must give a valid prediction (no NaN, no infinity), a classifier's
probabilities must sum to 1 within `PROBABILITY_SUM_TOLERANCE`, and the mean scoring time per
record must stay within the latency budget. A failure names the worst rows.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dataflows.core.reasons import Reason
from dataflows.runtimes import ModelError, ModelRuntime, Prediction
from protos import waxserve_pb2 as pb

DEFAULT_TOLERANCE = 1e-6
PROBABILITY_SUM_TOLERANCE = 1e-3
"""A classifier's probabilities sum to 1 within this (float32 models round)."""
DEFAULT_MAX_LATENCY_US = 10_000.0
"""Mean model time (CPU time of the scoring thread) per record on the gate's batch, in
microseconds: 100x what the example models take, so only a model that would stall the
stream fails it."""
RETIMED_PASSES = 3
"""Calls timed again, best kept, before a model is called too slow."""
MAX_GOLDEN_ROWS = 10_000
REFERENCE_ROWS = 64
WORST_SHOWN = 3


@dataclass(frozen=True)
class GateRows:
    """The gate's batch: model-ready matrices, with where the rows came from."""

    numeric: np.ndarray  # float64 (n, numeric features)
    text: np.ndarray | None  # object (n, text features), None without text features
    source: str  # "golden set" or "reference profile"

    def __len__(self) -> int:
        return len(self.numeric)


@dataclass(frozen=True)
class GateReport:
    """A model that passed: how many rows it scored and how fast."""

    rows: int
    source: str
    latency_us: float
    compared: bool  # whether outputs were compared with expected ones

    def summary(self) -> str:
        """One line for the model event."""
        checked = "outputs match" if self.compared else "valid outputs"
        return (
            f"quality gate passed: {self.rows} {self.source} rows, {checked}, "
            f"{self.latency_us:.1f} µs/record"
        )


def golden_rows(
    golden: pb.GoldenSet, runtime: ModelRuntime, input_fields: Sequence[str]
) -> GateRows:
    """The golden set's records as the model's input matrices. `input_fields` are the
    contract fields that feed the runtime's features, in the runtime's feature order."""
    n = len(golden.inputs)
    if n == 0:
        raise ModelError(Reason.GATE_FAILED, "the golden set has no inputs")
    if n > MAX_GOLDEN_ROWS:
        raise ModelError(
            Reason.GATE_FAILED, f"the golden set has {n:,} inputs, more than {MAX_GOLDEN_ROWS:,}"
        )
    if golden.expected and len(golden.expected) != n:
        raise ModelError(
            Reason.GATE_FAILED,
            f"the golden set has {n} inputs but {len(golden.expected)} expected outputs",
        )
    numeric_at, text_at = _feature_columns(runtime, input_fields)
    numeric = np.full((n, len(numeric_at)), np.nan)
    text = np.full((n, len(text_at)), None, dtype=object) if text_at else None
    for i, record in enumerate(golden.inputs):
        fields = record.fields
        for j, name in enumerate(numeric_at):
            value = fields.get(name)
            number = _number(value) if value is not None else None
            if number is None:
                raise ModelError(
                    Reason.GATE_FAILED, f"golden input {i} has no number for field {name!r}"
                )
            numeric[i, j] = number
        for j, name in enumerate(text_at):
            value = fields.get(name)
            if value is None or value.WhichOneof("kind") != "text":
                raise ModelError(
                    Reason.GATE_FAILED, f"golden input {i} has no text for field {name!r}"
                )
            assert text is not None
            text[i, j] = value.text
    return GateRows(numeric, text, "golden set")


def reference_rows(
    profile: pb.ReferenceProfile, runtime: ModelRuntime, input_fields: Sequence[str]
) -> GateRows | None:
    """Plausible inputs from a reference profile: for each numeric feature its bin edges,
    bin midpoints and mean; for each categorical one its categories; combined across
    features so that rows differ. None when the profile lacks one of the model's inputs."""
    by_name = {f.name: f for f in profile.features}
    numeric_at, text_at = _feature_columns(runtime, input_fields)
    numeric_values, text_values = [], []
    for name in numeric_at:
        feature = by_name.get(name)
        if feature is None or not feature.bin_edges:
            return None
        edges = list(feature.bin_edges)
        mids = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
        values = [v for v in [*edges, *mids, feature.mean] if math.isfinite(v)]
        numeric_values.append(sorted(set(values)))
    for name in text_at:
        feature = by_name.get(name)
        if feature is None or not feature.categories:
            return None
        text_values.append(list(feature.categories))
    n = REFERENCE_ROWS
    numeric = np.empty((n, len(numeric_values)))
    for j, values in enumerate(numeric_values):
        # A different stride per feature, so rows mix low and high values of features.
        numeric[:, j] = [values[(r * (2 * j + 1) + j) % len(values)] for r in range(n)]
    text = None
    if text_values:
        text = np.empty((n, len(text_values)), dtype=object)
        for j, values in enumerate(text_values):
            text[:, j] = [values[(r * (2 * j + 3) + j) % len(values)] for r in range(n)]
    return GateRows(numeric, text, "reference profile")


def _feature_columns(
    runtime: ModelRuntime, input_fields: Sequence[str]
) -> tuple[list[str], list[str]]:
    """The contract fields feeding the runtime's numeric and text columns, in order."""
    if len(input_fields) != len(runtime.features):
        raise ModelError(
            Reason.GATE_FAILED,
            f"{len(input_fields)} input fields for {len(runtime.features)} model features",
        )
    numeric = [
        f for f, m in zip(input_fields, runtime.features, strict=True) if m.kind == "numeric"
    ]
    text = [f for f, m in zip(input_fields, runtime.features, strict=True) if m.kind != "numeric"]
    return numeric, text


def _number(value: pb.Value) -> float | None:
    kind = value.WhichOneof("kind")
    if kind == "number":
        return value.number
    if kind == "integer":
        return float(value.integer)
    if kind == "boolean":
        return float(value.boolean)
    return None


def _timed(runtime: ModelRuntime, rows: GateRows) -> tuple[Prediction, float]:
    """One call on the gate's batch, and its model time per record in microseconds: the
    calling thread's CPU time (onnxruntime with one thread and PMML4S score on it), so a
    busy machine does not make a model look slow."""
    started = time.thread_time()
    prediction = runtime.predict(rows.numeric, rows.text)
    return prediction, (time.thread_time() - started) / len(rows) * 1e6


def run_gate(
    runtime: ModelRuntime,
    rows: GateRows,
    expected: Sequence[pb.GoldenOutput] = (),
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    max_latency_us: float = DEFAULT_MAX_LATENCY_US,
) -> GateReport:
    """Score the gate's batch; ModelError(gate_failed) naming the worst rows on failure."""
    try:
        prediction, latency_us = _timed(runtime, rows)
        # A first call can be slow (a JVM compiling PMML4S's code): the best of a few more
        # decides before a model is called too slow.
        for _ in range(RETIMED_PASSES if latency_us > max_latency_us else 0):
            latency_us = min(latency_us, _timed(runtime, rows)[1])
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(
            Reason.GATE_FAILED,
            f"quality gate: the model failed on the {rows.source} rows: "
            f"{type(exc).__name__}: {exc}",
        ) from None
    problems = _invalid(prediction, rows.source)
    if not problems and expected:
        problems = _off(prediction, expected, tolerance)
    if not problems and latency_us > max_latency_us:
        problems = [
            f"{latency_us:,.0f} µs per record on {len(rows)} {rows.source} rows, more than the "
            f"budget of {max_latency_us:,.0f} µs"
        ]
    if problems:
        raise ModelError(Reason.GATE_FAILED, "quality gate: " + "; ".join(problems))
    return GateReport(len(rows), rows.source, latency_us, bool(expected))


def _rows_text(rows: np.ndarray, what: str) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:WORST_SHOWN])
    more = f" and {len(rows) - WORST_SHOWN} more" if len(rows) > WORST_SHOWN else ""
    return f"{what} (rows {shown}{more})"


def _invalid(prediction: Prediction, source: str) -> list[str]:
    n = len(prediction.valid)
    problems = []
    invalid = np.flatnonzero(~prediction.valid)
    if len(invalid):
        problems.append(
            _rows_text(
                invalid,
                f"no valid prediction (NaN or infinite) for {len(invalid)} of {n} {source} rows",
            )
        )
    if prediction.probabilities is not None and n:
        probabilities = prediction.probabilities[prediction.valid]
        valid_rows = np.flatnonzero(prediction.valid)
        finite = np.isfinite(probabilities).all(axis=1)
        sums = np.where(finite, probabilities.sum(axis=1), np.nan)
        off = ~(np.abs(sums - 1.0) <= PROBABILITY_SUM_TOLERANCE)
        if off.any():
            worst = np.argsort(-np.nan_to_num(np.abs(sums - 1.0), nan=np.inf))[:WORST_SHOWN]
            detail = ", ".join(
                f"row {int(valid_rows[i])} sums to {sums[i]:.4g}" for i in worst if off[i]
            )
            problems.append(
                f"class probabilities do not sum to 1 (±{PROBABILITY_SUM_TOLERANCE:g}) on "
                f"{int(off.sum())} of {n} {source} rows: {detail}"
            )
    return problems


def _off(
    prediction: Prediction, expected: Sequence[pb.GoldenOutput], tolerance: float
) -> list[str]:
    """Where the served outputs differ from the expected ones by more than the tolerance."""
    errors: list[tuple[float, int, str]] = []  # (size, row, what)
    classes = {label: k for k, label in enumerate(prediction.class_labels)}
    for i, want in enumerate(expected):
        if want.HasField("value"):
            got = float(prediction.values[i])
            error = abs(got - want.value)
            if not error <= tolerance * (1 + abs(want.value)):
                errors.append((error, i, f"row {i}: value {got:.6g}, expected {want.value:.6g}"))
        if want.label and prediction.labels is not None and prediction.labels[i] != want.label:
            errors.append(
                (math.inf, i, f"row {i}: label {prediction.labels[i]!r}, expected {want.label!r}")
            )
        if want.probabilities and prediction.probabilities is not None:
            for label, p in sorted(want.probabilities.items()):
                k = classes.get(label)
                if k is None:
                    errors.append((math.inf, i, f"row {i}: the model has no class {label!r}"))
                    continue
                got = float(prediction.probabilities[i, k])
                error = abs(got - p)
                if not error <= tolerance * (1 + abs(p)):
                    errors.append((error, i, f"row {i}: p({label}) {got:.6g}, expected {p:.6g}"))
    if not errors:
        return []
    rows = len({row for _, row, _ in errors})
    worst = sorted(errors, key=lambda e: (-e[0], e[1]))[:WORST_SHOWN]
    return [
        f"{rows} of {len(expected)} golden rows are off by more than the tolerance "
        f"{tolerance:g}; worst: " + "; ".join(what for _, _, what in worst)
    ]
