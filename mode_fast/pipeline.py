"""The end-to-end demo on the embedded sample: sample -> curate -> cluster -> train -> eval.

    python -m mode_fast.pipeline --out demo_out [--quick]

Each step is the documented CLI (`python -m mode_fast <job> ...`), run as a subprocess and
printed before it runs, so the demo is also a recipe. MoDE at toy scale:
- a seed model trains `seed_steps` of a (seed_steps + expert_steps)-step cosine schedule on
  all curated pairs; each of the n experts resumes it and trains the last `expert_steps` on
  its cluster (plus MoDE's small share of the others);
- a single model of the same architecture trains seed_steps + n * expert_steps steps at the
  same batch size on all the data: the same training compute as the whole ensemble;
- eval scores experts, ensembles, the seed and that single model on the sample's held-out
  split (all 16 classes) and on one task per visual domain (4 classes each), plus image-text
  retrieval on the held-out captions;
- when scikit-learn is installed, a second eval scores the same models on real data:
  scikit-learn's bundled handwritten digits (`--data digits=sklearn:digits`, 1797 images,
  10 classes, no download), kept apart so that the headline average stays on the sample's
  tasks; without scikit-learn the step is skipped with a note.
Outputs under --out: sample/, curated/, clusters/, run/ (seed, experts), single/ (the same-
compute model), eval/ (results.json, results.md, plots), eval_digits/ (the same for the
digits), summary.md and timings.json.
A rerun skips finished steps (a step is finished when its final output exists).
Job module: it runs the other jobs as processes (never imports them); a failed step ends the
demo with one line (`mode_fast.errors.StepFailed`, exit 2) under the failing step's own error.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mode_fast.data.io import ReadReport, iter_samples
from mode_fast.errors import StepFailed
from mode_fast.files import atomic_write, write_json
from mode_fast.results import markdown_table


@dataclass(frozen=True)
class Settings:
    num_pairs: int
    eval_pairs: int
    shard_size: int
    target_size: int
    fine_k: int
    experts: int
    embedder: str
    seed_steps: int
    expert_steps: int
    batch_size: int
    warmup: int
    workers: int
    digits: int | None = None  # sklearn digits scored: None = all 1797, N = a class-balanced subset


# Full: fits 2 CPU cores in well under 15 minutes (measured: see README). Quick: the test.
FULL = Settings(num_pairs=10_000, eval_pairs=1000, shard_size=1000, target_size=4000, fine_k=64, experts=4,
                embedder="minilm", seed_steps=240, expert_steps=80, batch_size=64, warmup=20, workers=1)
QUICK = Settings(num_pairs=320, eval_pairs=64, shard_size=80, target_size=240, fine_k=8, experts=2,
                 embedder="hash64", seed_steps=6, expert_steps=3, batch_size=16, warmup=2, workers=0,
                 digits=100)


def have_sklearn() -> bool:
    return importlib.util.find_spec("sklearn") is not None


def _run(cmd: list[str], log: list[dict[str, Any]], name: str) -> None:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd)
    seconds = time.perf_counter() - started
    log.append({"step": name, "seconds": round(seconds, 1), "command": shlex.join(cmd)})
    if proc.returncode != 0:
        raise StepFailed(f"step {name!r} failed with exit code {proc.returncode}: {shlex.join(cmd)}")


def write_domain_tasks(sample: Path, out: Path) -> list[str]:
    """One eval task per visual domain: the held-out images of its classes, relabelled 0..k-1,
    as webdataset shards with their own classes.json and templates.json."""
    info = json.loads((sample / "sample_info.json").read_text(encoding="utf-8"))
    classes = info["classes"]
    templates = json.loads((sample / info["templates_file"]).read_text(encoding="utf-8"))
    specs = []
    for domain, labels in info["domains"].items():
        folder = out / domain
        new_label = {old: i for i, old in enumerate(labels)}
        report = ReadReport()
        with atomic_write(folder / f"{domain}-000000.tar") as f, tarfile.open(fileobj=f, mode="w") as tw:
            for rel in info["eval_shards"]:
                for group in iter_samples(sample / rel, report):  # the walk every job shares
                    label = int(group.read("cls"))
                    if label not in new_label:
                        continue
                    report.read += 1
                    for ext, payload in (("jpg", group.read("jpg")), ("cls", str(new_label[label]).encode())):
                        ti = tarfile.TarInfo(f"{group.key}.{ext}")
                        ti.size, ti.mtime = len(payload), 0
                        tw.addfile(ti, io.BytesIO(payload))
        if report.skipped:
            print(f"note: domain task {domain}: {report.describe()}", flush=True)
        write_json(folder / "classes.json", [classes[i] for i in labels])
        write_json(folder / "templates.json", templates)
        specs.append(f"{domain}={folder}")
    return specs


def run_pipeline(out: Path, s: Settings) -> dict[str, Any]:
    py = [sys.executable, "-m", "mode_fast"]
    steps: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    sample, curated, clusters = out / "sample", out / "curated", out / "clusters"
    run, single, ev = out / "run", out / "single", out / "eval"

    _run(py + ["sample", "--out", str(sample), "--num-pairs", str(s.num_pairs), "--eval-pairs", str(s.eval_pairs),
               "--shard-size", str(s.shard_size)], steps, "sample")
    _run(py + ["curate", str(sample / "pool"), "--out", str(curated), "--target-size", str(s.target_size),
               "--seed", "0"], steps, "curate")
    if not (clusters / "cluster_sizes.json").is_file():
        _run(py + ["cluster", str(curated / "data"), "--out", str(clusters), "--fine-k", str(s.fine_k),
                   "--experts", str(s.experts), "--embedder", s.embedder, "--sample", str(s.target_size),
                   "--no-progress"], steps, "cluster")

    common = ["--data", str(curated / "data"), "--batch-size", str(s.batch_size), "--warmup", str(s.warmup),
              "--workers", str(s.workers), "--model", "mode-fast-tiny", "--no-progress", "--seed", "0"]
    schedule = s.seed_steps + s.expert_steps
    if not (run / "seed" / "checkpoints" / "final.pt").is_file():
        _run(py + ["train", *common, "--out", str(run), "--stage", "seed", "--steps", str(s.seed_steps),
                   "--schedule-steps", str(schedule)], steps, "train seed")
    for k in range(s.experts):
        if not (run / f"expert_{k}" / "checkpoints" / "final.pt").is_file():
            _run(py + ["train", *common, "--out", str(run), "--expert", str(k), "--clusters", str(clusters),
                       "--steps", str(s.expert_steps)], steps, f"train expert {k}")
    # Same total training compute as seed + all experts: same steps x batch, same model.
    total = s.seed_steps + s.experts * s.expert_steps
    if not (single / "seed" / "checkpoints" / "final.pt").is_file():
        _run(py + ["train", *common, "--out", str(single), "--stage", "seed", "--steps", str(total),
                   "--schedule-steps", str(total)], steps, "train same-compute single model")

    domain_specs = write_domain_tasks(sample, out / "tasks")
    # the same experts and single models for every eval
    eval_models = py + ["eval", "--run", str(run), "--clusters", str(clusters),
                        "--baseline", f"seed={run / 'seed' / 'checkpoints' / 'final.pt'}",
                        "--baseline", f"same_compute={single / 'seed' / 'checkpoints' / 'final.pt'}"]
    _run(eval_models + ["--out", str(ev), "--data", f"all16={sample / 'eval'}", *domain_specs,
                        "--retrieval", f"captions={sample / 'eval'}"], steps, "eval")
    digits_results = None
    if have_sklearn():
        spec = "sklearn:digits" + (f":{s.digits}" if s.digits else "")
        _run(eval_models + ["--out", str(out / "eval_digits"), "--data", f"digits={spec}"], steps, "eval digits")
        digits_results = json.loads((out / "eval_digits" / "results.json").read_text(encoding="utf-8"))
        digits_note = f"scored {spec}"
    else:
        digits_note = "skipped: scikit-learn is not installed (pip install scikit-learn to score its digits)"
        print(f"\nnote: eval digits {digits_note}", flush=True)
    wall = time.perf_counter() - t0
    results = json.loads((ev / "results.json").read_text(encoding="utf-8"))
    summary = {"settings": s.__dict__, "steps": steps, "wall_seconds": round(wall, 1), "digits": digits_note,
               "cpu_count": os.cpu_count(), "compute": {
                   "ensemble_steps": total, "single_model_steps": total, "batch_size": s.batch_size,
                   "ensemble_inference_forward_passes": s.experts, "single_model_inference_forward_passes": 1}}
    write_json(out / "timings.json", summary)
    text = summary_markdown(results, summary, digits_results)
    with atomic_write(out / "summary.md", "w") as f:
        f.write(text)
    print("\n" + text)
    return summary


def _verdict(a: float, b: float) -> str:
    """a against b (fractions), judged at the 0.1-point precision the summary prints."""
    diff = round(100 * a, 1) - round(100 * b, 1)
    if abs(diff) < 0.05:
        return "ties with"
    return "beats" if diff > 0 else "loses to"


def summary_markdown(results: dict[str, Any], summary: dict[str, Any],
                     digits: dict[str, Any] | None = None) -> str:
    """The headline comparison, worded from the measured numbers whichever way they go;
    `digits`: the sklearn digits eval's results, reported on their own."""
    avg = results["average"]["top1"]
    ens, one, best = avg["mode_ensemble"], avg["same_compute"], avg["best_expert"]
    diff = round(100 * ens, 1) - round(100 * one, 1)
    verdict = _verdict(ens, one)
    c = summary["compute"]
    lines = [
        "# mode-fast demo", "",
        f"Wall time {summary['wall_seconds']:.0f} s on {summary['cpu_count']} CPU cores "
        f"(steps: " + ", ".join(f"{x['step']} {x['seconds']:.0f} s" for x in summary["steps"]) + ").", "",
        f"MoDE: {results['n_experts']} experts, {c['ensemble_steps']} training steps of batch {c['batch_size']} "
        f"in all (seed + experts). Single model: same architecture, {c['single_model_steps']} steps of batch "
        f"{c['batch_size']} on all the data.", "",
        f"**Average zero-shot top-1 over {len(results['tasks'])} tasks: the MoDE ensemble ({100 * ens:.1f}%) "
        f"{verdict} the single model of equal training compute ({100 * one:.1f}%) by {abs(diff):.1f} points**; "
        f"plain mean of experts {100 * avg['mean_ensemble']:.1f}%, best expert per task {100 * best:.1f}%, "
        f"seed {100 * avg['seed']:.1f}%. The ensemble costs {c['ensemble_inference_forward_passes']} forward "
        "passes per image at inference, the single model 1.", "",
    ]
    text = "\n".join(lines) + markdown_table(results)
    if digits is not None:
        t = next(iter(digits["tasks"].values()))
        top1 = t["top1"]
        chance = 1 / t["n_classes"]
        at_chance = max(top1.values()) < chance + 0.03
        text += "\n".join([
            "", "## Real data: scikit-learn's handwritten digits", "",
            f"{t['n_images']} images of {t['n_classes']} classes ({t['source']}; chance {100 / t['n_classes']:.0f}%), "
            f"never seen in training (the sample has only the digits one and seven, typeset). Zero-shot top-1: "
            f"the MoDE ensemble ({100 * top1['mode_ensemble']:.1f}%) {_verdict(top1['mode_ensemble'], top1['same_compute'])} the single model of equal "
            f"training compute ({100 * top1['same_compute']:.1f}%); mean of experts "
            f"{100 * top1['mean_ensemble']:.1f}%, best expert {100 * top1['best_expert']:.1f}%, seed "
            f"{100 * top1['seed']:.1f}%."
            + (" Every model is within 3 points of chance: these toy models have not learned handwritten "
               "digits, so this task cannot rank them." if at_chance else ""),
            "", markdown_table(digits)])
    elif summary.get("digits"):
        text += f"\nDigits (real data): {summary['digits']}.\n"
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes and the hash text encoder (a test run)")


def run(args: argparse.Namespace) -> int:
    run_pipeline(args.out, QUICK if args.quick else FULL)
    return 0


def main(argv: list[str] | None = None) -> int:
    from mode_fast.cli import job_main

    return job_main("python -m mode_fast.pipeline", sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
