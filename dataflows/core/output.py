"""What the dataflow hands its sinks: messages, and which inputs they cover."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dataflows.core.records import OutMessage


@dataclass(frozen=True, slots=True)
class OutBatch:
    """Messages for one sink, with their place in the stream of inputs they come from.

    `stream` names an ordered sequence
    of inputs, such as one source partition's records of one data type, or one model's
    stats windows, and `positions` gives each message's place in it (an input offset, a
    window start), never decreasing from one batch of the stream to the next. Exactly-once
    output records the last position each transaction covered and, after a restart,
    drops what a committed transaction already holds. An empty stream is never fenced.
    """

    messages: list[OutMessage]
    stream: str = ""
    positions: Sequence[int] = ()

    def after(self, position: int) -> OutBatch:
        """The messages of this batch placed after `position` (all of them if unfenced)."""
        if not self.stream or not self.positions or self.positions[0] > position:
            return self
        kept = [i for i, p in enumerate(self.positions) if p > position]
        return OutBatch(
            [self.messages[i] for i in kept],
            self.stream,
            [self.positions[i] for i in kept],
        )


SinkItem = tuple[str, OutBatch]
"""What sinks receive: a route key, which picks the sink partition (every batch of a stream
has the same one, so one writer sees the whole stream, in order), and the batch."""
