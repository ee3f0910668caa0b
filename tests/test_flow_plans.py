"""Serving plans in the dataflow (issue 15): staged models, canary and A/B splits by entity
hash, shadows, rollback, refused commands, and a crash in the middle of an experiment."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from bytewax.recovery import init_db_dir
from flowtools import (
    RECORDS_TOPIC,
    WINE_CONTRACT,
    WINE_PROTOBUF,
    CrashOnce,
    Outputs,
    batch,
    control_batch,
    descriptor,
    record_bytes,
    run_flow,
    test_config,
    wine_lines,
)

from dataflows.control.registry import RUNTIMES
from dataflows.rollout.assign import assign, entity_points
from protos import waxserve_pb2 as pb

WORKERS = [1, 2]
LR = descriptor("wine-lr", stage="staged")
GBT = descriptor("wine-gbt", stage="staged")
LR_KEY, GBT_KEY = f"{LR.name}:{LR.version}", f"{GBT.name}:{GBT.version}"


def plan(action: pb.PlanAction, *variants: tuple[str, float], **fields: Any) -> pb.PlanCommand:
    return pb.PlanCommand(
        data_type="wine",
        action=action,
        variants=[pb.PlanVariant(model=m, weight=w) for m, w in variants],
        actor="tester@test",
        **fields,
    )


def records(count: int, size: int = 20) -> list[object]:
    """`count` wine records in batches over two partitions, record ids "<batch>-<n>"."""
    lines = wine_lines(0, count)
    items: list[object] = []
    offsets = [0, 0]
    for i, start in enumerate(range(0, count, size)):
        part = i % 2
        chunk = record_bytes(lines[start : start + size], id_prefix=f"{start}-")
        items.append(batch(RECORDS_TOPIC, chunk, partition=part, start=offsets[part]))
        offsets[part] += len(chunk)
    return items


def expected_models(scored: list[pb.ScoredRecord], weights: list[float]) -> list[str]:
    """The model each record's entity (its record id) is assigned under these weights."""
    chosen = assign(entity_points("wine", [s.record_id for s in scored]), weights)
    return [[LR.name, GBT.name][i] for i in chosen]


def canary_control() -> list[object]:
    commands = [plan(pb.ACTIVATE, (LR_KEY, 0)), plan(pb.CANARY, (GBT_KEY, 0.3))]
    return [control_batch(WINE_CONTRACT.to_proto(), LR, GBT, *commands)]


@pytest.mark.parametrize("workers", WORKERS)
def test_a_canary_splits_records_by_a_stable_hash_of_their_entity(workers: int) -> None:
    out = run_flow(test_config(), canary_control(), records(400), workers=workers)
    scored = out.scored()
    assert len({s.output_key for s in scored}) == len(scored) == 400
    # Staged models serve nothing: the records waited for the first plan, and the two
    # plans came in one batch, so every record was scored under the canary (plan 2).
    assert {(s.policy, s.plan_number) for s in scored} == {("canary", 2)}
    assert [s.model_name for s in scored] == expected_models(scored, [0.7, 0.3])
    roles = Counter((s.model_name, s.variant_role, s.lineage.decision) for s in scored)
    assert set(roles) == {(LR.name, "active", "active"), (GBT.name, "canary", "canary")}
    assert 0.2 < roles[(GBT.name, "canary", "canary")] / 400 < 0.4
    changes = [e for e in out.events() if e.kind == "plan_changed"]
    assert [(e.plan_action, e.actor, e.plan_number) for e in changes] == [
        ("activate", "tester@test", 1),
        ("canary", "tester@test", 2),
    ]
    assert changes[1].plan == f"canary {GBT_KEY} 0.30 over {LR_KEY} 0.70"
    assert out.dead_letters() == []


@pytest.mark.parametrize("workers", WORKERS)
def test_rollback_restores_the_last_good_model(workers: int) -> None:
    commands = [
        plan(pb.ACTIVATE, (LR_KEY, 0)),
        plan(pb.ACTIVATE, (GBT_KEY, 0)),
        plan(pb.ROLLBACK, reason="gbt misbehaves"),
    ]
    control = [control_batch(WINE_CONTRACT.to_proto(), LR, GBT, *commands)]
    out = run_flow(test_config(), control, records(100), workers=workers)
    scored = out.scored()
    assert len(scored) == 100
    assert {(s.model_name, s.policy, s.plan_number) for s in scored} == {(LR.name, "single", 3)}
    rollback = [e for e in out.events() if e.kind == "plan_changed"][-1]
    assert (rollback.plan_action, rollback.plan, rollback.message) == (
        "rollback",
        f"single {LR_KEY}",
        "gbt misbehaves",
    )
    assert (rollback.model_name, rollback.model_version) == (LR.name, LR.version)


