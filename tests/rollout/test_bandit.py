"""The bandit allocators (`dataflows.rollout.bandit`) and their simulation (`bandit_sim`).

Every random number here comes from a fixed seed, so each test is deterministic; the
thresholds leave a wide margin over what those seeds give (noted at each)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dataflows.monitoring.feedback import JoinedPairs
from dataflows.monitoring.windows import ModelIdentity
from dataflows.rollout import bandit_sim
from dataflows.rollout.bandit import (
    Allocator,
    ArmStats,
    ThompsonAllocator,
    UCBAllocator,
    joined_rewards,
    reward_of,
)
from dataflows.rollout.bandit_sim import SCENARIOS, EvenSplit, Scenario, simulate

ALLOCATORS: list[Allocator] = [ThompsonAllocator(seed=7), UCBAllocator()]


def _random_arms(rng: np.random.Generator, k: int) -> dict[str, ArmStats]:
    arms = {}
    for j in range(k):
        pulls = int(rng.integers(0, 500))
        arms[f"model-{j}:1"] = ArmStats.of(rng.random(pulls) < rng.uniform(0.3, 0.9))
    return arms


# --- rewards -------------------------------------------------------------------------------


def test_a_classifier_earns_one_for_the_right_label() -> None:
    predicted, labels = np.array(["red", "white", "red"]), np.array(["red", "red", "rosé"])
    assert reward_of(predicted, labels).tolist() == [1.0, 0.0, 0.0]
    assert reward_of(np.array([2, 0]), np.array([2, 1])).tolist() == [1.0, 0.0]


def test_a_regressor_earns_a_bounded_transform_of_its_error() -> None:
    labels = np.array([5.0, 5.0, 5.0, 5.0, 5.0, np.nan, 5.0, 5.0])
    predicted = np.array([5.0, 5.8, 4.2, 6.6, 1e300, 5.0, np.nan, np.inf])
    rewards = reward_of(predicted, labels, scale=0.8)
    # No error: 1; an error of one scale, either way: 1/2; two scales: 1/5; huge: ~0.
    np.testing.assert_allclose(rewards[:4], [1.0, 0.5, 0.5, 0.2])
    assert 0.0 <= rewards[4] < 1e-12
    assert math.isnan(rewards[5])  # a label that is not a number: no reward
    assert rewards[6:].tolist() == [0.0, 0.0]  # a prediction that is not a number: wrong


def test_reward_of_refuses_what_it_cannot_judge() -> None:
    with pytest.raises(ValueError, match="one length"):
        reward_of(np.array([1.0, 2.0]), np.array([1.0]))
    with pytest.raises(ValueError, match="scale"):
        reward_of(np.array([1.0]), np.array([1.0]), scale=0.0)
    with pytest.raises(ValueError, match="numeric"):
        reward_of(np.array(["a"]), np.array(["b"]), scale=1.0)


def test_joined_pairs_give_rewards_per_model_kind() -> None:
    identity = ModelIdentity("wine", "wine-rf", "1", "ab" * 32)
    classifier = JoinedPairs(
        identity,
        ["r1", "r2", "r3"],
        np.array([5.0, 6.0, 9.0]),  # 9: none of the model's classes
        np.zeros(3, np.int64),
        np.zeros(3, np.int64),
        np.array([0, 0, 1], np.int64),  # class indices: "5", "5", "6"
        ("5", "6"),
        None,
    )
    assert joined_rewards(classifier).tolist() == [1.0, 0.0, 0.0]
    regressor = JoinedPairs(
        identity,
        ["r1", "r2"],
        np.array([5.0, 6.0]),
        np.zeros(2, np.int64),
        np.zeros(2, np.int64),
        np.array([5.0, 5.0]),
        (),
        None,
    )
    assert joined_rewards(regressor, scale=1.0).tolist() == [1.0, 0.5]
    with pytest.raises(ValueError, match="needs a scale"):
        joined_rewards(regressor)


# --- stats ---------------------------------------------------------------------------------


def test_arm_stats_add_and_merge() -> None:
    first = ArmStats.of([1.0, 0.0, 0.5])
    assert first == ArmStats(3, 1.5, 1.25)
    both = first.merge(ArmStats.of([1.0, np.nan]))  # NaN: a pair without a reward
    assert both == ArmStats(4, 2.5, 2.25) == ArmStats.of([1.0, 0.0, 0.5, 1.0])
    assert both.mean == 2.5 / 4 and math.isnan(ArmStats().mean)
    assert first.add([]) is first


def test_arm_stats_refuse_rewards_outside_zero_one() -> None:
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        ArmStats().add([0.5, 1.5])
    with pytest.raises(ValueError, match="impossible"):
        ArmStats(2, 3.0, 3.0)  # more reward than pulls
    with pytest.raises(ValueError, match="impossible"):
        ArmStats(2, 1.0, 1.5)  # squares above the sum: a reward above 1


# --- allocators ----------------------------------------------------------------------------


@pytest.mark.parametrize("allocator", ALLOCATORS, ids=["thompson", "ucb"])
def test_weights_sum_to_one_with_every_arm_at_its_floor(allocator: Allocator) -> None:
    rng = np.random.default_rng(1)
    for k in range(1, 9):
        for _ in range(10):
            weights = allocator.weights(_random_arms(rng, k))
            assert list(weights) == sorted(weights)
            assert math.isclose(sum(weights.values()), 1.0, abs_tol=1e-12)
            assert min(weights.values()) >= 0.01 - 1e-12


def test_thompson_is_a_function_of_the_stats_and_the_seed() -> None:
    arms = {"b:1": ArmStats.of([1, 0, 1, 1]), "a:1": ArmStats.of([0, 1, 0]), "c:1": ArmStats()}
    reordered = {name: arms[name] for name in ("c:1", "a:1", "b:1")}
    weights = ThompsonAllocator(seed=3).weights(arms)
    assert ThompsonAllocator(seed=3).weights(reordered) == weights
    assert ThompsonAllocator(seed=3).weights(dict(arms)) == weights
    assert ThompsonAllocator(seed=4).weights(arms) != weights  # another seed, other draws
    more = {**arms, "c:1": ArmStats.of([1])}
    assert ThompsonAllocator(seed=3).weights(more) != weights  # new stats, new draws


def test_thompson_weights_are_the_probability_of_being_best() -> None:
    allocator = ThompsonAllocator(seed=0, floor=0.0)
    # Beta(2, 1) against Beta(1, 1): P(first is larger) = 2/3 exactly; 10,000 draws have a
    # standard error of 0.005, and the margin is 0.02.
    weights = allocator.weights({"a": ArmStats.of([1.0]), "b": ArmStats()})
    assert abs(weights["a"] - 2 / 3) < 0.02
    # Identical stats: exactly even, whatever the draws.
    same = ArmStats.of([1, 0, 1])
    assert ThompsonAllocator(seed=9).weights({"x": same, "y": same, "z": same}) == {
        name: pytest.approx(1 / 3, abs=1e-15) for name in "xyz"
    }
    # Overwhelming evidence: the best arm takes all but the floors.
    clear = ThompsonAllocator(seed=0, floor=0.01).weights(
        {
            "bad": ArmStats.of(np.zeros(1000)),
            "good": ArmStats.of(np.ones(1000)),
            "new": ArmStats(1000, 500, 250),
        }
    )
    assert clear == {"bad": 0.01, "good": pytest.approx(0.98), "new": 0.01}


def test_ucb_puts_all_but_the_floors_on_the_highest_bound() -> None:
    ucb = UCBAllocator(floor=0.02)
    # An arm without pulls first; between two, the first name.
    assert ucb.weights({"b": ArmStats(), "a": ArmStats(), "c": ArmStats.of([1])}) == {
        "a": pytest.approx(0.96),
        "b": 0.02,
        "c": 0.02,
    }
    # mean + sqrt(2 ln N / n): 0.6 over 100 pulls (0.6 + 0.374) beats 0.8 over 1,000
    # (0.8 + 0.118); with 10,000 pulls of the first (0.6 + 0.043), 0.8 + 0.136 wins.
    a, b = ArmStats(100, 60.0, 60.0), ArmStats(1000, 800.0, 800.0)
    assert ucb.weights({"a": a, "b": b})["a"] == pytest.approx(0.98)
    assert ucb.weights({"a": ArmStats(10_000, 6000.0, 6000.0), "b": b})["b"] == pytest.approx(0.98)


def test_allocators_refuse_bad_parameters() -> None:
    with pytest.raises(ValueError, match="at least one arm"):
        ThompsonAllocator().weights({})
    with pytest.raises(ValueError, match="over 1"):
        UCBAllocator(floor=0.3).weights({name: ArmStats() for name in "abcd"})
    with pytest.raises(ValueError, match="floor"):
        ThompsonAllocator(floor=1.0)
    with pytest.raises(ValueError, match="seed"):
        ThompsonAllocator(seed=-1)
    with pytest.raises(TypeError, match="ArmStats"):
        UCBAllocator().weights({"a": (1, 1.0, 1.0)})  # type: ignore[dict-item]


# --- in simulation -------------------------------------------------------------------------


def test_thompson_converges_to_the_better_classifier() -> None:
    """Accuracy 0.70 against 0.75, rewards 2,000 records late, weights every 1,000 records:
    by 20,000 records the better arm has >= 0.9 of the traffic in every seed (these seeds
    give 0.988-0.99), and the regret is under 30% of the even split's (they give 16-18%)."""
    scenario = SCENARIOS[0]
    for seed in range(5):
        run = simulate(scenario, ThompsonAllocator(seed=seed), 20_000, (20_000,), seed)
        even = simulate(scenario, EvenSplit(), 20_000, (20_000,), seed)
        assert run.best_weight[-1] > 0.9
        assert run.regret[-1] < 0.3 * even.regret[-1]


def test_thompson_does_not_often_settle_on_one_of_equal_arms() -> None:
    """Two arms of equal accuracy: the weight of one after 20,000 records is the posterior
    probability that it is better, about uniform over (0, 1), so it is beyond 0.95 (or
    below 0.05) in about a tenth of runs. These 40 seeds give 3; at most 8 pass."""
    equal = Scenario("equal", ("a", "b"), accuracies=(0.7, 0.7))
    weights = np.array(
        [
            simulate(equal, ThompsonAllocator(seed=seed), 20_000, (20_000,), seed).best_weight[-1]
            for seed in range(40)
        ]
    )
    settled = np.maximum(weights, 1 - weights) >= 0.95
    assert settled.sum() <= 8


def test_the_simulation_reports_and_meets_its_goal(capsys: pytest.CaptureFixture[str]) -> None:
    assert bandit_sim.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "goal met" in out
    for policy in bandit_sim.POLICIES:
        assert f"| {policy} |" in out
