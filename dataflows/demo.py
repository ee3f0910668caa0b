"""`waxserve demo`: the whole system on one machine, narrated.

The demo starts an embedded tansu broker (or, with `--brokers`, uses fresh `*-demo-<id>`
topics on yours), creates the topics, publishes the first model, starts the dataflow
(`python -m bytewax.run dataflows.serving:flow`) and replays the wine data at a steady rate
while it follows a plan: models swapped mid-stream, malformed rows, a model with a wrong
sha256 that must be rejected, and a burst of drifted records that must raise a drift alarm.
Meanwhile it reads every output topic and shows what comes out once a second; it ends with
a summary that accounts for every record sent: scored or dead-lettered.

    Demo            the orchestration: broker, topics, dataflow subprocess, replay, the plan,
                    shutdown (every step undone in reverse order, also on Ctrl-C)
    DemoReplay      a thread that sends the wine CSV (looping) at --rate, using the replay
                    building blocks of `dataflows.replay`; the plan injects malformed rows
                    and a drift burst
    DemoStats       folds the output topics (scored, events, dlq, drift, stats) into counts;
                    pure, no Kafka
    render_*        text for the live panel, the one-line progress and the final summary

`dataflows.cli` parses the command line and calls `run_demo`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition
from google.protobuf.message import DecodeError

from dataflows.broker import (
    DEFAULT_PARTITIONS,
    METADATA_TIMEOUT_S,
    BrokerError,
    EmbeddedBroker,
    _die_with_parent,
    create_topics,
    free_port,
    kafka_settings,
    log_tail,
    port_is_free,
)
from dataflows.config import Config
from dataflows.descriptors import MODELS_DIR, CatalogEntry, load_catalog, sha256_hex
from dataflows.records import CSV_COLUMNS, DEFAULT_DATA_TYPE
from dataflows.replay import (
    FLUSH_TIMEOUT_S,
    PROTO_TYPES,
    TOPIC_ALIASES,
    CliError,
    CsvLine,
    DeliveryReport,
    Pacer,
    csv_lines,
    encode_line,
    header_pairs,
    in_main_thread,
    produce,
    send_descriptor,
)
from protos import waxserve_pb2 as pb

WINE_CSV = MODELS_DIR / "data" / "winequality_red.csv"
ERROR_CSV = MODELS_DIR / "data" / "error_winequality_red.csv"
DEMO_MODELS = ("wine-lr", "wine-gbt", "wine-pmml-lr")
BYTEWAX_API_PORT = 3030  # Bytewax's default (BYTEWAX_DATAFLOW_API_PORT)
STATE_PORT = 3040  # Config.state_addr's default
DEMO_TAMPERED = "wine-rf-classifier"
"""Catalog model published once with a wrong sha256: the dataflow must reject it."""
DEMO_SHIFT_FEATURE = "alcohol"
DEMO_SHIFT_DELTA = 3.0
DEMO_STATS_INTERVAL_S = 2.0
DEMO_DRIFT_WINDOW_S = 5.0
DEMO_READY_TIMEOUT_S = 120.0
"""How long the dataflow may take to start and install the first model."""
DEMO_CATCH_UP_TIMEOUT_S = 15.0
DEMO_TANSU_FETCH_WAIT_MS = 100
"""Fetch wait of the dataflow's consumers on the embedded tansu, unless
WAXSERVE_FETCH_WAIT_MS says otherwise. A fetch from tansu's in-memory log costs more the
longer the log is: with the default 5 ms (~200 fetches/s per partition), tansu saturates
two cores about 15 s into a replay at 1,000 rec/s; 100 ms keeps it to a fraction of that
for the whole demo, for ~25 ms more latency."""
DEMO_INTERRUPT_DRAIN_S = 3.0
_OUTPUT_KINDS = ("scored", "events", "dlq", "drift", "stats")


def run_demo(config: Config, options: DemoOptions) -> int:
    """The end-to-end demo (see `Demo`); returns the exit code."""
    catalog = _demo_catalog((*options.models, DEMO_TAMPERED))
    return Demo(config, options, catalog).run()


def _demo_catalog(names: Sequence[str]) -> dict[str, CatalogEntry]:
    try:
        catalog = load_catalog()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CliError(f"cannot read the model catalog in {MODELS_DIR}: {exc}") from None
    for name in names:
        entry = catalog.get(name)
        if entry is None:
            raise CliError(f"unknown model {name!r}; catalog models: {', '.join(sorted(catalog))}")
        if not entry.path().is_file():
            raise CliError(f"catalog model {name!r}: file {entry.path()} does not exist")
    for path in (WINE_CSV, ERROR_CSV):
        if not path.is_file():
            raise CliError(f"demo data {path} does not exist")
    return catalog


# --- the plan ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DemoStep:
    """Something the demo does `at_s` seconds into the replay."""

    at_s: float
    action: str  # "bad_rows", "swap", "tampered", "shift"
    model: str = ""
    seconds: float = 0.0  # "shift": how long

    def describe(self) -> str:
        """The step in a few words."""
        if self.action == "bad_rows":
            return f"send the rows of {ERROR_CSV.name} (malformed: expect dead letters)"
        if self.action == "swap":
            return f"publish {self.model}: the dataflow swaps models mid-stream"
        if self.action == "tampered":
            return f"publish {self.model} with a wrong sha256: it must be rejected"
        if self.action == "shift":
            return (
                f"send records with {DEMO_SHIFT_FEATURE} {DEMO_SHIFT_DELTA:+g} for "
                f"{self.seconds:g} s: expect a drift alarm"
            )
        return self.action


def plan_demo(duration_s: float, models: Sequence[str], drift_window_s: float) -> list[DemoStep]:
    """What happens when, in seconds since the replay started (the first model is up then).

    Models swap at equal shares of the duration; the tampered model comes half a share
    after the first swap (between the first two with three models); the drift burst
    comes late, under the last model, and ends early enough for its drift window to close
    (and be reported) before the replay stops.
    """
    n = len(models)
    share = duration_s / n
    steps = [DemoStep(min(2.0, duration_s / 10), "bad_rows")]
    steps += [DemoStep(round(k * share, 1), "swap", models[k]) for k in range(1, n)]
    tampered_at = 1.5 * share if n > 1 else duration_s / 2
    steps.append(DemoStep(round(tampered_at, 1), "tampered", DEMO_TAMPERED))
    last_swap = (n - 1) * share if n > 1 else 0.0
    burst = round(min(drift_window_s, 0.15 * duration_s), 1)
    start = round(max(last_swap + 1.0, 0.7 * duration_s), 1)
    start = min(start, max(0.0, duration_s - burst))
    steps.append(DemoStep(start, "shift", seconds=burst))
    return sorted(steps, key=lambda s: s.at_s)


def tampered_descriptor(entry: CatalogEntry) -> pb.ModelDescriptor:
    """A catalog model's descriptor whose sha256 does not match its bytes."""
    desc = entry.descriptor()
    desc.sha256 = sha256_hex(b"tampered " + desc.sha256.encode())
    return desc


