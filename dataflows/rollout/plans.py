"""Serving plans: which of a data type's installed models score its records, and how.

A plan is data. The data type's registry holds it with the models (recoverable with them),
changes it on `PlanCommand`s from the control topic, and sends it to every shard
(`PlanInstall`); each change numbers the plan anew, and every scored record names the plan
number, policy and role that chose its model. A shard applies a plan once every model in it
has loaded, so within one source partition no record is scored under an older plan after a
record scored under a newer one.

Policies:
- "single": the active model scores every record (what a new descriptor does by default);
- "shadow": the active model's output stands; shadows score the same records, on the
  shadow topic;
- "canary" and "split" (A/B): each record goes to one variant by a stable hash of its entity
  key against the weights (`dataflows.rollout.assign`), so an entity stays on its variant
  and a replay assigns alike; a canary's sequential test promotes or rolls it back;
- "bandit": a split whose weights follow online reward (SET_WEIGHTS commands);
- "ensemble": every member scores every record; a combiner makes the output.

`apply` is the whole state machine, pure: (plan book, command, installed models) -> new plan
book, or `PlanError` saying why the command cannot apply (the plan in effect stays).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass, replace

from protos import waxserve_pb2 as pb

DEFAULT_CANARY_WEIGHT = 0.1
"""A canary command without a weight sends this share of the traffic to the candidate."""

MAX_VARIANTS = 8
"""Models one plan may hold: each scores (a share of) every batch."""

ROLES = {
    "single": "active",
    "shadow": "shadow",
    "canary": "canary",
    "split": "variant",
    "bandit": "arm",
    "ensemble": "ensemble",
}
"""The role a plan's non-active models have, by policy (ScoredRecord.variant_role)."""

COMBINERS = {
    pb.MAJORITY: "majority",
    pb.MEAN: "mean",
    pb.MEDIAN: "median",
    pb.FIRST_CONFIDENT: "first_confident",
}


class PlanError(Exception):
    """A plan command that cannot apply; the message says why and what would."""


@dataclass(frozen=True)
class Variant:
    """A model in a plan: its key ("<name>:<version>"), role and share of traffic."""

    model: str
    role: str
    weight: float = 0.0


@dataclass(frozen=True)
class ServingPlan:
    """How a data type's records are scored: a policy over installed models."""

    policy: str
    variants: tuple[Variant, ...]
    number: int = 1
    entity_field: str = ""  # splits: the contract field that keys an entity; "": record id
    combiner: str = ""  # ensembles
    confidence: float = 0.0  # ensembles, first_confident

    @classmethod
    def single(cls, model: str, number: int = 1) -> ServingPlan:
        """The plan in which `model` scores every record."""
        return cls("single", (Variant(model, "active", 1.0),), number)

    @property
    def active(self) -> str:
        """The model whose output stands ("single", "shadow"), or the control of a canary."""
        for variant in self.variants:
            if variant.role == "active":
                return variant.model
        return ""

    @property
    def canary(self) -> str:
        """The candidate of a canary plan ("" in any other plan)."""
        for variant in self.variants:
            if variant.role == "canary":
                return variant.model
        return ""

    @property
    def models(self) -> tuple[str, ...]:
        """Every model the plan uses, in order."""
        return tuple(v.model for v in self.variants)

    @property
    def splits_traffic(self) -> bool:
        """Whether each record goes to one variant by weight."""
        return self.policy in ("canary", "split", "bandit")

    def describe(self) -> str:
        """The plan in a line, e.g. "canary wine-gbt:2 0.10 over wine-lr:1 0.90"."""
        if self.policy == "single":
            return f"single {self.active}"
        if self.policy == "shadow":
            shadows = ", ".join(v.model for v in self.variants if v.role == "shadow")
            return f"shadow {shadows} beside {self.active}"
        if self.policy == "canary":
            canary = next(v for v in self.variants if v.role == "canary")
            return (
                f"canary {canary.model} {canary.weight:.2f} over "
                f"{self.active} {1 - canary.weight:.2f}"
            )
        if self.policy == "ensemble":
            members = ", ".join(self.models)
            extra = f" at {self.confidence:g}" if self.combiner == "first_confident" else ""
            return f"ensemble {self.combiner}{extra} of {members}"
        shares = ", ".join(f"{v.model} {v.weight:.2f}" for v in self.variants)
        keyed = f" by {self.entity_field}" if self.entity_field else ""
        return f"{self.policy} {shares}{keyed}"


@dataclass(frozen=True)
class PlanBook:
    """What the registry keeps about a data type's serving: the plan, and the model that
    served alone before it (what ROLLBACK restores)."""

    plan: ServingPlan | None = None
    last_good: str = ""


