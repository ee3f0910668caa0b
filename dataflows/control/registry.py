"""The registry: per data type, which contract and which model are installed.

Everything on the control topic comes through here, in topic order: a `DataContract` is
checked (on its own, by building its codecs, and against the installed contract and the
serving model) and installed; a `ModelDescriptor` is checked by a list of checks, loaded
off the scoring path, bound to the data type's contract and installed. Installs go to
every shard of the data type; rejections become dead letters and model events.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import os
import stat
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
from google.protobuf.message import DecodeError

from dataflows.contracts.decode import ContractCodecs
from dataflows.contracts.schema import Contract, ContractError, check_compatible
from dataflows.control.gate import (
    DEFAULT_MAX_LATENCY_US,
    GateReport,
    golden_rows,
    reference_rows,
    run_gate,
)
from dataflows.control.signing import (
    SignaturePolicy,
    SignatureStatus,
    TrustedKeys,
    Verdict,
    verify,
)
from dataflows.core.descriptors import FORMAT_NAMES, sha256_hex
from dataflows.core.events import (
    NO_EVENTS,
    ContractInstalled,
    ControlRejected,
    EventBus,
    ModelInstalled,
    PlanChanged,
)
from dataflows.core.reasons import Reason, Stage
from dataflows.core.records import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_DATA_TYPE_LENGTH,
    DeadLetter,
    SourceBatch,
    valid_data_type,
)
from dataflows.monitoring.windows import DriftReference, ModelIdentity, OutputReference
from dataflows.rollout.plans import PlanBook, PlanError, ServingPlan, activate, model_key
from dataflows.rollout.plans import apply as apply_plan
from dataflows.runtimes import ModelError, ModelFeature, ModelRuntime, load_runtime
from protos import waxserve_pb2 as pb

log = logging.getLogger(__name__)

Clock = Callable[[], float]
"""Seconds since the epoch; injectable so tests control time."""

MAX_NAME_LENGTH = 256
"""Longest model name or version: each is in every scored record, stat and event."""
MAX_DESCRIPTION_LENGTH = 4096
"""Longest model description: it is in every stats message."""
MAX_EVENT_TEXT = 2048
"""Longest message an event carries (the rest of a long error is in the logs)."""
DEFAULT_MAX_MODEL_BYTES = 256 << 20
DEFAULT_MAX_DATA_TYPES = 1000


# --- what the registry sends to shards ---------------------------------------------------


@dataclass(frozen=True)
class Provenance:
    """Where an installed model came from: its descriptor's control-topic position, who
    signed it, and what the quality gate found."""

    topic: str
    partition: int
    offset: int
    signer_key_id: str = ""
    signature_status: str = ""
    gate: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """A validated model bound to its data type's contract: everything shards need except
    the bytes."""

    identity: ModelIdentity
    features: tuple[ModelFeature, ...]  # the runtime's features, in its order
    input_fields: tuple[str, ...]  # the contract field that feeds each feature
    reference: DriftReference | None
    created_at_ms: int
    declared_inputs: tuple[str, ...] = ()  # the descriptor's input_features, as loaded
    contract_version: int = 0
    provenance: Provenance | None = None

    @property
    def lineage(self) -> pb.Lineage:
        """What every record this model scores says of where the model came from."""
        lineage = pb.Lineage(contract_version=self.contract_version, decision="active")
        if self.provenance is not None:
            lineage.control_topic = self.provenance.topic
            lineage.control_partition = self.provenance.partition
            lineage.control_offset = self.provenance.offset
            lineage.signer_key_id = self.provenance.signer_key_id
            lineage.signature_status = self.provenance.signature_status
        return lineage

    @property
    def runtime_key(self) -> str:
        """Key of the loaded runtime in the process cache."""
        return runtime_key(self.identity.sha256, self.declared_inputs)

    def __deepcopy__(self, memo: dict[int, Any]) -> ModelSpec:
        return self  # immutable


@dataclass(frozen=True)
class ModelInstall:
    """The registry's word to every shard of a data type: load this model and serve by
    `plan` from now on (None: this model alone); `staged`: load it, the plan stays."""

    spec: ModelSpec
    model_bytes: bytes
    restored: bool = False  # re-sent after a resume, not a new model
    plan: ServingPlan | None = None
    staged: bool = False


@dataclass(frozen=True)
class PlanInstall:
    """The registry's word to every shard of a data type: serve by this plan from now on,
    with these models (every model the plan names, with its bytes: a shard loads what it
    has not loaded yet, and applies the plan once all have loaded)."""

    data_type: str
    plan: ServingPlan
    models: tuple[ModelInstall, ...]
    restored: bool = False


@dataclass(frozen=True)
class ContractInstall:
    """The registry's word to every shard of a data type: decode with this contract."""

    contract: Contract
    restored: bool = False


Install = ContractInstall | ModelInstall | PlanInstall


# --- what the registry reads --------------------------------------------------------------


@dataclass(frozen=True)
class ControlIn:
    """A control-topic message, decoded, with where it came from."""

    body: pb.ModelDescriptor | pb.DataContract | pb.PlanCommand
    topic: str
    partition: int
    offset: int
    key: bytes | None
    raw: bytes

    @property
    def data_type(self) -> str:
        """The data type the message is for."""
        return self.body.data_type

    @property
    def stage(self) -> Stage:
        """Which kind of control message it is, as dead letters say it."""
        if isinstance(self.body, pb.PlanCommand):
            return Stage.PLAN
        return Stage.MODEL if isinstance(self.body, pb.ModelDescriptor) else Stage.CONTRACT

    def dead_letter(self, reason: str, message: str) -> DeadLetter:
        """Dead letter for this message, as it arrived."""
        return DeadLetter(
            stage=self.stage,
            reason=reason,
            message=message,
            topic=self.topic,
            partition=self.partition,
            offset=self.offset,
            key=self.key,
            value=self.raw,
            data_type=self.data_type,
        )


