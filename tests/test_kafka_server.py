"""The Apache Kafka broker for tests and local runs (`dataflows.tools.kafka_server`), and
topic creation from the settings (`dataflows.tools.broker.create_topics`) on it."""

from __future__ import annotations

import base64
import dataclasses
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource

from dataflows.core.config import Config, ConfigError
from dataflows.tools import kafka_server
from dataflows.tools.broker import (
    COMPACTED_TOPIC_FIELDS,
    BrokerError,
    control_message_key,
    create_topics,
    ensure_topic,
    topic_specs,
)
from dataflows.tools.kafka_server import ApacheKafka, kafka_version, new_cluster_id, resolve_jars
from protos import waxserve_pb2 as pb

REPO = Path(__file__).resolve().parents[1]


# --- no broker needed ---------------------------------------------------------------------


def test_the_pom_pins_a_kafka_4_release() -> None:
    major, minor, patch = kafka_version().split(".")
    assert int(major) >= 4 and minor.isdigit() and patch.isdigit()


def test_cluster_ids_are_kafka_uuids() -> None:
    for _ in range(200):
        cluster_id = new_cluster_id()
        assert len(cluster_id) == 22 and not cluster_id.startswith("-")
        assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_without_maven_the_error_says_how_to_get_the_jars(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no mvn, no anything
    with pytest.raises(BrokerError, match=r"`mvn` is not on PATH.*apt-get install maven"):
        resolve_jars(cache=tmp_path / "cache", progress=None)


def test_without_java_the_error_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(BrokerError, match="needs Java 17 or newer"):
        kafka_server.java_binary()


def test_topic_specs_compact_the_control_and_marker_topics_and_keep_the_rest_by_retention() -> None:
    config = Config()
    specs = topic_specs(config, 3)
    topic_fields = [f.name for f in dataclasses.fields(Config) if f.name.endswith("_topic")]
    assert set(specs) == {config.records_topic} | {getattr(config, f) for f in topic_fields}
    control = specs[config.control_topic]
    # Descriptors carry their model: up to 64 MiB on the control topic.
    assert (control.partitions, dict(control.settings)) == (
        1,
        {"cleanup.policy": "compact", "max.message.bytes": str(64 << 20)},
    )
    # Exactly-once output: a marker partition per shard.
    assert specs[config.marker_topic].partitions == config.shards
    assert specs[config.marker_topic].settings == {"cleanup.policy": "compact"}
    assert frozenset({"control_topic", "marker_topic"}) == COMPACTED_TOPIC_FIELDS
    deleted = [getattr(config, f) for f in topic_fields if f not in COMPACTED_TOPIC_FIELDS]
    assert config.scored_topic in deleted and config.dlq_topic in deleted
    for topic in (config.records_topic, *deleted):
        assert specs[topic].partitions == 3
        assert specs[topic].settings == {"cleanup.policy": "delete", "retention.ms": "604800000"}


def test_topic_specs_follow_the_settings() -> None:
    config = dataclasses.replace(
        Config(), output_cleanup_policy="delete,compact", topic_retention_ms=-1
    )
    specs = topic_specs(config, {config.scored_topic: 6})
    assert specs[config.scored_topic].partitions == 6
    assert specs[config.dlq_topic].partitions == 4  # absent: the default
    assert specs[config.scored_topic].settings == {
        "cleanup.policy": "compact,delete",
        "retention.ms": "-1",
    }
    assert specs[config.records_topic].cleanup_policy == "delete"  # inputs never compact
    compacted = dataclasses.replace(config, output_cleanup_policy="compact")
    assert topic_specs(compacted)[config.events_topic].settings == {"cleanup.policy": "compact"}
    with pytest.raises(ConfigError, match="WAXSERVE_OUTPUT_CLEANUP_POLICY"):
        topic_specs(dataclasses.replace(config, output_cleanup_policy="forever"))
    with pytest.raises(ConfigError, match="WAXSERVE_TOPIC_RETENTION_MS"):
        topic_specs(dataclasses.replace(config, topic_retention_ms=0))
    with pytest.raises(ValueError, match="must have 1 partition"):
        topic_specs(config, {config.control_topic: 2})


def test_settings_come_from_the_environment() -> None:
    config = Config.from_env(
        {
            "WAXSERVE_TOPIC_REPLICATION_FACTOR": "3",
            "WAXSERVE_TOPIC_RETENTION_MS": "-1",
            "WAXSERVE_OUTPUT_CLEANUP_POLICY": "compact",
        }
    )
    assert (config.topic_replication_factor, config.topic_retention_ms) == (3, -1)
    assert config.output_cleanup_policy == "compact"


def test_control_keys_keep_a_contract_per_data_type_and_a_descriptor_per_model() -> None:
    contract = pb.DataContract(data_type="wine", version=2)
    lr = pb.ModelDescriptor(data_type="wine", name="wine-lr", version="3")
    gbt = pb.ModelDescriptor(data_type="wine", name="wine-gbt", version="1")
    keys = {control_message_key(m) for m in (contract, lr, gbt)}
    assert keys == {b"contract/wine", b"model/wine/wine-lr", b"model/wine/wine-gbt"}
    newer = pb.ModelDescriptor(data_type="wine", name="wine-lr", version="4")
    assert control_message_key(newer) == control_message_key(lr)  # replaces it


def test_a_replication_factor_below_one_is_refused_before_asking_a_broker() -> None:
    with pytest.raises(ConfigError, match="WAXSERVE_TOPIC_REPLICATION_FACTOR=0"):
        Config.from_env({"WAXSERVE_TOPIC_REPLICATION_FACTOR": "0"})


# --- on the session's broker --------------------------------------------------------------


@pytest.mark.integration
def test_the_session_broker_is_a_single_kraft_node(broker: ApacheKafka) -> None:
    assert broker.running and broker.pid and broker.data_dir and broker.data_dir.is_dir()
    assert broker.log_path and "Kafka Server started" in broker.log_path.read_text()
    metadata = AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(timeout=10)
    assert metadata.cluster_id == broker.cluster_id
    assert [(b.host, b.port) for b in metadata.brokers.values()] == [(broker.host, broker.port)]
    # A taken port is refused at once, before a JVM starts.
    started = time.monotonic()
    with pytest.raises(BrokerError, match="in use"):
        ApacheKafka(broker.port, progress=None).start()
    assert time.monotonic() - started < 5


@pytest.mark.integration
def test_a_transaction_commits_and_an_aborted_one_stays_invisible(broker: ApacheKafka) -> None:
    config = dataclasses.replace(Config(), brokers=broker.bootstrap)
    topic = f"transactions-{uuid.uuid4().hex[:8]}"
    ensure_topic(config, topic, 1)
    producer = Producer(
        {"bootstrap.servers": broker.bootstrap, "transactional.id": f"t-{uuid.uuid4().hex}"}
    )
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(topic, b"committed-1")
    producer.produce(topic, b"committed-2")
    producer.commit_transaction(30)
    producer.begin_transaction()
    producer.produce(topic, b"aborted")
    producer.flush(30)  # on the broker, in the log, but never committed
    producer.abort_transaction(30)
    consumer = Consumer(
        {
            "bootstrap.servers": broker.bootstrap,
            "group.id": "t",
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        values: list[bytes] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            err = msg.error()
            if err is not None and err.code() == KafkaError._PARTITION_EOF:
                break
            assert err is None, err
            values.append(msg.value() or b"")
    finally:
        consumer.close()
    assert values == [b"committed-1", b"committed-2"]


@pytest.mark.integration
def test_create_topics_applies_the_settings_and_leaves_existing_topics_alone(
    broker: ApacheKafka,
) -> None:
    suffix = uuid.uuid4().hex[:8]
    base = Config(brokers=broker.bootstrap)
    topics: dict[str, Any] = {
        f.name: f"{getattr(base, f.name)}-{suffix}"
        for f in dataclasses.fields(Config)
        if f.name.endswith("_topic")
    }
    config = dataclasses.replace(
        base,
        **topics,
        records_topics=f"records-{suffix}",
        topic_retention_ms=3_600_000,
        output_cleanup_policy="compact,delete",
    )
    infos = {i.name: i for i in create_topics(config, 2)}
    assert all(i.created and i.replication_factor == 1 for i in infos.values())
    assert infos[config.control_topic].cleanup_policy == "compact"
    assert infos[config.control_topic].partitions == 1
    assert infos[config.scored_topic].cleanup_policy == "compact,delete"
    assert infos[f"records-{suffix}"].cleanup_policy == "delete"
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    resource = ConfigResource(ConfigResource.Type.TOPIC, config.scored_topic)
    described = admin.describe_configs([resource])[resource].result(10)
    assert described["retention.ms"].value == "3600000"
    # Again, with other settings: nothing changes, nothing fails.
    again = create_topics(dataclasses.replace(config, output_cleanup_policy="delete"), 5)
    assert not any(i.created for i in again)
    assert {i.name: (i.partitions, i.cleanup_policy) for i in again} == {
        name: (info.partitions, info.cleanup_policy) for name, info in infos.items()
    }


@pytest.mark.integration
def test_a_replication_factor_the_cluster_cannot_give_is_a_clear_error(
    broker: ApacheKafka,
) -> None:
    config = dataclasses.replace(
        Config(brokers=broker.bootstrap),
        records_topics=f"records-{uuid.uuid4().hex[:8]}",
        topic_replication_factor=3,
    )
    with pytest.raises(BrokerError, match=r"(?i)cannot create topic.*replication factor"):
        create_topics(config, topics=[config.records_topic])


# --- brokers of their own -----------------------------------------------------------------


def _run_kafka(*args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAXSERVE_")}
    return subprocess.Popen(
        [sys.executable, "-m", "dataflows.tools.kafka_server", "run", "--port", "0", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _until_ready(proc: subprocess.Popen[str]) -> list[str]:
    """The lines `run` prints up to "Ctrl-C stops it."."""
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith("Ctrl-C"):
            return lines
    raise AssertionError(f"exited {proc.wait()}: {lines}\n{proc.stderr and proc.stderr.read()}")


def _value(lines: list[str], prefix: str) -> str:
    return next(line for line in lines if line.strip().startswith(prefix)).split("=", 1)[1]


def _gone(pid: int) -> bool:
    """Whether process `pid` has exited (a zombie nobody reaped has exited too)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


@pytest.mark.integration
def test_run_in_the_foreground_prints_how_to_connect_and_stops_on_ctrl_c() -> None:
    proc = _run_kafka("--secure", "--create-topics", "--partitions", "2")
    try:
        lines = _until_ready(proc)
        text = "\n".join(lines)
        bootstrap = _value(lines, "export WAXSERVE_BROKERS=")
        assert "topic waxserve-control: 1 partition(s)" in text
        topics = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics
        assert {"waxserve-control", "waxserve-records", "waxserve-scored"} <= set(topics)
        # The SASL_SSL listener's settings, ready to paste.
        exports = [line.split("export ", 1)[1] for line in lines if "export " in line]
        secure = dict(e.split("=", 1) for e in exports if e.startswith("WAXSERVE_KAFKA_"))
        assert secure["WAXSERVE_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
        ca = Path(secure["WAXSERVE_KAFKA_SSL_CA_LOCATION"])
        assert ca.read_text().startswith("-----BEGIN CERTIFICATE-----")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert not ca.exists(), "its directory is removed on exit"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.integration
def test_the_broker_dies_with_its_parent_and_a_later_start_removes_its_directory() -> None:
    proc = _run_kafka()
    try:
        lines = _until_ready(proc)
        pid_line = next(line for line in lines if line.strip().startswith("pid:"))
        jvm = int(pid_line.split()[1])
        workdir = Path(pid_line.split("log: ", 1)[1]).parent
        assert workdir.is_dir() and not _gone(jvm)
        proc.kill()  # SIGKILL: no clean-up code of the parent runs
        proc.wait()
        deadline = time.monotonic() + 60
        while not _gone(jvm):
            assert time.monotonic() < deadline, "Kafka outlived its parent"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert workdir.is_dir()  # nobody cleaned up...
    kafka_server._sweep_stale_workdirs()  # ...until the next start looks
    assert not workdir.exists()
