"""`waxserve demo`: the summary logic without Kafka, and one real run end to end."""

from __future__ import annotations

import io
import itertools
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from dataflows.config import Config
from dataflows.demo import (
    DEMO_SHIFT_DELTA,
    DEMO_SHIFT_FEATURE,
    ERROR_CSV,
    WINE_CSV,
    DemoOutcome,
    DemoStats,
    DemoView,
    LiveView,
    dataflow_env,
    demo_config,
    percentile,
    plan_demo,
    render_line,
    render_panel,
    render_summary,
    shift_feature,
    shuffled_lines,
    tampered_descriptor,
)
from dataflows.descriptors import load_catalog, sha256_hex
from dataflows.records import CSV_COLUMNS, parse_csv_line
from protos import waxserve_pb2 as pb

REPO = Path(__file__).resolve().parents[1]
RECORDS = "waxserve-records"
T0_MS = 1_700_000_000_000


def scored(
    offset: int,
    model: str = "wine-lr",
    version: str = "1",
    *,
    partition: int = 0,
    event_ms: int = T0_MS,
    scored_ms: int = T0_MS + 10,
) -> pb.ScoredRecord:
    return pb.ScoredRecord(
        source_topic=RECORDS,
        source_partition=partition,
        source_offset=offset,
        model_name=model,
        model_version=version,
        event_time_ms=event_ms,
        scored_at_ms=scored_ms,
    )


def dead_letter(
    offset: int, reason: str, *, topic: str = RECORDS, partition: int = 0
) -> dict[str, str]:
    return {
        "waxserve.stage": "score",
        "waxserve.error.class": reason,
        "waxserve.source.topic": topic,
        "waxserve.source.partition": str(partition),
        "waxserve.source.offset": str(offset),
    }


def event(
    kind: str, model: str, version: str = "1", *, at_ms: int = T0_MS, reason: str = ""
) -> pb.ModelEvent:
    return pb.ModelEvent(
        kind=kind,
        data_type="wine",
        model_name=model,
        model_version=version,
        at_ms=at_ms,
        reason=reason,
    )


def drift(max_psi: float, *, start_ms: int = T0_MS, alarm: bool = False) -> pb.DriftMetrics:
    return pb.DriftMetrics(
        data_type="wine",
        model_name="wine-lr",
        model_version="1",
        window_start_ms=start_ms,
        window_end_ms=start_ms + 5000,
        record_count=5000,
        max_psi=max_psi,
        alarm=alarm,
        features=[
            pb.FeatureDrift(feature="ph", psi=0.01),
            pb.FeatureDrift(feature="alcohol", psi=max_psi),
        ],
    )


# --- percentiles --------------------------------------------------------------------------


def test_percentile_is_nearest_rank_over_a_histogram() -> None:
    assert percentile(Counter(), 50) is None
    uniform = Counter(range(1, 101))
    assert (percentile(uniform, 50), percentile(uniform, 99), percentile(uniform, 100)) == (
        50,
        99,
        100,
    )
    skewed = Counter({5: 98, 1000: 2})  # 2% slow records: p99 sees them, p50 does not
    assert percentile(skewed, 50) == 5 and percentile(skewed, 99) == 1000
    assert percentile(Counter({7: 1}), 0) == 7


# --- folding the output topics ------------------------------------------------------------


def test_scored_and_dead_letters_account_for_records_sent() -> None:
    stats = DemoStats(records_topic=RECORDS)
    for offset in range(6):
        stats.add_scored(scored(offset, "wine-lr"))
    for offset in range(6, 10):
        stats.add_scored(scored(offset, "wine-gbt"))
    stats.add_dead_letter(dead_letter(10, "missing_feature"))
    stats.add_dead_letter(dead_letter(11, "missing_feature"))
    stats.add_dead_letter(dead_letter(0, "bad_csv", partition=1))
    assert stats.scored_by_model == {"wine-lr:1": 6, "wine-gbt:1": 4}
    assert stats.scored == 10 and stats.dead == 3
    assert stats.dead_by_class == {"missing_feature": 2, "bad_csv": 1}
    assert stats.unaccounted(13) == 0
    assert stats.unaccounted(15) == 2  # two records sent that nothing came out for


