"""Exactly-once under kill -9: a replay, the dataflow killed at random moments and restarted.

    python -m bench.exactly_once [--brokers HOST:PORT] [--kills 20] [--records 20000]

Without --brokers it starts an Apache Kafka broker of its own (`dataflows.tools.kafka_server`).

A feeder writes wine records to two partitions at a steady rate and publishes a new model
version every few seconds (a model swap mid-stream); the dataflow runs with recovery and
`WAXSERVE_DELIVERY=exactly-once` (snapshots every second) and is killed with SIGKILL
after a random delay, `--kills` times: during start-up, steady scoring, a swap or a
snapshot, wherever the delay lands. A last run reads to the end of the inputs and stops.
Then a `read_committed` consumer reads every output topic from the beginning and counts,
per input record, its outcomes (scored or dead-lettered), and per stats and drift window
and per model event, its copies. `tests/test_exactly_once.py` runs a bounded version;
`just exactly-once` the full one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from dataflows.contracts.files import load_contract
from dataflows.core.config import Config
from dataflows.core.descriptors import catalog_contracts, control_message, load_catalog
from dataflows.tools.broker import create_topics
from dataflows.tools.kafka_server import ApacheKafka
from dataflows.tools.replay import header_pairs
from protos import waxserve_pb2 as pb

REPO = Path(__file__).resolve().parents[1]
WINE_CSV = REPO / "models" / "data" / "winequality_red.csv"
RECORD_PARTITIONS = 2
CSV_HEADERS: list[tuple[str, str | bytes | None]] = [("content-type", b"text/csv")]
SWAP_MODELS = ("wine-lr", "wine-gbt")  # ONNX: a swap is quick, the stall is not the test


@dataclasses.dataclass
class KillReport:
    """What a read_committed consumer saw after the kills."""

    records: int
    kills: int
    kill_delays_s: list[float]
    lost: int
    duplicate_records: dict[str, int]  # per output topic (scored, dlq) and across them
    duplicate_windows: dict[str, int]  # stats, drift
    duplicate_events: int
    scored: int
    dead_lettered: int
    stats_windows: int
    drift_windows: int
    events: int
    seconds: float

    @property
    def exactly_once(self) -> bool:
        """0 lost, 0 duplicates anywhere."""
        return (
            self.lost == 0
            and not any(self.duplicate_records.values())
            and not any(self.duplicate_windows.values())
            and self.duplicate_events == 0
        )


def dataflow_env(config: Config) -> dict[str, str]:
    """The WAXSERVE_* variables that make a dataflow use `config`'s brokers and topics."""
    env = {
        f"WAXSERVE_{f.name.upper()}": str(getattr(config, f.name))
        for f in dataclasses.fields(config)
        if f.name.endswith("_topic") or f.name in ("brokers", "records_topics", "shards")
    }
    env["WAXSERVE_DELIVERY"] = config.delivery
    return env


def unique_config(brokers: str, *, delivery: str, shards: int = 2) -> Config:
    """A Config with topics of its own (a run never reads another's output)."""
    suffix = uuid.uuid4().hex[:8]
    base = Config(brokers=brokers, shards=shards, delivery=delivery)
    topics: dict[str, Any] = {
        f.name: f"{getattr(base, f.name)}-{suffix}"
        for f in dataclasses.fields(base)
        if f.name.endswith("_topic")
    }
    return dataclasses.replace(base, **topics, records_topics=f"waxserve-records-{suffix}=wine")


