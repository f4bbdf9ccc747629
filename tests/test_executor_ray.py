"""--executor ray: curate and cluster on a local Ray give the local executor's outputs, byte
for byte, and a worker killed mid-job loses nothing and counts nothing twice."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'mode-fast[ray]'")

from test_runs import _one_line as one_line  # noqa: E402
from test_runs import _run as run_cli  # noqa: E402
from test_runs import _start as start_cli  # noqa: E402
from test_runs import _wait_for as wait_for  # noqa: E402

from mode_fast.clustering.experts import TwoLevel  # noqa: E402
from mode_fast.clustering.run import ClusterConfig, run_clustering  # noqa: E402
from mode_fast.core.errors import InputError  # noqa: E402
from mode_fast.core.executor import LocalExecutor, RayExecutor, make_executor  # noqa: E402
from mode_fast.curation.run import CurateConfig, run_curation  # noqa: E402
from mode_fast.demo.sample import write_sample  # noqa: E402


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    write_sample(root, num_pairs=1200, shard_size=200, eval_pairs=10, image_size=16)
    return root / "pool"


@pytest.fixture
def local_ray(request):
    """A local 2-CPU Ray for one test; `faults` (a ;-separated MODE_FAST_FAULT) reaches the
    workers through the runtime env, which is fixed when Ray starts."""

    def start(faults: str | None = None) -> None:
        env = {"MODE_FAST_FAULT": faults} if faults else {}
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})

    yield start
    ray.shutdown()


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".work" not in p.parts and p.name != "summary.json"
    }


def _summary(root: Path) -> dict:
    s = json.loads((root / "summary.json").read_text())
    s.pop("seconds")
    return s


def _curate(pool: Path, out: Path, executor: str) -> dict:
    return run_curation(CurateConfig(pools=(pool,), out=out, t=20, seed=3, workers=2, executor=executor))


def test_curate_ray_matches_local_byte_for_byte(pool, tmp_path, local_ray):
    _curate(pool, tmp_path / "local", "local")
    local_ray()
    _curate(pool, tmp_path / "ray", "ray")
    local, remote = _files(tmp_path / "local"), _files(tmp_path / "ray")
    assert len([k for k in local if k.startswith("data/")]) == 6
    assert local.keys() == remote.keys()
    assert all(local[k] == remote[k] for k in local), [k for k in local if local[k] != remote[k]]
    assert _summary(tmp_path / "local") == _summary(tmp_path / "ray")
    counts = np.load(tmp_path / "ray" / "entry_count.npy")
    assert counts.dtype == np.uint64 and counts.sum() > 0


def test_curate_ray_worker_killed_mid_job(pool, tmp_path, local_ray):
    """One worker dies before writing shard 2, another after writing shard 4 (its result
    never reaches the driver): Ray restarts the actor and reruns just those shards."""
    _curate(pool, tmp_path / "local", "local")
    markers = tmp_path / "died-before", tmp_path / "died-after"
    local_ray(f"before:pool-000002:{markers[0]};after:pool-000004:{markers[1]}")
    _curate(pool, tmp_path / "ray", "ray")
    assert all(m.exists() for m in markers)  # both kills happened
    assert _files(tmp_path / "local") == _files(tmp_path / "ray")
    local, remote = _summary(tmp_path / "local"), _summary(tmp_path / "ray")
    assert remote == local and remote["pool_size"] == 1200  # none lost, none counted twice
    kept_keys = (tmp_path / "ray" / "kept_keys.txt").read_text().split()
    assert len(kept_keys) == len(set(kept_keys)) == remote["kept"]


def _cluster(pool: Path, out: Path, executor: str) -> dict:
    job = ClusterConfig(
        shards=sorted(pool.glob("*.tar")),
        out=out,
        fine_k=12,
        experts=3,
        sample=500,
        workers=2,
        executor=executor,
        embedder="hash16",
        progress=False,
    )
    return run_clustering(job)


def _assignments(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "assignments").glob("*.parquet"))}


def test_cluster_ray_matches_local(pool, tmp_path, local_ray):
    a = _cluster(pool, tmp_path / "local", "local")
    local_ray()
    b = _cluster(pool, tmp_path / "ray", "ray")
    assert a == b and a["n_assigned"] > 1000
    assert _assignments(tmp_path / "local") == _assignments(tmp_path / "ray")
    ca, cb = TwoLevel.load(tmp_path / "local" / "centers.npz"), TwoLevel.load(tmp_path / "ray" / "centers.npz")
    assert np.array_equal(ca.fine_centroids, cb.fine_centroids)
    assert np.array_equal(ca.expert_of_fine, cb.expert_of_fine)


def test_dedup_ray_matches_local(pool, tmp_path, local_ray):
    """mode-fast dedup: shards and clusters on Ray actors give the local run's bytes."""
    from mode_fast.dedup.run import DedupConfig, run_dedup

    def dedup(out: Path, executor: str) -> dict:
        return run_dedup(DedupConfig(shards=sorted(pool.glob("*.tar")), out=out, embedder="hash16", clusters=8,
                                     eps="0.01,0.1", workers=2, executor=executor, progress=False))  # fmt: skip

    a = dedup(tmp_path / "local", "local")
    local_ray()
    b = dedup(tmp_path / "ray", "ray")
    assert a == b and a["eps"]["0.1"]["removed_semantic"] > 0
    for eps in ("eps_0.01", "eps_0.1"):
        for name in ("kept_keys.txt", "duplicates.tsv"):
            assert (tmp_path / "ray" / eps / name).read_bytes() == (tmp_path / "local" / eps / name).read_bytes()


