"""`mode-fast curate`: MetaCLIP curation (`mode_fast.curation.run`), from the command line.

The flags are `CurateConfig`'s fields (`mode_fast.core.config`). The curation's
log lines go to stderr as bare lines; the summary line goes to stdout.
"""

from __future__ import annotations

import argparse
import sys

from mode_fast.core import config
from mode_fast.curation.run import CurateConfig, log_to, run_curation
from mode_fast.curation.worldwide import format_language_summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_arguments(parser, CurateConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config.config_from_args(CurateConfig, args)
    with log_to(lambda msg: print(msg, file=sys.stderr)):
        summary = run_curation(cfg)
    skipped = ", ".join(f"{k}={v}" for k, v in summary["skipped"].items()) or "none"
    what = "estimated" if summary["estimate_only"] else "kept"
    unlisted = summary.get("filtered_by_keep_keys")
    listed = f"  not in --keep-keys {unlisted:,}" if unlisted is not None else ""
    print(
        f"pool {summary['pool_size']:,}{listed}  matched {summary['matched']:,}  {what} {summary['kept']:,} "
        f"(expected {summary['expected_kept']:,.0f})  t={summary['t']:.6g}  skipped: {skipped}\n"
        f"outputs in {args.out}"
    )
    if "languages" in summary:  # metaclip2: one line per language
        print(format_language_summary(summary))
    return 0
