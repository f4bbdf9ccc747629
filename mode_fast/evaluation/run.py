"""Zero-shot scores of MoDE data experts, their ensembles and single models (`mode-fast eval`).

For each task the experts (RUN/expert_K/checkpoints/final.pt, K < the cluster file's expert
count) and the single models (the seed RUN/seed/checkpoints/final.pt, or --baseline CKPT,
repeatable) are scored, and from the experts' scores. --run may instead name a `mode-fast
export` folder (its ensemble.json; mode_fast.evaluation.mode_ensemble): its expert and seed
safetensors files are the models and its centers and embedder spec the clusters (--clusters
may still name others), and the numbers are those of the run it was exported from.

- best_expert: the expert with the highest score on this task (an oracle pick);
- mean_ensemble: the plain mean of the experts' cosine similarities;
- mode_ensemble: MoDE's weighted sum of them, weights from the task's class names embedded
  with the clustering text encoder through the task's templates (averaged, then normalised)
  against the fine centers (mode_fast.evaluation.ensemble; Ma et al., "MoDE: CLIP Data
  Experts via Clustering", CVPR 2024, arXiv:2404.16030).
Both ensembles combine plain cosine similarities, as MoDE's public code does;
`--ensemble-inputs scaled` multiplies each expert's by its own logit scale first. results.json
records which (`ensemble_inputs`) and the tables say it. Single models and experts are
ranked by cosine (a positive scale does not change a ranking).

Tasks (--data [NAME=]SPEC: webdataset shards, a folder per class, a CSV, the sample's eval
split, sklearn:digits[:N]; --retrieval [NAME=]SHARDS) and their class names and templates
are read by `mode_fast.evaluation.tasks`; the scoring is `mode_fast.evaluation.scoring`.

Outputs in --out, each written atomically: results.json, results.md, accuracy.png,
expert_weights.png (and retrieval.png with --retrieval), and clip_benchmark/TASK__METHOD.json,
each task's metrics for each method in CLIP_benchmark's result layout
(mode_fast.evaluation.results.clip_benchmark_records). results.json keeps, per
classification task, each method's per-image correctness (`correct`, 1/0 in image order) and
the `labels`, so differences between methods can be given paired standard errors.
scores/TASK/model-NAME.npz holds one model's scores on one task and scores/TASK/weights.npz
the task's MoDE weights: the units of work of run.json.

Reruns follow the one lifecycle rule (mode_fast.core.runs; README "Reruns, kills and
interrupts"): rerunning the same command continues with the (task, model) scores not yet
stored and ends with the same files as an unbroken run; a finished evaluation rerun is a
no-op. A retrained checkpoint recomputes that model's scores, a changed task (its files,
class names, templates or reader options) that task's, a changed cluster folder or
--embedder the weights, --batch-size the scores, --device everything; the ensembles and
tables are always recombined from the stored scores. A changed code version stops.

`EvalConfig` declares every setting once (flag, help, whether it changes results, bounds;
mode_fast.core.config): the CLI's parser (mode_fast.jobs.eval), run.json's arguments and the
rerun rules come from it. `run_evaluation(cfg)` is the whole job: the run's plan and units,
and calls into `mode_fast.evaluation.tasks`, `.scoring`, `.results`,
`mode_fast.clustering.folder` and `mode_fast.core.runs`.
"""

from __future__ import annotations

