"""Training checkpoints: the one format train writes and train, experts and eval read.

A checkpoint is one `torch.save` dict, format "mode_fast.train/1": model_name and
model_kwargs (to rebuild the architecture), state_dict, optimizer, the job and schedule
positions, the job's result-changing config and every rank's RNG state. It is written
atomically through `mode_fast.core.files` (mode from the umask), so a reader sees the old file
or the whole new one. A missing, truncated or foreign file raises `InputError` naming it.

A checkpoint is data, whoever made it (docs: the trust model): it is read with
`torch.load(weights_only=True)` only, and a file that holds other pickled objects is
refused, naming their type. Only the fields train writes are taken, each checked for type
by the one checker here (`load_checkpoint(path, fields)`) that train and eval read
through; `load_model` is the one place a model is rebuilt from a checkpoint, from an
open_clip registry name and the whitelisted model kwargs alone, with no loader that could
unpickle or fetch a file.

Weights from outside mode-fast (an open_clip pretrained tag found in the local cache, a
state_dict, open_clip's training checkpoint, .safetensors) are named by one spec syntax
(`parse_model_spec`: ARCH:TAG or ARCH:FILE), read by the same weights-only reader
(`read_weights`) and loaded only after their keys and shapes are checked against the
architecture (`load_pretrained`).

Library module: never imports a job module.
"""

from __future__ import annotations

import _compat_pickle
import math
import pickle
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mode_fast.core import files
from mode_fast.core.errors import InputError, Interrupted

CHECKPOINT_FORMAT = "mode_fast.train/1"  # a format name, not a module path: checkpoints of 0.1 carry it


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    files.write_with(Path(path), lambda f: torch.save({"format": CHECKPOINT_FORMAT, **state}, f))


# --------------------------------------------------------------------------- fields
def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _plain(v: Any) -> bool:
    """JSON-like data (what train's config holds): no tensors or other objects to compare."""
    if v is None or isinstance(v, (str, bool, int, float)):
        return True
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    return isinstance(v, dict) and all(isinstance(k, str) and _plain(x) for k, x in v.items())


def _tensors(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())


# Every field train writes (train._save), with what it must be: a field a reader asks for is
# checked here, so a crafted or foreign file gives one line, not a KeyError or TypeError.
# model_name and model_kwargs have their own checks (`model_spec`).
_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "state_dict": ("a dict of tensors", _tensors),
    "optimizer": (
        "an optimizer state (state, param_groups)",
        lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict) and isinstance(v.get("param_groups"), list),
    ),
    "job_step": ("a step count", _count),
    "job_steps": ("a step count", _count),
    "schedule_step": ("a step count", _count),
    "schedule_total": ("a step count", _count),
    "config": ("a dict of plain values", lambda v: isinstance(v, dict) and _plain(v)),
    "rng": ("a list of random states", lambda v: isinstance(v, list) and all(isinstance(s, dict) for s in v)),
    "stage": ("'seed' or 'expert'", lambda v: isinstance(v, str) and v in ("seed", "expert")),
    "expert": ("an expert number or None", lambda v: v is None or _count(v)),
    "skipped_images": (
        "a list of [shard, key, reason]",
        lambda v: (
            isinstance(v, list)
            and all(isinstance(r, list | tuple) and len(r) == 3 and all(isinstance(x, str) for x in r) for r in v)
        ),
    ),
}
MODEL_FIELDS = ("model_name", "state_dict")  # what eval needs (model_kwargs may be absent: none)
SEED_FIELDS = ("model_name", "state_dict", "optimizer", "schedule_step", "schedule_total")
RESUME_FIELDS = (*SEED_FIELDS, "job_step", "job_steps", "config", "rng")


def load_checkpoint(path: str | Path, fields: Iterable[str] = (), mmap: bool = False) -> dict[str, Any]:
    """The checkpoint dict (tensors on the CPU) holding `fields`, each checked for type;
    InputError naming the file when it is missing, damaged (a truncated copy, a killed
    download), holds pickled objects other than weights, or is not a mode-fast checkpoint.
    `mmap` maps the tensors instead of reading them (a check of the fields alone)."""
    path = Path(path)
    ckpt = _read(path, mmap)
    if not is_train_checkpoint(ckpt):
        raise InputError(f"{path} is not a mode-fast train checkpoint (format {CHECKPOINT_FORMAT})")
    for name in fields:
        if name not in ckpt:
            raise InputError(f"checkpoint {path}: field {name!r} is missing (not a checkpoint mode-fast's train wrote)")
    for name, (what, ok) in _FIELDS.items():
        if name in ckpt and not ok(ckpt[name]):
            raise InputError(
                f"checkpoint {path}: field {name!r} is not {what} (got {type(ckpt[name]).__name__}); refused"
            )
    _check_positions(ckpt, path)
    if "model_name" in ckpt or "model_kwargs" in ckpt:
        model_spec(ckpt, path)
    return ckpt


