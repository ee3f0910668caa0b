"""The dataflow end to end in-process (bytewax.testing), under 1 and 2 workers."""

from __future__ import annotations

import os
import pickle
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from bytewax.recovery import init_db_dir
from bytewax.testing import TestingSource
from flowtools import (
    CATALOG,
    CONTROL_TOPIC,
    ERROR_CSV,
    RECORDS_TOPIC,
    WINE_CONTRACT,
    WINE_FEATURES,
    CrashOnce,
    Outputs,
    batch,
    control_batch,
    csv_batch,
    descriptor,
    model_batch,
    parse_csv_line,
    record_bytes,
    run_flow,
    test_config,
    wine_lines,
)

from dataflows.control.registry import (
    RUNTIMES,
    ContractInstall,
    ControlIn,
    ModelInstall,
    Registry,
)
from protos import waxserve_pb2 as pb

WORKERS = [1, 2]
PAUSE = TestingSource.PAUSE


def onnx_reference(name: str, lines: list[str]) -> np.ndarray:
    """Scores straight from onnxruntime, to compare the flow against."""
    session = onnxruntime.InferenceSession(str(CATALOG[name].path()))
    x = np.array(
        [[parse_csv_line(line)[f] for f in WINE_FEATURES] for line in lines], dtype=np.float32
    )
    return session.run(None, {session.get_inputs()[0].name: x})[0].ravel()


def records_in_batches(lines: list[str], size: int, partitions: int = 2) -> list[object]:
    """Records spread round-robin over partitions, `size` per batch, offsets per partition."""
    items: list[object] = []
    next_offset = [0] * partitions
    for i, start in enumerate(range(0, len(lines), size)):
        part = i % partitions
        chunk = record_bytes(lines[start : start + size], id_prefix=f"{start}-")
        items.append(batch(RECORDS_TOPIC, chunk, partition=part, start=next_offset[part]))
        next_offset[part] += len(chunk)
    return items


@pytest.mark.parametrize("workers", WORKERS)
def test_every_record_is_scored_once_with_traceable_output(workers: int) -> None:
    lines = wine_lines(0, 200)
    out = run_flow(
        test_config(),
        [model_batch(descriptor("wine-lr"))],
        records_in_batches(lines, 25),
        workers=workers,
    )
    scored = out.scored()
    assert len(scored) == 200
    assert len({s.output_key for s in scored}) == 200
    assert out.dead_letters() == []
    # Values equal a direct onnxruntime call, record by record.
    expected = onnx_reference("wine-lr", lines)
    by_id = {s.record_id: s for s in scored}
    for i, line_value in enumerate(expected):
        record = by_id[f"{(i // 25) * 25}-{i % 25}"]
        assert record.value == pytest.approx(float(line_value), rel=1e-6)
    first = scored[0]
    assert first.model_name == "wine-lr" and first.model_version == "1"
    assert first.model_sha256 == descriptor("wine-lr").sha256
    assert first.source_topic == RECORDS_TOPIC
    assert first.output_key == (
        f"{RECORDS_TOPIC}/{first.source_partition}/{first.source_offset}/wine-lr/1"
    )
    assert first.scoring_latency_us > 0 and first.batch_size == 25
    assert first.scored_by.endswith(f"/{os.getpid()}")
    # Stats and drift are emitted for the model at end of input.
    stats = out.stats()
    assert sum(s.window_count for s in stats) == 200
    assert stats[-1].usage_count == 200 and stats[-1].model_name == "wine-lr"
    assert stats[-1].min_duration_us <= stats[-1].mean_duration_us <= stats[-1].max_duration_us
    # Every record carried its quality label: online RMSE against it, no accuracy (regressor).
    labels = np.array([float(line.split(";")[-1]) for line in lines])
    assert sum(s.window_labelled_count for s in stats) == 200
    if len(stats) == 1:  # the run fits in one stats interval (almost always)
        rmse = float(np.sqrt(np.mean((expected.astype(np.float64) - labels) ** 2)))
        assert stats[0].window_rmse == pytest.approx(rmse, rel=1e-6)
    assert not any(s.HasField("window_accuracy") for s in stats)
    drift = out.drift()
    assert sum(d.record_count for d in drift) == 200
    features = {f.feature for f in drift[0].features if f.quantity == "feature"}
    assert features == set(WINE_FEATURES)
    # Beside the features: the model's predictions and the records' label ("quality").
    others = {(f.quantity, f.feature) for f in drift[0].features if f.quantity != "feature"}
    assert others == {("prediction", "prediction"), ("label", "quality")}
    assert [e.kind for e in out.events()] == ["contract_installed", "installed"]


