"""`mode-fast dedup SHARDS... --out DIR`: exact and semantic (SemDeDup) deduplication of a pool.

Job module: the flags are `mode_fast.dedup.run.DedupConfig`'s fields; the job expands the
shard globs, builds the config and calls `run_dedup` (which writes the outputs), then
prints a one-line summary.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mode_fast.core import config
from mode_fast.core.errors import InputError
from mode_fast.dedup.run import DedupConfig, run_dedup


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_arguments(parser, DedupConfig)


def run(args: argparse.Namespace) -> int:
    """`mode-fast dedup`: `run_dedup` on the listed shards (globs expanded)."""
    from mode_fast.data.io import CORRUPT_TAR_TAIL, ShardError, list_shards

    try:
        shards = list_shards(args.shards)
    except ShardError as e:
        raise InputError(f"no shards: {e}") from e
    cfg = config.config_from_args(DedupConfig, args, shards=tuple(Path(s) for s in shards))
    summary = run_dedup(cfg)
    removed = ", ".join(
        f"eps {eps}: {s['removed_exact']} exact + {s['removed_semantic']} semantic removed, {s['kept']} kept"
        for eps, s in summary["eps"].items()
    )
    # a damaged shard end is counted per shard, not as a record (mode_fast.data.io)
    skipped = sum(n for reason, n in summary["skipped"].items() if reason != CORRUPT_TAR_TAIL)
    tails = summary["skipped"].get(CORRUPT_TAR_TAIL, 0)
    damaged = f", {tails} damaged shard end{'s' if tails > 1 else ''}" if tails else ""
    print(f"{summary['usable']} usable records of {summary['pool']} (skipped {skipped or 'none'}{damaged}); "
          f"{removed}; outputs in {cfg.out}")  # fmt: skip
    return 0
