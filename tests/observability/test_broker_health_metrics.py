"""The broker-health metrics the Kafka I/O code reports through: waxserve_kafka_unreachable
and waxserve_input_topic_resets_total."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from dataflows.observability import metrics


@pytest.fixture
def no_outage() -> Iterator[None]:
    """Start with every client reachable (other tests in the session may report outages);
    put their state back afterwards."""
    saved = dict(metrics._unreachable_count)
    for client in metrics.KAFKA_CLIENTS:
        metrics._unreachable_count[client] = 0
        metrics.KAFKA_UNREACHABLE.labels(client).set(0)
    yield
    for client, count in saved.items():
        metrics._unreachable_count[client] = count
        metrics.KAFKA_UNREACHABLE.labels(client).set(1 if count else 0)


def unreachable(client: str) -> float | None:
    return REGISTRY.get_sample_value("waxserve_kafka_unreachable", {"client": client})


def resets(topic: str) -> float:
    value = REGISTRY.get_sample_value("waxserve_input_topic_resets_total", {"topic": topic})
    return value or 0.0


def test_unreachable_is_exported_from_the_start() -> None:
    # A value the alert compares, not a series that appears with the first outage.
    assert unreachable("producer") is not None and unreachable("consumer") is not None


@pytest.mark.usefixtures("no_outage")
def test_unreachable_is_1_while_any_client_is_down() -> None:
    # Two consumers (two source topics) lose the brokers; one gets them back.
    metrics.kafka_unreachable("consumer", True)
    metrics.kafka_unreachable("consumer", True)
    assert unreachable("consumer") == 1
    metrics.kafka_unreachable("consumer", False)
    assert unreachable("consumer") == 1, "the other consumer is still down"
    metrics.kafka_unreachable("consumer", False)
    assert unreachable("consumer") == 0
    # A stray "reachable" does not go below 0 (nor hide the next outage).
    metrics.kafka_unreachable("consumer", False)
    metrics.kafka_unreachable("consumer", True)
    assert unreachable("consumer") == 1
    metrics.kafka_unreachable("consumer", False)
    assert unreachable("consumer") == 0 and unreachable("producer") == 0

    metrics.kafka_unreachable("producer", True)
    assert (unreachable("producer"), unreachable("consumer")) == (1, 0)
    metrics.kafka_unreachable("producer", False)
    assert unreachable("producer") == 0


def test_input_topic_resets_count_per_topic() -> None:
    before = resets("health-a"), resets("health-b")
    metrics.input_topic_reset("health-a")
    metrics.input_topic_reset("health-a")
    metrics.input_topic_reset("health-b")
    assert (resets("health-a"), resets("health-b")) == (before[0] + 2, before[1] + 1)
