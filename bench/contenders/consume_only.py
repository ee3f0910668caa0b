"""The latency floor: a plain consumer that only reads the records and notes when each
arrived. It writes no topic: its report file holds, per record, the event time and the
arrival time (ms), plus the first/last arrival for a consume-only throughput.

    python -m bench.contenders.consume_only --brokers B --input T --report FILE [--stop-after N]

`FILE.ready` appears when the first record arrives.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import orjson
from confluent_kafka import Consumer

from bench.contenders import common


def main() -> None:
    """Consume until stopped, then write the report."""
    args = common.parse_args(__doc__, model=False, report=True)
    common.stop_on_sigterm()
    consumer = Consumer(common.consumer_config(args.brokers))
    common.assign_from_beginning(consumer, args.input)
    arrivals: list[tuple[str, int, float]] = []  # record id, event time, arrival (ms)
    ready = False
    try:
        while not common.done(len(arrivals), args.stop_after):
            messages = consumer.consume(common.BATCH, common.CONSUME_TIMEOUT_S)
            now_ms = time.time() * 1000
            for msg in messages:
                value = msg.value()
                if msg.error() is None and value is not None:
                    record = orjson.loads(value)
                    arrivals.append((record["record_id"], record["event_time_ms"], now_ms))
            if arrivals and not ready:
                Path(args.report + ".ready").touch()
                ready = True
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
        Path(args.report).write_text(json.dumps({"arrivals": arrivals}))


if __name__ == "__main__":
    main()
