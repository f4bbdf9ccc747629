"""Atomic output: the one writer every job and library module uses for its files.

A file is written to a temporary name beside its target (``.<name>.<random>.tmp``, which
`remove_stale_temporaries` finds after a kill), flushed and fsynced, given the mode the
umask gives any other new file (mkstemp would leave 0600), renamed over the target, and
the folder is fsynced so the rename survives a power cut. A reader sees the old file or
the whole new one, never half of one. A full or read-only disk raises `OutputError`
naming the path, with the temporary removed. `sha256_file` is the one hash of a
file's bytes (curate's stamps and manifest).

A path read from a file (run.json's file lists, curate's stamps, a sample's shard list) is
data like the rest of that file: `inside` is the one way such a path becomes a file to
read, write or delete, and it refuses any that would lie outside the folder it names files
in (an absolute path elsewhere, a ``..`` escape, a symlink leading out).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from mode_fast.core.errors import InputError, ModeFastError, output_error

TMP_SUFFIX = ".tmp"
START_OVER = "rerun with --overwrite to start over, or use another --out"


def default_file_mode() -> int:
    """The mode `open()` would give a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = default_file_mode()


def temporary_name(path: str | os.PathLike) -> Path:
    """A fresh temporary path beside `path` with the name the cleanup looks for
    (for writers that must open the file themselves, e.g. native code)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Finish an atomic write whose bytes are already in `tmp`: fsync, set the
    umask's mode, rename over `path`, fsync the folder."""
    tmp, path = Path(tmp), Path(path)
    try:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except OSError as exc:
        error = output_error(path, exc)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise error from exc
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary beside `path` for writing; on a clean exit it replaces `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise output_error(path, exc) from exc
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException as exc:
        # the cause first: the cleanup below frees the space a full disk is judged by
        error = output_error(path, exc) if isinstance(exc, OSError) and not isinstance(exc, ModeFastError) else None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if error is not None:
            raise error from exc
        raise
    _fsync_dir(path.parent)


def write_with(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Atomically write `path` with `write(f)` on a binary file object
    (``torch.save``, ``np.savez``, a pickle...)."""
    with atomic_write(path, "wb") as f:
        write(f)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def save_npy(path: str | os.PathLike, array: Any) -> None:
    import numpy as np

    with atomic_write(path) as f:
        np.save(f, array)


def save_npz(path: str | os.PathLike, **arrays: Any) -> None:
    import numpy as np

    with atomic_write(path) as f:
        np.savez(f, **arrays)


def inside(root: str | os.PathLike, path: Any, manifest: str | os.PathLike, way_out: str = START_OVER) -> Path:
    """`path`, as read from the file `manifest`, joined onto `root`, the folder whose files
    `manifest` lists. Resolved (symlinks followed, ``..`` applied) it must lie strictly inside
    `root` resolved; otherwise `InputError`, one line naming `manifest` and `path`, so that
    nothing outside the job's folder is ever read, written or deleted on a file's say-so.
    The joined path is returned unresolved: a listed file that is itself a symlink into the
    folder is removed as the link, never as its target."""
    root = Path(root)
    if isinstance(path, str) and path and "\0" not in path:
        top = os.path.realpath(root)
        real = os.path.realpath(root / path)
        if real.startswith(top.rstrip(os.sep) + os.sep):
            return root / path
    raise InputError(f"{manifest} lists {path!r}, which lies outside {root}: {way_out}")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete the temporaries a killed run left under `folder`; returns how many."""
    removed = 0
    for p in Path(folder).rglob(f".*{TMP_SUFFIX}"):
        if p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed += 1
    return removed