def model_key(name: str, version: str) -> str:
    """How plans name a model: "<name>:<version>"."""
    return f"{name}:{version}"


def activate(book: PlanBook, model: str) -> PlanBook:
    """`model` serves every record from now on; the model that served alone before is kept
    as the last good one (a new active descriptor, or ACTIVATE)."""
    plan = book.plan
    number = plan.number + 1 if plan is not None else 1
    last_good = _sole_model(book) or book.last_good
    if last_good == model:
        last_good = book.last_good if book.last_good != model else ""
    return PlanBook(ServingPlan.single(model, number), last_good)


def apply(
    book: PlanBook,
    command: pb.PlanCommand,
    installed: Collection[str],
    fields: Collection[str] = (),
) -> PlanBook:
    """The plan book after `command`; PlanError when it cannot apply. `installed` are the
    models the data type's registry holds, `fields` its contract's fields."""
    action = command.action
    named = [v.model for v in command.variants]
    for model in named:
        if model not in installed:
            have = ", ".join(sorted(installed)) or "none"
            raise PlanError(
                f"model {model!r} is not installed for this data type (installed: {have})"
            )
    if len(set(named)) != len(named):
        raise PlanError("a model is named twice")
    if len(named) > MAX_VARIANTS:
        raise PlanError(f"{len(named)} models: a plan holds at most {MAX_VARIANTS}")
    plan = book.plan
    if command.for_plan and (plan is None or plan.number != command.for_plan):
        now = f"plan {plan.number} is in effect" if plan is not None else "no plan is in effect"
        raise PlanError(f"the command is for plan {command.for_plan}; {now}")
    if action == pb.ROLLBACK:
        return _rollback(book, installed)
    if action == pb.ACTIVATE:
        return activate(book, _one(named, "ACTIVATE"))
    number = plan.number + 1 if plan is not None else 1
    if action in (pb.SPLIT, pb.BANDIT, pb.ENSEMBLE):  # may start from staged models alone
        return _experiment(book, command, named, fields, number)
    if plan is None or (not plan.active and action in (pb.SHADOW, pb.CANARY)):
        raise PlanError("no model is active yet: activate one first")
    if action == pb.SHADOW:
        if plan.policy not in ("single", "shadow"):
            raise PlanError(f"the plan is a {plan.policy}: promote or roll it back first")
        shadows = [v for v in plan.variants if v.role == "shadow"]
        shadows += [Variant(m, "shadow") for m in named if m not in plan.models]
        if not named:
            raise PlanError("SHADOW names no model")
        variants = (Variant(plan.active, "active", 1.0), *shadows)
        return PlanBook(ServingPlan("shadow", variants, number), _last_good(book))
    if action == pb.CANARY:
        if plan.policy not in ("single", "shadow"):
            raise PlanError(f"the plan is a {plan.policy}: promote or roll it back first")
        model = _one(named, "CANARY")
        if model == plan.active:
            raise PlanError(f"{model} is the active model already")
        weight = command.variants[0].weight or DEFAULT_CANARY_WEIGHT
        _check_weight(weight, exclusive=True)
        variants = (Variant(plan.active, "active", 1 - weight), Variant(model, "canary", weight))
        entity = _entity(command.entity_field, fields)
        return PlanBook(ServingPlan("canary", variants, number, entity), _last_good(book))
    if action == pb.SET_WEIGHTS:
        if not plan.splits_traffic:
            raise PlanError(f"the plan is {plan.policy}: it has no weights to set")
        given = {v.model: v.weight for v in command.variants}
        unknown = [m for m in given if m not in plan.models]
        if unknown:
            raise PlanError(f"{', '.join(unknown)} not in the plan ({plan.describe()})")
        weights = [given.get(v.model, v.weight) for v in plan.variants]
        shares = _normalized(weights)
        if plan.policy == "canary":
            _check_weight(shares[1], exclusive=True)
        variants = tuple(replace(v, weight=w) for v, w in zip(plan.variants, shares, strict=True))
        return PlanBook(replace(plan, variants=variants, number=number), book.last_good)
    if action == pb.PROMOTE:
        if plan.policy == "single":
            raise PlanError(f"nothing to promote: {plan.active} serves alone")
        if named:
            model = _one(named, "PROMOTE")
            if model not in plan.models:
                raise PlanError(f"{model} is not in the plan ({plan.describe()})")
        elif plan.policy == "canary":
            model = next(v.model for v in plan.variants if v.role == "canary")
        else:
            raise PlanError(f"PROMOTE of a {plan.policy} names the model to promote")
        last_good = plan.active or book.last_good
        if last_good == model:
            last_good = book.last_good
        return PlanBook(ServingPlan.single(model, number), last_good)
    if action == pb.RETIRE:
        if not named:
            raise PlanError("RETIRE names no model")
        kept = tuple(v for v in plan.variants if v.model not in named)
        if plan.active in named or not kept:
            raise PlanError(
                f"{plan.active or named[0]} serves: activate or promote another model first"
            )
        if plan.policy in ("canary", "split", "bandit", "ensemble") and len(kept) < 2:
            rest = kept[0].model
            last_good = book.last_good if book.last_good not in named else ""
            return PlanBook(ServingPlan.single(rest, number), last_good)
        if plan.policy == "shadow" and len(kept) == 1:
            return PlanBook(ServingPlan.single(plan.active, number), book.last_good)
        if kept == plan.variants:  # a staged model: the plan does not change
            return book
        if plan.splits_traffic:
            kept_shares = _normalized([v.weight for v in kept])
            kept = tuple(replace(v, weight=w) for v, w in zip(kept, kept_shares, strict=True))
        return PlanBook(replace(plan, variants=kept, number=number), book.last_good)
    raise PlanError(f"unknown plan action {action}")


