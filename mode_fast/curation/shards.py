"""The curation's work per shard, and its files: the library under `mode-fast curate`.

Two passes over the pool, each one task per shard run by `mode_fast.core.executor` (local
processes or Ray actors): `match_shard` (pass 1) reads a shard, matches its captions and
writes the shard's match lists; `sample_shard` (pass 2) writes its curated shard. The
balancing between them (counts, scores, t) is `mode_fast.curation.balance`; the job
(`mode_fast.curation.run`) only orders the steps.

Files under ``OUT/.work`` (`ShardFiles` names them per input shard, by
`mode_fast.data.io.shard_id`, the id cluster names its files by too):

- ``matches/<shard id>.npz`` (layout `MATCHES_FORMAT`): ``offsets``, ``ids`` (CSR of the
  matched entry ids per record, in file order), ``key_hashes``, ``keys``, ``meta`` (JSON:
  format, input fingerprint, match config, skips by reason, the fields of a record missing
  its caption [, lone_surrogate_captions]) [, ``langs``: metaclip2's language per record,
  so re-balancing never re-runs language ID]. Reused while the input's fingerprint and
  the match config (metadata sha256, caption key, key field, tool version [, language
  ID]) are unchanged, so a new t, target size or seed never re-matches.
- ``matcher-<version>-<sha>.bin`` (metaclip2: a ``matchers-metaclip2-...`` folder): the
  matcher, built once per metadata list and loaded, never rebuilt, by each worker.
- ``sampled/<shard id>.json``: pass 2's done stamp (t, seed, counts sha256, input, match
  config, destination relative to OUT, kept count), written last; ``kept/<shard id>.txt``
  its kept keys. A stamp for an input no longer in the pool marks a curated shard to
  remove; its destination is data read back, so it is removed only when it lies inside
  OUT (`mode_fast.core.files.inside`), and nothing is removed unless every one does.

Curated shards go to ``OUT/data/`` under their path relative to the pools' common folder.

A key list (``curate --keep-keys``) is applied after matching: the match lists hold every
record, so a changed list never re-matches; the records it does not list are treated as
matching nothing from the count on (`listed_masks`, `drop_unlisted`), and the list's
sha256 is in pass 2's stamp, so a changed list re-samples every shard.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mode_fast import __version__
from mode_fast._matcher import FILE_FORMAT, Matcher
from mode_fast.core.files import atomic_write, inside, save_npz, sha256_file, write_json
from mode_fast.core.runs import fingerprint
from mode_fast.curation.balance import expected_kept, key_hashes, record_scores
from mode_fast.data.io import (
    CORRUPT_TAR_TAIL,
    ShardError,
    describe_fields,
    lone_surrogate_caption,
    read_shard,
    shard_id,
    write_kept,
)

WORK = ".work"  # the work folder under OUT (module doc)
MATCHES_FORMAT = 1  # bump when the .npz layout changes: old files are then recomputed
METACLIP2 = "metaclip2"


# --- where each shard's work lives -------------------------------------------------------------


@dataclass(frozen=True)
class ShardFiles:
    """One input shard and the files its work writes (module docstring)."""

    path: Path
    fingerprint: dict[str, Any]
    matches: Path
    done: Path
    kept_keys: Path
    dst: Path


def shard_files(out: Path, shards: Sequence[Path]) -> list[ShardFiles]:
    """The files of every shard of the pool, in pool order."""
    work = out / WORK
    root = Path(os.path.commonpath([str(p.parent) for p in shards])) if shards else out
    files = []
    for path in shards:
        sid = shard_id(path)
        files.append(
            ShardFiles(
                path,
                fingerprint(path),
                work / "matches" / f"{sid}.npz",
                work / "sampled" / f"{sid}.json",
                work / "kept" / f"{sid}.txt",
                out / "data" / path.relative_to(root),
            )
        )
    return files


def read_matches(path: Path, *names: str) -> list[np.ndarray]:
    """The named arrays of a matches file (npz arrays load lazily: only what is named)."""
    with np.load(path, allow_pickle=False) as z:
        return [z[n] for n in names]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --- pass 1: match ------------------------------------------------------------------------------


def match_config(meta_sha: str, caption_key: str, key_field: str | None, semantics: str) -> dict[str, Any]:
    """What a shard's match lists depend on besides the shard itself. The tool version too:
    a fixed matcher or reader must not reuse older match lists."""
    config = {"metadata_sha256": meta_sha, "caption_key": caption_key, "key_field": key_field, "tool": __version__}
    if semantics == METACLIP2:
        from mode_fast.curation.worldwide import lid_version

        config |= {"semantics": semantics, "language_id": lid_version()}
    return config


def _matches_meta(path: Path) -> dict[str, Any] | None:
    try:
        (meta,) = read_matches(path, "meta")
        return json.loads(str(meta))
    except Exception:  # missing, damaged or another layout: recompute
        return None


def match_tasks(
    files: Sequence[ShardFiles], config: dict[str, Any], threads: int, semantics: str
) -> tuple[list[dict[str, Any]], int]:
    """(pass 1 tasks for the shards without current match lists, how many of those had
    stale ones)."""
    tasks: list[dict[str, Any]] = []
    stale = 0
    for f in files:
        meta = _matches_meta(f.matches)
        if (
            meta is not None
            and meta.get("format") == MATCHES_FORMAT
            and meta.get("fingerprint") == f.fingerprint
            and meta.get("config") == config
        ):
            continue
        stale += meta is not None
        tasks.append(
            {
                "path": str(f.path),
                "out": str(f.matches),
                "fingerprint": f.fingerprint,
                "config": config,
                "caption_key": config["caption_key"],
                "key_field": config["key_field"],
                "threads": threads,
                "semantics": semantics,
            }
        )
    return tasks, stale


def build_matcher(
    work: Path, entries: list[str], meta_sha: str, by_language: dict[str, list[str]] | None = None
) -> Path:
    """Build the matcher once per metadata list and save it for the workers to load
    (metaclip2: one per language, in a folder)."""
    if by_language is not None:
        from mode_fast.curation.worldwide import LanguageMatchers

        # FILE_FORMAT in the name: a folder saved in an older layout is built again, not loaded.
        folder = work / f"matchers-metaclip2-{__version__}-f{FILE_FORMAT}-{meta_sha[:16]}"
        if not LanguageMatchers.complete(folder):
            LanguageMatchers(by_language).save(folder)  # languages.json last: complete or rebuilt
        return folder
    path = work / f"matcher-{__version__}-{meta_sha[:16]}.bin"
    if not path.exists():
        Matcher(entries).save(path)  # atomic (mode_fast.core.files): a killed build leaves no matcher
    return path


_worker_matcher: Any = None
_worker_lid: Any = None  # metaclip2: language ID, loaded once per worker


def init_match_worker(matcher_path: str, semantics: str = "metaclip1") -> None:
    """Load the matcher (metaclip2: the matchers and language ID) once per worker."""
    global _worker_matcher, _worker_lid
    if semantics == METACLIP2:
        from mode_fast.curation.worldwide import LanguageIdentifier, LanguageMatchers

        _worker_matcher = LanguageMatchers.load(matcher_path)  # one automaton per language
        _worker_lid = LanguageIdentifier()
    else:
        _worker_matcher = Matcher.load(matcher_path)  # loaded, never rebuilt, per worker


@dataclass
class _ShardText:
    """One shard's records as pass 1 sees them."""

    keys: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)  # "" where there is none
    has_caption: list[bool] = field(default_factory=list)
    skips: Counter[str] = field(default_factory=Counter)
    missing_fields: str | None = None  # a record without its caption: what it has instead
    lone_surrogates: int = 0


