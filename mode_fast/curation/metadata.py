"""Metadata lists for MetaCLIP curation: the shipped default, user lists, WordNet builds.

A metadata list is a JSON list of strings (MetaCLIP's metadata.json); an entry's id is
its position. Because ids are positions, a user list is never silently cleaned up:
non-strings, empty or whitespace-only entries and duplicates are errors that name the
file and the index (dropping or reordering one entry would shift every id after it).
An empty list and strings that are not valid Unicode (lone surrogates, which JSON
escapes can produce) are errors too. Entries are otherwise kept exactly as written:
one with a tab, newline or leading/trailing space is legal MetaCLIP metadata, but can
never match, because matching pads entries with single spaces and turns tabs/newlines
in the text into spaces.

The default list (``mode_fast/data/metadata_wordnet.json.gz``) holds every lemma of
every WordNet 3.0 synset, the WordNet part of MetaCLIP's metadata: read from the
``data.noun``, ``data.verb``, ``data.adj``, ``data.adv`` files in that order and in
file order, first occurrence kept; ``_`` becomes a space (``ice_cream`` -> ``ice
cream``), adjective syntactic markers ``(a)``, ``(p)``, ``(ip)`` are stripped, case is
kept as written (``Einstein``). WordNet 3.0 Copyright 2006 by Princeton University,
redistributed under the WordNet licence (``mode_fast/data/WORDNET_LICENSE.txt``).
Rebuild it with ``mode-fast metadata build --out FILE`` (Debian: ``wordnet-base``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mode_fast.core.config import option
from mode_fast.core.errors import InputError

DEFAULT_METADATA = Path(__file__).parent / "data" / "metadata_wordnet.json.gz"
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
WORDNET_DIRS = ("/usr/share/wordnet", "/usr/local/share/wordnet", "/usr/share/wordnet-3.0/dict")
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")


class MetadataError(InputError):
    """A metadata file that cannot be used as it is; the message names file and index."""


def read_metadata_json(path: Path) -> object:
    """The JSON in a metadata file (.json or .json.gz, a UTF-8 BOM allowed), unvalidated;
    an unreadable, truncated or non-JSON file raises MetadataError naming it."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    # EOFError / zlib.error: a truncated or corrupt .gz, not an OSError
    except (OSError, EOFError, zlib.error) as exc:
        raise MetadataError(f"{path}: cannot read metadata ({exc})") from exc
    try:
        # utf-8-sig: a BOM some editors add is not part of the first entry
        return json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MetadataError(f"{path}: not valid UTF-8 JSON ({exc})") from exc


def validate_metadata(entries: object, source: str = "metadata") -> list[str]:
    """Return `entries` unchanged if it is a usable list, else raise naming the index."""
    if not isinstance(entries, list):
        raise MetadataError(f"{source}: expected a JSON list of strings, got {type(entries).__name__}")
    if not entries:
        raise MetadataError(f"{source}: the list is empty (no entry could ever match)")
    first_index: dict[str, int] = {}
    for i, e in enumerate(entries):
        if not isinstance(e, str):
            raise MetadataError(f"{source}: entry {i} is {type(e).__name__} ({e!r}), not a string")
        if not e.strip():
            raise MetadataError(f"{source}: entry {i} is empty or only whitespace ({e!r})")
        try:
            e.encode("utf-8")  # hashing, saving and the matcher all need UTF-8
        except UnicodeEncodeError as exc:
            raise MetadataError(f"{source}: entry {i} ({e!r}) is not valid Unicode ({exc.reason})") from exc
        if e in first_index:
            raise MetadataError(
                f"{source}: entry {i} {e!r} duplicates entry {first_index[e]} (ids are positions, so one must go)"
            )
        first_index[e] = i
    return entries  # type: ignore[return-value]


def load_metadata(path: str | os.PathLike | None = None) -> list[str]:
    """The shipped WordNet list (None) or a validated MetaCLIP-style metadata.json[.gz]."""
    p = DEFAULT_METADATA if path is None else Path(path)
    return validate_metadata(read_metadata_json(p), str(p))


def load_metadata_from(metadata: str | os.PathLike | Sequence[str] | None) -> tuple[list[str], str]:
    """(validated entries, where they came from) for a metadata.json path, a list given
    in code, or None (the shipped WordNet list)."""
    if metadata is None:
        return load_metadata(None), "mode_fast default (WordNet 3.0)"
    if isinstance(metadata, (str, os.PathLike)):
        return load_metadata(metadata), str(metadata)
    entries = validate_metadata(list(metadata), "metadata list")
    return entries, f"list of {len(entries)} entries given in code"


