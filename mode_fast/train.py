"""`mode-fast train`: MoDE data experts on open_clip models, with this project's loss.

MoDE's schedule (../shared/reference/mode.md): a seed model trains on all the data for the
first part of a cosine schedule (`--stage seed --epochs 27 --schedule-epochs 32`); each
expert then resumes the seed's final checkpoint (model, optimizer, schedule position) and
trains the rest of the schedule on its own cluster plus a share of the others
(`--expert k --clusters DIR`). Experts are independent jobs.

Output of one job, under OUT/seed or OUT/expert_K:
  checkpoints/latest.pt   full training state, written atomically every --save-every steps
  checkpoints/final.pt    the same at the end of the job (what experts and eval load)
  metrics.jsonl           one JSON object per logged step (step, epoch, loss, lr, ...)
  config.json, data.json  the arguments, and the data index (counts, skipped samples)

`--resume` continues a killed job from latest.pt with the same model, optimizer, schedule,
data position and RNG state: the result is bit-identical to an uninterrupted run (the data
order is a pure function of (seed, epoch), see mode_fast.data.loader).

Several processes: `torchrun --nproc-per-node 2 -m mode_fast train ...` (gloo on CPU,
nccl on GPU); --batch-size is per process, as in open_clip.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mode_fast.data import loader as data_loader

log = logging.getLogger("mode_fast.train")

CHECKPOINT_FORMAT = "mode_fast.train/1"
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
LOGIT_SCALE_MAX = math.log(100.0)  # CLIP clamps the learned temperature at 100

_registered = False


def register_model_configs() -> None:
    """Make this project's configs (mode-fast-tiny, ...) known to open_clip by name."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def loss_classes() -> tuple[type, type, str]:
    """(ClipLoss, SigLipLoss, where from): this project's loss, else open_clip's."""
    try:
        from mode_fast.loss import ClipLoss, SigLipLoss

        return ClipLoss, SigLipLoss, "mode_fast.loss"
    except ModuleNotFoundError as e:
        if e.name != "mode_fast.loss":
            raise  # mode_fast.loss exists but something it needs is missing: say so
        from open_clip.loss import ClipLoss, SigLipLoss

        return ClipLoss, SigLipLoss, "open_clip.loss (mode_fast.loss not available)"


# --------------------------------------------------------------------------- arguments
def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data", nargs="+", required=True, metavar="SHARDS",
                   help="webdataset .tar shards: files, folders, globs or {000..009} patterns")
    g.add_argument("--image-key", default=data_loader.DEFAULT_IMAGE_KEY,
                   help="image member extensions, ';'-separated, first present wins (default: %(default)s)")
    g.add_argument("--caption-key", default=data_loader.DEFAULT_CAPTION_KEY,
                   help="caption member extension, or json:FIELD for a field of the .json member "
                        "(default: %(default)s)")
    g.add_argument("--keep-keys", type=Path, metavar="FILE",
                   help="train only on these keys, one per line (curate's DIR/kept_keys.txt)")
    g.add_argument("--clusters", type=Path, metavar="DIR",
                   help="`mode-fast cluster` output with the per-pair expert assignments (experts only)")
    g.add_argument("--expert-share", type=float, default=0.02,
                   help="share of other clusters' pairs an expert also trains on (default: %(default)s)")
    g.add_argument("--shuffle-window", type=int, default=5000,
                   help="samples move at most this far in the local shuffle (default: %(default)s)")
    g.add_argument("--workers", type=int, default=2, help="loader worker processes per rank")

    g = parser.add_argument_group("MoDE stage")
    g.add_argument("--stage", choices=("seed", "expert"), default=None,
                   help="seed: train on all the data; expert: see --expert (default: seed)")
    g.add_argument("--expert", type=int, default=None, metavar="K",
                   help="train expert K from the seed checkpoint on cluster K's data")
    g.add_argument("--seed-checkpoint", type=Path,
                   help="the seed model to fork experts from (default: OUT/seed/checkpoints/final.pt)")

    g = parser.add_argument_group("model and optimisation")
    g.add_argument("--model", default="mode-fast-tiny",
                   help="open_clip architecture name, or one of this project's: "
                        + ", ".join(sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))))
    g.add_argument("--siglip", action="store_true", help="sigmoid loss (SigLIP) instead of InfoNCE")
    g.add_argument("--patch-dropout", type=float, default=None,
                   help="drop this share of image patches in training (FLIP; open_clip's force_patch_dropout)")
    g.add_argument("--batch-size", type=int, default=64, help="per process (default: %(default)s)")
    g.add_argument("--epochs", type=int, default=1,
                   help="epochs the seed trains (default: %(default)s); an expert trains the rest of "
                        "the seed's schedule")
    g.add_argument("--steps", type=int, help="steps this job trains (overrides --epochs; for an expert, "
                                             "at most what is left of the seed's schedule)")
    g.add_argument("--schedule-epochs", type=int,
                   help="length of the cosine schedule in epochs, >= --epochs; the seed stops at "
                        "--epochs and experts train the rest (MoDE: 27 of 32). Default: --epochs")
    g.add_argument("--schedule-steps", type=int, help="length of the cosine schedule in steps")
    g.add_argument("--lr", type=float, default=5e-4)
    g.add_argument("--wd", type=float, default=0.2, help="weight decay (not on gains, biases, scale)")
    g.add_argument("--beta1", type=float, default=0.9)
    g.add_argument("--beta2", type=float, default=0.98)
    g.add_argument("--eps", type=float, default=1e-6)
    g.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (default: %(default)s)")
    g.add_argument("--grad-clip-norm", type=float, default=1.0, help="0 disables (default: %(default)s)")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast on GPU, fp32 on CPU")

    g = parser.add_argument_group("run")
    g.add_argument("--out", type=Path, required=True, help="run folder; this job writes OUT/seed or OUT/expert_K")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint interval in steps")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue from CKPT, or from this job's latest.pt when none is given "
                        "(a fresh start when there is none yet)")
    g.add_argument("--log-every", type=int, default=1, help="metrics.jsonl interval in steps")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    # Test hook: end the job after this step as a kill would (no checkpoint unless one is due).
    g.add_argument("--stop-at-step", type=int, default=None, help=argparse.SUPPRESS)


