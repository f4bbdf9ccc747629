"""MoDE ensemble weights against a loop-by-loop transcription of mode.md."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mode_fast.ensemble import check_class_names, combine_logits, expert_weights


def weights_by_the_letter(emb, centers, coarse, n):
    c_count = len(emb)
    a = math.exp(0.5 - math.sqrt(c_count)) if c_count < 10 else 0.0
    m = 5.0 * math.log10(max(10, c_count - 200))
    s = [0.0] * n
    for e in emb:
        dists = [math.sqrt(sum((x - y) ** 2 for x, y in zip(e, c))) for c in centers]
        j = min(range(len(dists)), key=dists.__getitem__)
        s[coarse[j]] += math.exp((a - dists[j]) * m)
    ex = [math.exp(v / 8.0) for v in s]
    return [v / sum(ex) for v in ex]


def _unit(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("n_classes", [1, 3, 9, 10, 57, 250, 1000])
def test_weights_match_the_formula(n_classes):
    rng = np.random.default_rng(n_classes)
    centers = _unit(rng, 16, 8)
    coarse = rng.integers(0, 4, size=16)
    emb = _unit(rng, n_classes, 8)
    w = expert_weights(emb, centers, coarse, 4)
    np.testing.assert_allclose(w, weights_by_the_letter(emb.tolist(), centers.tolist(), coarse.tolist(), 4), rtol=1e-10)
    assert w.sum() == pytest.approx(1.0)


def test_classes_near_one_expert_favour_it():
    rng = np.random.default_rng(0)
    centers = _unit(rng, 8, 16)
    coarse = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    # Few classes (C < 10) sitting on expert 2's centers.
    emb = centers[[4, 5, 4]] + 0.01 * rng.normal(size=(3, 16))
    w = expert_weights(emb, centers, coarse, 4)
    assert w.argmax() == 2 and w[2] > 0.3
    # A group no class falls in has s_k = 0 -> the smallest weight, but not zero.
    assert w[0] == pytest.approx(w[1]) and w[0] > 0


def test_combine_logits():
    logits = [np.ones((2, 3)), 2 * np.ones((2, 3))]
    np.testing.assert_allclose(combine_logits(logits, np.array([0.25, 0.75])), 1.75 * np.ones((2, 3)))
    with pytest.raises(ValueError, match="2 experts' logits but 3 weights"):
        combine_logits(logits, np.ones(3) / 3)


def test_bad_input_named():
    with pytest.raises(ValueError, match="appears twice"):
        check_class_names(["cat", "dog", "cat"])
    with pytest.raises(ValueError, match="index 1 is empty"):
        check_class_names(["cat", "  "])
    with pytest.raises(ValueError, match="empty"):
        check_class_names([])
    centers = np.eye(4)
    with pytest.raises(ValueError, match="does not match 2 experts"):
        expert_weights(np.eye(4)[:2], centers, np.array([0, 1, 2, 3]), 2)
    with pytest.raises(ValueError, match="one expert per fine center"):
        expert_weights(np.eye(4)[:2], centers, np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="NaN"):
        expert_weights(np.full((1, 4), np.nan), centers, np.array([0, 1, 0, 1]), 2)
