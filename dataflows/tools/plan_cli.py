"""`waxserve plan` and `waxserve rollback`: serving-plan commands on the control topic.

A `PlanCommand` (protos/waxserve.proto) changes which of a data type's installed models
score its records, and how (`dataflows.rollout.plans`). These commands build one from the
command line, check locally what can be checked without the dataflow (model names, weights,
the number of models each action takes, the combiner of an ensemble), send it to the control
topic and, with `--wait`, read the dataflow's answer from the events topic: a "plan_changed"
or "plan_rejected" `ModelEvent` whose source position is the command's.

```
waxserve plan wine canary wine-gbt:2=0.1 --reason "gbt on 10%" --wait
waxserve plan wine split wine-lr:1=0.5 wine-gbt:2=0.5 --entity-field region
waxserve plan wine ensemble wine-lr:1 wine-gbt:2 wine-rf:1 --combiner median
waxserve plan wine show
waxserve rollback wine --reason "gbt too slow"
```

`dataflows.tools.cli` registers the commands (`add_plan_commands`); this module reuses its
helpers for `--wait` and reading topics.
"""

from __future__ import annotations

import argparse
import getpass
import json
import math
import os
import socket
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from confluent_kafka import Message
from google.protobuf.message import DecodeError

from dataflows.core.config import Config
from dataflows.core.records import MAX_DATA_TYPE_LENGTH, valid_data_type
from dataflows.rollout.plans import COMBINERS, DEFAULT_CANARY_WEIGHT, MAX_VARIANTS
from dataflows.tools.broker import control_message_key
from dataflows.tools.cli import (
    EXIT_REJECTED,
    PROG,
    VERDICT_TIMEOUT_S,
    _events_end,
    _positive_float,
    _positive_int,
    _proto_dict,
    _read_all,
    _wait_for_verdict,
)
from dataflows.tools.replay import CliError, send_control
from protos import waxserve_pb2 as pb

ACTIONS: dict[str, pb.PlanAction] = {
    "activate": pb.ACTIVATE,
    "shadow": pb.SHADOW,
    "canary": pb.CANARY,
    "split": pb.SPLIT,
    "bandit": pb.BANDIT,
    "ensemble": pb.ENSEMBLE,
    "weights": pb.SET_WEIGHTS,
    "promote": pb.PROMOTE,
    "rollback": pb.ROLLBACK,
    "retire": pb.RETIRE,
}
"""`waxserve plan` ACTION -> PlanAction."""

SHOW = "show"
"""The ACTION that prints the plan in effect instead of sending a command."""

COMBINER_NAMES: dict[str, pb.Combiner] = {name: value for value, name in COMBINERS.items()}
"""--combiner NAME -> Combiner."""

MODEL_COUNTS: dict[pb.PlanAction, tuple[int, int]] = {
    pb.ACTIVATE: (1, 1),
    pb.SHADOW: (1, MAX_VARIANTS),
    pb.CANARY: (1, 1),
    pb.SPLIT: (2, MAX_VARIANTS),
    pb.BANDIT: (2, MAX_VARIANTS),
    pb.ENSEMBLE: (2, MAX_VARIANTS),
    pb.SET_WEIGHTS: (1, MAX_VARIANTS),
    pb.PROMOTE: (0, 1),
    pb.ROLLBACK: (0, 0),
    pb.RETIRE: (1, MAX_VARIANTS),
}
"""How many models each action names (least, most), as `plans.apply` takes them."""

WEIGHTED = frozenset({pb.CANARY, pb.SPLIT, pb.BANDIT, pb.SET_WEIGHTS})
"""Actions whose models take a =WEIGHT."""

KEYED = frozenset({pb.CANARY, pb.SPLIT, pb.BANDIT})
"""Actions that split traffic by entity (--entity-field)."""

EXIT_USAGE = 2
"""A command that cannot be right, refused before sending (as argparse's usage errors)."""

PLAN_VERDICTS = {"plan_changed": 0, "plan_rejected": EXIT_REJECTED}
"""The events that answer a plan command, and the exit code of each."""


class PlanUsageError(ValueError):
    """A plan command found wrong before it is sent; the message says what would be right."""


