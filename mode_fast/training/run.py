"""The train job's library side: `TrainConfig` and `run_training`, MoDE data experts on
open_clip models with this project's loss (`mode-fast train` is `mode_fast.jobs.train`).

MoDE's schedule (Ma et al., "MoDE: CLIP Data Experts via Clustering", CVPR 2024,
arXiv:2404.16030): a seed model trains on all the data for the first part of a cosine
schedule (`--stage seed --epochs 27 --schedule-epochs 32`); each expert then resumes the
seed's final checkpoint (model, optimizer, schedule position) and trains the rest of the
schedule on its own cluster plus a share of the others (`--expert k --clusters DIR`).
Experts are independent jobs. The seed may start from an open_clip model's weights
(--pretrained SPEC) instead of a random init; an expert forked from outside weights
(--seed-checkpoint SPEC: no optimizer or schedule in them) trains --steps/--epochs on a fresh
optimizer and schedule, warm-up included (docs/experts.md, "Starting from a public CLIP").

Output of one job, under OUT/seed or OUT/expert_K:
  checkpoints/latest.pt   full training state, written atomically every --save-every steps,
                          every --checkpoint-minutes and on an interrupt
  checkpoints/final.pt    the same at the end of the job (what experts and eval load)
  metrics.jsonl           one JSON object per logged step (step, epoch, loss, lr, ...)
  config.json, data.json  the arguments, and the data index (counts, skipped samples; the
                          images skipped as bad, rewritten at each checkpoint)
  run.json, .lock         the run manifest and the job folder's lock (mode_fast.core.runs)

Reruns follow the one lifecycle rule (mode_fast.core.runs; README "Reruns, kills and
interrupts"): OUT/JOB/run.json records the inputs and result-changing arguments, and the
job folder is locked while it runs. Rerunning the same command continues a killed or
interrupted job from latest.pt with the same model, optimizer, schedule, data position and
RNG state: the result is bit-identical to an uninterrupted run (the data order is a pure
function of (seed, epoch), see mode_fast.data.loader). A finished job rerun is a no-op; a
changed argument or input stops naming it. Ctrl-C/SIGTERM save a checkpoint at the end of
the current step; checkpoints are also written every --checkpoint-minutes.

Bad images (undecodable, or over the pixel limit; mode_fast.data.images) are skipped and
their batch slots filled by the loader (mode_fast.data.loader), so batches stay full and
resume stays exact. The distinct bad samples of the job are gathered from every rank at
each step, kept in the checkpoint (a resumed job continues the count), logged (the first
few one by one, then summed up at checkpoints) and listed in data.json; the job stops with
one line once they pass --max-bad-share of the usable samples. That flag changes whether a
run stops, not its weights: a rerun with another value continues the job.

Several processes: `torchrun --nproc-per-node 2 -m mode_fast train ...` (gloo on CPU,
nccl on GPU); --batch-size is per process, as in open_clip.

Every flag is declared once, on its `TrainConfig` field (mode_fast.core.config): the parser,
the range checks and the result-changing arguments that run.json, config.json and the
checkpoints record come from the fields. The pieces: `mode_fast.training.models`,
`mode_fast.training.checkpoint`, `mode_fast.training.loop`, the loader in
`mode_fast.data.loader`, the cluster folder in `mode_fast.clustering.folder`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mode_fast.clustering.folder import ClusterFolder, load_expert_assignments
from mode_fast.core import files
from mode_fast.core.config import (
    ADDED,
    added_defaults,
    check_ranges,
    config_from_args,
    manifest_args,
    option,
    result_values,
)
from mode_fast.core.errors import ConfigError, InputError, Interrupted, ModeFastError
from mode_fast.core.runs import RunState, fingerprint, interrupts_as_error, interrupts_deferred
from mode_fast.data import loader as data_loader
from mode_fast.data.images import DEFAULT_MAX_BAD_SHARE, BadImages
from mode_fast.data.io import read_key_list
from mode_fast.training.checkpoint import (
    RESUME_FIELDS,
    SEED_FIELDS,
    Pretrained,
    is_train_checkpoint_file,
    load_checkpoint,
    load_pretrained,
    load_state,
    parse_model_spec,
    read_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mode_fast.training.loop import (
    Dist,
    MetricsLog,
    batches,
    cosine_lr,
    init_distributed,
    make_loss,
    param_groups,
    pick_device,
    resolve_sample_spec,
    train_step,
)
from mode_fast.training.models import create_model, is_known_model, project_model_names, register_model_configs

log = logging.getLogger("mode_fast.training.run")

DEFAULT_CAPTION_KEY = "caption"  # curate's and cluster's default: .json field or member, else .txt

_DATA, _STAGE, _MODEL, _OPT, _RUN = "data", "MoDE stage", "model", "optimisation", "run"  # --help sections


# --------------------------------------------------------------------------- config
@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One train job's settings, checked once (here) and never changed after.

    Declaration order is the order of the result-changing arguments in run.json, config.json
    and the checkpoints (written before the fields were declared here, so kept): --precision
    sits in the "model" section of --help but is declared after the optimisation fields, and
    --deterministic and --grad-cache-chunk (added later, `ADDED`) are recorded last, when
    set. `result=False`: paths of outputs, progress, and what stops a run without changing
    its weights (--max-bad-share, the checkpoint cadence). --batch-size is per process: the manifest records `global_batch`.
    """

    # data
    data: tuple[str, ...] = option(
        help="webdataset .tar shards: files, folders, globs or {000..009} patterns",
        result=True, group=_DATA, nargs="+", metavar="SHARDS",
    )  # fmt: skip
    image_key: str = option(
        data_loader.DEFAULT_IMAGE_KEY,
        help="image member extensions, ';'-separated, first present wins (default: %(default)s)",
        result=True, group=_DATA,
    )  # fmt: skip
    caption_key: str = option(
        DEFAULT_CAPTION_KEY,
        help="the caption, as in curate and cluster: a member extension of that name, else a field "
        "of the .json member; the default also falls back to .txt (default: %(default)s)",
        result=True, group=_DATA,
    )  # fmt: skip
    keep_keys: Path | None = option(
        None, help="train only on these keys, one per line (curate's DIR/kept_keys.txt)",
        result=True, group=_DATA, metavar="FILE",
    )  # fmt: skip
    clusters: Path | None = option(
        None, help="`mode-fast cluster` output with the per-pair expert assignments (experts only)",
        result=True, group=_DATA, metavar="DIR",
    )  # fmt: skip
    expert_share: float = option(
        0.02, help="share of other clusters' pairs an expert also trains on (default: %(default)s)",
        result=True, group=_DATA, high=1.0,
    )  # fmt: skip
    shuffle_window: int = option(
        5000, help="samples move at most this far in the local shuffle (default: %(default)s)",
        result=True, group=_DATA, low=0,
    )  # fmt: skip
    workers: int = option(2, help="loader worker processes per rank", result=False, group=_DATA, low=0)
    max_bad_share: float = option(
        DEFAULT_MAX_BAD_SHARE,
        help="stop when more than this share of the usable samples have images that cannot be decoded "
        "or are over the pixel limit (they are skipped and their batch slots filled; default: %(default)s)",
        result=False, group=_DATA, high=1.0, metavar="SHARE",
    )  # fmt: skip
    # MoDE stage
    stage: str = option(
        "seed", help="seed: train on all the data; expert: see --expert (default: seed)",
        result=True, group=_STAGE, choices=("seed", "expert"),
        cli_default=None,  # resolved from --expert (TrainConfig.from_args)
    )  # fmt: skip
    expert: int | None = option(
        None, help="train expert K from the seed checkpoint on cluster K's data",
        result=True, group=_STAGE, low=0, metavar="K",
    )  # fmt: skip
    seed_checkpoint: Path | None = option(
        None,
        help="the model to fork experts from (default: OUT/seed/checkpoints/final.pt): a train checkpoint "
        "(the expert continues its schedule and optimizer), or outside weights, ARCH:TAG, ARCH:FILE or a "
        "FILE of --model's weights (the expert trains --steps/--epochs on a fresh schedule and optimizer)",
        result=False, group=_STAGE, metavar="CKPT|SPEC",  # an input: run.json fingerprints the file
    )  # fmt: skip
    # model (--precision: below)
    model: str = option(
        "mode-fast-tiny",
        help="open_clip architecture name, or one of this project's: " + ", ".join(project_model_names()),
        result=True, group=_MODEL,
    )  # fmt: skip
    siglip: bool = option(False, help="sigmoid loss (SigLIP) instead of InfoNCE", result=True, group=_MODEL)
    deterministic: bool = option(
        False, help="the loss kernels' deterministic mode: no float atomics, the same bits every run",
        result=ADDED, group=_MODEL,
    )  # fmt: skip
    pretrained: str | None = option(
        None,
        help="the seed starts from these weights, not a random init: ARCH:TAG (open_clip's pretrained tag, "
        "from the local cache only), ARCH:FILE, or TAG/FILE of --model (a state_dict, open_clip's training "
        "checkpoint or .safetensors)",
        result=ADDED, group=_MODEL, metavar="SPEC",
    )  # fmt: skip
    cache_dir: Path | None = option(
        None,
        help="where pretrained tags are looked up (default: huggingface_hub's cache, then ~/.cache/clip); "
        "nothing is downloaded",
        result=False, group=_MODEL, metavar="DIR",
    )  # fmt: skip
    patch_dropout: float | None = option(
        None, help="drop this share of image patches in training (FLIP; open_clip's force_patch_dropout)",
        result=True, group=_MODEL, high=1.0, high_open=True,
    )  # fmt: skip
    # optimisation
    batch_size: int = option(64, help="per process (default: %(default)s)", result=False, group=_OPT, low=1)
    epochs: int = option(
        1, help="epochs the seed trains (default: %(default)s); an expert trains the rest of the seed's schedule",
        result=True, group=_OPT, low=1,
    )  # fmt: skip
    steps: int | None = option(
        None,
        help="steps this job trains (overrides --epochs; for an expert, at most what is left of the seed's schedule)",
        result=True, group=_OPT, low=1,
    )  # fmt: skip
    schedule_epochs: int | None = option(
        None,
        help="length of the cosine schedule in epochs, >= --epochs; the seed stops at "
        "--epochs and experts train the rest (MoDE: 27 of 32). Default: --epochs",
        result=True, group=_OPT, low=1,
    )  # fmt: skip
    schedule_steps: int | None = option(
        None, help="length of the cosine schedule in steps", result=True, group=_OPT, low=1
    )
    lr: float = option(5e-4, help="", result=True, group=_OPT, low=0)
    wd: float = option(0.2, help="weight decay (not on gains, biases, scale)", result=True, group=_OPT, low=0)
    beta1: float = option(0.9, help="", result=True, group=_OPT, high=1.0)
    beta2: float = option(0.98, help="", result=True, group=_OPT, high=1.0)
    eps: float = option(1e-6, help="", result=True, group=_OPT, low=0)
    warmup: int = option(100, help="linear warm-up steps (default: %(default)s)", result=True, group=_OPT, low=0)
    grad_clip_norm: float = option(1.0, help="0 disables (default: %(default)s)", result=True, group=_OPT, low=0)
    grad_cache_chunk: int | None = option(
        None,
        help="gradient caching (GradCache): encode the per-process batch N samples at a time, "
        "twice (features without a graph, then each chunk again with its graph), so only one "
        "chunk's activations are held; the same gradients up to float rounding, one optimizer "
        "step per batch. N need not divide --batch-size (the last chunk is smaller); N >= "
        "--batch-size: off",
        result=ADDED, group=_OPT, low=1, metavar="N",
    )  # fmt: skip
    precision: str = option(
        "auto", help="auto: bf16 autocast on GPU, fp32 on CPU", result=True, group=_MODEL,
        choices=("auto", "fp32", "bf16"),
    )  # fmt: skip
    # run
    out: Path = option(help="run folder; this job writes OUT/seed or OUT/expert_K", result=False, group=_RUN)
    seed: int = option(0, help="", result=True, group=_RUN)
    device: str = option("auto", help="auto, cpu, cuda, cuda:1 ...", result=False, group=_RUN)
    save_every: int = option(500, help="checkpoint interval in steps", result=False, group=_RUN, low=1)
    checkpoint_minutes: float = option(
        5.0,
        help="also checkpoint when this much wall time passed since the last one, so a kill "
        "loses little; 0: only --save-every (default: %(default)s)",
        result=False, group=_RUN, low=0, metavar="MIN",
    )  # fmt: skip
    resume: str | None = option(
        None,
        help="continue from CKPT (an explicit path). Without CKPT it changes nothing: "
        "rerunning the same command always continues the job's own latest.pt",
        result=False, group=_RUN, nargs="?", const="auto", metavar="CKPT",
    )  # fmt: skip
    overwrite: bool = option(
        False, help="forget this job's earlier run in its folder (checkpoints, metrics) and start over",
        result=False, group=_RUN,
    )  # fmt: skip
    log_every: int = option(1, help="metrics.jsonl interval in steps", result=False, group=_RUN, low=1)
    no_progress: bool = option(False, help="no progress bar", result=False, group=_RUN)
    # Test hook: end the job after this step as a kill would (no checkpoint unless one is due).
    stop_at_step: int | None = option(None, help=argparse.SUPPRESS, result=False, group=_RUN, low=1)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        """The config of parsed arguments (`mode_fast.core.config.add_arguments(parser, TrainConfig)`),
        --stage resolved from --stage and --expert."""
        return config_from_args(cls, args, stage=_resolve_stage(args.stage, args.expert))

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.expert is not None and self.stage == "seed":
            raise ConfigError("--expert K trains an expert: drop --stage seed (or use --stage expert)")
        if self.stage == "expert" and self.expert is None:
            raise ConfigError("--stage expert needs --expert K")
        if self.stage == "expert" and self.clusters is None:
            raise ConfigError("--expert K needs --clusters DIR (the `mode-fast cluster` output)")
        if not self.data:
            raise ConfigError("--data: give the training shards")
        if self.pretrained is not None and self.stage == "expert":
            raise ConfigError(
                "--pretrained is for the seed: an expert forks from --seed-checkpoint (which takes the same SPEC)"
            )
        if self.caption_key.startswith("json:"):
            raise ConfigError(
                f"--caption-key {self.caption_key}: the caption key is a member extension or a .json field "
                f"name, as in curate and cluster (--caption-key {self.caption_key[5:] or 'caption'})"
            )

    @property
    def job_dir(self) -> Path:
        return self.out / ("seed" if self.stage == "seed" else f"expert_{self.expert}")

    def result_config(self, world_size: int) -> dict[str, Any]:
        """The settings that change the trained weights, by field name (JSON values): a resumed
        job must have the same. The global batch is derived: --batch-size is per process."""
        return {**result_values(self), "global_batch": self.batch_size * world_size}