def _read(path: Path, mmap: bool = False) -> Any:
    """What `torch.load(weights_only=True)` gives for `path` (tensors on the CPU): the one
    read of a .pt file, mode-fast's or not; InputError naming the file when it is missing,
    damaged or holds pickled objects other than weights."""
    if not path.is_file():
        raise InputError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Interrupted:  # Ctrl-C while loading (a job's signal handler): not damage
        raise
    except pickle.UnpicklingError as e:
        raise InputError(_unpickling_refusal(path, e)) from e
    except Exception as e:  # torch/zipfile/pickle raise many types for a damaged file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"checkpoint {path} is damaged or truncated: {reason}") from e


def is_train_checkpoint(obj: Any) -> bool:
    """Whether a loaded file is one train wrote (its format name), not other weights."""
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT


def is_train_checkpoint_file(path: str | Path) -> bool:
    """Whether the file is a train checkpoint (read as data, its tensors mapped, not read)."""
    path = Path(path)
    return path.suffix != ".safetensors" and is_train_checkpoint(_read(path, mmap=True))


def _check_positions(ckpt: dict[str, Any], path: Path) -> None:
    """The job and schedule positions, where the file has them, as train writes them: the
    job's steps inside the schedule, its step inside the job."""
    p = {k: ckpt[k] for k in ("job_step", "job_steps", "schedule_step", "schedule_total") if k in ckpt}
    bad = (
        ("schedule_step" in p and "schedule_total" in p and p["schedule_step"] > p["schedule_total"])
        or ("job_step" in p and "job_steps" in p and p["job_step"] > p["job_steps"])
        or ("job_step" in p and "schedule_step" in p and p["job_step"] > p["schedule_step"])
        or (len(p) == 4 and p["schedule_step"] - p["job_step"] + p["job_steps"] > p["schedule_total"])
    )
    if bad:
        raise InputError(f"checkpoint {path}: its step positions {p} do not fit together; refused")


# torch names the global a weights-only load refused as "GLOBAL module.name"
_REFUSED_GLOBAL = re.compile(r"GLOBAL\s+([A-Za-z_][\w.]*)")
_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error: ([^\n]*)")


def _unpickling_refusal(path: Path, e: pickle.UnpicklingError) -> str:
    """Why a weights-only load refused the file, in one line: the type of the pickled
    objects it holds (the Python 3 name: protocol 2 pickles store Python 2 module names,
    subprocess as 'commands'), never torch's advice to load it with weights_only=False."""
    text = str(e)
    m = _REFUSED_GLOBAL.search(text)
    if m:
        module, _, name = m.group(1).rpartition(".")
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        return f"checkpoint {path} holds pickled objects of type {module}.{name}; mode-fast loads weights only"
    m = _UNPICKLER_ERROR.search(text)
    if "Weights only load failed" in text:
        detail = f" ({m.group(1).split('. ')[0].strip()})" if m else ""
        return f"checkpoint {path} holds pickled data other than weights{detail}; mode-fast loads weights only"
    reason = (text.strip().splitlines() or [type(e).__name__])[0]
    return f"checkpoint {path} is damaged or truncated: {reason}"


