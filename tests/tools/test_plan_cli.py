"""`waxserve plan` and `waxserve rollback` (dataflows/tools/plan_cli.py): the PlanCommand each
command line sends, the mistakes refused before sending, `--dry-run`, `--wait` and `show`
against Apache Kafka, and `publish --stage`."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from conftest import consume_all
from google.protobuf import json_format

from dataflows.control.signing import (
    SignaturePolicy,
    SignatureStatus,
    TrustedKeys,
    generate_key_pair,
    load_public_key,
    verify,
)
from dataflows.core.config import Config
from dataflows.core.descriptors import MODELS_DIR
from dataflows.core.reasons import Reason
from dataflows.rollout.plans import PlanBook, PlanError, activate, apply
from dataflows.tools import cli
from dataflows.tools.broker import kafka_settings
from dataflows.tools.cli import EXIT_NO_VERDICT, EXIT_REJECTED, main
from dataflows.tools.plan_cli import (
    EXIT_USAGE,
    PlanInEffect,
    build_command,
    default_actor,
    format_plan,
    plan_in_effect,
)
from protos import waxserve_pb2 as pb

NO_BROKER = ("--brokers", "127.0.0.1:1")  # a dry run or a refused command needs none
WAIT = "120"  # bounds a failure; an answer ends the wait at once


def _dry_run(capsys: pytest.CaptureFixture[str], *argv: str) -> pb.PlanCommand:
    """The command `waxserve ARGV --dry-run` would send, from the JSON it prints."""
    assert main([*argv, "--dry-run", *NO_BROKER]) == 0, capsys.readouterr().err
    out, err = capsys.readouterr()
    assert err.splitlines()[-1] == "dry run: nothing sent"
    doc = json.loads(out)
    return json_format.ParseDict(doc["plan"], pb.PlanCommand())


# --- the command each command line sends -----------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "action", "variants", "extra"),
    [
        (["activate", "wine-lr:1"], pb.ACTIVATE, [("wine-lr:1", 0.0)], {}),
        (
            ["shadow", "wine-gbt:2", "wine-rf:1"],
            pb.SHADOW,
            [("wine-gbt:2", 0.0), ("wine-rf:1", 0.0)],
            {},
        ),
        (
            ["canary", "wine-gbt:2=0.25", "--entity-field", "region"],
            pb.CANARY,
            [("wine-gbt:2", 0.25)],
            {"entity_field": "region"},
        ),
        (["canary", "wine-gbt:2"], pb.CANARY, [("wine-gbt:2", 0.1)], {}),  # plans' default
        (
            ["split", "wine-lr:1=0.7", "wine-gbt:2=0.3"],
            pb.SPLIT,
            [("wine-lr:1", 0.7), ("wine-gbt:2", 0.3)],
            {},
        ),
        (["split", "a:1", "b:1"], pb.SPLIT, [("a:1", 0.5), ("b:1", 0.5)], {}),
        (
            ["bandit", "a:1", "b:1", "c:1", "--entity-field", "id"],
            pb.BANDIT,
            [("a:1", 1 / 3), ("b:1", 1 / 3), ("c:1", 1 / 3)],
            {"entity_field": "id"},
        ),
        (
            ["ensemble", "a:1", "b:1", "--combiner", "first_confident", "--confidence", "0.8"],
            pb.ENSEMBLE,
            [("a:1", 0.0), ("b:1", 0.0)],
            {"combiner": pb.FIRST_CONFIDENT, "confidence": 0.8},
        ),
        (
            ["ensemble", "a:1", "b:1", "c:1", "--combiner", "median"],
            pb.ENSEMBLE,
            [("a:1", 0.0), ("b:1", 0.0), ("c:1", 0.0)],
            {"combiner": pb.MEDIAN},
        ),
        (["weights", "wine-gbt:2=0.5"], pb.SET_WEIGHTS, [("wine-gbt:2", 0.5)], {}),
        (["promote"], pb.PROMOTE, [], {}),
        (["promote", "wine-gbt:2"], pb.PROMOTE, [("wine-gbt:2", 0.0)], {}),
        (["rollback"], pb.ROLLBACK, [], {}),
        (["retire", "a:1", "b:1"], pb.RETIRE, [("a:1", 0.0), ("b:1", 0.0)], {}),
        (["promote", "--for-plan", "7"], pb.PROMOTE, [], {"for_plan": 7}),
    ],
)
def test_each_action_sends_its_plan_command(
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    action: int,
    variants: list[tuple[str, float]],
    extra: dict[str, object],
) -> None:
    before = time.time_ns() // 1_000_000
    command = _dry_run(capsys, "plan", "wine", *argv, "--reason", "why not")
    assert command.data_type == "wine"
    assert command.action == action
    assert [v.model for v in command.variants] == [m for m, _ in variants]
    assert [v.weight for v in command.variants] == pytest.approx([w for _, w in variants])
    assert command.entity_field == extra.get("entity_field", "")
    assert command.combiner == extra.get("combiner", pb.COMBINER_UNSPECIFIED)
    assert command.confidence == extra.get("confidence", 0.0)
    assert command.for_plan == extra.get("for_plan", 0)
    assert command.reason == "why not"
    assert command.actor == default_actor()
    assert before <= command.issued_at_ms <= time.time_ns() // 1_000_000


def test_rollback_is_plan_rollback(capsys: pytest.CaptureFixture[str]) -> None:
    short = _dry_run(capsys, "rollback", "wine", "--reason", "too slow", "--actor", "ci")
    long = _dry_run(capsys, "plan", "wine", "rollback", "--reason", "too slow", "--actor", "ci")
    short.issued_at_ms = long.issued_at_ms = 0
    assert short == long
    assert (short.action, short.actor, short.reason) == (pb.ROLLBACK, "ci", "too slow")


def test_the_actor_is_user_at_host_unless_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USER", "alice")
    monkeypatch.setenv("HOSTNAME", "lab-3")
    assert default_actor() == "alice@lab-3"
    assert build_command("wine", "rollback", actor="judge").actor == "judge"


def test_a_rollout_from_the_command_line_is_one_the_state_machine_takes() -> None:
    """The commands the CLI builds for a whole rollout, applied as the registry applies them."""
    installed = {"wine-lr:1", "wine-gbt:2", "wine-rf:1"}
    book = activate(PlanBook(), "wine-lr:1")
    steps = [
        (["shadow", "wine-gbt:2"], "shadow wine-gbt:2 beside wine-lr:1"),
        (["canary", "wine-gbt:2=0.2"], "canary wine-gbt:2 0.20 over wine-lr:1 0.80"),
        (["weights", "wine-lr:1=1", "wine-gbt:2=1"], "canary wine-gbt:2 0.50 over wine-lr:1 0.50"),
        # A weight left out keeps its share, then all are normalized: 0.25 beside 0.5.
        (["weights", "wine-gbt:2=0.25"], "canary wine-gbt:2 0.33 over wine-lr:1 0.67"),
        (["promote"], "single wine-gbt:2"),
        (["rollback"], "single wine-lr:1"),
        (["split", "wine-lr:1=3", "wine-gbt:2=1"], "split wine-lr:1 0.75, wine-gbt:2 0.25"),
        (["retire", "wine-gbt:2"], "single wine-lr:1"),
        (
            ["split", "wine-lr:1", "wine-rf:1", "--for-plan", "9"],
            "split wine-lr:1 0.50, wine-rf:1 0.50",
        ),
        (["promote", "wine-rf:1"], "single wine-rf:1"),
        (["bandit", "wine-rf:1", "wine-lr:1"], "bandit wine-rf:1 0.50, wine-lr:1 0.50"),
        (["activate", "wine-lr:1"], "single wine-lr:1"),
    ]
    parser = cli.build_parser()
    for argv, expected in steps:
        args = parser.parse_args(["plan", "wine", *argv])
        command = build_command(
            args.data_type,
            args.action,
            args.models,
            entity_field=args.entity_field,
            combiner=args.combiner,
            confidence=args.confidence,
            for_plan=args.for_plan,
        )
        book = apply(book, command, installed)
        assert book.plan is not None and book.plan.describe() == expected, argv


# --- mistakes refused before sending ----------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["activate", "wine-lr"], "name a model as NAME:VERSION"),
        (["activate", ":1"], "name a model as NAME:VERSION"),
        (["activate", "a:1", "b:1"], "activate takes 1 model(s), 2 given"),
        (["activate"], "activate takes 1 model(s), 0 given"),
        (["split", "a:1"], "split takes 2 to 8 model(s), 1 given"),
        (["split", *(f"m{i}:1" for i in range(9))], "split takes 2 to 8 model(s), 9 given"),
        (["ensemble", "a:1"], "ensemble takes 2 to 8 model(s), 1 given"),
        (["rollback", "a:1"], "rollback takes no model(s), 1 given"),
        (["promote", "a:1", "b:1"], "promote takes 0 to 1 model(s), 2 given"),
        (["retire"], "retire takes 1 to 8 model(s), 0 given"),
        (["split", "a:1", "a:1"], "a:1 named twice"),
        (["canary", "a:1=1.5"], "between 0 and 1 (exclusive)"),
        (["canary", "a:1=0"], "between 0 and 1 (exclusive)"),
        (["canary", "a:1=1"], "between 0 and 1 (exclusive)"),
        (["split", "a:1=nan", "b:1=1"], "finite number >= 0"),
        (["split", "a:1=inf", "b:1=1"], "finite number >= 0"),
        (["split", "a:1=-1", "b:1=2"], "finite number >= 0"),
        (["split", "a:1=x", "b:1=1"], "'x' is not a number"),
        (["split", "a:1=0", "b:1=0"], "add up to 0"),
        (["split", "a:1=0.5", "b:1"], "give every model a weight, or none"),
        (["weights", "a:1"], "give each model its weight"),
        (["shadow", "a:1=0.5"], "shadow takes no weights"),
        (["ensemble", "a:1", "b:1"], "ensemble needs --combiner"),
        (["ensemble", "a:1", "b:1", "--combiner", "first_confident"], "needs --confidence"),
        (
            ["ensemble", "a:1", "b:1", "--combiner", "first_confident", "--confidence", "1.5"],
            "needs --confidence P in (0, 1]",
        ),
        (
            ["ensemble", "a:1", "b:1", "--combiner", "mean", "--confidence", "0.5"],
            "--confidence is for the first_confident combiner",
        ),
        (["split", "a:1", "b:1", "--combiner", "mean"], "are for ensemble, not split"),
        (["activate", "a:1", "--entity-field", "region"], "--entity-field is for canary"),
        (["show", "a:1"], "show takes no models"),
    ],
)
def test_mistakes_are_refused_before_sending(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    # With the broker unreachable, a command that got as far as sending would exit 1.
    assert main(["plan", "wine", *argv, *NO_BROKER]) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert err.startswith("waxserve plan: error: ")
    assert message in err
    assert not out


def test_an_unknown_action_or_combiner_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["plan", "wine", "fling", "a:1", *NO_BROKER]) == EXIT_USAGE
    assert "invalid choice: 'fling'" in capsys.readouterr().err
    argv = ["plan", "wine", "ensemble", "a:1", "b:1", "--combiner", "vote", *NO_BROKER]
    assert main(argv) == EXIT_USAGE
    assert "invalid choice: 'vote'" in capsys.readouterr().err
    assert main(["plan", "", "rollback", *NO_BROKER]) == EXIT_USAGE
    assert "data type ''" in capsys.readouterr().err


# --- against Apache Kafka -------------------------------------------------------------------


def _messages(config: Config, topic: str) -> list[bytes]:
    return [m.value() or b"" for m in consume_all(config, topic, timeout=10.0)]


@pytest.mark.integration
def test_dry_run_sends_nothing(kafka_config: Config, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "wine", "canary", "wine-gbt:2", "--dry-run", "--wait"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["action"] == "CANARY"
    assert main(["rollback", "wine", "--dry-run"]) == 0
    assert _messages(kafka_config, kafka_config.control_topic) == []


@dataclass
class FakeRegistry:
    """Stands in for the dataflow's registry: reads the plan commands on the control topic,
    applies them with the real state machine and answers on the events topic as the
    registry does ("plan_changed" or "plan_rejected" at the command's source position).
    Before each answer it writes a decoy: an answer to another position of the topic."""

    config: Config
    installed: set[str]
    book: PlanBook
    errors: list[BaseException] = field(default_factory=list)
    answered: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # reported by the fixture, not lost in the thread
            self.errors.append(exc)

    def _serve(self) -> None:
        settings = {"group.id": "fake-registry", "enable.auto.commit": False}
        consumer = Consumer(kafka_settings(self.config, **settings))
        producer = Producer(kafka_settings(self.config))
        consumer.assign([TopicPartition(self.config.control_topic, 0, OFFSET_BEGINNING)])
        try:
            while not self.stop.is_set():
                for msg in consumer.consume(num_messages=100, timeout=0.2):
                    if msg.error() is not None:
                        continue
                    command = pb.ControlMessage.FromString(msg.value() or b"").plan
                    answer = self._apply(command, msg.offset() or 0)
                    decoy = pb.ModelEvent()
                    decoy.CopyFrom(answer)
                    decoy.source_offset += 1000
                    decoy.kind, decoy.plan = "plan_changed", "decoy"
                    for event in (decoy, answer):
                        producer.produce(
                            self.config.events_topic,
                            event.SerializeToString(),
                            command.data_type.encode(),
                        )
                    assert producer.flush(30) == 0
                    self.answered += 1
        finally:
            consumer.close()

    def _apply(self, command: pb.PlanCommand, offset: int) -> pb.ModelEvent:
        event = pb.ModelEvent(
            data_type=command.data_type,
            at_ms=time.time_ns() // 1_000_000,
            source_topic=self.config.control_topic,
            source_partition=0,
            source_offset=offset,
            plan_action=pb.PlanAction.Name(command.action).lower(),
            actor=command.actor,
        )
        try:
            self.book = apply(self.book, command, self.installed)
        except PlanError as exc:
            event.kind, event.reason, event.message = "plan_rejected", Reason.BAD_PLAN, str(exc)
        else:
            event.kind, event.message = "plan_changed", command.reason
        assert self.book.plan is not None
        event.plan, event.plan_number = self.book.plan.describe(), self.book.plan.number
        return event


@pytest.fixture
def fake_registry(kafka_config: Config) -> Iterator[FakeRegistry]:
    registry = FakeRegistry(
        kafka_config, {"wine-lr:1", "wine-gbt:2"}, activate(PlanBook(), "wine-lr:1")
    )
    thread = threading.Thread(target=registry.run, daemon=True)
    thread.start()
    try:
        yield registry
    finally:
        registry.stop.set()
        thread.join(30)
    assert not registry.errors, registry.errors


@pytest.mark.integration
def test_wait_exits_with_the_dataflows_answer(
    fake_registry: FakeRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["plan", "wine", "canary", "wine-gbt:2=0.2", "--reason", "gbt on 20%"]
    assert main([*argv, "--wait", "--timeout", WAIT]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("sent canary for wine to ")
    assert out.splitlines()[-1] == (
        "plan for wine is now: canary wine-gbt:2 0.20 over wine-lr:1 0.80 (plan 2)"
    )
    assert "waiting up to 120 s" in err

    # Rejected by the dataflow: exit 1 with the reason, and the plan that stays.
    argv = ["plan", "wine", "promote", "wine-rf:1", "--wait", "--timeout", WAIT]
    assert main(argv) == EXIT_REJECTED
    verdict = capsys.readouterr().out.splitlines()[-1]
    assert verdict.startswith("rejected: promote for wine: bad_plan: model 'wine-rf:1' is not ")
    assert verdict.endswith("(the plan stays: canary wine-gbt:2 0.20 over wine-lr:1 0.80)")

    assert main(["rollback", "wine", "--wait", "--timeout", WAIT]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "plan for wine is now: single wine-lr:1 (plan 3)"
    )
    assert fake_registry.answered == 3


@pytest.mark.integration
def test_wait_without_a_dataflow_says_what_to_check(
    kafka_config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["rollback", "wine", "--wait", "--timeout", "1"])
    assert code == EXIT_NO_VERDICT
    out, err = capsys.readouterr()
    assert out.startswith("sent rollback for wine")  # it was sent all the same
    assert "no verdict within 1 s: is a dataflow running" in err
    (sent,) = _messages(kafka_config, kafka_config.control_topic)
    assert pb.ControlMessage.FromString(sent).plan.action == pb.ROLLBACK


def _event(kind: str, plan: str = "", number: int = 0, **fields: Any) -> pb.ModelEvent:
    return pb.ModelEvent(kind=kind, data_type="wine", plan=plan, plan_number=number, **fields)


AT = 1_790_000_000_000  # a fixed time, printed in local time


@pytest.mark.integration
def test_show_prints_the_plan_in_effect(
    kafka_config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    events = [
        _event(
            "installed", "single wine-lr:1", 1, model_name="wine-lr", model_version="1", at_ms=AT
        ),
        _event(
            "installed",
            "single wine-lr:1",
            1,
            model_name="wine-gbt",
            model_version="2",
            message="staged: serves when a plan command names it",
            at_ms=AT + 1000,
        ),
        _event(
            "plan_changed",
            "canary wine-gbt:2 0.20 over wine-lr:1 0.80",
            2,
            plan_action="canary",
            actor="alice@lab",
            message="gbt on 20%",
            at_ms=AT + 2000,
        ),
        _event(
            "plan_rejected",
            "canary wine-gbt:2 0.20 over wine-lr:1 0.80",
            2,
            plan_action="promote",
            actor="bob@lab",
            reason="bad_plan",
            at_ms=AT + 3000,
        ),
    ]
    other = pb.ModelEvent(
        kind="plan_changed",
        data_type="penguins",
        plan="single p:9",
        plan_number=9,
        actor="carol",
        plan_action="activate",
        at_ms=AT,
    )
    producer = Producer(kafka_settings(kafka_config))
    for event in [*events, other]:
        producer.produce(
            kafka_config.events_topic, event.SerializeToString(), event.data_type.encode()
        )
    assert producer.flush(30) == 0

    assert main(["plan", "wine", "show"]) == 0
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((AT + 2000) / 1000))
    assert capsys.readouterr().out.splitlines() == [
        "plan for wine: canary wine-gbt:2 0.20 over wine-lr:1 0.80",
        "  number:  2",
        f"  changed: {when} by alice@lab (canary)",
        "  reason:  gbt on 20%",
    ]
    assert main(["plan", "penguins", "show"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "plan for penguins: single p:9"
    assert main(["plan", "sheep", "show"]) == 1
    assert "shows no plan and no model installed for 'sheep'" in capsys.readouterr().err


# --- show, pure -------------------------------------------------------------------------------


def test_a_model_installed_after_a_plan_change_is_the_plan_now() -> None:
    events = [
        _event("plan_changed", "canary b:2 0.10 over a:1 0.90", 2, actor="x", at_ms=AT),
        _event("installed", "single c:3", 3, model_name="c", model_version="3", at_ms=AT + 5),
        _event("restored", "single c:3", 3, at_ms=AT + 9),  # a resume reports it again
    ]
    assert plan_in_effect(events, "wine") == PlanInEffect(
        "wine", "single c:3", 3, "publishing c:3", "installed", AT + 5, ""
    )


def test_a_staged_model_installed_changes_nobody_who_made_the_plan() -> None:
    events = [
        _event("installed", "single a:1", 1, model_name="a", model_version="1", at_ms=AT),
        _event(
            "installed",
            "single a:1",
            1,
            model_name="b",
            model_version="2",
            at_ms=AT + 5,
            message="staged: serves when a plan command names it",
        ),
        _event("plan_changed", "single a:1", 1, actor="x", plan_action="retire", at_ms=AT + 9),
    ]
    assert plan_in_effect(events, "wine") == PlanInEffect(
        "wine", "single a:1", 1, "publishing a:1", "installed", AT, ""
    )
    # A dataflow started afresh numbers its plans from 1 again: the newest run counts.
    events += [
        _event("plan_changed", "canary b:2 0.10 over a:1 0.90", 2, actor="y", at_ms=AT + 20),
        _event("installed", "single a:1", 1, model_name="a", model_version="1", at_ms=AT + 30),
    ]
    found = plan_in_effect(events, "wine")
    assert found is not None and (found.number, found.at_ms) == (1, AT + 30)


def test_events_from_before_plans_show_the_last_model_installed_alone() -> None:
    events = [
        _event("installed", model_name="a", model_version="1", at_ms=AT),
        _event("installed", model_name="b", model_version="2", at_ms=AT + 5),
        _event("rejected", model_name="c", model_version="3", at_ms=AT + 9),
    ]
    found = plan_in_effect(events, "wine")
    assert found == PlanInEffect("wine", "single b:2", 0, "publishing b:2", "installed", AT + 5, "")
    assert "  number:  (not numbered)" in format_plan(found)
    assert plan_in_effect(events, "penguins") is None
    staged_only = [_event("installed", model_name="a", model_version="1", message="staged: ...")]
    assert plan_in_effect(staged_only, "wine") is None


# --- publish --stage --------------------------------------------------------------------------


def test_publish_stage_is_in_the_descriptor_and_under_its_signature(tmp_path: Path) -> None:
    private, public, _ = generate_key_pair(tmp_path, "ci")
    parser = cli.build_parser()
    args = parser.parse_args(["publish", "wine-gbt", "--stage", "staged", "--sign", str(private)])
    desc, path = cli.build_descriptor(args)
    cli._trusted(args, desc, path, MODELS_DIR)
    assert desc.stage == "staged"
    keys = TrustedKeys.of(load_public_key(public))
    assert verify(desc, keys, SignaturePolicy.REQUIRE).status is SignatureStatus.VALID
    desc.stage = "active"  # changed after signing: the signature no longer holds
    assert verify(desc, keys, SignaturePolicy.REQUIRE).status is SignatureStatus.BAD_SIGNATURE

    desc, _ = cli.build_descriptor(parser.parse_args(["publish", "wine-gbt"]))
    assert desc.stage == ""  # the default: serves once installed


def test_publish_dry_run_shows_the_stage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["publish", "wine-lr", "--stage", "staged", "--dry-run", *NO_BROKER]) == 0
    assert "  stage:     staged" in capsys.readouterr().out.splitlines()
    assert main(["publish", "wine-lr", "--stage", "later", "--dry-run", *NO_BROKER]) == 2
