"""An ensemble's one output from its members' predictions (serving plans, policy "ensemble").

Members' predictions come aligned row by row (a member that could not score a row is
invalid there) and in the plan's order. Combiners:

- "mean": regressors the mean value; classifiers the mean probability of each class over the
  members that give probabilities, and its most probable class;
- "median": regressors the median value;
- "majority": classifiers the most frequent label (a tie goes to the label of the first
  member, in plan order, among the tied);
- "first_confident": classifiers the label of the first member whose top probability
  reaches the confidence, else the last member's that scored the row.

Every combiner skips members that did not score a row; a row no member scored is invalid.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from dataflows.runtimes import Prediction


class EnsembleError(ValueError):
    """Members that cannot be combined (regressors and classifiers mixed, or a combiner
    that does not apply to them)."""


def combine(members: Sequence[Prediction], combiner: str, confidence: float = 0.0) -> Prediction:
    """One prediction from the members' (same rows, plan order)."""
    if not members:
        raise EnsembleError("an ensemble needs members")
    classifiers = [m.labels is not None for m in members]
    if all(classifiers):
        return _classify(members, combiner, confidence)
    if any(classifiers):
        raise EnsembleError("an ensemble mixes regressors and classifiers")
    if combiner not in ("mean", "median"):
        raise EnsembleError(f"{combiner} combines classifiers; regressors take mean or median")
    stack = np.vstack([np.where(m.valid, m.values, np.nan) for m in members])
    scored = ~np.isnan(stack).all(axis=0)
    values = np.full(stack.shape[1], np.nan)
    reduce = np.nanmean if combiner == "mean" else np.nanmedian
    values[scored] = reduce(stack[:, scored], axis=0)
    return Prediction(values, None, None, (), scored & ~np.isnan(values))


def _classify(members: Sequence[Prediction], combiner: str, confidence: float) -> Prediction:
    n = len(members[0].values)
    labels: list[str] = []
    probabilities: np.ndarray | None = None
    classes: tuple[str, ...] = ()
    if combiner == "mean":
        classes, probabilities = _mean_probabilities(members)
        best = np.nanargmax(np.where(np.isnan(probabilities), -1.0, probabilities), axis=1)
        scored = ~np.isnan(probabilities).all(axis=1)
        labels = [classes[j] if scored[i] else "" for i, j in enumerate(best.tolist())]
    elif combiner == "majority":
        for i in range(n):
            votes = [m.labels[i] for m in members if m.valid[i] and m.labels is not None]
            labels.append(_majority(votes))
    elif combiner == "first_confident":
        for i in range(n):
            labels.append(_first_confident(members, i, confidence))
    else:
        raise EnsembleError(
            f"{combiner} combines regressors; classifiers take majority, mean or first_confident"
        )
    valid = np.array([bool(label) for label in labels], dtype=bool)
    values = np.array([_number(label) for label in labels], dtype=np.float64)
    return Prediction(values, labels, probabilities, classes, valid)


def _majority(votes: list[str]) -> str:
    if not votes:
        return ""
    counts = Counter(votes)
    most = max(counts.values())
    return next(v for v in votes if counts[v] == most)


def _first_confident(members: Sequence[Prediction], row: int, confidence: float) -> str:
    last = ""
    for member in members:
        if not member.valid[row] or member.labels is None:
            continue
        last = member.labels[row]
        if member.probabilities is not None:
            top = np.nanmax(member.probabilities[row]) if member.probabilities.shape[1] else 0.0
            if top >= confidence:
                return last
    return last


def _mean_probabilities(members: Sequence[Prediction]) -> tuple[tuple[str, ...], np.ndarray]:
    with_probabilities = [m for m in members if m.probabilities is not None]
    if not with_probabilities:
        raise EnsembleError("mean of classifiers needs members that give probabilities")
    classes = tuple(sorted({c for m in with_probabilities for c in m.class_labels}))
    index = {c: j for j, c in enumerate(classes)}
    n = len(members[0].values)
    total = np.zeros((n, len(classes)))
    count = np.zeros(n)
    for member in with_probabilities:
        assert member.probabilities is not None
        rows = member.valid & ~np.isnan(member.probabilities).all(axis=1)
        columns = [index[c] for c in member.class_labels]
        total[np.ix_(rows, columns)] += np.nan_to_num(member.probabilities[rows])
        count += rows
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count[:, None]
    mean[count == 0] = np.nan
    return classes, mean


def _number(label: str) -> float:
    try:
        value = float(label)
    except ValueError:
        return math.nan
    return value if math.isfinite(value) else math.nan