def decode_control(batch: SourceBatch) -> list[ControlIn | DeadLetter]:
    """Control-topic messages as descriptors and contracts; undecodable ones as dead letters."""
    out: list[ControlIn | DeadLetter] = []
    for i, value in enumerate(batch.values):
        try:
            if value is None:
                raise DecodeError("message has no value (a tombstone)")
            message = pb.ControlMessage.FromString(value)
            which = message.WhichOneof("body")
            if which is None:
                raise DecodeError("a ControlMessage with no model, contract or plan command")
        except DecodeError as exc:
            out.append(
                batch.dead_letter(i, Stage.DECODE, Reason.UNDECODABLE, f"control message: {exc}")
            )
            continue
        body: pb.ModelDescriptor | pb.DataContract | pb.PlanCommand = getattr(message, which)
        if not valid_data_type(body.data_type):
            # The data type keys the registry and the events: it must be a usable name.
            problem = (
                f"data_type is {len(body.data_type)} characters, more than {MAX_DATA_TYPE_LENGTH}"
                if body.data_type
                else "has no data_type"
            )
            out.append(
                batch.dead_letter(
                    i,
                    which,
                    {"contract": Reason.BAD_CONTRACT, "plan": Reason.BAD_PLAN}.get(
                        which, Reason.BAD_DESCRIPTOR
                    ),
                    f"{which} {problem}",
                )
            )
            continue
        out.append(
            ControlIn(body, batch.topic, batch.partition, batch.offsets[i], batch.keys[i], value)
        )
    return out


# --- loaded runtimes -----------------------------------------------------------------------


def runtime_key(sha256: str, declared_inputs: Iterable[str]) -> str:
    """Cache key of a runtime: the same bytes with other declared inputs are another model."""
    return sha256 + "|" + ",".join(declared_inputs)


@dataclass(frozen=True)
class RestoredInstall:
    """A plan and its models' loads, as a shard took them (`RuntimeCache.note_restored`)."""

    plan: ServingPlan
    specs: dict[str, ModelSpec]
    runtimes: dict[str, Future[ModelRuntime]]


class RuntimeCache:
    """Loaded runtimes of this process, by model digest and declared inputs: each model
    loads once per process.

    Shards share the session (onnxruntime and our PMML runtime are safe to call from
    several worker threads). Evicted runtimes are not closed: a shard may still hold one;
    garbage collection frees it when the last holder lets go.
    """

    def __init__(self, capacity: int = 16) -> None:
        self._capacity = capacity
        self._runtimes: OrderedDict[str, ModelRuntime] = OrderedDict()
        self._restored: dict[str, RestoredInstall] = {}
        self._lock = threading.Lock()

    def clear(self) -> None:
        """Forget every loaded runtime (as a new process would start)."""
        with self._lock:
            self._runtimes.clear()
            self._restored.clear()

    def note_restored(self, data_type: str, restored: RestoredInstall) -> None:
        """A shard of this process was sent what the registry re-sends after a resume (the
        data type's plan and models: `ModelInstall.restored`, `PlanInstall.restored`),
        loading or loaded as `restored`'s futures.

        Bytewax can hand that install to a shard logic it builds fresh and then replace the
        logic with the one restored from the shard's snapshot, which never sees the install
        (seen in tests/test_integration.py, kill -9 of a two-process cluster: the restored
        shard held its records for a model that had come, until they were no_model dead
        letters). The restored shard takes the model up from here (`restored_model`)."""
        with self._lock:
            self._restored[data_type] = restored

    def restored_model(self, data_type: str) -> RestoredInstall | None:
        """What was last re-sent to this process's shards of `data_type` after a resume."""
        with self._lock:
            return self._restored.get(data_type)

    def get(self, key: str) -> ModelRuntime | None:
        """The loaded runtime for this key, if this process has one."""
        with self._lock:
            runtime = self._runtimes.get(key)
            if runtime is not None:
                self._runtimes.move_to_end(key)
            return runtime

    def load(
        self,
        sha256: str,
        model_format: int,
        model_bytes: bytes,
        declared_inputs: tuple[str, ...],
        onnx_threads: int = 1,
    ) -> ModelRuntime:
        """The runtime for these bytes and inputs, loading it if this process has not yet."""
        key = runtime_key(sha256, declared_inputs)
        runtime = self.get(key)
        if runtime is not None:
            return runtime
        # Load outside the lock: a big model must not stall other workers' lookups.
        runtime = load_runtime(
            model_format, model_bytes, list(declared_inputs), onnx_threads=onnx_threads
        )
        with self._lock:
            self._runtimes.setdefault(key, runtime)
            self._runtimes.move_to_end(key)
            while len(self._runtimes) > self._capacity:
                self._runtimes.popitem(last=False)
            return self._runtimes[key]


RUNTIMES = RuntimeCache()
"""The process-wide runtime cache."""


class CodecCache:
    """Codecs of this process, one set per contract (data type and version): the newest
    `versions_kept` versions of each data type (an older one is built again if needed),
    so a data type republished a million times does not keep a million codecs."""

    def __init__(
        self, schema_resolver: Callable[[int], str] | None = None, versions_kept: int = 4
    ) -> None:
        self._codecs: dict[tuple[str, int], ContractCodecs] = {}
        self._lock = threading.Lock()
        self._resolver = schema_resolver
        self._versions_kept = versions_kept

    def use_schema_registry(self, resolver: Callable[[int], str] | None) -> None:
        """Resolve Avro schema ids that no contract names with this (a schema registry)."""
        with self._lock:
            self._resolver = resolver
            self._codecs.clear()

    def get(self, contract: Contract) -> ContractCodecs:
        """The codecs of this contract, built on first use."""
        with self._lock:
            codecs = self._codecs.get(contract.key)
            if codecs is None or codecs.contract != contract:
                codecs = ContractCodecs(contract, schema_resolver=self._resolver)
                self._codecs[contract.key] = codecs
                mine = [key for key in self._codecs if key[0] == contract.data_type]
                for old in sorted(mine, key=lambda k: k[1])[: -self._versions_kept]:
                    del self._codecs[old]
            return codecs


CODECS = CodecCache()
"""The process-wide codec cache."""


class DataTypeTable:
    """The data types this process holds state for, and who holds each one.

    Bytewax makes a state per key, and every key of the registry and of the shards names a
    data type, which comes off the wire: without a bound, each new name is state (and
    metric series) kept forever. A holder (a Registry, a ShardScorer) asks to `admit` a
    data type before it keeps anything for it, and `release`s it when it keeps nothing
    more. Holders are weakly referenced, so one that is dropped without a release (an
    aborted run) does not keep its data types counted. Thread-safe: one table serves every
    worker of the process.
    """

    def __init__(self) -> None:
        self._holders: dict[str, weakref.WeakSet[Any]] = {}
        self._lock = threading.Lock()

    def admit(self, data_type: str, holder: Any, limit: int | None) -> bool:
        """Count `holder` as holding `data_type`; False (and nothing counted) when it is a
        new data type and `limit` data types are held already (None: no limit)."""
        with self._lock:
            holders = self._holders.get(data_type)
            if holders is None or not holders:
                if limit is not None and self._count() >= limit:
                    return False
                holders = self._holders[data_type] = weakref.WeakSet()
            holders.add(holder)
            return True

    def release(self, data_type: str, holder: Any) -> None:
        """`holder` keeps nothing more for `data_type`."""
        with self._lock:
            holders = self._holders.get(data_type)
            if holders is not None:
                holders.discard(holder)
                if not holders:
                    del self._holders[data_type]

    def _count(self) -> int:
        for data_type in [d for d, holders in self._holders.items() if not holders]:
            del self._holders[data_type]  # every holder was dropped without a release
        return len(self._holders)

    def __len__(self) -> int:
        with self._lock:
            return self._count()

    def __contains__(self, data_type: object) -> bool:
        with self._lock:
            return bool(self._holders.get(data_type))  # type: ignore[call-overload]


