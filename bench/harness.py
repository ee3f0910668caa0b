"""Runs the contenders against one broker and measures them.

The broker is Apache Kafka (KRaft, one node: `dataflows.tools.kafka_server`) unless
`Settings.broker` says tansu, the demo's embedded broker (the bench's broker until issue 12;
its quirks explain some settings below, kept so that runs on either broker compare).

    Bench.throughput_run   one contender over its 200k-record input topic (the peers' JSON
                           wine records, or another input format: bench/inputs.py), from the
                           beginning to the end: records/s between its first and its last
                           output message, CPU of its process tree over the same span
    Bench.latency_run      one contender tailing a fresh topic that a paced producer writes
                           at a fixed rate: output message time minus record event time
    Bench.swap_run         waxserve live at a fixed rate while model descriptors alternate:
                           publish -> first record scored by the new model; records lost or
                           scored twice
    Bench.soak_run         waxserve at a fixed rate for minutes: resident set over time

Contenders run strictly one at a time (the machine has 2 cores: one for the contender, one
for the broker and the harness). `bench.run` strings the runs together; `bench/README.md`
describes the method.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, Producer
from confluent_kafka import TopicPartition as KafkaTopicPartition
from confluent_kafka.admin import AdminClient

from bench.contenders.common import FETCH_QUEUE_BACKOFF_MS
from bench.inputs import INPUTS, SHARED_INPUT, Feed, Reference
from bench.measure import CpuSampler, percentile, process_tree, rss_bytes, throughput
from dataflows.contracts.schema import Contract
from dataflows.core.config import Config
from dataflows.core.descriptors import CatalogEntry, load_catalog
from dataflows.tools.broker import (
    EmbeddedBroker,
    _die_with_parent,
    create_topics,
    ensure_topic,
    free_port,
    kafka_settings,
    log_tail,
)
from dataflows.tools.kafka_server import ApacheKafka
from dataflows.tools.replay import Pacer, header_pairs, send_control
from protos import waxserve_pb2 as pb

REPO = Path(__file__).resolve().parent.parent
QUIX_VENV = REPO / "bench" / ".venv-quix"
QUIX_REQUIREMENTS = ("quixstreams", "confluent-kafka<2.13", "onnxruntime", "numpy", "orjson")
"""Quix Streams pins confluent-kafka below 2.13; waxserve needs newer: hence its own venv."""

Progress = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Contender:
    """One way of scoring the stream, and how to start it."""

    name: str
    label: str
    kind: str  # "script" (bench.contenders.<module>), "consume", "bytewax", "quix", "waxserve"
    module: str = ""
    env: tuple[tuple[str, str], ...] = ()  # extra environment of its process
    model: str = "wine-lr"  # a models/catalog.json name; "" for none
    monitoring: bool = True  # waxserve: stats and drift on
    max_records: int | None = None  # read only this many input records (slow contenders)
    writes_scored: bool = False  # a script that writes waxserve's ScoredRecord, not JSON
    input: str = SHARED_INPUT  # which input topic it reads (`bench.inputs.INPUTS`)

    @property
    def format_row(self) -> bool:
        """A waxserve run on another input format than the peers' (fewer repetitions)."""
        return self.input != SHARED_INPUT

    @property
    def output(self) -> str:
        """How its output is read: "report" (a file), "scored" (ScoredRecord), "json"."""
        if self.kind == "consume":
            return "report"
        return "scored" if self.kind == "waxserve" or self.writes_scored else "json"


