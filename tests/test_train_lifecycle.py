"""`mode-fast train` under the one run lifecycle (mode_fast.core.runs): SIGKILL during training
and during the final write, Ctrl-C, a second run on the same job folder, a finished rerun
and a rerun with a changed argument, each against an unbroken run of the same command."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_train import BASE, metrics, pool, run_train  # noqa: F401  (pool: fixture)

from mode_fast import cli
from mode_fast.core.runs import LOCK, MANIFEST

torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): bitwise equality needs the same sums
ROOT = Path(__file__).resolve().parents[1]
STEPS = 12  # one epoch of the 200-pair pool at batch 16

# A train process that SIGKILLs itself at a chosen point: after `kill_step` training steps,
# or halfway through writing final.pt (some bytes in its temporary file, none renamed).
KILLER = textwrap.dedent("""
    import os, signal, sys, torch
    from mode_fast import cli
    from mode_fast.training import run as train
    kill_step, kill_final = int(sys.argv[1]), sys.argv[2] == "final"
    real_step, real_save, real_ckpt, calls, final = train.train_step, torch.save, train.save_checkpoint, [0], [False]
    def step(*a, **k):
        out = real_step(*a, **k)
        calls[0] += 1
        if calls[0] == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    def save_checkpoint(path, state):
        final[0] = path.name == "final.pt"
        return real_ckpt(path, state)
    def save(obj, f, *a, **k):
        if kill_final and final[0]:
            f.write(b"PK partial"); f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *a, **k)
    train.train_step, torch.save, train.save_checkpoint = step, save, save_checkpoint
    sys.exit(cli.main(["train", *sys.argv[3:]]))
""")


def _env() -> dict[str, str]:
    return dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )


def _args(pool: Path, out: Path, *extra: str) -> list[str]:
    return [
        *BASE,
        "--data",
        str(pool / "shards"),
        "--out",
        str(out),
        "--steps",
        str(STEPS),
        "--save-every",
        "3",
        "--checkpoint-minutes",
        "0",
        "--patch-dropout",
        "0.5",
        *extra,
    ]


def _state(path: Path) -> tuple[dict, dict]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt["state_dict"], ckpt["optimizer"]


def _same_result(reference: Path, job: Path) -> None:
    """Bit-identical weights and optimizer state, metrics with each step once and the same losses."""
    (wa, oa), (wb, ob) = _state(reference / "checkpoints/final.pt"), _state(job / "checkpoints/final.pt")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    assert oa["param_groups"] == ob["param_groups"]
    for i in oa["state"]:
        for k, v in oa["state"][i].items():
            assert torch.equal(v, ob["state"][i][k]), (i, k)
    ra, rb = metrics(reference), metrics(job)
    assert [r["step"] for r in rb] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    assert not [p.name for p in job.rglob("*") if p.name.startswith(".") and p.name != LOCK]  # no temporaries
    manifest = json.loads((job / MANIFEST).read_text())
    assert manifest["finished"] and "checkpoints/final.pt" in manifest["units"]["final"]


@pytest.fixture(scope="module")
def reference(pool, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unbroken")
    run_train(_args(pool, out)[len(BASE) :])
    return out / "seed"


def _files(job: Path) -> dict[str, tuple[int, bytes]]:
    """Every file but the lock: (mtime, bytes); run.json's mtime left out (open rewrites it)."""
    return {
        p.name: (0 if p.name == MANIFEST else p.stat().st_mtime_ns, p.read_bytes())
        for p in job.rglob("*")
        if p.is_file() and p.name != LOCK
    }


def _one_line(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("mode-fast ")]