import json
import logging
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mode_fast.clustering.folder import EMBEDDER, ClusterFolder
from mode_fast.core.config import check_ranges, flag_of, manifest_args, option, options
from mode_fast.core.errors import ConfigError, ModeFastError
from mode_fast.core.files import save_npz
from mode_fast.core.runs import MANIFEST, RunState, fingerprint
from mode_fast.data.images import DEFAULT_MAX_BAD_SHARE
from mode_fast.evaluation.ensemble import ENSEMBLE_INPUTS
from mode_fast.evaluation.mode_ensemble import ExportFolder, is_export
from mode_fast.evaluation.results import CB_DIR, method_order, path_key, write_outputs
from mode_fast.evaluation.scoring import (
    ENSEMBLES,
    FINAL,
    Ensembler,
    LoadedModel,
    classification_summary,
    embedder_for,
    find_experts,
    finished_train_job,
    flatten_captions,
    load_models,
    logit_scale,
    retrieval_summary,
    task_scores,
    unfinished_reason,
)
from mode_fast.evaluation.tasks import (
    ClassificationTask,
    EvalError,
    RetrievalTask,
    load_retrieval_task,
    load_task,
    task_fingerprint,
)
from mode_fast.training.checkpoint import Pretrained, check_model_checkpoint, parse_model_spec

log = logging.getLogger("mode_fast.evaluation.run")

RESULTS_FORMAT = "mode_fast.eval/1"
RESULTS = "results.json"
SCORES = "scores"
OUTPUTS = (RESULTS, "results.md", "accuracy.png", "expert_weights.png", "retrieval.png")
EVAL_OUTPUTS = (SCORES, CB_DIR, *OUTPUTS)  # this job's files in --out (what --overwrite removes)
Task = ClassificationTask | RetrievalTask


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """What `mode-fast eval` does, one field per flag (declared in --help's order; run.json's
    "args" are the result-changing ones, in this order). Checked on construction: ConfigError."""

    run: Path = option(
        help="train run folder (RUN/seed, RUN/expert_K), or a `mode-fast export` folder (its ensemble.json)",
        result=False,
    )
    clusters: Path | None = option(
        None,
        help="`mode-fast cluster` output folder (or its centers.npz); required unless --run is an export "
        "folder, whose centers are the default",
        result=False,
    )
    data: tuple[str, ...] = option(
        help="classification tasks: [NAME=]shards/folder/CSV/sample eval dir, a CLIP_benchmark "
        "webdataset folder [NAME=]FOLDER[:SPLIT] (split default test), or "
        "[NAME=]sklearn:digits[:N] (scikit-learn's bundled handwritten digits; N: a "
        "class-balanced subset)",
        result=True,
        cli_default=(),  # the CLI may give --retrieval alone; from Python, data=() says so
        nargs="*",
        metavar="SPEC",
    )
    retrieval: tuple[str, ...] = option(
        (),
        help="[NAME=]captioned webdataset shards for image-text retrieval, or a CLIP_benchmark "
        "retrieval folder [NAME=]FOLDER[:SPLIT] (several captions per image)",
        result=True,
        nargs="*",
        metavar="SHARDS",
    )
    out: Path = option(help="output folder", result=False)
    baselines: tuple[str, ...] = option(
        (),
        help="single model(s) to compare (default: RUN/seed/checkpoints/final.pt): a train checkpoint, "
        "or an open_clip model, ARCH:TAG (from the local cache) or ARCH:FILE; repeatable",
        result=True,
        flag="--baseline",
        cli_default=[],  # argparse's append copies its default and appends to the copy: a list
        action="append",
        metavar="[NAME=]CKPT|SPEC",
    )
    # a JSON-list file or a built-in name (tasks.CLASS_SETS); kept as typed (run.json records it)
    classes: str | Path | None = option(
        None,
        help="JSON list of class names, `imagenet` for open_clip's 1000 ImageNet class names, or "
        "cb:NAME for clip-benchmark's (default: classes.json beside the data, a CLIP_benchmark "
        "folder's classnames.txt)",
        result=True,
        metavar="FILE|imagenet|cb:NAME",
    )
    # a JSON-list file or a built-in name (tasks.TEMPLATE_SETS)
    templates: str | Path | None = option(
        None,
        help="JSON list of prompt templates with '{}', or `openai-imagenet` (open_clip's 80) / "
        "`simple-imagenet` (its 7), or cb:NAME for clip-benchmark's (default: templates.json "
        "beside the data or a CLIP_benchmark folder's zeroshot_classification_templates.txt, "
        "else the task's own for sklearn:digits, else simple-imagenet)",
        result=True,
        metavar="FILE|openai-imagenet|simple-imagenet|cb:NAME",
    )
    label_field: str = option("label", help="label field of .json when there is no .cls", result=True)
    caption_key: str = option(
        "caption",
        help="retrieval captions, as in curate and cluster: a member extension of that name, else "
        "a .json field; the default also falls back to .txt (default: %(default)s)",
        result=True,
    )
    embedder: str | None = option(
        None,
        help="clustering text encoder: minilm, hashN or package.module:callable (default: the one "
        "stored with the clusters, embedder.json; a stored package.module:callable is used only "
        "when named here)",
        result=True,
    )
    device: str = option("cpu", help="", result=True)  # no help line in --help, as before
    batch_size: int = option(256, help="", result=True, low=1)
    # not in run.json: it stops a task, the scores stay the same
    max_bad_share: float = option(
        DEFAULT_MAX_BAD_SHARE,
        help="stop a task when more than this share of its images cannot be decoded or are over the "
        "pixel limit (they are skipped and counted in results.json; default: %(default)s)",
        result=False,
        high=1.0,
        metavar="SHARE",
    )
    ensemble_inputs: str = option(
        "cosine",
        help="what the ensembles combine: the experts' plain cosine similarities (MoDE's, "
        "default) or each times the expert's own logit scale (scaled)",
        result=True,
        choices=ENSEMBLE_INPUTS,
    )
    overwrite: bool = option(
        False,
        help="forget an earlier evaluation in --out (its scores and results) and start over",
        result=False,
    )

    def __post_init__(self) -> None:
        for f, _ in options(self):  # lists from Python callers: kept as tuples, the config is frozen
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        if not self.data and not self.retrieval:
            raise ConfigError("nothing to evaluate: give --data SPEC... and/or --retrieval SHARDS...")
        if self.ensemble_inputs not in ENSEMBLE_INPUTS:  # the CLI's choices; Python callers reach here
            raise ConfigError(
                f"--ensemble-inputs must be one of {', '.join(ENSEMBLE_INPUTS)}, got {self.ensemble_inputs!r}"
            )
        check_ranges(self)


