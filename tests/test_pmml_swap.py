"""Loading never stalls scoring (issue 14, part 3): a new model, PMML above all, is loaded
and gated off the worker while the old one keeps serving, in the registry's process and in
any other, and switches in between two batches.

No test here reads a clock: each slow step waits until records have been scored by the old
model *while it runs*, which cannot happen if the step runs on the worker (the wait's
timeout is only a guard against hanging the suite).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any, cast

import pytest
from bytewax.testing import TestingSource
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

import dataflows.control.registry as registry
from dataflows.control.registry import (
    EVENTS_PER_CONTROL_MESSAGE,
    ContractInstall,
    ControlIn,
    ModelInstall,
    Registry,
    RuntimeCache,
)
from dataflows.core.events import BatchScored, EventBus, ModelServing
from dataflows.core.records import RawRun
from dataflows.runtimes import ModelRuntime
from dataflows.scoring.shard import ScoredBatch, ShardScorer
from protos import waxserve_pb2 as pb

PAUSE = TestingSource.PAUSE
GUARD_S = 60.0
"""How long a slow step waits for records scored meanwhile before the test gives up."""
MEANWHILE = 30
"""Records the old model must score while a slow step of the new one runs."""


class Watch:
    """What the shards report: records scored per model version, and which shards serve
    which version; slow steps wait on it."""

    def __init__(self, shards: int) -> None:
        self.shards = shards
        self.lock = threading.Condition()
        self.scored: Counter[str] = Counter()
        self.serving: Counter[str] = Counter()

    def on_event(self, event: object) -> None:
        with self.lock:
            if isinstance(event, BatchScored):
                self.scored[event.identity.version] += event.scored
            elif isinstance(event, ModelServing):
                self.serving[event.identity.version] += 1
            self.lock.notify_all()

    def scored_by(self, version: str) -> int:
        with self.lock:
            return self.scored[version]

    def all_serve(self, version: str) -> bool:
        with self.lock:
            return self.serving[version] >= self.shards

    def wait_scored(self, version: str, at_least: int) -> bool:
        """Wait until `version` has scored `at_least` records in all."""
        with self.lock:
            return self.lock.wait_for(lambda: self.scored[version] >= at_least, GUARD_S)


def slow_step(
    watch: Watch, version: str, old: str, log: list[tuple[str, bool, str]], what: str
) -> Any:
    """A check that, for descriptor `version`, lasts until the old model has scored
    MEANWHILE more records (it notes whether they came, and on which thread it ran)."""

    def check(candidate: registry.Candidate) -> None:
        if candidate.descriptor.version != version:
            return
        came = watch.wait_scored(old, watch.scored_by(old) + MEANWHILE)
        log.append((what, came, threading.current_thread().name))

    return check


@pytest.mark.parametrize("workers", [1, 2])
def test_a_pmml_swap_never_stalls_scoring(workers: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """wine-pmml-lr serves; wine-pmml-tree is published. Its load (the real PMML load plus a
    slow step) and its checks against the contract (the quality gate, plus a slow step)
    each last until wine-pmml-lr has scored more records; then every shard serves the
    tree, and records after that are the tree's. Nothing is lost, held or scored twice."""
    config = test_config()
    watch = Watch(config.shards)
    steps: list[tuple[str, bool, str]] = []
    monkeypatch.setattr(
        registry,
        "LOAD_CHECKS",
        (*registry.LOAD_CHECKS, slow_step(watch, "2", "1", steps, "load")),
    )
    monkeypatch.setattr(
        registry,
        "BIND_CHECKS",
        (*registry.BIND_CHECKS, slow_step(watch, "2", "1", steps, "gate")),
    )
    old = descriptor("wine-pmml-lr", version="1")
    new = descriptor("wine-pmml-tree", version="2")
    new.data_type = old.data_type

    def control() -> Iterator[Any]:
        yield model_batch(old)
        while watch.scored_by("1") == 0:
            yield PAUSE(timedelta(milliseconds=10))
        yield model_batch(new, start=1)
        # The control input stays open until the swap is done: at its end the registry
        # waits for whatever is loading (a bounded run must install every model it read).
        while not watch.all_serve("2"):
            yield PAUSE(timedelta(milliseconds=10))

    lines = wine_lines()
    sent: list[str] = []

    def records() -> Iterator[Any]:
        offset = 0
        while not watch.all_serve("2") and offset < 60_000:  # the bound: a guard only
            chunk = [lines[(offset + i) % len(lines)] for i in range(10)]
            sent.extend(f"r{offset}-{i}" for i in range(10))
            yield batch(RECORDS_TOPIC, record_bytes(chunk, f"r{offset}-"), start=offset)
            offset += 10
            yield PAUSE(timedelta(milliseconds=5))
        after = [lines[i] for i in range(20)]
        sent.extend(f"after-{i}" for i in range(20))
        yield batch(RECORDS_TOPIC, record_bytes(after, "after-"), start=offset)

    out = run_flow(
        config,
        cast(list[Any], control()),  # read lazily: each waits on what the flow did
        cast(list[Any], records()),
        workers=workers,
        events=EventBus(watch.on_event),
    )

    assert [(what, came) for what, came, _ in steps] == [("load", True), ("gate", True)]
    assert all(thread.startswith("waxserve-model-load") for _, _, thread in steps)
    scored = out.scored()
    by_id = Counter(s.record_id for s in scored)
    assert sorted(by_id) == sorted(sent) and set(by_id.values()) == {1}
    assert out.dead_letters() == []
    versions = {s.record_id: s.model_version for s in scored}
    assert {versions[f"after-{i}"] for i in range(20)} == {"2"}
    # Old model until the switch, then the new one: never the old one after the new.
    ordered = [s.model_version for s in sorted(scored, key=lambda s: s.source_offset)]
    switch = ordered.index("2")
    assert set(ordered[:switch]) == {"1"} and set(ordered[switch:]) == {"2"}
    assert switch >= 2 * MEANWHILE  # scored by the old model while the new one loaded
    kinds = [e.kind for e in out.events()]
    assert kinds == ["contract_installed", "installed", "installed"]


