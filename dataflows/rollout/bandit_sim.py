"""The bandit allocators in simulation: traffic on the best arm, and regret, with late rewards.

Arms with known mean rewards: two classifiers (accuracy 0.70 and 0.75), three (0.70, 0.73,
0.75), and two regressors (errors of 0.60 and 0.45 label standard deviations; rewards by
`reward_of` with the label's standard deviation as the scale). Records come in order; each
goes to an arm by a uniform draw against the weights in force (`assign`; the dataflow's
split draws the point from a hash of an entity key: the same shares in distribution); the
arm's prediction earns its reward through `reward_of`, but the reward is known only `delay`
records later; every `update_every` records the allocator sets new weights from the rewards
known by then. Every policy sees the same records, draws and outcomes for a seed (common
random numbers), so their differences are theirs.

Reported per scenario, for Thompson sampling, UCB1 and a fixed even split (50/50 with two
arms), averaged over the seeds: the best arm's weight after 1,000, 10,000 and 100,000
records; the cumulative regret there (the sum over records of the best arm's mean reward
minus the mean reward of the arm used); the share of traffic that changes arm at an update
(half the sum of the weights' absolute changes: the least share of entities a hashed split
moves to another variant); and the run time.

    python -m dataflows.rollout.bandit_sim            # or: just bandit-sim
    python -m dataflows.rollout.bandit_sim --quick    # 40,000 records, 5 seeds

Seeded and deterministic. Exits 1 unless Thompson puts at least 90% of the traffic on the
best arm by the last checkpoint, with less than a quarter of the even split's regret, in
every scenario.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from dataflows.rollout.assign import assign
from dataflows.rollout.bandit import (
    Allocator,
    ArmStats,
    ThompsonAllocator,
    UCBAllocator,
    reward_of,
)

RECORDS = 100_000
CHECKPOINTS = (1_000, 10_000, 100_000)
SEEDS = 20
UPDATE_EVERY = 1_000
DELAY = 2_000
QUICK_RECORDS = 40_000
QUICK_CHECKPOINTS = (1_000, 10_000, 40_000)
QUICK_SEEDS = 5

GOAL_BEST_WEIGHT = 0.9
GOAL_REGRET_RATIO = 0.25
"""The goal, for Thompson at the last checkpoint of every scenario: at least this weight on
the best arm, and at most this fraction of the even split's regret."""

CLASSES = 3
"""Classes of the simulated classifiers (a wrong answer is one of the other classes)."""

LABEL_MEAN, LABEL_SD = 5.6, 0.8
"""Labels of the simulated regressors (about the wine quality's)."""


