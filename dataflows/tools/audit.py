"""`waxserve audit RECORD_ID`: one record followed through the topics, and nothing else.

A scored record carries its lineage (`ScoredRecord.lineage`: the descriptor's control-topic
position, who signed it, the signature finding, the contract version, the serving
decision). From a record id the audit reads:

1. the scored topic, for the scored records of that id (a byte search for the encoded id
   before anything is parsed; `--data-type` and `--since`/`--until` narrow it);
2. the records topic, for the input at each one's source topic, partition and offset,
   decoded with the data type's contract when the control topic still has it;
3. the control topic at the lineage's position, for the descriptor that scored it: name,
   version, sha256 (against the scored record's), signer, whether the signature verifies
   against `--trusted-keys`, the golden set and the reference profile it was trained against;
4. the events topic, for what the dataflow said of that model (installed when, the quality
   gate's summary, the signature finding) and which contract installed the version;
5. when no scored record has the id: the dead-letter topic, by the id in the original bytes
   (confirmed by decoding them with the contract) or by "<topic>/<partition>/<offset>".

Memory stays bounded on big topics: messages are looked at one by one and only matches are
kept (at most `--max-matches`). A descriptor gone from the control topic (compacted away
by a newer version of the same model, or past retention) is reported as gone, with what
the events topic still says of it. Exit code 0: scored record(s) found; 1: none.

The report building is pure (`audit(topics, query)` over any `Topics`); `KafkaTopics` is
the Kafka side.
"""

from __future__ import annotations

import base64
import math
import os
import re
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import orjson
from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage
from tqdm import tqdm

from dataflows.contracts.decode import ContractCodecs
from dataflows.contracts.schema import Contract, ContractError, FieldType
from dataflows.control.signing import SignaturePolicy, TrustedKeys, verify
from dataflows.core.config import Config
from dataflows.scoring import wire
from dataflows.tools.broker import METADATA_TIMEOUT_S, kafka_settings
from dataflows.tools.replay import CliError
from protos import waxserve_pb2 as pb

EXIT_FOUND = 0
EXIT_NOT_FOUND = 1
DEFAULT_MAX_MATCHES = 10
MAX_EVENTS_PER_MODEL = 20
PROGRESS_MIN_MESSAGES = 50_000
"""Scans shorter than this show no progress bar."""
MAX_FIELDS_SHOWN = 40

Headers = list[tuple[str, bytes | None]]


# --- what is read ------------------------------------------------------------------------


@dataclass(frozen=True)
class Msg:
    """One consumed message, independent of the Kafka client."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    key: bytes | None
    value: bytes | None
    headers: Headers = field(default_factory=list)

    def header(self, name: str) -> str | None:
        """A header's value as text (the first of that name)."""
        for key, value in self.headers:
            if key == name:
                return None if value is None else value.decode("utf-8", "replace")
        return None


@dataclass(frozen=True)
class Fetched:
    """The message at one position, or why there is none."""

    msg: Msg | None
    note: str = ""


class Topics(Protocol):
    """What the audit reads: whole topics (within time bounds) and single positions."""

    def scan(
        self, topic: str, *, since_ms: int | None = None, until_ms: int | None = None
    ) -> Iterator[Msg]:
        """Every message of `topic` (from `since_ms`, up to `until_ms`), partition by
        partition in offset order."""
        ...

    def fetch(self, topic: str, partition: int, offset: int) -> Fetched:
        """The message at a position."""
        ...


@dataclass(frozen=True)
class Query:
    """What to audit."""

    record_id: str
    scored_topic: str
    control_topic: str
    events_topic: str
    dlq_topic: str
    data_type: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    trusted_keys: Path | None = None
    max_matches: int = DEFAULT_MAX_MATCHES


# --- the report --------------------------------------------------------------------------


@dataclass
class Position:
    """A message's place in a topic."""

    topic: str
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.topic} [{self.partition}] @ {self.offset}"


@dataclass
class InputRecord:
    """The input record at a scored record's source position."""

    position: Position
    found: bool
    note: str = ""
    timestamp_ms: int | None = None
    key: Any = None
    headers: list[list[Any]] = field(default_factory=list)
    fields: dict[str, Any] | None = None  # decoded with the contract, when it could be
    raw: Any = None  # otherwise: JSON, text or {"base64": ...}
    id_matches: bool | None = None  # the decoded record's id is the audited one


@dataclass
class ProfileSummary:
    """The reference profile a model was trained against, in brief."""

    row_count: int
    features: list[dict[str, Any]]
    prediction: dict[str, Any] | None = None
    label: dict[str, Any] | None = None


