"""Anything a user can cause ends as one line, `mode-fast JOB: error: ...`, exit 2, naming
the flag or file (mode_fast.cli's handler); train's outputs get the umask's mode; train
reads `--caption-key` as curate and cluster do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_loader import make_shards

from mode_fast import cli
from mode_fast.training import run as train_run

torch.set_num_threads(1)  # shared 2-core machine

TRAIN = ["--model", "mode-fast-tiny", "--batch-size", "16", "--warmup", "1", "--workers", "0", "--no-progress"]


def error_line(capsys, job: str) -> str:
    """The one stderr line of a failed job (pytest's log capture keeps log records off stderr)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"mode-fast {job}: error: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def txt_pool(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("txt") / "shards", n=32, per_shard=16)[0].parent


@pytest.fixture(scope="module")
def seed_ckpt(txt_pool, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seed")
    assert cli.main(["train", *TRAIN, "--data", str(txt_pool), "--out", str(out), "--steps", "1",
                     "--schedule-steps", "3"]) == 0  # fmt: skip
    return out / "seed" / "checkpoints" / "final.pt"


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if train builds a model (errors must come before that)."""

    def refuse(*a, **k):
        raise AssertionError("the model was built before the error")

    monkeypatch.setattr(train_run, "create_model", refuse)


# --------------------------------------------------------------------------- cluster
@pytest.mark.parametrize("flags,named", [
    (["--fine-k", "0"], "--fine-k must be >= 1, got 0"),
    (["--fine-k", "-3"], "--fine-k must be >= 1, got -3"),
    (["--experts", "0"], "--experts must be >= 1, got 0"),
    (["--fine-k", "4", "--experts", "5"], "--experts 5 is more than --fine-k 4"),
    (["--sample", "0"], "--sample must be >= 1, got 0"),
    (["--fine-k", "8", "--sample", "4"], "--sample 4 is smaller than --fine-k 8"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--niter", "0"], "--niter must be >= 1, got 0"),
    (["--workers", "-1"], "--workers must be >= 0, got -1"),
])  # fmt: skip
def test_cluster_nonsensical_numbers_name_the_flag(txt_pool, tmp_path, capsys, flags, named):
    rc = cli.main(["cluster", str(txt_pool), "--out", str(tmp_path / "c"), "--embedder", "hash8", *flags])
    assert rc == 2
    assert named in error_line(capsys, "cluster")
    assert not (tmp_path / "c").exists()  # refused before anything is written


# --------------------------------------------------------------------------- train: --data
def test_train_missing_data_is_one_line_before_the_model(tmp_path, capsys, no_model):
    missing = tmp_path / "no-such-folder"
    assert cli.main(["train", *TRAIN, "--data", str(missing), "--out", str(tmp_path / "o")]) == 2
    line = error_line(capsys, "train")
    assert "--data" in line and str(missing) in line and "no such file or folder" in line


def test_train_empty_data_is_one_line_before_the_model(tmp_path, capsys, no_model):
    (tmp_path / "empty").mkdir()
    assert cli.main(["train", *TRAIN, "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    line = error_line(capsys, "train")
    assert "--data" in line and str(tmp_path / "empty") in line and "matches no shard" in line
    assert not (tmp_path / "o").exists()


def test_train_missing_data_from_the_shell(tmp_path):
    """The real command: one stderr line, exit 2, no model built (no open_clip log line)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "mode_fast", "train", *TRAIN, "--data", str(tmp_path / "nothing"),
                           "--out", str(tmp_path / "o")], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"mode-fast train: error: --data: {tmp_path / 'nothing'}: no such file or folder"
    ]
    assert "initialized randomly" not in proc.stderr


@pytest.mark.parametrize("flags,named", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--expert-share", "1.5"], "--expert-share must be in [0, 1], got 1.5"),
    (["--lr", "-1"], "--lr must be >= 0, got -1.0"),
    (["--patch-dropout", "1"], "--patch-dropout must be in [0, 1), got 1.0"),
    (["--expert", "-1", "--clusters", "x"], "--expert must be >= 0, got -1"),
    (["--caption-key", "json:caption"], "--caption-key json:caption: the caption key is a member extension"),
])  # fmt: skip
def test_train_nonsensical_flags_name_the_flag(txt_pool, tmp_path, capsys, no_model, flags, named):
    assert cli.main(["train", *TRAIN, "--data", str(txt_pool), "--out", str(tmp_path / "o"), *flags]) == 2
    assert named in error_line(capsys, "train")