# --------------------------------------------------------------------------- the model
def model_spec(ckpt: dict[str, Any], path: str | Path) -> tuple[str, dict[str, Any]]:
    """(architecture name, constructor kwargs) of a checkpoint, refused unless the name is
    one in open_clip's registry (no 'hf-hub:'/'local-dir:' source that picks files to load)
    and the kwargs are ones mode-fast writes (`models.STORED_MODEL_KWARGS`), finite numbers."""
    from mode_fast.training.models import STORED_MODEL_KWARGS, is_known_model

    name = ckpt.get("model_name")
    if not is_known_model(name):
        raise InputError(
            f"checkpoint {path}: model_name {name!r} is not an architecture in open_clip's registry "
            "(names from open_clip.list_models(), no 'hf-hub:' or 'local-dir:' source); refused"
        )
    kwargs = ckpt.get("model_kwargs", {})
    if not isinstance(kwargs, dict):
        raise InputError(f"checkpoint {path}: model_kwargs is not a dict (got {type(kwargs).__name__}); refused")
    for key, value in kwargs.items():
        if key not in STORED_MODEL_KWARGS:
            raise InputError(f"checkpoint {path}: model_kwargs key {key!r} is not one mode-fast writes; refused")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise InputError(f"checkpoint {path}: model_kwargs {key!r} is not a finite number ({value!r}); refused")
    return name, {k: float(v) for k, v in kwargs.items()}


def check_model_checkpoint(path: str | Path | Pretrained) -> None:
    """Refuse, before a job touches its outputs, a checkpoint `load_model` would refuse for
    its fields (the weights are mapped, not read; outside weights are read whole)."""
    if isinstance(path, Pretrained):
        read_weights(path.path, mmap=True)
    else:
        load_checkpoint(path, MODEL_FIELDS, mmap=True)


def build_model(name: str, kwargs: dict[str, Any] | None = None) -> tuple[torch.nn.Module, Any]:
    """(model, eval transform) of a checked architecture name and whitelisted kwargs, with
    no weights of open_clip's own (no pretrained tag, tower file or hub weights)."""
    import open_clip

    model, _, preprocess_val = open_clip.create_model_and_transforms(
        name, pretrained=None, load_weights=False, pretrained_image=False, pretrained_text=False, device="cpu",
        **(kwargs or {}),
    )  # fmt: skip
    return model, preprocess_val


def load_model(
    checkpoint: str | Path | Pretrained, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Any, Any]:
    """(model in eval mode, open_clip's eval transform, tokenizer) from a train checkpoint or
    outside weights (`Pretrained`). The one place a model is rebuilt for eval: open_clip
    gets the checked name and kwargs only (`build_model`): the file's state_dict is all there is."""
    from mode_fast.training.models import get_tokenizer, model_kwargs

    if isinstance(checkpoint, Pretrained):
        state = read_weights(checkpoint.path)
        name = checkpoint.arch
        model, preprocess_val = build_model(name, model_kwargs(siglip="logit_bias" in state))  # SigLIP's bias
        load_pretrained(model, state, checkpoint)
        return model.to(device).eval(), preprocess_val, get_tokenizer(name)
    ckpt = load_checkpoint(checkpoint, MODEL_FIELDS)
    name, kwargs = model_spec(ckpt, checkpoint)
    model, preprocess_val = build_model(name, kwargs)
    load_state(model, ckpt, "state_dict", checkpoint)
    return model.to(device).eval(), preprocess_val, get_tokenizer(name)


def load_state(target: Any, ckpt: dict[str, Any], field: str, path: str | Path) -> None:
    """`target.load_state_dict(ckpt[field])` (a model or an optimizer); a state that does
    not fit it is an InputError naming the checkpoint."""
    try:
        target.load_state_dict(ckpt[field])
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__  # torch's is several lines: one line, shortened
        reason = reason if len(reason) <= 300 else reason[:297] + "..."
        what = ckpt.get("model_name") if field == "state_dict" else type(target).__name__
        raise InputError(f"checkpoint {path}: its {field} does not fit {what} ({reason})") from e


# --------------------------------------------------------------------------- weights from outside
# A file name that ends so, or holds a path separator, is a file, never a pretrained tag
# (open_clip's tags are plain words: openai, laion2b_s34b_b79k, metaclip_fullcc, ...).
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
SPEC_SYNTAX = "ARCH:TAG (an open_clip pretrained tag in the local cache) or ARCH:FILE"


@dataclass(frozen=True)
class Pretrained:
    """An open_clip model's weights from outside mode-fast: an architecture of open_clip's
    registry and the local file that holds them (for a tag, the cached file). `os.fspath`
    gives the file, so run.json fingerprints it; `str` the spec as a user reads it."""

    arch: str
    path: Path
    tag: str | None = None

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return f"{self.arch}:{self.tag} ({self.path})" if self.tag else f"{self.arch}:{self.path}"


