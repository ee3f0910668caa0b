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
    # The salted hasher is copied per key: building a BLAKE2b object with parameters costs
    # more than hashing a short key; the digests are read as one little-endian uint64 array.
    salted = hashlib.blake2b(data_type.encode() + b"\0", digest_size=8)
    digests = []
    for key in keys:
        hasher = salted.copy()
        hasher.update(key.encode())
        digests.append(hasher.digest())
    return np.frombuffer(b"".join(digests), dtype="<u8").astype(np.float64) / _SCALE


def assign(points: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """The variant index of each point (int64), by the weights' consecutive intervals."""
    cuts = np.cumsum(np.asarray(weights, dtype=np.float64))
    cuts /= cuts[-1]
    index = np.searchsorted(cuts, points, side="right")
    return np.minimum(index, len(cuts) - 1)
