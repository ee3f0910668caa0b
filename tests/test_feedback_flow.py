"""Labels that arrive later, end to end in-process: the feedback join and online quality.

Labels travel on their own topic, in the data type's encoding, and join the predictions
the dataflow made for their records; the online figures on the stats topic must equal an
offline computation over the same pairs (the scored topic's predictions, the labels sent).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bytewax.recovery import init_db_dir
from bytewax.testing import TestingSource
from flowtools import (
    RECORDS_TOPIC,
    WINE_PROTOBUF,
    CrashOnce,
    Outputs,
    batch,
    descriptor,
    model_batch,
    record_bytes,
    run_flow,
    test_config,
    wine_lines,
)

from dataflows.control.registry import RUNTIMES
from dataflows.core.config import Config
from dataflows.monitoring.quality import LOG_LOSS_EPSILON
from protos import waxserve_pb2 as pb

WORKERS = [1, 2]
FEEDBACK_TOPIC = "feedback"


def feedback_config(**changes: Any) -> Config:
    """Flow-test settings with delayed labels on for wine."""
    return test_config(feedback_data_types="wine", feedback_topic=FEEDBACK_TOPIC, **changes)


def records(lines: list[str], size: int = 25) -> list[object]:
    """Wine records, ids "r0", "r1", ..., round-robin over two partitions."""
    values = record_bytes(lines, id_prefix="r")
    items: list[object] = []
    offsets = [0, 0]
    for i, start in enumerate(range(0, len(values), size)):
        part = i % 2
        chunk = values[start : start + size]
        items.append(batch(RECORDS_TOPIC, chunk, partition=part, start=offsets[part]))
        offsets[part] += len(chunk)
    return items


def label_message(record_id: str, label: float | None, event_time_ms: int = 0) -> bytes:
    """A feedback message: a WineRecord with only the id, the label and its time."""
    row: dict[str, object] = {"record_id": record_id}
    if label is not None:
        row["quality"] = label
    if event_time_ms:
        row["event_time_ms"] = event_time_ms
    return WINE_PROTOBUF.encode([row])[0]


def labels_batch(values: list[bytes], partition: int = 0, start: int = 0) -> object:
    """Feedback messages as one feedback-topic batch."""
    return batch(FEEDBACK_TOPIC, values, partition=partition, start=start)


def true_quality(lines: list[str]) -> list[float]:
    """Each wine line's quality, the in-record label."""
    return [float(line.split(";")[-1]) for line in lines]


def feedback_of(out: Outputs, model: str) -> list[pb.ServingStats]:
    """The model's stats messages that carry feedback quality, in window order."""
    stats = [s for s in out.stats() if s.model_name == model and s.HasField("feedback_window")]
    return sorted(stats, key=lambda s: s.window_start_ms)


def outcomes(out: Outputs) -> Counter[str]:
    """Label outcomes over every stats window of every model."""
    total: Counter[str] = Counter()
    for s in out.stats():
        if s.HasField("feedback_window"):
            labels = s.feedback_window.labels
            for name in ("matched", "unknown", "expired", "evicted", "duplicate"):
                total[name] += getattr(labels, name)
    return total


