"""The shard scorer: the per-batch logic of the `serve` step, without Bytewax.

A shard ("<data_type>#<n>") receives, in arrival order, the contract and models its data
type's registry installs and the raw record runs of its source partitions. It holds the
contract and the model; a run is decoded with the contract's codecs and scored with one
vectorized model call. Runs that arrive before their data type's contract or model wait
(`HeldRecords`), within bounds. Windows of stats and drift are `ShardWindows`; the scored
records' bytes come from `dataflows.scoring.scored`; metrics and queryable state hear about it
through events.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from dataflows.contracts.schema import Contract
from dataflows.control.registry import (
    CODECS,
    DEFAULT_MAX_DATA_TYPES,
    MODEL_LOADER,
    RUNTIMES,
    SHARD_DATA_TYPES,
    CodecCache,
    ContractInstall,
    DataTypeTable,
    Install,
    ModelInstall,
    ModelSpec,
    PlanInstall,
    RestoredInstall,
    RuntimeCache,
)
from dataflows.core.events import (
    NO_EVENTS,
    BatchScored,
    EventBus,
    ModelServing,
    ModelStopped,
    Quality,
    RecordsReceived,
    ShadowCompared,
)
from dataflows.core.reasons import Reason, Stage
from dataflows.core.records import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DeadLetter,
    EncodedKeys,
    OutMessage,
    RawRun,
    RecordColumns,
    record_columns,
)
from dataflows.monitoring.feedback import Feedback, FeedbackRun, LabelBatch, PredictionBatch
from dataflows.monitoring.quality import MAX_LABEL_MAGNITUDE
from dataflows.monitoring.windows import (
    AgreementAccumulator,
    DriftAccumulator,
    DriftPartial,
    ModelIdentity,
    StatsAccumulator,
    StatsPartial,
    window_start,
)
from dataflows.rollout.assign import assign, entity_points
from dataflows.rollout.ensemble import EnsembleError, combine
from dataflows.rollout.guards import (
    NO_CANARY_GUARDS,
    CanaryGuards,
    GuardCounts,
    disagreements,
    label_scale,
)
from dataflows.rollout.plans import ServingPlan, model_key
from dataflows.runtimes import ModelRuntime, Prediction
from dataflows.scoring.scored import lineage_field, plan_field, scored_messages
from protos import waxserve_pb2 as pb

log = logging.getLogger(__name__)

Clock = Callable[[], float]

PENDING_POLL_S = 0.005
"""How often a shard looks whether a model loading in the background is ready."""


@dataclass
class ScoredBatch:
    """Scored-topic messages from one model call."""

    route: str  # "<topic>/<partition>" of the input: output of a partition stays together
    messages: list[OutMessage]
    # The input offset of each message, ascending: what exactly-once output fences on.
    offsets: list[int]
    data_type: str
    shadow: bool = False  # a shadow model's output: the shadow topic, not the scored one


ShardOut = (
    ScoredBatch
    | DeadLetter
    | StatsPartial
    | DriftPartial
    | PredictionBatch
    | LabelBatch
    | GuardCounts
)


# --- state -------------------------------------------------------------------------------


@dataclass
class DataTypeState:
    """One data type on one shard: its contract and model (identities, not bytes), and the
    runs waiting for them."""

    contract: Contract | None = None
    spec: ModelSpec | None = None  # the active model (the plan's first when none is)
    held: list[RawRun] = field(default_factory=list)
    held_since_ms: int = 0
    plan: ServingPlan | None = None  # None: `spec` alone
    models: dict[str, ModelSpec] = field(default_factory=dict)  # the plan's, by key


@dataclass
class ShardState:
    """What a shard snapshots."""

    data_types: dict[str, DataTypeState] = field(default_factory=dict)
    stats: dict[tuple[ModelIdentity, int], StatsPartial] = field(default_factory=dict)
    drift: dict[tuple[ModelIdentity, int], DriftPartial] = field(default_factory=dict)

    def snapshot(self) -> ShardState:
        """A copy for Bytewax: windows are mutated in place while scoring. Contracts and
        model specs are immutable and shared; every other field is copied, whatever it is."""
        return copy.deepcopy(self)


# --- the pieces --------------------------------------------------------------------------


@dataclass(frozen=True)
class Binding:
    """A model bound to a contract's column layout: which columns feed it."""

    spec: ModelSpec
    runtime: ModelRuntime
    numeric_columns: list[int]  # numeric matrix columns, in the runtime's numeric order
    text_columns: list[int]
    text_names: list[str]
    categories: list[frozenset[str] | None]  # per text feature, what the model knows
    reference_columns: list[int] | None  # drift: numeric columns of the reference's features
    reference_text_columns: list[int] | None  # drift: text columns of its categorical ones
    lineage: bytes = b""  # every scored record's encoded lineage (scored.lineage_field)

    @classmethod
    def of(cls, spec: ModelSpec, runtime: ModelRuntime, contract: Contract) -> Binding:
        """Bind; KeyError when the contract lacks a field the model reads (the registry
        refuses such contracts, so this is a bug if it happens)."""
        numeric, text, names, categories = [], [], [], []
        for feature, name in zip(spec.features, spec.input_fields, strict=True):
            column = contract.columns[name]
            if feature.kind == "numeric":
                numeric.append(column.index)
            else:
                text.append(column.index)
                names.append(name)
                categories.append(
                    frozenset(feature.categories) if feature.categories is not None else None
                )
        reference = reference_text = None
        if spec.reference is not None:
            reference = [contract.columns[f].index for f in spec.reference.features]
            reference_text = [contract.columns[f].index for f in spec.reference.text_features]
        lineage = lineage_field(spec, contract.version)
        return cls(
            spec, runtime, numeric, text, names, categories, reference, reference_text, lineage
        )


def model_key_of(spec: ModelSpec | None) -> str:
    """The key plans name a model by ("<name>:<version>")."""
    assert spec is not None
    return model_key(spec.identity.name, spec.identity.version)


def _loaded(runtime: ModelRuntime) -> Future[ModelRuntime]:
    future: Future[ModelRuntime] = Future()
    future.set_result(runtime)
    return future