REGISTRY_DATA_TYPES = DataTypeTable()
"""Data types whose registry holds something in this process (a contract, a model, a
control message going through)."""

SHARD_DATA_TYPES = DataTypeTable()
"""Data types whose shards hold something in this process (a contract or held records).
Counted apart from the registries: records of made-up data types must not use up the room
of contracts still to come."""


# --- checking a descriptor: a list of checks --------------------------------------------


@dataclass
class Candidate:
    """A descriptor going through the checks; each check reads and fills in fields."""

    descriptor: pb.ModelDescriptor
    model_dir: str
    onnx_threads: int
    cache: RuntimeCache
    model_bytes: bytes = b""
    digest: str = ""
    runtime: ModelRuntime | None = None
    contract: Contract | None = None
    input_fields: tuple[str, ...] = ()
    reference: DriftReference | None = None
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    signature_policy: SignaturePolicy = SignaturePolicy.OFF
    trusted_keys: TrustedKeys | None = None
    gate_max_latency_us: float = DEFAULT_MAX_LATENCY_US
    verdict: Verdict | None = None
    gate: GateReport | None = None
    gate_note: str = ""


Check = Callable[[Candidate], None]


def check_identity(c: Candidate) -> None:
    """The descriptor names its model, version, data type and a known format, each short
    enough for the messages that carry them."""
    for name in ("name", "version", "data_type"):
        if not getattr(c.descriptor, name):
            raise ModelError(Reason.BAD_DESCRIPTOR, f"descriptor has no {name}")
    for name, limit in (
        ("name", MAX_NAME_LENGTH),
        ("version", MAX_NAME_LENGTH),
        ("description", MAX_DESCRIPTION_LENGTH),
    ):
        length = len(getattr(c.descriptor, name))
        if length > limit:
            raise ModelError(
                Reason.BAD_DESCRIPTOR,
                f"descriptor {name} is {length} characters, more than {limit}",
            )
    if c.descriptor.format not in FORMAT_NAMES:
        raise ModelError(Reason.UNSUPPORTED_MODEL, f"unknown model format {c.descriptor.format}")


SIGNATURE_REASONS = {
    SignatureStatus.UNSIGNED: Reason.UNSIGNED,
    SignatureStatus.UNKNOWN_KEY: Reason.UNKNOWN_KEY,
    SignatureStatus.BAD_SIGNATURE: Reason.BAD_SIGNATURE,
}


def check_signature(c: Candidate) -> None:
    """The descriptor's signature, under the dataflow's policy: a finding the policy does
    not accept rejects the model before its bytes are read (dataflows/control/signing.py)."""
    keys = c.trusted_keys if c.trusted_keys is not None else TrustedKeys(None)
    c.verdict = verify(c.descriptor, keys, c.signature_policy)
    if not c.verdict.accepted:
        raise ModelError(SIGNATURE_REASONS[c.verdict.status], c.verdict.message)
    if c.verdict.status in SIGNATURE_REASONS:  # accepted under "warn"
        log.warning(
            "model %s:%s for %s: %s (signature policy warn: installing it anyway)",
            c.descriptor.name[:MAX_NAME_LENGTH],
            c.descriptor.version[:MAX_NAME_LENGTH],
            c.descriptor.data_type[:MAX_DATA_TYPE_LENGTH],
            c.verdict.message,
        )


def read_model_bytes(
    descriptor: pb.ModelDescriptor, model_dir: str, max_bytes: int = DEFAULT_MAX_MODEL_BYTES
) -> bytes:
    """The model bytes of a descriptor: inline, or read from an allowed file:// location
    (no larger than `max_bytes`: ModelError("model_too_large"), and the file unread)."""
    which = descriptor.WhichOneof("source")
    if which == "model_bytes":
        if len(descriptor.model_bytes) > max_bytes:
            raise ModelError(
                Reason.MODEL_TOO_LARGE, _too_large("model", descriptor.model_bytes, max_bytes)
            )
        return descriptor.model_bytes
    if which != "location":
        raise ModelError(Reason.NO_MODEL, "descriptor has neither model_bytes nor location")
    url = urlparse(descriptor.location)
    if url.scheme != "file" or url.netloc not in ("", "localhost"):
        raise ModelError(
            Reason.LOCATION_REJECTED,
            f"location {descriptor.location!r}: only file:// locations are supported",
        )
    if not model_dir:
        raise ModelError(
            Reason.LOCATION_REJECTED,
            f"location {descriptor.location!r}: no model directory is allowed "
            "(set WAXSERVE_MODEL_DIR)",
        )
    allowed = Path(model_dir).resolve()
    path = Path(unquote(url.path)).resolve()
    if not path.is_relative_to(allowed):
        raise ModelError(
            Reason.LOCATION_REJECTED,
            f"location {descriptor.location!r} is outside the allowed model directory {allowed}",
        )
    try:
        # Non-blocking: opening a FIFO must not hang the loader. The checks are on what was
        # opened (the name may be swapped meanwhile), and never more than the limit is read.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ModelError(Reason.LOCATION_UNREADABLE, f"{path} is not a regular file")
            if info.st_size > max_bytes:
                raise ModelError(
                    Reason.MODEL_TOO_LARGE,
                    f"{path} is {info.st_size:,} bytes, more than max_model_bytes ({max_bytes:,})",
                )
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise ModelError(Reason.LOCATION_UNREADABLE, f"{path}: {exc.strerror}") from None
    if len(data) > max_bytes:  # it grew while being read
        raise ModelError(
            Reason.MODEL_TOO_LARGE, f"{path} is more than max_model_bytes ({max_bytes:,})"
        )
    return data


def _too_large(what: str, data: bytes, limit: int = DEFAULT_MAX_MODEL_BYTES) -> str:
    return f"{what} is {len(data):,} bytes, more than max_model_bytes ({limit:,})"