def metadata_sha256(entries: list[str]) -> str:
    """Stable hash of a list (order matters: it fixes the ids), for manifests."""
    blob = json.dumps(entries, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def default_wordnet_dir() -> Path | None:
    """The first standard folder holding all four WordNet data files, else None."""
    for d in WORDNET_DIRS:
        if all((Path(d) / f).is_file() for f in WORDNET_FILES):
            return Path(d)
    return None


def _lemmas_of_data_line(line: str) -> list[str]:
    # offset lex_filenum ss_type w_cnt(2 hex) [word lex_id(1 hex)] * w_cnt ...
    fields = line.split(" ")
    count = int(fields[3], 16)
    words = fields[4 : 4 + 2 * count : 2]
    if count < 1 or len(words) != count:
        raise ValueError(f"w_cnt {count} but {len(words)} words")
    return [_ADJ_MARKER.sub("", w).replace("_", " ") for w in words]


def build_from_wordnet(wordnet_dir: str | os.PathLike) -> list[str]:
    """Every lemma of every synset in a WordNet dict folder (data.noun, data.verb,
    data.adj, data.adv, in that order and in file order), first occurrence kept;
    ``_`` -> space, adjective markers ``(a)``/``(p)``/``(ip)`` stripped, case kept."""
    d = Path(wordnet_dir)
    missing = [f for f in WORDNET_FILES if not (d / f).is_file()]
    if missing:
        raise MetadataError(
            f"{d}: not a WordNet dict folder (missing {', '.join(missing)}); try `apt-get install wordnet-base`"
        )
    seen: dict[str, None] = {}  # insertion-ordered set: first occurrence fixes the id
    for name in WORDNET_FILES:
        with open(d / name, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.startswith("  ") or not line.strip():
                    continue  # the licence header lines
                try:
                    lemmas = _lemmas_of_data_line(line.rstrip("\n"))
                except (ValueError, IndexError) as exc:
                    raise MetadataError(f"{d / name}:{lineno}: not a WordNet data line ({exc}): {line[:60]!r}") from exc
                for lemma in lemmas:
                    seen.setdefault(lemma)
    return list(seen)


def merge_metadata(*lists: list[str]) -> list[str]:
    """First list's order kept; later lists' new entries appended in order; exact
    duplicates across lists dropped (ids of the first list never move)."""
    merged: dict[str, None] = {}
    for entries in lists:
        for e in entries:
            merged.setdefault(e)
    return list(merged)


def save_metadata(entries: list[str], path: str | os.PathLike) -> None:
    """Validate, then write atomically (temp file beside `path`, then os.replace);
    gzip when the name ends in .gz, with mtime=0 and no file name so it is byte-reproducible."""
    from mode_fast.core.files import atomic_write

    validate_metadata(entries, str(path))
    blob = json.dumps(entries, ensure_ascii=False).encode("utf-8")
    with atomic_write(path) as f:
        if str(path).endswith(".gz"):
            with gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as gz:  # mtime=0: byte-reproducible
                gz.write(blob)
        else:
            f.write(blob)


# --- one run -----------------------------------------------------------------------------


@dataclass(frozen=True)
class MetadataBuildConfig:
    """`mode-fast metadata build`: a list from WordNet 3.0 and/or merged user lists."""

    out: str = option(help="output .json or .json.gz", result=False)
    wordnet_dir: str | None = option(
        None, help="WordNet dict folder (default: the Debian wordnet-base location)", result=True
    )
    no_wordnet: bool = option(False, help="only merge the --merge lists", result=True)
    merge: tuple[str, ...] = option(
        (), help="metadata.json files appended in order", result=True, nargs="*", metavar="FILE"
    )


@dataclass(frozen=True)
class MetadataCheckConfig:
    """`mode-fast metadata check`: validate a metadata file and print its size."""

    file: str = option(help="the metadata file", result=False, flag="file")


def build_metadata(cfg: MetadataBuildConfig) -> list[str]:
    """Build the list `cfg` describes and save it to cfg.out; returns its entries.
    Raises MetadataError (no WordNet, nothing to build, a bad list)."""
    lists = []
    if not cfg.no_wordnet:
        wn = Path(cfg.wordnet_dir) if cfg.wordnet_dir else default_wordnet_dir()
        if wn is None:
            raise MetadataError(
                "WordNet 3.0 not found: `apt-get install wordnet-base`, or pass --wordnet-dir / --no-wordnet"
            )
        lists.append(build_from_wordnet(wn))
    lists += [load_metadata(p) for p in cfg.merge]
    if not lists:
        raise MetadataError("nothing to build: give --merge files or drop --no-wordnet")
    entries = merge_metadata(*lists)
    save_metadata(entries, cfg.out)
    return entries
