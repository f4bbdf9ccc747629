"""MoDE's two-level clustering of a pool's captions, as a run: `run_clustering(ClusterConfig)`.

Caption embeddings (`mode_fast.clustering.embedders`), k-means (`mode_fast.clustering.kmeans`),
the two levels (`mode_fast.clustering.experts`) and the output folder's layout and writers
(`mode_fast.clustering.folder`), with shards spread over `mode_fast.core.executor`; the run's
lifecycle (resume, run.json) is `mode_fast.core.runs`'. `mode-fast cluster` (mode_fast.jobs.cluster)
is this with its flags parsed; see `run_clustering` for the outputs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
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
from mode_fast.core.config import check_ranges, manifest_args, option, result_values
from mode_fast.core.errors import ConfigError, InputError
from mode_fast.core.executor import executor_option, make_executor, ray_address_option, run_with_progress
from mode_fast.core.runs import MANIFEST, RunState, fingerprint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterConfig:
    """Everything `mode-fast cluster` needs, checked on construction (ConfigError, InputError).

    `embedder` is a spec ('minilm', 'hash64', 'package.module:callable', or a spec dict) or an
    embedder object (callable texts -> float32 [n, D], with .name, .dim and, to be rebuilt by
    eval, .spec). The result-changing fields are declared in the order run.json lists them
    (the recorded ``--embedder`` is the embedder's name, see `run_clustering`)."""

    shards: tuple[Path, ...] = option(help="webdataset tar shards (paths or globs)", result=False,
                                      flag="shards", nargs="+")  # fmt: skip
    out: Path = option(help="output folder", result=False)
    fine_k: int = option(1024, help="fine clusters (default 1024)", result=True, low=1)
    # named as its flag: run.json's key is --<field name>
    experts: int = option(4, help="coarse groups = experts (4)", result=True, low=1)
    sample: int = option(65536, help="embeddings the k-means is fitted on (default 65536)", result=True, low=1)
    workers: int = option(1, help="parallel shard processes (local) or actors (ray)", result=False, low=0)
    executor: str = executor_option()  # or "ray": same outputs either way
    ray_address: str | None = ray_address_option()
    seed: int = option(1234, help="", result=True)  # no help text, as in 0.1
    niter: int = option(25, help="k-means iterations", result=True, low=1)
    balanced: bool = option(True, help="plain (not size-balanced) k-means for the fine level", result=True,
                            flag="--no-balanced", action="store_false")  # fmt: skip
    # MoDE's coarse step is balanced too (facebookresearch/MetaCLIP, mode/prep_hrchy.py)
    balanced_coarse: bool = option(
        True,
        help="plain (not size-balanced) k-means for grouping the fine centers into experts",
        result=True,
        flag="--no-balanced-coarse",
        action="store_false",
    )
    embedder: Any = option(
        "minilm",
        help="'minilm' (all-MiniLM-L6-v2, offline), 'hash[N]' (test stand-in) or "
        "'package.module:callable' (your own; see mode_fast.clustering.embedders)",
        result=True,
    )
    caption_key: str = option(
        "caption",
        help="the caption: a member extension, else a .json field of that name; the "
        "default also falls back to .txt (mode_fast.data.io; default caption)",
        result=True,
    )
    key_field: str | None = option(None, help="json field to use as the pair key", result=True)
    device: str = option("cpu", help="torch device for embedding/assignment", result=False)
    batch_size: int = option(256, help="captions per encoder batch", result=False, low=1)
    progress: bool = option(
        True,
        help="",  # no help text, as in 0.1
        result=False,
        flag="--no-progress",
        action="store_false",
    )
    overwrite: bool = option(False, help="start over: remove this job's earlier outputs in --out first", result=False)

    def __post_init__(self) -> None:
        # Python callers may pass lists and strings; the config holds what the CLI gives.
        object.__setattr__(self, "shards", tuple(Path(s) for s in self.shards))
        object.__setattr__(self, "out", Path(self.out))
        check_ranges(self)
        if self.experts > self.fine_k:
            raise ConfigError(f"--experts {self.experts} is more than --fine-k {self.fine_k} fine centers")
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
    cfg: ClusterConfig,
    runner: Any,
    tasks: list[dict[str, Any]],
    init: Any,
    embedded: Callable[[str], None] = lambda shard: None,
) -> TwoLevel:
    """Embed shards in a seeded random order until `cfg.sample` finite embeddings are in
    hand, draw that many at random, fit the two levels. The shards used are the shortest
    prefix of that order, so the sample is the same for any executor and worker count;
    shards finished beyond it are not wasted (the assignment reads their cache; those still
    running are stopped)."""
    order = np.random.default_rng(cfg.seed).permutation(len(tasks))
    parts: list[np.ndarray] = []
    have, used = 0, 0
    results = runner.map(_embed_task, [tasks[i] for i in order], init, ordered=True)
    try:
        for emb, _ in results:
            embedded(tasks[order[used]]["shard"])  # its cache is complete (tasks come back in order)
            parts.append(emb)
            have += len(emb)
            used += 1
            if have >= cfg.sample:
                break
    finally:
        results.close()  # cancels the shards not started
    x = np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)
    if len(x) < cfg.fine_k:
        raise InputError(
            f"only {len(x)} usable caption embeddings in the whole pool ({len(tasks)} shards), "
            f"fewer than --fine-k {cfg.fine_k}"
        )
    if len(x) > cfg.sample:
        pick = np.sort(np.random.default_rng(cfg.seed + 1).choice(len(x), cfg.sample, replace=False))
        x = x[pick]
    logger.warning(
        "cluster: fitting %d fine centers on a sample of %d embeddings from %d of %d shards",
        cfg.fine_k, len(x), used, len(tasks),
    )  # fmt: skip
    model, _, _ = fit_two_level(
        torch.from_numpy(x).to(cfg.device), fine_k=cfg.fine_k, n_experts=cfg.experts,
        seed=cfg.seed, niter=cfg.niter, balanced=cfg.balanced, balanced_coarse=cfg.balanced_coarse,
        max_points_per_centroid=max(256, math.ceil(len(x) / cfg.fine_k)),
    )  # fmt: skip
    return model


