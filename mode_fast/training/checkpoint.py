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

Library module: never imports a job module.
"""

from __future__ import annotations

import _compat_pickle
import math
import pickle
import random
import re
from collections.abc import Callable, Iterable
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
# model_name and model_kwargs have their own checks (`_model_spec`).
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
    if not path.is_file():
        raise InputError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Interrupted:  # Ctrl-C while loading (a job's signal handler): not damage
        raise
    except pickle.UnpicklingError as e:
        raise InputError(_unpickling_refusal(path, e)) from e
    except Exception as e:  # torch/zipfile/pickle raise many types for a damaged file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"checkpoint {path} is damaged or truncated: {reason}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
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
        _model_spec(ckpt, path)
    return ckpt


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
def _model_spec(ckpt: dict[str, Any], path: str | Path) -> tuple[str, dict[str, Any]]:
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


def check_model_checkpoint(path: str | Path) -> None:
    """Refuse, before a job touches its outputs, a checkpoint `load_model` would refuse for
    its fields (the weights are mapped, not read)."""
    load_checkpoint(path, MODEL_FIELDS, mmap=True)


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any, Any]:
    """(model in eval mode, open_clip's eval transform, tokenizer) from a train checkpoint.
    The one place a model is rebuilt from a checkpoint: open_clip gets the checked name and
    kwargs only, and loads no weights of its own (no pretrained tag, tower file or hub
    weights): the checkpoint's state_dict is all there is."""
    import open_clip

    from mode_fast.training.models import get_tokenizer

    ckpt = load_checkpoint(checkpoint, MODEL_FIELDS)
    name, kwargs = _model_spec(ckpt, checkpoint)
    model, _, preprocess_val = open_clip.create_model_and_transforms(
        name, pretrained=None, load_weights=False, pretrained_image=False, pretrained_text=False, device="cpu",
        **kwargs,
    )  # fmt: skip
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