def test_cluster_ray_worker_killed(pool, tmp_path, local_ray):
    a = _cluster(pool, tmp_path / "local", "local")
    marker = tmp_path / "died"
    local_ray(f"before:pool-000001.tar:{marker}")
    b = _cluster(pool, tmp_path / "ray", "ray")
    assert marker.exists()
    assert a == b
    assert _assignments(tmp_path / "local") == _assignments(tmp_path / "ray")


def _square(task):
    if task["i"] < 0:
        raise InputError(f"task {task['i']} is bad")
    return {"i": task["i"], "sq": task["i"] ** 2, "records": 1}


def _refuse_to_start():
    raise InputError("the initializer's own error")


def _register_this_module_by_value():
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_executor_map_orders_and_early_exit(kind, local_ray):
    if kind == "ray":
        _register_this_module_by_value()
        local_ray()
    runner = make_executor(kind, workers=2)
    assert isinstance(runner, LocalExecutor if kind == "local" else RayExecutor)
    tasks = [{"i": i} for i in range(7)]
    ordered = [r["i"] for r in runner.map(_square, tasks, ordered=True)]
    assert ordered == list(range(7))
    unordered = sorted(r["sq"] for r in runner.map(_square, tasks))
    assert unordered == [i * i for i in range(7)]
    it = runner.map(_square, tasks, ordered=True)
    assert next(it)["i"] == 0
    it.close()  # leaving early must not hang or raise
    runner.close()


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_task_and_initializer_errors_arrive_as_raised(kind, local_ray):
    """The driver gets the task's own exception (so the job's one-line error path sees an
    InputError, not Ray's wrapper), whichever executor ran it."""
    if kind == "ray":
        _register_this_module_by_value()
        local_ray()
    runner = make_executor(kind, workers=2)
    with pytest.raises(InputError, match="task -1 is bad"):
        list(runner.map(_square, [{"i": 1}, {"i": -1}, {"i": 2}]))
    with pytest.raises(InputError, match="the initializer's own error"):
        list(runner.map(_square, [{"i": 1}, {"i": 2}], init=(_refuse_to_start, ())))
    runner.close()


