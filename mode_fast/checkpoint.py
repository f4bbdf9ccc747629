"""Training checkpoints: the one format train writes and train, experts and eval read.

A checkpoint is one `torch.save` dict, format "mode_fast.train/1": model_name and
model_kwargs (to rebuild the architecture), state_dict, optimizer, the job and schedule
positions, the job's result-changing config and every rank's RNG state. It is written
atomically through `mode_fast.files` (mode from the umask), so a reader sees the old file
or the whole new one. A missing, truncated or foreign file raises `InputError` naming it.

Library module: never imports a job module.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mode_fast import files
from mode_fast.errors import InputError, Interrupted

CHECKPOINT_FORMAT = "mode_fast.train/1"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    files.write_with(Path(path), lambda f: torch.save({"format": CHECKPOINT_FORMAT, **state}, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict (tensors on the CPU); InputError naming the file when it is
    missing, damaged (a truncated copy, a killed download) or not a mode-fast checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Interrupted:  # Ctrl-C while loading (a job's signal handler): not damage
        raise
    except Exception as e:  # torch/zipfile/pickle raise many types for a damaged file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"checkpoint {path} is damaged or truncated: {reason}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path} is not a mode-fast train checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any, Any]:
    """(model in eval mode, open_clip's eval transform, tokenizer) from a train checkpoint."""
    import open_clip

    from mode_fast.models import get_tokenizer, register_model_configs

    register_model_configs()
    ckpt = load_checkpoint(checkpoint)
    model, _, preprocess_val = open_clip.create_model_and_transforms(
        ckpt["model_name"], pretrained=None, device="cpu", **ckpt.get("model_kwargs", {})
    )
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, RuntimeError) as e:
        raise InputError(f"checkpoint {checkpoint}: weights do not fit {ckpt['model_name']} ({e})") from e
    return model.to(device).eval(), preprocess_val, get_tokenizer(ckpt["model_name"])


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


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
