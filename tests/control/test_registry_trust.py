"""The registry under each signature policy, and its quality gate, on real models: what is
installed, what is rejected with which reason, and that the serving model keeps serving."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flowtools import WINE_CONTRACT, control_batch, descriptor

from dataflows.control.gate import reference_rows
from dataflows.control.registry import (
    ContractInstall,
    ControlIn,
    DataTypeTable,
    ModelInstall,
    Registry,
    RuntimeCache,
    decode_control,
)
from dataflows.control.signing import TrustedKeys, generate_key_pair, load_private_key, sign
from dataflows.core.descriptors import make_descriptor
from dataflows.core.events import EventBus
from dataflows.core.records import DeadLetter
from dataflows.observability.state import ProcessState
from dataflows.runtimes import load_runtime
from dataflows.scoring.shard import ShardScorer
from protos import waxserve_pb2 as pb


def control(*items: pb.ModelDescriptor | pb.DataContract) -> list[ControlIn]:
    decoded = decode_control(control_batch(*items))
    assert all(isinstance(d, ControlIn) for d in decoded)
    return decoded  # type: ignore[return-value]


def run(reg: Registry, *items: pb.ModelDescriptor | pb.DataContract) -> list[Any]:
    return reg.on_control(control(*items)) + reg.collect(wait=True)


def events(out: list[Any]) -> list[pb.ModelEvent]:
    return [e for e in out if isinstance(e, pb.ModelEvent)]


def verdicts(out: list[Any]) -> list[tuple[str, str]]:
    return [(e.kind, e.reason) for e in events(out) if e.kind in ("installed", "rejected")]


def serving(reg: Registry) -> str:
    assert reg.current is not None
    return f"{reg.current.spec.identity.name}:{reg.current.spec.identity.version}"


@pytest.fixture
def keys(tmp_path: Path) -> tuple[TrustedKeys, Ed25519PrivateKey, Path]:
    """A trusted-keys directory with one key, its private key, and the directory."""
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    private, public, _ = generate_key_pair(tmp_path / "signer", "ci")
    (trusted / "ci.pub").write_bytes(public.read_bytes())
    return TrustedKeys(trusted), load_private_key(private), trusted


def registry(policy: str, trusted: TrustedKeys | None) -> Registry:
    return Registry(
        None,
        model_dir="",
        data_types=DataTypeTable(),
        signature_policy=policy,
        trusted_keys=trusted,
    )


def signed(name: str, key: Ed25519PrivateKey, version: str = "1") -> pb.ModelDescriptor:
    desc = descriptor(name, version=version)
    sign(desc, key)
    return desc


def test_require_installs_only_what_a_trusted_key_signed(
    keys: tuple[TrustedKeys, Ed25519PrivateKey, Path],
) -> None:
    trusted, key, _ = keys
    reg = registry("require", trusted)
    out = run(reg, WINE_CONTRACT.to_proto(), signed("wine-lr", key))
    assert verdicts(out) == [("installed", "")]
    (installed,) = [e for e in events(out) if e.kind == "installed"]
    assert installed.signer_key_id == trusted.key_ids[0]
    assert installed.signature_status == "valid"
    assert installed.gate.startswith("quality gate passed: 64 reference profile rows")
    (install,) = [i for i in out if isinstance(i, ModelInstall)]
    lineage = install.spec.lineage
    assert lineage.signer_key_id == trusted.key_ids[0] and lineage.control_offset == 1

    tampered = signed("wine-gbt", key, version="2")
    tampered.description = "changed after signing"
    stranger = signed("wine-gbt", Ed25519PrivateKey.generate(), version="3")
    out = run(reg, tampered, stranger, descriptor("wine-gbt", version="4"))
    assert verdicts(out) == [
        ("rejected", "bad_signature"),
        ("rejected", "unknown_key"),
        ("rejected", "unsigned"),
    ]
    assert serving(reg) == "wine-lr:1"  # the signed model keeps serving
    dead = [d for d in out if isinstance(d, DeadLetter)]
    assert [d.reason for d in dead] == ["bad_signature", "unknown_key", "unsigned"]
    # A rejection still names who claimed to sign it.
    assert [e.signer_key_id != "" for e in events(out)] == [True, True, False]


def test_warn_installs_everything_and_says_what_it_found(
    keys: tuple[TrustedKeys, Ed25519PrivateKey, Path],
) -> None:
    trusted, _, _ = keys
    reg = registry("warn", trusted)
    stranger = signed("wine-gbt", Ed25519PrivateKey.generate(), version="2")
    out = run(reg, WINE_CONTRACT.to_proto(), descriptor("wine-lr"), stranger)
    assert verdicts(out) == [("installed", ""), ("installed", "")]
    statuses = [e.signature_status for e in events(out) if e.kind == "installed"]
    assert statuses == ["unsigned", "unknown_key"]
    assert serving(reg) == "wine-gbt:2"


def test_off_checks_nothing_but_still_reports_the_key_id(
    keys: tuple[TrustedKeys, Ed25519PrivateKey, Path],
) -> None:
    _, key, _ = keys
    reg = registry("off", None)
    tampered = signed("wine-lr", key)
    tampered.description = "changed after signing"
    out = run(reg, WINE_CONTRACT.to_proto(), tampered)
    assert verdicts(out) == [("installed", "")]
    (installed,) = [e for e in events(out) if e.kind == "installed"]
    assert installed.signature_status == "not_checked" and installed.signer_key_id


def test_a_rotated_key_is_trusted_without_a_restart(
    keys: tuple[TrustedKeys, Ed25519PrivateKey, Path], tmp_path: Path
) -> None:
    trusted, old_key, directory = keys
    reg = registry("require", trusted)
    run(reg, WINE_CONTRACT.to_proto(), signed("wine-lr", old_key))
    new_private, new_public, _ = generate_key_pair(tmp_path / "signer", "next")
    new_key = load_private_key(new_private)
    assert verdicts(run(reg, signed("wine-gbt", new_key, "2"))) == [("rejected", "unknown_key")]
    (directory / "next.pub").write_bytes(new_public.read_bytes())  # the Secret is updated
    assert verdicts(run(reg, signed("wine-gbt", new_key, "3"))) == [("installed", "")]
    (directory / "ci.pub").unlink()  # the old key is retired
    assert verdicts(run(reg, signed("wine-lr", old_key, "4"))) == [("rejected", "unknown_key")]
    assert serving(reg) == "wine-gbt:3"


def golden_set(desc: pb.ModelDescriptor, rows: int = 16) -> pb.GoldenSet:
    """The model's own outputs on profile rows, as a trainer's evaluator would give them."""
    runtime = load_runtime(desc.format, desc.model_bytes, tuple(desc.input_features))
    base = reference_rows(desc.reference_profile, runtime, list(desc.input_features))
    assert base is not None
    values = runtime.predict(base.numeric[:rows], None).values
    golden = pb.GoldenSet(evaluator="test")
    for i in range(rows):
        record = golden.inputs.add()
        for j, name in enumerate(desc.input_features):
            record.fields[name].number = float(base.numeric[i, j])
        golden.expected.add().value = float(values[i])
    return golden


def test_the_gate_rejects_wrong_outputs_and_keeps_the_old_model() -> None:
    reg = registry("off", None)
    good = descriptor("wine-lr")
    good.golden_set.CopyFrom(golden_set(good))
    out = run(reg, WINE_CONTRACT.to_proto(), good)
    assert verdicts(out) == [("installed", "")]
    (installed,) = [e for e in events(out) if e.kind == "installed"]
    assert installed.gate.startswith("quality gate passed: 16 golden set rows, outputs match")

    # wine-gbt's outputs against wine-lr's golden set: a model that is not what was trained.
    wrong = descriptor("wine-gbt", version="2")
    wrong.golden_set.CopyFrom(golden_set(descriptor("wine-lr")))
    out = run(reg, wrong)
    assert verdicts(out) == [("rejected", "gate_failed")]
    (rejected,) = [e for e in events(out) if e.kind == "rejected"]
    assert "golden rows are off by more than the tolerance 1e-06; worst: row" in rejected.message
    assert serving(reg) == "wine-lr:1"


def test_the_gate_rejects_a_model_that_returns_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    # A cache of its own: the runtime made to return NaN must not serve any other test.
    cache = RuntimeCache()
    reg = Registry(None, model_dir="", data_types=DataTypeTable(), cache=cache)
    run(reg, WINE_CONTRACT.to_proto(), descriptor("wine-lr"))
    real_load = cache.load

    def nan_for_some_rows(*args: Any, **kwargs: Any) -> Any:
        runtime = real_load(*args, **kwargs)
        predict = runtime.predict

        def predict_nan(numeric: np.ndarray, text: np.ndarray | None = None) -> Any:
            prediction = predict(numeric, text)
            prediction.values[::5] = np.nan
            prediction.valid[::5] = False
            return prediction

        runtime.predict = predict_nan  # type: ignore[method-assign]
        return runtime

    monkeypatch.setattr(cache, "load", nan_for_some_rows)
    out = run(reg, descriptor("wine-gbt", version="2"))
    assert verdicts(out) == [("rejected", "gate_failed")]
    (rejected,) = [e for e in events(out) if e.kind == "rejected"]
    assert "no valid prediction (NaN or infinite) for 13 of 64 reference profile rows" in (
        rejected.message
    )
    assert serving(reg) == "wine-lr:1"


CLASSES = ("3", "4", "5", "6", "7", "8")


def spark_random_forest(trees: int = 6) -> bytes:
    """A random forest shaped as JPMML-SparkML exports Spark's: a MiningModel averaging
    TreeModels whose leaves list only the classes their training rows had. PMML4S averages
    the missing classes as NaN, so its probabilities are NaN (the issue's Spark forest:
    NaN for some class on every row, for every class on many)."""
    fields = ("alcohol", "sulphates", "volatile_acidity")
    thresholds = (10.5, 0.6, 0.5)
    schema = '<MiningField name="quality" usageType="target"/>' + "".join(
        f'<MiningField name="{f}"/>' for f in fields
    )

    def leaf(node: str, field: str, operator: str, threshold: float, seen: list[str]) -> str:
        counts = [3 + (len(node) * 7 + k * 5) % 11 for k in range(len(seen))]
        total = sum(counts)
        distribution = "".join(
            f'<ScoreDistribution value="{c}" recordCount="{n}" probability="{n / total}"/>'
            for c, n in zip(seen, counts, strict=True)
        )
        predicate = f'<SimplePredicate field="{field}" operator="{operator}" value="{threshold}"/>'
        return (
            f'<Node id="{node}" score="{seen[0]}" recordCount="{total}">{predicate}'
            f"{distribution}</Node>"
        )

    segments = []
    for i in range(trees):
        field, threshold = fields[i % 3], thresholds[i % 3]
        low = [CLASSES[(i + k) % 6] for k in range(3)]
        high = [CLASSES[(i + 3 + k) % 6] for k in range(2)]
        segments.append(
            f'<Segment id="{i + 1}"><True/><TreeModel functionName="classification">'
            f"<MiningSchema>{schema}</MiningSchema><Node><True/>"
            + leaf(f"{i}l", field, "lessOrEqual", threshold, low)
            + leaf(f"{i}h", field, "greaterThan", threshold, high)
            + "</Node></TreeModel></Segment>"
        )
    values = "".join(f'<Value value="{c}"/>' for c in CLASSES)
    inputs = "".join(
        f'<DataField name="{f}" optype="continuous" dataType="double"/>' for f in fields
    )
    outputs = (
        '<OutputField name="prediction" optype="categorical" dataType="integer" '
        'feature="predictedValue"/>'
        + "".join(
            f'<OutputField name="probability({c})" optype="continuous" dataType="double" '
            f'feature="probability" value="{c}"/>'
            for c in CLASSES
        )
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<PMML xmlns="http://www.dmg.org/PMML-4_3" version="4.3">'
        '<Header><Application name="JPMML-SparkML" version="1.1.7"/></Header>'
        f'<DataDictionary><DataField name="quality" optype="categorical" dataType="integer">'
        f"{values}</DataField>{inputs}</DataDictionary>"
        f'<MiningModel functionName="classification"><MiningSchema>{schema}</MiningSchema>'
        f"<Output>{outputs}</Output>"
        f'<Segmentation multipleModelMethod="average">{"".join(segments)}</Segmentation>'
        "</MiningModel></PMML>"
    ).encode()


def test_a_spark_random_forest_that_pmml4s_scores_as_nan_is_rejected_not_served(
    tmp_path: Path,
) -> None:
    path = tmp_path / "winequalityRandomForestClassification.pmml"
    path.write_bytes(spark_random_forest())
    reg = registry("off", None)
    run(reg, WINE_CONTRACT.to_proto(), descriptor("wine-lr"))
    forest = make_descriptor(
        path,
        name="wine-spark-rf",
        version="1",
        data_type="wine",
        profile=descriptor("wine-lr").reference_profile,
    )
    out = run(reg, forest)
    assert verdicts(out) == [("rejected", "gate_failed")]
    (rejected,) = [e for e in events(out) if e.kind == "rejected"]
    assert "no valid prediction (NaN or infinite) for 64 of 64 reference profile rows" in (
        rejected.message
    )
    assert serving(reg) == "wine-lr:1"


def test_the_queryable_state_says_who_signed_the_serving_model_and_what_the_gate_found(
    keys: tuple[TrustedKeys, Ed25519PrivateKey, Path],
) -> None:
    trusted, key, _ = keys
    reg = registry("require", trusted)
    installs = [
        i
        for i in run(reg, WINE_CONTRACT.to_proto(), signed("wine-lr", key))
        if isinstance(i, ContractInstall | ModelInstall)
    ]
    state = ProcessState(clock=lambda: 10.0)
    shard = ShardScorer(
        None,
        stats_interval_s=10,
        drift_window_s=60,
        events=EventBus(state.on_event),
        data_types=DataTypeTable(),
    )
    shard.on_values(installs)
    (row,) = state.models("wine")
    assert row["name"] == "wine-lr" and row["serving"]
    assert row["lineage"]["signer_key_id"] == trusted.key_ids[0]
    assert row["lineage"]["signature_status"] == "valid"
    assert row["lineage"]["control_offset"] == 1 and row["lineage"]["contract_version"] == 1
    assert row["gate"].startswith("quality gate passed: 64 reference profile rows")
