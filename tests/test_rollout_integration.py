"""Serving plans on Apache Kafka (issue 15): a canary decided by the rollout judge on labels,
the decision travelling through the control topic like anyone's command.

`python -m bytewax.run` with delayed labels on; the candidate is published staged and put in
a canary by a PlanCommand; records, then their labels. A good candidate (wine-gbt) is
promoted, a bad one (wine-lr fed its features in the wrong order) rolled back, and the
records that follow are scored by the model the decision left serving.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from flowtools import WINE_PROTOBUF, descriptor, record_bytes, wine_lines
from test_integration import Dataflow, Reader, produce, publish

from dataflows.core.config import Config
from dataflows.core.descriptors import control_message
from dataflows.tools.broker import control_message_key
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
