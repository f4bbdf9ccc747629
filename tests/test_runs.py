"""The job lifecycle (mode_fast.core.runs): the library rule, then curate and cluster as users run them.

Job tests run `python -m mode_fast.cli` in its own process group (as a shell runs it) and
signal it: SIGKILL at random moments, Ctrl-C to the group, SIGKILL of the driver alone.
MODE_FAST_FAULT="slow:SHARD:SECONDS" (mode_fast.core.executor) holds one shard's task, so a
run is reliably mid-way when signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mode_fast.core.errors import ConfigError, Interrupted, OutputError
from mode_fast.core.runs import LOCK, MANIFEST, OutputLocked, RunState, fingerprint

ROOT = Path(__file__).resolve().parents[1]


# --- the library rule -----------------------------------------------------------------------


def _open(out, **kw):
    kw.setdefault("inputs", {})
    kw.setdefault("args", {"--k": 1})
    return RunState.open(out, "job", **kw)


def test_fresh_run_then_continue_then_finished_noop(tmp_path):
    out = tmp_path / "out"
    with _open(out) as state:
        assert not state.resumed and not state.finished
        (out / "a.bin").write_bytes(b"a")
        state.mark_done("a", [out / "a.bin"])
    with _open(out) as state:  # a killed run's rerun: what was done stays done
        assert state.resumed and state.is_done("a") and not state.is_done("b") and not state.finished
        (out / "b.bin").write_bytes(b"b")
        state.mark_done("b", [out / "b.bin"])
        (out / "final").write_text("x")
        state.finish([out / "final"])
    with _open(out) as state:
        assert state.finished and state.is_done("a") and state.is_done("b")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["units"] == {"a": ["a.bin"], "b": ["b.bin"]} and manifest["outputs"] == ["final"]
    assert manifest["args"] == {"--k": 1} and manifest["code"].startswith("mode-fast ")


def test_manifest_is_deterministic(tmp_path):
    texts = []
    for name in ("one", "two"):
        out = tmp_path / name
        with _open(out, args={"--k": 3}) as state:
            state.mark_done("u")
            state.finish()
        texts.append((out / MANIFEST).read_text())
    assert texts[0] == texts[1]


def test_lost_unit_file_is_redone_and_a_lost_output_is_not_finished(tmp_path):
    out = tmp_path / "out"
    with _open(out) as state:
        for u in "ab":
            (out / u).write_text(u)
            state.mark_done(u, [out / u])
        (out / "final").write_text("x")
        state.finish([out / "final"])
    (out / "a").unlink()
    with _open(out) as state:
        assert not state.is_done("a") and state.is_done("b") and not state.finished
    (out / "a").write_text("a")
    (out / "final").unlink()
    with _open(out) as state:
        assert not state.finished


def test_changed_argument_stops_naming_it_or_recomputes_what_it_affects(tmp_path):
    out = tmp_path / "out"
    with _open(out, args={"--k": 1, "--seed": 0}) as state:
        for u in ("fit", "assign:0", "embed:0"):
            (out / u).write_text(u)
            state.mark_done(u, [out / u])
        state.finish()
    with pytest.raises(ConfigError) as err:
        _open(out, args={"--k": 2, "--seed": 0})
    msg = str(err.value)
    assert "\n" not in msg and "--k 1" in msg and "--k 2" in msg and "--overwrite" in msg and "another --out" in msg
    logged = []
    with _open(
        out, args={"--k": 1, "--seed": 5}, recompute={"--seed": ["fit", "assign:*"]}, log=logged.append
    ) as state:
        assert not state.is_done("fit") and not state.is_done("assign:0") and state.is_done("embed:0")
        assert not state.finished and state.changed == ["--seed"]
    assert not (out / "fit").exists() and not (out / "assign:0").exists() and (out / "embed:0").exists()
    assert any("--seed changed" in m for m in logged)
    # the stop left the lock free and the manifest as it was for the next run
    with _open(out, args={"--k": 1, "--seed": 5}) as state:
        assert state.is_done("embed:0")


def test_changed_input_is_named_with_its_path(tmp_path):
    src = tmp_path / "shard.tar"
    src.write_bytes(b"1234")
    out = tmp_path / "out"
    with _open(out, inputs={"s": fingerprint(src)}) as state:
        state.finish()
    src.write_bytes(b"123456")  # rewritten in place
    with pytest.raises(ConfigError, match=rf"input {re.escape(str(src))} \(changed\).*--overwrite"):
        _open(out, inputs={"s": fingerprint(src)})
    with pytest.raises(ConfigError, match=r"input .*shard.tar \(was removed\)"):
        _open(out, inputs={})
    with _open(out, inputs={"s": fingerprint(src)}, recompute=lambda field: ["*"]) as state:
        assert not state.finished


def test_new_code_version_stops_or_recomputes_and_many_changes_log_briefly(tmp_path, monkeypatch):
    from mode_fast.core import runs

    out = tmp_path / "out"
    with _open(out, inputs={f"s{i}": i for i in range(10)}) as state:
        state.finish()
    monkeypatch.setattr(runs, "code_version", lambda: "mode-fast 9.9")
    with pytest.raises(ConfigError, match=r"made by mode-fast \S+, this is mode-fast 9.9: rerun with --overwrite"):
        _open(out, inputs={f"s{i}": i for i in range(10)})
    logged = []
    with _open(out, inputs={f"s{i}": -i for i in range(10)}, recompute=lambda f: ["*"], log=logged.append):
        pass
    assert len(logged) == 4 and logged[-1] == "job: and 7 more changed inputs or arguments"


def test_overwrite_removes_owned_outputs_and_starts_over(tmp_path):
    out = tmp_path / "out"
    with _open(out) as state:
        (out / "data").mkdir()
        (out / "data" / "x").write_text("x")
        (out / "mine.txt").write_text("keep")
        state.mark_done("u", [out / "data" / "x"])
        state.finish()
    with _open(out, args={"--k": 2}, overwrite=True, owned=["data"]) as state:
        assert not state.resumed and not state.is_done("u")
    assert not (out / "data").exists() and (out / "mine.txt").read_text() == "keep"


def test_other_job_in_the_folder_stops(tmp_path):
    with _open(tmp_path / "out") as state:
        state.finish()
    with pytest.raises(ConfigError, match="holds a job run, not train"):
        RunState.open(tmp_path / "out", "train", inputs={}, args={})


def test_stale_temporaries_are_removed_when_the_lock_is_taken(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / ".x.npy.abc.tmp").write_bytes(b"half")
    with _open(out):
        assert not (out / "sub" / ".x.npy.abc.tmp").exists()


def test_lock_names_the_holder_and_a_dead_holder_never_blocks(tmp_path):
    out = tmp_path / "out"
    with (
        _open(out),
        pytest.raises(OutputLocked, match=rf"in use by pid {os.getpid()} on \S+ \(started .*\).*another --out"),
    ):
        _open(out)
    # a holder killed with SIGKILL: the kernel drops its flock, the next run takes over
    code = (
        "import sys, time; from mode_fast.core.runs import RunState; "
        "s = RunState.open(sys.argv[1], 'job', inputs={}, args={'--k': 1}); print('held', flush=True); "
        "time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, env=_env(), text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLocked, match=f"pid {holder.pid}"):
            _open(out)
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((out / LOCK).read_text())["pid"] == holder.pid  # its name is still there...
    with _open(out) as state:  # ...but nobody holds it
        assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
        state.finish()
    assert (out / LOCK).read_text() == ""  # released: no holder named


def test_interrupts_raise_one_line_naming_the_unit(tmp_path):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    for sig in (signal.SIGINT, signal.SIGTERM):
        with _open(tmp_path / "out") as state, pytest.raises(Interrupted) as err, state.interrupts():
            step = state.track("assign", 10, 2)
            step()
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the handler raises before this ends
        assert str(err.value) == "interrupted at assign (3/10 shards); rerun the same command to continue"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_unwritable_out_is_one_line_naming_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match=re.escape(str(blocker / "out"))):
        _open(blocker / "out")


# --- helpers for the job tests --------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("MODE_FAST_FAULT", None)
    return env | extra


def _start(args, fault: str | None = None) -> subprocess.Popen:
    """The CLI in its own process group, like a shell job (Ctrl-C reaches the whole group)."""
    env = _env(**({"MODE_FAST_FAULT": fault} if fault else {}))
    return subprocess.Popen(
        [sys.executable, "-m", "mode_fast.cli", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _run(args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mode_fast.cli", *map(str, args)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _wait_for(cond, timeout: float = 120, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _holds_lock(out: Path, pid: int) -> bool:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((out / LOCK).read_text()).get("pid") == pid
    return False


def _children() -> dict[int, int]:
    """pid -> parent pid of every process."""
    table = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                table[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
    return table


def _descendants(pid: int) -> set[int]:
    table, found, frontier = _children(), set(), {pid}
    while frontier:
        frontier = {c for c, p in table.items() if p in frontier} - found
        found |= frontier
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its parent's wait is missing


def _outputs(out: Path, skip=(".work", LOCK)) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and not set(skip) & set(p.relative_to(out).parts) and p.name != "summary.json"
    }


def _one_line(stderr: str) -> list[str]:
    """stderr without progress-bar and logging lines."""
    return [line for line in stderr.splitlines() if line.startswith("mode-fast ")]


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """The sample pool: 2,000 pairs in 8 tar shards."""
    root = tmp_path_factory.mktemp("sample")
    r = _run(["sample", "--out", root, "--num-pairs", "2000", "--shard-size", "250", "--eval-pairs", "10"])
    assert r.returncode == 0, r.stderr
    return root / "pool"


def _check_interrupt_kill_and_concurrency(
    job_args, out: Path, slow_shard: str, reference: dict[str, bytes], job: str, compare
) -> None:
    """Shared by curate and cluster: two concurrent runs, Ctrl-C, driver SIGKILL with workers."""
    fault = f"slow:{slow_shard}:60"
    # 1. a second run on the same --out stops at once, naming the holder
    first = _start([*job_args, "--out", out], fault)
    try:
        _wait_for(lambda: _holds_lock(out, first.pid), what="the first run's lock")
        t0 = time.monotonic()
        second = _run([*job_args, "--out", out], timeout=120)
        assert second.returncode == 2
        lines = _one_line(second.stderr)
        assert len(lines) == 1 and f"is in use by pid {first.pid} on " in lines[0] and "started" in lines[0], (
            second.stderr
        )
        assert time.monotonic() - t0 < 60  # at once: it did not wait for the 60 s shard
        # 2. Ctrl-C (SIGINT to the whole group, as a terminal sends it) once workers are busy
        _wait_for(lambda: len(_descendants(first.pid)) >= 3, what="worker processes")
        time.sleep(1.0)
        os.killpg(first.pid, signal.SIGINT)
        _, err = first.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 130, err
    assert "Traceback" not in err and "Error" not in err, err
    lines = _one_line(err)
    assert len(lines) == 1 and re.fullmatch(
        rf"mode-fast {job}: interrupted at .+; rerun the same command to continue", lines[0]
    ), err

    # 3. SIGKILL of the driver alone: its workers end with it
    run = _start([*job_args, "--out", out], fault)
    try:
        _wait_for(lambda: len(_descendants(run.pid)) >= 3, what="worker processes")
        time.sleep(1.0)
        workers = _descendants(run.pid)
        os.kill(run.pid, signal.SIGKILL)
        run.wait(timeout=30)
        t0 = time.monotonic()
        while any(_running(p) for p in workers) and time.monotonic() - t0 < 10:
            time.sleep(0.2)
        left = [p for p in workers if _running(p)]
        assert not left, f"{len(left)} of {len(workers)} worker processes still running 10 s after the driver died"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
        run.communicate()

    # 4. the rerun continues to what an unbroken run writes
    final = _run([*job_args, "--out", out])
    assert final.returncode == 0, final.stderr
    compare(reference, out)


def _kill_at_random_moments(job_args, out: Path, kills: int, window: tuple[float, float]) -> list[float]:
    rng = random.Random()
    moments = [round(rng.uniform(*window), 2) for _ in range(kills)]
    for moment in moments:
        run = _start([*job_args, "--out", out])
        try:
            run.wait(timeout=moment)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
        run.communicate()
    return moments


# --- curate -------------------------------------------------------------------------------------


def _curate_args(pool: Path, *extra) -> list:
    return ["curate", pool, "--t", "5", "--workers", "2", *extra]


def _same_curation(reference: dict[str, bytes], out: Path) -> None:
    assert _outputs(out) == reference


@pytest.fixture(scope="module")
def curated(pool, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("curate-ref") / "out"
    r = _run([*_curate_args(pool), "--out", out])
    assert r.returncode == 0, r.stderr
    return _outputs(out)


def test_curate_killed_at_random_moments_then_rerun_is_identical(pool, curated, tmp_path):
    out = tmp_path / "out"
    moments = _kill_at_random_moments(_curate_args(pool), out, kills=3, window=(0.5, 6.0))
    r = _run([*_curate_args(pool), "--out", out])
    assert r.returncode == 0, (moments, r.stderr)
    assert _outputs(out) == curated, f"killed at {moments} s"
    assert not list(out.rglob("*.tmp"))


def test_curate_concurrent_run_interrupt_and_driver_kill(pool, curated, tmp_path):
    _check_interrupt_kill_and_concurrency(
        _curate_args(pool), tmp_path / "out", "pool-000003", curated, "curate", _same_curation
    )


def test_curate_rerun_unchanged_is_a_noop_and_a_changed_argument_recomputes(pool, curated, tmp_path):
    out = tmp_path / "out"
    assert _run([*_curate_args(pool), "--out", out]).returncode == 0
    again = _run([*_curate_args(pool), "--out", out])
    assert again.returncode == 0 and "nothing to do" in again.stderr
    seed = _run([*_curate_args(pool, "--seed", "3"), "--out", out])
    assert seed.returncode == 0 and "--seed changed since the run in" in seed.stderr
    fresh = tmp_path / "fresh"
    assert _run([*_curate_args(pool, "--seed", "3"), "--out", fresh]).returncode == 0
    assert _outputs(out, skip=(".work", LOCK, "manifest.json", MANIFEST)) == _outputs(
        fresh, skip=(".work", LOCK, "manifest.json", MANIFEST)
    )


# --- cluster --------------------------------------------------------------------------------------


def _cluster_args(pool: Path, *extra, workers: int = 2) -> list:
    """Outputs do not depend on --workers (tests/test_cluster.py): in-process runs use one."""
    return [
        "cluster",
        *sorted(pool.glob("*.tar")),
        "--fine-k",
        "16",
        "--experts",
        "4",
        "--sample",
        "1500",
        "--embedder",
        "hash32",
        "--no-progress",
        "--workers",
        str(workers),
        *extra,
    ]


def _same_clustering(reference: dict[str, bytes], out: Path) -> None:
    assert _outputs(out) == reference


@pytest.fixture(scope="module")
def clustered(pool, tmp_path_factory) -> dict[str, bytes]:
    from mode_fast.cli import main

    out = tmp_path_factory.mktemp("cluster-ref") / "out"
    assert main([str(a) for a in _cluster_args(pool, workers=1)] + ["--out", str(out)]) == 0
    return _outputs(out)


def test_cluster_killed_at_random_moments_then_rerun_is_identical(pool, clustered, tmp_path):
    out = tmp_path / "out"
    moments = _kill_at_random_moments(_cluster_args(pool), out, kills=3, window=(2.0, 12.0))
    r = _run([*_cluster_args(pool), "--out", out])
    assert r.returncode == 0, (moments, r.stderr)
    assert _outputs(out) == clustered, f"killed at {moments} s"


def test_cluster_concurrent_run_interrupt_and_driver_kill(pool, clustered, tmp_path):
    _check_interrupt_kill_and_concurrency(
        _cluster_args(pool), tmp_path / "out", "pool-000003", clustered, "cluster", _same_clustering
    )


def _main(args, capsys, caplog) -> tuple[int, str]:
    """The CLI in this process (torch is already imported here: much faster than a new
    one); returns its exit code and its stderr plus what it logged."""
    from mode_fast.cli import main

    capsys.readouterr()
    caplog.clear()
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err + caplog.text


def test_cluster_changed_argument_stops_and_overwrite_starts_over(pool, clustered, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    assert _main([*_cluster_args(pool, workers=1), "--out", out], capsys, caplog)[0] == 0
    rc, err = _main([*_cluster_args(pool, workers=1), "--out", out], capsys, caplog)
    assert rc == 0 and "nothing to do" in err
    for flag in (["--niter", "3"], ["--no-balanced"], ["--sample", "1000"]):
        rc, err = _main([*_cluster_args(pool, *flag, workers=1), "--out", out], capsys, caplog)
        lines = _one_line(err)
        assert (
            rc == 2
            and len(lines) == 1
            and f"made with {flag[0].replace('no-', '')}" in lines[0]
            and "--overwrite" in lines[0]
        ), err
    assert _outputs(out) == clustered  # nothing was touched
    rc, err = _main([*_cluster_args(pool, "--niter", "3", "--overwrite", workers=1), "--out", out], capsys, caplog)
    assert rc == 0, err
    fresh = tmp_path / "fresh"
    assert _main([*_cluster_args(pool, "--niter", "3", workers=1), "--out", fresh], capsys, caplog)[0] == 0
    assert _outputs(out) == _outputs(fresh)


def test_cluster_shard_rewritten_in_place_is_recomputed(pool, tmp_path, capsys, caplog):
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(pool, shards)
    out = tmp_path / "out"
    assert _main([*_cluster_args(shards, workers=1), "--out", out], capsys, caplog)[0] == 0
    # rewrite shard 1 in place with shard 5's records (other captions, other keys)
    (shards / "pool-000001.tar").write_bytes((shards / "pool-000005.tar").read_bytes())
    rc, err = _main([*_cluster_args(shards, workers=1), "--out", out], capsys, caplog)
    assert rc == 0 and "pool-000001.tar (changed) since the run in" in err, err
    fresh = tmp_path / "fresh"
    assert _main([*_cluster_args(shards, workers=1), "--out", fresh], capsys, caplog)[0] == 0
    assert _outputs(out) == _outputs(fresh)
    # a shard removed from the list: its files go, the rest is what a fresh run writes
    args = _cluster_args(shards, workers=1)
    args.remove(shards / "pool-000007.tar")
    rc, err = _main([*args, "--out", out], capsys, caplog)
    assert rc == 0 and "was removed" in err, err
    assert not any("pool-000007" in name for name in _outputs(out))


# --- full and read-only disks ----------------------------------------------------------------------


@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, check=False)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): " + r.stderr.decode().strip())
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.skipif(sys.platform != "linux", reason="tmpfs mounts")
def test_read_only_out_is_one_line_naming_the_path(pool, tmp_path):
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        for args in (_curate_args(pool), _cluster_args(pool)):
            r = _run([*args, "--out", ro / "out"])
            lines = _one_line(r.stderr)
            assert r.returncode == 2 and len(lines) == 1, r.stderr
            assert f"cannot write {ro / 'out'}" in lines[0] and "read-only file system" in lines[0], r.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="tmpfs mounts")
@pytest.mark.parametrize("size", ["2m", "22m"])  # full while writing the matcher (18 MB); the curated shards
def test_full_disk_names_the_path_leaves_nothing_half_written_and_rerun_completes(pool, curated, tmp_path, size):
    with _tmpfs(tmp_path / "disk", f"size={size}") as disk:
        out = disk / "out"
        r = _run([*_curate_args(pool), "--out", out])
        lines = _one_line(r.stderr)
        assert r.returncode == 2 and len(lines) == 1 and "no space left on device" in lines[0], r.stderr
        assert f"cannot write {out}" in lines[0]
        assert not list(out.rglob("*.tmp"))  # no temporary left
        assert not (out / "manifest.json").exists()  # nothing claims a finished curation
        # space freed: the rerun completes to what an unbroken run writes
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        r = _run([*_curate_args(pool), "--out", out])
        assert r.returncode == 0, r.stderr
        assert _outputs(out) == curated


@pytest.mark.skipif(sys.platform != "linux", reason="tmpfs mounts")
def test_cluster_full_disk_names_the_path_and_rerun_completes(pool, clustered, tmp_path, capsys, caplog):
    with _tmpfs(tmp_path / "disk", "size=160k") as disk:  # the embeddings alone are 256 kB
        out = disk / "out"
        rc, err = _main([*_cluster_args(pool, workers=1), "--out", out], capsys, caplog)
        lines = _one_line(err)
        assert rc == 2 and len(lines) == 1 and "no space left on device" in lines[0], err
        assert f"cannot write {out}" in lines[0]
        assert not list(out.rglob("*.tmp"))
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        rc, err = _main([*_cluster_args(pool, workers=1), "--out", out], capsys, caplog)
        assert rc == 0, err
        assert _outputs(out) == clustered
