"""Where per-shard tasks run: local worker processes, or a Ray cluster (`--executor ray`).

`curate` and `cluster` cut their jobs into per-shard tasks: a task is a dict of plain values
naming a shard and where its output goes; it writes that output atomically (temporary name,
then rename) and returns small stats. An executor only decides where tasks run. Both
executors run the same task functions on the same inputs, so their outputs are byte-identical;
every reduction (entry counts, cluster sizes) is done by the driver from the per-shard
files, exactly (uint64 / int64), whatever ran the tasks and however often.

The Ray executor hands the tasks, one at a time, to a pool of actors. Each actor runs the
job's initializer once (loading the matcher, or pinning torch's threads; the centers and
embedder are then cached per actor), not per shard. The shards themselves are read by the
project's readers inside the actor, not by Ray Data's `read_webdataset`: those count a
corrupt tar member, undecodable text or a missing caption as a skip and go on, where a
generic reader fails the whole block. Ray restarts a dead actor and resubmits its shard
(max_restarts / max_task_retries = -1), so a killed worker costs only that shard's rerun;
a rerun rewrites the same file, and nothing is counted from results in flight, so nothing
is lost or counted twice. On a multi-node cluster the pool, the output folder and the
matcher file must be on storage every node sees.

Testing hook: MODE_FAST_FAULT="before|after:SUBSTRING:MARKER[;...]" makes the worker whose task
mentions SUBSTRING exit abruptly (os._exit) before or after running it, once per MARKER
file (created exclusively, so a retry runs normally). Tests use it to kill a worker mid-job.
"slow:SUBSTRING:SECONDS" makes such a task sleep first, so a test can signal the job mid-run.

Pool workers ignore SIGINT (Ctrl-C reaches the whole process group; the driver handles it,
see mode_fast.core.runs) and end with their driver however it ends: an exception or interrupt in
the driver terminates them, and a SIGKILLed driver takes them along (parent-death signal on
Linux, plus a thread watching the driver's pid).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from tqdm import tqdm

from mode_fast.core.config import option
from mode_fast.core.errors import ConfigError
from mode_fast.core.runs import die_with_parent, process_start

EXECUTORS = ("local", "ray")

Task = dict[str, Any]
TaskFn = Callable[[Task], Any]
Init = tuple[Callable[..., None], tuple] | None


def _maybe_fault(when: str, task: Task) -> None:
    spec = os.environ.get("MODE_FAST_FAULT")
    if not spec:
        return
    for fault in spec.split(";"):
        at, needle, marker = fault.split(":", 2)
        if at == "slow" and when == "before" and needle in repr(task):
            time.sleep(float(marker))  # a slow shard, so that a test can interrupt the job mid-run
            continue
        if at != when or needle not in repr(task):
            continue
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue  # already failed once: this is the retry
        os._exit(17)


# A worker's initializer error, raised by each of its tasks: the driver then gets it as it
# was raised, where a pool whose initializer raised reports only a broken pool (local) or a
# dead actor with the error's text (Ray).
_init_error: Exception | None = None


def _start_worker(init: Init) -> None:
    global _init_error
    try:
        _call_init(init)
    except Exception as exc:
        _init_error = exc


def _run_task(fn: TaskFn, task: Task) -> Any:
    if _init_error is not None:
        raise _init_error
    _maybe_fault("before", task)
    result = fn(task)
    _maybe_fault("after", task)
    return result


def _local_context() -> multiprocessing.context.BaseContext:
    # Not fork: the parent runs tqdm's monitor thread and maybe torch or matcher threads,
    # and forking a threaded process can deadlock the child.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method)


def _call_init(init: Init) -> None:
    if init is not None:
        init[0](*init[1])


def _die_with(driver_pid: int, driver_start: str | None, pdeathsig: bool) -> None:
    """Make this worker process end when the driver does, however the driver ends.

    A SIGKILLed driver runs no cleanup, so the worker watches for itself: the kernel's
    parent-death signal (Linux; the parent is the forkserver, which exits when the driver
    does, or the driver itself) and, as a fallback everywhere, a thread that exits the
    process once the driver's pid is gone or belongs to another process."""
    if pdeathsig and die_with_parent(signal.SIGKILL) and os.getppid() == 1:
        os._exit(1)  # the parent died before prctl: no signal will come

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if not _alive(driver_pid, driver_start):
                os._exit(1)

    threading.Thread(target=watch, name="mode-fast-driver-watch", daemon=True).start()


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or process_start(pid) in (None, start)


