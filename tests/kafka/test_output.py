"""Kafka output: messages cut to fit, and exactly-once transactions fenced by markers."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from conftest import ConsumeAll

from dataflows.core.config import Config
from dataflows.core.output import OutBatch
from dataflows.core.records import Headers, OutMessage, fit_message
from dataflows.io.kafka import _Transactions


def _size(message: OutMessage) -> int:
    key, value, headers = message
    header_bytes = sum(len(k) + len(v or b"") for k, v in headers or [])
    return len(key or b"") + len(value or b"") + header_bytes


def test_a_message_over_the_limit_keeps_what_fits_and_says_what_it_was() -> None:
    value = bytes(range(256)) * 8000  # 2 MB
    headers: Headers = [("waxserve.stage", b"decode"), ("producer-header", b"x" * 100)]
    key, cut, out_headers = fit_message((b"key", value, headers), 1_000_000)
    assert _size((key, cut, out_headers)) < 1_000_000
    assert key == b"key"
    assert cut is not None and cut == value[: len(cut)] and len(cut) > 990_000
    assert out_headers is not None
    marks = dict(out_headers)
    assert marks["waxserve.truncated"] == b"true"
    assert marks["waxserve.original.size"] == str(len(value)).encode()
    assert marks["waxserve.original.sha256"] == hashlib.sha256(value).hexdigest().encode()
    assert ("producer-header", b"x" * 100) in out_headers  # small headers stay whole


def test_a_hostile_header_is_cut_too() -> None:
    headers: Headers = [("big", b"h" * 2_000_000), ("small", b"s")]
    message = fit_message((None, b"value", headers), 1_000_000)
    assert _size(message) < 1_000_000
    kept = message[2] or []
    assert ("small", b"s") in kept and ("waxserve.headers.dropped", b"1") in kept
    assert message[1] == b"value"


def _batch(positions: list[int], stream: str = "serve:in/0/wine") -> OutBatch:
    messages: list[OutMessage] = [(f"k{p}".encode(), f"v{p}".encode(), []) for p in positions]
    return OutBatch(messages, stream, positions)


@pytest.mark.integration
def test_a_restarted_producer_drops_what_committed_transactions_covered(
    kafka_config: Config, consume: ConsumeAll
) -> None:
    config = dataclasses.replace(kafka_config, delivery="exactly-once")
    topic = config.scored_topic
    first = _Transactions(config, 0)
    first.write(topic, _batch([0, 1, 2]))
    first.write(topic, OutBatch([(b"event", b"e", [])]))  # unfenced
    first.commit(topic)
    first.write(topic, _batch([3, 4]))  # the process dies before this commits

    # The restart replays from an older snapshot: 1..4 again, then new records.
    second = _Transactions(config, 0)  # fences `first`, aborting its open transaction
    second.write(topic, _batch([1, 2, 3]))
    second.write(topic, _batch([4, 5]))
    second.write(topic, _batch([0], stream="serve:in/1/wine"))  # another stream: not fenced
    second.write(topic, OutBatch([(b"event", b"e", [])]))  # unfenced: written again
    second.commit(topic)

    keys = [m.key() or b"" for m in consume(config, topic, expect=8)]
    fenced = sorted(k for k in keys if k != b"event")
    assert fenced == [b"k0", b"k0", b"k1", b"k2", b"k3", b"k4", b"k5"]
    assert keys.count(b"event") == 2


@pytest.mark.integration
def test_exactly_once_is_refused_on_a_broker_without_transactions(tansu_config: Config) -> None:
    # tansu accepts transactional requests but shows aborted records to read_committed
    # readers: fencing would not fence, so it must not be used for exactly-once output.
    config = dataclasses.replace(tansu_config, delivery="exactly-once")
    transactions = _Transactions(config, 0)
    transactions.write(config.scored_topic, _batch([0]))
    with pytest.raises(RuntimeError, match="does not implement Kafka transactions"):
        transactions.commit(config.scored_topic)
