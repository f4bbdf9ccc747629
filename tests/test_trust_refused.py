"""A refused job leaves nothing behind: train checks its arguments against the files they
name before it makes its folder; a run that fails before its first unit gives back a folder
it created (mode_fast.core.runs, with the lock race kept safe); and eval judges a run by its
finished train jobs, skipping with a warning any folder a job only started."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from test_evaluate import make_centers, save_random_model
from test_runs import _one_line

from mode_fast import cli
from mode_fast.core.errors import OutputError
from mode_fast.core.runs import LOCK, MANIFEST, OutputLock, OutputLocked, RunState
from mode_fast.evaluation.scoring import finished_train_job


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Training shards, a 2-expert cluster folder (assignments and centers) and a run folder
    with the seed and both experts, as hand-assembled checkpoints (no run.json)."""
    from test_loader import make_shards, write_assignments

    from mode_fast.demo.sample import write_sample

    root = tmp_path_factory.mktemp("refused")
    shards = make_shards(root / "shards", n=16, per_shard=8)
    write_assignments(root / "clusters", shards, lambda key: int(key[1:]) % 2, n_experts=2)
    make_centers(root / "clusters", n_experts=2)  # centers eval can use (hash64 embedder)
    save_random_model(root / "run" / "seed" / "checkpoints" / "final.pt", 100)
    for k in range(2):
        save_random_model(root / "run" / f"expert_{k}" / "checkpoints" / "final.pt", k)
    write_sample(root / "sample", num_pairs=8, shard_size=8, eval_pairs=16, image_size=32)
    return {"root": root, "shards": root / "shards", "clusters": root / "clusters", "run": root / "run",
            "sample": root / "sample"}  # fmt: skip


