"""Shared fixtures: one Apache Kafka broker per test session, fresh topics per test.

`broker` is a real Apache Kafka 4.x (KRaft, one node; `dataflows.tools.kafka_server`),
started once per session (a few seconds; the first run on a machine also fetches its jars
with Maven). `kafka_config` gives each test topics of its own on it. `tansu_broker` and
`tansu_config` are the same on tansu, the embedded broker of the demo, for the smoke tests
that keep it working; `any_config` runs a test on both.

Tests that use any of them need Java and the jars (or tansu): mark them
`@pytest.mark.integration` (`pytest -m "not integration"` skips them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from dataflows.core.config import Config
from dataflows.tools.broker import EmbeddedBroker, create_topics, kafka_settings
from dataflows.tools.kafka_server import QUICK_JIT, ApacheKafka, resolve_jars

TOPIC_FIELDS = tuple(f.name for f in dataclasses.fields(Config) if f.name.endswith("_topic"))
"""The Config fields that name a topic."""

RECORDS_PARTITIONS = 2

_test_ids = itertools.count(1)

ConsumeAll = Callable[..., list[Message]]


def pytest_configure(config: pytest.Config) -> None:
    # A shell without job control starts `cmd &` with SIGINT ignored, and an ignored signal
    # stays ignored across exec: every process the tests start would then ignore the Ctrl-C
    # the Ctrl-C tests send it. Python's own handler here makes children start with the
    # default again (and the xdist workers, started from this process, do the same).
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def broker(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[ApacheKafka]:
    """One Apache Kafka broker (KRaft, free ports, data in a temporary directory) for the
    whole session, with a SASL_SSL listener too (`broker.secure_listener`)."""
    # The first run on a machine downloads the jars: show its progress, not a silent pause.
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        resolve_jars()
    log_path = tmp_path_factory.mktemp("kafka") / "kafka.log"
    # A test session's broker: C1 only (QUICK_JIT) halves its CPU on a 2-core machine.
    kafka = ApacheKafka(log_path=log_path, secure=True, progress=None, jvm_options=QUICK_JIT)
    with kafka as running:
        yield running


@pytest.fixture(scope="session")
def tansu_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """One tansu broker (in memory, free port) for the whole session, for the smoke tests."""
    log_path = tmp_path_factory.mktemp("tansu") / "tansu.log"
    with EmbeddedBroker(log_path=log_path) as running:
        yield running


def unique_topics(config: Config, suffix: str, data_type: str = "wine") -> Config:
    """`config` with `-<suffix>` appended to every topic name; the records topic's default
    data type is `data_type`."""
    topics: dict[str, Any] = {name: f"{getattr(config, name)}-{suffix}" for name in TOPIC_FIELDS}
    return dataclasses.replace(
        config, **topics, records_topics=f"{config.records_topic}-{suffix}={data_type}"
    )


def config_env(config: Config) -> dict[str, str]:
    """The WAXSERVE_* variables that make `Config.from_env()` use these brokers and topics
    (and the Kafka client settings, for a secured listener)."""
    env = {"WAXSERVE_BROKERS": config.brokers, "WAXSERVE_RECORDS_TOPICS": config.records_topics}
    env.update({f"WAXSERVE_{name.upper()}": getattr(config, name) for name in TOPIC_FIELDS})
    env.update(
        {f"WAXSERVE_KAFKA_{k.upper().replace('.', '_')}": str(v) for k, v in config.kafka.items()}
    )
    return env


def topics_config(bootstrap: str, monkeypatch: pytest.MonkeyPatch, **kafka: str) -> Config:
    """A Config on `bootstrap` with topics of its own, created, and the environment set to
    match (WAXSERVE_BROKERS, WAXSERVE_*_TOPIC, other WAXSERVE_* variables removed).

    `kafka` are librdkafka settings (`security.protocol=...`), in the Config and the
    environment (WAXSERVE_KAFKA_*).
    """
    suffix = f"{next(_test_ids)}-{uuid.uuid4().hex[:8]}"
    base = dataclasses.replace(Config(), brokers=bootstrap, kafka=kafka)
    config = unique_topics(base, suffix)
    create_topics(config, RECORDS_PARTITIONS)
    for name in list(os.environ):
        if name.startswith("WAXSERVE_"):
            monkeypatch.delenv(name)
    for name, value in config_env(config).items():
        monkeypatch.setenv(name, value)
    return config


@pytest.fixture
def kafka_config(broker: ApacheKafka, monkeypatch: pytest.MonkeyPatch) -> Config:
    """A Config on the session's Kafka broker with topics of this test's own, already created.

    The records topic has 2 partitions (the outputs too; the control topic 1); its default
    data type is wine. The process environment is set to match (WAXSERVE_BROKERS,
    WAXSERVE_*_TOPIC, other WAXSERVE_* variables removed), so `Config.from_env()`, the CLI
    and subprocesses see the same.
    """
    return topics_config(broker.bootstrap, monkeypatch)


@pytest.fixture
def tansu_config(tansu_broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch) -> Config:
    """`kafka_config` on the session's tansu broker."""
    return topics_config(tansu_broker.bootstrap, monkeypatch)


@pytest.fixture(params=["kafka", "tansu"])
def any_config(request: pytest.FixtureRequest) -> Config:
    """`kafka_config`, then `tansu_config`: the test runs on each broker."""
    config: Config = request.getfixturevalue(f"{request.param}_config")
    return config


def consume_all(
    config: Config, topic: str, *, expect: int | None = None, timeout: float = 10.0
) -> list[Message]:
    """Every message of `topic`, read from the beginning of all its partitions.

    Reads until at least `expect` messages arrived and every partition is at its end (so
    extra messages show up too), or, without `expect`, until every partition is at its end.
    Gives up after `timeout` seconds and returns what it has. Never joins a group.
    """
    consumer = Consumer(
        kafka_settings(
            config,
            **{
                "group.id": f"tests-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "fetch.wait.max.ms": 10,
            },
        )
    )
    try:
        metadata = consumer.list_topics(topic, timeout=5.0)
        info = metadata.topics.get(topic)
        if info is None or info.error is not None or not info.partitions:
            raise AssertionError(f"topic {topic!r} not found: {info and info.error}")
        partitions = sorted(info.partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        messages: list[Message] = []
        at_end: set[int] = set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=1000, timeout=0.1):
                err = msg.error()
                partition = msg.partition() or 0
                if err is None:
                    messages.append(msg)
                    at_end.discard(partition)
                elif err.code() == KafkaError._PARTITION_EOF:
                    at_end.add(partition)
                else:
                    raise AssertionError(f"consuming {topic}: {err}")
            enough = expect is None or len(messages) >= expect
            if enough and len(at_end) == len(partitions):
                break
        return messages
    finally:
        consumer.close()


@pytest.fixture
def consume() -> ConsumeAll:
    """`consume(config, topic, *, expect=None, timeout=10.0) -> list[Message]`: see consume_all."""
    return consume_all
