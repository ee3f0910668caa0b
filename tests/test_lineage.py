"""Every scored record carries its model's lineage (issue 14, part 4): where the descriptor
is on the control topic, who signed it, the signature finding, the contract version the
record was decoded with and the serving decision."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from bytewax.testing import TestingSource
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flowtools import (
    CONTROL_TOPIC,
    RECORDS_TOPIC,
    WINE_CONTRACT,
    batch,
    descriptor,
    model_batch,
    record_bytes,
    run_flow,
    test_config,
    wine_lines,
)

from dataflows.control.registry import ModelSpec, Provenance
from dataflows.control.signing import generate_key_pair, load_private_key, sign
from dataflows.core.records import RecordColumns
from dataflows.monitoring.windows import ModelIdentity
from dataflows.runtimes import Prediction
from dataflows.scoring.scored import lineage_field, scored_messages
from protos import waxserve_pb2 as pb

WORKERS = [1, 2]
PAUSE = TestingSource.PAUSE

IDENTITY = ModelIdentity("wine", "wine-lr", "3", "ab" * 32, format=1, since_ms=1_700_000_000_000)
PROVENANCE = Provenance(
    "waxserve.control", 0, 41, signer_key_id="0123456789abcdef", signature_status="valid"
)


def _spec(provenance: Provenance | None = PROVENANCE) -> ModelSpec:
    return ModelSpec(IDENTITY, (), ("a",), None, 0, contract_version=1, provenance=provenance)


def _run(n: int, offsets: list[int] | None = None, ids: list[str] | None = None) -> RecordColumns:
    return RecordColumns(
        data_type="wine",
        contract_version=2,
        topic="records",
        partition=1,
        offsets=np.array(offsets if offsets is not None else range(100, 100 + n), np.int64),
        record_ids=ids if ids is not None else [f"r{i}" for i in range(n)],
        event_time_ms=np.full(n, 1_700_000_000_500, np.int64),
        numeric=np.zeros((n, 1)),
        text=np.empty((n, 0), object),
        labels=np.full(n, np.nan),
        keys=[None] * n,
        raw=[b""] * n,
        headers=[[] for _ in range(n)],
    )


def _expected_lineage(contract_version: int = 2) -> pb.Lineage:
    return pb.Lineage(
        control_topic="waxserve.control",
        control_partition=0,
        control_offset=41,
        signer_key_id="0123456789abcdef",
        signature_status="valid",
        contract_version=contract_version,
        decision="active",
    )


def test_the_lineage_field_is_protobufs_own_encoding_of_the_specs_lineage() -> None:
    field = lineage_field(_spec(), 2)
    parsed = pb.ScoredRecord.FromString(field)
    assert parsed == pb.ScoredRecord(lineage=_expected_lineage())
    # Compact: one small submessage per record, not a copy of the descriptor.
    assert len(field) < 80
    # A model without provenance (a registry that had none) still says its contract and
    # the decision.
    bare = pb.ScoredRecord.FromString(lineage_field(_spec(None), 5)).lineage
    assert bare == pb.Lineage(contract_version=5, decision="active")


@pytest.mark.parametrize(
    "case", ["uniform", "offsets of two widths", "ids of two widths", "classifier"]
)
def test_every_scored_record_parses_with_its_lineage(case: str) -> None:
    """The lineage rides in the shared prefix: each record's bytes parse to the lineage,
    on the fast uniform path, the general path and the classifier path alike."""
    n = 6
    offsets = [120, 121, 122, 123, 124, 125]
    ids = [f"r{i}" for i in range(n)]
    if case == "offsets of two widths":
        offsets = [5, 6, 7, 300, 301, 302]
    if case == "ids of two widths":
        ids = ["a", "bb", "c", "dd", "e", "ff"]
    run = _run(n, offsets, ids)
    values = np.arange(n, dtype=np.float64) + 0.5
    valid = np.ones(n, bool)
    valid[2] = False  # an invalid prediction is no scored record
    if case == "classifier":
        labels = [str(i % 2) for i in range(n)]
        prediction = Prediction(values, labels, np.full((n, 2), 0.5), ("0", "1"), valid)
    else:
        prediction = Prediction(values, None, None, (), valid)
    lineage = lineage_field(_spec(), run.contract_version)
    messages = scored_messages(run, IDENTITY, prediction, 0.001, 1_700_000_001_000, "h/1", lineage)
    assert len(messages) == n - 1
    parsed = [pb.ScoredRecord.FromString(value) for _key, value, _h in messages]
    assert [p.record_id for p in parsed] == [ids[i] for i in range(n) if i != 2]
    assert [p.source_offset for p in parsed] == [offsets[i] for i in range(n) if i != 2]
    for p in parsed:
        assert p.lineage == _expected_lineage()
        assert p.model_sha256 == IDENTITY.sha256 and p.data_type == "wine"
    # Without a lineage the bytes are what they were before it existed.
    plain = scored_messages(run, IDENTITY, prediction, 0.001, 1_700_000_001_000, "h/1")
    for (_k, with_lineage, _h), (_k2, without, _h2) in zip(messages, plain, strict=True):
        assert with_lineage is not None and without is not None
        assert len(with_lineage) == len(without) + len(lineage)
        assert not pb.ScoredRecord.FromString(without).HasField("lineage")


def _signed(name: str, key: Ed25519PrivateKey) -> pb.ModelDescriptor:
    desc = descriptor(name)
    sign(desc, key)
    return desc


@pytest.mark.parametrize("workers", WORKERS)
def test_every_scored_record_carries_its_models_lineage(workers: int, tmp_path: Path) -> None:
    """Two signed models in turn, by two keys (a rotation): every record says which
    descriptor scored it, whose key signed it, that the signature was valid, the contract
    version and the decision."""
    keys = tmp_path / "keys"
    first_path, _pub, first_id = generate_key_pair(keys, "first")
    second_path, _pub2, second_id = generate_key_pair(keys, "second")
    for private in (first_path, second_path):
        private.rename(tmp_path / private.name)  # the trusted directory holds public keys only
    first = _signed("wine-lr", load_private_key(tmp_path / first_path.name))
    second = _signed("wine-gbt", load_private_key(tmp_path / second_path.name))
    before, after = wine_lines(0, 80), wine_lines(80, 40)
    models = [
        model_batch(first),  # the contract at offset 0, wine-lr at 1
        PAUSE(timedelta(seconds=1.0)),
        model_batch(second, start=1),  # wine-gbt at 2
    ]
    records = [
        batch(RECORDS_TOPIC, record_bytes(before[:40], "a"), partition=0),
        batch(RECORDS_TOPIC, record_bytes(before[40:], "b"), partition=1),
        PAUSE(timedelta(seconds=2.0)),
        batch(RECORDS_TOPIC, record_bytes(after, "late-"), partition=0, start=40),
    ]
    config = test_config(signature_policy="require", trusted_keys_dir=str(keys))
    out = run_flow(config, models, records, workers=workers)
    scored = out.scored()
    assert len(scored) == 120 and out.dead_letters() == []
    assert all(s.HasField("lineage") for s in scored)
    expected = {
        "wine-lr": pb.Lineage(
            control_topic=CONTROL_TOPIC,
            control_partition=0,
            control_offset=1,
            signer_key_id=first_id,
            signature_status="valid",
            contract_version=WINE_CONTRACT.version,
            decision="active",
        ),
        "wine-gbt": pb.Lineage(
            control_topic=CONTROL_TOPIC,
            control_partition=0,
            control_offset=2,
            signer_key_id=second_id,
            signature_status="valid",
            contract_version=WINE_CONTRACT.version,
            decision="active",
        ),
    }
    for s in scored:
        assert s.lineage == expected[s.model_name], s.record_id
    # Records that came before any model waited for the first one. Which model scored the
    # late ones depends on when wine-gbt finished loading in each process: not asserted.
    assert {s.model_name for s in scored if not s.record_id.startswith("late-")} == {"wine-lr"}
    # The events say the same of each install.
    installs = {e.model_name: e for e in out.events() if e.kind == "installed"}
    assert installs["wine-lr"].signer_key_id == first_id
    assert installs["wine-gbt"].source_offset == 2