def _eval(world, run: Path, out: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli.main(["eval", "--run", str(run), "--clusters", str(world["clusters"]), "--out", str(out),
                   "--data", str(world["sample"]), "--batch-size", "16"])  # fmt: skip
    return rc, capsys.readouterr().err


def _copy_run(world, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    return run


def test_train_expert_beyond_the_cluster_file_leaves_nothing_then_eval_works(world, tmp_path, capsys, caplog):
    run = _copy_run(world, tmp_path)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    capsys.readouterr()
    argv = ["train", "--data", str(world["shards"]), "--out", str(run), "--expert", "5",
            "--clusters", str(world["clusters"]), "--workers", "0"]  # fmt: skip
    assert cli.main(argv) == 2
    lines = _one_line(capsys.readouterr().err)
    assert lines == [f"mode-fast train: error: --expert 5: {world['clusters']} has 2 experts (0..1)"]
    assert not (run / "expert_5").exists()
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    # the same into a run folder that does not exist yet: none is made
    assert cli.main([*argv[:4], str(tmp_path / "new"), *argv[5:]]) == 2
    assert not (tmp_path / "new").exists()
    with caplog.at_level(logging.WARNING):
        rc, err = _eval(world, run, tmp_path / "eval", capsys)
    assert rc == 0, err
    assert "skipping" not in caplog.text
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["n_experts"] == 2 and sorted(results["experts"]) == ["expert_0", "expert_1"]


def test_train_refuses_missing_inputs_before_making_its_folder(world, tmp_path, capsys):
    import torch

    seed = torch.load(world["run"] / "seed" / "checkpoints" / "final.pt", weights_only=True)
    seed |= {"optimizer": {"state": {}, "param_groups": []}, "schedule_step": 1, "schedule_total": 4}
    torch.save(seed, tmp_path / "seed.pt")  # what an expert reads of a seed (checkpoint.SEED_FIELDS)
    base = ["train", "--data", str(world["shards"]), "--workers", "0"]
    cases = [
        (["--keep-keys", str(tmp_path / "nope.txt")], "--keep-keys"),
        (["--resume", str(tmp_path / "nope.pt")], "--resume"),
        (["--expert", "0", "--clusters", str(world["clusters"])], "seed checkpoint"),
        (["--data", str(tmp_path / "no-shards")], "--data"),
        # found once the lock is held (the seed loaded, then the assignments read): the
        # folder the run made goes again
        (["--expert", "0", "--clusters", str(tmp_path / "no-clusters"),
          "--seed-checkpoint", str(tmp_path / "seed.pt")], "no assignments"),
    ]  # fmt: skip
    for extra, named in cases:
        out = tmp_path / "out"
        capsys.readouterr()
        assert cli.main([*base, "--out", str(out), *extra]) == 2, extra
        lines = _one_line(capsys.readouterr().err)
        assert len(lines) == 1 and named in lines[0], (extra, lines)
        assert not out.exists(), extra


def test_a_job_refused_after_taking_its_folder_gives_it_back(world, tmp_path, capsys, monkeypatch):
    """curate records no units in run.json (its own stamps), so the backstop is what the
    folder holds: a user-caused error before anything but run.json and .lock was written
    removes a folder the run made; a folder that existed, or holds other files, stays."""
    from mode_fast.core.errors import ConfigError
    from mode_fast.curation import run as curate_job

    def no_ray(*a, **k):
        raise ConfigError("--executor ray needs Ray: pip install 'mode-fast[ray]'")

    monkeypatch.setattr(curate_job, "make_executor", no_ray)
    out = tmp_path / "new" / "curated"
    assert cli.main(["curate", str(world["shards"]), "--out", str(out), "--t", "2"]) == 2
    assert "--executor ray needs Ray" in _one_line(capsys.readouterr().err)[0]
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    (kept / "mine.txt").parent.mkdir()
    (kept / "mine.txt").write_text("a user's file")
    assert cli.main(["curate", str(world["shards"]), "--out", str(kept), "--t", "2"]) == 2
    assert sorted(p.name for p in kept.iterdir()) == [LOCK, "mine.txt"]  # an existing folder's lock stays


def test_a_folder_holding_only_a_lock_is_skipped_by_eval_naming_it(world, tmp_path, capsys, caplog):
    """RUN/expert_5 as a refused train of before left it: eval skips it with a warning (not the
    whole run), and the same for an expert folder whose run.json records no finished job."""
    run = _copy_run(world, tmp_path)
    (run / "expert_5").mkdir()
    (run / "expert_5" / LOCK).write_text("")
    with RunState.open(run / "expert_7", "train", inputs={}, args={}):  # killed before its first checkpoint
        pass
    with caplog.at_level(logging.WARNING):
        rc, err = _eval(world, run, tmp_path / "eval", capsys)
    assert rc == 0, err
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert skipped == [
        f"eval: skipping {run / 'expert_5'}, not a finished train job: it holds no {MANIFEST} and no checkpoints/final.pt",
        f"eval: skipping {run / 'expert_7'}, not a finished train job: its {MANIFEST} records no finished train run "
        "with checkpoints/final.pt",
    ]
    assert sorted(json.loads((tmp_path / "eval" / "results.json").read_text())["experts"]) == ["expert_0", "expert_1"]


def test_an_unfinished_expert_within_the_count_is_named_missing(world, tmp_path, capsys):
    """expert_1 holds final.pt, but its run.json says the job did not finish (killed between
    the write and the record): it does not count."""
    run = _copy_run(world, tmp_path)
    with RunState.open(run / "expert_1", "train", inputs={}, args={}) as state:
        state.mark_done("latest", [])
    rc, err = _eval(world, run, tmp_path / "eval", capsys)
    lines = _one_line(err)
    assert rc == 2 and len(lines) == 1, err
    assert "missing or unfinished" in lines[0] and str(run / "expert_1" / "checkpoints" / "final.pt") in lines[0]
    assert not (tmp_path / "eval").exists()  # refused before its folder was made


def test_finished_train_job(tmp_path):
    job = tmp_path / "expert_0"
    final = job / "checkpoints" / "final.pt"
    assert not finished_train_job(job)
    final.parent.mkdir(parents=True)
    final.write_bytes(b"x")
    assert finished_train_job(job)  # assembled by hand: no run.json, its final checkpoint
    with RunState.open(job, "train", inputs={}, args={}) as state:
        assert not finished_train_job(job)  # a job started in it: only its record counts
        state.finish([final])
    assert finished_train_job(job)
    manifest = json.loads((job / MANIFEST).read_text())
    for changed in ({"job": "eval"}, {"outputs": ["checkpoints/latest.pt"]}, {"outputs": ["../x"]}):
        (job / MANIFEST).write_text(json.dumps(manifest | changed))
        assert not finished_train_job(job), changed


# --- the library rule: a run that created its folder and did nothing gives it back ----------------


def test_an_abandoned_fresh_run_removes_the_folders_it_made(tmp_path):
    out = tmp_path / "a" / "b" / "c"
    with RunState.open(out, "job", inputs={}, args={}) as state:
        state.abandon()
    assert not (tmp_path / "a").exists()
    # a folder that was there stays, without the run's run.json, with its lock file
    (tmp_path / "kept").mkdir()
    with RunState.open(tmp_path / "kept", "job", inputs={}, args={}) as state:
        state.abandon()
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == [LOCK]
    # files the run wrote keep the folder; its lock goes
    with RunState.open(out, "job", inputs={}, args={}) as state:
        (out / "config.json").write_text("{}")
        state.abandon()
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_a_refusal_while_opening_gives_back_a_folder_it_made(tmp_path, monkeypatch):
    def full_disk(self: RunState) -> None:
        raise OutputError(f"cannot write {self.out / MANIFEST}: no space left on device")

    monkeypatch.setattr(RunState, "_write", full_disk)
    with pytest.raises(OutputError):
        RunState.open(tmp_path / "new" / "out", "job", inputs={}, args={})
    assert not (tmp_path / "new").exists()


def test_a_run_that_locked_the_removed_lock_file_takes_the_folder_again(tmp_path):
    """The race removing the lock file opens: B opens .lock, A (which made the folder and did
    nothing) unlinks it and lets go, B's flock on the unlinked file then succeeds. B must see
    that its file is no longer the folder's and lock the folder's own, or a third run C could
    lock a new file beside B."""
    out = tmp_path / "out"
    a = RunState.open(out, "job", inputs={}, args={})
    stale = os.open(out / LOCK, os.O_RDWR)  # B got this far before A let go
    a.abandon()
    a.close()
    assert not out.exists()
    b = OutputLock(out)
    opened = []
    real_open = b._open

    def open_once_stale() -> int:
        opened.append(len(opened))
        return stale if len(opened) == 1 else real_open()

    b._open = open_once_stale  # type: ignore[method-assign]
    b.acquire()
    try:
        assert opened == [0, 1] and (out / LOCK).is_file()
        with pytest.raises(OutputLocked):
            OutputLock(out).acquire()  # C: the folder's lock is B's
    finally:
        b.release()
