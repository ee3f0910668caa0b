"""The shard scorer's limits: held records per process, data types, labels
(dataflows/scoring/shard.py)."""

from __future__ import annotations

import math
from concurrent.futures import Executor, Future
from typing import Any, cast

import numpy as np
from flowtools import WINE_CONTRACT, control_batch, descriptor, parse_csv_line, wine_lines

from dataflows.contracts.codecs import codec_for
from dataflows.contracts.schema import Encoding
from dataflows.control.registry import (
    ContractInstall,
    ControlIn,
    DataTypeTable,
    ModelInstall,
    Registry,
    RuntimeCache,
    decode_control,
)
from dataflows.core.records import DeadLetter, RawRun
from dataflows.monitoring.windows import StatsPartial
from dataflows.runtimes import Prediction
from dataflows.scoring.shard import (
    MAX_LABEL_MAGNITUDE,
    HeldBudget,
    ScoredBatch,
    ShardScorer,
    labelled_quality,
)

JSON = codec_for(WINE_CONTRACT, Encoding.JSON)


def wine_installs() -> list[ContractInstall | ModelInstall]:
    registry = Registry(None, model_dir="", data_types=DataTypeTable())
    items = [
        i
        for i in decode_control(control_batch(WINE_CONTRACT.to_proto(), descriptor("wine-lr")))
        if isinstance(i, ControlIn)
    ]
    out = registry.on_control(items) + registry.collect(wait=True)
    return [o for o in out if isinstance(o, ContractInstall | ModelInstall)]


def run_of(values: list[bytes], data_type: str = "wine", start: int = 0) -> RawRun:
    n = len(values)
    headers: list[list[tuple[str, bytes | None]]] = [
        [("content-type", b"application/json")] for _ in values
    ]
    return RawRun(
        "t", 0, list(range(start, start + n)), [None] * n, list(values), headers, data_type
    )


def records(*labels: float | None) -> list[bytes]:
    lines = wine_lines(0, len(labels))
    rows = []
    for i, (line, label) in enumerate(zip(lines, labels, strict=True)):
        row: dict[str, Any] = {**parse_csv_line(line), "record_id": f"r{i}"}
        row["quality"] = label
        rows.append(row)
    return JSON.encode(rows)


def scorer(**limits: Any) -> ShardScorer:
    limits.setdefault("data_types", DataTypeTable())
    limits.setdefault("held_budget", HeldBudget())
    return ShardScorer(None, stats_interval_s=3600, drift_window_s=3600, **limits)


def reasons(out: list[Any]) -> list[tuple[int, str]]:
    return [(d.offset, d.reason) for d in out if isinstance(d, DeadLetter)]


def test_held_records_are_bounded_by_bytes_over_every_shard_of_the_process() -> None:
    budget = HeldBudget()
    one, two = (
        scorer(held_budget=budget, max_held_bytes=2000),
        scorer(held_budget=budget, max_held_bytes=2000),
    )
    big = run_of([b"x" * 1200])
    assert one.on_values([big]) == []  # held: no contract yet
    assert budget.total() == (1, big.size_bytes)
    out = two.on_values([run_of([b"y" * 1200], start=5)])
    assert reasons(out) == [(5, "held_overflow")]
    dead = out[0]
    assert isinstance(dead, DeadLetter)
    assert dead.max_message_bytes == 1_000_000 and "max_held_bytes 2,000" in dead.message
    # The first shard gets its contract and model: its records are scored and leave the budget.
    out = one.on_values(wine_installs())
    assert reasons(out) == [(0, "undecodable")] and budget.total() == (0, 0)
    assert two.on_values([run_of([b"y" * 1200], start=6)]) == []  # room again


def test_held_records_are_bounded_by_count_too() -> None:
    shard = scorer(max_held_records=3)
    assert shard.on_values([run_of(records(5, 5))]) == []
    out = shard.on_values([run_of(records(5, 5), start=2)])
    assert reasons(out) == [(2, "held_overflow"), (3, "held_overflow")]
    out = shard.on_values(wine_installs())
    assert sum(len(b.messages) for b in out if isinstance(b, ScoredBatch)) == 2


