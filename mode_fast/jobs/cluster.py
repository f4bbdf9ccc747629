"""`mode-fast cluster SHARDS... --out DIR`: MoDE's two-level clustering of a pool's captions.

Job module: the flags are `mode_fast.clustering.run.ClusterConfig`'s fields; the job expands
the shard globs, builds the config and calls `run_clustering` (which writes the outputs),
then prints a one-line summary.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mode_fast.clustering.run import ClusterConfig, run_clustering
from mode_fast.core import config
from mode_fast.core.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_arguments(parser, ClusterConfig)


def run(args: argparse.Namespace) -> int:
    """`mode-fast cluster`: `run_clustering` on the listed shards (globs expanded)."""
    from mode_fast.data.io import ShardError, list_shards

    try:
        shards = list_shards(args.shards)
    except ShardError as e:
        raise InputError(f"no shards: {e}") from e
    cfg = config.config_from_args(ClusterConfig, args, shards=tuple(Path(s) for s in shards))
    sizes = run_clustering(cfg)
    print(
        f"assigned {sizes['n_assigned']} pairs from {sizes['n_shards']} shards to "
        f"{sizes['fine_k']} fine clusters / {sizes['n_experts']} experts "
        f"(sizes {sizes['expert_sizes']}); skipped {sizes['n_skipped'] or 'none'}; "
        f"outputs in {cfg.out}"
    )
    return 0
