"""MetaCLIP curation: match captions to metadata, count entries, balance by sampling.

Semantics: ../shared/reference/curation.md. The pipeline is two passes over the pool:

1. match + count (per shard, in parallel): each caption's matched entry ids are stored
   in ``OUT/.work/matches/<shard>.npz`` with the record keys; ``entry_count.npy`` is the
   sum over shards. This pass is reused when only t, the target size or the seed change.
2. sample (per shard, in parallel): a record with match set S is kept with probability
   ``1 - prod_{i in S} (1 - p_i)``, ``p_i = min(1, t / count_i)``.

How sampling is made reproducible and independent of sharding and workers: every
(record, entry) pair gets a uniform u from a hash of (seed, record key, entry id). The
record is kept iff some matched entry has ``u < p``, which has the reference's
probability, and since ``u < min(1, t/c)`` iff ``u*c < t``, each record has one score
``r = min_{i in S} u_i * count_i`` and is kept iff ``r < t``. So a smaller t keeps a
subset of a larger t's set, the kept size for any t is known exactly before sampling,
and ``--target-size N`` solves t exactly from the stored match lists.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mode_fast import __version__
from mode_fast._matcher import Matcher, hash_keys
from mode_fast.data.io import (
    ShardError,
    atomic_write,
    list_shards,
    read_shard,
    save_npy,
    write_json,
    write_kept,
)

__all__ = [
    "Matcher",
    "curate",
    "entry_probabilities",
    "expected_kept",
    "record_scores",
    "solve_t",
]

DEFAULT_T = 20_000.0  # MetaCLIP's t for its 400M set (from 1.6B pairs)
MATCHES_FORMAT = 1


# --- balancing maths -------------------------------------------------------------------


def entry_probabilities(counts: np.ndarray, t: float) -> np.ndarray:
    """p_i = min(1, t / count_i); entries never matched get p = 1."""
    counts = np.asarray(counts, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(counts > t, t / np.maximum(counts, 1.0), 1.0)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    # splitmix64's finaliser; uint64 arithmetic wraps, as intended.
    x = x ^ (x >> np.uint64(31))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def pair_uniforms(key_hashes: np.ndarray, offsets: np.ndarray, ids: np.ndarray, seed: int) -> np.ndarray:
    """One uniform in [0, 1) per (record, matched entry) pair, a pure function of
    (seed, key, entry id): the same wherever and however the record is processed."""
    per_pair_key = np.repeat(key_hashes.astype(np.uint64), np.diff(offsets))
    seed_mix = _mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        x = _mix64(per_pair_key ^ seed_mix ^ ((ids.astype(np.uint64) + np.uint64(1)) * _GOLDEN))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def record_scores(key_hashes: np.ndarray, offsets: np.ndarray, ids: np.ndarray, counts: np.ndarray, seed: int) -> np.ndarray:
    """r = min over matched entries of u * count; +inf for records with no match.
    A record is kept at threshold t iff r < t."""
    n = len(offsets) - 1
    scores = np.full(n, np.inf)
    if ids.size == 0:
        return scores
    pair_score = pair_uniforms(key_hashes, offsets, ids, seed) * counts[ids].astype(np.float64)
    matched = np.diff(offsets) > 0
    # reduceat over the start of each non-empty segment (empty ones would misreport).
    scores[matched] = np.minimum.reduceat(pair_score, offsets[:-1][matched])
    return scores


def expected_kept(offsets: np.ndarray, ids: np.ndarray, probs: np.ndarray) -> float:
    """Expected number kept: sum over records of 1 - prod_{i in S} (1 - p_i)."""
    if ids.size == 0:
        return 0.0
    with np.errstate(divide="ignore"):
        log_miss = np.log1p(-np.minimum(probs[ids], 1.0))
    matched = np.diff(offsets) > 0
    per_record = np.add.reduceat(log_miss, offsets[:-1][matched])
    return float(np.sum(1.0 - np.exp(per_record)))


def solve_t(scores: np.ndarray, target_size: int) -> float:
    """The t that keeps exactly `target_size` records (kept iff score < t).

    t is the midpoint between the target_size-th and next smallest scores. Scores are
    continuous, so ties have probability ~0; if two records tie at that boundary both
    fall on the same side and the kept size differs from the target by the tie count.
    A target at or above the number of matched records keeps them all.
    """
    if target_size <= 0:
        raise ValueError(f"target size must be positive, got {target_size}")
    finite = np.sort(scores[np.isfinite(scores)])
    if target_size >= len(finite):
        return float(finite[-1] * 2 + 1) if len(finite) else 1.0
    lo, hi = finite[target_size - 1], finite[target_size]
    return float((lo + hi) / 2)


# --- pass 1: match and count -------------------------------------------------------------


@dataclass
class ShardMatches:
    offsets: np.ndarray  # int64 [n+1]
    ids: np.ndarray  # int32
    key_hashes: np.ndarray  # uint64 [n]
    keys: np.ndarray  # str [n]
    skip_reasons: dict[str, int]


def _shard_id(path: Path) -> str:
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    name = path.name.replace(os.sep, "_")
    return f"{name}-{digest}"


def _fingerprint(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


_worker_matcher: Matcher | None = None


def _init_worker(matcher_path: str) -> None:
    global _worker_matcher
    _worker_matcher = Matcher.load(matcher_path)  # loaded, never rebuilt, per worker


def _match_shard(task: dict[str, Any]) -> dict[str, Any]:
    """Read one shard, match its captions, write its npz; returns stats (runs in a worker)."""
    assert _worker_matcher is not None
    path = Path(task["path"])
    captions: list[str] = []
    keys: list[str] = []
    has_caption: list[bool] = []
    skips: Counter[str] = Counter()
    for rec in read_shard(path, task["caption_key"], task["key_field"]):
        if rec.skip_reason == "corrupt_tar_tail":
            skips[rec.skip_reason] += 1
            continue
        keys.append(rec.key)
        if rec.caption is None:
            skips[rec.skip_reason or "missing_caption"] += 1
            has_caption.append(False)
            captions.append("")
        else:
            has_caption.append(True)
            captions.append(rec.caption)
    offsets, ids = _worker_matcher.match_batch(captions, threads=task["threads"])
    # Skipped records keep their index (the writer counts records the same way) but
    # match nothing: an empty caption could match an empty-string entry.
    if not all(has_caption):
        lengths = np.diff(offsets)
        keep_pairs = np.repeat(np.asarray(has_caption), lengths)
        ids = ids[keep_pairs]
        offsets = np.concatenate([[0], np.cumsum(np.where(has_caption, lengths, 0))]).astype(np.int64)
    key_hashes = hash_keys(keys, 0)
    out = Path(task["out"])
    with atomic_write(out) as f:
        np.savez(
            f, offsets=offsets, ids=ids, key_hashes=key_hashes, keys=np.array(keys, dtype=str),
            meta=np.array(json.dumps({"format": MATCHES_FORMAT, "fingerprint": task["fingerprint"],
                                      "skips": dict(skips), "config": task["config"]})),
        )
    return {"path": str(path), "records": len(keys), "matched": int((np.diff(offsets) > 0).sum()), "skips": dict(skips)}


def load_matches(path: Path) -> tuple[ShardMatches, dict[str, Any]]:
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        return ShardMatches(z["offsets"], z["ids"], z["key_hashes"], z["keys"], meta["skips"]), meta


def _matches_valid(path: Path, fingerprint: dict[str, Any], config: dict[str, Any]) -> bool:
    if not path.exists():
        return False
    try:
        _, meta = load_matches(path)
    except Exception:  # damaged or from another version: recompute
        return False
    return meta.get("format") == MATCHES_FORMAT and meta.get("fingerprint") == fingerprint and meta.get("config") == config


def _run_parallel(fn, tasks: list[dict[str, Any]], workers: int, desc: str, initializer=None, initargs=()):
    results = []
    bar = tqdm(total=len(tasks), desc=desc, unit="shard", disable=None)
    records = 0
    start = time.perf_counter()

    def done(r: dict[str, Any]) -> None:
        nonlocal records
        results.append(r)
        records += r.get("records", 0)
        bar.set_postfix(records_per_s=f"{records / max(time.perf_counter() - start, 1e-9):,.0f}")
        bar.update()

    if workers <= 1 or len(tasks) <= 1:
        if initializer:
            initializer(*initargs)
        for t in tasks:
            done(fn(t))
    else:
        with ProcessPoolExecutor(max_workers=workers, initializer=initializer, initargs=initargs) as pool:
            for r in pool.map(fn, tasks):
                done(r)
    bar.close()
    return results


# --- pass 2: sample ----------------------------------------------------------------------


def _sample_shard(task: dict[str, Any]) -> dict[str, Any]:
    """Write one curated shard and its kept keys (runs in a worker)."""
    m, _ = load_matches(Path(task["matches"]))
    counts = np.load(task["counts_path"])
    scores = record_scores(m.key_hashes, m.offsets, m.ids, counts, task["seed"])
    keep = scores < task["t"]
    written = write_kept(task["path"], task["dst"], keep)
    if written != int(keep.sum()):
        raise ShardError(f"{task['path']}: wrote {written} records but meant to keep {int(keep.sum())}; the shard changed since it was matched")
    with atomic_write(task["kept_keys"], "w") as f:
        for key in m.keys[keep]:
            f.write(f"{key}\n")
    write_json(task["done"], task["stamp"] | {"kept": written})
    return {"path": task["path"], "records": len(keep), "kept": written}


# --- the job -------------------------------------------------------------------------------


def _common_root(paths: Sequence[Path]) -> Path:
    return Path(os.path.commonpath([str(p.parent) for p in paths]))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _t_ladder(t: float) -> list[float]:
    return sorted({t / 4, t / 2, t, t * 2, t * 4})


def curate(
    pools: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    metadata: str | os.PathLike | None = None,
    t: float | None = None,
    target_size: int | None = None,
    seed: int = 0,
    workers: int | None = None,
    caption_key: str = "caption",
    key_field: str | None = None,
    estimate_only: bool = False,
    log=print,
) -> dict[str, Any]:
    """Curate `pools` into `out_dir`; returns the summary (also written as summary.json)."""
    from mode_fast.metadata import load_metadata, metadata_sha256

    if t is not None and target_size is not None:
        raise ValueError("give either t or target_size, not both")
    if t is not None and not (t > 0 and math.isfinite(t)):
        raise ValueError(f"t must be a positive number, got {t}")
    started = time.perf_counter()
    out = Path(out_dir)
    work = out / ".work"
    shards = list_shards(pools)
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    workers = min(workers, len(shards))
    entries = load_metadata(metadata)
    meta_sha = metadata_sha256(entries)

    # Pass 1 -------------------------------------------------------------------------
    matcher_path = work / f"matcher-{meta_sha[:16]}.bin"
    if not matcher_path.exists():
        matcher_path.parent.mkdir(parents=True, exist_ok=True)
        Matcher(entries).save(str(matcher_path))
    config = {"metadata_sha256": meta_sha, "caption_key": caption_key, "key_field": key_field}
    tasks, match_files = [], []
    for path in shards:
        fp = _fingerprint(path)
        mpath = work / "matches" / f"{_shard_id(path)}.npz"
        match_files.append(mpath)
        if not _matches_valid(mpath, fp, config):
            tasks.append({"path": str(path), "out": str(mpath), "fingerprint": fp, "config": config,
                          "caption_key": caption_key, "key_field": key_field,
                          "threads": 1 if workers > 1 else 0})
    reused = len(shards) - len(tasks)
    if reused:
        log(f"match: reusing stored matches for {reused} of {len(shards)} shards")
    _run_parallel(_match_shard, tasks, workers, "match", _init_worker, (str(matcher_path),))

    counts = np.zeros(len(entries), dtype=np.uint64)
    per_shard: list[ShardMatches] = []
    skips_total: Counter[str] = Counter()
    skips_by_shard: dict[str, dict[str, int]] = {}
    for path, mpath in zip(shards, match_files):
        m, _ = load_matches(mpath)
        per_shard.append(m)
        counts += np.bincount(m.ids, minlength=len(entries)).astype(np.uint64)
        if m.skip_reasons:
            skips_total.update(m.skip_reasons)
            skips_by_shard[str(path)] = m.skip_reasons
    counts_path = out / "entry_count.npy"
    save_npy(counts_path, counts)

    # Choosing t -----------------------------------------------------------------------
    all_offsets, all_ids, all_hashes = _concat_csr(per_shard)
    scores = record_scores(all_hashes, all_offsets, all_ids, counts, seed)
    if target_size is not None:
        t = solve_t(scores, target_size)
        log(f"t solved for target size {target_size:,}: t = {t:,.6g}")
    elif t is None:
        t = DEFAULT_T
        log(f"t = {t:,.0f} (MetaCLIP's 400M setting); a small pool needs a proportionally small t: see the table")
    probs = entry_probabilities(counts, t)
    save_npy(out / "entry_prob.npy", probs)
    pool_size = len(scores)
    matched = int(np.isfinite(scores).sum())
    kept = int((scores < t).sum())
    expected = expected_kept(all_offsets, all_ids, probs)
    ladder = [{"t": lt, "expected_kept": expected_kept(all_offsets, all_ids, entry_probabilities(counts, lt)),
               "kept_with_seed": int((scores < lt).sum())} for lt in _t_ladder(t)]
    log(_ladder_table(ladder, t, pool_size, matched))

    summary: dict[str, Any] = {
        "pool_size": pool_size,
        "matched": matched,
        "kept": kept,
        "expected_kept": expected,
        "t": t,
        "seed": seed,
        "target_size": target_size,
        "estimate_only": estimate_only,
        "shards": len(shards),
        "matches_reused_shards": reused,
        "entries": len(entries),
        "entries_with_count_over_t": int((counts > t).sum()),
        "entries_never_matched": int((counts == 0).sum()),
        "head_entries": _head(entries, counts, 20),
        "tail_entries": _tail(entries, counts, 20),
        "t_ladder": ladder,
        "skipped": dict(skips_total),
        "skipped_total": int(sum(v for k, v in skips_total.items() if k != "corrupt_tar_tail")),
        "skipped_by_shard": skips_by_shard,
    }

    # Pass 2 -------------------------------------------------------------------------
    if not estimate_only:
        root = _common_root(shards)
        counts_sha = _sha256_file(counts_path)
        stamp = {"t": t, "seed": seed, "counts_sha256": counts_sha}
        tasks = []
        kept_files = []
        for path, mpath in zip(shards, match_files):
            sid = _shard_id(path)
            dst = out / "data" / path.relative_to(root)
            done = work / "sampled" / f"{sid}.json"
            kept_keys = work / "kept" / f"{sid}.txt"
            kept_files.append(kept_keys)
            if _stamp_matches(done, stamp) and dst.exists() and kept_keys.exists():
                continue
            tasks.append({"path": str(path), "matches": str(mpath), "counts_path": str(counts_path),
                          "seed": seed, "t": t, "dst": str(dst), "kept_keys": str(kept_keys),
                          "done": str(done), "stamp": stamp})
        if len(tasks) < len(shards):
            log(f"sample: {len(shards) - len(tasks)} shards already written for this t and seed")
        _run_parallel(_sample_shard, tasks, workers, "sample")
        with atomic_write(out / "kept_keys.txt", "w") as f:
            for kf in kept_files:
                f.write(kf.read_text())
        written = sum(json.loads((work / "sampled" / f"{_shard_id(p)}.json").read_text())["kept"] for p in shards)
        if written != kept:
            raise RuntimeError(f"wrote {written} records but the scores keep {kept}: the pool changed during the run")

    manifest = {
        "tool": f"mode-fast {__version__}",
        "inputs": [_fingerprint(p) | {"records": len(m.offsets) - 1} for p, m in zip(shards, per_shard)],
        "metadata": {"source": str(metadata) if metadata else "mode_fast default (WordNet 3.0)",
                     "sha256": meta_sha, "entries": len(entries)},
        "caption_key": caption_key,
        "key_field": key_field,
        "t": t,
        "seed": seed,
        "target_size": target_size,
        "entry_count_sha256": _sha256_file(counts_path),
        "pool_size": pool_size,
        "matched": matched,
        "kept": kept,
    }
    write_json(out / "manifest.json", manifest)
    summary["seconds"] = time.perf_counter() - started
    write_json(out / "summary.json", summary)
    return summary


def _stamp_matches(path: Path, stamp: dict[str, Any]) -> bool:
    try:
        done = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return all(done.get(k) == v for k, v in stamp.items())


def _concat_csr(parts: Sequence[ShardMatches]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    offsets = [np.zeros(1, dtype=np.int64)]
    base = 0
    for m in parts:
        offsets.append(m.offsets[1:] + base)
        base += int(m.offsets[-1])
    ids = np.concatenate([m.ids for m in parts]) if parts else np.zeros(0, np.int32)
    hashes = np.concatenate([m.key_hashes for m in parts]) if parts else np.zeros(0, np.uint64)
    return np.concatenate(offsets), ids, hashes


def _head(entries: list[str], counts: np.ndarray, n: int) -> list[dict[str, Any]]:
    order = np.argsort(-counts.astype(np.int64), kind="stable")[:n]
    return [{"id": int(i), "entry": entries[i], "count": int(counts[i])} for i in order if counts[i] > 0]


def _tail(entries: list[str], counts: np.ndarray, n: int) -> list[dict[str, Any]]:
    nonzero = np.flatnonzero(counts)
    order = nonzero[np.argsort(counts[nonzero], kind="stable")][:n]
    return [{"id": int(i), "entry": entries[i], "count": int(counts[i])} for i in order]


def _ladder_table(ladder: list[dict[str, Any]], t: float, pool_size: int, matched: int) -> str:
    lines = [f"pool {pool_size:,} records, {matched:,} matched", "       t   expected kept   kept (this seed)"]
    for row in ladder:
        mark = "  <- chosen" if row["t"] == t else ""
        lines.append(f"{row['t']:>8.4g}   {row['expected_kept']:>13,.0f}   {row['kept_with_seed']:>16,}{mark}")
    return "\n".join(lines)


# --- CLI -------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pools", nargs="+", metavar="POOL", help="shard files, folders, or glob/brace patterns (.tar, .parquet, .jsonl[.gz])")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--metadata", help="MetaCLIP-style metadata.json (JSON list of strings); default: the shipped WordNet list")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--t", type=float, help=f"balancing threshold (default {DEFAULT_T:,.0f}, MetaCLIP 400M)")
    group.add_argument("--target-size", type=int, help="solve t so that exactly this many records are kept")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (kept set is independent of sharding and workers)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--caption-key", default="caption", help="caption field / member extension (default: json 'caption', else .txt)")
    parser.add_argument("--key-field", default=None, help="parquet/jsonl column with the record uid (default: uid, else key)")
    parser.add_argument("--estimate", action="store_true", help="count and print expected kept sizes for a ladder of t; write no curated shards")


def run(args: argparse.Namespace) -> int:
    from mode_fast.metadata import MetadataError

    try:
        summary = curate(
            args.pools, args.out, metadata=args.metadata, t=args.t, target_size=args.target_size,
            seed=args.seed, workers=args.workers, caption_key=args.caption_key, key_field=args.key_field,
            estimate_only=args.estimate, log=lambda msg: print(msg, file=sys.stderr),
        )
    except (ShardError, MetadataError, ValueError) as exc:
        print(f"mode-fast curate: error: {exc}", file=sys.stderr)
        return 2
    skipped = ", ".join(f"{k}={v}" for k, v in summary["skipped"].items()) or "none"
    print(
        f"pool {summary['pool_size']:,}  matched {summary['matched']:,}  kept {summary['kept']:,} "
        f"(expected {summary['expected_kept']:,.0f})  t={summary['t']:.6g}  skipped: {skipped}\n"
        f"outputs in {args.out}"
    )
    return 0