def _embedder_name(cfg: ClusterConfig) -> str:
    """The embedder's name; a spec it cannot be rebuilt from, or a missing package (MiniLM's),
    stops here, before any output."""
    if isinstance(cfg.embedder, (str, dict)):
        return make_embedder(cfg.embedder).name  # cheap: models load lazily
    embedder_spec(cfg.embedder)  # an object's .spec is checked now, not after the fit
    return str(cfg.embedder.name)


def _tasks(cfg: ClusterConfig, folder: cf.ClusterFolder) -> list[dict[str, Any]]:
    """One task per shard (pickled to the workers), and shards.json."""
    ids = [shard_id(s) for s in cfg.shards]
    if len(set(ids)) != len(ids):
        raise InputError("the same shard is listed twice")
    (folder.root / cf.ASSIGNMENTS).mkdir(parents=True, exist_ok=True)
    files.write_text(folder.root / cf.SHARDS, json.dumps(dict(zip(ids, map(str, cfg.shards))), indent=1))
    common = {
        "embedder": cfg.embedder, "device": cfg.device, "batch_size": cfg.batch_size,
        "cache_dir": str(folder.root / cf.EMBEDDINGS), "caption_key": cfg.caption_key, "key_field": cfg.key_field,
        "centers": str(folder.centers_path),
    }  # fmt: skip
    return [dict(common, shard=str(s), output=str(folder.assignment_path(s))) for s in cfg.shards]


