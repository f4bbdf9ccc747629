"""`mode-fast export`: a MoDE run's models as safetensors files and its ensemble as one file.

The job is `mode_fast.evaluation.export` (`ExportConfig`, `run_export`; its docstring says
what is written and what a rerun does); this module is its command line.
"""

from __future__ import annotations

import argparse

from mode_fast.core import config
from mode_fast.evaluation.export import ExportConfig, run_export


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_arguments(parser, ExportConfig)


def run(args: argparse.Namespace) -> int:
    ensemble = run_export(config.config_from_args(ExportConfig, args))
    print(ensemble)
    return 0
