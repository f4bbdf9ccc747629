"""Largest per-process batch one training step takes within a memory budget, CPU: this
project's step with and without gradient caching (`mode-fast train --grad-cache-chunk N`,
`mode_fast.training.loop.grad_cache_backward`) beside open_clip's trainer with and without
`--accum-freq` (its gradient cache: micro-batches of --batch-size, features cached without a
graph, each micro-batch recomputed with its graph).

Each try is a fresh interpreter: imports, then the peak-RSS mark is reset (proc_memory) and
the job runs: ours builds the model, an AdamW and one `train_step` on a random batch
(what `mode-fast train` runs per step, without the loader); open_clip's runs
`mode-fast open-clip-train --dataset-type synthetic` for one optimizer step (its whole
trainer: data loading in the process, --workers 0). The figure is the peak RSS growth
over that phase; a batch "fits" when it stays under the budget. The search doubles the batch,
then bisects to within 1/8, up to a cap (a fit at the cap is reported as ">= cap").

    .venv/bin/python benchmarks/bench_grad_cache.py [--budget-mb 512] [--chunk 128] [--cap 8192]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

_OURS = r"""
import sys, time, json
sys.path[:0] = [{here!r}]
import torch
torch.set_num_threads({threads})
import open_clip, open_clip_train.main  # what the open_clip try imports before its reset
from mode_fast.training import loop, loss
from mode_fast.training.models import create_model
import proc_memory as pm
start = pm.status_mb("VmRSS"); pm.reset_peak(); t0 = time.perf_counter()
torch.manual_seed(0)
model = create_model({model!r}).model.train()
opt = torch.optim.AdamW(loop.param_groups(model, 0.2), lr=1e-4)
loss_fn, _ = loop.make_loss(False)
size = model.visual.image_size[0]
images = torch.randn({batch}, 3, size, size)
texts = torch.randint(1, 49407, ({batch}, model.context_length))
loop.train_step(model, model, loss_fn, opt, dict(images=images, texts=texts), torch.device("cpu"),
                1e-4, 1.0, False, {chunk})
print(json.dumps(dict(peak_mb=pm.status_mb("VmHWM") - start, seconds=time.perf_counter() - t0)))
"""

_OPEN_CLIP = r"""
import sys, time, json
sys.path[:0] = [{here!r}]
import torch
torch.set_num_threads({threads})
import open_clip, open_clip_train.main
from mode_fast.training import loop, loss  # what the mode_fast try imports before its reset
from mode_fast.jobs import open_clip_main
import proc_memory as pm
start = pm.status_mb("VmRSS"); pm.reset_peak(); t0 = time.perf_counter()
open_clip_main.main([
    "--dataset-type", "synthetic", "--train-num-samples", str({batch}), "--batch-size", str({micro}),
    "--accum-freq", str({accum}), "--epochs", "1", "--model", {model!r}, "--workers", "0",
    "--device", "cpu", "--precision", "fp32", "--logs", {logs!r}, "--name", "oc", "--save-frequency", "0",
    "--zeroshot-frequency", "0", "--val-frequency", "0", "--lr", "1e-4", "--warmup", "1", "--seed", "0",
])
print(json.dumps(dict(peak_mb=pm.status_mb("VmHWM") - start, seconds=time.perf_counter() - t0)))
"""


def run_try(provider: str, batch: int, chunk: int | None, model: str, threads: int) -> dict:
    """{peak_mb, seconds} of one fresh process training one step at `batch`."""
    with tempfile.TemporaryDirectory(prefix="bench_gc_") as logs:
        if provider == "mode_fast":
            script = _OURS.format(here=str(HERE), threads=threads, model=model, batch=batch, chunk=chunk)
        else:  # open_clip's per-step batch is --batch-size x --accum-freq
            micro = chunk or batch
            script = _OPEN_CLIP.format(
                here=str(HERE), threads=threads, model=model, batch=batch, micro=micro,
                accum=batch // micro, logs=logs,
            )  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=logs)
    if proc.returncode != 0:
        raise RuntimeError(f"{provider} batch {batch} chunk {chunk}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def largest(provider, chunk, model, threads, budget_mb, start, cap) -> dict:
    """Largest batch under the budget (a multiple of the chunk with one), and every try."""
    step = chunk or 1
    tries: dict[int, dict] = {}

    def fits(b: int) -> bool:
        tries[b] = run_try(provider, b, chunk, model, threads)
        print(f"  {provider} chunk={chunk} batch={b}: {tries[b]}", flush=True)
        return tries[b]["peak_mb"] < budget_mb

    lo, hi = 0, start
    while hi <= cap and fits(hi):
        lo, hi = hi, hi * 2
    capped = hi > cap
    if not capped:
        while hi - lo > max(lo // 8, step):
            mid = (lo + hi) // 2 // step * step
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return {"largest_batch": lo, "first_failing": None if capped else hi, "capped": capped,
            "tries": {str(b): t for b, t in sorted(tries.items())}}  # fmt: skip


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mode-fast-tiny")
    p.add_argument("--budget-mb", type=float, default=512)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--start", type=int, default=256)
    p.add_argument("--cap", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "results/cpu/grad_cache")
    args = p.parse_args()
    t0 = time.time()
    rows = []
    for provider, chunk in (("mode_fast", None), ("mode_fast", args.chunk), ("open_clip", None),
                            ("open_clip", args.chunk)):  # fmt: skip
        found = largest(provider, chunk, args.model, args.threads, args.budget_mb, args.start, args.cap)
        rows.append({"provider": provider, "chunk": chunk, **found})
        machine = f"{cpu_name()}, {os.cpu_count()} cores visible, {args.threads} threads"
        result = {"model": args.model, "budget_mb": args.budget_mb, "chunk": args.chunk, "start": args.start, "cap": args.cap,
                  "machine": machine, "python": platform.python_version(), "seconds": time.time() - t0,
                  "rows": rows}  # fmt: skip
        # written after each trainer: a search cut short keeps what it found
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(render(result))
    print(render(result))


def render(r: dict) -> str:
    lines = [
        f"# Largest per-process batch within {r['budget_mb']:g} MB of peak RSS growth, CPU: gradient caching",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_grad_cache.py --model {r['model']} --budget-mb "
        f"{r['budget_mb']:g} --chunk {r['chunk']} --start {r.get('start', 256)} --cap {r['cap']}`. One optimizer step per try, each in a fresh "
        "process (see the script's docstring). mode_fast: `loop.train_step` (`--grad-cache-chunk`); open_clip: "
        "`mode-fast open-clip-train --dataset-type synthetic` (`--accum-freq`, micro-batch = --batch-size = the "
        "chunk).",
        "",
        f"Machine: {r['machine']}. Python {r['python']}. Whole search: {r['seconds']:.0f} s.",
        "The s/step column holds the whole phase (model build; open_clip's trainer start-up) on a shared "
        "machine: indicative only, not a speed comparison.",
        "",
        "| trainer | gradient cache chunk | largest batch | first failing | peak MB at largest | s/step at largest |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        at = row["tries"].get(str(row["largest_batch"]), {})
        largest = f">= {row['largest_batch']} (cap)" if row["capped"] else str(row["largest_batch"])
        lines.append(
            f"| {row['provider']} | {row['chunk'] or 'off'} | {largest} | {row['first_failing'] or '-'} | "
            f"{at.get('peak_mb', float('nan')):.0f} | {at.get('seconds', float('nan')):.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--render"]:  # rewrite the .md of a .json
        path = Path(sys.argv[2])
        path.with_suffix(".md").write_text(render(json.loads(path.read_text())))
        sys.exit()
    main()
