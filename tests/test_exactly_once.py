"""Exactly-once output under kill -9, on the real broker (a bounded `just exactly-once`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.exactly_once import run_kills

pytestmark = pytest.mark.integration


def test_kill_9_at_random_moments_each_outcome_and_window_once(broker: Any, tmp_path: Path) -> None:
    # Kills land in start-up, steady scoring, model swaps and snapshots (1 s apart): the
    # delays are drawn from 0.2 to 6 s, the feed lasts as long as the kills, and a new
    # model version arrives every 1/8 of the records.
    report = run_kills(broker.bootstrap, tmp_path, records=4000, kills=5, seed=12)
    print(report)
    assert report.lost == 0
    assert report.duplicate_records == {"scored": 0, "dlq": 0, "scored+dlq": 0}
    assert report.duplicate_windows == {"stats": 0, "drift": 0}
    assert report.duplicate_events == 0
    assert report.scored == 4000  # every wine record is valid: none dead-lettered
    assert report.stats_windows > 0 and report.drift_windows > 0
