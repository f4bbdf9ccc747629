"""The end-to-end demo on the embedded sample: sample -> dedup -> curate -> cluster -> train -> eval.

    python -m mode_fast.demo.pipeline --out demo_out [--quick] [--overwrite]

Each step is the documented CLI (`python -m mode_fast <job> ...`), run as a subprocess and
printed before it runs, so the demo is also a recipe. Before curation, `mode-fast dedup`
(the exact stage, then SemDeDup on the captions through the demo's caption embedder, at
`dedup_eps`) removes near-duplicates, and curate reads its kept_keys.txt (`--keep-keys`); the
summary scores that removal against the sample's own record of its injected near-duplicates
(`mode_fast.demo.report.dedup_score`). MoDE at toy scale:
- a seed model trains `seed_steps` of a (seed_steps + expert_steps)-step cosine schedule on
  all curated pairs; each of the n experts resumes it and trains the last `expert_steps` on
  its cluster (plus MoDE's small share of the others);
- MoDE's comparison (the paper's): the seed continued for expert_steps on all the data, i.e.
  one model of one expert's schedule (seed_steps + expert_steps) on all the data;
- ours besides: a single model of the same architecture trains seed_steps + n * expert_steps
  steps at the same batch size on all the data: the same training compute as the whole ensemble;
- eval scores experts, ensembles, the seed and both single models on the sample's held-out
  split (all 16 classes) and on one task per visual domain (4 classes each), plus image-text
  retrieval on the held-out captions;
- when scikit-learn is installed, a second eval scores the same models on real data:
  scikit-learn's bundled handwritten digits (`--data digits=sklearn:digits`, 1797 images,
  10 classes, no download), kept apart so that the headline average stays on the sample's
  tasks; without scikit-learn the step is skipped with a note.
Outputs under --out: sample/, dedup/ (eps_<eps>/kept_keys.txt ...), curated/, clusters/, run/ (seed, experts), single/ (the same-
compute model), same_schedule/ (MoDE's comparison model; its job folder is expert_0), eval/
(results.json, results.md, plots), eval_digits/ (the same for the digits), report/ (the
summary's plots), summary.md, summary.json (curation, clustering, experts, ensemble, both
comparisons, per-task chance and top-1; `mode_fast.demo.report`), timings.json (one entry per
run, appended), and the demo's own run.json and .lock.
Progress: each step's own progress lines pass through; when the output is not a terminal,
progress bars (carriage-return updates) come out as one line every `PROGRESS_EVERY` seconds.
Reruns follow the one lifecycle rule (mode_fast.core.runs; README "Reruns, kills and
interrupts"): --out is locked while the demo runs; its run.json records the settings
(--quick or the full run) and the finished steps, so a rerun with other settings stops
naming them, and a rerun of the same command skips the finished steps (a step with its own
run.json must also be finished by it: one killed mid-way runs again and continues) and
says so; once a step has run, the later ones run too (their own run.json decides what is
left: nothing, when their inputs did not change). A demo folder finished before the same-
schedule model was added (same settings, so the same run.json args) runs only that step; the
evaluations then score only it. One whose curation predates the dedup step runs dedup alone
(`_Driver.alone`): the steps after it are not rerun for it, so its curated pool stays the one
curated without the list, and the summary says so. Ctrl-C/SIGTERM reach the running step, which stops at its own
consistent point; the demo then stops with one line, exit 130. A killed demo takes its running step along.
Job module: it runs the other jobs as processes (never imports them); a failed step ends the
demo with one line (`mode_fast.core.errors.StepFailed`, exit 2) under the failing step's own error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.util
import io
import json
import math
import os
import resource
import shlex
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mode_fast.core.config import option
from mode_fast.core.errors import ConfigError, Interrupted, StepFailed
from mode_fast.core.files import inside, write_bytes, write_json, write_text
from mode_fast.core.runs import MANIFEST, RunState, die_with_parent, recorded_finished
from mode_fast.data.io import ReadReport, iter_samples
from mode_fast.dedup.run import KEPT_KEYS, eps_folder
from mode_fast.demo.report import build_summary, dedup_line, plot_summary, summary_markdown

PROGRESS_EVERY = 20.0  # seconds between progress-bar lines when not on a terminal
SAME_SCHEDULE = "same_schedule"  # MoDE's comparison model's folder under --out (see _train_steps)
DEDUP = "dedup"  # the dedup step's name and folder under --out
ADDED_SETTINGS = ("dedup_eps", "dedup_clusters")  # Settings added after demo folders were written
PAPER_SHARE = 1.0  # its --expert-share: every other cluster's pairs too, i.e. all the data


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
    # The dedup step (SemDeDup on the captions, `embedder`). eps 0.05 (removed when cosine > 0.95):
    # the sample's near-duplicates are a trailing punctuation mark, a doubled space or the first
    # letter's case changed; with MiniLM 95% of those pairs are above 0.939 and half at 1.0, and
    # 0.05 finds about 90% of them on the 10k pool taken as one cluster (0.02: 78%, 0.1: 98% but
    # twice the other removals); the hash embedder ignores case and punctuation: every pair at 1.0.
    # 10 k-means clusters: a few hundred (quick: a few dozen) captions each. Added with the dedup
    # step, so recorded in the demo's run.json only when not at these defaults (see _open_run).
    dedup_eps: float = 0.05
    dedup_clusters: int = 10


# Full: 2 idle CPU cores within 15 minutes (measured: see README). Quick: the test.
# Sample format 3, lr 2e-3, wd 0.1, seed 480 + 4 experts x 160 steps: every model above chance
# on every domain task, none at 100%, 611 s on 2 idle cores (README's demo section; 240 + 80
# steps took 361 s and left one expert 1.4 standard errors from chance on glyphs).
FULL = Settings(
    num_pairs=10_000,
    eval_pairs=1000,
    shard_size=1000,
    target_size=4000,
    fine_k=64,
    experts=4,
    embedder="minilm",
    seed_steps=480,
    expert_steps=160,
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


def _say(text: str) -> None:
    print(text, flush=True)


def _relay(proc: subprocess.Popen, tty: bool) -> None:
    """Pass a step's output through. Lines ending in newline go out at once; a progress bar's
    carriage-return updates go out as they come on a terminal, else one every PROGRESS_EVERY s."""
    assert proc.stdout is not None
    out = sys.stdout
    pending = b""
    last_bar = -math.inf  # the first bar always goes out (monotonic time starts near 0 at boot)
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


# --------------------------------------------------------------------------- the steps
@dataclass(frozen=True)
class Step:
    """One step: its documented command, the file it ends by writing (recorded in the demo's
    run.json) and its own output folder (whose run.json, where the job keeps one, must also
    record it finished)."""

    name: str
    cmd: list[str]
    output: Path
    folder: Path


def _flags(**values: Any) -> list[str]:
    """["--num-pairs", "320", ...] from num_pairs=320, in the order given."""
    return [x for k, v in values.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def dedup_kept_keys(out: Path, s: Settings) -> Path:
    """The dedup step's kept list, the one curate reads (dedup writes one folder per eps)."""
    return out / DEDUP / eps_folder(s.dedup_eps) / KEPT_KEYS