def shuffled_lines(path: Path, seed: int = 0) -> Iterator[CsvLine]:
    """The lines of a CSV file in a random order (fixed by `seed`), pass after pass, forever.

    The UCI wine file is not in random order: a few hundred consecutive rows differ from
    the whole file (PSI up to 0.8 for 300 rows), and the drift windows compare what they
    see with the whole file's profile. Replayed in file order, normal traffic would raise
    drift alarms; shuffled, only the demo's deliberate shift does.
    """
    lines = list(csv_lines(path, loop=False, header=False))
    if not lines:
        raise CliError(f"{path} has no lines")
    rng = random.Random(seed)
    for pass_no in itertools.count():
        rng.shuffle(lines)
        for line in lines:
            yield dataclasses.replace(line, pass_no=pass_no)


def shift_feature(raw: bytes, feature: str, delta: float) -> bytes:
    """A wine CSV line with `delta` added to one feature; lines that do not parse unchanged."""
    cells = raw.split(b";")
    if len(cells) != len(CSV_COLUMNS) or feature not in CSV_COLUMNS:
        return raw
    i = CSV_COLUMNS.index(feature)
    try:
        value = float(cells[i])
    except ValueError:
        return raw
    cells[i] = f"{value + delta:.6g}".encode()
    return b";".join(cells)


# --- the replay thread -------------------------------------------------------------------


class DemoReplay:
    """Sends the wine CSV, looping, to the records topic at `rate`, in a background thread.

    The lines go in a shuffled order (see `shuffled_lines`). Record ids are
    `winequality_red-<line>[-pass<N>]` as `waxserve replay --loop` makes them, with
    `-shifted` during a drift burst; injected files use `<file stem>-<line>`.
    Each record's event time is its send time, so the scored records tell the latency.
    """

    def __init__(self, config: Config, rate: float, csv: Path = WINE_CSV) -> None:
        self._config = config
        self._rate = rate
        self._csv = csv
        self._stop = threading.Event()
        self._extra: collections.deque[tuple[str, bytes]] = collections.deque()
        self._shift_until = 0.0  # time.monotonic() until which records are shifted
        self._thread = threading.Thread(target=self._run, name="waxserve-demo-replay", daemon=True)
        self.report = DeliveryReport()
        self.produced = 0
        self.shifted = 0
        self.injected = 0
        self.undelivered = 0
        self.error: BaseException | None = None
        self.started_at = 0.0
        self.stopped_at = 0.0

    def start(self) -> None:
        """Start sending."""
        self.started_at = time.monotonic()
        self._thread.start()

    def inject(self, path: Path) -> int:
        """Send the lines of `path` once, next, ahead of the wine rows; returns how many."""
        lines = [
            (f"{path.stem}-{line.line_no}", line.raw)
            for line in csv_lines(path, loop=False, header=False)
        ]
        self._extra.extend(lines)
        return len(lines)

    def shift(self, seconds: float) -> None:
        """Shift `DEMO_SHIFT_FEATURE` by `DEMO_SHIFT_DELTA` in the records of the next seconds."""
        self._shift_until = time.monotonic() + seconds

    def stop(self, *, wait: bool = True) -> None:
        """Stop sending; with `wait`, until what was sent is delivered (or failed)."""
        self._stop.set()
        if wait and self._thread.is_alive():
            self._thread.join()
        if wait and not self.stopped_at:
            self.stopped_at = time.monotonic()

    @property
    def running(self) -> bool:
        """Whether the thread is still sending, or waiting for its records' delivery."""
        return self._thread.is_alive()

    @property
    def delivered(self) -> int:
        """Records the broker acknowledged."""
        return self.report.delivered

    @property
    def seconds(self) -> float:
        """How long it sent (so far)."""
        if not self.started_at:
            return 0.0
        return (self.stopped_at or time.monotonic()) - self.started_at

    def _run(self) -> None:
        producer = Producer(kafka_settings(self._config, **{"linger.ms": self._config.linger_ms}))
        try:
            self._send(producer)
        except BaseException as exc:  # reported by the main thread
            self.error = exc
        finally:
            self.stopped_at = time.monotonic()
            self.undelivered = producer.flush(FLUSH_TIMEOUT_S)

    def _send(self, producer: Producer) -> None:
        topic = self._config.records_topic
        stem = self._csv.stem
        pacer = Pacer(self._rate)
        lines = shuffled_lines(self._csv)
        while not self._stop.is_set():
            pacer.wait(lambda: producer.poll(0))
            if self._stop.is_set():
                return
            if self._extra:
                record_id, raw = self._extra.popleft()
                self.injected += 1
            else:
                line = next(lines)
                record_id = f"{stem}-{line.line_no}"
                if line.pass_no:
                    record_id += f"-pass{line.pass_no + 1}"
                raw = line.raw
                if time.monotonic() < self._shift_until:
                    raw = shift_feature(raw, DEMO_SHIFT_FEATURE, DEMO_SHIFT_DELTA)
                    record_id += "-shifted"
                    self.shifted += 1
            value, headers, _ = encode_line(
                raw,
                fmt="protobuf",
                record_id=record_id,
                data_type=DEFAULT_DATA_TYPE,
                event_time_ms=time.time_ns() // 1_000_000,
            )
            produce(producer, topic, record_id.encode(), value, headers, self.report)
            self.produced += 1
            if self.produced % 1000 == 0:
                producer.poll(0)