def _resolve_stage(stage: str | None, expert: int | None) -> str:
    """--stage as given, else an expert when --expert is given, else the seed (whether the
    three flags agree is TrainConfig's check, from the CLI or Python alike)."""
    return stage or ("seed" if expert is None else "expert")


# --------------------------------------------------------------------------- setup steps
@dataclass
class _Start:
    """Where the job starts from: its own latest checkpoint (resume), the seed (an expert), or scratch."""

    resume_path: Path | None = None
    seed_ckpt: dict[str, Any] | None = None
    pretrained: Pretrained | None = None  # outside weights to start from (a seed's --pretrained, or an expert's)
    pretrained_state: dict[str, torch.Tensor] | None = None


def _resume_path(cfg: TrainConfig) -> Path | None:
    """The checkpoint the job continues from: --resume CKPT, else its own latest.pt."""
    if cfg.resume is not None and cfg.resume != "auto":
        return Path(cfg.resume)
    latest = cfg.job_dir / "checkpoints" / "latest.pt"
    return latest if latest.is_file() else None


def _required_seed(cfg: TrainConfig) -> Path | Pretrained:
    """The seed checkpoint (or outside weights) an expert starts from; InputError when it is not there."""
    seed_path = _seed_source(cfg)
    if isinstance(seed_path, Pretrained) and not seed_path.path.is_file():
        raise InputError(f"--seed-checkpoint {cfg.seed_checkpoint}: file {seed_path.path} not found")
    if isinstance(seed_path, Path) and not seed_path.is_file():
        raise InputError(
            f"seed checkpoint {seed_path} not found: train the seed first "
            f"(`mode-fast train --stage seed --out {cfg.out} ...`) or pass --seed-checkpoint"
        )
    return seed_path


