"""Scored-topic messages of one model call: `ScoredRecord` bytes, keyed by output key."""

from __future__ import annotations

import itertools
import math

import numpy as np

from dataflows.control.registry import ModelSpec
from dataflows.core.records import OutMessage, RecordColumns
from dataflows.monitoring.windows import ModelIdentity
from dataflows.rollout.plans import ServingPlan
from dataflows.runtimes import Prediction
from dataflows.scoring import wire
from protos import waxserve_pb2 as pb


def scored_messages(
    run: RecordColumns,
    identity: ModelIdentity,
    prediction: Prediction,
    elapsed: float,
    now_ms: int,
    scored_by: str,
    lineage: bytes = b"",
) -> list[OutMessage]:
    """One message per valid prediction of the run. `lineage` is the encoded lineage field
    of the binding that scored it (`lineage_field`), the same for every record."""
    n = len(run)
    # Every record of this call shares these fields: serialized once (dataflows/scoring/wire.py),
    # the lineage once per binding.
    shared = (
        pb.ScoredRecord(
            data_type=run.data_type,
            source_topic=run.topic,
            source_partition=run.partition,
            model_name=identity.name,
            model_version=identity.version,
            model_sha256=identity.sha256,
            scoring_latency_us=elapsed / n * 1e6,
            scored_at_ms=now_ms,
            batch_size=n,
            scored_by=scored_by,
        ).SerializeToString()
        + lineage
    )
    rows = None if prediction.valid.all() else np.flatnonzero(prediction.valid)
    if rows is None:  # the usual call: the run's own fields, shared with its other calls
        fields = run.memo(_RECORD_FIELDS, lambda: _record_fields(run))
        values = prediction.values
    else:
        ids = run.encoded_ids().take(rows.tolist())
        fields = wire.RecordFields(ids, run.offsets[rows], run.event_time_ms[rows])
        values = prediction.values[rows]
    keys = wire.output_keys(
        run.topic, run.partition, identity.name, identity.version, fields.offset_list
    )
    if prediction.labels is None:
        encoded = wire.regression_records(shared, keys, fields, values)
    else:  # a classifier's value is optional: protobuf writes it with the label
        numbers = [
            own + extra
            for own, extra in zip(
                fields.offset_and_time_fields,
                _classifier_fields(prediction, rows, values),
                strict=True,
            )
        ]
        encoded = wire.scored_record_values(shared, keys, fields.ids, numbers)
    # No content-type header: the scored topic carries ScoredRecord protobuf only, and
    # a header costs ~1 µs a record to produce (bench/README.md).
    return list(zip(keys, encoded, itertools.repeat(None)))


_RECORD_FIELDS = "scored record fields"


def _record_fields(run: RecordColumns) -> wire.RecordFields:
    return wire.RecordFields(run.encoded_ids(), run.offsets, run.event_time_ms)


def lineage_field(spec: ModelSpec, contract_version: int) -> bytes:
    """`ScoredRecord.lineage` as encoded bytes, for a model bound to a contract version:
    where its descriptor is on the control topic, who signed it, the contract version the
    records are decoded with and the serving decision. Appended to the shared fields of
    every record the binding scores (about 50 bytes a record; `waxserve audit` reads it)."""
    lineage = spec.lineage
    lineage.contract_version = contract_version
    return pb.ScoredRecord(lineage=lineage).SerializeToString()


def plan_field(plan: ServingPlan, role: str) -> bytes:
    """The serving plan's fields of a scored record, encoded: policy, plan number, the
    model's role, and the lineage's decision (the role: protobuf merges the lineage)."""
    return pb.ScoredRecord(
        policy=plan.policy,
        plan_number=plan.number,
        variant_role=role,
        lineage=pb.Lineage(decision=role),
    ).SerializeToString()


def _classifier_fields(
    prediction: Prediction, rows: np.ndarray | None, values: np.ndarray
) -> list[bytes]:
    """Per record, the encoded label, probabilities and (numeric labels) value."""
    assert prediction.labels is not None
    labels = prediction.labels if rows is None else [prediction.labels[i] for i in rows]
    probabilities = prediction.probabilities
    if probabilities is not None and rows is not None:
        probabilities = probabilities[rows]
    class_labels = prediction.class_labels
    per_row = probabilities.tolist() if probabilities is not None else None
    out = []
    for i, value in enumerate(values.tolist()):
        own = pb.ScoredRecord(label=labels[i])
        if not math.isnan(value):
            own.value = value
        if per_row is not None:
            own.probabilities.update(
                (label, p) for label, p in zip(class_labels, per_row[i], strict=True) if p == p
            )
        out.append(own.SerializeToString())
    return out