def test_duplicates_count_once_and_a_record_both_scored_and_dead_is_flagged() -> None:
    stats = DemoStats(records_topic=RECORDS)
    stats.add_scored(scored(1))
    stats.add_scored(scored(1))  # at-least-once redelivery
    stats.add_scored(scored(1, partition=2))  # same offset, other partition: another record
    stats.add_dead_letter(dead_letter(5, "missing_feature"))
    stats.add_dead_letter(dead_letter(5, "missing_feature"))
    assert stats.scored == 2 and stats.dead == 1 and stats.duplicates == 2
    assert stats.unaccounted(3) == 0
    stats.add_dead_letter(dead_letter(1, "score_failed"))
    assert stats.scored_and_dead == 1 and stats.accounted == 3


def test_rejected_descriptors_are_not_record_dead_letters() -> None:
    stats = DemoStats(records_topic=RECORDS)
    stats.add_dead_letter(dead_letter(3, "digest_mismatch", topic="waxserve-models"))
    assert stats.dead == 0 and stats.unaccounted(0) == 0
    assert stats.rejected_descriptors == {"digest_mismatch": 1}


def test_latency_is_scored_at_minus_event_time() -> None:
    stats = DemoStats(records_topic=RECORDS)
    stats.add_scored(scored(0, event_ms=T0_MS, scored_ms=T0_MS + 12))
    stats.add_scored(scored(1, event_ms=T0_MS, scored_ms=T0_MS + 40))
    stats.add_scored(scored(2, event_ms=0, scored_ms=T0_MS))  # no event time: no latency
    assert stats.latency == Counter({12: 1, 40: 1})
    count, recent = stats.take_recent()
    assert count == 3 and recent == Counter({12: 1, 40: 1})
    assert stats.take_recent() == (0, Counter())  # reset: "last second" only
    assert stats.latency == Counter({12: 1, 40: 1})  # the whole run stays
    assert (stats.first_scored_ms, stats.last_scored_ms) == (T0_MS, T0_MS + 40)


def test_model_events_track_the_current_model_and_the_timeline() -> None:
    stats = DemoStats(records_topic=RECORDS, t0_ms=T0_MS)
    stats.add_event(event("installed", "wine-lr", at_ms=T0_MS - 700))
    stats.add_event(event("installed", "wine-gbt", at_ms=T0_MS + 13_300))
    stats.add_event(
        event("rejected", "wine-rf-classifier", at_ms=T0_MS + 20_000, reason="digest_mismatch")
    )
    assert stats.current == {"wine": "wine-gbt:1"}  # a rejection leaves the model serving
    assert [(e.kind, e.model, stats.clock(e.at_ms)) for e in stats.timeline] == [
        ("installed", "wine-lr:1", "-0.7 s"),
        ("installed", "wine-gbt:1", "+13.3 s"),
        ("rejected", "wine-rf-classifier:1", "+20.0 s"),
    ]
    notes = stats.take_notes()
    assert notes[-1] == (
        "rejected wine-rf-classifier:1 (digest_mismatch): wine-gbt:1 keeps serving wine"
    )
    assert stats.take_notes() == []
    stats.add_event(event("restored", "wine-lr"))
    assert stats.current == {"wine": "wine-lr:1"}


def test_drift_keeps_the_latest_window_and_notes_alarms() -> None:
    stats = DemoStats(records_topic=RECORDS, t0_ms=T0_MS)
    stats.add_drift(drift(0.02, start_ms=T0_MS))
    stats.add_drift(drift(1.5, start_ms=T0_MS + 10_000, alarm=True))
    stats.add_drift(drift(0.03, start_ms=T0_MS + 5000))  # late, older window
    assert stats.drift_windows == 3 and len(stats.drift_alarms) == 1
    assert stats.latest_drift is not None and stats.latest_drift.max_psi == 1.5
    (note,) = stats.take_notes()
    assert "DRIFT ALARM" in note and "alcohol" in note and "+10.0 s..+15.0 s" in note


def test_add_message_decodes_by_topic_kind() -> None:
    stats = DemoStats(records_topic=RECORDS)
    stats.add_message("scored", scored(0).SerializeToString(), [])
    stats.add_message("events", event("installed", "wine-lr").SerializeToString(), [])
    stats.add_message("drift", drift(0.1).SerializeToString(), [])
    stats.add_message(
        "stats",
        pb.ServingStats(
            model_name="wine-lr", model_version="1", mean_duration_us=12.5
        ).SerializeToString(),
        [],
    )
    headers = [(k, v.encode()) for k, v in dead_letter(9, "bad_csv").items()]
    stats.add_message("dlq", b"7.4;0.7", [*headers, ("content-type", b"text/csv")])
    stats.add_message("scored", b"\xff not protobuf", [])
    assert stats.scored == 1 and stats.current == {"wine": "wine-lr:1"}
    assert stats.drift_windows == 1 and stats.model_us == {"wine-lr:1": 12.5}
    assert stats.dead_by_class == {"bad_csv": 1} and stats.undecodable == 1