# --------------------------------------------------------------------------- helpers
def list_shards(patterns: Sequence[str]) -> list[Path]:
    """Shard paths from files, folders (their *.tar), globs and {a..b} brace patterns."""
    try:
        from mode_fast.data.io import list_shards as io_list_shards

        return [Path(p) for p in io_list_shards(patterns)]
    except ModuleNotFoundError as e:
        if e.name != "mode_fast.data.io":
            raise
    from braceexpand import braceexpand

    out: list[Path] = []
    for pattern in patterns:
        for item in braceexpand(str(pattern)):
            p = Path(item)
            if p.is_dir():
                found = sorted(p.glob("*.tar"))
            elif any(c in item for c in "*?["):
                found = sorted(Path(x) for x in glob.glob(item))
            else:
                found = [p]
            if not found:
                raise FileNotFoundError(f"no shards match {item!r}")
            out.extend(found)
    return out


def atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> None:
    """Write through a temporary file in the same folder, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, lambda f: f.write((json.dumps(obj, indent=2, default=str) + "\n").encode()))


def cosine_lr(step: int, base_lr: float, warmup: int, total: int) -> float:
    """open_clip's schedule: linear warm-up to base_lr, then cosine to 0 at `total`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span)) * base_lr


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on gains, biases and the logit scale, as open_clip's trainer does."""
    no_decay, decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if skip else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # as a tensor: torch.load(weights_only=True) refuses numpy arrays
        "numpy": [torch.from_numpy(np.random.get_state()[1].astype(np.int64))] + list(np.random.get_state()[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a mode-fast train checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any, Any]:
    """(model in eval mode, open_clip's eval transform, tokenizer) from a train checkpoint."""
    import open_clip

    register_model_configs()
    ckpt = load_checkpoint(Path(checkpoint))
    model, _, preprocess_val = open_clip.create_model_and_transforms(
        ckpt["model_name"], pretrained=None, device="cpu", **ckpt.get("model_kwargs", {})
    )
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), preprocess_val, open_clip.get_tokenizer(ckpt["model_name"])