# --- what came out -----------------------------------------------------------------------


def percentile(histogram: collections.Counter[int], q: float) -> int | None:
    """The q-th percentile (nearest rank) of values counted in a histogram; None if empty."""
    total = sum(histogram.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(q / 100 * total))
    seen = 0
    for value in sorted(histogram):
        seen += histogram[value]
        if seen >= rank:
            return value
    raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True)
class TimelineEntry:
    """A model event: when, what, which model."""

    at_ms: int
    kind: str  # installed, rejected, restored
    data_type: str
    model: str  # name:version
    reason: str = ""


def _header_text(headers: Sequence[tuple[str, bytes | str | None]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in headers:
        if isinstance(value, bytes):
            out[name] = value.decode("utf-8", errors="replace")
        elif value is not None:
            out[name] = value
    return out


@dataclasses.dataclass
class DemoStats:
    """Everything the demo read from the output topics, folded into counts. No Kafka here:
    feed it decoded messages (`add_scored`, ...) or raw ones (`add_message`).

    Records are identified by their position (partition, offset) in the records topic, so
    a record scored twice counts once (and as a duplicate), and `accounted` is exact.
    """

    records_topic: str
    t0_ms: int = 0
    """Wall-clock start of the replay: times are shown relative to it."""
    scored_by_model: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    dead_by_class: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    """Dead-lettered records (from the records topic) by error class."""
    rejected_descriptors: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    """Dead letters from other topics (descriptors on the models topic), by error class."""
    duplicates: int = 0
    """Scored or dead-lettered again (counted once)."""
    scored_and_dead: int = 0
    """Records both scored and dead-lettered (should never happen)."""
    unplaced_dead: int = 0
    """Record dead letters without a usable source position (counted, not deduplicated)."""
    undecodable: int = 0
    current: dict[str, str] = dataclasses.field(default_factory=dict)
    """Data type -> name:version of the model serving it (per the events topic)."""
    timeline: list[TimelineEntry] = dataclasses.field(default_factory=list)
    latest_drift: pb.DriftMetrics | None = None
    drift_windows: int = 0
    drift_alarms: list[pb.DriftMetrics] = dataclasses.field(default_factory=list)
    model_us: dict[str, float] = dataclasses.field(default_factory=dict)
    """name:version -> mean model time per record (µs) from the latest serving stats."""
    latency: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)
    """End-to-end latency (scored_at_ms - event_time_ms) histogram, whole run."""
    recent_latency: collections.Counter[int] = dataclasses.field(
        default_factory=collections.Counter
    )
    recent_scored: int = 0
    first_scored_ms: int = 0
    last_scored_ms: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)
    """Noteworthy things seen (model events, drift alarms), for the caller to print."""
    _scored: set[tuple[int, int]] = dataclasses.field(default_factory=set)
    _dead: set[tuple[int, int]] = dataclasses.field(default_factory=set)

    # --- folding ---------------------------------------------------------------------

    def add_message(
        self, kind: str, value: bytes | None, headers: Sequence[tuple[str, bytes | str | None]]
    ) -> None:
        """One message of an output topic (`kind`: scored, events, dlq, drift, stats)."""
        if kind == "dlq":
            self.add_dead_letter(_header_text(headers))
            return
        proto = PROTO_TYPES.get(kind)
        if proto is None or value is None:
            self.undecodable += 1
            return
        try:
            message = proto.FromString(value)
        except DecodeError:
            self.undecodable += 1
            return
        if isinstance(message, pb.ScoredRecord):
            self.add_scored(message)
        elif isinstance(message, pb.ModelEvent):
            self.add_event(message)
        elif isinstance(message, pb.DriftMetrics):
            self.add_drift(message)
        elif isinstance(message, pb.ServingStats):
            self.add_stats(message)

    def add_scored(self, rec: pb.ScoredRecord) -> None:
        """A scored record."""
        position = (rec.source_partition, rec.source_offset)
        if position in self._scored:
            self.duplicates += 1
            return
        self._scored.add(position)
        self.scored_and_dead += position in self._dead
        self.scored_by_model[f"{rec.model_name}:{rec.model_version}"] += 1
        self.recent_scored += 1
        if rec.event_time_ms > 0 and rec.scored_at_ms > 0:
            latency_ms = max(0, rec.scored_at_ms - rec.event_time_ms)
            self.latency[latency_ms] += 1
            self.recent_latency[latency_ms] += 1
        if rec.scored_at_ms:
            if not self.first_scored_ms or rec.scored_at_ms < self.first_scored_ms:
                self.first_scored_ms = rec.scored_at_ms
            self.last_scored_ms = max(self.last_scored_ms, rec.scored_at_ms)

    def add_dead_letter(self, headers: Mapping[str, str]) -> None:
        """A dead letter, by its `waxserve.*` headers."""
        reason = headers.get("waxserve.error.class", "?")
        if headers.get("waxserve.source.topic") != self.records_topic:
            self.rejected_descriptors[reason] += 1
            return
        try:
            position = (
                int(headers["waxserve.source.partition"]),
                int(headers["waxserve.source.offset"]),
            )
        except (KeyError, ValueError):
            self.dead_by_class[reason] += 1  # a dead letter we cannot place: count it anyway
            self.unplaced_dead += 1
            return
        if position in self._dead:
            self.duplicates += 1
            return
        self._dead.add(position)
        self.scored_and_dead += position in self._scored
        self.dead_by_class[reason] += 1

    def add_event(self, event: pb.ModelEvent) -> None:
        """A model event: installed, rejected or restored."""
        model = f"{event.model_name}:{event.model_version}"
        entry = TimelineEntry(event.at_ms, event.kind, event.data_type, model, event.reason)
        self.timeline.append(entry)
        if event.kind in ("installed", "restored"):
            self.current[event.data_type] = model
            self.notes.append(f"{event.kind} {model} for {event.data_type}")
        else:
            serving = self.current.get(event.data_type, "nothing")
            self.notes.append(
                f"{event.kind} {model} ({event.reason or '?'}): "
                f"{serving} keeps serving {event.data_type}"
            )

    def add_drift(self, drift: pb.DriftMetrics) -> None:
        """A drift window."""
        self.drift_windows += 1
        latest = self.latest_drift
        # The newest window; of windows that end together (one per model), the worst.
        if latest is None or (drift.window_end_ms, drift.max_psi) > (
            latest.window_end_ms,
            latest.max_psi,
        ):
            self.latest_drift = drift
        if drift.alarm:
            self.drift_alarms.append(drift)
            feature, psi = top_feature(drift)
            self.notes.append(
                f"DRIFT ALARM: PSI {psi:.2f} on {feature} for {drift.model_name}:"
                f"{drift.model_version} in window {self.window(drift)} "
                f"({drift.record_count:,} records)"
            )

    def add_stats(self, stats: pb.ServingStats) -> None:
        """A serving-stats window."""
        self.model_us[f"{stats.model_name}:{stats.model_version}"] = stats.mean_duration_us

    # --- reading ---------------------------------------------------------------------

    @property
    def scored(self) -> int:
        """Distinct records scored."""
        return len(self._scored)

    @property
    def dead(self) -> int:
        """Distinct records dead-lettered."""
        return sum(self.dead_by_class.values())

    @property
    def accounted(self) -> int:
        """Distinct records scored or dead-lettered."""
        return len(self._scored) + len(self._dead) - self.scored_and_dead + self.unplaced_dead

    def unaccounted(self, sent: int) -> int:
        """Records sent that are neither scored nor dead-lettered (yet)."""
        return sent - self.accounted

    def take_recent(self) -> tuple[int, collections.Counter[int]]:
        """Records scored, and their latencies, since the last call."""
        recent = (self.recent_scored, self.recent_latency)
        self.recent_scored, self.recent_latency = 0, collections.Counter()
        return recent

    def take_notes(self) -> list[str]:
        """Notes since the last call."""
        notes, self.notes = self.notes, []
        return notes

    def clock(self, at_ms: int, width: int = 0) -> str:
        """A wall-clock time in ms as seconds since the replay started: "+12.3 s"."""
        text = f"{(at_ms - self.t0_ms) / 1000:+.1f} s" if self.t0_ms else "start"
        return text.rjust(width)

    def window(self, drift: pb.DriftMetrics) -> str:
        """A drift window's time span: "+10.0 s..+15.0 s"."""
        return f"{self.clock(drift.window_start_ms)}..{self.clock(drift.window_end_ms)}"