@dataclass
class DescriptorInfo:
    """The descriptor at a lineage's control position."""

    position: Position
    found: bool
    note: str = ""
    published_ms: int | None = None
    name: str = ""
    version: str = ""
    data_type: str = ""
    format: str = ""
    sha256: str = ""
    sha256_matches: bool | None = None  # the scored record's model_sha256 is this one
    created_at_ms: int = 0
    description: str = ""
    contract_version: int = 0  # the contract version it declares it was trained against
    source: str = ""  # "by value, N bytes" or its location
    signer_key_id: str = ""
    signature: str = ""  # what this audit found: valid, unknown_key, ... or not_checked
    signature_message: str = ""
    golden_set: dict[str, Any] | None = None
    profile: ProfileSummary | None = None


@dataclass
class EventInfo:
    """A model or contract event of the events topic."""

    kind: str
    at_ms: int
    position: Position  # of the control message it concerns
    model_name: str = ""
    model_version: str = ""
    model_sha256: str = ""
    contract_version: int = 0
    reason: str = ""
    message: str = ""
    gate: str = ""
    signer_key_id: str = ""
    signature_status: str = ""


@dataclass
class ContractInfo:
    """The contract version a record was decoded with, as the topics show it."""

    data_type: str
    version: int
    installed: EventInfo | None = None
    found: bool = False
    note: str = ""


@dataclass
class Trace:
    """One scored record of the id, followed back."""

    scored_position: Position
    scored: dict[str, Any]
    lineage: dict[str, Any] | None
    lineage_note: str
    input: InputRecord
    descriptor: DescriptorInfo | None
    contract: ContractInfo | None
    installed: EventInfo | None  # the event that installed the descriptor
    events: list[EventInfo]  # every event of this model, oldest first


@dataclass
class DeadLetterInfo:
    """A dead letter of the record."""

    position: Position
    timestamp_ms: int | None
    source: Position | None
    data_type: str
    stage: str
    reason: str
    message: str
    confirmed: bool  # the id was decoded from its bytes, or is its source position
    how: str


@dataclass
class AuditReport:
    """Everything the audit found of one record id."""

    record_id: str
    found: bool
    traces: list[Trace] = field(default_factory=list)
    more_matches: int = 0  # scored records of the id beyond max_matches
    scanned: int = 0  # scored-topic messages looked at
    dead_letters: list[DeadLetterInfo] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-able data."""
        return asdict(self)


# --- building it -------------------------------------------------------------------------


def id_needle(record_id: str) -> bytes:
    """The bytes of `ScoredRecord.record_id = record_id` on the wire: a scored record of the
    id contains them, whoever encoded it (field 2, length-delimited)."""
    encoded = record_id.encode()
    return b"\x12" + wire.length_prefix(len(encoded)) + encoded


def proto_dict(msg: ProtoMessage) -> dict[str, Any]:
    """A protobuf message as JSON-able data, field names as in the .proto."""
    return json_format.MessageToDict(
        msg,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )


def text_or_base64(data: bytes | None) -> Any:
    """Bytes for JSON: text when UTF-8, else {"base64": ...}."""
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}


def find_scored(
    messages: Iterator[Msg], record_id: str, data_type: str | None, max_matches: int
) -> tuple[list[tuple[Msg, pb.ScoredRecord]], int, int]:
    """The scored records of an id: (the first `max_matches`, how many more, messages
    scanned). Only messages holding the id's encoded bytes are parsed."""
    needle = id_needle(record_id)
    found: list[tuple[Msg, pb.ScoredRecord]] = []
    more = scanned = 0
    for msg in messages:
        scanned += 1
        value = msg.value
        if value is None or needle not in value:
            continue
        try:
            scored = pb.ScoredRecord.FromString(value)
        except DecodeError:
            continue
        if scored.record_id != record_id or (data_type and scored.data_type != data_type):
            continue
        if len(found) < max_matches:
            found.append((msg, scored))
        else:
            more += 1
    return found, more, scanned


def event_info(msg: Msg, event: pb.ModelEvent) -> EventInfo:
    """An events-topic message as the report shows it."""
    return EventInfo(
        kind=event.kind,
        at_ms=event.at_ms,
        position=Position(event.source_topic, event.source_partition, event.source_offset),
        model_name=event.model_name,
        model_version=event.model_version,
        model_sha256=event.model_sha256,
        contract_version=event.contract_version,
        reason=event.reason,
        message=event.message,
        gate=event.gate,
        signer_key_id=event.signer_key_id,
        signature_status=event.signature_status,
    )


@dataclass
class EventIndex:
    """The events that matter to the audit, gathered in one pass over the events topic:
    per model (data type, sha256) its last events, and every contract installed."""

    models: dict[tuple[str, str], deque[EventInfo]] = field(default_factory=dict)
    contracts: dict[tuple[str, int], EventInfo] = field(default_factory=dict)

    @classmethod
    def read(cls, messages: Iterator[Msg], models: set[tuple[str, str]]) -> EventIndex:
        """Index the events of `models` ((data type, sha256) pairs) and of contracts."""
        index = cls()
        for msg in messages:
            try:
                event = pb.ModelEvent.FromString(msg.value or b"")
            except DecodeError:
                continue
            if event.kind == "contract_installed":
                index.contracts[(event.data_type, event.contract_version)] = event_info(msg, event)
            elif (event.data_type, event.model_sha256) in models:
                kept = index.models.setdefault(
                    (event.data_type, event.model_sha256), deque(maxlen=MAX_EVENTS_PER_MODEL)
                )
                kept.append(event_info(msg, event))
        return index

    def of_model(self, data_type: str, sha256: str) -> list[EventInfo]:
        """A model's events, oldest first."""
        return list(self.models.get((data_type, sha256), ()))

    def latest_contract(self, data_type: str) -> EventInfo | None:
        """The newest contract version installed for a data type."""
        versions = [v for (dt, v) in self.contracts if dt == data_type]
        return self.contracts[(data_type, max(versions))] if versions else None


