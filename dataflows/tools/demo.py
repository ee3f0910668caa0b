"""`waxserve demo`: the whole system on one machine, narrated.

The demo starts an embedded tansu broker (or, with `--brokers`, uses fresh `*-demo-<id>`
topics on yours), creates the topics, publishes the data contracts of wine and penguins and
a first model of each, starts the dataflow (`python -m bytewax.run dataflows.serving:flow`)
and replays both data sets at once at a steady rate, each to a topic of its own in its own
encoding (wine as protobuf on the records topic, penguins as JSON on `waxserve-penguins`).
Each wine record's label (its quality) follows it `DEMO_LABEL_DELAY_S` later on the feedback
topic, and the dataflow joins wine's labels to its predictions (labels that arrive later).
Meanwhile it follows a plan (`plan_demo`): malformed wine rows; a wine model that only the
quality gate can stop; the second wine model published staged and put in a canary on half
the wine records (a `PlanCommand` by "waxserve demo"), which the rollout judge must promote
on the labels; a tampered wine model that its signature must reject; a bad wine model (the
serving model with its input features reversed, a new version) canaried likewise, which the
judge must roll back; the other wine models and penguins' swapped in mid-stream; and a
burst of drifted wine records that must raise a drift alarm. The judge decides by itself
and says so on the control topic (actor "waxserve rollout judge", its evidence as the
reason); a step that would change wine's plan while a canary waits for the judge is held
until it decides (a new plan would end the canary), and the replay goes on past
`--duration` while one does. It reads every output topic and shows what comes out once a
second (each data type's plan, each model's records and online quality), and ends with a
summary that accounts for every record sent, per data type: scored (by one model, the
canary's records too) or dead-lettered, with the timeline of model and plan events: who
changed the plan, and why.

Every model descriptor it publishes is signed with a key pair it makes for the run (in its
work directory; the staged ones too), and the dataflow it starts trusts that key alone and
requires signatures (`DemoSigner`, `dataflow_env`). At the end it checks its promises
(`DemoPromises`): every record accounted for, every model installed signed by the demo's
key, each model swapped in installed, the tampered model rejected `bad_signature`, the
gated one `gate_failed`, each canary decided by the rollout judge as expected (the good
one promoted, the bad one rolled back: the judge's plan change with that action, and the
expected model serving after it), a drift alarm for the burst; it exits 1 if one is broken.

    Demo            the orchestration: broker, topics, dataflow subprocess, replay, the plan,
                    shutdown (every step undone in reverse order, also on Ctrl-C)
    ReplayStream    one data type's records: its CSV file (shuffled, looping), topic, encoder
                    (`dataflows.tools.replay.RecordEncoder`) and what was sent of it
    DemoReplay      a thread that sends the streams, interleaved by their shares, at --rate;
                    the plan injects malformed rows and a drift burst
    DemoSigner      the run's signing key, the trusted-keys directory, the signed (and
                    staged), tampered, gated and reversed descriptors
    DemoStats       folds the output topics (scored, events, dlq, drift, stats) into counts
                    per data type (`TypeTally`), the timeline of model and plan events, and
                    each model's online quality; pure, no Kafka
    DemoPromises    what the demo promised, checked against DemoStats at the end
    render_*        text for the live panel, the one-line progress and the final summary

`dataflows.tools.cli` parses the command line and calls `run_demo`.
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
from typing import Any, TextIO

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import DecodeError

from dataflows.contracts.files import load_contract
from dataflows.contracts.schema import Contract
from dataflows.control.signing import SigningError, generate_key_pair, load_private_key, sign
from dataflows.core.config import Config
from dataflows.core.descriptors import (
    MODELS_DIR,
    CatalogEntry,
    catalog_contracts,
    load_catalog,
)
from dataflows.core.events import JUDGE_ACTOR
from dataflows.core.lifecycle import STOP_DEADLINE_S
from dataflows.tools.broker import (
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
from dataflows.tools.replay import (
    FLUSH_TIMEOUT_S,
    PROTO_TYPES,
    CliError,
    CsvLine,
    DeliveryReport,
    OutHeaders,
    Pacer,
    RecordEncoder,
    StopRequests,
    csv_lines,
    header_pairs,
    produce,
    send_control,
)
from dataflows.tools.trust import GoldenSetError, golden_set
from protos import waxserve_pb2 as pb

WINE = "wine"
PENGUINS = "penguins"
WINE_CSV = MODELS_DIR / "data" / "winequality_red.csv"
ERROR_CSV = MODELS_DIR / "data" / "error_winequality_red.csv"
PENGUINS_CSV = MODELS_DIR / "penguins" / "penguins.csv"
DEMO_MODELS = ("wine-lr", "wine-gbt", "wine-pmml-lr")
"""The wine models (`--models`): the first serves from the start; the second is canaried
(the judge promotes it: it is better), then a copy of it with its features reversed (rolled
back); the others are swapped in."""
DEMO_PENGUIN_MODELS = ("penguins-species-onnx", "penguins-species-pmml")
"""The penguins models served in turn (`--penguin-models`)."""
BYTEWAX_API_PORT = 3030  # Bytewax's default (BYTEWAX_DATAFLOW_API_PORT)
STATE_PORT = 3040  # Config.state_addr's default
DEMO_KEY_NAME = "demo"
"""The run's signing key pair: `<work dir>/signer/demo.key` and `.pub`."""
DEMO_TAMPERED = "wine-rf-classifier"
"""Catalog model published signed, then changed: `DEMO_SWAPPED_IN`'s bytes and their sha256
put in after signing, as anyone who can write to the control topic could. The sha256
matches the bytes; only the signature tells (rejected `bad_signature`)."""
DEMO_SWAPPED_IN = "wine-logreg-zipmap"
"""The model whose bytes the tampered descriptor carries: a wine classifier too, which
would load and serve."""
DEMO_GATED = "wine-lr"
"""Published once as a new version (`DEMO_GATED_VERSION`), signed by the trusted key, with
its golden set (its own outputs on `DEMO_GOLDEN`), but with `DEMO_GATED_BYTES`'s file by
mistake: the signature is valid, only the quality gate stops it (rejected `gate_failed`)."""
DEMO_GATED_VERSION = "2"
DEMO_GATED_BYTES = "wine-gbt"
DEMO_GOLDEN = MODELS_DIR / "wine" / "golden.jsonl"
"""The golden set's inputs (the README's `waxserve publish --golden` example)."""
DEMO_SHIFT_FEATURE = "alcohol"
DEMO_SHIFT_DELTA = 3.0
DEMO_STATS_INTERVAL_S = 2.0
DEMO_DRIFT_WINDOW_S = 5.0
DEMO_LABEL_DELAY_S = 2.0
"""The demo sends each wine record's label this long after the record, on the feedback
topic, as labels that arrive later: the online quality per version, and the evidence the
rollout judge decides the canaries on (the sooner the labels, the sooner it can)."""
DEMO_FEEDBACK_DATA_TYPES = (WINE,)
DEMO_ACTOR = "waxserve demo"
"""Who the demo's plan commands say sent them."""
DEMO_CANARY_WEIGHT = 0.5
"""The candidate's share of a canary: half the wine records, so that both arms reach the
judge's WAXSERVE_CANARY_MIN_RECORDS (200) labelled records soonest."""
DEMO_REVERSED_SUFFIX = "-reversed"
"""The version suffix of the bad model: the serving model with its input features in
reverse order (a new version), as a wrong feature mapping would publish it."""
DEMO_JUDGE_TIMEOUT_S = 60.0
"""How long the demo holds the steps that would change wine's plan (and the end of the
replay) for the rollout judge's decision on a canary, before it gives up on it."""
DEMO_READY_TIMEOUT_S = 120.0
"""How long the dataflow may take to start and install the first models."""
DEMO_CATCH_UP_TIMEOUT_S = 15.0
DEMO_PLAN_GAP_S = 1.0
"""A penguins swap planned within this of another step moves later, so that the narration
shows one thing at a time."""
DEMO_TANSU_FETCH_WAIT_MS = 100
"""Fetch wait of the dataflow's consumers on the embedded tansu, unless
WAXSERVE_FETCH_WAIT_MS says otherwise. A fetch from tansu's in-memory log costs more the
longer the log is: with the default 5 ms (~200 fetches/s per partition), tansu saturates
two cores about 15 s into a replay at 1,000 rec/s; 100 ms keeps it to a fraction of that
for the whole demo, for ~25 ms more latency."""
DEMO_INTERRUPT_DRAIN_S = 3.0
DEMO_STOP_MARGIN_S = 1.5
"""How much longer than the dataflow's own stop deadline the demo waits before SIGKILL."""
_OUTPUT_KINDS = ("scored", "events", "dlq", "drift", "stats")


@dataclasses.dataclass(frozen=True)
class DemoData:
    """A data type the demo replays: its data file and its share of `--rate`."""

    data_type: str
    csv: Path
    share: int
    """Records of this data type in every `sum(shares)` records sent."""


DEMO_DATA = (DemoData(WINE, WINE_CSV, 4), DemoData(PENGUINS, PENGUINS_CSV, 1))
"""4 in 5 records are wine, 1 in 5 penguins. Wine keeps the larger share because its drift
burst must fill a drift window: at 500 rec/s that is 400 wine records/s, ~1,200 shifted
records in the 20 s demo's 3 s burst. Penguins get ~100 rec/s there: a few hundred records
per window, enough for a quiet PSI."""


def run_demo(config: Config, options: DemoOptions) -> int:
    """The end-to-end demo (see `Demo`); returns the exit code."""
    catalog = _demo_catalog(options.sequences())
    return Demo(config, options, catalog).run()


def _demo_catalog(sequences: Mapping[str, Sequence[str]]) -> dict[str, CatalogEntry]:
    try:
        catalog = load_catalog()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CliError(f"cannot read the model catalog in {MODELS_DIR}: {exc}") from None
    if WINE not in sequences:
        raise CliError("the demo needs a wine model (--models)")
    wanted = [(data_type, name) for data_type, names in sequences.items() for name in names]
    option = {WINE: "--models", PENGUINS: "--penguin-models"}
    trust = [
        (WINE, name) for name in (DEMO_TAMPERED, DEMO_SWAPPED_IN, DEMO_GATED, DEMO_GATED_BYTES)
    ]
    for data_type, name in [*wanted, *trust]:
        entry = catalog.get(name)
        if entry is None:
            raise CliError(f"unknown model {name!r}; catalog models: {', '.join(sorted(catalog))}")
        if entry.data_type != data_type:
            raise CliError(
                f"{option.get(data_type, data_type)}: {name} is a {entry.data_type} model, "
                f"not a {data_type} one"
            )
        if not entry.path().is_file():
            raise CliError(f"catalog model {name!r}: file {entry.path()} does not exist")
    paths = [ERROR_CSV, DEMO_GOLDEN, *(d.csv for d in DEMO_DATA if d.data_type in sequences)]
    for path in paths:
        if not path.is_file():
            raise CliError(f"demo data {path} does not exist")
    return catalog