def _experiment(
    book: PlanBook,
    command: pb.PlanCommand,
    named: list[str],
    fields: Collection[str],
    number: int,
) -> PlanBook:
    """SPLIT, BANDIT and ENSEMBLE: a new plan over the named models."""
    action = command.action
    active = book.plan.active if book.plan is not None else ""
    if action in (pb.SPLIT, pb.BANDIT):
        if len(named) < 2:
            raise PlanError(f"{pb.PlanAction.Name(action)} needs two models or more")
        policy = "split" if action == pb.SPLIT else "bandit"
        weights = [v.weight for v in command.variants]
        if policy == "bandit" and not any(weights):
            weights = [1.0] * len(named)  # a bandit starts even
        shares = _normalized(weights)
        role = ROLES[policy]
        variants = tuple(
            Variant(m, "active" if m == active else role, w)
            for m, w in zip(named, shares, strict=True)
        )
        entity = _entity(command.entity_field, fields)
        return PlanBook(ServingPlan(policy, variants, number, entity), _last_good(book))
    if action == pb.ENSEMBLE:
        if len(named) < 2:
            raise PlanError("ENSEMBLE needs two models or more")
        combiner = COMBINERS.get(command.combiner)
        if combiner is None:
            raise PlanError("ENSEMBLE needs a combiner: majority, mean, median or first_confident")
        if combiner == "first_confident" and not 0 < command.confidence <= 1:
            raise PlanError("first_confident needs a confidence in (0, 1]")
        variants = tuple(Variant(m, "ensemble", 1.0) for m in named)
        plan = ServingPlan("ensemble", variants, number, "", combiner, command.confidence)
        return PlanBook(plan, _last_good(book))
    raise PlanError(f"unknown plan action {action}")


def _rollback(book: PlanBook, installed: Collection[str]) -> PlanBook:
    plan = book.plan
    if plan is None:
        raise PlanError("no plan to roll back")
    number = plan.number + 1
    if plan.policy in ("canary", "shadow") and plan.active:
        # An experiment over the active model: back to the active model alone.
        return PlanBook(ServingPlan.single(plan.active, number), book.last_good)
    target = book.last_good
    if not target:
        raise PlanError(f"no last good model to roll back to ({plan.describe()})")
    if target not in installed:
        raise PlanError(f"the last good model {target} is no longer installed")
    return PlanBook(ServingPlan.single(target, number), "")


def _sole_model(book: PlanBook) -> str:
    plan = book.plan
    return plan.active if plan is not None and plan.policy == "single" else ""


def _last_good(book: PlanBook) -> str:
    """The last good model when an experiment starts: the one serving alone now."""
    return _sole_model(book) or (book.plan.active if book.plan else "") or book.last_good


def _one(named: list[str], action: str) -> str:
    if len(named) != 1:
        raise PlanError(f"{action} names exactly one model ({len(named)} given)")
    return named[0]


def _check_weight(weight: float, *, exclusive: bool) -> None:
    if not (math.isfinite(weight) and 0 < weight < 1):
        raise PlanError(f"weight {weight!r}: must be between 0 and 1 (exclusive)")


def _normalized(weights: Iterable[float]) -> list[float]:
    values = list(weights)
    if any(not math.isfinite(w) or w < 0 for w in values):
        raise PlanError(f"weights {values}: each must be a finite number >= 0")
    total = sum(values)
    if total <= 0:
        raise PlanError("weights add up to 0: give each variant a share")
    return [w / total for w in values]


def _entity(field: str, fields: Collection[str]) -> str:
    if field and fields and field not in fields:
        raise PlanError(f"entity field {field!r} is not a field of the contract")
    return field
