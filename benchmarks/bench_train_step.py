"""Training-step benchmarks: one optimizer step of an open_clip model with this project's
loss against open_clip's, same model, same batch, same run; and the whole `mode-fast train`
job (loader included) on a small synthetic pool.

Run (CPU):  .venv/bin/python -m pytest benchmarks/bench_train_step.py \
                --benchmark-json benchmarks/results/cpu/train_step.json
then:       .venv/bin/python benchmarks/report.py benchmarks/results/cpu/train_step.json
On a CUDA machine the steps run in bf16 autocast, and the `largest batch` group finds the
largest batch each loss trains at (doubling until out of memory, then bisecting) and
measures it there; write those results to benchmarks/results/<gpu>/. On the CPU the same
search runs when TRAIN_BENCH_CPU_BUDGET_GB is set: each try is a fresh process whose
memory is capped there (RLIMIT_DATA, so an allocation past it fails as on a full GPU).
Rows report samples/s (batch / median step time) and peak memory: on CUDA the allocator's
peak over the step; on the CPU the peak resident set of a fresh process running the step,
over what it held before the step.
Sizes: TRAIN_BENCH_MODEL (default mode-fast-tiny on CPU, ViT-B-32 on CUDA),
TRAIN_BENCH_BATCH (default 256 on CPU, 1024 on CUDA), TRAIN_BENCH_THREADS (default 1).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mode_fast.training import loop as training
from mode_fast.training import models
from mode_fast.training.run import TrainConfig, run_training

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
MODEL = os.environ.get("TRAIN_BENCH_MODEL", "ViT-B-32" if CUDA else "mode-fast-tiny")
BATCH = int(os.environ.get("TRAIN_BENCH_BATCH", 1024 if CUDA else 256))
THREADS = int(os.environ.get("TRAIN_BENCH_THREADS", 1))
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
PROVIDERS = ["open_clip", "mode_fast"]

torch.set_num_threads(THREADS)  # a shared machine: oversubscribed OpenMP threads crawl


def loss_class(provider: str) -> type:
    if provider == "open_clip":
        from open_clip.loss import ClipLoss

        return ClipLoss
    loss_module = pytest.importorskip("mode_fast.training.loss", reason="mode_fast.training.loss not written yet")
    return loss_module.ClipLoss


def make_step(provider: str, batch: int) -> tuple[Callable[[], float], torch.nn.Module]:
    """A closure running one training step (forward, loss, backward, AdamW) on a fixed batch."""
    import open_clip

    models.register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL, pretrained=None, device=DEVICE, output_dict=True)
    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    context = model.context_length
    images = torch.randn(batch, 3, *size, device=DEVICE)
    texts = torch.randint(1, 49000, (batch, context), device=DEVICE)
    optimizer = torch.optim.AdamW(training.param_groups(model, 0.2), lr=1e-4)
    loss_fn = loss_class(provider)(cache_labels=True)

    def step() -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16) if CUDA else torch.autocast("cpu", enabled=False):
            loss = loss_fn(**model(images, texts))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if CUDA:
            torch.cuda.synchronize()
        return float(loss)

    return step, model


# The CPU's peak memory comes from a fresh process: its peak-RSS mark is reset after the
# model, batch and a warm-up step exist, so the figure is what one more step needs.
_CPU_PEAK_SCRIPT = r"""
import json, sys, torch
sys.path[:0] = {paths!r}
torch.set_num_threads({threads})
import bench_train_step as b
step, _ = b.make_step({provider!r}, {batch})
step()
from proc_memory import reset_peak, status_mb
reset_peak()
before = status_mb("VmRSS")
step()
print(json.dumps({{"peak_mb": status_mb("VmHWM") - before}}))
"""


def peak_memory_mb(provider: str, batch: int, step: Callable[[], float]) -> float:
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        step()
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    here = os.path.dirname(os.path.abspath(__file__))
    script = _CPU_PEAK_SCRIPT.format(paths=[here], threads=THREADS, provider=provider, batch=batch)
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.benchmark(group=f"train step {MODEL} batch {BATCH} {DEVICE}")
def test_train_step(benchmark, provider):
    step, _ = make_step(provider, BATCH)
    benchmark.pedantic(step, rounds=5 if CUDA else 3, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        provider=provider, baseline=provider == "open_clip", model=MODEL, batch=BATCH,
        device=torch.cuda.get_device_name(0) if CUDA else "cpu", threads=torch.get_num_threads(),
        samples_per_s=BATCH / median, peak_mb=peak_memory_mb(provider, BATCH, step),
    )  # fmt: skip


CPU_BUDGET_GB = float(os.environ.get("TRAIN_BENCH_CPU_BUDGET_GB", 0))

_CPU_FITS_SCRIPT = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_DATA, ({budget}, {budget}))  # the whole process, torch included
sys.path[:0] = {paths!r}
import torch
torch.set_num_threads({threads})
import bench_train_step as b
try:
    step, _ = b.make_step({provider!r}, {batch})
    step()
    step()
except (RuntimeError, MemoryError) as exc:
    if "allocate" not in str(exc) and not isinstance(exc, MemoryError):
        raise
    sys.exit(3)
"""


