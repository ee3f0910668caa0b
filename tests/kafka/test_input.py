"""Kafka input: a partition whose fetcher stalls is noticed and assigned again where it was,
losing and repeating nothing."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka import TopicPartition as KafkaTopicPartition
from prometheus_client import REGISTRY

from dataflows.core.config import Config
from dataflows.io.kafka import StallWatch, _BatchPartition, _SharedConsumer
from dataflows.tools.broker import kafka_settings


def test_a_partition_is_stalled_only_with_records_to_reach_and_no_move_for_the_whole_time() -> None:
    watch = StallWatch(after_s=30)
    # Behind the end and not moving: stalled once 30 s have passed, then given 30 s again.
    assert watch.check(0, {0: 10}, {0: 50}) == []
    assert watch.check(29, {0: 10}, {0: 50}) == []
    assert watch.check(30, {0: 10}, {0: 50}) == [0]
    assert watch.check(31, {0: 10}, {0: 50}) == []
    assert watch.check(60, {0: 10}, {0: 50}) == [0]
    # Moving: the clock starts again at every move.
    assert watch.check(70, {0: 11}, {0: 50}) == []
    assert watch.check(99, {0: 11}, {0: 50}) == []
    assert watch.check(100, {0: 11}, {0: 50}) == [0]


@pytest.mark.parametrize(
    ("position", "end", "busy"),
    [
        (50, 50, ()),  # at the end: nothing to read
        (50, None, ()),  # the end is unknown
        (-1001, 50, ()),  # the fetcher's position is not known yet
        (10, 50, (0,)),  # records wait in our buffer, or the partition is paused
    ],
)
def test_a_partition_with_nothing_to_reach_or_busy_is_never_stalled(
    position: int, end: int | None, busy: tuple[int, ...]
) -> None:
    watch = StallWatch(after_s=30)
    ends = {} if end is None else {0: end}
    assert [watch.check(t, {0: position}, ends, busy) for t in (0, 30, 60, 90)] == [[]] * 4


def test_a_partition_that_left_is_forgotten() -> None:
    watch = StallWatch(after_s=30)
    watch.check(0, {0: 10, 1: 10}, {0: 50, 1: 50})
    assert watch.check(30, {1: 10}, {0: 50, 1: 50}) == [1]
    assert watch.check(40, {0: 10}, {0: 50}) == []  # 0 came back: its clock starts again
    assert watch.check(69, {0: 10}, {0: 50}) == []
    assert watch.check(70, {0: 10}, {0: 50}) == [0]


def test_a_partition_assigned_again_that_stays_put_gets_a_new_consumer() -> None:
    watch = StallWatch(after_s=30)
    assert watch.remedy(0, 324) == "assign"
    assert watch.remedy(1, 324) == "assign"
    assert watch.remedy(0, 324) == "new consumer"  # assigned at 324 before, still there
    # A new consumer assigned every partition afresh: each starts with "assign" again.
    assert watch.remedy(1, 324) == "assign"
    assert watch.remedy(0, 400) == "assign"
    assert watch.remedy(0, 500) == "assign"  # it moved since: assigning did help


def stalls(topic: str) -> float:
    value = REGISTRY.get_sample_value("waxserve_input_partition_stalls_total", {"topic": topic})
    return value or 0.0


@pytest.mark.integration
def test_a_stuck_fetcher_is_assigned_again_where_it_was_on_real_kafka(
    kafka_config: Config, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The fetcher of partition 0 is stopped behind our back (paused in librdkafka, as a
    stuck fetcher looks): the watch notices, and every record arrives once, in order."""
    monkeypatch.setattr(_SharedConsumer, "STALL_S", 1.0)
    monkeypatch.setattr(_SharedConsumer, "TOPIC_CHECK_S", 0.5)
    config = dataclasses.replace(kafka_config, batch_size=20)
    topic = config.records_topic
    producer = Producer(kafka_settings(config))

    def produce(first: int, count: int) -> None:
        for i in range(first, first + count):
            producer.produce(topic, str(i).encode(), partition=0)
        assert producer.flush(30) == 0

    def read_until(count: int) -> list[int]:
        got: list[int] = []
        deadline = time.monotonic() + 60
        while len(got) < count:
            assert time.monotonic() < deadline, f"read {len(got)} of {count}"
            for batch in source.next_batch():
                got += [int(v or b"") for v in batch.values]
            time.sleep(0.01)
        return got

    produce(0, 50)
    before = stalls(topic)
    source = _BatchPartition(config, topic, 0, 0, "stall-test")
    try:
        first = read_until(50)
        shared = source._consumer
        shared._consumer.pause([KafkaTopicPartition(topic, 0)])  # librdkafka alone knows
        produce(50, 50)
        with caplog.at_level(logging.WARNING, logger="dataflows.io.kafka"):
            rest = read_until(50)
        assert first + rest == list(range(100))
        # Once, or again if the new fetcher took longer than this test's 1 s to move.
        assert stalls(topic) >= before + 1
        assert "assigning it again at offset 50" in caplog.text
        time.sleep(0.2)
        assert source.next_batch() == []  # nothing more, nothing twice
    finally:
        source.close()


class StuckThroughAssign:
    """A consumer whose partitions stay paused in librdkafka whatever is assigned or
    resumed: a fetcher that a new assignment does not unstick."""

    def __init__(self, consumer: Any) -> None:
        self._consumer = consumer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)

    def incremental_assign(self, partitions: list[KafkaTopicPartition]) -> None:
        self._consumer.incremental_assign(partitions)
        self._consumer.pause(partitions)

    def resume(self, _partitions: list[KafkaTopicPartition]) -> None:
        pass


@pytest.mark.integration
def test_a_fetcher_stuck_through_a_new_assignment_gets_a_new_consumer_on_real_kafka(
    kafka_config: Config, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Partition 0's fetcher stays stuck when it is assigned again: the next stall at the
    same offset replaces the consumer, and every record arrives once, in order."""
    monkeypatch.setattr(_SharedConsumer, "STALL_S", 1.0)
    monkeypatch.setattr(_SharedConsumer, "TOPIC_CHECK_S", 0.5)
    config = dataclasses.replace(kafka_config, batch_size=20)
    topic = config.records_topic
    producer = Producer(kafka_settings(config))
    for i in range(100):
        producer.produce(topic, str(i).encode(), partition=0)
    assert producer.flush(30) == 0
    source = _BatchPartition(config, topic, 0, 0, "stuck-test")
    try:
        shared = source._consumer
        stuck = StuckThroughAssign(shared._consumer)
        stuck.pause([KafkaTopicPartition(topic, 0)])  # stuck from the start
        monkeypatch.setattr(shared, "_consumer", stuck)
        got: list[int] = []
        deadline = time.monotonic() + 60
        with caplog.at_level(logging.WARNING, logger="dataflows.io.kafka"):
            while len(got) < 100:
                assert time.monotonic() < deadline, f"read {len(got)} of 100:\n{caplog.text}"
                for batch in source.next_batch():
                    got += [int(v or b"") for v in batch.values]
                time.sleep(0.01)
        assert got == list(range(100))
        assert "assigning it again at offset 0" in caplog.text
        assert "a new consumer for the topic" in caplog.text
        assert shared._consumer is not stuck
        time.sleep(0.2)
        assert source.next_batch() == []  # nothing more, nothing twice
    finally:
        source.close()