def test_sigkill_in_training_and_in_the_final_write_then_rerun_is_identical(pool, reference, tmp_path):
    out, job = tmp_path / "run", tmp_path / "run/seed"
    kill_step = random.Random().randint(1, STEPS - 1)  # a random moment; named if the test fails
    for when, step in ((f"step {kill_step}", kill_step), ("final.pt", 0)):
        p = subprocess.run(
            [sys.executable, "-c", KILLER, str(step), "final" if step == 0 else "-", *_args(pool, out)],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert p.returncode == -signal.SIGKILL, (when, p.stderr[-2000:])
    # killed while writing final.pt: the partial file is a temporary, final.pt is not there
    assert not (job / "checkpoints/final.pt").exists()
    assert list((job / "checkpoints").glob(".final.pt*"))
    assert not json.loads((job / MANIFEST).read_text())["finished"]
    with open(job / "metrics.jsonl", "a") as f:  # as if killed mid-line
        f.write('{"step": 13, "lo')
    final = run_train(_args(pool, out)[len(BASE) :])
    assert final == job / "checkpoints/final.pt"
    _same_result(reference, job)


def test_sigint_checkpoints_and_a_second_run_stops_naming_the_holder(pool, reference, tmp_path, capsys, caplog):
    out, job = tmp_path / "run", tmp_path / "run/seed"
    args = _args(pool, out, "--save-every", "100")  # only the interrupt checkpoints
    # with a loader worker, in its own process group as a shell job: Ctrl-C reaches the whole group
    proc = subprocess.Popen(
        [sys.executable, "-m", "mode_fast", "train", *args, "--workers", "1"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not ((job / "metrics.jsonl").is_file() and len(metrics(job)) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, (
                proc.stderr.read()[-2000:] if proc.stderr else ""
            )
            time.sleep(0.05)
        # a second run on the same job folder stops at once, naming the holder
        t0 = time.monotonic()
        assert cli.main(["train", *args]) == 2
        err = capsys.readouterr().err
        assert time.monotonic() - t0 < 60
        lines = _one_line(err)
        assert len(lines) == 1 and f"{job} is in use by pid {proc.pid} on " in lines[0], err
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    lines = _one_line(stderr)
    assert len(lines) == 1 and lines[0].endswith("; rerun the same command to continue"), stderr[-2000:]
    at = int(lines[0].split("interrupted at step ")[1].split("/")[0])
    assert f"interrupted at step {at}/{STEPS};" in lines[0] and 2 <= at < STEPS
    assert torch.load(job / "checkpoints/latest.pt", weights_only=True)["job_step"] == at  # saved on interrupt
    assert [r["step"] for r in metrics(job)] == list(range(1, at + 1))

    # the same command continues (no --resume needed) to the unbroken run's result
    run_train(args[len(BASE) :])
    _same_result(reference, job)

    # a finished job rerun is a no-op that says so
    before = _files(job)  # run.json is rewritten (atomically) with the same bytes
    with caplog.at_level(logging.WARNING, logger="mode_fast.training.run"):
        assert run_train(args[len(BASE) :]) == job / "checkpoints/final.pt"
    assert "already finished" in caplog.text and "nothing to do" in caplog.text
    assert _files(job) == before

    # one changed result-affecting argument stops with one line naming it and the way out
    capsys.readouterr()
    assert cli.main(["train", *args, "--lr", "2e-3"]) == 2
    lines = _one_line(capsys.readouterr().err)
    assert len(lines) == 1 and "--lr 0.001, this run has --lr 0.002" in lines[0] and "--overwrite" in lines[0]
    assert _files(job) == before


def test_checkpoints_by_wall_time(pool, tmp_path):
    """--checkpoint-minutes: a checkpoint whenever that much time passed, whatever --save-every
    (here a tiny interval, so every step is due)."""
    run_train(["--data", str(pool / "shards"), "--out", str(tmp_path), "--steps", "4", "--save-every", "100",
               "--checkpoint-minutes", "1e-9", "--stop-at-step", "3"])  # fmt: skip
    assert torch.load(tmp_path / "seed/checkpoints/latest.pt", weights_only=True)["job_step"] == 3
    run_train(
        [
            "--data",
            str(pool / "shards"),
            "--out",
            str(tmp_path / "b"),
            "--steps",
            "4",
            "--save-every",
            "100",
            "--stop-at-step",
            "3",
        ]
    )  # fmt: skip  (default: minutes, so none in 3 quick steps)
    assert not (tmp_path / "b/seed/checkpoints/latest.pt").exists()


def _short(pool: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(pool / "shards"), "--out", str(out), "--steps", "2", "--checkpoint-minutes", "0", *extra]


def test_deterministic_is_a_result_argument(pool, tmp_path, capsys):
    """--deterministic changes the loss kernels' sums, so a rerun that changes it stops like
    any result-changing argument, in either direction; the same command is a no-op."""
    for recorded, rerun in (([], ["--deterministic"]), (["--deterministic"], [])):
        out = tmp_path / ("on" if recorded else "off")
        run_train(_short(pool, out, *recorded))
        capsys.readouterr()
        assert cli.main(["train", *BASE, *_short(pool, out, *rerun)]) == 2
        lines = _one_line(capsys.readouterr().err)
        assert len(lines) == 1 and "--deterministic" in lines[0] and "--overwrite" in lines[0], lines
        # the unrecorded default reads as false, not "none"
        old, new = ("true", "false") if recorded else ("false", "true")
        assert f"made with --deterministic {old}, this run has --deterministic {new}" in lines[0], lines
    assert cli.main(["train", *BASE, *_short(pool, tmp_path / "on", "--deterministic")]) == 0  # finished: a no-op
    manifest = json.loads((tmp_path / "on/seed" / MANIFEST).read_text())
    assert manifest["args"]["--deterministic"] is True


def test_a_run_recorded_before_deterministic_existed_continues(pool, tmp_path):
    """A run folder written before --deterministic was a recorded argument (run.json and the
    checkpoint's config lack it) continues when the flag is at its default."""
    out, job = tmp_path / "old", tmp_path / "old/seed"
    run_train(_short(pool, out, "--save-every", "1", "--stop-at-step", "1"))  # a kill after step 1
    manifest = json.loads((job / MANIFEST).read_text())
    manifest["args"].pop("--deterministic", None)  # as an older mode-fast wrote it
    (job / MANIFEST).write_text(json.dumps(manifest))
    ckpt = torch.load(job / "checkpoints/latest.pt", map_location="cpu", weights_only=True)
    ckpt["config"].pop("deterministic", None)
    torch.save(ckpt, job / "checkpoints/latest.pt")
    assert run_train(_short(pool, out)) == job / "checkpoints/final.pt"
    assert [r["step"] for r in metrics(job)] == [1, 2]  # continued at step 1, not restarted
    assert json.loads((job / MANIFEST).read_text())["finished"]