@dataclass(frozen=True)
class Route:
    """A data type's plan with its models bound: how one batch of its records is scored."""

    plan: ServingPlan
    bindings: dict[str, Binding]  # by model key, in the plan's order
    extras: dict[str, bytes]  # by model key: the encoded policy, plan number and role
    weights: list[float]  # splits: the variants' shares, in the plan's order

    @classmethod
    def of(
        cls,
        plan: ServingPlan,
        specs: dict[str, ModelSpec],
        runtimes: dict[str, ModelRuntime],
        contract: Contract,
    ) -> Route:
        """Bind the plan's models to the contract (KeyError: it lacks a field one reads)."""
        bindings, extras = {}, {}
        for variant in plan.variants:
            binding = Binding.of(specs[variant.model], runtimes[variant.model], contract)
            bindings[variant.model] = binding
            extras[variant.model] = plan_field(plan, variant.role)
        return cls(plan, bindings, extras, [v.weight for v in plan.variants])

    @property
    def primary(self) -> Binding:
        """The binding of the active model (the plan's first when none is)."""
        return self.bindings[self.plan.active or self.plan.models[0]]


def _aligned(offsets: np.ndarray, own: np.ndarray, prediction: Prediction) -> Prediction:
    """A member's prediction on the rows at `offsets` (invalid where it scored none)."""
    if own is offsets or (len(own) == len(offsets) and np.array_equal(own, offsets)):
        return prediction  # it scored the same rows (the usual case): nothing to align
    position = {o: i for i, o in enumerate(own.tolist())}
    rows = np.array([position.get(o, -1) for o in offsets.tolist()], dtype=np.int64)
    have = rows >= 0
    take = np.where(have, rows, 0)
    values = np.where(have, prediction.values[take], np.nan)
    labels = None
    if prediction.labels is not None:
        labels = [prediction.labels[r] if r >= 0 else "" for r in rows.tolist()]
    probabilities = None
    if prediction.probabilities is not None:
        probabilities = prediction.probabilities[take].copy()
        probabilities[~have] = np.nan
    valid = have & prediction.valid[take]
    return Prediction(values, labels, probabilities, prediction.class_labels, valid)


def _unscored(n: int) -> Prediction:
    return Prediction(np.full(n, np.nan), None, None, (), np.zeros(n, dtype=bool))


def _member_fields(
    keys: tuple[str, ...], route: Route, members: list[Prediction], valid: np.ndarray
) -> list[bytes]:
    """Per output record (the valid rows), its members' outputs as encoded
    `ScoredRecord.members`."""
    out = []
    for row in np.flatnonzero(valid).tolist():
        record = pb.ScoredRecord()
        for key, member in zip(keys, members, strict=True):
            identity = route.bindings[key].spec.identity
            output = record.members.add(model_name=identity.name, model_version=identity.version)
            if member.valid[row]:
                if not math.isnan(member.values[row]):
                    output.value = float(member.values[row])
                if member.labels is not None:
                    output.label = member.labels[row]
                if member.probabilities is not None:
                    output.probabilities.update(
                        (c, float(p))
                        for c, p in zip(member.class_labels, member.probabilities[row], strict=True)
                        if p == p
                    )
        out.append(record.SerializeToString())
    return out


class HeldBudget:
    """What every shard of the process holds for a contract or model, by records and bytes.

    Shard keys multiply with data types, so a bound per shard bounds nothing: the bound is
    per process. Each `HeldRecords` keeps its own counts; the budget adds up the live ones
    (weakly referenced: a shard dropped without releasing its records stops counting).
    """

    def __init__(self) -> None:
        self._holders: weakref.WeakSet[HeldRecords] = weakref.WeakSet()
        self._lock = threading.Lock()

    def update(self, held: HeldRecords) -> None:
        """`held` changed what it holds."""
        with self._lock:
            if held.records:
                self._holders.add(held)
            else:
                self._holders.discard(held)

    def total(self) -> tuple[int, int]:
        """Records and bytes held in the process."""
        with self._lock:
            holders = list(self._holders)
        return sum(h.records for h in holders), sum(h.bytes for h in holders)


HELD = HeldBudget()
"""The process's held records budget."""


class HeldRecords:
    """Runs that wait for their data type's contract or model, within bounds: past the wait
    they are dead letters (no_contract or no_model); past the process's limits (records or
    bytes, `HeldBudget`) the newest are dead letters at once (held_overflow). None is lost."""

    def __init__(
        self,
        wait_ms: int,
        max_records: int,
        max_bytes: int,
        clock: Clock,
        budget: HeldBudget | None = None,
    ) -> None:
        self._wait_ms = wait_ms
        self._max_records = max_records
        self._max_bytes = max_bytes
        self._clock = clock
        self._budget = budget if budget is not None else HELD
        self.records = 0  # what this shard holds
        self.bytes = 0

    def restored(self, state: ShardState) -> None:
        """Count what a restored snapshot holds (it stays, whatever the limits are now)."""
        runs = [run for dt in state.data_types.values() for run in dt.held]
        self.records = sum(map(len, runs))
        self.bytes = sum(run.size_bytes for run in runs)
        self._budget.update(self)

    def hold(self, dt: DataTypeState, run: RawRun) -> list[DeadLetter]:
        """Hold a run; dead letters instead when the process holds too much already."""
        size = run.size_bytes
        records, nbytes = self._budget.total()
        if records + len(run) > self._max_records or nbytes + size > self._max_bytes:
            what = "contract" if dt.contract is None else "model"
            return run.dead_letters(
                Stage.SCORE,
                Reason.HELD_OVERFLOW,
                f"no {what} for data type {run.data_type!r} yet, and this process "
                f"already holds {records:,} records ({nbytes:,} bytes) waiting for one "
                f"(max_held_records {self._max_records:,}, max_held_bytes "
                f"{self._max_bytes:,})",
            )
        if not dt.held:
            dt.held_since_ms = int(self._clock() * 1000)
        dt.held.append(run)
        self.records += len(run)
        self.bytes += size
        self._budget.update(self)
        return []

    def take(self, dt: DataTypeState) -> list[RawRun]:
        """The data type's held runs, no longer held."""
        held, dt.held = dt.held, []
        if held:
            self.records -= sum(map(len, held))
            self.bytes -= sum(run.size_bytes for run in held)
            self._budget.update(self)
        return held

    def release(self, dt: DataTypeState, *, force: bool = False) -> list[DeadLetter]:
        """Dead-letter the data type's held runs once they have waited too long (`force`:
        now, as when the input ended)."""
        if not dt.held:
            return []
        waited = int(self._clock() * 1000) - dt.held_since_ms
        if not force and waited < self._wait_ms:
            return []
        held = self.take(dt)
        data_type = held[0].data_type
        if dt.contract is None:
            reason = Reason.NO_CONTRACT
            message = f"no contract installed for data type {data_type!r}"
        else:
            reason = Reason.NO_MODEL
            message = f"no model installed for data type {data_type!r}"
        how = f"waited {waited / 1000:.1f} s" + (" until the input ended" if force else "")
        return [
            d for run in held for d in run.dead_letters(Stage.SCORE, reason, f"{message} ({how})")
        ]

    def due_ms(self, dt: DataTypeState) -> int | None:
        """When the data type's held runs time out."""
        return dt.held_since_ms + self._wait_ms if dt.held else None


