"""Where waxserve's CPU goes per record, stage by stage, in-process and without a broker.

`python -m bench breakdown` times waxserve's own per-batch functions on 1,000-record batches
of the bench's JSON wine records, and the parts of a hand-tuned loop doing the same job, so
the throughput gap in the bench report can be read as a sum of measured parts:

- decode: `dataflows.records.decode_batch` (JSON, and protobuf for comparison) against
  `orjson.loads` + an itemgetter per record (what the tuned loop does);
- score + encode: `ShardScorer.on_values` (validation, the model call, the ScoredRecord
  protobuf with its tracing fields, metrics, stats and drift) against one onnxruntime call
  and a 3-field `orjson.dumps` per record;
- produce: `Producer.produce` of those messages (enqueue only), with and without the
  content-type header;
- PMML: `PmmlRuntime.predict` on a batch, and the PMML4S call alone.

Kafka's own consume/produce work and Bytewax's scheduling are not in here: the bench's
passthrough contender and the difference to the bench's waxserve figure hold those.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnxruntime as ort
import orjson
from confluent_kafka import Producer

from dataflows.descriptors import load_catalog
from dataflows.records import (
    CONTENT_TYPE_JSON,
    WINE_FEATURES,
    SourceBatch,
    decode_batch,
    parse_csv_line,
    wine_record,
)
from dataflows.runtimes import PmmlRuntime, load_runtime
from dataflows.scoring import DescriptorIn, ModelInstall, Registry, ShardScorer
from protos import waxserve_pb2 as pb

BATCH = 1000
WINE_CSV = Path(__file__).resolve().parents[1] / "models" / "data" / "winequality_red.csv"


def _per_record_us(run: Callable[[], object], repeat: int = 50) -> float:
    """Median over `repeat` calls of one batch call, per record, in microseconds."""
    run()  # warm up
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return float(np.median(times)) / BATCH * 1e6


def _batches() -> tuple[SourceBatch, SourceBatch]:
    """One 1,000-record batch of the bench's records as JSON and as protobuf."""
    lines = WINE_CSV.read_text().splitlines()
    now_ms = int(time.time() * 1000)
    # A batch from a running stream: offsets and ids of one width (the bench's ids are the
    # record numbers), which is what lets the scored records be one byte matrix.
    first = 100_000
    records = [
        wine_record(parse_csv_line(lines[i % len(lines)]), record_id=f"{i}", event_time_ms=now_ms)
        for i in range(first, first + BATCH)
    ]
    json_values = [
        orjson.dumps(
            {
                "record_id": r.record_id,
                "data_type": "wine",
                "event_time_ms": r.event_time_ms,
                **{f: getattr(r, f) for f in (*WINE_FEATURES, "quality")},
            }
        )
        for r in records
    ]
    json_batch = SourceBatch(
        "records",
        0,
        list(range(first, first + BATCH)),
        [r.record_id.encode() for r in records],
        list(json_values),
        [[("content-type", CONTENT_TYPE_JSON.encode())]] * BATCH,
    )
    protobuf_batch = SourceBatch(
        "records",
        0,
        list(range(first, first + BATCH)),
        [r.record_id.encode() for r in records],
        [r.SerializeToString() for r in records],
        [[]] * BATCH,
    )
    return json_batch, protobuf_batch


def _scorers() -> tuple[ShardScorer, ShardScorer]:
    """Shards serving wine-lr, with stats and drift on and off."""
    lr = load_catalog()["wine-lr"].descriptor()
    registry = Registry(None, model_dir="")
    (install,) = [
        o
        for o in [
            *registry.on_descriptors([DescriptorIn(lr, "models", 0, 0, None, b"")]),
            *registry.collect(wait=True),
        ]
        if isinstance(o, ModelInstall)
    ]
    scorer = ShardScorer(None, stats_interval_s=10, drift_window_s=60)
    scorer.on_values([install])
    unmonitored = ShardScorer(None, stats_interval_s=10, drift_window_s=60, monitoring=False)
    unmonitored.on_values([install])
    return scorer, unmonitored