def _prepare_steps(out: Path, s: Settings) -> list[Step]:
    py = [sys.executable, "-m", "mode_fast"]
    sample, dedup, curated, clusters = out / "sample", out / DEDUP, out / "curated", out / "clusters"
    sizes = _flags(num_pairs=s.num_pairs, eval_pairs=s.eval_pairs, shard_size=s.shard_size)
    semdedup = _flags(eps=s.dedup_eps, clusters=s.dedup_clusters, embedder=s.embedder)
    curate = _flags(target_size=s.target_size, seed=0, keep_keys=dedup_kept_keys(out, s))
    cluster = _flags(fine_k=s.fine_k, experts=s.experts, embedder=s.embedder, sample=s.target_size)
    return [
        Step("sample", [*py, "sample", "--out", str(sample), *sizes], sample / "sample_info.json", sample),
        Step(
            DEDUP,
            [*py, "dedup", str(sample / "pool"), "--out", str(dedup), *semdedup],
            dedup_kept_keys(out, s),
            dedup,
        ),
        Step(
            "curate",
            [*py, "curate", str(sample / "pool"), "--out", str(curated), *curate],
            curated / "manifest.json",
            curated,
        ),  # fmt: skip
        Step(
            "cluster",
            [*py, "cluster", str(curated / "data"), "--out", str(clusters), *cluster],
            clusters / "cluster_sizes.json",
            clusters,
        ),
    ]