def _check_inputs(cfg: TrainConfig) -> None:
    """The cheap checks of the arguments against the files they name, made before any output
    folder, lock or file exists, so that a refused job leaves nothing behind (the shard list
    is checked by `_run_inputs`, also before): the architecture name, the key list, the
    checkpoint to resume, and for an expert the expert number against the cluster folder
    and the seed's existence.
    What needs reading whole (checkpoints, assignments) is checked after; a failure there
    still leaves nothing behind (`RunState.abandon`)."""
    if not is_known_model(cfg.model):
        raise ConfigError(
            f"--model {cfg.model}: not an architecture open_clip knows (mode-fast's own: "
            f"{', '.join(project_model_names())}; the rest: open_clip.list_models())"
        )
    if cfg.keep_keys is not None and not cfg.keep_keys.is_file():
        raise InputError(f"--keep-keys {cfg.keep_keys}: file not found (curate writes OUT/kept_keys.txt)")
    if cfg.resume not in (None, "auto") and not Path(cfg.resume).is_file():
        raise InputError(f"--resume {cfg.resume}: checkpoint not found")
    if cfg.stage != "expert":
        if cfg.pretrained is not None and _resume_path(cfg) is None:
            _pretrained(cfg)  # a tag not in the cache, a missing file: before any output
        return
    assert cfg.clusters is not None and cfg.expert is not None  # checked by TrainConfig
    folder = ClusterFolder(cfg.clusters)
    if folder.has_centers() and cfg.expert >= folder.n_experts:
        n = folder.n_experts
        raise ConfigError(f"--expert {cfg.expert}: {cfg.clusters} has {n} experts (0..{n - 1})")
    if _resume_path(cfg) is None:
        _required_seed(cfg)