def check_bytes(c: Candidate) -> None:
    """The model bytes are there and their SHA-256 is the descriptor's."""
    c.model_bytes = read_model_bytes(c.descriptor, c.model_dir, c.max_model_bytes)
    c.digest = sha256_hex(c.model_bytes)
    if c.digest != c.descriptor.sha256.lower():
        raise ModelError(
            Reason.DIGEST_MISMATCH,
            f"sha256 of the model bytes is {c.digest}, the descriptor says {c.descriptor.sha256!r}",
        )


def check_loads(c: Candidate) -> None:
    """The runtime loads the model (cached per process)."""
    c.runtime = c.cache.load(
        c.digest,
        c.descriptor.format,
        c.model_bytes,
        tuple(c.descriptor.input_features),
        c.onnx_threads,
    )


def check_outputs(c: Candidate) -> None:
    """A scored record of the model fits an output message with room to spare: every
    scored record carries the class labels (with their probabilities)."""
    assert c.runtime is not None
    labels = c.runtime.class_labels
    size = sum(len(label.encode("utf-8", "replace")) + 16 for label in labels)
    if size > c.max_message_bytes // 4:
        raise ModelError(
            Reason.UNSUPPORTED_MODEL,
            f"the model's {len(labels)} class labels take {size:,} bytes in every scored "
            f"record, more than a quarter of max_message_bytes ({c.max_message_bytes:,})",
        )


def contract_feeds(descriptor: pb.ModelDescriptor, contract: Contract | None) -> bool:
    """Whether `contract` is the version the model was trained against or a later
    (compatible) one; a model that has none waits for one (`awaiting_contract`)."""
    return contract is not None and descriptor.contract_version <= contract.version


def bind_inputs(
    features: Sequence[ModelFeature], contract: Contract, what: str = "model"
) -> tuple[str, ...]:
    """The contract field that feeds each model feature; ModelError when one has none, or
    one of the wrong kind."""
    fields = []
    for feature in features:
        found = contract.field_for(feature.name)
        if found is None:
            names = ", ".join(f.name for f in contract.feature_fields)
            raise ModelError(
                Reason.BAD_INPUTS,
                f"{what} input {feature.name!r} matches no feature field of contract "
                f"{contract.data_type} v{contract.version} ({names})",
            )
        if found.type.numeric != (feature.kind == "numeric"):
            raise ModelError(
                Reason.BAD_INPUTS,
                f"{what} input {feature.name!r} is {feature.kind}, but field {found.name!r} "
                f"of contract {contract.data_type} v{contract.version} is {found.type}",
            )
        fields.append(found.name)
    return tuple(fields)


def check_inputs(c: Candidate) -> None:
    """Every model input is fed by a contract field of its kind."""
    assert c.runtime is not None and c.contract is not None
    c.input_fields = bind_inputs(c.runtime.features, c.contract)


def check_profile(c: Candidate) -> None:
    """The reference profile, if any, is usable; its features are contract fields."""
    assert c.contract is not None
    if c.descriptor.HasField("reference_profile"):
        c.reference = drift_reference(
            c.descriptor.reference_profile, c.contract, c.max_message_bytes
        )


def check_gate(c: Candidate) -> None:
    """The quality gate (dataflows/control/gate.py): the golden set, or without one rows
    from the reference profile, must score validly, within tolerance and in time."""
    assert c.runtime is not None
    descriptor = c.descriptor
    if descriptor.HasField("golden_set"):
        golden = descriptor.golden_set
        rows = golden_rows(golden, c.runtime, c.input_fields)
        c.gate = run_gate(
            c.runtime,
            rows,
            golden.expected,
            tolerance=golden.tolerance or 1e-6,
            max_latency_us=golden.max_latency_us or c.gate_max_latency_us,
        )
    elif descriptor.HasField("reference_profile"):
        profile_rows = reference_rows(descriptor.reference_profile, c.runtime, c.input_fields)
        if profile_rows is None:
            c.gate_note = "quality gate: not run (the profile lacks some of the model's inputs)"
            return
        c.gate = run_gate(c.runtime, profile_rows, max_latency_us=c.gate_max_latency_us)
    else:
        c.gate_note = "quality gate: not run (no golden set, no reference profile)"
        return
    c.gate_note = c.gate.summary()


LOAD_CHECKS: tuple[Check, ...] = (
    check_identity,
    check_signature,
    check_bytes,
    check_loads,
    check_outputs,
)
"""Checks that need no contract: they run off the scoring path, in a loader thread."""

BIND_CHECKS: tuple[Check, ...] = (check_inputs, check_profile, check_gate)
"""Checks against the data type's contract as it is at the descriptor's turn."""


