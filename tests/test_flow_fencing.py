"""What exactly-once output relies on: every sink item names its input stream, and within
a stream (per sink) positions only go up and the route never changes."""

from __future__ import annotations

from datetime import timedelta

import pytest
from bytewax.testing import TestingSource
from flowtools import (
    ERROR_CSV,
    RECORDS_TOPIC,
    SINK_NAMES,
    Outputs,
    batch,
    csv_batch,
    descriptor,
    model_batch,
    record_bytes,
    run_flow,
    test_config,
    wine_lines,
)

from dataflows.core.output import OutBatch


@pytest.mark.parametrize("workers", [1, 2])
def test_every_output_is_fenced_in_order_per_stream(workers: int) -> None:
    models = [
        model_batch(descriptor("wine-lr")),
        TestingSource.PAUSE(timedelta(seconds=0.5)),
        model_batch(descriptor("wine-gbt"), start=1),
        model_batch(descriptor("wine-gbt", version="9", sha256="0" * 64), start=2),  # rejected
    ]
    lines = wine_lines(0, 300)
    records = []
    for i in range(6):
        part = i % 2
        start = (i // 2) * 50
        chunk = record_bytes(lines[i * 50 : (i + 1) * 50], id_prefix=f"{i}-")
        records.append(batch(RECORDS_TOPIC, chunk, partition=part, start=start))
    records.append(csv_batch(ERROR_CSV.read_text().splitlines(), partition=0, start=150))
    records.append(batch(RECORDS_TOPIC, [b"x"], partition=1, start=150, headers=[[]]))
    out = run_flow(
        test_config(),
        models,
        records,
        workers=workers,
    )
    _assert_fenced(out)
    assert len(out.scored()) > 0 and len(out.dead_letters()) > 0


def _assert_fenced(out: Outputs) -> None:
    for sink in SINK_NAMES:
        last: dict[str, tuple[str, int]] = {}
        for route, item in out.items[sink]:
            assert isinstance(item, OutBatch)
            if not item.stream:
                assert sink == "events"  # only "restored" events go unfenced
                continue
            assert len(item.positions) == len(item.messages) > 0
            assert list(item.positions) == sorted(set(item.positions))
            previous = last.get(item.stream)
            if previous is not None:
                assert previous[0] == route, f"{sink} {item.stream}: one route"
                assert item.positions[0] > previous[1], f"{sink} {item.stream}: ascending"
            last[item.stream] = (route, item.positions[-1])
        if sink in ("scored", "dlq"):
            assert last, f"nothing fenced in {sink}"
