"""Reference profiles: what a model's training data looked like, for drift.

A profile (`pb.ReferenceProfile`, carried in the model's descriptor) has, per numeric
feature, decile bins with the fraction of rows in each, the mean and the standard
deviation; per categorical feature, the categories seen and their fractions. `waxserve
profile` and `waxserve publish --profile-from` compute one from a sample of records read
with the data type's contract; the training scripts in models/ use the same functions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dataflows.contracts.codecs import codec_for
from dataflows.contracts.codecs.base import Decoded
from dataflows.contracts.schema import Contract, Encoding
from protos import waxserve_pb2 as pb

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


def profile_of(contract: Contract, decoded: Decoded) -> pb.ReferenceProfile:
    """The profile of every feature field (not the id, event time or label) of decoded
    records; fields no record has are left out."""
    ok = np.ones(len(decoded), dtype=bool)
    ok[list(decoded.errors)] = False
    profile = pb.ReferenceProfile(row_count=int(ok.sum()))
    for field in contract.feature_fields:
        where = contract.columns[field.name]
        try:
            if where.numeric:
                feature = numeric_profile(field.name, decoded.numeric[ok, where.index])
            else:
                feature = categorical_profile(field.name, decoded.text[ok, where.index].tolist())
        except ValueError:
            continue  # no value in the sample: nothing to compare a window with
        profile.features.append(feature)
    return profile


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
