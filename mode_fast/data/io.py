"""Readers and writers for the pools users have: webdataset tars, parquet, jsonl.

Every reader yields one `Record` per sample in file order, bad ones included (with a
`skip_reason`), so that a record's index in its shard is stable between passes: the
curation's second pass re-reads a shard and keeps records by index, which avoids holding
raw samples in memory and keeps the curated shard byte-for-byte the same as the input.

Caption lookup (``caption_key``):
- webdataset: a member extension (``txt``, ``caption``...) if the sample has it; else a
  field of the ``.json`` member; else, for the default ``caption``, the ``.txt`` member.
- parquet / jsonl: the column / field of that name.
Record keys: webdataset ``__key__``; parquet/jsonl the ``key_field`` column (default
``uid`` if present, else ``key``), or ``<shard stem>/<row>`` when there is none (that
last form depends on how the pool is sharded; sampling keyed on it does too).
"""
from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

SHARD_SUFFIXES = (".tar", ".parquet", ".jsonl", ".jsonl.gz")
GLOB_CHARS = set("*?[")


class ShardError(RuntimeError):
    """A shard that cannot be read at all (missing, not that format, no caption column)."""


@dataclass
class Record:
    key: str
    caption: str | None
    sample: dict[str, Any] = field(default_factory=dict)
    skip_reason: str | None = None  # set when caption is None: why the record is skipped


# --- paths ---------------------------------------------------------------------------


def shard_format(path: str | os.PathLike) -> str:
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


def list_shards(patterns: Iterable[str | os.PathLike]) -> list[Path]:
    """Files, folders (searched recursively) and glob/brace patterns -> sorted shard paths."""
    found: set[Path] = set()
    for pattern in patterns:
        matched: list[Path] = []
        for item in _expand_braces(str(pattern)):
            if GLOB_CHARS & set(item):
                matched += [Path(p) for p in glob.glob(item, recursive=True)]
            elif os.path.isdir(item):
                matched += [p for p in Path(item).rglob("*") if p.is_file() and str(p).endswith(SHARD_SUFFIXES)]
            elif os.path.exists(item):
                matched.append(Path(item))
            else:
                raise ShardError(f"{item}: no such file or folder")
        shards = [p for p in matched if str(p).endswith(SHARD_SUFFIXES)]
        if not shards:
            raise ShardError(f"{pattern}: matches no shard ({', '.join(SHARD_SUFFIXES)})")
        found.update(p.resolve() for p in shards)
    return sorted(found)


# --- atomic output ---------------------------------------------------------------------


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()  # mkstemp makes 0600 files; outputs get the usual mode


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write to a temporary name beside `path`, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_write(path) as f:
        np.save(f, array)


# --- readers ---------------------------------------------------------------------------


def read_shard(path: str | os.PathLike, caption_key: str = "caption", key_field: str | None = None) -> Iterator[Record]:
    fmt = shard_format(path)
    if not os.path.isfile(path):
        raise ShardError(f"{path}: no such file")
    if fmt == "tar":
        return _read_tar(Path(path), caption_key)
    if fmt == "parquet":
        return _read_parquet(Path(path), caption_key, key_field)
    return _read_jsonl(Path(path), caption_key, key_field)


def _split_member_name(name: str) -> tuple[str | None, str | None]:
    from webdataset.tariterators import base_plus_ext  # webdataset's rule for key vs extension

    return base_plus_ext(name)


class TarStats:
    """Bytes left unread after the last good member: a corrupt header stops tarfile silently."""

    def __init__(self) -> None:
        self.corrupt_tail: str | None = None


