"""The layers by package: core <- data, kernels <- stages <- demo <- jobs <- cli.

Every import of every module in the package is parsed (function-local, relative and
`importlib.import_module("...")` ones included) and judged by the package it names, so a new
module is held to its folder's rule with no list of module names to keep up to date. Stages
(curation, clustering, training, evaluation, dedup) may use one another as long as no two of them
import each other; only the CLI imports the jobs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mode_fast

PACKAGE = Path(mode_fast.__file__).parent
# package -> layer; a module may import its own package and lower layers (stages: see above)
LAYERS = {
    "core": 0,
    "_matcher": 1,  # the native extension (csrc/)
    "data": 1,
    "kernels": 1,
    "curation": 2,
    "clustering": 2,
    "training": 2,
    "evaluation": 2,
    "dedup": 2,
    "demo": 3,
    "jobs": 4,
    "cli": 5,
    "__main__": 6,
}
STAGES = {name for name, layer in LAYERS.items() if layer == 2}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, source: str | None = None) -> set[str]:
    """Every module an import statement anywhere in the file names (relative ones resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8") if source is None else source, filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from mode_fast import jobs`
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    return found


def top_package(module: str) -> str | None:
    """`mode_fast.clustering.folder` -> "clustering"; None for the root package itself and for
    names outside mode_fast."""
    parts = module.split(".")
    if parts[0] != "mode_fast" or len(parts) == 1:
        return None
    return parts[1]


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def package_imports() -> dict[tuple[str, str], list[str]]:
    """(importing package, imported package) -> the modules where it happens."""
    edges: dict[tuple[str, str], list[str]] = {}
    for name, path in modules().items():
        src = top_package(name)
        if src is None:
            continue
        for target in imported_modules(path):
            dst = top_package(target)
            if dst is not None and dst != src and not dst.startswith("__version__"):
                edges.setdefault((src, dst), []).append(name)
    return edges


def test_every_package_has_a_layer():
    folders = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    files = {p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    assert (folders | files | {"_matcher"}) - set(LAYERS) == set()


def test_packages_import_only_lower_layers():
    wrong = {
        f"{src} -> {dst}": where
        for (src, dst), where in package_imports().items()
        if LAYERS[dst] > LAYERS[src] or (LAYERS[dst] == LAYERS[src] and src not in STAGES)
    }
    assert wrong == {}


def test_stages_do_not_import_each_other_both_ways():
    edges = package_imports()
    both = {(a, b) for (a, b) in edges if a in STAGES and b in STAGES and (b, a) in edges and a < b}
    assert both == set(), {pair: (edges[pair], edges[pair[::-1]]) for pair in both}


def test_the_root_package_imports_only_the_core_eagerly():
    """`import mode_fast` stays light (curate never loads torch): the public API is resolved on
    first use; the root imports only the core (the finder of 0.1's import paths)."""
    root = PACKAGE / "__init__.py"
    names = {m for m in imported_modules(root) if m.startswith("mode_fast")}
    assert names and {top_package(m) for m in names} == {"core"}


def test_the_rule_sees_function_local_relative_and_dynamic_imports():
    probe = PACKAGE / "data" / "probe.py"  # a name only: the source is given, nothing is written
    text = (
        "def f():\n    from ..jobs.train import main\n    import mode_fast.clustering.kmeans\n"
        "    from mode_fast import jobs\n    importlib.import_module('mode_fast.evaluation.tasks')\n"
    )
    found = {top_package(m) for m in imported_modules(probe, text)}
    assert {"jobs", "clustering", "evaluation"} <= found


def test_the_layer_check_fails_on_a_job_imported_from_a_stage(monkeypatch):
    """The check itself can fail: a stage module that imports a job is reported."""
    real = imported_modules

    def with_probe(path: Path, source: str | None = None) -> set[str]:
        found = real(path, source)
        return found | {"mode_fast.jobs.train"} if module_name(path) == "mode_fast.training.loop" else found

    monkeypatch.setitem(globals(), "imported_modules", with_probe)
    edges = package_imports()
    assert edges[("training", "jobs")] == ["mode_fast.training.loop"]
