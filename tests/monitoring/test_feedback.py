"""The feedback join without Bytewax: ids, label decoding, the prediction store, outcomes."""

from __future__ import annotations

import math
import pickle
from dataclasses import replace

import numpy as np
import pytest

from dataflows.contracts.files import load_contract
from dataflows.core.descriptors import catalog_contracts
from dataflows.core.records import DeadLetter
from dataflows.monitoring.feedback import (
    Feedback,
    FeedbackJoin,
    FeedbackRun,
    LabelBatch,
    PredictionBatch,
    feedback_contract,
    id_hashes,
)
from dataflows.monitoring.quality import LabelCounts, QualityAccumulator, class_indices
from dataflows.monitoring.windows import ModelIdentity
from dataflows.runtimes import Prediction

WINE = load_contract(catalog_contracts()["wine"])
PENGUINS = load_contract(catalog_contracts()["penguins"])
LR = ModelIdentity("wine", "wine-lr", "1", "a" * 64, since_ms=1)
GBT = ModelIdentity("wine", "wine-gbt", "1", "b" * 64, since_ms=2)


class Clock:
    """A clock the test moves."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def join(clock: Clock, **options: float) -> FeedbackJoin:
    settings = {
        "horizon_s": 100.0,
        "label_wait_s": 10.0,
        "max_rows": 1000,
        "max_bytes": 1 << 20,
        "stats_interval_s": 60.0,
    }
    settings.update(options)
    return FeedbackJoin(
        None,
        horizon_s=settings["horizon_s"],
        label_wait_s=settings["label_wait_s"],
        max_rows=int(settings["max_rows"]),
        max_bytes=int(settings["max_bytes"]),
        stats_interval_s=settings["stats_interval_s"],
        clock=clock,
    )


def predictions(
    clock: Clock, ids: list[str], values: list[float], identity: ModelIdentity = LR
) -> PredictionBatch:
    return PredictionBatch(
        "wine#0",
        identity,
        id_hashes(ids),
        int(clock() * 1000),
        np.asarray(values, dtype=np.float64),
        (),
        None,
    )


def labels(ids: list[str], values: list[float]) -> LabelBatch:
    return LabelBatch(
        "wine#0",
        "wine",
        ids,
        id_hashes(ids),
        np.asarray(values, dtype=np.float64),
        np.zeros(len(ids), dtype=np.int64),
    )


def counts(j: FeedbackJoin) -> LabelCounts:
    total = LabelCounts()
    for c in j.state.outcomes.values():
        total.merge(c)
    return total


# --- ids ---------------------------------------------------------------------------------


def test_id_hashes_are_stable_and_do_not_depend_on_the_batch() -> None:
    # Pinned: feedback keys are hash % shards, so a changed hash would orphan state.
    assert id_hashes(["r0"])[0] == id_hashes(["r0", "a much longer id"])[0]
    assert int(id_hashes(["r0"])[0]) == int(id_hashes(["r0"])[0])
    assert int(id_hashes(["wine-7"])[0]) == _fnv1a_splitmix("wine-7") == 16091452387061100083
    assert len(set(id_hashes([f"r{i}" for i in range(10_000)]).tolist())) == 10_000
    assert id_hashes(["é", "e"])[0] != id_hashes(["é", "e"])[1]  # code points, not bytes
    # Spread evenly over shards.
    owners = np.bincount(id_hashes([f"id-{i}" for i in range(8000)]) % np.uint64(8))
    assert owners.min() > 900


def _fnv1a_splitmix(text: str) -> int:
    """The hash, one code point at a time in plain Python."""
    mask = 2**64 - 1
    h = 0xCBF29CE484222325
    for c in text:
        h = ((h ^ ord(c)) * 0x100000001B3) & mask
    h ^= h >> 30
    h = (h * 0xBF58476D1CE4E5B9) & mask
    h ^= h >> 27
    h = (h * 0x94D049BB133111EB) & mask
    return h ^ (h >> 31)


# --- the shard's side ------------------------------------------------------------------------


def test_feedback_contract_keeps_the_id_time_and_label() -> None:
    cut = feedback_contract(WINE)
    assert not isinstance(cut, str)
    assert [f.name for f in cut.fields] == ["record_id", "event_time_ms", "quality"]
    assert [f.required for f in cut.fields] == [True, False, True]
    assert cut.csv.columns == ("record_id", "event_time_ms", "quality")
    no_id = replace(WINE, id_field="")
    assert "names no id field" in str(feedback_contract(no_id))


def feedback_run(
    values: list[bytes | None], headers: list[tuple[str, bytes | None]]
) -> FeedbackRun:
    return FeedbackRun(
        "labels",
        0,
        list(range(len(values))),
        [None] * len(values),
        values,
        [headers] * len(values),
        data_type="penguins",
    )


def test_labels_decode_in_the_data_types_own_encodings() -> None:
    feedback = Feedback(("penguins",), 4)
    run = feedback_run(
        [
            b'{"penguin_id": "p1", "species": "Adelie", "observed_at_ms": 5}',
            b'{"penguin_id": "p2", "species": "Gentoo"}',
            b'{"species": "Adelie"}',  # no id
            b'{"penguin_id": "p3"}',  # no label
            b'{"penguin_id": "p4", "species": "Emperor"}',  # not a class of the contract
            b"{not json",
        ],
        [("content-type", b"application/json")],
    )
    out = feedback.labels(run, PENGUINS, now_ms=99)
    batches = [o for o in out if isinstance(o, LabelBatch)]
    dead = sorted((d.offset, d.reason) for d in out if isinstance(d, DeadLetter))
    assert dead == [
        (2, "missing_field"),
        (3, "missing_field"),
        (4, "unknown_category"),
        (5, "undecodable"),
    ]
    got = {
        rid: (label, t)
        for b in batches
        for rid, label, t in zip(b.record_ids, b.labels, b.label_time_ms, strict=True)
    }
    assert got == {"p1": ("Adelie", 5), "p2": ("Gentoo", 99)}  # no event time: arrival
    for b in batches:  # each batch goes to the key that owns its ids
        assert {int(h % np.uint64(4)) for h in b.hashes} == {int(b.key.split("#")[1])}
    # CSV: id, event time, label.
    csv = feedback_run([b"p5,,Chinstrap"], [("content-type", b"text/csv")])
    (only,) = feedback.labels(csv, PENGUINS, now_ms=1)
    assert isinstance(only, LabelBatch) and list(only.labels) == ["Chinstrap"]


def test_a_label_no_quality_can_take_is_a_dead_letter() -> None:
    from flowtools import WINE_PROTOBUF

    values: list[bytes | None] = list(
        WINE_PROTOBUF.encode([{"record_id": "w1", "quality": 1e13}, {"record_id": "w2"}])
    )
    run = FeedbackRun("labels", 0, [0, 1], [None, None], values, [[], []], data_type="wine")
    out = Feedback(("wine",), 1).labels(run, WINE, now_ms=1)
    assert sorted((d.offset, d.reason) for d in out if isinstance(d, DeadLetter)) == [
        (0, "bad_label"),
        (1, "missing_field"),
    ]


def test_predictions_are_kept_only_for_listed_data_types_with_an_id_and_a_label() -> None:
    assert Feedback(("wine",), 4).keeps(WINE)
    assert Feedback(("*",), 4).keeps(PENGUINS)
    assert not Feedback(("wine",), 4).keeps(PENGUINS)
    assert not Feedback(("*",), 4).keeps(replace(WINE, label_field=""))
    assert not Feedback((), 4).keeps(WINE)


def test_a_classifiers_predictions_keep_class_and_probabilities() -> None:
    from dataflows.contracts.decode import ContractCodecs
    from dataflows.core.records import RawRun, record_columns

    raw: list[bytes | None] = [
        b'{"penguin_id": "p%d", "island": "Dream", "bill_length_mm": 40, "bill_depth_mm": 18,'
        b' "flipper_length_mm": 190, "year": 2008}' % i
        for i in range(3)
    ]
    run = RawRun("r", 0, [0, 1, 2], [None] * 3, raw, [[]] * 3, data_type="penguins")
    columns, _ = record_columns(run, PENGUINS, ContractCodecs(PENGUINS).decode(raw, [[]] * 3))
    assert columns is not None
    prediction = Prediction(
        np.full(3, np.nan),
        ["Gentoo", "Adelie", "Gentoo"],
        np.array([[0.1, 0.2, 0.7], [0.8, 0.1, 0.1], [0.0, 0.0, 1.0]]),
        ("Adelie", "Chinstrap", "Gentoo"),
        np.array([True, False, True]),  # the second one is no prediction
    )
    out = Feedback(("penguins",), 1).predictions(columns, LR, prediction, 7)
    (only,) = out
    assert only.classes == ("Adelie", "Chinstrap", "Gentoo")
    assert only.predicted.tolist() == [2, 2]
    assert only.probabilities is not None and only.probabilities.shape == (2, 3)
    assert only.hashes.tolist() == id_hashes(["p0", "p2"]).tolist()


# --- the join --------------------------------------------------------------------------------


def test_labels_join_their_predictions_and_every_label_is_counted() -> None:
    clock = Clock()
    j = join(clock)
    ids = [f"r{i}" for i in range(10)]
    j.on_values([predictions(clock, ids, [float(i) for i in range(10)])])
    pairs = j.on_values([labels([*ids[:5], "r0", "r1"], [1.0] * 7)])
    (p,) = pairs
    assert p.record_ids == ids[:5] and p.predicted.tolist() == [0, 1, 2, 3, 4]
    j.on_values([labels(["r2", "r9"], [1.0, 1.0])])  # r2 again; r9 fresh
    assert counts(j) == LabelCounts(matched=6, duplicate=3)
    (partial,) = j.close_windows(everything=True)
    quality = partial.stats.feedback
    assert quality is not None and quality.pairs == 6
    errors = np.array([0, 1, 2, 3, 4, 9]) - 1.0
    assert quality.rmse == pytest.approx(math.sqrt(np.mean(errors**2)), abs=1e-12)
    assert quality.mae == pytest.approx(np.mean(np.abs(errors)), abs=1e-12)
    assert quality.labels == LabelCounts(matched=6, duplicate=3)


def test_a_label_before_its_prediction_waits_for_it_then_counts_as_unknown() -> None:
    clock = Clock()
    j = join(clock, label_wait_s=10)
    j.on_values([labels(["early", "never"], [3.0, 3.0])])
    assert counts(j).total == 0 and j.state.pending is not None
    clock.now += 5
    (pair,) = j.on_values([predictions(clock, ["early"], [2.5])])
    assert pair.record_ids == ["early"] and pair.predicted.tolist() == [2.5]
    j.release_pending()
    assert counts(j) == LabelCounts(matched=1)  # "never" still waits
    assert j.next_wakeup_s() == pytest.approx(1_000_010.0)
    clock.now += 5
    j.release_pending()
    assert counts(j) == LabelCounts(matched=1, unknown=1) and j.state.pending is None


def test_waiting_labels_are_bounded() -> None:
    clock = Clock()
    j = join(clock, max_rows=1000)  # at most 100 labels wait
    j.on_values([labels([f"x{i}" for i in range(150)], [1.0] * 150)])
    assert counts(j) == LabelCounts(unknown=50)
    j.release_pending(force=True)
    assert counts(j) == LabelCounts(unknown=150)


def test_a_label_past_the_horizon_is_expired_before_and_after_its_prediction_is_dropped() -> None:
    clock = Clock()
    j = join(clock, horizon_s=100)
    j.on_values([predictions(clock, ["a", "b", "c"], [1.0, 2.0, 3.0])])
    clock.now += 101  # past the horizon, within the slack: still held, found expired
    j.on_values([labels(["a"], [1.0])])
    assert counts(j) == LabelCounts(expired=1)
    assert j.rows == 3
    clock.now += 20  # past the slack: dropped, remembered as tombstones
    j.on_values([predictions(clock, ["d"], [4.0])])
    assert j.rows == 1
    j.on_values([labels(["b", "d", "zz"], [0.0, 0.0, 0.0])])
    j.release_pending(force=True)
    assert counts(j) == LabelCounts(expired=2, matched=1, unknown=1)
    clock.now += 3601  # dropped ids are remembered for an hour: then a label is unknown
    j.on_values([labels(["c"], [0.0])])
    j.release_pending(force=True)
    assert counts(j).unknown == 2


def test_past_the_bounds_the_oldest_predictions_are_evicted_and_their_labels_counted() -> None:
    clock = Clock()
    j = join(clock, max_rows=100)
    for n in range(15):  # 150 predictions, 10 a second
        clock.now += 1
        j.on_values([predictions(clock, [f"r{n}-{i}" for i in range(10)], [0.0] * 10)])
        assert j.rows <= 100
    j.on_values([labels(["r0-0", "r14-9"], [0.0, 0.0])])
    assert counts(j) == LabelCounts(evicted=1, matched=1)
    # Bytes too: each regression prediction takes 25 bytes here.
    small = join(clock, max_bytes=25 * 40)
    small.on_values([predictions(clock, [f"s{i}" for i in range(60)], [0.0] * 60)])
    assert small.nbytes <= 25 * 40 and small.rows == 36


def test_a_record_scored_twice_joins_once() -> None:
    clock = Clock()
    j = join(clock)
    j.on_values([predictions(clock, ["a", "b"], [1.0, 2.0])])
    clock.now += 1
    j.on_values([predictions(clock, ["a"], [1.5])])  # scored again (a replay)
    (pair,) = j.on_values([labels(["a"], [1.0])])
    assert pair.predicted.tolist() == [1.5]  # the newest prediction
    j.on_values([labels(["a"], [1.0])])
    assert counts(j) == LabelCounts(matched=1, duplicate=1)


def test_a_label_joins_every_model_that_predicted_its_record() -> None:
    clock = Clock()
    j = join(clock)
    j.on_values([predictions(clock, ["a"], [1.0], LR), predictions(clock, ["a"], [2.0], GBT)])
    pairs = j.on_values([labels(["a"], [1.0])])
    assert sorted(p.identity.name for p in pairs) == ["wine-gbt", "wine-lr"]
    assert counts(j) == LabelCounts(matched=1)
    partials = {p.model.name: p for p in j.close_windows(everything=True)}
    assert set(partials) == {"wine-lr", "wine-gbt"}
    # The outcomes go with the newest model's partial.
    assert partials["wine-gbt"].stats.feedback.labels.matched == 1  # type: ignore[union-attr]
    assert partials["wine-lr"].stats.feedback.labels.total == 0  # type: ignore[union-attr]


def test_labels_with_no_model_yet_are_reported_under_no_model() -> None:
    clock = Clock()
    j = join(clock, label_wait_s=0)
    j.on_values([labels(["a"], [1.0])])
    (partial,) = j.close_windows(everything=True)
    assert (partial.model.data_type, partial.model.name) == ("wine", "")
    assert partial.stats.feedback is not None
    assert partial.stats.feedback.labels == LabelCounts(unknown=1)


def test_the_snapshot_restores_the_store_and_does_not_change_with_it() -> None:
    clock = Clock()
    j = join(clock)
    j.on_values([predictions(clock, [f"r{i}" for i in range(100)], [0.0] * 100)])
    snapshot = pickle.loads(pickle.dumps(j.state.snapshot()))
    j.on_values([labels(["r1"], [1.0])])  # joined after the snapshot
    restored = FeedbackJoin(
        snapshot,
        horizon_s=100,
        label_wait_s=10,
        max_rows=1000,
        max_bytes=1 << 20,
        stats_interval_s=60,
        clock=clock,
    )
    (pair,) = restored.on_values([labels(["r1"], [1.0])])  # not a duplicate there
    assert pair.record_ids == ["r1"]


def test_many_batches_keep_few_runs_and_find_every_id() -> None:
    clock = Clock()
    j = join(clock, max_rows=100_000)
    for n in range(200):
        j.on_values([predictions(clock, [f"r{n}-{i}" for i in range(50)], [float(n)] * 50)])
    (held,) = j.state.models.values()
    assert len(held.runs) <= 16 and held.rows == 10_000
    ids = [f"r{n}-{i}" for n in range(0, 200, 7) for i in (0, 49)]
    pairs = j.on_values([labels(ids, [0.0] * len(ids))])
    found = {rid: v for p in pairs for rid, v in zip(p.record_ids, p.predicted, strict=True)}
    assert found == {rid: float(rid[1:].split("-")[0]) for rid in ids}


# --- quality ---------------------------------------------------------------------------------


def test_quality_windows_add_up_exactly() -> None:
    rng = np.random.default_rng(1)
    classes = ("a", "b", "c")
    probabilities = rng.dirichlet([1, 1, 1], size=100)
    predicted = probabilities.argmax(axis=1)
    truth = class_indices(classes, np.array(rng.choice(["a", "b", "c", "z"], 100), dtype=object))
    whole = QualityAccumulator()
    whole.add_classification(classes, predicted, truth, probabilities)
    parts = QualityAccumulator()
    for lo in range(0, 100, 30):
        part = QualityAccumulator()
        part.add_classification(
            classes, predicted[lo : lo + 30], truth[lo : lo + 30], probabilities[lo : lo + 30]
        )
        parts.merge(part)
    assert parts.accuracy == whole.accuracy
    assert parts.mean_log_loss == pytest.approx(whole.mean_log_loss, rel=1e-12)
    assert whole.confusion is not None and parts.confusion is not None
    assert (parts.confusion == whole.confusion).all() and whole.confusion.sum() == 100
    assert whole.confusion[3].sum() == int((truth < 0).sum())  # labels that are no class
    message = whole.to_proto()
    assert list(message.confusion.classes) == ["a", "b", "c"]
    assert message.labelled_count == 100 and message.HasField("log_loss")
