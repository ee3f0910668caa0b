"""The rollout judge: turns online reward and guards into plan commands, per data type.

It hears the data type's plan (the registry's installs) and the (prediction, label) pairs
the feedback join makes (`JoinedPairs`), and answers with `PlanCommand`s that go to the
control topic like anyone's, so that every automatic decision is a control message with
its evidence, applied by the registry, recoverable and auditable like a person's:

- a **canary**: per-record loss of the candidate against the active model, bounded in
  [0, 1] so that a margin means the same whatever the model: 0/1 error for classifiers,
  (e/s)^2 / (1 + (e/s)^2) for regressors, e the error and s the label's reference standard
  deviation (1 without a profile), that is 1 - the bandit's reward. Measured: a canary fed
  its features in the wrong order (squared error 9,600 against 0.43) was never rolled back
  on squared error, whose variance swamps a test tuned to a margin of 0.05. A sequential
  test (`dataflows.rollout.sequential.TwoSampleTest`) after every batch of pairs: PROMOTE
  or ROLLBACK once it decides, with `reason` the evidence in a line;
- a canary's **label-free guards** (`dataflows.rollout.guards`): the share of its
  records it failed to score, of those it scored over a time budget, and of those it
  answered otherwise than the active model, each tested against its maximum (`RateGuard`)
  as the shards report them. A guard exceeded rolls the
  canary back, labels or not; where no labels come, every guard holding promotes it if
  `promote_without_labels` says so (off by default: a canary watched by hand stays);
- a **bandit**: every `bandit_every` pairs, Thompson-sampling weights from the arms'
  rewards (`dataflows.rollout.bandit`), sent as SET_WEIGHTS when one moves by 0.01 or more.

Commands carry `for_plan`: one about a plan that has changed since (someone promoted by
hand, or a replay after a crash sends a decision again) is refused by the registry, not
applied twice. A model's evidence is kept while plans name it (a bandit's arms keep their
rewards when only the weights change) and dropped when a plan leaves it out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from dataflows.core.events import JUDGE_ACTOR
from dataflows.monitoring.feedback import JoinedPairs
from dataflows.rollout.bandit import ArmStats, ThompsonAllocator, joined_rewards
from dataflows.rollout.guards import GuardCounts
from dataflows.rollout.plans import ServingPlan, model_key
from dataflows.rollout.sequential import Decision, MetricStats, RateGuard, TwoSampleTest, Verdict
from protos import waxserve_pb2 as pb

log = logging.getLogger(__name__)

ACTOR = JUDGE_ACTOR

WEIGHT_STEP = 0.01
"""A bandit's weights are sent again once one of them moves by this much."""


@dataclass
class JudgeState:
    """What the judge snapshots for one data type."""

    plan: ServingPlan | None = None
    scales: dict[str, float] = field(default_factory=dict)  # regressors' reward scale
    losses: dict[str, MetricStats] = field(default_factory=dict)  # by model key
    rewards: dict[str, ArmStats] = field(default_factory=dict)
    pairs_since_weights: int = 0
    decided: int = 0  # the plan number a canary decision was sent for
    # Label-free guards, by model key: 0/1 per record routed to it as a canary.
    failures: dict[str, MetricStats] = field(default_factory=dict)
    slow: dict[str, MetricStats] = field(default_factory=dict)
    # 0/1 per record the active model scored too, by the canary's key.
    disagreements: dict[str, MetricStats] = field(default_factory=dict)


@dataclass(frozen=True)
class JudgeSettings:
    """How sure the judge must be, and how often a bandit moves."""

    alpha: float = 0.05
    margin: float = 0.05  # loss units: error rate (classifiers), squared error (regressors)
    min_records: int = 200
    max_records: int = 20_000
    bandit_every: int = 500
    bandit_floor: float = 0.01
    # Label-free guards (dataflows/rollout/guards.py): the highest rates a canary may fail
    # to score at, and score slower than `max_us_per_record` at (0: no time guard).
    max_error_rate: float = 0.01
    max_slow_rate: float = 0.05
    max_us_per_record: float = 0.0
    # ... and answer otherwise than the active model at (0: no disagreement guard).
    max_disagreement: float = 0.0
    promote_without_labels: bool = False  # every guard holding promotes an unlabelled canary
    # Data types whose labels come (feedback): their canaries are promoted on labels only.
    labelled: Callable[[str], bool] = lambda _data_type: False


