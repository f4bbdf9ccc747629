"""SemDeDup's within-cluster step: mode-fast's max_earlier_similarity vs the public code's method.

The reference is what facebookresearch/SemDeDup's users run for each cluster: the n x n
similarity matrix ``x @ x.T``, its diagonal zeroed, ``triu(., 1)``, the column max
(mode_fast.kernels.reference.max_earlier_similarity_dense). mode-fast's torch path (the CPU
backend) computes only the strict triangle, in square tiles with a 1 MB scratch.

CPU rows, each cell a fresh process running this file as a script (`worker`), fp32, unit-norm
random rows (the data does not change the work):

- time and memory at n = SEMDEDUP_BENCH_SIZES (1k, 4k, 8k, 16k), D = SEMDEDUP_BENCH_D (512),
  with SEMDEDUP_BENCH_THREADS torch threads ("0,1": the machine's default and one thread, the
  steadier figure on a shared machine, where other jobs' load stalls multi-threaded matmuls):
  time_s the median of SEMDEDUP_BENCH_ROUNDS calls (wall), cpu_s the process CPU time of the
  same calls (steadier on a shared machine); peak_mb the peak RSS growth of the first call
  with x already in memory (proc_memory: the kernel's peak mark reset just before the call);
  fixed_mb the process's imports and a warm-up call at n = 16 (paid once, reported apart).
  maxima_sum = sum of max(best, 0): the two methods' results side by side.
- the largest cluster each handles within SEMDEDUP_BENCH_BUDGET_MB (1024) of peak RSS growth:
  n doubled from 1024 until a probe exceeds the budget or n reaches SEMDEDUP_BENCH_CAP
  (131072: the time of one call grows as n^2, ~1-5 minutes there on 2 shared cores), then bisected to
  1/64 of the bracket's low end; each probe a fresh process, one call. A capped search reports
  the cap as a lower bound.

    .venv/bin/python -m pytest benchmarks/bench_semdedup.py --benchmark-json benchmarks/results/cpu/semdedup.json
    .venv/bin/python benchmarks/bench_semdedup.py report benchmarks/results/cpu/semdedup.json [--note TEXT]

GPU rows (`-m gpu`, skipped without CUDA; benchmarks/gpu_check.sh runs them): the Triton kernel
vs the dense reference and vs the torch path on CUDA, in-process CUDA timings and
torch.cuda.max_memory_allocated growth.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

SIZES = [int(s) for s in os.environ.get("SEMDEDUP_BENCH_SIZES", "1024,4096,8192,16384").split(",")]
D = int(os.environ.get("SEMDEDUP_BENCH_D", "512"))
ROUNDS = int(os.environ.get("SEMDEDUP_BENCH_ROUNDS", "3"))
THREADS = [int(t) for t in os.environ.get("SEMDEDUP_BENCH_THREADS", "0,1").split(",")]
BUDGET_MB = float(os.environ.get("SEMDEDUP_BENCH_BUDGET_MB", "1024"))
CAP = int(os.environ.get("SEMDEDUP_BENCH_CAP", "131072"))
START = 1024
METHODS = {
    "reference": "public SemDeDup method: x @ x.T, fill_diagonal_, triu, column max (dense n x n)",
    "mode_fast": "mode-fast max_earlier_similarity, torch path (triangle tiles)",
}


def worker(method: str, n: int, d: int, rounds: int, threads: int, out: str) -> None:
    """One fresh process: imports and a warm-up (fixed cost), x made, then the measured calls."""
    sys.path[:0] = [str(HERE), str(ROOT)]
    from proc_memory import reset_peak, status_mb

    start_mb = status_mb("VmRSS")
    import torch

    from mode_fast.kernels.reference import max_earlier_similarity_dense
    from mode_fast.kernels.semdedup import max_earlier_similarity

    if threads:
        torch.set_num_threads(threads)

    def step(x):
        if method == "reference":
            return max_earlier_similarity_dense(x)
        return max_earlier_similarity(x, backend="torch")[0].clamp_min(0)

    g = torch.Generator().manual_seed(n)
    step(torch.nn.functional.normalize(torch.randn(16, d, generator=g), dim=1))
    fixed_mb = status_mb("VmHWM") - start_mb
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    walls, cpus, peak_mb, total = [], [], 0.0, 0.0
    for r in range(rounds):
        reset_peak()
        before = status_mb("VmRSS")
        t0, c0 = time.perf_counter(), time.process_time()
        best = step(x)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        if r == 0:
            peak_mb = status_mb("VmHWM") - before
            total = float(best.double().sum())
        del best
    Path(out).write_text(json.dumps({
        "method": method, "n": n, "d": d, "rounds": rounds, "threads": torch.get_num_threads(),
        "time_s": statistics.median(walls), "time_min_s": min(walls), "cpu_s": statistics.median(cpus),
        "peak_mb": peak_mb, "fixed_mb": fixed_mb, "input_mb": n * d * 4 / 2**20, "maxima_sum": total,
    }))  # fmt: skip


def run_cell(method: str, n: int, d: int = D, rounds: int = ROUNDS, threads: int = 0) -> dict:
    """One fresh process; its figures."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench_semdedup_") as tmp:
        out = Path(tmp) / "cell.json"
        proc = subprocess.run(
            [sys.executable, __file__, "worker", method, str(n), str(d), str(rounds), str(threads), str(out)],
            capture_output=True, text=True, timeout=3600,
        )  # fmt: skip
        if proc.returncode:
            raise RuntimeError(f"{method} n={n} failed: {proc.stderr[-2000:]}")
        return json.loads(out.read_text())


