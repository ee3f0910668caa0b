"""waxserve's essential work and nothing else, hand-written: a limit for waxserve, not a
rival. It turns waxserve's input into waxserve's scored output in one plain loop:

    python -m bench.contenders.essential --brokers B --input T --output O --model M [--stop-after N]

Per `consume()` of up to 1,000 messages, per partition in it: read each message's
content-type header (records name their encoding there; this loop takes JSON only, the
headers compared once per batch as waxserve does), decode the records with the data
type's contract through waxserve's own JSON codec (`dataflows.contracts.codecs`: msgspec
into a struct built from the contract, then columns), one onnxruntime call on the
columns that feed the model, and each record's `ScoredRecord` with its tracing fields and
output key, by waxserve's own code (`dataflows.core.records.record_columns` for the ids and
event times, `dataflows.scoring.scored.scored_messages` for the bytes); then produce.

Nothing else: no Bytewax, no snapshots, no routing by data type, no dead letters (a bad
record stops it), no validation beyond the codec's types (the contract's batch checks and
the missing-feature check are skipped), no stats, drift or metrics, no idempotent
producer. waxserve does every step of this loop, with the same code or slower, and more
besides; so this loop's throughput bounds waxserve's from above on the same machine, and
a goal above it is out of reach for any waxserve that keeps its input and output contracts.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
import onnxruntime as ort
from confluent_kafka import Consumer, Message, Producer

from bench.contenders import common
from dataflows.contracts.codecs import codec_for
from dataflows.contracts.files import load_contract
from dataflows.contracts.schema import Contract, Encoding
from dataflows.core.descriptors import catalog_contracts, load_catalog
from dataflows.core.records import Headers, OutMessage, RawRun, record_columns
from dataflows.monitoring.windows import ModelIdentity
from dataflows.rollout.plans import ServingPlan
from dataflows.runtimes import Prediction
from dataflows.scoring.scored import plan_field, scored_messages
from protos import waxserve_pb2 as pb


class EssentialScorer:
    """One model, and the scored records waxserve would write for a run of one partition's
    JSON records of one data type."""

    def __init__(
        self,
        model_path: str,
        contract: Contract,
        inputs: Sequence[str],
        topic: str,
        name: str,
        version: str,
    ) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self._session = ort.InferenceSession(
            model_path, options, providers=["CPUExecutionProvider"]
        )
        model_input = self._session.get_inputs()[0]
        self._input = model_input.name
        self._dtype = np.float32 if model_input.type == "tensor(float)" else np.float64
        self._contract = contract
        self._codec = codec_for(contract, Encoding.JSON)
        # The numeric columns that feed the model's one tensor, in its input order.
        self._columns = [contract.columns[name].index for name in inputs]
        self._topic = topic
        # The tracing fields waxserve writes: which model (name, version, digest), by whom.
        sha256 = hashlib.sha256(Path(model_path).read_bytes()).hexdigest()
        self._identity = ModelIdentity(contract.data_type, name, version, sha256)
        self._scored_by = f"{socket.gethostname()}/{os.getpid()}"
        # The lineage it can know (no control topic here): the same bytes per record as
        # waxserve's, but for the descriptor's position and signer.
        lineage = pb.Lineage(contract_version=contract.version, decision="active")
        self._lineage = pb.ScoredRecord(lineage=lineage).SerializeToString()
        # and the serving plan's fields of a model serving alone (plan 1).
        self._lineage += plan_field(ServingPlan.single(f"{name}:{version}"), "active")

    def score(
        self,
        partition: int,
        offsets: list[int],
        keys: list[bytes | None],
        values: list[bytes | None],
        headers: list[Headers],
    ) -> list[OutMessage]:
        """(key, value, headers) of each record's ScoredRecord."""
        decoded = self._codec.decode(values)
        if decoded.errors:
            raise ValueError(f"records this loop cannot decode: {decoded.errors}")
        run = RawRun(
            self._topic, partition, offsets, keys, values, headers, self._contract.data_type
        )
        columns, _ = record_columns(run, self._contract, decoded)
        assert columns is not None
        rows = np.ascontiguousarray(columns.numeric[:, self._columns], dtype=self._dtype)
        started = time.perf_counter()
        scores = self._session.run(None, {self._input: rows})[0]
        elapsed = time.perf_counter() - started
        values64 = np.asarray(scores, dtype=np.float64).reshape(-1)
        prediction = Prediction(values64, None, None, (), np.isfinite(values64))
        now_ms = int(time.time() * 1000)
        return scored_messages(
            columns, self._identity, prediction, elapsed, now_ms, self._scored_by, self._lineage
        )


def main() -> None:
    """Score batch by batch, partition by partition."""
    args = common.parse_args(__doc__)
    common.stop_on_sigterm()
    # As the bench publishes it to waxserve: the catalog's name (the file's) and version.
    entry = load_catalog()[Path(args.model).stem]
    contract = load_contract(catalog_contracts()[entry.data_type])
    scorer = EssentialScorer(
        args.model, contract, entry.input_features, args.input, entry.name, entry.version
    )
    consumer = Consumer(common.consumer_config(args.brokers))
    common.assign_from_beginning(consumer, args.input)
    producer = Producer(common.producer_config(args.brokers))
    written = 0
    try:
        while not common.done(written, args.stop_after):
            messages = consumer.consume(common.BATCH, common.CONSUME_TIMEOUT_S)
            for partition, run in itertools.groupby(messages, Message.partition):
                batch, headers = _json_only([m for m in run if m.error() is None])
                if not batch:
                    continue
                offsets = cast(list[int], list(map(Message.offset, batch)))
                keys = list(map(Message.key, batch))
                values = list(map(Message.value, batch))
                scored = scorer.score(cast(int, partition), offsets, keys, values, headers)
                for key, value, _ in scored:
                    common.produce(producer, args.output, key, value)
                written += len(batch)
            producer.poll(0)
    except KeyboardInterrupt:
        pass
    finally:
        producer.flush(30)
        consumer.close()


def _json_only(messages: list[Message]) -> tuple[list[Message], list[Headers]]:
    """The messages whose content-type is JSON, with their headers; the headers compared
    once per batch, as waxserve does (a producer sends the same headers every time)."""
    headers = cast(list[Headers], list(map(Message.headers, messages)))
    if headers and headers.count(headers[0]) == len(headers):
        return (messages, headers) if common.is_json(headers[0]) else ([], [])
    keep = [i for i, h in enumerate(headers) if common.is_json(h)]
    return [messages[i] for i in keep], [headers[i] for i in keep]


if __name__ == "__main__":
    main()