@pytest.mark.parametrize("workers", WORKERS)
def test_new_model_replaces_old_one_mid_stream(workers: int) -> None:
    before, after = wine_lines(0, 60), wine_lines(60, 60)
    models = [
        model_batch(descriptor("wine-lr")),
        PAUSE(timedelta(seconds=1.0)),
        model_batch(descriptor("wine-gbt"), start=1),
    ]
    records = [
        *records_in_batches(before, 20),
        PAUSE(timedelta(seconds=2.0)),
        batch(RECORDS_TOPIC, record_bytes(after, "late-"), partition=0, start=100),
    ]
    out = run_flow(test_config(), models, records, workers=workers)
    scored = out.scored()
    assert len(scored) == 120
    early = [s for s in scored if not s.record_id.startswith("late-")]
    late = [s for s in scored if s.record_id.startswith("late-")]
    assert {s.model_name for s in early} == {"wine-lr"}
    assert {s.model_name for s in late} == {"wine-gbt"}
    late_values = {s.record_id: s.value for s in late}
    expected = onnx_reference("wine-gbt", after)
    for i, value in enumerate(expected):
        assert late_values[f"late-{i}"] == pytest.approx(float(value), rel=1e-5)
    assert [e.kind for e in out.events()] == ["contract_installed", "installed", "installed"]
    assert {s.model_name for s in out.stats()} == {"wine-lr", "wine-gbt"}


@pytest.mark.parametrize("workers", WORKERS)
def test_malformed_records_go_to_the_dead_letter_topic_with_their_bytes(workers: int) -> None:
    error_lines = ERROR_CSV.read_text().splitlines()
    garbage = batch(RECORDS_TOPIC, [b"\xff\x00garbage", None], partition=1, start=0)
    json_nan = batch(
        RECORDS_TOPIC,
        [b'{"alcohol": NaN}', b'{"alcohol": "strong"}'],
        partition=1,
        start=2,
        headers=[[("content-type", b"application/json")]] * 2,
    )
    out = run_flow(
        test_config(),
        [model_batch(descriptor("wine-lr"))],
        [csv_batch(error_lines), garbage, json_nan],
        workers=workers,
    )
    dead = out.dead_letters()
    by_offset = {
        (h["waxserve.source.partition"], int(h["waxserve.source.offset"])): (h, v) for h, v in dead
    }
    # Line 1 is valid, line 14 only lacks the (optional) label: both scored.
    assert sorted(s.source_offset for s in out.scored()) == [0, 13]
    # Line 2 has 11 columns: undecodable.
    headers, value = by_offset[("0", 1)]
    assert headers["waxserve.stage"] == "decode"
    assert headers["waxserve.error.class"] == "bad_csv"
    assert value == error_lines[1].encode()
    # Lines 3-13 each lack one feature the model needs.
    for offset in range(2, 13):
        headers, value = by_offset[("0", offset)]
        assert headers["waxserve.stage"] == "score"
        assert headers["waxserve.error.class"] == "missing_feature"
        assert WINE_FEATURES[offset - 2] in headers["waxserve.error.message"]
        assert headers["waxserve.source.topic"] == RECORDS_TOPIC
        assert value == error_lines[offset].encode()
    assert by_offset[("1", 0)][0]["waxserve.error.class"] == "undecodable"
    assert by_offset[("1", 0)][1] == b"\xff\x00garbage"
    assert by_offset[("1", 1)][0]["waxserve.error.class"] == "undecodable"
    assert by_offset[("1", 2)][0]["waxserve.error.class"] in ("undecodable", "non_finite")
    assert by_offset[("1", 3)][0]["waxserve.error.class"] == "wrong_type"
    assert "alcohol" in by_offset[("1", 3)][0]["waxserve.error.message"]
    assert len(dead) == 1 + 11 + 4


