"""Readers and writers for the pools users have: webdataset tars, parquet, jsonl.

Every reader yields one `Record` per sample in file order, bad ones included (with a
`skip_reason`), so that a record's index in its shard is the same in every pass: the
curation's second pass re-reads a shard and keeps records by index, which avoids holding
raw samples in memory and keeps the curated records byte-for-byte those of the input.

Shard paths (`list_shards`, `shard_path`; every job lists its shards this way): a shard is
named by the path the user gave, made absolute with its folder resolved but its own name
kept, so a symlink stays the link, as in a model-hub cache (``snapshots/x/pool-000.tar ->
../../blobs/3f2a...``): the format comes from the link's name, ids, outputs and errors name
the link, and reading reads the target. A file reached under two names is listed once; a
link to nothing is an error naming where it points.

Caption lookup (``caption_key``):
- webdataset: a member extension of that name (``txt``, ``caption``...; compared lower-cased,
  a leading dot allowed: `member_ext`) if the sample has one; else a field of the ``.json`` member; else, for the default ``caption`` only, the
  ``.txt`` member. So the default finds ``{"caption": ...}`` in ``.json`` or a ``.txt``.
- parquet / jsonl: the column / field of that name (string; parquet binary is UTF-8 decoded).
Record keys: webdataset ``__key__``; parquet/jsonl the ``key_field`` column (default
``uid`` if there is one, else ``key``). A row without one gets ``<shard stem>/<row>``,
which depends on how the pool is sharded, and so does sampling keyed on it.

Bad input is a record with ``caption=None`` and a ``skip_reason``, never an exception:
``missing_caption``, ``invalid_utf8`` (undecodable bytes, or JSON text with lone
surrogates), ``caption_not_text``, ``bad_json``, ``bad_key`` (a key with a line break,
which kept_keys.txt could not hold), ``corrupt_member`` (see below), and one pseudo-record
``corrupt_tar_tail`` (key "", not a sample, no index) when a tar ends in damage. A shard
that cannot be read at all raises `ShardError` naming the file. MetaCLIP 2 matches a caption
with lone surrogates on its other characters: `lone_surrogate_caption` gives it back.

Tar members and keys (the one key rule; `member_key`, used by every job through `TarScan`):
- a member's key is its name up to the first dot of the last path component, its
  extension the rest, lower-cased (webdataset's rule): ``dir/k01.seg.JPG`` is key
  ``dir/k01``, extension ``seg.jpg``. Consecutive members with one key form a sample.
- a key whose last component is ``__NAME__`` (``__index__.json``, ``__key__``,
  ``dir/__meta__.txt``) is webdataset-style metadata, not a sample: ignored, and counted
  in ``TarScan.ignored`` as ``metadata_member``. A key like ``__k1`` is a sample.
- a name without an extension (no dot in the last component, only a leading dot such as
  ``.hidden``, or a trailing dot such as ``k.``) belongs to no sample: ignored, counted as
  ``no_extension``. Non-file members (folders, links) are ignored silently.
- a repeated extension within a key (``k.txt``, ``k.txt``) starts a second sample with the
  same key (webdataset would raise); both are read, and curate reports duplicate keys.

Damaged tars: a member header with a bad checksum is skipped block by block up to the
next valid header (tarfile's ``ignore_zeros`` resync), so one damaged member costs a
record or two, not the rest of the shard. The member's name is unreadable, so the records
just before and just after the damage (either may have lost a member) are skipped as
``corrupt_member`` (the one after only when the next member starts a new key); so is a
record whose member data cannot be read. Whole records lost inside the damaged bytes are
not seen. Data after the last readable member that is not zero padding (a truncated file)
is reported as ``corrupt_tar_tail``. (This is why tars are walked with tarfile and
webdataset's grouping rule rather than with webdataset's stream iterator, which stops at
the first damaged header; importing webdataset would also import torch in every worker.)
`read_shard` yields damaged records (curate keeps record indices); `iter_samples`, the
walk of the training loader, eval and the demo, yields only undamaged samples and counts
the rest in a `ReadReport` (read and skipped counts by reason and shard) that the jobs
report.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from mode_fast.core.errors import InputError
from mode_fast.core.files import atomic_write

if TYPE_CHECKING:
    import pyarrow.parquet as pq

log = logging.getLogger(__name__)

SHARD_SUFFIXES = (".tar", ".parquet", ".jsonl", ".jsonl.gz")
GLOB_CHARS = set("*?[")
PARQUET_BATCH_ROWS = 65536  # rows per record batch: bounded memory on big files


class ShardError(InputError):
    """A shard that cannot be read at all (missing, not that format, no caption column)."""


@dataclass
class Record:
    """One sample. `sample`: the raw webdataset sample ({"__key__", ext: bytes}) for tars,
    the parsed object for jsonl, {} for parquet (writers copy rows by index instead)."""

    key: str
    caption: str | None
    sample: dict[str, Any] = field(default_factory=dict)
    skip_reason: str | None = None  # set when caption is None: why the record is skipped


# --- paths ---------------------------------------------------------------------------


def shard_format(path: str | os.PathLike) -> str:
    """The format a shard's name says (never its link target's: see `shard_path`)."""
    name = str(path)
    if name.endswith(".tar"):
        return "tar"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        return "jsonl"
    raise ShardError(f"{name}: unknown shard format (expected one of {', '.join(SHARD_SUFFIXES)})")


def _expand_braces(pattern: str) -> list[str]:
    import braceexpand  # webdataset's own dependency, so `pool-{000..009}.tar` means the same here

    return list(braceexpand.braceexpand(pattern))


def shard_path(path: str | os.PathLike) -> Path:
    """A shard's absolute path as every job names it: its folder resolved, its own name
    kept. A symlink stays the link (a model-hub cache links ``pool-000.tar`` to
    ``blobs/3f2a...``): its name says the format and names the shard in ids, outputs and
    errors, and reading it reads the target. For a file that is not a link this is
    ``Path.resolve()``, so ids made from it stay what they were."""
    p = Path(path)
    return p.parent.resolve() / p.name


def shard_id(path: str | os.PathLike) -> str:
    """A shard's id in file names (curate's ``.work/``, cluster's ``assignments/`` and
    embedding cache): its name up to the first dot plus sha1[:8] of its `shard_path` (two
    folders may both hold 00000.tar; a symlinked shard is named by the link). Train and eval
    find a shard's assignments by it, so the rule never changes for a file name that exists."""
    p = shard_path(path)
    stem = p.name.split(".")[0] or "shard"
    return f"{stem}-{hashlib.sha1(str(p).encode()).hexdigest()[:8]}"


