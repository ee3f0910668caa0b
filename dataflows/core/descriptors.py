"""Model descriptors: building them from model files, and the model catalog in models/."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from google.protobuf import json_format

from protos import waxserve_pb2 as pb


def _models_dir() -> Path:
    """The example models: a source checkout's models/ (so edits there count at once), else
    the copy the wheel ships as package data, `dataflows/examples` (pyproject.toml maps
    models/ there)."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "models" / "catalog.json").is_file():
        return checkout / "models"
    # An installed wheel is unpacked, so the resource is a real directory.
    return Path(str(resources.files("dataflows") / "examples"))


MODELS_DIR = _models_dir()
"""The example catalog, contracts, models and data: models/ in a checkout, the package's
copy when installed."""


def catalog_dir(model_dir: str = "") -> Path:
    """Where `waxserve publish NAME` looks a name up: `model_dir` (WAXSERVE_MODEL_DIR) when it
    holds a catalog.json, so that `--by-reference` locations fall inside the directory the
    dataflow accepts (the image's /app/models), else `MODELS_DIR`."""
    if model_dir and (Path(model_dir) / "catalog.json").is_file():
        return Path(model_dir)
    return MODELS_DIR


FORMATS: dict[str, pb.ModelFormat] = {"onnx": pb.MODEL_FORMAT_ONNX, "pmml": pb.MODEL_FORMAT_PMML}
FORMAT_NAMES: dict[int, str] = {int(v): k for k, v in FORMATS.items()}


def format_of(path: Path) -> pb.ModelFormat:
    """Model format from a file name: .onnx or .pmml/.xml."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return pb.MODEL_FORMAT_ONNX
    if suffix in (".pmml", ".xml"):
        return pb.MODEL_FORMAT_PMML
    raise ValueError(f"{path}: cannot tell the model format from {suffix!r} (.onnx or .pmml)")


def sha256_hex(data: bytes) -> str:
    """Lower-case hex SHA-256, the digest descriptors carry."""
    return hashlib.sha256(data).hexdigest()


def load_profile(path: Path) -> pb.ReferenceProfile:
    """A reference profile stored as protobuf JSON."""
    return json_format.Parse(path.read_text(), pb.ReferenceProfile())


def make_descriptor(
    model_path: Path,
    *,
    name: str,
    version: str,
    data_type: str,
    description: str = "",
    input_features: Sequence[str] = (),
    profile: pb.ReferenceProfile | None = None,
    by_reference: bool = False,
    created_at_ms: int | None = None,
    contract_version: int = 0,
) -> pb.ModelDescriptor:
    """A descriptor for a model file: by value (bytes inside) or by `file://` reference."""
    model_bytes = model_path.read_bytes()
    desc = pb.ModelDescriptor(
        name=name,
        version=version,
        description=description,
        data_type=data_type,
        format=format_of(model_path),
        sha256=sha256_hex(model_bytes),
        created_at_ms=int(time.time() * 1000) if created_at_ms is None else created_at_ms,
        input_features=list(input_features),
        contract_version=contract_version,
    )
    if by_reference:
        desc.location = model_path.resolve().as_uri()
    else:
        desc.model_bytes = model_bytes
    if profile is not None:
        desc.reference_profile.CopyFrom(profile)
    return desc


@dataclass(frozen=True)
class CatalogEntry:
    """One model of models/catalog.json."""

    file: str
    name: str
    version: str
    format: str
    task: str
    data_type: str
    description: str = ""
    input_features: tuple[str, ...] = ()
    profile: str = ""
    metrics: dict[str, float] = field(default_factory=dict)

    def path(self, models_dir: Path = MODELS_DIR) -> Path:
        """Where the model file is."""
        return models_dir / self.file

    def descriptor(
        self,
        models_dir: Path = MODELS_DIR,
        *,
        version: str | None = None,
        by_reference: bool = False,
    ) -> pb.ModelDescriptor:
        """Descriptor for this catalog model (optionally under another version)."""
        profile = load_profile(models_dir / self.profile) if self.profile else None
        return make_descriptor(
            self.path(models_dir),
            name=self.name,
            version=version or self.version,
            data_type=self.data_type,
            description=self.description,
            input_features=self.input_features,
            profile=profile,
            by_reference=by_reference,
        )


def control_message(body: pb.ModelDescriptor | pb.DataContract | pb.PlanCommand) -> bytes:
    """A descriptor, contract or plan command as the control topic carries it."""
    if isinstance(body, pb.ModelDescriptor):
        return pb.ControlMessage(model=body).SerializeToString()
    if isinstance(body, pb.PlanCommand):
        return pb.ControlMessage(plan=body).SerializeToString()
    return pb.ControlMessage(contract=body).SerializeToString()


def catalog_contracts(models_dir: Path = MODELS_DIR) -> dict[str, Path]:
    """The contract files listed in `<models_dir>/catalog.json`, by data type."""
    doc = json.loads((models_dir / "catalog.json").read_text())
    return {c["data_type"]: models_dir / c["file"] for c in doc.get("contracts", [])}


def load_catalog(models_dir: Path = MODELS_DIR) -> dict[str, CatalogEntry]:
    """The models listed in `<models_dir>/catalog.json`, by name."""
    doc = json.loads((models_dir / "catalog.json").read_text())
    entries = {}
    for item in doc["models"]:
        item = dict(item)
        item["input_features"] = tuple(item.get("input_features", ()))
        entry = CatalogEntry(**item)
        entries[entry.name] = entry
    return entries