def _starting_point(cfg: TrainConfig) -> _Start:
    """run.json (checked by `_open_run`) vouches that latest.pt, when there, is this job's:
    continuing is the default, and its own config is checked again in `_restore`."""
    resume_path = _resume_path(cfg)
    if resume_path is not None:
        return _Start(resume_path)
    if cfg.stage != "expert":
        weights = _pretrained(cfg)
        return _Start() if weights is None else _Start(pretrained=weights, pretrained_state=read_weights(weights.path))
    seed_path = _required_seed(cfg)
    if isinstance(seed_path, Pretrained):
        return _Start(pretrained=seed_path, pretrained_state=read_weights(seed_path.path))
    seed_ckpt = load_checkpoint(seed_path, SEED_FIELDS)
    if seed_ckpt["model_name"] != cfg.model:
        raise ConfigError(f"seed checkpoint {seed_path} is a {seed_ckpt['model_name']}, not --model {cfg.model}")
    return _Start(None, seed_ckpt)


JOB_OUTPUTS = ("checkpoints", "metrics.jsonl", "config.json", "data.json")


def _seed_path(cfg: TrainConfig) -> Path:
    return cfg.seed_checkpoint or cfg.out / "seed" / "checkpoints" / "final.pt"


def _seed_source(cfg: TrainConfig) -> Path | Pretrained:
    """What an expert forks from: a train checkpoint (a Path), or outside weights: an
    ARCH:TAG or ARCH:FILE --seed-checkpoint, or a FILE that is not a train checkpoint
    (--model's weights; told apart by reading it as data, its tensors mapped)."""
    if cfg.seed_checkpoint is None:
        return _seed_path(cfg)
    source = parse_model_spec(cfg.seed_checkpoint, None, cfg.cache_dir, "--seed-checkpoint")
    if isinstance(source, Pretrained):
        if source.arch != cfg.model:
            raise ConfigError(
                f"--seed-checkpoint {cfg.seed_checkpoint}: the weights are a {source.arch}, not --model {cfg.model}"
            )
        return source
    if source.is_file() and not is_train_checkpoint_file(source):
        return Pretrained(cfg.model, source)
    return source


def _pretrained(cfg: TrainConfig) -> Pretrained | None:
    """The seed's --pretrained weights, resolved (a tag: its file in the local cache)."""
    if cfg.pretrained is None:
        return None
    weights = parse_model_spec(cfg.pretrained, cfg.model, cfg.cache_dir)
    assert isinstance(weights, Pretrained)  # with a model given, a spec is always outside weights
    if not weights.path.is_file():
        raise InputError(f"--pretrained {cfg.pretrained}: file {weights.path} not found")
    return weights


def _run_inputs(cfg: TrainConfig) -> dict[str, Any]:
    """What the job reads, fingerprinted for run.json: shards, key list, assignments, seed."""
    from mode_fast.data.io import list_shards

    try:
        shards = list_shards(cfg.data)
    except InputError as e:
        raise InputError(f"--data: {e}") from e
    inputs = {f"shard {p}": fingerprint(p) for p in shards}
    if cfg.keep_keys is not None and cfg.keep_keys.is_file():
        inputs["keep-keys"] = fingerprint(cfg.keep_keys)
    weights = _pretrained(cfg) if cfg.stage == "seed" else None
    if weights is not None:  # the file, under the spec as given (its "path" names the tag and the file)
        inputs["pretrained"] = fingerprint(weights)
    if cfg.stage == "expert":
        assert cfg.clusters is not None
        for p in sorted((cfg.clusters / "assignments").glob("*")) if (cfg.clusters / "assignments").is_dir() else []:
            inputs[f"assignments {p.name}"] = fingerprint(p)
        source = _seed_source(cfg)
        if Path(source).is_file():
            inputs["seed checkpoint"] = fingerprint(source)
    return inputs