class RolloutJudge:
    """Canary decisions and bandit weights for one data type (see the module docstring)."""

    def __init__(
        self,
        state: JudgeState | None,
        settings: JudgeSettings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = state if state is not None else JudgeState()
        self._settings = settings
        self._clock = clock

    def on_plan(self, plan: ServingPlan, scales: Mapping[str, float]) -> None:
        """The plan in effect from now on, and each model's reward scale (regressors).
        Evidence about models that leave the plan is dropped: a model canaried again
        later starts afresh."""
        state = self.state
        state.plan = plan
        state.scales.update(scales)
        state.losses = {k: v for k, v in state.losses.items() if k in plan.models}
        state.rewards = {k: v for k, v in state.rewards.items() if k in plan.models}
        state.failures = {k: v for k, v in state.failures.items() if k in plan.models}
        state.slow = {k: v for k, v in state.slow.items() if k in plan.models}
        state.disagreements = {k: v for k, v in state.disagreements.items() if k in plan.models}

    def on_guards(self, counts: GuardCounts) -> list[pb.PlanCommand]:
        """Take in what a canary's records showed without labels; a decision, if any."""
        if counts.records == 0:
            return []
        key = model_key(counts.identity.name, counts.identity.version)
        state = self.state
        zero = MetricStats(0, 0.0, 0.0)
        failed = MetricStats(counts.records, counts.failed, counts.failed)  # 0/1 values
        slow = MetricStats(counts.records, counts.slow, counts.slow)
        disagreed = MetricStats(counts.compared, counts.disagreed, counts.disagreed)
        state.failures[key] = state.failures.get(key, zero).merge(failed)
        state.slow[key] = state.slow.get(key, zero).merge(slow)
        state.disagreements[key] = state.disagreements.get(key, zero).merge(disagreed)
        plan = state.plan
        if plan is None or plan.policy != "canary" or plan.canary != key:
            return []
        return self._judge_canary(plan, counts.identity.data_type)

    def on_pairs(self, pairs: JoinedPairs) -> list[pb.PlanCommand]:
        """Take in one model's joined pairs; the commands they lead to, if any. Pairs can
        come before the plan that made them does (they travel another way): they count
        for their model whatever the plan."""
        if len(pairs) == 0:
            return []
        key = model_key(pairs.identity.name, pairs.identity.version)
        state = self.state
        scale = state.scales.get(key, 1.0) if not pairs.classes else None
        rewards = joined_rewards(pairs, scale)
        known = rewards[~np.isnan(rewards)]
        if len(known):
            state.losses[key] = state.losses.get(key, MetricStats(0, 0.0, 0.0)).add(1 - known)
        state.rewards[key] = state.rewards.get(key, ArmStats(0, 0.0, 0.0)).add(rewards)
        state.pairs_since_weights += len(pairs)
        plan = state.plan
        if plan is None or key not in plan.models:
            return []
        if plan.policy == "canary":
            return self._judge_canary(plan, pairs.identity.data_type)
        if plan.policy == "bandit" and state.pairs_since_weights >= self._settings.bandit_every:
            state.pairs_since_weights = 0
            return self._weigh_arms(plan, pairs.identity.data_type)
        return []

    def _judge_canary(self, plan: ServingPlan, data_type: str) -> list[pb.PlanCommand]:
        """A guard that finds the canary over its rate rolls it back, labels or not; then
        the labels decide where they come, else every guard passing promotes it."""
        if self.state.decided == plan.number:
            return []
        canary = plan.canary
        guards = self._guards(canary)
        over = [(name, d) for name, d in guards if d.verdict == Verdict.ROLLBACK]
        if over:
            name, decision = over[0]
            return self._decide(plan, data_type, pb.ROLLBACK, f"guard {name}", decision)
        if self._settings.labelled(data_type) or canary in self.state.losses:
            return self._judge_on_labels(plan, data_type)
        promoting = self._settings.promote_without_labels
        if promoting and guards and all(d.verdict == Verdict.PROMOTE for _, d in guards):
            names = " and ".join(name for name, _ in guards)
            evidence = "; ".join(f"{name}: {d.summary()}" for name, d in guards)
            reason = f"canary {canary} passed its guards ({names}): {evidence}"
            return self._decided(plan, data_type, pb.PROMOTE, reason)
        return []

    def _guards(self, canary: str) -> list[tuple[str, Decision]]:
        """Each label-free guard's verdict on the canary so far (none before it was seen)."""
        settings, state = self._settings, self.state
        failures = state.failures.get(canary)
        if failures is None:
            return []
        limits = [("error rate", settings.max_error_rate, failures)]
        if settings.max_us_per_record > 0:
            limits.append(("slow rate", settings.max_slow_rate, state.slow[canary]))
        if settings.max_disagreement > 0:
            limits.append(("disagreement", settings.max_disagreement, state.disagreements[canary]))
        return [
            (
                name,
                RateGuard(
                    name,
                    rate,
                    alpha=settings.alpha,
                    min_records=settings.min_records,
                    max_records=settings.max_records,
                ).decide(stats),
            )
            for name, rate, stats in limits
        ]

    def _judge_on_labels(self, plan: ServingPlan, data_type: str) -> list[pb.PlanCommand]:
        primary = self.state.losses.get(plan.active)
        candidate = self.state.losses.get(plan.canary)
        if primary is None or candidate is None:
            return []
        settings = self._settings
        test = TwoSampleTest(
            "loss",
            settings.margin,
            alpha=settings.alpha,
            min_records=settings.min_records,
            max_records=settings.max_records,
        )
        decision = test.decide(primary, candidate)
        if decision.verdict == Verdict.CONTINUE:
            return []
        action = pb.PROMOTE if decision.verdict == Verdict.PROMOTE else pb.ROLLBACK
        return self._decide(plan, data_type, action, f"against {plan.active}", decision)

    def _decide(
        self,
        plan: ServingPlan,
        data_type: str,
        action: pb.PlanAction,
        what: str,
        decision: Decision,
    ) -> list[pb.PlanCommand]:
        reason = f"canary {plan.canary} {what}: {decision.summary()}"
        return self._decided(plan, data_type, action, reason)

    def _decided(
        self, plan: ServingPlan, data_type: str, action: pb.PlanAction, reason: str
    ) -> list[pb.PlanCommand]:
        self.state.decided = plan.number
        log.warning("%s: %s", pb.PlanAction.Name(action).lower(), reason)
        return [self._command(data_type, plan, action, [], reason)]

    def _weigh_arms(self, plan: ServingPlan, data_type: str) -> list[pb.PlanCommand]:
        arms = {m: self.state.rewards.get(m, ArmStats(0, 0.0, 0.0)) for m in plan.models}
        allocator = ThompsonAllocator(seed=plan.number, floor=self._settings.bandit_floor)
        weights = allocator.weights(arms)
        current = {v.model: v.weight for v in plan.variants}
        if max(abs(weights[m] - current[m]) for m in plan.models) < WEIGHT_STEP:
            return []
        variants = [pb.PlanVariant(model=m, weight=weights[m]) for m in plan.models]
        pulls = ", ".join(f"{m} {arms[m].mean:.3f} over {arms[m].pulls:,}" for m in plan.models)
        reason = f"bandit rewards: {pulls}"
        return [self._command(data_type, plan, pb.SET_WEIGHTS, variants, reason)]

    def _command(
        self,
        data_type: str,
        plan: ServingPlan,
        action: pb.PlanAction,
        variants: list[pb.PlanVariant],
        reason: str,
    ) -> pb.PlanCommand:
        return pb.PlanCommand(
            data_type=data_type,
            action=action,
            variants=variants,
            actor=ACTOR,
            reason=reason,
            issued_at_ms=int(self._clock() * 1000),
            for_plan=plan.number,
        )
