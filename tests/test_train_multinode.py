"""Training past one machine, as far as one machine allows: a two-"node" torchrun launch
(two launchers, one process each, meeting at a rendezvous address as two hosts would) and
experts run as independent, concurrent jobs on one run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from local_ports import free_port
from test_train import BASE, metrics, pool, run_train, weights  # noqa: F401  (pool: fixture)

torch.set_num_threads(1)


def _launch(argv: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", **(extra_env or {}))
    return subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]


def test_two_node_torchrun_matches_one_process(pool, tmp_path):
    """What a 2-node job runs on each node, here with both "nodes" on 127.0.0.1: the same
    global batch (2 x 8) gives one process's losses and weights (batch 16)."""
    torch.set_num_threads(1)
    common = ["--data", str(pool / "shards"), "--steps", "4", "--model", "mode-fast-tiny",
              "--warmup", "2", "--lr", "1e-3", "--workers", "0", "--no-progress"]  # fmt: skip
    one = run_train([*common, "--batch-size", "16", "--out", str(tmp_path / "one")])
    port = str(free_port())
    nodes = [
        _launch(["-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
                 "--master-addr", "127.0.0.1", "--master-port", port,
                 "-m", "mode_fast", "train", *common, "--batch-size", "8", "--out", str(tmp_path / "two")])
        for rank in (0, 1)
    ]  # fmt: skip
    _wait_all(nodes)
    config = json.loads((tmp_path / "two/seed/config.json").read_text())
    assert config["world_size"] == 2
    l1 = [r["loss"] for r in metrics(tmp_path / "one/seed")]
    l2 = [r["loss"] for r in metrics(tmp_path / "two/seed")]
    assert len(l1) == len(l2) == 4 and l1 == pytest.approx(l2, rel=1e-5)
    w1, w2 = weights(one), weights(tmp_path / "two/seed/checkpoints/final.pt")
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5, msg=name)


def test_experts_run_as_independent_concurrent_jobs(pool, tmp_path):
    """MoDE's experts are separate jobs (a Slurm array, a Ray task each): two started at
    once on one run folder give exactly what each gives alone."""
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): bitwise equality needs the same sums
    run = tmp_path / "run"
    seed_args = ["--data", str(pool / "shards"), "--out", str(run), "--stage", "seed", "--steps", "4",
                 "--schedule-steps", "8"]  # fmt: skip
    run_train(seed_args)
    expert = ["--data", str(pool / "shards"), "--out", str(run), "--clusters", str(pool / "clusters")]
    procs = [_launch(["-m", "mode_fast", "train", *BASE, *expert, "--expert", str(k)]) for k in (0, 1)]
    _wait_all(procs)
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "seed").symlink_to(run / "seed", target_is_directory=True)
    for k in (0, 1):
        solo = run_train([*expert[:3], str(alone), *expert[4:], "--expert", str(k)])
        together = weights(run / f"expert_{k}/checkpoints/final.pt")
        for name, w in weights(solo).items():
            assert torch.equal(together[name], w), (k, name)
    # the two experts really differ: each trained on its own cluster
    w0, w1 = weights(run / "expert_0/checkpoints/final.pt"), weights(run / "expert_1/checkpoints/final.pt")
    assert any(not torch.equal(w0[n], w1[n]) for n in w0)