def _train_steps(out: Path, s: Settings) -> list[Step]:
    py = [sys.executable, "-m", "mode_fast", "train", "--data", str(out / "curated" / "data")]
    py += _flags(batch_size=s.batch_size, warmup=s.warmup, workers=s.workers, model=s.model, seed=0, lr=s.lr, wd=s.wd)
    run, single, same_schedule = out / "run", out / "single", out / SAME_SCHEDULE

    def final(job: Path) -> Path:
        return job / "checkpoints" / "final.pt"

    seed = _flags(out=run, stage="seed", steps=s.seed_steps, schedule_steps=s.seed_steps + s.expert_steps)
    steps = [Step("train seed", [*py, *seed], final(run / "seed"), run / "seed")]
    for k in range(s.experts):
        expert = _flags(out=run, expert=k, clusters=out / "clusters", steps=s.expert_steps)
        steps.append(Step(f"train expert {k}", [*py, *expert], final(run / f"expert_{k}"), run / f"expert_{k}"))
    # Same total training compute as seed + all experts: same steps x batch, same model.
    total = s.seed_steps + s.experts * s.expert_steps
    same = _flags(out=single, stage="seed", steps=total, schedule_steps=total)
    steps.append(Step("train same-compute single model", [*py, *same], final(single / "seed"), single / "seed"))
    # MoDE's own comparison (Ma et al., CVPR 2024, arXiv:2404.16030): one model trained on all
    # the data with the same schedule as one expert, i.e. the seed continued for the experts'
    # steps on all the data. It is trained exactly as an expert is, minus the cluster filter:
    # an expert job with --expert-share 1.0 keeps its own cluster and every other cluster's
    # pairs (share_hash < 1 always), i.e. every curated pair (the cluster job assigns each),
    # and like every expert it loads the seed's final model, optimizer and schedule position
    # and trains the last expert_steps of the seed's schedule. So it and an expert differ only
    # in the data of those steps. The alternatives give less: a seed job of seed+expert steps
    # is the seed continued only where training is bit-reproducible (not on GPU without
    # --deterministic) and trains the seed's steps again; --resume refuses a checkpoint whose
    # --steps differ. Its train folder is SAME_SCHEDULE/expert_0 (the checkpoint says stage
    # expert 0, share 1.0): the job's name, not a cluster.
    seed_ckpt = final(run / "seed")
    paper = _flags(
        out=same_schedule, expert=0, clusters=out / "clusters", expert_share=PAPER_SHARE,
        seed_checkpoint=seed_ckpt, steps=s.expert_steps,
    )  # fmt: skip
    job = same_schedule / "expert_0"
    steps.append(Step("train same-schedule single model", [*py, *paper], final(job), job))
    return steps


def same_schedule_checkpoint(out: Path) -> Path:
    """The final checkpoint of MoDE's comparison model (see `_train_steps`)."""
    return out / SAME_SCHEDULE / "expert_0" / "checkpoints" / "final.pt"


def _eval_steps(out: Path, s: Settings, domain_specs: list[str]) -> list[Step]:
    """eval on the sample's tasks; with scikit-learn, eval on its digits too."""
    run, sample, ev = out / "run", out / "sample", out / "eval"
    models = [sys.executable, "-m", "mode_fast", "eval", "--run", str(run), "--clusters", str(out / "clusters")]
    models += ["--baseline", f"seed={run / 'seed' / 'checkpoints' / 'final.pt'}"]
    models += ["--baseline", f"same_compute={out / 'single' / 'seed' / 'checkpoints' / 'final.pt'}"]
    models += ["--baseline", f"same_schedule={same_schedule_checkpoint(out)}"]
    tasks = ["--data", f"all16={sample / 'eval'}", *domain_specs, "--retrieval", f"captions={sample / 'eval'}"]
    steps = [Step("eval", [*models, "--out", str(ev), *tasks], ev / "results.json", ev)]
    if have_sklearn():
        digits = out / "eval_digits"
        spec = "sklearn:digits" + (f":{s.digits}" if s.digits else "")
        cmd = [*models, "--out", str(digits), "--data", f"digits={spec}"]
        steps.append(Step("eval digits", cmd, digits / "results.json", digits))
    return steps