def top_feature(drift: pb.DriftMetrics) -> tuple[str, float]:
    """The feature with the largest PSI in a drift window, and its PSI."""
    best = max(drift.features, key=lambda f: f.psi, default=None)
    return (best.feature, best.psi) if best is not None else ("-", 0.0)


# --- text --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DemoView:
    """The numbers of one live update that do not come from the output topics."""

    elapsed_s: float
    duration_s: float
    sent: int
    scored_per_s: float
    recent_latency: collections.Counter[int]
    phase: str = ""  # e.g. "catching up"


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _ms(value: int | None) -> str:
    return "-" if value is None else f"{value:,} ms"


def _counts(counter: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(counter.items(), key=lambda kv: -kv[1]))


def _drift_text(stats: DemoStats) -> str:
    drift = stats.latest_drift
    if drift is None:
        return "no window closed yet"
    feature, psi = top_feature(drift)
    state = "ALARM" if drift.alarm else "ok"
    return (
        f"{state}: max PSI {psi:.2f} ({feature}), {drift.model_name}:{drift.model_version} "
        f"{stats.window(drift)}; alarms so far {len(stats.drift_alarms)}"
    )


def render_panel(stats: DemoStats, view: DemoView) -> list[str]:
    """The live panel (a terminal redraws it in place once a second)."""
    p50 = percentile(view.recent_latency, 50)
    p99 = percentile(view.recent_latency, 99)
    phase = f"  [{view.phase}]" if view.phase else ""
    in_flight = max(0, view.sent - stats.accounted)
    models = ", ".join(f"{dt} -> {m}" for dt, m in sorted(stats.current.items())) or "none yet"
    dead = _counts(stats.dead_by_class) or "none"
    if stats.rejected_descriptors:
        dead += f"; descriptors: {_counts(stats.rejected_descriptors)}"
    lines = [
        f"waxserve demo  {view.elapsed_s:5.1f} s of {view.duration_s:g} s{phase}",
        f"  records   sent {view.sent:,}  scored {stats.scored:,} ({view.scored_per_s:,.0f}/s)"
        f"  dead-lettered {stats.dead:,}  in flight {in_flight:,}",
        f"  latency   sent -> scored, last second: p50 {_ms(p50)}, p99 {_ms(p99)}",
        f"  serving   {models}",
    ]
    label = "  scored    "
    for model, count in stats.scored_by_model.items():
        us = stats.model_us.get(model)
        timing = f"  model call {us:,.0f} us/record" if us is not None else ""
        lines.append(f"{label}{model:<20} {count:>9,}{timing}")
        label = " " * len(label)
    lines += [f"  DLQ       {dead}", f"  drift     {_drift_text(stats)}"]
    return lines


def render_line(stats: DemoStats, view: DemoView) -> str:
    """The live update as one line (when stdout is not a terminal)."""
    p50 = percentile(view.recent_latency, 50)
    p99 = percentile(view.recent_latency, 99)
    drift = stats.latest_drift
    drift_text = "-" if drift is None else f"{drift.max_psi:.2f}{' ALARM' if drift.alarm else ''}"
    models = ",".join(f"{dt}={m}" for dt, m in sorted(stats.current.items())) or "-"
    phase = f" [{view.phase}]" if view.phase else ""
    return (
        f"{view.elapsed_s:+6.1f} s{phase}  sent {view.sent} scored {stats.scored} "
        f"({view.scored_per_s:.0f}/s) dlq {stats.dead} | p50 {_ms(p50)} p99 {_ms(p99)} | "
        f"{models} | psi {drift_text}"
    )


