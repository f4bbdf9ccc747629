"""`mode-fast eval`: zero-shot scores of MoDE data experts, their ensembles and single models.

The job is `mode_fast.evaluation.run` (`EvalConfig`, `run_evaluation`; its docstring says
what is scored, written and recomputed on a rerun); this module is its command line: the
parser comes from the config's fields, and the results table is printed.
"""

from __future__ import annotations

import argparse

from mode_fast.core import config
from mode_fast.evaluation.results import markdown_table
from mode_fast.evaluation.run import EvalConfig, run_evaluation


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_arguments(parser, EvalConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config.config_from_args(EvalConfig, args)
    results = run_evaluation(cfg)
    print(markdown_table(results), end="")
    print(f"results in {cfg.out}/results.json, results.md, accuracy.png, expert_weights.png")
    return 0