def write_domain_tasks(sample: Path, out: Path) -> list[str]:
    """One eval task per visual domain: the held-out images of its classes, relabelled 0..k-1,
    as webdataset shards with their own classes.json and templates.json. The file names in
    sample_info.json are data: each must lie inside its folder (`mode_fast.core.files.inside`).
    A shard already holding the same bytes is left as it is (its mtime too)."""
    info_path = sample / "sample_info.json"
    info = json.loads(info_path.read_text(encoding="utf-8"))
    classes = info["classes"]
    again = "rerun with --overwrite to write the sample again"
    templates = json.loads(inside(sample, info["templates_file"], info_path, again).read_text(encoding="utf-8"))
    shards = [inside(sample, rel, info_path, again) for rel in info["eval_shards"]]
    folders = {domain: inside(out, domain, info_path, again) for domain in info["domains"]}
    specs = []
    for domain, labels in info["domains"].items():
        folder = folders[domain]
        new_label = {old: i for i, old in enumerate(labels)}
        report = ReadReport()
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tw:
            for shard in shards:
                for group in iter_samples(shard, report):  # the walk every job shares
                    label = int(group.read("cls"))
                    if label not in new_label:
                        continue
                    report.read += 1
                    for ext, payload in (("jpg", group.read("jpg")), ("cls", str(new_label[label]).encode())):
                        ti = tarfile.TarInfo(f"{group.key}.{ext}")
                        ti.size, ti.mtime = len(payload), 0
                        tw.addfile(ti, io.BytesIO(payload))
        # Rewritten only when it differs: eval fingerprints a task's files by mtime, and a demo
        # rerun that runs a new step (an older demo folder) would otherwise score every model
        # on the domain tasks again. The tar is a pure function of the sample (mtime 0, no owner).
        shard_path, data = folder / f"{domain}-000000.tar", buffer.getvalue()
        if not (shard_path.is_file() and shard_path.read_bytes() == data):
            write_bytes(shard_path, data)
        if report.skipped:
            print(f"note: domain task {domain}: {report.describe()}", flush=True)
        write_json(folder / "classes.json", [classes[i] for i in labels])
        write_json(folder / "templates.json", templates)
        specs.append(f"{domain}={folder}")
    return specs


# --------------------------------------------------------------------------- running them
def _step_finished(step: Step, state: RunState) -> str | None:
    """Why `step` counts as finished, or None. The demo's run.json must record it, and the
    step's own run.json, where its job keeps one, must record it finished: a step killed
    mid-way is run again and continues by its own rule."""
    if not state.is_done(step.name) or not step.output.is_file():
        return None
    if (step.folder / MANIFEST).exists():
        return f"{step.folder / MANIFEST} records it finished" if recorded_finished(step.folder) else None
    return f"{step.output} exists"


