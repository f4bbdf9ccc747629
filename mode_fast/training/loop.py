"""The pieces of a CLIP training loop that do not depend on the command line.

open_clip's schedule (`cosine_lr`) and weight-decay groups (`param_groups`), the loss
(`make_loss`: this project's, else open_clip's), processes and devices (`Dist`,
`init_distributed`, `pick_device`), the batch sequence of a resumable job (`batches`) and
one optimisation step (`train_step`; `grad_cache_backward` for a batch whose activations do
not fit at once), and metrics.jsonl (`MetricsLog`). The `mode-fast
train` job composes them; checkpoints are in `mode_fast.training.checkpoint`, models in
`mode_fast.training.models`. Library module: never imports a job module.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mode_fast.core import files
from mode_fast.core.errors import ConfigError, InputError

LOGIT_SCALE_MAX = math.log(100.0)  # CLIP clamps the learned temperature at 100


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


def loss_classes() -> tuple[type, type, str]:
    """(ClipLoss, SigLipLoss, where from): this project's loss, else open_clip's."""
    try:
        from mode_fast.training.loss import ClipLoss, SigLipLoss

        return ClipLoss, SigLipLoss, "mode_fast.training.loss"
    except ModuleNotFoundError as e:
        if e.name != "mode_fast.training.loss":
            raise  # mode_fast.training.loss exists but something it needs is missing: say so
        from open_clip.loss import ClipLoss, SigLipLoss

        return ClipLoss, SigLipLoss, "open_clip.loss (mode_fast.training.loss not available)"


def make_loss(
    siglip: bool, rank: int = 0, world_size: int = 1, deterministic: bool = False
) -> tuple[torch.nn.Module, str]:
    """(loss module, where from). InfoNCE with gather_with_grad: every rank's loss is the
    global batch's, and DDP's gradient average then equals the one-process gradient.
    deterministic: the loss kernels' deterministic mode (open_clip's loss, the fallback,
    has no such switch: its plain matmuls are as deterministic as torch makes them)."""
    clip_loss, siglip_loss, source = loss_classes()
    kw = {"deterministic": True} if deterministic and source == "mode_fast.training.loss" else {}
    if siglip:
        return siglip_loss(rank=rank, world_size=world_size, **kw), source
    return clip_loss(gather_with_grad=True, cache_labels=True, rank=rank, world_size=world_size, **kw), source


# --------------------------------------------------------------------------- processes
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
    """--device: auto (this rank's GPU, else the CPU), cpu, cuda, cuda:1 ..."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise ConfigError(f"--device {spec}: not a torch device ({e})") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {spec}: CUDA is not available on this machine")
    return device


# --------------------------------------------------------------------------- the loop
def batches(train_loader: Any, job_step: int, job_steps: int) -> Iterator[tuple[int, Any]]:
    """(job step, batch) from `job_step` on, epoch after epoch (epochs never wrap)."""
    spe = train_loader.steps_per_epoch
    while job_step < job_steps:
        epoch, start = divmod(job_step, spe)
        for batch in train_loader.epoch(epoch, start):
            yield job_step, batch
            job_step += 1
            if job_step >= job_steps:
                return


def train_step(
    model: torch.nn.Module,
    train_model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Any],
    device: torch.device,
    lr: float,
    grad_clip_norm: float,
    bf16: bool,
    grad_cache_chunk: int | None = None,
) -> torch.Tensor:
    """One optimisation step at learning rate `lr`; returns the (detached) loss.
    `train_model` is `model` or its DDP wrapper; the logit scale is clamped as CLIP does.
    grad_cache_chunk: the gradients come from `grad_cache_backward` in chunks of that many
    samples when it is smaller than the batch (None, 0 or >= the batch: one graph)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    images = batch["images"].to(device, non_blocking=True)
    texts = batch["texts"].to(device, non_blocking=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    optimizer.zero_grad(set_to_none=True)
    if grad_cache_chunk and grad_cache_chunk < images.shape[0]:
        loss = grad_cache_backward(model, train_model, loss_fn, images, texts, grad_cache_chunk, bf16)
    else:
        with autocast:
            out = train_model(images, texts)
            loss = loss_fn(**out)
        loss.backward()
    if grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
    return loss.detach()


class _RngState:
    """The torch RNG state (CPU, and `device`'s when it is a GPU) at construction; `restore`
    puts it back. GradCache's RandContext: the second pass over a chunk must draw the same
    dropout and patch-dropout masks as the first."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def grad_cache_backward(
    model: torch.nn.Module,
    train_model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    images: torch.Tensor,
    texts: torch.Tensor,
    chunk: int,
    bf16: bool = False,
) -> torch.Tensor:
    """Gradient caching (Gao et al., "Scaling Deep Contrastive Learning Batch Size under
    Memory Limited Setup", 2021, arXiv:2101.06983): the parameter gradients of `loss_fn` over
    the whole batch, accumulated into `.grad`, holding one chunk's activations at a time.
    Returns the (detached) loss. The caller zeroes the gradients and steps the optimizer.

    1. The features of the batch, `chunk` samples at a time (the last chunk smaller when
       `chunk` does not divide the batch), without a graph; the RNG state before each chunk
       is kept.
    2. The loss on those features as leaves: d(loss)/d(features), and d(loss)/d(logit
       scale, bias). The loss is the distributed one as in `train_step`: its collectives
       run here, so every rank's feature gradients are those of the global batch.
    3. Each chunk again, from its kept RNG state (the same dropout / patch-dropout masks),
       with its graph, back-propagated with its slice of the feature gradients; the logit
       scale and bias outputs of the last chunk carry theirs. Then the RNG state is left
       where pass 1 left it, as if each chunk had run once.

    With DDP (`train_model` wraps `model`), pass 1 runs on `model` (no graph, nothing to
    reduce), every chunk of pass 3 but the last under `no_sync`, and the last chunk's
    backward all-reduces the accumulated gradients once; it reaches every parameter
    (the towers and the logit scale / bias), as DDP without unused-parameter search needs.

    The result equals one graph over the batch up to float summation order: the parameter
    gradients are sums over chunks instead of one sum over the batch (not bit-identical).
    Memory: the activations of one chunk plus 2 x batch x embed_dim features, instead of
    the activations of the whole batch. Cost: each chunk's forward runs twice.
    """
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    device = images.device
    spans = [slice(i, min(i + chunk, images.shape[0])) for i in range(0, images.shape[0], chunk)]
    states, parts = [], []
    with torch.no_grad(), autocast:
        for s in spans:
            states.append(_RngState(device))
            parts.append(model(images[s], texts[s]))
    after = _RngState(device)
    first = parts[0]
    img = torch.cat([p["image_features"] for p in parts]).requires_grad_()
    txt = torch.cat([p["text_features"] for p in parts]).requires_grad_()
    # the scale (and bias) as the model's forward returns them: leaves here, their
    # gradients go back through the last chunk's graph to the parameters
    extras = {k: first[k].detach().requires_grad_() for k in ("logit_scale", "logit_bias") if k in first}
    del parts, first
    with autocast:
        loss = loss_fn(image_features=img, text_features=txt, **extras)
    # allow_unused: open_clip's ClipLoss (the fallback) ignores a logit bias
    grads = torch.autograd.grad(loss, [img, txt, *extras.values()], allow_unused=True)
    d_img, d_txt = grads[0], grads[1]
    d_extras = {k: g for k, g in zip(extras, grads[2:]) if g is not None}
    ddp = train_model is not model
    for k, (s, state) in enumerate(zip(spans, states)):
        last = k == len(spans) - 1
        state.restore()
        sync = contextlib.nullcontext() if last or not ddp else train_model.no_sync()
        with sync:
            with autocast:
                out = train_model(images[s], texts[s])
            outputs, out_grads = [out["image_features"], out["text_features"]], [d_img[s], d_txt[s]]
            if last:
                outputs += [out[k] for k in d_extras]
                out_grads += list(d_extras.values())
            torch.autograd.backward(outputs, out_grads)
    after.restore()
    return loss.detach()


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step, appended and flushed as it comes."""

    def __init__(self, path: Path, resume_at: int | None = None) -> None:
        self.path = path
        if resume_at is not None:
            self.truncate(resume_at)
        self._file = open(path, "a", encoding="utf-8")

    def truncate(self, last_step: int) -> None:
        """Drop metrics of steps after the checkpoint: the resumed job logs them again. A line
        a kill tore (it can only be the last: rows are appended whole and flushed) is dropped."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if _row_step(line) <= last_step]
        files.write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _row_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinity (dropped) for a torn or foreign one."""
    try:
        row = json.loads(line)
        return int(row["step"]) if isinstance(row, dict) else math.inf
    except (ValueError, KeyError, TypeError):
        return math.inf


# --------------------------------------------------------------------------- data
def resolve_sample_spec(first_shard: str | Path, image_key: str, caption_key: str) -> Any:
    """The loader's `SampleSpec` for a caption key with curate's meaning (mode_fast.data.io):
    a member extension of that name, else a field of the .json member, else (for the
    default "caption" only) the .txt member. The loader reads one member per run, so the
    first sample of the first shard decides which; a key found in none of them is an
    InputError naming the key, the members and the .json fields there are."""
    from mode_fast.data import io, loader

    spec = loader.SampleSpec(image_key=image_key, caption_key=caption_key)
    try:
        first = next(io.iter_samples(first_shard), None)
    except io.ShardError:
        return spec  # the loader names an unreadable shard
    if first is None:
        return spec  # the loader names an empty shard
    key, members = first.key, first.exts
    fields: list[str] = []
    if "json" in members:
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            meta = json.loads(first.read("json"))
            fields = sorted(meta) if isinstance(meta, dict) else []
    if io.member_ext(caption_key) in members:
        return spec
    if caption_key in fields:
        return loader.SampleSpec(image_key=image_key, caption_key=f"json:{caption_key}")
    if caption_key == "caption" and "txt" in members:
        return loader.SampleSpec(image_key=image_key, caption_key="txt")
    present = ", ".join("." + e for e in sorted(members)) or "(none)"
    raise InputError(
        f"caption key {caption_key!r} not found in the first sample {key!r} of {first_shard}: its members are "
        f"{present}"
        + (f" and its .json fields {fields}" if "json" in members else "")
        + ": pass --caption-key with one of them"
    )
