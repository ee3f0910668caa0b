"""Helpers for flow tests: build input batches, run the flow in-process, read outputs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.recovery import RecoveryConfig
from bytewax.testing import TestingSink, TestingSource, cluster_main, run_main

from dataflows.contracts.codecs import codec_for
from dataflows.contracts.files import load_contract
from dataflows.contracts.schema import Encoding
from dataflows.core.config import Config
from dataflows.core.descriptors import catalog_contracts, control_message, load_catalog
from dataflows.core.events import EventBus
from dataflows.core.records import Headers, OutMessage, SourceBatch
from dataflows.serving import CONTROL_SINK, SHADOW_SINK, SINK_NAMES, build_flow
from protos import waxserve_pb2 as pb

REPO = Path(__file__).resolve().parents[1]
WINE_CSV = REPO / "models" / "data" / "winequality_red.csv"
ERROR_CSV = REPO / "models" / "data" / "error_winequality_red.csv"
CATALOG = load_catalog()
WINE_CONTRACT = load_contract(catalog_contracts()["wine"])
WINE_FEATURES: tuple[str, ...] = tuple(WINE_CONTRACT.csv_columns[:-1])
"""The 11 wine features, in the data file's column order."""
WINE_PROTOBUF = codec_for(WINE_CONTRACT, Encoding.PROTOBUF)
WINE_CSV_CODEC = codec_for(WINE_CONTRACT, Encoding.CSV)

CONTROL_TOPIC = "control"
RECORDS_TOPIC = "records"


def parse_csv_line(line: str) -> dict[str, float | None]:
    """A wine CSV line as field values (None where a cell is empty)."""
    cells = line.split(";")
    return {
        name: float(cell) if cell.strip() else None
        for name, cell in zip(WINE_CONTRACT.csv_columns, cells, strict=True)
    }


def wine_record(
    values: dict[str, float | None], *, record_id: str = "", event_time_ms: int = 0
) -> bytes:
    """A wine record in the wine contract's protobuf encoding."""
    row: dict[str, object] = {k: v for k, v in values.items() if v is not None}
    if record_id:
        row["record_id"] = record_id
    if event_time_ms:
        row["event_time_ms"] = event_time_ms
    return WINE_PROTOBUF.encode([row])[0]


def wine_lines(start: int = 0, count: int | None = None) -> list[str]:
    """Lines of the wine CSV."""
    lines = WINE_CSV.read_text().splitlines()
    return lines[start:] if count is None else lines[start : start + count]


def record_bytes(lines: Iterable[str], id_prefix: str = "r") -> list[bytes]:
    """Each CSV line as a serialized WineRecord."""
    return [
        wine_record(parse_csv_line(line), record_id=f"{id_prefix}{i}", event_time_ms=1)
        for i, line in enumerate(lines)
    ]


def batch(
    topic: str,
    values: Sequence[bytes | None],
    *,
    partition: int = 0,
    start: int = 0,
    headers: Sequence[Headers] | None = None,
) -> SourceBatch:
    """A SourceBatch of these values at consecutive offsets."""
    return SourceBatch(
        topic=topic,
        partition=partition,
        offsets=list(range(start, start + len(values))),
        keys=[None] * len(values),
        values=list(values),
        headers=list(headers) if headers is not None else [[] for _ in values],
    )


def csv_batch(lines: Sequence[str], *, partition: int = 0, start: int = 0) -> SourceBatch:
    """Raw CSV lines as text/csv records."""
    return batch(
        RECORDS_TOPIC,
        [line.encode() for line in lines],
        partition=partition,
        start=start,
        headers=[[("content-type", b"text/csv")] for _ in lines],
    )


def descriptor(name: str, *, version: str | None = None, **changes: Any) -> pb.ModelDescriptor:
    """Catalog model's descriptor, with fields changed."""
    desc = CATALOG[name].descriptor(version=version)
    for key, value in changes.items():
        setattr(desc, key, value)
    return desc


def control_batch(
    *items: pb.ModelDescriptor | pb.DataContract | pb.PlanCommand, start: int = 0
) -> SourceBatch:
    """Descriptors and contracts as a control-topic batch."""
    return batch(CONTROL_TOPIC, [control_message(i) for i in items], start=start)


def model_batch(*descriptors: pb.ModelDescriptor, start: int = 0) -> SourceBatch:
    """Descriptors as a control-topic batch; the first batch (start 0) carries the wine
    contract first, as `waxserve contract publish` would have sent it."""
    items: list[pb.ModelDescriptor | pb.DataContract] = list(descriptors)
    if start == 0:
        items.insert(0, WINE_CONTRACT.to_proto())
    else:
        start += 1  # the contract took offset 0
    return control_batch(*items, start=start)