@pytest.mark.parametrize("workers", WORKERS)
def test_a_shadow_scores_every_record_on_the_shadow_topic_only(workers: int) -> None:
    commands = [plan(pb.ACTIVATE, (LR_KEY, 0)), plan(pb.SHADOW, (GBT_KEY, 0))]
    control = [control_batch(WINE_CONTRACT.to_proto(), LR, GBT, *commands)]
    out = run_flow(test_config(), control, records(200), workers=workers)
    scored, shadow = out.scored(), out.shadow()
    assert {(s.model_name, s.variant_role) for s in scored} == {(LR.name, "active")}
    assert {(s.model_name, s.variant_role) for s in shadow} == {(GBT.name, "shadow")}
    assert sorted(s.record_id for s in scored) == sorted(s.record_id for s in shadow)
    assert len(scored) == 200
    # The shadow's stats say how it agreed with the active model, over every window.
    active = {s.record_id: s.value for s in scored}
    difference = sum(abs(s.value - active[s.record_id]) for s in shadow)
    windows = [m.shadow_window for m in out.stats() if m.model_name == GBT.name]
    assert {(w.primary_name, w.primary_version) for w in windows} == {(LR.name, LR.version)}
    assert sum(w.compared_count for w in windows) == 200
    assert sum(w.absolute_difference_sum for w in windows) == pytest.approx(difference, rel=1e-6)
    assert not any(m.HasField("shadow_window") for m in out.stats() if m.model_name == LR.name)


def test_a_plan_command_that_cannot_apply_is_refused_and_the_plan_stays() -> None:
    commands = [
        plan(pb.ACTIVATE, (LR_KEY, 0)),
        plan(pb.CANARY, ("wine-xgb:9", 0.5)),
        plan(pb.PROMOTE),
    ]
    control = [control_batch(WINE_CONTRACT.to_proto(), LR, GBT, *commands)]
    out = run_flow(test_config(), control, records(40))
    assert {(s.model_name, s.plan_number) for s in out.scored()} == {(LR.name, 1)}
    refused = [e for e in out.events() if e.kind == "plan_rejected"]
    assert [(e.plan_action, e.reason) for e in refused] == [
        ("canary", "bad_plan"),
        ("promote", "bad_plan"),
    ]
    assert "not installed" in refused[0].message and "nothing to promote" in refused[1].message
    dead = out.dead_letters()
    assert [h["waxserve.error.class"] for h, _ in dead] == ["bad_plan", "bad_plan"]
    assert {h["waxserve.stage"] for h, _ in dead} == {"plan"}


@pytest.mark.parametrize("workers", WORKERS)
def test_abort_in_a_canary_and_resume_assigns_every_record_alike(
    workers: int, tmp_path: Path
) -> None:
    init_db_dir(tmp_path, 2)
    inputs = records(400)
    outputs = Outputs()
    crash = CrashOnce(after_items=8)
    with pytest.raises(Exception, match="error writing output batch"):
        run_flow(
            test_config(),
            canary_control(),
            inputs,
            workers=workers,
            outputs=outputs,
            recovery=tmp_path,
            crash=crash,
        )
    assert 0 < len(outputs.scored()) < 400
    RUNTIMES.clear()  # a new process: nothing loaded
    run_flow(
        test_config(), canary_control(), inputs, workers=workers, outputs=outputs, recovery=tmp_path
    )
    scored = outputs.scored()
    assert len({s.output_key for s in scored}) == 400, "every record scored"
    # Scored twice or not, every record went to the variant its entity hashes to.
    assert [s.model_name for s in scored] == expected_models(scored, [0.7, 0.3])
    assert {(s.policy, s.plan_number) for s in scored} == {("canary", 2)}
    restored = [e for e in outputs.events() if e.kind == "restored"]
    assert restored and {e.plan for e in restored} == {f"canary {GBT_KEY} 0.30 over {LR_KEY} 0.70"}


FEEDBACK_TOPIC = "feedback"
# A classic bad model: the right weights fed the features in the wrong order.
BAD_LR = descriptor("wine-lr", version="2-shuffled", stage="staged")
BAD_LR.input_features[:] = list(reversed(LR.input_features))
BAD_KEY = f"{BAD_LR.name}:{BAD_LR.version}"


