"""`run_dedup(DedupConfig)`: exact and semantic deduplication of a pool, as a run.

Steps, each a unit of the run's run.json (`mode_fast.core.runs`):
- ``shard:<id>``: one task per shard (`mode_fast.core.executor`): its records read
  (`mode_fast.data.io.read_shard`), each usable record's exact hash
  (`mode_fast.dedup.exact`) and, for the semantic stage, its embedding: the caption through
  the cluster job's embedders and per-shard cache (`mode_fast.clustering.embedders`), or the
  image through an open_clip model named as ``train --pretrained`` names one
  (`mode_fast.training.checkpoint`). Written to ``.work/shards/<id>.npz``.
- ``kmeans``: the exact stage over the whole pool (the first record of a hash in pool order
  is kept), then k-means (`mode_fast.clustering.kmeans.KMeans`) on the embeddings of the
  records it kept, and every one assigned (`kmeans_assign`).
- ``cluster:<c>``: one task per cluster: its keep order and maxima (`mode_fast.dedup.semantic`).
- ``write:<eps>``: the eps folder (`write_eps`): kept_keys.txt, duplicates.tsv, summary.json
  [, data/ with the deduplicated shards].
Then summary.json at the top. Layout: docs/dedup.md.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mode_fast.core import files
from mode_fast.core.config import check_ranges, manifest_args, option
from mode_fast.core.errors import ConfigError, InputError
from mode_fast.core.executor import executor_option, make_executor, ray_address_option, run_with_progress
from mode_fast.core.runs import MANIFEST, RunState, fingerprint
from mode_fast.data.io import missing_shard, shard_id
from mode_fast.data.loader import DEFAULT_IMAGE_KEY  # the image members train reads
from mode_fast.dedup.exact import EXACT_MODES, NO_HASH, first_occurrence, image_bytes, record_hash
from mode_fast.dedup.semantic import ORDERS, chain_ends, cluster_task

logger = logging.getLogger(__name__)

SEMANTIC_MODES = ("off", "captions", "images")
WORK = ".work"
EMBEDDINGS = "embeddings"  # the caption cache, as the cluster job lays it out
SUMMARY = "summary.json"
KEPT_KEYS = "kept_keys.txt"
DUPLICATES = "duplicates.tsv"
DUPLICATES_HEADER = "key\tstage\tmatch\tsimilarity\tkept\n"


def parse_eps(value: Any) -> tuple[float, ...]:
    """'0.01,0.05' (or a sequence of numbers) -> (0.01, 0.05): each in (0, 1), sorted, unique."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            values = [float(p) for p in parts]
        except ValueError as e:
            raise ConfigError(f"--eps {value!r}: give numbers in (0, 1) separated by commas, e.g. 0.01,0.05") from e
    else:
        values = [float(v) for v in value]
    if not values:
        raise ConfigError("--eps: give at least one value in (0, 1), e.g. 0.01,0.05")
    for v in values:
        if not (0 < v < 1):  # also refuses nan: eps 0 removes nothing, eps >= 1 removes every non-first item
            raise ConfigError(f"--eps {v:g}: each eps must lie in (0, 1) (an item goes when its similarity > 1 - eps)")
    return tuple(sorted(set(values)))


def eps_folder(eps: float) -> str:
    """The folder name of one eps's outputs: ``eps_0.01``."""
    return f"eps_{eps:g}"


