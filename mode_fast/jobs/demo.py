"""`mode-fast demo`: the whole pipeline on the embedded sample (mode_fast.demo.pipeline)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mode_fast.demo.pipeline import FULL, QUICK, run_pipeline


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes and the hash text encoder (a test run)")
    parser.add_argument(
        "--overwrite", action="store_true", help="start over: remove this demo's earlier outputs in --out first"
    )


def run(args: argparse.Namespace) -> int:
    run_pipeline(args.out, QUICK if args.quick else FULL, overwrite=args.overwrite)
    return 0
