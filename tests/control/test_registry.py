"""The registry's limits: sizes, data types, hostile descriptors (dataflows/control/registry.py)."""

from __future__ import annotations

import dataclasses
import gc
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from flowtools import WINE_CONTRACT, control_batch, descriptor

from dataflows.contracts.schema import Contract
from dataflows.control.registry import (
    MAX_EVENT_TEXT,
    MAX_NAME_LENGTH,
    RUNTIMES,
    Candidate,
    CodecCache,
    ControlIn,
    DataTypeTable,
    ModelInstall,
    Registry,
    check_outputs,
    decode_control,
    read_model_bytes,
)
from dataflows.core.records import DeadLetter
from dataflows.runtimes import ModelError
from protos import waxserve_pb2 as pb

LIMIT = 20_000  # max_message_bytes of these registries


def control(*items: pb.ModelDescriptor | pb.DataContract) -> list[ControlIn]:
    decoded = decode_control(control_batch(*items))
    assert all(isinstance(d, ControlIn) for d in decoded)
    return decoded  # type: ignore[return-value]


def registry(table: DataTypeTable | None = None, **limits: Any) -> Registry:
    return Registry(
        None,
        model_dir=limits.pop("model_dir", ""),
        data_types=table if table is not None else DataTypeTable(),
        max_message_bytes=LIMIT,
        **limits,
    )


def run(reg: Registry, *items: pb.ModelDescriptor | pb.DataContract) -> list[Any]:
    out = reg.on_control(control(*items))
    return out + reg.collect(wait=True)


def rejections(out: list[Any]) -> list[tuple[str, str]]:
    return [(e.kind, e.reason) for e in out if isinstance(e, pb.ModelEvent) and e.reason]


def test_a_descriptor_past_max_model_bytes_is_rejected_unloaded_and_the_old_model_serves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reg = registry(max_model_bytes=10_000)
    run(reg, WINE_CONTRACT.to_proto(), descriptor("wine-lr"))
    assert reg.current is not None and reg.current.spec.identity.name == "wine-lr"
    loads: list[str] = []
    monkeypatch.setattr(RUNTIMES, "load", lambda *a, **k: loads.append("load"))
    out = run(reg, descriptor("wine-gbt"))  # 78 kB of model
    assert rejections(out) == [("rejected", "model_too_large")]
    assert loads == []  # never loaded
    assert reg.current.spec.identity.name == "wine-lr"  # still serving
    (dead,) = [d for d in out if isinstance(d, DeadLetter)]
    assert "more than max_model_bytes (10,000)" in dead.message
    # The rejected descriptor (with its model) is cut to fit the dead-letter topic.
    _, value, headers = dead.to_message()
    assert len(value or b"") < LIMIT and dict(headers or [])["waxserve.truncated"] == b"true"


def test_a_model_file_past_the_limit_is_not_read_and_a_fifo_does_not_hang(
    tmp_path: Path,
) -> None:
    big = tmp_path / "big.onnx"
    big.write_bytes(b"\0" * 5000)
    desc = descriptor("wine-lr")
    desc.location = big.as_uri()
    with pytest.raises(ModelError, match="more than max_model_bytes") as err:
        read_model_bytes(desc, str(tmp_path), max_bytes=4096)
    assert err.value.reason == "model_too_large"
    fifo = tmp_path / "fifo.onnx"
    os.mkfifo(fifo)
    desc.location = fifo.as_uri()
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            read_model_bytes(desc, str(tmp_path))
        except ModelError as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(30)  # only a regression waits this long
    if reader.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # let the stuck reader go
        pytest.fail("reading a FIFO location blocked")
    assert [e.reason for e in outcome] == ["location_unreadable"]  # type: ignore[attr-defined]


def test_new_data_types_past_max_data_types_are_rejected_and_empty_ones_leave() -> None:
    table = DataTypeTable()
    regs = [registry(table, max_data_types=2) for _ in range(4)]
    wine_a = dataclasses.replace(WINE_CONTRACT, data_type="a").to_proto()
    wine_b = dataclasses.replace(WINE_CONTRACT, data_type="b").to_proto()
    wine_c = dataclasses.replace(WINE_CONTRACT, data_type="c").to_proto()
    assert rejections(run(regs[0], wine_a)) == []
    bad = dataclasses.replace(WINE_CONTRACT, data_type="x").to_proto()
    bad.ClearField("fields")
    assert rejections(run(regs[1], bad)) == [("contract_rejected", "bad_contract")]
    assert len(table) == 1  # a registry left with nothing holds no room
    assert rejections(run(regs[2], wine_b)) == []
    out = run(regs[3], wine_c, descriptor("wine-lr", data_type="c"))
    assert rejections(out) == [
        ("contract_rejected", "too_many_data_types"),
        ("rejected", "too_many_data_types"),
    ]
    assert len(table) == 2 and "c" not in table
    # Dropped registries (a finished run) stop counting, released or not.
    del regs
    gc.collect()
    assert len(table) == 0


def test_a_resumed_registry_keeps_its_data_type_whatever_the_limit() -> None:
    table = DataTypeTable()
    first = registry(table, max_data_types=1)
    run(first, WINE_CONTRACT.to_proto(), descriptor("wine-lr"))
    state = first.snapshot()
    del first
    gc.collect()
    other = registry(table, max_data_types=1)
    run(other, dataclasses.replace(WINE_CONTRACT, data_type="other").to_proto())
    resumed = Registry(state, model_dir="", data_types=table, max_data_types=1)
    assert "wine" in table and len(table) == 2
    assert isinstance(resumed.on_resume()[1], ModelInstall)


