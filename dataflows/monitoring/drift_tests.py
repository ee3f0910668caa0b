"""Calibrated drift tests: could a window's histogram of a quantity come from the reference?

A window's records are binned like the reference profile (`DriftAccumulator`). Each
quantity (a feature, the model's predictions, the label) then gets a p-value from a test
whose null distribution is known at the window's actual size, so the same drift threshold
means the same false-alarm rate at 100 records or at 100,000:

- numeric: a binned rank-sum test (Mann-Whitney: the window's mean mid-rank in the
  reference; normal, tie-corrected), which sees a shift of location, the commonest drift,
  with about the power of a t-test; and the chi-square test of the bin counts, which sees
  any change of the histogram (spread, shape, a bin that empties). The quantity's p-value
  is twice the smaller of the two (Bonferroni within it). (The binned Kolmogorov-Smirnov
  test, conservative under its limit law, was tried instead of the chi-square: it missed
  more shifts that empty a bin, e.g. 3.5% of +0.25 sd shifts of citric acid, whose zeros
  fill its first bin, in windows of 1,000 records. Its distance is still reported.)
- categorical (categories, classes, unseen values): the chi-square test of the category
  counts.

The chi-square statistic has its chi-square law (exact survival function for integer
degrees of freedom) where every bin expects at least `MIN_EXPECTED` records; elsewhere
(rare categories, a category never seen in training, small windows) a Monte-Carlo null:
multinomial draws from the reference at the window's size, seeded by what they depend on
and cached, so p-values are deterministic.

Both are two-sample tests: the profile was computed from `rows` training rows, so it is
itself a sample. Its noise counts through the effective size n·m/(n + m); a one-sample test
would call the profile's own sampling error drift once windows outgrow it. The family of a
window's quantities is controlled by Holm's procedure at `alpha` (`holm`).

Reference fractions are smoothed by half a record per bin (`smoothed`), so an empty bin or
a category never seen in training has a small, finite expected fraction.
"""

from __future__ import annotations

import math
import threading
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

UNKNOWN_ROWS_SMOOTHING = 10_000
"""Rows assumed for smoothing a profile that does not say how many it had (`row_count` 0);
it is then also taken as exact (a one-sample test)."""

MIN_EXPECTED = 5.0
"""Records each bin must expect (at the effective size) for the chi-square law to hold."""

MIN_DRAWS = 2_000
MAX_DRAWS = 200_000
DRAWS_PER_THRESHOLD = 20
"""Monte-Carlo draws per categorical null: enough for `DRAWS_PER_THRESHOLD` draws beyond the
smallest per-test threshold Holm uses (alpha / tests), within [MIN_DRAWS, MAX_DRAWS]."""

NULL_CACHE_SIZE = 64
"""Categorical null distributions kept (per reference, rows, window size and draws)."""


@dataclass(frozen=True)
class TestResult:
    """A quantity's p-value and the size of its change."""

    p_value: float
    distance: float  # numeric: binned KS distance; categorical: total variation distance


def smoothed(expected: np.ndarray, rows: int) -> np.ndarray:
    """Reference fractions with half a record added to each bin, renormalised."""
    m = rows if rows > 0 else UNKNOWN_ROWS_SMOOTHING
    counts = np.asarray(expected, dtype=np.float64) * m + 0.5
    return counts / counts.sum()


def effective_size(n: int, rows: int) -> float:
    """Effective size of a two-sample comparison of n window records with `rows` reference
    rows (0: an exact reference, n)."""
    return n * rows / (n + rows) if rows > 0 else float(n)