def parse_model_spec(
    text: str | Path, model: str | None = None, cache_dir: str | Path | None = None, flag: str = "--pretrained"
) -> Pretrained | Path:
    """The weights a spec names. `ARCH:TAG` (a tag of open_clip's pretrained registry, found
    in the local cache: `models.cached_pretrained_file`) or `ARCH:FILE` (a state_dict,
    open_clip's training checkpoint or .safetensors), ARCH an open_clip registry name. With
    `model` given (train's --model), a bare TAG or FILE is that architecture's and an ARCH
    must be `model`; without, a bare path is returned as a Path (a mode-fast checkpoint).
    A rest that exists, holds a '/' or ends in a weights suffix is a file, else a tag."""
    from mode_fast.core.errors import ConfigError
    from mode_fast.training.models import cached_pretrained_file, is_known_model

    text = str(text)
    prefix, sep, rest = text.partition(":")
    if sep and is_known_model(prefix):
        arch = prefix
        if model is not None and arch != model:
            raise ConfigError(f"{flag} {text}: the weights are a {arch}, not --model {model}")
    elif model is not None:
        arch, rest = model, text
    else:
        return Path(text)
    if not rest:
        raise ConfigError(f"{flag} {text}: give {SPEC_SYNTAX}")
    if Path(rest).exists() or "/" in rest or rest.lower().endswith(WEIGHT_SUFFIXES):
        return Pretrained(arch, Path(rest))
    return Pretrained(arch, cached_pretrained_file(arch, rest, cache_dir), rest)


def read_weights(path: str | Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The state_dict in a weights file, read as data: .safetensors through safetensors,
    anything else through `torch.load(weights_only=True)` (`_read`). A plain state_dict, or
    a dict with one under "state_dict" (open_clip's training checkpoints, mode-fast's);
    DDP's "module." prefixes are dropped as open_clip's loader drops them. InputError naming
    the file when it holds no dict of tensors."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise InputError(f"weights file {path} not found")
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError, OSError: a damaged or foreign file
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise InputError(f"weights file {path} is not a readable .safetensors file: {reason}") from e
    else:
        obj = _read(path, mmap)
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not _tensors(obj) or not obj:
        raise InputError(f"weights file {path} holds no state_dict (a dict of tensors); refused")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def load_pretrained(model: torch.nn.Module, state: dict[str, torch.Tensor], source: object) -> None:
    """Load an outside state_dict into `model` after open_clip's own format fixes (a scalar
    logit scale or bias, the old text-tower key layout, text position ids of newer
    transformers), checked whole first: every key of the model present with its shape, none
    other, in one line naming `source`. One exception: a SigLIP model loading a CLIP's weights
    keeps its own logit_bias init (open_clip does the same, issue #712)."""
    from open_clip.model import convert_to_custom_text_state_dict

    own = model.state_dict()
    state = dict(state)
    if "positional_embedding" in state and "positional_embedding" not in own:
        state = convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):
        if key in state and key in own and state[key].ndim != own[key].ndim and state[key].numel() == own[key].numel():
            state[key] = state[key].reshape(own[key].shape)
    if "text.transformer.embeddings.position_ids" not in own:
        state.pop("text.transformer.embeddings.position_ids", None)
    if "logit_bias" in own and "logit_bias" not in state:
        state["logit_bias"] = own["logit_bias"]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {what} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                 for what, v in (("missing", missing), ("unexpected", unexpected), ("of another shape (file vs model)", shapes)) if v]  # fmt: skip
        raise InputError(f"{source}: its weights do not fit the architecture: keys {'; '.join(parts)}")
    model.load_state_dict(state)


# --------------------------------------------------------------------------- random state
def rng_state() -> dict[str, Any]:
    """This process's random state (torch, CUDA, Python, numpy), storable with weights_only."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # as a tensor: torch.load(weights_only=True) refuses numpy arrays
        "numpy": [torch.from_numpy(np.random.get_state()[1].astype(np.int64))] + list(np.random.get_state()[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], source: str | Path = "the checkpoint") -> None:
    """Restore `rng_state()`'s output; one that is not (a crafted or foreign file) is an
    InputError naming `source`."""
    try:
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError) as e:
        raise InputError(f"checkpoint {source}: field 'rng' is not a random state mode-fast writes ({e})") from e
