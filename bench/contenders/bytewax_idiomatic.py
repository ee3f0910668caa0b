"""Idiomatic Bytewax, as its documentation writes it: KafkaSource -> op.map per record
(json-decode, one onnxruntime call, json-encode) -> KafkaSink.

    BENCH_BROKERS=B BENCH_INPUT=T BENCH_OUTPUT=O BENCH_MODEL=M [BENCH_TAIL=0] \\
        python -m bytewax.run bench.contenders.bytewax_idiomatic:flow

`BENCH_TAIL=0` stops at the end of the input (throughput runs); otherwise it tails.
"""

from __future__ import annotations

import json
import os
from typing import cast

import bytewax.operators as op
import numpy as np
import onnxruntime as ort
from bytewax.connectors.kafka import KafkaSink, KafkaSinkMessage, KafkaSource, KafkaSourceMessage
from bytewax.dataflow import Dataflow, Stream

from bench.contenders import common


def build_flow(
    brokers: str, input_topic: str, output_topic: str, model: str, tail: bool
) -> Dataflow:
    """The per-record scoring flow."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def score(
        msg: KafkaSourceMessage[bytes | None, bytes | None],
    ) -> KafkaSinkMessage[bytes | None, bytes]:
        record = json.loads(msg.value or b"")
        row = np.array([[record[name] for name in common.FEATURES]], dtype=np.float32)
        value = float(session.run(None, {input_name: row})[0][0][0])
        out = {
            "record_id": record["record_id"],
            "event_time_ms": record["event_time_ms"],
            "score": value,
        }
        return KafkaSinkMessage(msg.key, json.dumps(out).encode())

    # The same fetch settings as every contender (KafkaSource leaves librdkafka's 500 ms).
    config = {
        "fetch.wait.max.ms": str(common.FETCH_WAIT_MS),
        "fetch.queue.backoff.ms": str(common.FETCH_QUEUE_BACKOFF_MS),
    }
    flow = Dataflow("bench_idiomatic")
    source = KafkaSource([brokers], [input_topic], tail=tail, add_config=config)
    # raise_on_errors (the default) raises on a consumer error instead of emitting it, so
    # only messages flow on.
    records = cast(
        Stream[KafkaSourceMessage[bytes | None, bytes | None]], op.input("in", flow, source)
    )
    scored = op.map("score", records, score)
    op.output(
        "out",
        scored,
        KafkaSink(
            [brokers],
            output_topic,
            add_config={"linger.ms": str(common.LINGER_MS), "partitioner": common.PARTITIONER},
        ),
    )
    return flow


def _flow_from_env() -> Dataflow:
    env = os.environ
    return build_flow(
        env["BENCH_BROKERS"],
        env["BENCH_INPUT"],
        env["BENCH_OUTPUT"],
        env["BENCH_MODEL"],
        tail=env.get("BENCH_TAIL", "1") != "0",
    )


def __getattr__(name: str) -> Dataflow:
    # Built on first access, so that importing this module needs no environment.
    if name == "flow":
        value = _flow_from_env()
        globals()["flow"] = value
        return value
    raise AttributeError(name)
