"""mode-fast: MetaCLIP curation and MoDE data experts for CLIP, with native hot paths.

The public API is resolved on first use, so ``import mode_fast`` stays light (curation never
loads torch)::

    from mode_fast import Matcher, ClipLoss, SigLipLoss, clip_loss, siglip_loss
    from mode_fast import kmeans_assign, KMeans, expert_weights
    from mode_fast import ModeEnsemble   # a `mode-fast export` folder: experts and MoDE weights
"""

from __future__ import annotations

import importlib
from typing import Any

from mode_fast.core import moved as _moved

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "Matcher": "mode_fast.curation.matcher",
    "ClipLoss": "mode_fast.training.loss",
    "SigLipLoss": "mode_fast.training.loss",
    "clip_loss": "mode_fast.kernels.contrastive_loss",
    "siglip_loss": "mode_fast.kernels.contrastive_loss",
    "kmeans_assign": "mode_fast.kernels.kmeans_assign",
    "KMeans": "mode_fast.clustering.kmeans",
    "expert_weights": "mode_fast.evaluation.ensemble",
    "ModeEnsemble": "mode_fast.evaluation.mode_ensemble",
}
__all__ = ["__version__", *sorted(_API)]

_moved.install()  # 0.1's flat import paths, for one release


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'mode_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