@dataclass(frozen=True)
class DedupConfig:
    """Everything `mode-fast dedup` needs, checked on construction (ConfigError, InputError).
    The result-changing fields are declared in the order run.json lists them."""

    shards: tuple[Path, ...] = option(help="pool shards: webdataset tars, parquet, jsonl (paths or globs)",
                                      result=False, flag="shards", nargs="+")  # fmt: skip
    out: Path = option(help="output folder", result=False)
    exact: str = option("image", help="exact stage: hash of the image bytes (default), of the normalised caption "
                        "and the image bytes, or off", result=True, choices=EXACT_MODES)  # fmt: skip
    semantic: str = option("captions", help="semantic stage (SemDeDup) on caption embeddings (default), image "
                           "embeddings (--image-model) or off", result=True, choices=SEMANTIC_MODES)  # fmt: skip
    eps: tuple[float, ...] = option(
        (0.01,), help="one or more eps, comma-separated (default 0.01): an item is removed when its similarity to "
        "an earlier item of its cluster exceeds 1 - eps; one output folder per eps", result=True,
    )  # fmt: skip
    clusters: int = option(100, help="k-means clusters of the semantic stage (default 100)", result=True, low=1)
    order: str = option("hard", help="which item of a group is kept: hard (farthest from the center, default, as "
                        "SemDeDup), easy (nearest) or random", result=True, choices=ORDERS)  # fmt: skip
    seed: int = option(1234, help="k-means seed and the random order's", result=True)
    niter: int = option(25, help="k-means iterations", result=True, low=1)
    embedder: Any = option("minilm", help="caption embedder: 'minilm', 'hash[N]' or 'package.module:callable' "
                           "(as mode-fast cluster)", result=True)  # fmt: skip
    image_model: str | None = option(None, help="with --semantic images: the open_clip model, ARCH:TAG, ARCH:FILE "
                                     "or a mode-fast checkpoint (as train --pretrained)", result=True)  # fmt: skip
    caption_key: str = option("caption", help="the caption (as mode-fast cluster; default caption)", result=True)
    image_key: str = option(DEFAULT_IMAGE_KEY, help=f"image member extensions, ';'-separated (default "
                            f"{DEFAULT_IMAGE_KEY})", result=True)  # fmt: skip
    key_field: str | None = option(None, help="parquet/jsonl field to use as the pair key", result=True)
    write_shards: float | None = option(None, help="also write the deduplicated shards of this eps (one of --eps) "
                                        "under its folder's data/, as curate writes its shards", result=True)  # fmt: skip
    workers: int = option(1, help="parallel processes (local) or actors (ray)", result=False, low=0)
    executor: str = executor_option()
    ray_address: str | None = ray_address_option()
    device: str = option("cpu", help="torch device for embedding, k-means and the maxima", result=False)
    batch_size: int = option(256, help="items per encoder batch", result=False, low=1)
    progress: bool = option(True, help="no progress bars", result=False, flag="--no-progress", action="store_false")
    overwrite: bool = option(False, help="start over: remove this job's earlier outputs in --out first", result=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shards", tuple(Path(s) for s in self.shards))
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "eps", parse_eps(self.eps))  # the CLI gives the text: parsed here, one message
        check_ranges(self)
        if not self.shards:
            raise InputError("no shards given")
        for name, value, allowed in (("--exact", self.exact, EXACT_MODES), ("--semantic", self.semantic,
                                     SEMANTIC_MODES), ("--order", self.order, ORDERS)):  # fmt: skip
            if value not in allowed:
                raise ConfigError(f"{name} {value!r}: use one of {', '.join(allowed)}")
        if self.exact == "off" and self.semantic == "off":
            raise ConfigError("--exact off and --semantic off: nothing to do")
        if self.semantic == "images" and not self.image_model:
            raise ConfigError("--semantic images needs --image-model SPEC (ARCH:TAG, ARCH:FILE or a checkpoint)")
        if self.write_shards is not None and self.write_shards not in self.eps:
            raise ConfigError(
                f"--write-shards {self.write_shards:g} is not one of --eps {','.join(f'{e:g}' for e in self.eps)}"
            )


# --------------------------------------------------------------------------- per shard
_WORKER: dict[str, Any] = {}


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))


def _caption_embedder(spec: Any, device: str, batch_size: int) -> Any:
    from mode_fast.clustering.embedders import make_embedder

    if not isinstance(spec, str | dict):
        return spec
    key = f"embedder:{spec}:{device}:{batch_size}"
    if key not in _WORKER:
        _WORKER[key] = make_embedder(spec, device=device, batch_size=batch_size)
    return _WORKER[key]


