"""What a canary's records show without labels: the guards the rollout judge watches.

Labels can come late or never. A canary is still judged on what every record shows at
once, per batch of the records routed to it: how many it failed to score (the model call
raised, or returned no usable prediction); with a time budget per record
(`WAXSERVE_CANARY_MAX_US_PER_RECORD`), how many it scored slower than that; and with a
disagreement limit (`WAXSERVE_CANARY_MAX_DISAGREEMENT`), how many it scored otherwise than
the active model, which then scores the canary's records too (a different class, or for
regressors a value more than `WAXSERVE_CANARY_DISAGREEMENT_TOLERANCE` label standard
deviations away). Each guard is a rate the judge tests sequentially against its maximum
(`RateGuard`): evidence above it rolls the canary back, whatever the labels say; without
labels for the data type, evidence below it on every guard promotes it (if asked to).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dataflows.monitoring.windows import DriftReference, ModelIdentity

GUARDS = ("error rate", "slow rate", "disagreement")
"""The guards, as the judge names them in its decisions."""


@dataclass(frozen=True)
class CanaryGuards:
    """What a shard measures of a canary's records for the label-free guards."""

    budget_us: float = 0.0  # time budget per record; 0: no slow-rate guard
    compare: bool = False  # the active model scores the canary's records too
    tolerance: float = 0.5  # regressors: disagreement beyond this many label stds


NO_CANARY_GUARDS = CanaryGuards()
"""The default: error rate only (no time budget, no comparison with the active model)."""


@dataclass(frozen=True)
class GuardCounts:
    """Of `records` routed to a canary in one batch, how many it failed to score, how
    many it scored slower than the time budget per record, and of the `compared` records
    the active model scored too, on how many the two disagreed."""

    identity: ModelIdentity
    records: int
    failed: int
    slow: int
    compared: int = 0
    disagreed: int = 0

    @classmethod
    def of(
        cls,
        identity: ModelIdentity,
        records: int,
        failed: int,
        seconds: float,
        budget_us: float,
        compared: int = 0,
        disagreed: int = 0,
    ) -> GuardCounts:
        """Counts for one batch that took `seconds` to score; `budget_us` 0: no budget."""
        per_record_us = seconds * 1e6 / records if records else 0.0
        slow = records if budget_us > 0 and per_record_us > budget_us else 0
        return cls(identity, records, failed, slow, compared, disagreed)


def label_scale(reference: DriftReference | None) -> float:
    """A regressor's scale: its label's standard deviation in a model's reference profile
    (1 if the profile has none). Rewards and disagreement tolerances are measured in it."""
    label = reference.label if reference is not None else None
    std = label.std if label is not None and not label.categorical else 0.0
    return std if std > 0 else 1.0


def disagreements(
    active: Sequence[str] | np.ndarray, other: Sequence[str] | np.ndarray, tolerance: float
) -> int:
    """How many of the records two models both scored they answer differently, given
    their outputs row by row: another class (classifiers' labels), or values more than
    `tolerance` apart (regressors)."""
    if isinstance(active, np.ndarray) and isinstance(other, np.ndarray):
        return int((np.abs(other - active) > tolerance).sum())
    return sum(1 for a, o in zip(active, other, strict=True) if a != o)