def profile_summary(profile: pb.ReferenceProfile) -> ProfileSummary:
    """A reference profile in brief: per feature its mean and std, or its categories."""

    def one(f: pb.FeatureProfile) -> dict[str, Any]:
        if f.categories:
            return {"name": f.name, "categories": list(f.categories)}
        return {"name": f.name, "mean": f.mean, "std": f.std, "bins": len(f.bin_edges) + 1}

    return ProfileSummary(
        row_count=profile.row_count,
        features=[one(f) for f in profile.features],
        prediction=one(profile.prediction) if profile.HasField("prediction") else None,
        label=one(profile.label) if profile.HasField("label") else None,
    )


def describe_descriptor(
    fetched: Fetched,
    position: Position,
    scored_sha256: str,
    trusted_keys: TrustedKeys | None,
) -> DescriptorInfo:
    """What the control topic holds at a lineage's position."""
    info = DescriptorInfo(position=position, found=False)
    msg = fetched.msg
    if msg is None:
        info.note = fetched.note
        return info
    try:
        control = pb.ControlMessage.FromString(msg.value or b"")
    except DecodeError as exc:
        info.note = f"the message there is no control message ({exc})"
        return info
    if control.WhichOneof("body") != "model":
        info.note = "the message there is not a model descriptor"
        return info
    desc = control.model
    info.found = True
    info.published_ms = msg.timestamp_ms
    info.name, info.version, info.data_type = desc.name, desc.version, desc.data_type
    info.format = pb.ModelFormat.Name(desc.format).removeprefix("MODEL_FORMAT_").lower()
    info.sha256, info.sha256_matches = desc.sha256, desc.sha256 == scored_sha256
    info.created_at_ms, info.description = desc.created_at_ms, desc.description
    info.contract_version = desc.contract_version
    if desc.WhichOneof("source") == "model_bytes":
        info.source = f"by value, {len(desc.model_bytes):,} bytes"
    else:
        info.source = desc.location
    if desc.HasField("signature"):
        info.signer_key_id = desc.signature.key_id
    if trusted_keys is None:
        info.signature = "not_checked"
        info.signature_message = "no --trusted-keys given" if info.signer_key_id else "unsigned"
    else:
        verdict = verify(desc, trusted_keys, SignaturePolicy.REQUIRE)
        info.signature, info.signature_message = str(verdict.status), verdict.message
    if desc.HasField("golden_set"):
        golden = desc.golden_set
        info.golden_set = {
            "inputs": len(golden.inputs),
            "expected": len(golden.expected),
            "tolerance": golden.tolerance,
            "max_latency_us": golden.max_latency_us,
            "evaluator": golden.evaluator,
        }
    if desc.HasField("reference_profile"):
        info.profile = profile_summary(desc.reference_profile)
    return info


def contract_at(topics: Topics, event: EventInfo) -> tuple[Contract | None, str]:
    """The contract a contract_installed event points at, or why it cannot be read."""
    p = event.position
    fetched = topics.fetch(p.topic, p.partition, p.offset)
    if fetched.msg is None:
        return None, fetched.note
    try:
        control = pb.ControlMessage.FromString(fetched.msg.value or b"")
        if control.WhichOneof("body") != "contract":
            return None, f"{p} holds no contract"
        return Contract.from_proto(control.contract), ""
    except (DecodeError, ContractError) as exc:
        return None, f"the contract at {p} cannot be read: {exc}"


class Contracts:
    """Contracts read from the control topic on demand, each once."""

    def __init__(self, topics: Topics, events: EventIndex) -> None:
        self._topics = topics
        self._events = events
        self._cache: dict[tuple[str, int | None], tuple[Contract | None, str]] = {}

    def get(self, data_type: str, version: int | None) -> tuple[Contract | None, str]:
        """A data type's contract of `version` (None: the newest installed)."""
        key = (data_type, version)
        if key not in self._cache:
            event = (
                self._events.latest_contract(data_type)
                if version is None
                else self._events.contracts.get((data_type, version))
            )
            if event is None:
                which = "" if version is None else f" v{version}"
                self._cache[key] = (
                    None,
                    f"the events topic shows no {data_type} contract{which} installed",
                )
            else:
                self._cache[key] = contract_at(self._topics, event)
        return self._cache[key]


