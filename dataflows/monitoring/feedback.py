"""Labels that arrive later: the feedback join, without Bytewax.

A feedback topic carries (record id, label, time) messages in a data type's own encoding.
The serve shards decode them with the data type's contract, cut down to its id, event-time
and label fields (`feedback_contract`), into `LabelBatch`es; and for the data types that
keep predictions (`Feedback.keeps`) each model call also yields compact `PredictionBatch`es
(a hash of each id, the predicted value or class and probabilities, the scoring time).
Both are keyed `"<data_type>#<hash(id) % shards>"` (`owner_keys`), so one `FeedbackJoin`
holds each id, whichever partitions its record and label came through.

`FeedbackJoin` keeps predictions columnar (`PredictionStore`: a few sorted numpy runs per
model, merged as they grow, looked up with `searchsorted`; no Python object per record)
for the horizon, within a count and a byte bound (oldest evicted first); joins labels to
them; and adds the pairs up per model and window (`QualityAccumulator`) into stats
partials for the `monitor` step. Every label is accounted for (`LabelCounts`): matched,
unknown, expired, evicted or duplicate; bad ones are dead letters at the shard.

Ids are compared by a 64-bit hash (FNV-1a over the id's code points, then a
finalizer): two different ids held at once are confused with probability about
n² / 2^65 (3e-8 for a million predictions).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import numpy as np

from dataflows.contracts.schema import Contract, CsvOptions, Field
from dataflows.control.registry import CodecCache
from dataflows.core.events import NO_EVENTS, EventBus, FeedbackHeld, LabelsJoined
from dataflows.core.reasons import Reason, Stage
from dataflows.core.records import DeadLetter, RawRun, RecordColumns, record_columns
from dataflows.monitoring.quality import (
    MAX_LABEL_MAGNITUDE,
    LabelCounts,
    QualityAccumulator,
    class_indices,
)
from dataflows.monitoring.windows import (
    ModelIdentity,
    StatsAccumulator,
    StatsPartial,
    window_start,
)
from dataflows.runtimes import Prediction

log = logging.getLogger(__name__)

Clock = Callable[[], float]

FEEDBACK_CODECS = CodecCache()
"""Codecs of the feedback contracts (a cache apart: they share their contract's key)."""

TOMBSTONE_MIN_S = 3600.0
"""Ids of dropped predictions are remembered for the horizon, and at least this long (within
the predictions' count bound), so a late label is told from an unknown one."""

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


# --- ids ---------------------------------------------------------------------------------


def id_hashes(ids: list[str]) -> np.ndarray:
    """A stable 64-bit hash of each id (uint64), vectorised: FNV-1a over the id's Unicode
    code points, one numpy pass per character position, then splitmix64's finalizer (so
    that `hash % shards` spreads evenly). The same in every process and run."""
    n = len(ids)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    text = np.asarray(ids, dtype=str)
    width = text.dtype.itemsize // 4
    points = text.view(np.uint32).reshape(n, width).astype(np.uint64)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(width):  # code point 0 is padding: the same id, padded or not
            column = points[:, j]
            h = np.where(column != 0, (h ^ column) * _FNV_PRIME, h)
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h


def owner_key(data_type: str, shard: int) -> str:
    """The feedback key that holds a data type's ids of one shard."""
    return f"{data_type}#{shard}"


def _by_owner(hashes: np.ndarray, shards: int) -> Iterable[tuple[int, np.ndarray]]:
    """(shard, row indices) of each shard the hashes fall into."""
    owners = (hashes % np.uint64(shards)).astype(np.int64)
    if shards == 1 or (owners == owners[0]).all():
        yield int(owners[0]), np.arange(len(hashes))
        return
    order = np.argsort(owners, kind="stable")
    cuts = np.flatnonzero(np.diff(owners[order])) + 1
    for rows in np.split(order, cuts):
        yield int(owners[rows[0]]), rows


# --- what travels from the shards to the join ----------------------------------------------


class FeedbackRun(RawRun):
    """Undecoded feedback messages (labels) of one data type from one source partition."""


@dataclass
class PredictionBatch:
    """Predictions of one model call for the ids one feedback key holds."""

    key: str
    identity: ModelIdentity
    hashes: np.ndarray  # uint64 (n,)
    scored_at_ms: int
    predicted: np.ndarray  # regressors: float64 values; classifiers: int64 class indices
    classes: tuple[str, ...]  # classifiers: the model's classes; () for regressors
    probabilities: np.ndarray | None  # classifiers: float64 (n, len(classes)), or None


@dataclass
class LabelBatch:
    """Labels from one feedback run for the ids one feedback key holds."""

    key: str
    data_type: str
    record_ids: list[str]
    hashes: np.ndarray  # uint64 (n,)
    labels: np.ndarray  # float64, or object (text labels)
    label_time_ms: np.ndarray  # int64: the event-time field, else when it arrived

    def take(self, rows: np.ndarray) -> LabelBatch:
        """The labels at these row indices."""
        return LabelBatch(
            self.key,
            self.data_type,
            [self.record_ids[i] for i in rows.tolist()],
            self.hashes[rows],
            self.labels[rows],
            self.label_time_ms[rows],
        )


@dataclass
class JoinedPairs:
    """(prediction, label) pairs of one model: what online quality is computed from, and
    what later consumers of the labels (canary promotion, bandits) subscribe to."""

    identity: ModelIdentity
    record_ids: list[str]
    labels: np.ndarray  # float64 or object
    label_time_ms: np.ndarray  # int64
    scored_at_ms: np.ndarray  # int64
    predicted: np.ndarray  # regressors: values; classifiers: class indices
    classes: tuple[str, ...]
    probabilities: np.ndarray | None

    def __len__(self) -> int:
        return len(self.record_ids)

    def quality(self) -> QualityAccumulator:
        """These pairs' quality sums."""
        acc = QualityAccumulator()
        if self.classes:
            truth = class_indices(self.classes, self.labels)
            acc.add_classification(self.classes, self.predicted, truth, self.probabilities)
        else:
            labels = self.labels
            if labels.dtype == object:  # a regressor against text labels: no error
                labels = np.full(len(labels), np.nan)
            acc.add_regression(self.predicted, labels)
        return acc


# --- the shard's side: decoding labels, cutting predictions ---------------------------------


@functools.lru_cache(maxsize=256)
def feedback_contract(contract: Contract) -> Contract | str:
    """The contract of a data type's feedback messages, or why it has none.

    Its id and label fields (required) and its event-time field (optional), with the same
    encoding and options, so a feedback message is the data type's record with only those
    fields: a JSON object, a protobuf or Avro record of the same type (or, Confluent-framed,
    any schema the registry resolves that has them), a waxserve Record. CSV lines hold the
    id, the event time (when the contract has one; may be empty) and the label, in that
    order, with the contract's delimiter and no header.
    """
    if not contract.id_field or not contract.label_field:
        missing = " and ".join(
            role
            for role, name in (("id", contract.id_field), ("label", contract.label_field))
            if not name
        )
        return (
            f"contract {contract.data_type} v{contract.version} names no {missing} field: "
            "its labels cannot be joined to predictions"
        )
    roles = [contract.id_field, contract.event_time_field, contract.label_field]
    wanted = [name for name in roles if name]
    by_name = {f.name: f for f in contract.fields}
    fields: list[Field] = [
        replace(f, required=f.name != contract.event_time_field)
        for f in contract.fields
        if f.name in wanted
    ]
    return Contract(
        data_type=contract.data_type,
        version=contract.version,
        fields=tuple(fields),
        encoding=contract.encoding,
        id_field=contract.id_field,
        event_time_field=contract.event_time_field,
        label_field=contract.label_field,
        description=contract.description,
        csv=CsvOptions(contract.csv.delimiter, tuple(by_name[n].name for n in wanted), False),
        avro=contract.avro,
        protobuf=contract.protobuf,
        created_at_ms=contract.created_at_ms,
    )


@dataclass(frozen=True)
class Feedback:
    """Which data types keep predictions for later labels, and over how many keys."""

    data_types: tuple[str, ...]  # ("*",): every data type with an id and a label field
    shards: int
    codecs: CodecCache = FEEDBACK_CODECS

    def listed(self, data_type: str) -> bool:
        """Whether feedback is on for this data type (by the settings alone)."""
        return "*" in self.data_types or data_type in self.data_types

    def keeps(self, contract: Contract | None) -> bool:
        """Whether this data type's predictions are kept (its contract names an id and a
        label field, and it is listed)."""
        if contract is None or not contract.id_field or not contract.label_field:
            return False
        return self.listed(contract.data_type)

    def predictions(
        self,
        run: RecordColumns,
        identity: ModelIdentity,
        prediction: Prediction,
        now_ms: int,
    ) -> list[PredictionBatch]:
        """The scored records' predictions, one batch per feedback key of their ids."""
        valid = prediction.valid
        ids = run.record_ids
        rows_valid = None if valid.all() else np.flatnonzero(valid)
        if rows_valid is not None:
            ids = [ids[i] for i in rows_valid.tolist()]
        if not ids:
            return []
        hashes = id_hashes(ids)
        probabilities = prediction.probabilities
        classes: tuple[str, ...] = ()
        if prediction.labels is not None:  # a classifier: its predicted class, by index
            classes = tuple(prediction.class_labels)
            index = {c: i for i, c in enumerate(classes)}
            labels = prediction.labels
            if rows_valid is not None:
                labels = [labels[i] for i in rows_valid.tolist()]
            predicted = np.fromiter(map(index.get, labels, [-1] * len(labels)), np.int64)
            if probabilities is not None:
                probabilities = np.asarray(probabilities, dtype=np.float64)
                if rows_valid is not None:
                    probabilities = probabilities[rows_valid]
        else:
            predicted = prediction.values if rows_valid is None else prediction.values[rows_valid]
            probabilities = None
        out = []
        for shard, rows in _by_owner(hashes, self.shards):
            whole = len(rows) == len(hashes)
            out.append(
                PredictionBatch(
                    owner_key(run.data_type, shard),
                    identity,
                    hashes if whole else hashes[rows],
                    now_ms,
                    predicted if whole else predicted[rows],
                    classes,
                    probabilities if probabilities is None or whole else probabilities[rows],
                )
            )
        return out

    def labels(
        self, run: FeedbackRun, contract: Contract, now_ms: int
    ) -> list[LabelBatch | DeadLetter]:
        """A feedback run decoded: label batches per feedback key, and dead letters for
        messages that are not a usable label."""
        cut = feedback_contract(contract)
        if isinstance(cut, str):
            return list(run.dead_letters(Stage.DECODE, Reason.MISSING_FIELD, cut))
        try:
            decoded = self.codecs.get(cut).decode(run.values, run.headers)
            columns, dead = record_columns(run, cut, decoded)
        except Exception as exc:  # as for records: a bug one message trips is its dead letter
            log.exception("decoding %d %s labels failed", len(run), run.data_type)
            message = f"decoding failed: {type(exc).__name__}: {exc}"
            return list(run.dead_letters(Stage.DECODE, Reason.UNDECODABLE, message))
        out: list[LabelBatch | DeadLetter] = list(dead)
        if columns is None:
            return out
        labels = columns.labels
        if labels.dtype != object:
            bad = ~(np.abs(labels) <= MAX_LABEL_MAGNITUDE)
            if bad.any():
                out.extend(
                    columns.dead_letter(
                        row,
                        Stage.SCORE,
                        Reason.BAD_LABEL,
                        f"label {float(labels[row])!r} is beyond ±{MAX_LABEL_MAGNITUDE:g}",
                    )
                    for row in np.flatnonzero(bad).tolist()
                )
                columns = columns.take(~bad)
                labels = columns.labels
        if len(columns) == 0:
            return out
        times = np.where(columns.event_time_ms > 0, columns.event_time_ms, now_ms)
        hashes = id_hashes(columns.record_ids)
        whole = LabelBatch("", run.data_type, columns.record_ids, hashes, labels, times)
        for shard, rows in _by_owner(hashes, self.shards):
            part = whole if len(rows) == len(hashes) else whole.take(rows)
            part.key = owner_key(run.data_type, shard)
            out.append(part)
        return out


# --- the join's state ----------------------------------------------------------------------


@dataclass
class Run:
    """Predictions of one model, sorted by id hash (one per id)."""

    hashes: np.ndarray  # uint64, ascending, unique
    scored_at_ms: np.ndarray  # int64
    predicted: np.ndarray
    probabilities: np.ndarray | None
    labelled: np.ndarray  # bool: joined to a label already (mutated in place)
    oldest_ms: int = field(init=False)  # when the oldest prediction was made

    def __post_init__(self) -> None:
        self.oldest_ms = int(self.scored_at_ms.min()) if len(self.scored_at_ms) else 2**62

    def __len__(self) -> int:
        return len(self.hashes)

    def copy_flags(self) -> Run:
        """A copy sharing the (never changed) arrays, with its own `labelled` flags."""
        copied = copy.copy(self)
        copied.labelled = self.labelled.copy()
        return copied

    @property
    def nbytes(self) -> int:
        """What the run holds, in bytes."""
        size = self.hashes.nbytes + self.scored_at_ms.nbytes + self.predicted.nbytes
        size += self.labelled.nbytes
        return size + (self.probabilities.nbytes if self.probabilities is not None else 0)

    def take(self, rows: np.ndarray) -> Run:
        """The rows at these (ascending) indices or where this mask holds."""
        return Run(
            self.hashes[rows],
            self.scored_at_ms[rows],
            self.predicted[rows],
            None if self.probabilities is None else self.probabilities[rows],
            self.labelled[rows],
        )

    @classmethod
    def of(cls, batch: PredictionBatch) -> Run:
        """A batch as a run: sorted, one row per id (the last one)."""
        n = len(batch.hashes)
        run = cls(
            batch.hashes,
            np.full(n, batch.scored_at_ms, dtype=np.int64),
            batch.predicted,
            batch.probabilities,
            np.zeros(n, dtype=bool),
        )
        return run._sorted()

    def _sorted(self) -> Run:
        order = np.argsort(self.hashes, kind="stable")
        ordered = self.take(order)
        h = ordered.hashes
        if len(h) < 2 or (h[1:] != h[:-1]).all():
            return ordered
        # Same id twice (a record scored again): the newest prediction stays; a label
        # joined to any copy counts for it.
        last = np.ones(len(h), dtype=bool)
        last[:-1] = h[1:] != h[:-1]
        starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])
        labelled = np.logical_or.reduceat(ordered.labelled, starts)
        kept = ordered.take(last)
        kept.labelled = labelled
        return kept

    @staticmethod
    def merged(older: Run, newer: Run) -> Run:
        """One run of both; where both hold an id, the newer prediction."""
        both = Run(
            np.concatenate([older.hashes, newer.hashes]),
            np.concatenate([older.scored_at_ms, newer.scored_at_ms]),
            np.concatenate([older.predicted, newer.predicted]),
            None
            if older.probabilities is None or newer.probabilities is None
            else np.concatenate([older.probabilities, newer.probabilities]),
            np.concatenate([older.labelled, newer.labelled]),
        )
        return both._sorted()


