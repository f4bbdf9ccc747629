"""MetaCLIP curation (`mode-fast curate`): match captions to metadata, count entries,
balance by sampling. `CurateConfig` holds one curation's settings (each field declares its
flag: `mode_fast.core.config`); `run_curation(cfg)` runs it and returns the summary.

The rules are MetaCLIP's (Xu et al., "Demystifying CLIP Data", ICLR 2024,
arXiv:2309.16671; facebookresearch/MetaCLIP) and, with ``semantics="metaclip2"``, MetaCLIP
2's worldwide ones (Chuang et al. 2025, arXiv:2507.22062). The pipeline is two passes over
the pool:

1. match + count (per shard, in parallel): each caption's matched entry ids are stored
   in ``OUT/.work/matches/<shard id>.npz`` with the record keys; ``entry_count.npy`` is
   the sum over shards. A shard's matches are reused while its file (path, size, mtime),
   the metadata (sha256), the caption key and the key field are unchanged, so changing
   only t, the target size or the seed never re-matches.
2. sample (per shard, in parallel): a record with match set S is kept with probability
   ``1 - prod_{i in S} (1 - p_i)``, ``p_i = min(1, t / count_i)``.

With ``keep_keys`` (``--keep-keys FILE``, one key per line: curate's or dedup's
kept_keys.txt) only the records it lists are curated: the others are counted as filtered
(``summary["filtered_by_keep_keys"]``), not as skipped, and take no part in the counts, t or
the sample. Stored match lists are reused whatever the list; a list with other content
(its sha256 is recorded) re-balances and re-samples.

Sampling is reproducible and independent of sharding and workers: each record has one
score from hashes of (seed, key, entry id) and is kept iff its score < t, so a smaller t
keeps a subset of a larger t's set, the kept size for any t is known exactly before
sampling, and a target size solves t exactly from the stored match lists
(`mode_fast.curation.balance`). Records with the same key get the same draws (duplicate
keys are reported).

Outputs in OUT: ``entry_count.npy`` (uint64), ``entry_prob.npy`` (float64) and
``summary.json`` describe the last run, an estimate included; ``manifest.json``,
``kept_keys.txt`` and ``data/`` (curated shards, input names relative to the pools'
common folder) describe the last finished curation: manifest.json and kept_keys.txt are
removed before any curated shard is rewritten and written last, so their presence means
``data/`` is complete. Every file is written atomically; a killed run resumes at the
first shard whose outputs are missing or were made for another t, seed or input.
Memory in the main process: about 16 bytes per record plus 4 per match (scores, key
hashes, one shard's match lists at a time).

Progress, notes and the t table are logged (logger ``mode_fast.curation.run``, INFO; the
CLI prints them on stderr as bare lines). The per-shard passes and their files are
`mode_fast.curation.shards`, MetaCLIP 2's per-language pieces `mode_fast.curation.worldwide`,
the run lifecycle `mode_fast.core.runs`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mode_fast import __version__
from mode_fast.core.config import ADDED, added_defaults, check_ranges, flag_of, manifest_args, option, result_values
from mode_fast.core.errors import ConfigError, InputError
from mode_fast.core.executor import (
    LocalExecutor,
    RayExecutor,
    executor_option,
    make_executor,
    ray_address_option,
    run_with_progress,
)
from mode_fast.core.files import save_npy, sha256_file, write_json
from mode_fast.core.runs import RunState, fingerprint
from mode_fast.curation import shards as curation
from mode_fast.curation import worldwide
from mode_fast.curation.balance import (
    DEFAULT_T,
    PoolBalance,
    head_entries,
    suggested_t,
    t_ladder,
    tail_entries,
)
from mode_fast.curation.metadata import load_metadata_from, metadata_sha256
from mode_fast.data.io import DataKeyError, list_shards, read_key_list

__all__ = ["CurateConfig", "curate", "log_to", "run_curation"]

log = logging.getLogger(__name__)

SEMANTICS = ("metaclip1", "metaclip2")
OWNED = ("data", curation.WORK, "manifest.json", "kept_keys.txt", "entry_count.npy", "entry_prob.npy", "summary.json")
Metadata = str | os.PathLike | Sequence[str] | dict[str, list[str]] | None


# --- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CurateConfig:
    """One curation's settings, checked once and never changed.

    metadata: a metadata.json path, a list of strings, or None for the shipped WordNet list
    (metaclip2: a folder of <lang>.json lists, a JSON object of them, or a dict). Give t or
    target_size (neither: DEFAULT_T). executor: 'local' (`workers` processes, None: all
    cores) or 'ray' (`workers` actors, None: the cluster's CPUs; joins ray_address or
    RAY_ADDRESS, else starts a local Ray); outputs are the same either way. estimate_only:
    counts, summary and the t table, no curated shards. Reruns follow the shared rule
    (`mode_fast.core.runs`): one run per output folder at a time, a finished curation rerun
    unchanged is a no-op, overwrite=True starts over.

    The fields are declared in the order run.json records the result-changing ones (and
    --help lists them); executor and ray_address are declared by `mode_fast.core.executor`
    (the same two flags as cluster's).
    """

    pools: tuple[str | os.PathLike, ...] = option(
        help="shard files, folders, or glob/brace patterns (.tar, .parquet, .jsonl[.gz])",
        result=False,  # run.json records the shards themselves, as inputs
        flag="pools",
        nargs="+",
        metavar="POOL",
    )
    out: Path = option(help="output folder", result=False, type=str)  # the job prints it as typed; a Path here
    metadata: Metadata = option(
        None,
        help="MetaCLIP-style metadata.json (JSON list of strings); default: the shipped WordNet list",
        result=True,  # recorded by its content's sha256 (see _open_run)
    )
    caption_key: str = option(
        "caption",
        help="caption member extension or json/column field (default: json 'caption', else .txt)",
        result=True,
    )
    key_field: str | None = option(
        None, help="parquet/jsonl column holding the record uid (default: uid, else key)", result=True
    )
    t: float | None = option(
        None,
        help=f"balancing threshold (default {DEFAULT_T:,.0f}, MetaCLIP 400M; "
        "a small pool needs a proportionally small t)",
        result=True,
        exclusive="threshold",
    )
    target_size: int | None = option(
        None, help="solve t so that exactly this many records are kept", result=True, exclusive="threshold", low=1
    )
    seed: int = option(0, help="sampling seed (the kept set is independent of sharding and workers)", result=True)
    estimate_only: bool = option(
        False,
        help="count and print expected kept sizes for a ladder of t; write no curated shards",
        result=True,
        flag="--estimate",
    )
    semantics: str = option(
        "metaclip1",
        help="metaclip1: MetaCLIP's matching and one t (default); metaclip2: MetaCLIP 2 worldwide "
        "(language ID, --metadata a folder of <lang>.json lists or a JSON object of them, "
        "--t the English threshold; needs mode-fast[worldwide])",
        result=ADDED,  # added with MetaCLIP 2: run.json files of before read as metaclip1
        choices=SEMANTICS,
    )
    keep_keys: Path | None = option(
        None,
        help="curate only the records whose keys this file lists, one per line (curate's or dedup's "
        "OUT/kept_keys.txt); the others are counted as filtered",
        result=ADDED,  # added with dedup: run.json files of before read as no list; recorded by sha256
        metavar="FILE",
    )
    workers: int | None = option(
        1,
        help="processes (local) or actors (ray) over shards (default: all cores)",
        result=False,
        low=0,
        cli_default=None,
    )
    overwrite: bool = option(False, help="start over: remove this job's earlier outputs in --out first", result=False)
    executor: str = executor_option()
    ray_address: str | None = ray_address_option()

    def __post_init__(self) -> None:
        if self.semantics not in SEMANTICS:
            raise ConfigError(f"--semantics must be metaclip1 or metaclip2, not {self.semantics!r}")
        if self.t is not None and self.target_size is not None:
            raise ConfigError("give either --t or --target-size, not both")  # argparse refuses it first
        if self.t is not None:  # before check_ranges, which would call inf only "not finite"
            flag = flag_of(CurateConfig, "t")
            if not self.t > 0:
                raise ConfigError(f"{flag} must be a positive number, got {self.t}")
            if not np.isfinite(self.t):
                raise ConfigError(f"{flag} must be a positive finite number, got {self.t}")
            object.__setattr__(self, "t", float(self.t))  # run.json says 20.0 whether 20 or 20.0 came
        check_ranges(self)
        object.__setattr__(self, "pools", tuple(self.pools))
        object.__setattr__(self, "out", Path(self.out))
        if self.keep_keys is not None:
            object.__setattr__(self, "keep_keys", Path(self.keep_keys))

    @property
    def worldwide(self) -> bool:
        return self.semantics == "metaclip2"

    @property
    def work(self) -> Path:
        return self.out / curation.WORK


@dataclass(frozen=True)
class _KeyList:
    """--keep-keys as read: the keys, and the sha256 of the file's bytes (what run.json and
    the sample stamps record, so a list with other content is never taken for this one)."""

    keys: set[str]
    sha256: str
    path: Path


def _load_key_list(cfg: CurateConfig) -> _KeyList | None:
    if cfg.keep_keys is None:
        return None
    flag = flag_of(CurateConfig, "keep_keys")
    keys = read_key_list(cfg.keep_keys, flag)  # InputError, one line, when missing or unreadable
    return _KeyList(keys, sha256_file(cfg.keep_keys), cfg.keep_keys)


@dataclass(frozen=True)
class _Metadata:
    entries: list[str]  # by global id (metaclip2: the languages' lists in sorted order)
    source: str
    sha256: str
    by_language: dict[str, list[str]] | None = None  # metaclip2


def _load_metadata(cfg: CurateConfig) -> _Metadata:
    if not cfg.worldwide:
        entries, source = load_metadata_from(cfg.metadata)  # type: ignore[arg-type]
        return _Metadata(entries, source, metadata_sha256(entries))
    by_language, source = worldwide.load_metadata_by_language(cfg.metadata)
    entries = [e for lang in sorted(by_language) for e in by_language[lang]]  # global ids
    sha = worldwide.language_metadata_sha256(by_language)
    worldwide.LanguageIdentifier()  # fails here, in one line, if py3langid is missing
    return _Metadata(entries, source, sha, by_language)


# --- the job -------------------------------------------------------------------------------


def run_curation(cfg: CurateConfig) -> dict[str, Any]:
    """Curate `cfg.pools` into `cfg.out`; returns the summary (also written as summary.json).
    Raises ModeFastError subclasses for what a user can cause (one line each)."""
    started = time.perf_counter()
    shards = list_shards(cfg.pools)
    meta = _load_metadata(cfg)
    listed = _load_key_list(cfg)
    with _open_run(cfg, shards, meta, listed) as state, state.interrupts():
        if state.finished and (cfg.out / "summary.json").exists():
            log.info(f"curate: {cfg.out} already holds this curation (same inputs and arguments): nothing to do")
            return json.loads((cfg.out / "summary.json").read_text())
        runner = make_executor(cfg.executor, cfg.workers, cfg.ray_address)
        try:
            summary = _curate(cfg, meta, listed, shards, runner, state)
        finally:
            runner.close()
        summary["seconds"] = time.perf_counter() - started
        write_json(cfg.out / "summary.json", summary)
        state.finish(_outputs(cfg))
        return summary


def _open_run(cfg: CurateConfig, shards: list[Path], meta: _Metadata, listed: _KeyList | None) -> RunState:
    """The shared lifecycle (mode_fast.core.runs): lock, run.json, interrupts. Curate recomputes
    whatever a changed field affects itself (per-shard stamps), so no field stops it."""
    values = result_values(cfg)
    values["metadata"] = meta.sha256  # the list's content, wherever it came from
    if listed is not None:
        values["keep_keys"] = listed.sha256  # likewise: the content, not the path
    return RunState.open(
        cfg.out,
        "curate",
        inputs={str(p): fingerprint(p) for p in shards},
        args=manifest_args(cfg, values),
        recompute=lambda field: [],
        overwrite=cfg.overwrite,
        owned=OWNED,
        log=log.info,
        defaults=added_defaults(CurateConfig),
    )


def _outputs(cfg: CurateConfig) -> list[Path]:
    """Every file a finished curation needs (run.json checks them before a no-op rerun)."""
    out, work = cfg.out, cfg.work
    files = [out / "entry_count.npy", out / "entry_prob.npy", out / "summary.json", *work.glob("matches/*.npz")]
    if not cfg.estimate_only:
        files += [
            out / "manifest.json",
            out / "kept_keys.txt",
            *work.glob("sampled/*.json"),
            *work.glob("kept/*.txt"),
            *(p for p in (out / "data").rglob("*") if p.is_file()),
        ]
    return files


def _curate(
    cfg: CurateConfig,
    meta: _Metadata,
    listed: _KeyList | None,
    shards: list[Path],
    runner: LocalExecutor | RayExecutor,
    state: RunState,
) -> dict[str, Any]:
    """The steps: match, count, balance, the t table, sample; returns the summary."""
    files = curation.shard_files(cfg.out, shards)
    config = curation.match_config(meta.sha256, cfg.caption_key, cfg.key_field, cfg.semantics)
    reused = _match(cfg, meta, files, config, runner, state)
    masks = curation.listed_masks(files, None if listed is None else listed.keys)
    tally = _count(cfg, files, len(meta.entries), masks, listed)
    balanced = _balance(cfg, meta, files, tally.counts, masks)
    ladder = _ladder(files, balanced, masks)
    summary = _summary(cfg, meta, tally, balanced, ladder, reused, listed)
    if not cfg.estimate_only:
        summary |= _sample(cfg, files, config, balanced, runner, state, masks, listed)
        _write_manifest(cfg, meta, files, tally, balanced, listed)  # last: marks the curation finished
    return summary


# --- pass 1: match and count -------------------------------------------------------------


def _match(
    cfg: CurateConfig,
    meta: _Metadata,
    files: list[curation.ShardFiles],
    config: dict[str, Any],
    runner: LocalExecutor | RayExecutor,
    state: RunState,
) -> int:
    """Pass 1 for the shards whose match lists are missing or stale; returns how many
    shards' stored lists were reused."""
    threads = 0 if runner.runs_inline(len(files)) else 1  # one process alone may use every core
    tasks, stale = curation.match_tasks(files, config, threads, cfg.semantics)
    reused = len(files) - len(tasks)
    if reused:
        log.info(f"match: reusing stored matches for {reused} of {len(files)} shards")
    if stale:
        log.info(f"match: recomputing {stale} shards whose file, metadata, caption key or key field changed")
    if tasks:
        matcher_path = curation.build_matcher(cfg.work, meta.entries, meta.sha256, meta.by_language)
        run_with_progress(
            runner,
            curation.match_shard,
            tasks,
            "match",
            (curation.init_match_worker, (str(matcher_path), cfg.semantics)),
            on_result=state.track("match", len(files), reused),
        )
    return reused