def fits(provider: str, batch: int) -> bool:
    if not CUDA:
        here = os.path.dirname(os.path.abspath(__file__))
        script = _CPU_FITS_SCRIPT.format(
            budget=int(CPU_BUDGET_GB * 2**30), paths=[here], threads=THREADS, provider=provider, batch=batch
        )
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        if proc.returncode not in (0, 3):
            raise RuntimeError(f"{provider} batch {batch}: {proc.stderr[-2000:]}")
        return proc.returncode == 0
    try:
        step, model = make_step(provider, batch)
        step()
        step()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        step = model = None  # noqa: F841  (free before the next try)
        torch.cuda.empty_cache()


def largest_batch(provider: str, start: int = 256 if CUDA else 2048, limit: int = 1 << 17) -> int:
    """Largest batch that trains, to within 1/8: double until OOM, then bisect."""
    lo, hi = 0, start
    while hi <= limit and fits(provider, hi):
        lo, hi = hi, hi * 2
    if lo == 0:
        pytest.skip(f"{provider}: even batch {start} does not fit")
    while hi - lo > max(lo // 8, 1):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(provider, mid) else (lo, mid)
    return lo


@pytest.mark.skipif(not CUDA and not CPU_BUDGET_GB, reason="needs a CUDA device, or TRAIN_BENCH_CPU_BUDGET_GB")
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.benchmark(group=f"largest batch {MODEL} {DEVICE}" + ("" if CUDA else f" within {CPU_BUDGET_GB:g} GiB"))
def test_largest_batch(benchmark, provider):
    batch = largest_batch(provider)
    step, _ = make_step(provider, batch)
    benchmark.pedantic(step, rounds=3 if CUDA else 2, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(
        provider=provider, baseline=provider == "open_clip", model=MODEL, largest_batch=batch,
        device=torch.cuda.get_device_name(0) if CUDA else "cpu", samples_per_s=batch / benchmark.stats.stats.median,
        peak_mb=peak_memory_mb(provider, batch, step),
    )  # fmt: skip


# --------------------------------------------------------------------------- the whole job
@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from test_loader import make_shards

    root = tmp_path_factory.mktemp("bench_pool")
    make_shards(root, n=1280, per_shard=256)
    return root


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.benchmark(group="mode-fast train job mode-fast-tiny batch 64")
def test_train_job(benchmark, pool, tmp_path, workers):
    """`mode-fast train` end to end: loader, step, logging; samples/s from its metrics."""
    runs: list[Path] = []

    def job() -> None:
        out = tmp_path / f"run{len(runs)}"
        runs.append(out)
        run_training(TrainConfig(
            data=(str(pool),), out=out, model="mode-fast-tiny", batch_size=64, steps=20, warmup=2,
            workers=workers, no_progress=True, save_every=1000, device=DEVICE,
        ))  # fmt: skip

    benchmark.pedantic(job, rounds=2, iterations=1)
    rows = [json.loads(line) for out in runs for line in (out / "seed/metrics.jsonl").read_text().splitlines()]
    steady = [r for r in rows if r["step"] > 1]  # the first step includes worker start-up
    benchmark.extra_info.update(
        provider=f"workers={workers}", baseline=workers == 0, batch=64, steps=20,
        samples_per_s=statistics.median(r["samples_per_s"] for r in steady),
        data_wait_ms=1000 * statistics.median(r["data_time"] for r in steady),
        threads=torch.get_num_threads(),
    )  # fmt: skip
