"""How well the canary's sequential tests are calibrated: simulated canaries, looked at after
every batch.

Each simulated canary sends batches of records (50 by default: frequent looks are the hard
case), each record to the candidate with probability `share` (0.2), and after every batch
runs the code the rollout runs (`TwoSampleTest.statistics` and `.codes` in
`dataflows.rollout.sequential`) on the running sums, until both arms reach `max_records`.
Losses are simulated record by record:

- 0/1 loss (a classifier's errors; `binary`): the primary errs on 20% of records, the
  candidate on 20% plus the difference; margin 0.03;
- squared error (a regressor's, Gaussian residuals: skewed chi-square losses): the
  primary's mean squared error is 1, the candidate's 1 plus the difference; margin 0.2;

and the candidate is better by the margin, equal, worse by exactly the margin, or worse by
twice the margin. Every run goes on to `max_records`, so each test's firing is seen whatever
the other did: "rollback ever" ("promote ever") is the share of runs whose rollback
(promotion) test fired at some look, the error the test controls; "verdict" is what the
rollout would have done (the first decision; at `max_records`, roll back by rule). Beside
it, the naive way: a fixed-sample one-sided z-test at alpha, checked at every look. The
rate guard (`RateGuard`, max rate 2%) is checked the same way, on the candidate's arm.

    python -m dataflows.rollout.sequential_eval          # or: just canary-eval

Seeded and deterministic. Exits 1 unless the goal holds: false rollbacks (equal models) and
false promotions (worse by the margin or more) each at most alpha; for the guard, false
rollbacks at the limit and false passes at twice the limit at most alpha.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from dataflows.rollout.sequential import (
    CONTINUE_CODE,
    PROMOTE_CODE,
    ROLLBACK_CODE,
    RateGuard,
    TwoSampleTest,
)

ALPHA = 0.05
RUNS = 2_000
QUICK_RUNS = 200
BATCH = 50
SHARE = 0.2
MIN_RECORDS = 100


@dataclass(frozen=True)
class Loss:
    """A simulated per-record loss: its name, the primary's mean, the margin, records per
    arm at which the test stops, and whether it is 0/1 (`TwoSampleTest.binary`)."""

    name: str
    primary: float
    margin: float
    max_records: int
    binary: bool = False


ZERO_ONE = Loss("0/1 loss", 0.2, 0.03, 10_000, binary=True)
SQUARED = Loss("squared error", 1.0, 0.2, 5_000)
LOSSES = (ZERO_ONE, SQUARED)

DIFFERENCES = (-1.0, 0.0, 1.0, 2.0)
"""Candidate minus primary mean loss, in margins."""

GUARD_MAX_RATE = 0.02
GUARD_MAX_RECORDS = 10_000
GUARD_RATES = (0.01, 0.02, 0.04)
"""The candidate's true rate in the guard's runs: half, at, and twice the limit."""


Z_TEST = "z-test"
"""The naive baseline: a fixed-sample one-sided z-test at alpha, checked at every look."""


@dataclass
class Outcomes:
    """What the runs of one scenario did: per run, whether each test (and the naive z-test
    in its place) fired at any look, the verdict and the candidate's records at it."""

    rollback_ever: np.ndarray
    promote_ever: np.ndarray
    naive_rollback_ever: np.ndarray
    naive_promote_ever: np.ndarray
    verdict: np.ndarray  # codes; CONTINUE never remains (max_records decides)
    records: np.ndarray  # the candidate's records at the verdict
    by_rule: np.ndarray  # decided by the max_records rule

    @property
    def runs(self) -> int:
        """Number of runs."""
        return len(self.verdict)

    def share(self, mask: np.ndarray) -> float:
        """Fraction of runs where mask holds."""
        return float(np.mean(mask)) if len(mask) else 0.0

    def median_records(self, code: int) -> float:
        """Median records (candidate) to a verdict `code` decided by evidence; NaN if none."""
        picked = self.records[(self.verdict == code) & ~self.by_rule]
        return float(np.median(picked)) if len(picked) else float("nan")


