"""Which variant of a split serves each record: a stable hash of its entity key.

The hash of (data type, entity key) is a point in [0, 1); the variants' weights cut [0, 1)
into consecutive intervals, and a record goes to the variant whose interval holds its point.
The same entity always lands on the same point, so it stays on one variant while the
weights stand, and a replay assigns every record alike. When weights change, only the
entities between the old and new cuts move.

The hash is the same in every process, run and machine (not Python's hash(), which is
salted per process): the keys are hashed together as the rows of one zero-padded byte
matrix, eight bytes at a time with splitmix64's finalizer, from a state seeded by the data
type's BLAKE2b digest and the key's length. Each key's state stops at its own last word,
so its point depends on nothing else in the batch (tests/rollout/test_plans.py pins some).
A split hashes every record it serves: numpy on whole columns costs 0.05 µs a record
where a BLAKE2b call a key cost 0.37 (bench/README.md, "Serving plans"). With the record
ids as the key, their bytes are encoded once, for the hash and the scored records alike
(`RecordColumns.encoded_ids`). Keys longer than `LONG_KEY_BYTES` are hashed by their
BLAKE2b digest: a hostile key costs one BLAKE2b call, not a numpy pass a word.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from dataflows.core.records import EncodedKeys

LONG_KEY_BYTES = 64
"""Longer keys are hashed by their BLAKE2b digest (`_DIGEST_BYTES`)."""
_DIGEST_BYTES = 32
_DIGESTED = 1 << 32  # the length code of a digested key: no real key is this long

_U30, _U27, _U31 = np.uint64(30), np.uint64(27), np.uint64(31)
_U1, _U2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)  # splitmix64's
_TOP_53 = np.uint64(11)  # a float64 holds 53 bits: the point is the hash's top 53


def _mix(state: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer of each uint64, in place (numpy's array arithmetic wraps)."""
    state ^= state >> _U30
    state *= _U1
    state ^= state >> _U27
    state *= _U2
    state ^= state >> _U31
    return state


def _hash_rows(rows: np.ndarray, codes: np.ndarray, lengths: np.ndarray | None) -> np.ndarray:
    """The uint64 hash of each key, from an (n, width) uint8 matrix of the keys, zero-padded
    on the right, and each key's seeded length code. `lengths`: each key's length in bytes,
    when they differ (None: all are `width` long); a key's state stops at its last word, so
    its hash does not depend on the other keys of the batch."""
    n, width = rows.shape
    words = -(-width // 8)
    if width % 8:  # zero-padded to whole words; the length in the seed tells them apart
        padded = np.zeros((n, words * 8), np.uint8)
        padded[:, :width] = rows
        rows = padded
    columns = np.ascontiguousarray(rows).view("<u8")  # little-endian on every machine
    state = _mix(codes.astype(np.uint64))
    own_words = None if lengths is None else (lengths + 7) // 8
    for j in range(words):
        mixed = _mix(state ^ columns[:, j])
        state = mixed if own_words is None else np.where(j < own_words, mixed, state)
    return state


def entity_points(data_type: str, keys: EncodedKeys | Sequence[str]) -> np.ndarray:
    """Each key's point in [0, 1), float64."""
    encoded = keys if isinstance(keys, EncodedKeys) else EncodedKeys.of(keys)
    digest = hashlib.blake2b(data_type.encode(), digest_size=8).digest()
    seed = np.uint64(int.from_bytes(digest, "little"))
    n, width = len(encoded), encoded.width
    if width is not None and width <= LONG_KEY_BYTES:  # the usual batch: one matrix
        codes = np.full(n, seed ^ np.uint64(width), np.uint64)
        hashes = _hash_rows(encoded.matrix(), codes, None)
    else:
        items = encoded.items
        lengths = np.fromiter(map(len, items), np.int64, n)
        long = np.flatnonzero(lengths > LONG_KEY_BYTES).tolist()
        codes = lengths.astype(np.uint64)
        if long:  # hashed by their digest: a hostile key costs one BLAKE2b call
            items = list(items)
            for i in long:
                items[i] = hashlib.blake2b(items[i], digest_size=_DIGEST_BYTES).digest()
            lengths[long] = _DIGEST_BYTES
            codes[long] = _DIGESTED
        # The keys as the rows of one zero-padded matrix: each byte to its row and column.
        widest = int(lengths.max(initial=0))
        flat = np.frombuffer(b"".join(items), np.uint8)
        starts = np.cumsum(lengths) - lengths
        where = np.repeat(np.arange(n) * widest - starts, lengths) + np.arange(len(flat))
        matrix = np.zeros((n, widest), np.uint8)
        matrix.reshape(-1)[where] = flat
        hashes = _hash_rows(matrix, codes ^ seed, lengths)
    return (hashes >> _TOP_53).astype(np.float64) * 2.0**-53


def assign(points: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """The variant index of each point (int64), by the weights' consecutive intervals."""
    cuts = np.cumsum(np.asarray(weights, dtype=np.float64))
    cuts /= cuts[-1]
    index = np.searchsorted(cuts, points, side="right")
    return np.minimum(index, len(cuts) - 1)
