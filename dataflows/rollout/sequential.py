"""Sequential tests that promote or roll back a canary, from sums that shards can add up.

A canary's candidate serves a share of the traffic next to the primary. After every batch
the rollout looks at the evidence so far and decides: PROMOTE the candidate, ROLL it BACK,
or CONTINUE. Looking after every batch is the point, so the tests must stay valid under
continuous monitoring: a fixed-sample t-test checked after every batch rolls back a good
candidate far more often than its alpha says.

Everything here is a pure, deterministic function of `MetricStats` (count, sum, sum of
squares of a per-record quantity), which shards accumulate and any process can add up; the
decision is recomputed from them after a crash and a replay.

**Two-sample test of mean loss** (`TwoSampleTest`), on a per-record loss (squared error,
0/1 error, latency, ...). With d the candidate's mean loss minus the primary's, two one-sided
tests run side by side, each controlling its own error at `alpha`:

- ROLLBACK when there is evidence that d > `tolerance` (default 0: the candidate is worse);
  a candidate that is not worse is rolled back with probability at most alpha, however
  often one looks.
- PROMOTE when there is evidence that d < `margin` (non-inferiority: the candidate is at
  most `margin` worse); a candidate worse by `margin` or more is promoted with probability
  at most alpha.
- Otherwise CONTINUE. Both need `min_records` per arm. Rollback wins if both fire (the
  candidate is then significantly worse, though within the margin: set `tolerance` to
  accept that). Once both arms reach `max_records` without a decision, the test stops with
  `at_max_records`, ROLLBACK by default: no promotion without evidence. The evidence says
  which rule decided.

The method is the mixture sequential probability ratio test (mSPRT) of Johari, Pekelis and
Walsh ("Always valid inference", 2017; "Peeking at A/B tests", KDD 2017), made one-sided.
The difference of means is, in information time I = 1/Var(d), a Brownian motion with drift
d; for every lambda, exp(lambda (d - d0) I - lambda^2 I / 2) is a martingale under d = d0,
and its mixture over a half-normal lambda ~ N(0, tau^2), lambda > 0, has a closed form:

    LR = 2 / sqrt(1 + tau^2 I) * exp(s^2 / (2a)) * Phi(s / sqrt(a)),
    s = (d - d0) I,  a = I + 1 / tau^2.

Each component is a supermartingale for any true d <= d0, so LR is one under the whole
composite null, and Ville's inequality bounds the chance that it EVER reaches 1/alpha by
alpha: any schedule of looks, batches of any size. (Promotion mirrors it: d0 = margin,
lambda < 0.) Why this method:

- a fixed-horizon test peeked at after every batch inflates its errors (the eval shows it);
- group-sequential designs (alpha spending) need the number and timing of looks planned
  and their state kept; the mSPRT needs nothing but the running sums;
- it is closed form (no numerical search), depends only on (count, sum, sum of squares)
  per arm, and reports a likelihood ratio a person can read ("log LR 3.2 >= 3.0");
- one-sided rather than Johari's two-sided mixture: the decisions are directional, the
  nulls (d <= tolerance, d >= margin) are composite, and the two-sided mixture spends half
  of its evidence on the direction that decides nothing.

The mixture scale tau defaults to the margin: the effects that matter are of that size.
Var(d) is estimated from the data (Johari's plug-in: valid as the counts grow, hence
`min_records`), per arm, never below the variance of both arms together (an arm whose
losses happen to be all equal so far, a 0/1 loss without an error yet, must not look
infinitely precise). The promotion test needs more care: losses are skewed (squared
errors, latencies), so a candidate whose mean loss is low by luck also has a low variance
by the same luck, looks precise exactly when it is wrong, and was promoted more often than
alpha at the margin when the looks came often (batches of 50 records). It therefore takes
the candidate's variance as at least what it would be at the null, mean m0 = primary's mean
+ margin, from the primary's arm: the primary's variance times (m0 / primary's mean)^2, as
if the spread grew in proportion to the mean (constant coefficient of variation: squared
Gaussian errors, latencies; conservative for 0/1 losses), or m0 (1 - m0) with `binary`.
That costs an equal candidate some records before promotion; the rollback test needs no
such rule (a candidate worse by luck looks noisier, which only delays the rollback).
The Brownian approximation holds for a stable traffic split: if the canary's weight
changes, start the statistics afresh. With shadowing (both models score the same records)
the arms are positively correlated and the test is conservative.

**Rate guard** (`RateGuard`), without labels: the candidate's rate of something (records it
failed to score, predictions disagreeing with the primary, records over a latency limit)
against `max_rate`. ROLLBACK when there is evidence the rate exceeds `max_rate`, PROMOTE
(the guard passes) when there is evidence it is below. The test is exact, not asymptotic:
a mixture of Bernoulli likelihood ratios over a fixed grid of alternatives (odds ratios
e^0.05 ... e^4.5 on each side), each a supermartingale under its composite null; it is
valid for any per-record values in [0, 1], whose sum is all it reads.

Several tests together (`combine`): any ROLLBACK rolls back, PROMOTE needs every test to
promote. False promotions stay at most alpha (the test of a bad metric must itself
promote); false rollbacks add up over the tests (split alpha among them to keep the total).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

Evidence = Mapping[str, float | int | str]


class Verdict(StrEnum):
    """What a sequential test says after a look."""

    CONTINUE = "continue"
    PROMOTE = "promote"
    ROLLBACK = "rollback"


VERDICTS = (Verdict.CONTINUE, Verdict.PROMOTE, Verdict.ROLLBACK)
"""Verdicts by code: the vectorized path (`verdict_codes`) works on arrays of codes."""
CONTINUE_CODE, PROMOTE_CODE, ROLLBACK_CODE = range(3)


class Reason(StrEnum):
    """Which rule produced a decision (evidence key "reason")."""

    ROLLBACK = "evidence of worse"
    PROMOTE = "evidence of not worse"
    MIN_RECORDS = "too few records"
    NO_EVIDENCE = "not enough evidence yet"
    MAX_RECORDS = "max records reached"


# ---------------------------------------------------------------------------------------
# Sufficient statistics


@dataclass(frozen=True)
class MetricStats:
    """Count, sum and sum of squares of a per-record quantity (a loss, a 0/1 flag, a
    latency): what a shard accumulates, and all a test reads. Immutable; `merge` adds two.

    Sums of squares lose precision when the mean is large against the spread (latencies in
    ns around 1e9): measure in units that keep values near 1."""

    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    def __post_init__(self) -> None:
        # Plain Python numbers: the stats go into state snapshots and event messages.
        count, total, total_sq = int(self.count), float(self.total), float(self.total_sq)
        if count != self.count or count < 0:
            raise ValueError(f"count must be a whole number >= 0, not {self.count!r}")
        if not (math.isfinite(total) and math.isfinite(total_sq)):
            raise ValueError(f"sums must be finite: total {total}, total_sq {total_sq}")
        if total_sq < 0:
            raise ValueError(f"a sum of squares cannot be negative: {total_sq}")
        if count == 0 and (total != 0 or total_sq != 0):
            raise ValueError(f"no records but sums {total}, {total_sq}")
        object.__setattr__(self, "count", count)
        object.__setattr__(self, "total", total)
        object.__setattr__(self, "total_sq", total_sq)

    @classmethod
    def of(cls, values: ArrayLike) -> MetricStats:
        """The stats of an array of values (any shape); NaN or infinite values are an error
        (a loss that is not a number is a bug upstream, not a record to average)."""
        array = np.asarray(values, dtype=np.float64).ravel()
        finite = np.isfinite(array)
        if not finite.all():
            bad = int(array.size - np.count_nonzero(finite))
            raise ValueError(f"{bad} of {array.size} values are NaN or infinite")
        # np.sum sums pairwise, in a fixed order: the same values give the same bits.
        with np.errstate(over="ignore"):  # an overflow is refused, as not finite, below
            return cls(int(array.size), float(np.sum(array)), float(np.sum(array * array)))

    def add(self, values: ArrayLike) -> MetricStats:
        """These stats with more values (a number or an array) added."""
        return self.merge(MetricStats.of(values))

    def merge(self, other: MetricStats) -> MetricStats:
        """The stats of both sets of records together."""
        return MetricStats(
            self.count + other.count, self.total + other.total, self.total_sq + other.total_sq
        )

    __add__ = merge

    @property
    def mean(self) -> float:
        """Mean value (0 without records)."""
        return self.total / self.count if self.count else 0.0

    @property
    def variance(self) -> float:
        """Sample variance (n - 1 in the denominator; 0 below two records)."""
        return float(_variance(np.int64(self.count), self.total, self.total_sq))


def _variance(count: ArrayLike, total: ArrayLike, total_sq: ArrayLike) -> np.ndarray:
    """Sample variance from sums, elementwise; 0 below two records, never negative (the
    subtraction can round below zero when all values are equal)."""
    n = np.asarray(count, dtype=np.float64)
    safe = np.maximum(n, 2.0)
    centred = np.asarray(total_sq, dtype=np.float64) - np.asarray(total) ** 2 / np.maximum(n, 1.0)
    return np.where(n >= 2, np.maximum(centred, 0.0) / (safe - 1.0), 0.0)


# ---------------------------------------------------------------------------------------
# Decisions


@dataclass(frozen=True)
class Decision:
    """A verdict, the metric whose test gave it, and the evidence: plain numbers and strings
    (counts, means, difference, the statistic and its threshold, alpha, margin), ready for
    an event message. `summary()` is one line for people. Treat `evidence` as read-only."""

    verdict: Verdict
    metric: str
    evidence: Evidence = field(default_factory=dict)

    def summary(self) -> str:
        """One line: what was compared, over how many records, why, and the verdict."""
        return summarize(self.evidence)


def summarize(evidence: Evidence) -> str:
    """A decision's summary line from its evidence alone (works on evidence read back from
    an event message)."""
    metric = evidence.get("metric", "?")
    verdict = Verdict(str(evidence.get("verdict", Verdict.CONTINUE)))
    reason = str(evidence.get("reason", ""))
    threshold = float(evidence.get("threshold", 0.0))
    action = {
        Verdict.CONTINUE: "continue",
        Verdict.PROMOTE: "promote",
        Verdict.ROLLBACK: "roll back",
    }[verdict]
    if evidence.get("test") == RateGuard.TEST:
        head = (
            f"candidate {metric} {_num(evidence['rate'])} vs limit {_num(evidence['max_rate'])}"
            f" over {int(evidence['records']):,} records"
        )
        worse, better, per = "above the limit", "below the limit", ""
    else:
        head = (
            f"candidate {metric} {_num(evidence['candidate_mean'])} vs primary "
            f"{_num(evidence['primary_mean'])} over {int(evidence['candidate_records']):,}/"
            f"{int(evidence['primary_records']):,} records"
        )
        tolerance = float(evidence["tolerance"])
        worse = "worse than primary" + (f" by more than {_num(tolerance)}" if tolerance else "")
        better = f"not worse by more than {_num(evidence['margin'])}"
        per = " per arm"
    if reason == Reason.ROLLBACK:
        why = f"{worse} (log LR {float(evidence['log_lr_rollback']):.1f} >= {threshold:.1f})"
    elif reason == Reason.PROMOTE:
        why = f"{better} (log LR {float(evidence['log_lr_promote']):.1f} >= {threshold:.1f})"
    elif reason == Reason.MIN_RECORDS:
        why = f"waiting for {int(evidence['min_records']):,} records{per}"
    elif reason == Reason.MAX_RECORDS:
        why = (
            f"no decision within {int(evidence['max_records']):,} records{per} "
            f"(log LR worse {float(evidence['log_lr_rollback']):.1f}, "
            f"not worse {float(evidence['log_lr_promote']):.1f} < {threshold:.1f}), by rule"
        )
    else:
        why = (
            f"no decision yet (log LR worse {float(evidence['log_lr_rollback']):.1f}, "
            f"not worse {float(evidence['log_lr_promote']):.1f} < {threshold:.1f})"
        )
    return f"{head}: {why}: {action}"


def _num(value: float | int | str) -> str:
    """A number for people: 4 significant digits."""
    return f"{float(value):.4g}"


def combine(decisions: Sequence[Decision]) -> Decision:
    """One verdict from several tests (quality and guards): the first ROLLBACK; else
    PROMOTE when every test promotes (the first test's decision, naming the others in
    "also_passed"); else the first test that still says CONTINUE."""
    if not decisions:
        raise ValueError("no decisions to combine")
    for decision in decisions:
        if decision.verdict is Verdict.ROLLBACK:
            return decision
    waiting = [d for d in decisions if d.verdict is not Verdict.PROMOTE]
    if waiting:
        return waiting[0]
    first = decisions[0]
    others = ", ".join(d.metric for d in decisions[1:])
    return replace(first, evidence={**first.evidence, "also_passed": others})


# ---------------------------------------------------------------------------------------
# The one-sided normal mixture


_LOG2 = math.log(2.0)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_erfc = np.frompyfunc(math.erfc, 1, 1)


def log_normal_cdf(x: ArrayLike) -> np.ndarray:
    """log Phi(x), elementwise, finite far into the lower tail (an asymptotic series below
    -20, where erfc would underflow)."""
    x = np.asarray(x, dtype=np.float64)
    low = x < -20.0
    body = np.where(low, 0.0, x)
    out = np.log(0.5 * np.asarray(_erfc(-body / math.sqrt(2.0)), dtype=np.float64))
    tail = np.where(low, x, -20.0)
    inv2 = 1.0 / tail**2
    series = -0.5 * tail**2 - np.log(-tail) - _HALF_LOG_2PI + np.log1p(-inv2 + 3.0 * inv2**2)
    return np.where(low, series, out)


def log_mixture_lr(shift: ArrayLike, information: ArrayLike, scale: float) -> np.ndarray:
    """log of the one-sided normal-mixture likelihood ratio, elementwise.

    shift: the estimate minus the null value, signed so that positive is the alternative;
    information: 1 / variance of the estimate (0: no information, log LR 0); scale: tau,
    the mixing scale of the effect (half-normal)."""
    info = np.asarray(information, dtype=np.float64)
    # s^2 / (2a) + log Phi(s / sqrt(a)) with s = shift * info, a = info + 1 / tau^2, is
    # x^2 / 2 + log Phi(x) for x = s / sqrt(a); far below 0 the two terms cancel, so the
    # tail is taken from the series with x^2 / 2 cancelled by hand.
    x = np.asarray(shift, dtype=np.float64) * info / np.sqrt(info + 1.0 / scale**2)
    low = x < -20.0
    body = np.where(low, 0.0, x)
    tail = np.where(low, x, -20.0)
    inv2 = 1.0 / tail**2
    mills = np.where(
        low,
        -np.log(-tail) - _HALF_LOG_2PI + np.log1p(-inv2 + 3.0 * inv2**2),
        0.5 * body * body + log_normal_cdf(body),
    )
    return _LOG2 - 0.5 * np.log1p(scale**2 * info) + mills


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), not {alpha}")


def _check_records(min_records: int, max_records: int | None) -> None:
    if min_records < 1:
        raise ValueError(f"min_records must be >= 1, not {min_records}")
    if max_records is not None and max_records < min_records:
        raise ValueError(f"max_records {max_records} is below min_records {min_records}")


def _check_unit(stats: MetricStats, what: str) -> None:
    """Refuse stats that cannot come from values in [0, 1]: those have 0 <= sum <= count
    and squares no larger than themselves."""
    slack = 1e-9 * (stats.count + 1)
    total, total_sq = stats.total, stats.total_sq
    if not (-slack <= total <= stats.count + slack and total_sq <= total + slack):
        raise ValueError(
            f"{what} needs values in [0, 1]: sum {total}, sum of squares {total_sq} "
            f"of {stats.count} records"
        )


def verdict_codes(
    records: ArrayLike,
    log_lr_rollback: ArrayLike,
    log_lr_promote: ArrayLike,
    *,
    threshold: float,
    min_records: int,
    max_records: int | None,
    at_max_records: Verdict,
) -> np.ndarray:
    """The decision rule, elementwise (codes: CONTINUE_CODE, PROMOTE_CODE, ROLLBACK_CODE).

    records: the records per arm that count (the smaller arm's); rollback wins a tie; at
    `max_records` without a decision, `at_max_records`."""
    n = np.asarray(records)
    ready = n >= min_records
    rollback = ready & (np.asarray(log_lr_rollback) >= threshold)
    promote = ready & (np.asarray(log_lr_promote) >= threshold) & ~rollback
    codes = np.where(rollback, ROLLBACK_CODE, np.where(promote, PROMOTE_CODE, CONTINUE_CODE))
    if max_records is not None:
        forced = (codes == CONTINUE_CODE) & (n >= max_records)
        codes = np.where(forced, VERDICTS.index(at_max_records), codes)
    return codes


def _reason(
    code: int, records: int, rollback: float, promote: float, test: TwoSampleTest | RateGuard
) -> Reason:
    """Which rule gave `code`."""
    if records < test.min_records:
        return Reason.MIN_RECORDS
    if code == ROLLBACK_CODE and rollback >= test.threshold:
        return Reason.ROLLBACK
    if code == PROMOTE_CODE and promote >= test.threshold:
        return Reason.PROMOTE
    return Reason.NO_EVIDENCE if code == CONTINUE_CODE else Reason.MAX_RECORDS


def _decision(
    test: TwoSampleTest | RateGuard,
    records: int,
    rollback: float,
    promote: float,
    specific: dict[str, float | int | str],
) -> Decision:
    """The decision of `test` at a look, with its evidence: what the test measured
    (`specific`) and what every test reports."""
    code = int(test.codes(records, rollback, promote))
    reason = _reason(code, records, rollback, promote, test)
    verdict = VERDICTS[code]
    evidence: dict[str, float | int | str] = {
        "test": test.TEST,
        "metric": test.metric,
        "verdict": verdict.value,
        "reason": reason.value,
        **specific,
        "log_lr_rollback": rollback,
        "log_lr_promote": promote,
        "log_lr": promote if reason == Reason.PROMOTE else rollback,
        "threshold": test.threshold,
        "alpha": test.alpha,
        "min_records": test.min_records,
    }
    if test.max_records is not None:
        evidence["max_records"] = test.max_records
    if reason == Reason.MAX_RECORDS:
        evidence["rule"] = f"{verdict.value} at max_records without evidence either way"
    return Decision(verdict, test.metric, evidence)


# ---------------------------------------------------------------------------------------
# Two-sample test of mean loss


class TwoSampleStatistics(NamedTuple):
    """What `TwoSampleTest.statistics` computes, elementwise: the candidate's mean loss minus
    the primary's, its standard error (as the rollback test sees it, and as the promotion
    test does), and the log likelihood ratios of the two tests."""

    difference: np.ndarray
    std_error: np.ndarray
    std_error_promote: np.ndarray
    log_lr_rollback: np.ndarray
    log_lr_promote: np.ndarray


def _information(variance: np.ndarray) -> np.ndarray:
    """1 / variance, and 0 (no information: log LR 0) where the variance is 0."""
    return np.where(variance > 0, 1.0 / np.where(variance > 0, variance, 1.0), 0.0)


class _SequentialTest:
    """What TwoSampleTest and RateGuard share: verdict codes from their statistics."""

    min_records: int
    max_records: int | None
    at_max_records: Verdict

    @property
    def threshold(self) -> float:
        """log(1 / alpha): a log LR at or above it decides."""
        raise NotImplementedError

    def codes(self, records: ArrayLike, rollback: ArrayLike, promote: ArrayLike) -> np.ndarray:
        """`verdict_codes` with this test's settings; records: the smaller arm's count."""
        return verdict_codes(
            records,
            rollback,
            promote,
            threshold=self.threshold,
            min_records=self.min_records,
            max_records=self.max_records,
            at_max_records=self.at_max_records,
        )


@dataclass(frozen=True)
class TwoSampleTest(_SequentialTest):
    """Candidate vs primary on a per-record loss (lower is better): ROLLBACK on evidence
    that the candidate's mean loss exceeds the primary's by more than `tolerance`, PROMOTE
    on evidence that it does not exceed it by `margin` or more; each error at most `alpha`
    under continuous monitoring. See the module docstring for the method.

    metric: name of the loss, for the evidence ("squared_error", "error_rate", ...);
    margin: how much worse (in loss units) the candidate may be and still be promoted;
    mixture_scale: tau, the effect size the test is most sensitive to (default: margin);
    binary: the losses are 0/1 (a classifier's errors): the promotion test then takes the
    candidate's variance at the null from the Bernoulli law, m0 (1 - m0), instead of the
    constant-coefficient-of-variation rule, which is valid for 0/1 losses too, but slower."""

    TEST = "two-sample mSPRT"

    metric: str
    margin: float
    alpha: float = 0.05
    tolerance: float = 0.0
    min_records: int = 100
    max_records: int | None = 100_000
    at_max_records: Verdict = Verdict.ROLLBACK
    mixture_scale: float | None = None
    binary: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.margin) and self.margin > 0):
            raise ValueError(f"margin must be a positive number, not {self.margin}")
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise ValueError(f"tolerance must be a number >= 0, not {self.tolerance}")
        _check_alpha(self.alpha)
        _check_records(self.min_records, self.max_records)
        if self.at_max_records is Verdict.CONTINUE:
            raise ValueError("at_max_records must decide: ROLLBACK or PROMOTE")
        if self.mixture_scale is not None and not self.mixture_scale > 0:
            raise ValueError(f"mixture_scale must be > 0, not {self.mixture_scale}")

    @property
    def scale(self) -> float:
        """tau, the mixing scale of the difference."""
        return self.mixture_scale if self.mixture_scale is not None else self.margin

    @property
    def threshold(self) -> float:
        """log(1 / alpha): a log LR at or above it decides."""
        return math.log(1.0 / self.alpha)

    def statistics(
        self,
        primary: tuple[ArrayLike, ArrayLike, ArrayLike],
        candidate: tuple[ArrayLike, ArrayLike, ArrayLike],
    ) -> TwoSampleStatistics:
        """Elementwise over arrays of (count, total, total_sq) per arm: the difference of
        means, its standard errors and the log LRs. `decide` and the calibration
        (`sequential_eval`) both run this."""
        n_p, s_p, q_p = (np.asarray(a, dtype=np.float64) for a in primary)
        n_c, s_c, q_c = (np.asarray(a, dtype=np.float64) for a in candidate)
        has = (n_p >= 1) & (n_c >= 1)
        per_p, per_c = np.maximum(n_p, 1.0), np.maximum(n_c, 1.0)  # divisors
        mean_p = s_p / per_p
        diff = np.where(has, s_c / per_c - mean_p, 0.0)
        # Never below the variance of both arms together: an arm whose losses are all equal
        # so far (no error yet) must not look infinitely precise.
        both = _variance(n_p + n_c, s_p + s_c, q_p + q_c)
        var_p = np.maximum(_variance(n_p, s_p, q_p), both)
        var_c = np.maximum(_variance(n_c, s_c, q_c), both)
        # The candidate's variance as it would be at the promotion null (mean m0 = the
        # primary's + margin), from the primary's arm, so it does not move with the
        # candidate's own luck: see the module docstring.
        null_mean = mean_p + self.margin
        if self.binary:
            at_null = np.clip(null_mean, 0.0, 1.0) * (1.0 - np.clip(null_mean, 0.0, 1.0))
        else:
            ratio = null_mean / np.where(mean_p > 0, mean_p, 1.0)
            at_null = np.where(mean_p > 0, var_p * ratio * ratio, var_p)
        var_c_promote = np.maximum(var_c, at_null)
        var = np.where(has, var_c / per_c + var_p / per_p, 0.0)
        var_promote = np.where(has, var_c_promote / per_c + var_p / per_p, 0.0)
        rollback = log_mixture_lr(diff - self.tolerance, _information(var), self.scale)
        promote = log_mixture_lr(self.margin - diff, _information(var_promote), self.scale)
        return TwoSampleStatistics(diff, np.sqrt(var), np.sqrt(var_promote), rollback, promote)

    def decide(self, primary: MetricStats, candidate: MetricStats) -> Decision:
        """The verdict after a look at both arms' stats so far."""
        if self.binary:
            _check_unit(primary, f"{self.metric}: a binary test (primary)")
            _check_unit(candidate, f"{self.metric}: a binary test (candidate)")
        diff, se, se_promote, rollback, promote = (
            float(x)
            for x in self.statistics(
                (primary.count, primary.total, primary.total_sq),
                (candidate.count, candidate.total, candidate.total_sq),
            )
        )
        specific: dict[str, float | int | str] = {
            "candidate_records": candidate.count,
            "primary_records": primary.count,
            "candidate_mean": candidate.mean,
            "primary_mean": primary.mean,
            "difference": diff,
            "std_error": se,
            "std_error_promote": se_promote,
            "margin": self.margin,
            "tolerance": self.tolerance,
            "mixture_scale": self.scale,
        }
        records = min(primary.count, candidate.count)
        return _decision(self, records, rollback, promote, specific)


# ---------------------------------------------------------------------------------------
# One-sample rate guard


_GUARD_STEPS = 0.05 * 2.0 ** (np.arange(14) / 2.0)
"""Log odds ratios of the guard's alternatives to max_rate: 0.05 to 4.5, by sqrt(2)."""


@dataclass(frozen=True)
class RateGuard(_SequentialTest):
    """The candidate's rate of something bad (per-record values in [0, 1]: failed to score,
    disagreed with the primary, slower than a limit) against `max_rate`, without labels:
    ROLLBACK on evidence that the rate exceeds `max_rate`, PROMOTE (the guard passes) on
    evidence that it is below; each error at most `alpha` under continuous monitoring.
    Exact (a Bernoulli likelihood-ratio mixture), not asymptotic."""

    TEST = "rate guard"

    metric: str
    max_rate: float
    alpha: float = 0.05
    min_records: int = 10
    max_records: int | None = None
    at_max_records: Verdict = Verdict.ROLLBACK

    def __post_init__(self) -> None:
        if not 0.0 < self.max_rate < 1.0:
            raise ValueError(f"max_rate must be in (0, 1), not {self.max_rate}")
        _check_alpha(self.alpha)
        _check_records(self.min_records, self.max_records)
        if self.at_max_records is Verdict.CONTINUE:
            raise ValueError("at_max_records must decide: ROLLBACK or PROMOTE")

    @property
    def threshold(self) -> float:
        """log(1 / alpha): a log LR at or above it decides."""
        return math.log(1.0 / self.alpha)

    def statistics(self, count: ArrayLike, events: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """Elementwise over arrays of records and events (the sum of the values): the log
        LRs for "above max_rate" (rollback) and "below max_rate" (promote)."""
        n = np.asarray(count, dtype=np.float64)[..., None]
        k = np.asarray(events, dtype=np.float64)[..., None]
        logit = math.log(self.max_rate / (1.0 - self.max_rate))

        def mixture(steps: np.ndarray) -> np.ndarray:
            p = 1.0 / (1.0 + np.exp(-(logit + steps)))
            per_event = np.log(p / self.max_rate)
            per_other = np.log1p(-p) - math.log1p(-self.max_rate)
            terms = k * per_event + (n - k) * per_other
            top = terms.max(axis=-1)
            # Equal weights: log of the mean of the likelihood ratios.
            spread = np.log(np.exp(terms - top[..., None]).mean(axis=-1))
            return np.asarray(top + spread)

        return mixture(_GUARD_STEPS), mixture(-_GUARD_STEPS)

    def decide(self, candidate: MetricStats) -> Decision:
        """The verdict after a look at the candidate's stats so far (values in [0, 1])."""
        _check_unit(candidate, f"{self.metric}: a rate guard")
        rollback, promote = (float(x) for x in self.statistics(candidate.count, candidate.total))
        specific: dict[str, float | int | str] = {
            "records": candidate.count,
            "events": candidate.total,
            "rate": candidate.mean,
            "max_rate": self.max_rate,
        }
        return _decision(self, candidate.count, rollback, promote, specific)
