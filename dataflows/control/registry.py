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
import threading
import time
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
from dataflows.core.descriptors import FORMAT_NAMES, sha256_hex
from dataflows.core.events import (
    NO_EVENTS,
    ContractInstalled,
    ControlRejected,
    EventBus,
    ModelInstalled,
)
from dataflows.core.reasons import Reason, Stage
from dataflows.core.records import DeadLetter, SourceBatch
from dataflows.monitoring.windows import DriftReference, ModelIdentity
from dataflows.runtimes import ModelError, ModelFeature, ModelRuntime, load_runtime
from protos import waxserve_pb2 as pb

log = logging.getLogger(__name__)

Clock = Callable[[], float]
"""Seconds since the epoch; injectable so tests control time."""


# --- what the registry sends to shards ---------------------------------------------------


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

    @property
    def runtime_key(self) -> str:
        """Key of the loaded runtime in the process cache."""
        return runtime_key(self.identity.sha256, self.declared_inputs)

    def __deepcopy__(self, memo: dict[int, Any]) -> ModelSpec:
        return self  # immutable


@dataclass(frozen=True)
class ModelInstall:
    """The registry's word to every shard of a data type: serve this model from now on."""

    spec: ModelSpec
    model_bytes: bytes
    restored: bool = False  # re-sent after a resume, not a new model


@dataclass(frozen=True)
class ContractInstall:
    """The registry's word to every shard of a data type: decode with this contract."""

    contract: Contract
    restored: bool = False


Install = ContractInstall | ModelInstall


# --- what the registry reads --------------------------------------------------------------