@dataclass
class Outputs:
    """Everything the sinks received, by sink name."""

    items: dict[str, list[Any]] = field(
        default_factory=lambda: {n: [] for n in (*SINK_NAMES, SHADOW_SINK, CONTROL_SINK)}
    )

    def messages(self, sink: str) -> list[OutMessage]:
        """Every message written to a sink, in order."""
        return [m for _route, batch in self.items[sink] for m in batch.messages]

    def scored(self) -> list[pb.ScoredRecord]:
        """Scored-topic messages, decoded."""
        return [pb.ScoredRecord.FromString(v) for _k, v, _h in self.messages("scored")]

    def commands(self) -> list[pb.PlanCommand]:
        """Plan commands the rollout judge sent to the control topic."""
        return [pb.ControlMessage.FromString(v).plan for _k, v, _h in self.messages(CONTROL_SINK)]

    def shadow(self) -> list[pb.ScoredRecord]:
        """Shadow-topic messages, decoded."""
        return [pb.ScoredRecord.FromString(v) for _k, v, _h in self.messages(SHADOW_SINK)]

    def stats(self) -> list[pb.ServingStats]:
        """Stats-topic messages, decoded."""
        return [pb.ServingStats.FromString(v) for _k, v, _h in self.messages("stats")]

    def drift(self) -> list[pb.DriftMetrics]:
        """Drift-topic messages, decoded."""
        return [pb.DriftMetrics.FromString(v) for _k, v, _h in self.messages("drift")]

    def events(self) -> list[pb.ModelEvent]:
        """Events-topic messages, decoded."""
        return [pb.ModelEvent.FromString(v) for _k, v, _h in self.messages("events")]

    def dead_letters(self) -> list[tuple[dict[str, str], bytes | None]]:
        """DLQ messages as (headers, original value)."""
        return [
            ({k: (h or b"").decode() for k, h in headers or []}, value)
            for _key, value, headers in self.messages("dlq")
        ]


class _CrashingPartition(StatelessSinkPartition[Any]):
    def __init__(self, inner: list[Any], crash: CrashOnce) -> None:
        self._inner = inner
        self._crash = crash

    def write_batch(self, items: list[Any]) -> None:
        self._inner.extend(items)
        self._crash.seen += len(items)
        if not self._crash.fired and self._crash.seen >= self._crash.after_items:
            self._crash.fired = True
            raise RuntimeError("test crash: the process dies here")


@dataclass
class CrashOnce:
    """Makes a sink raise once after it has written `after_items` items (an abort that
    also works with several workers, unlike TestingSource.ABORT)."""

    after_items: int
    seen: int = 0
    fired: bool = False


class CrashingSink(DynamicSink[Any]):
    """TestingSink that crashes the dataflow once."""

    def __init__(self, items: list[Any], crash: CrashOnce) -> None:
        self._items = items
        self._crash = crash

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _CrashingPartition:
        return _CrashingPartition(self._items, self._crash)


def test_config(**changes: Any) -> Config:
    """Config for in-process flow tests: short windows, no waiting for models."""
    base = Config(
        shards=4,
        stats_interval_s=3600,
        drift_window_s=3600,
        no_model_wait_s=30,
        records_topics=f"{RECORDS_TOPIC}=wine",
    )
    return dataclasses.replace(base, **changes)


test_config.__test__ = False  # type: ignore[attr-defined]


def run_flow(
    config: Config,
    models: list[Any],
    records: list[Any],
    *,
    workers: int = 1,
    outputs: Outputs | None = None,
    recovery: Path | None = None,
    crash: CrashOnce | None = None,
    crash_sink: str = "scored",
    events: EventBus | None = None,
    feedback: list[Any] | None = None,
    clock: Callable[[], float] | None = None,
) -> Outputs:
    """Run the flow to completion over scripted inputs; return what the sinks got.

    `feedback`: the feedback topic's items (labels that arrive later), when given.
    """
    outputs = outputs or Outputs()
    sinks: dict[str, Any] = {
        name: TestingSink(outputs.items[name]) for name in (*SINK_NAMES, SHADOW_SINK, CONTROL_SINK)
    }
    if crash is not None:
        sinks[crash_sink] = CrashingSink(outputs.items[crash_sink], crash)
    sources: dict[str, Any] = {"control": TestingSource(models), "records": TestingSource(records)}
    if feedback is not None:
        sources["feedback"] = TestingSource(feedback)
    options: dict[str, Any] = {}
    if events is not None:
        options["events"] = events
    if clock is not None:
        options["clock"] = clock
    flow = build_flow(config, sources, sinks, **options)
    recovery_config = RecoveryConfig(str(recovery)) if recovery is not None else None
    epoch = timedelta(0)
    if workers == 1:
        run_main(flow, epoch_interval=epoch, recovery_config=recovery_config)
    else:
        cluster_main(
            flow,
            [],
            0,
            epoch_interval=epoch,
            recovery_config=recovery_config,
            worker_count_per_proc=workers,
        )
    return outputs