# --------------------------------------------------------------------------- the plan
@dataclass
class _Plan:
    """What the run reads, checked before --out is touched: the cluster folder and where its
    text encoder's spec comes from, the models (experts first) and the tasks
    (classification, then retrieval)."""

    folder: ClusterFolder
    embedder_source: str  # the file (or --embedder) the encoder's spec comes from
    experts: list[tuple[str, Path]]
    singles: list[tuple[str, Path | Pretrained]]
    tasks: list[Task]
    export: ExportFolder | None = None  # --run is a `mode-fast export` folder: its models are its files

    @property
    def models(self) -> list[tuple[str, Path | Pretrained]]:
        return self.experts + self.singles


def _parse_baseline(spec: str) -> tuple[str, Path | Pretrained]:
    """(name, model) of a --baseline: [NAME=]CKPT (a train checkpoint, or a run folder: its
    seed) or [NAME=]ARCH:TAG / [NAME=]ARCH:FILE, outside weights as train's --pretrained
    takes them (`checkpoint.parse_model_spec`; tags from the local cache only). Without
    NAME, outside weights are named ARCH-TAG, or ARCH-STEM for a file."""
    name = None
    if "=" in spec and not Path(spec).exists():
        name, _, spec = spec.partition("=")
    model = parse_model_spec(spec, None, flag="--baseline")
    if isinstance(model, Pretrained):
        return name or f"{model.arch}-{model.tag or model.path.stem}", model
    if name is not None:
        return name, model
    p = model
    # RUN/NAME/checkpoints/final.pt -> NAME; a run folder -> its seed checkpoint
    if p.is_dir():
        p = p / "seed" / "checkpoints" / "final.pt" if (p / "seed").is_dir() else p / "checkpoints" / "final.pt"
    name = p.parent.parent.name if p.parent.name == "checkpoints" else p.stem
    return name, p


