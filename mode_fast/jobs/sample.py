"""`mode-fast sample`: write the embedded synthetic sample pool (mode_fast.demo.sample)."""

from __future__ import annotations

import argparse
import sys
import time

from mode_fast.demo.sample import write_sample


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (layout: pool/, eval/, sample_info.json)")
    parser.add_argument("--num-pairs", type=int, default=10_000, help="pool size (default 10000)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard (default 1000)")
    parser.add_argument("--eval-pairs", type=int, default=1000, help="held-out labelled images (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--mismatch-rate", type=float, default=0.1, help="share of wrong pairs (default 0.1)")
    parser.add_argument("--noise-rate", type=float, default=0.05, help="share of word-free captions (default 0.05)")
    parser.add_argument("--near-duplicate-rate", type=float, default=0.05, help="default 0.05")
    parser.add_argument(
        "--tricky-rate", type=float, default=0.03, help="share with tabs/newlines/non-ASCII (default 0.03)"
    )
    parser.add_argument(
        "--force", action="store_true", help="rewrite even if a complete output of the same arguments exists"
    )


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    try:
        info = write_sample(
            args.out, num_pairs=args.num_pairs, shard_size=args.shard_size, seed=args.seed,
            eval_pairs=args.eval_pairs, mismatch_rate=args.mismatch_rate, noise_rate=args.noise_rate,
            near_duplicate_rate=args.near_duplicate_rate, tricky_rate=args.tricky_rate,
            image_size=args.image_size, force=args.force, progress=lambda line: print(line, flush=True),
        )  # fmt: skip
    except ValueError as err:
        print(f"mode-fast sample: error: {err}", file=sys.stderr)
        return 2
    kinds = info["caption_kinds"]
    print(
        f"sample: {info['args']['num_pairs']:,} pairs in {len(info['pool_shards'])} shards "
        f"({kinds['mismatched']} mismatched, {kinds['noise']} noise, {kinds['near_duplicate']} near-duplicates), "
        f"{info['args']['eval_pairs']:,} eval images, {info['total_bytes'] / 1e6:.1f} MB in {args.out} "
        f"({time.perf_counter() - started:.1f} s)"
    )
    return 0
