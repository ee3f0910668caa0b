"""OutBatch: what exactly-once output keeps of a batch after a committed position."""

from __future__ import annotations

from dataflows.core.output import OutBatch
from dataflows.core.records import OutMessage


def _batch(positions: list[int], stream: str = "serve:records/0/wine") -> OutBatch:
    messages: list[OutMessage] = [(f"k{p}".encode(), f"v{p}".encode(), []) for p in positions]
    return OutBatch(messages, stream, positions)


def test_after_keeps_only_what_follows_the_position() -> None:
    kept = _batch([3, 4, 5, 6]).after(4)
    assert kept.positions == [5, 6]
    assert [m[0] for m in kept.messages] == [b"k5", b"k6"]
    assert kept.stream == "serve:records/0/wine"


def test_after_a_covered_batch_is_empty_and_a_later_one_whole() -> None:
    assert _batch([1, 2]).after(2).messages == []
    later = _batch([7, 8])
    assert later.after(6) is later


def test_an_unfenced_batch_is_always_kept_whole() -> None:
    unfenced = OutBatch([(b"k", b"v", [])])
    assert unfenced.after(10**9) is unfenced