def monitoring_cost(rounds: int = 7) -> dict[str, float]:
    """Score + encode of a 1,000-record JSON batch with stats and drift on and off, µs a
    record: the medians of `rounds` interleaved rounds. The throughput runs cannot resolve
    a cost of a few percent (their repetitions vary by ±20%); this can."""
    json_batch, _ = _batches()
    scorer, unmonitored = _scorers()
    (run,), _ = decode_batch(json_batch)
    on, off = [], []
    for _ in range(rounds):
        on.append(_per_record_us(lambda: scorer.on_values([run])))
        off.append(_per_record_us(lambda: unmonitored.on_values([run])))
    return {"on_us": float(np.median(on)), "off_us": float(np.median(off)), "rounds": rounds}


def measure() -> list[tuple[str, float]]:
    """(stage, µs per record) for every stage above."""
    json_batch, protobuf_batch = _batches()
    json_values = cast(list[bytes], json_batch.values)
    catalog = load_catalog()
    scorer, unmonitored = _scorers()
    (run,), _ = decode_batch(json_batch)
    scored = scorer.on_values([run])
    messages = next(o.messages for o in scored if hasattr(o, "messages"))

    session = ort.InferenceSession(str(catalog["wine-lr"].path()))
    input_name = session.get_inputs()[0].name
    features = operator.itemgetter(*WINE_FEATURES)
    docs = [orjson.loads(v) for v in json_values]

    def tuned_decode() -> object:
        return [features(orjson.loads(v)) for v in json_values]

    def tuned_score_encode() -> object:
        x = np.array([features(d) for d in docs], dtype=np.float32)
        scores = session.run(None, {input_name: x})[0][:, 0].tolist()
        return [
            orjson.dumps(
                {"record_id": d["record_id"], "event_time_ms": d["event_time_ms"], "score": s}
            )
            for d, s in zip(docs, scores, strict=True)
        ]

    producer = Producer(
        {
            "bootstrap.servers": "127.0.0.1:9",  # never connects: enqueueing is what is timed
            "queue.buffering.max.messages": 10_000_000,
            "queue.buffering.max.kbytes": 4_000_000,
            "log_level": 0,
        }
    )

    CONTENT_TYPE = [("content-type", b"application/x-protobuf")]

    def produce(with_headers: bool) -> Callable[[], object]:
        def run() -> object:
            for key, value, _ in messages:
                if with_headers:
                    producer.produce("scored", value, key, headers=cast(Any, CONTENT_TYPE))
                else:
                    producer.produce("scored", value, key)
            return None

        return run

    pmml_entry = catalog["wine-pmml-lr"]
    pmml_descriptor = pmml_entry.descriptor()
    pmml = cast(
        PmmlRuntime,
        load_runtime(
            pb.MODEL_FORMAT_PMML, pmml_descriptor.model_bytes, list(pmml_descriptor.input_features)
        ),
    )
    pmml_x = run.features[:, : len(pmml.input_names)]
    request = (
        pmml._request_prefix  # the one PMML4S call inside predict, timed alone
        + orjson.dumps(np.ascontiguousarray(pmml_x), option=orjson.OPT_SERIALIZE_NUMPY)
        + b"}"
    ).decode()

    rows = [
        ("waxserve decode, JSON (decode_batch)", _per_record_us(lambda: decode_batch(json_batch))),
        (
            "waxserve decode, protobuf (decode_batch)",
            _per_record_us(lambda: decode_batch(protobuf_batch)),
        ),
        ("tuned decode: orjson.loads + itemgetter", _per_record_us(tuned_decode)),
        (
            "waxserve score + ScoredRecord (ShardScorer)",
            _per_record_us(lambda: scorer.on_values([run])),
        ),
        (
            "waxserve score + ScoredRecord, stats + drift off",
            _per_record_us(lambda: unmonitored.on_values([run])),
        ),
        ("tuned score + 3-field orjson.dumps", _per_record_us(tuned_score_encode)),
        ("produce, with content-type header", _per_record_us(produce(True), repeat=20)),
        ("produce, no header", _per_record_us(produce(False), repeat=20)),
        ("PMML: PmmlRuntime.predict", _per_record_us(lambda: pmml.predict(pmml_x), repeat=20)),
        (
            "PMML: the PMML4S call alone",
            _per_record_us(lambda: str(pmml._model.predict(request)), repeat=20),
        ),
    ]
    producer.purge()
    return rows


def main() -> int:
    """Print the table."""
    rows = measure()
    width = max(len(name) for name, _ in rows)
    print(f"{'stage (1,000-record batches)':<{width}}  µs/record")
    for name, us in rows:
        print(f"{name:<{width}}  {us:9.2f}")
    return 0
