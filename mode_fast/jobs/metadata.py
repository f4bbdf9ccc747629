"""`mode-fast metadata`: build a metadata list from WordNet 3.0 and/or merge user lists, or check one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mode_fast.curation.metadata import (
    MetadataError,
    build_from_wordnet,
    default_wordnet_dir,
    load_metadata,
    merge_metadata,
    metadata_sha256,
    save_metadata,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="build a list from WordNet 3.0 and/or merge user lists")
    build.add_argument("--out", required=True, help="output .json or .json.gz")
    build.add_argument("--wordnet-dir", help="WordNet dict folder (default: the Debian wordnet-base location)")
    build.add_argument("--no-wordnet", action="store_true", help="only merge the --merge lists")
    build.add_argument("--merge", nargs="*", default=[], metavar="FILE", help="metadata.json files appended in order")
    check = sub.add_parser("check", help="validate a metadata file and print its size")
    check.add_argument("file")


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "check":
            entries = load_metadata(args.file)
            print(
                f"{args.file}: {len(entries):,} entries, sha256 {metadata_sha256(entries)[:16]}; first: {entries[:5]}"
            )
            return 0
        lists = []
        if not args.no_wordnet:
            wn = Path(args.wordnet_dir) if args.wordnet_dir else default_wordnet_dir()
            if wn is None:
                raise MetadataError(
                    "WordNet 3.0 not found: `apt-get install wordnet-base`, or pass --wordnet-dir / --no-wordnet"
                )
            lists.append(build_from_wordnet(wn))
        lists += [load_metadata(p) for p in args.merge]
        if not lists:
            raise MetadataError("nothing to build: give --merge files or drop --no-wordnet")
        entries = merge_metadata(*lists)
        save_metadata(entries, args.out)
        print(f"wrote {len(entries):,} entries to {args.out}")
        return 0
    except MetadataError as exc:
        print(f"mode-fast metadata: error: {exc}", file=sys.stderr)
        return 2