def labels(count: int) -> list[object]:
    """Each record's true quality as a label that arrives later (ids as `records` gives)."""
    lines = wine_lines(0, count)
    messages = []
    for start in range(0, count, 20):
        for i, line in enumerate(lines[start : start + 20]):
            row = {"record_id": f"{start}-{i}", "quality": float(line.split(";")[-1])}
            messages.append(WINE_PROTOBUF.encode([row])[0])
    return [batch(FEEDBACK_TOPIC, messages[i : i + 100], start=i) for i in range(0, count, 100)]


def judged(candidate: pb.ModelDescriptor, workers: int) -> Outputs:
    key = f"{candidate.name}:{candidate.version}"
    commands = [plan(pb.ACTIVATE, (LR_KEY, 0)), plan(pb.CANARY, (key, 0.5))]
    control = [control_batch(WINE_CONTRACT.to_proto(), LR, candidate, *commands)]
    config = test_config(feedback_data_types="wine", feedback_topic=FEEDBACK_TOPIC)
    return run_flow(config, control, records(1200), feedback=labels(1200), workers=workers)


@pytest.mark.parametrize("workers", WORKERS)
def test_the_judge_rolls_back_a_canary_that_is_worse_on_labels(workers: int) -> None:
    out = judged(BAD_LR, workers)
    [command] = out.commands()
    assert (command.action, command.for_plan, command.data_type) == (pb.ROLLBACK, 2, "wine")
    assert command.actor == "waxserve rollout judge"
    assert command.reason.startswith(f"canary {BAD_KEY} against {LR_KEY}: ")


@pytest.mark.parametrize("workers", WORKERS)
def test_the_judge_promotes_a_canary_that_is_not_worse_on_labels(workers: int) -> None:
    out = judged(GBT, workers)
    [command] = out.commands()
    assert (command.action, command.for_plan) == (pb.PROMOTE, 2)
    assert command.reason.startswith(f"canary {GBT_KEY} against {LR_KEY}: ")


def unlabelled_canary(workers: int, **settings: float | bool) -> Outputs:
    """wine-gbt canaried on 70% of 1,200 records, and no labels at all."""
    commands = [plan(pb.ACTIVATE, (LR_KEY, 0)), plan(pb.CANARY, (GBT_KEY, 0.7))]
    control = [control_batch(WINE_CONTRACT.to_proto(), LR, GBT, *commands)]
    return run_flow(test_config(**settings), control, records(1200), workers=workers)


@pytest.mark.parametrize("workers", WORKERS)
def test_without_labels_a_canary_that_passes_its_guards_is_promoted_if_asked(
    workers: int,
) -> None:
    out = unlabelled_canary(workers, canary_promote_without_labels=True)
    [command] = out.commands()
    assert (command.action, command.for_plan, command.data_type) == (pb.PROMOTE, 2, "wine")
    assert command.reason.startswith(f"canary {GBT_KEY} passed its guards (error rate): ")


def test_without_labels_a_canary_that_passes_its_guards_waits_for_a_person() -> None:
    assert unlabelled_canary(1).commands() == []


@pytest.mark.parametrize("workers", WORKERS)
def test_without_labels_a_canary_over_its_time_budget_is_rolled_back(workers: int) -> None:
    # A budget no model meets: every record of the canary counts as slow.
    out = unlabelled_canary(workers, canary_max_us_per_record=0.001)
    [command] = out.commands()
    assert (command.action, command.for_plan) == (pb.ROLLBACK, 2)
    assert command.reason.startswith(f"canary {GBT_KEY} guard slow rate: ")