def _count(
    cfg: CurateConfig,
    files: list[curation.ShardFiles],
    n_entries: int,
    masks: curation.Masks,
    listed: _KeyList | None,
) -> curation.MatchTally:
    """Entry counts (of the listed records) and skips over the pool; writes entry_count.npy."""
    tally = curation.tally_matches(files, n_entries, masks)
    records = sum(tally.records_per_shard)
    if listed is not None:
        flag = flag_of(CurateConfig, "keep_keys")
        if records and tally.unlisted == records:  # not a filter: a list made for another pool
            some = next(iter(sorted(listed.keys)), None)
            raise InputError(
                f"{flag} {listed.path} lists none of the pool's {records:,} records"
                + (f" (it holds keys like {some!r})" if some is not None else " (it is empty)")
                + "; give the kept_keys.txt made from this pool"
            )
        log.info(f"keep-keys: {tally.unlisted:,} of {records:,} records are not listed in {listed.path}: filtered")
    if records - tally.skipped == 0 and tally.skips["missing_caption"]:  # not bad data: a wrong key
        raise DataKeyError(
            f"caption key {cfg.caption_key!r} is in none of the {records:,} records; they have "
            f"{tally.missing_fields or 'other fields'}: pass --caption-key with one of them"
        )
    save_npy(cfg.out / "entry_count.npy", tally.counts)
    return tally


