"""Contract files: a `DataContract` as protobuf JSON, the form `waxserve contract` reads and
writes and the examples in models/ ship.

One addition to protobuf's JSON form: `protobuf.descriptorSetFile` names a binary
FileDescriptorSet next to the contract file (`protoc --descriptor_set_out
--include_imports`), read into `protobuf.fileDescriptorSet`, so the file stays readable.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from google.protobuf import json_format

from dataflows.contracts.schema import Contract
from protos import waxserve_pb2 as pb


def read_contract_file(path: Path) -> pb.DataContract:
    """The contract message of a contract file; ValueError names what is wrong."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a JSON contract file: {exc}") from None
    options = doc.get("protobuf") if isinstance(doc, dict) else None
    if isinstance(options, dict) and "descriptorSetFile" in options:
        descriptor_file = path.parent / str(options.pop("descriptorSetFile"))
        try:
            data = descriptor_file.read_bytes()
        except OSError as exc:
            raise ValueError(f"{path}: descriptorSetFile {descriptor_file}: {exc}") from None
        options["fileDescriptorSet"] = base64.b64encode(data).decode()
    try:
        return json_format.ParseDict(doc, pb.DataContract())
    except json_format.ParseError as exc:
        raise ValueError(f"{path}: {exc}") from None


def load_contract(path: Path) -> Contract:
    """A contract file, checked."""
    return Contract.from_proto(read_contract_file(path))


def contract_json(contract: pb.DataContract) -> str:
    """A contract as the JSON a contract file holds."""
    return json_format.MessageToJson(contract, indent=2) + "\n"