def chi2_sf(x: float, df: int) -> float:
    """P(X > x) for a chi-square variable X of `df` (>= 1) degrees of freedom: the closed
    forms for integer df (a Poisson sum for even df, with erfc for odd df)."""
    if x <= 0:
        return 1.0
    h = x / 2
    if df % 2 == 0:
        term = total = math.exp(-h)
        for i in range(1, df // 2):
            term *= h / i
            total += term
    else:
        total = math.erfc(math.sqrt(h))
        term = math.exp(-h) * math.sqrt(h) / math.gamma(1.5)
        for i in range(1, (df - 1) // 2 + 1):
            if i > 1:
                term *= h / (i - 0.5)
            total += term
    return min(1.0, total)


def numeric_test(
    expected: np.ndarray, counts: np.ndarray, rows: int, draws: int = MIN_DRAWS
) -> TestResult:
    """Rank-sum and chi-square tests of window bin counts against the reference fractions;
    the distance reported is the binned KS distance."""
    n = int(counts.sum())
    if n == 0 or len(counts) < 2:
        return TestResult(1.0, 0.0)
    p = smoothed(expected, rows)
    q = counts / n
    cumulative = np.cumsum(p)
    distance = float(np.abs(np.cumsum(q)[:-1] - cumulative[:-1]).max())
    # Mann-Whitney on bins: the window's mean mid-rank in the reference, 1/2 under no drift,
    # variance (1 - sum p^3) / 12 per record (ties in a bin count half).
    mid_rank = cumulative - p / 2
    spread = math.sqrt(max(1.0 - float(np.sum(p**3)), 1e-12) / 12.0 / effective_size(n, rows))
    z = (float(q @ mid_rank) - 0.5) / spread
    p_rank = math.erfc(abs(z) / math.sqrt(2.0))
    p_chi = _chi_square_p(p, counts, rows, draws)
    return TestResult(min(1.0, 2.0 * min(p_rank, p_chi)), distance)


def chi_square_distance(q: np.ndarray, r: np.ndarray, p: np.ndarray) -> np.ndarray:
    """sum (q - r)^2 / p over the last axis: window fractions q, reference fractions r."""
    return np.sum((q - r) ** 2 / p, axis=-1)


class NullCache:
    """Monte-Carlo null distributions of the categorical statistic, least recently used
    dropped; thread-safe (the monitor steps of several workers share it)."""

    def __init__(self, size: int = NULL_CACHE_SIZE) -> None:
        self._size = size
        self._nulls: OrderedDict[tuple[bytes, int, int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, p: np.ndarray, rows: int, n: int, draws: int) -> np.ndarray:
        """Sorted null draws of the chi-square distance of n records (and of a reference of
        `rows`), both drawn from the fractions p; scaled by the effective size."""
        key = (p.tobytes(), rows, n, draws)
        with self._lock:
            null = self._nulls.get(key)
            if null is not None:
                self._nulls.move_to_end(key)
                return null
        # Seeded by what the draws depend on: the same window gets the same p-value
        # whatever was cached before.
        rng = np.random.default_rng([zlib.crc32(p.tobytes()), rows, n, draws])
        window = rng.multinomial(n, p, size=draws) / n
        reference = rng.multinomial(rows, p, size=draws) / rows if rows > 0 else p
        null = np.sort(effective_size(n, rows) * chi_square_distance(window, reference, p))
        with self._lock:
            self._nulls[key] = null
            while len(self._nulls) > self._size:
                self._nulls.popitem(last=False)
        return null


NULLS = NullCache()
"""The process's categorical null distributions."""


def categorical_test(
    expected: np.ndarray, counts: np.ndarray, rows: int, draws: int = MIN_DRAWS
) -> TestResult:
    """Chi-square test of window category counts (the last one: unseen) against the
    reference fractions; the distance reported is the total variation distance."""
    n = int(counts.sum())
    if n == 0 or len(counts) < 2:
        return TestResult(1.0, 0.0)
    p = smoothed(expected, rows)
    distance = 0.5 * float(np.abs(counts / n - p).sum())
    return TestResult(_chi_square_p(p, counts, rows, draws), distance)


def _chi_square_p(p: np.ndarray, counts: np.ndarray, rows: int, draws: int) -> float:
    n = int(counts.sum())
    size = effective_size(n, rows)
    statistic = size * float(chi_square_distance(counts / n, p, p))
    if size * float(p.min()) >= MIN_EXPECTED:
        return chi2_sf(statistic, len(p) - 1)
    null = NULLS.get(p, rows, n, draws)
    # A tiny tolerance: the same counts must compare equal however the sum was rounded.
    beyond = len(null) - int(np.searchsorted(null, statistic * (1 - 1e-9), side="left"))
    return (1 + beyond) / (1 + len(null))


def draws_for(alpha: float, tests: int) -> int:
    """Monte-Carlo draws that resolve p-values at Holm's smallest threshold, alpha / tests."""
    wanted = math.ceil(DRAWS_PER_THRESHOLD * max(tests, 1) / alpha)
    return min(MAX_DRAWS, max(MIN_DRAWS, wanted))


def holm(p_values: Sequence[float], alpha: float) -> list[bool]:
    """Which hypotheses Holm's step-down procedure rejects at family-wise rate alpha.

    Some are rejected exactly when the smallest p-value is at most alpha / len(p_values)
    (Bonferroni's alarm); Holm then rejects more of the others than Bonferroni would.
    """
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    rejected = [False] * len(p_values)
    for rank, i in enumerate(order):
        if p_values[i] > alpha / (len(p_values) - rank):
            break
        rejected[i] = True
    return rejected


def psi(expected: np.ndarray, counts: np.ndarray, rows: int = 0) -> float:
    """Population stability index of window bin counts against reference fractions, both
    smoothed by half a record per bin. Descriptive only: its noise floor is about
    (bins - 1) / n, so no fixed threshold on it means the same at every window size."""
    n = int(counts.sum())
    if n == 0:
        return 0.0
    actual = (counts + 0.5) / (n + 0.5 * len(counts))
    reference = smoothed(expected, rows)
    return float(np.sum((actual - reference) * np.log(actual / reference)))
