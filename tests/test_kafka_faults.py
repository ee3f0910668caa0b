"""Faults a broker can throw at the dataflow, on the real broker: away for more than a
minute, and an input topic deleted and created again underneath it."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from flowtools import descriptor, record_bytes, wine_lines
from test_integration import Dataflow, Reader, produce, publish

from dataflows.core.config import Config
from dataflows.tools.broker import kafka_settings

pytestmark = pytest.mark.integration

OUTAGE_S = 70.0  # longer than the 60 s after which the dataflow used to give up


def test_a_broker_away_for_over_a_minute_holds_output_back_and_loses_nothing(
    broker: Any, kafka_config: Config, tmp_path: Path
) -> None:
    config = kafka_config
    total = 3000
    values = record_bytes(wine_lines(0, 1500) * 2)
    publish(config, descriptor("wine-lr"))
    reader = Reader(config, config.scored_topic)
    flow = Dataflow(config, tmp_path)
    # The feed goes on through the outage: librdkafka holds it until the broker is back.
    # Idempotent: its own retries after the outage must not duplicate the input.
    feeder_producer = Producer(
        kafka_settings(config, **{"linger.ms": 5, "enable.idempotence": True})
    )
    stop_feeding = threading.Event()

    def feed() -> None:
        for i, value in enumerate(values):
            if stop_feeding.is_set():
                return
            feeder_producer.produce(config.records_topic, value, partition=i % 2)
            feeder_producer.poll(0)
            time.sleep(0.01)  # ~100 records a second, for 30 s

    feeder = threading.Thread(target=feed, daemon=True)
    keys = lambda: {s.output_key for s in reader.scored(config)}  # noqa: E731
    try:
        feeder.start()
        reader.wait_for("first records scored", lambda: len(keys()) >= 200, flow, timeout=90)
        os.kill(broker.pid, signal.SIGSTOP)  # unreachable: connections hang, nothing answers
        try:
            deadline = time.monotonic() + OUTAGE_S
            while time.monotonic() < deadline:
                flow.check_alive()
                time.sleep(1.0)
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        feeder.join()
        assert feeder_producer.flush(120) == 0
        reader.wait_for("every record scored", lambda: len(keys()) >= total, flow, timeout=180)
        flow.check_alive()
    finally:
        stop_feeding.set()
        flow.stop()
        reader.close()
    assert len(keys()) == total
    log = flow.log.read_text()
    assert "waiting" in log and "for the broker" in log, flow.tail()


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
        fresh = record_bytes(wine_lines(200, 100), id_prefix="fresh-")
        produce(config, config.records_topic, fresh, partitions=2)
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
