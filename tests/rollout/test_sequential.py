"""The canary's sequential tests (`dataflows.rollout.sequential`) and their calibration
(`dataflows.rollout.sequential_eval`, `just canary-eval`) in small."""

from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Mapping

import numpy as np
import pytest

from dataflows.rollout.sequential import (
    Decision,
    MetricStats,
    RateGuard,
    Reason,
    TwoSampleTest,
    Verdict,
    combine,
    log_mixture_lr,
    log_normal_cdf,
    summarize,
)
from dataflows.rollout.sequential_eval import (
    SQUARED,
    ZERO_ONE,
    main,
    simulate_guard,
    simulate_two_sample,
)


def zero_one(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    """n 0/1 losses, each 1 with probability rate."""
    return (rng.random(n) < rate).astype(np.float64)


def num(evidence: Mapping[str, float | int | str], key: str) -> float:
    """A number of the evidence."""
    value = evidence[key]
    assert isinstance(value, int | float), (key, value)
    return float(value)


def squared(rng: np.random.Generator, n: int, mse: float) -> np.ndarray:
    """n squared errors of Gaussian residuals with mean square mse."""
    return mse * rng.standard_normal(n) ** 2


# --- MetricStats ---------------------------------------------------------------------------


def test_merged_stats_equal_the_stats_of_the_concatenated_records() -> None:
    rng = np.random.default_rng(1)
    shards = [squared(rng, n, 1.5) for n in (0, 1, 37, 500)]
    merged = MetricStats()
    for shard in shards:
        merged = merged.merge(MetricStats.of(shard))
    whole = MetricStats.of(np.concatenate(shards))
    assert merged.count == whole.count == 538
    assert merged.total == pytest.approx(whole.total, rel=1e-12)
    assert merged.total_sq == pytest.approx(whole.total_sq, rel=1e-12)
    assert merged.mean == pytest.approx(np.concatenate(shards).mean(), rel=1e-12)
    assert merged.variance == pytest.approx(np.concatenate(shards).var(ddof=1), rel=1e-9)
    # 0/1 losses sum exactly, in any order; `add` and `+` are the same merge.
    flags = [zero_one(rng, 300, 0.2) for _ in range(4)]
    forward = sum((MetricStats.of(f) for f in flags), MetricStats())
    backward = MetricStats()
    for f in reversed(flags):
        backward = backward.add(f)
    assert forward == backward == MetricStats.of(np.stack(flags))
    assert MetricStats().add(2.0) == MetricStats(1, 2.0, 4.0)


def test_stats_refuse_what_is_not_a_number() -> None:
    with pytest.raises(ValueError, match="1 of 3 values are NaN or infinite"):
        MetricStats.of([0.5, math.nan, 1.0])
    with pytest.raises(ValueError, match="NaN or infinite"):
        MetricStats.of([math.inf])
    with pytest.raises(ValueError, match="finite"):
        MetricStats.of([1e200, 1e200])  # the squares overflow
    with pytest.raises(ValueError, match="whole number"):
        MetricStats(-1, 0.0, 0.0)
    with pytest.raises(ValueError, match="no records"):
        MetricStats(0, 1.0, 1.0)
    with pytest.raises(ValueError, match="negative"):
        MetricStats(2, 1.0, -1.0)


# --- The mixture likelihood ratio ----------------------------------------------------------


def test_the_closed_form_mixture_is_the_integral_it_claims() -> None:
    """LR = E over lambda ~ half-normal(tau) of exp(lambda s I - lambda^2 I / 2)."""
    tau = 0.2
    lam = np.linspace(0.0, 12 * tau, 200_001)
    weight = 2.0 / (tau * math.sqrt(2 * math.pi)) * np.exp(-0.5 * (lam / tau) ** 2)
    for shift, info in ((0.05, 400.0), (-0.05, 400.0), (0.2, 50.0), (0.01, 10_000.0)):
        integrand = np.exp(lam * shift * info - lam**2 * info / 2) * weight
        numeric = float(np.sum((integrand[1:] + integrand[:-1]) / 2 * np.diff(lam)))
        assert float(log_mixture_lr(shift, info, tau)) == pytest.approx(math.log(numeric), abs=1e-6)
    assert float(log_mixture_lr(0.3, 0.0, tau)) == 0.0  # no information, no evidence
    # Far in the tail (a variance that rounds to almost nothing) it stays finite and right.
    assert -700 < float(log_mixture_lr(-1e-3, 1e300, tau)) < -600


def test_log_normal_cdf_is_accurate_deep_in_the_tail() -> None:
    x = np.array([-60.0, -25.0, -20.0001, -19.9999, -5.0, 0.0, 3.0])
    expected = [  # the first four: scipy.stats.norm.logcdf
        -1805.0135606805675,
        -316.63940800802027,
        -203.9191603513918,
        -203.91515040077812,
        math.log(0.5 * math.erfc(5 / math.sqrt(2))),
        math.log(0.5),
        math.log(0.5 * math.erfc(-3 / math.sqrt(2))),
    ]
    assert log_normal_cdf(x) == pytest.approx(expected, rel=1e-8)


# --- Two-sample test -----------------------------------------------------------------------


CLASSIFIER = TwoSampleTest("error_rate", margin=0.05, binary=True)
REGRESSOR = TwoSampleTest("squared_error", margin=0.2)


def test_a_much_worse_candidate_is_rolled_back() -> None:
    rng = np.random.default_rng(2)
    primary = MetricStats.of(zero_one(rng, 1200, 0.10))
    candidate = MetricStats.of(zero_one(rng, 300, 0.40))
    decision = CLASSIFIER.decide(primary, candidate)
    assert decision.verdict is Verdict.ROLLBACK and decision.metric == "error_rate"
    ev = decision.evidence
    assert ev["reason"] == Reason.ROLLBACK
    assert num(ev, "log_lr_rollback") >= num(ev, "threshold") == pytest.approx(math.log(20))
    assert ev["difference"] == pytest.approx(candidate.mean - primary.mean)
    assert "worse than primary" in decision.summary()


def test_an_equal_or_better_candidate_is_promoted_with_enough_records() -> None:
    rng = np.random.default_rng(3)
    primary = MetricStats.of(squared(rng, 8000, 1.0))
    equal = REGRESSOR.decide(primary, MetricStats.of(squared(rng, 2000, 1.0)))
    assert equal.verdict is Verdict.PROMOTE and equal.evidence["reason"] == Reason.PROMOTE
    better = REGRESSOR.decide(primary, MetricStats.of(squared(rng, 2000, 0.7)))
    assert better.verdict is Verdict.PROMOTE
    assert num(better.evidence, "log_lr_promote") > num(equal.evidence, "log_lr_promote")


def test_little_data_continues() -> None:
    rng = np.random.default_rng(4)
    primary = MetricStats.of(squared(rng, 600, 1.0))
    candidate = MetricStats.of(squared(rng, 150, 1.0))
    decision = REGRESSOR.decide(primary, candidate)
    assert decision.verdict is Verdict.CONTINUE
    assert decision.evidence["reason"] == Reason.NO_EVIDENCE
    assert "no decision yet" in decision.summary()


def test_no_decision_before_min_records_per_arm() -> None:
    """A hopeless candidate waits for min_records in its own arm, then goes at once."""
    test = TwoSampleTest("error_rate", margin=0.05, min_records=100, binary=True)
    primary = MetricStats.of(np.r_[np.ones(10), np.zeros(990)])
    bad = MetricStats.of(np.r_[np.ones(89), np.zeros(10)])  # 99 records, 90% errors
    waiting = test.decide(primary, bad)
    assert waiting.verdict is Verdict.CONTINUE
    assert waiting.evidence["reason"] == Reason.MIN_RECORDS
    assert num(waiting.evidence, "log_lr_rollback") > 10 * num(waiting.evidence, "threshold")
    assert "waiting for 100 records per arm" in waiting.summary()
    assert test.decide(primary, bad.add(1.0)).verdict is Verdict.ROLLBACK
    # The primary's arm counts too.
    assert test.decide(MetricStats.of(np.zeros(99)), bad.add(1.0)).verdict is Verdict.CONTINUE


def test_max_records_decides_by_the_stated_rule() -> None:
    """Equal models, a margin too small to show: at max_records, roll back by rule."""
    rng = np.random.default_rng(5)
    test = TwoSampleTest("squared_error", margin=0.01, max_records=2000)
    primary = MetricStats.of(squared(rng, 2000, 1.0))
    candidate = MetricStats.of(squared(rng, 2000, 1.0))
    decision = test.decide(primary, candidate)
    assert decision.verdict is Verdict.ROLLBACK
    assert decision.evidence["reason"] == Reason.MAX_RECORDS
    assert decision.evidence["rule"] == "rollback at max_records without evidence either way"
    ev = decision.evidence
    assert max(num(ev, "log_lr_rollback"), num(ev, "log_lr_promote")) < num(ev, "threshold")
    assert decision.summary().endswith("by rule: roll back")
    lenient = TwoSampleTest(
        "squared_error", margin=0.01, max_records=2000, at_max_records=Verdict.PROMOTE
    )
    assert lenient.decide(primary, candidate).verdict is Verdict.PROMOTE
    smaller = MetricStats.of(squared(rng, 1999, 1.0))
    assert test.decide(primary, smaller).verdict is Verdict.CONTINUE


def test_zero_one_losses_without_any_error() -> None:
    """Two flawless classifiers: the generic rule cannot tell their spread (no variation
    at all) and waits; `binary` knows the Bernoulli law and promotes."""
    none = MetricStats.of(np.zeros(3000))
    generic = TwoSampleTest("error_rate", margin=0.01)
    assert generic.decide(none, none).verdict is Verdict.CONTINUE
    decision = TwoSampleTest("error_rate", margin=0.01, binary=True).decide(none, none)
    assert decision.verdict is Verdict.PROMOTE
    assert num(decision.evidence, "std_error") == 0.0 < num(decision.evidence, "std_error_promote")


def test_decisions_are_a_deterministic_function_of_the_stats() -> None:
    """Same stats, same decision, bit for bit; shards merged in another order decide the
    same; stats and decisions survive pickling; evidence is plain JSON-ready values."""
    rng = np.random.default_rng(6)
    shards_p = [MetricStats.of(squared(rng, 400, 1.0)) for _ in range(5)]
    shards_c = [MetricStats.of(squared(rng, 100, 1.05)) for _ in range(5)]
    primary = sum(shards_p, MetricStats())
    candidate = sum(shards_c, MetricStats())
    first = REGRESSOR.decide(primary, candidate)
    again = REGRESSOR.decide(
        MetricStats(primary.count, primary.total, primary.total_sq),
        MetricStats(candidate.count, candidate.total, candidate.total_sq),
    )
    assert again == first and again.summary() == first.summary()
    other_order = REGRESSOR.decide(
        sum(reversed(shards_p), MetricStats()), sum(reversed(shards_c), MetricStats())
    )
    assert other_order.verdict is first.verdict
    assert other_order.evidence["log_lr_promote"] == pytest.approx(
        first.evidence["log_lr_promote"], abs=1e-9
    )
    assert pickle.loads(pickle.dumps(first)) == first
    assert pickle.loads(pickle.dumps(primary)) == primary
    assert all(type(v) in (int, float, str) for v in first.evidence.values())
    assert json.loads(json.dumps(first.evidence)) == first.evidence


def test_the_summary_is_one_line_with_the_numbers_that_decided() -> None:
    rng = np.random.default_rng(7)
    primary = MetricStats.of(squared(rng, 4000, 1.0))
    candidate = MetricStats.of(squared(rng, 1204, 0.98))
    line = REGRESSOR.decide(primary, candidate).summary()
    pattern = (
        r"candidate squared_error [\d.]+ vs primary [\d.]+ over 1,204/4,000 records: "
        r"not worse by more than 0\.2 \(log LR [\d.]+ >= 3\.0\): promote"
    )
    assert re.fullmatch(pattern, line), line
    # The same line from the evidence alone, as read back from an event message.
    evidence = json.loads(json.dumps(REGRESSOR.decide(primary, candidate).evidence))
    assert summarize(evidence) == line


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="margin"):
        TwoSampleTest("loss", margin=0.0)
    with pytest.raises(ValueError, match="alpha"):
        TwoSampleTest("loss", margin=0.1, alpha=1.0)
    with pytest.raises(ValueError, match="max_records"):
        TwoSampleTest("loss", margin=0.1, min_records=100, max_records=50)
    with pytest.raises(ValueError, match="at_max_records"):
        TwoSampleTest("loss", margin=0.1, at_max_records=Verdict.CONTINUE)
    with pytest.raises(ValueError, match="max_rate"):
        RateGuard("errors", max_rate=0.0)


