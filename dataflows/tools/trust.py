"""What `waxserve publish` adds to a descriptor so the dataflow can trust it: a golden set
for the quality gate (dataflows/control/gate.py), then a signature (signing.py).

A golden-set file is JSON lines, one record per line:

    {"input": {"alcohol": 9.4, "ph": 3.51, ...}, "expected": {"value": 5.03}}
    {"input": {...}, "expected": {"label": "6", "probabilities": {"5": 0.2, "6": 0.7, ...}}}

`expected` may be left out: the evaluator computes it. `model` scores the inputs with
waxserve's own runtime here (it proves the dataflow's runtime gives what this machine's
gives); `command:CMD` runs CMD (the user's own evaluator, e.g. the training framework)
with the inputs as JSON lines on its stdin and reads one `expected` object per line from
its stdout. The command runs here, on the publisher's machine, never in the dataflow.
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
from pathlib import Path
from typing import Any

from dataflows.contracts.schema import Contract
from dataflows.control.gate import golden_rows
from dataflows.control.registry import bind_inputs
from dataflows.runtimes import ModelError, load_runtime
from protos import waxserve_pb2 as pb

EVALUATOR_TIMEOUT_S = 600.0


class GoldenSetError(ValueError):
    """A golden-set file or evaluator that cannot be used, with what is wrong."""


def _value(field: str, value: Any, line: int) -> pb.Value:
    if isinstance(value, bool):
        return pb.Value(boolean=value)
    if isinstance(value, int):
        return pb.Value(integer=value)
    if isinstance(value, float) and math.isfinite(value):
        return pb.Value(number=value)
    if isinstance(value, str):
        return pb.Value(text=value)
    raise GoldenSetError(f"line {line}: field {field!r} is {value!r}: a number, boolean or text")


def _expected(obj: Any, line: int) -> pb.GoldenOutput:
    if not isinstance(obj, dict):
        raise GoldenSetError(f"line {line}: expected must be an object")
    out = pb.GoldenOutput()
    unknown = set(obj) - {"value", "label", "probabilities"}
    if unknown:
        raise GoldenSetError(f"line {line}: unknown keys in expected: {sorted(unknown)}")
    try:
        if obj.get("value") is not None:
            out.value = float(obj["value"])
        if obj.get("label") is not None:
            out.label = str(obj["label"])
        for label, p in (obj.get("probabilities") or {}).items():
            out.probabilities[str(label)] = float(p)
    except (TypeError, ValueError, AttributeError) as exc:
        raise GoldenSetError(f"line {line}: bad expected output: {exc}") from None
    if not (out.HasField("value") or out.label or out.probabilities):
        raise GoldenSetError(f"line {line}: expected has no value, label or probabilities")
    return out


def read_golden(path: Path) -> tuple[list[dict[str, Any]], list[pb.GoldenOutput | None]]:
    """The inputs and (where given) expected outputs of a golden-set file."""
    inputs: list[dict[str, Any]] = []
    expected: list[pb.GoldenOutput | None] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise GoldenSetError(f"{path}: {exc}") from None
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GoldenSetError(f"{path}:{number}: not JSON: {exc.msg}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("input"), dict):
            raise GoldenSetError(f'{path}:{number}: each line is {{"input": {{...}}, ...}}')
        inputs.append(obj["input"])
        expected.append(_expected(obj["expected"], number) if "expected" in obj else None)
    if not inputs:
        raise GoldenSetError(f"{path}: no records")
    return inputs, expected


def _evaluate_with_model(
    descriptor: pb.ModelDescriptor, model_bytes: bytes, contract: Contract, golden: pb.GoldenSet
) -> list[pb.GoldenOutput]:
    try:
        runtime = load_runtime(descriptor.format, model_bytes, tuple(descriptor.input_features))
        rows = golden_rows(golden, runtime, bind_inputs(runtime.features, contract))
        prediction = runtime.predict(rows.numeric, rows.text)
    except ModelError as exc:
        raise GoldenSetError(f"evaluator model: {exc}") from None
    outputs = []
    for i in range(len(rows)):
        out = pb.GoldenOutput()
        if prediction.labels is None:
            out.value = float(prediction.values[i])
        else:
            out.label = prediction.labels[i]
            if prediction.probabilities is not None:
                for k, label in enumerate(prediction.class_labels):
                    out.probabilities[label] = float(prediction.probabilities[i, k])
        outputs.append(out)
    return outputs


def _evaluate_with_command(command: str, inputs: list[dict[str, Any]]) -> list[pb.GoldenOutput]:
    argv = shlex.split(command)
    if not argv:
        raise GoldenSetError("--golden-evaluator command: is empty")
    stdin = "".join(json.dumps(record) + "\n" for record in inputs)
    try:
        done = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=EVALUATOR_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GoldenSetError(f"evaluator {argv[0]}: {exc}") from None
    if done.returncode != 0:
        raise GoldenSetError(
            f"evaluator {argv[0]} exited with {done.returncode}: {done.stderr.strip()[-500:]}"
        )
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if len(lines) != len(inputs):
        raise GoldenSetError(
            f"evaluator {argv[0]} printed {len(lines)} lines for {len(inputs)} inputs"
        )
    outputs = []
    for number, line in enumerate(lines, 1):
        try:
            outputs.append(_expected(json.loads(line), number))
        except json.JSONDecodeError as exc:
            raise GoldenSetError(f"evaluator output line {number}: not JSON: {exc.msg}") from None
    return outputs


def golden_set(
    path: Path,
    descriptor: pb.ModelDescriptor,
    model_bytes: bytes,
    contract: Contract,
    *,
    evaluator: str = "model",
    tolerance: float = 0.0,
    max_latency_us: float = 0.0,
) -> pb.GoldenSet:
    """The golden set of a file, expected outputs computed by `evaluator` where missing."""
    inputs, expected = read_golden(path)
    golden = pb.GoldenSet(tolerance=tolerance, max_latency_us=max_latency_us)
    for number, record in enumerate(inputs, 1):
        fields = golden.inputs.add().fields
        for name, value in record.items():
            fields[name].CopyFrom(_value(name, value, number))
    missing = [i for i, e in enumerate(expected) if e is None]
    if missing:
        if evaluator == "model":
            computed = _evaluate_with_model(descriptor, model_bytes, contract, golden)
            golden.evaluator = "waxserve runtime (the model itself, scored on the publisher)"
        elif evaluator.startswith("command:"):
            computed = _evaluate_with_command(evaluator.removeprefix("command:"), inputs)
            golden.evaluator = evaluator[:200]
        else:
            raise GoldenSetError(f"--golden-evaluator {evaluator!r}: 'model' or 'command:CMD'")
        for i in missing:
            expected[i] = computed[i]
    else:
        golden.evaluator = "given in the golden-set file"
    for out in expected:
        assert out is not None
        golden.expected.add().CopyFrom(out)
    return golden
