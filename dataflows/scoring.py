"""The model registry and the shard scorer: the per-batch logic of waxserve, without Bytewax.

`Registry` (one per data type) validates descriptors and decides which model serves.
`ShardScorer` (one per "<data_type>#<shard>" key) receives, in arrival order, the models
the registry installs and the records of its shard, and scores each run of records
between two model changes with one vectorized model call.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import math
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

from dataflows import metrics, wire
from dataflows.descriptors import FORMAT_NAMES, sha256_hex
from dataflows.monitoring import (
    DriftAccumulator,
    DriftPartial,
    DriftReference,
    ModelIdentity,
    StatsAccumulator,
    StatsPartial,
    window_start,
)
from dataflows.records import (
    WINE_FEATURES,
    DeadLetter,
    OutMessage,
    RecordColumns,
    feature_columns,
    record_field_for,
)
from dataflows.runtimes import (
    ModelError,
    ModelRuntime,
    Prediction,
    load_runtime,
)
from dataflows.state import PROCESS_STATE, ProcessState
from protos import waxserve_pb2 as pb

log = logging.getLogger(__name__)

Clock = Callable[[], float]
"""Seconds since the epoch; injectable so tests control windows."""


# --- installed models ------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A validated model: everything shards need except the bytes."""

    identity: ModelIdentity
    input_features: tuple[str, ...]  # record fields, in the model's input column order
    reference: DriftReference | None
    created_at_ms: int
    declared_inputs: tuple[str, ...] = ()  # the descriptor's input_features, as loaded

    @property
    def runtime_key(self) -> str:
        """Key of the loaded runtime in the process cache."""
        return runtime_key(self.identity.sha256, self.declared_inputs)

    @property
    def columns(self) -> list[int]:
        """Columns of `RecordColumns.features` that feed the model, in its order."""
        return feature_columns(self.input_features)


@dataclass(frozen=True)
class ModelInstall:
    """The registry's word to every shard of a data type: serve this model from now on."""

    spec: ModelSpec
    model_bytes: bytes
    restored: bool = False  # re-sent after a resume, not a new model


@dataclass(frozen=True)
class DescriptorIn:
    """A decoded descriptor with where it came from."""

    descriptor: pb.ModelDescriptor
    topic: str
    partition: int
    offset: int
    key: bytes | None
    raw: bytes

    @property
    def data_type(self) -> str:
        """The data type the descriptor is for."""
        return self.descriptor.data_type

    def dead_letter(self, reason: str, message: str) -> DeadLetter:
        """Dead letter for this descriptor, as it arrived."""
        return DeadLetter(
            stage="model",
            reason=reason,
            message=message,
            topic=self.topic,
            partition=self.partition,
            offset=self.offset,
            key=self.key,
            value=self.raw,
            data_type=self.data_type,
        )


def runtime_key(sha256: str, declared_inputs: Iterable[str]) -> str:
    """Cache key of a runtime: the same bytes with other declared inputs are another model."""
    return sha256 + "|" + ",".join(declared_inputs)


class RuntimeCache:
    """Loaded runtimes of this process, by model digest and declared inputs: each model
    loads once per process.

    Shards of one data type share the session (onnxruntime and our PMML runtime are safe
    to call from several worker threads). Evicted runtimes are not closed: a shard may
    still hold one; garbage collection frees it when the last holder lets go.
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


def read_model_bytes(descriptor: pb.ModelDescriptor, model_dir: str) -> bytes:
    """The model bytes of a descriptor: inline, or read from an allowed file:// location."""
    which = descriptor.WhichOneof("source")
    if which == "model_bytes":
        return descriptor.model_bytes
    if which != "location":
        raise ModelError("no_model", "descriptor has neither model_bytes nor location")
    url = urlparse(descriptor.location)
    if url.scheme != "file" or url.netloc not in ("", "localhost"):
        raise ModelError(
            "location_rejected",
            f"location {descriptor.location!r}: only file:// locations are supported",
        )
    if not model_dir:
        raise ModelError(
            "location_rejected",
            f"location {descriptor.location!r}: no model directory is allowed "
            "(set WAXSERVE_MODEL_DIR)",
        )
    allowed = Path(model_dir).resolve()
    path = Path(unquote(url.path)).resolve()
    if not path.is_relative_to(allowed):
        raise ModelError(
            "location_rejected",
            f"location {descriptor.location!r} is outside the allowed model directory {allowed}",
        )
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ModelError("location_unreadable", f"{path}: {exc.strerror}") from None


