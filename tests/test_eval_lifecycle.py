"""`mode-fast eval` under the one run lifecycle (mode_fast.core.runs): SIGKILL at random writes
(before and after each rename), Ctrl-C, a second run on the same --out, a finished rerun,
and reruns with a changed argument, a retrained checkpoint and a changed code version, each
against an unbroken run of the same command."""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_evaluate import env, eval_cli, save_random_model  # noqa: F401  (env: fixture)

from mode_fast import cli
from mode_fast.core import runs
from mode_fast.core.runs import LOCK, MANIFEST

ROOT = Path(__file__).resolve().parents[1]

# An eval process that stops itself at its Nth os.replace (every atomic write ends with one):
# "before": SIGKILL with the temporary written and not renamed; "after": SIGKILL with the
# file renamed and not yet recorded in run.json; "stall": touch STALL_MARK and sleep (holding
# the lock) until a signal comes.
KILLER = textwrap.dedent("""
    import os, signal, sys, time
    from mode_fast import cli
    mode, n = sys.argv[1], int(sys.argv[2])
    real, calls = os.replace, [0]
    def replace(src, dst, *a, **k):
        calls[0] += 1
        if calls[0] == n and mode == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        if calls[0] == n and mode == "stall":
            open(os.environ["STALL_MARK"], "w").close()
            time.sleep(300)
        out = real(src, dst, *a, **k)
        if calls[0] == n and mode == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    os.replace = replace
    sys.exit(cli.main(["eval", *sys.argv[3:]]))
""")
WRITES = 17  # an unbroken run's atomic writes here: 10 units, 5 outputs, run.json at least twice


def _tasks(env: dict[str, Path]) -> list[str]:
    return ["--data", f"sample={env['sample']}", "--retrieval", f"pool={env['sample'] / 'pool'}"]


def _cli_args(env: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """What eval_cli passes, for a subprocess."""
    return ["--run", str(env["run"]), "--clusters", str(env["clusters"]), "--out", str(out), "--batch-size", "16",
            *_tasks(env), *extra]  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, **extra)


def _files(out: Path, with_mtime: bool = False) -> dict[str, object]:
    """Every file but the lock, by path under `out`: its bytes (and mtime but run.json's)."""
    return {
        str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns if with_mtime and p.name != MANIFEST else 0)
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != LOCK
    }


def _one_line(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("mode-fast ")]


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unbroken") / "out"
    assert eval_cli(env, out, *_tasks(env)) == 0
    return out


def _same_as(reference: Path, out: Path) -> None:
    """The same files, byte for byte: results.json, results.md, the plots, the stored
    scores and run.json (which holds no time or pid); no temporaries."""
    want, got = _files(reference), _files(out)
    assert sorted(got) == sorted(want)
    assert [name for name in want if got[name] != want[name]] == []
    assert not [p for p in out.rglob(".*") if p.name != LOCK]


def test_sigkill_at_random_writes_then_rerun_is_identical(env, reference, tmp_path):
    out = tmp_path / "out"
    rng = random.Random()
    kills = [(mode, rng.randint(1, WRITES)) for mode in ("before", "after")]  # named if the test fails
    codes = []
    for mode, n in kills:
        p = subprocess.run([sys.executable, "-c", KILLER, mode, str(n), *_cli_args(env, out)], env=_env(),
                           capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
        codes.append(p.returncode)
        assert p.returncode in (-signal.SIGKILL, 0), (kills, p.stderr[-2000:])
    assert codes[0] == -signal.SIGKILL, (kills, codes)  # a fresh run writes more than WRITES files
    assert eval_cli(env, out, *_tasks(env)) == 0, kills
    _same_as(reference, out)


def test_sigint_a_second_run_and_a_finished_rerun(env, reference, tmp_path, capsys, caplog):
    out, mark = tmp_path / "out", tmp_path / "stalled"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLER, "stall", "3", *_cli_args(env, out)],  # stalls at its second unit
        env=_env(STALL_MARK=str(mark)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not mark.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.05)
        # a second run on the same --out stops at once, naming the holder
        t0 = time.monotonic()
        assert eval_cli(env, out, *_tasks(env)) == 2
        lines = _one_line(capsys.readouterr().err)
        assert time.monotonic() - t0 < 30
        assert len(lines) == 1 and f"{out} is in use by pid {proc.pid} on " in lines[0], lines
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    lines = _one_line(stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert lines[0] == "mode-fast eval: interrupted at scoring sample (task 1/2); rerun the same command to continue"

    # the same command continues to the unbroken run's files
    assert eval_cli(env, out, *_tasks(env)) == 0
    _same_as(reference, out)

    # a finished evaluation rerun is a no-op that says so
    before = _files(out, with_mtime=True)
    with caplog.at_level(logging.WARNING, logger="mode_fast.evaluation.run"):
        assert eval_cli(env, out, *_tasks(env)) == 0
    assert "already holds this evaluation" in caplog.text and "nothing to do" in caplog.text
    assert _files(out, with_mtime=True) == before
    assert "mode_ensemble" in capsys.readouterr().out  # the table, printed again


def _unit_mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "scores").rglob("*.npz")}