@dataclass(frozen=True)
class ControlIn:
    """A control-topic message, decoded, with where it came from."""

    body: pb.ModelDescriptor | pb.DataContract
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
                raise DecodeError("a ControlMessage with neither a model nor a contract")
        except DecodeError as exc:
            out.append(
                batch.dead_letter(i, Stage.DECODE, Reason.UNDECODABLE, f"control message: {exc}")
            )
            continue
        body = message.model if which == "model" else message.contract
        if not body.data_type:
            out.append(
                batch.dead_letter(
                    i,
                    which,
                    Reason.BAD_CONTRACT if which == "contract" else Reason.BAD_DESCRIPTOR,
                    f"{which} has no data_type",
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
        self._lock = threading.Lock()

    def clear(self) -> None:
        """Forget every loaded runtime (as a new process would start)."""
        with self._lock:
            self._runtimes.clear()

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
    """Codecs of this process, one set per contract (data type and version)."""

    def __init__(self, schema_resolver: Callable[[int], str] | None = None) -> None:
        self._codecs: dict[tuple[str, int], ContractCodecs] = {}
        self._lock = threading.Lock()
        self._resolver = schema_resolver

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
            return codecs


CODECS = CodecCache()
"""The process-wide codec cache."""


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


Check = Callable[[Candidate], None]


def check_identity(c: Candidate) -> None:
    """The descriptor names its model, version, data type and a known format."""
    for name in ("name", "version", "data_type"):
        if not getattr(c.descriptor, name):
            raise ModelError(Reason.BAD_DESCRIPTOR, f"descriptor has no {name}")
    if c.descriptor.format not in FORMAT_NAMES:
        raise ModelError(Reason.UNSUPPORTED_MODEL, f"unknown model format {c.descriptor.format}")


def read_model_bytes(descriptor: pb.ModelDescriptor, model_dir: str) -> bytes:
    """The model bytes of a descriptor: inline, or read from an allowed file:// location."""
    which = descriptor.WhichOneof("source")
    if which == "model_bytes":
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
        return path.read_bytes()
    except OSError as exc:
        raise ModelError(Reason.LOCATION_UNREADABLE, f"{path}: {exc.strerror}") from None


def check_bytes(c: Candidate) -> None:
    """The model bytes are there and their SHA-256 is the descriptor's."""
    c.model_bytes = read_model_bytes(c.descriptor, c.model_dir)
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


def check_contract(c: Candidate) -> None:
    """The data type has a contract, of the version the model was trained against or a
    later (compatible) one."""
    wanted = c.descriptor.contract_version
    if c.contract is None:
        raise ModelError(
            Reason.NO_CONTRACT,
            f"data type {c.descriptor.data_type!r} has no contract: publish one first "
            "(waxserve contract publish)",
        )
    if wanted > c.contract.version:
        raise ModelError(
            Reason.NO_CONTRACT,
            f"the model was trained against contract v{wanted} of {c.descriptor.data_type!r}, "
            f"but v{c.contract.version} is installed",
        )


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
        c.reference = drift_reference(c.descriptor.reference_profile, c.contract)


LOAD_CHECKS: tuple[Check, ...] = (check_identity, check_bytes, check_loads)
"""Checks that need no contract: they run off the scoring path, in a loader thread."""

BIND_CHECKS: tuple[Check, ...] = (check_contract, check_inputs, check_profile)
"""Checks against the data type's contract as it is at the descriptor's turn."""


def drift_reference(profile: pb.ReferenceProfile, contract: Contract) -> DriftReference | None:
    """Drift reference from a profile, over its features that are contract fields of the
    same kind (numeric bins for numeric fields, categories for string fields)."""
    names, edges, expected, means, stds = [], [], [], [], []
    text_names, categories, text_expected = [], [], []
    for feature in profile.features:
        found = contract.field_for(feature.name)
        if found is None:
            continue
        fractions = np.asarray(feature.expected_fractions, dtype=np.float64)
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
    if not names and not text_names:
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
) -> pb.ModelEvent:
    """An events-topic message."""
    event = pb.ModelEvent(
        kind=kind, reason=reason, message=message, at_ms=now_ms, contract_version=contract_version
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
            event.model_name = event.model_name or body.name
            event.model_version = event.model_version or body.version
            event.model_sha256 = event.model_sha256 or body.sha256
        else:
            event.contract_version = event.contract_version or body.version
        event.source_topic = source.topic
        event.source_partition = source.partition
        event.source_offset = source.offset
    return event


# --- the registry ------------------------------------------------------------------------


RegistryOut = Install | pb.ModelEvent | DeadLetter


@dataclass
class RegistryState:
    """What the registry snapshots: the contract, the serving model (with its bytes), and
    control messages read but not yet through, which a resume takes up again."""

    contract: Contract | None = None
    current: ModelInstall | None = None
    loading: list[ControlIn] = field(default_factory=list)


_LOADER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="waxserve-model-load")
"""Loads ONNX models off the worker thread (a big model takes seconds), so the records of
every data type keep being scored meanwhile."""


class Registry:
    """The contract and the model of one data type. Touched only by control messages, so
    it snapshots only when they change; it holds the model bytes so that whichever process
    resumes a shard can rebuild the model from them.

    Control messages go through in arrival order. Descriptors load in the background (PMML:
    on the worker); the old model serves until the new one is ready. `collect()` returns
    what has gone through.
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
    ) -> None:
        state = state if state is not None else RegistryState()
        self.contract = state.contract
        self.current = state.current
        self.resumed = state.contract is not None or state.current is not None
        self.resumed = self.resumed or bool(state.loading)
        self._model_dir = model_dir
        self._clock = clock
        self._onnx_threads = onnx_threads
        self._events = events
        self._cache = cache
        self._codecs = codecs
        self._queue: collections.deque[tuple[ControlIn, Future[Candidate] | None]] = (
            collections.deque()
        )
        for item in state.loading:
            self._enqueue(item)

    @property
    def loading(self) -> bool:
        """Whether control messages are still going through."""
        return bool(self._queue)

    def snapshot(self) -> RegistryState:
        """The registry's state for Bytewax's snapshots (immutable parts only)."""
        return RegistryState(self.contract, self.current, [item for item, _ in self._queue])

    def _enqueue(self, item: ControlIn) -> None:
        if not isinstance(item.body, pb.ModelDescriptor):
            self._queue.append((item, None))  # a contract: checked at its turn
            return
        candidate = Candidate(item.body, self._model_dir, self._onnx_threads, self._cache)
        load = functools.partial(_run_checks, candidate, LOAD_CHECKS)
        if item.body.format != pb.MODEL_FORMAT_PMML:
            self._queue.append((item, _LOADER.submit(load)))
            return
        # PMML runs in an in-process JVM: a loader thread that called into it stays attached,
        # and the interpreter can crash at exit (seen: SIGSEGV after the tests). PMML loads
        # on the worker, as it always did.
        future: Future[Candidate] = Future()
        try:
            future.set_result(load())
        except Exception as exc:
            future.set_exception(exc)
        self._queue.append((item, future))

    def on_control(self, items: Iterable[ControlIn]) -> list[RegistryOut]:
        """Start on control messages; returns whatever has gone through already."""
        for item in items:
            self._enqueue(item)
        return self.collect()

    def collect(self, *, wait: bool = False) -> list[RegistryOut]:
        """Installs and rejections of the control messages that went through, in arrival
        order (with `wait`, of all of them)."""
        out: list[RegistryOut] = []
        while self._queue:
            item, future = self._queue[0]
            if future is not None and not (wait or future.done()):
                break
            self._queue.popleft()
            try:
                if future is None:
                    out.extend(self._contract(item))
                else:
                    out.extend(self._model(item, future.result()))
            except (ModelError, ContractError) as exc:
                out.extend(self._rejected(item, exc.reason, str(exc)))
        return out

    def _contract(self, item: ControlIn) -> list[RegistryOut]:
        assert isinstance(item.body, pb.DataContract)
        contract = Contract.from_proto(item.body)
        if self.contract is not None:
            check_compatible(self.contract, contract)
        if self.current is not None:
            try:
                bind_inputs(self.current.spec.features, contract, "serving model")
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
        return [ContractInstall(contract), event]

    def _model(self, item: ControlIn, candidate: Candidate) -> list[RegistryOut]:
        candidate.contract = self.contract
        _run_checks(candidate, BIND_CHECKS)
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
        spec = ModelSpec(
            identity,
            candidate.runtime.features,
            candidate.input_fields,
            candidate.reference,
            descriptor.created_at_ms,
            tuple(descriptor.input_features),
            self.contract.version,
        )
        install = ModelInstall(spec, candidate.model_bytes)
        self.current = install
        log.info(
            "installed model %s:%s (%s) for %s",
            identity.name,
            identity.version,
            identity.sha256[:12],
            identity.data_type,
        )
        self._events.publish(ModelInstalled(identity))
        event = model_event(
            "installed",
            identity,
            identity.since_ms,
            source=item,
            contract_version=self.contract.version,
        )
        return [install, event]

    def _rejected(self, item: ControlIn, reason: str, message: str) -> list[RegistryOut]:
        now_ms = int(self._clock() * 1000)
        self._events.publish(ControlRejected(item.data_type, item.stage, reason))
        what = "model" if item.stage == Stage.MODEL else "contract"
        log.warning("rejected %s for %s: %s: %s", what, item.data_type, reason, message)
        kind = "rejected" if item.stage == Stage.MODEL else "contract_rejected"
        return [
            item.dead_letter(reason, message),
            model_event(kind, None, now_ms, source=item, reason=reason, message=message),
        ]

    def on_resume(self) -> list[RegistryOut]:
        """After a resume: re-send the contract and the model so every shard can rebuild them."""
        self.resumed = False
        out: list[RegistryOut] = []
        if self.contract is not None:
            out.append(ContractInstall(self.contract, restored=True))
        if self.current is None:
            return out
        restored = ModelInstall(self.current.spec, self.current.model_bytes, restored=True)
        identity = restored.spec.identity
        self._events.publish(ModelInstalled(identity, restored=True))
        now_ms = int(self._clock() * 1000)
        return [*out, restored, model_event("restored", identity, now_ms)]


def _run_checks(candidate: Candidate, checks: Sequence[Check]) -> Candidate:
    for check in checks:
        check(candidate)
    return candidate