# --- building the command ------------------------------------------------------------------


@dataclass(frozen=True)
class ModelArg:
    """A MODEL[=WEIGHT] argument: "<name>:<version>" and its weight, if given."""

    model: str
    weight: float | None = None


def parse_model(text: str) -> ModelArg:
    """One MODEL[=WEIGHT] argument: "wine-gbt:2=0.1" -> ModelArg("wine-gbt:2", 0.1);
    PlanUsageError if it is malformed."""
    model, sep, weight_text = text.partition("=")
    name, colon, version = model.partition(":")
    if not (colon and name.strip() and version.strip()) or model != model.strip():
        raise PlanUsageError(
            f"{text!r}: name a model as NAME:VERSION, e.g. wine-gbt:2 (optionally =WEIGHT)"
        )
    if not sep:
        return ModelArg(model)
    try:
        weight = float(weight_text)
    except ValueError:
        raise PlanUsageError(f"{text!r}: the weight {weight_text!r} is not a number") from None
    if not (math.isfinite(weight) and weight >= 0):
        raise PlanUsageError(f"{text!r}: a weight must be a finite number >= 0")
    return ModelArg(model, weight)


def default_actor() -> str:
    """Who sends a command when --actor does not say: "$USER@$HOSTNAME"."""
    try:
        user = os.environ.get("USER") or getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a bare container)
        user = str(os.getuid())
    host = os.environ.get("HOSTNAME") or socket.gethostname()
    return f"{user}@{host}"


def build_command(
    data_type: str,
    action: str,
    models: Sequence[str] = (),
    *,
    entity_field: str = "",
    combiner: str | None = None,
    confidence: float | None = None,
    actor: str = "",
    reason: str = "",
    issued_at_ms: int = 0,
    for_plan: int = 0,
) -> pb.PlanCommand:
    """The PlanCommand for `waxserve plan DATA_TYPE ACTION MODEL[=WEIGHT]...`, checked as far
    as it can be without the dataflow (which models are installed, and the plan in effect,
    only the dataflow knows); PlanUsageError says what is wrong."""
    if not valid_data_type(data_type):
        raise PlanUsageError(f"data type {data_type!r}: 1 to {MAX_DATA_TYPE_LENGTH} characters")
    code = ACTIONS.get(action)
    if code is None:
        raise PlanUsageError(f"unknown action {action!r}: one of {', '.join(ACTIONS)}")
    args = [parse_model(m) for m in models]
    names = [a.model for a in args]
    least, most = MODEL_COUNTS[code]
    if not least <= len(args) <= most:
        wanted = f"{least}" if least == most else f"{least} to {most}"
        if most == 0:
            wanted = "no"
        raise PlanUsageError(f"{action} takes {wanted} model(s), {len(args)} given")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise PlanUsageError(f"{', '.join(repeated)} named twice")
    weights = _weights(code, action, args)
    if entity_field and code not in KEYED:
        raise PlanUsageError(f"--entity-field is for canary, split and bandit, not {action}")
    combiner_code = _combiner(code, action, combiner, confidence)
    return pb.PlanCommand(
        data_type=data_type,
        action=code,
        variants=[pb.PlanVariant(model=n, weight=w) for n, w in zip(names, weights, strict=True)],
        entity_field=entity_field,
        combiner=combiner_code,
        confidence=confidence or 0.0,
        actor=actor,
        reason=reason,
        issued_at_ms=issued_at_ms,
        for_plan=for_plan,
    )


