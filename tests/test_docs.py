"""The docs stay a guide a user can follow from a clone.

- README.md stays short (under 12,500 bytes): details belong in docs/, figures in
  benchmarks/README.md, history in CHANGELOG.md.
- Every relative link in the README, docs/*.md, benchmarks/README.md and CHANGELOG.md names a
  file inside the repository, and a ``#anchor`` into a markdown file names one of its headings.
- No tracked text file cites a path outside the repository (a sibling ``shared`` folder or an
  absolute path under the machine's work folder): a user's clone has neither, so citations
  name public sources (papers, repositories) or the repository's own docs instead.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_LIMIT = 14_000
LINKED_DOCS = [
    "README.md",
    "CHANGELOG.md",
    "benchmarks/README.md",
    *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")),
]

# [text](target) and [text]: target; the target ends at whitespace or the closing parenthesis
_INLINE_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.MULTILINE)
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # https:, mailto:, ...
# a path outside the repository: the sibling shared folder, or an absolute path in the work folder
_OUTSIDE = re.compile(r"\.\./+shared\b|(?:^|[\s\"'`(=:,\[])/work/")
# build outputs and environments that are not part of the repository
_SKIP_DIRS = {".git", ".venv", "build", "demo_out", "__pycache__", ".pytest_cache", ".ruff_cache"}


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    text = _FENCE.sub("", md.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE)}


def links(text: str) -> list[str]:
    """Link targets of a markdown text, outside code blocks."""
    text = _FENCE.sub("", text)
    return [m.group(1) for m in _INLINE_LINK.finditer(text)] + [m.group(1) for m in _REF_LINK.finditer(text)]


def broken_links(md: Path, root: Path) -> list[str]:
    """The relative links of ``md`` that do not resolve to a file (or a heading) in ``root``."""
    bad = []
    for target in links(md.read_text(encoding="utf-8")):
        if _EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md.resolve()
        if not dest.is_relative_to(root.resolve()) or not dest.exists():
            bad.append(f"{target} (no such file in the repository)")
        elif anchor and dest.is_file() and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target} (no heading #{anchor} in {dest.name})")
    return bad


def outside_citations(text: str) -> list[str]:
    """Lines of ``text`` that cite a path outside the repository."""
    return [line.strip() for line in text.splitlines() if _OUTSIDE.search(line)]


def tracked_files(root: Path) -> list[Path]:
    """The repository's files: git's list where there is one, else the tree less build outputs."""
    if (root / ".git").exists():
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
        return [root / name for name in out.decode().split("\0") if name]
    return [
        p
        for p in root.rglob("*")
        if p.is_file() and not _SKIP_DIRS.intersection(p.relative_to(root).parts) and ".egg-info" not in str(p)
    ]


def _text(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:  # listed by git but deleted in the work tree
        return None
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def test_readme_is_short():
    size = (ROOT / "README.md").stat().st_size
    assert size < README_LIMIT, f"README.md is {size} bytes; keep it under {README_LIMIT} (details go to docs/)"


@pytest.mark.parametrize("name", LINKED_DOCS)
def test_relative_links_resolve(name):
    md = ROOT / name
    assert md.is_file(), f"{name} is missing"
    assert broken_links(md, ROOT) == []


def test_no_citation_outside_the_repository():
    offenders = {}
    for path in tracked_files(ROOT):
        text = _text(path)
        if text is not None and (lines := outside_citations(text)):
            offenders[path.relative_to(ROOT).as_posix()] = lines
    assert offenders == {}, f"files citing paths outside the repository: {offenders}"


def test_the_checks_catch_what_they_guard(tmp_path):
    """Each check fails on a planted fault (and passes the same text without it)."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Two words\n")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/a.md) [ok](docs/a.md#two-words) [ok](https://arxiv.org/abs/2404.16030) [ok](#top)\n"
        "# Top\n"
        "```\n[in code](nowhere.md)\n```\n"
        "[gone](docs/missing.md) [out](../outside.md) [anchor](docs/a.md#three)\n"
    )
    (tmp_path.parent / "outside.md").write_text("x")
    assert broken_links(page, tmp_path) == [
        "docs/missing.md (no such file in the repository)",
        "../outside.md (no such file in the repository)",
        "docs/a.md#three (no heading #three in a.md)",
    ]

    shared = ".." + "/shared/reference/mode.md"
    work = "/" + "work/base/README.md"
    assert outside_citations(f"MoDE ({shared}).\nsee {work}\nDIR/.work/matches/ and arXiv:2404.16030\n") == [
        f"MoDE ({shared}).",
        f"see {work}",
    ]
    assert outside_citations("curate's DIR/.work/ folder; mode_fast/core/runs.py; docs/lifecycle.md") == []
