"""MoDE's task-adaptive ensemble of data experts (Ma et al., "MoDE: CLIP Data Experts via
Clustering", CVPR 2024, arXiv:2404.16030).

For a task with C class names, each class name is embedded with the clustering text
encoder through the task's prompt templates (the template embeddings averaged, then
normalised: ``template_class_embeddings``) and falls to its nearest fine center, hence to a
coarse group (an expert).
Experts whose clusters are close to the task's classes get more weight:

    d_c = min_j ||e_c - center_j||,   g_c = coarse_of[argmin_j ...]
    a   = exp(0.5 - sqrt(C)) if C < 10 else 0
    m   = 5 * log10(max(10, C - 200))
    s_k = sum_{c: g_c = k} exp((a - d_c) * m)      (0 for a group no class falls in)
    w   = softmax(s / 8)
    ensemble logits = sum_k w_k * logits_k

where logits_k are expert k's plain cosine similarities (image . class text, both unit), as
MoDE's public code combines them (mode.md, "What MoDE's public code does"); multiplying each
by the expert's own logit scale first ("scaled", ENSEMBLE_INPUTS) is kept as an option and
differs whenever the experts' scales differ.

Library use: ``template_class_embeddings(embed, classes, templates)``,
``expert_weights(class_embeddings, fine_centers, coarse_of_fine, n_experts)`` and
``combine_logits(expert_logits, weights)``; ``check_class_names`` validates a class list.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

SOFTMAX_TEMPERATURE = 8.0
# What the ensembles combine: "cosine" (MoDE's) or "scaled" (cosine x each expert's logit scale).
ENSEMBLE_INPUTS = ("cosine", "scaled")


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    if not (np.isfinite(norms).all() and (norms > 0).all()):
        raise ValueError("an embedding is zero or not finite: it cannot be normalised")
    return x / norms


def template_class_embeddings(
    embed: Callable[[list[str]], np.ndarray], classes: Sequence[str], templates: Sequence[str] | None = None
) -> np.ndarray:
    """[C, D] float64 ensemble-weight inputs, as MoDE makes them (mode.md): each class name
    through every template ("{}" = the name), each embedding normalised, the C x T embeddings
    averaged per class, then normalised. No templates (None or []): the bare names, normalised."""
    names = list(classes)
    temps = list(templates or ["{}"])
    texts = [t.format(c) for c in names for t in temps]
    emb = _unit(np.asarray(embed(texts), dtype=np.float64))
    if emb.shape[0] != len(texts):
        raise ValueError(f"the encoder returned {emb.shape[0]} embeddings for {len(texts)} texts")
    return _unit(emb.reshape(len(names), len(temps), -1).mean(1))


def check_class_names(class_names: Sequence[str]) -> list[str]:
    """A class list must be non-empty strings without duplicates; names the offender."""
    names = list(class_names)
    if not names:
        raise ValueError("class list is empty")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"class name at index {i} must be str, not {type(name).__name__}")
        if not name.strip():
            raise ValueError(f"class name at index {i} is empty")
        if name in seen:
            raise ValueError(f"class name {name!r} appears twice (indices {seen[name]} and {i})")
        seen[name] = i
    return names


def expert_weights(
    class_embeddings: np.ndarray,
    fine_centers: np.ndarray,
    coarse_of_fine: np.ndarray,
    n_experts: int,
) -> np.ndarray:
    """Weights of the n experts for one task (float64, sums to 1).

    class_embeddings [C, D] and fine_centers [K, D] are the L2-normalised text-encoder
    embeddings used for clustering; coarse_of_fine [K] maps each fine center to its expert.
    """
    e = np.asarray(class_embeddings, dtype=np.float64)
    centers = np.asarray(fine_centers, dtype=np.float64)
    coarse = np.asarray(coarse_of_fine)
    if e.ndim != 2 or centers.ndim != 2 or e.shape[1] != centers.shape[1]:
        raise ValueError(f"class embeddings {e.shape} and fine centers {centers.shape} must be [C, D] and [K, D]")
    if coarse.shape != (centers.shape[0],):
        raise ValueError(
            f"coarse_of_fine has shape {coarse.shape}, expected ({centers.shape[0]},): one expert per fine center"
        )
    if e.shape[0] == 0:
        raise ValueError("no class embeddings")
    if coarse.size and (coarse.min() < 0 or coarse.max() >= n_experts):
        raise ValueError(
            f"coarse_of_fine has expert ids outside [0, {n_experts}): the cluster file does not match {n_experts} experts"
        )
    if not (np.isfinite(e).all() and np.isfinite(centers).all()):
        raise ValueError("class embeddings or fine centers contain NaN or inf")

    # ||e - c||^2 = |e|^2 - 2 e.c + |c|^2, clipped at 0 against rounding.
    sq = (e * e).sum(1)[:, None] - 2.0 * e @ centers.T + (centers * centers).sum(1)[None, :]
    nearest = sq.argmin(1)
    d = np.sqrt(np.maximum(sq[np.arange(len(e)), nearest], 0.0))
    group = coarse[nearest]

    n_classes = len(e)
    a = math.exp(0.5 - math.sqrt(n_classes)) if n_classes < 10 else 0.0
    m = 5.0 * math.log10(max(10, n_classes - 200))
    s = np.zeros(n_experts, dtype=np.float64)
    np.add.at(s, group, np.exp((a - d) * m))
    z = s / SOFTMAX_TEMPERATURE
    w = np.exp(z - z.max())
    return w / w.sum()


def combine_logits(expert_logits: Sequence[np.ndarray] | np.ndarray, weights: np.ndarray):
    """sum_k w_k * logits_k; works for numpy arrays and torch tensors alike."""
    if len(expert_logits) != len(weights):
        raise ValueError(f"{len(expert_logits)} experts' logits but {len(weights)} weights")
    total = None
    for logits, w in zip(expert_logits, weights):
        term = logits * float(w)
        total = term if total is None else total + term
    return total