def missing_shard(path: str | os.PathLike) -> ShardError:
    """The error for a shard that is not there: a link to nothing names its target."""
    if os.path.islink(path):
        return ShardError(f"{path}: a link to {os.readlink(path)}, which does not exist")
    return ShardError(f"{path}: no such file")


def _is_shard_name(path: Path) -> bool:
    return str(path).endswith(SHARD_SUFFIXES)


def _shards_in(folder: Path) -> list[Path]:
    """The shard files under a folder, linked folders followed (each real folder once,
    under the name walked first, in sorted order); links to nothing are kept, for
    list_shards to name."""
    found: list[Path] = []
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree, or a second link to one folder
            dirs.clear()
            continue
        seen.add(real)
        dirs.sort()
        found += (Path(root, f) for f in files if _is_shard_name(Path(f)))
    return found


def list_shards(patterns: Iterable[str | os.PathLike]) -> list[Path]:
    """Files, folders (searched recursively) and glob/brace patterns -> sorted absolute
    shard paths (`shard_path`: links kept as links). A file named twice, or reached by two
    names (links to one target), is listed once, under the first of its names in order.
    A pattern that names nothing, or no shard, and a link to nothing are ShardErrors."""
    found: list[Path] = []
    for pattern in patterns:
        matched: list[Path] = []
        for item in _expand_braces(str(pattern)):
            if GLOB_CHARS & set(item):
                for p in map(Path, glob.glob(item, recursive=True)):
                    matched += _shards_in(p) if p.is_dir() else [p]
            elif os.path.isdir(item):
                matched += _shards_in(Path(item))
            elif os.path.lexists(item):
                matched.append(Path(item))
            else:
                raise ShardError(f"{item}: no such file or folder")
        shards = [shard_path(p) for p in matched if _is_shard_name(p)]
        if not shards:
            raise ShardError(f"{pattern}: matches no shard ({', '.join(SHARD_SUFFIXES)})")
        for p in shards:
            if not p.exists():
                raise missing_shard(p)
        found += shards
    return distinct_files(found)


