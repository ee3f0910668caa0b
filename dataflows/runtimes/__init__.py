"""Model runtimes: ONNX (onnxruntime) and PMML (pypmml on an in-process JVM) behind one interface.

A runtime is built from model bytes, scores a batch in one call and returns a `Prediction`
of numpy columns. Nothing here unpickles or executes model content: ONNX graphs run in
onnxruntime, PMML documents are interpreted by PMML4S. One module per format; this package
only picks the runtime for a descriptor's format.

    runtime = load_runtime(pb.MODEL_FORMAT_PMML, pmml_bytes, ())
    prediction = runtime.predict(numeric, text)
    # numeric: float64 (n, len(runtime.numeric_features)); text: object (n, len(text_features))
"""

from __future__ import annotations

from collections.abc import Sequence

from dataflows.runtimes.base import (
    CLASSIFICATION,
    REGRESSION,
    ModelError,
    ModelFeature,
    ModelRuntime,
    Prediction,
    canonical_name,
)
from dataflows.runtimes.onnx import OnnxRuntime
from dataflows.runtimes.pmml import (
    JVM_POLICIES,
    PmmlRuntime,
    java_missing,
    jvm_policy,
    jvm_started,
    set_jvm_policy,
    start_jvm,
)
from protos import waxserve_pb2 as pb

__all__ = [
    "CLASSIFICATION",
    "JVM_POLICIES",
    "REGRESSION",
    "ModelError",
    "ModelFeature",
    "ModelRuntime",
    "OnnxRuntime",
    "PmmlRuntime",
    "Prediction",
    "canonical_name",
    "java_missing",
    "jvm_policy",
    "jvm_started",
    "load_runtime",
    "set_jvm_policy",
    "start_jvm",
]


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
