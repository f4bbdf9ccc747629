"""MetaCLIP's balancing maths: entry probabilities, per-pair draws, record scores, t.

Semantics: MetaCLIP's (Xu et al., "Demystifying CLIP Data", ICLR 2024, arXiv:2309.16671;
facebookresearch/MetaCLIP). A record with match set S is kept with
probability ``1 - prod_{i in S} (1 - p_i)``, ``p_i = min(1, t / count_i)``.

How sampling is made reproducible and independent of sharding and workers: every
(record, entry) pair gets a uniform u from a hash of (seed, record key, entry id). The
record is kept iff some matched entry has ``u < p``, which has the reference's
probability (independent draws, one per entry), and since ``u < min(1, t/c)`` iff
``u*c < t``, each record has one score ``r = min_{i in S} u_i * count_i`` and is kept iff
``r < t``. So a smaller t keeps a subset of a larger t's set, the kept size for any t is
known exactly before sampling, and a target size solves t exactly from the scores.
Records with the same key get the same draws.

`PoolBalance` is MetaCLIP 1's balancing over one pool (one t); MetaCLIP 2's per-language
thresholds are `mode_fast.curation.worldwide.WorldwideBalance`, with the same methods, so the curate
job handles both alike. Pure numpy: no files, no processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mode_fast._matcher import hash_keys

__all__ = [
    "DEFAULT_T",
    "METACLIP_POOL_SIZE",
    "PoolBalance",
    "entry_probabilities",
    "expected_kept",
    "head_entries",
    "key_hashes",
    "pair_uniforms",
    "record_scores",
    "solve_t",
    "suggested_t",
    "t_ladder",
    "tail_entries",
]

DEFAULT_T = 20_000.0  # MetaCLIP's t for its 400M set (from ~1.6B pairs)
METACLIP_POOL_SIZE = 1.6e9  # the pool DEFAULT_T was chosen for, to suggest a proportional t


def key_hashes(keys: Sequence[str], seed: int = 0) -> np.ndarray:
    """Stable 64-bit hash of each key (UTF-8), uint64. The one place keys are hashed."""
    return hash_keys(list(keys), seed)


def entry_probabilities(counts: np.ndarray, t: float) -> np.ndarray:
    """p_i = min(1, t / count_i); entries never matched get p = 1."""
    counts = np.asarray(counts, dtype=np.float64)
    return np.where(counts > t, t / np.maximum(counts, 1.0), 1.0)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    # splitmix64's finaliser; uint64 arithmetic wraps, as intended.
    x = x ^ (x >> np.uint64(31))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def pair_uniforms(key_hash: np.ndarray, offsets: np.ndarray, ids: np.ndarray, seed: int) -> np.ndarray:
    """One uniform in [0, 1) per (record, matched entry) pair (53-bit mantissa), a pure
    function of (seed, key hash, entry id): the same wherever the record is processed."""
    per_pair_key = np.repeat(np.asarray(key_hash, dtype=np.uint64), np.diff(offsets))
    with np.errstate(over="ignore"):
        seed_mix = _mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
        x = _mix64(per_pair_key ^ seed_mix ^ ((ids.astype(np.uint64) + np.uint64(1)) * _GOLDEN))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def record_scores(
    key_hash: np.ndarray, offsets: np.ndarray, ids: np.ndarray, counts: np.ndarray, seed: int
) -> np.ndarray:
    """r = min over matched entries of u * count; +inf for records with no match.
    A record is kept at threshold t iff r < t."""
    n = len(offsets) - 1
    scores = np.full(n, np.inf)
    if ids.size == 0:
        return scores
    pair_score = pair_uniforms(key_hash, offsets, ids, seed) * np.asarray(counts)[ids].astype(np.float64)
    matched = np.diff(offsets) > 0
    # reduceat over the starts of non-empty segments only (an empty one would report
    # the next record's first value).
    scores[matched] = np.minimum.reduceat(pair_score, offsets[:-1][matched])
    return scores


def expected_kept(offsets: np.ndarray, ids: np.ndarray, probs: np.ndarray) -> float:
    """Expected number kept: sum over records of 1 - prod_{i in S} (1 - p_i)."""
    if ids.size == 0:
        return 0.0
    with np.errstate(divide="ignore"):
        log_miss = np.log1p(-np.minimum(probs[ids], 1.0))  # -inf where p = 1: kept surely
    matched = np.diff(offsets) > 0
    per_record = np.add.reduceat(log_miss, offsets[:-1][matched])
    return float(np.sum(-np.expm1(per_record)))


def solve_t(scores: np.ndarray, target_size: int) -> float:
    """The t that keeps exactly `target_size` records (kept iff score < t).

    t is the midpoint between the target_size-th and the next smallest score. Scores of
    different keys are continuous and never tie in practice; records with the same key
    and match set (duplicates) tie exactly, and if such a tie straddles the boundary
    all of its records are dropped (t equals their score), so the kept size is below
    the target by at most the tie's size. A target at or above the number of matched
    records keeps them all.
    """
    if target_size <= 0:
        raise ValueError(f"target size must be positive, got {target_size}")
    finite = np.sort(scores[np.isfinite(scores)])
    if target_size >= len(finite):
        return float(np.nextafter(finite[-1], np.inf)) if len(finite) else 1.0
    lo, hi = finite[target_size - 1], finite[target_size]
    return float(lo + (hi - lo) / 2)


def suggested_t(pool_size: int) -> float:
    """DEFAULT_T scaled to a pool of `pool_size` records (MetaCLIP chose it for 1.6B pairs)."""
    return max(1.0, DEFAULT_T * pool_size / METACLIP_POOL_SIZE)


def t_ladder(t: float) -> list[float]:
    """The thresholds the curate table shows around the chosen t (t/4 .. 4t)."""
    return sorted({t / 4, t / 2, t, t * 2, t * 4})


def head_entries(entries: list[str], counts: np.ndarray, n: int) -> list[dict[str, Any]]:
    """The n most matched entries (id, entry, count), most first; ties in id order."""
    order = np.argsort(-counts.astype(np.int64), kind="stable")[:n]
    return [{"id": int(i), "entry": entries[i], "count": int(counts[i])} for i in order if counts[i] > 0]


def tail_entries(entries: list[str], counts: np.ndarray, n: int) -> list[dict[str, Any]]:
    """The n least matched entries among those matched at all, least first."""
    nonzero = np.flatnonzero(counts)
    order = nonzero[np.argsort(counts[nonzero], kind="stable")][:n]
    return [{"id": int(i), "entry": entries[i], "count": int(counts[i])} for i in order]


class PoolBalance:
    """MetaCLIP 1's balancing over one pool: one t for every entry. `t` below is that t;
    `mode_fast.curation.worldwide.WorldwideBalance` has the same methods with t English's."""

    def __init__(self, counts: np.ndarray, scores: np.ndarray) -> None:
        self.counts = counts
        self.scores = scores

    def record_t(self, t: float) -> float | np.ndarray:
        """The threshold each record's score is compared with (here one for all)."""
        return t

    def probabilities(self, t: float) -> np.ndarray:
        return entry_probabilities(self.counts, t)

    def kept(self, t: float) -> int:
        return int((self.scores < self.record_t(t)).sum())

    def solve(self, target_size: int) -> float:
        return solve_t(self.scores, target_size)

    def entries_over_t(self, t: float) -> int:
        """Entries whose count exceeds their t (the ones balancing samples down)."""
        return int((self.counts > t).sum())