class _Driver:
    """Runs the steps as processes. SIGINT/SIGTERM go to the running step, which stops at its
    own consistent point; then the demo stops with one line (`Interrupted`, exit 130). Each
    step runs in its own process group (a terminal's Ctrl-C reaches the demo only, which
    passes it on once) and is killed by the kernel when the demo dies, however it dies."""

    def __init__(self, state: RunState, log: list[dict[str, Any]], alone: frozenset[str] = frozenset()) -> None:
        self.state, self.log = state, log
        # steps that run without making the later ones run: a step added to the demo before
        # steps a folder had already finished (dedup before its curate), run as a measurement
        # only, so an older folder is not curated, clustered and trained all over again
        self.alone = alone
        self.proc: subprocess.Popen | None = None
        self.signal: int | None = None
        self.where = "start"
        self.ran = False  # a step ran: the later ones run too, their jobs decide what is left

    def _stopped(self) -> Interrupted:
        return Interrupted(f"interrupted at {self.where}; rerun the same command to continue")

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signal = signum
        if self.proc is None:
            raise self._stopped()
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signum)  # a second signal too: the step's own "stop now"

    @contextlib.contextmanager
    def interrupts(self) -> Iterator[_Driver]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def step(self, step: Step) -> None:
        """Run `step` unless it is finished (then say so and record the skip). Once a step has
        run, the later ones are not skipped on the demo's word: what they read may have changed
        (a lost file redone), so each job's own run.json decides (a no-op when nothing did)."""
        self.where = f"step {step.name}"
        why = None if self.ran else _step_finished(step, self.state)
        if why is not None:
            print(f"skip: {step.name}: already done ({why})", flush=True)
            self.log.append({"step": step.name, "skipped": True})
            return
        print(f"\n$ {shlex.join(step.cmd)}", flush=True)
        started, cpu0 = time.perf_counter(), _children_cpu()
        code = self._spawn(step.cmd)
        self.log.append(
            {
                "step": step.name,
                "seconds": round(time.perf_counter() - started, 1),
                "cpu_seconds": round(_children_cpu() - cpu0, 1),
                "command": shlex.join(step.cmd),
            }
        )
        self.ran = self.ran or step.name not in self.alone
        if code == 0:
            self.state.mark_done(step.name, [step.output])
            self.state.flush()
        if self.signal is not None:
            raise self._stopped()
        if code != 0:
            raise StepFailed(f"step {step.name!r} failed with exit code {code}: {shlex.join(step.cmd)}")

    def _spawn(self, cmd: list[str]) -> int:
        demo = os.getpid()

        def tie() -> None:  # in the child, between fork and exec
            os.setpgid(0, 0)
            die_with_parent(signal.SIGKILL)
            if os.getppid() != demo:  # the demo died before prctl: no signal would come
                os._exit(1)

        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, preexec_fn=tie)
        self.proc = proc
        try:
            _relay(proc, sys.stdout.isatty())
        finally:
            code = proc.wait()
            self.proc = None
        return code


# --------------------------------------------------------------------------- the job
# What --overwrite removes: the demo's outputs (its steps' folders included).
DEMO_OUTPUTS = (
    *("sample", DEDUP, "curated", "clusters", "run", "single", SAME_SCHEDULE, "tasks", "eval", "eval_digits", "report"),
    *("summary.json", "summary.md", "timings.json"),
)


def _open_run(out: Path, s: Settings, overwrite: bool) -> RunState:
    """The demo's own run.json and lock: its settings stop a rerun that differs."""
    # Settings added with a step are recorded only when not at their defaults (as a job's
    # result=ADDED fields): a run.json written before them then matches this run's, so an older
    # folder with the same settings is not refused (it runs the new step: _steps_alone).
    added = {f.name: f.default for f in dataclasses.fields(Settings) if f.name in ADDED_SETTINGS}
    values = {k: v for k, v in dataclasses.asdict(s).items() if k not in added or v != added[k]}
    args = {"--quick": s == QUICK, **values}
    state = RunState.open(
        out, "demo", inputs={}, args=args, overwrite=overwrite, owned=DEMO_OUTPUTS, log=_say, defaults=added
    )
    if not state.resumed and any((out / name).exists() for name in DEMO_OUTPUTS):
        state.close()
        raise ConfigError(
            f"{out} holds a demo run without {MANIFEST} (an older mode-fast): "
            "rerun with --overwrite to start over, or use another --out"
        )
    return state


def _steps_alone(state: RunState, steps: list[Step]) -> frozenset[str]:
    """Steps not done in a folder where a later step is: added to the demo after that folder
    ran them (the dedup step before a finished curate). They run alone (`_Driver.alone`)."""
    done = [state.is_done(step.name) for step in steps]
    return frozenset(step.name for i, step in enumerate(steps) if not done[i] and any(done[i + 1 :]))


def _say_what_is_left(out: Path, state: RunState, steps: list[Step], alone: frozenset[str]) -> None:
    """A finished demo rerun: every step is skipped, unless it finished before steps were
    added to the demo: then those run. After MoDE's same-schedule model the evaluations run
    and score only the new model (eval's own run.json keeps the other scores); the dedup step
    runs alone, the curation it would feed left as it was (`_steps_alone`)."""
    if alone:
        _say(
            f"demo: {out} was curated before this mode-fast added {', '.join(sorted(alone))}: running it alone; "
            "the curated pool and everything after it stay as they are, not deduplicated "
            "(--overwrite runs the whole demo with it)"
        )
    if not state.finished:
        return
    new = [step.name for step in steps if not state.is_done(step.name) and step.name not in alone]
    if new:
        _say(
            f"demo: {out} finished before this mode-fast added {', '.join(new)}: running "
            + ("it" if len(new) == 1 else "them")
            + "; the evaluations then score only what is new"
        )
    elif alone:
        return
    else:
        _say(f"demo: {out} already finished with these settings: every step is skipped, the summary written again")


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


