"""Per-rank peak memory of one distributed loss fwd+bwd: mode_fast vs open_clip, 2 / 4 / 8 gloo ranks.

Every distributed setting of mode_fast.training.loss.ClipLoss (local_loss x gather_with_grad,
ring=True) and SigLipLoss (dist_impl bidir, shift, reduce, gather) beside open_clip's ClipLoss
and SigLipLoss with the same settings (open_clip has no ring), in the same run, on the CPU.
Each cell (setting, ranks) starts `ranks` fresh processes, one per rank, that run this file as
a script (`worker`), join one gloo group and measure, per rank:

- fixed_mb: the fixed first-call cost of a fresh process, the peak RSS (VmHWM) after the
  imports (torch, mode_fast.training.loss and open_clip's loss.py loaded as a file: the
  open_clip package would add its model zoo, ~700 MB, to every process), gloo init and a warm-up call of the same setting at
  B = 16, less the interpreter's RSS at start. Paid once per process whatever B and world
  size; reported apart so it does not hide the loss's own growth.
- peak_mb: what the loss call itself adds, the peak RSS growth of one fp32 fwd+bwd at B rows
  per rank (inputs made, then a barrier, then the kernel's peak-RSS mark reset: proc_memory).
  It includes the inputs' gradients (2 * B * D * 4 bytes) for both libraries alike.

The allocator (RANKS_BENCH_MALLOC). glibc raises its mmap threshold the first time a large
block is freed; later blocks of that size then come from the heap, which keeps freed space
and fragments, so with the default allocator the peak RSS depends on the order of
allocations as much as on what is alive: one 8-rank SigLIP cell at B = 4096 gave 93 to
184 MB on different ranks of the same run, and 85 MB on every rank with the threshold
fixed. "fixed" (the default) starts every worker, of both libraries, with
MALLOC_MMAP_THRESHOLD_=131072: each large block is mapped on allocation and unmapped on
free, so the peak is the memory the loss holds at once (what a caching GPU allocator sees
too). "default" measures glibc as it comes (what a CPU job pays, noise included).

The table gives each cell's largest rank. A cell whose
estimated memory over all ranks exceeds RANKS_BENCH_MEM_GB (open_clip's local_loss=False
holds (ranks * B)^2 logit matrices per rank) is recorded as skipped, with the estimate.

    RANKS_BENCH_B=4096 .venv/bin/python -m pytest benchmarks/bench_loss_ranks.py \
        --benchmark-json benchmarks/results/cpu/loss_ranks.json
    .venv/bin/python benchmarks/bench_loss_ranks.py report benchmarks/results/cpu/loss_ranks.json

Environment: RANKS_BENCH_B (rows per rank, 4096 as in issue 25: about 27 minutes on 2 cores), RANKS_BENCH_D (512), RANKS_BENCH_RANKS ("2,4,8"), RANKS_BENCH_MEM_GB (8),
RANKS_BENCH_ONLY (comma-separated substrings of the setting names to run; the report then
lists the other cells as missing), RANKS_BENCH_MALLOC ("fixed" or "default", above).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

B = int(os.environ.get("RANKS_BENCH_B", "4096"))
D = int(os.environ.get("RANKS_BENCH_D", "512"))
RANKS = [int(r) for r in os.environ.get("RANKS_BENCH_RANKS", "2,4,8").split(",")]
MEM_GB = float(os.environ.get("RANKS_BENCH_MEM_GB", "8"))
MALLOC = os.environ.get("RANKS_BENCH_MALLOC", "fixed")
FIXED_MMAP_THRESHOLD = "131072"  # glibc's initial threshold, pinned (module doc: the allocator)
WARMUP_B = 16
CLIP_MODES = [(ll, gg) for ll in (False, True) for gg in (False, True)]
SIGLIP_IMPLS = ("bidir", "shift", "reduce", "gather")


def settings() -> list[tuple[str, str]]:
    """(library, setting) for every cell row: both libraries' settings; the ring is mode_fast's only."""
    names = [f"ClipLoss local_loss={ll} gather_with_grad={gg}" for ll, gg in CLIP_MODES]
    names += [f"SigLipLoss dist_impl={impl}" for impl in SIGLIP_IMPLS]
    rows = [(lib, n) for n in names for lib in ("open_clip", "mode_fast")]
    rows.insert(8, ("mode_fast", "ClipLoss ring=True"))
    return rows


def cell_name(lib: str, setting: str) -> str:
    return f"{lib} {setting}"


def estimated_gb(lib: str, setting: str, ranks: int, b: int, d: int) -> float:
    """Rough memory of one cell over all its ranks (to skip what cannot fit, not a measurement)."""
    n = ranks * b
    per_rank = 6 * n * d * 4  # gathered features and their gradients
    if lib == "open_clip" and "SigLipLoss" in setting:
        per_rank += ranks * 4 * b * b * 4  # every block's logits stay in the graph
    elif lib == "open_clip" and "local_loss=False" in setting:
        per_rank += 5 * n * n * 4  # logits, their transpose's softmax, and the gradients
    elif lib == "open_clip":
        per_rank += 5 * b * n * 4
    return ranks * per_rank / 2**30


def make_loss(lib: str, setting: str, rank: int, world: int):
    """The loss module for one setting; returns (module, takes_bias)."""
    if lib == "open_clip":
        mod = sys.modules["open_clip_loss"]
    else:
        import mode_fast.training.loss as mod
    kind, *args = setting.split()
    kw = dict(a.split("=") for a in args)
    if kind == "SigLipLoss":
        return mod.SigLipLoss(rank=rank, world_size=world, dist_impl=kw["dist_impl"]), True
    if kw.get("ring") == "True":
        return mod.ClipLoss(rank=rank, world_size=world, ring=True), False
    flags = {k: v == "True" for k, v in kw.items()}
    return mod.ClipLoss(rank=rank, world_size=world, **flags), False


def worker(lib: str, setting: str, rank: int, world: int, port: int, b: int, d: int, out: str) -> None:
    """One rank: fixed cost (imports, gloo init, warm-up at B = 16), then one measured fwd+bwd."""
    sys.path[:0] = [str(HERE), str(ROOT)]
    from proc_memory import reset_peak, status_mb

    start_mb = status_mb("VmRSS")
    import importlib.util

    import torch
    import torch.distributed as dist

    import mode_fast.training.loss  # noqa: F401

    # open_clip's loss.py alone (it imports only torch): `import open_clip` loads the model zoo
    # (~1 s and ~700 MB of RSS per process), which 238 processes on 2 cores cannot afford.
    # Both libraries are loaded in every process alike, whichever one the cell measures.
    spec = importlib.util.find_spec("open_clip")
    path = Path(spec.submodule_search_locations[0]) / "loss.py"
    oc_spec = importlib.util.spec_from_file_location("open_clip_loss", path)
    sys.modules["open_clip_loss"] = oc = importlib.util.module_from_spec(oc_spec)
    oc_spec.loader.exec_module(oc)

    torch.set_num_threads(1)  # up to 8 ranks share the machine's cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        module, takes_bias = make_loss(lib, setting, rank, world)

        def fwd_bwd(rows: int) -> float:
            g = torch.Generator().manual_seed(1000 * rank + rows)
            img = torch.nn.functional.normalize(torch.randn(rows, d, generator=g), dim=1).requires_grad_()
            txt = torch.nn.functional.normalize(torch.randn(rows, d, generator=g), dim=1).requires_grad_()
            scale = torch.tensor(14.3, requires_grad=True)
            bias = torch.tensor(-10.0, requires_grad=True)
            args = (img, txt, scale, bias) if takes_bias else (img, txt, scale)
            dist.barrier()
            reset_peak()
            before = status_mb("VmRSS")
            module(*args).backward()
            return status_mb("VmHWM") - before

        fwd_bwd(WARMUP_B)
        fixed_mb = status_mb("VmHWM") - start_mb
        peak_mb = fwd_bwd(b)
        dist.barrier()
        Path(out).write_text(json.dumps({"rank": rank, "fixed_mb": fixed_mb, "peak_mb": peak_mb}))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cell(lib: str, setting: str, ranks: int, b: int, d: int) -> list[dict]:
    """Start one fresh process per rank; their per-rank figures, by rank."""
    # a folder of our own: pytest's tmp_path lives under a base folder that other pytest
    # sessions of the same user prune (keeping 3), which happened mid-run on a shared machine
    with tempfile.TemporaryDirectory(prefix="bench_loss_ranks_") as tmp:
        return _run_cell(lib, setting, ranks, b, d, Path(tmp))


def _run_cell(lib: str, setting: str, ranks: int, b: int, d: int, tmp: Path) -> list[dict]:
    if MALLOC not in ("fixed", "default"):
        raise ValueError(f"RANKS_BENCH_MALLOC must be 'fixed' or 'default', got {MALLOC!r}")
    env = dict(os.environ)
    if MALLOC == "fixed":
        env["MALLOC_MMAP_THRESHOLD_"] = FIXED_MMAP_THRESHOLD
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    port = _free_port()
    outs = [tmp / f"rank{r}.json" for r in range(ranks)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "worker", lib, setting, str(r), str(ranks), str(port), str(b), str(d), str(o)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for r, o in enumerate(outs)
    ]
    logs = [p.communicate(timeout=3600)[0] for p in procs]
    for r, p in enumerate(procs):
        if p.returncode:
            raise RuntimeError(f"{lib} {setting}, rank {r} of {ranks} failed: {logs[r][-2000:]}")
    return [json.loads(o.read_text()) for o in outs]


def loss_commit() -> str:
    """The last commit that changed the loss code, and whether the tree has uncommitted changes to it."""
    paths = ["mode_fast/training/loss.py", "mode_fast/kernels"]
    git = ["git", "-C", str(ROOT)]
    try:
        head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        last = subprocess.run(git + ["log", "-1", "--format=%h", "--"] + paths, capture_output=True, text=True)
        dirty = subprocess.run(git + ["status", "--porcelain", "--"] + paths, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    tail = " + uncommitted changes" if dirty.stdout.strip() else ""
    return f"{last.stdout.strip()} (HEAD {head.stdout.strip()}){tail}"


# ---- the pytest suite: one benchmark row per (setting, ranks)
if __name__ != "__main__":  # the worker and report modes run without pytest (less RSS at start)
    import pytest

    _ONLY = [s for s in os.environ.get("RANKS_BENCH_ONLY", "").split(",") if s]
    CELLS = [
        (lib, s, r) for lib, s in settings() for r in RANKS if not _ONLY or any(o in cell_name(lib, s) for o in _ONLY)
    ]

    @pytest.mark.parametrize("lib,setting,ranks", CELLS, ids=lambda v: str(v).replace(" ", "-"))
    def test_loss_ranks(benchmark, lib, setting, ranks):
        est = estimated_gb(lib, setting, ranks, B, D)
        benchmark.group = f"loss fwd+bwd per rank, gloo CPU, B={B} per rank, D={D}, fp32"
        benchmark.extra_info.update(
            provider=f"{cell_name(lib, setting)}, {ranks} ranks",
            library=lib,
            setting=setting,
            ranks=ranks,
            b=B,
            d=D,
            malloc=MALLOC,
            loss_commit=loss_commit(),
        )
        if est > MEM_GB:
            benchmark.extra_info["skipped"] = (
                f"estimated {est:.0f} GB over {ranks} ranks > RANKS_BENCH_MEM_GB={MEM_GB:g}"
            )
            benchmark.pedantic(lambda: None, rounds=1, iterations=1)
            return
        got = {}
        benchmark.pedantic(lambda: got.update(ranks=run_cell(lib, setting, ranks, B, D)), rounds=1)
        per_rank = sorted(got["ranks"], key=lambda x: x["rank"])
        benchmark.extra_info.update(
            peak_mb=round(max(x["peak_mb"] for x in per_rank), 1),
            fixed_mb=round(max(x["fixed_mb"] for x in per_rank), 1),
            peak_mb_per_rank=[round(x["peak_mb"], 1) for x in per_rank],
            fixed_mb_per_rank=[round(x["fixed_mb"], 1) for x in per_rank],
        )

    def test_committed_table_has_every_cell():
        """The committed results have every setting x ranks cell, in the JSON and in the table (no run needed)."""
        path = HERE / "results" / "cpu" / "loss_ranks.json"
        results = json.loads(path.read_text())
        assert missing_cells(results, RANKS) == []
        table = path.with_suffix(".md").read_text()
        for lib, s in settings():
            row = next(line for line in table.splitlines() if line.startswith(f"| {lib} | {s} |"))
            assert len(row.split("|")) == len(RANKS) + 5 and "missing" not in row, row


# ---- the report: setting x ranks tables from the pytest-benchmark JSON
def cells(results: dict) -> dict[tuple[str, int], dict]:
    """(cell name, ranks) -> extra_info, for every row of a results JSON."""
    out = {}
    for bench in results["benchmarks"]:
        info = bench.get("extra_info", {})
        out[(cell_name(info["library"], info["setting"]), info["ranks"])] = info
    return out


def merge(runs: list[dict]) -> dict:
    """One results dict from several runs: a later run's cell replaces an earlier one's (a rerun
    of some settings after a change); machine and date of the first run, every run's dates kept."""
    out = dict(runs[0])
    by_cell = {}
    for run in runs:
        for bench in run["benchmarks"]:
            info = bench.get("extra_info", {})
            by_cell[(cell_name(info["library"], info["setting"]), info["ranks"])] = bench
    out["benchmarks"] = list(by_cell.values())
    out["datetime"] = ", ".join(r.get("datetime", "?") for r in runs)
    return out


