"""MetaCLIP curation: match captions to metadata, count entries, balance by sampling.

Semantics: ../shared/reference/curation.md. The pipeline is two passes over the pool:

1. match + count (per shard, in parallel): each caption's matched entry ids are stored
   in ``OUT/.work/matches/<shard>.npz`` with the record keys; ``entry_count.npy`` is the
   sum over shards. A shard's matches are reused while its file (path, size, mtime), the
   metadata (sha256), the caption key and the key field are unchanged, so changing only
   t, the target size or the seed never re-matches.
2. sample (per shard, in parallel): a record with match set S is kept with probability
   ``1 - prod_{i in S} (1 - p_i)``, ``p_i = min(1, t / count_i)``.

How sampling is made reproducible and independent of sharding and workers: every
(record, entry) pair gets a uniform u from a hash of (seed, record key, entry id). The
record is kept iff some matched entry has ``u < p``, which has the reference's
probability (independent draws, one per entry), and since ``u < min(1, t/c)`` iff
``u*c < t``, each record has one score ``r = min_{i in S} u_i * count_i`` and is kept iff
``r < t``. So a smaller t keeps a subset of a larger t's set, the kept size for any t is
known exactly before sampling, and ``--target-size N`` solves t exactly from the stored
match lists. Records with the same key get the same draws (duplicate keys are reported).

Outputs in OUT: ``entry_count.npy`` (uint64), ``entry_prob.npy`` (float64) and
``summary.json`` describe the last run, ``--estimate`` included; ``manifest.json``,
``kept_keys.txt`` and ``data/`` (curated shards, input names relative to the pools'
common folder) describe the last finished curation: manifest.json and kept_keys.txt are
removed before any curated shard is rewritten and written last, so their presence means
``data/`` is complete. Every file is written atomically; a killed run resumes at the
first shard whose outputs are missing or were made for another t, seed or input.
Memory in the main process: about 16 bytes per record plus 4 per match (scores, key
hashes, one shard's match lists at a time).
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mode_fast import __version__
from mode_fast._matcher import Matcher, hash_keys
from mode_fast.data.io import DataKeyError, ShardError, describe_fields, list_shards, read_shard, write_kept
from mode_fast.executor import LocalExecutor, RayExecutor, add_executor_arguments, make_executor, run_with_progress
from mode_fast.files import atomic_write, save_npy, write_json
from mode_fast.runs import RunState, fingerprint

__all__ = [
    "DEFAULT_T",
    "Matcher",
    "add_arguments",
    "curate",
    "entry_probabilities",
    "expected_kept",
    "key_hashes",
    "pair_uniforms",
    "record_scores",
    "run",
    "solve_t",
]

DEFAULT_T = 20_000.0  # MetaCLIP's t for its 400M set (from ~1.6B pairs)
METACLIP_POOL_SIZE = 1.6e9  # the pool DEFAULT_T was chosen for, to suggest a proportional t
MATCHES_FORMAT = 1  # bump when the .npz layout changes: old files are then recomputed

Log = Callable[[str], None]


def key_hashes(keys: Sequence[str], seed: int = 0) -> np.ndarray:
    """Stable 64-bit hash of each key (UTF-8), uint64. The one place keys are hashed."""
    return hash_keys(list(keys), seed)


# --- balancing maths -------------------------------------------------------------------


def entry_probabilities(counts: np.ndarray, t: float) -> np.ndarray:
    """p_i = min(1, t / count_i); entries never matched get p = 1."""
    counts = np.asarray(counts, dtype=np.float64)
    return np.where(counts > t, t / np.maximum(counts, 1.0), 1.0)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    # splitmix64's finaliser; uint64 arithmetic wraps, as intended.
    x = x ^ (x >> np.uint64(31))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def pair_uniforms(key_hash: np.ndarray, offsets: np.ndarray, ids: np.ndarray, seed: int) -> np.ndarray:
    """One uniform in [0, 1) per (record, matched entry) pair (53-bit mantissa), a pure
    function of (seed, key hash, entry id): the same wherever the record is processed."""
    per_pair_key = np.repeat(np.asarray(key_hash, dtype=np.uint64), np.diff(offsets))
    with np.errstate(over="ignore"):
        seed_mix = _mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
        x = _mix64(per_pair_key ^ seed_mix ^ ((ids.astype(np.uint64) + np.uint64(1)) * _GOLDEN))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def record_scores(
    key_hash: np.ndarray, offsets: np.ndarray, ids: np.ndarray, counts: np.ndarray, seed: int
) -> np.ndarray:
    """r = min over matched entries of u * count; +inf for records with no match.
    A record is kept at threshold t iff r < t."""
    n = len(offsets) - 1
    scores = np.full(n, np.inf)
    if ids.size == 0:
        return scores
    pair_score = pair_uniforms(key_hash, offsets, ids, seed) * np.asarray(counts)[ids].astype(np.float64)
    matched = np.diff(offsets) > 0
    # reduceat over the starts of non-empty segments only (an empty one would report
    # the next record's first value).
    scores[matched] = np.minimum.reduceat(pair_score, offsets[:-1][matched])
    return scores


def expected_kept(offsets: np.ndarray, ids: np.ndarray, probs: np.ndarray) -> float:
    """Expected number kept: sum over records of 1 - prod_{i in S} (1 - p_i)."""
    if ids.size == 0:
        return 0.0
    with np.errstate(divide="ignore"):
        log_miss = np.log1p(-np.minimum(probs[ids], 1.0))  # -inf where p = 1: kept surely
    matched = np.diff(offsets) > 0
    per_record = np.add.reduceat(log_miss, offsets[:-1][matched])
    return float(np.sum(-np.expm1(per_record)))


def solve_t(scores: np.ndarray, target_size: int) -> float:
    """The t that keeps exactly `target_size` records (kept iff score < t).

    t is the midpoint between the target_size-th and the next smallest score. Scores of
    different keys are continuous and never tie in practice; records with the same key
    and match set (duplicates) tie exactly, and if such a tie straddles the boundary
    all of its records are dropped (t equals their score), so the kept size is below
    the target by at most the tie's size. A target at or above the number of matched
    records keeps them all.
    """
    if target_size <= 0:
        raise ValueError(f"target size must be positive, got {target_size}")
    finite = np.sort(scores[np.isfinite(scores)])
    if target_size >= len(finite):
        return float(np.nextafter(finite[-1], np.inf)) if len(finite) else 1.0
    lo, hi = finite[target_size - 1], finite[target_size]
    return float(lo + (hi - lo) / 2)


# --- pass 1: match and count -------------------------------------------------------------


def _shard_id(path: Path) -> str:
    """File name plus a hash of the full path: unique, and readable in .work/."""
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    return f"{path.name}-{digest}"


_worker_matcher: Any = None
_worker_lid: Any = None  # metaclip2: language ID, loaded once per worker


def _init_worker(matcher_path: str, semantics: str = "metaclip1") -> None:
    global _worker_matcher, _worker_lid
    if semantics == "metaclip2":
        from mode_fast.worldwide import LanguageIdentifier, LanguageMatchers

        _worker_matcher = LanguageMatchers.load(matcher_path)  # one automaton per language
        _worker_lid = LanguageIdentifier()
    else:
        _worker_matcher = Matcher.load(matcher_path)  # loaded, never rebuilt, per worker


def _match_shard(task: dict[str, Any]) -> dict[str, Any]:
    """Read one shard, match its captions, write its npz; returns stats (runs in a worker)."""
    path = Path(task["path"])
    captions: list[str] = []
    keys: list[str] = []
    has_caption: list[bool] = []
    skips: Counter[str] = Counter()
    missing_fields: str | None = None
    worldwide = task.get("semantics") == "metaclip2"
    lone_surrogates = 0
    for rec in read_shard(path, task["caption_key"], task["key_field"]):
        if rec.skip_reason == "corrupt_tar_tail":  # not a record: no index
            skips[rec.skip_reason] += 1
            continue
        if worldwide and rec.skip_reason == "invalid_utf8":
            from mode_fast.worldwide import lone_surrogate_caption

            caption = lone_surrogate_caption(rec, task["caption_key"], path)
            if caption is not None:  # MetaCLIP 2 matches the rest of such a caption
                rec.caption, rec.skip_reason = caption, None
                lone_surrogates += 1
        keys.append(rec.key)
        has_caption.append(rec.caption is not None)
        if rec.caption is None:
            skips[rec.skip_reason or "missing_caption"] += 1
            if rec.skip_reason == "missing_caption" and missing_fields is None:
                missing_fields = describe_fields(rec.sample)  # for a wrong --caption-key error
        captions.append(rec.caption or "")
    langs: list[str] = []
    if worldwide:
        from mode_fast.worldwide import match_captions

        offsets, ids, langs = match_captions(_worker_matcher, _worker_lid, captions, has_caption, task["threads"])
    else:
        offsets, ids = _worker_matcher.match_batch(captions, threads=task["threads"])
    # Skipped records keep their index (the writer counts records the same way) but
    # match nothing.
    if not all(has_caption):
        lengths = np.diff(offsets)
        ids = ids[np.repeat(np.asarray(has_caption), lengths)]
        offsets = np.concatenate([[0], np.cumsum(np.where(has_caption, lengths, 0))]).astype(np.int64)
    meta = {
        "format": MATCHES_FORMAT,
        "fingerprint": task["fingerprint"],
        "skips": dict(skips),
        "config": task["config"],
        "missing_caption_fields": missing_fields,
    }
    extra = {}
    if worldwide:  # the language is stored, so re-balancing never re-runs language ID
        meta["lone_surrogate_captions"] = lone_surrogates
        extra["langs"] = np.array(langs, dtype=str)
    with atomic_write(task["out"]) as f:
        np.savez(
            f,
            offsets=offsets,
            ids=ids,
            key_hashes=key_hashes(keys),
            keys=np.array(keys, dtype=str),
            meta=np.array(json.dumps(meta)),
            **extra,
        )
    return {"records": len(keys)}


def _read_npz(path: Path, *names: str) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as z:  # npz arrays load lazily: only what is named
        return [z[n] for n in names]


def _matches_meta(path: Path) -> dict[str, Any] | None:
    try:
        (meta,) = _read_npz(path, "meta")
        return json.loads(str(meta))
    except Exception:  # missing, damaged or another layout: recompute
        return None


def _build_matcher(
    work: Path, entries: list[str], meta_sha: str, by_language: dict[str, list[str]] | None = None
) -> Path:
    """Build the matcher once per metadata list and save it for the workers to load
    (metaclip2: one per language, in a folder)."""
    if by_language is not None:
        from mode_fast.worldwide import LanguageMatchers

        folder = work / f"matchers-metaclip2-{__version__}-{meta_sha[:16]}"
        if not LanguageMatchers.complete(folder):
            LanguageMatchers(by_language).save(folder)  # languages.json last: complete or rebuilt
        return folder
    path = work / f"matcher-{__version__}-{meta_sha[:16]}.bin"
    if not path.exists():
        Matcher(entries).save(path)  # atomic (mode_fast.files): a killed build leaves no matcher
    return path


# --- pass 2: sample ----------------------------------------------------------------------


def _sample_shard(task: dict[str, Any]) -> dict[str, Any]:
    """Write one curated shard, its kept keys and its done stamp (runs in a worker)."""
    offsets, ids, hashes, keys = _read_npz(Path(task["matches"]), "offsets", "ids", "key_hashes", "keys")
    counts = np.load(task["counts_path"])
    t: Any = task["t"]
    if "t_by_language" in task:  # metaclip2: each record against its language's t
        (langs,) = _read_npz(Path(task["matches"]), "langs")
        t = np.array([task["t_by_language"].get(lang, -np.inf) for lang in langs.tolist()], dtype=np.float64)
    keep = record_scores(hashes, offsets, ids, counts, task["seed"]) < t
    written = write_kept(task["path"], task["dst"], keep)
    if written != int(keep.sum()):
        raise ShardError(
            f"{task['path']}: wrote {written} records but meant to keep {int(keep.sum())}; "
            "the shard changed since it was matched"
        )
    with atomic_write(task["kept_keys"], "w") as f:
        f.writelines(f"{key}\n" for key in keys[keep])
    # Written last: its presence (with this stamp) marks the shard done.
    write_json(task["done"], task["stamp"] | {"kept": written})
    return {"records": len(keep), "kept": written}


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


def _load_entries(metadata: str | os.PathLike | Sequence[str] | None) -> tuple[list[str], str]:
    from mode_fast.metadata import load_metadata, validate_metadata

    if metadata is None:
        return load_metadata(None), "mode_fast default (WordNet 3.0)"
    if isinstance(metadata, (str, os.PathLike)):
        return load_metadata(metadata), str(metadata)
    entries = validate_metadata(list(metadata), "metadata list")
    return entries, f"list of {len(entries)} entries given in code"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def curate(
    pools: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    metadata: str | os.PathLike | Sequence[str] | None = None,
    t: float | None = None,
    target_size: int | None = None,
    seed: int = 0,
    workers: int | None = 1,
    executor: str = "local",
    ray_address: str | None = None,
    caption_key: str = "caption",
    key_field: str | None = None,
    estimate_only: bool = False,
    overwrite: bool = False,
    log: Log = print,
    semantics: str = "metaclip1",
) -> dict[str, Any]:
    """Curate `pools` into `out_dir`; returns the summary (also written as summary.json).

    metadata: a metadata.json path, a list of strings, or None for the shipped WordNet
    list. Give t or target_size (neither: DEFAULT_T). executor: 'local' (workers
    processes, None: all cores) or 'ray' (workers actors, None: the cluster's CPUs; joins
    ray_address or RAY_ADDRESS, else starts a local Ray); outputs are the same either way.
    estimate_only: counts, summary and the t table, no curated shards. Reruns follow the
    shared rule (mode_fast.runs): one run per out_dir at a time, a finished curation rerun
    unchanged is a no-op, overwrite=True starts over.
    semantics: 'metaclip1' (MetaCLIP's rules) or 'metaclip2' (MetaCLIP 2 worldwide: language
    ID, one metadata list per language given as a folder, JSON object or dict, and t as
    English's threshold; mode_fast.worldwide).
    """
    if semantics not in ("metaclip1", "metaclip2"):
        from mode_fast.errors import ConfigError

        raise ConfigError(f"--semantics must be metaclip1 or metaclip2, not {semantics!r}")
    if t is not None and target_size is not None:
        raise ValueError("give either t or target_size, not both")
    if t is not None and not (t > 0 and math.isfinite(t)):
        raise ValueError(f"t must be a positive number, got {t}")
    t = None if t is None else float(t)  # the manifest says 20.0 whether the caller passed 20 or 20.0
    if target_size is not None and target_size <= 0:
        raise ValueError(f"target size must be positive, got {target_size}")
    from mode_fast.metadata import metadata_sha256

    started = time.perf_counter()
    out = Path(out_dir)
    work = out / ".work"
    shards = list_shards(pools)
    by_language: dict[str, list[str]] | None = None
    if semantics == "metaclip2":
        from mode_fast import worldwide

        by_language, metadata_source = worldwide.load_metadata_by_language(metadata)
        entries = [e for lang in sorted(by_language) for e in by_language[lang]]  # global ids
        meta_sha = worldwide.language_metadata_sha256(by_language)
        worldwide.LanguageIdentifier()  # fails here, in one line, if py3langid is missing
    else:
        entries, metadata_source = _load_entries(metadata)
        meta_sha = metadata_sha256(entries)
    # The shared lifecycle (mode_fast.runs): lock, run.json, interrupts. Curate recomputes
    # whatever a changed field affects itself (per-shard stamps below), so no field stops it.
    args = {
        "--metadata": meta_sha,
        "--caption-key": caption_key,
        "--key-field": key_field,
        "--t": t,
        "--target-size": target_size,
        "--seed": seed,
        "--estimate": estimate_only,
    }
    if by_language is not None:
        args["--semantics"] = semantics
    with (
        RunState.open(
            out,
            "curate",
            inputs={str(p): fingerprint(p) for p in shards},
            args=args,
            recompute=lambda field: [],
            overwrite=overwrite,
            owned=OWNED,
            log=log,
        ) as state,
        state.interrupts(),
    ):
        if state.finished and (out / "summary.json").exists():
            log(f"curate: {out} already holds this curation (same inputs and arguments): nothing to do")
            return json.loads((out / "summary.json").read_text())
        runner = make_executor(executor, workers, ray_address)
        try:
            summary = _curate(
                runner,
                shards,
                out,
                work,
                entries,
                metadata_source,
                meta_sha,
                t,
                target_size,
                seed,
                caption_key,
                key_field,
                estimate_only,
                log,
                started,
                state,
                by_language,
            )
        finally:
            runner.close()
        state.finish(_outputs(out, work, estimate_only))
        return summary


OWNED = ("data", ".work", "manifest.json", "kept_keys.txt", "entry_count.npy", "entry_prob.npy", "summary.json")


def _outputs(out: Path, work: Path, estimate_only: bool) -> list[Path]:
    """Every file a finished curation needs (run.json checks them before a no-op rerun)."""
    files = [out / "entry_count.npy", out / "entry_prob.npy", out / "summary.json", *work.glob("matches/*.npz")]
    if not estimate_only:
        files += [
            out / "manifest.json",
            out / "kept_keys.txt",
            *work.glob("sampled/*.json"),
            *work.glob("kept/*.txt"),
            *(p for p in (out / "data").rglob("*") if p.is_file()),
        ]
    return files


def _curate(
    runner: LocalExecutor | RayExecutor,
    shards: list[Path],
    out: Path,
    work: Path,
    entries: list[str],
    metadata_source: str,
    meta_sha: str,
    t: float | None,
    target_size: int | None,
    seed: int,
    caption_key: str,
    key_field: str | None,
    estimate_only: bool,
    log: Log,
    started: float,
    state: RunState,
    by_language: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    semantics = "metaclip1" if by_language is None else "metaclip2"
    if by_language is not None:
        from mode_fast import worldwide
    # One process alone may use every core for matching; several share them.
    threads = 0 if runner.runs_inline(len(shards)) else 1

    # Pass 1: match and count ------------------------------------------------------------
    # The tool version too: a fixed matcher or reader must not reuse older match lists.
    config = {"metadata_sha256": meta_sha, "caption_key": caption_key, "key_field": key_field, "tool": __version__}
    if by_language is not None:
        config |= {"semantics": semantics, "language_id": worldwide.lid_version()}
    fingerprints = [fingerprint(p) for p in shards]
    match_files = [work / "matches" / f"{_shard_id(p)}.npz" for p in shards]
    tasks: list[dict[str, Any]] = []
    stale = 0
    for path, fp, mpath in zip(shards, fingerprints, match_files):
        meta = _matches_meta(mpath)
        if (
            meta is not None
            and meta.get("format") == MATCHES_FORMAT
            and meta.get("fingerprint") == fp
            and meta.get("config") == config
        ):
            continue
        stale += meta is not None
        tasks.append(
            {
                "path": str(path),
                "out": str(mpath),
                "fingerprint": fp,
                "config": config,
                "caption_key": caption_key,
                "key_field": key_field,
                "threads": threads,
                "semantics": semantics,
            }
        )
    reused = len(shards) - len(tasks)
    if reused:
        log(f"match: reusing stored matches for {reused} of {len(shards)} shards")
    if stale:
        log(f"match: recomputing {stale} shards whose file, metadata, caption key or key field changed")
    if tasks:
        matcher_path = _build_matcher(work, entries, meta_sha, by_language)
        run_with_progress(
            runner,
            _match_shard,
            tasks,
            "match",
            (_init_worker, (str(matcher_path), semantics)),
            on_result=state.track("match", len(shards), reused),
        )

    counts = np.zeros(len(entries), dtype=np.uint64)
    records_per_shard: list[int] = []
    skips_total: Counter[str] = Counter()
    skips_by_shard: dict[str, dict[str, int]] = {}
    missing_fields: str | None = None
    lone_surrogates = 0
    for path, mpath in zip(shards, match_files):
        ids, offsets, meta_arr = _read_npz(mpath, "ids", "offsets", "meta")
        counts += np.bincount(ids, minlength=len(entries)).astype(np.uint64)
        records_per_shard.append(len(offsets) - 1)
        meta = json.loads(str(meta_arr))
        skips = meta["skips"]
        lone_surrogates += meta.get("lone_surrogate_captions", 0)
        missing_fields = missing_fields or meta.get("missing_caption_fields")
        if skips:
            skips_total.update(skips)
            skips_by_shard[str(path)] = skips
    records = sum(records_per_shard)
    captioned = records - sum(v for k, v in skips_total.items() if k != "corrupt_tar_tail")
    if captioned == 0 and skips_total["missing_caption"]:  # not bad data: a wrong key
        raise DataKeyError(
            f"caption key {caption_key!r} is in none of the {records:,} records; they have "
            f"{missing_fields or 'other fields'}: pass --caption-key with one of them"
        )
    counts_path = out / "entry_count.npy"
    save_npy(counts_path, counts)

    # Scores (one per record, pool order) fix the kept set for every t ------------------
    score_parts, hash_parts, lang_parts = [], [], []
    for mpath in match_files:
        offsets, ids, hashes = _read_npz(mpath, "offsets", "ids", "key_hashes")
        score_parts.append(record_scores(hashes, offsets, ids, counts, seed))
        hash_parts.append(hashes)
        if by_language is not None:
            lang_parts.append(_read_npz(mpath, "langs")[0])
    scores = np.concatenate(score_parts) if score_parts else np.zeros(0)
    pool_size = len(scores)
    duplicate_keys = pool_size - len(np.unique(np.concatenate(hash_parts))) if pool_size else 0
    del score_parts, hash_parts
    matched = int(np.isfinite(scores).sum())
    # metaclip2: each language's t follows from English's (mode_fast.worldwide); a record is
    # kept iff its score < its language's t, so `t` below is English's.
    balance = None
    if by_language is not None:
        langs = np.concatenate(lang_parts) if lang_parts else np.zeros(0, dtype=str)
        balance = worldwide.WorldwideBalance(worldwide.LanguageMatchers.layout(by_language), counts, scores, langs)

    def record_t(t_en: float) -> Any:
        return t_en if balance is None else balance.record_thresholds(balance.thresholds(t_en))

    def probabilities(t_en: float) -> np.ndarray:
        return entry_probabilities(counts, t_en) if balance is None else balance.probabilities(balance.thresholds(t_en))

    if pool_size and not matched:
        log(f"warning: none of the {pool_size:,} records matched the metadata; check --metadata and --caption-key")

    if target_size is not None:
        t = solve_t(scores, target_size) if balance is None else balance.solve(target_size)[0]
        log(f"t solved for target size {target_size:,}: t = {t:,.6g}")
        if target_size > matched:
            log(f"note: only {matched:,} records match the metadata; all of them are kept")
    elif t is None:
        t = DEFAULT_T
        suggestion = max(1.0, DEFAULT_T * pool_size / METACLIP_POOL_SIZE)
        log(
            f"t = {t:,.0f} (MetaCLIP's setting for a 1.6B-pair pool); a small pool needs a proportionally "
            f"small t (here about {suggestion:.3g}): see the table, or use --target-size"
        )
    probs = probabilities(t)
    save_npy(out / "entry_prob.npy", probs)
    kept = int((scores < record_t(t)).sum())
    if target_size is not None and target_size <= matched and kept != target_size:
        why = (
            "duplicate keys tie at the boundary"
            if balance is None
            else "at an English count every other language's t steps at once (MetaCLIP 2's p_to_t), or duplicate keys tie"
        )
        log(f"note: kept {kept:,}, not {target_size:,}: {why}")
    t_by_language = None if balance is None else balance.thresholds(t)
    if t_by_language is not None:
        log("t per language (English's tail share): " + ", ".join(f"{k}={v:,.6g}" for k, v in t_by_language.items()))

    ladder_ts = _t_ladder(t)
    ladder_probs = {lt: probabilities(lt) for lt in ladder_ts}
    expected_by_t = dict.fromkeys(ladder_ts, 0.0)
    for mpath in match_files:
        offsets, ids = _read_npz(mpath, "offsets", "ids")
        for lt in ladder_ts:
            expected_by_t[lt] += expected_kept(offsets, ids, ladder_probs[lt])
    ladder = [
        {"t": lt, "expected_kept": expected_by_t[lt], "kept_with_seed": int((scores < record_t(lt)).sum())}
        for lt in ladder_ts
    ]
    log(_ladder_table(ladder, t, pool_size, matched))

    summary: dict[str, Any] = {
        "pool_size": pool_size,
        "matched": matched,
        "kept": kept,
        "expected_kept": expected_by_t[t],
        "t": t,
        "seed": seed,
        "target_size": target_size,
        "estimate_only": estimate_only,
        "shards": len(shards),
        "matches_reused_shards": reused,
        "matches_computed_shards": len(tasks),
        "duplicate_keys": int(duplicate_keys),
        "entries": len(entries),
        "entries_with_count_over_t": int((counts > t).sum()),
        "entries_never_matched": int((counts == 0).sum()),
        "head_entries": _head(entries, counts, 20),
        "tail_entries": _tail(entries, counts, 20),
        "t_ladder": ladder,
        "skipped": dict(skips_total),
        # records skipped; corrupt_tar_tail counts damaged shard ends, not records
        "skipped_total": int(sum(v for k, v in skips_total.items() if k != "corrupt_tar_tail")),
        "skipped_by_shard": skips_by_shard,
    }
    if balance is not None and t_by_language is not None:
        summary |= {
            "semantics": semantics,
            "lone_surrogate_captions": lone_surrogates,
            "entries_with_count_over_t": sum(
                int((c > t_by_language[lang]).sum()) for lang, c in balance.counts_by_lang.items()
            ),
            **balance.summary(t_by_language, by_language, _head, _tail),
        }

    # Pass 2: sample ---------------------------------------------------------------------
    if not estimate_only:
        summary |= _write_curated(
            out,
            work,
            shards,
            fingerprints,
            match_files,
            config,
            counts_path,
            t,
            seed,
            kept,
            runner,
            log,
            state,
            t_by_language,
        )
        manifest = {
            "tool": f"mode-fast {__version__}",
            "inputs": [fp | {"records": n} for fp, n in zip(fingerprints, records_per_shard)],
            "metadata": {"source": metadata_source, "sha256": meta_sha, "entries": len(entries)},
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
        if t_by_language is not None:
            manifest |= {"semantics": semantics, "t_by_language": t_by_language}
        write_json(out / "manifest.json", manifest)  # last: marks the curation finished
    summary["seconds"] = time.perf_counter() - started
    write_json(out / "summary.json", summary)
    return summary


def _write_curated(
    out: Path,
    work: Path,
    shards: list[Path],
    fingerprints: list[dict[str, Any]],
    match_files: list[Path],
    config: dict[str, Any],
    counts_path: Path,
    t: float,
    seed: int,
    kept: int,
    runner: LocalExecutor | RayExecutor,
    log: Log,
    state: RunState,
    t_by_language: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Pass 2: curated shards under out/data, kept_keys.txt; resumes finished shards."""
    root = _common_root(shards)
    stamp_base = {"t": t, "seed": seed, "counts_sha256": _sha256_file(counts_path)}
    by_language = {} if t_by_language is None else {"t_by_language": t_by_language}
    stamp_base |= by_language
    tasks, done_files, kept_files, dsts = [], [], [], set()
    for path, fp, mpath in zip(shards, fingerprints, match_files):
        sid = _shard_id(path)
        dst = out / "data" / path.relative_to(root)
        done, kept_keys = work / "sampled" / f"{sid}.json", work / "kept" / f"{sid}.txt"
        done_files.append(done)
        kept_files.append(kept_keys)
        dsts.add(str(dst))
        stamp = stamp_base | {"input": fp, "config": config, "dst": str(dst)}
        previous = _read_json(done)
        if (
            previous is not None
            and all(previous.get(k) == v for k, v in stamp.items())
            and dst.exists()
            and kept_keys.exists()
        ):
            continue
        tasks.append(
            {
                "path": str(path),
                "matches": str(mpath),
                "counts_path": str(counts_path),
                "seed": seed,
                "t": t,
                "dst": str(dst),
                "kept_keys": str(kept_keys),
                "done": str(done),
                "stamp": stamp,
            }
            | by_language
        )
    if len(tasks) < len(shards):
        log(f"sample: {len(shards) - len(tasks)} of {len(shards)} shards already written for this t, seed and input")
    if tasks:
        # From here until the end, data/ is a mix: no manifest or key list may claim otherwise.
        for name in ("manifest.json", "kept_keys.txt"):
            (out / name).unlink(missing_ok=True)
    run_with_progress(
        runner, _sample_shard, tasks, "sample", on_result=state.track("sample", len(shards), len(shards) - len(tasks))
    )
    removed = _remove_stale_outputs(work, set(map(str, done_files)), dsts)
    if removed:
        log(f"sample: removed {removed} curated shards of inputs no longer in the pool")
    written = sum(_read_json(d)["kept"] for d in done_files)  # type: ignore[index]
    if written != kept:
        raise RuntimeError(f"wrote {written} records but the scores keep {kept}: the pool changed during the run")
    with atomic_write(out / "kept_keys.txt", "w") as f:
        for part in kept_files:
            f.write(part.read_text())
    return {"sampled_shards": len(tasks), "stale_outputs_removed": removed}


def _remove_stale_outputs(work: Path, current_stamps: set[str], current_dsts: set[str]) -> int:
    """Curated shards written by earlier runs for inputs that are not in this pool."""
    removed = 0
    for stamp_path in (work / "sampled").glob("*.json"):
        if str(stamp_path) in current_stamps:
            continue
        stamp = _read_json(stamp_path) or {}
        dst = stamp.get("dst")
        if dst and dst not in current_dsts and Path(dst).exists():
            Path(dst).unlink()
            removed += 1
        (work / "kept" / f"{stamp_path.stem}.txt").unlink(missing_ok=True)
        stamp_path.unlink()
    return removed


def _head(entries: list[str], counts: np.ndarray, n: int) -> list[dict[str, Any]]:
    order = np.argsort(-counts.astype(np.int64), kind="stable")[:n]
    return [{"id": int(i), "entry": entries[i], "count": int(counts[i])} for i in order if counts[i] > 0]


def _tail(entries: list[str], counts: np.ndarray, n: int) -> list[dict[str, Any]]:
    nonzero = np.flatnonzero(counts)
    order = nonzero[np.argsort(counts[nonzero], kind="stable")][:n]
    return [{"id": int(i), "entry": entries[i], "count": int(counts[i])} for i in order]


def _ladder_table(ladder: list[dict[str, Any]], t: float, pool_size: int, matched: int) -> str:
    lines = [f"pool {pool_size:,} records, {matched:,} matched", "         t   expected kept   kept (this seed)"]
    for row in ladder:
        mark = "  <- chosen" if row["t"] == t else ""
        lines.append(f"{row['t']:>10,.6g}   {row['expected_kept']:>13,.0f}   {row['kept_with_seed']:>16,}{mark}")
    return "\n".join(lines)


# --- CLI -------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "pools",
        nargs="+",
        metavar="POOL",
        help="shard files, folders, or glob/brace patterns (.tar, .parquet, .jsonl[.gz])",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--metadata", help="MetaCLIP-style metadata.json (JSON list of strings); default: the shipped WordNet list"
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--t",
        type=float,
        help=f"balancing threshold (default {DEFAULT_T:,.0f}, MetaCLIP 400M; "
        "a small pool needs a proportionally small t)",
    )
    group.add_argument("--target-size", type=int, help="solve t so that exactly this many records are kept")
    parser.add_argument(
        "--seed", type=int, default=0, help="sampling seed (the kept set is independent of sharding and workers)"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="processes (local) or actors (ray) over shards (default: all cores)"
    )
    add_executor_arguments(parser)
    parser.add_argument(
        "--caption-key",
        default="caption",
        help="caption member extension or json/column field (default: json 'caption', else .txt)",
    )
    parser.add_argument(
        "--key-field", default=None, help="parquet/jsonl column holding the record uid (default: uid, else key)"
    )
    parser.add_argument(
        "--semantics",
        choices=("metaclip1", "metaclip2"),
        default="metaclip1",
        help="metaclip1: MetaCLIP's matching and one t (default); metaclip2: MetaCLIP 2 worldwide "
        "(language ID, --metadata a folder of <lang>.json lists or a JSON object of them, "
        "--t the English threshold; needs mode-fast[worldwide])",
    )
    parser.add_argument(
        "--estimate",
        action="store_true",
        help="count and print expected kept sizes for a ladder of t; write no curated shards",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="start over: remove this job's earlier outputs in --out first"
    )