def _single_models(cfg: EvalConfig, export: ExportFolder | None = None) -> list[tuple[str, Path | Pretrained]]:
    singles = [_parse_baseline(b) for b in cfg.baselines]
    if not singles and export is not None:
        if export.seed is None:
            raise EvalError(f"export {cfg.run} has no seed model: pass --baseline CKPT for the single model")
        singles = [("seed", export.seed.path)]
    if not singles:
        seed = cfg.run / "seed" / FINAL
        if not seed.is_file():
            raise EvalError(f"seed checkpoint {seed} not found: pass --baseline CKPT for the single model")
        if not finished_train_job(seed.parent.parent):  # judged by its job, as the experts are
            raise EvalError(
                f"{cfg.run / 'seed'} holds no finished train job ({unfinished_reason(seed.parent.parent)}): "
                "rerun its train command to finish it, or pass --baseline CKPT for the single model"
            )
        singles = [("seed", seed)]
    names = [s[0] for s in singles]
    clash = [x for x in names if names.count(x) > 1 or x.startswith("expert_") or x in ENSEMBLES]
    if clash:
        raise EvalError(f"single-model name {clash[0]!r} is used twice or clashes with a method: use NAME=CKPT")
    for name, ckpt in singles:
        if not Path(ckpt).is_file():
            raise EvalError(f"{name}: checkpoint {ckpt} not found")
    return singles


def _plan(cfg: EvalConfig) -> _Plan:
    # an export folder holds its models and, unless --clusters says otherwise, its clusters
    export = ExportFolder(cfg.run) if is_export(cfg.run) else None
    clusters = cfg.clusters if cfg.clusters is not None else export.root if export is not None else None
    if clusters is None:
        raise ConfigError("--clusters is required (the `mode-fast cluster` folder), unless --run is an export folder")
    folder = ClusterFolder(clusters)
    n = folder.centers().n_experts
    _, embedder_source = folder.resolve_embedder(cfg.embedder or None)  # a factory in the folder needs the flag
    if export is not None:
        if len(export.expert_names) != n:
            raise EvalError(f"{clusters} has {n} experts but export {cfg.run} has {len(export.expert_names)}")
        experts = [(name, export.models[name].path) for name in export.expert_names]
    else:
        experts = [(f"expert_{k}", p) for k, p in enumerate(find_experts(cfg.run, n))]
    singles = _single_models(cfg, export)
    for _, path in experts + singles:  # a crafted or foreign checkpoint is refused before --out is touched
        if export is None or export.model_at(path) is None:  # an export's files: checked (sha256) as they load
            check_model_checkpoint(path)
    # Tasks are parsed (and their class lists checked) before any model loads: fail fast.
    tasks: list[Task] = [load_task(s, cfg.classes, cfg.templates, cfg.label_field) for s in cfg.data]
    tasks += [load_retrieval_task(s, cfg.caption_key) for s in cfg.retrieval]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise EvalError(f"two tasks are named alike in {names}: name them with NAME=SPEC")
    return _Plan(folder, embedder_source, experts, singles, tasks, export)


# --------------------------------------------------------------------------- units and run.json
def _key(name: str) -> str:
    """A task or model name as one path component and unit-name part (results.path_key)."""
    return path_key(name)


def _score_unit(task: str, model: str) -> str:
    return f"score:{_key(task)}:{_key(model)}"


def _weights_unit(task: str) -> str:
    return f"weights:{_key(task)}"


def _score_path(out: Path, task: str, model: str) -> Path:
    return out / SCORES / _key(task) / f"model-{_key(model)}.npz"


def _weights_path(out: Path, task: str) -> Path:
    return out / SCORES / _key(task) / "weights.npz"


