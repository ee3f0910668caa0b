"""Faults a broker can throw at the dataflow, on the real broker: away for longer than every
client timeout, and an input topic deleted and created again underneath it."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec
from flowtools import descriptor, record_bytes, wine_lines
from test_integration import Dataflow, Reader, produce, publish

from dataflows.core.config import Config
from dataflows.tools.broker import free_port, kafka_settings

pytestmark = pytest.mark.integration

SOCKET_TIMEOUT_MS = 4000
"""The dataflow's librdkafka `socket.timeout.ms` here (60 s by default): every request to
the broker (fetch, produce, metadata) times out after it, so an outage of a few of these
takes the dataflow's clients through what a broker away for minutes does at the defaults:
requests timed out, connections torn down, reconnects that time out in turn."""
OUTAGE_S = 4 * SOCKET_TIMEOUT_MS / 1000
"""At least this long, and until the dataflow's flush has said it waits for the broker."""


def topic_ends(config: Config, topic: str) -> list[int]:
    """Each partition's end offset, asked of the broker by a new client."""
    consumer = Consumer(kafka_settings(config, **{"group.id": "tests-ends"}))
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return [
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in sorted(partitions)
        ]
    finally:
        consumer.close()


def test_a_broker_away_longer_than_every_client_timeout_holds_output_back_and_loses_nothing(
    broker: Any, kafka_config: Config, tmp_path: Path
) -> None:
    config = kafka_config
    values = itertools.cycle(record_bytes(wine_lines(0, 1500)))
    publish(config, descriptor("wine-lr"))
    reader = Reader(config, config.scored_topic)
    # Output lingers 5 s in the producer, so some is always undelivered when the broker
    # stops: the snapshot's flush then has to wait for it (and say so), whatever the timing.
    flow = Dataflow(
        config,
        tmp_path,
        WAXSERVE_LINGER_MS="5000",
        WAXSERVE_KAFKA_SOCKET_TIMEOUT_MS=str(SOCKET_TIMEOUT_MS),
    )
    # The feed goes on through the outage: librdkafka holds it until the broker is back.
    # Idempotent: its own retries after the outage must not duplicate the input.
    feeder_producer = Producer(
        kafka_settings(config, **{"linger.ms": 5, "enable.idempotence": True})
    )
    stop_feeding = threading.Event()
    fed = 0
    delivered: collections.Counter[str] = collections.Counter()

    def count_delivery(err: Any, _msg: Any) -> None:
        delivered["ok" if err is None else str(err)] += 1

    def feed() -> None:
        nonlocal fed
        while not stop_feeding.is_set():
            feeder_producer.produce(
                config.records_topic, next(values), partition=fed % 2, on_delivery=count_delivery
            )
            feeder_producer.poll(0)
            fed += 1
            time.sleep(0.01)  # ~100 records a second

    def waiting_logged() -> bool:
        log = flow.log.read_text()
        return "waiting" in log and "for the broker" in log

    feeder = threading.Thread(target=feed, daemon=True)
    keys = lambda: {s.output_key for s in reader.scored(config)}  # noqa: E731
    try:
        feeder.start()
        reader.wait_for("first records scored", lambda: len(keys()) >= 200, flow, timeout=90)
        os.kill(broker.pid, signal.SIGSTOP)  # unreachable: connections hang, nothing answers
        try:
            stopped = time.monotonic()
            while time.monotonic() - stopped < OUTAGE_S or not waiting_logged():
                flow.check_alive()
                if time.monotonic() - stopped > 120:
                    raise AssertionError(f"no flush waited for the broker:\n{flow.tail()}")
                time.sleep(0.5)
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        fed_by_the_outage_end = fed
        try:
            reader.wait_for(
                "records fed after the outage scored",
                lambda: len(keys()) >= fed_by_the_outage_end + 100,
                flow,
                timeout=180,
            )
        except AssertionError as exc:
            # Where the records stopped: in the feeder, in the dataflow, or in the reader.
            ends = {t: topic_ends(config, t) for t in (config.records_topic, config.scored_topic)}
            raise AssertionError(
                f"{exc}\nfed {fed}, deliveries {dict(delivered)}, scored keys read "
                f"{len(keys())}, topic ends {ends}"
            ) from None
        stop_feeding.set()
        feeder.join()
        assert feeder_producer.flush(120) == 0
        reader.wait_for("every record scored", lambda: len(keys()) >= fed, flow, timeout=180)
        flow.check_alive()
    finally:
        stop_feeding.set()
        flow.stop()
        reader.close()
    assert len(keys()) == fed
    assert waiting_logged(), flow.tail()
    # The outage outlasted the clients' requests: librdkafka timed them out (and went on).
    assert "Timed out" in flow.log.read_text(), flow.tail()


def topic_id(admin: AdminClient, topic: str) -> str | None:
    """The topic's id as the broker serves it (a new one each time it is created), None
    while it has none."""
    futures = admin.describe_topics(TopicCollection([topic]))
    try:
        return str(futures[topic].result(30).topic_id)
    except KafkaException as error:
        if error.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
            raise
        return None


