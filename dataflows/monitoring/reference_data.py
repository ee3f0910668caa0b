"""The example models' training rows, and the catalog's per-model reference profiles.

The example models were trained on 80% stratified splits (fixed seed) of the data in
models/: `models/train.py` for wine, `models/train_penguins.py` for penguins. This module
reproduces those splits (scikit-learn's `train_test_split`, a dev dependency) as the lines
of the data files, so that the drift evaluation (`drift_eval`) resamples exactly the rows
the reference profiles were built from, and so that each catalog model's profile can add
its own predictions on them to the features and the label:

    python -m dataflows.monitoring.reference_data     # writes models/profiles/<model>.json

Each written profile is what `waxserve profile SAMPLE --model MODEL` computes from those
lines; its feature part must equal the data type's shared profile (wine.profile.json,
penguins/penguins.profile.json), which proves the split is the training split.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf import json_format

from dataflows.contracts.codecs import codec_for
from dataflows.contracts.codecs.base import Decoded
from dataflows.contracts.files import load_contract
from dataflows.contracts.schema import Contract, Encoding
from dataflows.core.descriptors import (
    FORMATS,
    MODELS_DIR,
    CatalogEntry,
    catalog_contracts,
    load_catalog,
    load_profile,
)
from dataflows.monitoring.profiles import profile_of
from dataflows.runtimes import load_runtime
from protos import waxserve_pb2 as pb

SEED = 42
TEST_SIZE = 0.2
"""The split of models/train.py and models/train_penguins.py."""

DATA_FILES = {"wine": "data/winequality_red.csv", "penguins": "penguins/penguins.csv"}
"""Each example data type's data file (in its contract's CSV layout), under models/."""

PROFILES_DIR = "profiles"
"""Where the per-model profiles go, under models/."""


@dataclass(frozen=True)
class TrainingRows:
    """A data type's training rows as CSV lines, with its contract, decoded."""

    contract: Contract
    lines: list[bytes]
    decoded: Decoded


def training_rows(data_type: str, models_dir: Path = MODELS_DIR) -> TrainingRows:
    """The rows the data type's example models were trained on (the order of the split)."""
    try:
        from sklearn.model_selection import train_test_split
    except ImportError:  # pragma: no cover - the dev extra has it
        raise SystemExit("the training split needs scikit-learn: pip install -e '.[dev]'") from None
    contract = load_contract(catalog_contracts(models_dir)[data_type])
    with (models_dir / DATA_FILES[data_type]).open("rb") as f:
        lines = [line.rstrip(b"\r\n") for line in f if line.strip()]
    if contract.csv.header:
        lines = lines[1:]
    delimiter = contract.csv.delimiter.encode()
    label = list(contract.csv_columns).index(contract.label_field)
    cells = [line.split(delimiter) for line in lines]
    # train_penguins.py trains on the complete rows only; every wine row is complete.
    complete = [i for i, row in enumerate(cells) if all(c.strip() for c in row)]
    strata = [cells[i][label] for i in complete]
    train, _ = train_test_split(
        np.asarray(complete), test_size=TEST_SIZE, random_state=SEED, stratify=strata
    )
    chosen = [lines[i] for i in train]
    decoded = codec_for(contract, Encoding.CSV).decode(chosen)
    if decoded.errors:
        raise ValueError(f"{data_type}: training rows that do not decode: {decoded.errors}")
    return TrainingRows(contract, chosen, decoded)


SHARED_PROFILES = {"wine": "wine.profile.json", "penguins": "penguins/penguins.profile.json"}
"""Each example data type's feature profile, as its training script writes it."""


def model_profile(
    entry: CatalogEntry, rows: TrainingRows, models_dir: Path = MODELS_DIR
) -> pb.ReferenceProfile:
    """A catalog model's reference profile: features and label of its training rows, and
    its own predictions on them. ValueError when the features differ from the data type's
    shared profile (then the rows are not the training split)."""
    model_bytes = entry.path(models_dir).read_bytes()
    runtime = load_runtime(FORMATS[entry.format], model_bytes, entry.input_features)
    try:
        profile = profile_of(rows.contract, rows.decoded, runtime)
    finally:
        runtime.close()
    shared = load_profile(models_dir / SHARED_PROFILES[entry.data_type])
    mine = {f.name: f for f in profile.features}
    if mine != {f.name: f for f in shared.features} or profile.row_count != shared.row_count:
        raise ValueError(
            f"{entry.name}: the reproduced training rows do not give "
            f"{SHARED_PROFILES[entry.data_type]}'s feature profile"
        )
    return profile


def write_catalog_profiles(models_dir: Path = MODELS_DIR) -> list[Path]:
    """Write every catalog model's profile to models/profiles/<name>.json and point its
    catalog entry there. Returns the files written."""
    catalog_path = models_dir / "catalog.json"
    catalog = json.loads(catalog_path.read_text())
    entries = load_catalog(models_dir)
    rows: dict[str, TrainingRows] = {}
    written = []
    for item in catalog["models"]:
        entry = entries[item["name"]]
        if entry.data_type not in SHARED_PROFILES:
            continue
        if entry.data_type not in rows:
            rows[entry.data_type] = training_rows(entry.data_type, models_dir)
        profile = model_profile(entry, rows[entry.data_type], models_dir)
        target = models_dir / PROFILES_DIR / f"{entry.name}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        text = json_format.MessageToJson(profile, preserving_proto_field_name=True, indent=2)
        target.write_text(text + "\n")
        item["profile"] = f"{PROFILES_DIR}/{target.name}"
        written.append(target)
    catalog_path.write_text(json.dumps(catalog, indent=2) + "\n")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=MODELS_DIR, help="the models folder")
    args = parser.parse_args(argv)
    for path in write_catalog_profiles(args.models):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