def _read_captions(path: Path, caption_key: str, key_field: str | None, worldwide: bool) -> _ShardText:
    text = _ShardText()
    for rec in read_shard(path, caption_key, key_field):
        if rec.skip_reason == CORRUPT_TAR_TAIL:  # not a record: no index
            text.skips[rec.skip_reason] += 1
            continue
        if worldwide and rec.skip_reason == "invalid_utf8":
            caption = lone_surrogate_caption(rec, caption_key, path)
            if caption is not None:  # MetaCLIP 2 matches the rest of such a caption
                rec.caption, rec.skip_reason = caption, None
                text.lone_surrogates += 1
        text.keys.append(rec.key)
        text.has_caption.append(rec.caption is not None)
        if rec.caption is None:
            text.skips[rec.skip_reason or "missing_caption"] += 1
            if rec.skip_reason == "missing_caption" and text.missing_fields is None:
                text.missing_fields = describe_fields(rec.sample)  # for a wrong --caption-key error
        text.captions.append(rec.caption or "")
    return text


def match_shard(task: dict[str, Any]) -> dict[str, Any]:
    """Pass 1 for one shard (runs in a worker set up by `init_match_worker`): read it,
    match its captions, write its matches file; returns {"records": n}."""
    path = Path(task["path"])
    worldwide = task.get("semantics") == METACLIP2
    text = _read_captions(path, task["caption_key"], task["key_field"], worldwide)
    langs: list[str] = []
    if worldwide:
        from mode_fast.curation.worldwide import match_captions

        offsets, ids, langs = match_captions(
            _worker_matcher, _worker_lid, text.captions, text.has_caption, task["threads"]
        )
    else:
        offsets, ids = _worker_matcher.match_batch(text.captions, threads=task["threads"])
    # Skipped records keep their index (the writer counts records the same way) but
    # match nothing.
    if not all(text.has_caption):
        offsets, ids = drop_unlisted(offsets, ids, np.asarray(text.has_caption))
    meta = {
        "format": MATCHES_FORMAT,
        "fingerprint": task["fingerprint"],
        "skips": dict(text.skips),
        "config": task["config"],
        "missing_caption_fields": text.missing_fields,
    }
    extra = {}
    if worldwide:  # the language is stored, so re-balancing never re-runs language ID
        meta["lone_surrogate_captions"] = text.lone_surrogates
        extra["langs"] = np.array(langs, dtype=str)
    save_npz(
        task["out"],
        offsets=offsets,
        ids=ids,
        key_hashes=key_hashes(text.keys),
        keys=np.array(text.keys, dtype=str),
        meta=np.array(json.dumps(meta)),
        **extra,
    )
    return {"records": len(text.keys)}


