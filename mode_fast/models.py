"""The CLIP models mode-fast trains: open_clip architectures by name, plus this project's
own configs (`model_configs/*.json`: mode-fast-tiny, mode-fast-small, which train on a CPU).

Library module: `register_model_configs` makes the project's configs known to open_clip,
`create_model` builds a model with its training transform and tokenizer. Checkpoints are in
`mode_fast.checkpoint`. Never imports a job module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"

_registered = False


def register_model_configs() -> None:
    """Make this project's configs (mode-fast-tiny, ...) known to open_clip by name."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def project_model_names() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def is_known_model(name: object) -> bool:
    """Whether `name` is an architecture in open_clip's registry (with this project's configs):
    a plain name, no 'hf-hub:'/'local-dir:' source that picks files to load."""
    import open_clip

    register_model_configs()
    return isinstance(name, str) and name in open_clip.list_models()


# The constructor kwargs `model_kwargs` can return (all floats): the only ones a checkpoint
# may carry (`mode_fast.checkpoint` refuses any other, since open_clip's loaders take kwargs
# that read files).
STORED_MODEL_KWARGS = frozenset({"init_logit_scale", "init_logit_bias"})


def model_kwargs(siglip: bool) -> dict[str, Any]:
    """Constructor arguments beyond the architecture: open_clip's SigLIP init for a sigmoid loss."""
    return {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0} if siglip else {}


@dataclass
class CreatedModel:
    model: torch.nn.Module
    preprocess_train: Any
    preprocess_val: Any
    tokenizer: Any
    kwargs: dict[str, Any] = field(default_factory=dict)  # stored in checkpoints to rebuild it


def create_model(
    name: str,
    device: str | torch.device = "cpu",
    siglip: bool = False,
    patch_dropout: float | None = None,
    output_dict: bool = True,
) -> CreatedModel:
    """A freshly initialised open_clip model (draws from torch's global RNG: seed first)."""
    import open_clip

    register_model_configs()
    kwargs = model_kwargs(siglip)
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name, pretrained=None, device=device, output_dict=output_dict,
        force_patch_dropout=patch_dropout, **kwargs,
    )  # fmt: skip
    return CreatedModel(model, preprocess_train, preprocess_val, open_clip.get_tokenizer(name), kwargs)