def decode_fields(contract: Contract, msg: Msg) -> tuple[dict[str, Any] | None, str | None, str]:
    """A record's fields by its contract, its record id, or why it does not decode."""
    try:
        decoded = ContractCodecs(contract).decode([msg.value], [list(msg.headers)])
    except (ContractError, ValueError) as exc:
        return None, None, f"cannot decode it with the {contract.data_type} contract: {exc}"
    if decoded.errors:
        reason, message = decoded.errors[0]
        return (
            None,
            None,
            f"it does not decode with contract v{contract.version}: {reason}: {message}",
        )
    fields: dict[str, Any] = {}
    for f in contract.fields:
        column = contract.columns[f.name]
        if column.numeric:
            number = float(decoded.numeric[0, column.index])
            if math.isnan(number):
                continue
            if f.type is FieldType.INTEGER:
                fields[f.name] = int(number)
            elif f.type is FieldType.BOOLEAN:
                fields[f.name] = bool(number)
            else:
                fields[f.name] = number
        else:
            text = decoded.text[0, column.index]
            if text is not None:
                fields[f.name] = text
    record_id = f"{msg.topic}/{msg.partition}/{msg.offset}"
    if contract.id_field and contract.id_field in fields and fields[contract.id_field] != "":
        record_id = str(fields[contract.id_field])
    return fields, record_id, ""


def _raw_value(value: bytes | None) -> Any:
    if value is None:
        return None
    if value[:1] == b"{":
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            pass
    return text_or_base64(value)


def describe_input(
    topics: Topics, scored: pb.ScoredRecord, contract: Contract | None, contract_note: str
) -> InputRecord:
    """The input record at a scored record's source position, decoded when possible."""
    position = Position(scored.source_topic, scored.source_partition, scored.source_offset)
    fetched = topics.fetch(position.topic, position.partition, position.offset)
    msg = fetched.msg
    if msg is None:
        return InputRecord(position, False, fetched.note)
    record = InputRecord(
        position,
        True,
        timestamp_ms=msg.timestamp_ms,
        key=text_or_base64(msg.key),
        headers=[[name, text_or_base64(value)] for name, value in msg.headers],
    )
    if contract is None:
        record.note = f"shown undecoded: {contract_note}"
        record.raw = _raw_value(msg.value)
        return record
    fields, record_id, problem = decode_fields(contract, msg)
    if fields is None:
        record.note = problem
        record.raw = _raw_value(msg.value)
        return record
    record.fields = fields
    record.id_matches = record_id == scored.record_id
    if not record.id_matches:
        record.note = f"its id is {record_id!r}, not the scored record's {scored.record_id!r}"
    return record


def find_dead_letters(
    messages: Iterator[Msg],
    record_id: str,
    data_type: str | None,
    contracts: Contracts,
    max_matches: int,
) -> list[DeadLetterInfo]:
    """Dead letters of an id: by its source position when the id is one ("<topic>/
    <partition>/<offset>", the id of records whose contract has no id field), else by the
    id's bytes in the original value, confirmed by decoding it with the contract."""
    needle = record_id.encode()
    found: list[DeadLetterInfo] = []
    for msg in messages:
        letter_type = msg.header("waxserve.data_type") or ""
        if data_type and letter_type != data_type:
            continue
        source = _dead_letter_source(msg)
        how = ""
        confirmed = False
        if source is not None and str_position(source) == record_id:
            how, confirmed = "its source position is the record id", True
        elif msg.value is not None and needle in msg.value:
            contract, _note = contracts.get(letter_type, None) if letter_type else (None, "")
            if contract is None:
                how = "its bytes contain the id (no contract to decode them with)"
            else:
                fields, decoded_id, problem = decode_fields(contract, msg)
                if fields is not None and decoded_id != record_id:
                    continue  # another record whose bytes merely contain the id
                if fields is not None:
                    how, confirmed = f"its {contract.id_field} decodes to the id", True
                else:
                    how = f"its bytes contain the id; {problem}"
        else:
            continue
        found.append(
            DeadLetterInfo(
                position=Position(msg.topic, msg.partition, msg.offset),
                timestamp_ms=msg.timestamp_ms,
                source=source,
                data_type=letter_type,
                stage=msg.header("waxserve.stage") or "",
                reason=msg.header("waxserve.error.class") or "",
                message=msg.header("waxserve.error.message") or "",
                confirmed=confirmed,
                how=how,
            )
        )
        if len(found) >= max_matches:
            break
    return found


def str_position(p: Position) -> str:
    """ "<topic>/<partition>/<offset>": the record id of a record without an id field."""
    return f"{p.topic}/{p.partition}/{p.offset}"


def _dead_letter_source(msg: Msg) -> Position | None:
    topic = msg.header("waxserve.source.topic")
    try:
        partition = int(msg.header("waxserve.source.partition") or "")
        offset = int(msg.header("waxserve.source.offset") or "")
    except ValueError:
        return None
    return Position(topic, partition, offset) if topic is not None else None