# --- balance: scores, t, the kept set --------------------------------------------------------


@dataclass(frozen=True)
class _Balanced:
    balance: PoolBalance | worldwide.WorldwideBalance
    duplicate_keys: int
    t: float  # metaclip2: English's
    kept: int
    t_by_language: dict[str, float] | None  # metaclip2

    @property
    def pool_size(self) -> int:
        return len(self.balance.scores)

    @property
    def matched(self) -> int:
        return int(np.isfinite(self.balance.scores).sum())


def _balance(
    cfg: CurateConfig, meta: _Metadata, files: list[curation.ShardFiles], counts: np.ndarray, masks: curation.Masks
) -> _Balanced:
    """Scores (one per record, pool order; unlisted records' +inf) fix the kept set for every
    t; chooses t and writes entry_prob.npy. metaclip2: each language's t follows from English's."""
    pool = curation.pool_scores(files, counts, cfg.seed, cfg.worldwide, masks)
    balance: PoolBalance | worldwide.WorldwideBalance = PoolBalance(counts, pool.scores)
    if meta.by_language is not None:
        layout = worldwide.LanguageMatchers.layout(meta.by_language)
        balance = worldwide.WorldwideBalance(layout, counts, pool.scores, pool.langs)  # type: ignore[arg-type]
    pool_size, matched = len(pool.scores), int(np.isfinite(pool.scores).sum())
    if pool_size and not matched:
        log.warning(
            f"warning: none of the {pool_size:,} records matched the metadata; check --metadata and --caption-key"
        )
    t = _choose_t(cfg, balance, pool_size, matched)
    save_npy(cfg.out / "entry_prob.npy", balance.probabilities(t))
    kept = balance.kept(t)
    if cfg.target_size is not None and cfg.target_size <= matched and kept != cfg.target_size:
        why = (
            "duplicate keys tie at the boundary"
            if meta.by_language is None
            else "at an English count every other language's t steps at once (MetaCLIP 2's p_to_t), or duplicate keys tie"
        )
        log.info(f"note: kept {kept:,}, not {cfg.target_size:,}: {why}")
    t_by_language = None
    if isinstance(balance, worldwide.WorldwideBalance):
        t_by_language = balance.thresholds(t)
        log.info(
            "t per language (English's tail share): " + ", ".join(f"{k}={v:,.6g}" for k, v in t_by_language.items())
        )
    return _Balanced(balance, pool.duplicate_keys, t, kept, t_by_language)


