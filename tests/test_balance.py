"""The two balancings behind one interface (mode_fast.curation.balance.PoolBalance, MetaCLIP 1, and
mode_fast.curation.worldwide.WorldwideBalance, MetaCLIP 2): with English the only language, MetaCLIP 2's
rules are MetaCLIP 1's, so the two must agree on every method."""

from __future__ import annotations

import numpy as np
import pytest

from mode_fast.curation.balance import PoolBalance, entry_probabilities, key_hashes, record_scores, t_ladder
from mode_fast.curation.worldwide import LanguageMatchers, WorldwideBalance


def _pool(seed: int, n_records: int = 400, n_entries: int = 50):
    rng = np.random.default_rng(seed)
    per_record = rng.integers(0, 4, n_records)  # some records match nothing
    offsets = np.concatenate([[0], np.cumsum(per_record)]).astype(np.int64)
    # a skewed entry distribution: a head of frequent entries and a long tail
    ids = np.minimum(rng.zipf(1.5, int(offsets[-1])) - 1, n_entries - 1).astype(np.int32)
    counts = np.bincount(ids, minlength=n_entries).astype(np.uint64)
    scores = record_scores(key_hashes([f"k{i}" for i in range(n_records)]), offsets, ids, counts, seed)
    return counts, scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_english_only_worldwide_balance_is_metaclip1(seed):
    counts, scores = _pool(seed)
    one = PoolBalance(counts, scores)
    layout = LanguageMatchers.layout({"en": [f"e{i}" for i in range(len(counts))]})
    two = WorldwideBalance(layout, counts, scores, np.array(["en"] * len(scores)))
    for t in [*t_ladder(7.0), float(counts.max()) + 1]:
        assert np.array_equal(one.probabilities(t), two.probabilities(t))
        assert np.array_equal(one.probabilities(t), entry_probabilities(counts, t))
        assert np.array_equal(scores < one.record_t(t), scores < two.record_t(t))
        assert one.kept(t) == two.kept(t) == int((scores < t).sum())
        assert one.entries_over_t(t) == two.entries_over_t(t) == int((counts > t).sum())
    matched = int(np.isfinite(scores).sum())
    for target in (1, matched // 3, matched - 1):
        assert one.kept(one.solve(target)) == target
        assert two.kept(two.solve(target)) == target
