"""Import paths from before the stage packages keep working for one release, with a warning.

0.1's flat modules (``mode_fast.train``, ``mode_fast.clusters``, ...) moved into the stage
packages (CHANGELOG.md lists them). An old name imports the new module itself, not a copy, so
``monkeypatch.setattr`` and ``isinstance`` see one object; importing it warns once, naming
the new path. Two old modules became packages of the same name (``mode_fast.curation``,
``mode_fast.training``): their old attributes are forwarded by the package's ``__getattr__``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

MOVED = {
    "mode_fast.errors": "mode_fast.core.errors",
    "mode_fast.files": "mode_fast.core.files",
    "mode_fast.runs": "mode_fast.core.runs",
    "mode_fast.executor": "mode_fast.core.executor",
    "mode_fast.balance": "mode_fast.curation.balance",
    "mode_fast.worldwide": "mode_fast.curation.worldwide",
    "mode_fast.metadata": "mode_fast.curation.metadata",
    "mode_fast.kmeans": "mode_fast.clustering.kmeans",
    "mode_fast.experts": "mode_fast.clustering.experts",
    "mode_fast.embed": "mode_fast.clustering.embedders",
    "mode_fast.clusters": "mode_fast.clustering.folder",
    "mode_fast.models": "mode_fast.training.models",
    "mode_fast.checkpoint": "mode_fast.training.checkpoint",
    "mode_fast.loss": "mode_fast.training.loss",
    "mode_fast.tasks": "mode_fast.evaluation.tasks",
    "mode_fast.scoring": "mode_fast.evaluation.scoring",
    "mode_fast.ensemble": "mode_fast.evaluation.ensemble",
    "mode_fast.results": "mode_fast.evaluation.results",
    "mode_fast.pipeline": "mode_fast.demo.pipeline",
    "mode_fast.report": "mode_fast.demo.report",
    "mode_fast.data.sample": "mode_fast.demo.sample",
    "mode_fast.curate": "mode_fast.curation.run",
    "mode_fast.cluster": "mode_fast.clustering.run",
    "mode_fast.train": "mode_fast.training.run",
    "mode_fast.evaluate": "mode_fast.evaluation.run",
    "mode_fast.open_clip_main": "mode_fast.jobs.open_clip_main",
}
# old modules that are packages now: package -> the module that holds the old attributes
BECAME_PACKAGES = {"mode_fast.curation": "mode_fast.curation.shards", "mode_fast.training": "mode_fast.training.loop"}


def _warn(old: str, new: str) -> None:
    warnings.warn(
        f"{old} moved to {new}; the old name is removed in the next release", DeprecationWarning, stacklevel=3
    )


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        _warn(spec.name, self.new)
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:
        """The new module is already executed."""


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(name)
        return None if new is None else importlib.util.spec_from_loader(name, _Alias(new))


def install() -> None:
    """Put the finder first on sys.meta_path, once."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())


def forward(package: str) -> Callable[[str], Any]:
    """A package ``__getattr__`` that finds the old module's attributes, with the warning."""
    old_home = BECAME_PACKAGES[package]

    def __getattr__(name: str) -> Any:
        module = importlib.import_module(old_home)
        if name.startswith("__") or not hasattr(module, name):
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        _warn(f"{package}.{name}", f"{old_home}.{name}")
        return getattr(module, name)

    return __getattr__