CONTENDERS: dict[str, Contender] = {
    c.name: c
    for c in (
        Contender("consume", "plain consumer (floor)", "consume", "consume_only", model=""),
        Contender("passthrough", "raw passthrough (floor)", "script", "passthrough", model=""),
        Contender("naive", "naive per-record loop", "script", "naive"),
        Contender("tuned", "hand-tuned batched loop", "script", "tuned"),
        Contender(
            "tuned-headers",
            "hand-tuned loop + content-type header",
            "script",
            "tuned",
            env=(("BENCH_TUNED_HEADERS", "1"),),
        ),
        Contender(
            "essential",
            "waxserve's essential work alone (limit)",
            "script",
            "essential",
            writes_scored=True,
        ),
        Contender("bytewax", "idiomatic Bytewax", "bytewax"),
        Contender("quix", "Quix Streams per record", "quix"),
        Contender("waxserve-lr", "waxserve ONNX LR", "waxserve"),
        Contender(
            "waxserve-lr-nomon", "waxserve ONNX LR, stats+drift off", "waxserve", monitoring=False
        ),
        # What exactly-once output costs: Kafka transactions committed at each epoch, with
        # their markers (README "How it works"); everything else as waxserve-lr.
        Contender(
            "waxserve-lr-eos",
            "waxserve ONNX LR, exactly-once",
            "waxserve",
            env=(("WAXSERVE_DELIVERY", "exactly-once"),),
        ),
        Contender("waxserve-gbt", "waxserve ONNX GBT", "waxserve", model="wine-gbt"),
        Contender("waxserve-pmml", "waxserve PMML LR", "waxserve", model="wine-pmml-lr"),
        Contender(
            "pypmml", "pypmml per record (Py4J)", "script", "pypmml_naive", model="wine-pmml-lr"
        ),
        # The input formats (issue 11): waxserve LR on the same wine rows in other encodings,
        # and a categorical model.
        Contender(
            "waxserve-lr-protobuf",
            "waxserve ONNX LR, protobuf records",
            "waxserve",
            input="wine-protobuf",
        ),
        Contender("waxserve-lr-csv", "waxserve ONNX LR, CSV records", "waxserve", input="wine-csv"),
        Contender(
            "waxserve-lr-avro", "waxserve ONNX LR, Avro records", "waxserve", input="wine-avro"
        ),
        Contender(
            "waxserve-penguins",
            "waxserve ONNX penguin species (categorical), JSON records",
            "waxserve",
            model="penguins-species-onnx",
            input="penguins-json",
        ),
    )
}
THROUGHPUT_DEFAULT = tuple(n for n in CONTENDERS if n != "consume")
"""Every contender but the plain consumer, whose floor is a latency floor."""
FORMAT_ROWS = tuple(n for n, c in CONTENDERS.items() if c.format_row)
"""The input-format rows: waxserve on inputs other than the peers' JSON wine records."""
LATENCY_DEFAULT = ("consume", "passthrough", "naive", "tuned", "bytewax", "quix", "waxserve-lr")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one `python -m bench` run measures, and how much of it."""

    records: int = 200_000
    reps: int = 3
    rate: float = 2000.0
    latency_s: float = 10.0
    warmup_s: float = 2.0
    swaps: int = 20
    swap_interval_s: float = 0.5
    pmml_records: int = 2000
    partitions: int = 4  # of the throughput input and output topics
    # Of the topics of the live runs (latency, swap, soak). tansu's cost per fetch grows with
    # the number of record batches in a partition; a live stream keyed over 4 partitions
    # writes 4x the batches, and latency climbs during a run for every contender alike.
    live_partitions: int = 1
    throughput: tuple[str, ...] = THROUGHPUT_DEFAULT
    # Repetitions of the input-format rows (at most `reps`): they are not compared with a
    # goal, and each costs a waxserve start-up (~10 s) on top of its input topic.
    format_reps: int = 2
    latency: tuple[str, ...] = LATENCY_DEFAULT
    swap: bool = True
    quix: bool = True
    broker: str = "kafka"  # or "tansu" (BROKERS)


SOAK_LINGER_MS = 20
SOAK_ENV = {"WAXSERVE_FETCH_WAIT_MS": "100", "WAXSERVE_LINGER_MS": str(SOAK_LINGER_MS)}
"""The soak's client settings, as the demo's. tansu's cost per fetch grows with the number
of record batches in the partition: at 5,000 records/s with 5 ms linger and fetch wait it
saturates a core within a minute and then stops serving the consumer altogether. Fewer,
larger batches and fewer fetches keep it going for the soak's 10 minutes; the soak measures
memory, not latency."""


BROKERS = ("kafka", "tansu")
"""The brokers the bench runs on: Apache Kafka (the default) or tansu."""

Broker = ApacheKafka | EmbeddedBroker


def make_broker(kind: str, work_dir: Path) -> Broker:
    """A broker of `kind` (not started: `with make_broker(...) as broker:` starts it), its
    log in `work_dir`."""
    if kind == "kafka":
        return ApacheKafka(log_path=work_dir / "kafka.log")
    if kind == "tansu":
        return EmbeddedBroker(log_path=work_dir / "tansu.log")
    raise ValueError(f"broker {kind!r}: one of {', '.join(BROKERS)}")


def broker_label(broker: Broker) -> str:
    """How progress lines and the report name the broker."""
    if isinstance(broker, ApacheKafka):
        return f"Apache Kafka {broker.version}"
    return "tansu"


class RunFailed(RuntimeError):
    """A contender failed in one run; the report shows why and the bench goes on."""


# --- processes ---------------------------------------------------------------------------


def _contender_setup() -> None:  # runs in the child between fork and exec
    """SIGINT as usual, and death with the harness (Linux): a crashed bench leaves no
    contender behind.

    A harness started in the background (`nohup`, `&` in a script, CI) has SIGINT ignored,
    and a child inherits that: Python then installs no KeyboardInterrupt handler, `stop()`
    waits 15 s for nothing, and every latency run took 28 s instead of 13.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        _die_with_parent()


class ContenderProcess:
    """A contender's process (its own session and process group), its output in a log."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.started = time.time()
        self.proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_contender_setup,
        )

    @property
    def pid(self) -> int:
        """Process id."""
        return self.proc.pid

    def alive(self) -> bool:
        """Whether it still runs."""
        return self.proc.poll() is None

    def check_alive(self) -> None:
        """RunFailed with its log when it exited."""
        if not self.alive():
            raise RunFailed(f"exited with code {self.proc.returncode}: {self.tail()}")

    def tail(self, lines: int = 8) -> str:
        """The last lines of its output."""
        self._log.flush()
        return log_tail(self.log_path, lines)

    def wait(self, timeout: float) -> int | None:
        """Its exit code, or None if it is still running after `timeout` seconds."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> int:
        """SIGINT (every contender flushes and exits on it), then SIGTERM, then SIGKILL."""
        for sig, wait in ((signal.SIGINT, 15.0), (signal.SIGTERM, 5.0)):
            if not self.alive():
                break
            self.proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait)
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # its group: pypmml's JVM too
            self.proc.wait()
        self._log.close()
        return self.proc.returncode


# --- live input ------------------------------------------------------------------------


class PacedProducer(threading.Thread):
    """Writes records at a fixed rate with event_time_ms = now, in a thread.

    Remembers each record's event time, and where each landed (partition, offset).
    """

    def __init__(self, bench: Bench, topic: str, rate: float, *, linger_ms: int = 5) -> None:
        super().__init__(name=f"paced-{topic}", daemon=True)
        self.bench = bench
        self.topic = topic
        self.rate = rate
        # Same producer settings as the contenders; 5 ms linger as tansu needs.
        self.producer = Producer(kafka_settings(bench.config, **{"linger.ms": linger_ms}))
        self.event_times: list[int] = []  # by record id
        self.positions: list[tuple[int, int]] = []  # delivered (partition, offset)
        self.failed = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.positions.append((msg.partition() or 0, msg.offset() or 0))
        else:
            self.failed += 1

    def run(self) -> None:
        pacer = Pacer(self.rate)
        try:
            while not self._halt.is_set():
                pacer.wait()
                i = len(self.event_times)
                now_ms = time.time_ns() // 1_000_000
                key, value, headers = self.bench.records.message(i, now_ms)
                self.event_times.append(now_ms)
                while True:
                    try:
                        self.producer.produce(
                            self.topic, value, key, headers=headers, on_delivery=self._delivered
                        )
                        break
                    except BufferError:
                        self.producer.poll(0.01)
                self.producer.poll(0)
            self.producer.flush(30)
        except BaseException as exc:  # reported by the harness
            self.error = exc

    def stop(self) -> None:
        """Stop producing; returns once everything produced is delivered."""
        self._halt.set()
        self.join()
        if self.error is not None:
            raise RunFailed(f"the paced producer failed: {self.error!r}")


