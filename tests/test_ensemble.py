"""MoDE ensemble weights against a loop-by-loop transcription of mode.md."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mode_fast.evaluation.ensemble import (
    ENSEMBLE_INPUTS,
    check_class_names,
    combine_logits,
    expert_weights,
    template_class_embeddings,
)


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


# ------------------------------------------------------------------ issue 16: MoDE's inputs
def test_template_class_embeddings_worked_example():
    """mode.md: each class name goes through the task's templates, the (unit) template
    embeddings are averaged, then normalised. 2-D worked example by hand:
    "a photo of cat" -> (1, 0), "a sketch of cat" -> (0, 1): mean (0.5, 0.5), unit (1/sqrt2, 1/sqrt2);
    "a photo of dog" -> (3, 4) (unit (0.6, 0.8)), "a sketch of dog" -> (0, -2) (unit (0, -1)):
    mean (0.3, -0.1), unit (3, -1)/sqrt10."""
    table = {
        "a photo of cat": [1.0, 0.0],
        "a sketch of cat": [0.0, 1.0],
        "a photo of dog": [3.0, 4.0],
        "a sketch of dog": [0.0, -2.0],
        "cat": [1.0, 0.0],
        "dog": [0.0, 5.0],
    }
    embed = lambda texts: np.array([table[t] for t in texts])  # noqa: E731
    got = template_class_embeddings(embed, ["cat", "dog"], ["a photo of {}", "a sketch of {}"])
    s2, s10 = math.sqrt(2), math.sqrt(10)
    np.testing.assert_allclose(got, [[1 / s2, 1 / s2], [3 / s10, -1 / s10]], rtol=1e-12)
    # no templates: the bare names, normalised
    np.testing.assert_allclose(template_class_embeddings(embed, ["cat", "dog"]), [[1, 0], [0, 1]])
    with pytest.raises(ValueError, match="cannot be normalised"):
        template_class_embeddings(lambda t: np.zeros((len(t), 2)), ["cat"], ["{}"])


def test_template_averaging_moves_the_weights():
    """The worked example above decides the expert: bare "dog" sits on expert 1's center
    (0, 1), its template average (3, -1)/sqrt10 nearest expert 0's center (1, 0)."""
    table = {"a photo of dog": [3.0, 4.0], "a sketch of dog": [0.0, -2.0], "dog": [0.0, 5.0]}
    embed = lambda texts: np.array([table[t] for t in texts])  # noqa: E731
    centers = np.array([[1.0, 0.0], [0.0, 1.0]])
    bare = expert_weights(template_class_embeddings(embed, ["dog"]), centers, np.array([0, 1]), 2)
    avg = expert_weights(
        template_class_embeddings(embed, ["dog"], ["a photo of {}", "a sketch of {}"]), centers, np.array([0, 1]), 2
    )
    assert bare.argmax() == 1 and avg.argmax() == 0
    # by the letter: C = 1, a = exp(0.5 - 1), m = 5; d = |(3, -1)/sqrt10 - (1, 0)|
    d = math.dist([3 / math.sqrt(10), -1 / math.sqrt(10)], [1, 0])
    s0 = math.exp((math.exp(-0.5) - d) * 5.0)
    np.testing.assert_allclose(avg, [math.exp(s0 / 8) / (math.exp(s0 / 8) + 1), 1 / (math.exp(s0 / 8) + 1)])


def test_ensembles_combine_plain_cosines_by_default():
    """mode.md: the weighted zero-shot outputs are plain cosine similarities. Worked example:
    expert 0 (scale 100) cosines [0.5, 0.4], expert 1 (scale 10) cosines [0.1, 0.3], equal weights:
    cosine mean [0.3, 0.35] -> class 1; scaled mean [25.5, 21.5] -> class 0."""
    from mode_fast.evaluation.scoring import ensemble_inputs
    from mode_fast.evaluation.tasks import EvalError

    scales = [100.0, 10.0]  # each expert's logit scale
    cos = [np.array([[0.5, 0.4]]), np.array([[0.1, 0.3]])]
    w = np.array([0.5, 0.5])
    plain = combine_logits(ensemble_inputs(scales, cos, "cosine"), w)
    scaled = combine_logits(ensemble_inputs(scales, cos, "scaled"), w)
    np.testing.assert_allclose(plain, [[0.3, 0.35]])
    np.testing.assert_allclose(scaled, [[25.5, 21.5]], rtol=1e-6)
    assert plain.argmax() == 1 and scaled.argmax() == 0
    assert ENSEMBLE_INPUTS == ("cosine", "scaled")
    with pytest.raises(EvalError, match="known are cosine, scaled"):
        ensemble_inputs(scales, cos, "logits")