@pytest.mark.parametrize("workers", WORKERS)
def test_abort_in_a_judged_canary_and_resume_keeps_the_judges_evidence(
    workers: int, tmp_path: Path
) -> None:
    """Every canary record is over its time budget, and the judge rolls the canary back
    once it has seen 600 of them: the abort comes after about 350, and the resumed run
    scores fewer than 600 under the canary plan, so only the evidence from before the
    abort, restored, lets it decide."""
    init_db_dir(tmp_path, 2)
    commands = [plan(pb.ACTIVATE, (LR_KEY, 0)), plan(pb.CANARY, (GBT_KEY, 0.7))]
    control = [control_batch(WINE_CONTRACT.to_proto(), LR, GBT, *commands)]
    config = test_config(canary_max_us_per_record=0.001, canary_min_records=600)
    inputs = records(1200)
    outputs = Outputs()
    with pytest.raises(Exception, match="error writing output batch"):
        run_flow(
            config,
            control,
            inputs,
            workers=workers,
            outputs=outputs,
            recovery=tmp_path,
            crash=CrashOnce(after_items=50),  # scored batches: about 500 records
        )
    assert outputs.commands() == []
    before = len(outputs.scored())
    RUNTIMES.clear()  # a new process: nothing loaded
    run_flow(config, control, inputs, workers=workers, outputs=outputs, recovery=tmp_path)
    resumed = outputs.scored()[before:]
    assert sum(1 for s in resumed if s.model_name == GBT.name) < 600
    [command] = outputs.commands()
    assert (command.action, command.for_plan) == (pb.ROLLBACK, 2)
    assert command.reason.startswith(f"canary {GBT_KEY} guard slow rate: ")
    # Scored twice or not, every record went to the variant its entity hashes to.
    assert len({s.output_key for s in outputs.scored()}) == 1200
    assert [s.model_name for s in resumed] == expected_models(resumed, [0.3, 0.7])


def disagreement_canary(candidate: pb.ModelDescriptor, workers: int, **settings: Any) -> Outputs:
    """`candidate` canaried on 70% of 1,200 unlabelled records, which it may answer
    otherwise than the active model for at most 35% (wine-gbt does for about 15%; the
    shuffled wine-lr for all)."""
    key = f"{candidate.name}:{candidate.version}"
    commands = [plan(pb.ACTIVATE, (LR_KEY, 0)), plan(pb.CANARY, (key, 0.7))]
    control = [control_batch(WINE_CONTRACT.to_proto(), LR, candidate, *commands)]
    config = test_config(canary_max_disagreement=0.35, **settings)
    return run_flow(config, control, records(1200), workers=workers)


@pytest.mark.parametrize("workers", WORKERS)
def test_without_labels_a_canary_that_disagrees_with_the_active_model_is_rolled_back(
    workers: int,
) -> None:
    out = disagreement_canary(BAD_LR, workers)
    [command] = out.commands()
    assert (command.action, command.for_plan) == (pb.ROLLBACK, 2)
    assert command.reason.startswith(f"canary {BAD_KEY} guard disagreement: ")
    # The active model scored the canary's records without emitting anything for them:
    # each record is scored once, by the model its entity is assigned to.
    scored = out.scored()
    assert len(scored) == len({s.record_id for s in scored}) == 1200
    windows = [m.shadow_window for m in out.stats() if m.model_version == BAD_LR.version]
    assert {(w.primary_name, w.primary_version) for w in windows} == {(LR.name, LR.version)}
    canary_records = sum(1 for s in scored if s.model_version == BAD_LR.version)
    assert sum(w.compared_count for w in windows) == canary_records > 0


@pytest.mark.parametrize("workers", WORKERS)
def test_without_labels_a_canary_that_agrees_with_the_active_model_is_promoted_if_asked(
    workers: int,
) -> None:
    out = disagreement_canary(GBT, workers, canary_promote_without_labels=True)
    [command] = out.commands()
    assert command.action == pb.PROMOTE
    assert command.reason.startswith(
        f"canary {GBT_KEY} passed its guards (error rate and disagreement): "
    )


@pytest.mark.parametrize("workers", WORKERS)
def test_an_ensemble_serves_the_mean_of_its_members_with_each_members_output(
    workers: int,
) -> None:
    command = plan(pb.ENSEMBLE, (LR_KEY, 1), (GBT_KEY, 1), combiner=pb.MEAN)
    control = [control_batch(WINE_CONTRACT.to_proto(), LR, GBT, command)]
    out = run_flow(test_config(), control, records(100), workers=workers)
    scored = out.scored()
    assert len(scored) == 100 and out.dead_letters() == []
    assert {(s.model_name, s.model_version, s.policy) for s in scored} == {
        ("ensemble", "plan-1", "ensemble")
    }
    for s in scored:
        assert [(m.model_name, m.model_version) for m in s.members] == [
            (LR.name, LR.version),
            (GBT.name, GBT.version),
        ]
        assert s.value == pytest.approx(sum(m.value for m in s.members) / 2)
    # Monitored as any model: each member in its stats and drift windows, the ensemble's
    # output in a stats window of its own.
    counts = Counter[tuple[str, str]]()
    for m in out.stats():
        counts[(m.model_name, m.model_version)] += m.window_count
    assert counts == {(LR.name, "1"): 100, (GBT.name, "1"): 100, ("ensemble", "plan-1"): 100}
    drifted = {(m.model_name, m.model_version) for m in out.drift()}
    assert drifted == {(LR.name, LR.version), (GBT.name, GBT.version)}


