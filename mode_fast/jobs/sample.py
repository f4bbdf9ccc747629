"""`mode-fast sample`: write the embedded synthetic sample pool (mode_fast.demo.sample)."""

from __future__ import annotations

import argparse
import time

from mode_fast.core import config
from mode_fast.demo.sample import SampleConfig, run_sample


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_arguments(parser, SampleConfig)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    cfg = config.config_from_args(SampleConfig, args)
    info = run_sample(cfg, progress=lambda line: print(line, flush=True))
    kinds = info["caption_kinds"]
    print(
        f"sample: {info['args']['num_pairs']:,} pairs in {len(info['pool_shards'])} shards "
        f"({kinds['mismatched']} mismatched, {kinds['noise']} noise, {kinds['near_duplicate']} near-duplicates), "
        f"{info['args']['eval_pairs']:,} eval images, {info['total_bytes'] / 1e6:.1f} MB in {cfg.out} "
        f"({time.perf_counter() - started:.1f} s)"
    )
    return 0