# --- the plan ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DemoStep:
    """Something the demo does `at_s` seconds into the replay."""

    at_s: float
    action: str  # "bad_rows", "swap", "canary", "bad_canary", "tampered", "gate", "shift"
    model: str = ""
    seconds: float = 0.0  # "shift": how long
    data_type: str = WINE  # "swap": whose model

    @property
    def changes_plan(self) -> bool:
        """Whether it changes wine's serving plan: it would end a canary still judged."""
        return self.data_type == WINE and self.action in ("swap", "canary", "bad_canary")

    def describe(self) -> str:
        """The step in a few words."""
        share = f"{DEMO_CANARY_WEIGHT:.0%} of the {WINE} records"
        if self.action == "bad_rows":
            return f"send the rows of {ERROR_CSV.name} (malformed: expect dead letters)"
        if self.action == "swap":
            return f"publish {self.model}, signed: the dataflow swaps models mid-stream"
        if self.action == "canary":
            return (
                f"publish {self.model} staged, signed, and canary it on {share}: the rollout "
                "judge must promote it on their labels"
            )
        if self.action == "bad_canary":
            return (
                f"publish {self.model} with its input features reversed (a bad model, version "
                f"<v>{DEMO_REVERSED_SUFFIX}) staged, signed, and canary it on {share}: the "
                "rollout judge must roll it back"
            )
        if self.action == "tampered":
            return (
                f"publish {self.model}, signed, then with {DEMO_SWAPPED_IN}'s bytes and sha256 "
                "put in: its signature must reject it"
            )
        if self.action == "gate":
            return (
                f"publish {self.model}:{DEMO_GATED_VERSION}, signed, with {DEMO_GATED_BYTES}'s "
                "file by mistake: the quality gate must reject it"
            )
        if self.action == "shift":
            return (
                f"send {WINE} records with {DEMO_SHIFT_FEATURE} {DEMO_SHIFT_DELTA:+g} for "
                f"{self.seconds:g} s: expect a drift alarm"
            )
        return self.action


def plan_demo(
    duration_s: float,
    models: Sequence[str],
    drift_window_s: float,
    penguin_models: Sequence[str] = (),
) -> list[DemoStep]:
    """What happens when, in seconds since the replay started (the first models are up then).

    `models` are wine's, `penguin_models` penguins'. Wine, in this order, at fixed shares of
    the duration (each step at least `DEMO_PLAN_GAP_S` after the one before): the malformed
    rows, the gated model (under the first model), the second model canaried (the judge
    promotes it), the tampered model, the bad model (the second model's features reversed,
    or the first's with one model) canaried (the judge rolls it back), the other models
    swapped in, and the drift burst late, under the last model, ending early enough for its
    drift window to close before the replay stops. A canary needs the judge's decision
    before wine's plan changes again: the demo holds the steps that change it until then
    (`DemoStep.changes_plan`); the shares leave the judge room at the documented durations
    and rates. Penguins' models swap at equal shares of the duration; a swap that would
    come within `DEMO_PLAN_GAP_S` of another step comes later.
    """
    n = len(models)
    gap = DEMO_PLAN_GAP_S
    bad_rows_at = min(2.0, duration_s / 10)
    steps = [DemoStep(bad_rows_at, "bad_rows")]
    at = max(0.1 * duration_s, bad_rows_at + gap)
    steps.append(DemoStep(round(at, 1), "gate", DEMO_GATED))
    if n > 1:
        at = max(0.2 * duration_s, at + gap)
        steps.append(DemoStep(round(at, 1), "canary", models[1]))
    at = max(0.3 * duration_s, at + gap)
    steps.append(DemoStep(round(at, 1), "tampered", DEMO_TAMPERED))
    at = max(0.45 * duration_s, at + gap)
    steps.append(DemoStep(round(at, 1), "bad_canary", models[min(1, n - 1)]))
    rest = models[2:]
    for k, model in enumerate(rest, 1):
        at = max(0.55 * duration_s + k * 0.15 * duration_s / len(rest), at + gap)
        steps.append(DemoStep(round(at, 1), "swap", model))
    burst = round(min(drift_window_s, 0.15 * duration_s), 1)
    start = round(max(at + 1.0, 0.75 * duration_s), 1)
    start = min(start, max(0.0, duration_s - burst))
    steps.append(DemoStep(start, "shift", seconds=burst))
    taken = [s.at_s for s in steps]
    for k in range(1, len(penguin_models)):
        at = round(k * duration_s / len(penguin_models), 1)
        while any(abs(at - t) < gap for t in taken) and at + gap < duration_s:
            at = round(at + gap, 1)
        taken.append(at)
        steps.append(DemoStep(at, "swap", penguin_models[k], data_type=PENGUINS))
    return sorted(steps, key=lambda s: s.at_s)


# --- signing ------------------------------------------------------------------------------


def tampered_descriptor(
    entry: CatalogEntry, swapped_in: CatalogEntry, key: Ed25519PrivateKey
) -> pb.ModelDescriptor:
    """A catalog model's descriptor, signed, then given another model's bytes and their
    sha256: the sha256 still matches the bytes, the signature no longer matches the
    descriptor."""
    desc = entry.descriptor()
    sign(desc, key)
    other = swapped_in.descriptor()
    desc.model_bytes, desc.sha256 = other.model_bytes, other.sha256
    return desc


def gated_descriptor(
    entry: CatalogEntry,
    wrong_file: CatalogEntry,
    contract: Contract,
    key: Ed25519PrivateKey,
    *,
    version: str = DEMO_GATED_VERSION,
    golden: Path = DEMO_GOLDEN,
) -> pb.ModelDescriptor:
    """A new version of a catalog model as `waxserve publish --golden --sign` makes it (its
    golden set: its own outputs on the `golden` inputs), but carrying `wrong_file`'s model:
    signed by a trusted key, so only the quality gate can tell that the model does not
    reproduce what its trainer expects."""
    desc = entry.descriptor(version=version)
    try:
        desc.golden_set.CopyFrom(golden_set(golden, desc, desc.model_bytes, contract))
    except GoldenSetError as exc:
        raise CliError(f"the demo's golden set {golden}: {exc}") from None
    other = wrong_file.descriptor()
    desc.model_bytes, desc.sha256 = other.model_bytes, other.sha256
    desc.description = f"{entry.name} retrained; the file published is {wrong_file.name}'s"
    sign(desc, key)
    return desc


@dataclasses.dataclass(frozen=True)
class DemoSigner:
    """The run's signing key and the directory of the keys the dataflow trusts (its public
    key alone), both in the work directory: thrown away with it."""

    key: Ed25519PrivateKey
    key_id: str
    trusted_dir: Path

    @classmethod
    def create(cls, workdir: Path) -> DemoSigner:
        """A new key pair in `workdir/signer`, its public key in `workdir/trusted`."""
        try:
            private, public, key_id = generate_key_pair(workdir / "signer", DEMO_KEY_NAME)
            key = load_private_key(private)
        except (SigningError, OSError) as exc:
            raise CliError(f"cannot make the demo's signing key in {workdir}: {exc}") from None
        trusted = workdir / "trusted"
        trusted.mkdir(exist_ok=True)
        shutil.copyfile(public, trusted / public.name)
        return cls(key, key_id, trusted)

    def signed(self, entry: CatalogEntry, *, staged: bool = False) -> pb.ModelDescriptor:
        """A catalog model's descriptor, signed; with `staged`, loaded to serve nothing until
        a plan command names it (the stage is signed like the rest)."""
        desc = entry.descriptor()
        if staged:
            desc.stage = "staged"
        sign(desc, self.key)
        return desc


def reversed_descriptor(entry: CatalogEntry, key: Ed25519PrivateKey) -> pb.ModelDescriptor:
    """A new version of a catalog model (`<version>-reversed`) whose input features are
    listed in reverse order, staged and signed: a wrong feature mapping, as a publishing
    script might make it. Signed by a trusted key and of the right names and number of
    inputs, it installs; it scores every record, badly, and only the labels tell."""
    desc = entry.descriptor(version=f"{entry.version}{DEMO_REVERSED_SUFFIX}")
    desc.input_features[:] = list(reversed(desc.input_features))
    desc.stage = "staged"
    desc.description = f"{entry.name} with its input features in reverse order (a bad model)"
    sign(desc, key)
    return desc


def canary_command(data_type: str, candidate: str, reason: str) -> pb.PlanCommand:
    """The demo's CANARY command: `candidate` (name:version, installed staged) on
    `DEMO_CANARY_WEIGHT` of the records beside the active model, as `waxserve plan
    DATA_TYPE canary CANDIDATE=0.5` sends it."""
    return pb.PlanCommand(
        data_type=data_type,
        action=pb.CANARY,
        variants=[pb.PlanVariant(model=candidate, weight=DEMO_CANARY_WEIGHT)],
        actor=DEMO_ACTOR,
        reason=reason,
        issued_at_ms=time.time_ns() // 1_000_000,
    )


# --- the records -------------------------------------------------------------------------


def shuffled_lines(path: Path, seed: int = 0, *, header: bool = False) -> Iterator[CsvLine]:
    """The lines of a CSV file (without its first with `header`) in a random order (fixed
    by `seed`), pass after pass, forever.

    The UCI wine file is not in random order: a few hundred consecutive rows differ from
    the whole file (PSI up to 0.8 for 300 rows), and the drift windows compare what they
    see with the whole file's profile. Replayed in file order, normal traffic would raise
    drift alarms; shuffled, only the demo's deliberate shift does. (penguins.csv is sorted
    by species, island and year: the same holds.)
    """
    lines = list(csv_lines(path, loop=False, header=header))
    if not lines:
        raise CliError(f"{path} has no lines")
    rng = random.Random(seed)
    for pass_no in itertools.count():
        rng.shuffle(lines)
        for line in lines:
            yield dataclasses.replace(line, pass_no=pass_no)


