"""Which variant of a split serves each record: a stable hash of its entity key.

The hash of (data type, entity key) is a point in [0, 1); the variants' weights cut [0, 1)
into consecutive intervals, and a record goes to the variant whose interval holds its point.
The same entity always lands on the same point, so it stays on one variant while the
weights stand, and a replay assigns every record alike. When weights change, only the
entities between the old and new cuts move. BLAKE2b, not Python's hash(): the same in
every process and every run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

_SCALE = float(1 << 64)


def entity_points(data_type: str, keys: Sequence[str]) -> np.ndarray:
    """Each key's point in [0, 1), float64."""
    salt = data_type.encode() + b"\0"
    blake2b = hashlib.blake2b
    out = np.fromiter(
        (
            int.from_bytes(blake2b(salt + key.encode(), digest_size=8).digest(), "little")
            for key in keys
        ),
        dtype=np.float64,
        count=len(keys),
    )
    return out / _SCALE


def assign(points: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """The variant index of each point (int64), by the weights' consecutive intervals."""
    cuts = np.cumsum(np.asarray(weights, dtype=np.float64))
    cuts /= cuts[-1]
    index = np.searchsorted(cuts, points, side="right")
    return np.minimum(index, len(cuts) - 1)