class _Tracker:
    """Follows the looks of many runs: first verdict, and whether each test ever fired."""

    def __init__(self, runs: int, max_records: int) -> None:
        self.max_records = max_records
        self.rollback_ever = np.zeros(runs, dtype=bool)
        self.promote_ever = np.zeros(runs, dtype=bool)
        self.naive_rollback_ever = np.zeros(runs, dtype=bool)
        self.naive_promote_ever = np.zeros(runs, dtype=bool)
        self.verdict = np.full(runs, CONTINUE_CODE)
        self.records = np.zeros(runs, dtype=np.int64)
        self.by_rule = np.zeros(runs, dtype=bool)
        self.open = np.ones(runs, dtype=bool)  # not yet past max_records

    def look(
        self,
        test: TwoSampleTest | RateGuard,
        smaller: np.ndarray,
        candidate: np.ndarray,
        rollback: np.ndarray,
        promote: np.ndarray,
        z_rollback: np.ndarray,
        z_promote: np.ndarray,
    ) -> None:
        """One look at every run: smaller, the smaller arm's records (what the rules count);
        candidate, the candidate's records; the log LRs of the two tests, and the z
        statistics of the naive tests."""
        ready = self.open & (smaller >= test.min_records)
        self.rollback_ever |= ready & (rollback >= test.threshold)
        self.promote_ever |= ready & (promote >= test.threshold)
        z = NormalDist().inv_cdf(1.0 - test.alpha)
        self.naive_rollback_ever |= ready & (z_rollback >= z)
        self.naive_promote_ever |= ready & (z_promote >= z)
        codes = test.codes(smaller, rollback, promote)
        first = self.open & (self.verdict == CONTINUE_CODE) & (codes != CONTINUE_CODE)
        self.verdict[first] = codes[first]
        self.records[first] = candidate[first]
        fired = (rollback >= test.threshold) | (promote >= test.threshold)
        self.by_rule[first] = ~fired[first]
        self.open &= smaller < self.max_records

    def outcomes(self) -> Outcomes:
        """The runs' outcomes."""
        return Outcomes(
            self.rollback_ever,
            self.promote_ever,
            self.naive_rollback_ever,
            self.naive_promote_ever,
            self.verdict,
            self.records,
            self.by_rule,
        )


def simulate_two_sample(
    test: TwoSampleTest,
    loss: Loss,
    difference: float,
    runs: int,
    rng: np.random.Generator,
    *,
    batch: int = BATCH,
    share: float = SHARE,
) -> Outcomes:
    """`runs` canaries of a candidate whose mean loss is the primary's plus `difference`,
    each looked at after every batch until both arms reach the test's `max_records`."""
    assert test.max_records is not None
    tracker = _Tracker(runs, test.max_records)
    sums = np.zeros((2, 3, runs))  # arm (primary, candidate) x (count, total, total_sq)
    means = (loss.primary, loss.primary + difference)
    while tracker.open.any():
        to_candidate = rng.binomial(batch, share, runs)
        for arm, n in enumerate((batch - to_candidate, to_candidate)):
            if loss.binary:
                # Sums of 0/1 losses: a binomial count is exact, and its squares sum to it.
                errors = rng.binomial(n, means[arm])
                sums[arm] += (n, errors, errors)
            else:
                total, total_sq = _squared_errors(rng, n, means[arm], batch)
                sums[arm] += (n, total, total_sq)
        stats = test.statistics(tuple(sums[0]), tuple(sums[1]))
        smaller = np.minimum(sums[0, 0], sums[1, 0])
        se = np.where(stats.std_error > 0, stats.std_error, np.inf)
        tracker.look(
            test,
            smaller,
            sums[1, 0],
            stats.log_lr_rollback,
            stats.log_lr_promote,
            (stats.difference - test.tolerance) / se,
            (test.margin - stats.difference) / se,
        )
    return tracker.outcomes()