@pytest.mark.parametrize("workers", WORKERS)
def test_rejected_descriptor_leaves_the_old_model_serving(workers: int) -> None:
    tampered = descriptor("wine-gbt", version="2")
    tampered.model_bytes = tampered.model_bytes[:-1] + b"\x00"
    bad_input = descriptor("wine-lr", version="3")
    del bad_input.input_features[:]
    bad_input.input_features.extend([*WINE_FEATURES[:-1], "colour"])
    garbage = batch(CONTROL_TOPIC, [b"not a descriptor"], start=4)
    models = [
        model_batch(descriptor("wine-lr")),
        PAUSE(timedelta(seconds=0.5)),
        model_batch(tampered, bad_input, start=1),
        garbage,
    ]
    records = [PAUSE(timedelta(seconds=1.5)), *records_in_batches(wine_lines(0, 40), 20)]
    out = run_flow(test_config(), models, records, workers=workers)
    assert {s.model_version for s in out.scored()} == {"1"}
    assert len(out.scored()) == 40
    # By offset: descriptors are rejected once loaded, after an undecodable one is.
    rejected = sorted(
        (
            (h["waxserve.error.class"], h["waxserve.source.offset"], v)
            for h, v in out.dead_letters()
        ),
        key=lambda r: r[1],
    )
    assert rejected[0][:2] == ("digest_mismatch", "2")
    assert rejected[0][2] == pb.ControlMessage(model=tampered).SerializeToString()
    assert rejected[1][:2] == ("bad_inputs", "3")
    assert rejected[2][:2] == ("undecodable", "4")
    kinds = [(e.kind, e.model_version, e.reason) for e in out.events()]
    assert kinds == [
        ("contract_installed", "", ""),
        ("installed", "1", ""),
        ("rejected", "2", "digest_mismatch"),
        ("rejected", "3", "bad_inputs"),
    ]


def test_records_of_a_data_type_without_contract_or_model_are_dead_lettered() -> None:
    line = record_bytes(wine_lines(0, 1))[0]
    beer = batch(RECORDS_TOPIC, [line], headers=[[("data-type", b"beer")]])
    wine = batch(RECORDS_TOPIC, [line], start=1)
    out = run_flow(
        test_config(no_model_wait_s=0),
        [control_batch(WINE_CONTRACT.to_proto())],
        [beer, wine],
    )
    reasons = {
        h["waxserve.data_type"]: h["waxserve.error.class"] for h, _value in out.dead_letters()
    }
    assert reasons == {"beer": "no_contract", "wine": "no_model"}


def test_records_that_arrive_before_their_model_wait_for_it() -> None:
    models = [PAUSE(timedelta(seconds=1.0)), model_batch(descriptor("wine-lr"))]
    out = run_flow(test_config(), models, records_in_batches(wine_lines(0, 30), 10))
    assert len(out.scored()) == 30 and out.dead_letters() == []


