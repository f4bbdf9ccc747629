"""`mode-fast train` on a tiny pool on the CPU: the MoDE schedule, resume, errors, DDP."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_loader import key_topic, make_shards, write_assignments

from mode_fast import cli
from mode_fast.core.config import added_defaults, result_flags
from mode_fast.core.errors import InputError
from mode_fast.data import loader as L
from mode_fast.jobs import train as train_job
from mode_fast.training import loop as training
from mode_fast.training.run import TrainConfig, run_training, train

torch.set_num_threads(1)  # shared 2-core machine: oversubscribed OpenMP threads crawl

BASE = ["--model", "mode-fast-tiny", "--batch-size", "16", "--warmup", "2", "--lr", "1e-3",
        "--workers", "0", "--no-progress"]  # fmt: skip


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train_job.add_arguments(parser)
    return parser.parse_args(argv)


def run_train(argv: list[str]) -> Path:
    return run_training(TrainConfig.from_args(parse(BASE + argv)))


def metrics(job_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """200 pairs in 4 shards, clustered by topic into 4 experts (cluster's file format)."""
    root = tmp_path_factory.mktemp("pool")
    shards = make_shards(root / "shards", n=200, per_shard=64)
    write_assignments(root / "clusters", shards, key_topic)
    return root


@pytest.fixture(scope="module")
def seed_run(pool, tmp_path_factory) -> Path:
    """A seed model: 8 steps of a 12-step schedule (MoDE forks before the end)."""
    out = tmp_path_factory.mktemp("run")
    run_train(["--data", str(pool / "shards"), "--out", str(out), "--stage", "seed",
               "--steps", "8", "--schedule-steps", "12", "--save-every", "4"])  # fmt: skip
    return out


# --------------------------------------------------------------------------- MoDE schedule
def test_cosine_schedule_matches_open_clip():
    from open_clip_train.scheduler import cosine_lr

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    reference = cosine_lr(opt, 5e-4, 10, 100)
    for step in range(100):
        assert training.cosine_lr(step, 5e-4, 10, 100) == pytest.approx(reference(step), rel=1e-12)


def test_seed_trains_and_logs(seed_run):
    rows = metrics(seed_run / "seed")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(math.isfinite(r["loss"]) for r in rows)
    # it learns: 16-way InfoNCE starts near ln(16) = 2.77 and falls on this easy pool
    assert rows[0]["loss"] > 2.5
    assert sum(r["loss"] for r in rows[-3:]) < sum(r["loss"] for r in rows[:3]) - 0.3
    assert rows[-1]["epoch"] == 0 and rows[-1]["samples_seen"] == 8 * 16
    ckpt = torch.load(seed_run / "seed/checkpoints/final.pt", weights_only=True)
    assert (ckpt["job_step"], ckpt["schedule_step"], ckpt["schedule_total"]) == (8, 8, 12)
    assert json.loads((seed_run / "seed/data.json").read_text())["samples"] == 200


def test_run_json_args_are_the_configs_result_flags(seed_run, pool, tmp_path):
    """run.json's "args" come from TrainConfig: its result-changing flags (--deterministic, added
    later, only when set, and last) plus the derived --global-batch; every one a flag of the parser
    built from the config."""
    parser = argparse.ArgumentParser()
    train_job.add_arguments(parser)
    parser_flags = {s for a in parser._actions for s in a.option_strings}
    derived = {"--global-batch"}  # --batch-size is per process; run.json records batch x processes

    added = set(added_defaults(TrainConfig))  # recorded only when set (--deterministic, --pretrained, ...)
    recorded = json.loads((seed_run / "seed/run.json").read_text())["args"]
    assert set(recorded) == result_flags(TrainConfig) - added | derived
    assert set(recorded) - derived <= parser_flags

    out = tmp_path / "det"
    run_train(["--data", str(pool / "shards"), "--out", str(out), "--steps", "1", "--deterministic"])
    recorded = json.loads((out / "seed/run.json").read_text())["args"]
    assert set(recorded) == result_flags(TrainConfig) - (added - {"--deterministic"}) | derived
    assert list(recorded)[-2:] == ["--deterministic", "--global-batch"]  # where 0.1 wrote them
    config = json.loads((out / "seed/config.json").read_text())
    assert list(config)[: len(recorded)] == [f[2:].replace("-", "_") for f in recorded]

    # the 0.1 entry still runs the job (here: finds it finished), with a warning
    with pytest.warns(DeprecationWarning, match="run_training"):
        assert train(parse(BASE + ["--data", str(pool / "shards"), "--out", str(out), "--steps", "1",
                                   "--deterministic"])) == out / "seed/checkpoints/final.pt"  # fmt: skip


def test_experts_fork_from_the_seed_and_train_on_their_cluster(seed_run, pool):
    seed_w = weights(seed_run / "seed/checkpoints/final.pt")
    finals = {}
    for k in (0, 1):
        finals[k] = run_train(["--data", str(pool / "shards"), "--out", str(seed_run),
                               "--expert", str(k), "--clusters", str(pool / "clusters"),
                               "--expert-share", "0.1"])  # fmt: skip
        job = seed_run / f"expert_{k}"
        rows = metrics(job)
        # the rest of the seed's schedule: steps 9..12, learning rate still on its cosine
        assert [r["schedule_step"] for r in rows] == [9, 10, 11, 12]
        assert rows[0]["lr"] == pytest.approx(training.cosine_lr(8, 1e-3, 2, 12))
        own = sum(1 for i in range(200) if i % 4 == k)
        shared = sum(1 for i in range(200) if i % 4 != k and L.share_hash(0, f"k{i:05d}") < 0.1)
        assert json.loads((job / "data.json").read_text())["samples"] == own + shared
    w0, w1 = weights(finals[0]), weights(finals[1])
    name = "visual.conv1.weight"
    assert not torch.equal(w0[name], seed_w[name]) and not torch.equal(w0[name], w1[name])


def test_expert_without_seed_checkpoint_is_a_clear_error(pool, tmp_path, capsys):
    argv = ["--data", str(pool / "shards"), "--out", str(tmp_path), "--expert", "0",
            "--clusters", str(pool / "clusters")]  # fmt: skip
    with pytest.raises(InputError, match=r"seed checkpoint .*seed/checkpoints/final.pt not found.*--stage seed"):
        run_train(argv)
    assert cli.main(["train", *BASE, *argv]) == 2
    assert "seed checkpoint" in capsys.readouterr().err


def test_expert_errors(seed_run, pool):
    data = ["--data", str(pool / "shards"), "--out", str(seed_run), "--clusters", str(pool / "clusters")]
    with pytest.raises(ValueError, match="has 4 experts"):
        run_train(data + ["--expert", "4"])
    with pytest.raises(ValueError, match="4 steps are left for an expert, 9 asked"):
        run_train(data + ["--expert", "2", "--steps", "9"])  # expert_0 holds a finished run
    with pytest.raises(ValueError, match="needs --clusters"):
        run_train(["--data", str(pool / "shards"), "--out", str(seed_run), "--expert", "0"])
    with pytest.raises(ValueError, match="--stage expert needs --expert K"):
        run_train(data + ["--stage", "expert"])
    with pytest.raises(ValueError, match="drop --stage seed"):
        run_train(data + ["--stage", "seed", "--expert", "0"])
    # the same checks from Python, where no parser resolves --stage
    with pytest.raises(ValueError, match="needs --clusters"):
        TrainConfig(data=("x",), out=seed_run, stage="expert", expert=0)
    with pytest.raises(ValueError, match="drop --stage seed"):
        TrainConfig(data=("x",), out=seed_run, expert=0, clusters=pool / "clusters")


def test_assignment_keys_that_match_no_shard_key_are_named(seed_run, pool, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "assignments").mkdir()
    pq.write_table(pa.table({"key": ["uid-1", "uid-2"], "fine": [0, 1], "expert": [0, 1], "sqdist": [0.0, 0.0]}),
                   tmp_path / "assignments" / "x.parquet")  # fmt: skip
    with pytest.raises(
        ValueError, match=r"no usable samples.*200 shard keys \(e.g. 'k\d+'\) have no assignment.*'uid-1'"
    ):
        # another --out: seed_run/expert_0 holds a finished run with other --clusters
        run_train(
            [
                "--data",
                str(pool / "shards"),
                "--out",
                str(tmp_path / "run"),
                "--expert",
                "0",
                "--clusters",
                str(tmp_path),
                "--seed-checkpoint",
                str(seed_run / "seed/checkpoints/final.pt"),
            ]
        )


def test_keep_keys_from_curate_filter_the_pool(pool, tmp_path):
    kept = [f"k{i:05d}" for i in range(0, 200, 2)]
    (tmp_path / "kept_keys.txt").write_text("\n".join(kept) + "\n")
    run_train(["--data", str(pool / "shards"), "--out", str(tmp_path), "--steps", "1",
               "--keep-keys", str(tmp_path / "kept_keys.txt")])  # fmt: skip
    data = json.loads((tmp_path / "seed/data.json").read_text())
    assert data["samples"] == 100 and data["skipped"] == {"filtered out": 100}
    (tmp_path / "other_keys.txt").write_text("uid-1\n")
    with pytest.raises(ValueError, match=r"no usable samples.*holds keys like 'uid-1'"):
        run_train(["--data", str(pool / "shards"), "--out", str(tmp_path / "x"), "--steps", "1",
                   "--keep-keys", str(tmp_path / "other_keys.txt")])  # fmt: skip


def test_logit_scale_is_clamped_at_ln_100(seed_run, pool, tmp_path):
    ckpt = torch.load(seed_run / "seed/checkpoints/final.pt", weights_only=True)
    ckpt["state_dict"]["logit_scale"].fill_(6.0)  # temperature 403 > CLIP's cap of 100
    torch.save(ckpt, tmp_path / "hot_seed.pt")
    final = run_train(["--data", str(pool / "shards"), "--out", str(tmp_path), "--expert", "3",
                       "--clusters", str(pool / "clusters"), "--seed-checkpoint",
                       str(tmp_path / "hot_seed.pt"), "--steps", "1"])  # fmt: skip
    assert weights(final)["logit_scale"].item() == pytest.approx(math.log(100.0))


def test_siglip_option(pool, tmp_path):
    final = run_train(["--data", str(pool / "shards"), "--out", str(tmp_path), "--siglip", "--steps", "2"])
    w = weights(final)
    assert "logit_bias" in w and math.isfinite(metrics(tmp_path / "seed")[-1]["loss"])


# --------------------------------------------------------------------------- data key errors
@pytest.mark.parametrize("flag,value,pattern", [
    ("--caption-key", "title", r"caption key 'title' not found in the first sample 'k00000'"),
    ("--image-key", "jpg;webp", r"image key 'jpg;webp' not found in the first sample 'k00000'"),
])  # fmt: skip
def test_wrong_key_fails_up_front(pool, tmp_path, flag, value, pattern, capsys):
    argv = ["--data", str(pool / "shards"), "--out", str(tmp_path), flag, value, "--steps", "1"]
    started = time.perf_counter()
    with pytest.raises(InputError, match=pattern):
        run_train(argv)
    assert time.perf_counter() - started < 30  # fails, does not hang
    assert cli.main(["train", *BASE, *argv]) == 2
    assert "--" + flag.lstrip("-") in capsys.readouterr().err


# --------------------------------------------------------------------------- resume
def test_resume_after_interruption_is_bit_identical(pool, tmp_path):
    # 200 pairs / 16 = 12 steps per epoch; 16 steps cross into epoch 1. Patch dropout
    # draws from the trainer's RNG, so its state must come back too.
    common = ["--data", str(pool / "shards"), "--steps", "16", "--save-every", "5", "--patch-dropout", "0.5"]
    full = run_train(common + ["--out", str(tmp_path / "a")])

    b = tmp_path / "b"
    run_train(common + ["--out", str(b), "--stop-at-step", "8"])  # killed at 8, checkpoint at 5
    assert not (b / "seed/checkpoints/final.pt").exists()
    assert torch.load(b / "seed/checkpoints/latest.pt", weights_only=True)["job_step"] == 5
    # resumed with loader workers: the data order does not depend on them
    resumed = run_training(TrainConfig.from_args(parse(BASE[:-3] + ["--workers", "2", "--no-progress"] + common
                                + ["--out", str(b), "--resume"])))  # fmt: skip

    wa, wb = weights(full), weights(resumed)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    oa = torch.load(full, weights_only=True)["optimizer"]["state"]
    ob = torch.load(resumed, weights_only=True)["optimizer"]["state"]
    for i in oa:
        assert torch.equal(oa[i]["exp_avg_sq"], ob[i]["exp_avg_sq"])
    # metrics after the checkpoint were logged again, not twice
    la, lb = metrics(tmp_path / "a/seed"), metrics(b / "seed")
    assert [r["step"] for r in lb] == list(range(1, 17))
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]