def _reference(profile: pb.ReferenceProfile) -> DriftReference | None:
    """Drift reference from a descriptor's profile, over the features records have."""
    names, columns, edges, expected, means, stds = [], [], [], [], [], []
    for feature in profile.features:
        record_field = record_field_for(feature.name)
        if record_field is None:
            continue
        edge = np.asarray(feature.bin_edges, dtype=np.float64)
        fractions = np.asarray(feature.expected_fractions, dtype=np.float64)
        if len(fractions) != len(edge) + 1 or np.any(np.diff(edge) < 0):
            raise ModelError(
                "bad_profile",
                f"reference profile of {feature.name!r}: needs ascending bin_edges and "
                f"len(bin_edges) + 1 expected_fractions, got {len(edge)} and {len(fractions)}",
            )
        names.append(record_field)
        columns.append(WINE_FEATURES.index(record_field))
        edges.append(edge)
        expected.append(fractions)
        means.append(feature.mean)
        stds.append(feature.std)
    if not names:
        return None
    return DriftReference(
        features=tuple(names),
        columns=tuple(columns),
        edges=tuple(edges),
        expected=tuple(expected),
        means=np.asarray(means),
        stds=np.asarray(stds),
    )


def validate_descriptor(
    descriptor: pb.ModelDescriptor,
    *,
    model_dir: str,
    clock: Clock = time.time,
    onnx_threads: int = 1,
    cache: RuntimeCache = RUNTIMES,
) -> ModelInstall:
    """Check a descriptor end to end and load its model; ModelError says why not."""
    for name in ("name", "version", "data_type"):
        if not getattr(descriptor, name):
            raise ModelError("bad_descriptor", f"descriptor has no {name}")
    if descriptor.format not in FORMAT_NAMES:
        raise ModelError("unsupported_model", f"unknown model format {descriptor.format}")
    model_bytes = read_model_bytes(descriptor, model_dir)
    digest = sha256_hex(model_bytes)
    if digest != descriptor.sha256.lower():
        raise ModelError(
            "digest_mismatch",
            f"sha256 of the model bytes is {digest}, the descriptor says {descriptor.sha256!r}",
        )
    declared = tuple(descriptor.input_features)
    runtime = cache.load(digest, descriptor.format, model_bytes, declared, onnx_threads)
    fields = []
    for model_input in runtime.input_names:
        record_field = record_field_for(model_input)
        if record_field is None:
            raise ModelError(
                "bad_inputs",
                f"model input {model_input!r} matches no {descriptor.data_type} record field "
                f"(record fields: {', '.join(WINE_FEATURES)})",
            )
        fields.append(record_field)
    reference = (
        _reference(descriptor.reference_profile)
        if descriptor.HasField("reference_profile")
        else None
    )
    identity = ModelIdentity(
        data_type=descriptor.data_type,
        name=descriptor.name,
        version=descriptor.version,
        sha256=digest,
        description=descriptor.description,
        format=descriptor.format,
        # Stamped after loading: "installed at" is when the model could first serve.
        since_ms=int(clock() * 1000),
    )
    spec = ModelSpec(identity, tuple(fields), reference, descriptor.created_at_ms, declared)
    return ModelInstall(spec, model_bytes)


def model_event(
    kind: str,
    identity: ModelIdentity | None,
    now_ms: int,
    *,
    source: DescriptorIn | None = None,
    reason: str = "",
    message: str = "",
) -> pb.ModelEvent:
    """An events-topic message."""
    event = pb.ModelEvent(kind=kind, reason=reason, message=message, at_ms=now_ms)
    if identity is not None:
        event.data_type = identity.data_type
        event.model_name = identity.name
        event.model_version = identity.version
        event.model_sha256 = identity.sha256
    if source is not None:
        d = source.descriptor
        event.data_type = d.data_type
        event.model_name = event.model_name or d.name
        event.model_version = event.model_version or d.version
        event.model_sha256 = event.model_sha256 or d.sha256
        event.source_topic = source.topic
        event.source_partition = source.partition
        event.source_offset = source.offset
    return event


# --- the registry ------------------------------------------------------------------------


RegistryOut = ModelInstall | pb.ModelEvent | DeadLetter


@dataclass
class RegistryState:
    """What the registry snapshots: the serving model (with its bytes), and descriptors
    read but still loading, which a resume loads again."""

    current: ModelInstall | None = None
    loading: list[DescriptorIn] = field(default_factory=list)


