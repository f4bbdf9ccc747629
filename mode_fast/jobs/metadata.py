"""`mode-fast metadata`: build a metadata list from WordNet 3.0 and/or merge user lists, or check one."""

from __future__ import annotations

import argparse

from mode_fast.core import config
from mode_fast.curation.metadata import (
    MetadataBuildConfig,
    MetadataCheckConfig,
    build_metadata,
    load_metadata,
    metadata_sha256,
)

ACTIONS = {"build": MetadataBuildConfig, "check": MetadataCheckConfig}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    for name, cls in ACTIONS.items():
        config.add_arguments(sub.add_parser(name, help=cls.__doc__.split(": ", 1)[1]), cls)


def run(args: argparse.Namespace) -> int:
    cfg = config.config_from_args(ACTIONS[args.action], args)
    if isinstance(cfg, MetadataCheckConfig):
        entries = load_metadata(cfg.file)
        print(f"{cfg.file}: {len(entries):,} entries, sha256 {metadata_sha256(entries)[:16]}; first: {entries[:5]}")
        return 0
    entries = build_metadata(cfg)
    print(f"wrote {len(entries):,} entries to {cfg.out}")
    return 0
