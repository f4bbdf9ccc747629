"""The demo under the one lifecycle rule (issue 13), on the quick settings, stopped early:
a SIGKILLed demo takes its running step along; the rerun skips the finished steps and runs
the killed one again (which continues by its own rule); a second demo on the same --out
stops at once naming the holder; SIGINT ends the demo with one line, exit 130; a rerun
with other settings stops naming the field and the way out."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_runs import _descendants as descendants
from test_runs import _running as alive

from mode_fast import cli
from mode_fast.core.files import write_json
from mode_fast.core.runs import RunState, recorded_finished
from mode_fast.demo import pipeline

ROOT = Path(__file__).resolve().parents[1]
PROG = "mode-fast demo"


class Demo:
    """`mode-fast demo --out OUT [--quick]` as a process, its output collected."""

    def __init__(self, out: Path, quick: bool = True) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "mode_fast", "demo", "--out", str(out)] + (["--quick"] if quick else [])
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, done, what: str, timeout: float = 300) -> None:
        end = time.monotonic() + timeout
        while not done():
            assert self.proc.poll() is None, f"the demo ended ({self.proc.returncode}) before {what}:\n{self.text}"
            assert time.monotonic() < end, f"no {what} after {timeout} s:\n{self.text}"
            time.sleep(0.1)

    @contextlib.contextmanager
    def killed_on_failure(self):
        try:
            yield
        except BaseException:
            self.proc.kill()  # its step dies with it
            raise

    def finish(self, timeout: float = 120) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A quick demo SIGKILLed while it trains the seed (its step's run.json written, the
    step not finished); returns (out, the processes below the demo at the kill, kill time)."""
    out = tmp_path_factory.mktemp("life") / "demo"
    demo = Demo(out)
    seed = out / "run" / "seed"
    with demo.killed_on_failure():
        demo.wait_for(lambda: (seed / "run.json").is_file(), "train seed's run.json")
    below = descendants(demo.proc.pid)
    demo.proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    assert demo.finish() == -signal.SIGKILL
    assert below, "the step's process was not found"
    assert not recorded_finished(seed), "the seed finished before the kill: not a kill mid-step"
    return out, below, killed_at


def test_sigkill_of_the_demo_leaves_no_step_process(killed):
    _, below, killed_at = killed
    while any(alive(p) for p in below) and time.monotonic() - killed_at < 10:
        time.sleep(0.2)
    assert [p for p in below if alive(p)] == []


@pytest.fixture(scope="module")
def rerun(killed):
    """The same command again, with a second demo started on the same --out while it runs;
    SIGINT once it has continued past the killed step into the first expert."""
    out, _, _ = killed
    demo = Demo(out)

    def holder() -> int | None:
        try:
            return json.loads((out / ".lock").read_text())["pid"]
        except (OSError, ValueError, KeyError):
            return None

    with demo.killed_on_failure():
        demo.wait_for(lambda: holder() == demo.proc.pid, "the lock naming the rerun")
        second = Demo(out)
        second_code = second.finish()
        demo.wait_for(lambda: (out / "run" / "expert_0" / "run.json").is_file(), "train expert 0's run.json")
    below = descendants(demo.proc.pid)
    demo.proc.send_signal(signal.SIGINT)
    code = demo.finish()
    return {"out": out, "demo": demo, "code": code, "second": second, "second_code": second_code, "below": below}


def test_second_demo_on_the_same_out_stops_naming_the_holder(rerun):
    second = rerun["second"]
    assert rerun["second_code"] == 2
    assert len(second.lines) == 1, second.text
    line = second.lines[0]
    assert line.startswith(f"{PROG}: error: {rerun['out']} is in use by pid {rerun['demo'].proc.pid} on "), line
    assert line.endswith("): wait for it to finish, or use another --out"), line
    assert "(started " in line


def test_rerun_skips_finished_steps_and_runs_the_killed_one_again(rerun):
    text, out = rerun["demo"].text, rerun["out"]
    for name in ("sample", "dedup", "curate", "cluster"):
        assert re.search(rf"^skip: {name}: already done \(", text, re.M), text
    assert "records it finished" in text  # dedup, curate and cluster: their own run.json says so
    assert "skip: train seed" not in text
    assert re.search(r"^\$ .* train .* --stage seed", text, re.M)
    assert recorded_finished(out / "run" / "seed")  # the killed step went on to finish
    demo_run = json.loads((out / "run.json").read_text())
    assert set(demo_run["units"]) == {"sample", "dedup", "curate", "cluster", "train seed"}
    assert demo_run["args"]["--quick"] is True and not demo_run["finished"]


def test_sigint_stops_the_demo_with_one_line_and_exit_130(rerun):
    demo = rerun["demo"]
    assert rerun["code"] == 130
    assert demo.lines[-1] == f"{PROG}: interrupted at step train expert 0; rerun the same command to continue"
    assert "Traceback" not in demo.text
    assert re.search(r"^mode-fast train: interrupted", demo.text, re.M), demo.lines[-6:]  # the step said so
    assert not recorded_finished(rerun["out"] / "run" / "expert_0")
    time.sleep(1)
    assert [p for p in rerun["below"] if alive(p)] == []  # the step got the signal and ended too