def _weights(code: pb.PlanAction, action: str, args: Sequence[ModelArg]) -> list[float]:
    """The weight sent with each model: what was given, or what the action means without."""
    given = [a.weight for a in args]
    if code not in WEIGHTED:
        if any(w is not None for w in given):
            raise PlanUsageError(
                f"{action} takes no weights (MODEL=WEIGHT is for canary, split, bandit and weights)"
            )
        return [0.0] * len(args)
    if code == pb.CANARY:
        weight = given[0]
        if weight is None:
            return [DEFAULT_CANARY_WEIGHT]
        if not 0 < weight < 1:
            raise PlanUsageError(
                f"a canary's weight is its share of the traffic, between 0 and 1 "
                f"(exclusive): {args[0].model}={weight:g}"
            )
        return [weight]
    if code == pb.SET_WEIGHTS:
        missing = [a.model for a in args if a.weight is None]
        if missing:
            raise PlanUsageError(f"weights: give each model its weight ({missing[0]}=0.3)")
        return [float(w or 0.0) for w in given]
    # SPLIT, BANDIT: all weights or none (an even split); shares are normalized.
    if all(w is None for w in given):
        return [1.0 / len(args)] * len(args)
    if any(w is None for w in given):
        raise PlanUsageError(f"{action}: give every model a weight, or none for an even split")
    values = [float(w or 0.0) for w in given]
    if code == pb.SPLIT and sum(values) <= 0:
        raise PlanUsageError("split: the weights add up to 0; give each model a share")
    return values


def _combiner(
    code: pb.PlanAction, action: str, combiner: str | None, confidence: float | None
) -> pb.Combiner:
    if code != pb.ENSEMBLE:
        if combiner is not None or confidence is not None:
            raise PlanUsageError(f"--combiner and --confidence are for ensemble, not {action}")
        return pb.COMBINER_UNSPECIFIED
    if combiner is None:
        raise PlanUsageError(f"ensemble needs --combiner: {', '.join(COMBINER_NAMES)}")
    if combiner not in COMBINER_NAMES:
        raise PlanUsageError(f"--combiner {combiner!r}: one of {', '.join(COMBINER_NAMES)}")
    if combiner == "first_confident":
        if confidence is None or not (math.isfinite(confidence) and 0 < confidence <= 1):
            raise PlanUsageError(
                "first_confident needs --confidence P in (0, 1]: the top probability a "
                "member must reach for its answer to stand"
            )
    elif confidence is not None:
        raise PlanUsageError(f"--confidence is for the first_confident combiner, not {combiner}")
    return COMBINER_NAMES[combiner]


# --- the command line ----------------------------------------------------------------------


