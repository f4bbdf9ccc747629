"""`mode-fast` command line: one subcommand per job, one error handler, one logging setup.

Each job module defines ``add_arguments(parser)`` and ``run(args) -> int``; only the
module of the chosen subcommand is imported, so `mode-fast curate` never loads torch.
A user-caused error (`mode_fast.core.errors.ModeFastError`, a bad flag, a non-finite number
in any numeric flag) ends as one line, ``mode-fast JOB: error: ...``, exit 2; ``--debug``
shows its traceback instead.
Ctrl-C ends as one line, exit 130.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import sys
from collections.abc import Callable
from typing import NoReturn

from mode_fast.core.errors import EXIT_INTERRUPTED, EXIT_USAGE, ConfigError, Interrupted, ModeFastError

# name -> (job module, one-line help); only the CLI imports mode_fast.jobs
COMMANDS: dict[str, tuple[str, str]] = {
    "curate": ("mode_fast.jobs.curate", "MetaCLIP curation: match captions to metadata, count, balance"),
    "cluster": ("mode_fast.jobs.cluster", "MoDE two-level clustering: fine k-means centers, coarse experts"),
    "dedup": ("mode_fast.jobs.dedup", "exact and semantic (SemDeDup) deduplication: kept keys per eps"),
    "train": ("mode_fast.jobs.train", "train MoDE data experts on open_clip models"),
    "eval": ("mode_fast.jobs.eval", "zero-shot evaluation of experts and their ensemble"),
    "export": (
        "mode_fast.jobs.export",
        "a run's models as safetensors files open_clip loads, and its MoDE ensemble as one file",
    ),
    "metadata": ("mode_fast.jobs.metadata", "build or merge a metadata list (WordNet, user lists)"),
    "sample": ("mode_fast.jobs.sample", "write the embedded synthetic sample pool"),
    "demo": ("mode_fast.jobs.demo", "the whole pipeline on the embedded sample: sample, curate, cluster, train, eval"),
    "open-clip-train": (
        "mode_fast.jobs.open_clip_main",
        "open_clip's own trainer (open_clip_train.main, its arguments) with this project's loss",
    ),
}
# commands whose arguments belong to another program: everything after the name is passed on
PASSTHROUGH = {"open-clip-train"}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the one error contract: a bad flag is one line, exit 2 (argparse prints
    its whole usage block first, which buries the line that says what is wrong)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def check_numbers(args: argparse.Namespace) -> None:
    """Every float an argument holds is finite: ``--t inf`` or ``--lr nan`` would pass each
    job's range checks (inf > 0) and fail deep inside, so they are refused here, once."""
    for dest, value in vars(args).items():
        for v in value if isinstance(value, list | tuple) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"--{dest.replace('_', '-')} must be a finite number, got {v}")


def setup_logging(debug: bool = False) -> None:
    """The one logging setup: mode-fast's INFO lines on stderr, other libraries' at
    WARNING (open_clip logs model parsing details on the root logger)."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("mode_fast").setLevel(logging.DEBUG if debug else logging.INFO)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")


def run_job(prog: str, run: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a job's ``run(args)`` under the one error contract (see the module docstring)."""
    debug = bool(getattr(args, "debug", False))
    setup_logging(debug)
    try:
        check_numbers(args)
        return int(run(args) or 0)
    except Interrupted as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ModeFastError as exc:
        if debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="mode-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            add_common_arguments(sp)
            module.add_arguments(sp)
            sp.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in PASSTHROUGH:
        module = importlib.import_module(COMMANDS[command][0])
        rest = argv[argv.index(command) + 1 :]
        return run_job(f"mode-fast {command}", lambda _args: module.main(rest), argparse.Namespace())
    parser = _build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    return run_job(f"mode-fast {args.command}", args._run, args)


if __name__ == "__main__":
    raise SystemExit(main())