def _image_model(spec: str, device: str) -> tuple[Any, Any]:
    """(model, eval transform) of a model spec, as train --pretrained reads one (checked
    open_clip architecture, weights read as data: mode_fast.training.checkpoint)."""
    from mode_fast.training.checkpoint import load_model, parse_model_spec

    key = f"image:{spec}:{device}"
    if key not in _WORKER:
        model, preprocess, _ = load_model(parse_model_spec(spec, flag="--image-model"), device)
        _WORKER[key] = (model, preprocess)
    return _WORKER[key]


def _embed_images(task: dict[str, Any], images: list[bytes | None]) -> tuple[np.ndarray, dict[str, int]]:
    """Unit image embeddings [n, D] of the images (NaN rows for those that are missing or
    cannot be decoded: counted by reason)."""
    import torch

    from mode_fast.data.images import decode_image

    model, preprocess = _image_model(task["image_model"], task["device"])
    rows: list[np.ndarray | None] = [None] * len(images)
    not_embedded: dict[str, int] = {}
    batch: list[tuple[int, Any]] = []

    def flush() -> None:
        if not batch:
            return
        with torch.no_grad():
            x = torch.stack([preprocess(im) for _, im in batch]).to(task["device"])
            e = torch.nn.functional.normalize(model.encode_image(x).float(), dim=1).cpu().numpy()
        for (i, _), row in zip(batch, e):
            rows[i] = row
        batch.clear()

    for i, data in enumerate(images):
        if data is None:
            not_embedded["no_image"] = not_embedded.get("no_image", 0) + 1
            continue
        decoded = decode_image(data)
        if decoded.image is None:
            reason = decoded.reason or "bad_image"
            not_embedded[reason] = not_embedded.get(reason, 0) + 1
            continue
        batch.append((i, decoded.image))
        if len(batch) >= task["batch_size"]:
            flush()
    flush()
    dim = next((len(r) for r in rows if r is not None), 1)
    out = np.full((len(images), dim), np.nan, np.float32)
    for i, r in enumerate(rows):
        if r is not None:
            out[i] = r
    return out, not_embedded


def _embed_captions(task: dict[str, Any], keys: list[str], captions: list[str]) -> np.ndarray:
    """Caption embeddings of the usable records, through the cluster job's `embed_shard` and
    its cache; rows for records it does not embed (an empty caption) are NaN."""
    from mode_fast.clustering.embedders import embed_shard

    emb = _caption_embedder(task["embedder"], task["device"], task["batch_size"])
    se = embed_shard(task["shard"], emb, task["cache_dir"], task["caption_key"], task["key_field"])
    out = np.full((len(keys), se.embeddings.shape[1] if se.embeddings.ndim == 2 else 1), np.nan, np.float32)
    want = [i for i, c in enumerate(captions) if c.strip()]  # embed_shard's rule: an empty caption is skipped
    if len(want) != len(se.keys) or any(keys[i] != k for i, k in zip(want, se.keys.tolist())):
        raise InputError(
            f"{task['shard']}: its records differ from its cached caption embeddings; rerun with --overwrite"
        )
    out[want] = se.embeddings
    return out


