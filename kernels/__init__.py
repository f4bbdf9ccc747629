"""Triton kernels with pure-PyTorch fallbacks, imported as ``mode_fast.kernels``.

The backend is chosen per call: ``"auto"`` takes Triton on CUDA tensors and the
PyTorch path everywhere else (the CPU included). Submodules are imported lazily so
that ``import mode_fast.kernels`` stays cheap and never needs a GPU.
"""
from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule that defines it
_EXPORTS = {
    "clip_loss": "contrastive_loss",
    "siglip_loss": "contrastive_loss",
    "kmeans_assign": "kmeans_assign",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