def test_records_of_a_new_data_type_past_max_data_types_are_refused_not_held() -> None:
    table = DataTypeTable()
    shard = scorer(data_types=table, max_data_types=2, max_message_bytes=50_000)
    assert shard.on_values([run_of([b"{}"], "a"), run_of([b"{}"], "b", start=1)]) == []
    out = shard.on_values([run_of([b"{}"], "c", start=2)])
    assert reasons(out) == [(2, "too_many_data_types")]
    assert isinstance(out[0], DeadLetter) and out[0].max_message_bytes == 50_000
    assert "c" not in shard.state.data_types and len(table) == 2
    # Installs always get state (the registry bounds them), and scoring goes on.
    out = shard.on_values(wine_installs())
    assert "wine" in table and len(table) == 3
    out = shard.release_held(force=True)  # "a" and "b" had no contract: dead letters, gone
    assert sorted(reasons(out)) == [(0, "no_contract"), (1, "no_contract")]
    assert set(shard.state.data_types) == {"wine"} and len(table) == 1


def test_a_label_past_the_bound_is_a_dead_letter_and_quality_stays_finite() -> None:
    shard = scorer()
    shard.on_values(wine_installs())
    labels = [5.0, 3.8e294, -1e13, MAX_LABEL_MAGNITUDE, None]
    out = shard.on_values([run_of(records(*labels))])
    assert reasons(out) == [(1, "bad_label"), (2, "bad_label")]
    assert "beyond ±1e+12" in next(d for d in out if isinstance(d, DeadLetter)).message
    (scored,) = [b for b in out if isinstance(b, ScoredBatch)]
    assert scored.offsets == [0, 3, 4]  # the label at the bound, and none, are scored
    (stats,) = [p for p in shard.close_windows(everything=True) if isinstance(p, StatsPartial)]
    assert stats.stats.labelled == 2 and math.isfinite(stats.stats.rmse or math.nan)


def test_predictions_past_the_bound_are_left_out_of_the_squared_error() -> None:
    values = np.array([5.0, 1e200, np.inf, 6.0])
    prediction = Prediction(values, None, None, (), np.isfinite(values))
    quality = labelled_quality(prediction, np.array([5.0, 5.0, 5.0, np.nan]))
    assert quality is not None
    assert (quality.labelled, quality.squared_count, quality.squared_error) == (2, 1, 0.0)


class ManualLoader:
    """An Executor whose loads finish when the test says (`finish`)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...]]] = []
        self.futures: list[Future[Any]] = []

    def submit(self, fn: Any, *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self.calls.append((fn, args))
        self.futures.append(future)
        return future

    def finish(self) -> None:
        for (fn, args), future in zip(self.calls, self.futures, strict=True):
            if not future.done():
                future.set_result(fn(*args))


def scored_count(out: list[Any]) -> int:
    return sum(len(o.messages) for o in out if isinstance(o, ScoredBatch))


def test_records_wait_for_a_model_that_loads_here_however_long_it_takes() -> None:
    # The first model load in a process took 4.6 s on a busy machine, past the 5 s the
    # records had already waited: they were dead letters (no_model) while it loaded.
    contract, model = wine_installs()
    now = [1000.0]
    loader = ManualLoader()
    shard = scorer(
        cache=RuntimeCache(),
        loader=cast(Executor, loader),
        clock=lambda: now[0],
        no_model_wait_s=5,
    )
    assert shard.on_values([contract, run_of(records(5, 6))]) == []
    now[0] += 3
    assert shard.on_values([model]) == []  # loading in the background
    now[0] += 60
    assert reasons(shard.release_held()) == []
    loader.finish()
    assert scored_count(shard.release_held()) == 2


def test_a_restored_shard_serves_the_model_the_registry_resent_to_the_logic_it_replaced() -> None:
    # On a resume Bytewax gave the registry's re-sent install to a shard logic it built
    # fresh, then replaced that logic with the one restored from the snapshot.
    contract, model = wine_installs()
    assert isinstance(contract, ContractInstall) and isinstance(model, ModelInstall)
    resent = ModelInstall(model.spec, model.model_bytes, restored=True)
    loader = ManualLoader()
    cache = RuntimeCache()
    running = scorer(cache=cache, loader=cast(Executor, loader), no_model_wait_s=5)
    running.on_values([contract, model])
    loader.finish()
    assert running.release_held() == []
    snapshot = running.state.snapshot()

    cache = RuntimeCache()  # a new process
    fresh = scorer(cache=cache, loader=cast(Executor, loader), no_model_wait_s=5)
    assert fresh.on_values([ContractInstall(contract.contract, restored=True), resent]) == []
    restored = ShardScorer(
        snapshot,
        stats_interval_s=3600,
        drift_window_s=3600,
        cache=cache,
        loader=cast(Executor, loader),
        data_types=DataTypeTable(),
        held_budget=HeldBudget(),
        no_model_wait_s=5,
    )
    assert restored.on_values([run_of(records(5, 6, 7))]) == []  # the load is under way
    loader.finish()
    assert scored_count(restored.release_held()) == 3