@dataclasses.dataclass(frozen=True)
class DemoOutcome:
    """What the replay did, for the summary."""

    sent: int  # delivered to the broker
    failed: int  # delivery failures (not sent)
    replay_s: float
    rate: float
    workers: int
    shifted: int = 0
    injected: int = 0
    interrupted: bool = False
    failure: str = ""


def render_summary(stats: DemoStats, outcome: DemoOutcome) -> list[str]:
    """The final summary."""
    unaccounted = stats.unaccounted(outcome.sent)
    rate = f"{outcome.rate:,.0f} rec/s" if outcome.rate else "full speed"
    lines = [
        "",
        "=" * 72,
        f"waxserve demo summary: {outcome.replay_s:.1f} s of replay at {rate}, "
        f"{_plural(outcome.workers, 'worker')}" + (" (INTERRUPTED)" if outcome.interrupted else ""),
        "=" * 72,
        f"  records sent       {outcome.sent:>9,}   ({outcome.injected} from {ERROR_CSV.name}, "
        f"{outcome.shifted:,} with {DEMO_SHIFT_FEATURE} {DEMO_SHIFT_DELTA:+g})",
    ]
    if outcome.failed:
        lines.append(f"  delivery failures  {outcome.failed:>9,}   (not counted as sent)")
    lines.append(f"  scored             {stats.scored:>9,}")
    for model, count in stats.scored_by_model.items():
        lines.append(f"    {model:<16} {count:>9,}")
    lines.append(f"  dead-lettered      {stats.dead:>9,}   {_counts(stats.dead_by_class)}")
    if stats.duplicates:
        lines.append(f"  duplicates         {stats.duplicates:>9,}   (counted once above)")
    if stats.scored_and_dead:
        lines.append(
            f"  scored AND dead    {stats.scored_and_dead:>9,}   (records both scored and "
            "dead-lettered: a bug)"
        )
    verdict = "OK, every record is accounted for" if unaccounted == 0 else "NOT OK"
    if unaccounted and outcome.interrupted:
        verdict = "interrupted: these may still have been in flight"
    lines.append(
        f"  UNACCOUNTED        {unaccounted:>9,}   sent - scored - dead-lettered: {verdict}"
    )
    span_s = (stats.last_scored_ms - stats.first_scored_ms) / 1000
    if stats.scored and span_s > 0:
        lines.append(
            f"  throughput         {stats.scored / span_s:>9,.0f}   rec/s scored "
            f"(the replay paces it: {rate})"
        )
    lines.append(
        f"  latency            p50 {_ms(percentile(stats.latency, 50))}, "
        f"p99 {_ms(percentile(stats.latency, 99))}, max {_ms(percentile(stats.latency, 100))} "
        "(record sent -> scored)"
    )
    lines.append("  model timeline     (seconds since the replay started)")
    for entry in stats.timeline:
        reason = f"  {entry.reason}: the previous model kept serving" if entry.reason else ""
        lines.append(
            f"    {stats.clock(entry.at_ms, 8)}  {entry.kind:<9} {entry.model} for "
            f"{entry.data_type}{reason}"
        )
    if not stats.timeline:
        lines.append("    (no model events seen)")
    if stats.rejected_descriptors:
        lines.append(
            f"  rejected models    {sum(stats.rejected_descriptors.values()):>9,}   "
            f"dead-lettered descriptors: {_counts(stats.rejected_descriptors)}"
        )
    drift = f"  drift windows      {stats.drift_windows:>9,}   alarms {len(stats.drift_alarms)}"
    if stats.drift_alarms:
        worst = max(stats.drift_alarms, key=lambda d: d.max_psi)
        feature, psi = top_feature(worst)
        drift += (
            f"; worst: PSI {psi:.2f} on {feature} under {worst.model_name}:{worst.model_version} "
            f"({stats.window(worst)}, {worst.record_count:,} records)"
        )
    lines.append(drift)
    if stats.undecodable:
        lines.append(f"  undecodable output {stats.undecodable:>9,}   messages")
    if outcome.failure:
        lines.append(f"  FAILED: {outcome.failure.splitlines()[0]}")
    return lines


class LiveView:
    """Prints notes (scrolling) and the live panel: redrawn in place on a terminal, one
    line per update otherwise, nothing at all when quiet."""

    def __init__(self, out: TextIO, *, quiet: bool, tty: bool | None = None) -> None:
        self._out = out
        self._quiet = quiet
        self._tty = out.isatty() if tty is None else tty
        self._panel: list[str] = []
        self._drawn = 0

    def note(self, text: str) -> None:
        """A line that stays (above the panel)."""
        if self._quiet:
            return
        self._erase()
        self._out.write(text + "\n")
        self._draw()

    def update(self, panel: list[str], line: str) -> None:
        """A new live update: `panel` on a terminal, else `line`."""
        if self._quiet:
            return
        if not self._tty:
            self._out.write(line + "\n")
            self._out.flush()
            return
        self._erase()
        width = max(20, shutil.get_terminal_size().columns - 1)
        self._panel = [text[:width] for text in panel]  # a wrapped line would break the redraw
        self._draw()

    def close(self) -> None:
        """Leave the last panel on screen and stop redrawing."""
        self._panel, self._drawn = [], 0
        if not self._quiet:
            self._out.flush()

    def _erase(self) -> None:
        if self._drawn:
            self._out.write(f"\x1b[{self._drawn}F\x1b[J")  # up N lines, clear to the end
            self._drawn = 0

    def _draw(self) -> None:
        if self._tty and self._panel:
            self._out.write("\n".join(self._panel) + "\n")
            self._drawn = len(self._panel)
        self._out.flush()


