"""The one error family for what a user can cause, and the one CLI handler's contract.

Anything a user can cause (a missing or damaged file, a wrong flag or key, a full or
read-only `--out`) raises a `ModeFastError` subclass whose message is one line naming the
file, flag or sample. The CLI (`mode_fast.cli`) prints it as ``mode-fast JOB: error: ...``
and exits 2; ``--debug`` shows the traceback. Library callers catch the family or a member.
Bugs stay ordinary exceptions, so they keep their tracebacks.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil

EXIT_USAGE = 2  # argparse's code for bad usage; every user-caused error exits with it
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


class ModeFastError(Exception):
    """A user-caused problem; `str(err)` is one line naming the file, flag or sample."""


class ConfigError(ModeFastError, ValueError):
    """A flag or argument value that cannot work (``--fine-k 0``, a missing `--data`)."""


class InputError(ModeFastError, ValueError):
    """Input data that cannot be read or does not hold what was asked for."""


class OutputError(ModeFastError, OSError):
    """An output that cannot be written (unwritable or full `--out`)."""


class Interrupted(ModeFastError):
    """SIGINT/SIGTERM reached a job; the message says how to continue."""


def output_error(path: str | os.PathLike, exc: BaseException) -> OutputError:
    """An `OutputError` naming `path` and the reason in words a user acts on. Some writers
    (numpy into a file object, native code) report no errno; then the cause is read from
    the disk's state, so call this before any cleanup frees space."""
    code = getattr(exc, "errno", None)
    if code is None:
        folder = os.path.dirname(os.path.abspath(os.fspath(path)))
        with contextlib.suppress(OSError):
            if shutil.disk_usage(folder).free < (1 << 20):
                code = errno.ENOSPC
            elif not os.access(folder, os.W_OK):
                code = errno.EACCES
    reason = {
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
    }.get(code or 0, getattr(exc, "strerror", None) or str(exc))
    return OutputError(f"cannot write {os.fspath(path)}: {reason}")


class StepFailed(ModeFastError):
    """A job that another job ran as its own process (the demo's steps) failed; that
    process has already printed why."""