def test_train_unknown_model_is_one_line_before_any_folder(txt_pool, tmp_path, capsys, no_model):
    """open_clip's own error for an unknown name is a RuntimeError traceback after the job
    folder exists; the name is checked against its registry first."""
    out = tmp_path / "o"
    for name in ("ViT-Nope", "hf-hub:someone/model"):
        assert cli.main(["train", *TRAIN, "--data", str(txt_pool), "--out", str(out), "--model", name]) == 2
        assert f"--model {name}: not an architecture open_clip knows" in error_line(capsys, "train")
        assert not out.exists()


# --------------------------------------------------------------------------- non-finite numbers
@pytest.mark.parametrize("job,flags,named", [
    ("curate", ["--t", "inf"], "--t must be a finite number, got inf"),
    ("curate", ["--t", "nan"], "--t must be a finite number, got nan"),
    ("train", ["--lr", "inf"], "--lr must be a finite number, got inf"),
    ("train", ["--patch-dropout", "nan"], "--patch-dropout must be a finite number, got nan"),
    ("train", ["--expert-share=-inf"], "--expert-share must be a finite number, got -inf"),
    ("train", ["--checkpoint-minutes", "inf"], "--checkpoint-minutes must be a finite number, got inf"),
    ("sample", ["--mismatch-rate", "nan"], "--mismatch-rate must be a finite number, got nan"),
])  # fmt: skip
def test_non_finite_numbers_are_one_line_before_any_output(txt_pool, tmp_path, capsys, no_model, job, flags, named):
    out = tmp_path / "o"
    args = {"curate": [str(txt_pool), "--out", str(out)], "train": [*TRAIN, "--data", str(txt_pool), "--out", str(out)],
            "sample": ["--out", str(out)]}[job]  # fmt: skip
    assert cli.main([job, *args, *flags]) == 2
    assert named in error_line(capsys, job)
    assert not out.exists()


def test_non_finite_numbers_from_python_are_config_errors(txt_pool, tmp_path):
    """Library callers get the same family (ModeFastError) as the CLI, not a bare ValueError."""
    from mode_fast.core.errors import ConfigError
    from mode_fast.curation.run import CurateConfig

    with pytest.raises(ConfigError, match="--t must be a positive finite number"):
        CurateConfig(pools=[str(txt_pool)], out=tmp_path / "o", t=float("inf"))
    with pytest.raises(ConfigError, match="--lr must be a finite number, got inf"):
        train_run.TrainConfig(data=(str(txt_pool),), out=tmp_path / "o", lr=float("inf"))