def shard_task(task: dict[str, Any]) -> dict[str, Any]:
    """Executor task: read one shard; write task["output"] (.npz: keys, hashes, embeddings
    of the usable records in file order, and meta JSON: records, skips by reason, records the
    semantic stage could not embed by reason)."""
    from mode_fast.data.io import CORRUPT_TAR_TAIL, read_shard
    from mode_fast.data.loader import SampleSpec

    exts = SampleSpec(image_key=task["image_key"]).image_exts
    keys: list[str] = []
    hashes: list[bytes] = []
    captions: list[str] = []
    images: list[bytes | None] = []
    skipped: dict[str, int] = {}
    records = 0
    for rec in read_shard(Path(task["shard"]), caption_key=task["caption_key"], key_field=task["key_field"]):
        if rec.skip_reason != CORRUPT_TAR_TAIL:
            records += 1
        if rec.skip_reason is not None:
            skipped[rec.skip_reason] = skipped.get(rec.skip_reason, 0) + 1
            continue
        image = image_bytes(rec.sample, exts)
        keys.append(rec.key)
        captions.append(rec.caption or "")
        hashes.append(record_hash(task["exact"], rec.caption or "", image))
        images.append(image if task["semantic"] == "images" else None)
    not_embedded: dict[str, int] = {}
    if task["semantic"] == "captions":
        emb = _embed_captions(task, keys, captions)
    elif task["semantic"] == "images":
        emb, not_embedded = _embed_images(task, images)
    else:
        emb = np.zeros((len(keys), 0), np.float32)
    if task["semantic"] != "off":
        bad = ~np.isfinite(emb).all(1) if len(emb) else np.zeros(0, bool)
        n_bad = int(bad.sum()) - sum(not_embedded.values())
        if n_bad:
            not_embedded["no_embedding"] = n_bad  # an empty caption, a non-finite embedding
    meta = {"records": records, "skipped": skipped, "not_embedded": not_embedded}
    files.save_npz(
        task["output"], keys=np.array(keys, dtype=str), hashes=np.array(hashes, dtype="S16"),
        embeddings=emb.astype(np.float32), meta=np.array(json.dumps(meta)),
    )  # fmt: skip
    return {"shard": task["shard"], "records": records}


# --------------------------------------------------------------------------- the run
def _owned(out: Path) -> list[str]:
    """This job's files and folders in `out` (what --overwrite removes)."""
    eps_dirs = sorted(p.name for p in out.glob("eps_*")) if out.is_dir() else []
    return [WORK, EMBEDDINGS, SUMMARY, *eps_dirs]


def _recompute(field: str) -> list[str] | None:
    """What a changed field invalidates (None: stop, naming it)."""
    later = ["kmeans", "cluster:*", "write:*"]
    if field == "input image-model":  # other weights: every shard's image embeddings
        return ["shard:*", *later]
    if field.startswith("input "):
        return [f"shard:{field[6:]}", *later]
    if field in ("--eps", "--write-shards"):
        return ["write:*"]
    if field in ("--exact", "--clusters", "--seed", "--niter"):
        return later
    if field == "--order":
        return ["cluster:*", "write:*"]
    return None  # the embeddings (--semantic, --embedder, ...), the code version


def run_dedup(cfg: DedupConfig) -> dict[str, Any]:
    """Deduplicate the pool (module docstring); returns the summary (OUT/summary.json)."""
    ids = [shard_id(s) for s in cfg.shards]
    if len(set(ids)) != len(ids):
        raise InputError("the same shard is listed twice")
    for s in cfg.shards:
        if not s.is_file():
            raise missing_shard(s)
    values = dict(manifest_args(cfg))
    if cfg.semantic == "captions":
        values["--embedder"] = _embedder_name(cfg)  # by name, as the cluster job records it
    else:  # a stage that is off takes no part in the result: changing its model redoes nothing
        values.pop("--embedder", None)
    if cfg.semantic != "images":
        values.pop("--image-model", None)
    if cfg.semantic == "images":
        from mode_fast.training.checkpoint import check_model_checkpoint, parse_model_spec

        weights = parse_model_spec(cfg.image_model, flag="--image-model")  # a missing tag: before any output
        if not Path(os.fspath(weights)).is_file():
            raise InputError(f"--image-model {cfg.image_model}: file {os.fspath(weights)} not found")
        check_model_checkpoint(weights)  # a file load_model would refuse: refused now, before any output
    inputs = {i: fingerprint(s) for s, i in zip(cfg.shards, ids)}
    if cfg.semantic == "images":
        inputs["image-model"] = fingerprint(os.fspath(weights))
    with (
        RunState.open(cfg.out, "dedup", inputs=inputs, args=values, recompute=_recompute, overwrite=cfg.overwrite,
                      owned=_owned(cfg.out), log=logger.warning) as state,
        state.interrupts(),
    ):  # fmt: skip
        if state.finished:
            logger.warning("dedup: %s already holds this deduplication (same inputs and arguments): nothing to do",
                           cfg.out)  # fmt: skip
            return json.loads((cfg.out / SUMMARY).read_text())
        if not state.resumed and (cfg.out / SUMMARY).exists():
            raise ConfigError(
                f"{cfg.out} holds outputs without {MANIFEST}: rerun with --overwrite, or use another --out"
            )
        return _run(cfg, ids, state)


