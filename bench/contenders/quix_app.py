"""Quix Streams, per-record scoring, run with the Python of bench/.venv-quix:

    bench/.venv-quix/bin/python -m bench.contenders.quix_app --brokers B --input T \\
        --output O --model M [--stop-after N]

A Quix `Application` must join a consumer group (it cannot assign partitions), which takes
~3-20 s on tansu: the harness measures from the first output, so the join is not counted.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np
import onnxruntime as ort
from quixstreams import Application

from bench.contenders import common


def main() -> None:
    """Score record by record, the Quix way."""
    args = common.parse_args(__doc__)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def score(record: dict[str, Any]) -> dict[str, Any]:
        row = np.array([[record[name] for name in common.FEATURES]], dtype=np.float32)
        value = float(session.run(None, {input_name: row})[0][0][0])
        return {
            "record_id": record["record_id"],
            "event_time_ms": record["event_time_ms"],
            "score": value,
        }

    app = Application(
        broker_address=args.brokers,
        consumer_group=f"bench-quix-{uuid.uuid4().hex[:8]}",  # a fresh group: from the start
        auto_offset_reset="earliest",
        # The same client settings as every contender; a shorter session timeout
        # makes tansu's group join take ~3 s instead of ~20 s.
        consumer_extra_config={
            "fetch.wait.max.ms": common.FETCH_WAIT_MS,
            "fetch.queue.backoff.ms": common.FETCH_QUEUE_BACKOFF_MS,
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 500,
        },
        producer_extra_config={"linger.ms": common.LINGER_MS, "partitioner": common.PARTITIONER},
        auto_create_topics=False,
        use_changelog_topics=False,
        loglevel="WARNING",
    )
    source = app.topic(args.input, value_deserializer="json")
    sink = app.topic(args.output, value_serializer="json")
    sdf = app.dataframe(source).apply(score)
    # Quix gives an output the input's timestamp; the harness times the output by its
    # Kafka timestamp, so stamp it with the time it is produced, as the other contenders do.
    sdf = sdf.set_timestamp(lambda value, key, timestamp, headers: int(time.time() * 1000))
    sdf.to_topic(sink)
    if args.stop_after is None:
        app.run()
    else:
        app.run(count=args.stop_after, collect=False)


if __name__ == "__main__":
    main()