def add_plan_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Register `plan` and `rollback` on the `waxserve` subcommands."""
    p = sub.add_parser(
        "plan",
        parents=[common],
        help="change or show a data type's serving plan (shadow, canary, split, ...)",
        description="Send a serving-plan command to the control topic (key: plan/DATA_TYPE/...), "
        "or with ACTION show print the plan in effect. Models are NAME:VERSION of models "
        "installed for the data type (publish a candidate with --stage staged to load it "
        "without serving it). Actions: activate M (M serves alone), shadow M... (they also "
        "score every record, on the shadow topic), canary M[=W] (M serves W of the traffic, "
        f"default {DEFAULT_CANARY_WEIGHT:g}), split M=W M=W... (A/B), bandit M... (weights "
        "follow online reward), ensemble M M... --combiner C, weights M=W... (new weights "
        "for the current canary, split or bandit: a model left out keeps its share, then "
        "all are normalized), promote [M] (the canary, or M, serves "
        "alone), rollback (the last good model serves alone), retire M... . The command is "
        "checked here as far as it can be; the dataflow checks the rest (are the models "
        "installed? does the plan in effect allow it?) and answers on the events topic.",
    )
    p.add_argument("data_type", metavar="DATA_TYPE", help="the data type, e.g. wine")
    p.add_argument(
        "action", metavar="ACTION", choices=[*ACTIONS, SHOW], help=f"{', '.join(ACTIONS)} or show"
    )
    p.add_argument(
        "models",
        metavar="MODEL[=WEIGHT]",
        nargs="*",
        help="NAME:VERSION of an installed model; =WEIGHT its share of the traffic "
        "(canary, split, bandit, weights)",
    )
    p.add_argument(
        "--entity-field",
        default="",
        metavar="FIELD",
        help="canary, split, bandit: the contract field that keeps an entity on one variant "
        "(default: the record id)",
    )
    p.add_argument(
        "--combiner", choices=list(COMBINER_NAMES), help="ensemble: how members make one output"
    )
    p.add_argument(
        "--confidence",
        type=float,
        metavar="P",
        help="ensemble --combiner first_confident: the top probability a member must reach",
    )
    _add_sending_arguments(p)
    p.set_defaults(run=cmd_plan)

    p = sub.add_parser(
        "rollback",
        parents=[common],
        help="roll a data type back: its last good model serves alone (plan DATA_TYPE rollback)",
        description="Send a ROLLBACK plan command: an experiment over the active model "
        "(shadow, canary) ends with the active model serving alone; otherwise the last good "
        "model (the one that served alone before) serves every record again. The same as "
        "`waxserve plan DATA_TYPE rollback`.",
    )
    p.add_argument("data_type", metavar="DATA_TYPE", help="the data type, e.g. wine")
    _add_sending_arguments(p)
    p.set_defaults(run=cmd_rollback, action="rollback", models=[], entity_field="")
    p.set_defaults(combiner=None, confidence=None)


def _add_sending_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reason", default="", metavar="TEXT", help="why (shown in the events)")
    p.add_argument("--actor", metavar="WHO", help="who sends it (default: $USER@$HOSTNAME)")
    p.add_argument(
        "--for-plan",
        type=_positive_int,
        default=0,
        metavar="N",
        help="apply only while plan N is in effect (its number in `plan DATA_TYPE show`); "
        "the dataflow rejects it if the plan has changed since",
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="wait for the dataflow's answer (its event on the events topic) and exit with "
        "it: 0 plan_changed (prints the plan now in effect), 1 plan_rejected (with the "
        "reason; the plan in effect stays), 4 no answer within --timeout",
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=VERDICT_TIMEOUT_S,
        metavar="S",
        help=f"with --wait: seconds to wait for the answer; with show: to read the events "
        f"topic (default {VERDICT_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the command and print it as JSON; send nothing (no broker needed)",
    )


def cmd_plan(config: Config, args: argparse.Namespace) -> int:
    """`waxserve plan`: send a plan command (or show the plan in effect)."""
    if args.action == SHOW:
        extra = args.models or args.wait or args.dry_run or args.combiner or args.entity_field
        extra = extra or args.for_plan or args.reason or args.actor is not None
        if extra or args.confidence is not None:
            return _usage(args, "show takes no models and no options but --timeout")
        return show_plan(config, args.data_type, args.timeout)
    try:
        command = build_command(
            args.data_type,
            args.action,
            args.models,
            entity_field=args.entity_field,
            combiner=args.combiner,
            confidence=args.confidence,
            actor=default_actor() if args.actor is None else args.actor,
            reason=args.reason,
            issued_at_ms=time.time_ns() // 1_000_000,
            for_plan=args.for_plan,
        )
    except PlanUsageError as exc:
        return _usage(args, str(exc))
    return send_and_wait(
        config, command, wait=args.wait, timeout_s=args.timeout, dry_run=args.dry_run
    )


def cmd_rollback(config: Config, args: argparse.Namespace) -> int:
    """`waxserve rollback DATA_TYPE`: `waxserve plan DATA_TYPE rollback`."""
    return cmd_plan(config, args)


def _usage(args: argparse.Namespace, message: str) -> int:
    print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def send_and_wait(
    config: Config, command: pb.PlanCommand, *, wait: bool, timeout_s: float, dry_run: bool
) -> int:
    """Send `command` (or, dry, print it as JSON) and, with `wait`, exit with the answer."""
    action = pb.PlanAction.Name(command.action).lower()
    where = f"{config.control_topic} (key {control_message_key(command).decode()})"
    if dry_run:
        fields = _proto_dict(command)
        ordered = {f.name: fields[f.name] for f in command.DESCRIPTOR.fields}  # as the proto
        print(json.dumps({"plan": ordered}, indent=2))
        print(f"would send {action} for {command.data_type} to {where}", file=sys.stderr)
        print("dry run: nothing sent", file=sys.stderr)
        return 0
    events_start = _events_end(config) if wait else None
    msg = send_plan(config, command)
    print(
        f"sent {action} for {command.data_type} to {msg.topic()} [{msg.partition()}] at "
        f"offset {msg.offset()}"
    )
    if events_start is None:
        return 0
    return _wait_for_verdict(
        config, msg, events_start, timeout_s, verdicts=PLAN_VERDICTS, describe=plan_verdict_line
    )


def send_plan(config: Config, command: pb.PlanCommand) -> Message:
    """Produce a plan command to the control topic and wait for its delivery."""
    return send_control(config, command)


def plan_verdict_line(event: pb.ModelEvent) -> str:
    """The dataflow's answer in a line: the plan now in effect, or why it was rejected."""
    if event.kind == "plan_changed":
        return f"plan for {event.data_type} is now: {event.plan} (plan {event.plan_number})"
    line = f"rejected: {event.plan_action or 'plan'} for {event.data_type}"
    if event.reason:
        line += f": {event.reason}"
    if event.message:
        line += f": {event.message}"
    if event.plan:
        line += f" (the plan stays: {event.plan})"
    return line