# --- the registry: checks against the contract (the gate) run on the loader -----------------


def control_in(body: pb.ModelDescriptor | pb.DataContract, offset: int) -> ControlIn:
    raw = pb.ControlMessage(
        **{"model" if isinstance(body, pb.ModelDescriptor) else "contract": body}
    )
    return ControlIn(body, CONTROL_TOPIC, 0, offset, b"wine", raw.SerializeToString())


class Gate:
    """A check against the contract that blocks until released, and says where it ran."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.entered = threading.Event()
        self.release = threading.Event()
        self.threads: list[str] = []

    def __call__(self, candidate: registry.Candidate) -> None:
        if candidate.descriptor.version == self.version:
            self.threads.append(threading.current_thread().name)
            self.entered.set()
            assert self.release.wait(GUARD_S)

    def reached(self, reg: Registry) -> list[Any]:
        """Poll the registry (as its Bytewax step does) until the check is under way."""
        out: list[Any] = []
        for _ in range(int(GUARD_S / 0.01)):
            out += reg.collect()
            if self.entered.wait(0.01):
                return out
        raise AssertionError("the check never ran")


def test_the_gate_runs_off_the_worker_and_the_old_model_serves_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gate = Gate("2")
    monkeypatch.setattr(registry, "BIND_CHECKS", (*registry.BIND_CHECKS, gate))
    reg = Registry(None, model_dir="")
    first = reg.on_control(
        [
            control_in(WINE_CONTRACT.to_proto(), 0),
            control_in(descriptor("wine-pmml-lr", version="1"), 1),
        ]
    )
    first += reg.collect(wait=True)
    assert reg.current is not None and reg.current.spec.identity.version == "1"

    out = reg.on_control([control_in(descriptor("wine-pmml-tree", version="2"), 2)])
    out += gate.reached(reg)
    # The gate is under way on the loader: nothing is installed, the old model serves.
    assert out + reg.collect() == []
    assert reg.loading and reg.current.spec.identity.version == "1"
    assert gate.threads == [gate.threads[0]] and gate.threads[0].startswith("waxserve-model-load")
    state = reg.snapshot()  # a resume would check it again
    assert [i.offset for i in state.loading] == [2] and state.awaiting is None
    gate.release.set()
    out = reg.collect(wait=True)
    assert [type(o).__name__ for o in out] == ["ModelInstall", "ModelEvent"]
    assert reg.current.spec.identity.version == "2" and not reg.loading
    event = out[1]
    assert isinstance(event, pb.ModelEvent) and event.kind == "installed"
    assert event.sequence == 3 * EVENTS_PER_CONTROL_MESSAGE  # numbered by its own offset


def test_a_model_that_waited_for_its_contract_is_gated_off_the_worker_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gate = Gate("2")
    monkeypatch.setattr(registry, "BIND_CHECKS", (*registry.BIND_CHECKS, gate))
    reg = Registry(None, model_dir="")
    reg.on_control(
        [control_in(WINE_CONTRACT.to_proto(), 0), control_in(descriptor("wine-lr", version="1"), 1)]
    )
    reg.collect(wait=True)
    newer = WINE_CONTRACT.to_proto()
    newer.version = 2
    early = descriptor("wine-gbt", version="2", contract_version=2)
    out = reg.on_control([control_in(early, 2)]) + reg.collect(wait=True)
    assert [e.kind for e in out if isinstance(e, pb.ModelEvent)] == ["awaiting_contract"]

    out = reg.on_control([control_in(newer, 3)])
    out += gate.reached(reg) + reg.collect()
    assert [type(o).__name__ for o in out] == ["ContractInstall", "ModelEvent"]
    assert reg.current is not None and reg.current.spec.identity.version == "1"
    assert reg.snapshot().awaiting is not None  # a resume would wait for a contract again
    gate.release.set()
    out = reg.collect(wait=True)
    assert [type(o).__name__ for o in out] == ["ModelInstall", "ModelEvent"]
    # Numbered as before: the contract's second event, not the descriptor's.
    assert out[1].sequence == 4 * EVENTS_PER_CONTROL_MESSAGE + 1  # type: ignore[union-attr]
    assert reg.current.spec.identity.version == "2"


def test_a_gate_rejection_keeps_the_old_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(candidate: registry.Candidate) -> None:
        if candidate.descriptor.version == "2":
            raise registry.ModelError("gate_failed", "the test gate refuses it")

    monkeypatch.setattr(registry, "BIND_CHECKS", (*registry.BIND_CHECKS, refuse))
    reg = Registry(None, model_dir="")
    reg.on_control(
        [
            control_in(WINE_CONTRACT.to_proto(), 0),
            control_in(descriptor("wine-pmml-lr", version="1"), 1),
        ]
    )
    reg.collect(wait=True)
    out = reg.on_control([control_in(descriptor("wine-pmml-tree", version="2"), 2)])
    out += reg.collect(wait=True)
    assert [type(o).__name__ for o in out] == ["DeadLetter", "ModelEvent"]
    assert out[1].kind == "rejected" and out[1].reason == "gate_failed"  # type: ignore[union-attr]
    assert reg.current is not None and reg.current.spec.identity.version == "1"


# --- a shard in a process that did not load the model ----------------------------------------


class SlowCache(RuntimeCache):
    """A process's runtime cache whose load of each gated model waits until its gate opens."""

    def __init__(self, *gated_digests: str) -> None:
        super().__init__()
        self.gates = {digest: threading.Event() for digest in gated_digests}
        self.threads: list[str] = []

    def load(self, sha256: str, *args: Any, **kwargs: Any) -> ModelRuntime:
        self.threads.append(threading.current_thread().name)
        if sha256 in self.gates:
            assert self.gates[sha256].wait(GUARD_S)
        return super().load(sha256, *args, **kwargs)