_LOADER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="waxserve-model-load")
"""Loads ONNX models off the worker thread (a big model takes seconds), so the records of
every data type keep being scored meanwhile."""


class Registry:
    """Which model serves one data type. Touched only by descriptors, so it snapshots
    only when a model changes; it holds the model bytes so that whichever process
    resumes a shard can rebuild the model from them.

    Descriptors are validated and loaded in the background (PMML: on the worker), in
    arrival order; the old model serves until the new one is ready. `collect()` returns
    what has finished.
    """

    def __init__(
        self,
        state: RegistryState | ModelInstall | None,
        *,
        model_dir: str,
        clock: Clock = time.time,
        onnx_threads: int = 1,
    ) -> None:
        if not isinstance(state, RegistryState):  # None, or a snapshot from before loading
            state = RegistryState(state)
        self.current = state.current
        self.resumed = state.current is not None or bool(state.loading)
        self._model_dir = model_dir
        self._clock = clock
        self._onnx_threads = onnx_threads
        self._loading: collections.deque[tuple[DescriptorIn, Future[ModelInstall]]] = (
            collections.deque()
        )
        for item in state.loading:
            self._load(item)

    @property
    def loading(self) -> bool:
        """Whether descriptors are still being validated and loaded."""
        return bool(self._loading)

    def snapshot(self) -> RegistryState:
        """The registry's state for Bytewax's snapshots (immutable parts only)."""
        return RegistryState(self.current, [item for item, _ in self._loading])

    def _load(self, item: DescriptorIn) -> None:
        load = functools.partial(
            validate_descriptor,
            item.descriptor,
            model_dir=self._model_dir,
            clock=self._clock,
            onnx_threads=self._onnx_threads,
        )
        if item.descriptor.format != pb.MODEL_FORMAT_PMML:
            self._loading.append((item, _LOADER.submit(load)))
            return
        # PMML runs in an in-process JVM: a loader thread that called into it stays attached,
        # and the interpreter can crash at exit (seen: SIGSEGV after the tests). PMML loads
        # on the worker, as it always did.
        future: Future[ModelInstall] = Future()
        try:
            future.set_result(load())
        except Exception as exc:
            future.set_exception(exc)
        self._loading.append((item, future))

    def on_descriptors(self, items: Iterable[DescriptorIn]) -> list[RegistryOut]:
        """Start loading descriptors; returns whatever has finished loading already."""
        for item in items:
            self._load(item)
        return self.collect()

    def collect(self, *, wait: bool = False) -> list[RegistryOut]:
        """Installs and rejections of the descriptors that finished, in arrival order
        (with `wait`, of all of them)."""
        out: list[RegistryOut] = []
        while self._loading and (wait or self._loading[0][1].done()):
            item, future = self._loading.popleft()
            try:
                install = future.result()
            except ModelError as exc:
                out.extend(self._rejected(item, exc))
            else:
                out.extend(self._installed(item, install))
        return out

    def _rejected(self, item: DescriptorIn, exc: ModelError) -> list[RegistryOut]:
        now_ms = int(self._clock() * 1000)
        metrics.MODEL_REJECTIONS.labels(item.data_type, exc.reason).inc()
        log.warning(
            "rejected model %s:%s for %s: %s",
            item.descriptor.name,
            item.descriptor.version,
            item.data_type,
            exc,
        )
        return [
            item.dead_letter(exc.reason, str(exc)),
            model_event("rejected", None, now_ms, source=item, reason=exc.reason, message=str(exc)),
        ]

    def _installed(self, item: DescriptorIn, install: ModelInstall) -> list[RegistryOut]:
        self.current = install
        identity = install.spec.identity
        log.info(
            "installed model %s:%s (%s) for %s",
            identity.name,
            identity.version,
            identity.sha256[:12],
            item.data_type,
        )
        metrics.MODEL_INSTALLS.labels(item.data_type).inc()
        metrics.model_installed(
            identity.data_type, identity.name, identity.version, identity.sha256, identity.format
        )
        return [install, model_event("installed", identity, identity.since_ms, source=item)]

    def on_resume(self) -> list[RegistryOut]:
        """After a resume: re-send the current model so every shard can rebuild it."""
        self.resumed = False
        if self.current is None:
            return []
        restored = ModelInstall(self.current.spec, self.current.model_bytes, restored=True)
        identity = restored.spec.identity
        metrics.model_installed(
            identity.data_type, identity.name, identity.version, identity.sha256, identity.format
        )
        now_ms = int(self._clock() * 1000)
        return [restored, model_event("restored", restored.spec.identity, now_ms)]