def _worker_start(init: bytes, driver_pid: int, driver_start: str | None, pdeathsig: bool) -> None:
    """Every pool worker's initializer: Ctrl-C is the driver's to handle (the terminal sends
    SIGINT to the whole process group; a worker that took it would print a traceback),
    the worker dies with the driver, then the job's own initializer runs. `init` comes
    pickled, so the job's module (torch...) is imported only after the worker is tied to
    the driver: a driver killed during that import takes the worker along."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with(driver_pid, driver_start, pdeathsig)
    _start_worker(pickle.loads(init))


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT while worker processes (and the forkserver) are created: a child
    started meanwhile inherits SIG_IGN and so never sees a Ctrl-C before its initializer."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _terminate(pool: ProcessPoolExecutor) -> None:
    """Stop the pool's workers now (an interrupt or error in the driver): what they were
    writing is a temporary the next run removes."""
    for p in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            p.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


class LocalExecutor:
    """Tasks in this process (workers <= 1) or in a pool of local worker processes."""

    name = "local"

    def __init__(self, workers: int = 1) -> None:
        self.workers = max(1, workers)

    def runs_inline(self, n_tasks: int) -> bool:
        """Whether `map` over n_tasks runs them in this process (no pool to start)."""
        return min(self.workers, n_tasks) <= 1

    def map(self, fn: TaskFn, tasks: Sequence[Task], init: Init = None, ordered: bool = False) -> Iterator[Any]:
        """Results as tasks finish (`ordered`: in task order). Leaving the loop early
        (or an exception) cancels the tasks not yet started and terminates the running ones."""
        if self.runs_inline(len(tasks)):
            _call_init(init)
            for task in tasks:
                yield _run_task(fn, task)
            return
        ctx = _local_context()
        main = threading.current_thread() is threading.main_thread()
        # The parent-death signal follows the thread that forks: safe from the forkserver
        # or this process's main thread, not from a thread that may end first.
        initargs = (
            pickle.dumps(init),
            os.getpid(),
            process_start(os.getpid()),
            main or ctx.get_start_method() == "forkserver",
        )
        pool = ProcessPoolExecutor(
            min(self.workers, len(tasks)), mp_context=ctx, initializer=_worker_start, initargs=initargs
        )
        complete = False
        try:
            with _sigint_ignored():
                if ctx.get_start_method() == "forkserver":
                    from multiprocessing import forkserver

                    forkserver.ensure_running()
                futures = [pool.submit(_run_task, fn, task) for task in tasks]
            for future in futures if ordered else as_completed(futures):
                yield future.result()
            complete = True
        finally:
            # Any other exit (an error, an interrupt, the caller stopping early) stops the
            # workers now rather than waiting for their running tasks.
            if complete:
                pool.shutdown(wait=True)
            else:
                _terminate(pool)

    def close(self) -> None:
        pass


class _RayShardWorker:
    """One actor of the pool: runs the initializer once, then the tasks it is given."""

    def __init__(self, fn: TaskFn, init: Init) -> None:
        _start_worker(init)
        self.fn = fn

    def ready(self) -> None:
        """Answers once the actor has started (its initializer has run)."""

    def run(self, task: Task) -> Any:
        return _run_task(self.fn, task)


@contextlib.contextmanager
def _handler_errors_unwrapped() -> Iterator[None]:
    """Ray's blocking calls run Python's signal handlers from inside their C code. An
    exception a handler raises (mode_fast.core.runs turns Ctrl-C into Interrupted) does not stop
    the call: it waits on, and the exception comes out when it returns, wrapped in a
    SystemError ("returned a result with an exception set"). Hence short waits, and this
    raises the handler's exception as is."""
    try:
        yield
    except SystemError as exc:
        if isinstance(exc.__cause__, Exception):
            raise exc.__cause__ from None
        raise


