"""What the serving logic tells the rest of the process: events and the bus that carries them.

The registry, the shard scorer and the monitor publish events; side concerns (Prometheus
metrics, the queryable state) subscribe. The domain code never calls them, so it is
testable without them, and a new concern (lineage, an audit log) subscribes without a
change to the core. Handlers run synchronously on the publishing worker: keep them cheap.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dataflows.monitoring.quality import LabelCounts
from dataflows.monitoring.windows import AgreementAccumulator, ModelIdentity, StatsAccumulator
from protos import waxserve_pb2 as pb

if TYPE_CHECKING:
    from dataflows.monitoring.feedback import JoinedPairs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Quality:
    """Online quality over the labelled records of one model call."""

    labelled: int
    squared_error: float  # over the labelled records whose label and prediction are numbers
    squared_count: int
    correct: int | None  # classifiers; None for regressors

    def add_to(self, stats: StatsAccumulator) -> None:
        """Count these labelled records in a stats accumulator."""
        stats.add_labelled(self.labelled, self.squared_error, self.correct, self.squared_count)


@dataclass(frozen=True)
class RecordsReceived:
    """A shard decoded records of a data type (before scoring)."""

    data_type: str
    count: int


@dataclass(frozen=True)
class BatchScored:
    """One model call: n records scored (valid predictions) out of `calls` rows sent."""

    identity: ModelIdentity
    scored: int
    rows: int
    seconds: float
    lags_s: np.ndarray  # per scored record: scoring time - event time
    quality: Quality | None


@dataclass(frozen=True)
class ModelServing:
    """A shard now serves `identity` instead of `previous`."""

    identity: ModelIdentity
    previous: ModelIdentity | None
    # Where the model came from: its descriptor's control position, signer, contract
    # version; and what the quality gate found (the queryable state shows both).
    lineage: pb.Lineage | None = None
    gate: str = ""


@dataclass(frozen=True)
class ModelStopped:
    """A shard no longer serves `identity` (its plan left it out), and serves no model
    instead of it."""

    identity: ModelIdentity


@dataclass(frozen=True)
class ModelInstalled:
    """The registry installed (or, after a resume, restored) a model for its data type."""

    identity: ModelIdentity
    restored: bool = False


@dataclass(frozen=True)
class ControlRejected:
    """The registry rejected a model descriptor or a contract."""

    data_type: str
    stage: str  # "model" or "contract"
    reason: str


@dataclass(frozen=True)
class ShadowCompared:
    """A shard compared a shadow model's outputs with the active model's on one batch."""

    active: ModelIdentity
    shadow: ModelIdentity
    agreement: AgreementAccumulator


@dataclass(frozen=True)
class PlanChanged:
    """The registry put a new serving plan in effect for its data type."""

    data_type: str
    plan: str  # the plan in a line (ServingPlan.describe)
    number: int
    action: str  # the command's action in lower case; "install" for a new active model
    actor: str
    reason: str = ""
    at_ms: int = 0

    @property
    def automatic(self) -> bool:
        """Whether the rollout judge decided it (not a person)."""
        return self.actor == JUDGE_ACTOR


JUDGE_ACTOR = "waxserve rollout judge"
"""The actor of the plan commands the rollout judge sends (dataflows/rollout/judge.py)."""


@dataclass(frozen=True)
class ContractInstalled:
    """The registry installed a data contract."""

    data_type: str
    version: int


@dataclass(frozen=True)
class DeadLettered:
    """An input went to the dead-letter topic."""

    data_type: str
    stage: str
    reason: str


@dataclass(frozen=True)
class DriftClosed:
    """A drift window closed, merged over the cluster."""

    message: pb.DriftMetrics


@dataclass(frozen=True)
class LabelsJoined:
    """A feedback key joined labels to predictions: the pairs, per model, and what became
    of every label it counted (matched, unknown, expired, evicted, duplicate)."""

    data_type: str
    pairs: tuple[JoinedPairs, ...]
    counts: LabelCounts


@dataclass(frozen=True)
class FeedbackHeld:
    """What a feedback key holds now: predictions waiting for their labels, and bytes."""

    data_type: str
    key: str  # "<data_type>#<n>"
    predictions: int
    nbytes: int


Event = (
    RecordsReceived
    | BatchScored
    | ModelServing
    | ModelStopped
    | ModelInstalled
    | ControlRejected
    | ContractInstalled
    | PlanChanged
    | ShadowCompared
    | DeadLettered
    | DriftClosed
    | LabelsJoined
    | FeedbackHeld
)
Handler = Callable[[Event], None]


class EventBus:
    """Delivers each published event to every subscriber, in subscription order.

    A failing subscriber is logged and skipped: observability must not stop scoring.
    """

    def __init__(self, *handlers: Handler) -> None:
        self._handlers: list[Handler] = list(handlers)
        self._lock = threading.Lock()

    def subscribe(self, handler: Handler) -> None:
        """Add a subscriber."""
        with self._lock:
            self._handlers.append(handler)

    def publish(self, event: Event) -> None:
        """Hand the event to every subscriber."""
        for handler in self._handlers:
            try:
                handler(event)
            except Exception:
                log.exception("event handler %r failed on %s", handler, type(event).__name__)


NO_EVENTS = EventBus()
"""A bus nobody listens to: the default of the domain classes (tests, tools)."""