class Feeder(threading.Thread):
    """Writes the records at `rate` a second, and a model version every `swap_every`."""

    def __init__(self, config: Config, lines: list[str], rate: float, swap_every: int) -> None:
        super().__init__(daemon=True)
        self.config = config
        self.lines = lines
        self.rate = rate
        self.swap_every = swap_every
        self.swaps = 0
        self.error: BaseException | None = None

    def publish(self, producer: Producer, body: pb.ModelDescriptor | pb.DataContract) -> None:
        value = control_message(body)
        producer.produce(self.config.control_topic, value, body.data_type.encode())

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the caller
            self.error = exc

    def _run(self) -> None:
        catalog = load_catalog()
        producer = Producer(
            {"bootstrap.servers": self.config.brokers, "linger.ms": 5, "message.max.bytes": 10**7}
        )
        contract = load_contract(catalog_contracts()["wine"])
        self.publish(producer, contract.to_proto())
        self.publish(producer, catalog[SWAP_MODELS[0]].descriptor())
        started = time.monotonic()
        topic = self.config.records_topic
        for i, line in enumerate(self.lines):
            producer.produce(
                topic, line.encode(), partition=i % RECORD_PARTITIONS, headers=CSV_HEADERS
            )
            if i and i % self.swap_every == 0:
                self.swaps += 1
                entry = catalog[SWAP_MODELS[self.swaps % 2]]
                self.publish(producer, entry.descriptor(version=f"{entry.version}.{self.swaps}"))
            if i % 100 == 99:
                producer.poll(0)
                ahead = (i + 1) / self.rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        if producer.flush(60):
            raise RuntimeError("the feeder's records were not delivered within 60 s")


def start_dataflow(
    config: Config, recovery: Path, log: Path, **env: str
) -> subprocess.Popen[bytes]:
    """The dataflow as a child process with recovery on (a snapshot every second)."""
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith("WAXSERVE_")},
        **dataflow_env(config),
        "WAXSERVE_STATS_INTERVAL_S": "1",
        "WAXSERVE_DRIFT_WINDOW_S": "2",
        "WAXSERVE_STATE_ADDR": "",
        **env,
    }
    args = ["-r", str(recovery), "-s", "1", "-b", "0"]
    with log.open("a") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "bytewax.run", "dataflows.serving:flow", *args],
            cwd=REPO,
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def read_committed(
    config: Config, topics: list[str]
) -> dict[str, list[tuple[bytes, dict[str, bytes]]]]:
    """Every committed message of `topics`, from the beginning to the end."""
    consumer = Consumer(
        {
            "bootstrap.servers": config.brokers,
            **config.kafka,
            "group.id": "exactly-once-check",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
        }
    )
    parts = []
    for topic in topics:
        info = consumer.list_topics(topic, timeout=10).topics[topic]
        parts += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in info.partitions]
    consumer.assign(parts)
    pending = {(p.topic, p.partition) for p in parts}
    seen: dict[str, list[tuple[bytes, dict[str, bytes]]]] = {t: [] for t in topics}
    deadline = time.monotonic() + 120
    while pending and time.monotonic() < deadline:
        for msg in consumer.consume(1000, 0.5):
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    pending.discard((msg.topic(), msg.partition()))
                continue
            headers = {k: v or b"" for k, v in header_pairs(msg)}
            seen[msg.topic() or ""].append((msg.value() or b"", headers))
    consumer.close()
    if pending:
        raise RuntimeError(f"no end of {sorted(pending)} within 120 s (an open transaction?)")
    return seen


def count_outcomes(
    config: Config, sent: dict[int, int], seconds: float, kills: list[float]
) -> KillReport:
    """The report: per input record its outcomes, per window and event its copies."""
    topics = [
        config.scored_topic,
        config.dlq_topic,
        config.stats_topic,
        config.drift_topic,
        config.events_topic,
    ]
    seen = read_committed(config, topics)
    scored = Counter(
        (s.source_partition, s.source_offset)
        for s in (pb.ScoredRecord.FromString(v) for v, _ in seen[config.scored_topic])
    )
    dead = Counter(
        (int(h["waxserve.source.partition"]), int(h["waxserve.source.offset"]))
        for _, h in seen[config.dlq_topic]
        if h.get("waxserve.source.topic", b"").decode() == config.records_topic
    )
    outcomes = scored + dead
    expected = {(p, o) for p, n in sent.items() for o in range(n)}
    lost = len(expected - set(outcomes))

    def window_key(m: pb.ServingStats | pb.DriftMetrics) -> tuple[str, str, str, int]:
        return (m.data_type, m.model_name, m.model_version, m.window_start_ms)

    stats = Counter(window_key(pb.ServingStats.FromString(v)) for v, _ in seen[config.stats_topic])
    drift = Counter(window_key(pb.DriftMetrics.FromString(v)) for v, _ in seen[config.drift_topic])
    events = Counter(
        (e.data_type, e.sequence)
        for e in (pb.ModelEvent.FromString(v) for v, _ in seen[config.events_topic])
        if e.sequence  # "restored" (0) reports a resume: one per restart
    )

    def extra(counts: Counter[Any]) -> int:
        return sum(c - 1 for c in counts.values() if c > 1)

    return KillReport(
        records=sum(sent.values()),
        kills=len(kills),
        kill_delays_s=[round(k, 2) for k in kills],
        lost=lost,
        duplicate_records={
            "scored": extra(scored),
            "dlq": extra(dead),
            "scored+dlq": extra(outcomes),
        },
        duplicate_windows={"stats": extra(stats), "drift": extra(drift)},
        duplicate_events=extra(events),
        scored=sum(scored.values()),
        dead_lettered=sum(dead.values()),
        stats_windows=sum(stats.values()),
        drift_windows=sum(drift.values()),
        events=sum(events.values()),
        seconds=round(seconds, 1),
    )


