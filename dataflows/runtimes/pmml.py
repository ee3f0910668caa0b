"""PMML models scored by pypmml (PMML4S) on an in-process JVM (JPype).

Nothing here executes model content: PMML documents are interpreted by PMML4S. Numeric
fields (double, float, integer, boolean) are numeric features; string fields are text
features whose categories are the field's valid values, when the DataDictionary lists them.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

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
    canonical_name,
)

log = logging.getLogger(__name__)

_JVM_LOCK = threading.Lock()
_jvm_ready = False
_jvm_begun = False  # a start began (it may still be under way on a loader thread)

JVM_POLICIES = ("auto", "on", "lazy", "off")
"""When the JVM starts (`WAXSERVE_PMML`). "auto": at process start, before the dataflow runs,
when a Java runtime is installed (none: PMML models are rejected, saying so); "on": at
process start, and a process that cannot start it does not run; "lazy": when the first PMML
model loads, on the model-loader thread (JPype holds the GIL for a second or two of it, so
scoring pauses once); "off": never, PMML models are rejected. In this module "auto", "on"
and "lazy" all start the JVM on the first load if nothing started it before
(`dataflows.serving` starts it at process start)."""
_policy = "auto"
_off_reason = "PMML is off in this process (WAXSERVE_PMML=off)"

_NUMERIC_PMML_TYPES = {"double", "float", "integer", "boolean"}
_TEXT_PMML_TYPES = {"string"}

# XML encodings a PMML document may be in (Python codec names): the Unicode ones an XML
# parser must know, and the ASCII-compatible single-byte ones. Anything else (UTF-7,
# EBCDIC, ...) could spell "<!DOCTYPE" in bytes no check here would recognise: refused.
_BOMS = (
    (b"\x00\x00\xfe\xff", "utf-32-be"),
    (b"\xff\xfe\x00\x00", "utf-32-le"),
    (b"\xef\xbb\xbf", "utf-8"),
    (b"\xfe\xff", "utf-16-be"),
    (b"\xff\xfe", "utf-16-le"),
)
_UNMARKED = (  # XML 1.0 appendix F: a first "<" in a UTF-16/32 document without a BOM
    (b"\x00\x00\x00<", "utf-32-be"),
    (b"<\x00\x00\x00", "utf-32-le"),
    (b"\x00<", "utf-16-be"),
    (b"<\x00", "utf-16-le"),
)
_UNICODE_FAMILIES = {"utf-8": "utf-8", "utf8": "utf-8", "utf-16": "utf-16", "utf-32": "utf-32"}
_SINGLE_BYTE_ENCODINGS = {
    "us-ascii": "ascii",
    "ascii": "ascii",
    **{f"iso-8859-{n}": f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 14, 15, 16)},
    "latin1": "latin-1",
    "latin-1": "latin-1",
    **{f"windows-{n}": f"cp{n}" for n in range(1250, 1259)},
}
_XML_DECLARATION = re.compile(r"<\?xml\b[^>]*?\?>")
_DECLARED_ENCODING = re.compile(r"""\bencoding\s*=\s*(["'])([A-Za-z0-9._\-]+)\1""")
# "<!" but a comment or CDATA section (a DTD, an entity), or a second XML declaration.
_REFUSED_MARKUP = re.compile(r"<!(?!--|\[CDATA\[)|<\?xml\b", re.IGNORECASE)


def utf8_document(document: bytes) -> bytes:
    """A PMML document as plain UTF-8 (no BOM, no encoding declaration), once checked to
    hold no DTD; ModelError("load_failed") otherwise.

    PMML4S resolves XML entities, so a DOCTYPE must never reach it, in whatever encoding
    the document is written: the document is decoded the way an XML parser would (a BOM,
    the first bytes of a UTF-16/32 document, the encoding declaration), checked as text,
    and handed on as the UTF-8 that was checked. No PMML needs a DTD; any "<!" but a
    comment or CDATA section is refused.
    """
    encoding, start = _xml_encoding(document)
    try:
        text = document[start:].decode(encoding)
    except (UnicodeDecodeError, LookupError) as exc:
        raise ModelError("load_failed", f"PMML document is not valid {encoding}: {exc}") from None
    declaration = _XML_DECLARATION.match(text)
    if declaration is not None:
        declared = _DECLARED_ENCODING.search(declaration.group())
        if declared is not None:
            _check_declared(declared.group(2), encoding)
        text = text[declaration.end() :]  # it names the encoding no longer used
    if "\x00" in text:  # no XML holds NUL; refusing it keeps the output from looking UTF-16
        raise ModelError("load_failed", "PMML document holds NUL characters")
    if _REFUSED_MARKUP.search(text):
        raise ModelError(
            "load_failed",
            "PMML documents with a DOCTYPE (or any other markup declaration) are not accepted",
        )
    return text.encode()


def _xml_encoding(document: bytes) -> tuple[str, int]:
    """(Python codec, where the text starts) of an XML document, before its declaration
    is read: a BOM, the byte pattern of "<?" in UTF-16/32, else the declared one (UTF-8
    when none is declared)."""
    for bom, encoding in _BOMS:
        if document.startswith(bom):
            return encoding, len(bom)
    for pattern, encoding in _UNMARKED:
        if document.startswith(pattern):
            return encoding, 0
    head = document[:200].decode("latin-1")  # the declaration is ASCII, if there is one
    declaration = _XML_DECLARATION.match(head)
    declared = _DECLARED_ENCODING.search(declaration.group()) if declaration else None
    if declared is None:
        return "utf-8", 0
    name = declared.group(2).lower()
    if name in _UNICODE_FAMILIES:
        if _UNICODE_FAMILIES[name] != "utf-8":  # UTF-16/32 has no ASCII declaration
            raise ModelError("load_failed", f"PMML document declares {name} but is not")
        return "utf-8", 0
    codec = _SINGLE_BYTE_ENCODINGS.get(name)
    if codec is None:
        raise ModelError("load_failed", f"PMML document encoding {name!r} is not accepted")
    return codec, 0


def _check_declared(declared: str, detected: str) -> None:
    """The declared encoding agrees with the bytes (UTF-16 and UTF-32 in their family)."""
    name = declared.lower()
    family = _UNICODE_FAMILIES.get(name.replace("le", "").replace("be", "").rstrip("-"))
    if family is not None:
        if not detected.startswith(family):
            raise ModelError("load_failed", f"PMML document declares {declared} but is {detected}")
        return
    if detected.startswith("utf-") and detected != "utf-8":
        raise ModelError("load_failed", f"PMML document declares {declared} but is {detected}")
    if name not in _SINGLE_BYTE_ENCODINGS and name not in _UNICODE_FAMILIES:
        raise ModelError("load_failed", f"PMML document encoding {declared!r} is not accepted")


def jvm_started() -> bool:
    """Whether this process has started pypmml's in-process JVM (or begun to: a start on a
    loader thread may still be under way). A process that did ends with os._exit."""
    return _jvm_ready or _jvm_begun


def jvm_policy() -> str:
    """When this process starts the JVM: one of `JVM_POLICIES`."""
    return _policy


def set_jvm_policy(policy: str, off_reason: str = "") -> None:
    """Set when the JVM starts (`JVM_POLICIES`); "off" makes every PMML load fail, with
    `off_reason` (by default: the setting says so)."""
    global _policy, _off_reason
    if policy not in JVM_POLICIES:
        raise ValueError(f"JVM policy {policy!r}: one of {', '.join(JVM_POLICIES)}")
    _policy = policy
    _off_reason = off_reason or "PMML is off in this process (WAXSERVE_PMML=off)"


def java_missing() -> str | None:
    """Why no JVM could start here (no Java runtime found: JAVA_HOME, then the usual
    places), or None when one is installed. Looks for it without starting it."""
    try:
        import jpype

        path = jpype.getDefaultJVMPath()
    except Exception as exc:  # JVMNotFoundException, or JPype itself missing
        return str(exc).strip() or type(exc).__name__
    return None if path and os.path.exists(path) else f"no JVM library at {path!r}"


def start_jvm() -> None:
    """Start pypmml's gateway once per process, as an in-process JVM (JPype).

    pypmml picks its gateway when the first PMMLContext is created: the default launches a
    Java child process and talks Py4J over a socket (milliseconds per call); gateway="jpype"
    loads the JVM into this process (microseconds per call). Later calls are a flag check.
    Call it at process start-up to pay the JVM's start before the first PMML model arrives.

    Any thread may start it (issue 14: the first PMML model starts it on the model-loader
    thread, off the scoring path). JNI_CreateJavaVM attaches the thread that calls it as the
    JVM's non-daemon "main" thread; JPype never detaches it. Started on a thread that then
    ends, that attachment outlives the thread, and DestroyJavaVM (JPype's exit hook with
    `destroy_jvm`, its default), called from a main thread that never called Java, waits
    for it forever: the interpreter hung at exit (tests/runtimes/test_jvm_start.py). So a
    thread other than the main one detaches right after the start; its next Java call
    attaches it again as a daemon, as JPype attaches every other Python thread, and daemon
    threads hold nothing at exit.
    """
    global _jvm_ready, _jvm_begun
    if _policy == "off":
        raise ModelError("unsupported_model", _off_reason)
    if _jvm_ready:
        return
    with _JVM_LOCK:
        if _jvm_ready:
            return
        _jvm_begun = True
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
        if threading.current_thread() is not threading.main_thread():
            jpype.java.lang.Thread.detach()  # see above: it would hold DestroyJavaVM forever
        _jvm_ready = True


_WARM_UP_DOCUMENT = b"""<PMML xmlns="http://www.dmg.org/PMML-4_3" version="4.3"><Header/>
<DataDictionary>
<DataField name="y" optype="continuous" dataType="double"/>
<DataField name="x" optype="continuous" dataType="double"/>
</DataDictionary>
<RegressionModel functionName="regression"><MiningSchema>
<MiningField name="y" usageType="target"/><MiningField name="x"/>
</MiningSchema>
<RegressionTable intercept="1"><NumericPredictor name="x" coefficient="2"/></RegressionTable>
</RegressionModel></PMML>"""


def warm_up() -> float:
    """Start the JVM and load and score a tiny PMML model: seconds it took.

    JPype holds the GIL for much of the JVM's start and of the first PMML load (it builds
    a Python class for every Java class it meets): measured with a Python thread ticking
    every millisecond beside them, gaps of 0.95 s during the start and 1.3 s during the
    first load on another thread, against 14 ms while a second model loads. Off the worker
    thread a first load still stalls scoring that long, so `WAXSERVE_PMML=auto` (the default)
    and `on` pay both at process start, on the main thread, before the dataflow runs.
    """
    started = time.perf_counter()
    start_jvm()
    runtime = PmmlRuntime(_WARM_UP_DOCUMENT)
    runtime.predict(np.array([[-1.0], [1.0]]))
    runtime.close()
    return time.perf_counter() - started


def _valid_values(field: Any) -> tuple[str, ...] | None:
    """A field's declared valid values: DataDictionary `Value`s that are neither missing nor
    invalid; None when the DataDictionary lists none.

    PMML4S's Field.validValues gives them as DataVal objects (`valuesAsString` would join them
    with commas, which a category may itself contain). With no `Value`s declared, PMML4S
    collects the values the model's predicates mention into a *mutable* attribute instead:
    those are not categories (any other string is still scored), so they are not reported.
    """
    from pypmml.metadata import DataVal

    try:
        if field.call("isMutable"):
            return None
        values = tuple(str(DataVal(v).toVal) for v in field.call("validValues"))
    except Exception:  # a pypmml without these calls: the categories are unknown
        log.debug("cannot read the valid values of PMML field %s", field.name, exc_info=True)
        return None
    return values or None


class PmmlRuntime(ModelRuntime):
    """A PMML regression or classification model scored by pypmml (PMML4S) in-process.

    Features are the PMML's active fields in mining-schema order, spelled as the PMML spells
    them ("fixed acidity"). A batch is scored in one call through PMML4S's JSON "split" form:
    text fields as strings, numeric ones as numbers, booleans as true/false. Classifiers need
    probability(k) output fields (or PMML4S's default ones).
    """

    def __init__(self, model_bytes: bytes, input_features: Sequence[str] = ()) -> None:
        self.format = "pmml"
        # PMML never needs a DTD; refusing one rules out XML entity tricks on our files.
        # PMML4S reads exactly the UTF-8 that was checked.
        document = utf8_document(bytes(model_bytes))
        try:
            start_jvm()
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError("load_failed", f"cannot start the JVM for pypmml: {exc}") from exc
        from pypmml import Model

        try:
            model = Model.fromBytes(document)
            function = str(model.functionName)
            fields = [(f, str(f.name), str(f.dataType)) for f in model.inputFields]
        except Exception as exc:
            raise ModelError("load_failed", f"pypmml cannot load the model: {exc}") from exc

        if function not in (REGRESSION, CLASSIFICATION):
            raise ModelError(
                "unsupported_model",
                f"PMML model function {function!r} is not regression or classification",
            )
        if not fields:
            raise ModelError("unsupported_model", "PMML model has no active input fields")
        unsupported = [
            f"{name} ({kind})"
            for _, name, kind in fields
            if kind not in _NUMERIC_PMML_TYPES | _TEXT_PMML_TYPES
        ]
        if unsupported:
            raise ModelError(
                "unsupported_model",
                "PMML inputs must be double, float, integer, boolean or string: "
                + ", ".join(unsupported),
            )
        self.task = function
        self._set_features(
            ModelFeature(name, TEXT, _valid_values(field))
            if kind in _TEXT_PMML_TYPES
            else ModelFeature(name, NUMERIC)
            for field, name, kind in fields
        )
        names = self.input_names
        if input_features:
            expected = {canonical_name(x) for x in names}
            given = {canonical_name(x) for x in input_features}
            if given != expected or len(input_features) != len(names):
                raise ModelError(
                    "bad_inputs",
                    f"input_features {list(input_features)} do not match the PMML inputs "
                    f"{list(names)} (missing: {sorted(expected - given)}, "
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
        self._request_prefix = b'{"columns":' + orjson.dumps(list(names)) + b',"data":'
        # Where each numeric and text column goes in a request row, in feature order. With
        # only double/float/integer fields (most models) the numeric matrix is the rows.
        kinds = [kind for _, _, kind in fields]
        self._numeric_at = [i for i, k in enumerate(kinds) if k in _NUMERIC_PMML_TYPES]
        self._text_at = [i for i, k in enumerate(kinds) if k in _TEXT_PMML_TYPES]
        numeric_kinds = [k for k in kinds if k in _NUMERIC_PMML_TYPES]
        self._boolean = [j for j, k in enumerate(numeric_kinds) if k == "boolean"]
        self._plain = not self._text_at and not self._boolean
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

    def _rows(self, numeric: np.ndarray, text: np.ndarray | None) -> bytes:
        """The request's "data": one JSON array per row, fields in feature order."""
        if self._plain:
            return orjson.dumps(
                np.ascontiguousarray(numeric, dtype=np.float64), option=orjson.OPT_SERIALIZE_NUMPY
            )
        rows = np.empty((len(numeric), len(self.features)), dtype=object)
        rows[:, self._numeric_at] = numeric  # Python floats: NaN is sent as null (missing)
        for j in self._boolean:
            # PMML4S reads a number as a boolean's text ("1.0"), which is no boolean value.
            rows[:, self._numeric_at[j]] = numeric[:, j] != 0
        if self._text_at:
            assert text is not None
            rows[:, self._text_at] = text
        return orjson.dumps(rows.tolist(), option=orjson.OPT_SERIALIZE_NUMPY)

    def _call(self, numeric: np.ndarray, text: np.ndarray | None) -> np.ndarray:
        """One PMML4S call for these rows: the output columns as float64 (NaN for null)."""
        request = self._request_prefix + self._rows(numeric, text) + b"}"
        n = len(numeric)
        with self._lock:
            if self._model is None:
                raise RuntimeError("the PMML runtime is closed")
            response = str(self._model.predict(request.decode()))
        doc = orjson.loads(response)
        columns: list[str] = doc["columns"] or []
        rows: list[list[Any]] = doc["data"]
        if len(rows) != n:
            raise ValueError(f"PMML4S returned {len(rows)} rows for {n}")
        out = np.full((n, len(self._out_fields)), np.nan)
        if not all(name in columns for name in self._out_fields):
            # The columns come from the first row's outputs: one refused row can hide them.
            if n > 1:
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

    def predict(self, numeric: np.ndarray, text: np.ndarray | None = None) -> Prediction:
        """Score a batch in one PMML4S call; rows it cannot score come back invalid."""
        n = self._check_batch(numeric, text)
        if n == 0:
            return self._empty()
        if self._model is None:
            raise RuntimeError("the PMML runtime is closed")
        try:
            scores = self._call(numeric, text)
        except Exception as exc:
            # One bad row fails a whole batch call: retry row by row to isolate it.
            log.warning("PMML batch of %d rows failed (%s); scoring row by row", n, exc)
            scores = np.full((n, len(self._out_fields)), np.nan)
            for i in range(n):
                row_text = None if text is None else text[i : i + 1]
                try:
                    scores[i] = self._call(numeric[i : i + 1], row_text)[0]
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