def distinct_files(paths: Iterable[Path]) -> list[Path]:
    """Sorted paths with each file once: names of one file (links to one target, the
    target itself) count as one, listed under the first of them in sorted order."""
    first: dict[str, Path] = {}
    for p in sorted(paths):
        first.setdefault(os.path.realpath(p), p)
    return sorted(first.values())


# --- text checks -------------------------------------------------------------------------


def _as_text(raw: Any) -> tuple[str | None, str | None]:
    """(text, None) or (None, skip_reason) for a caption value of any origin."""
    if raw is None:
        return None, "missing_caption"
    if isinstance(raw, bytes):
        try:
            return raw.decode("utf-8"), None
        except UnicodeDecodeError:
            return None, "invalid_utf8"
    if not isinstance(raw, str):
        return None, "caption_not_text"
    if not _utf8_encodable(raw):
        return None, "invalid_utf8"
    return raw, None


def _utf8_encodable(text: str) -> bool:
    # JSON "\ud800" escapes decode to lone surrogates, which no UTF-8 consumer accepts
    # (the matcher and key hashing reject them): catch them here, per record.
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_key(key: str) -> tuple[str, str | None]:
    """(usable key, skip_reason or None): keys go one per line into kept_keys.txt and
    are hashed as UTF-8, so line breaks and lone surrogates make a record unusable."""
    if not _utf8_encodable(key):
        return key.encode("utf-8", "backslashreplace").decode("ascii"), "invalid_utf8"
    if "\n" in key or "\r" in key:
        return key.replace("\n", "\\n").replace("\r", "\\r"), "bad_key"
    return key, None


def _record(key: str, raw_caption: Any, sample: dict[str, Any], reason: str | None = None) -> Record:
    key, key_problem = _check_key(key)
    if reason is None:
        caption, reason = _as_text(raw_caption)
    else:
        caption = None
    if key_problem is not None and reason is None:
        caption, reason = None, key_problem
    return Record(key, caption, sample, reason)


# --- readers ---------------------------------------------------------------------------


def read_shard(path: str | os.PathLike, caption_key: str = "caption", key_field: str | None = None) -> Iterator[Record]:
    """Records of one shard in file order, the format from the suffix (module docstring)."""
    fmt = shard_format(path)
    if not os.path.isfile(path):
        raise missing_shard(path)
    if fmt == "tar":
        return _read_tar(Path(path), caption_key)
    if fmt == "parquet":
        return _read_parquet(Path(path), caption_key, key_field)
    return _read_jsonl(Path(path), caption_key, key_field)


# webdataset's naming rule (webdataset.tariterators.base_plus_ext: the key is the name
# up to the first dot of its last path component), restated here because importing
# webdataset imports torch (over a second per process); tests check the two agree.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")

# Members that belong to no sample (TarScan.ignored counts them by these names).
METADATA_MEMBER = "metadata_member"  # a __NAME__ key, e.g. __index__.json
NO_EXTENSION = "no_extension"  # no dot in the basename, a leading dot, or a trailing dot