def write_summary(out: Path, s: Settings, timings: dict[str, Any], digits_note: str) -> dict[str, Any]:
    """summary.json, summary.md and the report's figures from the finished steps."""
    results = json.loads((out / "eval" / "results.json").read_text(encoding="utf-8"))
    digits_file = out / "eval_digits" / "results.json"
    digits = json.loads(digits_file.read_text(encoding="utf-8")) if digits_note.startswith("scored") else None
    total = s.seed_steps + s.experts * s.expert_steps
    compute = {
        "ensemble_steps": total,
        "single_model_steps": total,
        # MoDE's comparison: the seed's steps (shared with every expert) and the experts' steps
        # continued on all the data: one expert's schedule, seed_steps + expert_steps
        "same_schedule_model_steps": s.seed_steps + s.expert_steps,
        "same_schedule_model_steps_after_seed": s.expert_steps,
        "batch_size": s.batch_size,
        "ensemble_inference_forward_passes": s.experts,
        "single_model_inference_forward_passes": 1,
    }
    print("\nsummary: curation, clustering and comparison figures ...", flush=True)
    summary = build_summary(out, s.__dict__, results, compute, timings)
    summary["digits"] = digits_note
    print(dedup_line(summary["dedup"]), flush=True)
    plots: dict[str, Any] = {**plot_summary(summary, out / "report"), "_base": out}
    write_json(out / "summary.json", summary)
    text = summary_markdown(results, summary, digits, plots)
    write_text(out / "summary.md", text)
    print("\n" + text)
    return summary


def run_pipeline(out: Path, s: Settings, overwrite: bool = False) -> dict[str, Any]:
    """Every step (skipping those finished), then the summary; see the module doc."""
    log: list[dict[str, Any]] = []
    t0, cpu0 = time.perf_counter(), _children_cpu()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with contextlib.ExitStack() as stack:
        state = stack.enter_context(_open_run(out, s, overwrite))
        steps = _prepare_steps(out, s) + _train_steps(out, s)
        alone = _steps_alone(state, steps)
        driver = stack.enter_context(_Driver(state, log, alone).interrupts())
        _say_what_is_left(out, state, steps, alone)
        for step in steps:
            driver.step(step)
        driver.where = "the domain tasks"
        for step in _eval_steps(out, s, write_domain_tasks(out / "sample", out / "tasks")):
            driver.step(step)
        if have_sklearn():
            digits_note = "scored " + "sklearn:digits" + (f":{s.digits}" if s.digits else "")
        else:
            digits_note = "skipped: scikit-learn is not installed (pip install scikit-learn to score its digits)"
            print(f"\nnote: eval digits {digits_note}", flush=True)
        driver.where = "the summary"
        this_run = {
            "started_utc": started,
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "cpu_seconds": round(_children_cpu() - cpu0, 1),
            "cpu_count": os.cpu_count(),
            "steps": log,
        }
        summary = write_summary(out, s, _append_timings(out / "timings.json", this_run, digits_note), digits_note)
        state.finish([out / "summary.json", out / "summary.md"])
    return summary


@dataclass(frozen=True)
class DemoConfig:
    """`mode-fast demo`'s settings (each flag declared here once)."""

    out: Path = option(Path("demo_out"), help="the demo's folder (default: %(default)s)", result=False)
    quick: bool = option(False, help="tiny sizes and the hash text encoder (a test run)", result=True)
    overwrite: bool = option(False, help="start over: remove this demo's earlier outputs in --out first", result=False)

    @property
    def settings(self) -> Settings:
        return QUICK if self.quick else FULL


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """The whole demo (run_pipeline with the settings --quick picks); returns the summary."""
    return run_pipeline(cfg.out, cfg.settings, overwrite=cfg.overwrite)