def _lineage_position(
    scored: pb.ScoredRecord, events: EventIndex
) -> tuple[Position | None, dict[str, Any] | None, str]:
    """Where the scoring model's descriptor is: the lineage's control position, or for a
    record scored without lineage, the position of the install event of its model."""
    if scored.HasField("lineage"):
        lineage = scored.lineage
        position = Position(
            lineage.control_topic, lineage.control_partition, lineage.control_offset
        )
        return position, proto_dict(lineage), ""
    installs = [
        e
        for e in events.of_model(scored.data_type, scored.model_sha256)
        if e.kind == "installed" and e.at_ms <= scored.scored_at_ms
    ]
    note = "the scored record carries no lineage (scored by a waxserve before lineage)"
    if not installs:
        return None, None, note + ", and the events topic shows no install of its model"
    return installs[-1].position, None, note + ": the descriptor is its model's last install"


def audit(topics: Topics, query: Query) -> AuditReport:
    """Follow one record id through the topics."""
    report = AuditReport(record_id=query.record_id, found=False)
    bounds = {"since_ms": query.since_ms, "until_ms": query.until_ms}
    matches, report.more_matches, report.scanned = find_scored(
        topics.scan(query.scored_topic, **bounds),
        query.record_id,
        query.data_type,
        query.max_matches,
    )
    models = {(s.data_type, s.model_sha256) for _, s in matches}
    events = EventIndex.read(topics.scan(query.events_topic), models)
    contracts = Contracts(topics, events)
    keys: TrustedKeys | None = None
    if query.trusted_keys is not None:
        keys = TrustedKeys(query.trusted_keys)  # unreadable files are problems, not errors
        report.notes.extend(f"--trusted-keys: {p}" for p in keys.problems)
        if not keys.key_ids:
            report.notes.append(f"--trusted-keys {query.trusted_keys}: no public key there")
    descriptors: dict[tuple[str, int, int], Fetched] = {}
    for msg, scored in matches:
        report.traces.append(_trace(topics, msg, scored, events, contracts, keys, descriptors))
    report.found = bool(matches)
    if not matches:
        report.dead_letters = find_dead_letters(
            topics.scan(query.dlq_topic, **bounds),
            query.record_id,
            query.data_type,
            contracts,
            query.max_matches,
        )
    return report


def _trace(
    topics: Topics,
    msg: Msg,
    scored: pb.ScoredRecord,
    events: EventIndex,
    contracts: Contracts,
    keys: TrustedKeys | None,
    descriptors: dict[tuple[str, int, int], Fetched],
) -> Trace:
    position, lineage, lineage_note = _lineage_position(scored, events)
    model_events = events.of_model(scored.data_type, scored.model_sha256)
    descriptor = installed = None
    if position is not None:
        where = (position.topic, position.partition, position.offset)
        if where not in descriptors:
            descriptors[where] = topics.fetch(*where)
        descriptor = describe_descriptor(descriptors[where], position, scored.model_sha256, keys)
        installed = next(
            (e for e in reversed(model_events) if e.kind == "installed" and e.position == position),
            None,
        )
    contract_info = None
    contract: Contract | None = None
    contract_note = "the record carries no contract version"
    if scored.HasField("lineage") and scored.lineage.contract_version:
        version = scored.lineage.contract_version
        contract, contract_note = contracts.get(scored.data_type, version)
        contract_info = ContractInfo(
            scored.data_type,
            version,
            installed=events.contracts.get((scored.data_type, version)),
            found=contract is not None,
            note=contract_note,
        )
    else:  # decode with the newest contract: versions are compatible
        contract, contract_note = contracts.get(scored.data_type, None)
    scored_dict = proto_dict(scored)
    scored_dict.pop("lineage", None)
    return Trace(
        scored_position=Position(msg.topic, msg.partition, msg.offset),
        scored=scored_dict,
        lineage=lineage,
        lineage_note=lineage_note,
        input=describe_input(topics, scored, contract, contract_note),
        descriptor=descriptor,
        contract=contract_info,
        installed=installed,
        events=model_events,
    )


# --- the text form -----------------------------------------------------------------------