def test_an_input_topic_deleted_and_created_again_is_reported_and_read_again(
    kafka_config: Config, tmp_path: Path
) -> None:
    config = kafka_config
    publish(config, descriptor("wine-lr"))
    reader = Reader(config, config.scored_topic)
    flow = Dataflow(config, tmp_path)
    try:
        produce(config, config.records_topic, record_bytes(wine_lines(0, 200)), partitions=2)
        reader.wait_for("200 scored", lambda: len(reader.scored(config)) >= 200, flow)
        admin = AdminClient(kafka_settings(config))
        old_id = topic_id(admin, config.records_topic)
        assert old_id is not None
        admin.delete_topics([config.records_topic])[config.records_topic].result(30)
        deadline = time.monotonic() + 60
        while True:  # the broker takes a moment to forget a deleted topic
            future = admin.create_topics([NewTopic(config.records_topic, 2, 1)])
            try:
                future[config.records_topic].result(30)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        # The controller has both changes; the broker applies them a moment later, and
        # until then it takes records for the old topic. On a busy machine the fresh
        # records went there, were read on from offset 100 as if nothing had happened,
        # and nothing was reported: produce once the broker serves the new topic.
        while topic_id(admin, config.records_topic) in (old_id, None):
            assert time.monotonic() < deadline, "the broker still serves the deleted topic"
            time.sleep(0.1)
        fresh = record_bytes(wine_lines(200, 100), id_prefix="fresh-")
        produce(config, config.records_topic, fresh, partitions=2)
        ends = admin.list_offsets(
            {TopicPartition(config.records_topic, p): OffsetSpec.latest() for p in (0, 1)}
        )
        assert sorted(f.result(30).offset for f in ends.values()) == [50, 50]
        reader.wait_for(
            "the new topic's records scored",
            lambda: sum(s.record_id.startswith("fresh-") for s in reader.scored(config)) >= 100,
            flow,
            timeout=90,
        )
    finally:
        flow.stop()
        reader.close()
    assert "is not in the partition" in flow.log.read_text(), flow.tail()


def test_records_at_the_brokers_limit_are_dead_lettered_cut_to_fit_and_the_flow_goes_on(
    kafka_config: Config, tmp_path: Path
) -> None:
    # The broker takes messages up to 1,048,588 bytes; their dead-letter copies, with the
    # error headers, are over the 1,000,000 the dataflow writes: a poison pill once.
    config = kafka_config
    publish(config, descriptor("wine-lr"))
    reader = Reader(config, config.scored_topic, config.dlq_topic)
    flow = Dataflow(config, tmp_path)
    big = [b"\xff" * 1_040_000, b"7" * 1_040_000 + b";1"]
    try:
        producer = Producer(kafka_settings(config, **{"message.max.bytes": 1_048_000}))
        for i, value in enumerate(big):
            csv: list[tuple[str, str | bytes | None]] | None = (
                [("content-type", b"text/csv")] if i else None
            )
            producer.produce(config.records_topic, value, partition=0, headers=csv)
        assert producer.flush(30) == 0
        produce(config, config.records_topic, record_bytes(wine_lines(0, 20)), partitions=2)
        reader.wait_for(
            "the big records dead-lettered and the rest scored",
            lambda: len(reader.seen[config.dlq_topic]) >= 2 and len(reader.scored(config)) >= 20,
            flow,
        )
        flow.check_alive()
    finally:
        flow.stop()
        reader.close()
    assert len(reader.scored(config)) == 20
    dead = sorted(reader.seen[config.dlq_topic], key=lambda d: d[1]["waxserve.source.offset"])
    for (value, headers), original in zip(dead, big, strict=True):
        assert headers["waxserve.truncated"] == "true"
        assert headers["waxserve.original.size"] == str(len(original))
        assert headers["waxserve.original.sha256"] == hashlib.sha256(original).hexdigest()
        assert original.startswith(value) and 900_000 < len(value) < len(original)


def test_a_typo_in_a_topic_or_no_broker_stops_the_dataflow_in_one_line(
    kafka_config: Config, tmp_path: Path
) -> None:
    typo = dataclasses.replace(kafka_config, records_topics=kafka_config.records_topic + "x")
    down = dataclasses.replace(kafka_config, brokers=f"127.0.0.1:{free_port()}")
    for config, message in (
        (typo, f"waxserve: no topic '{typo.records_topic}' on {typo.brokers}: create"),
        (down, f"waxserve: WAXSERVE_BROKERS='{down.brokers}': no Kafka broker answered"),
    ):
        flow = Dataflow(config, tmp_path)
        assert flow.proc.wait(60) == 2
        flow.stop()
        output = flow.log.read_text()
        assert output.startswith(message) and output.count("\n") == 1, output
    # Nothing made the typo'd topic meanwhile.
    topics = AdminClient(kafka_settings(kafka_config)).list_topics(timeout=10).topics
    assert typo.records_topic not in topics