class ShardWindows:
    """Stats and drift partials of a shard, per model and tumbling window."""

    def __init__(self, stats_ms: int, drift_ms: int, clock: Clock) -> None:
        self._stats_ms = stats_ms
        self._drift_ms = drift_ms
        self._clock = clock

    def add(
        self,
        state: ShardState,
        binding: Binding,
        now_ms: int,
        scored: int,
        seconds: float,
        quality: Quality | None,
        numeric: np.ndarray,
        text: np.ndarray,
    ) -> None:
        """Count one model call in its windows; `numeric` and `text` are the scored
        records' rows."""
        identity = binding.spec.identity
        self.add_stats(state, identity, now_ms, scored, seconds, quality)
        reference = binding.spec.reference
        if reference is None or binding.reference_columns is None:
            return
        start = window_start(now_ms, self._drift_ms)
        drift = state.drift.get((identity, start))
        if drift is None:
            drift = state.drift[(identity, start)] = DriftPartial(
                identity,
                reference,
                start,
                start + self._drift_ms,
                DriftAccumulator.empty(reference),
            )
        categorical = None
        if binding.reference_text_columns:
            categorical = text[:, binding.reference_text_columns]
        drift.drift.add(reference, numeric[:, binding.reference_columns], categorical)

    def add_stats(
        self,
        state: ShardState,
        identity: ModelIdentity,
        now_ms: int,
        scored: int,
        seconds: float,
        quality: Quality | None,
    ) -> None:
        """Count one call (a model's or an ensemble's) in its stats window."""
        start = window_start(now_ms, self._stats_ms)
        stats = state.stats.get((identity, start))
        if stats is None:
            stats = state.stats[(identity, start)] = StatsPartial(
                identity, start, start + self._stats_ms, StatsAccumulator()
            )
        stats.stats.add_call(scored, seconds)
        if quality is not None:
            quality.add_to(stats.stats)

    def add_agreement(
        self,
        state: ShardState,
        shadow: ModelIdentity,
        now_ms: int,
        agreement: AgreementAccumulator,
    ) -> None:
        """Count a shadow's agreement with the active model in the shadow's stats window."""
        start = window_start(now_ms, self._stats_ms)
        stats = state.stats.get((shadow, start))
        if stats is None:
            stats = state.stats[(shadow, start)] = StatsPartial(
                shadow, start, start + self._stats_ms, StatsAccumulator()
            )
        if stats.stats.agreement is None:
            stats.stats.agreement = agreement
        else:
            stats.stats.agreement.merge(agreement)

    def add_outputs(
        self,
        state: ShardState,
        binding: Binding,
        now_ms: int,
        prediction: Prediction,
        labels: np.ndarray,
    ) -> None:
        """Count one model call's valid predictions, and the labels of those records, in
        the drift window `add` opened for it (when the reference profiles them)."""
        reference = binding.spec.reference
        if reference is None or (reference.prediction is None and reference.label is None):
            return
        drift = state.drift.get((binding.spec.identity, window_start(now_ms, self._drift_ms)))
        if drift is None:
            return
        valid = prediction.valid
        everything = bool(valid.all())
        outputs: np.ndarray | list[str] | None = prediction.values
        reference_prediction = reference.prediction
        if reference_prediction is not None and reference_prediction.categorical:
            outputs = prediction.labels  # a classifier's classes
        if outputs is not None and not everything:
            outputs = np.asarray(outputs, dtype=object if isinstance(outputs, list) else None)
            outputs = outputs[valid]
        drift.drift.add_outputs(reference, outputs, labels if everything else labels[valid])

    def close(self, state: ShardState, *, everything: bool = False) -> list[ShardOut]:
        """Partials for windows that have ended (all open windows when `everything`)."""
        now_ms = int(self._clock() * 1000)
        out: list[ShardOut] = []
        for key, stats in list(state.stats.items()):
            if everything or stats.window_end_ms <= now_ms:
                out.append(state.stats.pop(key))
        for key, drift in list(state.drift.items()):
            if everything or drift.window_end_ms <= now_ms:
                out.append(state.drift.pop(key))
        return out

    @staticmethod
    def next_end_ms(state: ShardState) -> int | None:
        """When the earliest open window ends."""
        ends = [p.window_end_ms for p in state.stats.values()]
        ends += [p.window_end_ms for p in state.drift.values()]
        return min(ends, default=None)