def drift_reference(
    profile: pb.ReferenceProfile,
    contract: Contract,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> DriftReference | None:
    """Drift reference from a profile, over its features that are contract fields of the
    same kind (numeric bins for numeric fields, categories for string fields), its
    prediction profile, and its label profile when that is the contract's label field.

    Every number must be finite (a NaN mean would make every drift metric NaN), and the
    drift message of a window must fit in half of `max_message_bytes`.
    """
    names, edges, expected, means, stds = [], [], [], [], []
    text_names, categories, text_expected = [], [], []
    size = 0  # of a drift message over this reference, roughly: bins are varints
    for feature in profile.features:
        found = contract.field_for(feature.name)
        if found is None:
            continue
        fractions = np.asarray(feature.expected_fractions, dtype=np.float64)
        if not (np.isfinite(fractions).all() and (fractions >= 0).all()):
            raise ModelError(
                Reason.BAD_PROFILE,
                f"reference profile of {feature.name!r}: expected_fractions must be finite "
                "and >= 0",
            )
        size += len(feature.name.encode()) + 64 + 11 * (len(fractions) + 1)
        if feature.categories:
            if found.type.numeric:
                continue
            if len(fractions) != len(feature.categories):
                raise ModelError(
                    Reason.BAD_PROFILE,
                    f"reference profile of {feature.name!r}: {len(feature.categories)} "
                    f"categories but {len(fractions)} expected_fractions",
                )
            text_names.append(found.name)
            categories.append(tuple(feature.categories))
            text_expected.append(np.append(fractions, 0.0))  # unseen: never in training
            continue
        if not found.type.numeric:
            continue
        edge = np.asarray(feature.bin_edges, dtype=np.float64)
        if not (np.isfinite(edge).all() and math.isfinite(feature.mean)):
            raise ModelError(
                Reason.BAD_PROFILE,
                f"reference profile of {feature.name!r}: bin_edges and mean must be finite",
            )
        if not (math.isfinite(feature.std) and feature.std >= 0):
            raise ModelError(
                Reason.BAD_PROFILE,
                f"reference profile of {feature.name!r}: std must be finite and >= 0",
            )
        if len(fractions) != len(edge) + 1 or np.any(np.diff(edge) < 0):
            raise ModelError(
                Reason.BAD_PROFILE,
                f"reference profile of {feature.name!r}: needs ascending bin_edges and "
                f"len(bin_edges) + 1 expected_fractions, got {len(edge)} and {len(fractions)}",
            )
        names.append(found.name)
        edges.append(edge)
        expected.append(fractions)
        means.append(feature.mean)
        stds.append(feature.std)
    prediction = label = None
    if profile.HasField("prediction"):
        prediction = _output_reference(profile.prediction)
    # The label's profile counts while the contract's label field has its name and kind.
    if profile.HasField("label") and profile.label.name == contract.label_field:
        numeric = contract.columns[contract.label_field].numeric
        if numeric != (not profile.label.categories):
            label = None
        else:
            label = _output_reference(profile.label, contract.label_field)
    for output in (prediction, label):
        if output is not None:
            size += len(output.name.encode()) + 96 + 11 * (output.bins + 1)
    if size > max_message_bytes // 2:
        raise ModelError(
            Reason.BAD_PROFILE,
            f"reference profile: a drift message over it would take about {size:,} bytes, "
            f"more than half of max_message_bytes ({max_message_bytes:,})",
        )
    if not names and not text_names and prediction is None and label is None:
        return None
    return DriftReference(
        features=tuple(names),
        edges=tuple(edges),
        expected=tuple(expected),
        means=np.asarray(means),
        stds=np.asarray(stds),
        text_features=tuple(text_names),
        categories=tuple(categories),
        text_expected=tuple(text_expected),
        rows=int(profile.row_count),
        prediction=prediction,
        label=label,
    )


def _output_reference(feature: pb.FeatureProfile, name: str = "") -> OutputReference:
    """The drift reference of a prediction or label profile; ModelError when unusable."""
    what = f"reference profile of the {'label' if name else 'prediction'}"
    fractions = np.asarray(feature.expected_fractions, dtype=np.float64)
    if not (len(fractions) and np.isfinite(fractions).all() and (fractions >= 0).all()):
        raise ModelError(Reason.BAD_PROFILE, f"{what}: expected_fractions must be finite and >= 0")
    if feature.categories:
        if len(fractions) != len(feature.categories):
            raise ModelError(
                Reason.BAD_PROFILE,
                f"{what}: {len(feature.categories)} categories but {len(fractions)} "
                "expected_fractions",
            )
        return OutputReference(
            name or feature.name, np.append(fractions, 0.0), categories=tuple(feature.categories)
        )
    edges = np.asarray(feature.bin_edges, dtype=np.float64)
    finite = np.isfinite(edges).all() and math.isfinite(feature.mean)
    if not (finite and math.isfinite(feature.std) and feature.std >= 0):
        raise ModelError(Reason.BAD_PROFILE, f"{what}: bin_edges, mean and std must be finite")
    if len(fractions) != len(edges) + 1 or np.any(np.diff(edges) < 0):
        raise ModelError(
            Reason.BAD_PROFILE,
            f"{what}: needs ascending bin_edges and len(bin_edges) + 1 expected_fractions, "
            f"got {len(edges)} and {len(fractions)}",
        )
    return OutputReference(
        name or feature.name or "prediction",
        fractions,
        edges=edges,
        mean=feature.mean,
        std=feature.std,
    )


def model_event(
    kind: str,
    identity: ModelIdentity | None,
    now_ms: int,
    *,
    source: ControlIn | None = None,
    reason: str = "",
    message: str = "",
    contract_version: int = 0,
    provenance: Provenance | None = None,
) -> pb.ModelEvent:
    """An events-topic message. Its texts are cut short: a rejected descriptor's name
    can be anything, and the event must fit in an output message."""
    event = pb.ModelEvent(
        kind=kind,
        reason=reason,
        message=_clip(message, MAX_EVENT_TEXT),
        at_ms=now_ms,
        contract_version=contract_version,
    )
    if identity is not None:
        event.data_type = identity.data_type
        event.model_name = identity.name
        event.model_version = identity.version
        event.model_sha256 = identity.sha256
    if source is not None:
        event.data_type = source.data_type
        body = source.body
        if isinstance(body, pb.ModelDescriptor):
            event.model_name = event.model_name or _clip(body.name, MAX_NAME_LENGTH)
            event.model_version = event.model_version or _clip(body.version, MAX_NAME_LENGTH)
            event.model_sha256 = event.model_sha256 or _clip(body.sha256, MAX_NAME_LENGTH)
        elif isinstance(body, pb.DataContract):
            event.contract_version = event.contract_version or body.version
        event.source_topic = source.topic
        event.source_partition = source.partition
        event.source_offset = source.offset
        if isinstance(body, pb.ModelDescriptor) and body.HasField("signature"):
            event.signer_key_id = _clip(body.signature.key_id, MAX_NAME_LENGTH)
    if provenance is not None:
        event.signer_key_id = provenance.signer_key_id
        event.signature_status = provenance.signature_status
        event.gate = _clip(provenance.gate, MAX_EVENT_TEXT)
    return event


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- the registry ------------------------------------------------------------------------


RegistryOut = Install | pb.ModelEvent | DeadLetter


EVENTS_PER_CONTROL_MESSAGE = 16
"""Room in an event's sequence number for the events of one control message (at most 3)."""


MAX_MODELS_PER_DATA_TYPE = 8
"""Installed models a data type's registry keeps (with their bytes): the plan's, the last
good one, and staged ones; past it the oldest staged or retired model is dropped."""


@dataclass
class RegistryState:
    """What the registry snapshots: the contract, the active model and every other installed
    model (with their bytes), the serving plan, control messages read but not yet through,
    which a resume takes up again, and a descriptor waiting for a contract that can feed
    it."""

    contract: Contract | None = None
    current: ModelInstall | None = None
    loading: list[ControlIn] = field(default_factory=list)
    awaiting: ControlIn | None = None
    models: dict[str, ModelInstall] = field(default_factory=dict)
    book: PlanBook = field(default_factory=PlanBook)


MODEL_LOADER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="waxserve-model-load")
"""Loads and checks models of every format off the worker thread (a big model takes seconds,
the first PMML model starts the JVM, the quality gate scores a test batch), so the records
of every data type keep being scored meanwhile. PMML too: JPype attaches the loader thread to
the JVM as a daemon thread, which holds nothing at exit (the JVM's start, if it happens here,
detaches its thread: `dataflows.runtimes.pmml.start_jvm`), and a process that used the JVM
ends with os._exit (`dataflows.serving`). Shards of processes that did not load a model load
it here too (`dataflows.scoring.shard`)."""


