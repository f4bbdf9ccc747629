"""Library modules never import job modules (curate, cluster, train, evaluate, pipeline,
cli): every import of every library module is parsed, function-local ones included."""

from __future__ import annotations

import ast
from pathlib import Path

import mode_fast

PACKAGE = Path(mode_fast.__file__).parent
JOBS = {"mode_fast.curate", "mode_fast.cluster", "mode_fast.train", "mode_fast.evaluate",
        "mode_fast.pipeline", "mode_fast.cli"}  # fmt: skip
# `python -m mode_fast` is the CLI itself. The small subcommands that are also libraries
# (metadata, data.sample) and open_clip's trainer wrapper are held to the library rule.
ENTRY_POINTS = {"mode_fast.__main__"}


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
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from mode_fast import train`
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    return found


def library_modules() -> dict[str, Path]:
    mods = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: p for name, p in mods.items() if name not in JOBS | ENTRY_POINTS}


def test_library_modules_never_import_jobs():
    offenders = {name: sorted(imported_modules(p) & JOBS) for name, p in library_modules().items()}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_rule_sees_function_local_relative_and_dynamic_imports():
    probe = PACKAGE / "data" / "probe.py"  # a name only: the source is given, nothing is written
    text = (
        "def f():\n    from ..train import train\n    import mode_fast.cluster\n"
        "    from mode_fast import evaluate\n    importlib.import_module('mode_fast.curate')\n"
    )
    found = imported_modules(probe, text)
    assert {"mode_fast.train", "mode_fast.cluster", "mode_fast.evaluate", "mode_fast.curate"} <= found


def test_library_covers_the_new_modules():
    names = set(library_modules())
    for lib in ("mode_fast.kmeans", "mode_fast.experts", "mode_fast.embed", "mode_fast.clusters",
                "mode_fast.checkpoint", "mode_fast.models", "mode_fast.training", "mode_fast.files",
                "mode_fast.errors", "mode_fast.data.loader", "mode_fast.data.io"):  # fmt: skip
        assert lib in names


def test_evaluate_imports_no_other_job():
    assert imported_modules(PACKAGE / "evaluate.py") & (JOBS - {"mode_fast.evaluate", "mode_fast.cli"}) == set()