def _centers(
    cfg: ClusterConfig,
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
    model = _fit_on_sample(cfg, runner, tasks, init, embedded)
    model.config.update(want)
    model.save(folder.centers_path)
    state.mark_done("centers", [folder.centers_path])
    return model


# This job's own files in --out (what --overwrite removes).
CLUSTER_OUTPUTS = (cf.CENTERS, cf.EMBEDDER, cf.ASSIGNMENTS, cf.EMBEDDINGS, cf.SHARDS, cf.SIZES, cf.PLOT)


def run_clustering(cfg: ClusterConfig) -> dict[str, Any]:
    """Fit on a sample (or reuse the centers run.json vouches for), assign every shard
    (skipping those run.json records as done), then write cluster_sizes.json and
    clusters.png. Returns the sizes (the summary cluster_sizes.json holds).

    Writes, under `cfg.out`, the folder `mode_fast.clustering.folder` describes: centers.npz,
    embedder.json, assignments/<shard_id>.parquet (one per shard, written atomically),
    shards.json, embeddings/ (per-shard cache), cluster_sizes.json, clusters.png, and run.json
    (what is done, for what inputs and arguments). Reruns follow the shared rule (mode_fast.core.runs): a
    changed, added or removed shard invalidates its embeddings, the centers (fitted on a
    sample of the whole pool) and every assignment; any other changed argument stops with
    one line naming it."""
    ids = [shard_id(s) for s in cfg.shards]
    if len(set(ids)) != len(ids):
        raise InputError("the same shard is listed twice")
    ename = _embedder_name(cfg)
    # run.json records the embedder by name (what the embeddings depend on), not its spec
    args = manifest_args(cfg, {**result_values(cfg), "embedder": ename})

    def recompute(field: str) -> list[str] | None:
        return ["centers", "assign:*", f"embed:{field[6:]}"] if field.startswith("input ") else None

    out = cfg.out
    with (
        RunState.open(
            out,
            "cluster",
            inputs={i: fingerprint(s) for s, i in zip(cfg.shards, ids)},
            args=args,
            recompute=recompute,
            overwrite=cfg.overwrite,
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
        return _run(cfg, ids, ename, state)


def _run(cfg: ClusterConfig, ids: list[str], ename: str, state: RunState) -> dict[str, Any]:
    folder = cf.ClusterFolder(cfg.out)
    tasks = _tasks(cfg, folder)
    cache_dir = folder.root / cf.EMBEDDINGS
    sid_of = {str(s): i for s, i in zip(cfg.shards, ids)}
    for s, i in zip(
        cfg.shards, ids
    ):  # a cache run.json does not vouch for (killed mid-shard, a changed shard) is redone
        if not state.is_done(f"embed:{i}"):
            for f in cache_files(cache_dir, s, ename):
                f.unlink(missing_ok=True)

    def embedded(shard: str) -> None:
        state.mark_done(f"embed:{sid_of[shard]}", cache_files(cache_dir, shard, ename))

    want = {"fine_k": cfg.fine_k, "n_experts": cfg.experts, "seed": cfg.seed, "embedder": ename}
    runner = make_executor(cfg.executor, cfg.workers, cfg.ray_address)
    # Every worker process pins torch to the same share of the cores, whatever the
    # executor, so the float sums (and so the labels and distances written) are the same.
    # A local run in this process leaves the caller's torch settings alone.
    threads = max(1, (os.cpu_count() or 1) // max(1, runner.workers))
    init = None if runner.runs_inline(len(tasks)) else (_worker_init, (threads,))
    try:
        model = _centers(cfg, folder, runner, tasks, init, want, state, embedded)
        cf.write_embedder_spec(folder.root, cfg.embedder, ename)
        todo = [t for t in tasks if not state.is_done(f"assign:{sid_of[t['shard']]}")]
        if len(todo) < len(tasks):
            logger.warning("cluster: %d of %d shards already assigned", len(tasks) - len(todo), len(tasks))
        step = state.track("assign", len(tasks), len(tasks) - len(todo))

        def assigned(result: dict[str, Any]) -> None:
            embedded(result["shard"])
            state.mark_done(f"assign:{sid_of[result['shard']]}", [folder.assignment_path(result["shard"])])
            step()

        run_with_progress(runner, _assign_task, todo, "assign", init, disable=not cfg.progress, on_result=assigned)
    finally:
        runner.close()
    sizes = _aggregate(folder, [Path(t["output"]) for t in tasks], model)
    files.write_text(folder.root / cf.SIZES, json.dumps(sizes, indent=1))
    cf.plot_clusters(model, np.array(sizes["fine_sizes"]), folder.root / cf.PLOT)
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


class ClusterJob(ClusterConfig):
    """Deprecated (0.1's name, removed in the next release): `ClusterConfig`, with the
    number of experts also accepted and read as ``n_experts``."""

    def __init__(self, *args: Any, n_experts: int | None = None, **kwargs: Any) -> None:
        warnings.warn(
            "ClusterJob is deprecated: use mode_fast.clustering.run.ClusterConfig (n_experts is experts there)",
            DeprecationWarning,
            stacklevel=2,
        )
        if n_experts is not None:
            kwargs["experts"] = n_experts
        super().__init__(*args, **kwargs)

    @property
    def n_experts(self) -> int:
        return self.experts


def run_cluster_job(job: ClusterConfig) -> dict[str, Any]:
    """Deprecated (removed in the next release): `run_clustering`."""
    warnings.warn(
        "run_cluster_job is deprecated: use mode_fast.clustering.run.run_clustering", DeprecationWarning, stacklevel=2
    )
    return run_clustering(job)