def _choose_t(
    cfg: CurateConfig, balance: PoolBalance | worldwide.WorldwideBalance, pool_size: int, matched: int
) -> float:
    """--target-size solved exactly, else --t, else MetaCLIP's default (with a hint)."""
    if cfg.target_size is not None:
        t = balance.solve(cfg.target_size)
        log.info(f"t solved for target size {cfg.target_size:,}: t = {t:,.6g}")
        if cfg.target_size > matched:
            log.info(f"note: only {matched:,} records match the metadata; all of them are kept")
        return t
    if cfg.t is not None:
        return cfg.t
    log.info(
        f"t = {DEFAULT_T:,.0f} (MetaCLIP's setting for a 1.6B-pair pool); a small pool needs a proportionally "
        f"small t (here about {suggested_t(pool_size):.3g}): see the table, or use --target-size"
    )
    return DEFAULT_T


def _ladder(files: list[curation.ShardFiles], balanced: _Balanced, masks: curation.Masks) -> list[dict[str, Any]]:
    """Expected and actual kept sizes for t/4 .. 4t, logged as a table."""
    balance, ts = balanced.balance, t_ladder(balanced.t)
    expected = curation.expected_kept_by_t(files, {lt: balance.probabilities(lt) for lt in ts}, masks)
    ladder = [{"t": lt, "expected_kept": expected[lt], "kept_with_seed": balance.kept(lt)} for lt in ts]
    log.info(_ladder_table(ladder, balanced.t, balanced.pool_size, balanced.matched))
    return ladder