def split_member_name(name: str) -> tuple[str | None, str | None]:
    """(key, extension) of a tar member name as webdataset groups it, or (None, None)."""
    if "/" not in name and name.startswith("__") and name.endswith("__"):
        return None, None
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2)) if match else (None, None)


def member_key(name: str) -> tuple[str, str] | tuple[None, str]:
    """The one key rule (module docstring): (key, lower-cased extension) of a sample
    member, or (None, why) for a member that belongs to no sample."""
    key, ext = split_member_name(name)
    base = (key if key is not None else name).rsplit("/", 1)[-1]
    if len(base) > 4 and base.startswith("__") and base.endswith("__"):
        return None, METADATA_MEMBER
    if key is None or not ext or key.endswith("/"):  # "dir/.hidden": webdataset's key "dir/"
        return None, NO_EXTENSION
    return key, ext.lower()


@dataclass
class TarGroup:
    """One webdataset sample as stored: its members (headers, and bytes when the scan
    reads data) in file order. `index`: its position among the shard's groups."""

    key: str
    index: int = 0
    members: list[tuple[tarfile.TarInfo, bytes | None]] = field(default_factory=list)
    exts: dict[str, tarfile.TarInfo] = field(default_factory=dict)  # lower-cased ext -> header
    damaged: bool = False
    _scan: TarScan | None = field(default=None, repr=False)

    def sample(self) -> dict[str, Any]:
        """{"__key__": key, ext: bytes} (webdataset's sample layout)."""
        sample: dict[str, Any] = {"__key__": self.key}
        for info, data in self.members:
            sample[member_key(info.name)[1]] = self._data(info, data)
        return sample

    def read(self, ext: str) -> bytes:
        """The bytes of member `ext`; on a header-only scan, only while the scan is at
        this group (the loader reads the members it needs and seeks over the rest)."""
        info = self.exts[ext]
        return self._data(info, next(d for i, d in self.members if i is info))

    def _data(self, info: tarfile.TarInfo, data: bytes | None) -> bytes:
        if data is not None:
            return data
        assert self._scan is not None
        return self._scan.read(info)


