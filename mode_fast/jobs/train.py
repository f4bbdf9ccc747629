"""`mode-fast train`: MoDE data experts on open_clip models, with this project's loss.

The command line of `mode_fast.training.run`: the parser comes from `TrainConfig`'s fields,
the job is `run_training` (its docstring: the schedule, the outputs, reruns). The CLI prints
the final checkpoint's path (rank 0) and leaves no process group behind.
"""

from __future__ import annotations

import argparse
import os

import torch.distributed as dist

from mode_fast.core import config
from mode_fast.training.run import TrainConfig, run_training


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_arguments(parser, TrainConfig)


def run(args: argparse.Namespace) -> int:
    try:
        final = run_training(TrainConfig.from_args(args))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(final)
    return 0
