"""Train/test splits that do not depend on how rows were written: a stable hash of the row (or
document) index and the split seed, so a resumed writer draws exactly the same split."""

from __future__ import annotations

import numpy as np


def split_rows(n: int, test_fraction: float, seed: int, offset: int = 0) -> np.ndarray:
    """Per-row split for i.i.d. data: row i is test with probability `test_fraction`, decided by
    a hash of (seed, i) so a resumed writer draws exactly the same split."""
    idx = np.arange(offset, offset + n, dtype=np.uint64)
    return (unit_hash(idx, seed) < test_fraction).astype("u1")


def split_documents(doc_ids: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Per-document split: the same rule on document indices (all tokens of a document together)."""
    return (unit_hash(np.asarray(doc_ids, dtype=np.uint64), seed) < test_fraction).astype("u1")


def unit_hash(idx: np.ndarray, seed: int) -> np.ndarray:
    """A deterministic uniform [0, 1) value per index (splitmix64 of index and seed)."""
    with np.errstate(over="ignore"):
        z = idx + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % (1 << 64))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)
