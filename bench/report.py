"""The report of a bench run: medians, goals, and the markdown table and PNG chart.

The JSON (`bench/results/<date>.json`) holds every repetition; everything here is derived
from it, so `python -m bench report FILE` can redraw the markdown and chart of any run.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from bench.measure import median

REFERENCE = "waxserve-lr"
"""The waxserve figure every other contender is compared with (LR ONNX, all features on)."""
PMML_REFERENCE = "waxserve-pmml"
LIMIT = "essential"
"""waxserve's essential work alone (`bench/contenders/essential.py`): its throughput bounds
waxserve's, so a throughput ratio that it misses too is beyond the limit."""


def summarize(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every numeric figure over the repetitions that did not fail."""
    good = [r for r in reps if "error" not in r]
    keys = {
        k
        for r in good
        for k, v in r.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    out: dict[str, Any] = {k: median(r.get(k, math.nan) for r in good) for k in sorted(keys)}
    out["reps_ok"] = len(good)
    errors = [r["error"] for r in reps if "error" in r]
    if errors:
        out["errors"] = errors
    return out


@dataclasses.dataclass(frozen=True)
class Goal:
    """One goal of issue 5, checked against this run's figures."""

    goal: str
    target: str
    measured: str
    passed: bool | None  # None: not measured in this run
    limit: str = ""  # throughput goals: the same ratio for the essential loop
    beyond_limit: bool = False  # the essential loop misses the target too

    @property
    def verdict(self) -> str:
        """pass / FAIL / FAIL, beyond the limit / not measured."""
        if self.passed is False and self.beyond_limit:
            return "**FAIL**: beyond the limit"
        return {True: "pass", False: "**FAIL**", None: "not measured"}[self.passed]


def _get(section: dict[str, Any], name: str, key: str) -> float:
    value = section.get(name, {}).get("median", {}).get(key, math.nan)
    return float(value) if value is not None else math.nan


def _ok(value: float) -> bool:
    return value is not None and math.isfinite(value)


def rate(value: float) -> str:
    """Records per second, readable."""
    return "-" if not _ok(value) else f"{value:,.0f}"


def ms(value: float | None) -> str:
    """Milliseconds, readable."""
    return "-" if value is None or not _ok(value) else f"{value:,.1f}"


def times(value: float) -> str:
    """A ratio, readable."""
    return "-" if not _ok(value) else (f"{value:.2f}x" if value < 10 else f"{value:,.0f}x")


def limit_throughput(result: dict[str, Any]) -> float:
    """The most waxserve can do in this run: the essential loop's records/s, with the
    in-process cost of stats and drift (which that loop does not pay and waxserve must)
    added to its time per record when the run timed it."""
    essential = _get(result.get("throughput", {}), LIMIT, "throughput")
    cost = result.get("monitoring_cost")
    if not _ok(essential) or cost is None:
        return essential
    return 1e6 / (1e6 / essential + max(0.0, cost["on_us"] - cost["off_us"]))


def _pmml_swap_goals(result: dict[str, Any]) -> list[Goal]:
    """Issue 14: loading never stalls scoring, PMML above all."""
    onnx, pmml = result.get("swap", {}), result.get("pmml_swap", {})
    waits = [w for w in (onnx.get("wait_max_ms"), pmml.get("wait_max_ms")) if _ok(w)]
    worst = max(waits) if waits else math.nan
    med = pmml.get("warm_visible_median_ms", math.nan)
    return [
        Goal(
            "longest record wait while a model loads (ONNX and PMML swaps, cold PMML load)",
            "≤ 100 ms",
            f"{ms(worst)} ms",
            worst <= 100 if _ok(worst) else None,
        ),
        Goal(
            "PMML swap visible, median",
            "≤ 50 ms",
            f"{ms(med)} ms",
            med <= 50 if _ok(med) else None,
        ),
    ]


def goals(result: dict[str, Any], soak: dict[str, Any] | None) -> list[Goal]:
    """Every goal of issue 5 with this run's figures."""
    thr = result.get("throughput", {})
    lat = result.get("latency", {})
    swap = result.get("swap", {}).get("median", {})
    wax = _get(thr, REFERENCE, "throughput")
    essential = limit_throughput(result)
    out: list[Goal] = []

    def ratio_goal(name: str, label: str, at_least: float) -> None:
        other = _get(thr, name, "throughput")

        def shown(ratio: float) -> str:
            return times(ratio) if at_least >= 1 or not _ok(ratio) else f"{ratio:.0%}"

        ratio = wax / other if _ok(wax) and _ok(other) else math.nan
        limit = essential / other if _ok(essential) and _ok(other) else math.nan
        out.append(
            Goal(
                f"throughput vs {label}",
                f"≥ {at_least:g}x" if at_least >= 1 else f"≥ {at_least:.0%}",
                f"{shown(ratio)} ({rate(wax)} vs {rate(other)} rec/s)",
                ratio >= at_least if _ok(ratio) else None,
                limit=f"{shown(limit)} ({rate(essential)} rec/s)" if _ok(limit) else "-",
                beyond_limit=_ok(limit) and limit < at_least,
            )
        )

    ratio_goal("naive", "naive per-record loop", 6)
    ratio_goal("bytewax", "idiomatic Bytewax", 4)
    ratio_goal("tuned", "hand-tuned loop", 1.0)
    ratio_goal("passthrough", "raw passthrough", 0.65)

    p50, p99 = _get(lat, REFERENCE, "p50_ms"), _get(lat, REFERENCE, "p99_ms")
    f50, f99 = _get(lat, "passthrough", "p50_ms"), _get(lat, "passthrough", "p99_ms")
    both = _ok(p50) and _ok(f50)
    out.append(
        Goal(
            "latency p50 vs passthrough floor",
            "≤ floor + 2 ms",
            f"{ms(p50)} ms vs floor {ms(f50)} ms",
            p50 <= f50 + 2 if both else None,
        )
    )
    both = _ok(p99) and _ok(f99)
    out.append(
        Goal(
            "latency p99 vs passthrough floor",
            "≤ 1.3x floor",
            f"{ms(p99)} ms vs floor {ms(f99)} ms ({times(p99 / f99) if both else '-'})",
            p99 <= 1.3 * f99 if both else None,
        )
    )

    med, worst = swap.get("visible_median_ms", math.nan), swap.get("visible_max_ms", math.nan)
    out.append(
        Goal(
            "model swap visible, median",
            "≤ 50 ms",
            f"{ms(med)} ms",
            med <= 50 if _ok(med) else None,
        )
    )
    out.append(
        Goal(
            "model swap visible, max",
            "≤ 50 ms",
            f"{ms(worst)} ms",
            worst <= 50 if _ok(worst) else None,
        )
    )
    sw = result.get("swap", {})
    if "lost" in sw:
        out.append(
            Goal(
                "records lost / scored twice across swaps",
                "0 / 0",
                f"{sw['lost']} / {sw['duplicates']}",
                sw["lost"] == 0 and sw["duplicates"] == 0,
            )
        )
    else:
        out.append(Goal("records lost / scored twice across swaps", "0 / 0", "-", None))
    out.extend(_pmml_swap_goals(result))

    pmml, py4j = _get(thr, PMML_REFERENCE, "throughput"), _get(thr, "pypmml", "throughput")
    both = _ok(pmml) and _ok(py4j)
    out.append(
        Goal(
            "PMML vs pypmml per-record Py4J",
            "≥ 50x",
            f"{times(pmml / py4j) if both else '-'} ({rate(pmml)} vs {rate(py4j)} rec/s)",
            pmml / py4j >= 50 if both else None,
        )
    )
    out.append(
        Goal(
            "PMML throughput",
            "≥ 20,000 rec/s",
            f"{rate(pmml)} rec/s",
            pmml >= 20_000 if _ok(pmml) else None,
        )
    )

    off = _get(thr, "waxserve-lr-nomon", "throughput")
    both = _ok(off) and _ok(wax)
    end_to_end = (off - wax) / off if both else math.nan
    in_process = result.get("monitoring_cost")
    if in_process is not None and _ok(wax):
        # A cost of a few percent is within the noise of the throughput repetitions, so the
        # verdict comes from timing the same batch with stats and drift on and off, as a
        # share of the time waxserve spent per record in this run.
        per_record_us = 1e6 / wax
        extra_us = in_process["on_us"] - in_process["off_us"]
        cost = extra_us / per_record_us
        measured = (
            f"{cost:.1%} ({extra_us:.2f} µs of waxserve's {per_record_us:.2f} µs a record; "
            f"in-process, {in_process['on_us']:.2f} on vs {in_process['off_us']:.2f} off)"
        )
        if both:
            measured += f"; end to end {end_to_end:+.1%} ({rate(off)} off vs {rate(wax)} on)"
        out.append(Goal("cost of stats + drift", "≤ 10% of throughput", measured, cost <= 0.10))
    else:
        out.append(
            Goal(
                "cost of stats + drift",
                "≤ 10% of throughput",
                f"{end_to_end:.1%} ({rate(off)} off vs {rate(wax)} on)" if both else "-",
                end_to_end <= 0.10 if both else None,
            )
        )

    if soak is not None:
        growth = soak["growth_pct"]
        out.append(
            Goal(
                f"resident set over a {soak['duration_s'] / 60:g}-min soak at "
                f"{soak['rate']:,.0f} rec/s",
                "≤ 5% growth",
                f"{growth:+.1f}% ({soak['rss_start_mb']:.0f} → {soak['rss_end_mb']:.0f} MB, "
                f"from {soak['warmup_s']:g} s to the end; {soak.get('date', '')})",
                growth <= 5 and soak["duration_s"] >= 600,
            )
        )
    else:
        out.append(
            Goal(
                "resident set over a 10-min soak at 5,000 rec/s",
                "≤ 5% growth",
                "no soak result: run `just soak`",
                None,
            )
        )
    return out


# --- markdown ----------------------------------------------------------------------------


def _notes(entry: dict[str, Any]) -> str:
    """A row's note, and how many repetitions failed (the JSON says why)."""
    notes = [entry["note"]] if entry.get("note") else []
    errors = entry.get("median", {}).get("errors", [])
    if errors:
        notes.append(f"{len(errors)} rep(s) failed: {errors[0].splitlines()[0][:120]}")
    return "; ".join(notes).replace("|", "/")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def broker_text(result: dict[str, Any]) -> tuple[str, str]:
    """The broker a result was measured on: (a description, a short name). Results from
    before issue 12 name none: they ran on tansu."""
    broker = result.get("broker") or {"kind": "tansu"}
    if broker.get("kind") == "kafka":
        label = broker.get("label", "Apache Kafka")
        heap = f", {broker['heap']} heap" if broker.get("heap") else ""
        return f"{label} (KRaft, one node{heap})", label
    return "an embedded tansu broker (in memory)", "tansu"


def markdown(result: dict[str, Any], soak: dict[str, Any] | None, chart: str | None) -> str:
    """The report as markdown: goals, every figure, every ratio to waxserve."""
    s = result["settings"]
    machine = result["machine"]
    broker, broker_name = broker_text(result)
    lines = [
        f"# waxserve benchmark, {result['date']}",
        "",
        f"`{result['command']}` measured this in {result['wall_s'] / 60:.1f} minutes on "
        f"{machine['cpus']} CPUs ({machine['cpu_model']}), Python {machine['python']}, against "
        f"{broker} on the same machine. Contenders ran **one at a "
        f"time**: the machine has {machine['cpus']} cores, one for the contender and the rest "
        f"for {broker_name} and the harness. Every figure is the **median of {s['reps']} "
        f"repetitions** inside this run (every repetition is in the JSON). Method: "
        f"[bench/README.md](../README.md).",
        "",
        "## Goals",
        "",
        "LR ONNX unless stated; ratios are waxserve ÷ the other, measured in this run. "
        '"Limit": the same ratio for the most waxserve can do. That is the essential loop '
        "(`bench/contenders/essential.py`: the header, the decode, one model call and the "
        "scored records waxserve writes; no Bytewax and no other feature), with the "
        "in-process cost of stats and drift added to its time per record. waxserve does all "
        "of that and more, so a target beyond the limit cannot be met without dropping a "
        "feature or breaking waxserve's input or output contract on this machine.",
        "",
    ]
    checked = goals(result, soak)
    lines += _table(
        ["goal", "target", "measured", "limit", "result"],
        [[g.goal, g.target, g.measured, g.limit or "", g.verdict] for g in checked],
    )
    thr = result.get("throughput", {})
    lines += [
        "",
        f"## Throughput: {s['records']:,} JSON records, from the beginning of the topic",
        "",
        "Records/s between the contender's first and last output message (Kafka timestamps: "
        "start-up, model load and Quix's group join are excluded); CPU seconds of the "
        f"contender's process tree over the same span, per 100k records, and of {broker_name}. "
        "\"waxserve ÷ this\": waxserve LR's throughput over this one's (PMML rows: waxserve "
        "PMML's); CPU ratio: this one's CPU over waxserve's.",
        "",
    ]
    rows = []
    for name, entry in thr.items():
        med = entry.get("median", {})
        ref = PMML_REFERENCE if name == "pypmml" else REFERENCE
        ref_rate, ref_cpu = _get(thr, ref, "throughput"), _get(thr, ref, "cpu_s_per_100k")
        value, cpu = med.get("throughput", math.nan), med.get("cpu_s_per_100k", math.nan)
        note = _notes(entry)
        rows.append(
            [
                entry["label"],
                rate(value),
                times(ref_rate / value) if _ok(value) and _ok(ref_rate) and value > 0 else "-",
                f"{cpu:.2f}" if _ok(cpu) else "-",
                # A tiny run can finish between two CPU samples: 0 CPU-s.
                times(cpu / ref_cpu) if _ok(cpu) and _ok(ref_cpu) and ref_cpu > 0 else "-",
                f"{med['broker_cpu_s_per_100k']:.2f}"
                if _ok(med.get("broker_cpu_s_per_100k", math.nan))
                else "-",
                f"{med['startup_s']:.1f}" if _ok(med.get("startup_s", math.nan)) else "-",
                f"{int(med.get('records', 0)):,}",
                note,
            ]
        )
    lines += _table(
        [
            "contender",
            "rec/s",
            "waxserve ÷ this",
            "CPU-s/100k",
            "CPU ÷ waxserve",
            "broker CPU-s/100k",
            "start-up s",
            "records",
            "notes",
        ],
        rows,
    )
    lines += _formats(result)
    lat = result.get("latency", {})
    p50, p99 = _get(lat, REFERENCE, "p50_ms"), _get(lat, REFERENCE, "p99_ms")
    lines += [
        "",
        f"## End-to-end latency at {s['rate']:,.0f} records/s",
        "",
        f"Output message time (Kafka timestamp) minus the record's `event_time_ms`, over "
        f"{s['latency_s']:g} s of paced input after {s['warmup_s']:g} s of warm-up, each "
        f"contender reading a fresh topic from its start; the plain consumer's is its arrival "
        f"time. \"waxserve - this\": waxserve LR's p50 minus this one's; p99 ratio: waxserve "
        f"LR's over this one's.",
        "",
    ]
    rows = []
    for entry in lat.values():
        med = entry.get("median", {})
        a, b = med.get("p50_ms", math.nan), med.get("p99_ms", math.nan)
        rows.append(
            [
                entry["label"],
                ms(a),
                ms(b),
                ms(med.get("max_ms")),
                f"{p50 - a:+.1f} ms" if _ok(a) and _ok(p50) else "-",
                times(p99 / b) if _ok(b) and _ok(p99) and b > 0 else "-",
                f"{int(med.get('records', 0)):,}",
                f"{int(med.get('missing', 0)):,}",
                _notes(entry),
            ]
        )
    lines += _table(
        [
            "contender",
            "p50 ms",
            "p99 ms",
            "max ms",
            "waxserve p50 - this",
            "waxserve p99 ÷ this",
            "records",
            "missing",
            "notes",
        ],
        rows,
    )
    swap = result.get("swap")
    if swap:
        med = swap.get("median", {})
        lines += [
            "",
            f"## Model swap: {swap['swaps_per_rep']} swaps per repetition, "
            f"{swap['interval_s']:g} s apart, at {s['rate']:,.0f} records/s",
            "",
            f"Descriptors alternate between {' and '.join(swap['models'])}, each under a "
            "version of its own; from the descriptor's Kafka timestamp to the first scored "
            "record of that version (its Kafka timestamp). Lost: records delivered to the "
            "input but neither scored nor dead-lettered; duplicates: records scored twice.",
            "",
        ]
        lines += _table(
            ["figure", "value"],
            [
                ["publish → first scored, median (ms)", ms(med.get("visible_median_ms"))],
                ["publish → first scored, max of a repetition (ms)", ms(med.get("visible_max_ms"))],
                [
                    "publish → first scored, worst of all swaps (ms)",
                    ms(swap.get("visible_worst_ms")),
                ],
                ["publish → installed event, median (ms)", ms(med.get("installed_median_ms"))],
                [
                    "records sent / scored / dead-lettered",
                    f"{swap.get('sent', 0):,} / {swap.get('scored', 0):,} / "
                    f"{swap.get('dead_lettered', 0):,}",
                ],
                ["lost / scored twice", f"{swap.get('lost', '-')} / {swap.get('duplicates', '-')}"],
                [
                    "records scored by an older model than an earlier record of their partition",
                    str(swap.get("order_violations", "-")),
                ],
                ["swaps never seen in the output", str(swap.get("never_visible", "-"))],
            ],
        )
        if swap.get("error"):
            lines += ["", f"The swap run failed: {swap['error']}"]
    lines += _pmml_swap_section(result, s)
    lines += _plans_section(result)
    lines += ["", "## Soak", ""]
    if soak is not None:
        lines.append(
            f"waxserve LR at {soak['rate']:,.0f} records/s for {soak['duration_s'] / 60:g} min "
            f"({soak.get('date', '')}): resident set {soak['rss_start_mb']:.0f} MB at "
            f"{soak['warmup_s']:g} s, {soak['rss_end_mb']:.0f} MB at the end "
            f"({soak['growth_pct']:+.1f}%), at most {soak['rss_max_mb']:.0f} MB; "
            f"{soak['sent']:,} records sent, {soak['scored']:,} scored"
            + ("" if soak.get("drained") else " by the last sample (the rest were in flight)")
            + f". Samples: `{soak.get('file', 'soak JSON')}`."
        )
    else:
        lines.append("No soak result yet: `just soak` (10 minutes at 5,000 records/s).")
    lines += ["", "## Every repetition", ""]
    rows = []
    for section, key, unit in (
        ("throughput", "throughput", "rec/s"),
        ("latency", "p99_ms", "p99 ms"),
    ):
        for entry in result.get(section, {}).values():
            reps = [
                (
                    "failed"
                    if "error" in r
                    else (rate(r[key]) if key == "throughput" else ms(r[key]))
                )
                for r in entry["reps"]
            ]
            rows.append([f"{entry['label']} ({unit})", ", ".join(reps)])
    for entry in result.get("formats", {}).get("rows", {}).values():
        reps = ["failed" if "error" in r else rate(r["throughput"]) for r in entry["reps"]]
        rows.append([f"{entry['label']} (rec/s, input formats)", ", ".join(reps)])
    lines += _table(["figure", "repetitions"], rows)
    lines += ["", "## Notes", ""]
    lines += [f"- {note}" for note in result.get("notes", [])]
    versions = ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items())
    lines.append(f"- Versions: {versions}.")
    if chart:
        lines += ["", f"![throughput and latency]({chart})"]
    return "\n".join(lines) + "\n"