@pytest.mark.parametrize("workers", WORKERS)
def test_an_ensembles_output_is_joined_to_delayed_labels(workers: int) -> None:
    command = plan(pb.ENSEMBLE, (LR_KEY, 1), (GBT_KEY, 1), combiner=pb.MEAN)
    control = [control_batch(WINE_CONTRACT.to_proto(), LR, GBT, command)]
    config = test_config(feedback_data_types="wine", feedback_topic=FEEDBACK_TOPIC)
    out = run_flow(config, control, records(200), feedback=labels(200), workers=workers)
    scored = {s.record_id: s.value for s in out.scored()}
    truth = {}
    for start in range(0, 200, 20):
        for i, line in enumerate(wine_lines(start, 20)):
            truth[f"{start}-{i}"] = float(line.split(";")[-1])
    windows = [m.feedback_window for m in out.stats() if m.model_name == "ensemble"]
    assert sum(w.labelled_count for w in windows) == 200
    squared = sum(w.squared_error_sum for w in windows)
    assert squared == pytest.approx(sum((scored[k] - truth[k]) ** 2 for k in truth), rel=1e-9)


def test_abort_in_an_ensemble_of_staged_models_and_resume(tmp_path: Path) -> None:
    # No model is active in this plan: the registry re-sends the plan itself on resume.
    init_db_dir(tmp_path, 2)
    command = plan(pb.ENSEMBLE, (LR_KEY, 1), (GBT_KEY, 1), combiner=pb.MEDIAN)
    control = [control_batch(WINE_CONTRACT.to_proto(), LR, GBT, command)]
    inputs = records(400)
    outputs = Outputs()
    crash = CrashOnce(after_items=8)
    with pytest.raises(Exception, match="error writing output batch"):
        run_flow(test_config(), control, inputs, outputs=outputs, recovery=tmp_path, crash=crash)
    assert 0 < len(outputs.scored()) < 400
    RUNTIMES.clear()  # a new process: nothing loaded
    run_flow(test_config(), control, inputs, outputs=outputs, recovery=tmp_path)
    scored = outputs.scored()
    assert len({s.output_key for s in scored}) == 400, "every record scored"
    assert {(s.model_name, s.policy) for s in scored} == {("ensemble", "ensemble")}
    assert outputs.dead_letters() == []


@pytest.mark.parametrize("workers", WORKERS)
def test_a_split_by_a_contract_field_keeps_each_entity_on_one_variant(workers: int) -> None:
    command = plan(pb.SPLIT, (LR_KEY, 1), (GBT_KEY, 1), entity_field="alcohol")
    control = [control_batch(WINE_CONTRACT.to_proto(), LR, GBT, command)]
    out = run_flow(test_config(), control, records(400), workers=workers)
    scored = out.scored()
    assert len(scored) == 400 and {s.policy for s in scored} == {"split"}
    lines = wine_lines(0, 400)
    alcohol = {
        f"{start}-{i}": line.split(";")[WINE_CONTRACT.csv_columns.index("alcohol")]
        for start in range(0, 400, 20)
        for i, line in enumerate(lines[start : start + 20])
    }
    by_entity: dict[str, set[str]] = {}
    for s in scored:
        by_entity.setdefault(alcohol[s.record_id], set()).add(s.model_name)
    assert all(len(models) == 1 for models in by_entity.values())
    assert {m for models in by_entity.values() for m in models} == {LR.name, GBT.name}


@pytest.mark.parametrize("workers", WORKERS)
def test_a_bandit_moves_its_weights_to_the_better_arm_on_labels(workers: int) -> None:
    commands = [plan(pb.BANDIT, (LR_KEY, 0), (BAD_KEY, 0))]
    control = [control_batch(WINE_CONTRACT.to_proto(), LR, BAD_LR, *commands)]
    config = test_config(feedback_data_types="wine", feedback_topic=FEEDBACK_TOPIC)
    out = run_flow(config, control, records(1200), feedback=labels(1200), workers=workers)
    sent = out.commands()
    assert sent and all(c.action == pb.SET_WEIGHTS and c.for_plan == 1 for c in sent)
    weights = {v.model: v.weight for v in sent[0].variants}
    assert weights[LR_KEY] > 0.9 > 0.1 > weights[BAD_KEY]
    assert sent[0].reason.startswith("bandit rewards: ")
