"""`mode-fast demo`: the whole pipeline on the embedded sample (mode_fast.demo.pipeline)."""

from __future__ import annotations

import argparse

from mode_fast.core import config
from mode_fast.demo.pipeline import DemoConfig, run_demo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_arguments(parser, DemoConfig)


def run(args: argparse.Namespace) -> int:
    run_demo(config.config_from_args(DemoConfig, args))
    return 0