def test_real_classifiers_on_breast_cancer() -> None:
    """A logistic regression as primary; as candidates, a second one trained on other rows
    (promoted: about as good) and one that always says "benign" (rolled back). Records go
    to the candidate by their index, one in four; 0/1 losses on the held-out rows, resampled
    to a canary's length."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_breast_cancer(return_X_y=True)
    rng = np.random.default_rng(8)
    order = rng.permutation(len(y))
    train_a, train_b, held = order[:150], order[150:300], order[300:]

    def fitted(rows: np.ndarray) -> np.ndarray:
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        model.fit(x[rows], y[rows])
        return (model.predict(x[held]) != y[held]).astype(np.float64)

    primary_errors, twin_errors = fitted(train_a), fitted(train_b)
    constant_errors = (y[held] != 1).astype(np.float64)
    records = rng.integers(0, len(held), 6000)
    to_candidate = np.arange(len(records)) % 4 == 0
    primary = MetricStats.of(primary_errors[records[~to_candidate]])
    test = TwoSampleTest("error_rate", margin=0.03, binary=True)
    twin = test.decide(primary, MetricStats.of(twin_errors[records[to_candidate]]))
    assert twin.verdict is Verdict.PROMOTE, twin.summary()
    constant = test.decide(primary, MetricStats.of(constant_errors[records[to_candidate]]))
    assert constant.verdict is Verdict.ROLLBACK, constant.summary()


# --- Rate guard ----------------------------------------------------------------------------


GUARD = RateGuard("failed_rate", max_rate=0.01)


def test_the_guard_rolls_back_a_failing_candidate_and_passes_a_clean_one() -> None:
    rng = np.random.default_rng(9)
    failing = GUARD.decide(MetricStats.of(zero_one(rng, 200, 0.2)))
    assert failing.verdict is Verdict.ROLLBACK and failing.metric == "failed_rate"
    assert "above the limit" in failing.summary() and failing.summary().endswith("roll back")
    clean = GUARD.decide(MetricStats.of(np.zeros(1000)))
    assert clean.verdict is Verdict.PROMOTE and "below the limit" in clean.summary()
    at_limit = GUARD.decide(MetricStats.of(np.r_[np.ones(5), np.zeros(495)]))
    assert at_limit.verdict is Verdict.CONTINUE
    few = GUARD.decide(MetricStats.of(np.ones(9)))  # min_records 10
    assert few.verdict is Verdict.CONTINUE and few.evidence["reason"] == Reason.MIN_RECORDS
    assert GUARD.decide(MetricStats.of(np.ones(10))).verdict is Verdict.ROLLBACK


def test_the_guard_and_binary_tests_need_values_in_zero_one() -> None:
    with pytest.raises(ValueError, match=r"rate guard needs values in \[0, 1\]"):
        GUARD.decide(MetricStats.of([2.0, 0.0]))
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        GUARD.decide(MetricStats.of([-1.0, 0.0]))
    with pytest.raises(ValueError, match=r"binary test \(candidate\) needs values"):
        CLASSIFIER.decide(MetricStats.of(np.zeros(200)), MetricStats.of(np.full(200, 1.5)))


def test_combine_rolls_back_on_any_and_promotes_on_all() -> None:
    def decision(verdict: Verdict, metric: str) -> Decision:
        return Decision(verdict, metric, {"metric": metric, "verdict": verdict.value})

    quality = decision(Verdict.PROMOTE, "error_rate")
    latency = decision(Verdict.PROMOTE, "slow_rate")
    failing = decision(Verdict.ROLLBACK, "failed_rate")
    waiting = decision(Verdict.CONTINUE, "disagreement")
    assert combine([quality, waiting, failing]) is failing
    assert combine([quality, waiting, latency]) is waiting
    both = combine([quality, latency])
    assert both.verdict is Verdict.PROMOTE and both.metric == "error_rate"
    assert both.evidence["also_passed"] == "slow_rate"
    with pytest.raises(ValueError):
        combine([])


# --- Calibration under continuous monitoring ------------------------------------------------


def test_false_decisions_stay_rare_when_looking_after_every_batch() -> None:
    """400 simulated canaries each, looked at after every batch of 50 records: false
    rollbacks of an equal candidate and false promotions of one worse by the margin stay far
    below 10% (alpha 5%; the test's own rates are near 2%), while the naive z-test checked
    at every look errs in about a third of the runs."""
    test = TwoSampleTest(SQUARED.name, margin=SQUARED.margin, max_records=1000)
    equal = simulate_two_sample(test, SQUARED, 0.0, 400, np.random.default_rng(10))
    assert equal.share(equal.rollback_ever) < 0.1
    assert equal.share(equal.naive_rollback_ever) > 0.15
    worse = simulate_two_sample(test, SQUARED, SQUARED.margin, 400, np.random.default_rng(11))
    assert worse.share(worse.promote_ever) < 0.1
    assert worse.share(worse.naive_promote_ever) > 0.15
    binary = TwoSampleTest(ZERO_ONE.name, margin=ZERO_ONE.margin, max_records=2000, binary=True)
    worse = simulate_two_sample(binary, ZERO_ONE, ZERO_ONE.margin, 400, np.random.default_rng(12))
    assert worse.share(worse.promote_ever) < 0.1
    guard = RateGuard("bad rate", 0.02, max_records=2000)
    at_limit = simulate_guard(guard, 0.02, 400, np.random.default_rng(13))
    assert at_limit.share(at_limit.rollback_ever) < 0.1


def test_the_quick_evaluation_meets_its_goal(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "goal met" in out and "false promotions <= 5.0%: met" in out
    assert "squared error" in out and "guard <= 0.02" in out