def test_changed_argument_recombines_and_retrained_checkpoint_rescores(env, reference, tmp_path, caplog):
    out = tmp_path / "out"
    shutil.copytree(reference, out)  # copy2: the units keep their mtimes
    units = _unit_mtimes(out)
    assert len(units) == 10  # (2 tasks x 4 models) + 2 weights

    # --ensemble-inputs changes only how stored scores combine: no unit is recomputed
    assert eval_cli(env, out, *_tasks(env), "--ensemble-inputs", "scaled") == 0
    assert _unit_mtimes(out) == units
    fresh = tmp_path / "fresh_scaled"
    assert eval_cli(env, fresh, *_tasks(env), "--ensemble-inputs", "scaled") == 0
    _same_as(fresh, out)

    # a retrained expert: its scores on both tasks are recomputed, nothing else
    run = tmp_path / "run"
    shutil.copytree(env["run"], run)
    out = tmp_path / "out_run"
    assert eval_cli(env, out, *_tasks(env), run=run) == 0
    units = _unit_mtimes(out)
    save_random_model(run / "expert_1" / "checkpoints" / "final.pt", 7)
    with caplog.at_level(logging.WARNING, logger="mode_fast.evaluation.run"):
        assert eval_cli(env, out, *_tasks(env), run=run) == 0
    assert "expert_1/checkpoints/final.pt (changed) since the run in" in caplog.text
    now = _unit_mtimes(out)
    assert sorted(k for k in units if now[k] != units[k]) == ["scores/pool/model-expert_1.npz",
                                                               "scores/sample/model-expert_1.npz"]  # fmt: skip
    fresh = tmp_path / "fresh_run"
    assert eval_cli(env, fresh, *_tasks(env), run=run) == 0
    _same_as(fresh, out)


def test_changed_code_version_stops_and_overwrite_starts_over(env, reference, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = _files(out, with_mtime=True)
    monkeypatch.setattr(runs, "__version__", "0.0.test")
    assert eval_cli(env, out, *_tasks(env)) == 2
    lines = _one_line(capsys.readouterr().err)
    assert len(lines) == 1 and "made by mode-fast " in lines[0] and "this is mode-fast 0.0.test" in lines[0]
    assert "--overwrite" in lines[0]
    assert _files(out, with_mtime=True) == before
    assert eval_cli(env, out, *_tasks(env), "--overwrite") == 0
    monkeypatch.undo()
    want, got = _files(reference), _files(out)
    assert sorted(got) == sorted(want) and [k for k in want if got[k] != want[k]] == [MANIFEST]  # its code field


def test_unwritable_out_is_one_line_naming_the_path(env, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert cli.main(["eval", *_cli_args(env, blocker / "out")]) == 2
    lines = _one_line(capsys.readouterr().err)
    assert len(lines) == 1 and f"cannot write {blocker / 'out'}" in lines[0], lines


def test_results_without_a_run_manifest_stop(env, reference, tmp_path, capsys):
    """An --out written by an eval from before run.json: one line and the way out, nothing
    left behind that would make the next run take it for this one's."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / MANIFEST).unlink()
    before = _files(out, with_mtime=True)
    assert eval_cli(env, out, *_tasks(env)) == 2
    lines = _one_line(capsys.readouterr().err)
    assert len(lines) == 1 and f"{out} holds an eval run without run.json" in lines[0] and "--overwrite" in lines[0]
    assert _files(out, with_mtime=True) == before