def when(ms: int | None) -> str:
    """Epoch milliseconds as UTC time."""
    if not ms:
        return "-"
    stamp = datetime.fromtimestamp(ms / 1000, UTC)
    return stamp.strftime("%Y-%m-%d %H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def _number(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _fields_line(fields: dict[str, Any]) -> str:
    shown = [f"{k}={_number(v)}" for k, v in list(fields.items())[:MAX_FIELDS_SHOWN]]
    if len(fields) > MAX_FIELDS_SHOWN:
        shown.append(f"... ({len(fields) - MAX_FIELDS_SHOWN} more)")
    return ", ".join(shown)


def _prediction_line(scored: dict[str, Any]) -> str:
    if scored.get("label"):
        line = f"label {scored['label']!r}"
        probabilities = scored.get("probabilities") or {}
        if probabilities:
            line += " (" + ", ".join(f"{k} {v:.3f}" for k, v in probabilities.items()) + ")"
        return line
    return f"value {_number(scored.get('value', 0.0))}"


def _profile_lines(profile: ProfileSummary) -> list[str]:
    rows = f"{profile.row_count:,} training rows" if profile.row_count else "rows unknown"
    lines = [f"reference profile: {rows}, {len(profile.features)} features"]
    for f in profile.features[:MAX_FIELDS_SHOWN]:
        if "categories" in f:
            lines.append(f"  {f['name']}: categories {', '.join(f['categories'])}")
        else:
            lines.append(f"  {f['name']}: mean {f['mean']:.6g}, std {f['std']:.6g}")
    if len(profile.features) > MAX_FIELDS_SHOWN:
        lines.append(f"  ... ({len(profile.features) - MAX_FIELDS_SHOWN} more)")
    for what, p in (("prediction", profile.prediction), ("label", profile.label)):
        if p is not None:
            named = what if p["name"] == what else f"{what} ({p['name']})"
            lines.append(f"  {named}: profiled")
    return lines


def _descriptor_lines(d: DescriptorInfo, lineage: dict[str, Any] | None) -> list[str]:
    if not d.found:
        return [f"descriptor at {d.position}: not readable: {d.note}"]
    sha = "matches the scored record" if d.sha256_matches else "DIFFERS from the scored record's"
    lines = [
        f"descriptor at {d.position}, published {when(d.published_ms)}",
        f"  {d.name} version {d.version} ({d.format}, {d.source}) for {d.data_type}",
        f"  sha256 {d.sha256}: {sha}",
    ]
    if d.contract_version:
        lines.append(f"  trained against contract v{d.contract_version}")
    if d.signer_key_id:
        lines.append(f"  signed by key {d.signer_key_id}")
    else:
        lines.append("  not signed")
    if d.signature == "not_checked":
        lines.append(f"  signature: not checked here ({d.signature_message})")
    else:
        lines.append(f"  signature here: {d.signature}: {d.signature_message}")
    if lineage is not None:
        status = lineage.get("signature_status") or "-"
        signer = lineage.get("signer_key_id") or "none"
        lines.append(f"  signature at scoring time: {status} (signer {signer})")
    if d.golden_set is not None:
        g = d.golden_set
        lines.append(
            f"  golden set: {g['inputs']} inputs, {g['expected']} expected outputs, "
            f"tolerance {g['tolerance']:g}" + (f", by {g['evaluator']}" if g["evaluator"] else "")
        )
    if d.profile is not None:
        lines += ["  " + line for line in _profile_lines(d.profile)]
    else:
        lines.append("  no reference profile")
    return lines


def format_report(report: AuditReport) -> str:
    """The report as text for a terminal."""
    out: list[str] = []
    if report.found:
        more = f" (and {report.more_matches} more)" if report.more_matches else ""
        out.append(
            f"record {report.record_id!r}: scored {len(report.traces)} time(s){more} "
            f"({report.scanned:,} scored messages read)"
        )
    else:
        out.append(
            f"record {report.record_id!r}: no scored record ({report.scanned:,} scored "
            "messages read)"
        )
    out += [f"note: {n}" for n in report.notes]
    for i, t in enumerate(report.traces, 1):
        s = t.scored
        out.append("")
        out.append(
            f"[{i}] scored at {t.scored_position}, {when(int(s.get('scored_at_ms', 0)))} "
            f"by {s.get('scored_by') or '-'}"
        )
        out.append(
            f"    {_prediction_line(s)} by {s.get('model_name')}:{s.get('model_version')} "
            f"(batch of {s.get('batch_size')}, {s.get('scoring_latency_us', 0):.3g} µs/record)"
        )
        inp = t.input
        out.append(
            f"    input at {inp.position}"
            + (f", produced {when(inp.timestamp_ms)}" if inp.found else "")
        )
        if inp.fields is not None:
            out.append(f"      {_fields_line(inp.fields)}")
        elif inp.raw is not None:
            raw = orjson.dumps(inp.raw).decode()
            out.append(f"      {raw[:300]}{'...' if len(raw) > 300 else ''}")
        if inp.note:
            out.append(f"      ({inp.note})")
        if t.lineage is not None:
            lin = t.lineage
            out.append(
                f"    lineage: decision {lin.get('decision') or '-'}, contract "
                f"v{lin.get('contract_version', 0)}, descriptor at "
                f"{lin.get('control_topic')} [{lin.get('control_partition', 0)}] @ "
                f"{lin.get('control_offset', 0)}"
            )
        if t.lineage_note:
            out.append(f"    {t.lineage_note}")
        if t.contract is not None:
            c = t.contract
            where = (
                f" (at {c.installed.position}, installed {when(c.installed.at_ms)})"
                if c.installed
                else ""
            )
            out.append(
                f"    contract: {c.data_type} v{c.version}{where}"
                + (f": {c.note}" if c.note else "")
            )
        if t.descriptor is not None:
            out += ["    " + line for line in _descriptor_lines(t.descriptor, t.lineage)]
        if t.installed is not None:
            e = t.installed
            out.append(f"    installed {when(e.at_ms)}" + (f": {e.gate}" if e.gate else ""))
        if t.events:
            out.append("    events of this model:")
            for e in t.events:
                detail = ": ".join(x for x in (e.reason, e.message) if x)
                out.append(
                    f"      {when(e.at_ms)} {e.kind} (descriptor at {e.position})"
                    + (f": {detail}" if detail else "")
                )
    if not report.found:
        if report.dead_letters:
            out.append("")
            out.append("it was dead-lettered:")
            for d in report.dead_letters:
                sure = "" if d.confirmed else " (possibly: " + d.how + ")"
                source = f" from {d.source}" if d.source else ""
                out.append(
                    f"  {d.position}{source}, {when(d.timestamp_ms)}: {d.stage}/{d.reason}: "
                    f"{d.message}{sure}"
                )
        else:
            out.append("no dead letter has it either: was it ever sent, or is it past retention?")
    return "\n".join(out)


# --- Kafka -------------------------------------------------------------------------------


class KafkaTopics:
    """`Topics` on a Kafka cluster: one consumer, assigned (never a group member).

    Scans read each partition to its end (the end-of-partition event), so a live topic's
    newest messages are included; `idle_timeout_s` without any message ends a scan early,
    with a note. Progress goes to stderr on scans of `PROGRESS_MIN_MESSAGES` or more when
    it is a terminal.
    """

    def __init__(self, config: Config, *, idle_timeout_s: float = 30.0, progress: bool = True):
        self._config = config
        self._idle_timeout_s = idle_timeout_s
        self._progress = progress
        self._consumer = Consumer(
            kafka_settings(
                config,
                **{
                    "group.id": f"waxserve-audit-{os.getpid()}",
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    "enable.partition.eof": True,
                    "fetch.wait.max.ms": 100,
                },
            )
        )
        self._partitions: dict[str, list[int]] | None = None
        self.notes: list[str] = []

    def close(self) -> None:
        """Close the consumer."""
        self._consumer.close()

    def partitions(self, topic: str) -> list[int] | None:
        """A topic's partitions; None when it does not exist. Asks for every topic once:
        a metadata request that names a topic can create it on some brokers."""
        if self._partitions is None:
            try:
                metadata = self._consumer.list_topics(timeout=METADATA_TIMEOUT_S)
            except KafkaException as exc:
                raise CliError(f"cannot reach {self._config.brokers}: {exc}") from None
            self._partitions = {
                name: sorted(info.partitions)
                for name, info in metadata.topics.items()
                if info.error is None
            }
        return self._partitions.get(topic)

    def _watermarks(self, topic: str, partition: int) -> tuple[int, int]:
        low, high = self._consumer.get_watermark_offsets(
            TopicPartition(topic, partition), timeout=METADATA_TIMEOUT_S
        )
        return int(low), int(high)

    def _starts(self, topic: str, partitions: list[int], since_ms: int | None) -> dict[int, int]:
        if since_ms is None:
            return {p: OFFSET_BEGINNING for p in partitions}
        asked = [TopicPartition(topic, p, since_ms) for p in partitions]
        found = self._consumer.offsets_for_times(asked, timeout=METADATA_TIMEOUT_S)
        # -1: no message at or after since_ms in that partition.
        return {tp.partition: tp.offset for tp in found if tp.offset >= 0}

    def scan(
        self, topic: str, *, since_ms: int | None = None, until_ms: int | None = None
    ) -> Iterator[Msg]:
        """Every message of `topic` within the bounds, read to the end of each partition."""
        partitions = self.partitions(topic)
        if partitions is None:
            self.notes.append(f"topic {topic!r} does not exist on {self._config.brokers}")
            return
        starts = self._starts(topic, partitions, since_ms)
        if not starts:
            return
        total = 0
        for p, start in starts.items():
            low, high = self._watermarks(topic, p)
            total += max(0, high - (low if start < 0 else max(low, start)))
        consumer = self._consumer
        consumer.assign([TopicPartition(topic, p, o) for p, o in starts.items()])
        done: set[int] = set()
        bar = tqdm(
            total=total,
            unit="msg",
            desc=f"reading {topic}",
            file=sys.stderr,
            leave=False,
            disable=None if self._progress and total >= PROGRESS_MIN_MESSAGES else True,
        )
        last_message = time.monotonic()
        try:
            while len(done) < len(starts):
                if time.monotonic() - last_message > self._idle_timeout_s:
                    missing = sorted(set(starts) - done)
                    self.notes.append(
                        f"{topic}: partitions {missing} not read to their end: nothing "
                        f"arrived for {self._idle_timeout_s:g} s"
                    )
                    return
                for raw in consumer.consume(num_messages=1000, timeout=0.5):
                    last_message = time.monotonic()
                    partition = raw.partition() or 0
                    err = raw.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            done.add(partition)
                        elif err.fatal() or not err.retriable():
                            raise CliError(f"reading {topic} [{partition}]: {err.str()}")
                        continue
                    if partition in done:
                        continue
                    bar.update(1)
                    msg = _msg(raw)
                    if until_ms is not None and (msg.timestamp_ms or 0) > until_ms:
                        done.add(partition)
                        consumer.pause([TopicPartition(topic, partition)])
                        continue
                    yield msg
        finally:
            bar.close()
            consumer.unassign()

    def fetch(self, topic: str, partition: int, offset: int) -> Fetched:
        """The message at one position, or why it cannot be read."""
        where = f"{topic} [{partition}] @ {offset}"
        partitions = self.partitions(topic)
        if partitions is None:
            return Fetched(None, f"topic {topic!r} does not exist")
        if partition not in partitions:
            return Fetched(None, f"{topic} has no partition {partition}")
        low, _high = self._watermarks(topic, partition)
        if offset < low:
            return Fetched(None, f"{where} is gone: the partition now starts at {low} (retention)")
        consumer = self._consumer
        consumer.assign([TopicPartition(topic, partition, offset)])
        deadline = time.monotonic() + self._idle_timeout_s
        try:
            while time.monotonic() < deadline:
                for raw in consumer.consume(num_messages=1, timeout=0.5):
                    err = raw.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            return Fetched(None, f"{where} is beyond the partition's end")
                        if err.fatal() or not err.retriable():
                            return Fetched(None, f"{where}: {err.str()}")
                        continue
                    got = raw.offset() or 0
                    if got == offset:
                        return Fetched(_msg(raw))
                    if got > offset:
                        return Fetched(
                            None,
                            f"{where} is gone (compacted away, e.g. by a newer message with "
                            f"the same key; the next one is at {got})",
                        )
            return Fetched(None, f"{where}: no answer within {self._idle_timeout_s:g} s")
        finally:
            consumer.unassign()


def _msg(raw: Any) -> Msg:
    ts_type, ts = raw.timestamp()
    headers = raw.headers() or []
    pairs = list(headers.items()) if isinstance(headers, dict) else headers
    return Msg(
        topic=raw.topic() or "",
        partition=raw.partition() or 0,
        offset=raw.offset() or 0,
        timestamp_ms=None if ts_type == TIMESTAMP_NOT_AVAILABLE else ts,
        key=raw.key(),
        value=raw.value(),
        headers=[(str(k), v.encode() if isinstance(v, str) else v) for k, v in pairs],
    )


# --- command line ------------------------------------------------------------------------

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)$")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_time(text: str, now_ms: int | None = None) -> int:
    """A time bound as epoch milliseconds: "15m", "2h", "1d" (that long ago), epoch
    milliseconds, or an ISO 8601 time (local time unless it names a zone)."""
    text = text.strip()
    now = int(time.time() * 1000) if now_ms is None else now_ms
    relative = _RELATIVE.match(text)
    if relative:
        return now - int(float(relative.group(1)) * _UNIT_MS[relative.group(2)])
    if text.isdigit():
        return int(text)
    try:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r}: use 15m, 2h or 1d ago, epoch milliseconds, or an ISO 8601 time"
        ) from None
    return int(stamp.astimezone().timestamp() * 1000)