@dataclass
class ModelPredictions:
    """The predictions one feedback key holds of one model: runs, oldest first, each
    at most about as large as the one before (a merge keeps a few runs per model)."""

    identity: ModelIdentity
    classes: tuple[str, ...]
    runs: list[Run] = field(default_factory=list)

    def add(self, run: Run) -> None:
        """Add a run, merging the newest runs while the newer is as large as the older."""
        self.runs.append(run)
        while len(self.runs) >= 2 and len(self.runs[-2]) <= len(self.runs[-1]):
            newer = self.runs.pop()
            self.runs[-1] = Run.merged(self.runs[-1], newer)

    @property
    def rows(self) -> int:
        """Predictions held."""
        return sum(len(r) for r in self.runs)


@dataclass
class Tombstones:
    """Hashes of ids whose predictions were dropped (expired or evicted), sorted, with
    when: how a late label is told from one that never had a prediction."""

    removed_at_ms: int
    kind: str  # "expired" or "evicted"
    hashes: np.ndarray  # uint64, ascending


@dataclass
class PendingLabels:
    """Labels that came before any prediction for their id, waiting for one."""

    labels: LabelBatch
    arrived_ms: np.ndarray  # int64


@dataclass
class FeedbackState:
    """What one feedback key ("<data_type>#<n>") snapshots."""

    models: dict[ModelIdentity, ModelPredictions] = field(default_factory=dict)
    tombstones: list[Tombstones] = field(default_factory=list)
    pending: PendingLabels | None = None
    windows: dict[tuple[ModelIdentity, int], QualityAccumulator] = field(default_factory=dict)
    outcomes: dict[int, LabelCounts] = field(default_factory=dict)  # per window start
    newest: ModelIdentity | None = None  # the last model whose predictions came
    data_type: str = ""
    key: str = ""

    def snapshot(self) -> FeedbackState:
        """A copy for Bytewax. Arrays are never changed in place but for the `labelled`
        flags, which are copied; windows are small and copied whole."""
        models = {
            identity: ModelPredictions(
                held.identity,
                held.classes,
                [run.copy_flags() for run in held.runs],
            )
            for identity, held in self.models.items()
        }
        return FeedbackState(
            models,
            list(self.tombstones),
            self.pending,
            copy.deepcopy(self.windows),
            copy.deepcopy(self.outcomes),
            self.newest,
            self.data_type,
            self.key,
        )


