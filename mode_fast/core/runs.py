"""The job lifecycle, once for every job: run manifest, output-folder lock, interrupts.

The rule (README, "Reruns, kills and interrupts"):

- Each output folder holds ``run.json``: the job, the inputs (path, size, mtime), the
  arguments that change results, the code version, and the units of work that are done
  (each with the files it wrote, relative to the folder). It is written atomically at the
  start of a run, as units finish, and at the end; it holds no time or pid, so two runs
  that did the same work leave the same file.
- Rerunning the same command continues: done units whose files still exist are skipped.
- A rerun whose inputs or arguments differ either recomputes what the changed field
  invalidates (the job says which units, per field; their files are removed) or stops
  with one line naming the field and the way out (``--overwrite``, or another ``--out``).
- A finished job rerun unchanged is a no-op that says so.
- One run per folder: ``.lock`` is held with ``flock`` for the whole run, and names its
  holder (pid, host, start time) for the message a second run stops with. The kernel
  drops the lock when the holder dies, however it dies, so a killed run never blocks the
  next one; the file itself stays. Only a run that created the folder and then failed
  before doing anything removes it again (`RunState.abandon`): it unlinks the file while it
  still holds the lock, and a run that locked the unlinked file meanwhile sees that its
  file is no longer the folder's and takes the lock again, so two runs never hold two
  files.
- A refused run leaves nothing behind: a fresh run that fails before its first unit
  removes its run.json, and, when it created the folder, its lock and the folder itself
  if nothing else is in it.
- The file lists in run.json are data: every path is checked with `mode_fast.core.files.inside`
  when run.json is read, before anything is removed; one that lies outside the folder
  stops the run with one line, and nothing is deleted.
- SIGINT/SIGTERM become `Interrupted` ("interrupted at assign (3/10 shards); rerun the
  same command to continue"); the CLI prints it as one line and exits 130.
- Everything is written through `mode_fast.core.files`, so a full or read-only disk is one
  `OutputError` naming the path and leaves no half-written file; temporaries a killed
  run left are removed when the next run takes the lock (no other writer can exist then).

Usage (a job's driver)::

    with RunState.open(out, "cluster", inputs={sid: fingerprint(p)}, args={"--niter": 25},
                       recompute=lambda field: ...) as state, state.interrupts():
        if state.finished: ...                       # a no-op rerun
        for unit in units:
            if not state.is_done(unit): ...; state.mark_done(unit, files)
        state.finish(files)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from mode_fast import __version__
from mode_fast.core.errors import ConfigError, Interrupted, ModeFastError, output_error
from mode_fast.core.files import START_OVER, inside, remove_stale_temporaries, write_json

__all__ = [
    "LOCK",
    "MANIFEST",
    "OutputLock",
    "OutputLocked",
    "RunState",
    "StopRequest",
    "code_version",
    "die_with_parent",
    "fingerprint",
    "interrupts_as_error",
    "interrupts_deferred",
    "process_start",
    "recorded_finished",
]

MANIFEST = "run.json"
LOCK = ".lock"
FORMAT = 1
FLUSH_SECONDS = 2.0  # done units are written at most this often (and at the end): a lost mark only redoes a unit

Log = Callable[[str], None]
# field -> unit patterns (fnmatch) its change invalidates, or None: stop and name the field
Recompute = Callable[[str], "Iterable[str] | None"] | dict[str, list[str]] | None


class OutputLocked(ConfigError):
    """Another run holds the output folder."""


def code_version() -> str:
    """The code version recorded in run.json (the package version; deterministic)."""
    return f"mode-fast {__version__}"


def fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """The one input fingerprint: path, size and mtime. A file rewritten in place changes it."""
    st = os.stat(path)
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


# --- the lock ------------------------------------------------------------------------------


def process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot; Linux; None elsewhere),
    which tells a live process from another that reused its pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Have the kernel send `sig` to this process when the thread that started it ends,
    however it ends (Linux; False elsewhere). It survives exec: a driver sets it in a child
    between fork and exec (subprocess's preexec_fn) so that the child dies with it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class OutputLock:
    """An exclusive, non-blocking flock on OUT/.lock whose body names the holder."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK
        self._fd: int | None = None
        self.created: list[Path] = []  # the folders acquire() made, deepest first

    def acquire(self) -> None:
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise output_error(self.path, exc) from exc
                raise OutputLocked(
                    f"{self.path.parent} is in use by {self._holder()}: wait for it to finish, or use another --out"
                ) from None
            # A run that gave its folder back unlinked the file we opened before it let go:
            # a lock on that file locks nothing, so take the folder's file again.
            try:
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        # Held: name ourselves. Written in place (a rename would swap the locked inode).
        body = json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "proc_start": process_start(os.getpid()),
            }
        ).encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, body, 0)
        except OSError as exc:
            os.close(fd)
            raise output_error(self.path, exc) from exc
        self._fd = fd

    def _open(self) -> int:
        folder, missing = self.path.parent, []
        while not folder.exists() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise output_error(self.path, exc) from exc
        self.created = self.created or missing
        return fd

    def _holder(self) -> str:
        try:
            h = json.loads(self.path.read_text())
            return f"pid {h['pid']} on {h['host']} (started {h['started']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another run (its lock names no holder yet)"

    def release(self, remove: bool = False) -> None:
        """Let go of the folder. `remove`: a run that created the folder and did nothing in
        it gives it back: the lock file goes while still held (see the module doc), then the
        folders acquire() made, those left empty."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)  # no stale holder named; the file stays (see module doc)
        remove = remove and bool(self.created)
        if remove:
            with contextlib.suppress(OSError):
                self.path.unlink()
        os.close(self._fd)  # closing drops the flock
        self._fd = None
        for folder in self.created if remove else []:
            try:
                folder.rmdir()
            except OSError:  # not empty (another run's lock, files of this run): it stays
                break


# --- interrupts ------------------------------------------------------------------------------


@contextlib.contextmanager
def interrupts_as_error(where: Callable[[], str]) -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` naming `where()` (main thread only; elsewhere
    the signals keep their handlers). The previous handlers come back on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        # Once: a second signal during cleanup falls back to the default (KeyboardInterrupt / exit).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Interrupted(f"interrupted at {where()}; rerun the same command to continue")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class StopRequest:
    """Set by `interrupts_deferred`: the signal that asked the job to stop, or None."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[StopRequest]:
    """SIGINT and SIGTERM only set the yielded `StopRequest`, for a loop that must stop at
    a consistent point (train saves a checkpoint between steps, then raises `Interrupted`).
    A second signal acts at once (KeyboardInterrupt / default), so a stuck step can still
    be stopped. Main thread only; the previous handlers come back on exit."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum: int, frame: Any) -> None:
        request.signal = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# --- the run manifest ------------------------------------------------------------------------


def recorded_finished(out_dir: str | os.PathLike, job: str | None = None, output: str | None = None) -> bool:
    """Whether OUT/run.json records a finished run (of `job`, when given, with `output`
    among its outputs, when given) whose outputs are all there. Read without the lock, for
    a driver deciding whether to start a job at all and for eval judging a train folder (a
    job, if started, reconciles run.json itself)."""
    out = Path(out_dir)
    try:
        data = RunState._read(out)
    except ModeFastError:  # damaged, foreign or naming files outside: the job, if started, says so
        return False
    if not data or not data.get("finished") or (job is not None and data.get("job") != job):
        return False
    outputs = data.get("outputs", [])
    return (output is None or output in outputs) and _all_exist(out, outputs)


def _all_exist(out: Path, files: Iterable[str]) -> bool:
    return all(inside(out, f, out / MANIFEST).exists() for f in files)


def _check_files(out: Path, data: dict[str, Any]) -> None:
    """Every file run.json lists, checked before any is touched (`mode_fast.core.files.inside`)."""
    path = out / MANIFEST
    units, outputs = data.get("units", {}), data.get("outputs", [])
    if not isinstance(units, dict) or not all(isinstance(f, list) for f in units.values()):
        raise ConfigError(f"{path}: its units are not lists of files: {START_OVER}")
    if not isinstance(outputs, list):
        raise ConfigError(f"{path}: its outputs are not a list of files: {START_OVER}")
    for f in [*(f for files in units.values() for f in files), *outputs]:
        inside(out, f, path)


def _describe(field: str, value: Any) -> str:
    if value is None:
        return "none" if not field.startswith("input ") else "absent"
    if isinstance(value, dict) and "size" in value:
        return f"{value['size']} bytes, mtime_ns {value.get('mtime_ns')}"
    return json.dumps(value) if not isinstance(value, str) else value


class RunState:
    """One job's run in one output folder: lock held, manifest loaded and reconciled.

    Attributes: `finished` (the previous run finished with the same inputs and arguments
    and its files are there: the job has nothing to do), `changed` (fields that differ
    from the previous run), `resumed` (a previous run of this configuration existed).
    """

    def __init__(
        self, out: Path, job: str, inputs: dict[str, Any], args: dict[str, Any], lock: OutputLock, log: Log
    ) -> None:
        self.out, self.job, self.inputs, self.args = out, job, inputs, args
        self.lock, self.log = lock, log
        self.units: dict[str, list[str]] = {}
        self.outputs: list[str] = []
        self.finished = False
        self.resumed = False
        self.changed: list[str] = []
        self._last_flush = 0.0
        self._dirty = False
        self.where = "start"  # for the interrupt message; see track()
        self.defaults: dict[str, Any] = {}  # see open()
        self._abandoned = False  # see abandon()
        self._before: set[str] = set()  # the folder's entries when the run began (see __exit__)

    # -- opening ----------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        out_dir: str | os.PathLike,
        job: str,
        *,
        inputs: dict[str, Any],
        args: dict[str, Any],
        recompute: Recompute = None,
        overwrite: bool = False,
        owned: Iterable[str] = (),
        log: Log | None = None,
        defaults: dict[str, Any] | None = None,
    ) -> RunState:
        """Lock `out_dir` and reconcile its run.json with this run (see the module doc).

        inputs: name -> fingerprint (JSON); args: flag -> value (JSON), the result-changing
        ones only. recompute: for a changed field ("--niter", "input NAME", "code"), the
        unit patterns it invalidates, or None to stop naming the field. overwrite: forget
        the previous run and remove `owned` (the job's output files and folders, relative
        to `out_dir`), so everything is redone. defaults: flag -> value for arguments a job
        records only when not at that value (fields added after older run.json files were
        written); messages name the value instead of "none".
        Raises OutputLocked, ConfigError (a changed field the job cannot recompute),
        OutputError (the folder cannot be written)."""
        out = Path(out_dir)
        lock = OutputLock(out)
        lock.acquire()
        state = cls(
            out, job, json.loads(json.dumps(inputs)), json.loads(json.dumps(args)), lock, log or (lambda msg: None)
        )
        state.defaults = dict(defaults or {})
        try:
            old = None if overwrite else cls._read(out)  # its file lists checked before anything is removed
            remove_stale_temporaries(out)  # a killed run's half-written files; we hold the lock
            if overwrite:
                state._remove_owned(owned)
            state._reconcile(old, recompute)
            state._before = set(os.listdir(out))  # what a run that writes nothing leaves as it found
            state._write()
        except BaseException:
            if lock.created:  # nothing was there before this run: the folder goes again
                state.abandon()
            state.close()
            raise
        return state

    @staticmethod
    def _read(out: Path) -> dict[str, Any] | None:
        path = out / MANIFEST
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            # Written atomically, so damage is not ours: say so rather than guess.
            raise ConfigError(
                f"{path} cannot be read ({exc}): rerun with --overwrite to start over, or use another --out"
            ) from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConfigError(
                f"{path} is not a mode-fast {FORMAT} run manifest: rerun with --overwrite "
                "to start over, or use another --out"
            )
        _check_files(out, data)
        return data

    def _fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"code": code_version()}
        fields.update(self.args)
        fields.update({f"input {k}": v for k, v in self.inputs.items()})
        return fields

    def _reconcile(self, old: dict[str, Any] | None, recompute: Recompute) -> None:
        if old is None:
            return
        if old.get("job") != self.job:
            raise ConfigError(
                f"{self.out} holds a {old.get('job')} run, not {self.job}: use another --out "
                "(or --overwrite to start over)"
            )
        previous = (
            {"code": old.get("code")}
            | old.get("args", {})
            | {f"input {k}": v for k, v in old.get("inputs", {}).items()}
        )
        now = self._fields()
        self.changed = sorted(f for f in previous.keys() | now.keys() if previous.get(f) != now.get(f))
        units: dict[str, list[str]] = dict(old.get("units", {}))
        patterns = {field: _lookup(recompute, field) for field in self.changed}
        for field, pats in patterns.items():  # stop before anything is touched
            if pats is None:
                raise ConfigError(self._stop_message(field, previous.get(field), now.get(field)))
        invalid = {u for pats in patterns.values() for u in units if any(fnmatch.fnmatchcase(u, p) for p in pats)}
        names = [self._field_name(f, previous.get(f), now.get(f)) for f in self.changed]
        for name in names[:3]:  # a re-copied pool changes every input: a few names, then a count
            self.log(
                f"{self.job}: {name}{'' if name.endswith(')') else ' changed'} since the run in {self.out}: "
                "recomputing what it affects"
            )
        if len(names) > 3:
            self.log(f"{self.job}: and {len(names) - 3} more changed inputs or arguments")
        for unit in sorted(invalid):
            self._remove_files(units.pop(unit))
        missing = [u for u, files in units.items() if not _all_exist(self.out, files)]
        for unit in missing:
            del units[unit]
        if missing:
            self.log(f"{self.job}: {len(missing)} done units lost files since the last run: redoing them")
        self.units = units
        self.resumed = True
        outputs = list(old.get("outputs", []))
        self.finished = bool(old.get("finished")) and not self.changed and not missing and _all_exist(self.out, outputs)
        if self.finished:
            self.outputs = outputs

    def _field_name(self, field: str, old: Any, new: Any) -> str:
        if field.startswith("input "):
            path = (new or old or {}).get("path", field[6:]) if isinstance(new or old, dict) else field[6:]
            what = "was added" if old is None else "was removed" if new is None else "changed"
            return f"input {path} ({what})"
        return field

    def _stop_message(self, field: str, old: Any, new: Any) -> str:
        way_out = "rerun with --overwrite to start over, or use another --out"
        if field == "code":
            return f"{self.out} holds a {self.job} run made by {old}, this is {new}: {way_out}"
        if field.startswith("input "):
            return f"{self.out} holds a {self.job} run whose {self._field_name(field, old, new)}: {way_out}"
        if field in self.defaults:  # not recorded means recorded at the default
            old = self.defaults[field] if old is None else old
            new = self.defaults[field] if new is None else new
        return (
            f"{self.out} holds a {self.job} run made with {field} {_describe(field, old)}, this run has "
            f"{field} {_describe(field, new)}: {way_out}"
        )

    def _remove_owned(self, owned: Iterable[str]) -> None:
        for name in [MANIFEST, *owned]:
            path = self.out / name
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            except OSError as exc:
                raise output_error(path, exc) from exc

    def _remove_files(self, files: Iterable[str]) -> None:
        for f in files:
            path = inside(self.out, f, self.out / MANIFEST)
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise output_error(path, exc) from exc

    # -- units ------------------------------------------------------------------------------
    def is_done(self, unit: str) -> bool:
        return unit in self.units

    def rel(self, path: str | os.PathLike) -> str:
        """`path` relative to the output folder, as run.json records it."""
        return os.path.relpath(Path(path), self.out)

    def mark_done(self, unit: str, files: Iterable[str | os.PathLike] = ()) -> None:
        """Record `unit` as done with the files it wrote (already complete on disk).
        Written to run.json at most every FLUSH_SECONDS and at the end."""
        self.units[unit] = sorted(self.rel(f) for f in files)
        self._dirty = True
        if time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def forget(self, pattern: str) -> list[str]:
        """Un-done the units matching `pattern` and remove their files; returns them."""
        hit = [u for u in self.units if fnmatch.fnmatchcase(u, pattern)]
        for unit in hit:
            self._remove_files(self.units.pop(unit))
        if hit:
            self.finished = False
            self.flush()
        return hit

    def abandon(self) -> None:
        """A fresh run that failed before doing any unit leaves no run.json, so a corrected
        command is not stopped by the arguments of a run that did nothing; when this run
        created the folder, `close` removes its lock and the folder itself if nothing else is
        in it, so a refused job leaves nothing behind. (Call before close.)"""
        if not self.resumed and not self.units and not self.finished:
            with contextlib.suppress(OSError):
                (self.out / MANIFEST).unlink()
            self._dirty = False
            self._abandoned = True

    def flush(self) -> None:
        if self._dirty:
            self._write()

    def finish(self, files: Iterable[str | os.PathLike] = ()) -> None:
        """The job is complete; `files` are its final outputs (checked on the next rerun)."""
        self.outputs = sorted(self.rel(f) for f in files)
        self.finished = True
        self._write()

    def _write(self) -> None:
        write_json(
            self.out / MANIFEST,
            {
                "format": FORMAT,
                "job": self.job,
                "code": code_version(),
                "inputs": self.inputs,
                "args": self.args,
                "units": dict(sorted(self.units.items())),
                "outputs": self.outputs,
                "finished": self.finished,
            },
        )
        self._dirty = False
        self._last_flush = time.monotonic()

    # -- progress and interrupts --------------------------------------------------------------
    def track(self, stage: str, total: int, done: int = 0, unit: str = "shards") -> Callable[[Any], None]:
        """A callback for each finished unit of `stage`, which keeps the interrupt message
        ("assign (3/10 shards)") current."""
        count = [done]
        self.where = f"{stage} ({done}/{total} {unit})"

        def step(_result: Any = None) -> None:
            count[0] += 1
            self.where = f"{stage} ({count[0]}/{total} {unit})"

        return step

    def interrupts(self) -> contextlib.AbstractContextManager[None]:
        return interrupts_as_error(lambda: self.where)

    # -- closing --------------------------------------------------------------------------------
    def close(self) -> None:
        """Record what is done and release the folder. Temporaries left by workers that an
        error or interrupt stopped mid-write are removed first (no writer is left, and the
        lock is still ours), so nothing half-written stays behind."""
        try:
            with contextlib.suppress(ModeFastError):  # a full disk must not hide the first error
                self.flush()
            with contextlib.suppress(OSError):
                remove_stale_temporaries(self.out)
        finally:
            self.lock.release(remove=self._abandoned)

    def __enter__(self) -> RunState:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        # A job that stops on a user-caused error before writing anything but run.json and
        # .lock abandons the run (and gives back a folder it made), whether or not it records
        # its progress as units (curate keeps its own stamps): a refused job leaves nothing.
        if isinstance(exc, ModeFastError) and not self._abandoned:
            with contextlib.suppress(OSError):
                if set(os.listdir(self.out)) <= self._before | {MANIFEST, LOCK}:
                    self.abandon()
        self.close()


def _lookup(recompute: Recompute, field: str) -> Iterable[str] | None:
    if recompute is None:
        return None
    if callable(recompute):
        return recompute(field)
    for pattern, units in recompute.items():
        if fnmatch.fnmatchcase(field, pattern):
            return units
    return None
