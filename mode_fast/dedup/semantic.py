"""The semantic stage (SemDeDup): the keep order inside a cluster, the within-cluster maxima,
and the chains from a removed item to the kept item it duplicates.

Keep order (facebookresearch/SemDeDup, clustering/sort_clusters.py and semdedup.py): a
cluster's items, in pool order, are sorted by their cosine distance to the cluster's
center, 1 - cos(x, c), in descending order by a stable sort (Python's ``sorted(...,
reverse=True)``: ties keep pool order), so the item farthest from the center comes first
and is the one kept of a group (``hard``); ``easy`` is that list reversed; ``random`` a
random permutation of it. On purpose mode-fast draws ``random`` from a generator seeded by
(--seed, cluster id) rather than one module-wide generator advanced cluster by cluster, so
a cluster's order does not depend on which clusters ran before it in the same process
(the executor may run clusters in any order and any process).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

ORDERS = ("hard", "easy", "random")


def keep_order(x: torch.Tensor, center: torch.Tensor, order: str, seed: int, cluster: int) -> np.ndarray:
    """Positions of the rows of x [n, D] (one cluster's items, in pool order) in keep order
    (module docstring). The distance is computed as the public code computes it
    (torch's cosine similarity in float32, then 1 - it)."""
    dist = (1 - torch.nn.functional.cosine_similarity(x.float(), center.float()[None, :], dim=1)).cpu().numpy()
    hard = np.argsort(-dist, kind="stable")  # descending, ties in pool order, as sorted(reverse=True)
    if order == "hard":
        return hard
    if order == "easy":
        return hard[::-1].copy()
    if order == "random":
        return hard[np.random.default_rng([int(seed), int(cluster)]).permutation(len(hard))]
    raise ValueError(f"unknown order {order!r}: use one of {', '.join(ORDERS)}")


def cluster_maxima(
    x: torch.Tensor, center: torch.Tensor, order: str, seed: int, cluster: int, backend: str = "auto"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions in keep order, best, arg) for one cluster: best[j] is the largest cosine
    similarity of the j-th item in keep order to any item before it, arg[j] that item's
    position in keep order (-1 for the first). Rows of x are unit vectors."""
    from mode_fast.kernels.semdedup import max_earlier_similarity

    pos = keep_order(x, center, order, seed, cluster)
    if len(pos) == 0:
        return pos, np.zeros(0, np.float32), np.zeros(0, np.int64)
    best, arg = max_earlier_similarity(x[torch.from_numpy(pos).to(x.device)].contiguous(), backend=backend)
    return pos, best.cpu().numpy().astype(np.float32), arg.cpu().numpy().astype(np.int64)


def cluster_task(task: dict[str, Any]) -> dict[str, Any]:
    """Executor task: one cluster's maxima, written to task["output"] (.npz: items = the
    global candidate indices in keep order, best, arg = the global candidate index of the
    match, -1 for the first). Reads the candidates' embeddings and the grouped index
    (task["members"][start:end]: the cluster's candidates in pool order) memory-mapped."""
    from mode_fast.core import files

    emb = np.load(task["embeddings"], mmap_mode="r")
    centers = np.load(task["centers"], mmap_mode="r")
    c = int(task["cluster"])
    # this cluster's candidates in pool order: a slice of the grouped index (no O(N) scan per cluster)
    members = np.asarray(np.load(task["members"], mmap_mode="r")[task["start"] : task["end"]])
    x = torch.from_numpy(np.ascontiguousarray(emb[members], dtype=np.float32)).to(task["device"])
    center = torch.from_numpy(np.array(centers[c], dtype=np.float32)).to(task["device"])
    pos, best, arg = cluster_maxima(x, center, task["order"], task["seed"], c)
    items = members[pos]
    match = np.where(arg >= 0, items[np.maximum(arg, 0)], -1)
    files.save_npz(task["output"], items=items.astype(np.int64), best=best, arg=match.astype(np.int64))
    return {"cluster": c, "records": len(members)}


def chain_ends(parent: np.ndarray) -> np.ndarray:
    """For each item, the kept item its chain of matches ends at: parent[i] is the item i
    duplicates, or -1 when i is kept; the result is i itself for a kept item. A chain
    cannot loop (a match comes before its item in the stage's order), so it ends."""
    step = np.where(parent >= 0, parent, np.arange(len(parent), dtype=np.int64))
    while True:  # pointer jumping: kept items are fixed points, each pass halves the chains
        nxt = step[step]
        if np.array_equal(nxt, step):
            return step
        step = nxt