def _ladder_table(ladder: list[dict[str, Any]], t: float, pool_size: int, matched: int) -> str:
    lines = [f"pool {pool_size:,} records, {matched:,} matched", "         t   expected kept   kept (this seed)"]
    for row in ladder:
        mark = "  <- chosen" if row["t"] == t else ""
        lines.append(f"{row['t']:>10,.6g}   {row['expected_kept']:>13,.0f}   {row['kept_with_seed']:>16,}{mark}")
    return "\n".join(lines)


def _summary(
    cfg: CurateConfig,
    meta: _Metadata,
    tally: curation.MatchTally,
    balanced: _Balanced,
    ladder: list[dict[str, Any]],
    reused: int,
    listed: _KeyList | None,
) -> dict[str, Any]:
    """pool_size counts every record read; matched and kept only listed ones (--keep-keys)."""
    counts, t = tally.counts, balanced.t
    summary: dict[str, Any] = {
        "pool_size": balanced.pool_size,
        "matched": balanced.matched,
        "kept": balanced.kept,
        "expected_kept": next(row["expected_kept"] for row in ladder if row["t"] == t),
        "t": t,
        "seed": cfg.seed,
        "target_size": cfg.target_size,
        "estimate_only": cfg.estimate_only,
        "shards": len(tally.records_per_shard),
        "matches_reused_shards": reused,
        "matches_computed_shards": len(tally.records_per_shard) - reused,
        "duplicate_keys": balanced.duplicate_keys,
        "entries": len(meta.entries),
        "entries_with_count_over_t": balanced.balance.entries_over_t(t),
        "entries_never_matched": int((counts == 0).sum()),
        "head_entries": head_entries(meta.entries, counts, 20),
        "tail_entries": tail_entries(meta.entries, counts, 20),
        "t_ladder": ladder,
        "skipped": dict(tally.skips),
        # records skipped; corrupt_tar_tail counts damaged shard ends, not records
        "skipped_total": tally.skipped,
        "skipped_by_shard": tally.skips_by_shard,
    }
    if listed is not None:  # absent without a list: summaries of before stay as they were
        summary |= {
            "keep_keys": {"file": str(listed.path), "sha256": listed.sha256, "keys": len(listed.keys)},
            "filtered_by_keep_keys": tally.unlisted,
        }
    if isinstance(balanced.balance, worldwide.WorldwideBalance) and meta.by_language is not None:
        summary |= {
            "semantics": cfg.semantics,
            "lone_surrogate_captions": tally.lone_surrogates,
            **balanced.balance.summary(t, meta.by_language),
        }
    return summary


