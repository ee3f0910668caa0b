"""Reference profiles: what a model's training data looked like, for drift.

A profile (`pb.ReferenceProfile`, carried in the model's descriptor) has, per numeric
feature, decile bins with the fraction of rows in each, the mean and the standard
deviation; per categorical feature, the categories seen and their fractions. The label
field gets the same, and, given the model, so do its predictions on the sample (values of
a regressor, classes of a classifier): drift of both is tested beside the features.
`waxserve profile` and `waxserve publish --profile-from` compute one from a sample of
records read with the data type's contract; the training scripts in models/ use the same
functions.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dataflows.contracts.codecs import codec_for
from dataflows.contracts.codecs.base import Decoded
from dataflows.contracts.schema import Contract, Encoding
from dataflows.runtimes import ModelRuntime
from dataflows.runtimes.base import CLASSIFICATION, NUMERIC
from protos import waxserve_pb2 as pb

PREDICTION = "prediction"
"""The name of a prediction profile."""

SAMPLE_ENCODINGS = {
    ".csv": Encoding.CSV,
    ".tsv": Encoding.CSV,
    ".txt": Encoding.CSV,
    ".jsonl": Encoding.JSON,
    ".ndjson": Encoding.JSON,
    ".json": Encoding.JSON,
}


def numeric_profile(name: str, column: np.ndarray) -> pb.FeatureProfile:
    """Decile histogram, mean and population std of one numeric feature (NaN: absent).

    Bin i of a value v is `np.searchsorted(edges, v, side="right")`, as the dataflow bins.
    """
    values = column[~np.isnan(column)]
    if len(values) == 0:
        raise ValueError(f"feature {name!r} has no value in the sample")
    edges = np.unique(np.quantile(values, np.linspace(0.1, 0.9, 9)))
    bins = np.searchsorted(edges, values, side="right")
    fractions = np.bincount(bins, minlength=len(edges) + 1) / len(values)
    return pb.FeatureProfile(
        name=name,
        bin_edges=edges.tolist(),
        expected_fractions=fractions.tolist(),
        mean=float(values.mean()),
        std=float(values.std()),
    )


def categorical_profile(name: str, values: Sequence[str | None]) -> pb.FeatureProfile:
    """The categories of one text feature and the fraction of rows with each (None:
    absent), in category order."""
    counts = Counter(v for v in values if v is not None)
    total = sum(counts.values())
    if total == 0:
        raise ValueError(f"feature {name!r} has no value in the sample")
    categories = sorted(counts)
    return pb.FeatureProfile(
        name=name,
        categories=categories,
        expected_fractions=[counts[c] / total for c in categories],
    )


def profile_of(
    contract: Contract, decoded: Decoded, model: ModelRuntime | None = None
) -> pb.ReferenceProfile:
    """The profile of every feature field (not the id or event time) of decoded records,
    of the label field, and with `model`, of its predictions; fields no record has are
    left out."""
    ok = _decoded_rows(decoded)
    profile = pb.ReferenceProfile(row_count=int(ok.sum()))
    for field in contract.feature_fields:
        try:
            feature = _field_profile(contract, decoded, ok, field.name)
        except ValueError:
            continue  # no value in the sample: nothing to compare a window with
        profile.features.append(feature)
    if contract.label_field:
        with contextlib.suppress(ValueError):  # the sample carries no label: none
            profile.label.CopyFrom(_field_profile(contract, decoded, ok, contract.label_field))
    if model is not None:
        profile.prediction.CopyFrom(prediction_profile(model, contract, decoded))
    return profile


def prediction_profile(
    model: ModelRuntime, contract: Contract, decoded: Decoded
) -> pb.FeatureProfile:
    """The profile of a model's predictions on the decoded records that have every input it
    takes: a numeric profile of a regressor's values, the class frequencies of a
    classifier (every class it can predict, 0 for those it never did here).

    ValueError when the model's inputs do not fit the contract, or no record can be scored.
    """
    from dataflows.control.registry import bind_inputs  # the registry imports this module's kin
    from dataflows.runtimes import ModelError

    try:
        fields = bind_inputs(model.features, contract)
    except ModelError as exc:
        raise ValueError(str(exc)) from None
    ok = _decoded_rows(decoded)
    numeric = [
        contract.columns[f].index
        for f, m in zip(fields, model.features, strict=True)
        if m.kind == NUMERIC
    ]
    text = [
        contract.columns[f].index
        for f, m in zip(fields, model.features, strict=True)
        if m.kind != NUMERIC
    ]
    x = decoded.numeric[ok][:, numeric]
    complete = ~np.isnan(x).any(axis=1)
    t = decoded.text[ok][:, text] if text else None
    if t is not None:
        complete &= np.frompyfunc(lambda v: v is not None, 1, 1)(t).astype(bool).all(axis=1)
    if not complete.any():
        raise ValueError("no record of the sample has every input the model takes")
    scored = model.predict(np.ascontiguousarray(x[complete]), None if t is None else t[complete])
    valid = scored.valid
    if model.task != CLASSIFICATION or scored.labels is None:
        return numeric_profile(PREDICTION, scored.values[valid])
    counts = Counter(label for label, v in zip(scored.labels, valid.tolist(), strict=True) if v)
    if not counts:
        raise ValueError("the model predicted nothing usable on the sample")
    classes = sorted(set(model.class_labels) | set(counts))
    total = sum(counts.values())
    return pb.FeatureProfile(
        name=PREDICTION,
        categories=classes,
        expected_fractions=[counts[c] / total for c in classes],
    )


def load_model_file(path: Path, input_features: Sequence[str] = ()) -> ModelRuntime:
    """A model file (.onnx, .pmml) loaded to score a sample for its prediction profile.
    ValueError when it cannot be read or loaded."""
    from dataflows.core.descriptors import format_of
    from dataflows.runtimes import ModelError, load_runtime

    try:
        return load_runtime(format_of(path), path.read_bytes(), input_features)
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    except ModelError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _decoded_rows(decoded: Decoded) -> np.ndarray:
    ok = np.ones(len(decoded), dtype=bool)
    ok[list(decoded.errors)] = False
    return ok


def _field_profile(
    contract: Contract, decoded: Decoded, ok: np.ndarray, name: str
) -> pb.FeatureProfile:
    where = contract.columns[name]
    if where.numeric:
        return numeric_profile(name, decoded.numeric[ok, where.index])
    return categorical_profile(name, decoded.text[ok, where.index].tolist())


def read_sample(contract: Contract, path: Path, max_rows: int = 100_000) -> Decoded:
    """A sample file of records decoded with the contract: CSV in the contract's CSV layout
    (skipping a header line when the contract says the files have one), or JSON lines.
    ValueError when the file cannot be read or no record decodes."""
    encoding = SAMPLE_ENCODINGS.get(path.suffix.lower())
    if encoding is None:
        known = ", ".join(sorted(SAMPLE_ENCODINGS))
        raise ValueError(f"{path}: a sample must be CSV or JSON lines ({known})")
    try:
        with path.open("rb") as f:
            lines = [line.rstrip(b"\r\n") for line in f if line.strip()]
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    if encoding is Encoding.CSV and contract.csv.header:
        lines = lines[1:]
    lines = lines[:max_rows]
    decoded = codec_for(contract, encoding).decode(lines)
    if len(decoded.errors) == len(lines):
        first = next(iter(decoded.errors.values()), ("empty", "no records"))
        raise ValueError(f"{path}: no record decodes with the contract ({first[1]})")
    return decoded