def run_audit(
    config: Config,
    record_id: str,
    *,
    data_type: str | None = None,
    since: str | None = None,
    until: str | None = None,
    trusted_keys: Path | None = None,
    as_json: bool = False,
    max_matches: int = DEFAULT_MAX_MATCHES,
    timeout_s: float = 30.0,
) -> int:
    """`waxserve audit`: print the report; EXIT_FOUND or EXIT_NOT_FOUND."""
    try:
        since_ms = parse_time(since) if since else None
        until_ms = parse_time(until) if until else None
    except ValueError as exc:
        raise CliError(f"--since/--until {exc}") from None
    if trusted_keys is not None and not trusted_keys.is_dir():
        raise CliError(f"--trusted-keys {trusted_keys}: not a directory")
    query = Query(
        record_id=record_id,
        scored_topic=config.scored_topic,
        control_topic=config.control_topic,
        events_topic=config.events_topic,
        dlq_topic=config.dlq_topic,
        data_type=data_type,
        since_ms=since_ms,
        until_ms=until_ms,
        trusted_keys=trusted_keys,
        max_matches=max_matches,
    )
    topics = KafkaTopics(config, idle_timeout_s=timeout_s)
    try:
        if topics.partitions(config.scored_topic) is None:
            raise CliError(
                f"the scored topic {config.scored_topic!r} does not exist on {config.brokers}"
            )
        report = audit(topics, query)
    finally:
        topics.close()
    report.notes.extend(topics.notes)
    if as_json:
        sys.stdout.write(orjson.dumps(report.to_json()).decode() + "\n")
    else:
        sys.stdout.write(format_report(report) + "\n")
    return EXIT_FOUND if report.found else EXIT_NOT_FOUND
