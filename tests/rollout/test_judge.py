"""The rollout judge (dataflows/rollout/judge.py): canary decisions and bandit weights from
joined labels, as plan commands."""

from __future__ import annotations

from typing import Any

import numpy as np

from dataflows.monitoring.feedback import JoinedPairs
from dataflows.monitoring.windows import ModelIdentity
from dataflows.rollout.guards import GuardCounts, disagreements, label_scale
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


def judge(**settings: Any) -> RolloutJudge:
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


# --- label-free guards -----------------------------------------------------------------------


def guard_counts(
    version: str, records: int, failed: int = 0, slow: int = 0, disagreed: int | None = None
) -> GuardCounts:
    """Counts of a canary batch; `disagreed`: the active model scored every record too."""
    identity = ModelIdentity("wine", "clf", version, "0" * 64)
    compared = records if disagreed is not None else 0
    return GuardCounts(identity, records, failed, slow, compared, disagreed or 0)


def guarded(labelled: bool = False, **settings: Any) -> RolloutJudge:
    judge = RolloutJudge(
        None,
        JudgeSettings(min_records=100, labelled=lambda _dt: labelled, **settings),
        clock=lambda: 1.0,
    )
    judge.on_plan(canary(), {})
    return judge


def test_a_canary_that_fails_to_score_is_rolled_back_without_labels() -> None:
    judge = guarded()
    out = []
    for _ in range(10):  # 5% of its records fail, against at most 1%
        out += judge.on_guards(guard_counts("2", 100, failed=5))
    [command] = out
    assert (command.action, command.for_plan, command.actor) == (pb.ROLLBACK, 2, ACTOR)
    assert command.reason.startswith("canary clf:2 guard error rate: ")


def test_a_canary_that_passes_its_guards_is_promoted_without_labels_if_asked() -> None:
    watched = guarded(max_us_per_record=50.0)  # by default a person promotes it
    assert [c for _ in range(20) for c in watched.on_guards(guard_counts("2", 100))] == []
    judge = guarded(max_us_per_record=50.0, promote_without_labels=True)
    out = []
    for _ in range(20):
        out += judge.on_guards(guard_counts("2", 100))
    [command] = out
    assert command.action == pb.PROMOTE
    assert command.reason.startswith("canary clf:2 passed its guards (error rate and slow rate)")
    assert judge.on_guards(guard_counts("2", 100)) == []  # decided once


def test_a_slow_canary_is_rolled_back_when_there_is_a_time_budget() -> None:
    judge = guarded(max_us_per_record=50.0)
    out = []
    for _ in range(10):
        out += judge.on_guards(guard_counts("2", 100, slow=100))
    [command] = out
    assert command.action == pb.ROLLBACK and "guard slow rate" in command.reason
    # Without a budget nothing is slow: the same counts promote in the end.
    plain = guarded(promote_without_labels=True)
    assert [c.action for _ in range(20) for c in plain.on_guards(guard_counts("2", 100))] == [
        pb.PROMOTE
    ]


def test_with_labels_the_guards_only_roll_back_and_the_labels_promote() -> None:
    judge = guarded(labelled=True, promote_without_labels=True)
    assert [c for _ in range(20) for c in judge.on_guards(guard_counts("2", 100))] == []
    judge.on_pairs(pairs("1", 900, 100))
    [command] = judge.on_pairs(pairs("2", 1860, 140))
    assert command.action == pb.PROMOTE and " against clf:1: " in command.reason
    failing = guarded(labelled=True)
    out = [c for _ in range(10) for c in failing.on_guards(guard_counts("2", 100, failed=5))]
    assert [c.action for c in out] == [pb.ROLLBACK]


def test_the_active_models_counts_and_other_plans_decide_nothing() -> None:
    judge = guarded()
    assert [c for _ in range(20) for c in judge.on_guards(guard_counts("1", 100, 50))] == []
    split = ServingPlan("split", (Variant("clf:1", "a", 0.5), Variant("clf:2", "b", 0.5)), 3)
    judge.on_plan(split, {})
    assert [c for _ in range(20) for c in judge.on_guards(guard_counts("2", 100, 50))] == []


def test_guard_counts_of_a_batch() -> None:
    identity = ModelIdentity("wine", "clf", "2", "0" * 64)
    assert GuardCounts.of(identity, 100, 3, 0.01, 0.0) == GuardCounts(identity, 100, 3, 0)
    assert GuardCounts.of(identity, 100, 3, 0.01, 50.0) == GuardCounts(identity, 100, 3, 100)
    assert GuardCounts.of(identity, 100, 3, 0.001, 50.0) == GuardCounts(identity, 100, 3, 0)
    assert GuardCounts.of(identity, 100, 3, 0.001, 0, 90, 7) == GuardCounts(
        identity, 100, 3, 0, 90, 7
    )


def test_disagreements_are_other_classes_or_values_beyond_the_tolerance() -> None:
    active = np.array([1.0, 2.0, 3.0, 4.0])
    other = np.array([1.0, 2.4, 3.6, 0.0])
    assert disagreements(active, other, 0.5) == 2
    assert disagreements(active[:2], other[:2], 0.5) == 0
    assert disagreements(active, other, 0.0) == 3
    assert disagreements(["a", "b", "c"], ["a", "c", "c"], 0.5) == 1
    assert disagreements(["a", "c"], ["a", "c"], 0.5) == 0
    assert label_scale(None) == 1.0  # no profile: tolerances are in the label's units


def test_a_canary_that_disagrees_with_the_active_model_is_rolled_back_without_labels() -> None:
    judge = guarded(max_disagreement=0.2)
    out = []
    for _ in range(10):  # answers 40% of its records otherwise, against at most 20%
        out += judge.on_guards(guard_counts("2", 100, disagreed=40))
    [command] = out
    assert command.action == pb.ROLLBACK
    assert command.reason.startswith("canary clf:2 guard disagreement: ")
    # Without a disagreement limit the same counts are no guard: it is promoted if asked.
    plain = guarded(promote_without_labels=True)
    counts = guard_counts("2", 100, disagreed=40)
    assert [c.action for _ in range(20) for c in plain.on_guards(counts)] == [pb.PROMOTE]


def test_with_a_disagreement_limit_promotion_waits_for_compared_records() -> None:
    judge = guarded(max_disagreement=0.2, promote_without_labels=True)
    # Nothing compared (the active model scored none of its records): no evidence yet.
    assert [c for _ in range(20) for c in judge.on_guards(guard_counts("2", 100))] == []
    out = [c for _ in range(20) for c in judge.on_guards(guard_counts("2", 100, disagreed=2))]
    [command] = out
    assert command.action == pb.PROMOTE
    assert "(error rate and disagreement)" in command.reason