@dataclass(frozen=True)
class _Binding:
    """A loaded descriptor going through the checks against its contract (the quality gate
    among them) on the loader; the events it makes are numbered under `trigger`."""

    item: ControlIn
    future: Future[Candidate]
    trigger: tuple[int, int]
    awaited: bool  # it waited for a contract (snapshots keep it as waiting)


class Registry:
    """The contract and the model of one data type. Touched only by control messages, so
    it snapshots only when they change; it holds the model bytes so that whichever process
    resumes a shard can rebuild the model from them.

    Control messages go through in arrival order. Descriptors load and are checked (the
    quality gate too) in the background, whatever their format; the old model serves until
    the new one is ready. `collect()` returns
    what has gone through.

    Limits: a control message larger than `max_model_bytes` is rejected unread
    (model_too_large); so is any control message of a new data type while the process's
    registries hold `max_data_types` others (too_many_data_types, counted in `data_types`).
    Rejections keep what was installed serving.
    """

    def __init__(
        self,
        state: RegistryState | None,
        *,
        model_dir: str,
        clock: Clock = time.time,
        onnx_threads: int = 1,
        events: EventBus = NO_EVENTS,
        cache: RuntimeCache = RUNTIMES,
        codecs: CodecCache = CODECS,
        max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_data_types: int = DEFAULT_MAX_DATA_TYPES,
        data_types: DataTypeTable = REGISTRY_DATA_TYPES,
        signature_policy: str = "off",
        trusted_keys: TrustedKeys | None = None,
        gate_max_latency_us: float = DEFAULT_MAX_LATENCY_US,
    ) -> None:
        state = state if state is not None else RegistryState()
        self._signature_policy = SignaturePolicy(signature_policy)
        self._trusted_keys = trusted_keys
        self._gate_max_latency_us = gate_max_latency_us
        self.contract = state.contract
        self.current = state.current
        # Every installed model by "<name>:<version>", and the plan that says which serve.
        self.models: dict[str, ModelInstall] = dict(state.models)
        self.book = state.book
        if self.current is not None and not self.models:
            identity = self.current.spec.identity
            key = model_key(identity.name, identity.version)
            self.models[key] = self.current
            self.book = PlanBook(ServingPlan.single(key))
        self.resumed = state.contract is not None or state.current is not None
        self.resumed = self.resumed or bool(state.loading) or state.awaiting is not None
        # The control message being gone through, and how many events it made so far.
        self._trigger: tuple[int, int] = (0, 0)
        # A descriptor that came before a contract that can feed it: on a compacted control
        # topic a model can precede the newer contract it needs. Installed when one comes.
        self._awaiting: tuple[ControlIn, Candidate] | None = None
        self._model_dir = model_dir
        self._clock = clock
        self._onnx_threads = onnx_threads
        self._events = events
        self._cache = cache
        self._codecs = codecs
        self._max_model_bytes = max_model_bytes
        self._max_message_bytes = max_message_bytes
        self._max_data_types = max_data_types
        self._data_types = data_types
        self._data_type = ""  # the one this registry holds, once admitted
        self._queue: collections.deque[tuple[ControlIn, Future[Candidate] | None]] = (
            collections.deque()
        )
        self._binding: _Binding | None = None  # the head descriptor, through its last checks
        if self.resumed:  # what a snapshot holds stays, whatever the limit is now
            pending = [state.awaiting] if state.awaiting is not None else []
            pending += state.loading
            held = state.contract or (state.current and state.current.spec.identity)
            self._admit(held.data_type if held else pending[0].data_type, limit=None)
        if state.awaiting is not None:  # loads again, and waits again if it must
            self._enqueue(state.awaiting)
        for item in state.loading:
            self._enqueue(item)

    @property
    def holds_anything(self) -> bool:
        """Whether the registry has a contract, a model or control messages going through;
        one that holds nothing may be dropped (it is rebuilt empty on the next message)."""
        held = self.contract is not None or self.current is not None or bool(self.models)
        return held or self.loading or self._awaiting is not None

    def _admit(self, data_type: str, limit: int | None) -> bool:
        if not self._data_type:
            if not self._data_types.admit(data_type, self, limit):
                return False
            self._data_type = data_type
        return True

    def _release_if_empty(self) -> None:
        if self._data_type and not self.holds_anything:
            self._data_types.release(self._data_type, self)
            self._data_type = ""

    def _refusal(self, item: ControlIn) -> ModelError | ContractError | None:
        """Why a control message is rejected before any check runs, if it is."""
        is_model = isinstance(item.body, pb.ModelDescriptor)
        error = ModelError if is_model else ContractError
        if len(item.raw) > self._max_model_bytes:
            what = "descriptor" if is_model else "contract"
            reason = Reason.MODEL_TOO_LARGE if is_model else Reason.BAD_CONTRACT
            return error(reason, _too_large(what, item.raw, self._max_model_bytes))
        if not self._admit(item.data_type, self._max_data_types):
            return error(
                Reason.TOO_MANY_DATA_TYPES,
                f"data type {item.data_type!r} would be one more than max_data_types "
                f"({self._max_data_types}) held by this process",
            )
        return None

    @property
    def loading(self) -> bool:
        """Whether control messages are still going through."""
        return bool(self._queue) or self._binding is not None

    def snapshot(self) -> RegistryState:
        """The registry's state for Bytewax's snapshots (immutable parts only). A descriptor
        whose checks against the contract are under way goes through again on a resume:
        first among those loading, or (one that waited for a contract) as waiting. (That one
        is then numbered by its own offset, not by the contract's that freed it: a resume in
        that window can fence its `installed` event as already written.)"""
        awaiting = self._awaiting[0] if self._awaiting is not None else None
        loading = [item for item, _ in self._queue]
        binding = self._binding
        if binding is not None and binding.awaited:
            awaiting = binding.item
        elif binding is not None:
            loading.insert(0, binding.item)
        return RegistryState(
            self.contract, self.current, loading, awaiting, dict(self.models), self.book
        )

    def _numbered(self, event: pb.ModelEvent) -> pb.ModelEvent:
        """`event` numbered by the control message that made it: (offset + 1) * 16 + its
        rank among that message's events. Control messages go through in offset order, so
        the numbers rise, and a replay numbers alike, whatever state was dropped."""
        offset, made = self._trigger
        self._trigger = (offset, made + 1)
        event.sequence = (offset + 1) * EVENTS_PER_CONTROL_MESSAGE + made
        return event

    def _enqueue(self, item: ControlIn) -> None:
        refused = self._refusal(item)
        if refused is not None:  # rejected at its turn, never loaded
            rejected: Future[Candidate] = Future()
            rejected.set_exception(refused)
            self._queue.append((item, rejected))
            return
        if not isinstance(item.body, pb.ModelDescriptor):
            self._queue.append((item, None))  # a contract or plan command: at its turn
            return
        candidate = Candidate(
            item.body,
            self._model_dir,
            self._onnx_threads,
            self._cache,
            max_model_bytes=self._max_model_bytes,
            max_message_bytes=self._max_message_bytes,
            signature_policy=self._signature_policy,
            trusted_keys=self._trusted_keys,
            gate_max_latency_us=self._gate_max_latency_us,
        )
        # Every format loads on the loader, PMML too (see `MODEL_LOADER`).
        load = functools.partial(_run_checks, candidate, LOAD_CHECKS)
        self._queue.append((item, MODEL_LOADER.submit(load)))

    def on_control(self, items: Iterable[ControlIn]) -> list[RegistryOut]:
        """Start on control messages; returns whatever has gone through already."""
        for item in items:
            self._enqueue(item)
        return self.collect()

    def collect(self, *, wait: bool = False) -> list[RegistryOut]:
        """Installs and rejections of the control messages that went through, in arrival
        order (with `wait`, of all of them)."""
        out: list[RegistryOut] = []
        while self._queue or self._binding is not None:
            binding = self._binding
            future: Future[Candidate] | None
            if binding is not None:  # checks against the contract: nothing passes them
                if not (wait or binding.future.done()):
                    break
                self._binding = None
                self._trigger = binding.trigger
                item, future, step = binding.item, binding.future, self._install
            else:
                item, future = self._queue[0]
                if future is not None and not (wait or future.done()):
                    break
                self._queue.popleft()
                self._trigger = (item.offset, 0)
                step = self._model
            try:
                if isinstance(item.body, pb.PlanCommand):
                    out.extend(self._plan(item))
                elif future is None:
                    out.extend(self._contract(item))
                else:
                    out.extend(step(item, future.result()))
            except (ModelError, ContractError) as exc:
                out.extend(self._rejected(item, exc.reason, str(exc)))
            except PlanError as exc:
                out.extend(self._rejected(item, Reason.BAD_PLAN, str(exc)))
            except Exception as exc:
                # A control message is replayed on every restart: one that trips a bug in
                # a check must be a rejection, not a crash loop.
                log.exception("control message at %s/%d failed", item.topic, item.offset)
                is_model = item.stage == Stage.MODEL
                reason = Reason.LOAD_FAILED if is_model else Reason.BAD_CONTRACT
                if item.stage == Stage.PLAN:
                    reason = Reason.BAD_PLAN
                message = f"{type(exc).__name__}: {exc}"
                out.extend(self._rejected(item, reason, message))
        self._release_if_empty()
        return out

    def _contract(self, item: ControlIn) -> list[RegistryOut]:
        assert isinstance(item.body, pb.DataContract)
        contract = Contract.from_proto(item.body)
        if self.contract is not None:
            check_compatible(self.contract, contract)
        serving = self.book.plan.models if self.book.plan is not None else ()
        for key in serving:
            try:
                bind_inputs(self.models[key].spec.features, contract, f"serving model {key}")
            except ModelError as exc:
                raise ContractError(Reason.INCOMPATIBLE_CONTRACT, str(exc)) from None
        self._codecs.get(contract)  # its encoding works: the codecs build
        self.contract = contract
        log.info("installed contract %s v%d", contract.data_type, contract.version)
        self._events.publish(ContractInstalled(contract.data_type, contract.version))
        now_ms = int(self._clock() * 1000)
        event = model_event(
            "contract_installed", None, now_ms, source=item, contract_version=contract.version
        )
        out: list[RegistryOut] = [ContractInstall(contract), self._numbered(event)]
        if self._awaiting is not None and contract_feeds(self._awaiting[1].descriptor, contract):
            waiting_item, candidate = self._awaiting
            self._awaiting = None
            out.extend(self._model(waiting_item, candidate, awaited=True))
        return out

    def _model(
        self, item: ControlIn, candidate: Candidate, *, awaited: bool = False
    ) -> list[RegistryOut]:
        """A loaded descriptor at its turn: it waits for a contract that can feed it, or
        goes through the checks against this one (they score it: the quality gate) on the
        loader, off the scoring path; `collect` installs it when they are through, and
        until then the old model serves and later control messages wait."""
        if not contract_feeds(candidate.descriptor, self.contract):
            return self._await_contract(item, candidate)
        candidate.contract = self.contract
        bind = functools.partial(_run_checks, candidate, BIND_CHECKS)
        self._binding = _Binding(item, MODEL_LOADER.submit(bind), self._trigger, awaited)
        return []

    def _install(self, item: ControlIn, candidate: Candidate) -> list[RegistryOut]:
        """Install a descriptor that passed every check."""
        assert candidate.runtime is not None and self.contract is not None
        descriptor = candidate.descriptor
        identity = ModelIdentity(
            data_type=descriptor.data_type,
            name=descriptor.name,
            version=descriptor.version,
            sha256=candidate.digest,
            description=descriptor.description,
            format=descriptor.format,
            # Stamped after loading: "installed at" is when the model could first serve.
            since_ms=int(self._clock() * 1000),
        )
        verdict = candidate.verdict
        provenance = Provenance(
            item.topic,
            item.partition,
            item.offset,
            signer_key_id=verdict.key_id[:MAX_NAME_LENGTH] if verdict is not None else "",
            signature_status=str(verdict.status) if verdict is not None else "",
            gate=candidate.gate_note,
        )
        spec = ModelSpec(
            identity,
            candidate.runtime.features,
            candidate.input_fields,
            candidate.reference,
            descriptor.created_at_ms,
            tuple(descriptor.input_features),
            self.contract.version,
            provenance,
        )
        key = model_key(identity.name, identity.version)
        staged = descriptor.stage == "staged"
        self.models.pop(key, None)  # a re-published model is the newest again
        if staged:
            install = ModelInstall(spec, candidate.model_bytes, staged=True)
        else:
            self.book = activate(self.book, key)
            install = ModelInstall(spec, candidate.model_bytes, plan=self.book.plan)
            self.current = install
        self.models[key] = install
        self._drop_unused_models()
        log.info(
            "installed model %s:%s (%s) for %s%s",
            identity.name,
            identity.version,
            identity.sha256[:12],
            identity.data_type,
            " (staged)" if staged else "",
        )
        self._events.publish(ModelInstalled(identity))
        if not staged and self.book.plan is not None:
            plan = self.book.plan
            self._events.publish(
                PlanChanged(
                    identity.data_type,
                    plan.describe(),
                    plan.number,
                    "install",
                    "",
                    at_ms=identity.since_ms,
                )
            )
        event = model_event(
            "installed",
            identity,
            identity.since_ms,
            source=item,
            contract_version=self.contract.version,
            provenance=provenance,
            message="staged: serves when a plan command names it" if staged else "",
        )
        if self.book.plan is not None:
            event.plan = self.book.plan.describe()
            event.plan_number = self.book.plan.number
        return [install, self._numbered(event)]

    def _drop_unused_models(self) -> None:
        """Keep at most MAX_MODELS_PER_DATA_TYPE installed models: drop the oldest that
        neither the plan nor a rollback needs."""
        plan = self.book.plan
        needed = set(plan.models if plan is not None else ()) | {self.book.last_good}
        for key in list(self.models):
            if len(self.models) <= MAX_MODELS_PER_DATA_TYPE:
                break
            if key not in needed:
                del self.models[key]

    def _plan(self, item: ControlIn) -> list[RegistryOut]:
        """A plan command at its turn: the new plan to every shard, and an event."""
        command = item.body
        assert isinstance(command, pb.PlanCommand)
        fields = list(self.contract.columns) if self.contract is not None else []
        before = self.book
        self.book = apply_plan(before, command, self.models.keys(), fields)
        plan = self.book.plan
        assert plan is not None
        active = self.models.get(plan.active) if plan.active else None
        if active is not None:
            self.current = active
        for key in _retired(before, self.book, command):
            self.models.pop(key, None)
        action = pb.PlanAction.Name(command.action).lower()
        log.info(
            "plan for %s: %s (%s by %s%s)",
            item.data_type,
            plan.describe(),
            action,
            command.actor or "?",
            f": {command.reason}" if command.reason else "",
        )
        now_ms = int(self._clock() * 1000)
        self._events.publish(
            PlanChanged(
                item.data_type,
                plan.describe(),
                plan.number,
                action,
                _clip(command.actor, MAX_NAME_LENGTH),
                _clip(command.reason, MAX_EVENT_TEXT),
                now_ms,
            )
        )
        event = model_event("plan_changed", None, now_ms, source=item, message=command.reason)
        event.plan_action = action
        event.actor = _clip(command.actor, MAX_NAME_LENGTH)
        event.plan = plan.describe()
        event.plan_number = plan.number
        if active is not None:
            identity = active.spec.identity
            event.model_name, event.model_version = identity.name, identity.version
            event.model_sha256 = identity.sha256
        if plan == before.plan:
            return [self._numbered(event)]  # e.g. a staged model retired: nothing to send
        models = tuple(self.models[key] for key in plan.models)
        return [PlanInstall(item.data_type, plan, models), self._numbered(event)]

    def _await_contract(self, item: ControlIn, candidate: Candidate) -> list[RegistryOut]:
        """Keep a loaded model until a contract that can feed it arrives; an older one that
        was waiting gives way (rejected as it would have been)."""
        out: list[RegistryOut] = []
        if self._awaiting is not None:
            older, _ = self._awaiting
            message = "a newer descriptor came while it waited for a contract"
            out.extend(self._rejected(older, Reason.NO_CONTRACT, message))
        self._awaiting = (item, candidate)
        wanted = candidate.descriptor.contract_version
        have = f"v{self.contract.version}" if self.contract is not None else "none"
        message = (
            f"waits for contract v{max(wanted, 1)} or later of {item.data_type!r} "
            f"(installed: {have}); publish it (waxserve contract publish)"
        )
        log.warning(
            "model %s:%s %s", candidate.descriptor.name, candidate.descriptor.version, message
        )
        now_ms = int(self._clock() * 1000)
        event = model_event("awaiting_contract", None, now_ms, source=item, message=message)
        return [*out, self._numbered(event)]

    def _rejected(self, item: ControlIn, reason: str, message: str) -> list[RegistryOut]:
        now_ms = int(self._clock() * 1000)
        self._events.publish(ControlRejected(item.data_type, item.stage, reason))
        what = {Stage.MODEL: "model", Stage.PLAN: "plan command"}.get(item.stage, "contract")
        log.warning("rejected %s for %s: %s: %s", what, item.data_type, reason, message)
        kind = {Stage.MODEL: "rejected", Stage.PLAN: "plan_rejected"}.get(
            item.stage, "contract_rejected"
        )
        dead = item.dead_letter(reason, message)
        dead.max_message_bytes = self._max_message_bytes  # it carries the model's bytes
        event = model_event(kind, None, now_ms, source=item, reason=reason, message=message)
        if isinstance(item.body, pb.PlanCommand):
            event.plan_action = pb.PlanAction.Name(item.body.action).lower()
            event.actor = _clip(item.body.actor, MAX_NAME_LENGTH)
            if self.book.plan is not None:
                event.plan = self.book.plan.describe()
                event.plan_number = self.book.plan.number
        return [dead, self._numbered(event)]

    def on_resume(self) -> list[RegistryOut]:
        """After a resume: re-send the contract and the model so every shard can rebuild them."""
        self.resumed = False
        out: list[RegistryOut] = []
        if self.contract is not None:
            out.append(ContractInstall(self.contract, restored=True))
        plan = self.book.plan
        if plan is not None and plan.policy != "single":
            # Every model of the plan (a split or ensemble of staged models has no active one).
            models = tuple(self.models[key] for key in plan.models)
            identity = (self.current or models[0]).spec.identity
            restored: Install = PlanInstall(identity.data_type, plan, models, restored=True)
        elif self.current is not None:
            identity = self.current.spec.identity
            restored = ModelInstall(
                self.current.spec, self.current.model_bytes, restored=True, plan=plan
            )
        else:
            return out
        self._events.publish(ModelInstalled(identity, restored=True))
        now_ms = int(self._clock() * 1000)
        event = model_event("restored", identity, now_ms)
        if plan is not None:
            event.plan, event.plan_number = plan.describe(), plan.number
        return [*out, restored, event]


def _retired(before: PlanBook, after: PlanBook, command: pb.PlanCommand) -> list[str]:
    """Models a RETIRE command drops from the registry (not in the plan, not the last good)."""
    if command.action != pb.RETIRE:
        return []
    keep = set(after.plan.models if after.plan is not None else ()) | {after.last_good}
    return [v.model for v in command.variants if v.model not in keep]


def _run_checks(candidate: Candidate, checks: Sequence[Check]) -> Candidate:
    for check in checks:
        check(candidate)
    return candidate
