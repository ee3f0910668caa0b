"""What a canary's records show without labels: the guards the rollout judge watches.

Labels can come late or never. A canary is still judged on what every record shows at
once, per batch of the records routed to it: how many it failed to score (the model call
raised, or returned no usable prediction) and, with a time budget per record
(`WAXSERVE_CANARY_MAX_US_PER_RECORD`), how many it scored slower than that. Each guard is a
rate the judge tests sequentially against its maximum (`RateGuard`): evidence above it
rolls the canary back, whatever the labels say; without labels for the data type, evidence
below it on every guard promotes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from dataflows.monitoring.windows import ModelIdentity

GUARDS = ("error rate", "slow rate")
"""The guards, as the judge names them in its decisions."""


@dataclass(frozen=True)
class GuardCounts:
    """Of `records` routed to a canary in one batch, how many it failed to score and how
    many it scored slower than the time budget per record."""

    identity: ModelIdentity
    records: int
    failed: int
    slow: int

    @classmethod
    def of(
        cls, identity: ModelIdentity, records: int, failed: int, seconds: float, budget_us: float
    ) -> GuardCounts:
        """Counts for one batch that took `seconds` to score; `budget_us` 0: no budget."""
        per_record_us = seconds * 1e6 / records if records else 0.0
        slow = records if budget_us > 0 and per_record_us > budget_us else 0
        return cls(identity, records, failed, slow)