def test_resume_with_other_arguments_is_refused(pool, tmp_path):
    common = ["--data", str(pool / "shards"), "--out", str(tmp_path), "--steps", "4", "--save-every", "2"]
    run_train(common + ["--stop-at-step", "3"])
    # run.json stops it first (naming the flag), before the checkpoint's own config check
    with pytest.raises(ValueError, match=r"made with --lr 0.001, this run has --lr 0.002: rerun with --overwrite"):
        run_train(common + ["--resume", "--lr", "2e-3"])


def test_checkpoints_are_written_atomically(pool, tmp_path, monkeypatch):
    """A crash while writing leaves the previous checkpoint intact and no temp file."""
    common = ["--data", str(pool / "shards"), "--out", str(tmp_path), "--steps", "6", "--save-every", "2"]
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint (step 4)
            f.write(b"partial")
            raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        run_train(common)
    ckpt_dir = tmp_path / "seed/checkpoints"
    assert [p.name for p in ckpt_dir.iterdir()] == ["latest.pt"]
    assert torch.load(ckpt_dir / "latest.pt", weights_only=True)["job_step"] == 2


# --------------------------------------------------------------------------- DDP
def test_two_gloo_processes_match_one_process(pool, tmp_path):
    common = ["--data", str(pool / "shards"), "--steps", "4", "--model", "mode-fast-tiny",
              "--warmup", "2", "--lr", "1e-3", "--workers", "0", "--no-progress"]  # fmt: skip
    one = run_training(TrainConfig.from_args(parse(common + ["--batch-size", "16", "--out", str(tmp_path / "one")])))
    torchrun(2, common + ["--batch-size", "8", "--out", str(tmp_path / "two")])
    two = tmp_path / "two/seed/checkpoints/final.pt"
    assert json.loads((tmp_path / "two/seed/config.json").read_text())["world_size"] == 2
    l1 = [r["loss"] for r in metrics(tmp_path / "one/seed")]
    l2 = [r["loss"] for r in metrics(tmp_path / "two/seed")]
    assert l1 == pytest.approx(l2, rel=1e-5)
    w1, w2 = weights(one), weights(two)
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5, msg=name)


