"""The quality gate on real models: passes, wrong outputs, NaN outputs, slow models."""

from __future__ import annotations

import time

import numpy as np
import pytest

from dataflows.control.gate import (
    GateRows,
    golden_rows,
    reference_rows,
    run_gate,
)
from dataflows.core.descriptors import load_catalog
from dataflows.runtimes import ModelError, ModelRuntime, Prediction, load_runtime
from dataflows.runtimes.base import _classification
from protos import waxserve_pb2 as pb

WINE = load_catalog()


def runtime_of(name: str) -> tuple[ModelRuntime, pb.ModelDescriptor]:
    entry = WINE[name]
    desc = entry.descriptor()
    return load_runtime(desc.format, desc.model_bytes, tuple(desc.input_features)), desc


def golden_of(runtime: ModelRuntime, desc: pb.ModelDescriptor, rows: int = 20) -> pb.GoldenSet:
    """A golden set from the reference profile's rows, expected = the model's own outputs."""
    base = reference_rows(desc.reference_profile, runtime, list(desc.input_features))
    assert base is not None
    golden = pb.GoldenSet(evaluator="the model itself")
    prediction = runtime.predict(base.numeric[:rows], None)
    for i in range(rows):
        record = golden.inputs.add()
        for j, name in enumerate(desc.input_features):
            record.fields[name].number = float(base.numeric[i, j])
        out = golden.expected.add()
        if prediction.labels is None:
            out.value = float(prediction.values[i])
        else:
            out.label = prediction.labels[i]
            assert prediction.probabilities is not None
            for k, label in enumerate(prediction.class_labels):
                out.probabilities[label] = float(prediction.probabilities[i, k])
    return golden


@pytest.mark.parametrize("name", ["wine-lr", "wine-rf-classifier"])
def test_a_good_model_passes_with_and_without_a_golden_set(name: str) -> None:
    runtime, desc = runtime_of(name)
    inputs = list(desc.input_features)
    report = run_gate(runtime, reference_rows(desc.reference_profile, runtime, inputs))  # type: ignore[arg-type]
    assert report.rows == 64 and not report.compared
    golden = golden_of(runtime, desc)
    report = run_gate(runtime, golden_rows(golden, runtime, inputs), golden.expected)
    assert report.compared and report.rows == 20
    assert "passed" in report.summary()


def test_outputs_off_by_more_than_the_tolerance_fail_naming_the_worst_rows() -> None:
    runtime, desc = runtime_of("wine-lr")
    golden = golden_of(runtime, desc)
    golden.expected[7].value += 0.5
    golden.expected[3].value += 1e-3
    golden.expected[12].value += 1e-9  # within the tolerance
    rows = golden_rows(golden, runtime, list(desc.input_features))
    with pytest.raises(ModelError, match=r"2 of 20 golden rows .* worst: row 7: .*; row 3") as err:
        run_gate(runtime, rows, golden.expected)
    assert err.value.reason == "gate_failed"
    # A looser tolerance accepts the same outputs.
    golden.expected[7].value -= 0.5
    run_gate(runtime, rows, golden.expected, tolerance=1e-2)


def test_a_classifier_with_another_label_or_probability_fails() -> None:
    runtime, desc = runtime_of("wine-rf-classifier")
    golden = golden_of(runtime, desc)
    first = next(iter(golden.expected[0].probabilities))
    golden.expected[0].probabilities[first] += 0.2
    golden.expected[5].label = "not-a-class"
    rows = golden_rows(golden, runtime, list(desc.input_features))
    with pytest.raises(ModelError, match=r"row 5: label .*expected 'not-a-class'.*row 0: p\("):
        run_gate(runtime, rows, golden.expected)


class NaNForest(ModelRuntime):
    """A classifier that behaves like PMML4S on a Spark random forest: NaN for some class
    on every row and for every class on some rows."""

    format = "pmml"
    task = "classification"

    def __init__(self, inner: ModelRuntime) -> None:
        self.features = inner.features
        self.class_labels = ("5", "6", "7")
        self._inner = inner

    def predict(self, numeric: np.ndarray, text: np.ndarray | None = None) -> Prediction:
        n = len(numeric)
        p = np.tile([0.5, 0.3, np.nan], (n, 1))
        p[::4] = np.nan
        return _classification(p, self.class_labels, np.array([5.0, 6.0, 7.0]))

    def close(self) -> None:
        pass


def test_nan_outputs_fail_even_without_a_golden_set() -> None:
    runtime, desc = runtime_of("wine-lr")
    rows = reference_rows(desc.reference_profile, runtime, list(desc.input_features))
    assert rows is not None
    with pytest.raises(ModelError) as err:
        run_gate(NaNForest(runtime), rows)
    message = str(err.value)
    assert "no valid prediction (NaN or infinite) for 16 of 64 reference profile rows" in message
    assert "rows 0, 4, 8 and 13 more" in message
    assert "do not sum to 1" in message and "sums to 0.8" in message


class Slow(ModelRuntime):
    """A model that takes 2 ms of CPU per record."""

    format = "onnx"
    task = "regression"

    def __init__(self, inner: ModelRuntime) -> None:
        self.features = inner.features
        self._inner = inner
        self.calls = 0

    def predict(self, numeric: np.ndarray, text: np.ndarray | None = None) -> Prediction:
        started = time.thread_time()
        while time.thread_time() - started < 0.002 * len(numeric):
            pass
        self.calls += 1
        return self._inner.predict(numeric, text)

    def close(self) -> None:
        pass


def test_a_model_slower_than_the_budget_fails() -> None:
    runtime, desc = runtime_of("wine-lr")
    rows = reference_rows(desc.reference_profile, runtime, list(desc.input_features))
    assert rows is not None
    small = GateRows(rows.numeric[:8], None, rows.source)
    # 2 ms of CPU per record is never under a 1 ms budget, however busy the machine: the
    # gate counts the thread's CPU time, and times it again before it says so.
    slow = Slow(runtime)
    with pytest.raises(ModelError, match="µs per record on 8 reference profile rows, more than"):
        run_gate(slow, small, max_latency_us=1000)
    assert slow.calls == 4
    fast_enough = Slow(runtime)
    run_gate(fast_enough, small, max_latency_us=1e9)
    assert fast_enough.calls == 1  # within the budget at once: no more calls


def test_a_golden_set_that_does_not_fit_the_model_is_a_clear_error() -> None:
    runtime, desc = runtime_of("wine-lr")
    golden = golden_of(runtime, desc, rows=2)
    del golden.inputs[1].fields["alcohol"]
    with pytest.raises(ModelError, match="golden input 1 has no number for field 'alcohol'"):
        golden_rows(golden, runtime, list(desc.input_features))
    golden.expected.add()
    with pytest.raises(ModelError, match="2 inputs but 3 expected outputs"):
        golden_rows(golden, runtime, list(desc.input_features))
    with pytest.raises(ModelError, match="no inputs"):
        golden_rows(pb.GoldenSet(), runtime, list(desc.input_features))


def test_reference_rows_need_every_input_profiled() -> None:
    runtime, desc = runtime_of("wine-lr")
    profile = pb.ReferenceProfile()
    profile.CopyFrom(desc.reference_profile)
    del profile.features[0]
    assert reference_rows(profile, runtime, list(desc.input_features)) is None