def test_rerun_with_other_settings_stops_naming_the_field(rerun):
    """Full settings into the quick run's folder: nothing is mixed, nothing is touched."""
    out = rerun["out"]
    before = (out / "run.json").read_bytes()
    full = Demo(out, quick=False)
    assert full.finish(60) == 2
    assert full.lines == [
        f"{PROG}: error: {out} holds a demo run made with --quick true, this run has --quick false: "
        "rerun with --overwrite to start over, or use another --out"
    ]
    assert (out / "run.json").read_bytes() == before


DRIVER = """
import argparse, sys
from pathlib import Path
from mode_fast.demo import pipeline
from mode_fast.cli import run_job
from mode_fast.core.runs import RunState
out = Path(sys.argv[1])
silent = [sys.executable, "-c", "import time; print('step', 'up', flush=True); time.sleep(120)"]
def drive(args):
    with RunState.open(out, "probe", inputs={}, args={}) as state, pipeline._Driver(state, []).interrupts() as d:
        d.step(pipeline.Step("silent", silent, out / "never", out))
sys.exit(run_job("probe", drive, argparse.Namespace()))
"""


def silent_step(tmp_path: Path) -> tuple[subprocess.Popen, set[int]]:
    """The demo's step driver running one step that sleeps and writes nothing; (the driver,
    the processes below it once the step is up)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    assert driver.stdout is not None
    first = b""
    while b"step up" not in first:
        line = driver.stdout.readline()
        assert line, first.decode()
        first += line
    below = descendants(driver.pid)
    assert below
    return driver, below


def all_ended(below: set[int], seconds: float) -> list[int]:
    end = time.monotonic() + seconds
    while any(alive(p) for p in below) and time.monotonic() < end:
        time.sleep(0.1)
    return [p for p in below if alive(p)]


def test_a_silent_step_dies_with_the_sigkilled_demo(tmp_path):
    """A step that writes nothing would not notice its reader is gone (no broken pipe): the
    kernel's parent-death signal is what ends it."""
    driver, below = silent_step(tmp_path)
    driver.kill()
    driver.wait()
    assert all_ended(below, 10) == []


def test_sigterm_goes_to_the_step_then_the_demo_stops_with_one_line(tmp_path):
    driver, below = silent_step(tmp_path)
    driver.terminate()
    out, _ = driver.communicate(timeout=30)
    assert driver.returncode == 130
    assert out.decode().splitlines() == ["probe: interrupted at step silent; rerun the same command to continue"]
    assert all_ended(below, 1) == []


def test_a_step_is_finished_only_when_its_own_run_json_says_so(tmp_path):
    step = pipeline.Step("cluster", ["true"], tmp_path / "clusters" / "cluster_sizes.json", tmp_path / "clusters")
    step.folder.mkdir()
    step.output.write_text("{}")
    own = step.folder / "run.json"
    with RunState.open(tmp_path, "demo", inputs={}, args={}) as state:
        assert pipeline._step_finished(step, state) is None  # the demo has not recorded it
        state.mark_done("cluster", [step.output])
        assert pipeline._step_finished(step, state) == f"{step.output} exists"  # a job without run.json
        write_json(own, {"format": 1, "job": "cluster", "finished": False, "outputs": []})
        assert pipeline._step_finished(step, state) is None  # its job was killed mid-way: run it again
        write_json(own, {"format": 1, "job": "cluster", "finished": True, "outputs": ["cluster_sizes.json"]})
        assert pipeline._step_finished(step, state) == f"{own} records it finished"
        step.output.unlink()
        assert pipeline._step_finished(step, state) is None


def test_an_unwritable_out_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(["demo", "--out", str(blocker / "demo"), "--quick"]) == 2
    err = capsys.readouterr().err
    assert err == f"{PROG}: error: cannot write {blocker / 'demo' / '.lock'}: Not a directory\n"


def test_an_interrupt_while_loading_a_checkpoint_is_not_damage(tmp_path, monkeypatch):
    """Found by the demo's SIGINT test: Ctrl-C during train's load of the seed checkpoint
    was reported as "checkpoint ... is damaged or truncated: interrupted at setup", exit 2."""
    import torch

    from mode_fast.core.errors import Interrupted
    from mode_fast.training.checkpoint import load_checkpoint

    path = tmp_path / "final.pt"
    torch.save({"step": 1}, path)

    def interrupted(*args, **kwargs):
        raise Interrupted("interrupted at setup; rerun the same command to continue")

    monkeypatch.setattr(torch, "load", interrupted)
    with pytest.raises(Interrupted, match="^interrupted at setup"):
        load_checkpoint(path)


def test_after_a_step_runs_the_later_ones_run_too(tmp_path, capsys):
    """A redone step may change what the later ones read: they run again (their jobs decide)."""
    noop = [sys.executable, "-c", "pass"]
    first = pipeline.Step("first", noop, tmp_path / "first.txt", tmp_path / "first")
    second = pipeline.Step("second", noop, tmp_path / "second.txt", tmp_path / "second")
    for step in (first, second):
        step.output.write_text("")
    log: list[dict] = []
    with RunState.open(tmp_path, "demo", inputs={}, args={}) as state, pipeline._Driver(state, log).interrupts() as d:
        state.mark_done("second", [second.output])  # recorded, but "first" is not: it runs
        d.step(first)
        d.step(second)
    assert [x["step"] for x in log if not x.get("skipped")] == ["first", "second"]
    assert "skip:" not in capsys.readouterr().out