# --- reading outputs ---------------------------------------------------------------------


@dataclasses.dataclass
class Output:
    """One output message, decoded."""

    ts_ms: int  # the Kafka timestamp: when the contender produced it
    record_id: str
    event_time_ms: int
    score: float
    scored: pb.ScoredRecord | None = None

    @property
    def label(self) -> str:
        """A classifier's label (scored records only)."""
        return self.scored.label if self.scored is not None else ""


def decode(kind: str, msg: Message) -> Output:
    """An output message of a "json" or "scored" contender."""
    value = msg.value() or b""
    ts_ms = msg.timestamp()[1]
    if kind == "scored":
        scored = pb.ScoredRecord.FromString(value)
        return Output(ts_ms, scored.record_id, scored.event_time_ms, scored.value, scored)
    doc = orjson.loads(value)
    return Output(ts_ms, doc["record_id"], doc["event_time_ms"], doc.get("score", math.nan))


class TopicReader:
    """Reads topics from the beginning of every partition (no group), knowing when it has
    reached the end of all of them."""

    def __init__(self, config: Config, topics: Iterable[str], *, fetch_wait_ms: int = 20) -> None:
        self.consumer = Consumer(
            kafka_settings(
                config,
                **{
                    "group.id": f"bench-reader-{uuid.uuid4().hex[:8]}",
                    "enable.auto.commit": False,
                    "enable.partition.eof": True,
                    "fetch.wait.max.ms": fetch_wait_ms,
                    "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,
                },
            )
        )
        assignment = []
        for topic in topics:
            metadata = self.consumer.list_topics(topic, timeout=10).topics[topic]
            assignment += [
                KafkaTopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(metadata.partitions)
            ]
        self.consumer.assign(assignment)
        self._partitions = {(tp.topic, tp.partition) for tp in assignment}
        self._at_end: set[tuple[str, int]] = set()

    def poll(self, timeout: float = 0.1) -> list[Message]:
        """What arrived within `timeout` seconds (up to 10,000 messages)."""
        out = []
        for msg in self.consumer.consume(10_000, timeout):
            err = msg.error()
            where = (msg.topic() or "", msg.partition() or 0)
            if err is None:
                self._at_end.discard(where)
                out.append(msg)
            elif err.code() == KafkaError._PARTITION_EOF:
                self._at_end.add(where)
            elif err.fatal():
                raise RunFailed(f"reading outputs: {err}")
        return out

    @property
    def at_end(self) -> bool:
        """Whether every partition has been read to its end."""
        return self._at_end >= self._partitions

    def read_to_end(self, timeout: float = 120.0) -> list[Message]:
        """Everything in the topics now (their writer has stopped)."""
        deadline = time.monotonic() + timeout
        out: list[Message] = []
        while not self.at_end:
            if time.monotonic() > deadline:
                raise RunFailed(f"could not read the outputs to their end in {timeout:g} s")
            out += self.poll(0.2)
        return out

    def close(self) -> None:
        """Leave."""
        self.consumer.close()