@dataclass(frozen=True)
class Scenario:
    """Arms with known behaviour: classifiers with these accuracies, or (when `error_sds`)
    regressors whose errors are normal with these standard deviations, in label sds."""

    name: str
    arms: tuple[str, ...]
    accuracies: tuple[float, ...] = ()
    error_sds: tuple[float, ...] = ()

    @property
    def means(self) -> np.ndarray:
        """Each arm's expected reward."""
        if not self.error_sds:
            return np.array(self.accuracies)
        # E[1 / (1 + (sd Z)^2)], Z standard normal, by Gauss-Hermite quadrature.
        z, w = np.polynomial.hermite_e.hermegauss(120)
        sds = np.array(self.error_sds)[:, None]
        return (w / (1.0 + np.square(sds * z))).sum(axis=1) / np.sqrt(2.0 * np.pi)

    def outcomes(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """The reward each arm would earn on each of n records, (n, arms), through
        `reward_of` on simulated predictions and labels (the same labels for every arm)."""
        k = len(self.arms)
        rewards = np.empty((n, k))
        if not self.error_sds:
            labels = rng.integers(0, CLASSES, n)
            for j, accuracy in enumerate(self.accuracies):
                wrong = (labels + rng.integers(1, CLASSES, n)) % CLASSES
                predicted = np.where(rng.random(n) < accuracy, labels, wrong)
                rewards[:, j] = reward_of(predicted, labels)
        else:
            values = rng.normal(LABEL_MEAN, LABEL_SD, n)
            for j, sd in enumerate(self.error_sds):
                predicted = values + rng.normal(0.0, sd * LABEL_SD, n)
                rewards[:, j] = reward_of(predicted, values, scale=LABEL_SD)
        return rewards


SCENARIOS = (
    Scenario("2 classifiers, accuracy 0.70 / 0.75", ("a", "b"), accuracies=(0.70, 0.75)),
    Scenario("3 classifiers, accuracy 0.70 / 0.73 / 0.75", ("a", "b", "c"), (0.70, 0.73, 0.75)),
    Scenario("2 regressors, error sd 0.60 / 0.45", ("a", "b"), error_sds=(0.60, 0.45)),
)


@dataclass(frozen=True)
class EvenSplit:
    """The fixed split: every arm the same weight, whatever the rewards."""

    def weights(self, arms: Mapping[str, ArmStats]) -> dict[str, float]:
        """1/k each."""
        return {name: 1.0 / len(arms) for name in sorted(arms)}


POLICIES = ("Thompson", "UCB1", "even split")


def allocator(policy: str, seed: int) -> Allocator:
    """The allocator of a policy, for one seed."""
    if policy == "Thompson":
        return ThompsonAllocator(seed=seed)
    if policy == "UCB1":
        return UCBAllocator()
    return EvenSplit()


@dataclass
class Run:
    """One simulated run: at each checkpoint, the best arm's weight in force and the
    cumulative regret; and the mean share of traffic moved per update."""

    best_weight: np.ndarray  # (checkpoints,)
    regret: np.ndarray  # (checkpoints,)
    moved: float


def simulate(
    scenario: Scenario,
    policy: Allocator,
    records: int,
    checkpoints: Sequence[int],
    seed: int,
    update_every: int = UPDATE_EVERY,
    delay: int = DELAY,
) -> Run:
    """Records through a bandit: assignment by the weights, rewards `delay` records late,
    new weights every `update_every` records."""
    if not 0 < min(checkpoints) <= max(checkpoints) <= records:
        raise ValueError(f"checkpoints {checkpoints}: want them in 1 .. {records}")
    rng = np.random.default_rng(seed)
    # The arms' names in a random order per seed: UCB (and any tie-break) favours the first.
    order = rng.permutation(len(scenario.arms))
    outcomes = scenario.outcomes(records, rng)[:, order]
    draws = rng.random(records)
    means = scenario.means[order]
    best = int(np.argmax(means))
    names = list(scenario.arms)
    stats = {name: ArmStats() for name in names}
    arm_of = np.empty(records, dtype=np.int64)
    best_weight = np.empty(records)
    weights = _vector(policy.weights(stats), names)
    moved: list[float] = []
    known = 0
    for start in range(0, records, update_every):
        end = min(start + update_every, records)
        arm_of[start:end] = assign(draws[start:end], weights.tolist())
        best_weight[start:end] = weights[best]
        # The rewards of the records `delay` behind the last one are known at the update.
        now_known = max(0, end - delay)
        if now_known > known:
            arms = arm_of[known:now_known]
            rewards = outcomes[np.arange(known, now_known), arms]
            for j, name in enumerate(names):
                stats[name] = stats[name].add(rewards[arms == j])
            known = now_known
        new = _vector(policy.weights(stats), names)
        moved.append(0.5 * float(np.abs(new - weights).sum()))
        weights = new
    regret = np.cumsum(means[best] - means[arm_of])
    at = np.asarray(checkpoints) - 1
    return Run(best_weight[at], regret[at], float(np.mean(moved)))


@dataclass
class Summary:
    """A policy's runs in a scenario, over the seeds."""

    scenario: Scenario
    policy: str
    checkpoints: tuple[int, ...]
    best_weight: np.ndarray  # (checkpoints,), mean over seeds
    regret: np.ndarray  # (checkpoints,), mean over seeds
    regret_sd: np.ndarray  # (checkpoints,), over seeds
    moved: float
    seconds: float


def evaluate(
    records: int = RECORDS,
    checkpoints: Sequence[int] = CHECKPOINTS,
    seeds: int = SEEDS,
    update_every: int = UPDATE_EVERY,
    delay: int = DELAY,
    scenarios: Sequence[Scenario] = SCENARIOS,
    policies: Sequence[str] = POLICIES,
) -> list[Summary]:
    """Every policy in every scenario, seeds 0 .. seeds - 1."""
    points = tuple(sorted({c for c in checkpoints if c < records} | {records}))
    summaries = []
    for scenario in scenarios:
        for policy in policies:
            started = time.perf_counter()
            runs = [
                simulate(
                    scenario,
                    allocator(policy, seed),
                    records,
                    points,
                    seed,
                    update_every,
                    delay,
                )
                for seed in range(seeds)
            ]
            weights = np.array([r.best_weight for r in runs])
            regrets = np.array([r.regret for r in runs])
            summaries.append(
                Summary(
                    scenario,
                    policy,
                    points,
                    weights.mean(axis=0),
                    regrets.mean(axis=0),
                    regrets.std(axis=0),
                    float(np.mean([r.moved for r in runs])),
                    time.perf_counter() - started,
                )
            )
    return summaries


def render(summaries: Sequence[Summary]) -> list[str]:
    """The results as a Markdown table."""
    points = summaries[0].checkpoints
    at = " / ".join(_count(c) for c in points)
    lines = [
        f"| scenario | policy | best arm's weight at {at} | regret at {at} (± sd) "
        "| traffic moved per update | time |",
        "|---|---|---|---|---:|---:|",
    ]
    for s in summaries:
        weights = " / ".join(f"{w:.2f}" for w in s.best_weight)
        regrets = " / ".join(f"{r:,.0f}" for r in s.regret[:-1])
        regrets += f"{' / ' if len(points) > 1 else ''}{s.regret[-1]:,.0f} ± {s.regret_sd[-1]:,.0f}"
        lines.append(
            f"| {s.scenario.name} | {s.policy} | {weights} | {regrets} "
            f"| {s.moved:.1%} | {s.seconds:.1f} s |"
        )
    return lines


def goal_failures(summaries: Sequence[Summary]) -> list[str]:
    """What of the goal Thompson misses, per scenario (empty: met)."""
    even = {s.scenario.name: s for s in summaries if s.policy == "even split"}
    failures = []
    for s in summaries:
        if s.policy != "Thompson":
            continue
        if s.best_weight[-1] < GOAL_BEST_WEIGHT:
            failures.append(f"{s.scenario.name}: best arm's weight {s.best_weight[-1]:.2f}")
        base = even.get(s.scenario.name)
        if base is not None and s.regret[-1] > GOAL_REGRET_RATIO * base.regret[-1]:
            failures.append(
                f"{s.scenario.name}: regret {s.regret[-1]:,.0f} vs even split's "
                f"{base.regret[-1]:,.0f}"
            )
    return failures


def _vector(weights: Mapping[str, float], names: Sequence[str]) -> np.ndarray:
    return np.array([weights[name] for name in names])


def _count(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 and n >= 1000 else str(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40,000 records, 5 seeds")
    parser.add_argument("--records", type=int, help=f"records per run (default {RECORDS:,})")
    parser.add_argument("--seeds", type=int, help=f"runs per policy (default {SEEDS})")
    parser.add_argument("--update-every", type=int, default=UPDATE_EVERY, help="records")
    parser.add_argument("--delay", type=int, default=DELAY, help="records a reward comes late")
    args = parser.parse_args(argv)
    records = args.records or (QUICK_RECORDS if args.quick else RECORDS)
    seeds = args.seeds or (QUICK_SEEDS if args.quick else SEEDS)
    checkpoints = QUICK_CHECKPOINTS if args.quick else CHECKPOINTS
    if records < 1 or seeds < 1 or args.update_every < 1 or args.delay < 0:
        parser.error("records, seeds and --update-every must be >= 1, --delay >= 0")
    print(
        f"bandit simulation: {records:,} records per run, {seeds} seeds; weights updated every "
        f"{args.update_every:,} records; a reward is known {args.delay:,} records after its "
        "prediction; floor 1%"
    )
    started = time.perf_counter()
    summaries = evaluate(records, checkpoints, seeds, args.update_every, args.delay)
    print()
    for line in render(summaries):
        print(line)
    print(f"\n{time.perf_counter() - started:.1f} s in all")
    failures = goal_failures(summaries)
    if failures:
        print("goal NOT met: " + "; ".join(failures))
        return 1
    print(
        f"goal met: Thompson puts >= {GOAL_BEST_WEIGHT:.0%} of the traffic on the best arm, "
        f"with <= {GOAL_REGRET_RATIO:.0%} of the even split's regret, in every scenario"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