def demo_contract(data_type: str) -> Contract:
    """An example data type's contract, from the catalog."""
    try:
        return load_contract(catalog_contracts()[data_type])
    except (OSError, ValueError, KeyError) as exc:
        raise CliError(f"cannot read the {data_type} contract in {MODELS_DIR}: {exc}") from None


def shift_feature(
    raw: bytes, feature: str, delta: float, columns: Sequence[str], delimiter: str = ";"
) -> bytes:
    """A CSV line (columns as given) with `delta` added to one feature; lines that do not
    parse, and lines of data without the feature, unchanged."""
    sep = delimiter.encode()
    cells = raw.split(sep)
    if len(cells) != len(columns) or feature not in columns:
        return raw
    i = list(columns).index(feature)
    try:
        value = float(cells[i])
    except ValueError:
        return raw
    cells[i] = f"{value + delta:.6g}".encode()
    return sep.join(cells)


def interleave(weights: Sequence[int]) -> Iterator[int]:
    """Indices into `weights`, each as often as its weight says, evenly spread (smooth
    weighted round-robin): weights (4, 1) give 0 0 1 0 0, 0 0 1 0 0, ...

    Deterministic, so the shares hold from the first second, at any rate.
    """
    total = sum(weights)
    if not weights or total <= 0 or min(weights) < 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    current = [0] * len(weights)
    while True:
        for i, weight in enumerate(weights):
            current[i] += weight
        best = max(range(len(weights)), key=current.__getitem__)
        current[best] -= total
        yield best


@dataclasses.dataclass(frozen=True)
class SentCounts:
    """What the replay sent of one data type."""

    sent: int
    """Records the broker acknowledged."""
    topic: str = ""
    encoding: str = ""
    injected: int = 0
    """Of `sent`, lines of an injected file (malformed rows)."""
    shifted: int = 0
    """Of `sent`, records of the drift burst."""


def route_records(config: Config, data_types: Sequence[str]) -> Config:
    """The demo's record topics: one per data type, with that data type as its default.

    A data type keeps a topic the settings give it (`topic=data_type` in records_topics);
    otherwise the first data type gets the first record topic and the others
    `waxserve-<data type>`. The records still carry the `data-type` header: the topic
    default only routes records without one.
    """
    defaults = config.record_topic_defaults
    given = {data_type: topic for topic, data_type in defaults.items() if data_type}
    used: list[str] = []
    for data_type in data_types:
        topic = given.get(data_type)
        if topic is None:
            first = config.records_topic
            free = not used and defaults[first] in ("", data_type)
            topic = first if free else f"waxserve-{data_type}"
        used.append(topic)
    records = ",".join(f"{t}={dt}" for t, dt in zip(used, data_types, strict=True))
    return dataclasses.replace(config, records_topics=records)


# --- the replay thread -------------------------------------------------------------------


class ReplayStream:
    """One data type's share of the replay: its CSV file (shuffled, looping), its topic and
    encoder, and what was sent of it.

    Records go in the contract's own encoding with a `data-type` header. Record ids are
    `<file stem>-<line>[-pass<N>]` as `waxserve replay --loop` makes them, with `-shifted`
    for the records a drift burst changed; injected files use `<file stem>-<line>`.
    """

    def __init__(
        self,
        contract: Contract,
        csv: Path,
        topic: str,
        *,
        share: int = 1,
        data_type_header: str = "data-type",
        feedback_topic: str = "",
    ) -> None:
        self.contract = contract
        self.csv = csv
        self.topic = topic
        self.share = share
        self._lines = shuffled_lines(csv, header=contract.csv.header)
        self._encoder = RecordEncoder(contract, data_type_header=data_type_header)
        # Labels that arrive later: each record's label, due DEMO_LABEL_DELAY_S after it.
        self.feedback_topic = feedback_topic
        self._labeller = (
            RecordEncoder(contract, data_type_header=data_type_header, feedback=True)
            if feedback_topic
            else None
        )
        self.labels: collections.deque[tuple[float, bytes, bytes, OutHeaders]] = collections.deque()
        self.label_report = DeliveryReport()
        self._extra: collections.deque[tuple[str, bytes]] = collections.deque()
        self.report = DeliveryReport()
        self.produced = 0
        self.injected = 0
        self.shifted = 0

    @property
    def data_type(self) -> str:
        """The data type of its records."""
        return self.contract.data_type

    def inject(self, path: Path) -> int:
        """Send the lines of `path` once, next, ahead of the file's; returns how many."""
        lines = [
            (f"{path.stem}-{line.line_no}", line.raw)
            for line in csv_lines(path, loop=False, header=False)
        ]
        self._extra.extend(lines)  # a deque: safe against the replay thread's popleft
        return len(lines)

    def next_message(self, *, shift: bool, event_time_ms: int) -> tuple[bytes, bytes, OutHeaders]:
        """The next record as key, value and headers; with `shift`, drifted if it can be."""
        injected = bool(self._extra)
        if injected:
            record_id, raw = self._extra.popleft()
            self.injected += 1
        else:
            line = next(self._lines)
            record_id = f"{self.csv.stem}-{line.line_no}"
            if line.pass_no:
                record_id += f"-pass{line.pass_no + 1}"
            raw = line.raw
            if shift:
                moved = shift_feature(
                    raw,
                    DEMO_SHIFT_FEATURE,
                    DEMO_SHIFT_DELTA,
                    self.contract.csv_columns,
                    self.contract.csv.delimiter,
                )
                if moved != raw:  # a data type without the feature is not shifted
                    raw = moved
                    record_id += "-shifted"
                    self.shifted += 1
        value, headers, _ = self._encoder.encode(
            raw, record_id=record_id, event_time_ms=event_time_ms
        )
        self.produced += 1
        # The injected rows are malformed on purpose: dead letters, with no label to send.
        if self._labeller is not None and not injected:
            label, label_headers, ok = self._labeller.encode(
                raw, record_id=record_id, event_time_ms=event_time_ms
            )
            if ok:  # a line that does not read has no label to send
                due = time.monotonic() + DEMO_LABEL_DELAY_S
                self.labels.append((due, record_id.encode(), label, label_headers))
        return record_id.encode(), value, headers

    def due_labels(self, now: float) -> list[tuple[bytes, bytes, OutHeaders]]:
        """The labels whose delay has passed, as key, value and headers."""
        out = []
        while self.labels and self.labels[0][0] <= now:
            _, key, value, headers = self.labels.popleft()
            out.append((key, value, headers))
        return out

    def counts(self) -> SentCounts:
        """What was sent so far."""
        return SentCounts(
            sent=self.report.delivered,
            topic=self.topic,
            encoding=str(self.contract.encoding),
            injected=self.injected,
            shifted=self.shifted,
        )


class DemoReplay:
    """Sends the streams' records, interleaved by their shares, at `rate` records per second
    in all, to their topics, in a background thread.

    Each record's event time is its send time, so the scored records tell the latency.
    """

    def __init__(self, config: Config, rate: float, streams: Sequence[ReplayStream]) -> None:
        self._config = config
        self._rate = rate
        self.streams = tuple(streams)
        self._stop = threading.Event()
        self._shift_until = 0.0  # time.monotonic() until which records are shifted
        self._thread = threading.Thread(target=self._run, name="waxserve-demo-replay", daemon=True)
        self.produced = 0
        self.undelivered = 0
        self.error: BaseException | None = None
        self.started_at = 0.0
        self.stopped_at = 0.0

    def start(self) -> None:
        """Start sending."""
        self.started_at = time.monotonic()
        self._thread.start()

    def stream(self, data_type: str) -> ReplayStream:
        """The stream of a data type."""
        for stream in self.streams:
            if stream.data_type == data_type:
                return stream
        raise KeyError(data_type)

    def shift(self, seconds: float) -> None:
        """Shift `DEMO_SHIFT_FEATURE` by `DEMO_SHIFT_DELTA` in the records of the next seconds
        (of the data types that have it)."""
        self._shift_until = time.monotonic() + seconds

    @property
    def shifting(self) -> bool:
        """Whether a drift burst is under way."""
        return time.monotonic() < self._shift_until

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
        return sum(s.report.delivered for s in self.streams)

    @property
    def failed(self) -> int:
        """Records the broker refused, and records still undelivered at the end."""
        return sum(s.report.failed for s in self.streams) + self.undelivered

    def sent(self) -> dict[str, SentCounts]:
        """What was sent (acknowledged) so far, by data type."""
        return {s.data_type: s.counts() for s in self.streams}

    def produced_by_type(self) -> dict[str, int]:
        """Records handed to the producer so far, by data type."""
        return {s.data_type: s.produced for s in self.streams}

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
        pacer = Pacer(self._rate)
        order = interleave([s.share for s in self.streams])
        while not self._stop.is_set():
            pacer.wait(lambda: producer.poll(0))
            if self._stop.is_set():
                return
            stream = self.streams[next(order)]
            key, value, headers = stream.next_message(
                shift=time.monotonic() < self._shift_until,
                event_time_ms=time.time_ns() // 1_000_000,
            )
            produce(producer, stream.topic, key, value, headers, stream.report)
            self.produced += 1
            if self.produced % 1000 == 0:
                producer.poll(0)
            if stream.feedback_topic:
                for label in stream.due_labels(time.monotonic()):
                    produce(producer, stream.feedback_topic, *label, stream.label_report)


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
    """A control event: when, what (installed, rejected, restored; contract_installed,
    contract_rejected; plan_changed, plan_rejected), which model or contract, for which
    data type."""

    at_ms: int
    kind: str
    data_type: str
    model: str
    """name:version; "contract v<N>"; for a plan event the active model after it ("" if
    none)."""
    reason: str = ""
    signer: str = ""
    """Models: the key id the descriptor was signed with (claimed, for a rejected one)."""
    message: str = ""
    """Why: the gate's worst rows; a plan command's reason (the judge's evidence)."""
    staged: bool = False
    """An installed model that serves nothing until a plan command names it."""
    action: str = ""
    """Plan events: the command's action (canary, promote, rollback, ...)."""
    actor: str = ""
    """Plan events: who sent the command."""
    plan: str = ""
    """The plan in effect after the event, in a line (events that carry one)."""

    @property
    def is_model(self) -> bool:
        """Whether it is about a model being installed or rejected (not a contract, not a
        plan command)."""
        return not self.kind.startswith(("contract_", "plan_"))

    @property
    def is_plan(self) -> bool:
        """Whether it answers a plan command."""
        return self.kind.startswith("plan_")

    @property
    def by_judge(self) -> bool:
        """Whether it is the rollout judge's decision."""
        return self.is_plan and self.actor == JUDGE_ACTOR


