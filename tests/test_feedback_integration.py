"""Labels that arrive later, on Apache Kafka: `python -m bytewax.run`, kill -9 and resume.

The predictions waiting for their labels live in Bytewax's recovery store: a process killed
with SIGKILL and restarted must still join every label to the prediction made before the
kill, and a restart with a shorter horizon must count the same labels as expired.
"""

from __future__ import annotations

import math
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from flowtools import WINE_PROTOBUF, descriptor, record_bytes, wine_lines
from test_integration import Dataflow, Reader, produce, publish, wait_for_snapshot_after

from dataflows.core.config import Config
from protos import waxserve_pb2 as pb

pytestmark = pytest.mark.integration

OUTCOMES = ("matched", "unknown", "expired", "evicted", "duplicate")


def label_values(labels: dict[str, float]) -> list[bytes]:
    """Feedback messages: WineRecords with only the id and the label."""
    return WINE_PROTOBUF.encode([{"record_id": r, "quality": q} for r, q in labels.items()])


def feedback_stats(reader: Reader, config: Config) -> list[pb.ServingStats]:
    """Stats messages with delayed-label quality, seen so far."""
    stats = [pb.ServingStats.FromString(v) for v, _ in reader.seen[config.stats_topic]]
    return [s for s in stats if s.HasField("feedback_window")]


def outcomes(stats: list[pb.ServingStats]) -> Counter[str]:
    """Label outcomes summed over windows."""
    total: Counter[str] = Counter()
    for s in stats:
        for name in OUTCOMES:
            total[name] += getattr(s.feedback_window.labels, name)
    return +total


def test_labels_after_kill_9_and_resume_join_and_after_the_horizon_expire(
    kafka_config: Config, tmp_path: Path
) -> None:
    config = kafka_config
    recovery = tmp_path / "recovery"
    recovery.mkdir()
    subprocess.run([sys.executable, "-m", "bytewax.recovery", str(recovery), "1"], check=True)
    args = ("-r", str(recovery), "-s", "1", "-b", "10")
    # Labels for ids never scored wait 2 s for a prediction, then count as unknown.
    feedback = {"WAXSERVE_FEEDBACK_DATA_TYPES": "wine", "WAXSERVE_FEEDBACK_LABEL_WAIT_S": "2"}
    lines = wine_lines()
    total = 4000
    values = record_bytes((lines * 3)[:total], id_prefix="r")
    qualities = [float(line.split(";")[-1]) for line in (lines * 3)[:total]]
    labels = {f"r{i}": q + 0.5 for i, q in enumerate(qualities)}
    reader = Reader(config, config.scored_topic, config.stats_topic, config.dlq_topic)
    publish(config, descriptor("wine-lr"))
    flow = Dataflow(config, tmp_path, *args, **feedback)
    feeder = threading.Thread(
        target=produce,
        args=(config, config.records_topic, values),
        kwargs={"partitions": 2, "rate": 2000},
    )
    try:
        # Killed with a third scored and snapshotted: those predictions are in the store
        # only through the recovery store; the rest are scored after the restart.
        feeder.start()
        ids = lambda: {s.record_id for s in reader.scored(config)}  # noqa: E731
        third = lambda: len(ids()) >= total // 3  # noqa: E731
        wait_for_snapshot_after(reader, "a third scored", third, flow, [recovery], workers=1)
        flow.kill9()
        flow = Dataflow(config, tmp_path, *args, **feedback)
        feeder.join()
        reader.wait_for("every record scored", lambda: len(ids()) >= total, flow, timeout=120)
        # Only now the labels, and 10 for ids never scored.
        unknown = {f"nobody-{i}": 5.0 for i in range(10)}
        produce(config, config.feedback_topic, label_values({**labels, **unknown}), partitions=2)

        def done() -> bool:
            return outcomes(feedback_stats(reader, config)) == Counter(matched=total, unknown=10)

        # Snapshotted after: the restart below neither reads these labels again nor emits
        # their windows again.
        wait_for_snapshot_after(reader, "every label counted", done, flow, [recovery], workers=1)
        # The online RMSE and MAE equal an offline computation over the same pairs: the
        # scored records' predictions (a record scored twice has one value) and the labels.
        scored = {s.record_id: s.value for s in reader.scored(config)}
        errors = [scored[r] - label for r, label in labels.items()]
        totals = [
            s.feedback_total
            for s in feedback_stats(reader, config)
            if s.feedback_total.labelled_count == total
        ]
        assert totals, "no stats message with every pair in its total"
        assert abs(totals[-1].rmse - math.sqrt(sum(e * e for e in errors) / total)) <= 1e-9
        assert abs(totals[-1].mae - sum(abs(e) for e in errors) / total) <= 1e-9
        flow.stop()

        # A restart with a horizon of 1 s: every prediction is older than that now, so
        # the same labels again are expired (not unknown, not joined).
        reader.seen[config.stats_topic].clear()
        flow = Dataflow(config, tmp_path, *args, **feedback, WAXSERVE_FEEDBACK_HORIZON_S="1")
        produce(config, config.feedback_topic, label_values(dict(list(labels.items())[:500])))

        def expired() -> bool:
            return outcomes(feedback_stats(reader, config)) == Counter(expired=500)

        reader.wait_for("the late labels counted as expired", expired, flow, timeout=120)
    finally:
        flow.stop()
        reader.close()
    assert reader.seen[config.dlq_topic] == []