# --------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_distributed(device: torch.device) -> Dist:
    """torchrun's environment -> process group (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {spec}: CUDA is not available on this machine")
    return device


# --------------------------------------------------------------------------- the job
# Arguments that change the trained weights: a resumed job must have the same ones.
_RESULT_ARGS = (
    "data", "image_key", "caption_key", "keep_keys", "clusters", "expert_share", "shuffle_window",
    "stage", "expert", "model", "siglip", "patch_dropout", "epochs", "steps", "schedule_epochs", "schedule_steps",
    "lr", "wd", "beta1", "beta2", "eps", "warmup", "grad_clip_norm", "precision", "seed",
)


def _job_config(args: argparse.Namespace, world_size: int) -> dict[str, Any]:
    cfg = {k: getattr(args, k) for k in _RESULT_ARGS}
    cfg["global_batch"] = args.batch_size * world_size
    return json.loads(json.dumps(cfg, default=str))  # Paths -> str, tuples -> lists


def _check_args(args: argparse.Namespace) -> None:
    if args.expert is not None:
        if args.stage == "seed":
            raise ValueError("--expert K trains an expert: drop --stage seed (or use --stage expert)")
        args.stage = "expert"
        if args.expert < 0:
            raise ValueError(f"--expert must be >= 0, got {args.expert}")
    elif args.stage == "expert":
        raise ValueError("--stage expert needs --expert K")
    args.stage = args.stage or "seed"
    if args.stage == "expert" and args.clusters is None:
        raise ValueError("--expert K needs --clusters DIR (the `mode-fast cluster` output)")
    for name in ("batch_size", "epochs", "save_every", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.workers < 0:
        raise ValueError("--workers must be >= 0")


def _job_dir(args: argparse.Namespace) -> Path:
    return args.out / ("seed" if args.stage == "seed" else f"expert_{args.expert}")


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metrics of steps after the checkpoint: the resumed job logs them again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= last_step]
    atomic_write_bytes(path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))


def _batches(train_loader: data_loader.TrainLoader, job_step: int, job_steps: int) -> Iterator[tuple[int, Any]]:
    """(job step, batch) from `job_step` on, epoch after epoch (epochs never wrap)."""
    spe = train_loader.steps_per_epoch
    while job_step < job_steps:
        epoch, start = divmod(job_step, spe)
        for batch in train_loader.epoch(epoch, start):
            yield job_step, batch
            job_step += 1
            if job_step >= job_steps:
                return


def train(args: argparse.Namespace) -> Path:
    """Run one job (seed or one expert); returns the path of its final checkpoint."""
    import open_clip
    from tqdm import tqdm

    _check_args(args)
    register_model_configs()
    device = pick_device(args.device)
    ddp = init_distributed(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    if use_bf16 and device.type != "cuda":
        raise ValueError("--precision bf16 is for GPUs; on the CPU training runs in fp32")
    job_dir = _job_dir(args)
    ckpt_dir = job_dir / "checkpoints"
    config = _job_config(args, ddp.world_size)

    # ---- where this job starts from
    resume_path: Path | None = None
    if args.resume is not None:
        resume_path = ckpt_dir / "latest.pt" if args.resume == "auto" else Path(args.resume)
        if args.resume == "auto" and not resume_path.is_file():
            log.info("--resume: no checkpoint in %s yet, starting fresh", ckpt_dir)
            resume_path = None
    seed_ckpt: dict[str, Any] | None = None
    if args.stage == "expert" and resume_path is None:
        seed_path = args.seed_checkpoint or args.out / "seed" / "checkpoints" / "final.pt"
        if not seed_path.is_file():
            raise FileNotFoundError(
                f"seed checkpoint {seed_path} not found: train the seed first "
                f"(`mode-fast train --stage seed --out {args.out} ...`) or pass --seed-checkpoint"
            )
        seed_ckpt = load_checkpoint(seed_path)
        if seed_ckpt["model_name"] != args.model:
            raise ValueError(f"seed checkpoint {seed_path} is a {seed_ckpt['model_name']}, not --model {args.model}")

    # ---- model, transforms, tokenizer (same init on every rank; DDP also broadcasts)
    model_kwargs: dict[str, Any] = {}
    if args.siglip:  # open_clip's SigLIP init
        model_kwargs = {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0}
    torch.manual_seed(args.seed)
    model, preprocess_train, _ = open_clip.create_model_and_transforms(
        args.model, pretrained=None, device=device, output_dict=True,
        force_patch_dropout=args.patch_dropout, **model_kwargs,
    )
    tokenizer = open_clip.get_tokenizer(args.model)
    # the trainer's own random stream (dropout), per job and per rank
    torch.manual_seed(data_loader.sample_seed(args.seed, -1 if args.expert is None else args.expert, ddp.rank))

    # ---- data
    spec = data_loader.SampleSpec(image_key=args.image_key, caption_key=args.caption_key)
    keep_keys = data_loader.read_key_list(args.keep_keys) if args.keep_keys else None
    expert_filter: data_loader.ExpertFilter | None = None
    if args.stage == "expert":
        assigned = data_loader.load_expert_assignments(args.clusters)
        if assigned.n_experts is not None and args.expert >= assigned.n_experts:
            raise ValueError(f"--expert {args.expert}: {args.clusters} has {assigned.n_experts} experts "
                             f"(0..{assigned.n_experts - 1})")
        if args.expert not in set(assigned.expert_of_key.values()):
            raise ValueError(f"expert {args.expert} has no pairs in {args.clusters}/assignments")
        expert_filter = data_loader.ExpertFilter(
            assigned.expert_of_key, args.expert, args.expert_share, args.seed
        )

    def keep(key: str) -> bool:
        if keep_keys is not None and key not in keep_keys:
            return False
        return expert_filter is None or expert_filter(key)

    try:
        index = data_loader.build_index(
            list_shards(args.data), spec, keep if (keep_keys is not None or expert_filter is not None) else None
        )
    except ValueError as e:
        if "no usable samples" not in str(e):
            raise
        hints = []
        if keep_keys:
            hints.append(f"{args.keep_keys} holds keys like {min(keep_keys)!r}")
        if expert_filter is not None and expert_filter.first_unassigned is not None:
            hints.append(f"{expert_filter.unassigned} shard keys (e.g. {expert_filter.first_unassigned!r}) have "
                         f"no assignment in {args.clusters}, whose keys look like "
                         f"{next(iter(expert_filter.assignments), None)!r}")
        raise ValueError(f"{e}. {'; '.join(hints)}" if hints else str(e)) from e
    stream = data_loader.ShardStream(
        index, spec, preprocess_train, tokenizer, args.batch_size * ddp.world_size,
        rank=ddp.rank, world_size=ddp.world_size, shuffle_window=args.shuffle_window,
        # each expert sees its data in its own order
        seed=args.seed if args.expert is None else args.seed + 7919 * (args.expert + 1),
    )
    train_loader = data_loader.TrainLoader(stream, num_workers=args.workers, pin_memory=device.type == "cuda")
    spe = train_loader.steps_per_epoch

    # ---- schedule: job steps, and the cosine schedule they sit in (a resumed job: its checkpoint's)
    if resume_path is not None:
        schedule_start = schedule_total = job_steps = 0  # set from the checkpoint below
    elif seed_ckpt is not None:
        schedule_start = int(seed_ckpt["schedule_step"])
        schedule_total = int(seed_ckpt["schedule_total"])
        remaining = schedule_total - schedule_start
        job_steps = args.steps if args.steps is not None else remaining
        if remaining <= 0 or job_steps > remaining:
            raise ValueError(
                f"the seed checkpoint is at step {schedule_start} of its {schedule_total}-step schedule: "
                f"{remaining} steps are left for an expert, {job_steps} asked. Train the seed with "
                "--schedule-epochs (or --schedule-steps) larger than --epochs to leave steps for experts"
            )
    else:
        schedule_start = 0
        job_steps = args.steps if args.steps is not None else args.epochs * spe
        if args.schedule_steps is not None:
            schedule_total = args.schedule_steps
        elif args.schedule_epochs is not None:
            schedule_total = args.schedule_epochs * spe
        else:
            schedule_total = job_steps
        if schedule_total < job_steps:
            raise ValueError(f"the schedule ({schedule_total} steps) is shorter than the job ({job_steps} steps)")
    if job_steps < 1 and resume_path is None:
        raise ValueError("nothing to train: the job has 0 steps")

    # ---- optimizer, loss
    optimizer = torch.optim.AdamW(
        param_groups(model, args.wd), lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps
    )
    ClipLoss, SigLipLoss, loss_source = loss_classes()
    if args.siglip:
        loss_fn = SigLipLoss(rank=ddp.rank, world_size=ddp.world_size)
    else:
        # gather_with_grad: every rank's loss is the global batch's, and DDP's gradient
        # average then equals the one-process gradient.
        loss_fn = ClipLoss(gather_with_grad=True, cache_labels=True, rank=ddp.rank, world_size=ddp.world_size)

    job_step = 0
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path)
        diff = {k: (ckpt["config"].get(k), v) for k, v in config.items() if ckpt["config"].get(k) != v}
        if diff:
            raise ValueError(f"--resume {resume_path}: arguments differ from the checkpoint's "
                             f"(checkpoint, now): {diff}")
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        job_step = int(ckpt["job_step"])
        schedule_start = int(ckpt["schedule_step"]) - job_step
        schedule_total, job_steps = int(ckpt["schedule_total"]), int(ckpt["job_steps"])
        if len(ckpt["rng"]) == ddp.world_size:
            set_rng_state(ckpt["rng"][ddp.rank])
        else:  # another world size: same data, but dropout draws cannot be the same anyway
            log.warning("resuming %d processes from a checkpoint of %d: random state reseeded",
                        ddp.world_size, len(ckpt["rng"]))
        log.info("resumed %s at step %d of %d", resume_path, job_step, job_steps)
    elif seed_ckpt is not None:
        model.load_state_dict(seed_ckpt["state_dict"])
        optimizer.load_state_dict(seed_ckpt["optimizer"])  # MoDE: experts continue the seed's run
    if job_step >= job_steps:
        log.info("%s already finished (%d steps)", job_dir, job_steps)
        return ckpt_dir / "final.pt"

    train_model: torch.nn.Module = model
    if ddp.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    # ---- bookkeeping
    metrics_path = job_dir / "metrics.jsonl"
    if ddp.is_main:
        job_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(job_dir / "config.json", {**config, "world_size": ddp.world_size, "loss": loss_source})
        atomic_write_json(job_dir / "data.json", {
            "shards": [str(p) for p in index.shards], "samples_per_shard": index.counts.tolist(),
            "samples": index.total, **index.report.skips_dict(), "steps_per_epoch": spe,  # read, skipped
            "unassigned_keys": expert_filter.unassigned if expert_filter else 0,
        })
        if resume_path is not None:
            _truncate_metrics(metrics_path, job_step)
        log.info("%s: %d samples, %d steps/epoch of %d, job steps %d..%d, schedule %d..%d of %d, loss %s",
                 job_dir, index.total, spe, stream.global_batch, job_step, job_steps,
                 schedule_start, schedule_start + job_steps, schedule_total, loss_source)

    def save(path: Path, step: int) -> None:
        # every rank's RNG state: with dropout each rank draws its own numbers
        rngs = [rng_state()]
        if ddp.world_size > 1:
            rngs = [None] * ddp.world_size
            dist.all_gather_object(rngs, rng_state())
        if not ddp.is_main:
            return
        state = {
            "format": CHECKPOINT_FORMAT, "model_name": args.model, "model_kwargs": model_kwargs,
            "stage": args.stage, "expert": args.expert, "config": config,
            "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
            "job_step": step, "job_steps": job_steps,
            "schedule_step": schedule_start + step, "schedule_total": schedule_total,
            "rng": rngs,
        }
        atomic_write_bytes(path, lambda f: torch.save(state, f))

    def autocast() -> contextlib.AbstractContextManager[Any]:
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    global_batch = stream.global_batch
    progress = tqdm(total=job_steps, initial=job_step, disable=args.no_progress or not ddp.is_main,
                    desc=job_dir.name, unit="step", dynamic_ncols=True)
    metrics_file = open(metrics_path, "a", encoding="utf-8") if ddp.is_main else None
    train_model.train()
    t_last = time.perf_counter()
    try:
        for step, batch in _batches(train_loader, job_step, job_steps):
            data_time = time.perf_counter() - t_last
            lr = cosine_lr(schedule_start + step, args.lr, args.warmup, schedule_total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = batch["images"].to(device, non_blocking=True)
            texts = batch["texts"].to(device, non_blocking=True)
            with autocast():
                out = train_model(images, texts)
                loss = loss_fn(**out)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm)
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
            done = step + 1

            if ddp.is_main:
                now = time.perf_counter()
                samples_per_s = global_batch / max(now - t_last, 1e-9)
                t_last = now
                loss_value = float(loss.detach())
                progress.update(1)
                progress.set_postfix(loss=f"{loss_value:.4f}", samples_s=f"{samples_per_s:.0f}", refresh=False)
                if done % args.log_every == 0 or done == job_steps:
                    assert metrics_file is not None
                    metrics_file.write(json.dumps({
                        "step": done, "schedule_step": schedule_start + done, "epoch": step // spe,
                        "loss": loss_value, "lr": lr, "logit_scale": float(model.logit_scale.detach().exp()),
                        "samples_per_s": samples_per_s, "data_time": data_time, "samples_seen": done * global_batch,
                        "time": time.time(),
                    }) + "\n")
                    metrics_file.flush()
            if done % args.save_every == 0 and done < job_steps:
                save(ckpt_dir / "latest.pt", done)
                ddp.barrier()
            if args.stop_at_step is not None and done >= args.stop_at_step and done < job_steps:
                log.warning("stopping at step %d (--stop-at-step)", done)
                return ckpt_dir / "latest.pt"
        save(ckpt_dir / "latest.pt", job_steps)
        save(ckpt_dir / "final.pt", job_steps)
        ddp.barrier()
    finally:
        progress.close()
        if metrics_file is not None:
            metrics_file.close()
    return ckpt_dir / "final.pt"


def run(args: argparse.Namespace) -> int:
    # our INFO lines, not open_clip's (it logs model parsing details on the root logger)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("mode_fast").setLevel(logging.INFO)
    try:
        final = train(args)
    except (FileNotFoundError, ValueError) as e:  # user errors: one line, no traceback
        print(f"mode-fast train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(final)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mode-fast train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