def _run_inputs(cfg: EvalConfig, plan: _Plan) -> dict[str, Any]:
    """What the scores depend on, fingerprinted for run.json: each checkpoint, each task
    (its files, class names, templates, reader options), the centers and embedder spec."""
    inputs = {f"model {name}": fingerprint(path) for name, path in plan.models}
    inputs |= {f"task {t.name}": task_fingerprint(t) for t in plan.tasks}
    inputs["centers"] = fingerprint(plan.folder.centers_path)
    spec = plan.folder.root / EMBEDDER
    if plan.embedder_source == str(spec):  # the stored spec is used (no --embedder, or its factory named)
        inputs["embedder spec"] = fingerprint(spec)
    return inputs


# What a change of each result-changing argument invalidates among the stored units, by
# field ("*": every unit). []: the task and model inputs run.json fingerprints already carry
# its effect on the stored scores, or it changes only how they are combined, so only the
# results are recombined. test_evaluate holds the keys to EvalConfig's result-changing
# fields; an argument missing here would stop a rerun rather than reuse scores it changed.
_UNITS_BY_FIELD: dict[str, list[str]] = {
    "data": [],
    "retrieval": [],
    "baselines": [],
    "classes": [],
    "templates": [],
    "label_field": [],
    "caption_key": [],
    "ensemble_inputs": [],
    "embedder": ["weights:*"],
    "batch_size": ["score:*"],  # batch shapes change the float sums
    "device": ["*"],
}
# the same, keyed by the run.json field (the flag)
RECOMPUTE_ARGS = {flag_of(EvalConfig, name): units for name, units in _UNITS_BY_FIELD.items()}


def _recompute(field: str) -> list[str] | None:
    """The units a changed run.json field invalidates; None (the code version, an argument
    without a rule) stops."""
    if field.startswith("input model "):
        return [f"score:*:{_key(field[len('input model ') :])}"]
    if field.startswith("input task "):
        task = _key(field[len("input task ") :])
        return [f"score:{task}:*", f"weights:{task}"]
    if field in ("input centers", "input embedder spec"):
        return ["weights:*"]
    return RECOMPUTE_ARGS.get(field)


# --------------------------------------------------------------------------- the job
def run_evaluation(cfg: EvalConfig) -> dict[str, Any]:
    """Score every task and combine; returns the results dict (also written under cfg.out,
    with run.json: a rerun continues or is a no-op, see the module docstring)."""
    plan = _plan(cfg)
    with (
        RunState.open(
            cfg.out,
            "eval",
            inputs=_run_inputs(cfg, plan),
            args=manifest_args(cfg),
            recompute=_recompute,
            overwrite=cfg.overwrite,
            owned=EVAL_OUTPUTS,
            log=log.warning,
        ) as state,
        state.interrupts(),
    ):
        if state.finished:
            log.warning("eval: %s already holds this evaluation (same inputs and arguments): nothing to do", cfg.out)
            return _read_results(cfg.out / RESULTS)
        try:
            if not state.resumed and (cfg.out / RESULTS).exists():
                raise ConfigError(
                    f"{cfg.out} holds an eval run without {MANIFEST} (an older mode-fast): "
                    "rerun with --overwrite to start over, or use another --out"
                )
            return _evaluate(cfg, plan, state)
        except ModeFastError:
            state.abandon()  # failed before any unit was stored: nothing to continue
            raise


