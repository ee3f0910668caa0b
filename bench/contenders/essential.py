"""waxserve's essential work and nothing else, hand-written: a limit for waxserve, not a
rival. It turns waxserve's input into waxserve's scored output in one plain loop:

    python -m bench.contenders.essential --brokers B --input T --output O --model M [--stop-after N]

Per `consume()` of up to 1,000 messages, per partition in it: read each message's
content-type header (records name their encoding there; this loop takes JSON only),
decode each record with msgspec into a typed struct (as waxserve does; faster than orjson
in `python -m bench breakdown`), one onnxruntime call, and each record's
`ScoredRecord` with its tracing fields and output key, byte for byte as waxserve writes
them, by waxserve's own batch encoder (`dataflows.wire`); then produce.

Nothing else: no Bytewax, no snapshots, no dead letters (a bad record stops it), no
validation beyond the decoder's types, no stats, drift or metrics, no idempotent producer.
waxserve does every step of this loop, with the same code or slower, and more besides;
so this loop's throughput bounds waxserve's from above on the same machine, and a goal
above it is out of reach for any waxserve that keeps its input and output contracts.
"""

from __future__ import annotations

import hashlib
import itertools
import operator
import os
import socket
import time
from pathlib import Path
from typing import cast

import msgspec
import numpy as np
import onnxruntime as ort
from confluent_kafka import Consumer, Message, Producer

from bench.contenders import common
from dataflows import wire
from protos import waxserve_pb2 as pb

Scored = tuple[bytes, bytes]


class Record(msgspec.Struct, gc=False):
    """What the loop reads of a JSON wine record: every feature must be a number."""

    record_id: str
    event_time_ms: int
    fixed_acidity: float
    volatile_acidity: float
    citric_acid: float
    residual_sugar: float
    chlorides: float
    free_sulfur_dioxide: float
    total_sulfur_dioxide: float
    density: float
    ph: float
    sulphates: float
    alcohol: float


class EssentialScorer:
    """One model, and the scored records waxserve would write for a run of one partition's
    JSON records."""

    def __init__(self, model_path: str, topic: str, name: str, version: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self._session = ort.InferenceSession(
            model_path, options, providers=["CPUExecutionProvider"]
        )
        model_input = self._session.get_inputs()[0]
        self._input = model_input.name
        self._dtype = np.float32 if model_input.type == "tensor(float)" else np.float64
        self._topic = topic
        # The tracing fields waxserve writes: which model (name, version, digest), by whom.
        self._name, self._version = name, version
        self._sha256 = hashlib.sha256(Path(model_path).read_bytes()).hexdigest()
        self._scored_by = f"{socket.gethostname()}/{os.getpid()}"
        self._decode = msgspec.json.Decoder(Record).decode
        self._features = operator.attrgetter(*common.FEATURES)

    def score(self, partition: int, offsets: list[int], values: list[bytes]) -> list[Scored]:
        """(key, value) of each record's ScoredRecord."""
        records = list(map(self._decode, values))
        n, width = len(records), len(common.FEATURES)
        rows = np.fromiter(
            itertools.chain.from_iterable(map(self._features, records)), self._dtype, n * width
        ).reshape(n, width)
        started = time.perf_counter()
        scores = self._session.run(None, {self._input: rows})[0].reshape(-1)
        elapsed = time.perf_counter() - started
        shared = pb.ScoredRecord(
            data_type="wine",
            source_topic=self._topic,
            source_partition=partition,
            model_name=self._name,
            model_version=self._version,
            model_sha256=self._sha256,
            scoring_latency_us=elapsed / n * 1e6,
            scored_at_ms=int(time.time() * 1000),
            batch_size=n,
            scored_by=self._scored_by,
        ).SerializeToString()
        event_times = np.fromiter((r.event_time_ms for r in records), np.int64, n)
        keys = wire.output_keys(self._topic, partition, self._name, self._version, offsets)
        encoded = wire.regression_records(
            shared,
            keys,
            [r.record_id for r in records],
            np.array(offsets, dtype=np.int64),
            event_times,
            scores.astype(np.float64),
        )
        return list(zip(keys, encoded, strict=True))


def main() -> None:
    """Score batch by batch, partition by partition."""
    args = common.parse_args(__doc__)
    common.stop_on_sigterm()
    # As the bench publishes it to waxserve: the catalog's name (the file's) and version.
    scorer = EssentialScorer(args.model, args.input, Path(args.model).stem, "1")
    consumer = Consumer(common.consumer_config(args.brokers))
    common.assign_from_beginning(consumer, args.input)
    producer = Producer(common.producer_config(args.brokers))
    written = 0
    try:
        while not common.done(written, args.stop_after):
            messages = consumer.consume(common.BATCH, common.CONSUME_TIMEOUT_S)
            for partition, run in itertools.groupby(messages, Message.partition):
                batch = _json_only([m for m in run if m.error() is None])
                if not batch:
                    continue
                offsets = cast(list[int], list(map(Message.offset, batch)))
                values = cast(list[bytes], list(map(Message.value, batch)))
                for key, value in scorer.score(cast(int, partition), offsets, values):
                    common.produce(producer, args.output, key, value)
                written += len(batch)
            producer.poll(0)
    except KeyboardInterrupt:
        pass
    finally:
        producer.flush(30)
        consumer.close()


def _json_only(messages: list[Message]) -> list[Message]:
    """The messages whose content-type is JSON; their headers compared once per batch,
    as waxserve does (a producer sends the same headers on every message)."""
    headers = list(map(Message.headers, messages))
    if headers and headers.count(headers[0]) == len(headers):
        return messages if common.is_json(headers[0]) else []
    return [m for m, h in zip(messages, headers, strict=True) if common.is_json(h)]


if __name__ == "__main__":
    main()