# --- the shard scorer -------------------------------------------------------------------


@dataclass
class ScoredBatch:
    """Scored-topic messages from one model call."""

    route: str  # "<topic>/<partition>" of the input: output of a partition stays together
    messages: list[OutMessage]


ShardOut = ScoredBatch | DeadLetter | StatsPartial | DriftPartial


@dataclass
class ShardState:
    """What a shard snapshots: the model's identity (not its bytes), open windows, and
    records held while no model is loaded (before the first model arrives, or after a
    resume until the registry re-sends it)."""

    spec: ModelSpec | None = None
    stats: dict[tuple[ModelIdentity, int], StatsPartial] = field(default_factory=dict)
    drift: dict[tuple[ModelIdentity, int], DriftPartial] = field(default_factory=dict)
    pending: list[RecordColumns] = field(default_factory=list)
    pending_since_ms: int = 0

    @property
    def pending_count(self) -> int:
        """Records held."""
        return sum(len(run) for run in self.pending)


def _labelled_quality(
    prediction: Prediction, labels: np.ndarray
) -> tuple[int, float, int | None] | None:
    """(labelled records, sum of squared errors, correct classifications or None for
    regressors) over the valid predictions of records that carry a label."""
    labelled = prediction.valid & ~np.isnan(labels)
    n = int(labelled.sum())
    if n == 0:
        return None
    values, truth = prediction.values[labelled], labels[labelled]
    # A classifier's value is its label as a number, NaN when the label is not numeric.
    numeric = ~np.isnan(values)
    squared_error = float(np.square(values[numeric] - truth[numeric]).sum())
    correct = int((values == truth).sum()) if prediction.labels is not None else None
    return n, squared_error, correct


def _missing_message(features: Iterable[str], row_missing: np.ndarray) -> str:
    names = [name for name, missing in zip(features, row_missing, strict=True) if missing]
    return f"record lacks feature(s) the model needs: {', '.join(names)}"