@pytest.mark.parametrize("workers", WORKERS)
def test_delayed_labels_give_online_rmse_and_mae_equal_to_offline(workers: int) -> None:
    lines = wine_lines(0, 200)
    # Labels for 150 of the 200 records (shifted by 0.5, to tell them from the in-record
    # ones), in two batches on two partitions; 5 for ids never scored, 3 sent twice, and 3
    # that are no label at all (no quality, a quality past ±1e12, bytes that do not parse).
    labelled = {f"r{i}": q + 0.5 for i, q in enumerate(true_quality(lines)) if i % 4 != 3}
    messages = [label_message(rid, label, 1_700_000_000_000) for rid, label in labelled.items()]
    unknown = [label_message(f"nobody-{i}", 5.0) for i in range(5)]
    duplicates = [label_message(rid, labelled[rid]) for rid in ("r0", "r1", "r2")]
    bad = [label_message("r3", None), label_message("r7", 1e13), b"\xff\x00 not protobuf"]
    feedback = [
        labels_batch(messages[:80] + unknown, partition=0),
        labels_batch(messages[80:] + duplicates + bad, partition=1),
    ]
    out = run_flow(
        feedback_config(),
        [model_batch(descriptor("wine-lr"))],
        records(lines),
        feedback=feedback,
        workers=workers,
    )
    scored = {s.record_id: s.value for s in out.scored()}
    assert len(scored) == 200
    # Offline: the same pairs, from the scored topic and the labels sent.
    errors = np.array([scored[rid] - label for rid, label in labelled.items()])
    rmse = math.sqrt(float(np.mean(errors**2)))
    mae = float(np.mean(np.abs(errors)))
    windows = feedback_of(out, "wine-lr")
    assert sum(s.feedback_window.labelled_count for s in windows) == 150
    total = windows[-1].feedback_total
    assert total.labelled_count == 150 and total.error_count == 150
    assert abs(total.rmse - rmse) <= 1e-9
    assert abs(total.mae - mae) <= 1e-9
    assert not total.HasField("accuracy") and not total.HasField("log_loss")
    assert outcomes(out) == Counter(matched=150, unknown=5, duplicate=3)
    # The bad ones are dead letters, with their reasons and original bytes.
    dead = {(h["waxserve.error.class"], h["waxserve.source.topic"]) for h, _ in out.dead_letters()}
    assert dead == {
        ("missing_field", FEEDBACK_TOPIC),
        ("bad_label", FEEDBACK_TOPIC),
        ("undecodable", FEEDBACK_TOPIC),
    }
    # In-record labels keep working, apart: every record carried its own quality.
    stats = [s for s in out.stats() if s.model_name == "wine-lr"]
    assert sum(s.window_labelled_count for s in stats) == 200
    inline = math.sqrt(
        float(np.mean([(scored[f"r{i}"] - q) ** 2 for i, q in enumerate(true_quality(lines))]))
    )
    windowed = [s for s in stats if s.window_labelled_count]
    if len(windowed) == 1:
        assert windowed[0].window_rmse == pytest.approx(inline, rel=1e-9)


@pytest.mark.parametrize("model", ["wine-rf-classifier", "wine-logreg-zipmap"])
def test_delayed_labels_give_online_accuracy_log_loss_and_confusion_equal_to_offline(
    model: str,
) -> None:
    lines = wine_lines(0, 120)
    labelled = {f"r{i}": q for i, q in enumerate(true_quality(lines))}
    feedback = [labels_batch([label_message(rid, q) for rid, q in labelled.items()])]
    out = run_flow(
        feedback_config(),
        [model_batch(descriptor(model))],
        records(lines, size=40),
        feedback=feedback,
    )
    scored = {s.record_id: s for s in out.scored()}
    classes = sorted(next(iter(scored.values())).probabilities, key=float)
    # Offline, from the scored records' labels and probabilities.
    right = sum(scored[rid].label == _class_of(q, classes) for rid, q in labelled.items())
    losses = []
    for rid, q in labelled.items():
        true_class = _class_of(q, classes)
        p = scored[rid].probabilities.get(true_class, 0.0) if true_class is not None else 0.0
        losses.append(-math.log(min(1.0, max(LOG_LOSS_EPSILON, p))))
    total = feedback_of(out, model)[-1].feedback_total
    assert total.labelled_count == 120
    assert abs(total.accuracy - right / 120) <= 1e-9
    assert abs(total.log_loss - float(np.mean(losses))) <= 1e-9
    matrix = total.confusion
    k = len(matrix.classes)
    counts = np.array(matrix.counts).reshape(k + 1, k)
    expected = np.zeros((k + 1, k), dtype=np.int64)
    for rid, q in labelled.items():
        true_class = _class_of(q, list(matrix.classes))
        row = list(matrix.classes).index(true_class) if true_class is not None else k
        expected[row, list(matrix.classes).index(scored[rid].label)] += 1
    assert (counts == expected).all()
    assert int(np.trace(counts[:k])) == right