def torchrun(nproc: int, argv: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "mode_fast", "train", *argv]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_process_resume_is_bit_identical(pool, tmp_path):
    """Each rank's random state (patch dropout) is checkpointed and restored."""
    common = ["--data", str(pool / "shards"), "--steps", "5", "--batch-size", "8", "--save-every", "2",
              "--patch-dropout", "0.5", "--warmup", "2", "--workers", "0", "--no-progress"]  # fmt: skip
    torchrun(2, common + ["--out", str(tmp_path / "a")])
    torchrun(2, common + ["--out", str(tmp_path / "b"), "--stop-at-step", "3"])
    torchrun(2, common + ["--out", str(tmp_path / "b"), "--resume"])
    wa = weights(tmp_path / "a/seed/checkpoints/final.pt")
    wb = weights(tmp_path / "b/seed/checkpoints/final.pt")
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


# --------------------------------------------------------------------------- open_clip's trainer
@pytest.mark.parametrize("siglip", [False, True])
def test_open_clip_trainer_runs_with_this_projects_loss(tmp_path, monkeypatch, siglip):
    """open_clip_train's main on its synthetic data through mode_fast.jobs.open_clip_main: the
    loss it trains with is this project's, and equals open_clip's on the same features."""
    import logging

    import open_clip

    from mode_fast.jobs import open_clip_main

    pytest.importorskip("pandas", reason="open_clip_train needs pandas (open_clip_torch[training])")

    ours_cls = training.loss_classes()[1 if siglip else 0]
    reference = open_clip.loss.SigLipLoss() if siglip else open_clip.loss.ClipLoss()
    seen: list[tuple[float, float]] = []

    class Recording(torch.nn.Module):
        def __init__(self, ours: torch.nn.Module) -> None:
            super().__init__()
            self.ours = ours

        def forward(self, **kw):
            out = self.ours(**kw)
            out_value = out["contrastive_loss"].detach()
            with torch.no_grad():
                ref = reference(**{k: v.detach() if torch.is_tensor(v) else v for k, v in kw.items()})
            seen.append((out_value.item(), ref["contrastive_loss"].item()))
            return out

    def recording_create_loss(args):
        loss = real_create_loss(args)
        assert type(loss) is ours_cls
        return Recording(loss)

    real_create_loss = open_clip_main.create_loss
    monkeypatch.setattr(open_clip_main, "create_loss", recording_create_loss)
    root = logging.getLogger()
    root_handlers = root.handlers[:]
    levels = {name: lg.level for name, lg in logging.root.manager.loggerDict.items()
              if isinstance(lg, logging.Logger)}  # fmt: skip
    levels[""] = root.level
    try:
        open_clip_main.main([
            "--dataset-type", "synthetic", "--train-num-samples", "64", "--batch-size", "16",
            "--epochs", "1", "--model", "mode-fast-tiny", "--workers", "0", "--device", "cpu",
            "--precision", "fp32", "--logs", str(tmp_path), "--name", "oc", "--save-frequency", "0",
            "--zeroshot-frequency", "0", "--val-frequency", "0", "--log-every-n-steps", "1",
            "--lr", "1e-3", "--warmup", "1", "--seed", "0", *(["--siglip"] if siglip else []),
        ])  # fmt: skip
    finally:
        # open_clip's setup_logging replaces the handlers and sets every logger's level
        root.handlers[:] = root_handlers
        for name, lg in list(logging.root.manager.loggerDict.items()):
            if isinstance(lg, logging.Logger):
                lg.setLevel(levels.get(name, logging.NOTSET))
        root.setLevel(levels[""])
    assert len(seen) == 4
    for ours, ref in seen:
        assert ours == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert "Train Epoch: 0" in (tmp_path / "oc/out.log").read_text()