# --- the bench ---------------------------------------------------------------------------


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Bench:
    """One broker, the shared input topic, and the runs against them."""

    def __init__(
        self, broker: Broker, settings: Settings, work_dir: Path, progress: Progress
    ) -> None:
        self.broker = broker
        self.settings = settings
        self.work_dir = work_dir
        self.say = progress
        self.config = dataclasses.replace(Config(), brokers=broker.bootstrap)
        self.catalog: dict[str, CatalogEntry] = load_catalog()
        self._feeds: dict[str, Feed] = {}
        self._references: dict[tuple[str, str], Reference] = {}
        self.records = self.feed(SHARED_INPUT)
        """The peers' input, also the live input of the latency, swap and soak runs."""
        self.run_id = uuid.uuid4().hex[:6]
        self.input_topics: dict[str, str] = {}  # input format -> its filled topic
        # Inputs without record ids (CSV): per topic and partition, the record number at
        # each offset (arrays: a dict of 200,000 tuples would live in every GC pass).
        self.positions: dict[tuple[str, int], np.ndarray] = {}
        self.quix_python: Path | None = None
        self._topic_seq = 0

    @property
    def input_topic(self) -> str:
        """The shared input topic (JSON wine records), once filled."""
        return self.input_topics[SHARED_INPUT]

    def feed(self, name: str) -> Feed:
        """The records of an input format (RunFailed when its files are not there)."""
        feed = self._feeds.get(name)
        if feed is None:
            try:
                feed = self._feeds[name] = Feed(INPUTS[name])
            except (OSError, KeyError, ValueError) as exc:
                raise RunFailed(
                    f"input {name} cannot be built: {type(exc).__name__}: {exc}"
                ) from None
        return feed

    def reference(self, contender: Contender) -> Reference | None:
        """What the contender's model scores for each data row of its input (ONNX only)."""
        entry = self.catalog[contender.model]
        if entry.format != "onnx":
            return None
        key = (contender.input, contender.model)
        if key not in self._references:
            self._references[key] = self.feed(contender.input).reference(entry)
        return self._references[key]

    # --- topics ------------------------------------------------------------------------

    def topic(self, name: str, partitions: int) -> str:
        """A fresh, empty topic."""
        self._topic_seq += 1
        topic = f"bench-{self.run_id}-{self._topic_seq:03d}-{name}"
        ensure_topic(self.config, topic, partitions)
        return topic

    def delete_topics(self, topics: Iterable[str]) -> None:
        """Drop topics no longer needed (keeps the broker's memory and metadata small)."""
        topics = list(topics)
        if not topics:
            return
        admin = AdminClient(kafka_settings(self.config))
        for future in admin.delete_topics(topics, operation_timeout=10).values():
            with contextlib.suppress(Exception):  # a leftover topic costs nothing much
                future.result(timeout=15)

    def fill_inputs(self, names: Iterable[str]) -> dict[str, str]:
        """Write the input topics of these formats, `settings.records` records each, as fast
        as the broker takes them; an input that cannot be built or written is left out, with why."""
        failed = {}
        for name in dict.fromkeys(names):
            try:
                self.fill_input(name)
            except RunFailed as exc:
                failed[name] = str(exc)
        return failed

    def fill_input(self, name: str) -> str:
        """Write one input format's topic; its name."""
        feed = self.feed(name)
        topic = f"bench-{self.run_id}-input-{name}"
        ensure_topic(self.config, topic, self.settings.partitions)
        producer = Producer(
            kafka_settings(
                self.config,
                **{
                    "linger.ms": 20,
                    "batch.num.messages": 10_000,
                    "queue.buffering.max.messages": 1_000_000,
                },
            )
        )
        delivered = 0
        first_error = ""
        record_positions = not feed.carries_ids
        written: dict[int, tuple[list[int], list[int]]] = {}  # partition -> offsets, numbers

        def report(err: KafkaError | None, msg: Message) -> None:
            nonlocal delivered, first_error
            if err is not None:
                first_error = first_error or f"{err.name()}: {err.str()}"
                return
            delivered += 1
            if record_positions:
                offsets, numbers = written.setdefault(msg.partition() or 0, ([], []))
                offsets.append(msg.offset() or 0)
                numbers.append(int(msg.key() or b""))

        for key, value, headers in feed.messages(0, self.settings.records, _now_ms()):
            while True:
                try:
                    producer.produce(topic, value, key, headers=headers, on_delivery=report)
                    break
                except BufferError:
                    producer.poll(0.01)
        producer.flush(120)
        if delivered != self.settings.records:
            raise RunFailed(
                f"only {delivered} of {self.settings.records} input records were "
                f"delivered to {topic} ({first_error or 'no error reported'})"
            )
        for partition, (offsets, numbers) in written.items():
            at = np.full(max(offsets) + 1, -1, dtype=np.int64)
            at[offsets] = numbers
            self.positions[(topic, partition)] = at
        self.input_topics[name] = topic
        return topic

    # --- starting contenders -----------------------------------------------------------

    def waxserve_config(
        self, records_topic: str, partitions: int, data_type: str = "wine"
    ) -> Config:
        """Fresh output and control topics for one waxserve run, created. The records topic
        defaults to `data_type` (the records name it in a header too)."""
        self._topic_seq += 1
        prefix = f"bench-{self.run_id}-{self._topic_seq:03d}-wax"
        config = dataclasses.replace(
            self.config,
            records_topics=f"{records_topic}={data_type}",
            control_topic=f"{prefix}-control",
            scored_topic=f"{prefix}-scored",
            stats_topic=f"{prefix}-stats",
            drift_topic=f"{prefix}-drift",
            events_topic=f"{prefix}-events",
            dlq_topic=f"{prefix}-dlq",
            marker_topic=f"{prefix}-markers",
        )
        create_topics(config, partitions)
        return config

    @staticmethod
    def waxserve_topics(config: Config) -> list[str]:
        """The topics of a waxserve run, but its records topic."""
        return [config.control_topic, *config.output_topics]

    def _env(self) -> dict[str, str]:
        # Ours only: a WAXSERVE_* setting of the caller's must not change what is measured.
        return {k: v for k, v in os.environ.items() if not k.startswith(("WAXSERVE_", "BENCH_"))}

    def launch(
        self,
        contender: Contender,
        input_topic: str,
        output: str | Config,
        *,
        stop_after: int | None,
        tag: str,
        extra_env: dict[str, str] | None = None,
    ) -> ContenderProcess:
        """Start a contender on `input_topic`; `output` is its topic (report file for
        "consume"), or for waxserve its Config. `stop_after`: exit after that many records
        (waxserve and Bytewax: at the end of the input); None: tail until stopped."""
        env = self._env()
        log_path = self.work_dir / f"{tag}.log"
        brokers = self.config.brokers
        model = str(self.catalog[contender.model].path()) if contender.model else ""
        common = ["--brokers", brokers, "--input", input_topic]
        if stop_after is not None:
            common += ["--stop-after", str(stop_after)]
        if contender.kind == "waxserve":
            assert isinstance(output, Config)
            command = [sys.executable, "-m", "bytewax.run", "dataflows.serving:flow"]
            env.update(waxserve_env(output))
            # See FETCH_QUEUE_BACKOFF_MS: the same tansu work-around as every contender.
            env["WAXSERVE_KAFKA_FETCH_QUEUE_BACKOFF_MS"] = str(FETCH_QUEUE_BACKOFF_MS)
            env["WAXSERVE_STOP_AT_END"] = "1" if stop_after is not None else "0"
            # Queryable state stays on, on a port of its own (3040 may be taken).
            env["WAXSERVE_STATE_ADDR"] = f"127.0.0.1:{free_port()}"
            env["WAXSERVE_MONITORING"] = "1" if contender.monitoring else "0"
            # An ONNX-only deployment starts no JVM (`WAXSERVE_PMML=off`: it would cost
            # ~120 MB of RSS and a second of start-up); a PMML contender's JVM starts with
            # the process, as by default.
            pmml = self.catalog[contender.model].format.lower() == "pmml"
            env["WAXSERVE_PMML"] = "auto" if pmml else "off"
        elif contender.kind == "bytewax":
            command = [
                sys.executable,
                "-m",
                "bytewax.run",
                "bench.contenders.bytewax_idiomatic:flow",
            ]
            env.update(
                BENCH_BROKERS=brokers,
                BENCH_INPUT=input_topic,
                BENCH_OUTPUT=str(output),
                BENCH_MODEL=model,
                BENCH_TAIL="0" if stop_after is not None else "1",
            )
        elif contender.kind == "consume":
            command = [sys.executable, "-m", "bench.contenders.consume_only", *common]
            command += ["--report", str(output)]
        else:
            python = sys.executable
            module = f"bench.contenders.{contender.module}"
            if contender.kind == "quix":
                if self.quix_python is None:
                    raise RunFailed("Quix Streams is not installed")
                python, module = str(self.quix_python), "bench.contenders.quix_app"
            command = [python, "-m", module, *common, "--output", str(output)]
            if model:
                command += ["--model", model]
        return ContenderProcess(command, env | dict(contender.env) | (extra_env or {}), log_path)

    def publish_contract(self, config: Config, contract: Contract) -> None:
        """Publish a data type's contract: before the first model of the data type."""
        send_control(config, contract.to_proto())

    def publish(
        self, config: Config, model: str, version: str | None = None, data_type: str = ""
    ) -> int:
        """Publish a catalog model's descriptor (for `data_type`, default the catalog's);
        its Kafka timestamp (ms)."""
        descriptor = self.catalog[model].descriptor(version=version)
        if data_type:
            descriptor.data_type = data_type
        return send_control(config, descriptor).timestamp()[1]

    def start_serving(
        self, config: Config, contender: Contender, version: str | None = None
    ) -> int:
        """Publish the contract of the contender's input and its model; the model's Kafka
        timestamp (ms)."""
        feed = self.feed(contender.input)
        self.publish_contract(config, feed.contract)
        return self.publish(config, contender.model, version, feed.contract.data_type)

    # --- throughput --------------------------------------------------------------------

    def throughput_run(self, contender: Contender, rep: int) -> dict[str, Any]:
        """One pass of a contender over its input topic; its figures."""
        expected = self.settings.records
        if contender.max_records is not None:
            expected = min(expected, contender.max_records)
        input_topic = self.input_topics.get(contender.input)
        if input_topic is None:
            raise RunFailed(f"its input {contender.input} was not written")
        tag = f"throughput-{contender.name}-{rep}"
        topics: list[str] = []
        output: str | Config
        if contender.kind == "waxserve":
            data_type = self.feed(contender.input).contract.data_type
            output = self.waxserve_config(input_topic, self.settings.partitions, data_type)
            topics = self.waxserve_topics(output)
            self.start_serving(output, contender)
        elif contender.kind == "consume":
            output = str(self.work_dir / f"{tag}.json")
        else:
            output = self.topic(contender.name, self.settings.partitions)
            topics = [output]
        # Bytewax and waxserve stop at the end of the input, the others after N records.
        process = self.launch(contender, input_topic, output, stop_after=expected, tag=tag)
        sampler = CpuSampler(process.pid).start()
        broker_cpu = CpuSampler(self.broker.pid or 0, tree=False).start()
        try:
            timeout = 90 + expected / 2000
            code = process.wait(timeout)
            ended = time.time()
            if code is None:
                process.stop()
                raise RunFailed(f"did not finish within {timeout:.0f} s: {process.tail()}")
            if code != 0:
                raise RunFailed(f"exited with code {code}: {process.tail()}")
        finally:
            sampler.stop()
            broker_cpu.stop()
            process.stop()
        try:
            if contender.kind == "consume":
                return self._consume_figures(Path(str(output)), expected, process, sampler)
            outputs, extra = self._read_outputs(contender, output)
            figures = self._throughput_figures(
                contender, outputs, expected, process, sampler, broker_cpu, extra
            )
            # Outputs are timed when produced: a long flush after the last one would mean
            # that they were produced faster than delivered.
            figures["exit_after_last_output_s"] = ended - figures.pop("last_ms") / 1000
            return figures
        finally:
            self.delete_topics(topics)

    def _read_outputs(
        self, contender: Contender, output: str | Config
    ) -> tuple[list[Output], dict[str, Any]]:
        extra: dict[str, Any] = {}
        if isinstance(output, Config):
            reader = TopicReader(self.config, [output.scored_topic])
            dlq = TopicReader(self.config, [output.dlq_topic])
            try:
                extra["dead_letters"] = len(dlq.read_to_end())
            finally:
                dlq.close()
        else:
            reader = TopicReader(self.config, [output])
        try:
            messages = reader.read_to_end()
        finally:
            reader.close()
        return [decode(contender.output, m) for m in messages], extra

    def _throughput_figures(
        self,
        contender: Contender,
        outputs: list[Output],
        expected: int,
        process: ContenderProcess,
        sampler: CpuSampler,
        broker_cpu: CpuSampler,
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        if not outputs:
            raise RunFailed(f"wrote no output: {process.tail()}")
        distinct = len({o.record_id for o in outputs})
        first_ms = min(o.ts_ms for o in outputs)
        last_ms = max(o.ts_ms for o in outputs)
        cpu = sampler.between(first_ms / 1000, last_ms / 1000)
        broker_s = broker_cpu.between(first_ms / 1000, last_ms / 1000)
        figures: dict[str, Any] = {
            "records": distinct,
            "expected": expected,
            "missing": expected - distinct,
            "duplicates": len(outputs) - distinct,
            "span_s": (last_ms - first_ms) / 1000,
            "throughput": throughput(distinct, first_ms, last_ms),
            "cpu_s_per_100k": cpu / distinct * 100_000,
            "broker_cpu_s_per_100k": broker_s / distinct * 100_000,
            "startup_s": first_ms / 1000 - process.started,
            "last_ms": last_ms,
            **extra,
        }
        figures.update(self._score_check(contender, outputs))
        return figures

    def _row_numbers(self, contender: Contender, outputs: list[Output]) -> np.ndarray:
        """The record number of every output: its record id, or for inputs without ids
        (CSV) where its source record was written."""
        if self.feed(contender.input).carries_ids:
            return np.array([int(o.record_id) for o in outputs], dtype=np.int64)
        positions = self.positions
        return np.array(
            [
                positions[(s.source_topic, s.source_partition)][s.source_offset]
                for s in (o.scored for o in outputs)
                if s is not None
            ],
            dtype=np.int64,
        )

    def _score_check(self, contender: Contender, outputs: list[Output]) -> dict[str, Any]:
        """How far the scores are from onnxruntime's on the same rows (ONNX models); for a
        classifier, how many labels differ."""
        if contender.kind == "consume" or not contender.model:
            return {}
        rows = self._row_numbers(contender, outputs) % len(self.feed(contender.input))
        reference = self.reference(contender)
        if reference is not None and reference.labels is not None:
            labels = [o.label for o in outputs]
            wrong = sum(
                x != reference.labels[r] for x, r in zip(labels, rows.tolist(), strict=True)
            )
            return {"label_mismatches": wrong}
        scores = np.array([o.score for o in outputs], dtype=np.float64)
        check: dict[str, Any] = {"scores_finite": bool(np.isfinite(scores).all())}
        if reference is not None and reference.values is not None:
            check["max_abs_error"] = float(np.max(np.abs(scores - reference.values[rows])))
        else:
            # No onnxruntime reference (PMML): `bench.run` compares contenders row by row.
            check["row_scores"] = dict(zip(rows.tolist(), scores.tolist(), strict=True))
        return check

    def _consume_figures(
        self, report: Path, expected: int, process: ContenderProcess, sampler: CpuSampler
    ) -> dict[str, Any]:
        arrivals = json.loads(report.read_text())["arrivals"]
        if not arrivals:
            raise RunFailed(f"consumed nothing: {process.tail()}")
        distinct = len({a[0] for a in arrivals})
        first_ms = min(a[2] for a in arrivals)
        last_ms = max(a[2] for a in arrivals)
        cpu = sampler.between(first_ms / 1000, last_ms / 1000)
        return {
            "records": distinct,
            "expected": expected,
            "missing": expected - distinct,
            "duplicates": len(arrivals) - distinct,
            "span_s": (last_ms - first_ms) / 1000,
            "throughput": throughput(distinct, first_ms, last_ms),
            "cpu_s_per_100k": cpu / distinct * 100_000,
            "startup_s": first_ms / 1000 - process.started,
        }

    # --- latency -----------------------------------------------------------------------

    def latency_run(self, contender: Contender, rep: int) -> dict[str, Any]:
        """A contender tailing a fresh topic written at `settings.rate`: end-to-end latency."""
        tag = f"latency-{contender.name}-{rep}"
        partitions = self.settings.live_partitions
        input_topic = self.topic("latency-input", partitions)
        topics = [input_topic]
        output: str | Config
        read_topics: list[str] = []
        if contender.kind == "waxserve":
            output = self.waxserve_config(input_topic, partitions)
            topics += self.waxserve_topics(output)
            read_topics = [output.scored_topic]
            self.start_serving(output, contender)
        elif contender.kind == "consume":
            output = str(self.work_dir / f"{tag}.json")
        else:
            output = self.topic(contender.name, partitions)
            topics.append(output)
            read_topics = [output]
        process = self.launch(contender, input_topic, output, stop_after=None, tag=tag)
        sampler = CpuSampler(process.pid, interval_s=0.1).start()
        broker_cpu = CpuSampler(self.broker.pid or 0, interval_s=0.1, tree=False).start()
        # Few fetches: the reader adds load to the broker, but not latency (timestamps are the
        # contender's).
        reader = TopicReader(self.config, read_topics, fetch_wait_ms=100) if read_topics else None
        producer = PacedProducer(self, input_topic, self.settings.rate)
        seen: dict[str, Output] = {}
        ready = Path(f"{output}.ready")

        def pump(seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                if reader is None:
                    time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
                    continue
                for msg in reader.poll(min(0.05, max(0.0, deadline - time.monotonic()))):
                    out = decode(contender.output, msg)
                    seen.setdefault(out.record_id, out)

        try:
            producer.start()
            deadline = time.monotonic() + 90
            while not (seen if reader is not None else ready.exists()):
                process.check_alive()
                if time.monotonic() > deadline:
                    raise RunFailed(f"no output within 90 s: {process.tail()}")
                pump(0.1)
            ready_s = time.time() - process.started
            pump(self.settings.warmup_s)
            start_ms = _now_ms()
            pump(self.settings.latency_s)
            end_ms = _now_ms()
            producer.stop()
            measured = [
                str(i) for i, t in enumerate(producer.event_times) if start_ms <= t < end_ms
            ]
            if reader is None:
                time.sleep(1.0)  # the plain consumer reports only when stopped: let it catch up
            drain = time.monotonic() + 10
            while reader is not None and time.monotonic() < drain:
                if all(i in seen for i in measured):
                    break
                pump(0.1)
            process.check_alive()
        finally:
            if producer.is_alive():
                with contextlib.suppress(RunFailed):
                    producer.stop()
            if reader is not None:
                reader.close()
            sampler.stop()
            broker_cpu.stop()
            process.stop()
        try:
            if contender.kind == "consume":
                arrivals = json.loads(Path(str(output)).read_text())["arrivals"]
                for record_id, event_ms, arrival_ms in arrivals:
                    # Kafka timestamps are whole ms (truncated): truncate arrivals the same way.
                    seen.setdefault(record_id, Output(int(arrival_ms), record_id, event_ms, 0.0))
            latencies = [seen[i].ts_ms - seen[i].event_time_ms for i in measured if i in seen]
            span_s = max(1e-3, (end_ms - start_ms) / 1000)
            if not latencies:
                raise RunFailed(f"none of the {len(measured)} measured records came out")
            return {
                "records": len(latencies),
                "missing": len(measured) - len(latencies),
                "rate": len(measured) / span_s,
                "p50_ms": percentile(latencies, 50),
                "p99_ms": percentile(latencies, 99),
                "max_ms": float(max(latencies)),
                "mean_ms": float(np.mean(latencies)),
                "ready_s": ready_s,
                # Shares of one core over the measured span: the broker's tells when it,
                # not the contender, is the bottleneck.
                "cpu_share": sampler.between(start_ms / 1000, end_ms / 1000) / span_s,
                "broker_cpu_share": broker_cpu.between(start_ms / 1000, end_ms / 1000) / span_s,
            }
        finally:
            self.delete_topics(topics)

    # --- model swap --------------------------------------------------------------------

    def swap_run(
        self,
        swaps: int,
        interval_s: float,
        models: tuple[str, str],
        *,
        first: str | None = None,
        tag: str = "swap",
        extra_env: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """waxserve live at `settings.rate` while `swaps` descriptors alternate between two
        models, each under a version of its own; publish -> first record it scored, and
        how long records waited meanwhile. `first` serves before the swaps (default
        `models[0]`): an ONNX model there makes the first PMML swap the process's first
        PMML model."""
        input_topic = self.topic(f"{tag}-input", self.settings.live_partitions)
        config = self.waxserve_config(input_topic, self.settings.live_partitions)
        topics = [input_topic, *self.waxserve_topics(config)]
        self.publish_contract(config, self.records.contract)
        self.publish(config, first or models[0], version="swap-000")
        contender = CONTENDERS["waxserve-lr"]
        process = self.launch(
            contender, input_topic, config, stop_after=None, tag=tag, extra_env=extra_env
        )
        reader = TopicReader(
            self.config,
            [config.scored_topic, config.dlq_topic, config.events_topic],
            fetch_wait_ms=100,
        )
        producer = PacedProducer(self, input_topic, self.settings.rate)
        scored: list[tuple[int, int, str, int]] = []  # partition, offset, version, ts
        versions_scored: set[str] = set()
        waits: list[tuple[int, int]] = []  # event time, scored ts - event time (ms)
        dead: list[tuple[int, int]] = []
        installed: dict[str, int] = {}  # version -> at_ms
        published: dict[str, int] = {}  # version -> ts of the descriptor message

        def pump(seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while True:
                remaining = deadline - time.monotonic()
                for msg in reader.poll(min(0.05, max(0.0, remaining))):
                    topic = msg.topic()
                    if topic == config.scored_topic:
                        rec = pb.ScoredRecord.FromString(msg.value() or b"")
                        ts = msg.timestamp()[1]
                        scored.append(
                            (rec.source_partition, rec.source_offset, rec.model_version, ts)
                        )
                        versions_scored.add(rec.model_version)
                        waits.append((rec.event_time_ms, ts - rec.event_time_ms))
                    elif topic == config.dlq_topic:
                        headers = {k: str(v, "utf-8") for k, v in header_pairs(msg) if v}
                        if headers.get("waxserve.source.topic") == input_topic:
                            dead.append(
                                (
                                    int(headers["waxserve.source.partition"]),
                                    int(headers["waxserve.source.offset"]),
                                )
                            )
                    elif topic == config.events_topic:
                        event = pb.ModelEvent.FromString(msg.value() or b"")
                        if event.kind == "installed":
                            installed.setdefault(event.model_version, event.at_ms)
                if remaining <= 0:
                    return

        try:
            producer.start()
            deadline = time.monotonic() + 90
            while not scored:
                process.check_alive()
                if time.monotonic() > deadline:
                    raise RunFailed(f"no output within 90 s: {process.tail()}")
                pump(0.1)
            pump(self.settings.warmup_s)
            for k in range(1, swaps + 1):
                version = f"swap-{k:03d}"
                published[version] = self.publish(config, models[k % 2], version=version)
                pump(interval_s)
                # The next swap once this one has scored (30 s at most): published while
                # it still loads, the next one replaces it and it never serves, which is
                # right, but measures nothing (seen with the first PMML model of a process
                # on a busy machine, 0.3 s apart).
                patience = time.monotonic() + 30
                while version not in versions_scored:
                    if time.monotonic() > patience:
                        break
                    pump(0.05)
                process.check_alive()
            pump(1.0)
            producer.stop()
            positions = set(producer.positions)
            drain = time.monotonic() + 15
            while time.monotonic() < drain:
                if positions <= {(p, o) for p, o, _, _ in scored} | set(dead):
                    break
                pump(0.2)
        finally:
            if producer.is_alive():
                with contextlib.suppress(RunFailed):
                    producer.stop()
            reader.close()
            process.stop()
        self.delete_topics(topics)

        first_scored: dict[str, int] = {}
        for _, _, version, ts in scored:
            if version not in first_scored or ts < first_scored[version]:
                first_scored[version] = ts
        visible = {
            v: (first_scored[v] - t) if v in first_scored else None for v, t in published.items()
        }
        # How long records waited while a model loaded: those made between a descriptor's
        # publication and its first scored record, from their event time to their scoring.
        while_loading: dict[str, float | None] = {}
        for v, t in published.items():
            end = first_scored.get(v)
            during = [w for e, w in waits if end is not None and t <= e <= end]
            while_loading[v] = float(max(during)) if during else None
        latencies = [w for _, w in waits]
        scored_positions = [(p, o) for p, o, _, _ in scored]
        distinct = set(scored_positions)
        accounted = distinct | set(dead)
        return {
            "swaps": swaps,
            "interval_s": interval_s,
            "models": list(models),
            "visible_ms": visible,
            "installed_ms": {
                v: (installed[v] - t) if v in installed else None for v, t in published.items()
            },
            "models_published": {f"swap-{k:03d}": models[k % 2] for k in range(1, swaps + 1)},
            "wait_while_loading_ms": while_loading,
            "latency_p50_ms": percentile(latencies, 50),
            "latency_max_ms": float(max(latencies)) if latencies else math.nan,
            "sent": len(positions),
            "scored": len(distinct),
            "dead_lettered": len(set(dead)),
            "lost": len(positions - accounted),
            "duplicates": len(scored_positions) - len(distinct),
            "order_violations": _order_violations(scored),
            "delivery_failures": producer.failed,
        }

    # --- soak --------------------------------------------------------------------------

    def soak_run(
        self, duration_s: float, rate: float, warmup_s: float, sample_s: float
    ) -> dict[str, Any]:
        """waxserve at `rate` for `duration_s`: its resident set every `sample_s` seconds."""
        input_topic = self.topic("soak-input", self.settings.live_partitions)
        config = self.waxserve_config(input_topic, self.settings.live_partitions)
        topics = [input_topic, *self.waxserve_topics(config)]
        contender = CONTENDERS["waxserve-lr"]
        self.start_serving(config, contender)
        process = self.launch(
            contender, input_topic, config, stop_after=None, tag="soak", extra_env=SOAK_ENV
        )
        sampler = CpuSampler(process.pid, interval_s=1.0).start()
        broker_cpu = CpuSampler(self.broker.pid or 0, interval_s=1.0, tree=False).start()
        reader = TopicReader(self.config, [config.scored_topic], fetch_wait_ms=100)
        producer = PacedProducer(self, input_topic, rate, linger_ms=SOAK_LINGER_MS)
        samples: list[dict[str, Any]] = []
        scored = 0
        window: list[int] = []
        try:
            producer.start()
            started = time.monotonic()
            next_sample = started
            while True:
                now = time.monotonic()
                if now >= next_sample:
                    process.check_alive()
                    rss = sum(rss_bytes(p) for p in process_tree(process.pid))
                    wall = time.time()
                    sample = {
                        "t_s": round(now - started, 1),
                        "rss_mb": rss / 2**20,
                        "sent": len(producer.event_times),
                        "scored": scored,
                        "p50_ms": percentile(window, 50),
                        "p99_ms": percentile(window, 99),
                        # Shares of one core over the last interval: who is the bottleneck.
                        "cpu_share": sampler.between(wall - sample_s, wall) / sample_s,
                        "broker_cpu_share": broker_cpu.between(wall - sample_s, wall) / sample_s,
                    }
                    samples.append(sample)
                    window = []
                    self.say(
                        f"  soak {sample['t_s']:6.0f} s  RSS {sample['rss_mb']:7.1f} MB  "
                        f"sent {sample['sent']:,}  scored {scored:,}  "
                        f"p50 {sample['p50_ms']:.0f} ms  p99 {sample['p99_ms']:.0f} ms  "
                        f"CPU {sample['cpu_share']:.0%}  broker {sample['broker_cpu_share']:.0%}"
                    )
                    next_sample += sample_s
                    if now - started >= duration_s:
                        break
                for msg in reader.poll(0.05):
                    scored += 1
                    window.append(
                        msg.timestamp()[1]
                        - pb.ScoredRecord.FromString(msg.value() or b"").event_time_ms
                    )
            producer.stop()
            # The last records are in flight: wait for them, so that sent == scored checks.
            drain = time.monotonic() + 15
            while scored < len(producer.positions) and time.monotonic() < drain:
                scored += len(reader.poll(0.1))
        finally:
            if producer.is_alive():
                with contextlib.suppress(RunFailed):
                    producer.stop()
            reader.close()
            sampler.stop()
            broker_cpu.stop()
            process.stop()
        self.delete_topics(topics)
        base = next((s for s in samples if s["t_s"] >= warmup_s), samples[0])
        end = samples[-1]
        return {
            "duration_s": duration_s,
            "rate": rate,
            "warmup_s": warmup_s,
            "sample_s": sample_s,
            "rss_start_mb": base["rss_mb"],
            "rss_end_mb": end["rss_mb"],
            "rss_max_mb": max(s["rss_mb"] for s in samples),
            "growth_pct": (end["rss_mb"] - base["rss_mb"]) / base["rss_mb"] * 100,
            "sent": len(producer.positions),
            "scored": scored,
            "drained": True,  # sent and scored are counted after the last records came out
            "samples": samples,
        }


def _order_violations(scored: list[tuple[int, int, str, int]]) -> int:
    """Records scored by an older model than an earlier record of the same partition."""
    violations = 0
    by_partition: dict[int, list[tuple[int, str]]] = {}
    for partition, offset, version, _ in scored:
        by_partition.setdefault(partition, []).append((offset, version))
    for records in by_partition.values():
        newest = ""
        for _, version in sorted(set(records)):
            if version < newest:  # "swap-007" < "swap-008": versions sort in publish order
                violations += 1
            newest = max(newest, version)
    return violations


def waxserve_env(config: Config) -> dict[str, str]:
    """WAXSERVE_* variables that point a dataflow at `config`'s brokers and topics."""
    env = {"WAXSERVE_BROKERS": config.brokers, "WAXSERVE_RECORDS_TOPICS": config.records_topics}
    for field in dataclasses.fields(config):
        if field.name.endswith("_topic"):
            env[f"WAXSERVE_{field.name.upper()}"] = getattr(config, field.name)
    return env


# --- Quix Streams' virtual environment ---------------------------------------------------


def ensure_quix_venv(progress: Progress) -> tuple[Path | None, str]:
    """bench/.venv-quix with Quix Streams installed: its python, or None and the reason."""
    python = QUIX_VENV / "bin" / "python"
    marker = QUIX_VENV / ".bench-requirements"
    wanted = "\n".join(QUIX_REQUIREMENTS)
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python, ""
    progress(f"installing Quix Streams into {QUIX_VENV.relative_to(REPO)} (once)")
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", "--clear", str(QUIX_VENV)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                *QUIX_REQUIREMENTS,
            ],
            check=True,
            capture_output=True,
            timeout=600,
        )
        subprocess.run(
            [str(python), "-c", "import quixstreams, onnxruntime, numpy, orjson"],
            check=True,
            capture_output=True,
            timeout=120,
        )
    except subprocess.CalledProcessError as exc:
        lines = (exc.stderr or b"").decode(errors="replace").strip().splitlines()
        errors = [line for line in lines if "ERROR" in line] or lines or ["no output"]
        return None, f"not installed: {errors[-1][:300]}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"not installed: {exc}"
    marker.write_text(wanted)
    return python, ""


def quix_versions(python: Path) -> dict[str, str]:
    """Package versions in the Quix venv."""
    code = (
        "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
        "('quixstreams', 'confluent-kafka', 'onnxruntime', 'numpy')}))"
    )
    try:
        done = subprocess.run(
            [str(python), "-c", code], check=True, capture_output=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(json.loads(done.stdout))