# --- pass 2: sample ----------------------------------------------------------------------


def _sample(
    cfg: CurateConfig,
    files: list[curation.ShardFiles],
    config: dict[str, Any],
    balanced: _Balanced,
    runner: LocalExecutor | RayExecutor,
    state: RunState,
    masks: curation.Masks,
    listed: _KeyList | None,
) -> dict[str, Any]:
    """Pass 2: curated shards under OUT/data, kept_keys.txt; resumes finished shards."""
    counts_path = cfg.out / "entry_count.npy"
    tasks = curation.sample_tasks(
        cfg.out, files, config, counts_path, balanced.t, cfg.seed, balanced.t_by_language,
        masks, None if listed is None else listed.sha256,
    )  # fmt: skip
    if len(tasks) < len(files):
        log.info(
            f"sample: {len(files) - len(tasks)} of {len(files)} shards already written for this t, seed, "
            "input and key list"
        )
    if tasks:
        # From here until the end, data/ is a mix: no manifest or key list may claim otherwise.
        for name in ("manifest.json", "kept_keys.txt"):
            (cfg.out / name).unlink(missing_ok=True)
    done = state.track("sample", len(files), len(files) - len(tasks))
    run_with_progress(runner, curation.sample_shard, tasks, "sample", on_result=done)
    removed = curation.remove_stale_outputs(cfg.out, files)
    if removed:
        log.info(f"sample: removed {removed} curated shards of inputs no longer in the pool")
    curation.write_kept_keys(files, cfg.out / "kept_keys.txt", balanced.kept)
    return {"sampled_shards": len(tasks), "stale_outputs_removed": removed}


