"""Queryable state: process-wide accounting and its read-only HTTP endpoints."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dataflows.core.events import (
    JUDGE_ACTOR,
    ModelServing,
    ModelStopped,
    PlanChanged,
    Quality,
)
from dataflows.monitoring.windows import ModelIdentity
from dataflows.observability.state import (
    RETIRED_MODELS_KEPT,
    ProcessState,
    StateServer,
    bytewax_process_id,
    cluster_hosts,
)
from dataflows.tools.broker import free_port
from dataflows.tools.cli import main
from protos import waxserve_pb2 as pb

LR = ModelIdentity("wine", "wine-lr", "1", "a" * 64, "linear regression", 1, 1_000)
GBT = ModelIdentity("wine", "wine-gbt", "1", "b" * 64, "boosted trees", 1, 2_000)


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


@pytest.fixture
def served() -> Iterator[tuple[ProcessState, StateServer]]:
    state = ProcessState(clock=lambda: 10.0)
    server = StateServer(state, "127.0.0.1:0", process_id=3)
    server.start()
    yield state, server
    server.stop()


def test_models_follow_installs_scoring_and_drift() -> None:
    state = ProcessState(clock=lambda: 10.0)
    # Two shards load wine-lr, one moves on to wine-gbt: both are held, one shard each.
    state.installed(LR, None)
    state.installed(LR, None)
    state.scored(LR, 100, 0.002, Quality(100, 25.0, 100, None))
    state.scored(LR, 50, 0.0005, None)
    state.installed(GBT, LR)
    rows = {m["name"]: m for m in state.models()}
    assert (rows["wine-lr"]["shards"], rows["wine-gbt"]["shards"]) == (1, 1)
    lr = rows["wine-lr"]
    assert lr["usage_count"] == 150 and lr["serving"]
    assert lr["mean_duration_us"] == pytest.approx(2500 / 150)
    assert lr["min_duration_us"] == pytest.approx(10.0)
    assert lr["max_duration_us"] == pytest.approx(20.0)
    assert lr["labelled_count"] == 100 and lr["rmse"] == pytest.approx(0.5)
    assert lr["accuracy"] is None
    assert rows["wine-gbt"]["usage_count"] == 0 and rows["wine-gbt"]["mean_duration_us"] is None
    # The last shard leaves wine-lr: retired, listed after the serving model.
    state.installed(GBT, LR)
    assert [(m["name"], m["serving"]) for m in state.models()] == [
        ("wine-gbt", True),
        ("wine-lr", False),
    ]
    assert state.models()[1]["retired_at_ms"] == 10_000
    # A drift window of wine-gbt shows on it, worst features first.
    drift = pb.DriftMetrics(
        data_type="wine",
        model_name="wine-gbt",
        model_version="1",
        record_count=500,
        max_psi=0.4,
        alarm=True,
        judged=True,
        alpha=0.01,
        features=[
            pb.FeatureDrift(feature="ph", psi=0.01, p_value=0.6),
            pb.FeatureDrift(feature="alcohol", psi=0.4, mean_shift_sigmas=2.5, p_value=1e-9),
            pb.FeatureDrift(feature="prediction", quantity="prediction", psi=0.5, p_value=0.2),
        ],
    )
    state.drift_closed(drift)
    gbt = state.models("wine")[0]
    assert gbt["drift"]["alarm"] and gbt["drift"]["record_count"] == 500
    assert gbt["drift"]["judged"] and gbt["drift"]["alpha"] == 0.01
    # Worst first by p-value, not by PSI.
    top = gbt["drift"]["top_features"]
    assert [f["feature"] for f in top] == ["alcohol", "prediction", "ph"]
    assert top[0]["p_value"] == 1e-9 and top[1]["quantity"] == "prediction"
    assert state.models("beer") == [] and state.data_types() == ["wine"]


def test_retired_models_are_bounded() -> None:
    state = ProcessState()
    previous = None
    for version in range(RETIRED_MODELS_KEPT + 5):
        model = ModelIdentity("wine", "m", str(version), f"{version:064x}")
        state.installed(model, previous)
        previous = model
    versions = [m["version"] for m in state.models()]
    assert len(versions) == RETIRED_MODELS_KEPT + 1
    assert versions[0] == str(RETIRED_MODELS_KEPT + 4)  # the serving one


def test_endpoints_serve_json_read_only(served: tuple[ProcessState, StateServer]) -> None:
    state, server = served
    state.installed(LR, None)
    state.scored(LR, 10, 0.001, None)
    models = get(f"{server.url}/models")
    assert [(m["name"], m["usage_count"], m["format"]) for m in models] == [("wine-lr", 10, "onnx")]
    assert get(f"{server.url}/state/wine") == models
    assert get(f"{server.url}/process")["process_id"] == 3
    with pytest.raises(urllib.error.HTTPError) as missing:
        get(f"{server.url}/state/beer")
    assert missing.value.code == 404
    assert "no model for data type 'beer'" in json.load(missing.value)["error"]
    with pytest.raises(urllib.error.HTTPError) as unknown:
        get(f"{server.url}/nope")
    assert "/state/<data_type>" in json.load(unknown.value)["endpoints"]
    post = urllib.request.Request(f"{server.url}/models", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(post, timeout=5)
    assert refused.value.code == 405


def test_processes_lists_peers_and_unreachable_ones(
    served: tuple[ProcessState, StateServer],
) -> None:
    peer_state, peer = served
    peer_state.installed(GBT, None)
    dead = f"127.0.0.1:{free_port()}"
    server = StateServer(ProcessState(), "127.0.0.1:0", process_id=0)
    server.peers = [peer.url, dead]
    server.start()
    try:
        server.peers = [*server.peers, server.url]  # a peer list naming this process too
        processes = get(f"{server.url}/processes")
    finally:
        server.stop()
    assert [p.get("process_id") for p in processes] == [0, 3, None]
    # Each process comes with its models: one request shows the whole cluster.
    assert [m["name"] for m in processes[1]["models"]] == ["wine-gbt"]
    assert processes[0]["models"] == []
    assert processes[2]["url"] == f"http://{dead}" and "unreachable" in processes[2]["error"]


def test_a_taken_port_is_a_clear_error(served: tuple[ProcessState, StateServer]) -> None:
    _, server = served
    taken = server.url.removeprefix("http://")
    with pytest.raises(RuntimeError, match=f"cannot listen on {taken}.*WAXSERVE_STATE_ADDR"):
        StateServer(ProcessState(), taken).start()


def test_process_identity_is_found_where_bytewax_finds_it() -> None:
    assert bytewax_process_id(["x", "-i", "2"], {}) == 2
    assert bytewax_process_id(["x", "--process-id=4"], {}) == 4
    assert bytewax_process_id(["x"], {"BYTEWAX_PROCESS_ID": "1"}) == 1
    pod = {"BYTEWAX_POD_NAME": "waxserve-5", "BYTEWAX_STATEFULSET_NAME": "waxserve"}
    assert bytewax_process_id(["x"], pod) == 5
    assert bytewax_process_id(["x"], {}) == 0
    addresses = "waxserve-0.waxserve:2101;waxserve-1.waxserve:2101"
    assert cluster_hosts(["x", "-a", addresses], {}) == [
        "waxserve-0.waxserve",
        "waxserve-1.waxserve",
    ]
    assert cluster_hosts(["x"], {"BYTEWAX_ADDRESSES": "a:1"}) == ["a"]


def test_status_command_prints_every_process(
    served: tuple[ProcessState, StateServer], capsys: pytest.CaptureFixture[str]
) -> None:
    state, server = served
    state.installed(LR, None)
    state.scored(LR, 1234, 0.01, Quality(1234, 1234 * 0.36, 1234, None))
    assert main(["status", "--url", server.url]) == 0
    out = capsys.readouterr().out
    assert out.startswith("process 3 ")
    assert "wine-lr:1" in out and "serving (1 shards)" in out and "scored 1,234" in out
    assert "rmse 0.600" in out
    assert main(["status", "--url", server.url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["models"][0]["usage_count"] == 1234
    assert main(["status", "--url", f"http://127.0.0.1:{free_port()}"]) == 1
    assert "waxserve status: error: cannot read" in capsys.readouterr().err


def test_drift_summaries_of_models_this_process_never_served_are_bounded() -> None:
    """The monitor of a data type may run where none of its shards do: its drift windows
    must not pile up one per model version ever published."""
    state = ProcessState(clock=lambda: 10.0)
    for version in range(3 * RETIRED_MODELS_KEPT):
        state.drift_closed(
            pb.DriftMetrics(
                data_type="wine",
                model_name="m",
                model_version=str(version),
                window_end_ms=version,
            )
        )
    kept = sorted(int(key[2]) for key in state._drift)
    assert kept == list(range(2 * RETIRED_MODELS_KEPT - 1, 3 * RETIRED_MODELS_KEPT))


def test_cluster_hosts_from_bytewaxs_hostfile(tmp_path: Path) -> None:
    """The Kubernetes pods name their peers in a hostfile (BYTEWAX_HOSTFILE_PATH), as
    Bytewax's Helm chart does; `-a` and BYTEWAX_ADDRESSES win over it, as in bytewax.run."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("waxserve-0.waxserve-cluster:9999\nwaxserve-1.waxserve-cluster:9999\n")
    env = {"BYTEWAX_HOSTFILE_PATH": str(hostfile)}
    assert cluster_hosts(["x"], env) == [
        "waxserve-0.waxserve-cluster",
        "waxserve-1.waxserve-cluster",
    ]
    assert cluster_hosts(["x"], {**env, "BYTEWAX_ADDRESSES": "a:1"}) == ["a"]
    assert cluster_hosts(["x", "-a", "b:1"], env) == ["b"]