# --- text ---------------------------------------------------------------------------------


def _finished_stats() -> DemoStats:
    stats = DemoStats(records_topic=RECORDS, t0_ms=T0_MS)
    stats.add_event(event("installed", "wine-lr", at_ms=T0_MS - 500))
    for offset in range(8):
        stats.add_scored(scored(offset, scored_ms=T0_MS + 1000 * offset + 10))
    stats.add_dead_letter(dead_letter(8, "missing_feature"))
    return stats


def test_summary_shows_the_accounting() -> None:
    stats = _finished_stats()
    outcome = DemoOutcome(sent=9, failed=0, replay_s=8.0, rate=1.0, workers=1)
    text = "\n".join(render_summary(stats, outcome))
    assert re.search(r"UNACCOUNTED\s+0\s.*OK", text)
    assert re.search(r"wine-lr:1\s+8\b", text) and "missing_feature 1" in text
    assert "installed wine-lr:1" in text and "latency" in text
    lost = "\n".join(
        render_summary(stats, DemoOutcome(sent=11, failed=0, replay_s=8.0, rate=1.0, workers=1))
    )
    assert re.search(r"UNACCOUNTED\s+2\s.*NOT OK", lost)
    interrupted = "\n".join(
        render_summary(
            stats,
            DemoOutcome(sent=11, failed=0, replay_s=3.0, rate=1.0, workers=1, interrupted=True),
        )
    )
    assert "INTERRUPTED" in interrupted and "in flight" in interrupted


def test_live_panel_and_line() -> None:
    stats = _finished_stats()
    view = DemoView(
        elapsed_s=8.0, duration_s=40, sent=10, scored_per_s=1.0, recent_latency=Counter({10: 1})
    )
    panel = "\n".join(render_panel(stats, view))
    assert "sent 10" in panel and "in flight 1" in panel and "wine -> wine-lr:1" in panel
    assert "p50 10 ms" in panel and "missing_feature 1" in panel
    line = render_line(stats, view)
    assert "\n" not in line and "scored 8" in line and "wine=wine-lr:1" in line


def test_live_view_redraws_on_a_terminal_and_appends_otherwise() -> None:
    out = io.StringIO()
    tty = LiveView(out, quiet=False, tty=True)
    tty.update(["a", "b"], "line")
    tty.note("note")
    tty.update(["c", "d"], "line")
    assert out.getvalue() == "a\nb\n\x1b[2F\x1b[Jnote\na\nb\n\x1b[2F\x1b[Jc\nd\n"
    out = io.StringIO()
    plain = LiveView(out, quiet=False, tty=False)
    plain.update(["a", "b"], "line 1")
    plain.note("note")
    plain.update(["c", "d"], "line 2")
    assert out.getvalue() == "line 1\nnote\nline 2\n"
    out = io.StringIO()
    quiet = LiveView(out, quiet=True, tty=True)
    quiet.note("note")
    quiet.update(["a"], "line")
    assert out.getvalue() == ""


# --- the plan and the records -------------------------------------------------------------


def test_plan_swaps_models_and_places_the_drift_burst_under_the_last_one() -> None:
    plan = plan_demo(40, ["wine-lr", "wine-gbt", "wine-pmml-lr"], drift_window_s=5)
    steps = [(s.at_s, s.action, s.model) for s in plan]
    assert steps[0] == (2.0, "bad_rows", "")
    assert (13.3, "swap", "wine-gbt") in steps and (26.7, "swap", "wine-pmml-lr") in steps
    assert (20.0, "tampered", "wine-rf-classifier") in steps
    (shift,) = [s for s in plan if s.action == "shift"]
    assert shift.at_s > 26.7 and shift.seconds == 5 and shift.at_s + shift.seconds <= 40 - 5
    assert [s.at_s for s in plan] == sorted(s.at_s for s in plan)
    single = plan_demo(10, ["wine-lr"], drift_window_s=5)
    assert [s.action for s in single] == ["bad_rows", "tampered", "shift"]
    assert all(0 < s.at_s < 10 for s in single)