def _header_text(headers: Sequence[tuple[str, bytes | str | None]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in headers:
        if isinstance(value, bytes):
            out[name] = value.decode("utf-8", errors="replace")
        elif value is not None:
            out[name] = value
    return out


Position = tuple[str, int, int]
"""Where a record was read: source topic, partition, offset."""


@dataclasses.dataclass
class TypeTally:
    """What came out for the records of one data type, each record counted once (by its
    position): scored per model, dead-lettered per reason, latency and drift."""

    scored_by_model: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    dead_by_class: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    latency: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)
    """End-to-end latency (scored_at_ms - event_time_ms) histogram, whole run."""
    duplicates: int = 0
    """Scored or dead-lettered again (counted once)."""
    scored_and_dead: int = 0
    """Records both scored and dead-lettered (should never happen)."""
    unplaced_dead: int = 0
    """Dead letters without a usable source position (counted, not deduplicated)."""
    drift_windows: int = 0
    drift_alarms: list[pb.DriftMetrics] = dataclasses.field(default_factory=list)
    latest_drift: pb.DriftMetrics | None = None
    _scored: set[Position] = dataclasses.field(default_factory=set)
    _dead: set[Position] = dataclasses.field(default_factory=set)

    def add_scored(self, position: Position, model: str) -> bool:
        """A scored record; False if it was scored before."""
        if position in self._scored:
            self.duplicates += 1
            return False
        self._scored.add(position)
        self.scored_and_dead += position in self._dead
        self.scored_by_model[model] += 1
        return True

    def add_dead(self, position: Position | None, reason: str) -> None:
        """A dead-lettered record (`position` None when the dead letter does not say)."""
        if position is None:
            self.dead_by_class[reason] += 1  # a dead letter we cannot place: count it anyway
            self.unplaced_dead += 1
            return
        if position in self._dead:
            self.duplicates += 1
            return
        self._dead.add(position)
        self.scored_and_dead += position in self._scored
        self.dead_by_class[reason] += 1

    def add_drift(self, drift: pb.DriftMetrics) -> None:
        """A drift window of this data type."""
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


@dataclasses.dataclass
class DemoStats:
    """Everything the demo read from the output topics, folded into counts per data type.
    No Kafka here: feed it decoded messages (`add_scored`, ...) or raw ones (`add_message`).

    Records are identified by their position (topic, partition, offset) in a record topic,
    so a record scored twice counts once (and as a duplicate), and `accounted` is exact. A
    record's data type is its topic's (`record_topics`): the demo sends each data type to a
    topic of its own, so the counts compare with what it sent there.
    """

    record_topics: Mapping[str, str]
    """Record topic -> the data type sent to it."""
    t0_ms: int = 0
    """Wall-clock start of the replay: times are shown relative to it."""
    tallies: dict[str, TypeTally] = dataclasses.field(default_factory=dict)
    """Data type -> what came out for its records (every data type of record_topics)."""
    rejected_control: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    """Dead letters from other topics (descriptors, contracts and plan commands on the
    control topic), by error class."""
    feedback_topic: str = ""
    """Where the labels go: its dead letters are `rejected_labels`."""
    rejected_labels: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    """Dead letters from the feedback topic (labels that are no label), by error class."""
    undecodable: int = 0
    current: dict[str, str] = dataclasses.field(default_factory=dict)
    """Data type -> name:version of the model serving it (per the events topic)."""
    signers: dict[str, str] = dataclasses.field(default_factory=dict)
    """Data type -> the key id that signed the model serving it ("": unsigned)."""
    plans: dict[str, str] = dataclasses.field(default_factory=dict)
    """Data type -> its serving plan in a line (per the latest event that carries one)."""
    online: dict[str, pb.OnlineQuality] = dataclasses.field(default_factory=dict)
    """name:version -> its online quality since install, on the labels joined so far."""
    model_signers: dict[str, str] = dataclasses.field(default_factory=dict)
    """name:version -> the key id that signed it, of the models installed."""
    timeline: list[TimelineEntry] = dataclasses.field(default_factory=list)
    model_us: dict[str, float] = dataclasses.field(default_factory=dict)
    """name:version -> mean model time per record (µs) from the latest serving stats."""
    recent_latency: collections.Counter[int] = dataclasses.field(
        default_factory=collections.Counter
    )
    recent_scored: int = 0
    first_scored_ms: int = 0
    last_scored_ms: int = 0
    shifted_scored_ms: tuple[int, int] | None = None
    """When the first and the last record of the drift burst were scored: the drift windows
    (processing time) that hold them."""
    notes: list[str] = dataclasses.field(default_factory=list)
    """Noteworthy things seen (model events, drift alarms), for the caller to print."""

    def __post_init__(self) -> None:
        for data_type in self.record_topics.values():
            self.tally(data_type)

    def tally(self, data_type: str) -> TypeTally:
        """The counts of a data type (new and empty the first time)."""
        tally = self.tallies.get(data_type)
        if tally is None:
            tally = self.tallies[data_type] = TypeTally()
        return tally

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
        data_type = self.record_topics.get(rec.source_topic) or rec.data_type
        tally = self.tally(data_type)
        position = (rec.source_topic, rec.source_partition, rec.source_offset)
        if not tally.add_scored(position, f"{rec.model_name}:{rec.model_version}"):
            return
        self.recent_scored += 1
        if rec.event_time_ms > 0 and rec.scored_at_ms > 0:
            latency_ms = max(0, rec.scored_at_ms - rec.event_time_ms)
            tally.latency[latency_ms] += 1
            self.recent_latency[latency_ms] += 1
        if rec.scored_at_ms:
            if not self.first_scored_ms or rec.scored_at_ms < self.first_scored_ms:
                self.first_scored_ms = rec.scored_at_ms
            self.last_scored_ms = max(self.last_scored_ms, rec.scored_at_ms)
            if rec.record_id.endswith("-shifted"):
                span = self.shifted_scored_ms or (rec.scored_at_ms, rec.scored_at_ms)
                self.shifted_scored_ms = (
                    min(span[0], rec.scored_at_ms),
                    max(span[1], rec.scored_at_ms),
                )

    def add_dead_letter(self, headers: Mapping[str, str]) -> None:
        """A dead letter, by its `waxserve.*` headers."""
        reason = headers.get("waxserve.error.class", "?")
        topic = headers.get("waxserve.source.topic", "")
        data_type = self.record_topics.get(topic)
        if data_type is None:
            if topic and topic == self.feedback_topic:
                self.rejected_labels[reason] += 1
            else:
                self.rejected_control[reason] += 1
            return
        try:
            position: Position | None = (
                topic,
                int(headers["waxserve.source.partition"]),
                int(headers["waxserve.source.offset"]),
            )
        except (KeyError, ValueError):
            position = None
        self.tally(data_type).add_dead(position, reason)

    def add_event(self, event: pb.ModelEvent) -> None:
        """A control event: a model installed (serving or staged), rejected or restored; a
        contract installed or rejected; a plan command applied or refused."""
        contract = event.kind.startswith("contract_")
        if contract:
            what = f"contract v{event.contract_version}"
        elif event.model_name:
            what = f"{event.model_name}:{event.model_version}"
        else:
            what = ""  # a plan command refused, or one that leaves no model active
        staged = event.kind == "installed" and event.message.startswith("staged")
        entry = TimelineEntry(
            event.at_ms,
            event.kind,
            event.data_type,
            what,
            event.reason,
            signer=event.signer_key_id,
            message=event.message,
            staged=staged,
            action=event.plan_action,
            actor=event.actor,
            plan=event.plan,
        )
        self.timeline.append(entry)
        if event.plan:
            self.plans[event.data_type] = event.plan
        if entry.is_plan:
            self._add_plan_event(entry)
        elif event.kind in ("installed", "restored"):
            self.model_signers[what] = event.signer_key_id
            signed = f", {_signed(event.signer_key_id)}"
            if staged:
                self.notes.append(
                    f"installed {what} for {event.data_type} staged (it serves when a plan "
                    f"names it){signed}"
                )
                return
            self.current[event.data_type] = what
            self.signers[event.data_type] = event.signer_key_id
            gate = f"; {event.gate}" if event.gate else ""
            self.notes.append(f"{event.kind} {what} for {event.data_type}{signed}{gate}")
        elif event.kind == "contract_installed":
            self.notes.append(f"installed the {event.data_type} {what}")
        elif contract:
            self.notes.append(f"rejected the {event.data_type} {what} ({event.reason or '?'})")
        else:
            serving = self.current.get(event.data_type, "nothing")
            why = f"\n{event.message}" if event.message else ""  # the gate: the worst rows
            self.notes.append(
                f"{event.kind} {what} ({event.reason or '?'}): "
                f"{serving} keeps serving {event.data_type}{why}"
            )

    def _add_plan_event(self, entry: TimelineEntry) -> None:
        data_type = entry.data_type
        by = f"{entry.action or 'plan'} by {entry.actor or '?'}"
        if entry.kind == "plan_rejected":
            self.notes.append(
                f"refused {by} for {data_type} ({entry.reason or '?'}: {entry.message}); the "
                f"plan stays {entry.plan or '?'}"
            )
            return
        if entry.model:  # the active model after it
            self.current[data_type] = entry.model
            self.signers[data_type] = self.model_signers.get(entry.model, "")
        note = f"plan for {data_type}: {entry.plan} ({by})"
        if entry.by_judge:
            took = self.canary_took_s(entry)
            after = f", {took:.1f} s into the canary" if took is not None else ""
            note = f"THE ROLLOUT JUDGE: {entry.action}{after}: plan for {data_type}: {entry.plan}"
        if entry.message:
            note += f"\n{entry.message}"  # the reason; the judge's: its evidence
        self.notes.append(note)

    def canary_started(self, candidate: str) -> TimelineEntry | None:
        """The plan change that put `candidate` (name:version) in a canary, if seen."""
        prefix = f"canary {candidate} "
        return next(
            (e for e in self.timeline if e.kind == "plan_changed" and e.plan.startswith(prefix)),
            None,
        )

    def judge_decision(self, candidate: str) -> TimelineEntry | None:
        """The rollout judge's decision (applied) on the canary of `candidate`, if seen."""
        prefix = f"canary {candidate} against "
        return next(
            (
                e
                for e in self.timeline
                if e.kind == "plan_changed" and e.by_judge and e.message.startswith(prefix)
            ),
            None,
        )

    def canary_took_s(self, decision: TimelineEntry) -> float | None:
        """Seconds from the canary's start to the judge's `decision` on it."""
        candidate = decision.message.removeprefix("canary ").partition(" against ")[0]
        started = self.canary_started(candidate)
        if started is None:
            return None
        return (decision.at_ms - started.at_ms) / 1000

    def add_drift(self, drift: pb.DriftMetrics) -> None:
        """A drift window."""
        self.tally(drift.data_type).add_drift(drift)
        if drift.alarm:
            feature, psi = top_feature(drift)
            self.notes.append(
                f"DRIFT ALARM: PSI {psi:.2f} on {feature} for {drift.data_type} under "
                f"{drift.model_name}:{drift.model_version} in window {self.window(drift)} "
                f"({drift.record_count:,} records)"
            )

    def add_stats(self, stats: pb.ServingStats) -> None:
        """A serving-stats window."""
        model = f"{stats.model_name}:{stats.model_version}"
        self.model_us[model] = stats.mean_duration_us
        if stats.model_name and stats.feedback_total.labelled_count:
            self.online[model] = stats.feedback_total

    # --- reading ---------------------------------------------------------------------

    @property
    def scored(self) -> int:
        """Distinct records scored, all data types."""
        return sum(t.scored for t in self.tallies.values())

    @property
    def dead(self) -> int:
        """Distinct records dead-lettered, all data types."""
        return sum(t.dead for t in self.tallies.values())

    @property
    def accounted(self) -> int:
        """Distinct records scored or dead-lettered, all data types."""
        return sum(t.accounted for t in self.tallies.values())

    @property
    def duplicates(self) -> int:
        """Records scored or dead-lettered again, all data types."""
        return sum(t.duplicates for t in self.tallies.values())

    @property
    def scored_and_dead(self) -> int:
        """Records both scored and dead-lettered (a bug), all data types."""
        return sum(t.scored_and_dead for t in self.tallies.values())

    @property
    def latency(self) -> collections.Counter[int]:
        """End-to-end latency histogram, all data types."""
        total: collections.Counter[int] = collections.Counter()
        for tally in self.tallies.values():
            total.update(tally.latency)
        return total

    @property
    def drift_alarms(self) -> list[pb.DriftMetrics]:
        """Drift windows that raised the alarm, all data types."""
        return [d for t in self.tallies.values() for d in t.drift_alarms]

    def unaccounted(self, sent: Mapping[str, int]) -> int:
        """Records sent (`sent`: by data type) that are neither scored nor dead-lettered."""
        return sum(self.unaccounted_by_type(sent).values())

    def unaccounted_by_type(self, sent: Mapping[str, int]) -> dict[str, int]:
        """`unaccounted` per data type: every data type sent or seen."""
        names = list(dict.fromkeys([*self.tallies, *sent]))
        return {dt: self.tallies.get(dt, TypeTally()).unaccounted(sent.get(dt, 0)) for dt in names}

    def settled(self, models: Sequence[str]) -> bool:
        """Whether the events topic told the outcome (installed or rejected) of each of these
        models (name:version)."""
        decided = {e.model for e in self.timeline if e.is_model}
        return all(model in decided for model in models)

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


def _signed(key_id: str) -> str:
    return f"signed by {key_id}" if key_id else "unsigned"


def top_feature(drift: pb.DriftMetrics) -> tuple[str, float]:
    """The most drifted quantity of a drift window (smallest p-value; in a window too small
    to judge, largest PSI), and its PSI."""
    best = min(
        drift.features,
        key=lambda f: (f.p_value if f.HasField("p_value") else 2.0, -f.psi),
        default=None,
    )
    return (best.feature, best.psi) if best is not None else ("-", 0.0)


def burst_alarms(stats: DemoStats) -> list[pb.DriftMetrics]:
    """The wine drift alarms of windows that hold records of the drift burst (drift windows
    are in processing time: when the shifted records were scored, not sent)."""
    tally = stats.tallies.get(WINE)
    if stats.shifted_scored_ms is None or tally is None:
        return []
    first, last = stats.shifted_scored_ms
    return [d for d in tally.drift_alarms if d.window_start_ms <= last and d.window_end_ms > first]


def burst_reported(stats: DemoStats) -> bool:
    """Whether the wine drift windows up to the last scored record of the burst have been
    reported (the monitor closes windows in time order)."""
    tally = stats.tallies.get(WINE)
    latest = tally.latest_drift if tally is not None else None
    shifted = stats.shifted_scored_ms
    return shifted is not None and latest is not None and latest.window_end_ms > shifted[1]


@dataclasses.dataclass(frozen=True)
class Promise:
    """One thing the demo promised, and whether what came out keeps it."""

    text: str
    kept: bool
    detail: str = ""  # what came out instead, when broken


@dataclasses.dataclass
class DemoPromises:
    """What the demo promises, checked against what came out (`check`) at the end. The plan's
    steps add theirs as they are done: a step the replay did not reach promised nothing."""

    key_id: str
    """Every model installed must be signed by this key (the demo's own)."""
    rejections: dict[str, str] = dataclasses.field(default_factory=dict)
    """name:version -> the reason it must be rejected for (the previous model serving on)."""
    swaps: list[str] = dataclasses.field(default_factory=list)
    """name:version of the models swapped in mid-stream: each must install."""
    drift_burst: bool = False
    """Whether the drift burst was sent: a wine drift alarm must hold its records."""
    canaries: dict[str, CanaryExpectation] = dataclasses.field(default_factory=dict)
    """name:version of each candidate canaried -> what the rollout judge must decide."""

    def check(self, stats: DemoStats, outcome: DemoOutcome) -> list[Promise]:
        """Each promise, kept or broken."""
        lost = {dt: n for dt, n in stats.unaccounted_by_type(outcome.sent_by_type).items() if n}
        accounted = Promise(
            "every record sent is scored or dead-lettered",
            not lost and not outcome.failed,
            f"{_counts(lost) or 'no'} record(s) unaccounted for, {outcome.failed} delivery "
            "failure(s)",
        )
        promises = [accounted, self._signed(stats)]
        promises += [self._installed(stats, model) for model in self.swaps]
        promises += [self._rejected(stats, m, r) for m, r in self.rejections.items()]
        promises += [self._judged(stats, m, e) for m, e in self.canaries.items()]
        if self.drift_burst:
            promises.append(
                Promise(
                    f"a {WINE} drift alarm for the {DEMO_SHIFT_FEATURE} burst",
                    bool(burst_alarms(stats)),
                    "no drift window holding the burst raised the alarm",
                )
            )
        return promises

    def _signed(self, stats: DemoStats) -> Promise:
        installed = [e for e in stats.timeline if e.kind in ("installed", "restored")]
        other = [f"{e.model} {_signed(e.signer)}" for e in installed if e.signer != self.key_id]
        detail = ", ".join(other) if other else "no model installed"
        return Promise(
            f"every model installed is signed by the demo's key {self.key_id}",
            bool(installed) and not other,
            detail,
        )

    @staticmethod
    def _installed(stats: DemoStats, model: str) -> Promise:
        seen = [e for e in stats.timeline if e.is_model and e.model == model]
        kept = any(e.kind == "installed" for e in seen)
        return Promise(f"{model} swapped in: installed", kept, _found(seen))

    @staticmethod
    def _rejected(stats: DemoStats, model: str, reason: str) -> Promise:
        seen = [e for e in stats.timeline if e.is_model and e.model == model]
        kept = any(e.kind == "rejected" and e.reason == reason for e in seen)
        kept = kept and not any(e.kind in ("installed", "restored") for e in seen)
        return Promise(f"{model} rejected: {reason}", kept, _found(seen))

    @staticmethod
    def _judged(stats: DemoStats, candidate: str, expected: CanaryExpectation) -> Promise:
        decision = stats.judge_decision(candidate)
        text = (
            f"{candidate} canaried: {expected.verb} by the rollout judge, "
            f"{expected.serving} serving after"
        )
        if decision is None:
            started = stats.canary_started(candidate)
            detail = "no decision from the rollout judge" + (
                "" if started is not None else "; the canary never started"
            )
            refused = [e for e in stats.timeline if e.kind == "plan_rejected"]
            detail += "".join(f"; refused {e.action}: {e.message}" for e in refused)
            return Promise(text, False, detail)
        kept = decision.action == expected.action and decision.model == expected.serving
        detail = f"the judge's decision: {decision.action}, {decision.model or 'nothing'} serving"
        return Promise(text, kept, detail)


@dataclasses.dataclass(frozen=True)
class CanaryExpectation:
    """What the rollout judge must decide about a canary the demo starts."""

    action: str  # "promote" or "rollback": the plan_action of the judge's command
    serving: str  # name:version of the model serving alone after the decision

    @property
    def verb(self) -> str:
        """The decision as a past participle."""
        return {"promote": "promoted", "rollback": "rolled back"}.get(self.action, self.action)


def _found(events: Sequence[TimelineEntry]) -> str:
    """What the events say of a model, for a broken promise."""
    return ", ".join(f"{e.kind} {e.reason}".strip() for e in events) or "no event"


# --- text --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DemoView:
    """The numbers of one live update that do not come from the output topics."""

    elapsed_s: float
    duration_s: float
    sent: Mapping[str, int]
    """Records handed to the producer so far, by data type."""
    scored_per_s: float
    recent_latency: collections.Counter[int]
    phase: str = ""  # e.g. "catching up"


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _ms(value: int | None) -> str:
    return "-" if value is None else f"{value:,} ms"


def _latency(histogram: collections.Counter[int], *, worst: bool = True) -> str:
    text = f"p50 {_ms(percentile(histogram, 50))}, p99 {_ms(percentile(histogram, 99))}"
    return text + (f", max {_ms(percentile(histogram, 100))}" if worst else "")


def _counts(counter: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(counter.items(), key=lambda kv: -kv[1]))


def _drift_text(stats: DemoStats, tally: TypeTally) -> str:
    drift = tally.latest_drift
    if drift is None:
        return "no window closed yet"
    feature, psi = top_feature(drift)
    state = "ALARM" if drift.alarm else "ok"
    return (
        f"{state}: max PSI {psi:.2f} ({feature}), {drift.model_name}:{drift.model_version} "
        f"{stats.window(drift)}; alarms so far {len(tally.drift_alarms)}"
    )


def _online_text(quality: pb.OnlineQuality) -> str:
    """A model's online quality in a few words: labels joined, RMSE or accuracy."""
    figure = ""
    if quality.HasField("rmse"):
        figure = f", rmse {quality.rmse:.2f}"
    elif quality.HasField("accuracy"):
        figure = f", accuracy {quality.accuracy:.1%}"
    return f"labelled {quality.labelled_count:,}{figure}"


def render_panel(stats: DemoStats, view: DemoView) -> list[str]:
    """The live panel (a terminal redraws it in place once a second)."""
    phase = f"  [{view.phase}]" if view.phase else ""
    sent = sum(view.sent.values())
    in_flight = max(0, sent - stats.accounted)
    lines = [
        f"waxserve demo  {view.elapsed_s:5.1f} s of {view.duration_s:g} s{phase}",
        f"  records   sent {sent:,}  scored {stats.scored:,} ({view.scored_per_s:,.0f}/s)"
        f"  dead-lettered {stats.dead:,}  in flight {in_flight:,}",
        f"  latency   sent -> scored, last second: {_latency(view.recent_latency, worst=False)}",
    ]
    for data_type, tally in stats.tallies.items():
        serving = stats.current.get(data_type, "nothing yet")
        if data_type in stats.current:
            serving += f" ({_signed(stats.signers.get(data_type, ''))})"
        lines.append(
            f"  {data_type:<9} sent {view.sent.get(data_type, 0):,}  scored {tally.scored:,}"
            f"  dead-lettered {tally.dead:,}  serving {serving}"
        )
        plan = stats.plans.get(data_type)
        if plan:
            lines.append(f"    plan    {plan}")
        label = "    scored  "
        for model, count in tally.scored_by_model.items():
            us = stats.model_us.get(model)
            timing = f"  model call {us:,.0f} us/record" if us is not None else ""
            online = stats.online.get(model)
            quality = f"  {_online_text(online)}" if online is not None else ""
            lines.append(f"{label}{model:<24} {count:>9,}{timing}{quality}")
            label = " " * len(label)
        lines.append(f"    DLQ     {_counts(tally.dead_by_class) or 'none'}")
        lines.append(f"    drift   {_drift_text(stats, tally)}")
    if stats.rejected_control:
        lines.append(f"  rejected  control messages: {_counts(stats.rejected_control)}")
    return lines


def render_line(stats: DemoStats, view: DemoView) -> str:
    """The live update as one line (when stdout is not a terminal)."""
    p50 = percentile(view.recent_latency, 50)
    p99 = percentile(view.recent_latency, 99)
    per_type = []
    for data_type, tally in stats.tallies.items():
        drift = tally.latest_drift
        psi = "-" if drift is None else f"{drift.max_psi:.2f}{' ALARM' if drift.alarm else ''}"
        model = stats.current.get(data_type, "-")
        plan = stats.plans.get(data_type, "")
        if plan and not plan.startswith("single "):  # a canary, a split, ...: all of it
            model = f"[{plan}]"
        per_type.append(f"{data_type}={model} scored {tally.scored} dlq {tally.dead} psi {psi}")
    phase = f" [{view.phase}]" if view.phase else ""
    return (
        f"{view.elapsed_s:+6.1f} s{phase}  sent {sum(view.sent.values())} scored "
        f"{stats.scored} ({view.scored_per_s:.0f}/s) dlq {stats.dead} | p50 {_ms(p50)} "
        f"p99 {_ms(p99)} | " + " | ".join(per_type)
    )


@dataclasses.dataclass(frozen=True)
class DemoOutcome:
    """What the replay did, for the summary."""

    sent: Mapping[str, SentCounts]
    """By data type: what the broker acknowledged."""
    failed: int  # delivery failures (not sent)
    replay_s: float
    rate: float
    workers: int
    interrupted: bool = False
    failure: str = ""

    @property
    def sent_by_type(self) -> dict[str, int]:
        """Records sent, by data type."""
        return {data_type: counts.sent for data_type, counts in self.sent.items()}

    @property
    def total_sent(self) -> int:
        """Records sent, all data types."""
        return sum(counts.sent for counts in self.sent.values())


def _sent_note(counts: SentCounts) -> str:
    notes = [f"{counts.encoding} on {counts.topic}"] if counts.topic else []
    if counts.injected:
        notes.append(f"{counts.injected} from {ERROR_CSV.name}")
    if counts.shifted:
        notes.append(f"{counts.shifted:,} with {DEMO_SHIFT_FEATURE} {DEMO_SHIFT_DELTA:+g}")
    return f"({', '.join(notes)})" if notes else ""


def render_summary(
    stats: DemoStats, outcome: DemoOutcome, promises: Sequence[Promise] = ()
) -> list[str]:
    """The final summary: the totals, the accounting per data type, each data type, the
    timeline, then the promises kept and broken."""
    sent = outcome.sent_by_type
    per_type = stats.unaccounted_by_type(sent)
    unaccounted = sum(per_type.values())
    rate = f"{outcome.rate:,.0f} rec/s" if outcome.rate else "full speed"
    lines = [
        "",
        "=" * 72,
        f"waxserve demo summary: {outcome.replay_s:.1f} s of replay at {rate}, "
        f"{_plural(outcome.workers, 'worker')}" + (" (INTERRUPTED)" if outcome.interrupted else ""),
        "=" * 72,
        f"  records sent       {outcome.total_sent:>9,}   "
        + ", ".join(f"{dt} {n:,}" for dt, n in sent.items()),
    ]
    if outcome.failed:
        lines.append(f"  delivery failures  {outcome.failed:>9,}   (not counted as sent)")
    lines.append(f"  scored             {stats.scored:>9,}")
    lines.append(f"  dead-lettered      {stats.dead:>9,}")
    if stats.duplicates:
        lines.append(f"  duplicates         {stats.duplicates:>9,}   (counted once)")
    if stats.scored_and_dead:
        lines.append(
            f"  scored AND dead    {stats.scored_and_dead:>9,}   (records both scored and "
            "dead-lettered: a bug)"
        )
    ok = all(n == 0 for n in per_type.values())
    verdict = "OK, every record is accounted for" if ok else "NOT OK"
    if not ok and outcome.interrupted:
        verdict = "interrupted: these may still have been in flight"
    lines.append(
        f"  UNACCOUNTED        {unaccounted:>9,}   sent - scored - dead-lettered: {verdict}"
    )
    for data_type, n in per_type.items():
        tally = stats.tallies.get(data_type, TypeTally())
        lines.append(
            f"    {data_type:<16} {n:>9,}   of {sent.get(data_type, 0):,} sent: "
            f"{tally.scored:,} scored, {tally.dead:,} dead-lettered"
        )
    span_s = (stats.last_scored_ms - stats.first_scored_ms) / 1000
    if stats.scored and span_s > 0:
        lines.append(
            f"  throughput         {stats.scored / span_s:>9,.0f}   rec/s scored "
            f"(the replay paces it: {rate})"
        )
    lines.append(f"  latency            {_latency(stats.latency)} (record sent -> scored)")
    for data_type, tally in stats.tallies.items():
        counts = outcome.sent.get(data_type, SentCounts(0))
        lines.append(f"  {data_type:<18} {counts.sent:>9,}   sent {_sent_note(counts)}".rstrip())
        # In serving order (the order they first scored), unlike the dead letters.
        models = ", ".join(f"{m} {n:,}" for m, n in tally.scored_by_model.items())
        lines.append(f"    scored           {tally.scored:>9,}   {models}".rstrip())
        lines.append(
            f"    dead-lettered    {tally.dead:>9,}   {_counts(tally.dead_by_class)}".rstrip()
        )
        # Labels that arrived later, joined to each model's predictions (a model that
        # scored no record of this data type has none).
        online = {m: stats.online[m] for m in tally.scored_by_model if m in stats.online}
        if online:
            lines.append(
                f"    online quality   {'':>9}   "
                + "; ".join(f"{m} {_online_text(q)}" for m, q in online.items())
            )
        lines.append(f"    latency          {_latency(tally.latency)}")
        drift = f"    drift windows    {tally.drift_windows:>9,}   alarms {len(tally.drift_alarms)}"
        if tally.drift_alarms:
            worst = max(tally.drift_alarms, key=lambda d: d.max_psi)
            feature, psi = top_feature(worst)
            drift += (
                f"; worst: PSI {psi:.2f} on {feature} under {worst.model_name}:"
                f"{worst.model_version} ({stats.window(worst)}, {worst.record_count:,} records)"
            )
        lines.append(drift)
    lines.append("  timeline           (seconds since the replay started)")
    # Events come from several partitions of the events topic: put them in time order.
    for entry in sorted(stats.timeline, key=lambda e: e.at_ms):
        if entry.is_plan:
            lines += _plan_lines(stats, entry)
            continue
        reason = f"  {entry.reason}" if entry.reason else ""
        if reason and entry.is_model:
            reason += ": the previous model kept serving"
        elif entry.kind in ("installed", "restored"):
            reason = f"  {_signed(entry.signer)}" + (", staged" if entry.staged else "")
        kind = entry.kind.removeprefix("contract_")
        lines.append(
            f"    {stats.clock(entry.at_ms, 8)}  {kind:<9} {entry.model} for "
            f"{entry.data_type}{reason}"
        )
        if entry.kind == "rejected" and entry.message:
            lines.append(f"{'':22}{entry.message}")  # why: the worst rows of a gate failure
    if not stats.timeline:
        lines.append("    (no model events seen)")
    if stats.rejected_control:
        lines.append(
            f"  rejected control   {sum(stats.rejected_control.values()):>9,}   "
            f"dead-lettered control messages: {_counts(stats.rejected_control)}"
        )
    if stats.rejected_labels:
        lines.append(
            f"  rejected labels    {sum(stats.rejected_labels.values()):>9,}   "
            f"dead-lettered labels: {_counts(stats.rejected_labels)}"
        )
    if stats.undecodable:
        lines.append(f"  undecodable output {stats.undecodable:>9,}   messages")
    if promises:
        lines.append("  promises")
    for promise in promises:
        state = "kept  " if promise.kept else "BROKEN"
        detail = "" if promise.kept else f": {promise.detail}"
        lines.append(f"    {state}  {promise.text}{detail}")
    if outcome.failure:
        lines.append(f"  FAILED: {outcome.failure.splitlines()[0]}")
    return lines


def _plan_lines(stats: DemoStats, entry: TimelineEntry) -> list[str]:
    """A plan event in the summary's timeline: the plan after it, who changed it and why."""
    by = f"{entry.action or '?'} by {entry.actor or '?'}"
    clock = stats.clock(entry.at_ms, 8)
    if entry.kind == "plan_rejected":
        head = f"    {clock}  {'refused':<9} {by} for {entry.data_type}  {entry.reason or '?'}"
        return [head, f"{'':22}{entry.message}"] if entry.message else [head]
    if entry.by_judge:
        took = stats.canary_took_s(entry)
        by += f", {took:.1f} s into the canary" if took is not None else ""
    lines = [f"    {clock}  {'plan':<9} {entry.plan} for {entry.data_type}  {by}"]
    if entry.message:
        lines.append(f"{'':22}{entry.message}")  # the reason; the judge's: its evidence
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
    """The demo's command-line options. `models` are the wine models (`--models`): the
    first serves from the start, the second is canaried (and should be promoted: a better
    model), a reversed copy of it canaried (rolled back), the others swapped in, in turn;
    `penguin_models` the penguins ones, served in turn (`--penguin-models`; empty: wine
    only); `rate` is records per second of all data types together (shares: `DEMO_DATA`)."""

    duration_s: float = 40.0
    rate: float = 1000.0
    workers: int = 1
    models: tuple[str, ...] = DEMO_MODELS
    penguin_models: tuple[str, ...] = DEMO_PENGUIN_MODELS
    external_brokers: bool = False
    keep_logs: bool = False
    quiet: bool = False

    def sequences(self) -> dict[str, tuple[str, ...]]:
        """Data type -> its models in serving order, for the data types the demo replays."""
        sequences = {WINE: self.models, PENGUINS: self.penguin_models}
        return {data_type: models for data_type, models in sequences.items() if models}


def demo_config(config: Config, run_id: str, *, fresh_topics: bool) -> Config:
    """The demo's settings: on a shared broker, topic names of its own (record topics keep
    their default data types)."""
    if not fresh_topics:
        return config
    topics: dict[str, Any] = {
        f.name: f"{getattr(config, f.name)}-demo-{run_id}"
        for f in dataclasses.fields(Config)
        if f.name.endswith("_topic")
    }
    records = ",".join(
        f"{topic}-demo-{run_id}" + (f"={default}" if default else "")
        for topic, default in config.record_topic_defaults.items()
    )
    return dataclasses.replace(config, **topics, records_topics=records)


def _usual_or_free(port: int) -> int:
    return port if port_is_free(port) else free_port()


def dataflow_env(
    config: Config,
    workdir: Path,
    *,
    fetch_wait_ms: int | None = None,
    trusted_keys_dir: Path | None = None,
) -> dict[str, str]:
    """The dataflow subprocess's environment: ours (WAXSERVE_* tuning included), with the
    demo's broker, topics and short stats/drift intervals; with `trusted_keys_dir`, it
    requires signatures by the keys there (whatever our settings say: the demo's promises
    depend on it)."""
    env = dict(os.environ)
    if trusted_keys_dir is not None:
        env["WAXSERVE_SIGNATURE_POLICY"] = "require"
        env["WAXSERVE_TRUSTED_KEYS_DIR"] = str(trusted_keys_dir)
    # The demo swaps PMML models in: the JVM starts before the dataflow runs, so the first
    # PMML model does not pause scoring (README, WAXSERVE_PMML).
    env.setdefault("WAXSERVE_PMML", "on")
    env["WAXSERVE_BROKERS"] = config.brokers
    for f in dataclasses.fields(Config):
        if f.name.endswith("_topic"):
            env[f"WAXSERVE_{f.name.upper()}"] = str(getattr(config, f.name))
    env["WAXSERVE_RECORDS_TOPICS"] = config.records_topics
    env["WAXSERVE_STATS_INTERVAL_S"] = str(DEMO_STATS_INTERVAL_S)
    env["WAXSERVE_DRIFT_WINDOW_S"] = str(DEMO_DRIFT_WINDOW_S)
    # The labels the demo sends are joined for these (whatever our settings say: the
    # rollout judge decides the canaries on them).
    env["WAXSERVE_FEEDBACK_DATA_TYPES"] = ",".join(DEMO_FEEDBACK_DATA_TYPES)
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


@dataclasses.dataclass(frozen=True)
class Judging:
    """A canary the demo started, until the rollout judge decides it."""

    candidate: str  # name:version
    since: float  # time.monotonic() when the demo sent the canary command
    refused: int  # plan commands refused before it: one more means it was refused


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
        self.sequences = options.sequences()
        self.data = [d for d in DEMO_DATA if d.data_type in self.sequences]
        self.contracts = {d.data_type: demo_contract(d.data_type) for d in self.data}
        self.run_id = uuid.uuid4().hex[:6]
        routed = route_records(config, [d.data_type for d in self.data])
        self.config = demo_config(routed, self.run_id, fresh_topics=options.external_brokers)
        self.topics = {dt: t for t, dt in self.config.record_topic_defaults.items()}
        """Data type -> its record topic."""
        self.workdir = Path(tempfile.mkdtemp(prefix="waxserve-demo-"))
        self.dataflow_log = self.workdir / "dataflow.log"
        self.view = LiveView(sys.stdout, quiet=options.quiet)
        self.stats = DemoStats(
            record_topics=self.config.record_topic_defaults,
            feedback_topic=self.config.feedback_topic,
        )
        self.broker: EmbeddedBroker | None = None
        self.dataflow: subprocess.Popen[bytes] | None = None
        self.consumer: Consumer | None = None
        self.replay: DemoReplay | None = None
        self.kinds = {getattr(self.config, f"{kind}_topic"): kind for kind in _OUTPUT_KINDS}
        self.plan: collections.deque[DemoStep] = collections.deque()
        self.published: list[str] = []
        """name:version of every model published, for the summary to wait for its event."""
        self.fetch_wait_ms: int | None = None
        self._stops = StopRequests()
        self.interrupted = False
        self.failure = ""
        self._last_update: float | None = None
        self.signer: DemoSigner | None = None
        self.gated: pb.ModelDescriptor | None = None
        """The "gate" step's descriptor (its golden set is computed before the replay)."""
        self.promises = DemoPromises(key_id="")
        """What the run promised so far (the steps add theirs), checked at the end."""
        self.judging: Judging | None = None
        """The canary the rollout judge has yet to decide."""
        self._held_noted = False
        self._extended = False

    # --- the run ---------------------------------------------------------------------

    def run(self) -> int:
        """The whole demo; returns the exit code."""
        # The first Ctrl-C or SIGTERM asks to stop, where `_checkpoint` is: raised inside
        # `Consumer.consume()` it would drop messages the summary must count.
        with self._stops:
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

    def _checkpoint(self) -> None:
        """Where a requested stop takes effect."""
        self._stops.check()

    def _set_up(self, stack: contextlib.ExitStack) -> None:
        options = self.options
        stack.callback(self._clean_workdir)
        rate = f"{options.rate:,.0f} rec/s" if options.rate else "full speed"
        shares = ":".join(str(d.share) for d in self.data)
        self._say(
            f"waxserve demo: {options.duration_s:g} s of "
            f"{' and '.join(d.data_type for d in self.data)} records at {rate}"
            + (f" ({shares})" if len(self.data) > 1 else "")
            + f" through the dataflow ({_plural(options.workers, 'worker')})"
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
        records = ", ".join(
            f"{topic} ({dt}, {self.contracts[dt].encoding})" for dt, topic in self.topics.items()
        )
        self._say(
            f"  topics     {records}: {partitions} partitions each; "
            f"{self.config.control_topic} (1), outputs ({partitions} each)"
        )
        self.consumer = self._output_consumer()
        stack.callback(self.consumer.close)
        self.signer = DemoSigner.create(self.workdir)
        self.promises = DemoPromises(key_id=self.signer.key_id)
        self._say(
            f"  signing    key {self.signer.key_id}, made for this run (signer/"
            f"{DEMO_KEY_NAME}.key); the dataflow trusts it alone and requires signatures"
        )
        self.gated = gated_descriptor(
            self.catalog[DEMO_GATED],
            self.catalog[DEMO_GATED_BYTES],
            self.contracts[WINE],
            self.signer.key,
        )
        plan = plan_demo(
            options.duration_s,
            options.models,
            DEMO_DRIFT_WINDOW_S,
            self.sequences.get(PENGUINS, ()),
        )
        for data_type, models in self.sequences.items():
            self._say(f"  plan       +{0:5.1f} s  {models[0]} serves {data_type} from the start")
        for step in plan:
            self._say(f"             +{step.at_s:5.1f} s  {step.describe()}")
        self.plan = collections.deque(plan)

        self._checkpoint()
        # Contracts first: a model is checked against its data type's contract.
        for contract in self.contracts.values():
            send_control(self.config, contract.to_proto())
            self._say(
                f"published the {contract.data_type} contract v{contract.version} "
                f"to {self.config.control_topic}"
            )
        firsts = []
        for models in self.sequences.values():
            desc = self.signer.signed(self.catalog[models[0]])
            send_control(self.config, desc)
            firsts.append(f"{desc.name}:{desc.version}")
            self._say(
                f"published {firsts[-1]} to {self.config.control_topic}, signed by "
                f"{desc.signature.key_id}"
            )
        self.published += firsts
        self._start_dataflow(stack)
        self._wait_ready(firsts)

    def _start_dataflow(self, stack: contextlib.ExitStack) -> None:
        command = [
            sys.executable,
            "-m",
            "bytewax.run",
            "dataflows.serving:flow",
            "-w",
            str(self.options.workers),
        ]
        assert self.signer is not None
        self._dataflow_env = dataflow_env(
            self.config,
            self.workdir,
            fetch_wait_ms=self.fetch_wait_ms,
            trusted_keys_dir=self.signer.trusted_dir,
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

    def _wait_ready(self, models: Sequence[str]) -> None:
        """Until the dataflow reports each first model installed; fails on a rejection (of
        one of them, or of a contract)."""
        started = time.monotonic()
        while not self.stats.settled(models):
            if time.monotonic() - started > DEMO_READY_TIMEOUT_S:
                raise CliError(
                    f"the dataflow did not install {', '.join(models)} within "
                    f"{DEMO_READY_TIMEOUT_S:g} s; its log ends:\n{self._dataflow_tail()}"
                )
            self._checkpoint()
            self._check_children()
            self._pump(0.2, notes=False)
            for entry in self.stats.timeline:
                if entry.kind in ("rejected", "contract_rejected"):
                    raise CliError(
                        f"the dataflow rejected {entry.model} for {entry.data_type}: "
                        f"{entry.reason or '?'}"
                    )
        self.stats.take_notes()
        signers = sorted({e.signer for e in self.stats.timeline if e.model in models})
        self._say(
            f"the dataflow installed {', '.join(models)} after {time.monotonic() - started:.1f} s "
            f"({', '.join(_signed(k) for k in signers)})"
        )

    def _show(self) -> None:
        """The replay and the plan, with a live update once a second."""
        streams = [
            ReplayStream(
                self.contracts[d.data_type],
                d.csv,
                self.topics[d.data_type],
                share=d.share,
                data_type_header=self.config.data_type_header,
                feedback_topic=(
                    self.config.feedback_topic if d.data_type in DEMO_FEEDBACK_DATA_TYPES else ""
                ),
            )
            for d in self.data
        ]
        self.replay = DemoReplay(self.config, self.options.rate, streams)
        self.stats.t0_ms = time.time_ns() // 1_000_000
        self.replay.start()
        files = " and ".join(f"{s.csv.name} ({s.contract.encoding}) to {s.topic}" for s in streams)
        self._say(f"replaying {files} in a loop (times below: seconds since now)")
        while self._replaying():
            self._checkpoint()
            while self.plan and self.plan[0].at_s <= self.replay.seconds:
                if self.plan[0].changes_plan and self._awaiting_judge():
                    self._note_held(self.plan[0])
                    break
                self._do(self.plan.popleft())
            self._pump(0.1)
            self._check_children()
            self._maybe_update()

    def _replaying(self) -> bool:
        """Until --duration, and on while steps wait for the judge (the last canary too:
        it decides on the labels of records still to come) or a late drift burst lasts."""
        replay = self.replay
        assert replay is not None
        if replay.seconds < self.options.duration_s:
            return True
        waiting = bool(self.plan) or self._awaiting_judge()
        if waiting and not self._extended:
            self._extended = True
            judging = self.judging
            why = (
                f"the rollout judge has yet to decide the canary of {judging.candidate}"
                if judging is not None
                else "steps of the plan are left"
            )
            self._event(f"the replay goes on past --duration: {why}")
        return waiting or replay.shifting

    def _awaiting_judge(self) -> bool:
        """Whether the canary the demo started last still waits for the rollout judge's
        decision (neither decided nor refused, for at most DEMO_JUDGE_TIMEOUT_S)."""
        judging = self.judging
        if judging is None:
            return False
        refused = sum(e.kind == "plan_rejected" for e in self.stats.timeline)
        if self.stats.judge_decision(judging.candidate) is not None or refused > judging.refused:
            self.judging = None
        elif time.monotonic() - judging.since > DEMO_JUDGE_TIMEOUT_S:
            self._event(
                f"the rollout judge did not decide the canary of {judging.candidate} within "
                f"{DEMO_JUDGE_TIMEOUT_S:g} s: going on without its decision"
            )
            self.judging = None
        self._held_noted = self._held_noted and self.judging is not None
        return self.judging is not None

    def _note_held(self, step: DemoStep) -> None:
        if self._held_noted:
            return
        self._held_noted = True
        candidate = self.judging.candidate if self.judging else "?"
        self._event(
            f"holding the next step ({step.action} {step.model}) until the rollout judge "
            f"decides the canary of {candidate}: a new plan would end it"
        )

    def _catch_up(self, timeout: float, phase: str, *, interruptible: bool = True) -> None:
        """Stop the replay; read until every record sent is scored or dead-lettered, and every
        model published installed or rejected, for at most `timeout` seconds after the broker
        acknowledged the last record."""
        replay = self.replay
        assert replay is not None
        replay.stop(wait=False)
        deadline = time.monotonic() + timeout
        while replay.running or (
            (
                self.stats.accounted < replay.delivered
                or not self.stats.settled(self.published)
                # The drift windows of the burst close a window (and grace) after it.
                or (self.promises.drift_burst and not burst_reported(self.stats))
            )
            and time.monotonic() < deadline
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
            sent=replay.sent(),
            failed=replay.failed,
            replay_s=replay.seconds,
            rate=self.options.rate,
            workers=self.options.workers,
            interrupted=self.interrupted,
            failure=self.failure,
        )
        checked = not (self.failure or self.interrupted)
        promises = self.promises.check(self.stats, outcome) if checked else []
        for line in render_summary(self.stats, outcome, promises):
            print(line)
        if self._keep_workdir():
            print(f"  logs               {self.workdir}")
        sys.stdout.flush()
        if self.failure:
            raise CliError(self.failure)
        if self.interrupted:
            return 130
        broken = [p for p in promises if not p.kept]
        for promise in broken:
            print(
                f"waxserve demo: broken promise: {promise.text}: {promise.detail}",
                file=sys.stderr,
            )
        if broken:
            print(f"waxserve demo: the dataflow log is kept in {self.workdir}", file=sys.stderr)
            return 1
        return 0

    # --- steps -----------------------------------------------------------------------

    def _publish(self, desc: pb.ModelDescriptor, *, rejected_for: str = "") -> None:
        """Publish a descriptor; the summary waits for its event. The demo promises its
        rejection for `rejected_for`, without it its installation."""
        send_control(self.config, desc)
        model = f"{desc.name}:{desc.version}"
        self.published.append(model)
        if rejected_for:
            self.promises.rejections[model] = rejected_for
        else:
            self.promises.swaps.append(model)

    def _do(self, step: DemoStep) -> None:
        assert self.replay is not None and self.signer is not None
        if step.action == "bad_rows":
            count = self.replay.stream(WINE).inject(ERROR_CSV)
            self._event(f"sending the {count} rows of {ERROR_CSV.name} (malformed)")
        elif step.action == "swap":
            desc = self.signer.signed(self.catalog[step.model])
            self._publish(desc)
            self._event(
                f"published {desc.name}:{desc.version} for {desc.data_type}, signed (model swap)"
            )
        elif step.action in ("canary", "bad_canary"):
            self._canary(step)
        elif step.action == "tampered":
            desc = tampered_descriptor(
                self.catalog[step.model], self.catalog[DEMO_SWAPPED_IN], self.signer.key
            )
            self._publish(desc, rejected_for="bad_signature")
            self._event(
                f"published {desc.name}:{desc.version}, signed, then with {DEMO_SWAPPED_IN}'s "
                "bytes and sha256 put in (tampered)"
            )
        elif step.action == "gate":
            gated = self.gated
            assert gated is not None
            self._publish(gated, rejected_for="gate_failed")
            self._event(
                f"published {gated.name}:{gated.version}, signed, with {DEMO_GATED_BYTES}'s "
                f"file and {gated.name}'s golden set of {len(gated.golden_set.inputs)} rows "
                "(for the quality gate)"
            )
        elif step.action == "shift":
            self.replay.shift(step.seconds)
            self.promises.drift_burst = True
            self._event(
                f"{DEMO_SHIFT_FEATURE} {DEMO_SHIFT_DELTA:+g} in the {WINE} records of the next "
                f"{step.seconds:g} s (drift)"
            )

    def _canary(self, step: DemoStep) -> None:
        """Publish the candidate staged (loaded, serving nothing), then a CANARY command on
        the control topic: the rollout judge must decide, on the labels, by itself."""
        # Here, not at the top: plan_cli imports cli, which imports this module.
        from dataflows.tools.plan_cli import send_plan

        assert self.signer is not None
        entry = self.catalog[step.model]
        if step.action == "canary":
            desc = self.signer.signed(entry, staged=True)
            candidate = f"{desc.name}:{desc.version}"
            expected = CanaryExpectation("promote", candidate)
            what = "a good candidate"
        else:
            desc = reversed_descriptor(entry, self.signer.key)
            candidate = f"{desc.name}:{desc.version}"
            # Rolled back, the model it is a bad copy of serves on.
            expected = CanaryExpectation("rollback", f"{entry.name}:{entry.version}")
            what = f"{entry.name}:{entry.version} with its input features reversed, a bad model"
        send_control(self.config, desc)
        self.published.append(candidate)
        reason = f"{what}: on {DEMO_CANARY_WEIGHT:.0%} until the rollout judge decides"
        refused = sum(e.kind == "plan_rejected" for e in self.stats.timeline)
        send_plan(self.config, canary_command(WINE, candidate, reason))
        self.promises.canaries[candidate] = expected
        self.judging = Judging(candidate, time.monotonic(), refused)
        self._event(
            f"published {candidate} for {WINE} staged, signed ({what}), and sent: canary "
            f"{candidate}={DEMO_CANARY_WEIGHT:g} by {DEMO_ACTOR}: the rollout judge must "
            f"{'promote it' if expected.action == 'promote' else 'roll it back'}"
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
            sent=self.replay.produced_by_type(),
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
        """SIGTERM, as Kubernetes stops it: the dataflow flushes its output and exits within
        STOP_DEADLINE_S whatever holds it (dataflows/core/lifecycle.py). SIGKILL if it is
        still there a little later, or at once on another Ctrl-C; a second SIGTERM would
        change nothing."""
        process = self.dataflow
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired, KeyboardInterrupt):
            process.send_signal(signal.SIGTERM)
            process.wait(STOP_DEADLINE_S + DEMO_STOP_MARGIN_S)
            return
        process.kill()
        process.wait()

    def _delete_topics(self) -> None:
        from confluent_kafka.admin import AdminClient

        config = self.config
        topics = [
            config.control_topic,
            config.marker_topic,
            config.feedback_topic,
            *config.record_topic_defaults,
            *config.output_topics,
        ]
        admin = AdminClient(kafka_settings(config))  # alive until every future is done
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
        if replay is None or self.interrupted:
            return False
        outcome = DemoOutcome(
            sent=replay.sent(),
            failed=replay.failed,
            replay_s=replay.seconds,
            rate=self.options.rate,
            workers=self.options.workers,
        )
        return not all(p.kept for p in self.promises.check(self.stats, outcome))

    def _clean_workdir(self) -> None:
        if not self._keep_workdir():
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _say(self, text: str) -> None:
        self.view.note(text)

    def _event(self, text: str) -> None:
        """A note stamped with the time since the replay started (more lines indented)."""
        stamp = f"{self.stats.clock(time.time_ns() // 1_000_000, 8)}  * "
        self.view.note(stamp + text.replace("\n", "\n" + " " * len(stamp)))