class ShardScorer:
    """Scores the records of one shard with the model the registry last installed."""

    def __init__(
        self,
        state: ShardState | None,
        *,
        stats_interval_s: float,
        drift_window_s: float,
        no_model_wait_s: float = 30.0,
        max_pending: int = 100_000,
        clock: Clock = time.time,
        onnx_threads: int = 1,
        monitoring: bool = True,
        cache: RuntimeCache = RUNTIMES,
        process_state: ProcessState = PROCESS_STATE,
    ) -> None:
        self.state = state if state is not None else ShardState()
        self._monitoring = monitoring
        self._stats_ms = int(stats_interval_s * 1000)
        self._drift_ms = int(drift_window_s * 1000)
        self._wait_ms = int(no_model_wait_s * 1000)
        self._scored_by = f"{socket.gethostname()}/{os.getpid()}"
        self._max_pending = max_pending
        self._clock = clock
        self._onnx_threads = onnx_threads
        self._cache = cache
        self._process_state = process_state
        self._serving_identity: ModelIdentity | None = None  # as process_state knows it
        # Resumed with a model but no session: wait for the registry to re-send it.
        self.runtime: ModelRuntime | None = None
        if self.state.spec is not None:
            self.runtime = cache.get(self.state.spec.runtime_key)

    # The one entry point: values in arrival order.
    def on_values(self, values: Iterable[ModelInstall | RecordColumns]) -> list[ShardOut]:
        """Install models and score records in the order they arrived."""
        out: list[ShardOut] = []
        for value in values:
            if isinstance(value, ModelInstall):
                out.extend(self._install(value))
            else:
                out.extend(self._score_or_hold(value))
        return out

    def _install(self, install: ModelInstall) -> list[ShardOut]:
        spec = install.spec
        try:
            runtime = self._cache.load(
                spec.identity.sha256,
                spec.identity.format,
                install.model_bytes,
                spec.declared_inputs,
                self._onnx_threads,
            )
        except ModelError as exc:
            # The registry loaded it, so this is local (e.g. memory); keep the old model.
            log.error(
                "shard could not load %s:%s: %s", spec.identity.name, spec.identity.version, exc
            )
            return []
        current = self.state.spec
        if install.restored and current is not None and current.identity != spec.identity:
            # The registry re-sent its model after a resume; the shard's snapshot is the
            # same epoch, so they agree unless state was lost. Trust the registry.
            log.warning("shard had %s, registry restored %s", current.identity, spec.identity)
        self._process_state.installed(spec.identity, self._serving_identity)
        self._serving_identity = spec.identity
        self.state.spec = spec
        self.runtime = runtime
        out: list[ShardOut] = []
        pending, self.state.pending = self.state.pending, []
        for run in pending:
            out.extend(self._score(run))
        return out

    def _score_or_hold(self, run: RecordColumns) -> list[ShardOut]:
        if self.runtime is not None:
            return self._score(run)
        # No model loaded yet: on a fresh start records can outrun the descriptor, and
        # after a resume the registry re-sends the model a moment later. Hold them, within
        # bounds; past those they are dead letters, not lost.
        state = self.state
        if not state.pending:
            state.pending_since_ms = int(self._clock() * 1000)
        state.pending.append(run)
        if state.pending_count > self._max_pending:
            return self.release_held(force=True)
        return []

    def release_held(self, *, force: bool = False) -> list[ShardOut]:
        """Dead-letter held records once they have waited too long for a model."""
        state = self.state
        if not state.pending or self.runtime is not None:
            return []
        waited = int(self._clock() * 1000) - state.pending_since_ms
        if not force and waited < self._wait_ms:
            return []
        pending, state.pending = state.pending, []
        message = (
            f"no model installed for data type {pending[0].data_type!r} "
            f"(waited {waited / 1000:.1f} s)"
        )
        return [
            run.dead_letter(i, "score", "no_model", message)
            for run in pending
            for i in range(len(run))
        ]

    def _score(self, run: RecordColumns) -> list[ShardOut]:
        spec, runtime = self.state.spec, self.runtime
        assert spec is not None and runtime is not None
        out: list[ShardOut] = []
        x = run.features[:, spec.columns]
        missing = np.isnan(x)
        incomplete = missing.any(axis=1)
        if incomplete.any():
            for i in np.flatnonzero(incomplete):
                out.append(
                    run.dead_letter(
                        int(i),
                        "score",
                        "missing_feature",
                        _missing_message(spec.input_features, missing[i]),
                    )
                )
            run = run.take(~incomplete)
            x = x[~incomplete]
        if len(run) == 0:
            return out
        started = time.perf_counter()
        try:
            prediction = runtime.predict(np.ascontiguousarray(x))
        except Exception as exc:  # a model failure must not take the dataflow down
            log.exception("model %s:%s failed", spec.identity.name, spec.identity.version)
            message = f"model call failed: {type(exc).__name__}: {exc}"
            return out + [
                run.dead_letter(i, "score", "score_failed", message) for i in range(len(run))
            ]
        elapsed = time.perf_counter() - started
        now_ms = int(self._clock() * 1000)
        if not prediction.valid.all():
            for i in np.flatnonzero(~prediction.valid):
                out.append(
                    run.dead_letter(
                        int(i),
                        "score",
                        "invalid_prediction",
                        "model returned no usable prediction (NaN)",
                    )
                )
        messages = self._messages(run, spec, prediction, elapsed, now_ms)
        out.append(ScoredBatch(f"{run.topic}/{run.partition}", messages))
        valid = prediction.valid
        scored = int(valid.sum())
        all_valid = scored == len(run)
        identity = spec.identity
        model_labels = (run.data_type, identity.name, identity.version)
        metrics.RECORDS_SCORED.labels(*model_labels).inc(scored)
        metrics.SCORING_LATENCY.labels(run.data_type, identity.name).observe(elapsed / len(run))
        metrics.BATCH_SIZE.labels(run.data_type).observe(len(run))
        metrics.END_TO_END_LAG.observe_many(
            (run.data_type,), (now_ms - run.event_time_ms[valid]) / 1000.0
        )
        quality = _labelled_quality(prediction, run.labels)
        if quality is not None:
            metrics.LABELLED_RECORDS.labels(*model_labels).inc(quality[0])
            metrics.SQUARED_ERROR.labels(*model_labels).inc(quality[1])
            if quality[2] is not None:
                metrics.CORRECT_PREDICTIONS.labels(*model_labels).inc(quality[2])
        self._process_state.scored(identity, scored, elapsed, quality)
        if not self._monitoring:
            return out
        start = window_start(now_ms, self._stats_ms)
        stats = self.state.stats.get((identity, start))
        if stats is None:
            stats = self.state.stats[(identity, start)] = StatsPartial(
                identity, start, start + self._stats_ms, StatsAccumulator()
            )
        stats.stats.add_call(scored, elapsed)
        if quality is not None:
            stats.stats.add_labelled(*quality)
        if spec.reference is not None:
            start = window_start(now_ms, self._drift_ms)
            drift = self.state.drift.get((identity, start))
            if drift is None:
                drift = self.state.drift[(identity, start)] = DriftPartial(
                    identity,
                    spec.reference,
                    start,
                    start + self._drift_ms,
                    DriftAccumulator.empty(spec.reference),
                )
            drift.drift.add(spec.reference, run.features if all_valid else run.features[valid])
        return out

    def _messages(
        self,
        run: RecordColumns,
        spec: ModelSpec,
        prediction: Prediction,
        elapsed: float,
        now_ms: int,
    ) -> list[OutMessage]:
        identity = spec.identity
        n = len(run)
        # Every record of this call shares these fields: serialized once (dataflows/wire.py).
        shared = pb.ScoredRecord(
            data_type=run.data_type,
            source_topic=run.topic,
            source_partition=run.partition,
            model_name=identity.name,
            model_version=identity.version,
            model_sha256=identity.sha256,
            scoring_latency_us=elapsed / n * 1e6,
            scored_at_ms=now_ms,
            batch_size=n,
            scored_by=self._scored_by,
        ).SerializeToString()
        rows = None if prediction.valid.all() else np.flatnonzero(prediction.valid)
        offsets = run.offsets if rows is None else run.offsets[rows]
        event_times = run.event_time_ms if rows is None else run.event_time_ms[rows]
        values = prediction.values if rows is None else prediction.values[rows]
        record_ids = run.record_ids if rows is None else [run.record_ids[i] for i in rows]
        keys = wire.output_keys(
            run.topic, run.partition, identity.name, identity.version, offsets.tolist()
        )
        if prediction.labels is None:
            encoded = wire.regression_records(
                shared, keys, record_ids, offsets, event_times, values
            )
        else:  # a classifier's value is optional: protobuf writes it with the label
            numbers = [
                own + extra
                for own, extra in zip(
                    wire.numeric_fields(offsets, event_times, None),
                    self._classifier_fields(prediction, rows, values),
                    strict=True,
                )
            ]
            encoded = wire.scored_record_values(shared, keys, record_ids, numbers)
        # No content-type header: the scored topic carries ScoredRecord protobuf only, and
        # a header costs ~1 µs a record to produce (bench/README.md).
        return list(zip(keys, encoded, itertools.repeat(None)))

    @staticmethod
    def _classifier_fields(
        prediction: Prediction, rows: np.ndarray | None, values: np.ndarray
    ) -> list[bytes]:
        """Per record, the encoded label, probabilities and (numeric labels) value."""
        assert prediction.labels is not None
        labels = prediction.labels if rows is None else [prediction.labels[i] for i in rows]
        probabilities = prediction.probabilities
        if probabilities is not None and rows is not None:
            probabilities = probabilities[rows]
        class_labels = prediction.class_labels
        per_row = probabilities.tolist() if probabilities is not None else None
        out = []
        for i, value in enumerate(values.tolist()):
            own = pb.ScoredRecord(label=labels[i])
            if not math.isnan(value):
                own.value = value
            if per_row is not None:
                own.probabilities.update(
                    (label, p) for label, p in zip(class_labels, per_row[i], strict=True) if p == p
                )
            out.append(own.SerializeToString())
        return out

    def close_windows(self, *, everything: bool = False) -> list[ShardOut]:
        """Partials for windows that have ended (all open windows when `everything`)."""
        now_ms = int(self._clock() * 1000)
        out: list[ShardOut] = []
        for key, stats in list(self.state.stats.items()):
            if everything or stats.window_end_ms <= now_ms:
                out.append(self.state.stats.pop(key))
        for key, drift in list(self.state.drift.items()):
            if everything or drift.window_end_ms <= now_ms:
                out.append(self.state.drift.pop(key))
        return out

    def next_wakeup_s(self) -> float | None:
        """When the earliest open window ends or held records time out, in epoch seconds."""
        ends = [p.window_end_ms for p in self.state.stats.values()]
        ends += [p.window_end_ms for p in self.state.drift.values()]
        if self.state.pending and self.runtime is None:
            ends.append(self.state.pending_since_ms + self._wait_ms)
        return min(ends) / 1000 if ends else None
