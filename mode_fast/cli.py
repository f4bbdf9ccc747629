"""`mode-fast` command line: one subcommand per job.

Each job module defines ``add_arguments(parser)`` and ``run(args) -> int``; only the
module of the chosen subcommand is imported, so `mode-fast curate` never loads torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "curate": ("mode_fast.curate", "MetaCLIP curation: match captions to metadata, count, balance"),
    "cluster": ("mode_fast.cluster", "MoDE two-level clustering: fine k-means centers, coarse experts"),
    "train": ("mode_fast.train", "train MoDE data experts on open_clip models"),
    "eval": ("mode_fast.evaluate", "zero-shot evaluation of experts and their ensemble"),
    "metadata": ("mode_fast.metadata", "build or merge a metadata list (WordNet, user lists)"),
    "sample": ("mode_fast.data.sample", "write the embedded synthetic sample pool"),
}


def _build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mode-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(sp)
            sp.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = _build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
