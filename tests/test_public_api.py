"""The public API at the top (`from mode_fast import ...`, resolved lazily) and 0.1's import
paths, which keep working for one release with a DeprecationWarning naming the new path."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest

import mode_fast
from mode_fast.core.moved import BECAME_PACKAGES, MOVED

API = [
    "Matcher",
    "ClipLoss",
    "SigLipLoss",
    "clip_loss",
    "siglip_loss",
    "kmeans_assign",
    "KMeans",
    "expert_weights",
    "ModeEnsemble",
]


def test_every_public_name_resolves_to_its_home():
    homes = {
        "Matcher": "mode_fast._matcher",
        "ClipLoss": "mode_fast.training.loss",
        "SigLipLoss": "mode_fast.training.loss",
        "clip_loss": "mode_fast.kernels.contrastive_loss",
        "siglip_loss": "mode_fast.kernels.contrastive_loss",
        "kmeans_assign": "mode_fast.kernels.kmeans_assign",
        "KMeans": "mode_fast.clustering.kmeans",
        "expert_weights": "mode_fast.evaluation.ensemble",
        "ModeEnsemble": "mode_fast.evaluation.mode_ensemble",
    }
    assert sorted(API) == sorted(n for n in mode_fast.__all__ if n != "__version__")
    for name in API:
        assert getattr(mode_fast, name).__module__ == homes[name], name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        mode_fast.nothing  # noqa: B018


def test_import_mode_fast_and_the_matcher_load_no_torch():
    code = "import sys, mode_fast; from mode_fast import Matcher; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_warns_and_is_the_new_module(old):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {MOVED[old]}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])


@pytest.mark.parametrize("package", sorted(BECAME_PACKAGES))
def test_a_module_that_became_a_package_forwards_its_old_names(package):
    old_home = importlib.import_module(BECAME_PACKAGES[package])
    name = next(n for n in vars(old_home) if not n.startswith("_") and callable(getattr(old_home, n)))
    with pytest.warns(DeprecationWarning, match=f"{package}.{name} moved to"):
        value = getattr(importlib.import_module(package), name)
    assert value is getattr(old_home, name)
    with warnings.catch_warnings(), pytest.raises(AttributeError):
        warnings.simplefilter("error")
        importlib.import_module(package).no_such_name  # noqa: B018