# --- a key list: the records it does not list match nothing ------------------------------------


def drop_unlisted(offsets: np.ndarray, ids: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The match lists (CSR) with the records where `keep` is False emptied: they keep their
    index but match nothing, so every later step (counts, scores, expected sizes, sampling)
    passes them over as unmatched."""
    lengths = np.diff(offsets)
    ids = ids[np.repeat(keep, lengths)]
    offsets = np.concatenate([[0], np.cumsum(np.where(keep, lengths, 0))]).astype(np.int64)
    return offsets, ids


Masks = list[np.ndarray] | None  # per shard, pool order: is the record's key listed (None: no list)


def listed_masks(files: Sequence[ShardFiles], listed: set[str] | None) -> Masks:
    """Per shard, which records a key list holds (records in file order, as matched)."""
    if listed is None:
        return None
    masks = []
    for f in files:
        (keys,) = read_matches(f.matches, "keys")
        masks.append(np.fromiter((k in listed for k in keys.tolist()), dtype=bool, count=len(keys)))
    return masks


def _listed_matches(f: ShardFiles, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    offsets, ids = read_matches(f.matches, "offsets", "ids")
    return (offsets, ids) if mask is None else drop_unlisted(offsets, ids, mask)


# --- between the passes: what the match lists add up to ------------------------------------------


@dataclass
class MatchTally:
    """The pool's match lists summed: entry counts, records and skips (by reason, by shard)."""

    counts: np.ndarray
    records_per_shard: list[int]
    skips: Counter[str]
    skips_by_shard: dict[str, dict[str, int]]
    missing_fields: str | None  # what a record without its caption holds (the first seen)
    lone_surrogates: int
    unlisted: int = 0  # records a key list (--keep-keys) does not hold: filtered, not skipped

    @property
    def skipped(self) -> int:
        """Records skipped (corrupt_tar_tail counts damaged shard ends, not records)."""
        return int(sum(v for k, v in self.skips.items() if k != CORRUPT_TAR_TAIL))


def tally_matches(files: Sequence[ShardFiles], n_entries: int, masks: Masks = None) -> MatchTally:
    """Sums over the pool; entry counts over the listed records only (`masks`)."""
    tally = MatchTally(np.zeros(n_entries, dtype=np.uint64), [], Counter(), {}, None, 0)
    for i, f in enumerate(files):
        mask = None if masks is None else masks[i]
        offsets, ids = _listed_matches(f, mask)
        (meta_arr,) = read_matches(f.matches, "meta")
        if mask is not None:
            tally.unlisted += int((~mask).sum())
        tally.counts += np.bincount(ids, minlength=n_entries).astype(np.uint64)
        tally.records_per_shard.append(len(offsets) - 1)
        meta = json.loads(str(meta_arr))
        skips = meta["skips"]
        tally.lone_surrogates += meta.get("lone_surrogate_captions", 0)
        tally.missing_fields = tally.missing_fields or meta.get("missing_caption_fields")
        if skips:
            tally.skips.update(skips)
            tally.skips_by_shard[str(f.path)] = skips
    return tally


@dataclass
class PoolScores:
    """One score per record in pool order (`mode_fast.curation.balance.record_scores`)."""

    scores: np.ndarray
    duplicate_keys: int  # records whose key another record of the pool has too
    langs: np.ndarray | None  # metaclip2: each record's language


def pool_scores(
    files: Sequence[ShardFiles], counts: np.ndarray, seed: int, with_langs: bool, masks: Masks = None
) -> PoolScores:
    """Scores in pool order (+inf for unlisted records: never kept)."""
    score_parts, hash_parts, lang_parts = [], [], []
    for i, f in enumerate(files):
        offsets, ids = _listed_matches(f, None if masks is None else masks[i])
        (hashes,) = read_matches(f.matches, "key_hashes")
        score_parts.append(record_scores(hashes, offsets, ids, counts, seed))
        hash_parts.append(hashes)
        if with_langs:
            lang_parts.append(read_matches(f.matches, "langs")[0])
    scores = np.concatenate(score_parts) if score_parts else np.zeros(0)
    duplicates = len(scores) - len(np.unique(np.concatenate(hash_parts))) if len(scores) else 0
    langs = None
    if with_langs:
        langs = np.concatenate(lang_parts) if lang_parts else np.zeros(0, dtype=str)
    return PoolScores(scores, int(duplicates), langs)


def expected_kept_by_t(
    files: Sequence[ShardFiles], probs_by_t: dict[float, np.ndarray], masks: Masks = None
) -> dict[float, float]:
    """Expected kept size of the pool for each t, given that t's entry probabilities."""
    expected = dict.fromkeys(probs_by_t, 0.0)
    for i, f in enumerate(files):
        offsets, ids = _listed_matches(f, None if masks is None else masks[i])
        for t, probs in probs_by_t.items():
            expected[t] += expected_kept(offsets, ids, probs)
    return expected


# --- pass 2: sample ------------------------------------------------------------------------------


def sample_tasks(
    out: Path,
    files: Sequence[ShardFiles],
    config: dict[str, Any],
    counts_path: Path,
    t: float,
    seed: int,
    t_by_language: dict[str, float] | None = None,
    masks: Masks = None,
    keep_keys_sha256: str | None = None,
) -> list[dict[str, Any]]:
    """Pass 2 tasks for the shards not already written for this t, seed, counts, input [and
    key list: `masks`, stamped by the list's sha256; without one the stamp is as before]."""
    stamp_base = {"t": t, "seed": seed, "counts_sha256": sha256_file(counts_path)}
    by_language = {} if t_by_language is None else {"t_by_language": t_by_language}
    stamp_base |= by_language
    if masks is not None:
        stamp_base["keep_keys_sha256"] = keep_keys_sha256
    tasks = []
    for i, f in enumerate(files):
        # relative: the stamp names the same file whatever the working folder of the next run
        stamp = stamp_base | {"input": f.fingerprint, "config": config, "dst": os.path.relpath(f.dst, out)}
        previous = _read_json(f.done)
        if (
            previous is not None
            and all(previous.get(k) == v for k, v in stamp.items())
            and f.dst.exists()
            and f.kept_keys.exists()
        ):
            continue
        tasks.append(
            {
                "path": str(f.path),
                "matches": str(f.matches),
                "counts_path": str(counts_path),
                "seed": seed,
                "t": t,
                "dst": str(f.dst),
                "kept_keys": str(f.kept_keys),
                "done": str(f.done),
                "stamp": stamp,
            }
            | by_language
            # the mask, not the list, travels: a worker never holds the whole key set
            | ({} if masks is None else {"listed": np.packbits(masks[i]).tobytes()})
        )
    return tasks


def sample_shard(task: dict[str, Any]) -> dict[str, Any]:
    """Pass 2 for one shard (runs in a worker): write its curated shard, its kept keys and
    its done stamp; returns {"records": n, "kept": k}."""
    offsets, ids, hashes, keys = read_matches(Path(task["matches"]), "offsets", "ids", "key_hashes", "keys")
    if "listed" in task:
        listed = np.unpackbits(np.frombuffer(task["listed"], dtype=np.uint8), count=len(keys)).astype(bool)
        offsets, ids = drop_unlisted(offsets, ids, listed)
    counts = np.load(task["counts_path"])
    t: Any = task["t"]
    if "t_by_language" in task:  # metaclip2: each record against its language's t
        (langs,) = read_matches(Path(task["matches"]), "langs")
        t = np.array([task["t_by_language"].get(lang, -np.inf) for lang in langs.tolist()], dtype=np.float64)
    keep = record_scores(hashes, offsets, ids, counts, task["seed"]) < t
    written = write_kept(task["path"], task["dst"], keep)
    if written != int(keep.sum()):
        raise ShardError(
            f"{task['path']}: wrote {written} records but meant to keep {int(keep.sum())}; "
            "the shard changed since it was matched"
        )
    write_shard_keys(task["kept_keys"], keys[keep].tolist())
    # Written last: its presence (with this stamp) marks the shard done.
    write_json(task["done"], task["stamp"] | {"kept": written})
    return {"records": len(keep), "kept": written}


def write_shard_keys(path: str | Path, keys: Iterable[str]) -> None:
    """One shard's kept keys, one a line: the pieces write_kept_keys joins into kept_keys.txt."""
    with atomic_write(path, "w") as f:
        f.writelines(f"{key}\n" for key in keys)


def write_kept_keys(files: Sequence[ShardFiles], path: Path, kept: int) -> None:
    """The shards' kept keys, in pool order, as one file; checks they are the `kept` the
    scores promised (a shard changed during the run otherwise)."""
    written = sum(_read_json(f.done)["kept"] for f in files)  # type: ignore[index]
    if written != kept:
        raise RuntimeError(f"wrote {written} records but the scores keep {kept}: the pool changed during the run")
    with atomic_write(path, "w") as out:
        for f in files:
            out.write(f.kept_keys.read_text())


def remove_stale_outputs(out: Path, files: Sequence[ShardFiles]) -> int:
    """Remove the curated shards (and stamps, key lists) earlier runs wrote for inputs that
    are not in this pool; returns how many curated shards were removed. Every stale stamp's
    destination is checked before anything is removed (InputError: one outside OUT)."""
    work = out / WORK
    current_stamps = {str(f.done) for f in files}
    current_dsts = {os.path.realpath(f.dst) for f in files}
    stale = []
    for stamp_path in sorted((work / "sampled").glob("*.json")):
        if str(stamp_path) in current_stamps:
            continue
        dst = (_read_json(stamp_path) or {}).get("dst")
        stale.append((stamp_path, None if dst is None else inside(out, dst, stamp_path)))
    removed = 0
    for stamp_path, dst in stale:
        if dst is not None and os.path.realpath(dst) not in current_dsts and dst.exists():
            dst.unlink()
            removed += 1
        (work / "kept" / f"{stamp_path.stem}.txt").unlink(missing_ok=True)
        stamp_path.unlink()
    return removed