def labelled_quality(prediction: Prediction, labels: np.ndarray) -> Quality | None:
    """Online quality over the valid predictions of records that carry a label."""
    if labels.dtype == object:  # a text label: classifiers only
        has_label = _present(labels) & prediction.valid
        n = int(has_label.sum())
        if n == 0 or prediction.labels is None:
            return None
        predicted = np.asarray(prediction.labels, dtype=object)[has_label]
        right = int((predicted == labels[has_label]).sum())
        return Quality(n, 0.0, 0, right)
    labelled = prediction.valid & ~np.isnan(labels)
    n = int(labelled.sum())
    if n == 0:
        return None
    values, truth = prediction.values[labelled], labels[labelled]
    # A classifier's value is its label as a number, NaN when the label is not numeric.
    # Predictions beyond ±MAX_LABEL_MAGNITUDE are left out of the squared error: with the
    # labels bounded too, no sum of squares can overflow (4e24 each, at most).
    numeric = (np.abs(values) <= MAX_LABEL_MAGNITUDE) & (np.abs(truth) <= MAX_LABEL_MAGNITUDE)
    squared_error = float(np.square(values[numeric] - truth[numeric]).sum())
    correct = int((values == truth).sum()) if prediction.labels is not None else None
    return Quality(n, squared_error, int(numeric.sum()), correct)


def _present(values: np.ndarray) -> np.ndarray:
    """Where an object array holds a value (not None), elementwise."""
    return np.frompyfunc(lambda v: v is not None, 1, 1)(values).astype(bool)


def _missing_message(names: list[str], row_missing: np.ndarray) -> str:
    lacking = [name for name, missing in zip(names, row_missing, strict=True) if missing]
    return f"record lacks feature(s) the model needs: {', '.join(lacking)}"


# --- the scorer --------------------------------------------------------------------------