@pytest.mark.parametrize(
    "name", ["wine-pmml-lr", "wine-pmml-tree", "wine-rf-classifier", "wine-logreg-zipmap"]
)
def test_pmml_and_classifier_models_serve(name: str) -> None:
    lines = wine_lines(0, 50)
    out = run_flow(
        test_config(), [model_batch(descriptor(name))], [batch(RECORDS_TOPIC, record_bytes(lines))]
    )
    scored = out.scored()
    assert len(scored) == 50
    if name == "wine-pmml-lr":
        # The reference value of the JPMML-SparkML linear regression for row 1.
        first = next(s for s in scored if s.source_offset == 0)
        assert first.value == pytest.approx(5.178126058334128, rel=1e-12)
    if CATALOG[name].task == "classification":
        for s in scored:
            assert s.label in s.probabilities
            assert s.probabilities[s.label] == max(s.probabilities.values())
            assert sum(s.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        # Online accuracy: the fraction of records whose predicted class is their quality.
        stats = out.stats()
        right = sum(
            s.label == line.split(";")[-1]
            for s, line in zip(sorted(scored, key=lambda s: s.source_offset), lines, strict=True)
        )
        assert right > 10  # the classifiers are better than chance on their training data
        assert sum(s.window_labelled_count for s in stats) == 50
        correct = sum(s.window_accuracy * s.window_labelled_count for s in stats)
        assert correct == pytest.approx(right)


def test_monitoring_off_scores_without_stats_or_drift() -> None:
    out = run_flow(
        test_config(monitoring=False),
        [model_batch(descriptor("wine-lr"))],
        records_in_batches(wine_lines(0, 40), 10),
    )
    assert len(out.scored()) == 40
    assert out.stats() == [] and out.drift() == []


@pytest.mark.parametrize("workers", WORKERS)
def test_abort_and_resume_loses_nothing_and_rebuilds_models(workers: int, tmp_path: Path) -> None:
    init_db_dir(tmp_path, 2)
    lines = wine_lines(0, 400)
    models = [model_batch(descriptor("wine-lr"))]
    records = records_in_batches(lines, 20)
    outputs = Outputs()
    crash = CrashOnce(after_items=8)
    with pytest.raises(Exception, match="error writing output batch"):
        run_flow(
            test_config(),
            models,
            records,
            workers=workers,
            outputs=outputs,
            recovery=tmp_path,
            crash=crash,
        )
    assert crash.fired
    written_before = len(outputs.scored())
    assert 0 < written_before < 400
    # A new process has no loaded models: the shards must get theirs back from the registry.
    RUNTIMES.clear()
    run_flow(test_config(), models, records, workers=workers, outputs=outputs, recovery=tmp_path)
    scored = outputs.scored()
    counts = Counter(s.output_key for s in scored)
    assert len(counts) == 400, "every record scored"
    duplicates = sum(c - 1 for c in counts.values())
    assert duplicates <= 40, "duplicates bounded by the epochs replayed"
    assert outputs.dead_letters() == []
    kinds = [e.kind for e in outputs.events()]
    assert kinds == ["contract_installed", "installed", "restored"]
    assert {s.model_name for s in scored} == {"wine-lr"}
    # Stats and drift windows were open at the crash: restored from the snapshots, they
    # count every record exactly once (the replayed epoch is not counted twice).
    (stats,) = outputs.stats()
    assert stats.usage_count == 400 and stats.window_count == 400
    assert sum(d.record_count for d in outputs.drift()) == 400


def control_in(body: pb.ModelDescriptor | pb.DataContract, offset: int) -> ControlIn:
    """A control message as the registry receives it."""
    raw = pb.ControlMessage(
        **{"model" if isinstance(body, pb.ModelDescriptor) else "contract": body}
    )
    return ControlIn(body, CONTROL_TOPIC, 0, offset, b"wine", raw.SerializeToString())


def test_snapshots_do_not_carry_model_bytes() -> None:
    from dataflows.scoring.shard import ShardScorer
    from dataflows.serving import ServeLogic

    registry = Registry(None, model_dir="")
    installs = registry.on_control(
        [control_in(WINE_CONTRACT.to_proto(), 0), control_in(descriptor("wine-rf-classifier"), 1)]
    )
    installs += registry.collect(wait=True)
    install = next(i for i in installs if isinstance(i, ModelInstall))
    logic = ServeLogic(ShardScorer(None, stats_interval_s=10, drift_window_s=60))
    logic.on_batch([i for i in installs if isinstance(i, ContractInstall | ModelInstall)])
    size = len(pickle.dumps(logic.snapshot()))
    assert len(install.model_bytes) > 100_000
    assert size < 10_000, f"shard snapshot is {size} bytes"


def test_model_by_reference_only_from_the_allowed_directory(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    model = allowed / "wine-lr.onnx"
    model.write_bytes(CATALOG["wine-lr"].path().read_bytes())
    by_ref = descriptor("wine-lr")
    by_ref.location = model.as_uri()
    outside = descriptor("wine-lr", version="2")
    outside.location = CATALOG["wine-lr"].path().resolve().as_uri()
    http = descriptor("wine-lr", version="3")
    http.location = "http://example.invalid/model.onnx"
    out = run_flow(
        test_config(model_dir=str(allowed)),
        [model_batch(by_ref, outside, http)],
        [PAUSE(timedelta(seconds=0.5)), batch(RECORDS_TOPIC, record_bytes(wine_lines(0, 5)))],
    )
    assert {s.model_version for s in out.scored()} == {"1"}
    reasons = [h["waxserve.error.class"] for h, _ in out.dead_letters()]
    assert reasons == ["location_rejected", "location_rejected"]


def test_drift_shows_when_the_input_shifts() -> None:
    lines = wine_lines()[::4]  # a sample across the file (it is not in random order)
    shifted = []
    for line in lines:
        values = line.split(";")
        values[10] = str(float(values[10]) + 3.0)  # alcohol +3 %vol
        shifted.append(";".join(values))
    normal = run_flow(
        test_config(),
        [model_batch(descriptor("wine-lr"))],
        [batch(RECORDS_TOPIC, record_bytes(lines))],
    ).drift()
    drifted = run_flow(
        test_config(),
        [model_batch(descriptor("wine-lr"))],
        [batch(RECORDS_TOPIC, record_bytes(shifted))],
    ).drift()
    # Judged (400 records), every quantity tested: the features, wine-lr's predictions
    # and the quality labels the records carry.
    assert normal[0].judged and not normal[0].alarm and normal[0].alpha == 0.005
    quiet = {f.feature: f for f in normal[0].features}
    assert {f.quantity for f in quiet.values()} == {"feature", "prediction", "label"}
    assert all(f.HasField("p_value") and not f.drifted for f in quiet.values())
    assert drifted[0].alarm
    shifted_by = {f.feature: f for f in drifted[0].features}
    assert shifted_by["alcohol"].drifted and shifted_by["alcohol"].p_value < 1e-9
    assert shifted_by["prediction"].drifted  # wine-lr rates alcoholic wines higher
    assert not shifted_by["ph"].drifted and not shifted_by["quality"].drifted
    assert shifted_by["ph"].psi == pytest.approx(quiet["ph"].psi)
    # The drift topic's message says which model, over which records, and the worst PSI.
    (window,) = drifted
    assert (window.data_type, window.model_name, window.model_version) == ("wine", "wine-lr", "1")
    assert window.record_count == len(shifted) == shifted_by["alcohol"].record_count
    assert window.max_psi == max(f.psi for f in window.features if f.quantity == "feature")


def test_records_keep_the_old_model_while_a_new_one_loads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dataflows.control.registry as registry

    def slow_gbt(candidate: registry.Candidate) -> None:
        if candidate.descriptor.name == "wine-gbt":
            time.sleep(1.5)  # a big model, or a first PMML model starting the JVM

    monkeypatch.setattr(registry, "LOAD_CHECKS", (slow_gbt, *registry.LOAD_CHECKS))
    models = [
        model_batch(descriptor("wine-lr")),
        PAUSE(timedelta(seconds=0.5)),
        model_batch(descriptor("wine-gbt"), start=1),
    ]
    during = wine_lines(0, 40)  # arrive while wine-gbt loads
    after = wine_lines(40, 40)  # arrive once it has loaded
    records = [
        PAUSE(timedelta(seconds=0.8)),
        batch(RECORDS_TOPIC, record_bytes(during, "during-")),
        PAUSE(timedelta(seconds=2.5)),
        batch(RECORDS_TOPIC, record_bytes(after, "after-"), start=len(during)),
    ]
    out = run_flow(test_config(), models, records)
    by_id = {s.record_id: s.model_name for s in out.scored()}
    assert len(by_id) == 80
    assert {by_id[f"during-{i}"] for i in range(40)} == {"wine-lr"}
    assert {by_id[f"after-{i}"] for i in range(40)} == {"wine-gbt"}


def test_a_snapshot_keeps_control_messages_that_are_still_going_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dataflows.control.registry as registry

    release = threading.Event()

    def blocked(candidate: registry.Candidate) -> None:
        release.wait(10)

    monkeypatch.setattr(registry, "LOAD_CHECKS", (blocked, *registry.LOAD_CHECKS))
    reg = Registry(None, model_dir="")
    items = [control_in(WINE_CONTRACT.to_proto(), 0), control_in(descriptor("wine-lr"), 1)]
    out = reg.on_control(items)
    assert [type(o).__name__ for o in out] == ["ContractInstall", "ModelEvent"] and reg.loading
    state = reg.snapshot()
    assert state.current is None and [i.offset for i in state.loading] == [1]
    assert state.contract is not None and state.contract.version == 1
    release.set()
    # A process resuming from that snapshot loads the descriptor again, and installs it.
    resumed = Registry(pickle.loads(pickle.dumps(state)), model_dir="")
    out = resumed.collect(wait=True)
    assert [type(o).__name__ for o in out] == ["ModelInstall", "ModelEvent"]
    assert resumed.current is not None and resumed.current.spec.identity.name == "wine-lr"