def _read_results(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read ({e}): rerun with --overwrite to start over") from e


def _read_unit(path: Path, *keys: str) -> list[np.ndarray]:
    """Arrays of a stored unit (written atomically by this job, so damage is someone else's)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return [z[k] for k in keys]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ConfigError(
            f"{path} cannot be read ({e}): rerun with --overwrite to start over, or use another --out"
        ) from e


def _evaluate(cfg: EvalConfig, plan: _Plan, state: RunState) -> dict[str, Any]:
    """Store each (task, model) score and each task's weights not yet done, then combine."""
    _clear_stale(cfg.out, state)
    models = _model_loader(plan, cfg.device)
    ensembler = _ensembler_loader(plan, cfg)
    if not all(state.is_done(_weights_unit(t.name)) for t in plan.tasks):
        ensembler()  # first: an encoder that cannot be rebuilt fails before any scoring
    for i, task in enumerate(plan.tasks):
        state.where = f"scoring {task.name} (task {i + 1}/{len(plan.tasks)})"
        _score_task(cfg, plan, task, state, models)
        _weigh_task(cfg, plan, task, state, ensembler)
    state.where = "writing the results"
    results = _assemble(cfg, plan)
    records = write_outputs(results, cfg.out)
    state.finish([*(cfg.out / name for name in OUTPUTS if (cfg.out / name).exists()), *records])
    return results


def _clear_stale(out: Path, state: RunState) -> None:
    """The results files go until this run rewrites them (results.json then always matches
    run.json), and so do stored scores run.json does not vouch for (a kill between a unit's
    write and its record; units of tasks no longer asked for): the folder ends as an
    unbroken run leaves it."""
    for name in OUTPUTS:
        (out / name).unlink(missing_ok=True)
    if (out / CB_DIR).is_dir() and not (out / CB_DIR).is_symlink():
        for path in (out / CB_DIR).iterdir():  # only the records this job writes: its own names
            if path.suffix == ".json" and (path.is_file() or path.is_symlink()):
                path.unlink()
    vouched = {f for files in state.units.values() for f in files}
    found = sorted((out / SCORES).rglob("*"), reverse=True) if (out / SCORES).is_dir() else []
    for path in found:  # deepest first, so emptied folders go too
        if (path.is_file() or path.is_symlink()) and state.rel(path) not in vouched:
            path.unlink()  # a symlink goes as the link: what it leads to is not ours
        elif path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()


def _model_loader(plan: _Plan, device: str) -> Callable[[list[str]], list[LoadedModel]]:
    """Models by name, each loaded once and only when a unit needs it."""
    paths, loaded = dict(plan.models), {}

    def get(names: list[str]) -> list[LoadedModel]:
        for name in names:
            if name in loaded:
                continue
            exported = plan.export.model_at(paths[name]) if plan.export is not None else None
            if exported is not None:  # an export's safetensors file, by the export's reader
                loaded[name] = replace(plan.export.load_model(exported.name, device), name=name)
            else:
                loaded[name] = load_models([(name, paths[name])], device)[0]
        return [loaded[name] for name in names]

    return get


def _ensembler_loader(plan: _Plan, cfg: EvalConfig) -> Callable[[], Ensembler]:
    """The clustering text encoder with the centers, built when weights are first needed."""
    box: list[Ensembler] = []

    def get() -> Ensembler:
        if not box:
            box.append(Ensembler(plan.folder.centers(), embedder_for(plan.folder, cfg.embedder, cfg.device)))
        return box[0]

    return get


def _score_task(
    cfg: EvalConfig, plan: _Plan, task: Task, state: RunState, models: Callable[[list[str]], list[LoadedModel]]
) -> None:
    """One pass over the task's images for the models whose scores are not stored yet; each
    model's scores, the labels or captions, the read report and its logit scale in one file."""
    todo = [name for name, _ in plan.models if not state.is_done(_score_unit(task.name, name))]
    if not todo:
        return
    log.info("%s %s: scoring %s", task.kind, task.name, ", ".join(todo))
    loaded = models(todo)
    scores, targets = task_scores(task, loaded, cfg.device, cfg.batch_size, cfg.max_bad_share)
    reads = np.asarray(json.dumps(task.reads.skips_dict()))
    extra = {}
    if task.kind == "classification":
        stored = np.asarray(targets, dtype=np.int64)
    else:  # the captions in score-column order, and each one's image (several per image: CLIP_benchmark)
        captions, extra["caption_image"] = flatten_captions(targets)
        stored = np.asarray(captions, dtype=str)
    for m, s in zip(loaded, scores):
        path = _score_path(cfg.out, task.name, m.name)
        save_npz(path, scores=s, targets=stored, reads=reads, logit_scale=np.float64(logit_scale(m)), **extra)
        state.mark_done(_score_unit(task.name, m.name), [path])


def _weigh_task(cfg: EvalConfig, plan: _Plan, task: Task, state: RunState, ensembler: Callable[[], Ensembler]) -> None:
    """MoDE's expert weights for the task: from its class names through its templates, or
    from its captions (stored with the scores), with the texts per expert."""
    unit = _weights_unit(task.name)
    if state.is_done(unit):
        return
    ens = ensembler()
    if task.kind == "classification":
        weights, groups = ens.weights(task.classes, task.templates)
    else:
        captions = _read_unit(_score_path(cfg.out, task.name, plan.experts[0][0]), "targets")[0].tolist()
        weights, groups = ens.weights(captions)
    name = getattr(ens.embedder, "name", str(cfg.embedder))
    path = _weights_path(cfg.out, task.name)
    save_npz(path, weights=weights, groups=groups, embedder=np.asarray(name))
    state.mark_done(unit, [path])


def _assemble(cfg: EvalConfig, plan: _Plan) -> dict[str, Any]:
    """results.json from the stored units alone, so a resumed run ends as an unbroken one
    (one task's scores in memory at a time)."""
    experts = [name for name, _ in plan.experts]
    first = plan.tasks[0].name
    scales = {name: float(_read_unit(_score_path(cfg.out, first, name), "logit_scale")[0]) for name, _ in plan.models}
    results: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "run": str(cfg.run),
        "clusters": str(plan.folder.centers_path),
        "n_experts": len(experts),
        "embedder": str(_read_unit(_weights_path(cfg.out, first), "embedder")[0]),
        "experts": {name: str(path) for name, path in plan.experts},
        "single_models": [name for name, _ in plan.singles],
        "single_model_checkpoints": {name: str(path) for name, path in plan.singles},
        "device": cfg.device,
        "ensemble_inputs": cfg.ensemble_inputs,
        "logit_scales": scales,
        "tasks": {},
        "retrieval": {},
    }
    for task in plan.tasks:
        scores = {name: _read_unit(_score_path(cfg.out, task.name, name), "scores")[0] for name, _ in plan.models}
        targets, reads = _read_unit(_score_path(cfg.out, task.name, experts[0]), "targets", "reads")
        weights, groups = _read_unit(_weights_path(cfg.out, task.name), "weights", "groups")
        pair = (weights, groups)
        if task.kind == "classification":
            summary = classification_summary(task, scores, targets, experts, pair, scales, cfg.ensemble_inputs)
        else:
            (caption_image,) = _read_unit(_score_path(cfg.out, task.name, experts[0]), "caption_image")
            summary = retrieval_summary(task, scores, experts, pair, scales, cfg.ensemble_inputs, caption_image)
        section = "tasks" if task.kind == "classification" else "retrieval"
        results[section][task.name] = summary | json.loads(str(reads))
    _averages(results)
    return results


def _averages(results: dict[str, Any]) -> None:
    methods = method_order(results, results["n_experts"])
    if results["tasks"]:
        results["average"] = {
            metric: {m: float(np.mean([t[metric][m] for t in results["tasks"].values()])) for m in methods}
            for metric in ("top1", "top5", "mean_per_class_recall")
        }
    if results["retrieval"]:
        results["retrieval_average"] = {
            m: float(np.mean([t["recall"][m]["mean_recall"] for t in results["retrieval"].values()])) for m in methods
        }


# --------------------------------------------------------------------------- 0.1's entry
def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """0.1's name of `run_evaluation`, kept for one release (DeprecationWarning)."""
    warnings.warn(
        "mode_fast.evaluate.evaluate moved to mode_fast.evaluation.run.run_evaluation; "
        "the old name is removed in the next release",
        DeprecationWarning,
        stacklevel=2,
    )
    return run_evaluation(cfg)