# --- the orchestration -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    """The demo's command-line options."""

    duration_s: float = 40.0
    rate: float = 1000.0
    workers: int = 1
    models: tuple[str, ...] = DEMO_MODELS
    external_brokers: bool = False
    keep_logs: bool = False
    quiet: bool = False


def demo_config(config: Config, run_id: str, *, fresh_topics: bool) -> Config:
    """The demo's settings: on a shared broker, topic names of its own."""
    if not fresh_topics:
        return config
    topics: dict[str, Any] = {
        f.name: f"{getattr(config, f.name)}-demo-{run_id}"
        for f in dataclasses.fields(Config)
        if f.name.endswith("_topic")
    }
    return dataclasses.replace(config, **topics)


def _usual_or_free(port: int) -> int:
    return port if port_is_free(port) else free_port()


def dataflow_env(
    config: Config, workdir: Path, *, fetch_wait_ms: int | None = None
) -> dict[str, str]:
    """The dataflow subprocess's environment: ours (WAXSERVE_* tuning included), with the
    demo's broker, topics and short stats/drift intervals."""
    env = dict(os.environ)
    env["WAXSERVE_BROKERS"] = config.brokers
    for f in dataclasses.fields(Config):
        if f.name.endswith("_topic"):
            env[f"WAXSERVE_{f.name.upper()}"] = str(getattr(config, f.name))
    env["WAXSERVE_STATS_INTERVAL_S"] = str(DEMO_STATS_INTERVAL_S)
    env["WAXSERVE_DRIFT_WINDOW_S"] = str(DEMO_DRIFT_WINDOW_S)
    if fetch_wait_ms is not None:
        env["WAXSERVE_FETCH_WAIT_MS"] = str(fetch_wait_ms)
    env["BYTEWAX_DATAFLOW_API_CACHE_PATH"] = str(workdir / "bytewax")
    # Metrics for `just prometheus` and queryable state for `waxserve status`, on their
    # usual ports when free, else on any.
    env.setdefault("BYTEWAX_DATAFLOW_API_ENABLED", "1")
    if "BYTEWAX_DATAFLOW_API_PORT" not in env:
        env["BYTEWAX_DATAFLOW_API_PORT"] = str(_usual_or_free(BYTEWAX_API_PORT))
    env.setdefault("WAXSERVE_STATE_ADDR", f"127.0.0.1:{_usual_or_free(STATE_PORT)}")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Demo:
    """Runs the demo: set up, run the plan while showing the outputs, shut down, summarise.

    Everything started is registered on an ExitStack, so it is stopped in reverse order
    however the run ends (done, Ctrl-C, SIGTERM, a child dying).
    """

    def __init__(
        self, config: Config, options: DemoOptions, catalog: Mapping[str, CatalogEntry]
    ) -> None:
        self.options = options
        self.catalog = catalog
        self.run_id = uuid.uuid4().hex[:6]
        self.config = demo_config(config, self.run_id, fresh_topics=options.external_brokers)
        self.workdir = Path(tempfile.mkdtemp(prefix="waxserve-demo-"))
        self.dataflow_log = self.workdir / "dataflow.log"
        self.view = LiveView(sys.stdout, quiet=options.quiet)
        self.stats = DemoStats(records_topic=self.config.records_topic)
        self.broker: EmbeddedBroker | None = None
        self.dataflow: subprocess.Popen[bytes] | None = None
        self.consumer: Consumer | None = None
        self.replay: DemoReplay | None = None
        self.kinds = {getattr(self.config, f"{kind}_topic"): kind for kind in _OUTPUT_KINDS}
        self.plan: collections.deque[DemoStep] = collections.deque()
        self.fetch_wait_ms: int | None = None
        self.stop_requested = False
        self.interrupted = False
        self.failure = ""
        self._last_update: float | None = None

    # --- the run ---------------------------------------------------------------------

    def run(self) -> int:
        """The whole demo; returns the exit code."""
        with self._deferred_interrupts():
            with contextlib.ExitStack() as stack:
                try:
                    self._set_up(stack)
                    self._show()
                    self._catch_up(DEMO_CATCH_UP_TIMEOUT_S, "catching up")
                except KeyboardInterrupt:
                    self.interrupted = True
                    self.view.note("interrupted: stopping (Ctrl-C again to skip the wait)")
                    self._drain_after_interrupt()
                except (CliError, BrokerError, KafkaException) as exc:
                    self.failure = str(exc)
                finally:
                    self.view.close()
                    if self.replay is not None:
                        self.replay.stop()
            # Everything is stopped now (ExitStack), the numbers are final.
            return self._finish()

    @contextlib.contextmanager
    def _deferred_interrupts(self) -> Iterator[None]:
        """The first Ctrl-C or SIGTERM only asks to stop (`_checkpoint` acts on it); the
        second one raises KeyboardInterrupt at once.

        A KeyboardInterrupt raised inside `Consumer.consume()` drops the messages it had
        taken off librdkafka's queue, and the summary would miss them.
        """
        if not in_main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.getsignal(sig) for sig in signals}

        def on_signal(signum: int, frame: FrameType | None) -> None:
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True

        for sig in signals:
            signal.signal(sig, on_signal)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _checkpoint(self) -> None:
        """Where a requested stop takes effect."""
        if self.stop_requested:
            raise KeyboardInterrupt

    def _set_up(self, stack: contextlib.ExitStack) -> None:
        options = self.options
        stack.callback(self._clean_workdir)
        self._say(
            f"waxserve demo: {options.duration_s:g} s of wine records at "
            f"{f'{options.rate:,.0f} rec/s' if options.rate else 'full speed'} through the "
            f"dataflow ({_plural(options.workers, 'worker')})"
        )
        logs = "dataflow.log" if options.external_brokers else "dataflow.log, tansu.log"
        self._say(f"  work dir   {self.workdir}  ({logs})")
        if options.external_brokers:
            self._say(
                f"  broker     {self.config.brokers} (yours); fresh topics *-demo-{self.run_id}"
            )
            if not options.keep_logs:
                stack.callback(self._delete_topics)
        else:
            broker = EmbeddedBroker(log_path=self.workdir / "tansu.log")
            self.broker = broker.start()
            stack.callback(broker.stop)
            self.config = dataclasses.replace(self.config, brokers=broker.bootstrap)
            if "WAXSERVE_FETCH_WAIT_MS" not in os.environ:
                self.fetch_wait_ms = DEMO_TANSU_FETCH_WAIT_MS
            self._say(f"  broker     tansu on {broker.bootstrap} (embedded, in memory)")
        partitions = -(-DEFAULT_PARTITIONS // options.workers) * options.workers
        self._checkpoint()
        create_topics(self.config, partitions)
        self._say(
            f"  topics     {self.config.records_topic} ({partitions} partitions), "
            f"{self.config.models_topic} (1), outputs ({partitions} each)"
        )
        self.consumer = self._output_consumer()
        stack.callback(self.consumer.close)
        plan = plan_demo(options.duration_s, options.models, DEMO_DRIFT_WINDOW_S)
        self._say(f"  plan       +{0:5.1f} s  {options.models[0]} serves from the start")
        for step in plan:
            self._say(f"             +{step.at_s:5.1f} s  {step.describe()}")
        self.plan = collections.deque(plan)

        self._checkpoint()
        first = self.catalog[options.models[0]].descriptor()
        send_descriptor(self.config, first)
        self._say(f"published {first.name}:{first.version} to {self.config.models_topic}")
        self._start_dataflow(stack)
        self._wait_ready(f"{first.name}:{first.version}")

    def _start_dataflow(self, stack: contextlib.ExitStack) -> None:
        command = [
            sys.executable,
            "-m",
            "bytewax.run",
            "dataflows.serving:flow",
            "-w",
            str(self.options.workers),
        ]
        self._dataflow_env = dataflow_env(
            self.config, self.workdir, fetch_wait_ms=self.fetch_wait_ms
        )
        # Bytewax's API writes its cache there and will not start without the directory.
        Path(self._dataflow_env["BYTEWAX_DATAFLOW_API_CACHE_PATH"]).mkdir(exist_ok=True)
        with self.dataflow_log.open("wb") as log:
            self.dataflow = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._dataflow_env,
                # Its own session: Ctrl-C reaches the demo only, which stops it in order.
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        stack.callback(self._stop_dataflow)
        if self.fetch_wait_ms is not None:
            self._say(
                f"  note       WAXSERVE_FETCH_WAIT_MS={self.fetch_wait_ms} for the dataflow: "
                "tansu's in-memory log gets slower to fetch from as it grows"
            )
        self._say(
            f"started the dataflow (pid {self.dataflow.pid}): python -m bytewax.run "
            f"dataflows.serving:flow -w {self.options.workers}"
        )
        self._say(f"  its log    {self.dataflow_log}")
        state_addr = self._dataflow_env.get("WAXSERVE_STATE_ADDR")
        if state_addr:
            self._say(f"  its state  waxserve status --url http://{state_addr}")
        api_port = self._dataflow_env.get("BYTEWAX_DATAFLOW_API_PORT", BYTEWAX_API_PORT)
        self._say(f"  metrics    http://127.0.0.1:{api_port}/metrics")

    def _wait_ready(self, model: str) -> None:
        """Until the dataflow reports the first model installed (or rejected)."""
        started = time.monotonic()
        while not self.stats.timeline:
            if time.monotonic() - started > DEMO_READY_TIMEOUT_S:
                raise CliError(
                    f"the dataflow did not install {model} within {DEMO_READY_TIMEOUT_S:g} s; "
                    f"its log ends:\n{self._dataflow_tail()}"
                )
            self._checkpoint()
            self._check_children()
            self._pump(0.2, notes=False)
        first = self.stats.timeline[0]
        if first.kind != "installed":
            raise CliError(f"the dataflow rejected {model}: {first.reason}")
        self.stats.take_notes()
        self._say(f"the dataflow installed {model} after {time.monotonic() - started:.1f} s")

    def _show(self) -> None:
        """The replay and the plan, with a live update once a second."""
        self.replay = DemoReplay(self.config, self.options.rate)
        self.stats.t0_ms = time.time_ns() // 1_000_000
        self.replay.start()
        self._say(f"replaying {WINE_CSV.name} in a loop (times below: seconds since now)")
        while self.replay.seconds < self.options.duration_s:
            self._checkpoint()
            while self.plan and self.plan[0].at_s <= self.replay.seconds:
                self._do(self.plan.popleft())
            self._pump(0.1)
            self._check_children()
            self._maybe_update()

    def _catch_up(self, timeout: float, phase: str, *, interruptible: bool = True) -> None:
        """Stop the replay; read until every record sent is scored or dead-lettered, for at
        most `timeout` seconds after the broker acknowledged the last one."""
        replay = self.replay
        assert replay is not None
        replay.stop(wait=False)
        deadline = time.monotonic() + timeout
        while replay.running or (
            self.stats.accounted < replay.delivered and time.monotonic() < deadline
        ):
            if replay.running:
                deadline = time.monotonic() + timeout
            if interruptible:
                self._checkpoint()
            self._pump(0.1)
            self._check_children()
            self._maybe_update(phase)
        replay.stop()
        self._pump(0.3)  # duplicates or stragglers, if any
        self._maybe_update(phase, force=True)

    def _drain_after_interrupt(self) -> None:
        try:
            if self.replay is not None and self.consumer is not None:
                self._catch_up(DEMO_INTERRUPT_DRAIN_S, "interrupted, draining", interruptible=False)
        except (KeyboardInterrupt, CliError, KafkaException):
            pass

    def _finish(self) -> int:
        replay = self.replay
        if replay is None:  # failed or interrupted before the replay started
            if self.failure:
                raise CliError(self.failure)
            print("waxserve demo: interrupted before the replay started", file=sys.stderr)
            return 130
        outcome = DemoOutcome(
            sent=replay.delivered,
            failed=replay.report.failed + replay.undelivered,
            replay_s=replay.seconds,
            rate=self.options.rate,
            workers=self.options.workers,
            shifted=replay.shifted,
            injected=replay.injected,
            interrupted=self.interrupted,
            failure=self.failure,
        )
        for line in render_summary(self.stats, outcome):
            print(line)
        if self._keep_workdir():
            print(f"  logs               {self.workdir}")
        sys.stdout.flush()
        if self.failure:
            raise CliError(self.failure)
        if self.interrupted:
            return 130
        if self.stats.unaccounted(outcome.sent) or outcome.failed:
            print(
                f"waxserve demo: {self.stats.unaccounted(outcome.sent)} record(s) unaccounted "
                f"for, {outcome.failed} delivery failure(s); the dataflow log is kept in "
                f"{self.workdir}",
                file=sys.stderr,
            )
            return 1
        return 0

    # --- steps -----------------------------------------------------------------------

    def _do(self, step: DemoStep) -> None:
        assert self.replay is not None
        if step.action == "bad_rows":
            count = self.replay.inject(ERROR_CSV)
            self._event(f"sending the {count} rows of {ERROR_CSV.name} (malformed)")
        elif step.action == "swap":
            desc = self.catalog[step.model].descriptor()
            send_descriptor(self.config, desc)
            self._event(f"published {desc.name}:{desc.version} (model swap)")
        elif step.action == "tampered":
            desc = tampered_descriptor(self.catalog[step.model])
            send_descriptor(self.config, desc)
            self._event(f"published {desc.name}:{desc.version} with a wrong sha256 (tampered)")
        elif step.action == "shift":
            self.replay.shift(step.seconds)
            self._event(
                f"{DEMO_SHIFT_FEATURE} {DEMO_SHIFT_DELTA:+g} in the records of the next "
                f"{step.seconds:g} s (drift)"
            )

    # --- reading the outputs ---------------------------------------------------------

    def _output_consumer(self) -> Consumer:
        """One consumer on every partition of the output topics, from the beginning."""
        consumer = Consumer(
            kafka_settings(
                self.config,
                **{
                    # Required by the client, never used: we assign partitions (no group join,
                    # which takes ~20 s on tansu).
                    "group.id": f"waxserve-demo-{self.run_id}",
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    # Few fetches: see DEMO_TANSU_FETCH_WAIT_MS.
                    "fetch.wait.max.ms": 200,
                },
            )
        )
        assignment = []
        for topic in self.kinds:
            metadata = consumer.list_topics(topic, timeout=METADATA_TIMEOUT_S)
            assignment += [
                TopicPartition(topic, p, OFFSET_BEGINNING)
                for p in sorted(metadata.topics[topic].partitions)
            ]
        consumer.assign(assignment)
        return consumer

    def _pump(self, timeout: float, *, notes: bool = True) -> None:
        """Fold what arrived on the output topics within `timeout` seconds."""
        assert self.consumer is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            messages = self.consumer.consume(num_messages=5000, timeout=max(0.0, remaining))
            for msg in messages:
                err = msg.error()
                if err is not None:
                    if err.fatal():
                        raise KafkaException(err)
                    continue
                kind = self.kinds.get(msg.topic() or "", "")
                self.stats.add_message(kind, msg.value(), header_pairs(msg))
            if notes:
                for note in self.stats.take_notes():
                    self._event(note)
            if remaining <= 0 or not messages:
                return

    def _maybe_update(self, phase: str = "", *, force: bool = False) -> None:
        now = time.monotonic()
        last = self._last_update
        if last is None:
            self._last_update = now
            return
        if now - last < 1.0 and not force:
            return
        self._last_update = now
        assert self.replay is not None
        scored, latency = self.stats.take_recent()
        view = DemoView(
            elapsed_s=self.replay.seconds,
            duration_s=self.options.duration_s,
            sent=self.replay.produced,
            scored_per_s=scored / max(now - last, 1e-3),
            recent_latency=latency,
            phase=phase,
        )
        self.view.update(render_panel(self.stats, view), render_line(self.stats, view))

    # --- children --------------------------------------------------------------------

    def _check_children(self) -> None:
        if self.dataflow is not None and self.dataflow.poll() is not None:
            raise CliError(
                f"the dataflow exited early with code {self.dataflow.returncode}; its log "
                f"({self.dataflow_log}) ends:\n{self._dataflow_tail()}"
            )
        if self.broker is not None and not self.broker.running:
            raise CliError(f"the broker stopped; its log ends:\n{self.broker.log_tail()}")
        if self.replay is not None and self.replay.error is not None:
            raise CliError(f"the replay failed: {self.replay.error}")

    def _dataflow_tail(self, lines: int = 30) -> str:
        return log_tail(self.dataflow_log, lines)

    def _stop_dataflow(self) -> None:
        """SIGINT (Bytewax stops cleanly), then SIGTERM, then SIGKILL."""
        process = self.dataflow
        if process is None or process.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, 10.0), (signal.SIGTERM, 5.0)):
            try:
                process.send_signal(sig)
                process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue
            except KeyboardInterrupt:
                break
        process.kill()
        process.wait()

    def _delete_topics(self) -> None:
        from confluent_kafka.admin import AdminClient

        topics = [getattr(self.config, f"{alias}_topic") for alias in TOPIC_ALIASES]
        admin = AdminClient(kafka_settings(self.config))  # alive until every future is done
        futures = admin.delete_topics(topics, operation_timeout=10)
        for topic, future in futures.items():
            try:
                future.result(timeout=15)
            except Exception as exc:
                print(f"warning: could not delete topic {topic}: {exc}", file=sys.stderr)

    def _keep_workdir(self) -> bool:
        """Keep the logs when asked to, and when something went wrong."""
        if self.options.keep_logs or self.failure:
            return True
        replay = self.replay
        lost = replay is not None and self.stats.unaccounted(replay.delivered) != 0
        return lost and not self.interrupted

    def _clean_workdir(self) -> None:
        if not self._keep_workdir():
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _say(self, text: str) -> None:
        self.view.note(text)

    def _event(self, text: str) -> None:
        """A note stamped with the time since the replay started."""
        self.view.note(f"{self.stats.clock(time.time_ns() // 1_000_000, 8)}  * {text}")