def test_shift_feature_moves_one_column() -> None:
    line = b"7.4;0.7;0;1.9;0.076;11;34;0.9978;3.51;0.56;9.4;5"
    shifted = parse_csv_line(shift_feature(line, DEMO_SHIFT_FEATURE, DEMO_SHIFT_DELTA).decode())
    original = parse_csv_line(line.decode())
    for name in CSV_COLUMNS:
        expected = original[name]
        if name == DEMO_SHIFT_FEATURE:
            expected = 9.4 + DEMO_SHIFT_DELTA
        assert shifted[name] == pytest.approx(expected)
    for malformed in (b"7.4;0.7", b"7.4;0.7;0;1.9;0.076;11;34;0.9978;3.51;0.56;;5"):
        assert shift_feature(malformed, DEMO_SHIFT_FEATURE, DEMO_SHIFT_DELTA) == malformed


def test_shuffled_lines_are_permutations_pass_after_pass() -> None:
    count = len(WINE_CSV.read_text().splitlines())
    lines = shuffled_lines(WINE_CSV)
    first = [next(lines) for _ in range(count)]
    second = [next(lines) for _ in range(count)]
    assert sorted(line.line_no for line in first) == list(range(1, count + 1))
    assert sorted(line.line_no for line in second) == list(range(1, count + 1))
    assert {line.pass_no for line in first} == {0} and {line.pass_no for line in second} == {1}
    assert [line.line_no for line in first] != sorted(line.line_no for line in first)
    assert [line.line_no for line in first] != [line.line_no for line in second]
    raw = WINE_CSV.read_bytes().splitlines()
    assert all(raw[line.line_no - 1] == line.raw for line in first[:50])
    once = [line.line_no for line in itertools.islice(shuffled_lines(ERROR_CSV), 14)]
    again = [line.line_no for line in itertools.islice(shuffled_lines(ERROR_CSV), 14)]
    assert once == again  # the same order every run


def test_the_tampered_descriptor_does_not_match_its_bytes() -> None:
    entry = load_catalog()["wine-rf-classifier"]
    desc = tampered_descriptor(entry)
    assert desc.sha256 != sha256_hex(desc.model_bytes)
    assert desc.sha256 != entry.descriptor().sha256 and len(desc.sha256) == 64


def test_dataflow_environment_and_fresh_topics(tmp_path: Path) -> None:
    config = demo_config(Config(brokers="kafka:9092"), "abc123", fresh_topics=True)
    assert config.records_topic == "waxserve-records-demo-abc123"
    assert config.models_topic == "waxserve-models-demo-abc123"
    assert demo_config(Config(), "abc123", fresh_topics=False) == Config()
    env = dataflow_env(config, tmp_path, fetch_wait_ms=100)
    assert env["WAXSERVE_BROKERS"] == "kafka:9092"
    assert env["WAXSERVE_DLQ_TOPIC"] == "waxserve-dlq-demo-abc123"
    assert env["WAXSERVE_STATS_INTERVAL_S"] == "2.0" and env["WAXSERVE_DRIFT_WINDOW_S"] == "5.0"
    assert env["WAXSERVE_FETCH_WAIT_MS"] == "100"
    assert env["BYTEWAX_DATAFLOW_API_CACHE_PATH"] == str(tmp_path / "bytewax")
    assert Config.from_env(env).records_topic == config.records_topic


# --- the real thing -----------------------------------------------------------------------


def _number(pattern: str, text: str) -> int:
    match = re.search(pattern, text)
    assert match is not None, f"no {pattern!r} in:\n{text}"
    return int(match.group(1).replace(",", ""))


@pytest.mark.integration
def test_demo_runs_end_to_end_and_accounts_for_every_record() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAXSERVE_")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dataflows.cli",
            "demo",
            "--duration",
            "12",
            "--rate",
            "300",
            "--quiet",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = result.stdout
    assert result.returncode == 0, f"exit {result.returncode}\n{out}\n{result.stderr}"
    assert "waxserve demo summary" in out and "replaying" not in out  # --quiet: summary only
    per_model = {
        m: int(n.replace(",", ""))
        for m, n in re.findall(r"^    (\S+:\S+)\s+([\d,]+)$", out, re.MULTILINE)
    }
    assert len([m for m, n in per_model.items() if n > 0]) >= 2, out
    sent = _number(r"records sent\s+([\d,]+)", out)
    dead = _number(r"dead-lettered\s+([\d,]+)", out)
    assert sent >= 12 * 300 * 0.9 and dead > 0, out
    assert re.search(r"UNACCOUNTED\s+0\s", out), out
    assert "digest_mismatch" in out  # the tampered model was rejected