# --- the join ------------------------------------------------------------------------------


class FeedbackJoin:
    """Holds one feedback key's predictions and joins labels to them.

    Predictions wait `horizon_s` (processing time) for their label. The key keeps at most
    `max_rows` predictions and `max_bytes` bytes (its share of the data type's bounds):
    past either, the oldest are evicted down to 90%. A label with no prediction held waits
    up to `label_wait_s` for one (at most `max_rows // 10` labels; past that it counts as
    unknown at once). Joined pairs add up per model in windows of `stats_interval_s`.
    """

    EXPIRY_SLACK = 8
    """Expired predictions are dropped once the oldest is horizon/8 past the horizon (a
    label finds them expired until then): dropping on every batch would copy the runs."""

    def __init__(
        self,
        state: FeedbackState | None,
        *,
        horizon_s: float,
        label_wait_s: float,
        max_rows: int,
        max_bytes: int,
        stats_interval_s: float,
        clock: Clock = time.time,
        events: EventBus = NO_EVENTS,
        keeps: Callable[[str], bool] = lambda _data_type: True,
    ) -> None:
        self.state = state if state is not None else FeedbackState()
        self._horizon_ms = max(1, int(horizon_s * 1000))
        self._tombstone_ms = int(max(horizon_s, TOMBSTONE_MIN_S) * 1000)
        self._wait_ms = int(label_wait_s * 1000)
        self._max_rows = max(1, max_rows)
        self._max_bytes = max_bytes
        self._max_pending = max(100, max_rows // 10)
        self._window_ms = max(1, int(stats_interval_s * 1000))
        self._clock = clock
        self._events = events
        self._keeps = keeps
        self._warned = False

    # --- entry points ----------------------------------------------------------------

    def on_values(self, values: Iterable[PredictionBatch | LabelBatch]) -> list[JoinedPairs]:
        """Hold predictions and join labels, in arrival order; the pairs joined."""
        out: list[JoinedPairs] = []
        now_ms = self._now_ms()
        for value in values:
            self.state.key = value.key
            if isinstance(value, PredictionBatch):
                out.extend(self._hold(value, now_ms))
            else:
                out.extend(self._join(value, now_ms))
        self._maintain(now_ms)
        self._publish_held()
        return out

    def release_pending(self, *, force: bool = False) -> None:
        """Count labels that waited `label_wait_s` for a prediction in vain as unknown
        (all of them when `force`: the input ended)."""
        pending = self.state.pending
        if pending is None:
            return
        now_ms = self._now_ms()
        due = np.ones(len(pending.arrived_ms), dtype=bool)
        if not force:
            due = pending.arrived_ms + self._wait_ms <= now_ms
        if not due.any():
            return
        n = int(due.sum())
        counts = LabelCounts(unknown=n)
        self._count(counts, now_ms)
        self._events.publish(LabelsJoined(pending.labels.data_type, (), counts))
        self.state.pending = _pending_rows(pending, np.flatnonzero(~due))

    def close_windows(self, *, everything: bool = False) -> list[StatsPartial]:
        """Stats partials (feedback quality only) of the windows that have ended."""
        state = self.state
        now_ms = self._now_ms()
        starts = {start for _, start in state.windows} | set(state.outcomes)
        out = []
        for start in sorted(starts):
            end = start + self._window_ms
            if not everything and end > now_ms:
                continue
            partials: dict[ModelIdentity, QualityAccumulator] = {
                identity: state.windows.pop((identity, s))
                for identity, s in list(state.windows)
                if s == start
            }
            counts = state.outcomes.pop(start, None)
            if counts is not None:
                # An unknown label belongs to no model: its count goes with the newest one.
                owner = state.newest or ModelIdentity(state.data_type, "", "", "")
                partials.setdefault(owner, QualityAccumulator()).labels.merge(counts)
            for identity, quality in partials.items():
                out.append(StatsPartial(identity, start, end, StatsAccumulator(feedback=quality)))
        return out

    def next_wakeup_s(self) -> float | None:
        """When the next window closes, or pending labels are due."""
        ends = [s + self._window_ms for _, s in self.state.windows]
        ends += [s + self._window_ms for s in self.state.outcomes]
        if self.state.pending is not None:
            ends.append(int(self.state.pending.arrived_ms.min()) + self._wait_ms)
        return min(ends) / 1000 if ends else None

    @property
    def holds_anything(self) -> bool:
        """Whether the key holds predictions, labels, or open windows."""
        state = self.state
        return bool(
            state.models or state.tombstones or state.pending or state.windows or state.outcomes
        )

    @property
    def rows(self) -> int:
        """Predictions held."""
        return sum(m.rows for m in self.state.models.values())

    @property
    def nbytes(self) -> int:
        """Bytes the predictions take."""
        return sum(r.nbytes for m in self.state.models.values() for r in m.runs)

    # --- internals -------------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _hold(self, batch: PredictionBatch, now_ms: int) -> list[JoinedPairs]:
        state = self.state
        state.data_type = batch.identity.data_type
        state.newest = batch.identity
        held = state.models.get(batch.identity)
        if held is None:
            held = state.models[batch.identity] = ModelPredictions(batch.identity, batch.classes)
        run = Run.of(batch)
        held.add(run)
        return self._join_pending(held, run, now_ms)

    def _join_pending(self, held: ModelPredictions, run: Run, now_ms: int) -> list[JoinedPairs]:
        """Labels that waited for a prediction, joined to the one that just came."""
        pending = self.state.pending
        if pending is None:
            return []
        rows, labels = _lookup(run.hashes, pending.labels.hashes)
        if len(rows) == 0:
            return []
        pairs = self._pairs(held, run, rows, pending.labels.take(labels))
        # The run may have been merged into an older one already: mark where it lives.
        self._mark(held, pending.labels.hashes[labels])
        keep = np.ones(len(pending.arrived_ms), dtype=bool)
        keep[labels] = False
        self.state.pending = _pending_rows(pending, np.flatnonzero(keep))
        counts = LabelCounts(matched=len(labels))
        self._record(pairs, counts, now_ms)
        return pairs

    def _join(self, batch: LabelBatch, now_ms: int) -> list[JoinedPairs]:
        state = self.state
        state.data_type = batch.data_type
        if not self._keeps(batch.data_type) and not self._warned:
            self._warned = True
            log.warning(
                "labels for data type %r, whose predictions are not kept: they count as "
                "unknown (WAXSERVE_FEEDBACK_DATA_TYPES)",
                batch.data_type,
            )
        counts = LabelCounts()
        # The same id twice in one batch: the first one counts, the others are duplicates.
        _, first = np.unique(batch.hashes, return_index=True)
        if len(first) < len(batch.hashes):
            counts.duplicate += len(batch.hashes) - len(first)
            batch = batch.take(np.sort(first))
        n = len(batch.hashes)
        cutoff = now_ms - self._horizon_ms
        joined = np.zeros(n, dtype=bool)
        found_alive = np.zeros(n, dtype=bool)  # held and fresh, but joined already
        found_old = np.zeros(n, dtype=bool)  # held, past the horizon
        pairs: list[JoinedPairs] = []
        for held in state.models.values():
            newest_first: np.ndarray = np.full(n, -1, dtype=np.int64)  # run index
            rows_of: np.ndarray = np.zeros(n, dtype=np.int64)
            for r in range(len(held.runs) - 1, -1, -1):
                rows, labels = _lookup(held.runs[r].hashes, batch.hashes)
                fresh = newest_first[labels] < 0
                newest_first[labels[fresh]] = r
                rows_of[labels[fresh]] = rows[fresh]
            joined_here: list[np.ndarray] = []
            for r, run in enumerate(held.runs):
                labels = np.flatnonzero(newest_first == r)
                if len(labels) == 0:
                    continue
                rows = rows_of[labels]
                alive = run.scored_at_ms[rows] >= cutoff
                already = run.labelled[rows]
                found_old[labels[~alive]] = True
                found_alive[labels[alive & already]] = True
                ok = alive & ~already
                if not ok.any():
                    continue
                labels, rows = labels[ok], rows[ok]
                joined[labels] = True
                joined_here.append(labels)
                pairs.extend(self._pairs(held, run, rows, batch.take(labels)))
            if joined_here:
                self._mark(held, batch.hashes[np.concatenate(joined_here)])
        counts.matched += int(joined.sum())
        rest = ~joined
        counts.duplicate += int((rest & found_alive).sum())
        counts.expired += int((rest & ~found_alive & found_old).sum())
        unseen = np.flatnonzero(rest & ~found_alive & ~found_old)
        if len(unseen):
            unseen = self._tombstoned(batch.hashes, unseen, counts, now_ms - self._tombstone_ms)
        if len(unseen):
            self._wait(batch.take(unseen), now_ms, counts)
        self._record(pairs, counts, now_ms)
        return pairs

    def _tombstoned(
        self, hashes: np.ndarray, rows: np.ndarray, counts: LabelCounts, cutoff: int
    ) -> np.ndarray:
        """Count labels whose predictions were dropped since `cutoff`; the rows left."""
        for stone in reversed(self.state.tombstones):
            if len(rows) == 0 or stone.removed_at_ms < cutoff:
                break
            _, hit = _lookup(stone.hashes, hashes[rows])
            if len(hit) == 0:
                continue
            if stone.kind == "evicted":
                counts.evicted += len(hit)
            else:
                counts.expired += len(hit)
            keep = np.ones(len(rows), dtype=bool)
            keep[hit] = False
            rows = rows[keep]
        return rows

    def _wait(self, labels: LabelBatch, now_ms: int, counts: LabelCounts) -> None:
        """Labels with no prediction: wait for one, within bounds; else unknown."""
        pending = self.state.pending
        room = self._max_pending - (len(pending.arrived_ms) if pending is not None else 0)
        if self._wait_ms <= 0 or room <= 0:
            counts.unknown += len(labels.hashes)
            return
        if len(labels.hashes) > room:
            counts.unknown += len(labels.hashes) - room
            labels = labels.take(np.arange(room))
        arrived = np.full(len(labels.hashes), now_ms, dtype=np.int64)
        if pending is None:
            self.state.pending = PendingLabels(labels, arrived)
            return
        old = pending.labels
        merged = LabelBatch(
            old.key,
            old.data_type,
            old.record_ids + labels.record_ids,
            np.concatenate([old.hashes, labels.hashes]),
            _concat_labels(old.labels, labels.labels),
            np.concatenate([old.label_time_ms, labels.label_time_ms]),
        )
        self.state.pending = PendingLabels(merged, np.concatenate([pending.arrived_ms, arrived]))

    @staticmethod
    def _pairs(
        held: ModelPredictions, run: Run, rows: np.ndarray, labels: LabelBatch
    ) -> list[JoinedPairs]:
        return [
            JoinedPairs(
                held.identity,
                labels.record_ids,
                labels.labels,
                labels.label_time_ms,
                run.scored_at_ms[rows],
                run.predicted[rows],
                held.classes,
                None if run.probabilities is None else run.probabilities[rows],
            )
        ]

    @staticmethod
    def _mark(held: ModelPredictions, hashes: np.ndarray) -> None:
        """Every held copy of these ids' predictions is joined now."""
        for run in held.runs:
            rows, _ = _lookup(run.hashes, hashes)
            run.labelled[rows] = True

    def _record(self, pairs: list[JoinedPairs], counts: LabelCounts, now_ms: int) -> None:
        """Add pairs and label outcomes to the window of `now_ms`, and tell subscribers."""
        if not pairs and not counts.total:
            return
        start = window_start(now_ms, self._window_ms)
        for p in pairs:
            acc = self.state.windows.get((p.identity, start))
            if acc is None:
                acc = self.state.windows[(p.identity, start)] = QualityAccumulator()
            acc.merge(p.quality())
        self._count(counts, now_ms)
        self._events.publish(LabelsJoined(self.state.data_type, tuple(pairs), counts))

    def _count(self, counts: LabelCounts, now_ms: int) -> None:
        if not counts.total:
            return
        start = window_start(now_ms, self._window_ms)
        self.state.outcomes.setdefault(start, LabelCounts()).merge(counts)

    def _maintain(self, now_ms: int) -> None:
        """Drop expired predictions (with slack), evict the oldest past the bounds, and
        forget old tombstones."""
        state = self.state
        cutoff = now_ms - self._horizon_ms
        slack = self._horizon_ms // self.EXPIRY_SLACK
        removed: list[np.ndarray] = []
        for held in state.models.values():
            for i, run in enumerate(held.runs):
                if run.oldest_ms < cutoff - slack:
                    alive = run.scored_at_ms >= cutoff
                    removed.append(run.hashes[~alive])
                    held.runs[i] = run.take(alive)
        self._bury(removed, "expired", now_ms)
        rows, nbytes = self.rows, self.nbytes
        if rows > self._max_rows or nbytes > self._max_bytes:
            self._evict(rows, nbytes, now_ms)
        for identity in [i for i, m in state.models.items() if m.rows == 0]:
            del state.models[identity]
        for held in state.models.values():
            held.runs = [run for run in held.runs if len(run)]
        # Tombstones: a while after they were dropped, and no more than predictions.
        forget = now_ms - self._tombstone_ms
        state.tombstones = [t for t in state.tombstones if t.removed_at_ms >= forget]
        while sum(len(t.hashes) for t in state.tombstones) > self._max_rows:
            state.tombstones.pop(0)

    def _evict(self, rows: int, nbytes: int, now_ms: int) -> None:
        """Drop the oldest predictions until both bounds have 10% to spare."""
        share = min(0.9 * self._max_rows / rows, 0.9 * self._max_bytes / max(1, nbytes))
        drop = rows - int(rows * share)
        times = np.sort(
            np.concatenate([r.scored_at_ms for m in self.state.models.values() for r in m.runs])
        )
        drop = min(drop, len(times))
        threshold = int(times[drop - 1])  # everything older goes, and enough of its time
        ties = drop - int(np.searchsorted(times, threshold, side="left"))
        removed = []
        for held in self.state.models.values():
            for i, run in enumerate(held.runs):
                old = run.scored_at_ms < threshold
                if ties > 0:
                    at = np.flatnonzero(run.scored_at_ms == threshold)[:ties]
                    old[at] = True
                    ties -= len(at)
                if old.any():
                    removed.append(run.hashes[old])
                    held.runs[i] = run.take(~old)
        self._bury(removed, "evicted", now_ms)
        log.debug("feedback %s: evicted %d predictions", self.state.data_type, drop)

    def _bury(self, removed: list[np.ndarray], kind: str, now_ms: int) -> None:
        hashes = np.concatenate(removed) if removed else np.zeros(0, dtype=np.uint64)
        if len(hashes):
            self.state.tombstones.append(Tombstones(now_ms, kind, np.unique(hashes)))

    def _publish_held(self) -> None:
        if self.state.data_type:
            state = self.state
            self._events.publish(FeedbackHeld(state.data_type, state.key, self.rows, self.nbytes))


def _lookup(sorted_hashes: np.ndarray, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows in `sorted_hashes`, indices in `hashes`) of the hashes found there."""
    if len(sorted_hashes) == 0 or len(hashes) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    pos = np.searchsorted(sorted_hashes, hashes)
    pos = np.minimum(pos, len(sorted_hashes) - 1)
    found = np.flatnonzero(sorted_hashes[pos] == hashes)
    return pos[found], found


def _pending_rows(pending: PendingLabels, rows: np.ndarray) -> PendingLabels | None:
    """The pending labels at these rows; None for none."""
    if len(rows) == 0:
        return None
    return PendingLabels(pending.labels.take(rows), pending.arrived_ms[rows])


def _concat_labels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype == object or b.dtype == object:
        return np.concatenate([a.astype(object), b.astype(object)])
    return np.concatenate([a, b])


def per_key_bound(total: int, shards: int) -> int:
    """A feedback key's share of a per-data-type bound."""
    return max(1, math.ceil(total / shards))