def installs_of(*descriptors: pb.ModelDescriptor) -> list[ContractInstall | ModelInstall]:
    """What a registry (in another process) sends to shards for these descriptors."""
    reg = Registry(None, model_dir="", cache=RuntimeCache())
    items = [control_in(WINE_CONTRACT.to_proto(), 0)]
    items += [control_in(d, i + 1) for i, d in enumerate(descriptors)]
    out = reg.on_control(items) + reg.collect(wait=True)
    return [o for o in out if isinstance(o, ContractInstall | ModelInstall)]


def run(lines: list[str], start: int, prefix: str) -> RawRun:
    source = batch(RECORDS_TOPIC, record_bytes(lines, prefix), start=start)
    return RawRun(
        source.topic,
        source.partition,
        source.offsets,
        source.keys,
        source.values,
        source.headers,
        data_type="wine",
    )


def scored_versions(out: list[Any]) -> list[str]:
    """The model version of each scored batch (a batch is scored by one model)."""
    versions = []
    for item in out:
        if isinstance(item, ScoredBatch):
            found = {
                pb.ScoredRecord.FromString(value).model_version for _, value, _ in item.messages
            }
            assert len(found) == 1
            versions.append(found.pop())
    return versions


def test_a_shard_in_another_process_loads_in_the_background() -> None:
    contract, first, second = installs_of(
        descriptor("wine-pmml-lr", version="1"), descriptor("wine-pmml-tree", version="2")
    )
    assert isinstance(second, ModelInstall) and isinstance(first, ModelInstall)
    first_digest, second_digest = first.spec.identity.sha256, second.spec.identity.sha256
    cache = SlowCache(first_digest, second_digest)
    loader = ThreadPoolExecutor(1, thread_name_prefix="waxserve-model-load-test")
    shard = ShardScorer(
        None, stats_interval_s=3600, drift_window_s=3600, cache=cache, loader=loader
    )
    lines = wine_lines(0, 10)
    # No model at all yet: records wait for the first one, and are scored once it loads.
    out = shard.on_values([contract, first, run(lines, 0, "a-")])
    assert scored_versions(out) == []
    cache.gates[first_digest].set()
    out = shard.release_held(force=True)  # waits for the load, then scores what waited
    assert scored_versions(out) == ["1"]
    # A new model: the old one serves while it loads in the background.
    out = shard.on_values([second, run(lines, 10, "b-")])
    out += shard.on_values([run(lines, 20, "c-")]) + shard.release_held()
    assert scored_versions(out) == ["1", "1"]
    assert shard.holds_anything and shard.next_wakeup_s() is not None
    cache.gates[second_digest].set()
    out = shard.release_held(force=True) + shard.on_values([run(lines, 30, "d-")])
    assert scored_versions(out) == ["2"]
    assert all(t.startswith("waxserve-model-load-test") for t in cache.threads)
    loader.shutdown()