def test_hostile_descriptor_texts_are_refused_and_events_stay_small() -> None:
    reg = registry()
    run(reg, WINE_CONTRACT.to_proto())
    long_name = descriptor("wine-gbt")
    long_name.name = "n" * 100_000
    out = run(reg, long_name)
    assert rejections(out) == [("rejected", "bad_descriptor")]
    (event,) = [e for e in out if isinstance(e, pb.ModelEvent)]
    assert len(event.model_name) <= MAX_NAME_LENGTH and len(event.message) <= MAX_EVENT_TEXT
    assert event.ByteSize() < 4 * (MAX_NAME_LENGTH + MAX_EVENT_TEXT)
    (dead,) = decode_control(control_batch(descriptor("wine-lr", data_type="d" * 500)))
    assert isinstance(dead, DeadLetter) and dead.reason == "bad_descriptor"
    assert "more than 128" in dead.message


def test_a_contract_that_trips_a_check_is_a_rejection_not_a_crash() -> None:
    deep = WINE_CONTRACT.to_proto()
    deep.encoding = pb.ENCODING_AVRO
    deep.avro.writer_schema = "[" * 100_000 + "]" * 100_000  # RecursionError in json
    reg = registry()
    out = run(reg, deep)
    assert rejections(out) == [("contract_rejected", "bad_contract")]
    assert reg.contract is None and not reg.holds_anything


def _many_bins(profile: pb.ReferenceProfile) -> None:
    feature = profile.features[0]
    del feature.bin_edges[:], feature.expected_fractions[:]
    feature.bin_edges.extend(range(10_000))
    feature.expected_fractions.extend([1 / 10_001] * 10_001)


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda p: setattr(p.features[0], "mean", float("nan")), "must be finite"),
        (lambda p: setattr(p.features[0], "std", -1.0), "std must be finite and >= 0"),
        (lambda p: p.features[0].bin_edges.append(float("inf")), "must be finite"),
        (lambda p: p.features[0].expected_fractions.__setitem__(0, -0.5), "finite and >= 0"),
        (_many_bins, "more than half of max_message_bytes"),
    ],
)
def test_a_profile_that_would_break_drift_metrics_is_refused(change: Any, problem: str) -> None:
    reg = registry()
    desc = descriptor("wine-lr")
    change(desc.reference_profile)
    out = run(reg, WINE_CONTRACT.to_proto(), desc)
    assert rejections(out) == [("rejected", "bad_profile")]
    (dead,) = [d for d in out if isinstance(d, DeadLetter)]
    assert problem in dead.message


def test_a_model_whose_class_labels_would_not_fit_a_scored_record_is_refused() -> None:
    @dataclasses.dataclass
    class Labels:
        class_labels: tuple[str, ...]

    candidate = Candidate(descriptor("wine-lr"), "", 1, RUNTIMES, max_message_bytes=LIMIT)
    candidate.runtime = Labels(("yes", "no"))  # type: ignore[assignment]
    check_outputs(candidate)
    candidate.runtime = Labels(tuple("x" * 100 + str(i) for i in range(100)))  # type: ignore[assignment]
    with pytest.raises(ModelError, match="class labels") as err:
        check_outputs(candidate)
    assert err.value.reason == "unsupported_model"


def test_the_codec_cache_keeps_a_few_versions_of_each_data_type() -> None:
    cache = CodecCache(versions_kept=2)
    for version in range(1, 6):
        cache.get(dataclasses.replace(WINE_CONTRACT, version=version))
    cache.get(dataclasses.replace(WINE_CONTRACT, data_type="other"))
    assert sorted(cache._codecs) == [("other", 1), ("wine", 4), ("wine", 5)]
    old = dataclasses.replace(WINE_CONTRACT, version=1)
    assert isinstance(cache.get(old).contract, Contract)  # built again when asked for


def _kinds(out: list[Any]) -> list[str]:
    return [e.kind for e in out if isinstance(e, pb.ModelEvent)]


def test_a_model_before_its_contract_waits_for_it_across_a_snapshot() -> None:
    # A compacted control topic keeps a model and the newest contract, in that order.
    reg = registry()
    assert _kinds(run(reg, descriptor("wine-lr"))) == ["awaiting_contract"]
    assert reg.holds_anything and reg.current is None
    state = reg.snapshot()
    assert state.awaiting is not None

    resumed = Registry(state, model_dir="", data_types=DataTypeTable(), max_message_bytes=LIMIT)
    out = resumed.on_resume() + resumed.collect(wait=True)
    assert _kinds(out) == ["awaiting_contract"]  # loaded again, still waiting
    out = run(resumed, WINE_CONTRACT.to_proto())
    assert _kinds(out) == ["contract_installed", "installed"]
    assert resumed.current is not None and resumed.current.spec.identity.name == "wine-lr"
    # Numbered by the control message that made them (the contract, at offset 0): a
    # replay numbers its events as the first run did, whatever state it dropped.
    assert [e.sequence for e in out if isinstance(e, pb.ModelEvent)] == [16, 17]


def test_a_newer_model_takes_the_place_of_the_one_waiting() -> None:
    reg = registry()
    run(reg, descriptor("wine-lr"))
    out = run(reg, descriptor("wine-gbt"))
    assert rejections(out) == [("rejected", "no_contract")]
    assert [d.value for d in out if isinstance(d, DeadLetter)]  # the older one, whole
    out = run(reg, WINE_CONTRACT.to_proto())
    assert _kinds(out) == ["contract_installed", "installed"]
    assert reg.current is not None and reg.current.spec.identity.name == "wine-gbt"
