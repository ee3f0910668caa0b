"""Model runtimes: ONNX (onnxruntime) and PMML (pypmml on an in-process JVM) behind one interface.

A runtime is built from model bytes, scores a 2-D float64 batch in one call and returns a
`Prediction` of numpy columns. Nothing here unpickles or executes model content: ONNX graphs
run in onnxruntime, PMML documents are interpreted by PMML4S.

    runtime = load_runtime(pb.MODEL_FORMAT_PMML, pmml_bytes, ())
    prediction = runtime.predict(features)  # features: (n, len(runtime.input_names))
"""

from __future__ import annotations

import logging
import math
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from dataflows.records import canonical_name
from protos import waxserve_pb2 as pb

log = logging.getLogger(__name__)

REGRESSION = "regression"
CLASSIFICATION = "classification"


class ModelError(Exception):
    """A model that cannot be installed. `reason` is a short error class for the dead-letter topic.

    Reasons: "load_failed" (unreadable bytes, runtime refused the model), "bad_inputs" (the
    descriptor's input_features do not fit the model), "unsupported_model" (loads, but is not
    a shape of model waxserve can score).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


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
    """A loaded model that scores 2-D float batches.

    `input_names` are the model's inputs in the column order `predict()` expects, spelled as
    the model (PMML) or the descriptor (ONNX) spells them.
    """

    format: str
    task: str
    input_names: tuple[str, ...]
    class_labels: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()

    @abstractmethod
    def predict(self, features: np.ndarray) -> Prediction:
        """Score float64 C-contiguous features of shape (n, len(input_names)); n may be 0."""

    def close(self) -> None:  # noqa: B027 - optional hook; subclasses release their resources
        """Release the model's resources. Idempotent."""

    def describe(self) -> dict[str, object]:
        """Format, task, inputs, class labels and outputs, for logs and queryable state."""
        return {
            "format": self.format,
            "task": self.task,
            "input_names": list(self.input_names),
            "class_labels": list(self.class_labels),
            "output_names": list(self.output_names),
        }

    def _check_features(self, features: np.ndarray) -> np.ndarray:
        if features.ndim != 2 or features.shape[1] != len(self.input_names):
            raise ValueError(
                f"expected features of shape (n, {len(self.input_names)}) for inputs "
                f"{list(self.input_names)}, got {features.shape}"
            )
        return features

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
    """A class label as text: 5 and 5.0 both become "5"."""
    if isinstance(label, float) and label.is_integer():
        return str(int(label))
    return str(label)


def _label_number(label: str) -> float:
    try:
        return float(label)
    except ValueError:
        return math.nan


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


# --- ONNX ------------------------------------------------------------------------------

_ONNX_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64}
_ONNX_LABEL_TYPES = ("tensor(int64)", "tensor(string)")
_CLASSLABEL_ATTRIBUTES = ("classlabels_int64s", "classlabels_ints", "classlabels_strings")


def _static_dim(dim: object) -> int | None:
    return dim if isinstance(dim, int) else None


