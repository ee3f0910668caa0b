"""A hand-tuned single-purpose loop: consume up to 1,000 records at once, decode them with
orjson, score the whole batch with one onnxruntime call, produce the results.

    python -m bench.contenders.tuned --brokers B --input T --output O --model M [--stop-after N]

With BENCH_TUNED_HEADERS=1 it also reads each message's content-type header and skips
what is not JSON, as any consumer of a topic with mixed encodings must (waxserve does):
the cost of that one feature, measured on its own.
"""

from __future__ import annotations

import operator
import os

import numpy as np
import onnxruntime as ort
import orjson
from confluent_kafka import Consumer, Producer

from bench.contenders import common


def main() -> None:
    """Score batch by batch."""
    args = common.parse_args(__doc__)
    common.stop_on_sigterm()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    features = operator.itemgetter(*common.FEATURES)
    consumer = Consumer(common.consumer_config(args.brokers))
    common.assign_from_beginning(consumer, args.input)
    producer = Producer(common.producer_config(args.brokers))
    read_headers = os.environ.get("BENCH_TUNED_HEADERS") == "1"
    written = 0
    try:
        while not common.done(written, args.stop_after):
            messages = consumer.consume(common.BATCH, common.CONSUME_TIMEOUT_S)
            keys = []
            records = []
            for msg in messages:
                value = msg.value()
                if msg.error() is None and value is not None:
                    if read_headers and not common.is_json(msg.headers()):
                        continue
                    keys.append(msg.key())
                    records.append(orjson.loads(value))
            if not records:
                continue
            rows = np.array([features(r) for r in records], dtype=np.float32)
            scores = session.run(None, {input_name: rows})[0][:, 0].tolist()
            for key, record, score in zip(keys, records, scores, strict=True):
                out = {
                    "record_id": record["record_id"],
                    "event_time_ms": record["event_time_ms"],
                    "score": score,
                }
                common.produce(producer, args.output, key, orjson.dumps(out))
            producer.poll(0)
            written += len(records)
    except KeyboardInterrupt:
        pass
    finally:
        producer.flush(30)
        consumer.close()


if __name__ == "__main__":
    main()
