"""One codec per encoding: JSON, CSV, Avro, protobuf and waxserve's generic Record.

`codec_for(contract, encoding)` builds the codec of one data type's records in one
encoding. JSON, CSV and RECORD work for every contract; AVRO and PROTOBUF need the
contract's Avro or protobuf options (ContractError otherwise). A new encoding is a new
module with a `Codec` subclass, registered in `CODECS`; nothing else changes.
"""

from __future__ import annotations

from typing import Any

from dataflows.contracts.codecs.avro import AvroCodec, SchemaResolver, schema_registry_resolver
from dataflows.contracts.codecs.base import Codec, Decoded, MessageError
from dataflows.contracts.codecs.csv_codec import CsvCodec
from dataflows.contracts.codecs.json_codec import JsonCodec
from dataflows.contracts.codecs.protobuf import ProtobufCodec
from dataflows.contracts.codecs.record import RecordCodec
from dataflows.contracts.schema import Contract, Encoding

CODECS: dict[Encoding, type[Codec]] = {
    Encoding.JSON: JsonCodec,
    Encoding.CSV: CsvCodec,
    Encoding.AVRO: AvroCodec,
    Encoding.PROTOBUF: ProtobufCodec,
    Encoding.RECORD: RecordCodec,
}
"""The codec class of each encoding."""


def codec_for(contract: Contract, encoding: Encoding, **options: Any) -> Codec:
    """The codec of `contract`'s records in `encoding`; ContractError("bad_contract") when
    the contract's options for it cannot work. `options` go to the codec's constructor
    (AVRO: `schema_resolver`)."""
    return CODECS[encoding](contract, **options)


__all__ = [
    "CODECS",
    "AvroCodec",
    "Codec",
    "CsvCodec",
    "Decoded",
    "JsonCodec",
    "MessageError",
    "ProtobufCodec",
    "RecordCodec",
    "SchemaResolver",
    "codec_for",
    "schema_registry_resolver",
]