def _formats(result: dict[str, Any]) -> list[str]:
    """The input-format table: waxserve on other inputs than the peers', with its JSON row
    measured beside them on the same broker."""
    formats = result.get("formats")
    if not formats:
        return []
    rows_in = formats["rows"]
    decode = formats.get("decode_us", {})
    json_rate = _get(rows_in, formats["baseline"], "throughput")
    rows = []
    for entry in rows_in.values():
        med = entry.get("median", {})
        value, cpu = med.get("throughput", math.nan), med.get("cpu_s_per_100k", math.nan)
        decode_us = decode.get(entry["input"], math.nan)
        rows.append(
            [
                entry["label"],
                f"`{entry['input']}`",
                rate(value),
                f"{1e6 / value:.2f}" if _ok(value) and value > 0 else "-",
                times(json_rate / value) if _ok(value) and _ok(json_rate) and value > 0 else "-",
                f"{cpu:.2f}" if _ok(cpu) else "-",
                f"{decode_us:.2f}" if _ok(decode_us) else "-",
                _notes(entry),
            ]
        )
    return [
        "",
        f"## Input formats: {result['settings']['records']:,} records each",
        "",
        "waxserve LR on the same wine rows as records in other encodings (protobuf: the "
        "contract's own encoding, no headers; CSV: `content-type: text/csv`, the contract's "
        "columns, so no record id or event time; Avro: the bench's copy of the contract with "
        "an Avro writer schema, data type wine-avro, no headers), and a categorical model "
        "(penguins-species-onnx: string, int64 and float inputs; JSON records), each from "
        f"its own topic. These rows run on a {broker_text(result)[1]} broker of their own, "
        "after everything above, with waxserve LR on the JSON records again as their first "
        "row, so that the extra inputs do not change the broker the rows above were "
        "measured on: compare them with that row. "
        f"Medians of {formats['reps']} repetition(s), interleaved. "
        'µs/record: wall time per record (1 / rec/s). "JSON ÷ this": the JSON row\'s '
        "records/s over this one's. Decode: `ContractCodecs.decode` of a 1,000-record batch "
        "of the input, in-process (`python -m bench breakdown`).",
        "",
        *_table(
            [
                "contender",
                "input",
                "rec/s",
                "µs/record",
                "JSON ÷ this",
                "CPU-s/100k",
                "decode µs/record",
                "notes",
            ],
            rows,
        ),
    ]