def _open_run(cfg: TrainConfig, ddp: Dist) -> tuple[RunState | None, bool]:
    """(run state on rank 0, else None; whether the job already finished). Rank 0 locks the
    job folder and reconciles run.json; the other ranks follow its verdict, an error included,
    so no rank waits in a collective for one that stopped."""
    state, verdict = None, None
    if ddp.is_main:
        try:
            _check_inputs(cfg)
            state = RunState.open(
                cfg.job_dir,
                "train",
                inputs=_run_inputs(cfg),
                args=manifest_args(cfg, cfg.result_config(ddp.world_size)),
                overwrite=cfg.overwrite,
                owned=JOB_OUTPUTS,
                log=log.warning,
                defaults=added_defaults(TrainConfig),
            )
            if not state.resumed and (cfg.job_dir / "checkpoints").is_dir() and cfg.resume is None:
                state.abandon()  # its run.json would vouch for the older run's checkpoints
                state.close()
                raise ConfigError(
                    f"{cfg.job_dir} holds a train run without run.json (an older mode-fast): "
                    "rerun with --resume to continue it, --overwrite to start over, or use another --out"
                )
        except ModeFastError as e:
            verdict = e
    if ddp.world_size > 1:
        box = [None if verdict is None else (type(verdict), str(verdict)), bool(state and state.finished)]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and verdict is None:
            verdict = box[0][0](box[0][1])
        finished = bool(box[1])
    else:
        finished = bool(state and state.finished)
    if verdict is not None:
        raise verdict
    return state, finished


@dataclass
class _Data:
    index: data_loader.DataIndex
    spec: data_loader.SampleSpec
    unassigned: int  # keys of the shards that have no expert assignment (experts only)


def _training_data(cfg: TrainConfig) -> _Data:
    """The usable samples (shards, keys, filters), before any model is built: a missing or
    empty --data or a wrong key is reported at once."""
    from mode_fast.data.io import list_shards

    try:
        shards = list_shards(cfg.data)
    except InputError as e:
        raise InputError(f"--data: {e}") from e
    spec = resolve_sample_spec(shards[0], cfg.image_key, cfg.caption_key)
    keep_keys = read_key_list(cfg.keep_keys, "--keep-keys") if cfg.keep_keys else None
    expert_filter = _expert_filter(cfg) if cfg.stage == "expert" else None
    kept = {"seen": 0, "kept": 0}

    def keep(key: str) -> bool:
        kept["seen"] += 1
        ok = (keep_keys is None or key in keep_keys) and (expert_filter is None or expert_filter(key))
        kept["kept"] += ok
        return ok

    filtered = keep_keys is not None or expert_filter is not None
    try:
        index = data_loader.build_index(shards, spec, keep if filtered else None)
    except InputError:
        raise
    except (ValueError, OSError) as e:  # the loader's own errors: unreadable or unusable shards
        hints = []
        if filtered and kept["seen"] and not kept["kept"]:  # the filters left nothing
            if keep_keys:
                hints.append(f"{cfg.keep_keys} holds keys like {min(keep_keys)!r}")
            if expert_filter is not None and expert_filter.first_unassigned is not None:
                hints.append(
                    f"{expert_filter.unassigned} shard keys (e.g. {expert_filter.first_unassigned!r}) "
                    f"have no assignment in {cfg.clusters}, whose keys look like "
                    f"{next(iter(expert_filter.assignments), None)!r}"
                )
        raise InputError(f"{e}. {'; '.join(hints)}" if hints else str(e)) from e
    return _Data(index, spec, expert_filter.unassigned if expert_filter else 0)


def _expert_filter(cfg: TrainConfig) -> data_loader.ExpertFilter:
    assert cfg.clusters is not None and cfg.expert is not None  # checked by TrainConfig
    assigned = load_expert_assignments(cfg.clusters)  # the expert number: _check_inputs
    if cfg.expert not in set(assigned.expert_of_key.values()):
        raise InputError(f"expert {cfg.expert} has no pairs in {cfg.clusters}/assignments")
    return data_loader.ExpertFilter(assigned.expert_of_key, cfg.expert, cfg.expert_share, cfg.seed)


@dataclass
class _Schedule:
    start: int  # schedule step of this job's step 0
    total: int  # length of the cosine schedule
    job_steps: int  # steps this job trains


def _schedule(cfg: TrainConfig, start: _Start, steps_per_epoch: int) -> _Schedule:
    """Job steps and the cosine schedule they sit in (a resumed job: its checkpoint's, set later)."""
    if start.resume_path is not None:
        return _Schedule(0, 0, 0)
    if start.seed_ckpt is not None:
        begin, total = int(start.seed_ckpt["schedule_step"]), int(start.seed_ckpt["schedule_total"])
        remaining = total - begin
        job_steps = cfg.steps if cfg.steps is not None else remaining
        if remaining <= 0 or job_steps > remaining:
            raise ConfigError(
                f"the seed checkpoint is at step {begin} of its {total}-step schedule: "
                f"{remaining} steps are left for an expert, {job_steps} asked. Train the seed with "
                "--schedule-epochs (or --schedule-steps) larger than --epochs to leave steps for experts"
            )
        return _Schedule(begin, total, job_steps)
    job_steps = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    if cfg.schedule_steps is not None:
        total = cfg.schedule_steps
    elif cfg.schedule_epochs is not None:
        total = cfg.schedule_epochs * steps_per_epoch
    else:
        total = job_steps
    if total < job_steps:
        raise ConfigError(f"the schedule ({total} steps) is shorter than the job ({job_steps} steps)")
    if job_steps < 1:
        raise ConfigError("nothing to train: the job has 0 steps")
    return _Schedule(0, total, job_steps)