def _shard_output(out: Path, sid: str) -> Path:
    return out / WORK / "shards" / f"{sid}.npz"


def _caption_cache(cfg: DedupConfig, out: Path, shard: str) -> list[Path]:
    """The cluster job's cache files of one shard's caption embeddings (none without them)."""
    if cfg.semantic != "captions":
        return []
    from mode_fast.clustering.embedders import cache_files

    return list(cache_files(out / EMBEDDINGS, shard, _embedder_name(cfg)))


def _embedder_name(cfg: DedupConfig) -> str:
    """The caption embedder's name (what its embeddings depend on; run.json records it)."""
    from mode_fast.clustering.embedders import make_embedder

    if isinstance(cfg.embedder, str | dict):
        return str(make_embedder(cfg.embedder).name)  # cheap: models load lazily
    return str(cfg.embedder.name)


def _run(cfg: DedupConfig, ids: list[str], state: RunState) -> dict[str, Any]:
    out = cfg.out  # folders are made as files are written: a run refused at its first shard leaves nothing
    runner = make_executor(cfg.executor, cfg.workers, cfg.ray_address)
    try:
        common = {
            "exact": cfg.exact, "semantic": cfg.semantic, "embedder": cfg.embedder, "image_model": cfg.image_model,
            "caption_key": cfg.caption_key, "image_key": cfg.image_key, "key_field": cfg.key_field,
            "device": cfg.device, "batch_size": cfg.batch_size, "cache_dir": str(out / EMBEDDINGS),
        }  # fmt: skip
        todo = [dict(common, shard=str(s), sid=i, output=str(_shard_output(out, i)))
                for s, i in zip(cfg.shards, ids) if not state.is_done(f"shard:{i}")]  # fmt: skip
        caches = {t["sid"]: _caption_cache(cfg, out, t["shard"]) for t in todo}
        for paths in caches.values():  # a cache run.json does not vouch for (a changed shard, a kill) is redone
            for f in paths:
                f.unlink(missing_ok=True)
        step = state.track("read", len(ids), len(ids) - len(todo))

        def read(result: dict[str, Any]) -> None:
            sid = shard_id(result["shard"])
            state.mark_done(f"shard:{sid}", [_shard_output(out, sid), *caches[sid]])
            step()

        # every worker pins torch to the same share of the cores, whatever the executor (as the
        # cluster job does), so the float sums are the same; a run in this process is left alone
        threads = max(1, (os.cpu_count() or 1) // max(1, runner.workers))
        init = (_worker_init, (threads,))
        run_with_progress(runner, shard_task, todo, "read", None if runner.runs_inline(len(todo)) else init,
                          disable=not cfg.progress, on_result=read)  # fmt: skip
        pool = _load_pool(out, ids)
        parent_exact = first_occurrence(pool["hashes"]) if cfg.exact != "off" else np.arange(len(pool["keys"]))
        semantic = _semantic(cfg, state, runner, init, pool, parent_exact) if cfg.semantic != "off" else None
    finally:
        runner.close()
    summary = _summary(cfg, pool, parent_exact, semantic)
    written: list[Path] = []
    for eps in cfg.eps:
        unit = f"write:{eps:g}"
        state.where = f"write eps {eps:g}"
        if not state.is_done(unit):
            state.mark_done(unit, write_eps(cfg, eps, pool, parent_exact, semantic, summary))
        written += [out / eps_folder(eps) / name for name in (KEPT_KEYS, DUPLICATES, SUMMARY)]
    files.write_json(out / SUMMARY, summary)
    # an eps of an earlier run in this folder that this run dropped: its kept_keys.txt would
    # read as this run's (made with other arguments), so it goes
    current = {eps_folder(eps) for eps in cfg.eps}
    for stale in sorted(p for p in out.glob("eps_*") if p.is_dir() and p.name not in current):
        logger.warning("dedup: removing %s (an eps of an earlier run, not in --eps)", stale)
        shutil.rmtree(stale)
    state.finish([out / SUMMARY, *written])
    return summary


def _load_pool(out: Path, ids: list[str]) -> dict[str, Any]:
    """The usable records of the whole pool in pool order (shard by shard, file order)."""
    keys, hashes, embs, shard_of, metas = [], [], [], [], []
    for n, sid in enumerate(ids):
        with np.load(_shard_output(out, sid), allow_pickle=False) as z:
            keys.append(z["keys"])
            hashes.append(z["hashes"])
            embs.append(z["embeddings"])
            metas.append(json.loads(str(z["meta"])))
        shard_of.append(np.full(len(keys[-1]), n, np.int64))
    # a shard with no embedded record (no image decoded) has no size of its own: NaN rows
    embedded = [e for e in embs if len(e) and np.isfinite(e).all(1).any()]
    dims = {e.shape[1] for e in embedded}
    if len(dims) > 1:
        raise InputError(f"the shards' embeddings have different sizes {sorted(dims)}: rerun with --overwrite")
    dim = dims.pop() if dims else 0
    embs = [e if any(e is f for f in embedded) else np.full((len(e), dim), np.nan, np.float32) for e in embs]
    return {
        "keys": np.concatenate(keys) if keys else np.zeros(0, str),
        "hashes": [h for part in hashes for h in part.tolist()],
        "embeddings": np.concatenate(embs) if embs else np.zeros((0, dim), np.float32),
        "shard": np.concatenate(shard_of),
        "meta": metas,
    }


def _semantic(
    cfg: DedupConfig, state: RunState, runner: Any, init: Any, pool: dict[str, Any], parent_exact: np.ndarray
) -> dict[str, Any]:
    """k-means on the candidates (kept by the exact stage, embedded), then each cluster's
    maxima. Returns candidates (pool indices), labels, sizes, and per pool item best/arg
    (NaN / -1 for items that are not candidates or come first in their cluster)."""
    import torch

    from mode_fast.clustering.kmeans import KMeans

    work = cfg.out / WORK
    emb = pool["embeddings"]
    n = len(pool["keys"])
    finite = np.isfinite(emb).all(1) if emb.shape[1] else np.zeros(n, bool)
    cand = np.flatnonzero((parent_exact == np.arange(n)) & finite)
    if cfg.clusters > len(cand):
        raise InputError(
            f"--clusters {cfg.clusters} is more than the {len(cand)} items the semantic stage has "
            "(after the exact stage): lower --clusters"
        )
    paths = {"embeddings": work / "candidates.npy", "labels": work / "labels.npy", "centers": work / "centers.npy",
             "members": work / "members.npy"}  # fmt: skip
    if not state.is_done("kmeans"):
        state.where = "kmeans"
        x = torch.from_numpy(np.ascontiguousarray(emb[cand], dtype=np.float32)).to(cfg.device)
        km = KMeans(cfg.clusters, niter=cfg.niter, seed=cfg.seed, spherical=True,
                    max_points_per_centroid=max(256, -(-len(cand) // cfg.clusters)))  # fmt: skip
        km.fit(x)
        labels, _ = km.assign(x)
        files.save_npy(paths["embeddings"], x.cpu().numpy())
        labels_np = labels.cpu().numpy().astype(np.int64)
        files.save_npy(paths["labels"], labels_np)
        # candidates grouped by cluster, pool order inside each: a cluster task reads its slice
        files.save_npy(paths["members"], np.argsort(labels_np, kind="stable"))
        files.save_npy(paths["centers"], km.centroids.astype(np.float32))
        state.mark_done("kmeans", list(paths.values()))
    labels = np.load(paths["labels"])
    sizes = np.bincount(labels, minlength=cfg.clusters)

    def output(c: int) -> Path:
        return work / "clusters" / f"{c}.npz"

    common = {k: str(v) for k, v in paths.items()} | {"order": cfg.order, "seed": cfg.seed, "device": cfg.device}
    starts = np.concatenate([[0], np.cumsum(sizes)])
    todo = [dict(common, cluster=c, start=int(starts[c]), end=int(starts[c + 1]), output=str(output(c)))
            for c in range(cfg.clusters) if sizes[c] and not state.is_done(f"cluster:{c}")]  # fmt: skip
    step = state.track("maxima", int((sizes > 0).sum()), int((sizes > 0).sum()) - len(todo), unit="clusters")

    def done(result: dict[str, Any]) -> None:
        state.mark_done(f"cluster:{result['cluster']}", [output(result["cluster"])])
        step()

    run_with_progress(runner, cluster_task, todo, "maxima", None if runner.runs_inline(len(todo)) else init,
                      disable=not cfg.progress, on_result=done, unit="cluster")  # fmt: skip
    best = np.full(n, np.nan, np.float32)
    arg = np.full(n, -1, np.int64)
    for c in np.flatnonzero(sizes):
        with np.load(output(int(c)), allow_pickle=False) as z:
            items, b, a = z["items"], z["best"], z["arg"]
        best[cand[items]] = b
        arg[cand[items]] = np.where(a >= 0, cand[np.maximum(a, 0)], -1)
    return {"candidates": cand, "sizes": sizes, "best": best, "arg": arg}


def _histogram(sizes: np.ndarray) -> dict[str, int]:
    """Cluster sizes in power-of-two bins: {"1": .., "2-3": .., "4-7": ..} (empty clusters as "0")."""
    out: dict[str, int] = {}
    for s in sorted(int(v) for v in sizes):
        lo = 0 if s == 0 else 1 << (s.bit_length() - 1)
        name = str(lo) if lo <= 1 else f"{lo}-{2 * lo - 1}"
        out[name] = out.get(name, 0) + 1
    return out


def _removed(eps: float, parent_exact: np.ndarray, semantic: dict[str, Any] | None) -> tuple[np.ndarray, np.ndarray]:
    """(parent, stage) per pool item at eps: parent the item it duplicates (-1: kept); stage
    0 kept, 1 exact, 2 semantic."""
    n = len(parent_exact)
    idx = np.arange(n)
    parent = np.where(parent_exact != idx, parent_exact, -1)
    stage = np.where(parent >= 0, 1, 0)
    if semantic is not None:
        sem = (semantic["arg"] >= 0) & (semantic["best"] > 1 - eps)
        parent = np.where(sem, semantic["arg"], parent)
        stage = np.where(sem, 2, stage)
    return parent, stage


def _summary(
    cfg: DedupConfig, pool: dict[str, Any], parent_exact: np.ndarray, semantic: dict[str, Any] | None
) -> dict[str, Any]:
    skipped: dict[str, int] = {}
    not_embedded: dict[str, int] = {}
    for meta in pool["meta"]:
        for reason, k in meta["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + int(k)
        for reason, k in meta["not_embedded"].items():
            not_embedded[reason] = not_embedded.get(reason, 0) + int(k)
    n = len(pool["keys"])
    exact_removed = int((parent_exact != np.arange(n)).sum())
    summary: dict[str, Any] = {
        "pool": sum(m["records"] for m in pool["meta"]),
        "usable": n,
        "skipped": skipped,
        "exact": {
            "mode": cfg.exact,
            "removed": exact_removed,
            "not_checked": sum(h == NO_HASH for h in pool["hashes"]) if cfg.exact != "off" else n,
        },  # fmt: skip
        "semantic": {"mode": cfg.semantic},
        "eps": {},
    }
    if semantic is not None:
        summary["semantic"] |= {
            "items": len(semantic["candidates"]), "not_embedded": not_embedded, "clusters": cfg.clusters,
            "order": cfg.order, "cluster_size_histogram": _histogram(semantic["sizes"]),
            "largest_cluster": int(semantic["sizes"].max()),
        }  # fmt: skip
    for eps in cfg.eps:
        _, stage = _removed(eps, parent_exact, semantic)
        summary["eps"][f"{eps:g}"] = {
            "removed_exact": int((stage == 1).sum()), "removed_semantic": int((stage == 2).sum()),
            "kept": int((stage == 0).sum()), "folder": eps_folder(eps),
        }  # fmt: skip
    return summary


def _tsv(key: str) -> str:
    return key.replace("\\", "\\\\").replace("\t", "\\t")  # keys hold no line break (mode_fast.data.io)


def write_eps(
    cfg: DedupConfig, eps: float, pool: dict[str, Any], parent_exact: np.ndarray, semantic: dict[str, Any] | None,
    summary: dict[str, Any],
) -> list[Path]:  # fmt: skip
    """One eps's folder; returns the files written. kept_keys.txt goes through curate's own
    writers (`mode_fast.curation.shards`: per-shard key lists and stamps under the folder's
    .work/, joined in pool order), and so do the shards (`write_kept`)."""
    from mode_fast.curation.shards import shard_files, write_kept_keys, write_shard_keys
    from mode_fast.data.io import CORRUPT_TAR_TAIL, read_shard, write_kept

    folder = cfg.out / eps_folder(eps)
    parent, stage = _removed(eps, parent_exact, semantic)
    end = chain_ends(parent)
    keys = pool["keys"]
    kept = stage == 0
    written: list[Path] = []
    sfiles = shard_files(folder, list(cfg.shards))
    for n, f in enumerate(sfiles):
        mine = pool["shard"] == n
        shard_keys = keys[mine & kept]
        write_shard_keys(f.kept_keys, shard_keys.tolist())
        if cfg.write_shards == eps:
            # write_kept indexes records as read_shard yields them, skipped ones included
            usable_kept = iter(kept[mine].tolist())
            keep = [rec.skip_reason is None and next(usable_kept)
                    for rec in read_shard(f.path, caption_key=cfg.caption_key, key_field=cfg.key_field)
                    if rec.skip_reason != CORRUPT_TAR_TAIL]  # fmt: skip
            write_kept(f.path, f.dst, np.array(keep, dtype=bool))
            written.append(f.dst)
        files.write_json(f.done, {"kept": len(shard_keys)})
        written += [f.kept_keys, f.done]
    write_kept_keys(sfiles, folder / KEPT_KEYS, int(kept.sum()))
    best = semantic["best"] if semantic is not None else np.full(len(keys), np.nan)
    with files.atomic_write(folder / DUPLICATES, "w") as fh:
        fh.write(DUPLICATES_HEADER)
        for i in np.flatnonzero(~kept).tolist():
            exact = stage[i] == 1
            sim = 1.0 if exact else float(best[i])
            fh.write(f"{_tsv(keys[i])}\t{'exact' if exact else 'semantic'}\t{_tsv(keys[parent[i]])}\t"
                     f"{sim:.7g}\t{_tsv(keys[end[i]])}\n")  # fmt: skip
    mine_summary = {k: v for k, v in summary.items() if k != "eps"} | {"eps": eps, **summary["eps"][f"{eps:g}"]}
    files.write_json(folder / SUMMARY, mine_summary)
    return [*written, folder / KEPT_KEYS, folder / DUPLICATES, folder / SUMMARY]