def iter_tar_samples(path: Path, stats: TarStats | None = None) -> Iterator[dict[str, bytes | str]]:
    """Raw webdataset samples {"__key__": key, ext: bytes}, consecutive members grouped by key."""
    try:
        tf = tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError) as exc:
        raise ShardError(f"{path}: not a readable tar file ({exc})") from exc
    current: dict[str, Any] | None = None
    with tf:
        while True:
            try:
                info = tf.next()
                if info is None:
                    break
                if not info.isreg():
                    continue
                key, ext = _split_member_name(info.name)
                data = tf.extractfile(info).read()  # type: ignore[union-attr]
            except (tarfile.TarError, OSError, EOFError) as exc:
                if stats is not None:
                    stats.corrupt_tail = f"{type(exc).__name__}: {exc}"
                break
            if key is None or ext is None:
                continue  # a member webdataset would not group either (no extension)
            if current is not None and (current["__key__"] != key or ext in current):
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[ext] = data
        # tarfile ends quietly at a damaged header; anything but zero padding after
        # the last member it read means records were lost.
        if stats is not None and stats.corrupt_tail is None:
            end = tf.offset
            with open(path, "rb") as raw:
                raw.seek(end)
                rest = raw.read()
            if rest.strip(b"\0"):
                stats.corrupt_tail = f"unreadable data after byte {end} ({len(rest)} bytes not parsed)"
    if current is not None:
        yield current


def _caption_from_sample(sample: dict[str, Any], caption_key: str) -> tuple[str | None, str | None]:
    """(caption, None) or (None, skip_reason)."""
    raw: Any = None
    if caption_key in sample:
        raw = sample[caption_key]
    elif "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (ValueError, UnicodeDecodeError):
            return None, "bad_json"
        if isinstance(meta, dict) and caption_key in meta:
            raw = meta[caption_key]
    if raw is None and caption_key == "caption" and "txt" in sample:
        raw = sample["txt"]
    if raw is None:
        return None, "missing_caption"
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, "invalid_utf8"
    if not isinstance(raw, str):
        return None, "caption_not_text"
    return raw, None


def _read_tar(path: Path, caption_key: str) -> Iterator[Record]:
    stats = TarStats()
    for sample in iter_tar_samples(path, stats):
        caption, reason = _caption_from_sample(sample, caption_key)
        yield Record(str(sample["__key__"]), caption, sample, reason)
    if stats.corrupt_tail is not None:
        # One pseudo-record carries the damage into the skip counts; it has no index in
        # the curated output (the writer never sees it, its samples were unreadable).
        yield Record("", None, {"__corrupt__": stats.corrupt_tail}, "corrupt_tar_tail")


def _pick_key_field(columns: Iterable[str], key_field: str | None, path: Path) -> str | None:
    columns = list(columns)
    if key_field is not None:
        if key_field not in columns:
            raise ShardError(f"{path}: key field {key_field!r} not found (columns: {', '.join(columns)})")
        return key_field
    return next((c for c in ("uid", "key") if c in columns), None)


def _read_parquet(path: Path, caption_key: str, key_field: str | None) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise ShardError(f"{path}: not a readable parquet file ({exc})") from exc
    names = pf.schema_arrow.names
    if caption_key not in names:
        raise ShardError(f"{path}: caption column {caption_key!r} not found (columns: {', '.join(names)})")
    kf = _pick_key_field(names, key_field, path)
    row = 0
    columns = [caption_key] + ([kf] if kf and kf != caption_key else [])
    for batch in pf.iter_batches(batch_size=65536, columns=columns):
        captions = batch.column(caption_key).to_pylist()
        keys = batch.column(kf).to_pylist() if kf else [None] * len(captions)
        for caption, key in zip(captions, keys):
            key = str(key) if key is not None else f"{path.stem}/{row}"
            if caption is None:
                yield Record(key, None, {}, "missing_caption")
            elif not isinstance(caption, str):
                yield Record(key, None, {}, "caption_not_text")
            else:
                yield Record(key, caption, {}, None)
            row += 1