def test_a_canary_serves_beside_the_active_model_and_status_shows_the_plan(
    served: tuple[ProcessState, StateServer], capsys: pytest.CaptureFixture[str]
) -> None:
    state, server = served
    state.on_event(ModelServing(LR, None))
    state.on_event(ModelServing(GBT, None))  # the canary joins the plan
    state.on_event(
        PlanChanged("wine", "canary wine-gbt:1 0.10 over wine-lr:1 0.90", 2, "canary", "ann@h")
    )
    state.scored(GBT, 10, 0.001, None)
    rows = {m["name"]: m for m in state.models()}
    assert rows["wine-lr"]["serving"] and rows["wine-gbt"]["serving"]
    assert main(["status", "--url", server.url]) == 0
    out = capsys.readouterr().out
    assert "wine     plan 2: canary wine-gbt:1 0.10 over wine-lr:1 0.90  (canary by ann@h)" in out
    # The judge rolls it back: the canary leaves the plan, nothing in its place.
    state.on_event(ModelStopped(GBT))
    state.on_event(PlanChanged("wine", "single wine-lr:1", 3, "rollback", JUDGE_ACTOR))
    rows = {m["name"]: m for m in state.models()}
    assert rows["wine-lr"]["serving"] and not rows["wine-gbt"]["serving"]
    assert main(["status", "--url", server.url]) == 0
    assert "plan 3: single wine-lr:1  (rollback by the rollout judge)" in capsys.readouterr().out
