"""What a user writes by hand: consume one record, json-decode it, call the model on that
one row, json-encode the result, produce it; repeat.

    python -m bench.contenders.naive --brokers B --input T --output O --model M [--stop-after N]
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
from confluent_kafka import Consumer, Producer

from bench.contenders import common


def main() -> None:
    """Score record by record."""
    args = common.parse_args(__doc__)
    common.stop_on_sigterm()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the same single thread as every other contender
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    consumer = Consumer(common.consumer_config(args.brokers))
    common.assign_from_beginning(consumer, args.input)
    producer = Producer(common.producer_config(args.brokers))
    written = 0
    try:
        while not common.done(written, args.stop_after):
            msg = consumer.poll(0.1)
            value = msg.value() if msg is not None and msg.error() is None else None
            if msg is None or value is None:
                continue
            record = json.loads(value)
            row = np.array([[record[name] for name in common.FEATURES]], dtype=np.float32)
            score = float(session.run(None, {input_name: row})[0][0][0])
            out = {
                "record_id": record["record_id"],
                "event_time_ms": record["event_time_ms"],
                "score": score,
            }
            common.produce(producer, args.output, msg.key(), json.dumps(out).encode())
            producer.poll(0)
            written += 1
    except KeyboardInterrupt:
        pass
    finally:
        producer.flush(30)
        consumer.close()


if __name__ == "__main__":
    main()
