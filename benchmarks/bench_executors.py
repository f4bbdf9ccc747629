"""Scale-out overhead: curate and cluster assignment on the local executor and on Ray, 1 and 2 workers.

Run (CPU):  .venv/bin/python -m pytest benchmarks/bench_executors.py \
                --benchmark-json benchmarks/results/cpu/executors.json
then:       .venv/bin/python benchmarks/report.py benchmarks/results/cpu/executors.json
Within each group (same job, same worker count) the local executor is the baseline, so the
speed-up column is Ray's throughput relative to local: below 1.00x is the overhead Ray adds.
Ray runs on a local 2-CPU Ray started once for the module (a user's cluster already
runs; its start-up is not timed); each timed run includes starting the actor pool and
loading the matcher or the centers and encoder in every actor.
Pools: curate, EXEC_BENCH_CURATE_N captions (default 2M) in 8 parquet shards against the
shipped WordNet metadata (148,730 entries); cluster assignment, EXEC_BENCH_CLUSTER_N
captions (default 8k) in 8 parquet shards embedded with all-MiniLM-L6-v2 and assigned to
1024 fine centers (the fit is done once, before timing; each round re-embeds).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from mode_fast.clustering.run import ClusterConfig, run_clustering  # noqa: E402
from mode_fast.core.runs import MANIFEST, RunState  # noqa: E402
from mode_fast.curation.run import CurateConfig, run_curation  # noqa: E402
from mode_fast.demo.sample import sample_captions  # noqa: E402

CURATE_N = int(os.environ.get("EXEC_BENCH_CURATE_N", 2_000_000))
CLUSTER_N = int(os.environ.get("EXEC_BENCH_CLUSTER_N", 8_000))
SHARDS = 8


def _parquet_pool(root: Path, n: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    captions = sample_captions(n, seed=7)
    for s in range(SHARDS):
        part = range(s * n // SHARDS, (s + 1) * n // SHARDS)
        pq.write_table(
            pa.table({"uid": [f"{i:09d}" for i in part], "caption": [captions[i] for i in part]}),
            root / f"pool-{s:03d}.parquet",
        )
    return root


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def curate_pool(tmp_path_factory) -> Path:
    return _parquet_pool(tmp_path_factory.mktemp("curate_pool"), CURATE_N)


@pytest.fixture(scope="module")
def cluster_setup(tmp_path_factory):
    pool = _parquet_pool(tmp_path_factory.mktemp("cluster_pool"), CLUSTER_N)
    fitted = tmp_path_factory.mktemp("cluster_fit")
    job = ClusterConfig(
        shards=sorted(pool.glob("*.parquet")),
        out=fitted,
        fine_k=1024,
        experts=4,
        sample=CLUSTER_N,
        workers=1,
        progress=False,
    )
    run_clustering(job)  # fits centers.npz once; timed rounds only embed and assign
    return job, fitted


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_curate(benchmark, curate_pool, tmp_path, local_ray, executor, workers):
    benchmark.group = f"curate {CURATE_N // 1000}k captions, {SHARDS} shards, workers={workers}"
    out = tmp_path / "out"

    def run():
        shutil.rmtree(out, ignore_errors=True)  # every round matches, counts and writes afresh
        cfg = CurateConfig(pools=(curate_pool,), out=out, t=50, seed=0, workers=workers, executor=executor)
        return run_curation(cfg)

    summary = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(
        provider=f"{executor} x{workers}",
        baseline=executor == "local",
        records_per_s=summary["pool_size"] / benchmark.stats.stats.median,
        kept=summary["kept"],
    )


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_cluster_assign(benchmark, cluster_setup, tmp_path, local_ray, executor, workers):
    job, fitted = cluster_setup
    benchmark.group = f"cluster assign {CLUSTER_N // 1000}k captions (MiniLM + K=1024), workers={workers}"
    out = tmp_path / "out"

    def fitted_run_without_assignments():
        # The fitted run, resumed: its embeddings and assignments forgotten (files removed),
        # through the run's own manifest, so each round embeds and assigns every shard.
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(fitted, out)
        recorded = json.loads((out / MANIFEST).read_text())
        with RunState.open(out, "cluster", inputs=recorded["inputs"], args=recorded["args"]) as state:
            assert state.forget("assign:*") and state.forget("embed:*")

    def run():
        return run_clustering(dataclasses.replace(job, out=out, workers=workers, executor=executor))

    sizes = benchmark.pedantic(run, setup=fitted_run_without_assignments, rounds=2, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(
        provider=f"{executor} x{workers}",
        baseline=executor == "local",
        records_per_s=sizes["n_assigned"] / benchmark.stats.stats.median,
    )