class ShardScorer:
    """Decodes and scores the records of one shard with each data type's installed model.

    Limits: records of a data type with no contract or model yet are held within the
    process's `max_held_records`/`max_held_bytes` (`HeldBudget`); a data type this
    process's shards do not hold yet is refused (too_many_data_types) while they hold
    `max_data_types` others (`data_types`); dead letters fit in `max_message_bytes`.
    """

    def __init__(
        self,
        state: ShardState | None,
        *,
        stats_interval_s: float,
        drift_window_s: float,
        no_model_wait_s: float = 30.0,
        max_held_records: int = 100_000,
        max_held_bytes: int = 64 << 20,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_data_types: int = DEFAULT_MAX_DATA_TYPES,
        clock: Clock = time.time,
        onnx_threads: int = 1,
        monitoring: bool = True,
        events: EventBus = NO_EVENTS,
        cache: RuntimeCache = RUNTIMES,
        codecs: CodecCache = CODECS,
        data_types: DataTypeTable = SHARD_DATA_TYPES,
        held_budget: HeldBudget | None = None,
        feedback: Feedback | None = None,
        loader: Executor = MODEL_LOADER,
        canary_guards: CanaryGuards = NO_CANARY_GUARDS,
    ) -> None:
        self.state = state if state is not None else ShardState()
        # What a canary's records are measured by for its label-free guards.
        self._canary_guards = canary_guards
        # Models this process has not loaded yet (its registry runs in another process):
        # loading on `loader` while the old model serves, per data type the newest install.
        self._loader = loader
        self._pending: dict[str, RestoredInstall] = {}
        self._monitoring = monitoring
        # Delayed labels: which data types keep predictions, and how labels are keyed.
        self._feedback = feedback if feedback is not None else Feedback((), 1)
        self._scored_by = f"{socket.gethostname()}/{os.getpid()}"
        self._clock = clock
        self._onnx_threads = onnx_threads
        self._events = events
        self._cache = cache
        self._codecs = codecs
        self._max_message_bytes = max_message_bytes
        self._max_data_types = max_data_types
        self._data_types = data_types
        for name in self.state.data_types:  # a snapshot's data types stay, whatever the limit
            data_types.admit(name, self, None)
        self._held = HeldRecords(
            int(no_model_wait_s * 1000), max_held_records, max_held_bytes, clock, held_budget
        )
        self._held.restored(self.state)
        self._windows = ShardWindows(
            int(stats_interval_s * 1000), int(drift_window_s * 1000), clock
        )
        # Per data type, how its records are scored: the plan with its models bound to the
        # contract's layout; rebuilt from the cache after a resume, or when the registry
        # re-sends the plan.
        self._routes: dict[str, Route] = {}
        for data_type, dt in self.state.data_types.items():
            if dt.contract is None or not dt.models:
                continue
            plan = dt.plan or ServingPlan.single(model_key_of(dt.spec))
            runtimes = {k: cache.get(spec.runtime_key) for k, spec in dt.models.items()}
            if all(r is not None for r in runtimes.values()):
                self._route(data_type, dt, plan, dt.models, cast(dict[str, ModelRuntime], runtimes))
            else:
                self._take_up_restored(data_type)

    def _take_up_restored(self, data_type: str) -> None:
        """Serve the plan the registry re-sent after the resume, if a shard logic that
        Bytewax replaced by this restored one received it (`RuntimeCache.note_restored`)."""
        restored = self._cache.restored_model(data_type)
        if restored is None:
            return  # the registry's re-send is still to come: it installs here as usual
        self._pending[data_type] = restored

    # The one entry point: values in arrival order.
    def on_values(self, values: Iterable[Install | RawRun]) -> list[ShardOut]:
        """Install contracts, models and plans, and score records in the order they arrived
        (a plan whose models load in the background applies from the first batch after
        they have loaded)."""
        out: list[ShardOut] = self._finish_installs()
        for value in values:
            if isinstance(value, RawRun):
                out.extend(self._score_or_hold(value))
            elif isinstance(value, ModelInstall):
                out.extend(self._install_model(value))
            elif isinstance(value, PlanInstall):
                out.extend(self._request(value.data_type, value.plan, value.models, value.restored))
            else:
                out.extend(self._install_contract(value))
        out.extend(self._release_ready())
        return self._stamped(out)

    def _stamped(self, out: list[ShardOut]) -> list[ShardOut]:
        # Dead letters carry their records' bytes: they must fit the dead-letter topic.
        for item in out:
            if isinstance(item, DeadLetter):
                item.max_message_bytes = self._max_message_bytes
        return out

    def _data_type(self, name: str) -> DataTypeState:
        """A data type's state; installs always get one (the registry bounds those)."""
        dt = self.state.data_types.get(name)
        if dt is None:
            self._data_types.admit(name, self, None)
            dt = self.state.data_types[name] = DataTypeState()
        return dt

    def _route(
        self,
        data_type: str,
        dt: DataTypeState,
        plan: ServingPlan,
        specs: dict[str, ModelSpec],
        runtimes: dict[str, ModelRuntime],
    ) -> None:
        """Serve `plan` with these models from now on (KeyError: the contract lacks a field
        one of them reads)."""
        assert dt.contract is not None
        previous = self._routes.get(data_type)
        self._routes[data_type] = Route.of(plan, specs, runtimes, dt.contract)
        dt.plan, dt.models = plan, dict(specs)
        dt.spec = specs[plan.active or plan.models[0]]
        # Which models this shard serves now: one in for one out is a swap; otherwise
        # each model that joins or leaves the plan is said on its own.
        route = self._routes[data_type]
        before = [b.spec for b in previous.bindings.values()] if previous is not None else []
        after = [b.spec for b in route.bindings.values()]
        joined = [m for m in after if m.identity not in {b.identity for b in before}]
        left = [m.identity for m in before if m.identity not in {a.identity for a in after}]
        if len(joined) == 1 and len(left) == 1:
            self._serving(joined[0], left[0])
            return
        for spec in joined:
            self._serving(spec, None)
        for identity in left:
            self._events.publish(ModelStopped(identity))

    def _serving(self, spec: ModelSpec, instead_of: ModelIdentity | None) -> None:
        provenance = spec.provenance
        gate = provenance.gate if provenance is not None else ""
        self._events.publish(ModelServing(spec.identity, instead_of, spec.lineage, gate))

    def _install_contract(self, install: ContractInstall) -> list[ShardOut]:
        contract = install.contract
        dt = self._data_type(contract.data_type)
        dt.contract = contract
        route = self._routes.get(contract.data_type)
        if route is not None:  # the serving models now read this contract's layout
            try:
                specs = {k: b.spec for k, b in route.bindings.items()}
                runtimes = {k: b.runtime for k, b in route.bindings.items()}
                self._route(contract.data_type, dt, route.plan, specs, runtimes)
            except KeyError:
                # The registry checked this contract against its newest models, which this
                # shard is still loading; an older one it serves meanwhile lacks a field
                # of it. Records wait for the new ones (held), as for a first model.
                log.warning(
                    "%s: the plan served (%s) does not read contract v%d; holding records "
                    "until the next plan loads",
                    contract.data_type,
                    route.plan.describe(),
                    contract.version,
                )
                del self._routes[contract.data_type]
        return []

    def _install_model(self, install: ModelInstall) -> list[ShardOut]:
        spec = install.spec
        key = model_key_of(spec)
        if install.staged:  # load it now, so that a plan naming it later applies at once
            if self._cache.get(spec.runtime_key) is None:
                self._load(install)
            return []
        plan = install.plan or ServingPlan.single(key)
        return self._request(spec.identity.data_type, plan, (install,), install.restored)

    def _load(self, install: ModelInstall) -> Future[ModelRuntime]:
        spec = install.spec
        return self._loader.submit(
            self._cache.load,
            spec.identity.sha256,
            spec.identity.format,
            install.model_bytes,
            spec.declared_inputs,
            self._onnx_threads,
        )

    def _request(
        self,
        data_type: str,
        plan: ServingPlan,
        installs: Iterable[ModelInstall],
        restored: bool,
    ) -> list[ShardOut]:
        """Serve `plan` once its models have loaded here; until then the plan in effect
        serves. A newer plan replaces one still loading, which never serves."""
        specs: dict[str, ModelSpec] = {}
        runtimes: dict[str, Future[ModelRuntime]] = {}
        for install in installs:
            key = model_key_of(install.spec)
            specs[key] = install.spec
            runtime = self._cache.get(install.spec.runtime_key)
            if runtime is not None:
                runtimes[key] = _loaded(runtime)
            else:
                # The registry loaded it in another process (or before a restart). Loading
                # can take seconds (a JVM to start): the old plan serves until it is ready.
                runtimes[key] = self._load(install)
        missing = [k for k in plan.models if k not in specs]
        if missing:  # the registry sends every model of a plan: state was lost
            log.error("plan %s for %s came without %s", plan.describe(), data_type, missing)
            return []
        request = RestoredInstall(plan, specs, runtimes)
        if restored:
            self._cache.note_restored(data_type, request)
        self._pending[data_type] = request
        return self._finish_installs()

    def _finish_installs(self, *, wait: bool = False) -> list[ShardOut]:
        """Serve the plans whose models have loaded (with `wait`, every one), between two
        batches: a batch is scored by one plan."""
        out: list[ShardOut] = []
        for data_type, request in list(self._pending.items()):
            futures = request.runtimes
            if not (wait or all(f.done() for f in futures.values())):
                continue
            del self._pending[data_type]
            try:
                runtimes = {k: f.result() for k, f in futures.items()}
            except Exception as exc:
                # The registry loaded them, so this is local (e.g. memory); keep the plan.
                log.error("shard could not load %s: %s", request.plan.describe(), exc)
                continue
            out.extend(self._apply(data_type, request, runtimes))
        return out

    def _apply(
        self, data_type: str, request: RestoredInstall, runtimes: dict[str, ModelRuntime]
    ) -> list[ShardOut]:
        dt = self._data_type(data_type)
        if dt.contract is None:  # the registry sends the contract first: state was lost
            log.error("plan %s for %s arrived before any contract", request.plan, data_type)
            return []
        self._route(data_type, dt, request.plan, request.specs, runtimes)
        return []

    def _release_ready(self) -> list[ShardOut]:
        """Score the held records of every data type that can be scored now. Called once
        the installs of a batch are through, so that records which waited are scored by
        the newest plan of the batch."""
        out: list[ShardOut] = []
        for data_type, dt in self.state.data_types.items():
            if dt.held and dt.contract is not None and data_type in self._routes:
                for run in self._held.take(dt):
                    out.extend(self._score_or_hold(run))
        return out

    def _score_or_hold(self, run: RawRun) -> list[ShardOut]:
        dt = self.state.data_types.get(run.data_type)
        if dt is None:
            # A data type off the wire: the shard keeps nothing for it past the limit.
            if not self._data_types.admit(run.data_type, self, self._max_data_types):
                return list(
                    run.dead_letters(
                        Stage.SCORE,
                        Reason.TOO_MANY_DATA_TYPES,
                        f"data type {run.data_type!r} has no contract here, and this "
                        f"process's shards hold max_data_types ({self._max_data_types}) "
                        "others",
                    )
                )
            dt = self.state.data_types[run.data_type] = DataTypeState()
        route = self._routes.get(run.data_type)
        if dt.contract is None or route is None or dt.held:
            # No contract or model yet: on a fresh start records can outrun the control
            # topic, and after a resume the registry re-sends a moment later.
            return list(self._held.hold(dt, run))
        if isinstance(run, FeedbackRun):  # labels: decoded by the contract's id and label
            return list(self._feedback.labels(run, dt.contract, int(self._clock() * 1000)))
        try:
            decoded = self._codecs.get(dt.contract).decode(run.values, run.headers)
            columns, dead = record_columns(run, dt.contract, decoded)
        except Exception as exc:
            # Codecs report bad bytes per record; anything else is a bug a record tripped,
            # and the record would trip it again on every restart: dead letters, not a crash.
            log.exception("decoding %d %s records failed", len(run), run.data_type)
            message = f"decoding failed: {type(exc).__name__}: {exc}"
            return list(run.dead_letters(Stage.DECODE, Reason.UNDECODABLE, message))
        out: list[ShardOut] = list(dead)
        if columns is not None:
            self._events.publish(RecordsReceived(run.data_type, len(columns)))
            out.extend(self._score_planned(columns, route, dt.contract))
        return out

    def _score_planned(
        self, run: RecordColumns, route: Route, contract: Contract
    ) -> list[ShardOut]:
        """Score a run by its data type's plan: one model call per variant it uses."""
        plan = route.plan
        if plan.policy == "single":
            binding = route.primary
            return self._score(run, binding, route.extras[plan.models[0]])
        out: list[ShardOut] = []
        if plan.splits_traffic:
            points = entity_points(run.data_type, self._entity_keys(run, plan, contract))
            chosen = assign(points, route.weights)
            canary = plan.canary
            for i, (key, binding) in enumerate(route.bindings.items()):
                rows = chosen == i
                if not rows.any():
                    continue
                part = run if rows.all() else run.take(rows)
                if key != canary:
                    out.extend(self._score(part, binding, route.extras[key]))
                else:  # what the canary's records show without labels
                    out.extend(self._score_canary(part, route, binding))
            return out
        if plan.policy == "ensemble":
            return self._score_ensemble(run, route)
        # shadow: the active model's output stands; each shadow scores the same records,
        # and how it agrees with the active model is counted in its stats window.
        outputs: dict[str, tuple[np.ndarray, Prediction]] = {}
        for key, binding in route.bindings.items():
            shadow = key != plan.active
            extra = route.extras[key]
            out.extend(self._score(run, binding, extra, shadow=shadow, outputs=outputs))
        active = route.bindings[plan.active].spec.identity
        for key, binding in route.bindings.items():
            if key != plan.active and key in outputs and plan.active in outputs:
                self._compare(
                    run, active, binding.spec.identity, outputs[plan.active], outputs[key]
                )
        return out

    def _score_canary(self, run: RecordColumns, route: Route, binding: Binding) -> list[ShardOut]:
        """Score the canary's share of a run, and count for its guards its failures (the
        model call raised, or gave no usable prediction; records it could not read are the
        input's fault), its slow records and, with the disagreement guard, the records on
        which the active model, scoring them too without emitting, answers otherwise."""
        guards = self._canary_guards
        outputs: dict[str, tuple[np.ndarray, Prediction]] = {}
        started = time.perf_counter()
        scored = self._score(run, binding, route.extras[route.plan.canary], outputs=outputs)
        seconds = time.perf_counter() - started
        failed = sum(
            1
            for item in scored
            if isinstance(item, DeadLetter)
            and item.reason in (Reason.SCORE_FAILED, Reason.INVALID_PREDICTION)
        )
        compared = disagreed = 0
        active = route.bindings.get(route.plan.active)
        canary_key = route.plan.canary
        if guards.compare and active is not None and canary_key in outputs:
            # Not the active model's output: no record, dead letter or window of it counts.
            self._score(run, active, emit=False, watch=False, outputs=outputs)
            if route.plan.active in outputs:
                tolerance = guards.tolerance * label_scale(active.spec.reference)
                compared, disagreed = self._compare(
                    run,
                    active.spec.identity,
                    binding.spec.identity,
                    outputs[route.plan.active],
                    outputs[canary_key],
                    tolerance,
                )
        counts = GuardCounts.of(
            binding.spec.identity, len(run), failed, seconds, guards.budget_us, compared, disagreed
        )
        return [*scored, counts]

    def _score_ensemble(self, run: RecordColumns, route: Route) -> list[ShardOut]:
        """Every member scores the records the first member can; one output a record,
        combined, with each member's output in it. Each member counts in its own stats and
        drift windows; the ensemble's output in a stats window of its own (its latency:
        every member's call and the combining), and in the delayed-label join."""
        plan = route.plan
        bindings = list(route.bindings.values())
        outputs: dict[str, tuple[np.ndarray, Prediction]] = {}
        started = time.perf_counter()
        out = self._score(run, bindings[0], emit=False, outputs=outputs)
        first_key = plan.models[0]
        if first_key not in outputs:
            return out  # nothing the first member could score
        offsets, first = outputs[first_key]
        for binding in bindings[1:]:
            self._score(run, binding, emit=False, outputs=outputs)
        members = [first] + [
            _aligned(offsets, *outputs[k]) if k in outputs else _unscored(len(offsets))
            for k in plan.models[1:]
        ]
        kept = run.take(np.isin(run.offsets, offsets)) if len(offsets) < len(run) else run
        try:
            prediction = combine(members, plan.combiner, plan.confidence)
        except EnsembleError as exc:
            message = f"ensemble of {', '.join(plan.models)}: {exc}"
            return out + [
                kept.dead_letter(i, Stage.SCORE, Reason.SCORE_FAILED, message)
                for i in range(len(kept))
            ]
        elapsed = time.perf_counter() - started
        identity = ModelIdentity(kept.data_type, "ensemble", f"plan-{plan.number}", "")
        now_ms = int(self._clock() * 1000)
        messages = scored_messages(
            kept, identity, prediction, elapsed, now_ms, self._scored_by, route.extras[first_key]
        )
        member_fields = _member_fields(plan.models, route, members, prediction.valid)
        messages = [
            (k, (v or b"") + extra, h)
            for (k, v, h), extra in zip(messages, member_fields, strict=True)
        ]
        valid = prediction.valid
        for i in np.flatnonzero(~valid).tolist():
            out.append(
                kept.dead_letter(
                    i, Stage.SCORE, Reason.INVALID_PREDICTION, "no ensemble member scored it"
                )
            )
        kept_offsets = (kept.offsets if valid.all() else kept.offsets[valid]).tolist()
        route_name = f"{kept.topic}/{kept.partition}"
        out.append(ScoredBatch(route_name, messages, kept_offsets, kept.data_type))
        contract = self.state.data_types[kept.data_type].contract
        if self._feedback.keeps(contract):
            out.extend(self._feedback.predictions(kept, identity, prediction, now_ms))
        scored = int(valid.sum())
        quality = labelled_quality(prediction, kept.labels)
        lags = (now_ms - kept.event_time_ms[valid]) / 1000.0
        self._events.publish(BatchScored(identity, scored, len(kept), elapsed, lags, quality))
        if self._monitoring:
            self._windows.add_stats(self.state, identity, now_ms, scored, elapsed, quality)
        return out

    def _compare(
        self,
        run: RecordColumns,
        active: ModelIdentity,
        shadow: ModelIdentity,
        active_out: tuple[np.ndarray, Prediction],
        shadow_out: tuple[np.ndarray, Prediction],
        tolerance: float = 0.0,
    ) -> tuple[int, int]:
        """Count a shadow's (or canary's) outputs against the active model's, on the records
        both scored, into its stats window; how many were compared, and on how many the
        two disagreed (`disagreements`, regressors by more than `tolerance`)."""
        active_offsets, active_prediction = active_out
        on_active = _aligned(active_offsets, *shadow_out)  # the shadow's, row by row
        both = active_prediction.valid & on_active.valid
        everything = bool(both.all())  # the usual case: no row to pick
        rows = None if everything else np.flatnonzero(both).tolist()
        agreement = AgreementAccumulator(active.name, active.version)
        a_labels, s_labels = active_prediction.labels, on_active.labels
        mine: Sequence[str] | np.ndarray
        theirs: Sequence[str] | np.ndarray
        if a_labels is not None and s_labels is not None:
            mine, theirs = a_labels, s_labels
            if rows is not None:
                mine, theirs = [a_labels[i] for i in rows], [s_labels[i] for i in rows]
            agreement.add_labels(mine, theirs)
        else:
            mine, theirs = active_prediction.values, on_active.values
            if rows is not None:
                mine, theirs = mine[rows], theirs[rows]
            agreement.add_values(mine, theirs)
        self._events.publish(ShadowCompared(active, shadow, agreement))
        if self._monitoring:
            now_ms = int(self._clock() * 1000)
            self._windows.add_agreement(self.state, shadow, now_ms, agreement)
        return agreement.compared, disagreements(mine, theirs, tolerance)

    @staticmethod
    def _entity_keys(run: RecordColumns, plan: ServingPlan, contract: Contract) -> EncodedKeys:
        """What keeps an entity on one variant: the plan's entity field, else the record id
        (whose bytes the scored records then reuse)."""
        column = contract.columns.get(plan.entity_field) if plan.entity_field else None
        if column is None:
            return run.encoded_ids()
        if column.numeric:
            return EncodedKeys.of([repr(v) for v in run.numeric[:, column.index].tolist()])
        return EncodedKeys.of([str(v) for v in run.text[:, column.index].tolist()])

    def release_held(self, *, force: bool = False) -> list[ShardOut]:
        """Serve the models that have loaded in the background, then dead-letter held
        records once they have waited too long for a contract or model (`force`: every
        model still loading is waited for first)."""
        out: list[ShardOut] = self._finish_installs(wait=force)
        out.extend(self._release_ready())
        for name, dt in list(self.state.data_types.items()):
            if name in self._pending:
                # Its model is loading here (the first load in a process can take seconds
                # on a busy machine): the records wait for it, not for the timeout.
                continue
            out.extend(self._held.release(dt, force=force))
            if dt.contract is None and dt.spec is None and not dt.held:
                del self.state.data_types[name]  # a data type nobody installed: forget it
                self._data_types.release(name, self)
        return self._stamped(out)

    def _score(
        self,
        run: RecordColumns,
        binding: Binding,
        extra: bytes = b"",
        *,
        shadow: bool = False,
        outputs: dict[str, tuple[np.ndarray, Prediction]] | None = None,
        emit: bool = True,
        watch: bool = True,
    ) -> list[ShardOut]:
        """Score a run with one model. `outputs`: where to keep the model's prediction with
        the offsets of the rows it scored, by model key (shadows, ensembles); `emit=False`:
        only that and the dead letters (an ensemble member: the ensemble emits);
        `watch=False`: not counted in the model's stats and drift windows either."""
        spec, runtime = binding.spec, binding.runtime
        out: list[ShardOut] = []
        x = run.numeric[:, binding.numeric_columns]
        bad = np.isnan(x).any(axis=1)
        text = None
        if binding.text_columns:
            text = run.text[:, binding.text_columns]
            bad |= ~_present(text).all(axis=1)
        if bad.any():
            for i in np.flatnonzero(bad):
                out.append(self._unusable(run, binding, x, text, int(i)))
            keep = ~bad
            run, x = run.take(keep), x[keep]
            text = text[keep] if text is not None else None
        if binding.categories and any(c is not None for c in binding.categories):
            assert text is not None
            unknown = self._unknown_categories(binding, text)
            if unknown.any():
                for i in np.flatnonzero(unknown):
                    out.append(self._unknown_category(run, binding, text, int(i)))
                keep = ~unknown
                run, x, text = run.take(keep), x[keep], text[keep]
        if run.labels.dtype != object:  # a numeric label (or none: all NaN)
            bad_label = ~np.isnan(run.labels) & ~(np.abs(run.labels) <= MAX_LABEL_MAGNITUDE)
            if bad_label.any():
                for row in np.flatnonzero(bad_label).tolist():
                    out.append(
                        run.dead_letter(
                            row,
                            Stage.SCORE,
                            Reason.BAD_LABEL,
                            f"label {float(run.labels[row])!r} is beyond ±{MAX_LABEL_MAGNITUDE:g}",
                        )
                    )
                keep = ~bad_label
                run, x = run.take(keep), x[keep]
                text = text[keep] if text is not None else None
        if len(run) == 0:
            return out
        started = time.perf_counter()
        try:
            prediction = runtime.predict(np.ascontiguousarray(x), text)
        except Exception as exc:  # a model failure must not take the dataflow down
            log.exception("model %s:%s failed", spec.identity.name, spec.identity.version)
            message = f"model call failed: {type(exc).__name__}: {exc}"
            return out + [
                run.dead_letter(i, Stage.SCORE, Reason.SCORE_FAILED, message)
                for i in range(len(run))
            ]
        elapsed = time.perf_counter() - started
        now_ms = int(self._clock() * 1000)
        if outputs is not None:
            outputs[model_key_of(spec)] = (run.offsets, prediction)
        quality = labelled_quality(prediction, run.labels)
        if watch and self._monitoring:
            self._watch(run, binding, prediction, elapsed, now_ms, quality)
        if not emit:
            return out
        valid = prediction.valid
        if not valid.all():
            for i in np.flatnonzero(~valid):
                out.append(
                    run.dead_letter(
                        int(i),
                        Stage.SCORE,
                        Reason.INVALID_PREDICTION,
                        "model returned no usable prediction (NaN)",
                    )
                )
        messages = scored_messages(
            run,
            spec.identity,
            prediction,
            elapsed,
            now_ms,
            self._scored_by,
            binding.lineage + extra,
        )
        offsets = (run.offsets if valid.all() else run.offsets[valid]).tolist()
        route = f"{run.topic}/{run.partition}"
        out.append(ScoredBatch(route, messages, offsets, run.data_type, shadow))
        if not shadow and self._feedback.keeps(self.state.data_types[run.data_type].contract):
            out.extend(self._feedback.predictions(run, spec.identity, prediction, now_ms))
        scored = int(valid.sum())
        lags = (now_ms - run.event_time_ms[valid]) / 1000.0
        self._events.publish(BatchScored(spec.identity, scored, len(run), elapsed, lags, quality))
        return out

    def _watch(
        self,
        run: RecordColumns,
        binding: Binding,
        prediction: Prediction,
        elapsed: float,
        now_ms: int,
        quality: Quality | None,
    ) -> None:
        """Count one model call in the model's stats and drift windows."""
        valid = prediction.valid
        scored = int(valid.sum())
        numeric, text_rows = run.numeric, run.text
        if scored < len(run):  # only the scored records' features count
            numeric, text_rows = numeric[valid], text_rows[valid]
        self._windows.add(self.state, binding, now_ms, scored, elapsed, quality, numeric, text_rows)
        self._windows.add_outputs(self.state, binding, now_ms, prediction, run.labels)

    @staticmethod
    def _unusable(
        run: RecordColumns, binding: Binding, x: np.ndarray, text: np.ndarray | None, i: int
    ) -> DeadLetter:
        names = [
            name
            for feature, name in zip(binding.spec.features, binding.spec.input_fields, strict=True)
            if feature.kind == "numeric"
        ]
        missing = list(np.isnan(x[i]))
        if text is not None:
            names += binding.text_names
            missing += list(~_present(text[i]))
        return run.dead_letter(
            i, Stage.SCORE, Reason.MISSING_FEATURE, _missing_message(names, np.asarray(missing))
        )

    @staticmethod
    def _unknown_categories(binding: Binding, text: np.ndarray) -> np.ndarray:
        unknown = np.zeros(len(text), dtype=bool)
        for j, known in enumerate(binding.categories):
            if known is not None:
                unknown |= np.fromiter(
                    (v not in known for v in text[:, j]), dtype=bool, count=len(text)
                )
        return unknown

    @staticmethod
    def _unknown_category(
        run: RecordColumns, binding: Binding, text: np.ndarray, i: int
    ) -> DeadLetter:
        problems = [
            f"{name}={value!r} (the model knows {', '.join(sorted(known))})"
            for name, value, known in zip(
                binding.text_names, text[i], binding.categories, strict=True
            )
            if known is not None and value not in known
        ]
        return run.dead_letter(
            i,
            Stage.SCORE,
            Reason.UNKNOWN_CATEGORY,
            "category the model does not know: " + "; ".join(problems),
        )

    def close_windows(self, *, everything: bool = False) -> list[ShardOut]:
        """Partials for windows that have ended (all open windows when `everything`)."""
        return self._windows.close(self.state, everything=everything)

    @property
    def holds_anything(self) -> bool:
        """Whether the shard has a contract, a model, held records or open windows."""
        state = self.state
        return bool(state.data_types or state.stats or state.drift or self._pending)

    def next_wakeup_s(self) -> float | None:
        """When the earliest open window ends or held records time out, in epoch seconds
        (soon, while a model loads in the background: `release_held` swaps it in)."""
        if self._pending:
            return self._clock() + PENDING_POLL_S
        ends = [self._windows.next_end_ms(self.state)]
        ends += [self._held.due_ms(dt) for dt in self.state.data_types.values()]
        due = [e for e in ends if e is not None]
        return min(due) / 1000 if due else None