@dataclass
class _Run:
    """What the loop works on (built by `run_training`)."""

    cfg: TrainConfig
    ddp: Dist
    device: torch.device
    bf16: bool
    model: torch.nn.Module
    model_kwargs: dict[str, Any]
    train_model: torch.nn.Module  # the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    loss_fn: torch.nn.Module
    schedule: _Schedule
    config: dict[str, Any]
    state: RunState | None = None  # rank 0: the run manifest
    bad: BadImages = dataclasses.field(default_factory=BadImages)  # the job's distinct bad samples
    usable: int = 0  # usable samples in the index: what --max-bad-share is a share of
    data_info: dict[str, Any] = dataclasses.field(default_factory=dict)  # data.json but the bad images
    logged_bad: int = 0  # bad samples the log has told of (the first few one by one, then in sums)

    @property
    def ckpt_dir(self) -> Path:
        return self.cfg.job_dir / "checkpoints"


def _restore(run: _Run, start: _Start) -> int:
    """Load the starting state into the model and optimizer; returns the job step reached."""
    if start.resume_path is not None:
        ckpt = load_checkpoint(start.resume_path, RESUME_FIELDS)
        diff = {k: (ckpt["config"].get(k), v) for k, v in run.config.items() if ckpt["config"].get(k) != v}
        if diff:
            raise ConfigError(
                f"--resume {start.resume_path}: arguments differ from the checkpoint's (checkpoint, now): {diff}"
            )
        load_state(run.model, ckpt, "state_dict", start.resume_path)
        load_state(run.optimizer, ckpt, "optimizer", start.resume_path)
        job_step = int(ckpt["job_step"])
        run.schedule = _Schedule(
            int(ckpt["schedule_step"]) - job_step, int(ckpt["schedule_total"]), int(ckpt["job_steps"])
        )
        if len(ckpt["rng"]) == run.ddp.world_size:
            set_rng_state(ckpt["rng"][run.ddp.rank], start.resume_path)
        else:  # another world size: same data, but dropout draws cannot be the same anyway
            log.warning(
                "resuming %d processes from a checkpoint of %d: random state reseeded",
                run.ddp.world_size,
                len(ckpt["rng"]),
            )
        run.bad.add(ckpt.get("skipped_images", []))  # checked by load_checkpoint; absent in older checkpoints
        run.logged_bad = len(run.bad)  # the earlier run logged them
        log.info("resumed %s at step %d of %d", start.resume_path, job_step, run.schedule.job_steps)
        return job_step
    if start.pretrained is not None:
        assert start.pretrained_state is not None
        load_pretrained(run.model, start.pretrained_state, start.pretrained)  # a fresh optimizer and schedule
        return 0
    if start.seed_ckpt is not None:
        seed = _seed_path(run.cfg)
        load_state(run.model, start.seed_ckpt, "state_dict", seed)
        load_state(run.optimizer, start.seed_ckpt, "optimizer", seed)  # MoDE: experts continue the seed's run
    return 0


def _save(run: _Run, path: Path, step: int) -> None:
    # every rank's RNG state: with dropout each rank draws its own numbers
    rngs: list[Any] = [rng_state()]
    if run.ddp.world_size > 1:
        rngs = [None] * run.ddp.world_size
        dist.all_gather_object(rngs, rng_state())
    if not run.ddp.is_main:
        return
    s = run.schedule
    save_checkpoint(path, {
        "model_name": run.cfg.model, "model_kwargs": run.model_kwargs,
        "stage": run.cfg.stage, "expert": run.cfg.expert, "config": run.config,
        "state_dict": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "job_step": step, "job_steps": s.job_steps,
        "schedule_step": s.start + step, "schedule_total": s.total,
        "rng": rngs, "skipped_images": [list(r) for r in run.bad.sorted()],
    })  # fmt: skip


def _write_job_files(run: _Run, data: _Data, steps_per_epoch: int, loss_source: str) -> None:
    job_dir = run.cfg.job_dir
    job_dir.mkdir(parents=True, exist_ok=True)
    index = data.index
    files.write_text(
        job_dir / "config.json",
        json.dumps({**run.config, "world_size": run.ddp.world_size, "loss": loss_source}, indent=2, default=str) + "\n",
    )
    run.data_info = {
        "shards": [str(p) for p in index.shards], "samples_per_shard": index.counts.tolist(),
        "samples": index.total, **index.report.skips_dict(), "steps_per_epoch": steps_per_epoch,  # read, skipped
        "caption": data.spec.caption_key, "unassigned_keys": data.unassigned,
    }  # fmt: skip
    _write_data_json(run)