def _write_manifest(
    cfg: CurateConfig,
    meta: _Metadata,
    files: list[curation.ShardFiles],
    tally: curation.MatchTally,
    balanced: _Balanced,
    listed: _KeyList | None,
) -> None:
    manifest = {
        "tool": f"mode-fast {__version__}",
        "inputs": [f.fingerprint | {"records": n} for f, n in zip(files, tally.records_per_shard)],
        "metadata": {"source": meta.source, "sha256": meta.sha256, "entries": len(meta.entries)},
        "caption_key": cfg.caption_key,
        "key_field": cfg.key_field,
        "t": balanced.t,
        "seed": cfg.seed,
        "target_size": cfg.target_size,
        "entry_count_sha256": sha256_file(cfg.out / "entry_count.npy"),
        "pool_size": balanced.pool_size,
        "matched": balanced.matched,
        "kept": balanced.kept,
    }
    if balanced.t_by_language is not None:
        manifest |= {"semantics": cfg.semantics, "t_by_language": balanced.t_by_language}
    if listed is not None:
        manifest["keep_keys"] = {"sha256": listed.sha256, "keys": len(listed.keys), "filtered": tally.unlisted}
    write_json(cfg.out / "manifest.json", manifest)


# --- the Python entry of 0.1 -------------------------------------------------------------------


def curate(
    pools: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    metadata: Metadata = None,
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
    log: Callable[[str], Any] = print,
    semantics: str = "metaclip1",
) -> dict[str, Any]:
    """Deprecated (removed in the next release): ``run_curation(CurateConfig(...))``.
    `log` still receives each logged line for the length of the call."""
    warnings.warn(
        "curate(...) is deprecated: use mode_fast.curation.run.run_curation(CurateConfig(...))",
        DeprecationWarning,
        stacklevel=2,
    )
    cfg = CurateConfig(
        pools=tuple(pools), out=Path(out_dir), metadata=metadata, t=t, target_size=target_size, seed=seed,
        workers=workers, executor=executor, ray_address=ray_address, caption_key=caption_key,
        key_field=key_field, estimate_only=estimate_only, overwrite=overwrite, semantics=semantics,
    )  # fmt: skip
    with log_to(log):
        return run_curation(cfg)


class _Callback(logging.Handler):
    def __init__(self, fn: Callable[[str], Any]) -> None:
        super().__init__(logging.DEBUG)
        self.fn = fn

    def emit(self, record: logging.LogRecord) -> None:
        self.fn(record.getMessage())


@contextlib.contextmanager
def log_to(fn: Callable[[str], Any]) -> Iterator[None]:
    """Hand each line the curation logs (INFO and up) to `fn`, bare (no level, time or
    logger name), instead of to the handlers above it, while the block runs: the CLI's
    stderr lines, and the deprecated `curate(log=...)`."""
    logger = logging.getLogger("mode_fast.curation")
    handler, level, propagate = _Callback(fn), logger.level, logger.propagate
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
