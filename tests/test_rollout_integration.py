"""Serving plans on Apache Kafka (issue 15): a canary decided by the rollout judge on labels,
the decision travelling through the control topic like anyone's command.

`python -m bytewax.run` with delayed labels on; the candidate is published staged and put in
a canary by a PlanCommand; records, then their labels. A good candidate (wine-gbt) is
promoted, a bad one (wine-lr fed its features in the wrong order) rolled back, and the
records that follow are scored by the model the decision left serving.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from pathlib import Path

import pytest
from flowtools import WINE_PROTOBUF, descriptor, record_bytes, wine_lines
from test_integration import Dataflow, Reader, produce, publish

from dataflows.core.config import Config
from dataflows.core.descriptors import control_message
from dataflows.tools.broker import control_message_key, free_port
from protos import waxserve_pb2 as pb

pytestmark = pytest.mark.integration

GBT = descriptor("wine-gbt", stage="staged")
BAD_LR = descriptor("wine-lr", version="2-shuffled", stage="staged")
BAD_LR.input_features[:] = list(reversed(BAD_LR.input_features))


def send(config: Config, command: pb.PlanCommand) -> None:
    """A plan command on the control topic, as `waxserve plan` sends it."""
    produce(
        config, config.control_topic, [control_message(command)], key=control_message_key(command)
    )


def plan_events(reader: Reader, config: Config) -> list[pb.ModelEvent]:
    return [e for e in reader.events(config) if e.kind in ("plan_changed", "plan_rejected")]


@pytest.mark.parametrize(
    ("candidate", "decision", "serving"),
    [(GBT, "promote", "wine-gbt"), (BAD_LR, "rollback", "wine-lr")],
    ids=["good-candidate-promoted", "bad-candidate-rolled-back"],
)
def test_the_judge_decides_a_canary_on_labels_through_the_control_topic(
    kafka_config: Config,
    tmp_path: Path,
    candidate: pb.ModelDescriptor,
    decision: str,
    serving: str,
) -> None:
    config = kafka_config
    reader = Reader(config, config.scored_topic, config.events_topic, config.dlq_topic)
    publish(config, descriptor("wine-lr"))
    publish(config, candidate)
    key = f"{candidate.name}:{candidate.version}"
    canary = pb.PlanCommand(
        data_type="wine",
        action=pb.CANARY,
        variants=[pb.PlanVariant(model=key, weight=0.5)],
        actor="tester@ci",
        issued_at_ms=1,
    )
    send(config, canary)
    flow = Dataflow(config, tmp_path, WAXSERVE_FEEDBACK_DATA_TYPES="wine")
    try:
        reader.wait_for(
            "the canary",
            lambda: [e.plan_action for e in plan_events(reader, config)] == ["canary"],
            flow,
        )
        lines = wine_lines()
        produce(config, config.records_topic, record_bytes(lines, id_prefix="r"), partitions=2)
        ids = lambda: {s.record_id for s in reader.scored(config)}  # noqa: E731
        reader.wait_for("every record scored", lambda: len(ids()) >= len(lines), flow)
        assert {s.model_name for s in reader.scored(config)} == {"wine-lr", candidate.name}
        labels = [
            {"record_id": f"r{i}", "quality": float(line.split(";")[-1])}
            for i, line in enumerate(lines)
        ]
        produce(config, config.feedback_topic, WINE_PROTOBUF.encode(labels))

        def decided() -> bool:
            return any(e.actor == "waxserve rollout judge" for e in plan_events(reader, config))

        reader.wait_for("the judge's decision", decided, flow, timeout=120)
        judged = plan_events(reader, config)[-1]
        assert (judged.kind, judged.plan_action) == ("plan_changed", decision), judged
        assert judged.message.startswith(f"canary {key} against wine-lr:1: ")
        assert judged.plan.startswith("single ") and serving in judged.plan

        # What follows is scored by the model the decision left serving, under its plan.
        before = len(reader.scored(config))
        more = record_bytes(wine_lines(0, 200), id_prefix="after-")
        produce(config, config.records_topic, more, partitions=2)

        def after() -> list[pb.ScoredRecord]:
            scored = reader.scored(config)[before:]
            return [s for s in scored if s.record_id.startswith("after-")]

        reader.wait_for("the records after the decision", lambda: len(after()) >= 200, flow)
        assert {(s.model_name, s.policy, s.plan_number) for s in after()} == {
            (serving, "single", judged.plan_number)
        }
    finally:
        flow.stop()


def test_in_a_two_process_cluster_no_record_is_scored_under_an_older_plan_after_a_newer(
    kafka_config: Config, tmp_path: Path
) -> None:
    """Plan commands while records stream into 2 partitions read by a 2-process cluster:
    within each partition, in offset order, the plan numbers never go down. (It waited for
    every record, not for the last commands' answers: under load it read only two.)"""
    config = kafka_config
    reader = Reader(config, config.scored_topic, config.events_topic, config.dlq_topic)
    publish(config, descriptor("wine-lr"))
    publish(config, GBT)
    addresses = ";".join(f"127.0.0.1:{free_port()}" for _ in range(2))
    cluster = [
        Dataflow(config, tmp_path, "-i", str(i), "-a", addresses, "-w", "1") for i in range(2)
    ]
    lr, gbt = "wine-lr:1", f"{GBT.name}:{GBT.version}"
    commands = [
        (pb.CANARY, [(gbt, 0.3)]),
        (pb.SET_WEIGHTS, [(gbt, 0.6)]),
        (pb.PROMOTE, []),
        (pb.ROLLBACK, []),
        (pb.SPLIT, [(lr, 0.5), (gbt, 0.5)]),
    ]
    # The feed runs until told to stop, at a pace a busy machine keeps up with; each
    # command goes once the one before has been applied and 400 more records scored.
    lines = itertools.cycle(wine_lines())
    stop = threading.Event()
    fed = [0]

    def feed() -> None:
        while not stop.is_set():
            chunk = record_bytes([next(lines) for _ in range(100)], id_prefix=f"f{fed[0]}-")
            produce(config, config.records_topic, chunk, partitions=2)
            fed[0] += len(chunk)
            time.sleep(0.1)

    def applied(count: int) -> bool:
        return sum(e.kind == "plan_changed" for e in plan_events(reader, config)) >= count

    feeder = threading.Thread(target=feed, daemon=True)
    try:
        reader.wait_for(
            "the first plan",
            lambda: bool(reader.scored(config)) or _installed(reader, config),
            cluster[0],
        )
        feeder.start()
        for i, (action, variants) in enumerate(commands):
            at = len(reader.scored(config)) + 400
            reader.wait_for(
                f"{at} scored", functools.partial(_scored_at_least, reader, config, at), cluster[0]
            )
            command = pb.PlanCommand(
                data_type="wine",
                action=action,
                variants=[pb.PlanVariant(model=m, weight=w) for m, w in variants],
                actor="tester@ci",
                issued_at_ms=i + 1,
            )
            send(config, command)
            reader.wait_for(
                f"command {i + 1} applied", functools.partial(applied, i + 1), cluster[0]
            )
        at = len(reader.scored(config)) + 400
        reader.wait_for(
            f"{at} scored", functools.partial(_scored_at_least, reader, config, at), cluster[0]
        )
        stop.set()
        feeder.join()
        ids = lambda: {s.record_id for s in reader.scored(config)}  # noqa: E731
        reader.wait_for("every record scored", lambda: len(ids()) >= fed[0], cluster[0], 120)
        events = plan_events(reader, config)
        assert [(e.kind, e.plan_action) for e in events] == [
            ("plan_changed", action)
            for action in ("canary", "set_weights", "promote", "rollback", "split")
        ]
        by_partition: dict[int, list[tuple[int, int]]] = {}
        for s in reader.scored(config):
            by_partition.setdefault(s.source_partition, []).append((s.source_offset, s.plan_number))
        seen_plans = set()
        for partition, scored in by_partition.items():
            numbers = [n for _, n in sorted(scored)]
            seen_plans |= set(numbers)
            assert numbers == sorted(numbers), f"partition {partition} went back to an older plan"
        assert len(seen_plans) >= 4, seen_plans  # the plans did change under the stream
    finally:
        stop.set()
        for flow in cluster:
            flow.stop()


def _scored_at_least(reader: Reader, config: Config, count: int) -> bool:
    return len(reader.scored(config)) >= count


def _installed(reader: Reader, config: Config) -> bool:
    return any(e.kind == "installed" and e.model_name == "wine-lr" for e in reader.events(config))