class RayExecutor:
    """Tasks on a Ray cluster: a pool of `workers` actors, one task in flight per actor.

    Connects to `address` (or RAY_ADDRESS), else starts a local Ray; a Ray already
    initialized in this process (a test's, a notebook's) is used as it is. workers=None:
    one actor per CPU of the cluster.

    Plain actors and `ray.wait`, not Ray Data: Ray Data's iterators leave threads behind
    (block prefetchers, executor threads of an iteration stopped early) that call into Ray
    after the map has returned; one that does so after `ray.shutdown()` makes Ray exit the
    whole process with status 1. Here nothing of Ray runs once `map` has returned."""

    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None) -> None:
        try:
            import ray
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigError("--executor ray needs Ray: pip install 'mode-fast[ray]'") from exc
        self._started = False
        if not ray.is_initialized():
            # log_to_driver off: workers' own logs stay in Ray's session folder; progress
            # is reported here, per finished shard.
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
            self._started = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = max(1, workers or cpus)

    def runs_inline(self, n_tasks: int) -> bool:
        return False  # always in actors

    def map(self, fn: TaskFn, tasks: Sequence[Task], init: Init = None, ordered: bool = False) -> Iterator[Any]:
        if not tasks:
            return
        import ray

        # A dead actor is restarted (its initializer runs again) and the task it held is
        # resubmitted to it, as often as it takes.
        worker = ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=-1)(_RayShardWorker)
        actors = [worker.remote(fn, init) for _ in range(min(self.workers, len(tasks)))]
        # An actor gets a task once it has started: actors the cluster has no CPU for yet
        # (more --workers than CPUs, or an autoscaler still adding nodes) hold no task back.
        starting = {actor.ready.remote(): actor for actor in actors}
        running: dict[Any, tuple[int, Any]] = {}  # result ref -> (task index, its actor)
        finished: dict[int, Any] = {}  # ordered: results waiting for an earlier task's
        submitted = emitted = 0

        def submit(actor: Any) -> None:
            nonlocal submitted
            if submitted < len(tasks):
                running[actor.run.remote(tasks[submitted])] = (submitted, actor)
                submitted += 1

        try:
            while running or submitted < len(tasks):
                ready: list[Any] = []
                while not ready:  # in short waits: see _handler_errors_unwrapped
                    with _handler_errors_unwrapped():
                        ready, _ = ray.wait([*running, *starting], num_returns=1, timeout=0.5)
                ref = ready[0]
                if ref in starting:
                    submit(starting.pop(ref))
                    continue
                index, actor = running.pop(ref)
                try:
                    with _handler_errors_unwrapped():
                        result = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    if isinstance(exc.cause, Exception):  # the task's own error, as the local executor raises it
                        raise exc.cause from exc
                    raise
                submit(actor)
                if not ordered:
                    yield result
                    continue
                finished[index] = result
                while emitted in finished:
                    yield finished.pop(emitted)
                    emitted += 1
        finally:
            # Any exit (done, an error, the caller stopping early) ends the pool now; tasks
            # still running are abandoned, and their shards' outputs are atomic.
            for actor in actors:
                ray.kill(actor)

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()


def make_executor(
    kind: str = "local", workers: int | None = 1, address: str | None = None
) -> LocalExecutor | RayExecutor:
    """kind 'local' (workers: processes, None = all cores) or 'ray' (workers: actors)."""
    if kind == "local":
        return LocalExecutor(max(1, os.cpu_count() or 1) if workers is None else workers)
    if kind == "ray":
        return RayExecutor(workers, address)
    raise ConfigError(f"unknown executor {kind!r}: use one of {', '.join(EXECUTORS)}")


def run_with_progress(
    executor: LocalExecutor | RayExecutor,
    fn: TaskFn,
    tasks: Sequence[Task],
    desc: str,
    init: Init = None,
    disable: bool | None = None,
    on_result: Callable[[Any], None] | None = None,
    unit: str = "shard",
) -> list[Any]:
    """All results (in completion order) with a progress bar of tasks (`unit`) and records/s
    (tasks that return a dict with 'records' count toward the rate); `on_result` is
    called with each result as it arrives (e.g. a RunState.track callback)."""
    results: list[Any] = []
    if not tasks:
        return results
    records, start = 0, time.perf_counter()
    with tqdm(total=len(tasks), desc=desc, unit=unit, disable=disable) as bar:
        for r in executor.map(fn, tasks, init):
            results.append(r)
            if on_result is not None:
                on_result(r)
            if isinstance(r, dict):
                records += int(r.get("records", 0))
            bar.set_postfix(records_per_s=f"{records / max(time.perf_counter() - start, 1e-9):,.0f}")
            bar.update()
    return results


def executor_option() -> Any:
    """A job config's ``executor`` field (``--executor``): where its shard tasks run. Not
    result-changing: both executors write the same outputs (module docstring)."""
    return option(
        "local",
        help="where shard tasks run: local processes (default) or a Ray cluster",
        result=False,
        choices=EXECUTORS,
    )


def ray_address_option() -> Any:
    """A job config's ``ray_address`` field (``--ray-address``), next to `executor_option`."""
    return option(
        None,
        help="Ray cluster to join with --executor ray (default: RAY_ADDRESS, else a local Ray)",
        result=False,
    )
