"""Triton kernels with pure-PyTorch fallbacks, imported as ``mode_fast.kernels``.

The backend is chosen per call by ``mode_fast.kernels.dispatch`` (one table of what each
backend can do): ``"auto"`` takes Triton on CUDA tensors and the PyTorch path everywhere
else (the CPU included), and never a backend that cannot do the call;
``MODE_FAST_BACKEND=torch|triton`` forces one. Nothing here needs a GPU to import.
"""

from __future__ import annotations

import importlib
from typing import Any

# A function named like its submodule is imported eagerly: importing the submodule
# first would otherwise bind the package attribute to the module, not the function.
from .kmeans_assign import kmeans_assign  # noqa: F401  (re-exported; __all__ is built below)

# public name -> submodule that defines it, imported on first use
_EXPORTS = {
    "clip_loss": "contrastive_loss",
    "infonce_loss": "contrastive_loss",
    "local_clip_loss": "contrastive_loss",
    "siglip_loss": "contrastive_loss",
}

__all__ = sorted([*_EXPORTS, "kmeans_assign"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