def _squared_errors(
    rng: np.random.Generator, n: np.ndarray, mse: float, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per run, the sum and sum of squares of n[i] squared Gaussian residuals whose mean
    square is mse; drawn record by record (up to `width` per run)."""
    z = rng.standard_normal((len(n), width))
    losses = mse * z * z
    losses[np.arange(width)[None, :] >= n[:, None]] = 0.0
    return losses.sum(axis=1), (losses * losses).sum(axis=1)


def simulate_guard(
    guard: RateGuard,
    rate: float,
    runs: int,
    rng: np.random.Generator,
    *,
    batch: int = BATCH,
    share: float = SHARE,
) -> Outcomes:
    """`runs` canaries whose candidate has a true `rate` of bad records, the guard looked at
    after every batch until the candidate has the guard's `max_records`."""
    assert guard.max_records is not None
    tracker = _Tracker(runs, guard.max_records)
    count = np.zeros(runs)
    events = np.zeros(runs)
    while tracker.open.any():
        n = rng.binomial(batch, share, runs)
        count += n
        events += rng.binomial(n, rate)
        rollback, promote = guard.statistics(count, events)
        se = np.sqrt(guard.max_rate * (1.0 - guard.max_rate) / np.maximum(count, 1.0))
        z = (events / np.maximum(count, 1.0) - guard.max_rate) / se
        tracker.look(guard, count, count, rollback, promote, z, -z)
    return tracker.outcomes()


@dataclass(frozen=True)
class Row:
    """One scenario's line in the table, and its goal (if any)."""

    loss: str
    scenario: str
    outcomes: Outcomes
    goal: str  # "" (for information), "rollback", "promote": which error must be <= alpha


def evaluate(
    runs: int = RUNS,
    alpha: float = ALPHA,
    seed: int = 0,
    *,
    max_scale: float = 1.0,
    batch: int = BATCH,
    share: float = SHARE,
) -> list[Row]:
    """Every scenario; each has its own seeded generator, so a result does not depend on
    what else ran. max_scale shrinks every max_records (for a quick run)."""
    rows = []
    for i, loss in enumerate(LOSSES):
        test = TwoSampleTest(
            loss.name,
            margin=loss.margin,
            alpha=alpha,
            min_records=MIN_RECORDS,
            max_records=max(MIN_RECORDS, int(loss.max_records * max_scale)),
            binary=loss.binary,
        )
        for j, multiple in enumerate(DIFFERENCES):
            rng = np.random.default_rng([seed, i, j])
            outcomes = simulate_two_sample(
                test, loss, multiple * loss.margin, runs, rng, batch=batch, share=share
            )
            # Equal: rolling back is the error; worse by the margin or more: promoting.
            goal = "rollback" if multiple == 0 else "promote" if multiple >= 1 else ""
            rows.append(Row(loss.name, _difference(multiple), outcomes, goal))
    guard = RateGuard(
        "bad rate",
        GUARD_MAX_RATE,
        alpha=alpha,
        max_records=max(100, int(GUARD_MAX_RECORDS * max_scale)),
    )
    for j, rate in enumerate(GUARD_RATES):
        rng = np.random.default_rng([seed, len(LOSSES), j])
        outcomes = simulate_guard(guard, rate, runs, rng, batch=batch, share=share)
        goal = {GUARD_MAX_RATE: "rollback", 2 * GUARD_MAX_RATE: "promote"}.get(rate, "")
        rows.append(Row(f"guard <= {GUARD_MAX_RATE:g}", f"rate {rate:g}", outcomes, goal))
    return rows


def _difference(multiple: float) -> str:
    if multiple == 0:
        return "equal"
    if multiple < 0:
        return f"better by {-multiple:g} margin"
    return f"worse by {multiple:g} margin"


def _pct(rate: float) -> str:
    return f"{100 * rate:.1f}%"


def errors(row: Row) -> tuple[float, float]:
    """A goal row's error rate: of the sequential test, and of the naive z-test."""
    o = row.outcomes
    if row.goal == "rollback":
        return o.share(o.rollback_ever), o.share(o.naive_rollback_ever)
    return o.share(o.promote_ever), o.share(o.naive_promote_ever)


def render(rows: Sequence[Row], alpha: float) -> list[str]:
    """The table: per scenario, how often each test fired (and the naive z-test, where it
    would be an error), what the rollout did and how soon, and the goal."""
    lines = [
        f"  {'loss':<15} {'candidate':<21} {'rollback':>8} {'promote':>8} {Z_TEST:>7}   "
        f"{'verdict: rollback / promote':<28} {'records':>13}  goal",
        f"  {'':<15} {'':<21} {'ever':>8} {'ever':>8} {'error':>7}   "
        f"{'(by the max_records rule)':<28} {'R / P':>13}",
    ]
    for row in rows:
        o = row.outcomes
        rb = o.verdict == ROLLBACK_CODE
        pr = o.verdict == PROMOTE_CODE
        verdicts = f"{_pct(o.share(rb))} / {_pct(o.share(pr))} ({_pct(o.share(o.by_rule))})"
        records = f"{_median(o.median_records(ROLLBACK_CODE))} / "
        records += _median(o.median_records(PROMOTE_CODE))
        goal, naive = "", "-"
        if row.goal:
            rate, naive_rate = errors(row)
            naive = _pct(naive_rate)
            what = "false rollbacks" if row.goal == "rollback" else "false promotions"
            goal = f"{what} <= {_pct(alpha)}: " + ("met" if rate <= alpha else "NOT met")
        lines.append(
            f"  {row.loss:<15} {row.scenario:<21} {_pct(o.share(o.rollback_ever)):>8} "
            f"{_pct(o.share(o.promote_ever)):>8} {naive:>7}   {verdicts:<28} {records:>13}  {goal}"
        )
    return lines


def _median(value: float) -> str:
    return "-" if np.isnan(value) else f"{value:,.0f}"


def goal_failures(rows: Sequence[Row], alpha: float) -> list[str]:
    """What misses the goal (empty: met)."""
    failures = []
    for row in rows:
        if row.goal and errors(row)[0] > alpha:
            what = "rolled back" if row.goal == "rollback" else "promoted"
            failures.append(f"{row.loss}, {row.scenario}: {_pct(errors(row)[0])} {what}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=None, help=f"runs per scenario ({RUNS:,})")
    parser.add_argument("--alpha", type=float, default=ALPHA, help=f"error rate ({ALPHA})")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"records per batch ({BATCH})")
    parser.add_argument("--share", type=float, default=SHARE, help=f"canary share ({SHARE})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_RUNS} runs, max records / 5 (for tests)"
    )
    args = parser.parse_args(argv)
    runs = args.runs or (QUICK_RUNS if args.quick else RUNS)
    scale = 0.2 if args.quick else 1.0
    started = time.perf_counter()
    rows = evaluate(
        runs, args.alpha, args.seed, max_scale=scale, batch=args.batch, share=args.share
    )
    elapsed = time.perf_counter() - started
    limits = ", ".join(
        f"{loss.name}: primary {loss.primary:g}, margin {loss.margin:g}, max records "
        f"{max(MIN_RECORDS, int(loss.max_records * scale)):,}"
        for loss in LOSSES
    )
    print(
        f"canary sequential tests: {runs:,} runs per scenario, looked at after every batch of "
        f"{args.batch} records ({args.share:g} to the candidate); alpha {args.alpha:g}, min "
        f"records {MIN_RECORDS} per arm; {limits}; seed {args.seed}"
    )
    print(
        "ever: runs in which the test fired at some look (each run goes on to max records); "
        f"{Z_TEST} error: the same for a fixed-sample one-sided z-test at alpha, checked at "
        "every look; verdict: what the rollout did; records R / P: median candidate records "
        "to a rollback / promotion by evidence"
    )
    print()
    for line in render(rows, args.alpha):
        print(line)
    failures = goal_failures(rows, args.alpha)
    print()
    print(f"{len(rows) * runs:,} simulated canaries in {elapsed:.1f} s")
    if failures:
        print("goal NOT met: " + "; ".join(failures))
        return 1
    print(
        f"goal met: false rollbacks (equal models; guard at its limit) and false promotions "
        f"(worse by the margin or 2x; guard at 2x its limit) <= {_pct(args.alpha)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