def missing_cells(results: dict, ranks: list[int] | None = None) -> list[str]:
    """Every (setting, ranks) cell the table must have and the results lack (measured or skipped)."""
    have = cells(results)
    ranks = ranks or sorted({r for _, r in have}) or RANKS
    return [f"{cell_name(lib, s)} @ {r}" for lib, s in settings() for r in ranks if (cell_name(lib, s), r) not in have]


def _malloc_note(malloc: str) -> str:
    if malloc == "fixed":
        return f"glibc with MALLOC_MMAP_THRESHOLD_={FIXED_MMAP_THRESHOLD} (peak = memory held at once)"
    return "glibc as it comes (dynamic mmap threshold: heap fragmentation adds noise)"


def render(results: dict, note: str = "") -> str:
    from report import device_name

    have = cells(results)
    ranks = sorted({r for _, r in have})
    any_info = next(iter(have.values()), {})
    # a cell records "<loss commit> (HEAD <head>)[ + uncommitted changes]"; HEAD may move mid-run
    commits = sorted({i.get("loss_commit", "?").split(" (HEAD")[0] for i in have.values()})
    dirty = any("uncommitted" in i.get("loss_commit", "") for i in have.values())
    heads = sorted({i.get("loss_commit", "").partition("(HEAD ")[2].split(")")[0] for i in have.values()} - {""})

    def mb(info, key):
        if info is None:
            return "missing"
        if "skipped" in info:
            return "skipped"
        return f"{info[key]:,.0f}"

    head = "| library | setting | " + " | ".join(f"{r} ranks" for r in ranks)
    lines = [
        "# Distributed loss fwd+bwd: per-rank peak RSS growth, gloo on the CPU",
        "",
        f"Loss code measured: the last commit changing mode_fast/training/loss.py or mode_fast/kernels, "
        f"{', '.join(commits)}{' with uncommitted changes' if dirty else ''} (checkout HEAD {', '.join(heads)}); "
        "rerun after a change to the loss.",
        "",
        f"B = {any_info.get('b')} rows per rank, "
        f"D = {any_info.get('d')}, fp32, one thread per rank, one fresh process per rank and cell; "
        f"allocator: {_malloc_note(any_info.get('malloc', 'default'))}.",
        f"Device: {device_name(results.get('machine_info', {}))}",
        f"Run: {results.get('datetime', '?')}, Python {results.get('machine_info', {}).get('python_version', '?')}",
        "",
        *([note, ""] if note else []),
        "## Peak RSS growth of the loss call (MB, largest rank)",
        "",
        head + f" | {ranks[-1]} / {ranks[0]} ranks |" if ranks else head,
        "|---|---|" + "---|" * (len(ranks) + 1),
    ]
    for lib, s in settings():
        row = [have.get((cell_name(lib, s), r)) for r in ranks]
        ok = [i for i in (row[0], row[-1]) if i is not None and "skipped" not in i]
        grow = f"{ok[1]['peak_mb'] / ok[0]['peak_mb']:.2f}x" if len(ok) == 2 and ok[0]["peak_mb"] >= 1 else "-"
        lines.append(f"| {lib} | {s} | " + " | ".join(mb(i, "peak_mb") for i in row) + f" | {grow} |")
    lines += [
        "",
        "## Fixed first-call cost of a fresh process (MB, largest rank)",
        "",
        "Imports (torch, mode_fast, open_clip's loss.py), gloo init and a warm-up call at B = 16: paid once",
        "per process, not part of the figures above.",
        "",
        head + " |",
        "|---|---|" + "---|" * len(ranks),
    ]
    for lib, s in settings():
        lines.append(
            f"| {lib} | {s} | " + " | ".join(mb(have.get((cell_name(lib, s), r)), "fixed_mb") for r in ranks) + " |"
        )
    skipped = [f"- {n} @ {r}: {i['skipped']}" for (n, r), i in have.items() if "skipped" in i]
    if skipped:
        lines += ["", "Skipped cells:", ""] + skipped
    missing = missing_cells(results, ranks)
    if missing:
        lines += ["", "Missing cells (not run):", ""] + [f"- {m}" for m in missing]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    if argv and argv[0] == "worker":
        lib, setting, rank, world, port, b, d, out = argv[1:]
        worker(lib, setting, int(rank), int(world), int(port), int(b), int(d), out)
    elif argv and argv[0] == "report":
        sys.path.insert(0, str(HERE))
        first_opt = next((i for i, a in enumerate(argv) if a.startswith("--")), len(argv))
        paths, path = [Path(a) for a in argv[1:first_opt]], Path(argv[1])
        results = merge([json.loads(p.read_text()) for p in paths])
        opts = dict(zip(argv[first_opt::2], argv[first_opt + 1 :: 2]))  # --out RESULTS.md, --note TEXT
        text = render(results, opts.get("--note", ""))
        out = Path(opts.get("--out", path.with_suffix(".md")))
        out.write_text(text)
        print(text)
        missing = missing_cells(results)
        if missing:
            sys.exit(
                f"{path}: {len(missing)} setting x ranks cells missing, first: {missing[0]}; rerun without RANKS_BENCH_ONLY"
            )
    else:
        sys.exit(
            f"usage: {sys.argv[0]} worker ... | report RESULTS.json [MORE.json ...] [--out RESULTS.md] [--note TEXT]"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
