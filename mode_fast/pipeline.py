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
digits), report/ (the summary's plots), summary.md, summary.json (curation, clustering,
experts, ensemble, comparison, per-task chance and top-1) and timings.json (one entry per
run, appended).
Progress: each step's own progress lines pass through; when the output is not a terminal,
progress bars (carriage-return updates) come out as one line every `PROGRESS_EVERY` seconds.
A rerun skips finished steps (a step is finished when its final output exists) and says so.
Job module: it runs the other jobs as processes (never imports them); a failed step ends the
demo with one line (`mode_fast.errors.StepFailed`, exit 2) under the failing step's own error.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import io
import json
import os
import resource
import shlex
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mode_fast.data.io import ReadReport, iter_samples
from mode_fast.errors import StepFailed
from mode_fast.files import atomic_write, write_json
from mode_fast.results import (
    cluster_agreement,
    ensemble_note,
    markdown_table,
    paired_difference,
    proportion_se,
    save_figure,
)

PROGRESS_EVERY = 20.0  # seconds between progress-bar lines when not on a terminal


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
    model: str = "mode-fast-tiny"
    lr: float = 5e-4
    wd: float = 0.2


# Full: 2 idle CPU cores within 15 minutes (measured: see README). Quick: the test.
# lr 2e-3 / wd 0.1 with the sample's format 3: the seed is above chance on every domain task
# (README's demo section); the same steps as the 217-s run, not yet timed with these values.
FULL = Settings(
    num_pairs=10_000,
    eval_pairs=1000,
    shard_size=1000,
    target_size=4000,
    fine_k=64,
    experts=4,
    embedder="minilm",
    seed_steps=240,
    expert_steps=80,
    batch_size=64,
    warmup=20,
    workers=1,
    lr=2e-3,
    wd=0.1,
)
QUICK = Settings(
    num_pairs=320,
    eval_pairs=64,
    shard_size=80,
    target_size=240,
    fine_k=8,
    experts=2,
    embedder="hash64",
    seed_steps=6,
    expert_steps=3,
    batch_size=16,
    warmup=2,
    workers=0,
    digits=100,
)


def have_sklearn() -> bool:
    return importlib.util.find_spec("sklearn") is not None


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _relay(proc: subprocess.Popen, tty: bool) -> None:
    """Pass a step's output through. Lines ending in newline go out at once; a progress bar's
    carriage-return updates go out as they come on a terminal, else one every PROGRESS_EVERY s."""
    assert proc.stdout is not None
    out = sys.stdout
    pending = b""
    last_bar = 0.0
    while True:
        chunk = proc.stdout.read1(65536) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096)
        if not chunk:
            break
        pending += chunk
        while True:
            cut = min((i for i in (pending.find(b"\n"), pending.find(b"\r")) if i >= 0), default=-1)
            if cut < 0:
                break
            piece, sep, pending = pending[:cut], pending[cut : cut + 1], pending[cut + 1 :]
            text = piece.decode("utf-8", "replace")
            if sep == b"\n":
                if text.strip():
                    out.write(text + "\n")
            elif tty:
                out.write("\r" + text)
            elif text.strip() and time.monotonic() - last_bar >= PROGRESS_EVERY:
                out.write(text.strip() + "\n")
                last_bar = time.monotonic()
            out.flush()
    if pending.strip():
        out.write(pending.decode("utf-8", "replace") + "\n")
        out.flush()


def _run(cmd: list[str], log: list[dict[str, Any]], name: str) -> None:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    started, cpu0 = time.perf_counter(), _children_cpu()
    tty = sys.stdout.isatty()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1")
    )
    try:
        _relay(proc, tty)
    finally:
        code = proc.wait()
    log.append(
        {
            "step": name,
            "seconds": round(time.perf_counter() - started, 1),
            "cpu_seconds": round(_children_cpu() - cpu0, 1),
            "command": shlex.join(cmd),
        }
    )
    if code != 0:
        raise StepFailed(f"step {name!r} failed with exit code {code}: {shlex.join(cmd)}")


def _step(done: Path | bool, cmd: list[str], log: list[dict[str, Any]], name: str) -> None:
    """Run a step unless its final output exists (then say so and record the skip)."""
    finished = done if isinstance(done, bool) else done.is_file()
    if finished:
        where = "" if isinstance(done, bool) else f" ({done} exists)"
        print(f"skip: {name}: already done{where}", flush=True)
        log.append({"step": name, "skipped": True})
        return
    _run(cmd, log, name)


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