def _class_of(label: float, classes: list[str]) -> str | None:
    """The class named by a numeric label ("5" for 5.0), None when none is."""
    return next((c for c in classes if float(c) == label), None)


def test_a_label_can_come_before_its_prediction() -> None:
    # The model comes late: records and labels wait for it in their shards, in arrival
    # order, and labels released before their records wait at the join for them.
    lines = wine_lines(0, 40)
    feedback = [labels_batch([label_message(f"r{i}", 5.0) for i in range(40)])]
    out = run_flow(
        feedback_config(),
        [TestingSource.PAUSE(timedelta(seconds=1.0)), model_batch(descriptor("wine-lr"))],
        records(lines, size=10),
        feedback=feedback,
    )
    assert outcomes(out) == Counter(matched=40)


@pytest.mark.parametrize("workers", WORKERS)
def test_labels_after_an_abort_and_resume_join_the_predictions_made_before(
    workers: int, tmp_path: Path
) -> None:
    init_db_dir(tmp_path, 2)
    lines = wine_lines(0, 300)
    models = [model_batch(descriptor("wine-lr"))]
    items = records(lines, size=20)
    outputs = Outputs()
    crash = CrashOnce(after_items=6)
    with pytest.raises(Exception, match="error writing output batch"):
        run_flow(
            feedback_config(),
            models,
            items,
            feedback=[],
            workers=workers,
            outputs=outputs,
            recovery=tmp_path,
            crash=crash,
        )
    assert crash.fired
    RUNTIMES.clear()  # a new process: nothing loaded
    run_flow(
        feedback_config(),
        models,
        items,
        feedback=[],
        workers=workers,
        outputs=outputs,
        recovery=tmp_path,
    )
    assert len({s.record_id for s in outputs.scored()}) == 300
    # Only now the labels: every prediction, whichever run made it, is in the
    # snapshotted store.
    labelled = {f"r{i}": q for i, q in enumerate(true_quality(lines))}
    after = Outputs()
    run_flow(
        feedback_config(),
        models,
        items,
        feedback=[labels_batch([label_message(rid, q) for rid, q in labelled.items()])],
        workers=workers,
        outputs=after,
        recovery=tmp_path,
    )
    assert outcomes(after) == Counter(matched=300)
    scored = {s.record_id: s.value for s in outputs.scored()}
    rmse = math.sqrt(float(np.mean([(scored[r] - q) ** 2 for r, q in labelled.items()])))
    (stats,) = feedback_of(after, "wine-lr")
    assert abs(stats.feedback_window.rmse - rmse) <= 1e-9


def test_a_label_after_the_horizon_is_counted_expired_not_joined(tmp_path: Path) -> None:
    init_db_dir(tmp_path, 1)
    lines = wine_lines(0, 50)
    models = [model_batch(descriptor("wine-lr"))]
    items = records(lines, size=25)
    config = feedback_config(feedback_horizon_s=60)
    run_flow(config, models, items, feedback=[], outputs=Outputs(), recovery=tmp_path)
    # The labels come 61 s (of the dataflow's clock) after their predictions: expired.
    # One for an id never scored is unknown.
    late = [label_message(f"r{i}", 5.0) for i in range(50)] + [label_message("nobody", 5.0)]
    out = run_flow(
        config,
        models,
        items,
        feedback=[labels_batch(late)],
        outputs=Outputs(),
        recovery=tmp_path,
        clock=lambda: time.time() + 61,
    )
    assert outcomes(out) == Counter(expired=50, unknown=1)
    (stats,) = [s for s in out.stats() if s.HasField("feedback_window")]
    assert stats.feedback_window.labelled_count == 0
    assert not stats.feedback_window.HasField("rmse")