class OnnxRuntime(ModelRuntime):
    """An ONNX regressor or classifier scored with onnxruntime on the CPU.

    The graph has one float/double input of shape [N, k]; `input_features` names its k
    columns. Regressors have one float output ([N] or [N, 1]); classifiers a label output
    (int64 or string) and probabilities as a [N, C] tensor or as a ZipMap (list of dicts).
    `InferenceSession.run` is thread-safe, so one runtime serves every worker thread.
    """

    def __init__(
        self, model_bytes: bytes, input_features: Sequence[str], *, threads: int = 1
    ) -> None:
        import onnx
        import onnxruntime as ort

        self.format = "onnx"
        try:
            graph = onnx.load_model_from_string(model_bytes).graph
        except Exception as exc:
            raise ModelError("load_failed", f"not an ONNX model: {exc}") from exc
        # Model bytes come from a topic: refuse tensors stored in files next to the model.
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer):
            raise ModelError("unsupported_model", "ONNX model refers to external tensor data")

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            session = ort.InferenceSession(
                model_bytes, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ModelError("load_failed", f"onnxruntime cannot load the model: {exc}") from exc

        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(
                "unsupported_model",
                f"ONNX model must have exactly one input, has {len(inputs)}: "
                f"{[i.name for i in inputs]}",
            )
        model_input = inputs[0]
        dtype = _ONNX_FLOAT_TYPES.get(model_input.type)
        if dtype is None or len(model_input.shape) != 2:
            raise ModelError(
                "unsupported_model",
                f"ONNX input {model_input.name!r} must be a float or double tensor of shape "
                f"[N, k], is {model_input.type} {model_input.shape}",
            )
        names = tuple(input_features)
        width = _static_dim(model_input.shape[1])
        if not names:
            raise ModelError(
                "bad_inputs",
                f"ONNX models need input_features naming the {width or 'k'} columns of input "
                f"{model_input.name!r}; the descriptor names none",
            )
        if width is not None and len(names) != width:
            raise ModelError(
                "bad_inputs",
                f"ONNX input {model_input.name!r} has {width} columns but the descriptor names "
                f"{len(names)} input_features: {list(names)}",
            )
        if len(set(names)) != len(names):
            raise ModelError("bad_inputs", f"input_features has duplicates: {list(names)}")

        self._session: Any = session
        self._input_name: str = model_input.name
        self._dtype = dtype
        self.input_names = names
        self.output_names = tuple(o.name for o in session.get_outputs())
        self._value_output = ""
        self._label_output = ""
        self._proba_output = ""
        self._zipmap = False
        self._zipmap_keys: dict[str, Any] = {}
        self._classify(session.get_outputs(), graph)
        self._self_test()
        self._label_values = np.array([_label_number(x) for x in self.class_labels])

    def _classify(self, outputs: Sequence[Any], graph: Any) -> None:
        """Decide regressor or classifier from the graph outputs (and read class labels)."""
        kinds = [o.type for o in outputs]
        if len(outputs) == 1 and kinds[0] in _ONNX_FLOAT_TYPES:
            shape = outputs[0].shape
            if len(shape) == 1 or (len(shape) == 2 and _static_dim(shape[1]) in (1, None)):
                self.task = REGRESSION
                self._value_output = outputs[0].name
                return
        if len(outputs) == 2:
            labels = [o for o in outputs if o.type in _ONNX_LABEL_TYPES]
            probas = [o for o in outputs if o not in labels]
            if len(labels) == 1 and len(probas) == 1:
                proba = probas[0]
                if proba.type in _ONNX_FLOAT_TYPES and len(proba.shape) == 2:
                    self.task = CLASSIFICATION
                    self._label_output, self._proba_output = labels[0].name, proba.name
                    self.class_labels = self._graph_class_labels(graph, proba)
                    return
                if proba.type.startswith("seq(map(") and "tensor(float" in proba.type:
                    self.task = CLASSIFICATION
                    self._label_output, self._proba_output = labels[0].name, proba.name
                    self._zipmap = True  # class labels: the map keys, read in _self_test
                    return
        raise ModelError(
            "unsupported_model",
            "ONNX model is neither a regressor (one float output) nor a classifier (a label "
            "output plus probabilities); outputs: "
            + ", ".join(f"{o.name}: {o.type} {o.shape}" for o in outputs),
        )

    @staticmethod
    def _graph_class_labels(graph: Any, proba: Any) -> tuple[str, ...]:
        """Class labels of a [N, C] probabilities output, from the classifier node's attributes.

        Column j of the probabilities is label j of the classifier node (ai.onnx.ml
        TreeEnsembleClassifier, LinearClassifier, SVMClassifier, ...), in the node's order.
        """
        from onnx import helper

        found: dict[tuple[str, ...], bool] = {}
        for node in graph.node:
            for attr in node.attribute:
                if attr.name in _CLASSLABEL_ATTRIBUTES:
                    value = helper.get_attribute_value(attr)
                    labels = tuple(
                        x.decode() if isinstance(x, bytes) else _label_str(x) for x in value
                    )
                    if labels:
                        found[labels] = found.get(labels, False) or proba.name in node.output
        width = _static_dim(proba.shape[1])
        candidates = [x for x in found if width is None or len(x) == width]
        direct = [x for x in candidates if found[x]]
        if len(direct) == 1:
            return direct[0]
        if len(candidates) == 1:
            return candidates[0]
        raise ModelError(
            "unsupported_model",
            f"cannot tell the class labels of probabilities output {proba.name!r}: "
            f"{len(candidates)} candidate classlabels_* attributes in the graph",
        )

    def _self_test(self) -> None:
        """Score one row of zeros: checks the outputs' shapes now rather than on live records."""
        try:
            outputs = self._run(np.zeros((1, len(self.input_names))))
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError("load_failed", f"ONNX model failed a test run: {exc}") from exc
        if self.task == REGRESSION:
            if np.asarray(outputs[0]).size != 1:
                raise ModelError(
                    "unsupported_model",
                    f"regression output {self._value_output!r} gives "
                    f"{np.asarray(outputs[0]).shape} for one row",
                )
        elif self._zipmap:
            self.class_labels = _sorted_labels(_label_str(k) for k in outputs[1][0])
            self._zipmap_keys = {_label_str(k): k for k in outputs[1][0]}
        elif np.asarray(outputs[1]).shape != (1, len(self.class_labels)):
            raise ModelError(
                "unsupported_model",
                f"probabilities output {self._proba_output!r} has shape "
                f"{np.asarray(outputs[1]).shape} for one row, but the graph names "
                f"{len(self.class_labels)} class labels",
            )

    def _run(self, features: np.ndarray) -> list[Any]:
        if self._session is None:
            raise RuntimeError("the ONNX runtime is closed")
        feed = {self._input_name: np.ascontiguousarray(features, dtype=self._dtype)}
        if self.task == REGRESSION:
            return list(self._session.run([self._value_output], feed))
        return list(self._session.run([self._label_output, self._proba_output], feed))

    def predict(self, features: np.ndarray) -> Prediction:
        """Score a batch in one onnxruntime call."""
        n = len(self._check_features(features))
        if n == 0:
            return self._empty()
        outputs = self._run(features)
        if self.task == REGRESSION:
            return _regression(outputs[0])
        raw_labels = np.asarray(outputs[0]).reshape(-1)
        if raw_labels.dtype.kind in "iu":
            predicted = [str(x) for x in raw_labels.tolist()]
        else:
            predicted = [_label_str(x) for x in raw_labels.tolist()]
        if self._zipmap:
            maps: list[dict[Any, float]] = outputs[1]
            probabilities = np.empty((n, len(self.class_labels)))
            for j, label in enumerate(self.class_labels):
                key = self._zipmap_keys[label]
                probabilities[:, j] = np.fromiter((m[key] for m in maps), np.float64, n)
        else:
            probabilities = np.asarray(outputs[1], dtype=np.float64)
        return _classification(probabilities, self.class_labels, self._label_values, predicted)

    def close(self) -> None:
        """Drop the session (its memory is freed when no predict() call still holds it)."""
        self._session = None


# --- PMML ------------------------------------------------------------------------------

_JVM_LOCK = threading.Lock()
_jvm_ready = False


def jvm_started() -> bool:
    """Whether this process has started pypmml's in-process JVM."""
    return _jvm_ready


_NUMERIC_PMML_TYPES = {"double", "float", "integer"}


def _start_jvm() -> None:
    """Start pypmml's gateway once per process, as an in-process JVM (JPype).

    pypmml picks its gateway when the first PMMLContext is created: the default launches a
    Java child process and talks Py4J over a socket (milliseconds per call); gateway="jpype"
    loads the JVM into this process (microseconds per call). Later calls are a flag check.
    """
    global _jvm_ready
    if _jvm_ready:
        return
    with _JVM_LOCK:
        if _jvm_ready:
            return
        import jpype
        import jpype.config
        from pypmml.base import PMMLContext

        # At interpreter exit JPype must stop its reference queue, or a JVM thread waiting
        # for the GIL is ended by CPython with pthread_exit, which unwinds through JPype's
        # C++ and aborts the process ("FATAL: exception not rethrown", SIGABRT: seen in 2
        # of 16 bounded runs with the stop skipped). Destroying the JVM as well crashed
        # (SIGSEGV in jpype._core._JTerminate after the test suite); waxserve holds nothing
        # in Java that needs it destroyed.
        jpype.config.onexit = True
        jpype.config.destroy_jvm = False

        if PMMLContext.gateway() is None and jpype.isJVMStarted():
            # Someone else started a JVM in this process: reuse it (it can't be restarted).
            from pypmml.jvm import JPypeGateway

            PMMLContext(gateway_instance=JPypeGateway())
        PMMLContext.getOrCreate(gateway="jpype")
        if PMMLContext.gateway() != "JPype":
            log.warning(
                "pypmml already runs on the %s gateway in this process; PMML scoring will be "
                "slow (create no pypmml Model before waxserve loads one)",
                PMMLContext.gateway(),
            )
        _jvm_ready = True


class PmmlRuntime(ModelRuntime):
    """A PMML regression or classification model scored by pypmml (PMML4S) in-process.

    `input_names` are the PMML's active fields in mining-schema order ("fixed acidity").
    A batch is scored in one call through PMML4S's JSON "split" form; NaN inputs are sent as
    missing values. Classifiers need probability(k) output fields (or PMML4S's default ones).
    """

    def __init__(self, model_bytes: bytes, input_features: Sequence[str] = ()) -> None:
        self.format = "pmml"
        # PMML never needs a DTD; refusing one rules out XML entity tricks on our files.
        if re.search(rb"<!(DOCTYPE|ENTITY)", model_bytes, re.IGNORECASE):
            raise ModelError("load_failed", "PMML documents with a DOCTYPE are not accepted")
        try:
            _start_jvm()
        except Exception as exc:
            raise ModelError("load_failed", f"cannot start the JVM for pypmml: {exc}") from exc
        from pypmml import Model

        try:
            model = Model.fromBytes(bytes(model_bytes))
            function = str(model.functionName)
            fields = [(str(f.name), str(f.dataType)) for f in model.inputFields]
        except Exception as exc:
            raise ModelError("load_failed", f"pypmml cannot load the model: {exc}") from exc

        if function not in (REGRESSION, CLASSIFICATION):
            raise ModelError(
                "unsupported_model",
                f"PMML model function {function!r} is not regression or classification",
            )
        if not fields:
            raise ModelError("unsupported_model", "PMML model has no active input fields")
        non_numeric = [
            f"{name} ({kind})" for name, kind in fields if kind not in _NUMERIC_PMML_TYPES
        ]
        if non_numeric:
            raise ModelError(
                "unsupported_model", f"PMML inputs must be numeric: {', '.join(non_numeric)}"
            )
        self.task = function
        self.input_names = tuple(name for name, _ in fields)
        if input_features:
            expected = {canonical_name(x) for x in self.input_names}
            given = {canonical_name(x) for x in input_features}
            if given != expected or len(input_features) != len(self.input_names):
                raise ModelError(
                    "bad_inputs",
                    f"input_features {list(input_features)} do not match the PMML inputs "
                    f"{list(self.input_names)} (missing: {sorted(expected - given)}, "
                    f"unknown: {sorted(given - expected)})",
                )

        try:
            outputs = self._outputs(model)
            if not outputs:
                model.setSupplementOutput(True)  # ask PMML4S for its default output fields
                outputs = self._outputs(model)
        except Exception as exc:
            raise ModelError("load_failed", f"pypmml cannot read the outputs: {exc}") from exc
        if not outputs:
            wanted = "probability(k) output fields" if self.task == CLASSIFICATION else "a value"
            raise ModelError("unsupported_model", f"PMML {self.task} model gives no {wanted}")

        if self.task == CLASSIFICATION:
            by_label = {_label_str(label): name for name, label in outputs}
            self.class_labels = _sorted_labels(by_label)
            self._out_fields = tuple(by_label[label] for label in self.class_labels)
        else:
            self._out_fields = (outputs[0][0],)
        self.output_names = self._out_fields
        self._label_values = np.array([_label_number(x) for x in self.class_labels])
        self._model: Any = model
        self._request_prefix = b'{"columns":' + orjson.dumps(list(self.input_names)) + b',"data":'
        # JPype releases the GIL during Java calls, so two Bytewax worker threads really run
        # PMML4S concurrently. PMML4S does not document Model.predict as thread-safe (its issue
        # #14 reported NaNs from shared models under concurrency): one lock per model.
        self._lock = threading.Lock()

    def _outputs(self, model: Any) -> list[tuple[str, object]]:
        """(field name, class label) of the probability outputs, or [(name, None)] of the value."""
        fields = [(str(f.name), str(f.feature), f.value) for f in model.outputFields]
        if self.task == CLASSIFICATION:
            return [
                (name, value)
                for name, feature, value in fields
                if feature == "probability" and value is not None
            ]
        return [(name, None) for name, feature, _ in fields if feature == "predictedValue"]

    def _call(self, features: np.ndarray) -> np.ndarray:
        """One PMML4S call for these rows: the output columns as float64 (NaN for null)."""
        request = (
            self._request_prefix
            + orjson.dumps(
                np.ascontiguousarray(features, dtype=np.float64), option=orjson.OPT_SERIALIZE_NUMPY
            )
            + b"}"
        )
        with self._lock:
            if self._model is None:
                raise RuntimeError("the PMML runtime is closed")
            response = str(self._model.predict(request.decode()))
        doc = orjson.loads(response)
        columns: list[str] = doc["columns"] or []
        rows: list[list[Any]] = doc["data"]
        if len(rows) != len(features):
            raise ValueError(f"PMML4S returned {len(rows)} rows for {len(features)}")
        out = np.full((len(features), len(self._out_fields)), np.nan)
        if not all(name in columns for name in self._out_fields):
            # The columns come from the first row's outputs: one refused row can hide them.
            if len(features) > 1:
                raise ValueError(f"PMML4S response lacks the output columns: {columns}")
            return out
        index = [columns.index(name) for name in self._out_fields]
        try:
            return np.array(rows, dtype=np.float64)[:, index]  # null -> NaN
        except (ValueError, TypeError, IndexError):
            pass  # ragged rows or text outputs: pick our columns row by row
        width = len(columns)
        for i, row in enumerate(rows):
            if len(row) == width:  # a record PMML4S refused may come back short
                out[i] = [np.nan if row[j] is None else row[j] for j in index]
        return out

    def predict(self, features: np.ndarray) -> Prediction:
        """Score a batch in one PMML4S call; rows it cannot score come back invalid."""
        n = len(self._check_features(features))
        if n == 0:
            return self._empty()
        if self._model is None:
            raise RuntimeError("the PMML runtime is closed")
        try:
            scores = self._call(features)
        except Exception as exc:
            # One bad row fails a whole batch call: retry row by row to isolate it.
            log.warning("PMML batch of %d rows failed (%s); scoring row by row", n, exc)
            scores = np.full((n, len(self._out_fields)), np.nan)
            for i in range(n):
                try:
                    scores[i] = self._call(features[i : i + 1])[0]
                except Exception as row_exc:
                    if self._model is None:
                        raise
                    log.warning("PMML row %d of %d failed: %s", i, n, row_exc)
        if self.task == REGRESSION:
            return _regression(scores[:, 0])
        return _classification(scores, self.class_labels, self._label_values)

    def close(self) -> None:
        """Drop the model. The JVM stays up: JPype cannot restart it in this process."""
        with self._lock:
            self._model = None


# --- factory -------------------------------------------------------------------------


def load_runtime(
    model_format: int,
    model_bytes: bytes,
    input_features: Sequence[str],
    *,
    onnx_threads: int = 1,
) -> ModelRuntime:
    """Load model bytes of a descriptor's `format` (a `pb.ModelFormat` value)."""
    if model_format == pb.MODEL_FORMAT_ONNX:
        return OnnxRuntime(model_bytes, input_features, threads=onnx_threads)
    if model_format == pb.MODEL_FORMAT_PMML:
        return PmmlRuntime(model_bytes, input_features)
    raise ModelError("unsupported_model", f"unsupported model format {model_format!r}")