@pytest.mark.parametrize("argv,named", [
    (["train", "--batch-size", "many"], "argument --batch-size: invalid int value: 'many'"),
    (["curate", "--out", "x"], "the following arguments are required: POOL"),
    (["eval", "--run", "r", "--clusters", "c", "--out", "o", "--ensemble-inputs", "x"],
     "argument --ensemble-inputs: invalid choice"),
    (["nonsense"], "argument COMMAND: invalid choice"),
])  # fmt: skip
def test_bad_usage_is_one_line(capsys, argv, named):
    """argparse's own errors follow the contract too: one line, exit 2, no usage block."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and lines[0].endswith("--help)"), lines


# --------------------------------------------------------------------------- checkpoints
def truncated_copy(ckpt: Path, dest: Path) -> Path:
    data = ckpt.read_bytes()
    dest.write_bytes(data[: len(data) // 2])
    return dest


def test_train_truncated_seed_checkpoint_is_named(txt_pool, seed_ckpt, tmp_path, capsys, no_model):
    bad = truncated_copy(seed_ckpt, tmp_path / "seed-half.pt")
    rc = cli.main(["train", *TRAIN, "--data", str(txt_pool), "--out", str(tmp_path / "o"), "--expert", "0",
                   "--clusters", str(tmp_path), "--seed-checkpoint", str(bad)])  # fmt: skip
    assert rc == 2
    line = error_line(capsys, "train")
    assert f"checkpoint {bad} is damaged or truncated" in line


def test_train_truncated_resume_checkpoint_is_named(txt_pool, seed_ckpt, tmp_path, capsys):
    bad = truncated_copy(seed_ckpt, tmp_path / "latest-half.pt")
    rc = cli.main(["train", *TRAIN, "--data", str(txt_pool), "--out", str(tmp_path / "o"), "--steps", "1",
                   "--resume", str(bad)])  # fmt: skip
    assert rc == 2
    assert f"checkpoint {bad} is damaged or truncated" in error_line(capsys, "train")


def test_eval_truncated_expert_checkpoint_is_named(seed_ckpt, tmp_path, capsys):
    from test_evaluate import make_centers

    run = tmp_path / "run"
    for k in range(2):
        (run / f"expert_{k}" / "checkpoints").mkdir(parents=True)
        (run / f"expert_{k}" / "checkpoints" / "final.pt").write_bytes(seed_ckpt.read_bytes())
    bad = truncated_copy(seed_ckpt, run / "expert_1" / "checkpoints" / "final.pt")
    make_centers(tmp_path / "clusters", n_experts=2)
    rc = cli.main(["eval", "--run", str(run), "--clusters", str(tmp_path / "clusters"), "--out", str(tmp_path / "e"),
                   "--baseline", str(seed_ckpt), "--data", "sklearn:digits:10"])  # fmt: skip
    assert rc == 2
    assert f"checkpoint {bad} is damaged or truncated" in error_line(capsys, "eval")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="no such file or folder"):
        cli.main(["train", "--debug", *TRAIN, "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")])


# --------------------------------------------------------------------------- output modes
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_train_outputs_have_the_umasks_mode(txt_pool, tmp_path, umask):
    from mode_fast.core import files

    old = os.umask(umask)
    saved_mode = files._FILE_MODE
    files._FILE_MODE = files.default_file_mode()  # the writer reads the umask once, at import
    try:
        assert cli.main(["train", *TRAIN, "--data", str(txt_pool), "--out", str(tmp_path), "--steps", "2",
                         "--save-every", "1"]) == 0  # fmt: skip
    finally:
        os.umask(old)
        files._FILE_MODE = saved_mode
    job = tmp_path / "seed"
    outputs = ["config.json", "data.json", "metrics.jsonl", "checkpoints/latest.pt", "checkpoints/final.pt"]
    assert {name: oct((job / name).stat().st_mode & 0o777) for name in outputs} == {
        name: oct(0o666 & ~umask) for name in outputs
    }


# --------------------------------------------------------------------------- --caption-key
def test_train_caption_key_means_what_curate_means(tmp_path):
    """Default 'caption': a .json field of that name, else .txt (mode_fast.data.io); an
    extension names that member."""
    json_pool = make_shards(tmp_path / "json", n=32, per_shard=16, caption="json")[0].parent
    txt_pool = make_shards(tmp_path / "txt", n=32, per_shard=16)[0].parent
    for pool, flags, member in ((json_pool, [], "json:caption"), (txt_pool, [], "txt"),
                                (txt_pool, ["--caption-key", "txt"], "txt")):  # fmt: skip
        out = tmp_path / f"out-{pool.name}-{len(flags)}"  # one --out per pool: a rerun into another pool's run stops
        assert cli.main(["train", *TRAIN, "--data", str(pool), "--out", str(out), "--steps", "1", *flags]) == 0
        data = json.loads((out / "seed" / "data.json").read_text())
        assert (data["caption"], data["samples"]) == (member, 32)


def test_train_and_curate_read_the_same_captions(tmp_path):
    """The loader's captions under the resolved key are io.read_shard's (curate/cluster's)."""
    from mode_fast.data import loader as L
    from mode_fast.data.io import iter_samples, read_shard
    from mode_fast.training.loop import resolve_sample_spec

    for fmt in ("txt", "json"):
        shard = make_shards(tmp_path / fmt, n=8, per_shard=8, caption=fmt)[0]
        spec = resolve_sample_spec(shard, L.DEFAULT_IMAGE_KEY, "caption")
        got = {g.key: spec.caption_from_bytes(g.read(spec.caption_ext)) for g in iter_samples(shard)}
        want = {r.key: r.caption for r in read_shard(shard, caption_key="caption")}
        assert got == want and len(got) == 8