def _python(tmp_path: Path, source: str) -> str:
    """Run `source` in a fresh Python process (its own Ray); its stdout, once it exits 0."""
    script = tmp_path / "run.py"
    script.write_text(source)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_nothing_of_ray_runs_after_map_returns(tmp_path):
    """A thread left calling into Ray after `ray.shutdown()` makes Ray end the whole process
    with status 1 (it did, in CI: Ray Data's iterators left block-prefetch threads behind).
    In a fresh process: maps run to the end and stopped early, the executor closed, no
    thread but the main one is left, and the process lives on."""
    out = _python(
        tmp_path,
        "import threading, time\n"
        "from mode_fast.core.executor import make_executor\n"
        "def work(t):\n"
        "    time.sleep(t['s'])\n"
        "    return t['i']\n"
        "for _ in range(2):\n"
        "    runner = make_executor('ray', workers=2)\n"
        "    it = runner.map(work, [{'i': i, 's': 0.2} for i in range(8)], ordered=True)\n"
        "    assert [next(it), next(it)] == [0, 1]\n"
        "    it.close()\n"
        "    assert sorted(runner.map(work, [{'i': i, 's': 0.0} for i in range(4)])) == [0, 1, 2, 3]\n"
        "    runner.close()\n"
        "    print('threads', sorted(t.name for t in threading.enumerate()), flush=True)\n"
        "time.sleep(1.5)\n"
        "print('lived on', flush=True)\n",
    )
    assert out.count("threads ['MainThread']") == 2, out
    assert "lived on" in out


def test_more_workers_than_cpus_runs_on_the_actors_that_start(tmp_path):
    """--workers above the cluster's CPUs: the actors without a CPU never start, and the
    tasks run on those that do (handing tasks to actors that never start hung the job)."""
    out = _python(
        tmp_path,
        "import ray\n"
        "from mode_fast.core.executor import make_executor\n"
        "ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)\n"
        "runner = make_executor('ray', workers=3)\n"
        "print(sorted(runner.map(abs, [-i for i in range(6)])), flush=True)\n"
        "ray.shutdown()\n",
    )
    assert "[0, 1, 2, 3, 4, 5]" in out


def test_ctrl_c_of_a_ray_job_is_one_line_and_the_rerun_continues(pool, tmp_path):
    """Ctrl-C while the driver waits on Ray: the job's one-line interrupt message (Ray ran
    the handler inside its C code, and the exception came out as a SystemError traceback),
    then the rerun finishes with what the local executor writes."""
    args = ["curate", pool, "--t", "20", "--seed", "3", "--workers", "2", "--executor", "ray", "--out", tmp_path / "o"]
    run = start_cli(args, fault="slow:pool-000003:60")
    try:
        wait_for(lambda: len(list((tmp_path / "o" / ".work" / "matches").glob("*.npz"))) >= 5, what="5 of 6 shards")
        time.sleep(1.0)
        os.killpg(run.pid, signal.SIGINT)  # to the whole group, as a terminal sends it
        _, err = run.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 130, err
    assert "Traceback" not in err, err
    assert one_line(err) == [
        "mode-fast curate: interrupted at match (5/6 shards); rerun the same command to continue"
    ], err
    rerun = run_cli(args)
    assert rerun.returncode == 0, rerun.stderr
    _curate(pool, tmp_path / "local", "local")
    assert _files(tmp_path / "o") == _files(tmp_path / "local")


def test_unknown_executor_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown executor 'spark'"):
        make_executor("spark")


def test_cli_executor_ray(pool, tmp_path, capsys):
    """The CLI flag end to end (it starts, and stops, its own local Ray)."""
    from mode_fast.cli import main

    assert (
        main(
            [
                "curate",
                str(pool),
                "--out",
                str(tmp_path / "o"),
                "--t",
                "20",
                "--seed",
                "3",
                "--workers",
                "2",
                "--executor",
                "ray",
            ]
        )
        == 0
    )
    assert "kept" in capsys.readouterr().out
    assert not ray.is_initialized()
    _curate(pool, tmp_path / "local", "local")
    assert _files(tmp_path / "o") == _files(tmp_path / "local")
    assert (
        main(
            [
                "cluster",
                str(pool / "*.tar"),
                "--out",
                str(tmp_path / "c"),
                "--fine-k",
                "12",
                "--experts",
                "3",
                "--sample",
                "500",
                "--embedder",
                "hash16",
                "--workers",
                "2",
                "--executor",
                "ray",
                "--no-progress",
            ]
        )
        == 0
    )
    assert not ray.is_initialized()
    _cluster(pool, tmp_path / "c_local", "local")
    assert _assignments(tmp_path / "c") == _assignments(tmp_path / "c_local")