class TarScan:
    """Walks a tar's members, grouping them into samples (the one key rule) and
    resyncing past damage.

    Iterate for the `TarGroup`s; afterwards `tail_damage` says why the end was not
    reached cleanly (None if it was) and `ignored` counts members that belong to no
    sample. `read_data=False` parses headers only (member data is seeked over) and
    `TarGroup.read` fetches a member on demand. Every reader of tars uses this walk, so
    a record's index and key are the same for curate, cluster, train and eval.
    """

    def __init__(self, path: str | os.PathLike, read_data: bool = True) -> None:
        self.path = Path(path)
        self.read_data = read_data
        self.tail_damage: str | None = None
        self.ignored: Counter[str] = Counter()
        self._tf: tarfile.TarFile | None = None

    def _open(self) -> tarfile.TarFile:
        if not self.path.is_file():
            raise missing_shard(self.path)
        try:
            # Opened strictly: the first header must be valid, or this is not a tar.
            tf = tarfile.open(self.path, mode="r:")
        except (tarfile.TarError, OSError) as exc:
            raise ShardError(f"{self.path}: not a readable tar file ({exc})") from exc
        tf.ignore_zeros = True  # from here on, skip damaged headers block by block
        return tf

    def read(self, info: tarfile.TarInfo) -> bytes:
        """A member's bytes, read during the walk."""
        if self._tf is None:
            raise RuntimeError(f"{self.path}: member {info.name} read outside the walk")
        try:
            return self._tf.extractfile(info).read()  # type: ignore[union-attr]
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ShardError(f"{self.path}: member {info.name} cannot be read ({exc})") from exc

    def __iter__(self) -> Iterator[TarGroup]:
        size = self.path.stat().st_size if self.path.is_file() else 0
        with self._open() as tf, open(self.path, "rb") as raw:
            self._tf = tf
            try:
                yield from self._walk(tf, raw, size)
            finally:
                self._tf = None

    def _walk(self, tf: tarfile.TarFile, raw: IO[bytes], size: int) -> Iterator[TarGroup]:
        current: TarGroup | None = None
        index = 0
        damage_before_next = False
        expected = 0  # where the next header starts if nothing is damaged
        while True:
            try:
                info = tf.next()
            except (tarfile.TarError, OSError, EOFError) as exc:
                # A damaged extended (pax/GNU long-name) header, or data cut short.
                if tf.offset + tarfile.BLOCKSIZE >= size:
                    self.tail_damage = f"{type(exc).__name__}: {exc}"
                    break
                tf.offset += tarfile.BLOCKSIZE  # resync by hand, as ignore_zeros does
                continue
            if info is None:
                break
            tf.members = []  # tarfile keeps every header otherwise: memory grows per member
            gap_damaged = info.offset > expected and not _all_zero(raw, expected, info.offset)
            expected = tf.offset
            if gap_damaged:
                if current is not None:
                    current.damaged = True
                damage_before_next = True
            if not info.isreg():
                continue
            key, ext = member_key(info.name)
            if key is None:
                self.ignored[ext] += 1
                continue
            # A new key starts a sample; so does a repeated extension (webdataset would
            # raise there; we keep both records, with the same key).
            if current is None or current.key != key or ext in current.exts:
                if current is not None:
                    yield current
                    index += 1
                current = TarGroup(key, index, _scan=self)
                if damage_before_next:
                    current.damaged = True
            damage_before_next = False
            if info.offset_data + info.size > size:  # data cut short: a truncated file
                current.damaged = True
                self.tail_damage = f"member {info.name}: data cut short at byte {size}"
                break
            data = None
            if self.read_data:
                try:
                    data = tf.extractfile(info).read()  # type: ignore[union-attr]
                except (tarfile.TarError, OSError, EOFError) as exc:
                    current.damaged = True
                    self.tail_damage = f"member {info.name}: {type(exc).__name__}: {exc}"
                    break
            current.members.append((info, data))
            current.exts[ext] = info
        if self.tail_damage is None and not _all_zero(raw, expected, size):
            # Bytes after the last good member that are not end-of-archive padding.
            self.tail_damage = f"unreadable data from byte {expected} to {size}"
            if current is not None:
                current.damaged = True
        if current is not None:
            yield current


def _all_zero(raw: IO[bytes], start: int, end: int) -> bool:
    raw.seek(start)
    remaining = end - start
    while remaining > 0:
        block = raw.read(min(remaining, 1 << 20))
        if not block:
            return True  # past the end of the file: nothing there
        if block.strip(b"\0"):
            return False
        remaining -= len(block)
    return True


# --- what a job read and skipped ------------------------------------------------------------

CORRUPT_MEMBER = "corrupt_member"
CORRUPT_TAR_TAIL = "corrupt_tar_tail"  # a damaged shard end: counted per shard, not per sample