def largest_within(method: str, budget_mb: float = BUDGET_MB, cap: int = CAP, d: int = D) -> dict:
    """Doubling from START, then bisection: the largest n whose peak RSS growth fits the budget."""
    probes = []

    def fits(n: int) -> bool:
        cell = run_cell(method, n, d, rounds=1)
        probes.append({k: cell[k] for k in ("n", "peak_mb", "time_s")})
        return cell["peak_mb"] <= budget_mb

    lo, hi, n = 0, None, START
    while n <= cap:
        if not fits(n):
            hi = n
            break
        lo, n = n, 2 * n
    if hi is not None:
        while hi - lo > max(lo // 64, 1):
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return {"largest_n": lo, "capped": hi is None, "cap": cap, "budget_mb": budget_mb, "probes": probes}


# ---- the pytest suite
if __name__ != "__main__":  # the worker and report modes run without pytest (less RSS at start)
    import pytest

    @pytest.mark.parametrize("n", SIZES)
    @pytest.mark.parametrize("threads", THREADS)
    @pytest.mark.parametrize("method", list(METHODS))
    def test_cpu_time_and_memory(benchmark, method, threads, n):
        benchmark.group = f"cpu semdedup step n={n} D={D} fp32, {threads or 'default'} threads, fresh process"
        got = {}
        benchmark.pedantic(lambda: got.update(run_cell(method, n, threads=threads)), rounds=1, iterations=1)
        benchmark.extra_info.update(provider=METHODS[method], baseline=method == "reference", **got)

    @pytest.mark.parametrize("method", list(METHODS))
    def test_cpu_largest_cluster_in_budget(benchmark, method):
        benchmark.group = f"cpu semdedup largest cluster in {BUDGET_MB:g} MB of peak RSS growth, D={D} fp32"
        got = {}
        benchmark.pedantic(lambda: got.update(largest_within(method)), rounds=1, iterations=1)
        benchmark.extra_info.update(provider=METHODS[method], method=method, d=D, **got)

    # ---- GPU (skipped without CUDA): Triton vs the dense reference and the torch path
    import torch

    CUDA = torch.cuda.is_available()
    GPU_CASES = [(16384, 768, "float32"), (65536, 768, "float32"), (65536, 768, "bfloat16")]
    GPU_METHODS = ("reference", "torch", "triton")

    @pytest.mark.gpu
    @pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
    @pytest.mark.parametrize("method", GPU_METHODS)
    @pytest.mark.parametrize("n, d, dtype", GPU_CASES)
    def test_gpu_semdedup(benchmark, method, n, d, dtype):
        from mode_fast.kernels.reference import max_earlier_similarity_dense
        from mode_fast.kernels.semdedup import max_earlier_similarity

        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.nn.functional.normalize(torch.randn(n, d, device="cuda", generator=g), dim=1)
        x = x.to(getattr(torch, dtype))
        if method == "reference":
            # the public code's matrix in the inputs' dtype, as its users run it
            fn = lambda: max_earlier_similarity_dense(x)
        else:
            fn = lambda: max_earlier_similarity(x, backend=method)[0]
        fn()  # compile / autotune outside the timed rounds
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()

        def timed():
            out = fn()
            torch.cuda.synchronize()
            return out

        benchmark.group = f"gpu semdedup step n={n} D={d} {dtype}"
        benchmark.pedantic(timed, rounds=3, iterations=1)
        benchmark.extra_info.update(
            provider={"reference": "public SemDeDup method (dense n x n)", "torch": "mode-fast torch path",
                      "triton": "mode-fast Triton kernel (autotuned)"}[method],
            baseline=method == "reference", n=n, d=d,
            peak_mb=(torch.cuda.max_memory_allocated() - base) / 2**20,
            device=torch.cuda.get_device_name(0),
        )  # fmt: skip


# ---- the report: markdown tables from the pytest-benchmark JSON
def render(results: dict, note: str = "") -> str:
    from report import device_name

    cells, budget = {}, {}
    for b in results["benchmarks"]:
        info = b.get("extra_info", {})
        if "largest_n" in info:
            budget[info["method"]] = info
        elif "method" in info and "peak_mb" in info and "cpu_s" in info:
            cells[(info["method"], info["threads"], info["n"])] = info
    keys = sorted({(t, n) for _, t, n in cells}, key=lambda k: (-k[0], k[1]))
    mi = results.get("machine_info", {})
    any_cell = next(iter(cells.values()), {})
    lines = [
        "# SemDeDup within-cluster step, CPU: mode-fast vs the public code's method",
        "",
        f"Device: {device_name(mi)}. Run: {results.get('datetime', '?')}, Python {mi.get('python_version', '?')}.",
        "",
        *([note, ""] if note else []),
        f"D = {any_cell.get('d', D)}, fp32, unit-norm random rows; each cell a fresh process. Reference: "
        f"{METHODS['reference']}. mode-fast: {METHODS['mode_fast']}. Time: median wall of "
        f"{any_cell.get('rounds', '?')} calls (process CPU time beside it); peak: peak RSS growth of one call with "
        "x already in memory. Ratios: reference / mode-fast (above 1: mode-fast faster or smaller).",
        "",
        "| threads | n | reference time (s) | mode-fast time (s) | time ratio | reference CPU (s) | mode-fast CPU (s) "
        "| reference peak (MB) | mode-fast peak (MB) | memory ratio | maxima sums (ref / mode-fast) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t, n in keys:
        r, m = cells.get(("reference", t, n)), cells.get(("mode_fast", t, n))
        if not (r and m):
            lines.append(f"| {t} | {n:,} | missing |")
            continue
        lines.append(
            f"| {r['threads']} | {n:,} | {r['time_s']:.3f} | {m['time_s']:.3f} | {r['time_s'] / m['time_s']:.2f}x "
            f"| {r['cpu_s']:.3f} | {m['cpu_s']:.3f} | {r['peak_mb']:,.1f} | {m['peak_mb']:,.1f} "
            f"| {r['peak_mb'] / max(m['peak_mb'], 0.1):,.0f}x | {r['maxima_sum']:.3f} / {m['maxima_sum']:.3f} |"
        )
    if budget:
        b0 = next(iter(budget.values()))
        lines += [
            "",
            f"## Largest cluster within {b0['budget_mb']:g} MB of peak RSS growth (D = {b0['d']}, fp32)",
            "",
            "Doubling from 1,024, then bisection to 1/64 of the bracket; each probe a fresh process. "
            f"The search stops at {b0['cap']:,} rows (time grows as n^2): a capped result is a lower bound.",
            "",
            "| method | largest n | probes (n: peak MB, time s) |",
            "|---|---|---|",
        ]
        for method in METHODS:
            info = budget.get(method)
            if info is None:
                lines.append(f"| {method} | missing | |")
                continue
            probes = "; ".join(f"{p['n']:,}: {p['peak_mb']:,.0f}, {p['time_s']:.1f}" for p in info["probes"])
            largest = f">= {info['largest_n']:,} (cap)" if info["capped"] else f"{info['largest_n']:,}"
            lines.append(f"| {method} | {largest} | {probes} |")
        if "reference" in budget and "mode_fast" in budget and budget["reference"]["largest_n"]:
            ratio = budget["mode_fast"]["largest_n"] / budget["reference"]["largest_n"]
            bound = ">= " if budget["mode_fast"]["capped"] else ""
            lines += ["", f"mode-fast / reference: {bound}{ratio:.1f}x larger clusters in the same memory."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    if argv and argv[0] == "worker":
        method, n, d, rounds, threads, out = argv[1:]
        worker(method, int(n), int(d), int(rounds), int(threads), out)
    elif argv and argv[0] == "report":
        sys.path.insert(0, str(HERE))
        path = Path(argv[1])
        opts = dict(zip(argv[2::2], argv[3::2]))  # --out RESULTS.md, --note TEXT
        text = render(json.loads(path.read_text()), opts.get("--note", ""))
        out = Path(opts.get("--out", path.with_suffix(".md")))
        out.write_text(text)
        print(text)
    else:
        sys.exit(f"usage: {sys.argv[0]} worker ... | report RESULTS.json [--out RESULTS.md] [--note TEXT]")


if __name__ == "__main__":
    main(sys.argv[1:])