def _sample_done(sample: Path, s: Settings) -> bool:
    """The sample is finished when its info file records these settings (write_sample's own
    check also compares file sizes; this only spares starting the process)."""
    try:
        args = json.loads((sample / "sample_info.json").read_text(encoding="utf-8"))["args"]
    except (OSError, ValueError, KeyError):
        return False
    return (args.get("num_pairs"), args.get("eval_pairs"), args.get("shard_size")) == (
        s.num_pairs,
        s.eval_pairs,
        s.shard_size,
    )


def _curate_done(curated: Path, s: Settings) -> bool:
    try:
        summary = json.loads((curated / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (curated / "manifest.json").is_file() and summary.get("target_size") == s.target_size


def _append_timings(path: Path, run: dict[str, Any], digits_note: str) -> dict[str, Any]:
    """timings.json keeps every run: {"runs": [...], "digits": the latest note}. A file from
    before runs were kept (one run's steps at the top level) becomes the first entry."""
    history: list[dict[str, Any]] = []
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            old = {}
        if isinstance(old.get("runs"), list):
            history = old["runs"]
        elif "steps" in old:
            history = [{k: old[k] for k in ("steps", "wall_seconds", "cpu_count") if k in old}]
    data = {"runs": [*history, run], "digits": digits_note}
    write_json(path, data)
    return data


def run_pipeline(out: Path, s: Settings) -> dict[str, Any]:
    py = [sys.executable, "-m", "mode_fast"]
    steps: list[dict[str, Any]] = []
    t0, cpu0 = time.perf_counter(), _children_cpu()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    sample, curated, clusters = out / "sample", out / "curated", out / "clusters"
    run, single, ev = out / "run", out / "single", out / "eval"

    _step(
        _sample_done(sample, s),
        py
        + [
            "sample",
            "--out",
            str(sample),
            "--num-pairs",
            str(s.num_pairs),
            "--eval-pairs",
            str(s.eval_pairs),
            "--shard-size",
            str(s.shard_size),
        ],
        steps,
        "sample",
    )
    _step(
        _curate_done(curated, s),
        py
        + ["curate", str(sample / "pool"), "--out", str(curated), "--target-size", str(s.target_size), "--seed", "0"],
        steps,
        "curate",
    )
    _step(
        clusters / "cluster_sizes.json",
        py
        + [
            "cluster",
            str(curated / "data"),
            "--out",
            str(clusters),
            "--fine-k",
            str(s.fine_k),
            "--experts",
            str(s.experts),
            "--embedder",
            s.embedder,
            "--sample",
            str(s.target_size),
        ],
        steps,
        "cluster",
    )

    common = [
        "--data",
        str(curated / "data"),
        "--batch-size",
        str(s.batch_size),
        "--warmup",
        str(s.warmup),
        "--workers",
        str(s.workers),
        "--model",
        s.model,
        "--seed",
        "0",
        "--lr",
        str(s.lr),
        "--wd",
        str(s.wd),
    ]
    schedule = s.seed_steps + s.expert_steps
    _step(
        run / "seed" / "checkpoints" / "final.pt",
        py
        + [
            "train",
            *common,
            "--out",
            str(run),
            "--stage",
            "seed",
            "--steps",
            str(s.seed_steps),
            "--schedule-steps",
            str(schedule),
        ],
        steps,
        "train seed",
    )
    for k in range(s.experts):
        _step(
            run / f"expert_{k}" / "checkpoints" / "final.pt",
            py
            + [
                "train",
                *common,
                "--out",
                str(run),
                "--expert",
                str(k),
                "--clusters",
                str(clusters),
                "--steps",
                str(s.expert_steps),
            ],
            steps,
            f"train expert {k}",
        )
    # Same total training compute as seed + all experts: same steps x batch, same model.
    total = s.seed_steps + s.experts * s.expert_steps
    _step(
        single / "seed" / "checkpoints" / "final.pt",
        py
        + [
            "train",
            *common,
            "--out",
            str(single),
            "--stage",
            "seed",
            "--steps",
            str(total),
            "--schedule-steps",
            str(total),
        ],
        steps,
        "train same-compute single model",
    )

    domain_specs = write_domain_tasks(sample, out / "tasks")
    # the same experts and single models for every eval
    eval_models = py + [
        "eval",
        "--run",
        str(run),
        "--clusters",
        str(clusters),
        "--baseline",
        f"seed={run / 'seed' / 'checkpoints' / 'final.pt'}",
        "--baseline",
        f"same_compute={single / 'seed' / 'checkpoints' / 'final.pt'}",
    ]
    _step(
        ev / "results.json",
        eval_models
        + [
            "--out",
            str(ev),
            "--data",
            f"all16={sample / 'eval'}",
            *domain_specs,
            "--retrieval",
            f"captions={sample / 'eval'}",
        ],
        steps,
        "eval",
    )
    digits_results = None
    if have_sklearn():
        spec = "sklearn:digits" + (f":{s.digits}" if s.digits else "")
        _step(
            out / "eval_digits" / "results.json",
            eval_models + ["--out", str(out / "eval_digits"), "--data", f"digits={spec}"],
            steps,
            "eval digits",
        )
        digits_results = json.loads((out / "eval_digits" / "results.json").read_text(encoding="utf-8"))
        digits_note = f"scored {spec}"
    else:
        digits_note = "skipped: scikit-learn is not installed (pip install scikit-learn to score its digits)"
        print(f"\nnote: eval digits {digits_note}", flush=True)
    this_run = {
        "started_utc": started,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "cpu_seconds": round(_children_cpu() - cpu0, 1),
        "cpu_count": os.cpu_count(),
        "steps": steps,
    }
    timings = _append_timings(out / "timings.json", this_run, digits_note)
    results = json.loads((ev / "results.json").read_text(encoding="utf-8"))
    compute = {
        "ensemble_steps": total,
        "single_model_steps": total,
        "batch_size": s.batch_size,
        "ensemble_inference_forward_passes": s.experts,
        "single_model_inference_forward_passes": 1,
    }
    print("\nsummary: curation, clustering and comparison figures ...", flush=True)
    summary = build_summary(out, s, results, compute, timings)
    summary["digits"] = digits_note
    plots: dict[str, Any] = {**plot_summary(summary, out / "report"), "_base": out}
    write_json(out / "summary.json", summary)
    text = summary_markdown(results, summary, digits_results, plots)
    with atomic_write(out / "summary.md", "w") as f:
        f.write(text)
    print("\n" + text)
    return summary


# --------------------------------------------------------------------------- the summary
def _records(shards: list[Path]) -> list[tuple[str, str, dict[str, Any]]]:
    """(key, caption, .json fields) of every captioned sample in the shards."""
    from mode_fast.data.io import read_shard

    out = []
    for shard in shards:
        for rec in read_shard(shard, "caption"):
            if rec.caption is None:
                continue
            meta = json.loads(rec.sample["json"]) if "json" in rec.sample else {}
            out.append((rec.key, rec.caption, meta))
    return out


def curation_summary(sample: Path, curated: Path) -> dict[str, Any]:
    """Entry counts before curation (curate's entry_count.npy over the pool) and after (the
    kept captions matched again with the same metadata): MetaCLIP flattens the head (entries
    matched more than t times come down to about t) and keeps the tail (entries at or under t
    keep every match)."""
    from mode_fast._matcher import Matcher
    from mode_fast.metadata import load_metadata

    info = json.loads((curated / "summary.json").read_text(encoding="utf-8"))
    before = np.load(curated / "entry_count.npy").astype(np.int64)
    entries = load_metadata(None)
    kept = _records(sorted((curated / "data").glob("*.tar")))
    _, ids = Matcher(entries).match_batch([c for _, c, _ in kept])
    after = np.bincount(np.asarray(ids, dtype=np.int64), minlength=len(entries))
    t = float(info["t"])
    head, tail = before > t, (before > 0) & (before <= t)
    top = np.argsort(-before, kind="stable")[:10]
    kept_domains: dict[str, int] = {}
    for _, _, meta in kept:
        kept_domains[meta.get("domain", "?")] = kept_domains.get(meta.get("domain", "?"), 0) + 1
    return {
        "pool_pairs": int(info["pool_size"]),
        "matched_pairs": int(info["matched"]),
        "kept_pairs": len(kept),
        "t": t,
        "entries_matched": int((before > 0).sum()),
        "head": {
            "entries": int(head.sum()),
            "matches_before": int(before[head].sum()),
            "matches_after": int(after[head].sum()),
            "largest_after": int(after[head].max()) if head.any() else 0,
        },
        "tail": {
            "entries": int(tail.sum()),
            "matches_before": int(before[tail].sum()),
            "matches_after": int(after[tail].sum()),
            "share_of_matches_kept": float(after[tail].sum() / max(1, before[tail].sum())),
        },
        "top_entries": [{"entry": entries[i], "before": int(before[i]), "after": int(after[i])} for i in top],
        "kept_per_domain": dict(sorted(kept_domains.items())),
        "_counts": {"before": before, "after": after},  # for the plot; dropped before writing
    }


def clustering_summary(curated: Path, clusters: Path, domains: list[str]) -> dict[str, Any]:
    """Agreement of the experts with the sample's visual domains (each pair's image domain)."""
    from mode_fast.clusters import ClusterFolder

    expert_of = ClusterFolder(clusters).expert_of_key()
    pairs = [
        (meta["domain"], expert_of[key])
        for key, _, meta in _records(sorted((curated / "data").glob("*.tar")))
        if key in expert_of and "domain" in meta
    ]
    agree = cluster_agreement([d for d, _ in pairs], [e for _, e in pairs])
    table = np.asarray(agree["contingency"])  # experts (agree["clusters"]) x domains (agree["groups"])
    n_experts = max(agree["clusters"]) + 1
    by_expert = np.zeros((n_experts, len(domains)), dtype=np.int64)
    for row, k in zip(table, agree["clusters"]):
        for count, d in zip(row, agree["groups"]):
            by_expert[k, domains.index(d)] = count
    # a domain's expert: the one holding most of that domain's pairs
    domain_expert = {d: int(by_expert[:, j].argmax()) for j, d in enumerate(domains)}
    return {
        "domain_ami": agree["ami"],
        "domain_purity": agree["purity"],
        "n_pairs": len(pairs),
        "domains": domains,
        "pairs_per_expert_and_domain": by_expert.tolist(),
        "domain_expert": domain_expert,
        "majority_domain_of_expert": {
            f"expert_{k}": domains[int(by_expert[k].argmax())] for k in range(n_experts) if by_expert[k].sum()
        },
    }


def _diff(task: dict[str, Any], a: str, b: str) -> dict[str, float]:
    d, se = paired_difference(task["correct"][a], task["correct"][b])
    return {"diff": d, "se": se}


COMPARED = ("mean_ensemble", "best_expert", "same_compute")


def build_summary(
    out: Path, s: Settings, results: dict[str, Any], compute: dict[str, Any], timings: dict[str, Any]
) -> dict[str, Any]:
    info = json.loads((out / "sample" / "sample_info.json").read_text(encoding="utf-8"))
    domains = list(info["domains"])
    n = results["n_experts"]
    experts = [f"expert_{k}" for k in range(n)]
    clustering = clustering_summary(out / "curated", out / "clusters", domains)
    tasks, comparison, ensemble = {}, {}, {}
    for name, t in results["tasks"].items():
        # best_expert is the oracle pick on this task: its per-image scores are that expert's
        correct = dict(t["correct"], best_expert=t["correct"][t["best_expert"]])
        t = dict(t, correct=correct)
        tasks[name] = {
            "n_images": t["n_images"],
            "n_classes": t["n_classes"],
            "chance": 1.0 / t["n_classes"],
            "top1": t["top1"],
            "se": {m: proportion_se(v, t["n_images"]) for m, v in t["top1"].items()},
            "best_expert": t["best_expert"],
            "mode_vs_mean_disagreements": int(
                sum(a != b for a, b in zip(t["correct"]["mode_ensemble"], t["correct"]["mean_ensemble"]))
            ),
        }
        comparison[name] = {f"mode_ensemble - {b}": _diff(t, "mode_ensemble", b) for b in COMPARED}
        w = np.asarray(t["expert_weights"])
        entry: dict[str, Any] = {
            "weights": w.tolist(),
            "largest": experts[int(w.argmax())],
            "classes_per_expert": t["classes_per_expert"],
        }
        if name in clustering["domain_expert"]:
            own = clustering["domain_expert"][name]
            entry |= {"domain_expert": experts[own], "largest_is_domain_expert": int(w.argmax()) == own}
        ensemble[name] = entry
    # the domain tasks hold disjoint images: their mean difference's SE combines theirs
    dom = [d for d in domains if d in comparison]
    if dom:
        comparison["domain_average"] = {
            key: {
                "diff": float(np.mean([comparison[d][key]["diff"] for d in dom])),
                "se": float(np.sqrt(sum(comparison[d][key]["se"] ** 2 for d in dom)) / len(dom)),
            }
            for key in comparison[dom[0]]
        }
    per_domain = {e: {d: results["tasks"][d]["top1"][e] for d in dom} for e in experts}
    own_best = {d: max(experts, key=lambda e: per_domain[e][d]) for d in dom}
    return {
        "settings": s.__dict__,
        "compute": compute,
        "ensemble_inputs": results.get("ensemble_inputs", "scaled"),
        "timings": timings["runs"][-1],
        "runs_recorded": len(timings["runs"]),
        "curation": curation_summary(out / "sample", out / "curated"),
        "clustering": clustering,
        "experts": {
            "top1_per_domain_task": per_domain,
            "best_expert_per_domain_task": own_best,
            "domain_expert_is_best": {d: own_best[d] == experts[clustering["domain_expert"][d]] for d in dom},
        },
        "ensemble": ensemble,
        "tasks": tasks,
        "comparison": comparison,
    }


# --------------------------------------------------------------------------- plots
FIG_WIDTH = 9.5  # inches; at 110 dpi about 1050 px, within a laptop screen


def plot_summary(summary: dict[str, Any], folder: Path) -> dict[str, Path]:
    """The summary's figures (titles, labelled axes, chance lines, legends outside the data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, Path] = {}
    cur = summary["curation"]
    counts = cur.pop("_counts")
    before, after = counts["before"], counts["after"]
    order = np.argsort(-before, kind="stable")[: int((before > 0).sum())]
    fig, ax = plt.subplots(figsize=(FIG_WIDTH, 4.2), layout="constrained")
    ranks = np.arange(1, len(order) + 1)
    ax.loglog(ranks, before[order], ".", ms=3, color="tab:gray", label="before (pool)")
    ax.loglog(ranks, np.maximum(after[order], 0.8), ".", ms=3, color="tab:blue", label="after (kept; 0 drawn at 0.8)")
    ax.axhline(cur["t"], color="tab:red", ls="--", lw=1, label=f"t = {cur['t']:.1f}")
    ax.set_xlabel("metadata entry, by its count in the pool (rank)")
    ax.set_ylabel("pairs matching the entry")
    ax.set_title(f"Curation: {cur['pool_pairs']:,} pairs -> {cur['kept_pairs']:,}; head (> t) flattened, tail kept")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    plots["curation"] = save_figure(fig, folder / "curation.png")

    cl = summary["clustering"]
    table = np.asarray(cl["pairs_per_expert_and_domain"])
    fig, ax = plt.subplots(figsize=(6.5, 0.6 * len(table) + 2.2), layout="constrained")
    im = ax.imshow(table, cmap="Blues", aspect="auto")
    for (i, j), v in np.ndenumerate(table):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if im.norm(v) > 0.6 else "black", fontsize=9)
    ax.set_xticks(range(len(cl["domains"])), cl["domains"])
    ax.set_yticks(range(len(table)), [f"expert_{k}" for k in range(len(table))])
    ax.set_xlabel("visual domain of the image")
    ax.set_ylabel("expert (coarse cluster)")
    ami = "n/a" if cl["domain_ami"] is None else f"{cl['domain_ami']:.2f}"
    ax.set_title(f"Curated pairs per expert and domain (AMI {ami}, purity {cl['domain_purity']:.2f})")
    fig.colorbar(im, ax=ax, label="pairs")
    plots["clustering"] = save_figure(fig, folder / "clustering.png")

    per = summary["experts"]["top1_per_domain_task"]
    if per and next(iter(per.values())):
        names = list(per)
        doms = list(next(iter(per.values())))
        acc = np.array([[100 * per[e][d] for d in doms] for e in names])
        fig, ax = plt.subplots(figsize=(6.5, 0.6 * len(names) + 2.2), layout="constrained")
        im = ax.imshow(acc, cmap="Greens", vmin=0, vmax=100, aspect="auto")
        for (i, j), v in np.ndenumerate(acc):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="white" if v > 60 else "black", fontsize=9)
        ax.set_xticks(range(len(doms)), [f"{d}\n(chance {100 * summary['tasks'][d]['chance']:.0f}%)" for d in doms])
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("domain task")
        ax.set_ylabel("expert")
        ax.set_title("Each expert's zero-shot top-1 (%) on each domain's task")
        fig.colorbar(im, ax=ax, label="top-1 (%)")
        plots["experts"] = save_figure(fig, folder / "experts.png")

    tasks = summary["tasks"]
    methods = ["mode_ensemble", "mean_ensemble", "best_expert", "same_compute", "seed"]
    methods = [m for m in methods if all(m in t["top1"] for t in tasks.values())]
    names = list(tasks)
    fig, ax = plt.subplots(figsize=(FIG_WIDTH, 4.4), layout="constrained")
    width = 0.8 / len(methods)
    cmap = plt.get_cmap("tab10")
    for j, m in enumerate(methods):
        xs = np.arange(len(names)) + (j - (len(methods) - 1) / 2) * width
        ax.bar(
            xs,
            [100 * tasks[t]["top1"][m] for t in names],
            width,
            yerr=[100 * tasks[t]["se"][m] for t in names],
            capsize=2,
            label=m,
            color=cmap(j),
        )
    for i, t in enumerate(names):
        ax.hlines(
            100 * tasks[t]["chance"],
            i - 0.45,
            i + 0.45,
            colors="black",
            linestyles=":",
            lw=1.2,
            label="chance" if i == 0 else None,
        )
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylim(0, 105)
    ax.set_xlabel("task")
    ax.set_ylabel("zero-shot top-1 (%), bars: ±1 SE")
    ax.set_title("MoDE ensemble vs plain mean vs best expert vs single model of equal training compute")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    plots["comparison"] = save_figure(fig, folder / "comparison.png")

    ens = summary["ensemble"]
    names = list(ens)
    n = len(next(iter(ens.values()))["weights"])
    fig, ax = plt.subplots(figsize=(FIG_WIDTH, 3.8), layout="constrained")
    width = 0.8 / n
    for k in range(n):
        xs = np.arange(len(names)) + (k - (n - 1) / 2) * width
        ax.bar(xs, [ens[t]["weights"][k] for t in names], width, label=f"expert_{k}", color=cmap(k))
    ax.axhline(1.0 / n, color="gray", lw=0.8, ls="--", label="uniform (plain mean)")
    ax.set_xticks(
        np.arange(len(names)),
        [t + (f"\n(domain: {ens[t]['domain_expert']})" if "domain_expert" in ens[t] else "") for t in names],
    )
    ax.set_xlabel("task")
    ax.set_ylabel("MoDE weight")
    ax.set_title("MoDE's expert weights per task (from the class names through the templates)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    plots["ensemble"] = save_figure(fig, folder / "ensemble_weights.png")
    return plots


# --------------------------------------------------------------------------- summary.md
def _verdict(a: float, b: float) -> str:
    """a against b (fractions), judged at the 0.1-point precision the summary prints."""
    diff = round(100 * a, 1) - round(100 * b, 1)
    if abs(diff) < 0.05:
        return "ties with"
    return "beats" if diff > 0 else "loses to"


def _pm(d: dict[str, float]) -> str:
    return f"{100 * d['diff']:+.1f} ± {100 * d['se']:.1f}"


def summary_markdown(
    results: dict[str, Any],
    summary: dict[str, Any],
    digits: dict[str, Any] | None = None,
    plots: dict[str, Path] | None = None,
) -> str:
    """The demo's report, worded from the measured numbers whichever way they go;
    `digits`: the sklearn digits eval's results, reported on their own."""
    avg = results["average"]["top1"]
    ens, one, best = avg["mode_ensemble"], avg["same_compute"], avg["best_expert"]
    diff = round(100 * ens, 1) - round(100 * one, 1)
    verdict = _verdict(ens, one)
    c = summary["compute"]
    tm = summary["timings"]
    rel = (lambda p: os.path.relpath(p, plots["_base"])) if plots and "_base" in plots else (lambda p: str(p))
    img = lambda key, alt: [f"![{alt}]({rel(plots[key])})", ""] if plots and key in plots else []  # noqa: E731
    ran = [x for x in tm["steps"] if not x.get("skipped")]
    skipped = [x["step"] for x in tm["steps"] if x.get("skipped")]
    lines = [
        "# mode-fast demo",
        "",
        f"This run: wall time {tm['wall_seconds']:.0f} s, {tm['cpu_seconds']:.0f} CPU-seconds in the steps' processes, "
        f"on {tm['cpu_count']} CPU cores (steps: "
        + (", ".join(f"{x['step']} {x['seconds']:.0f} s" for x in ran) or "none")
        + ")"
        + (f"; skipped as already done: {', '.join(skipped)}" if skipped else "")
        + ". "
        f"timings.json keeps all {summary['runs_recorded']} run(s).",
        "",
        f"MoDE: {results['n_experts']} experts, {c['ensemble_steps']} training steps of batch {c['batch_size']} "
        f"in all (seed + experts). Single model: same architecture, {c['single_model_steps']} steps of batch "
        f"{c['batch_size']} on all the data. {ensemble_note(results)}",
        "",
        f"**Average zero-shot top-1 over {len(results['tasks'])} tasks: the MoDE ensemble ({100 * ens:.1f}%) "
        f"{verdict} the single model of equal training compute ({100 * one:.1f}%) by {abs(diff):.1f} points**; "
        f"plain mean of experts {100 * avg['mean_ensemble']:.1f}%, best expert per task {100 * best:.1f}%, "
        f"seed {100 * avg['seed']:.1f}%. The ensemble costs {c['ensemble_inference_forward_passes']} forward "
        "passes per image at inference, the single model 1.",
        "",
    ]
    cur = summary["curation"]
    lines += [
        "## Curation (MetaCLIP)",
        "",
        f"{cur['pool_pairs']:,} pool pairs, {cur['matched_pairs']:,} matching a metadata entry, "
        f"{cur['kept_pairs']:,} kept (t = {cur['t']:.1f}). Head: {cur['head']['entries']} entries matched more than "
        f"t times had {cur['head']['matches_before']:,} matches, {cur['head']['matches_after']:,} after "
        f"(largest {cur['head']['largest_after']}). Tail: {cur['tail']['entries']} entries matched at most t times "
        f"had {cur['tail']['matches_before']:,} matches, {cur['tail']['matches_after']:,} after "
        f"({100 * cur['tail']['share_of_matches_kept']:.0f}% kept). Kept pairs per domain: "
        + ", ".join(f"{d} {v}" for d, v in cur["kept_per_domain"].items())
        + ".",
        "",
        "| entry | pairs before | pairs after |",
        "|---|---|---|",
        *[f"| {e['entry']} | {e['before']} | {e['after']} |" for e in cur["top_entries"]],
        "",
        *img("curation", "entry counts before and after curation"),
    ]
    cl = summary["clustering"]
    ami = "n/a (scikit-learn not installed)" if cl["domain_ami"] is None else f"{cl['domain_ami']:.3f}"
    lines += [
        "## Clustering: do the experts follow the visual domains?",
        "",
        f"Over {cl['n_pairs']:,} curated pairs (clustered by caption only): adjusted mutual information with the "
        f"image's domain {ami}, purity {cl['domain_purity']:.3f} (1 = each expert holds one domain). "
        "Each domain's expert (the one holding most of its pairs): "
        + ", ".join(f"{d} -> expert_{k}" for d, k in cl["domain_expert"].items())
        + ".",
        "",
        "| expert | " + " | ".join(cl["domains"]) + " |",
        "|---" * (len(cl["domains"]) + 1) + "|",
        *[
            f"| expert_{k} | " + " | ".join(str(v) for v in row) + " |"
            for k, row in enumerate(cl["pairs_per_expert_and_domain"])
        ],
        "",
        *img("clustering", "pairs per expert and domain"),
    ]
    per = summary["experts"]["top1_per_domain_task"]
    doms = list(next(iter(per.values()))) if per else []
    if doms:
        lines += [
            "## Experts: does each specialise?",
            "",
            "Zero-shot top-1 (%) of each expert on each domain's task (chance "
            + ", ".join(f"{d} {100 * summary['tasks'][d]['chance']:.0f}%" for d in doms)
            + "). "
            "The domain's own expert is the best expert on: "
            + ", ".join(f"{d} {'yes' if v else 'no'}" for d, v in summary["experts"]["domain_expert_is_best"].items())
            + ".",
            "",
            "| expert | " + " | ".join(doms) + " |",
            "|---" * (len(doms) + 1) + "|",
            *[f"| {e} | " + " | ".join(f"{100 * per[e][d]:.1f}" for d in doms) + " |" for e in per],
            "",
            *img("experts", "expert accuracy per domain"),
        ]
    en = summary["ensemble"]
    n = results["n_experts"]
    lines += [
        "## Ensemble: MoDE's weights per task",
        "",
        "| task | " + " | ".join(f"expert_{k}" for k in range(n)) + " | largest | domain's expert | match |",
        "|---" * (n + 4) + "|",
        *[
            f"| {t} | "
            + " | ".join(f"{w:.3f}" for w in e["weights"])
            + f" | {e['largest']} | "
            + (
                f"{e['domain_expert']} | {'yes' if e['largest_is_domain_expert'] else 'no'} |"
                if "domain_expert" in e
                else "- | - |"
            )
            for t, e in en.items()
        ],
        "",
        *img("ensemble", "MoDE weights per task"),
    ]
    tasks, cmp_ = summary["tasks"], summary["comparison"]
    lines += [
        "## Comparison",
        "",
        "Top-1 (%) ± its standard error; differences are MoDE ensemble minus the other, paired over the same "
        "images, ± their standard error. best_expert is an oracle (the expert that scored best on that task). "
        "\"mode != mean\" counts the images where MoDE's and the plain mean's correctness differ.",
        "",
        "| task | chance | mode_ensemble | mean_ensemble | best_expert | same_compute | seed | MoDE - mean | "
        "MoDE - best expert | MoDE - same compute | mode != mean |",
        "|---" * 11 + "|",
    ]
    for t, v in tasks.items():
        top, se = v["top1"], v["se"]
        cells = [
            f"{100 * top[m]:.1f} ± {100 * se[m]:.1f}"
            for m in ("mode_ensemble", "mean_ensemble", "best_expert", "same_compute", "seed")
        ]
        lines.append(
            f"| {t} | {100 * v['chance']:.0f} | "
            + " | ".join(cells)
            + " | "
            + " | ".join(_pm(cmp_[t][f"mode_ensemble - {b}"]) for b in COMPARED)
            + f" | {v['mode_vs_mean_disagreements']} of {v['n_images']} |"
        )
    if "domain_average" in cmp_:
        lines.append(
            "| domain tasks' average | | | | | | | "
            + " | ".join(_pm(cmp_["domain_average"][f"mode_ensemble - {b}"]) for b in COMPARED)
            + " | |"
        )
    lines += ["", *img("comparison", "comparison with chance lines"), "## Every model on every task", ""]
    text = "\n".join(lines) + markdown_table(results)
    if digits is not None:
        t = next(iter(digits["tasks"].values()))
        top1 = t["top1"]
        chance = 1 / t["n_classes"]
        at_chance = max(top1.values()) < chance + 0.03
        text += "\n".join(
            [
                "",
                "## Real data: scikit-learn's handwritten digits",
                "",
                f"{t['n_images']} images of {t['n_classes']} classes ({t['source']}; chance {100 / t['n_classes']:.0f}%), "
                f"never seen in training (the sample has only the digits one and seven, typeset). Zero-shot top-1: "
                f"the MoDE ensemble ({100 * top1['mode_ensemble']:.1f}%) {_verdict(top1['mode_ensemble'], top1['same_compute'])} the single model of equal "
                f"training compute ({100 * top1['same_compute']:.1f}%); mean of experts "
                f"{100 * top1['mean_ensemble']:.1f}%, best expert {100 * top1['best_expert']:.1f}%, seed "
                f"{100 * top1['seed']:.1f}%."
                + (
                    " Every model is within 3 points of chance: these toy models have not learned handwritten "
                    "digits, so this task cannot rank them."
                    if at_chance
                    else ""
                ),
                "",
                markdown_table(digits),
            ]
        )
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