def run(args: argparse.Namespace) -> int:
    from mode_fast.errors import ConfigError

    # Numbers that cannot work are refused here, naming the flag; everything else a user can
    # cause raises a mode_fast.errors.ModeFastError that the CLI prints as one line.
    if args.t is not None and not args.t > 0:
        raise ConfigError(f"--t must be a positive number, got {args.t}")
    if args.target_size is not None and args.target_size < 1:
        raise ConfigError(f"--target-size must be >= 1, got {args.target_size}")
    if args.workers is not None and args.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {args.workers}")
    summary = curate(
        args.pools,
        args.out,
        metadata=args.metadata,
        t=args.t,
        target_size=args.target_size,
        seed=args.seed,
        workers=args.workers,
        executor=args.executor,
        ray_address=args.ray_address,
        caption_key=args.caption_key,
        key_field=args.key_field,
        estimate_only=args.estimate,
        overwrite=args.overwrite,
        log=lambda msg: print(msg, file=sys.stderr),
        semantics=args.semantics,
    )
    skipped = ", ".join(f"{k}={v}" for k, v in summary["skipped"].items()) or "none"
    what = "estimated" if summary["estimate_only"] else "kept"
    print(
        f"pool {summary['pool_size']:,}  matched {summary['matched']:,}  {what} {summary['kept']:,} "
        f"(expected {summary['expected_kept']:,.0f})  t={summary['t']:.6g}  skipped: {skipped}\n"
        f"outputs in {args.out}"
    )
    if "languages" in summary:  # metaclip2: one line per language
        from mode_fast.worldwide import format_language_summary

        print(format_language_summary(summary))
    return 0
