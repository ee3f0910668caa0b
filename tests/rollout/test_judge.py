"""The rollout judge (dataflows/rollout/judge.py): canary decisions and bandit weights from
joined labels, as plan commands."""

from __future__ import annotations

import numpy as np

from dataflows.monitoring.feedback import JoinedPairs
from dataflows.monitoring.windows import ModelIdentity
from dataflows.rollout.judge import ACTOR, JudgeSettings, RolloutJudge
from dataflows.rollout.plans import ServingPlan, Variant
from protos import waxserve_pb2 as pb

CLASSES = ("bad", "good")


def pairs(version: str, right: int, wrong: int) -> JoinedPairs:
    """A classifier's joined pairs: `right` predicted the label, `wrong` did not."""
    n = right + wrong
    labels = np.array(["good"] * n, dtype=object)
    predicted = np.array([1] * right + [0] * wrong, dtype=np.int64)
    identity = ModelIdentity("wine", "clf", version, "0" * 64)
    now = np.zeros(n, dtype=np.int64)
    ids = [f"{version}-{i}" for i in range(n)]
    return JoinedPairs(identity, ids, labels, now, now, predicted, CLASSES, None)


def canary(number: int = 2) -> ServingPlan:
    variants = (Variant("clf:1", "active", 0.5), Variant("clf:2", "canary", 0.5))
    return ServingPlan("canary", variants, number)


def judge(**settings: int) -> RolloutJudge:
    return RolloutJudge(None, JudgeSettings(min_records=100, **settings), clock=lambda: 1.0)


def test_a_worse_canary_is_rolled_back_once_with_its_evidence() -> None:
    j = judge()
    j.on_plan(canary(), {})
    assert j.on_pairs(pairs("1", 90, 10)) == []  # nothing about the canary yet
    out = j.on_pairs(pairs("2", 50, 50))
    assert [(c.action, c.for_plan, c.actor, c.data_type) for c in out] == [
        (pb.ROLLBACK, 2, ACTOR, "wine")
    ]
    assert out[0].reason.startswith("canary clf:2 against clf:1: ")
    assert j.on_pairs(pairs("2", 50, 50)) == [], "decided once per plan"


def test_pairs_that_come_before_their_plan_count() -> None:
    j = judge()
    assert j.on_pairs(pairs("1", 900, 100)) == []
    assert j.on_pairs(pairs("2", 930, 70)) == []
    j.on_plan(canary(), {})
    [command] = j.on_pairs(pairs("2", 93, 7))
    assert command.action == pb.PROMOTE


def test_a_bandit_moves_its_weights_toward_the_better_arm() -> None:
    j = judge(bandit_every=400)
    plan = ServingPlan("bandit", (Variant("clf:1", "arm", 0.5), Variant("clf:2", "arm", 0.5)), 5)
    j.on_plan(plan, {})
    assert j.on_pairs(pairs("1", 140, 60)) == []  # 200 pairs: not yet
    [command] = j.on_pairs(pairs("2", 180, 20))
    assert (command.action, command.for_plan) == (pb.SET_WEIGHTS, 5)
    weights = {v.model: v.weight for v in command.variants}
    assert weights["clf:2"] > 0.95 and abs(sum(weights.values()) - 1) < 1e-9
    # New weights, same arms: the rewards so far stay.
    j.on_plan(ServingPlan("bandit", plan.variants, 6), {})
    assert j.state.rewards["clf:2"].pulls == 200
    # A plan without an arm drops its evidence.
    j.on_plan(ServingPlan.single("clf:1", 7), {})
    assert set(j.state.rewards) == {"clf:1"}