def run_kills(
    brokers: str,
    work: Path,
    *,
    records: int,
    kills: int,
    seed: int = 1,
    rate: float | None = None,
    max_delay_s: float = 6.0,
    delivery: str = "exactly-once",
    progress: Callable[[str], None] = print,
) -> KillReport:
    """Replay `records` wine records while killing the dataflow `kills` times; count."""
    started = time.monotonic()
    rng = random.Random(seed)
    config = unique_config(brokers, delivery=delivery)
    create_topics(config, RECORD_PARTITIONS)  # and the marker topic: a partition a shard
    recovery = work / "recovery"
    recovery.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "bytewax.recovery", str(recovery), "1"], check=True)
    log = work / "dataflow.log"
    lines = WINE_CSV.read_text().splitlines()
    replay = (lines * (records // len(lines) + 1))[:records]
    # The feed lasts about as long as the kills, so they land while records arrive.
    rate = rate or records / max(1.0, kills * (max_delay_s / 2 + 2.5))
    feeder = Feeder(config, replay, rate, swap_every=max(200, records // 8))
    feeder.start()
    delays: list[float] = []
    for k in range(kills):
        delay = rng.uniform(0.2, max_delay_s)
        flow = start_dataflow(config, recovery, log)
        time.sleep(delay)
        if flow.poll() is not None:
            raise RuntimeError(f"the dataflow exited {flow.returncode} before kill {k + 1}: {log}")
        flow.send_signal(signal.SIGKILL)
        flow.wait(30)
        delays.append(delay)
        progress(f"kill {k + 1}/{kills} after {delay:.2f} s")
    feeder.join()
    if feeder.error is not None:
        raise RuntimeError(f"the feeder failed: {feeder.error!r}")
    progress(f"last run: to the end of {records} records ({feeder.swaps} model swaps)")
    flow = start_dataflow(config, recovery, log, WAXSERVE_STOP_AT_END="true")
    if flow.wait(600) != 0:
        raise RuntimeError(f"the last run exited {flow.returncode}: {log}")
    sent = {p: len(range(p, records, RECORD_PARTITIONS)) for p in range(RECORD_PARTITIONS)}
    return count_outcomes(config, sent, time.monotonic() - started, delays)


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.exactly_once`: print the report as JSON; exit 1 unless exactly once."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--brokers", default="", help="a Kafka broker with transactions (default: start one)"
    )
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument(
        "--rate", type=float, default=None, help="records per second (default: as the kills)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--delivery", default="exactly-once", help="at-least-once shows what it fixes"
    )
    parser.add_argument("--work", type=Path, default=None, help="default: a temp directory")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="waxserve-kills-"))
    work.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        brokers = args.brokers
        if not brokers:
            print("starting Apache Kafka ...", file=sys.stderr)
            brokers = stack.enter_context(ApacheKafka(log_path=work / "kafka.log")).bootstrap
        report = run_kills(
            brokers,
            work,
            records=args.records,
            kills=args.kills,
            seed=args.seed,
            rate=args.rate,
            delivery=args.delivery,
        )
    print(json.dumps(dataclasses.asdict(report), indent=2))
    print(f"dataflow log: {work / 'dataflow.log'}", file=sys.stderr)
    return 0 if report.exactly_once else 1


if __name__ == "__main__":
    sys.exit(main())
