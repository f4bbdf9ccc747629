"""`mode-fast cluster SHARDS... --out DIR`: MoDE's two-level clustering of a pool's captions.

Job module: argument parsing, a validated frozen config (`ClusterJob`) and calls into the
library: caption embeddings (`mode_fast.clustering.embedders`), k-means (`mode_fast.clustering.kmeans`), the two
levels (`mode_fast.clustering.experts`) and the output folder's layout and writers
(`mode_fast.clustering.folder`), with shards spread over `mode_fast.core.executor`. See `run` for the
outputs; `run_cluster_job(ClusterJob(...))` is the same job from Python.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mode_fast.clustering import folder as cf
from mode_fast.clustering.embedders import cache_files, embed_shard, embedder_spec, make_embedder, shard_id
from mode_fast.clustering.experts import TwoLevel, fit_two_level
from mode_fast.core import files
from mode_fast.core.errors import ConfigError, InputError
from mode_fast.core.executor import add_executor_arguments, make_executor, run_with_progress
from mode_fast.core.runs import MANIFEST, RunState, fingerprint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterJob:
    """Everything `mode-fast cluster` needs, checked on construction; `embedder` is a spec
    ('minilm', 'hash64', 'package.module:callable', or a spec dict) or an embedder object
    (callable texts -> float32 [n, D], with .name, .dim and, to be rebuilt by eval, .spec)."""

    shards: list[Path]
    out: Path
    fine_k: int = 1024
    n_experts: int = 4
    sample: int = 65536
    workers: int = 1
    executor: str = "local"  # or "ray" (mode_fast.core.executor): same outputs either way
    ray_address: str | None = None
    seed: int = 1234
    caption_key: str = "caption"
    key_field: str | None = None
    embedder: Any = "minilm"
    device: str = "cpu"
    batch_size: int = 256
    niter: int = 25
    balanced: bool = True
    balanced_coarse: bool = True  # MoDE's coarse default (mode.md); --no-balanced-coarse
    progress: bool = True
    overwrite: bool = False  # start over: remove this job's earlier outputs in `out`

    def __post_init__(self) -> None:
        for flag, value, low in (("--fine-k", self.fine_k, 1), ("--experts", self.n_experts, 1),
                                 ("--sample", self.sample, 1), ("--batch-size", self.batch_size, 1),
                                 ("--niter", self.niter, 1), ("--workers", self.workers, 0)):  # fmt: skip
            if value < low:
                raise ConfigError(f"{flag} must be >= {low}, got {value}")
        if self.n_experts > self.fine_k:
            raise ConfigError(f"--experts {self.n_experts} is more than --fine-k {self.fine_k} fine centers")
        if self.sample < self.fine_k:
            raise ConfigError(
                f"--sample {self.sample} is smaller than --fine-k {self.fine_k}: "
                "k-means needs at least one embedding per fine center"
            )
        if not self.shards:
            raise InputError("no shards given")


# per-process caches for pool workers: the embedder and the centers load once per process
_WORKER: dict[str, Any] = {}


def _worker_init(threads: int) -> None:
    torch.set_num_threads(max(1, threads))


def _get_embedder(spec: Any, device: str, batch_size: int) -> Any:
    if not isinstance(spec, (str, dict)):
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
    se = embed_shard(task["shard"], emb, task["cache_dir"], task["caption_key"], task["key_field"])
    ok = _finite_rows(se.embeddings)
    return se.embeddings[ok], se.skipped


def _assign_task(task: dict[str, Any]) -> dict[str, Any]:
    """Pool task: embed (cached) and assign one shard, write its parquet atomically."""
    emb = _get_embedder(task["embedder"], task["device"], task["batch_size"])
    # Keyed by the file's fingerprint too: a refit in the same process (--overwrite, a
    # changed shard) rewrites the same path, and must not be served the old centers.
    key = f"centers:{json.dumps(fingerprint(task['centers']))}"
    if key not in _WORKER:
        _WORKER[key] = cf.ClusterFolder(task["centers"]).centers()
    model: TwoLevel = _WORKER[key]
    se = embed_shard(task["shard"], emb, task["cache_dir"], task["caption_key"], task["key_field"])
    skipped = dict(se.skipped)
    ok = _finite_rows(se.embeddings)
    if not ok.all():
        skipped["nonfinite_embedding"] = skipped.get("nonfinite_embedding", 0) + int((~ok).sum())
    keys, x = se.keys[ok], se.embeddings[ok]
    if len(x):
        if x.shape[1] != model.fine_centroids.shape[1]:
            raise InputError(
                f"{task['shard']}: embeddings have D={x.shape[1]} but the centers D="
                f"{model.fine_centroids.shape[1]} (another embedder?)"
            )
        fine, expert, sqdist = model.assign(torch.from_numpy(x).to(task["device"]))
    else:
        fine = expert = np.zeros(0, np.int64)
        sqdist = np.zeros(0, np.float32)
    cf.write_assignment_table(task["output"], keys, fine, expert, sqdist, task["shard"], skipped)
    return {"shard": str(task["shard"]), "assigned": len(keys), "records": len(se.keys), "skipped": skipped}


def _fit_on_sample(
    job: ClusterJob,
    runner: Any,
    tasks: list[dict[str, Any]],
    init: Any,
    embedded: Callable[[str], None] = lambda shard: None,
) -> TwoLevel:
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
        raise InputError(
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
        seed=job.seed, niter=job.niter, balanced=job.balanced, balanced_coarse=job.balanced_coarse,
        max_points_per_centroid=max(256, math.ceil(len(x) / job.fine_k)),
    )  # fmt: skip
    return model


def _embedder_name(job: ClusterJob) -> str:
    """The embedder's name; a spec it cannot be rebuilt from, or a missing package (MiniLM's),
    stops here, before any output."""
    if isinstance(job.embedder, (str, dict)):
        return make_embedder(job.embedder).name  # cheap: models load lazily
    embedder_spec(job.embedder)  # an object's .spec is checked now, not after the fit
    return str(job.embedder.name)


def _tasks(job: ClusterJob, folder: cf.ClusterFolder) -> list[dict[str, Any]]:
    """One task per shard (pickled to the workers), and shards.json."""
    ids = [shard_id(s) for s in job.shards]
    if len(set(ids)) != len(ids):
        raise InputError("the same shard is listed twice")
    (folder.root / cf.ASSIGNMENTS).mkdir(parents=True, exist_ok=True)
    files.write_text(folder.root / cf.SHARDS, json.dumps(dict(zip(ids, map(str, job.shards))), indent=1))
    common = {
        "embedder": job.embedder, "device": job.device, "batch_size": job.batch_size,
        "cache_dir": str(folder.root / cf.EMBEDDINGS), "caption_key": job.caption_key, "key_field": job.key_field,
        "centers": str(folder.centers_path),
    }  # fmt: skip
    return [dict(common, shard=str(s), output=str(folder.assignment_path(s))) for s in job.shards]


def _centers(
    job: ClusterJob,
    folder: cf.ClusterFolder,
    runner: Any,
    tasks: list[dict[str, Any]],
    init: Any,
    want: dict[str, Any],
    state: RunState,
    embedded: Callable[[str], None],
) -> TwoLevel:
    """The centers run.json vouches for (same inputs and arguments), else a new fit."""
    if state.is_done("centers"):
        logger.warning("cluster: resuming with the existing %s", folder.centers_path)
        return folder.centers()
    state.where = "fit (sampling embeddings)"
    model = _fit_on_sample(job, runner, tasks, init, embedded)
    model.config.update(want)
    model.save(folder.centers_path)
    state.mark_done("centers", [folder.centers_path])
    return model


# This job's own files in --out (what --overwrite removes).
CLUSTER_OUTPUTS = (cf.CENTERS, cf.EMBEDDER, cf.ASSIGNMENTS, cf.EMBEDDINGS, cf.SHARDS, cf.SIZES, cf.PLOT)


def run_cluster_job(job: ClusterJob) -> dict[str, Any]:
    """Fit on a sample (or reuse the centers run.json vouches for), assign every shard
    (skipping those run.json records as done), then write cluster_sizes.json and
    clusters.png. Returns the sizes. Reruns follow the shared rule (mode_fast.core.runs): a
    changed, added or removed shard invalidates its embeddings, the centers (fitted on a
    sample of the whole pool) and every assignment; any other changed argument stops with
    one line naming it."""
    ids = [shard_id(s) for s in job.shards]
    if len(set(ids)) != len(ids):
        raise InputError("the same shard is listed twice")
    ename = _embedder_name(job)
    args = {
        "--fine-k": job.fine_k,
        "--experts": job.n_experts,
        "--sample": job.sample,
        "--seed": job.seed,
        "--niter": job.niter,
        "--balanced": job.balanced,
        "--balanced-coarse": job.balanced_coarse,
        "--embedder": ename,
        "--caption-key": job.caption_key,
        "--key-field": job.key_field,
    }

    def recompute(field: str) -> list[str] | None:
        return ["centers", "assign:*", f"embed:{field[6:]}"] if field.startswith("input ") else None

    out = Path(job.out)
    with (
        RunState.open(
            out,
            "cluster",
            inputs={i: fingerprint(s) for s, i in zip(job.shards, ids)},
            args=args,
            recompute=recompute,
            overwrite=job.overwrite,
            owned=CLUSTER_OUTPUTS,
            log=logger.warning,
        ) as state,
        state.interrupts(),
    ):
        if state.finished:
            logger.warning("cluster: %s already holds this clustering (same inputs and arguments): nothing to do", out)
            return json.loads((out / cf.SIZES).read_text())
        if not state.resumed and (out / cf.CENTERS).exists():
            raise ConfigError(
                f"{out} holds a cluster run without {MANIFEST} (an older mode-fast): "
                "rerun with --overwrite to start over, or use another --out"
            )
        return _run_cluster_job(job, ids, ename, state)


def _run_cluster_job(job: ClusterJob, ids: list[str], ename: str, state: RunState) -> dict[str, Any]:
    folder = cf.ClusterFolder(job.out)
    tasks = _tasks(job, folder)
    cache_dir = folder.root / cf.EMBEDDINGS
    sid_of = {str(s): i for s, i in zip(job.shards, ids)}
    for s, i in zip(
        job.shards, ids
    ):  # a cache run.json does not vouch for (killed mid-shard, a changed shard) is redone
        if not state.is_done(f"embed:{i}"):
            for f in cache_files(cache_dir, s, ename):
                f.unlink(missing_ok=True)

    def embedded(shard: str) -> None:
        state.mark_done(f"embed:{sid_of[shard]}", cache_files(cache_dir, shard, ename))

    want = {"fine_k": job.fine_k, "n_experts": job.n_experts, "seed": job.seed, "embedder": ename}
    runner = make_executor(job.executor, job.workers, job.ray_address)
    # Every worker process pins torch to the same share of the cores, whatever the
    # executor, so the float sums (and so the labels and distances written) are the same.
    # A local run in this process leaves the caller's torch settings alone.
    threads = max(1, (os.cpu_count() or 1) // max(1, runner.workers))
    init = None if runner.runs_inline(len(tasks)) else (_worker_init, (threads,))
    try:
        model = _centers(job, folder, runner, tasks, init, want, state, embedded)
        cf.write_embedder_spec(folder.root, job.embedder, ename)
        todo = [t for t in tasks if not state.is_done(f"assign:{sid_of[t['shard']]}")]
        if len(todo) < len(tasks):
            logger.warning("cluster: %d of %d shards already assigned", len(tasks) - len(todo), len(tasks))
        step = state.track("assign", len(tasks), len(tasks) - len(todo))

        def assigned(result: dict[str, Any]) -> None:
            embedded(result["shard"])
            state.mark_done(f"assign:{sid_of[result['shard']]}", [folder.assignment_path(result["shard"])])
            step()

        run_with_progress(runner, _assign_task, todo, "assign", init, disable=not job.progress, on_result=assigned)
    finally:
        runner.close()
    sizes = _aggregate(folder, [Path(t["output"]) for t in tasks], model)
    files.write_text(folder.root / cf.SIZES, json.dumps(sizes, indent=1))
    plot_clusters(model, np.array(sizes["fine_sizes"]), folder.root / cf.PLOT)
    state.finish([folder.root / name for name in (cf.CENTERS, cf.EMBEDDER, cf.SHARDS, cf.SIZES, cf.PLOT)])
    return sizes


def _aggregate(folder: cf.ClusterFolder, outputs: list[Path], model: TwoLevel) -> dict[str, Any]:
    """Sizes recounted from the per-shard outputs, so a resumed run reports the whole pool."""
    k = model.fine_centroids.shape[0]
    fine_sizes = np.zeros(k, np.int64)
    skipped: dict[str, int] = {}
    empty = 0
    for _, table, shard_skipped in folder.iter_assignments(outputs, columns=["fine"]):
        for reason, n in shard_skipped.items():
            skipped[reason] = skipped.get(reason, 0) + int(n)
        fine = table.column("fine").to_numpy()
        if len(fine) == 0:
            empty += 1
        fine_sizes += np.bincount(fine, minlength=k)
    expert_sizes = np.bincount(model.expert_of_fine, weights=fine_sizes, minlength=model.n_experts)
    return {
        "n_shards": len(outputs),
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
    files.write_with(Path(path), lambda f: fig.savefig(f, format="png", dpi=110))


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
                        help="the caption: a member extension, else a .json field of that name; the "
                             "default also falls back to .txt (mode_fast.data.io; default caption)")  # fmt: skip
    parser.add_argument("--key-field", default=None, help="json field to use as the pair key")
    parser.add_argument("--embedder", default="minilm",
                        help="'minilm' (all-MiniLM-L6-v2, offline), 'hash[N]' (test stand-in) or "
                             "'package.module:callable' (your own; see mode_fast.clustering.embedders)")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="torch device for embedding/assignment")
    parser.add_argument("--batch-size", type=int, default=256, help="captions per encoder batch")
    parser.add_argument("--niter", type=int, default=25, help="k-means iterations")
    parser.add_argument("--no-balanced", dest="balanced", action="store_false",
                        help="plain (not size-balanced) k-means for the fine level")  # fmt: skip
    parser.add_argument(
        "--no-balanced-coarse",
        dest="balanced_coarse",
        action="store_false",
        help="plain (not size-balanced) k-means for grouping the fine centers into experts",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument(
        "--overwrite", action="store_true", help="start over: remove this job's earlier outputs in --out first"
    )


def run(args: argparse.Namespace) -> int:
    """`mode-fast cluster`: writes, under --out, the folder `mode_fast.clustering.folder` describes:
    centers.npz, embedder.json, assignments/<shard_id>.parquet (one per shard, written
    atomically), shards.json, embeddings/ (per-shard cache), cluster_sizes.json,
    clusters.png, and run.json (mode_fast.core.runs: what is done, for what inputs and
    arguments; a rerun continues, or recomputes a changed shard, or stops naming a
    changed argument)."""
    from mode_fast.data.io import ShardError, list_shards

    try:
        shards = list_shards(args.shards)
    except ShardError as e:
        raise InputError(f"no shards: {e}") from e
    job = ClusterJob(
        shards=[Path(s) for s in shards], out=args.out, fine_k=args.fine_k,
        n_experts=args.experts, sample=args.sample, workers=args.workers, seed=args.seed,
        executor=args.executor, ray_address=args.ray_address,
        caption_key=args.caption_key, key_field=args.key_field, embedder=args.embedder,
        device=args.device, batch_size=args.batch_size, niter=args.niter,
        balanced=args.balanced, balanced_coarse=args.balanced_coarse, progress=args.progress,
        overwrite=args.overwrite,
    )  # fmt: skip
    sizes = run_cluster_job(job)
    print(
        f"assigned {sizes['n_assigned']} pairs from {sizes['n_shards']} shards to "
        f"{sizes['fine_k']} fine clusters / {sizes['n_experts']} experts "
        f"(sizes {sizes['expert_sizes']}); skipped {sizes['n_skipped'] or 'none'}; "
        f"outputs in {job.out}"
    )
    return 0
