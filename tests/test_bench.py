"""The benchmark harness (bench/): its measuring helpers, its goals, and a tiny run.

Benchmarks are not tests; this only checks that `python -m bench` runs every contender
(but Quix Streams, whose virtual environment takes a while to install) on a tiny input,
that each one scored every record correctly, and that the report is written.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from dataflows.contracts.files import load_contract
from dataflows.core.descriptors import catalog_contracts, load_catalog

REPO = Path(__file__).resolve().parents[1]
# bench/ is not an installed package: `python -m pytest` finds it in the working directory,
# a bare `pytest` needs the repository root on the path.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import report  # noqa: E402
from bench.contenders.common import FEATURES  # noqa: E402
from bench.harness import (  # noqa: E402
    CONTENDERS,
    FORMAT_ROWS,
    LATENCY_DEFAULT,
    THROUGHPUT_DEFAULT,
)
from bench.inputs import INPUTS, SHARED_INPUT, WINE_AVRO_CONTRACT, Feed  # noqa: E402
from bench.measure import CpuSampler, interpolate, percentile, throughput  # noqa: E402

WINE = load_contract(catalog_contracts()["wine"])


def test_contenders_feed_the_model_waxserve_columns() -> None:
    # The Quix venv cannot import dataflows: common.py keeps its own copy of the columns,
    # the wine data file's features (its columns but the last, quality).
    assert WINE.csv_columns[:-1] == FEATURES
    assert load_catalog()["wine-lr"].input_features == FEATURES


def test_avro_contract_is_a_copy_of_the_wine_contract() -> None:
    from dataflows.contracts.codecs import codec_for
    from dataflows.contracts.schema import Encoding

    avro = load_contract(WINE_AVRO_CONTRACT)
    assert (avro.data_type, avro.encoding) == ("wine-avro", Encoding.AVRO)
    assert avro.fields == WINE.fields and avro.csv == WINE.csv
    assert (avro.id_field, avro.event_time_field, avro.label_field) == (
        WINE.id_field,
        WINE.event_time_field,
        WINE.label_field,
    )
    writer = json.loads(avro.avro.writer_schema)
    assert [f["name"] for f in writer["fields"]] == [f.name for f in WINE.fields]
    codec_for(avro, Encoding.AVRO)  # the codec accepts the schema


@pytest.mark.parametrize("name", list(INPUTS))
def test_every_input_is_what_replay_writes(name: str) -> None:
    # Feed checks its batch encoding against RecordEncoder when it is built.
    feed = Feed(INPUTS[name])
    key, value, headers = feed.message(len(feed) + 3, 1_764_000_000_000)
    assert key == str(len(feed) + 3).encode() and value
    # The topic's default names the data type; a content-type where it is not the
    # contract's own encoding.
    expected = {
        "wine-json": [("content-type", b"application/json")],
        "wine-protobuf": None,
        "wine-csv": [("content-type", b"text/csv")],
        "wine-avro": None,
        "penguins-json": None,
    }
    assert headers == expected[name]
    # Only complete rows (every column of the data file): every record can be scored.
    for column in feed.contract.csv_columns:
        values = feed.columns[column].tolist()
        assert None not in values and all(v == v for v in values), column
    assert feed.carries_ids == (name != "wine-csv")


def test_every_input_has_its_contenders() -> None:
    inputs = {CONTENDERS[n].input for n in THROUGHPUT_DEFAULT}
    assert inputs == set(INPUTS)
    assert all(CONTENDERS[n].kind == "waxserve" for n in FORMAT_ROWS)
    assert all(CONTENDERS[n].input == SHARED_INPUT for n in LATENCY_DEFAULT)


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7], 99) == 7
    assert math.isnan(percentile([], 50))


def test_interpolate_clamps_at_the_ends() -> None:
    xs, ys = [1.0, 2.0, 4.0], [10.0, 20.0, 30.0]
    assert interpolate(xs, ys, 1.5) == 15.0
    assert interpolate(xs, ys, 3.0) == 25.0
    assert interpolate(xs, ys, 0.0) == 10.0
    assert interpolate(xs, ys, 9.0) == 30.0


def test_throughput_between_first_and_last_output() -> None:
    assert throughput(200_000, 1_000, 3_000) == 100_000
    assert throughput(10, 5, 5) == 10_000  # a 1 ms floor for a span of 0


def test_cpu_sampler_sees_a_busy_thread() -> None:
    """The sampler reads the process's CPU time: between two samples, what the process
    spent, whatever else the machine runs (a busy loop counts CPU seconds, not wall time)."""
    sampler = CpuSampler(os.getpid(), tree=False)  # sampled by hand: no thread to schedule
    before = time.process_time()
    sampler.sample()
    busy_from = time.thread_time()
    while time.thread_time() - busy_from < 0.3:
        pass
    busy = time.thread_time() - busy_from
    sampler.sample()
    spent = time.process_time() - before
    start, end = sampler.times
    # /proc counts in clock ticks (10 ms): at most one tick off at each sample.
    assert busy - 0.02 <= sampler.between(start, end) <= spent + 0.02
    # Sampled by its thread, it samples until stopped and then once more.
    running = CpuSampler(os.getpid(), interval_s=0.001, tree=False).start()
    while len(running.times) < 2:
        time.sleep(0.001)
    running.stop()
    count = len(running.times)
    assert count >= 3 and running.times == sorted(running.times)
    assert running.cpu == sorted(running.cpu)  # never goes back


def _figures(**medians: Mapping[str, float]) -> dict[str, Any]:
    return {name: {"label": name, "reps": [], "median": m} for name, m in medians.items()}


def test_goals_pass_and_fail_on_the_ratios() -> None:
    result = {
        "throughput": _figures(
            **{
                "waxserve-lr": {"throughput": 120_000},
                "waxserve-lr-nomon": {"throughput": 125_000},
                "naive": {"throughput": 19_000},  # 6.3x: pass
                "bytewax": {"throughput": 40_000},  # 3x: fail
                "tuned": {"throughput": 120_000},  # 1.0x: pass
                "passthrough": {"throughput": 200_000},  # 60%: fail
                "essential": {"throughput": 160_000},  # the limit: 80% of passthrough
                "waxserve-pmml": {"throughput": 25_000},
                "pypmml": {"throughput": 400},  # 62x: pass
            }
        ),
        "latency": _figures(
            **{
                "waxserve-lr": {"p50_ms": 9.0, "p99_ms": 30.0},
                "passthrough": {"p50_ms": 8.0, "p99_ms": 20.0},  # +1 ms: pass; 1.5x: fail
            }
        ),
        "swap": {
            "median": {"visible_median_ms": 20.0, "visible_max_ms": 80.0},
            "lost": 0,
            "duplicates": 0,
        },
    }
    verdicts = {g.goal: g.passed for g in report.goals(result, None)}
    assert verdicts == {
        "throughput vs naive per-record loop": True,
        "throughput vs idiomatic Bytewax": False,
        "throughput vs hand-tuned loop": True,
        "throughput vs raw passthrough": False,
        "latency p50 vs passthrough floor": True,
        "latency p99 vs passthrough floor": False,
        "model swap visible, median": True,
        "model swap visible, max": False,
        "records lost / scored twice across swaps": True,
        # Issue 14: not measured in this result (no wait figures, no PMML swap run).
        "longest record wait while a model loads (ONNX and PMML swaps, cold PMML load)": None,
        "PMML swap visible, median": None,
        "PMML vs pypmml per-record Py4J": True,
        "PMML throughput": True,
        "cost of stats + drift": True,  # 4%
        "resident set over a 10-min soak at 5,000 rec/s": None,  # no soak: not measured
    }
    # A failed ratio that the essential loop reaches is open work; one it misses is not.
    passthrough = {g.goal: g for g in report.goals(result, None)}["throughput vs raw passthrough"]
    assert passthrough.limit == "80% (160,000 rec/s)" and not passthrough.beyond_limit
    assert passthrough.verdict == "**FAIL**"
    result["throughput"]["essential"]["median"]["throughput"] = 125_000  # 62% of passthrough
    by_goal = {g.goal: g for g in report.goals(result, None)}
    assert by_goal["throughput vs raw passthrough"].beyond_limit
    assert by_goal["throughput vs raw passthrough"].verdict == "**FAIL**: beyond the limit"
    assert by_goal["throughput vs raw passthrough"].limit == "62% (125,000 rec/s)"
    assert by_goal["throughput vs naive per-record loop"].verdict == "pass"  # 6.3x, limit 6.6x
    assert by_goal["latency p50 vs passthrough floor"].limit == ""

    # The in-process timing, when the run has it, decides the cost of stats + drift: the
    # throughput pair (4% here) cannot resolve a few percent.
    result["monitoring_cost"] = {"on_us": 1.0, "off_us": 0.6}  # 0.4 of 8.33 µs: 4.8%
    result["throughput"]["waxserve-lr-nomon"]["median"]["throughput"] = 200_000  # 40%
    by_goal = {g.goal: g for g in report.goals(result, None)}
    monitoring = by_goal["cost of stats + drift"]
    assert monitoring.passed and monitoring.measured.startswith("4.8% (0.40 µs"), monitoring
    # And it is added to the essential loop's time per record: 8 + 0.4 µs, 119k records/s.
    assert by_goal["throughput vs raw passthrough"].limit == "60% (119,048 rec/s)"
    result["monitoring_cost"] = {"on_us": 1.6, "off_us": 0.6}  # 1 of 8.33 µs: 12%
    assert not {g.goal: g for g in report.goals(result, None)}["cost of stats + drift"].passed


@pytest.mark.integration
@pytest.mark.bench  # a 1-2 minute run: `just test-bench`, not `just test`
def test_bench_runs_every_contender_on_a_tiny_input(tmp_path: Path) -> None:
    records, pmml_records = 2000, 200
    command = [
        sys.executable, "-m", "bench",
        "--records", str(records), "--reps", "1", "--latency-s", "1", "--warmup-s", "0.5",
        "--swaps", "3", "--swap-interval-s", "0.3", "--pmml-records", str(pmml_records),
        "--no-quix", "--out", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    files = {p.suffix: p for p in tmp_path.iterdir()}
    assert set(files) == {".json", ".md", ".png"}, log
    result = json.loads(files[".json"].read_text())

    # The input-format rows run on a broker of their own, with waxserve LR's JSON row again.
    assert set(result["throughput"]) == set(THROUGHPUT_DEFAULT) - set(FORMAT_ROWS)
    assert set(result["formats"]["rows"]) == {"waxserve-lr", *FORMAT_ROWS}
    assert set(result["formats"]["decode_us"]) == set(INPUTS), result["formats"]
    assert set(result["latency"]) == set(LATENCY_DEFAULT)
    for section in ("throughput", "latency"):
        # Not run, and the report says so.
        assert result[section]["quix"]["reps"] == [], result[section]["quix"]
        assert "--no-quix" in result[section].pop("quix")["note"]
    rows = [*result["throughput"].items(), *result["formats"]["rows"].items()]
    for name, entry in rows:
        (figures,) = entry["reps"]
        assert "error" not in figures, (name, figures, log)
        expected = pmml_records if name == "pypmml" else records
        # Every record came out exactly once, from the first to the last output message.
        assert figures["records"] == expected, (name, figures)
        assert figures["missing"] == 0 and figures["duplicates"] == 0, (name, figures)
        assert figures["throughput"] > 0 and figures["cpu_s_per_100k"] >= 0, (name, figures)
        assert figures["startup_s"] > 0, (name, figures)
        if CONTENDERS[name].model in ("wine-lr", "wine-gbt"):
            # Same scores as onnxruntime on the same CSV rows (float32).
            assert figures["scores_finite"] and figures["max_abs_error"] < 1e-4, (name, figures)
        if CONTENDERS[name].model == "penguins-species-onnx":
            assert figures["label_mismatches"] == 0, (name, figures)
        if CONTENDERS[name].kind == "waxserve":
            assert figures["dead_letters"] == 0, (name, figures)
    # waxserve's PMML scores agree with pypmml's on every row both scored.
    assert result["throughput"]["waxserve-pmml"]["median"]["max_abs_error_vs_pypmml"] < 1e-9

    for name, entry in result["latency"].items():
        (figures,) = entry["reps"]
        assert "error" not in figures, (name, figures, log)
        assert figures["records"] > 1000 and figures["missing"] == 0, (name, figures)
        assert 0 <= figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"] < 5000

    swap = result["swap"]
    assert swap["lost"] == 0 and swap["duplicates"] == 0, swap
    assert swap["never_visible"] == 0 and swap["order_violations"] == 0, swap
    assert all(0 <= v < 5000 for v in swap["visible_ms"].values()), swap
    assert swap["sent"] == swap["scored"] > 0, swap
    pmml_swap = result["pmml_swap"]  # issue 14: a cold first PMML load, then warm swaps
    assert pmml_swap["lost"] == 0 and pmml_swap["duplicates"] == 0, pmml_swap
    assert pmml_swap["never_visible"] == 0 and pmml_swap["order_violations"] == 0, pmml_swap
    assert pmml_swap["sent"] == pmml_swap["scored"] > 0, pmml_swap
    assert pmml_swap["cold_visible_ms"] is not None and pmml_swap["wait_max_ms"] is not None
    assert "## PMML swap" in files[".md"].read_text()

    assert len(result["goals"]) == 15
    cost = result["monitoring_cost"]
    assert 0 < cost["off_us"] < cost["on_us"] < 1_000, cost
    markdown = files[".md"].read_text()
    assert "## Goals" in markdown and "## Input formats" in markdown
    assert files[".png"].name in markdown
    for entry in [*result["throughput"].values(), *result["latency"].values()]:
        assert entry["label"] in markdown
    assert files[".png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_essential_loop_writes_what_waxserve_writes() -> None:
    # The limit contender bounds waxserve only if it produces the same output from the
    # same input: same keys, same ScoredRecord fields (but the timing ones).
    from bench.breakdown import scored_batch, serving_shard
    from bench.contenders.essential import EssentialScorer
    from dataflows.core.records import RawRun
    from protos import waxserve_pb2 as pb

    feed = Feed(INPUTS[SHARED_INPUT])
    messages = list(feed.messages(40, 500, 1_764_000_000_000))
    offsets = list(range(1_000, 1_500))
    keys: list[bytes | None] = [m[0] for m in messages]
    values: list[bytes | None] = [m[1] for m in messages]
    headers: list[Any] = [list(m[2] or []) for m in messages]
    run = RawRun("records", 3, offsets, keys, values, headers, "wine")
    scorer = serving_shard(feed.contract, "wine-lr")
    waxserve = [(key, value) for key, value, _ in scored_batch(scorer.on_values([run])).messages]

    entry = load_catalog()["wine-lr"]
    essential = EssentialScorer(
        str(entry.path()), feed.contract, entry.input_features, "records", "wine-lr", "1"
    )
    theirs = [(key, value) for key, value, _ in essential.score(3, offsets, keys, values, headers)]

    def fields(value: bytes | None) -> pb.ScoredRecord:
        parsed = pb.ScoredRecord.FromString(value or b"")
        parsed.ClearField("scoring_latency_us")
        parsed.ClearField("scored_at_ms")
        # The descriptor's control position and signer: waxserve's registry knows them.
        for name in ("control_topic", "control_partition", "control_offset"):
            parsed.lineage.ClearField(name)
        for name in ("signer_key_id", "signature_status"):
            parsed.lineage.ClearField(name)
        return parsed

    assert len(theirs) == len(waxserve) == 500
    assert pb.ScoredRecord.FromString(waxserve[0][1] or b"").lineage.decision == "active"
    assert [k for k, _ in theirs] == [k for k, _ in waxserve]
    assert [fields(v) for _, v in theirs] == [fields(v) for _, v in waxserve]
    assert fields(theirs[0][1]).record_id == "40" and fields(theirs[0][1]).data_type == "wine"


def test_breakdown_times_every_stage() -> None:
    from bench import breakdown

    rows = dict(breakdown.measure())
    assert len(rows) == 22
    assert {"decode, Avro (ContractCodecs.decode)", "decode, CSV (ContractCodecs.decode)"} <= set(
        rows
    )
    # Figures only: timings are the benchmark's to judge (the JVM's JIT made "the PMML4S
    # call alone" anywhere from 0.7x to 2x of the whole predict in one run on this machine).
    assert all(0 < us < 1_000 for us in rows.values()), rows


def test_breakdown_times_serving_plans() -> None:
    # Issue 15's speed figures: every plan case is timed and reported, the derived costs
    # are there; no timing is judged here (that is the benchmark's job).
    from bench import breakdown

    costs = breakdown.plan_costs(rounds=3)
    cases = costs["cases"]
    assert list(cases) == ["wine-lr", "wine-gbt", "split 50/50", "split 90/10", "shadow"]
    assert [c["plan"].split()[0] for c in cases.values()] == [
        "single",
        "single",
        "canary",
        "split",
        "shadow",
    ]
    for case in cases.values():
        for clock in ("wall", "cpu"):
            assert 0 < case[clock]["median_ms"] <= case[clock]["p90_ms"] < 10_000, case
        assert case["bytes_per_record"] > 0 and case["plan_field_bytes"] > 0, case
    # The hash sends each variant about its weight of the batch's records.
    assert 0.4 < cases["split 50/50"]["second_share"] < 0.6
    assert 0.05 < cases["split 90/10"]["second_share"] < 0.15
    # Only the shadow writes shadow records; each experiment has its derived costs.
    assert [c["shadow_bytes_per_record"] > 0 for c in cases.values()] == [0, 0, 0, 0, 1]
    for name in ("split 50/50", "split 90/10", "shadow"):
        derived = {"overhead_paired_ms", "added_to_second", "over_single_to_second"}
        assert derived | {"over_single_to_whole_second"} <= set(cases[name]["cpu"])
        cpu = cases[name]["cpu"]
        # The models' own time is measured: with a split, each on the records sent to it.
        assert cpu["primary_own_ms"] > 0 and cpu["second_own_ms"] > 0, cpu
        if name == "shadow":
            assert cpu["primary_own_ms"] == cases["wine-lr"]["cpu"]["median_ms"]
    assert set(costs["own_ms"]["cpu"]) == {
        f"{model} on {split}"
        for model in ("wine-lr", "wine-gbt")
        for split in ("split 50/50", "split 90/10")
    }
    assert costs["assign_us_per_record"] > 0 and costs["take_us_per_record"] > 0
    markdown = "\n".join(report._plans_section({"plan_costs": costs}))
    assert "## Serving plans" in markdown and "canary wine-gbt" in markdown