# --- show ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanInEffect:
    """A data type's plan as the events topic tells it, and the event that made it."""

    data_type: str
    plan: str  # one line, e.g. "canary wine-gbt:2 0.10 over wine-lr:1 0.90"
    number: int  # 0: not numbered (a dataflow from before serving plans)
    changed_by: str  # the command's actor, or "publishing <name>:<version>"
    action: str  # the command's action ("canary"), or the event's kind ("installed")
    at_ms: int
    reason: str


def plan_in_effect(events: Iterable[pb.ModelEvent], data_type: str) -> PlanInEffect | None:
    """The plan in effect after `events` (in topic order), or None if they show none.

    Every event of a data type that carries a plan reports the plan in effect after it
    (a plan change, a model installed, a rejected command, a resume): the last one is
    current. What made it is the first plan change or install of the run of events with
    its number that ends there (a staged model installed, or a staged model retired, leaves
    the plan and its number as they were). Events of a dataflow from before plans carry
    none: there, the last model installed (not staged) serves alone.
    """
    mine = [e for e in events if e.data_type == data_type]
    latest = next((i for i in range(len(mine) - 1, -1, -1) if mine[i].plan), None)
    if latest is None:
        installed = [e for e in mine if e.kind == "installed" and not _staged(e)]
        if not installed:
            return None
        last = installed[-1]
        model = f"{last.model_name}:{last.model_version}"
        return PlanInEffect(
            data_type, f"single {model}", 0, f"publishing {model}", "installed", last.at_ms, ""
        )
    current = mine[latest]
    origin = current
    for event in reversed(mine[: latest + 1]):
        if event.plan and event.plan_number != current.plan_number:
            break  # the plan before it (or a run of the dataflow numbered anew)
        if event.kind in ("plan_changed", "installed"):
            origin = event  # the earliest: a staged model installed later changed nothing
    if origin.kind == "plan_changed":
        by, action, reason = origin.actor or "?", origin.plan_action, origin.message
    else:
        by = f"publishing {origin.model_name}:{origin.model_version}"
        action, reason = origin.kind, ""
    return PlanInEffect(
        data_type, current.plan, current.plan_number, by, action, origin.at_ms, reason
    )


def _staged(event: pb.ModelEvent) -> bool:
    return event.message.startswith("staged")


def format_plan(found: PlanInEffect) -> str:
    """`waxserve plan DATA_TYPE show`'s report."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(found.at_ms / 1000))
    number = str(found.number) if found.number else "(not numbered)"
    lines = [
        f"plan for {found.data_type}: {found.plan}",
        f"  number:  {number}",
        f"  changed: {when} by {found.changed_by} ({found.action})",
    ]
    if found.reason:
        lines.append(f"  reason:  {found.reason}")
    return "\n".join(lines)


def show_plan(config: Config, data_type: str, timeout_s: float) -> int:
    """Print the plan in effect for `data_type`, read from the events topic."""
    events: list[pb.ModelEvent] = []
    for msg in _read_all(config, config.events_topic, timeout_s):
        try:
            events.append(pb.ModelEvent.FromString(msg.value() or b""))
        except DecodeError:
            continue
    found = plan_in_effect(events, data_type)
    if found is None:
        raise CliError(
            f"the events topic {config.events_topic} shows no plan and no model installed "
            f"for {data_type!r}"
        )
    print(format_plan(found))
    return 0
