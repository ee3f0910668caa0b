"""The serving-plan state machine (dataflows/rollout/plans.py) and the split by entity hash
(dataflows/rollout/assign.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from dataflows.core.records import EncodedKeys
from dataflows.rollout.assign import assign, entity_points
from dataflows.rollout.plans import PlanBook, PlanError, ServingPlan, activate, apply
from protos import waxserve_pb2 as pb

INSTALLED = {"lr:1", "gbt:2", "rf:3"}


def command(action: pb.PlanAction, *models: str, **fields: Any) -> pb.PlanCommand:
    variants = []
    for model in models:
        name, _, weight = model.partition("=")
        variants.append(pb.PlanVariant(model=name, weight=float(weight or 0)))
    return pb.PlanCommand(data_type="wine", action=action, variants=variants, **fields)


def run(book: PlanBook, *commands: pb.PlanCommand) -> PlanBook:
    for c in commands:
        book = apply(book, c, INSTALLED, ("alcohol", "region"))
    return book


SERVING_LR = activate(PlanBook(), "lr:1")


def test_a_new_active_model_keeps_the_one_before_as_last_good_and_rollback_restores_it() -> None:
    book = activate(SERVING_LR, "gbt:2")
    assert (book.plan, book.last_good) == (ServingPlan.single("gbt:2", 2), "lr:1")
    back = run(book, command(pb.ROLLBACK))
    assert back.plan == ServingPlan.single("lr:1", 3)
    with pytest.raises(PlanError, match="no last good"):
        run(back, command(pb.ROLLBACK))


def test_canary_promoted_keeps_the_old_active_as_last_good() -> None:
    book = run(SERVING_LR, command(pb.CANARY, "gbt:2=0.2", entity_field="region"))
    plan = book.plan
    assert plan is not None and plan.policy == "canary" and plan.entity_field == "region"
    assert [(v.model, v.role, round(v.weight, 6)) for v in plan.variants] == [
        ("lr:1", "active", 0.8),
        ("gbt:2", "canary", 0.2),
    ]
    assert plan.describe() == "canary gbt:2 0.20 over lr:1 0.80"
    promoted = run(book, command(pb.PROMOTE))
    assert (promoted.plan, promoted.last_good) == (ServingPlan.single("gbt:2", 3), "lr:1")
    assert run(promoted, command(pb.ROLLBACK)).plan == ServingPlan.single("lr:1", 4)


def test_rolling_back_a_canary_returns_to_the_active_model_alone() -> None:
    book = run(SERVING_LR, command(pb.CANARY, "gbt:2"))
    assert book.plan is not None and book.plan.variants[1].weight == pytest.approx(0.1)
    assert run(book, command(pb.ROLLBACK)).plan == ServingPlan.single("lr:1", 3)


def test_split_and_bandit_weights_are_shares_and_can_be_set() -> None:
    book = run(SERVING_LR, command(pb.SPLIT, "lr:1=3", "gbt:2=1"))
    assert book.plan is not None
    assert [v.weight for v in book.plan.variants] == [0.75, 0.25]
    assert [v.role for v in book.plan.variants] == ["active", "variant"]
    book = run(book, command(pb.SET_WEIGHTS, "gbt:2=0.75"))
    assert book.plan is not None
    assert [round(v.weight, 6) for v in book.plan.variants] == [0.5, 0.5]
    bandit = run(SERVING_LR, command(pb.BANDIT, "lr:1", "gbt:2", "rf:3"))
    assert bandit.plan is not None and bandit.plan.policy == "bandit"
    assert [round(v.weight, 6) for v in bandit.plan.variants] == [0.333333] * 3


def test_shadows_add_up_and_retire_one_at_a_time() -> None:
    book = run(SERVING_LR, command(pb.SHADOW, "gbt:2"), command(pb.SHADOW, "rf:3"))
    assert book.plan is not None and book.plan.models == ("lr:1", "gbt:2", "rf:3")
    book = run(book, command(pb.RETIRE, "gbt:2"))
    assert book.plan is not None and book.plan.models == ("lr:1", "rf:3")
    book = run(book, command(pb.RETIRE, "rf:3"))
    assert book.plan == ServingPlan.single("lr:1", 5)


@pytest.mark.parametrize(
    ("commands", "error"),
    [
        ([command(pb.ACTIVATE, "xgb:9")], "not installed"),
        ([command(pb.CANARY, "gbt:2=1.5")], "between 0 and 1"),
        ([command(pb.CANARY, "lr:1")], "active model already"),
        ([command(pb.SPLIT, "gbt:2")], "two models"),
        ([command(pb.SPLIT, "lr:1=0", "gbt:2=0")], "add up to 0"),
        ([command(pb.SPLIT, "lr:1=-1", "gbt:2=1")], ">= 0"),
        ([command(pb.SET_WEIGHTS, "gbt:2=1")], "no weights"),
        ([command(pb.PROMOTE)], "nothing to promote"),
        ([command(pb.RETIRE, "lr:1")], "serves"),
        ([command(pb.CANARY, "gbt:2", entity_field="nope")], "not a field"),
        ([command(pb.CANARY, "gbt:2"), command(pb.SHADOW, "rf:3")], "promote or roll it back"),
        ([command(pb.ENSEMBLE, "lr:1", "gbt:2")], "combiner"),
        ([command(pb.ENSEMBLE, "lr:1", "gbt:2", combiner=pb.FIRST_CONFIDENT)], "confidence"),
        ([command(pb.ACTIVATE, "lr:1", "gbt:2")], "exactly one"),
    ],
)
def test_commands_that_cannot_apply_say_why(commands: list[pb.PlanCommand], error: str) -> None:
    with pytest.raises(PlanError, match=error):
        run(SERVING_LR, *commands)


def test_an_entitys_point_is_fixed_whatever_batch_it_comes_in() -> None:
    # Pinned: a change of the hash moves the entities of every split in flight.
    keys = ["customer-1", "a", "", "x" * 100]
    assert entity_points("wine", keys).tolist() == [
        0.2723575278055548,
        0.834118935078728,
        0.9199224038656453,
        0.07467736836750438,
    ]
    assert entity_points("beer", keys[:1])[0] != entity_points("wine", keys[:1])[0]
    # Mixed lengths (one matrix, each key's state stopped at its own last word), keys of
    # one width (the usual batch), keys past LONG_KEY_BYTES (hashed by their digest) and
    # ids already encoded: each key lands where it lands alone.
    mixed = [f"c{i}" for i in range(300)] + ["", "é" * 40, "y" * 65, "y" * 66, "z" * 10_000]
    alone = [entity_points("wine", [k])[0] for k in mixed]
    assert entity_points("wine", mixed).tolist() == alone
    assert entity_points("wine", EncodedKeys.of(mixed)).tolist() == alone
    same_width = [f"{i:06d}" for i in range(300)]
    assert entity_points("wine", same_width).tolist() == [
        entity_points("wine", [k])[0] for k in same_width
    ]
    assert len(set(alone)) == len(mixed), "no two of these keys share a point"
    # Zero padding does not make keys equal: the length is in the seed.
    assert len(set(entity_points("wine", ["a", "a\0", "a\0\0"]).tolist())) == 3


@pytest.mark.parametrize("key_format", ["customer-{}", "{:06d}"])
def test_entities_stay_on_their_variant_and_shares_match_the_weights(key_format: str) -> None:
    keys = [key_format.format(i) for i in range(100_000)]
    points = entity_points("wine", keys)
    assert np.array_equal(points, entity_points("wine", keys)), "stable across calls"
    chosen = assign(points, [0.7, 0.2, 0.1])
    shares = np.bincount(chosen, minlength=3) / len(keys)
    assert np.abs(shares - [0.7, 0.2, 0.1]).max() < 0.01
    # New weights move only the entities between the old and the new cut.
    moved = assign(points, [0.6, 0.3, 0.1]) != chosen
    assert moved.mean() == pytest.approx(0.1, abs=0.01)
    assert set(np.flatnonzero(moved)) <= set(np.flatnonzero(chosen == 0))