# --- chart -------------------------------------------------------------------------------


def chart(result: dict[str, Any], path: Path) -> bool:
    """Throughput, CPU and latency bars as a PNG; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    thr = result.get("throughput", {})
    lat = result.get("latency", {})
    fig, axes = plt.subplots(1, 3, figsize=(17, 6))
    names = [e["label"] for e in thr.values()]
    values = [e.get("median", {}).get("throughput", math.nan) for e in thr.values()]
    colors = ["tab:orange" if n.startswith("waxserve") else "tab:blue" for n in names]
    axes[0].barh(names, values, color=colors)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("records/s (log scale)")
    axes[0].set_title(f"throughput, {result['settings']['records']:,} records")
    for y, v in enumerate(values):
        if _ok(v):
            axes[0].text(v, y, f" {v:,.0f}", va="center", fontsize=8)
    cpu = [e.get("median", {}).get("cpu_s_per_100k", math.nan) for e in thr.values()]
    axes[1].barh(names, cpu, color=colors)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("CPU seconds per 100k records (log scale)")
    axes[1].set_title("CPU cost")
    axes[1].set_yticklabels([])
    labels = [e["label"] for e in lat.values()]
    p50 = [e.get("median", {}).get("p50_ms", math.nan) for e in lat.values()]
    p99 = [e.get("median", {}).get("p99_ms", math.nan) for e in lat.values()]
    ys = range(len(labels))
    axes[2].barh([y + 0.2 for y in ys], p50, height=0.4, label="p50")
    axes[2].barh([y - 0.2 for y in ys], p99, height=0.4, label="p99")
    axes[2].set_yticks(list(ys), labels)
    axes[2].set_xlabel("ms, output time - event time")
    axes[2].set_title(f"latency at {result['settings']['rate']:,.0f} records/s")
    axes[2].legend()
    for ax in axes:
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"waxserve benchmark {result['date']} (median of {result['settings']['reps']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def latest_soak(results_dir: Path) -> dict[str, Any] | None:
    """The newest soak result in `results_dir`, if any."""
    files = sorted(results_dir.glob("soak-*.json"))
    if not files:
        return None
    soak = dict(json.loads(files[-1].read_text()))
    soak["file"] = files[-1].name
    return soak


def write(result: dict[str, Any], results_dir: Path, stem: str) -> dict[str, Path]:
    """`<stem>.json`, `<stem>.md` and `<stem>.png` in `results_dir`; their paths."""
    results_dir.mkdir(parents=True, exist_ok=True)
    soak = latest_soak(results_dir)
    result["goals"] = [dataclasses.asdict(g) for g in goals(result, soak)]
    paths = {"json": results_dir / f"{stem}.json", "md": results_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps(result, indent=1, default=str) + "\n")
    png = results_dir / f"{stem}.png"
    drawn = chart(result, png)
    if drawn:
        paths["png"] = png
    paths["md"].write_text(markdown(result, soak, png.name if drawn else None))
    return paths


def _pmml_swap_section(result: dict[str, Any], s: dict[str, Any]) -> list[str]:
    """The PMML swap run (issue 14): a cold first PMML load, then warm swaps."""
    onnx, pmml = result.get("swap", {}), result.get("pmml_swap")
    if not pmml:
        return []
    lines = [
        "",
        f"## PMML swap: {pmml['swaps']} swaps, {pmml['interval_s']:g} s apart, at "
        f"{s['rate']:,.0f} records/s",
        "",
        f"waxserve (WAXSERVE_PMML=on: the JVM and PMML4S start with the process) serves "
        f"{pmml['first']} (ONNX); swap 1 publishes {pmml['models'][1]}, the process's first "
        f"PMML model (a cold load, on the model-loader thread); then "
        f"{' and '.join(pmml['models'])} alternate. Record wait while loading: the longest "
        "latency (scored time minus event time) of the records made between a "
        "descriptor's publication and its first scored record.",
        "",
    ]
    if pmml.get("error"):
        return [*lines, f"The PMML swap run failed: {pmml['error']}"]
    lines += _table(
        ["figure", "value"],
        [
            ["first PMML load: publish → first scored (ms)", ms(pmml.get("cold_visible_ms"))],
            [
                "first PMML load: longest record wait meanwhile (ms)",
                ms(pmml.get("cold_wait_max_ms")),
            ],
            [
                "warm PMML swaps: publish → first scored, median (ms)",
                ms(pmml.get("warm_visible_median_ms")),
            ],
            [
                "warm PMML swaps: publish → first scored, max (ms)",
                ms(pmml.get("warm_visible_max_ms")),
            ],
            [
                "warm PMML swaps: longest record wait while loading (ms)",
                ms(pmml.get("warm_wait_max_ms")),
            ],
            [
                "ONNX swaps (above): longest record wait while loading (ms)",
                ms(onnx.get("wait_max_ms")),
            ],
            [
                "records' latency over the run, median / max (ms)",
                f"{ms(pmml.get('latency_p50_ms'))} / {ms(pmml.get('latency_max_ms'))}",
            ],
            [
                "records sent / scored / dead-lettered",
                f"{pmml.get('sent', 0):,} / {pmml.get('scored', 0):,} / "
                f"{pmml.get('dead_lettered', 0):,}",
            ],
            ["lost / scored twice", f"{pmml.get('lost', '-')} / {pmml.get('duplicates', '-')}"],
            [
                "order violations / swaps never seen",
                f"{pmml.get('order_violations', '-')} / {pmml.get('never_visible', '-')}",
            ],
        ],
    )
    return lines


def _plans_section(result: dict[str, Any]) -> list[str]:
    """What serving plans cost per batch (issue 15), from `bench.breakdown.plan_costs`."""
    costs = result.get("plan_costs")
    if not costs:
        return []
    lines = ["", f"## Serving plans: {costs.get('batch', 1000):,}-record batches, in-process", ""]
    if costs.get("error"):
        return [*lines, f"The serving-plans breakdown failed: {costs['error']}"]
    primary, second = costs["primary"], costs["second"]
    lines += [
        f"`ShardScorer._score_planned` on one decoded JSON batch, {costs['rounds']} rounds, the "
        "cases interleaved; ms per batch, wall clock and the thread's CPU time. The models' "
        f"own time is measured in the same rounds: with a split, {primary} and {second} "
        "alone, each on the records the entity hash sent it; with the shadow, both alone on "
        "the whole batch. Overhead: the experiment's time beyond the models' own, CPU, the "
        "median of the rounds' differences. Issue 15's goal, an experiment costs no more "
        f"than {second}'s own scoring time, read three ways (each ratio must be ≤ 1.00): "
        f"**strict**, what the experiment adds to {primary}'s own time on its records, "
        f"against {second}'s own on its records (an overhead ≤ 0); **over today's path**, "
        f"the experiment minus {primary} alone on the whole batch, against {second}'s own "
        f"on its records; **lenient**, the same against {second} alone on the whole batch. "
        "Method: bench/README.md.",
        "",
    ]

    def ratio(cpu: dict[str, float], key: str) -> str:
        if key not in cpu:
            return ""
        return f"{cpu[key]:.2f}" + ("" if cpu[key] <= 1 else " **FAIL**")

    rows = []
    for name, case in costs["cases"].items():
        wall, cpu = case["wall"], case["cpu"]
        share = case.get("second_share")
        rows.append(
            [
                name,
                case["plan"] + (f" ({share:.1%} to {second})" if share is not None else ""),
                f"{wall['median_ms']:.3f}",
                f"{wall['p90_ms']:.3f}",
                f"{cpu['median_ms']:.3f}",
                f"{cpu['overhead_paired_ms']:+.3f}" if "overhead_paired_ms" in cpu else "",
                ratio(cpu, "added_to_second"),
                ratio(cpu, "over_single_to_second"),
                ratio(cpu, "over_single_to_whole_second"),
                f"{case['bytes_per_record']:.0f}",
            ]
        )
    lines += _table(
        [
            "case",
            "plan",
            "median",
            "p90",
            "CPU median",
            "overhead",
            "strict",
            "over today's path",
            "lenient",
            "bytes/record",
        ],
        rows,
    )
    lines += [
        "",
        f"Parts of a split's overhead, µs a record: the entity hash and assignment "
        f"{costs['assign_us_per_record']:.2f} (of the ids' bytes, which the scored records "
        f"reuse: encoding them costs {costs.get('encode_ids_us_per_record', 0):.2f}), the two "
        f"takes of a 50/50 split {costs['take_us_per_record']:.2f}.",
    ]
    return lines