def _write_data_json(run: _Run) -> None:
    """data.json (rank 0): the index, and the images skipped as bad so far by reason and
    shard, with their keys; rewritten at each checkpoint and at the end."""
    if not run.ddp.is_main:
        return
    bad = {**run.bad.report().skips_dict(), "samples": [list(r) for r in run.bad.sorted()],
           "max_bad_share": run.cfg.max_bad_share}  # fmt: skip
    files.write_text(
        run.cfg.job_dir / "data.json",
        json.dumps({**run.data_info, "skipped_images": bad}, indent=2, default=str) + "\n",
    )


# --------------------------------------------------------------------------- the job
def run_training(cfg: TrainConfig) -> Path:
    """Run one job (seed or one expert); returns the path of its final checkpoint (latest.pt
    when --stop-at-step ended it). The caller owns the process group `init_distributed`
    joins (the CLI destroys it after the job)."""
    register_model_configs()
    device = pick_device(cfg.device)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if bf16 and device.type != "cuda":
        raise ConfigError("--precision bf16 is for GPUs; on the CPU training runs in fp32")
    ddp = init_distributed(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    final = cfg.job_dir / "checkpoints" / "final.pt"
    state, finished = _open_run(cfg, ddp)
    with state or contextlib.nullcontext():
        if finished:
            if ddp.is_main:
                log.warning(
                    "train: %s already finished with these inputs and arguments: nothing to do "
                    "(--overwrite to train again)",
                    cfg.job_dir,
                )
            return final
        where = ["setup"]
        try:
            with interrupts_as_error(lambda: where[0]):
                return _train(cfg, device, bf16, ddp, state, where)
        except ModeFastError:
            if state is not None:
                state.abandon()  # bad data or arguments found before any step: nothing to continue
            raise


def _train(
    cfg: TrainConfig, device: torch.device, bf16: bool, ddp: Dist, state: RunState | None, where: list[str]
) -> Path:
    start = _starting_point(cfg)
    data = _training_data(cfg)  # before the model: bad data fails before any weights exist

    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts)
    built = create_model(cfg.model, device, siglip=cfg.siglip, patch_dropout=cfg.patch_dropout)
    # the trainer's own random stream (dropout), per job and per rank
    torch.manual_seed(data_loader.sample_seed(cfg.seed, -1 if cfg.expert is None else cfg.expert, ddp.rank))
    stream = data_loader.ShardStream(
        data.index,
        data.spec,
        built.preprocess_train,
        built.tokenizer,
        cfg.batch_size * ddp.world_size,
        rank=ddp.rank,
        world_size=ddp.world_size,
        shuffle_window=cfg.shuffle_window,
        # each expert sees its data in its own order
        seed=cfg.seed if cfg.expert is None else cfg.seed + 7919 * (cfg.expert + 1),
    )
    train_loader = data_loader.TrainLoader(stream, num_workers=cfg.workers, pin_memory=device.type == "cuda")
    optimizer = torch.optim.AdamW(
        param_groups(built.model, cfg.wd), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
    )
    loss_fn, loss_source = make_loss(cfg.siglip, ddp.rank, ddp.world_size, deterministic=cfg.deterministic)
    run = _Run(
        cfg,
        ddp,
        device,
        bf16,
        built.model,
        built.kwargs,
        built.model,
        optimizer,
        loss_fn,
        _schedule(cfg, start, train_loader.steps_per_epoch),
        cfg.result_config(ddp.world_size),
        state,
        usable=data.index.total,
    )
    job_step = _restore(run, start)
    if ddp.world_size > 1:
        run.train_model = torch.nn.parallel.DistributedDataParallel(
            built.model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if ddp.is_main:
        _write_job_files(run, data, train_loader.steps_per_epoch, loss_source)
        s = run.schedule
        log.info(
            "%s: %d samples, %d steps/epoch of %d, job steps %d..%d, schedule %d..%d of %d, loss %s",
            cfg.job_dir,
            data.index.total,
            train_loader.steps_per_epoch,
            stream.global_batch,
            job_step,
            s.job_steps,
            s.start,
            s.start + s.job_steps,
            s.total,
            loss_source,
        )
    where[0] = f"step {job_step}/{run.schedule.job_steps}"
    return _loop(run, train_loader, job_step, where)


def _loop(run: _Run, train_loader: data_loader.TrainLoader, job_step: int, where: list[str]) -> Path:
    """Steps job_step.. of the job, logging, checkpointing; returns the checkpoint it ends on.
    Interrupts are deferred to the end of a step (a signal mid-step would leave the weights
    half-updated), then the step is checkpointed and `Interrupted` raised."""
    from tqdm import tqdm

    cfg, s, spe = run.cfg, run.schedule, train_loader.steps_per_epoch
    global_batch = train_loader.stream.global_batch
    progress = tqdm(
        total=s.job_steps,
        initial=job_step,
        disable=cfg.no_progress or not run.ddp.is_main,
        desc=cfg.job_dir.name,
        unit="step",
        dynamic_ncols=True,
    )
    # always cut back to the checkpoint: metrics.jsonl never holds a step twice
    metrics = MetricsLog(cfg.job_dir / "metrics.jsonl", job_step) if run.ddp.is_main else None
    run.train_model.train()
    t_last = time.perf_counter()
    t_saved = time.monotonic()
    try:
        _check_bad(run)  # a rerun of a job stopped for bad images, with the same limit
        with interrupts_deferred() as stop:
            for step, batch in batches(train_loader, job_step, s.job_steps):
                data_time = time.perf_counter() - t_last
                lr = cosine_lr(s.start + step, cfg.lr, cfg.warmup, s.total)
                loss = train_step(
                    run.model,
                    run.train_model,
                    run.loss_fn,
                    run.optimizer,
                    batch,
                    run.device,
                    lr,
                    cfg.grad_clip_norm,
                    run.bf16,
                    cfg.grad_cache_chunk,
                )
                done = step + 1
                where[0] = f"step {done}/{s.job_steps}"
                if metrics is not None:
                    now = time.perf_counter()
                    samples_per_s = global_batch / max(now - t_last, 1e-9)
                    t_last = now
                    loss_value = float(loss)
                    progress.update(1)
                    progress.set_postfix(loss=f"{loss_value:.4f}", samples_s=f"{samples_per_s:.0f}", refresh=False)
                    if done % cfg.log_every == 0 or done == s.job_steps:
                        metrics.write({
                            "step": done, "schedule_step": s.start + done, "epoch": step // spe,
                            "loss": loss_value, "lr": lr,
                            "logit_scale": float(run.model.logit_scale.detach().exp()),
                            "samples_per_s": samples_per_s, "data_time": data_time,
                            "samples_seen": done * global_batch, "time": time.time(),
                        })  # fmt: skip
                due = cfg.checkpoint_minutes > 0 and time.monotonic() - t_saved >= 60 * cfg.checkpoint_minutes
                interrupted, due, skipped = _agree(run.ddp, bool(stop), due, bool(batch["skips"]))
                too_many = skipped and _count_bad(run, batch["skips"])
                if done >= s.job_steps and not too_many:
                    break
                if done % cfg.save_every == 0 or due or interrupted or too_many:
                    _save_latest(run, done)
                    t_saved = time.monotonic()
                if too_many:
                    _check_bad(run)
                if interrupted:
                    raise Interrupted(f"interrupted at step {done}/{s.job_steps}; rerun the same command to continue")
                if cfg.stop_at_step is not None and cfg.stop_at_step <= done:
                    log.warning("stopping at step %d (--stop-at-step)", done)
                    return run.ckpt_dir / "latest.pt"
        _finish(run, job_step, metrics)
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()
    return run.ckpt_dir / "final.pt"


def _agree(ddp: Dist, *flags: bool) -> list[bool]:
    """The flags set on any rank (a signal or the clock may reach one rank first): every
    rank must checkpoint and stop at the same step."""
    if ddp.world_size == 1:
        return list(flags)
    t = torch.tensor([float(f) for f in flags])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def _count_bad(run: _Run, skips: Sequence[Sequence[str]]) -> bool:
    """Add this step's bad samples of every rank (all ranks call this when any had some:
    see `_agree`), log the new ones; whether the job is now over --max-bad-share."""
    records = [tuple(r) for r in skips]
    if run.ddp.world_size > 1:
        gathered: list[Any] = [None] * run.ddp.world_size
        dist.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
    new = run.bad.add(records)
    if run.ddp.is_main:
        for shard, key, reason in new:
            if run.logged_bad >= _LOGGED_ONE_BY_ONE:
                break
            log.warning("%s sample %r: skipped (%s); its batch slot is filled with another sample", shard, key, reason)
            run.logged_bad += 1
            if run.logged_bad == _LOGGED_ONE_BY_ONE:
                log.warning("further bad images are summed up at each checkpoint and listed in data.json")
    return run.bad.over(run.usable, run.cfg.max_bad_share)


_LOGGED_ONE_BY_ONE = 10


def _log_bad_total(run: _Run) -> None:
    """One line summing up the bad images not logged one by one (rank 0)."""
    if run.ddp.is_main and len(run.bad) > run.logged_bad:
        log.warning("images skipped as bad so far: %s; %s/data.json lists them", run.bad.summary(), run.cfg.job_dir)
        run.logged_bad = len(run.bad)


def _check_bad(run: _Run) -> None:
    run.bad.check(run.usable, run.cfg.max_bad_share, "usable samples", f" ({run.cfg.job_dir}/data.json lists them)")


def _save_latest(run: _Run, step: int) -> None:
    latest = run.ckpt_dir / "latest.pt"
    _save(run, latest, step)
    _write_data_json(run)
    _log_bad_total(run)
    if run.state is not None:
        run.state.mark_done("latest", [latest])
        run.state.flush()
    run.ddp.barrier()


def _finish(run: _Run, job_step: int, metrics: MetricsLog | None) -> None:
    """latest.pt at the end, then final.pt, recorded in run.json; only then is the job done.
    A kill between the two leaves latest.pt at the last step: the rerun writes final.pt from it."""
    s = run.schedule
    if job_step < s.job_steps:
        _save_latest(run, s.job_steps)
    final = run.ckpt_dir / "final.pt"
    _save(run, final, s.job_steps)
    if run.ddp.is_main and len(run.bad):
        log.warning("images skipped as bad in this job: %s (data.json lists them)", run.bad.summary())
    run.ddp.barrier()
    if run.state is not None:
        if metrics is not None:
            metrics.close()
        job = run.cfg.job_dir
        run.state.mark_done("final", [final])
        run.state.finish([final, job / "metrics.jsonl", job / "config.json", job / "data.json"])


def train(cfg: TrainConfig | argparse.Namespace) -> Path:
    """Deprecated (0.1's entry, kept one release): `run_training(cfg)`, or
    `run_training(TrainConfig.from_args(args))` for parsed arguments."""
    warnings.warn(
        "mode_fast train(cfg) is deprecated: use mode_fast.training.run.run_training(cfg)",
        DeprecationWarning,
        stacklevel=2,
    )
    return run_training(TrainConfig.from_args(cfg) if isinstance(cfg, argparse.Namespace) else cfg)
