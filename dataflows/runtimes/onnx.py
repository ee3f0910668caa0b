"""ONNX models scored with onnxruntime on the CPU.

A graph has one or several inputs, each one feature ([N] or [N, 1]) or a group of k
features ([N, k]), of element type float, double, int64, int32, bool (numeric features) or
string (text features). Regressors have one float output; classifiers a label output plus
probabilities as a [N, C] tensor or a ZipMap. Nothing in a model is trusted: a model that
refers to data outside its own bytes is refused before onnxruntime sees it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dataflows.runtimes.base import (
    CLASSIFICATION,
    NUMERIC,
    REGRESSION,
    TEXT,
    ModelError,
    ModelFeature,
    ModelRuntime,
    Prediction,
    _classification,
    _label_number,
    _label_str,
    _regression,
    _sorted_labels,
)

log = logging.getLogger(__name__)

# Graph input element types waxserve can feed, and the numpy dtype each is fed as.
_INPUT_TYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
    "tensor(string)": object,
}
_ONNX_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64}
_ONNX_LABEL_TYPES = ("tensor(int64)", "tensor(int32)", "tensor(string)")
_CLASSLABEL_ATTRIBUTES = ("classlabels_int64s", "classlabels_ints", "classlabels_strings")
# Ops that pass a tensor's elements through unchanged (for tracing labels and categories).
_RESHAPING_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")
_ML_DOMAIN = "ai.onnx.ml"

# Column markers for category tracing: the tensor holds only the traced feature (_ALL), or
# the feature among others at positions not tracked (_MIXED); else the column index.
_ALL = -1
_MIXED = -2


def _static_dim(dim: object) -> int | None:
    return dim if isinstance(dim, int) else None


@dataclass(frozen=True)
class _Feed:
    """How one graph input is fed: columns [start, stop) of the numeric or the text matrix."""

    name: str
    text: bool
    start: int
    stop: int
    rank: int  # 1: [N]; 2: [N, k]
    dtype: Any

    def array(self, numeric: np.ndarray, text: np.ndarray | None) -> np.ndarray:
        source = text if self.text else numeric
        assert source is not None
        block = source[:, self.start] if self.rank == 1 else source[:, self.start : self.stop]
        if self.text:
            return np.ascontiguousarray(block, dtype=object)
        if self.dtype is np.bool_:
            return block != 0  # booleans arrive as 0/1
        if self.dtype in (np.int64, np.int32):
            return block.astype(self.dtype)  # integral floats by the data contract
        return np.ascontiguousarray(block, dtype=self.dtype)


class OnnxRuntime(ModelRuntime):
    """An ONNX regressor or classifier scored with onnxruntime on the CPU.

    Features are the columns of the graph inputs, in graph order: a single-column input is
    named by its own name, unless `input_features` (the descriptor's list) names every column.
    A grouped [N, k] input with k > 1 needs `input_features`. Text features report the
    categories of the OneHotEncoder or LabelEncoder they feed, when that can be traced.
    `InferenceSession.run` is thread-safe, so one runtime serves every worker thread.
    """

    def __init__(
        self, model_bytes: bytes, input_features: Sequence[str], *, threads: int = 1
    ) -> None:
        import onnx
        import onnxruntime as ort

        self.format = "onnx"
        if model_bytes[4:8] == b"ORTM":  # onnxruntime's own flatbuffer format
            raise ModelError("unsupported_model", "ORT-format models are not accepted: ONNX only")
        try:
            model = onnx.load_model_from_string(model_bytes)
        except Exception as exc:
            raise ModelError("load_failed", f"not an ONNX model: {exc}") from exc
        # Model bytes come from a topic: onnxruntime would read any relative path a tensor
        # names from the working directory, so refuse every external reference up front.
        external = _external_references(model)
        if external:
            raise ModelError(
                "unsupported_model",
                "ONNX model refers to external tensor data (refused): " + "; ".join(external[:5]),
            )
        # onnxruntime gets the model that was checked, and only it: fields this onnx does
        # not know (a newer IR's) are dropped rather than passed on unchecked.
        model.DiscardUnknownFields()
        model_bytes = model.SerializeToString()
        graph = model.graph

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            session = ort.InferenceSession(
                model_bytes, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ModelError("load_failed", f"onnxruntime cannot load the model: {exc}") from exc

        self._session: Any = session
        index = _GraphIndex(graph)
        self._feeds, features = _plan_inputs(session.get_inputs(), tuple(input_features), index)
        self._set_features(features)
        # The common path: one float [N, k] input taking every numeric column, fed with no copy
        # beyond the dtype conversion onnxruntime needs anyway.
        first = self._feeds[0]
        fast = (
            len(self._feeds) == 1
            and not first.text
            and first.rank == 2
            and first.dtype in (np.float32, np.float64)
        )
        self._fast_input = first.name if fast else ""
        self._fast_dtype = first.dtype

        self.output_names = tuple(o.name for o in session.get_outputs())
        self._value_output = ""
        self._label_output = ""
        self._proba_output = ""
        self._classes_output = ""
        self._zipmap = False
        self._zipmap_keys: dict[str, Any] = {}
        self._run_outputs: list[str] = []
        self._classify(session.get_outputs(), index)
        self._self_test()
        self._label_values = np.array([_label_number(x) for x in self.class_labels])

    # --- outputs --------------------------------------------------------------------------

    def _classify(self, outputs: Sequence[Any], index: _GraphIndex) -> None:
        """Decide regressor or classifier from the graph outputs (and read class labels)."""
        kinds = [o.type for o in outputs]
        if len(outputs) == 1 and kinds[0] in _ONNX_FLOAT_TYPES:
            shape = outputs[0].shape
            if len(shape) == 1 or (len(shape) == 2 and _static_dim(shape[1]) in (1, None)):
                self.task = REGRESSION
                self._value_output = outputs[0].name
                self._run_outputs = [self._value_output]
                return
        if len(outputs) in (2, 3):
            labels = [o for o in outputs if o.type in _ONNX_LABEL_TYPES]
            probas = [o for o in outputs if o not in labels]
            if len(probas) == 1 and len(labels) == len(outputs) - 1:
                proba = probas[0]
                tensor = proba.type in _ONNX_FLOAT_TYPES and len(proba.shape) == 2
                zipmap = proba.type.startswith("seq(map(") and "tensor(float" in proba.type
                label = self._label_and_classes(labels, proba) if tensor or zipmap else None
                if label is not None:
                    self.task = CLASSIFICATION
                    self._label_output, self._proba_output = label.name, proba.name
                    self._run_outputs = [self._label_output, self._proba_output]
                    self._zipmap = zipmap  # class labels: the map keys, read in _self_test
                    if tensor and not self._classes_output:
                        self.class_labels = _graph_class_labels(index, proba, label.name)
                    return
        raise ModelError(
            "unsupported_model",
            "ONNX model is neither a regressor (one float output) nor a classifier (a label "
            "output plus probabilities, and optionally a class-labels output); outputs: "
            + ", ".join(f"{o.name}: {o.type} {o.shape}" for o in outputs),
        )

    def _label_and_classes(self, labels: list[Any], proba: Any) -> Any | None:
        """The label output; with two label-typed outputs, the other one lists the classes.

        skl2onnx's `output_class_labels` option adds a constant [C] output of the class
        labels: it is told from the [N] label output by its static length.
        """
        if len(labels) == 1:
            return labels[0]
        static = [o for o in labels if len(o.shape) == 1 and _static_dim(o.shape[0])]
        if len(static) != 1:
            return None
        self._classes_output = static[0].name
        return next(o for o in labels if o is not static[0])

    # --- load-time check --------------------------------------------------------------------

    def _self_test(self) -> None:
        """Score one synthetic row: checks the outputs' shapes now rather than on live records.

        Numeric features are 0 and text features their first known category (else "").
        """
        numeric = np.zeros((1, self._n_numeric))
        text = np.array(
            [[f.categories[0] if f.categories else "" for f in self.features if f.kind == TEXT]],
            dtype=object,
        ).reshape(1, self._n_text)
        names = self._run_outputs + ([self._classes_output] if self._classes_output else [])
        try:
            outputs = list(self._session.run(names, self._feed(numeric, text)))
        except Exception as exc:
            raise ModelError("load_failed", f"ONNX model failed a test run: {exc}") from exc
        if self.task == REGRESSION:
            if np.asarray(outputs[0]).size != 1:
                raise ModelError(
                    "unsupported_model",
                    f"regression output {self._value_output!r} gives "
                    f"{np.asarray(outputs[0]).shape} for one row",
                )
            return
        if self._zipmap:
            self.class_labels = _sorted_labels(_label_str(k) for k in outputs[1][0])
            self._zipmap_keys = {_label_str(k): k for k in outputs[1][0]}
            return
        if self._classes_output:
            self.class_labels = tuple(
                _label_str(x) for x in np.asarray(outputs[2]).reshape(-1).tolist()
            )
        if np.asarray(outputs[1]).shape != (1, len(self.class_labels)):
            raise ModelError(
                "unsupported_model",
                f"probabilities output {self._proba_output!r} has shape "
                f"{np.asarray(outputs[1]).shape} for one row, but the model names "
                f"{len(self.class_labels)} class labels",
            )

    # --- scoring --------------------------------------------------------------------------

    def _feed(self, numeric: np.ndarray, text: np.ndarray | None) -> dict[str, np.ndarray]:
        if self._fast_input:
            return {self._fast_input: np.ascontiguousarray(numeric, dtype=self._fast_dtype)}
        return {f.name: f.array(numeric, text) for f in self._feeds}

    def predict(self, numeric: np.ndarray, text: np.ndarray | None = None) -> Prediction:
        """Score a batch in one onnxruntime call; if it fails, row by row (bad rows invalid)."""
        n = self._check_batch(numeric, text)
        if n == 0:
            return self._empty()
        session = self._session
        if session is None:
            raise RuntimeError("the ONNX runtime is closed")
        try:
            if self._fast_input:  # inlined: the common path pays for nothing it doesn't use
                feed = {self._fast_input: np.ascontiguousarray(numeric, dtype=self._fast_dtype)}
            else:
                feed = self._feed(numeric, text)
            outputs = session.run(self._run_outputs, feed)
        except Exception as exc:
            # One bad row (an unknown category, say) fails the whole call: isolate it.
            log.warning("ONNX batch of %d rows failed (%s); scoring row by row", n, exc)
            return self._row_by_row(session, numeric, text, n)
        if self.task == REGRESSION:
            return _regression(outputs[0])
        return self._prediction(outputs, n)

    def _row_by_row(
        self, session: Any, numeric: np.ndarray, text: np.ndarray | None, n: int
    ) -> Prediction:
        values = np.full(n, np.nan)
        width = len(self.class_labels)
        probabilities = np.full((n, width), np.nan)
        predicted = [""] * n
        for i in range(n):
            row_text = None if text is None else text[i : i + 1]
            try:
                one = self._prediction(
                    session.run(self._run_outputs, self._feed(numeric[i : i + 1], row_text)), 1
                )
            except Exception as exc:
                log.warning("ONNX row %d of %d failed: %s", i, n, exc)
                continue
            values[i] = one.values[0]
            if one.labels is not None and one.probabilities is not None and one.valid[0]:
                predicted[i] = one.labels[0]
                probabilities[i] = one.probabilities[0]
        if self.task == REGRESSION:
            return _regression(values)
        return _classification(probabilities, self.class_labels, self._label_values, predicted)

    def _prediction(self, outputs: Sequence[Any], n: int) -> Prediction:
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


# --- inputs ----------------------------------------------------------------------------


def _plan_inputs(
    inputs: Sequence[Any], names: tuple[str, ...], index: _GraphIndex
) -> tuple[tuple[_Feed, ...], list[ModelFeature]]:
    """The feed of each graph input and the features they take, in graph order."""
    if not inputs:
        raise ModelError("unsupported_model", "ONNX model has no inputs")
    widths: list[int | None] = []
    for model_input in inputs:
        shape = model_input.shape
        if model_input.type not in _INPUT_TYPES or len(shape) not in (1, 2):
            raise ModelError(
                "unsupported_model",
                f"ONNX input {model_input.name!r} is {model_input.type} {shape}; inputs must "
                f"be [N], [N, 1] or [N, k] tensors of float, double, int64, int32, bool or "
                f"string",
            )
        width = 1 if len(shape) == 1 else _static_dim(shape[1])
        if width == 0:
            raise ModelError("unsupported_model", f"ONNX input {model_input.name!r} is empty")
        widths.append(width)
    described = ", ".join(
        f"{i.name}: {i.type} {i.shape}" + ("" if w is not None else " (width not fixed)")
        for i, w in zip(inputs, widths, strict=True)
    )

    unknown = [i for i, w in enumerate(widths) if w is None]
    if len(unknown) > 1:
        raise ModelError(
            "unsupported_model",
            f"cannot tell how many columns each ONNX input has; graph inputs: {described}",
        )
    if unknown and names:
        # The only input of unfixed width takes the columns the others leave.
        rest = len(names) - sum(w for w in widths if w is not None)
        if rest >= 1:
            widths[unknown[0]] = rest
    if names:
        total = sum(w or 0 for w in widths)
        if (unknown and widths[unknown[0]] is None) or len(names) != total:
            raise ModelError(
                "bad_inputs",
                f"the graph's inputs have {total} columns ({described}) but the descriptor "
                f"names {len(names)} input_features: {list(names)}",
            )
    else:
        grouped = [(i, w) for i, w in zip(inputs, widths, strict=True) if w != 1]
        if grouped:
            model_input, width = grouped[0]
            raise ModelError(
                "bad_inputs",
                f"ONNX input {model_input.name!r} holds {width or 'k'} columns: the descriptor's "
                f"input_features must name them (and every other input's column, in graph "
                f"order); graph inputs: {described}",
            )
        names = tuple(i.name for i in inputs)
    if len(set(names)) != len(names):
        raise ModelError("bad_inputs", f"input_features has duplicates: {list(names)}")

    tracer = _CategoryTracer(index)
    feeds: list[_Feed] = []
    features: list[ModelFeature] = []
    at = {NUMERIC: 0, TEXT: 0}
    for model_input, width in zip(inputs, widths, strict=True):
        assert width is not None
        text = model_input.type == "tensor(string)"
        kind = TEXT if text else NUMERIC
        for column in range(width):
            categories = None
            if text:
                categories = tracer.categories(model_input.name, _ALL if width == 1 else column)
            features.append(ModelFeature(names[len(features)], kind, categories))
        start = at[kind]
        at[kind] += width
        feeds.append(
            _Feed(
                name=model_input.name,
                text=text,
                start=start,
                stop=start + width,
                rank=len(model_input.shape),
                dtype=_INPUT_TYPES[model_input.type],
            )
        )
    return tuple(feeds), features


class _GraphIndex:
    """Who produces and who consumes each tensor of a graph, and its constants."""

    def __init__(self, graph: Any) -> None:
        self.graph = graph
        self.producers = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.initializers = {t.name: t for t in graph.initializer}

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant output (through Identity/Cast), or None."""
        from onnx import helper, numpy_helper

        for _ in range(8):
            if name in self.initializers:
                return np.asarray(numpy_helper.to_array(self.initializers[name]))
            node = self.producers.get(name)
            if node is None:
                return None
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        return np.asarray(numpy_helper.to_array(attr.t))
                    if attr.name in ("value_ints", "value_floats", "value_strings"):
                        return np.asarray(helper.get_attribute_value(attr))
                return None
            if node.op_type not in ("Identity", "Cast"):
                return None
            name = node.input[0]
        return None


class _CategoryTracer:
    """Finds the categories a text input's column is encoded with, following it forward.

    It follows the column through Gather/ArrayFeatureExtractor with constant indices (how
    skl2onnx picks a column), Identity, string Casts, reshapes and Concat, to OneHotEncoder
    (`cats_strings`) and LabelEncoder (`keys_strings`) nodes. Any other use of the column
    (a string comparison, a graph output, a subgraph) makes its categories unknown: a model
    that also accepts other strings must not get its inputs restricted.
    """

    def __init__(self, index: _GraphIndex) -> None:
        self._index = index
        self._opaque = {o.name for o in index.graph.output} | _subgraph_references(index.graph)

    def categories(self, input_name: str, column: int) -> tuple[str, ...] | None:
        from onnx import TensorProto, helper

        found: dict[str, None] = {}
        seen: set[tuple[str, int]] = set()
        stack = [(input_name, column)]
        while stack:
            name, col = stack.pop()
            if (name, col) in seen:
                continue
            seen.add((name, col))
            if name in self._opaque:
                return None
            for node in self._index.consumers.get(name, ()):
                op, ml = node.op_type, node.domain == _ML_DOMAIN
                attrs = {a.name: a for a in node.attribute}
                if ml and op == "OneHotEncoder" and "cats_strings" in attrs:
                    values = helper.get_attribute_value(attrs["cats_strings"])
                elif ml and op == "LabelEncoder" and "keys_strings" in attrs:
                    values = helper.get_attribute_value(attrs["keys_strings"])
                elif op in ("Gather", "ArrayFeatureExtractor") and node.input[0] == name:
                    nxt = self._selected(node, attrs, col)
                    if nxt is None:
                        return None
                    if nxt != "dropped":
                        stack.append((node.output[0], int(nxt)))
                    continue
                elif op == "Identity" or (
                    op == "Cast" and "to" in attrs and attrs["to"].i == TensorProto.STRING
                ):
                    stack.append((node.output[0], col))
                    continue
                elif op in _RESHAPING_OPS and node.input[0] == name:
                    stack.append((node.output[0], _ALL if col == _ALL else _MIXED))
                    continue
                elif op == "Concat":
                    stack.append((node.output[0], _MIXED))
                    continue
                else:
                    return None
                for value in values:
                    found[_label_str(value)] = None
        return tuple(found) or None

    def _selected(self, node: Any, attrs: dict[str, Any], col: int) -> int | str | None:
        """Where column `col` lands after a column selection: a marker, "dropped" or None."""
        if col == _ALL:
            return _ALL  # any selection of a single-feature tensor holds only that feature
        if col == _MIXED:
            return None
        indices = self._index.constant(node.input[1])
        if indices is None:
            return None
        if node.op_type == "Gather" and (attrs["axis"].i if "axis" in attrs else 0) not in (1, -1):
            return None
        picked = [int(x) for x in np.asarray(indices).reshape(-1).tolist()]
        if col not in picked:
            return "dropped"
        return _ALL if set(picked) == {col} else _MIXED


def _subgraph_references(graph: Any) -> set[str]:
    """Names any node's subgraph (If/Loop/Scan bodies) reads, possibly from the outer scope."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for sub in _attribute_graphs(attr):
                for inner in _walk_graphs(sub):
                    for sub_node in inner.node:
                        names.update(sub_node.input)
    return names


# --- class labels ----------------------------------------------------------------------


def _graph_class_labels(index: _GraphIndex, proba: Any, label_output: str) -> tuple[str, ...]:
    """Class labels of a [N, C] probabilities output.

    First the label output is traced back to where its values come from: a classifier node
    (ai.onnx.ml TreeEnsembleClassifier, LinearClassifier, SVMClassifier, ...) with
    `classlabels_*` attributes, or a constant of class labels indexed by an argmax
    (ArrayFeatureExtractor or Gather: skl2onnx's MLP, naive Bayes, k-NN classifiers). Column
    j of the probabilities is label j. Failing that, the graph's one `classlabels_*`
    attribute of the right length.
    """
    from onnx import helper

    width = _static_dim(proba.shape[1])
    traced = _traced_class_labels(index, label_output)
    if traced and (width is None or len(traced) == width):
        return traced

    found: dict[tuple[str, ...], bool] = {}
    for node in index.graph.node:
        for attr in node.attribute:
            if attr.name in _CLASSLABEL_ATTRIBUTES:
                labels = tuple(_label_str(x) for x in helper.get_attribute_value(attr))
                if labels:
                    found[labels] = found.get(labels, False) or proba.name in node.output
    candidates = [x for x in found if width is None or len(x) == width]
    direct = [x for x in candidates if found[x]]
    if len(direct) == 1:
        return direct[0]
    if len(candidates) == 1:
        return candidates[0]
    raise ModelError(
        "unsupported_model",
        f"cannot tell the class labels of probabilities output {proba.name!r}: "
        f"{len(candidates)} candidate classlabels_* attributes in the graph and no class-label "
        f"constant behind the label output {label_output!r}",
    )


def _traced_class_labels(index: _GraphIndex, label_output: str) -> tuple[str, ...] | None:
    from onnx import helper

    name = label_output
    for _ in range(64):  # a chain of pass-through ops is short; the bound only stops cycles
        node = index.producers.get(name)
        if node is None:
            return None
        for attr in node.attribute:
            if attr.name in _CLASSLABEL_ATTRIBUTES and node.output and node.output[0] == name:
                return tuple(_label_str(x) for x in helper.get_attribute_value(attr)) or None
        if node.op_type in ("Identity", "Cast", *_RESHAPING_OPS):
            name = node.input[0]
            continue
        if node.op_type in ("ArrayFeatureExtractor", "Gather"):
            value = index.constant(node.input[0])
            if value is None or np.asarray(value).ndim != 1:
                return None
            return tuple(_label_str(x) for x in np.asarray(value).tolist()) or None
        return None
    return None


# --- external data -----------------------------------------------------------------------


def _attribute_graphs(attr: Any) -> list[Any]:
    graphs = list(attr.graphs)
    if attr.HasField("g"):
        graphs.append(attr.g)
    return graphs


def _walk_graphs(graph: Any) -> Iterator[Any]:
    """A graph and every subgraph nested in its nodes' attributes (iteratively: no recursion
    limit to trip on a hostile model)."""
    stack = [graph]
    while stack:
        current = stack.pop()
        yield current
        for node in current.node:
            for attr in node.attribute:
                stack.extend(_attribute_graphs(attr))


def _external_references(model: Any) -> list[str]:
    """Every tensor in the model that points at external data, named for the error message.

    Looks at initializers, sparse initializers and every tensor-valued node attribute
    (Constant `value`/`sparse_value` included), in the main graph, in subgraphs at any depth,
    in local functions and in training-info graphs.
    """
    from onnx import TensorProto

    found: list[str] = []

    def check(tensor: Any, where: str) -> None:
        if tensor.data_location == TensorProto.EXTERNAL or len(tensor.external_data):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "?")
            found.append(f"{where} tensor {tensor.name!r} (location {location!r})")

    def check_attributes(node: Any, where: str) -> None:
        label = f"{where} node {node.name or '(unnamed)'!r} ({node.op_type}) attribute"
        for attr in node.attribute:
            if attr.HasField("t"):
                check(attr.t, f"{label} {attr.name!r}")
            for tensor in attr.tensors:
                check(tensor, f"{label} {attr.name!r}")
            sparse = list(attr.sparse_tensors)
            if attr.HasField("sparse_tensor"):
                sparse.append(attr.sparse_tensor)
            for item in sparse:
                check(item.values, f"{label} {attr.name!r} values")
                check(item.indices, f"{label} {attr.name!r} indices")

    def check_graph(graph: Any, where: str) -> None:
        for inner in _walk_graphs(graph):  # the graph and its subgraphs, at any depth
            scope = f"{where} {inner.name!r}"
            for tensor in inner.initializer:
                check(tensor, f"{scope} initializer")
            for sparse_tensor in inner.sparse_initializer:
                check(sparse_tensor.values, f"{scope} sparse initializer values")
                check(sparse_tensor.indices, f"{scope} sparse initializer indices")
            for node in inner.node:
                check_attributes(node, scope)

    check_graph(model.graph, "graph")
    for info in model.training_info:
        check_graph(info.initialization, "training initialization graph")
        check_graph(info.algorithm, "training algorithm graph")
    for function in model.functions:
        for node in function.node:
            check_attributes(node, f"function {function.name!r}")
            for attr in node.attribute:
                for sub in _attribute_graphs(attr):
                    check_graph(sub, f"function {function.name!r} subgraph")
    return found