@dataclass
class ReadReport:
    """Samples a job read, and those it skipped by reason and by shard (every reader's
    one tally, so that train, eval and curate report skips alike)."""

    read: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    skipped_by_shard: dict[str, Counter[str]] = field(default_factory=dict)
    ignored_members: Counter[str] = field(default_factory=Counter)  # members of no sample

    def skip(self, shard: str | os.PathLike, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n
        self.skipped_by_shard.setdefault(str(shard), Counter())[reason] += n

    def clear(self) -> None:
        self.read = 0
        self.skipped.clear()
        self.skipped_by_shard.clear()
        self.ignored_members.clear()

    @property
    def skipped_total(self) -> int:
        """Samples skipped (a damaged shard end is not a sample)."""
        return sum(n for reason, n in self.skipped.items() if reason != CORRUPT_TAR_TAIL)

    def skips_dict(self) -> dict[str, Any]:
        """The skip counts as JSON-ready dicts (for data.json, results.json)."""
        out: dict[str, Any] = {
            "skipped_total": self.skipped_total,
            "skipped": dict(self.skipped),
            "skipped_by_shard": {s: dict(c) for s, c in self.skipped_by_shard.items()},
        }
        if self.ignored_members:
            out["ignored_members"] = dict(self.ignored_members)
        return out

    def describe(self) -> str:
        """One line: 'read N samples, skipped K (reason: n in shard, ...)'."""
        text = f"read {self.read:,} samples, skipped {self.skipped_total:,}"
        parts = [
            f"{reason} {n} in {Path(shard).name}"
            for shard, counts in self.skipped_by_shard.items()
            for reason, n in counts.items()
        ]
        return text + (f" ({'; '.join(parts)})" if parts else "")


def iter_samples(
    path: str | os.PathLike, report: ReadReport | None = None, read_data: bool = True
) -> Iterator[TarGroup]:
    """The undamaged samples of one tar, in file order; damaged ones (and a damaged end)
    are counted in `report` as corrupt_member / corrupt_tar_tail, never raised."""
    report = report if report is not None else ReadReport()
    scan = TarScan(path, read_data)
    damaged = 0
    for group in scan:
        if group.damaged:
            damaged += 1
            report.skip(path, CORRUPT_MEMBER)
            continue
        yield group
    if scan.tail_damage is not None:
        report.skip(path, CORRUPT_TAR_TAIL)
    report.ignored_members.update(scan.ignored)
    if damaged or scan.tail_damage is not None:
        log.warning(
            "%s: damaged tar: skipped %d sample(s)%s",
            path,
            damaged,
            f"; damaged end ({scan.tail_damage})" if scan.tail_damage else "",
        )


# --- wrong keys: name the key and what the records do have ------------------------------------


def read_key_list(path: str | os.PathLike, flag: str = "key list") -> set[str]:
    """A uid list, one key per line, as curate writes OUT/kept_keys.txt and dedup its
    kept_keys.txt (the format `train --keep-keys` and `curate --keep-keys` read): each line
    stripped of surrounding whitespace, blank lines ignored. InputError (one line naming
    `flag` and the file) when it is missing, not a file, unreadable or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        what = "not a file" if path.exists() else "file not found"
        raise InputError(f"{flag} {path}: {what} (curate writes OUT/kept_keys.txt)")
    try:
        with open(path, encoding="utf-8") as f:
            return {line.strip() for line in f if line.strip()}
    except UnicodeDecodeError as e:
        raise InputError(f"{flag} {path}: not UTF-8 text (byte {e.start}); expected one key per line") from None
    except OSError as e:
        raise InputError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None


class DataKeyError(InputError):
    """The image, caption or label key named by the user is not in the data."""


def describe_fields(sample: Mapping[str, Any]) -> str:
    """What a record holds, for an error about a key it lacks: a webdataset sample's
    members and its .json fields, or a jsonl object's fields."""
    if "__key__" not in sample:
        return "fields " + (", ".join(sorted(map(str, sample))) or "(none)")
    exts = sorted(k for k in sample if k != "__key__")
    text = "members " + (", ".join("." + e for e in exts) or "(none)")
    raw = sample.get("json")
    if isinstance(raw, (bytes, str)):
        try:
            meta = json.loads(raw)
        except ValueError:
            return text + " (its .json is not valid JSON)"
        if isinstance(meta, dict):
            text += "; .json fields " + (", ".join(sorted(map(str, meta))) or "(none)")
    return text


def sample_caption(sample: dict[str, Any], caption_key: str) -> tuple[str | None, str | None]:
    """(caption, None) or (None, skip_reason) for a webdataset sample: `--caption-key`'s one
    meaning in every job. The key names a member extension, else a field of the .json
    member, else (for the default "caption" only) the .txt member; bytes must be UTF-8."""
    raw, reason = _caption_from_sample(sample, caption_key)
    return (None, reason) if reason is not None else _as_text(raw)


def member_ext(key: str) -> str:
    """The member extension a user's key names. Tar members are read with lower-cased
    extensions (webdataset's rule), so a key is compared the same way, a leading dot
    allowed: "TXT", ".txt" and "txt" name one member."""
    return key.strip().lower().lstrip(".")


def _caption_from_sample(sample: dict[str, Any], caption_key: str) -> tuple[Any, str | None]:
    """(raw caption or None, None) or (None, skip_reason) for a webdataset sample."""
    member = member_ext(caption_key)
    if member and member in sample:
        return sample[member], None
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (ValueError, UnicodeDecodeError):
            return None, "bad_json"
        if isinstance(meta, dict) and caption_key in meta:
            return meta[caption_key], None
    if caption_key == "caption" and "txt" in sample:
        return sample["txt"], None
    return None, None


def lone_surrogate_caption(record: Record, caption_key: str, path: str | os.PathLike) -> str | None:
    """The caption of a record `read_shard` skipped as ``invalid_utf8`` only because its
    JSON text holds lone surrogates ("\\ud800" escapes), which MetaCLIP 2 matches on its
    other characters (mode_fast.curation.worldwide); None for any other record or skip (undecodable
    bytes, a bad key, parquet, whose strings are valid UTF-8 by construction)."""
    if record.skip_reason != "invalid_utf8" or not _utf8_encodable(record.key):
        return None
    sample = record.sample or {}
    fmt = shard_format(path)
    if fmt == "jsonl":
        raw = sample.get(caption_key)
    elif fmt == "tar":
        raw, reason = _caption_from_sample(sample, caption_key)
        if reason is not None:
            return None
    else:
        return None
    return raw if isinstance(raw, str) and not _utf8_encodable(raw) else None


def _read_tar(path: Path, caption_key: str) -> Iterator[Record]:
    scan = TarScan(path)
    for group in scan:
        sample = group.sample()
        if group.damaged:
            yield _record(group.key, None, sample, CORRUPT_MEMBER)
            continue
        raw, reason = _caption_from_sample(sample, caption_key)
        yield _record(group.key, raw, sample, reason)
    if scan.tail_damage is not None:
        # A pseudo-record carries the damage into the skip counts; it has no index in the
        # curated output (no sample behind it).
        yield Record("", None, {"__corrupt__": scan.tail_damage}, CORRUPT_TAR_TAIL)


def _pick_key_field(columns: Iterable[str], key_field: str | None, path: Path) -> str | None:
    columns = list(columns)
    if key_field is not None:
        if key_field not in columns:
            raise ShardError(f"{path}: key field {key_field!r} not found (columns: {', '.join(columns)})")
        return key_field
    return next((c for c in ("uid", "key") if c in columns), None)


def _open_parquet(path: Path) -> pq.ParquetFile:
    import pyarrow.parquet as pq  # lazily: tar-only runs never load pyarrow

    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise ShardError(f"{path}: not a readable parquet file ({exc})") from exc


def _read_parquet(path: Path, caption_key: str, key_field: str | None) -> Iterator[Record]:
    pf = _open_parquet(path)
    names = pf.schema_arrow.names
    if caption_key not in names:
        raise ShardError(f"{path}: caption column {caption_key!r} not found (columns: {', '.join(names)})")
    kf = _pick_key_field(names, key_field, path)
    row = 0
    columns = [caption_key] + ([kf] if kf and kf != caption_key else [])
    with contextlib.closing(pf):
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            captions = batch.column(caption_key).to_pylist()
            keys = batch.column(kf).to_pylist() if kf else [None] * len(captions)
            for caption, key in zip(captions, keys):
                yield _record(str(key) if key is not None else f"{path.stem}/{row}", caption, {})
                row += 1


def _open_lines(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def _jsonl_stem(path: Path) -> str:
    name = path.name
    return name[: -len(".jsonl.gz")] if name.endswith(".jsonl.gz") else path.stem


def _read_jsonl(path: Path, caption_key: str, key_field: str | None) -> Iterator[Record]:
    try:
        f = _open_lines(path)
    except OSError as exc:
        raise ShardError(f"{path}: cannot open ({exc})") from exc
    stem = _jsonl_stem(path)
    with f:
        for row, line in enumerate(_jsonl_lines(f, path)):
            fallback_key = f"{stem}/{row}"
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                yield Record(fallback_key, None, {}, "invalid_utf8")
                continue
            except ValueError:
                yield Record(fallback_key, None, {}, "bad_json")
                continue
            if not isinstance(obj, dict):
                yield Record(fallback_key, None, {}, "bad_json")
                continue
            # Per line, since jsonl has no schema; an explicit key_field missing from a
            # line falls back to <stem>/<row> like a pool without keys.
            kf = key_field or next((c for c in ("uid", "key") if c in obj), None)
            key = str(obj[kf]) if kf and obj.get(kf) is not None else fallback_key
            yield _record(key, obj.get(caption_key), obj)


def _jsonl_lines(f: IO[bytes], path: Path) -> Iterator[bytes]:
    """Non-blank lines; a gzip stream that cannot be read is a ShardError."""
    try:
        for line in f:
            if line.strip():
                yield line
    except (EOFError, gzip.BadGzipFile, OSError) as exc:
        raise ShardError(f"{path}: damaged gzip stream ({exc})") from exc


# --- writers: the kept records of a shard, in its own format ----------------------------


def write_kept(src: str | os.PathLike, dst: str | os.PathLike, keep: np.ndarray) -> int:
    """Copy the records of `src` with keep[i] True into `dst` (same format, atomically).

    `keep` is indexed like `read_shard(src)`'s records (the corrupt-tail pseudo-record
    excluded). Tar members are copied with their headers and bytes in original order,
    parquet rows with the same schema, jsonl lines as they are. Returns records written.
    """
    src, dst = Path(src), Path(dst)
    keep = np.asarray(keep, dtype=bool)
    fmt = shard_format(src)
    if fmt == "tar":
        return _write_kept_tar(src, dst, keep)
    if fmt == "parquet":
        return _write_kept_parquet(src, dst, keep)
    return _write_kept_jsonl(src, dst, keep)


def _write_kept_tar(src: Path, dst: Path, keep: np.ndarray) -> int:
    written = 0
    with atomic_write(dst) as out_f, tarfile.open(fileobj=out_f, mode="w:", format=tarfile.PAX_FORMAT) as out:
        for index, group in enumerate(TarScan(src)):
            if index < len(keep) and keep[index]:
                for info, data in group.members:
                    out.addfile(info, io.BytesIO(data))
                written += 1
    return written


def _write_kept_parquet(src: Path, dst: Path, keep: np.ndarray) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = _open_parquet(src)
    written = 0
    start = 0
    with contextlib.closing(pf), atomic_write(dst) as out_f:
        with pq.ParquetWriter(out_f, pf.schema_arrow) as writer:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
                mask = np.zeros(batch.num_rows, dtype=bool)
                part = keep[start : start + batch.num_rows]
                mask[: len(part)] = part
                start += batch.num_rows
                if mask.any():
                    table = pa.Table.from_batches([batch]).filter(pa.array(mask))
                    writer.write_table(table)
                    written += table.num_rows
    return written


def _write_kept_jsonl(src: Path, dst: Path, keep: np.ndarray) -> int:
    written = 0
    gz = str(dst).endswith(".gz")
    with _open_lines(src) as f, atomic_write(dst) as out_f:
        # mtime=0: the same kept lines give the same bytes on every run
        out: IO[bytes] = gzip.GzipFile(fileobj=out_f, mode="wb", mtime=0) if gz else out_f
        for index, line in enumerate(_jsonl_lines(f, src)):
            if index < len(keep) and keep[index]:
                out.write(line if line.endswith(b"\n") else line + b"\n")
                written += 1
        if gz:
            out.close()
    return written