def _open_text_lines(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def _read_jsonl(path: Path, caption_key: str, key_field: str | None) -> Iterator[Record]:
    try:
        f = _open_text_lines(path)
    except OSError as exc:
        raise ShardError(f"{path}: cannot open ({exc})") from exc
    with f:
        for row, line in enumerate(_jsonl_lines(f, path)):
            fallback_key = f"{path.stem}/{row}"
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
            kf = key_field or next((c for c in ("uid", "key") if c in obj), None)
            key = str(obj[kf]) if kf and obj.get(kf) is not None else fallback_key
            caption = obj.get(caption_key)
            if caption is None:
                yield Record(key, None, {}, "missing_caption")
            elif not isinstance(caption, str):
                yield Record(key, None, {}, "caption_not_text")
            else:
                yield Record(key, caption, {}, None)


def _jsonl_lines(f: IO[bytes], path: Path) -> Iterator[bytes]:
    """Non-blank lines; a gzip stream cut short ends the shard with a ShardError."""
    try:
        for line in f:
            if line.strip():
                yield line
    except (EOFError, gzip.BadGzipFile, OSError) as exc:
        raise ShardError(f"{path}: damaged gzip stream ({exc})") from exc


# --- writers: the kept records of a shard, in its own format ----------------------------


def write_kept(src: str | os.PathLike, dst: str | os.PathLike, keep: np.ndarray) -> int:
    """Copy the records of `src` whose index has keep[i] True into `dst` (same format, atomic).

    `keep` is indexed like `read_shard(src)`'s records (the corrupt-tail pseudo-record
    excluded). Returns the number of records written.
    """
    src, dst = Path(src), Path(dst)
    fmt = shard_format(src)
    if fmt == "tar":
        return _write_kept_tar(src, dst, keep)
    if fmt == "parquet":
        return _write_kept_parquet(src, dst, keep)
    return _write_kept_jsonl(src, dst, keep)


def _write_kept_tar(src: Path, dst: Path, keep: np.ndarray) -> int:
    # Members are copied with their original headers (names, times, modes) and bytes.
    written = 0
    with tarfile.open(src, mode="r:") as tf, atomic_write(dst) as out_f:
        with tarfile.open(fileobj=out_f, mode="w:", format=tarfile.GNU_FORMAT) as out:
            index = -1
            current_key: str | None = None
            current_exts: set[str] = set()
            while True:
                try:
                    info = tf.next()
                except (tarfile.TarError, OSError, EOFError):
                    break  # the reader counted this damage already
                if info is None:
                    break
                if not info.isreg():
                    continue
                key, ext = _split_member_name(info.name)
                if key is None or ext is None:
                    continue
                if key != current_key or ext in current_exts:
                    index += 1
                    current_key, current_exts = key, set()
                    if index < len(keep) and keep[index]:
                        written += 1
                current_exts.add(ext)
                if index < len(keep) and keep[index]:
                    try:
                        data = tf.extractfile(info).read()  # type: ignore[union-attr]
                    except (tarfile.TarError, OSError, EOFError):
                        break
                    out.addfile(info, io.BytesIO(data))
    return written


def _write_kept_parquet(src: Path, dst: Path, keep: np.ndarray) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(src)
    written = 0
    start = 0
    with atomic_write(dst) as out_f:
        writer = pq.ParquetWriter(out_f, pf.schema_arrow)
        try:
            for batch in pf.iter_batches(batch_size=65536):
                mask = keep[start : start + batch.num_rows]
                start += batch.num_rows
                if mask.any():
                    table = pa.Table.from_batches([batch]).filter(pa.array(mask))
                    writer.write_table(table)
                    written += table.num_rows
        finally:
            writer.close()
    return written


def _write_kept_jsonl(src: Path, dst: Path, keep: np.ndarray) -> int:
    written = 0
    gz = str(dst).endswith(".gz")
    with _open_text_lines(src) as f, atomic_write(dst) as out_f:
        out: IO[bytes] = gzip.GzipFile(fileobj=out_f, mode="wb", mtime=0) if gz else out_f
        for index, line in enumerate(_jsonl_lines(f, src)):
            if index < len(keep) and keep[index]:
                out.write(line if line.endswith(b"\n") else line + b"\n")
                written += 1
        if gz:
            out.close()
    return written
