"""Bad images in training and eval data: skipped, counted by reason and shard, their batch
slots filled so batches stay full and resume stays exact; one line past --max-bad-share;
giant images decoded with bounded memory (mode_fast.data.images)."""

from __future__ import annotations

import io
import json
import logging
import math
import struct
import subprocess
import sys
import tarfile
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_tar_members
from test_evaluate import env, eval_cli, write_formats  # noqa: F401  (env: fixture)
from test_loader import collect, identity_preprocess, make_shards, toy_tokenizer
from test_train import BASE, metrics, parse, run_train, torchrun, weights

from mode_fast import cli
from mode_fast.data import loader as L
from mode_fast.data.images import MAX_PIXELS, OVER_PIXEL_LIMIT, UNDECODABLE, decode_image
from mode_fast.training import run as train
from mode_fast.training.run import TrainConfig, run_training

torch.set_num_threads(1)  # bitwise equality of resumed runs needs the same sums; shared 2-core machine

ROOT = Path(__file__).resolve().parents[1]
OVERSIZED, TRUNCATED = "k00098", "k00074"  # in shard 00001; trained in epoch 0 (steps 2, 7) and 1 (steps 15, 16)
STEPS = 16  # one epoch of 12 steps and 4 more: each bad sample is met twice, counted once


# --------------------------------------------------------------------------- crafted images
def grey_jpeg(width: int, height: int) -> bytes:
    """A valid baseline JPEG of flat grey (128) of any size in a few bits per 8x8 block: PIL's
    own 8x8 encoding with the size patched and the scan repeated (a block of 128 is DC 0 and
    end-of-block: '00' '1010' in the standard tables)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buf, "JPEG", quality=75)
    data = buf.getvalue()
    sof, sos = data.index(b"\xff\xc0"), data.index(b"\xff\xda")
    head = bytearray(data[: sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")])
    head[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    blocks = math.ceil(width / 8) * math.ceil(height / 8)
    bits = "001010" * (blocks % 4)
    bits += "1" * (-len(bits) % 8)
    tail = int(bits, 2).to_bytes(len(bits) // 8, "big") if bits else b""
    return bytes(head) + b"\x28\xa2\x8a" * (blocks // 4) + tail + b"\xff\xd9"


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, in 45 bytes (no pixel data)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def truncated_jpeg() -> bytes:
    return grey_jpeg(400, 400)[:1000]  # the scan cut short


BAD = {OVERSIZED: png_header(30000, 30000), TRUNCATED: truncated_jpeg()}
REASONS = {OVERSIZED: OVER_PIXEL_LIMIT, TRUNCATED: UNDECODABLE}


def test_decoding_rule():
    from PIL import Image

    ok = io.BytesIO()
    Image.fromarray(np.arange(24 * 16 * 3, dtype=np.uint8).reshape(16, 24, 3)).save(ok, "PNG")
    got = decode_image(ok.getvalue())
    assert got.reason is None and np.array_equal(np.asarray(got.image), np.asarray(Image.open(ok).convert("RGB")))
    assert decode_image(png_header(30000, 30000)).reason == OVER_PIXEL_LIMIT  # PIL's bomb error, caught
    assert decode_image(png_header(10000, 9000)).reason == OVER_PIXEL_LIMIT  # between PIL's warning and error
    assert decode_image(png_header(9000, 9000)).reason == UNDECODABLE  # within the limit, no pixel data
    assert decode_image(truncated_jpeg()).reason == UNDECODABLE
    assert decode_image(b"not an image").reason == UNDECODABLE
    # a JPEG within the limit decodes whole; over it, at the smallest DCT scale that fits
    assert decode_image(grey_jpeg(64, 48)).image.size == (64, 48)
    small = decode_image(grey_jpeg(64, 48), max_pixels=1000)
    assert small.image.size == (32, 24) and set(np.asarray(small.image).ravel()) == {128}
    assert decode_image(grey_jpeg(64, 48), max_pixels=48).image.size == (8, 6)
    assert decode_image(grey_jpeg(64, 48), max_pixels=47).reason == OVER_PIXEL_LIMIT  # over even at 1/8


MEASURE = textwrap.dedent("""
    import resource, sys
    from mode_fast.data.images import decode_image
    data = open(sys.argv[1], "rb").read()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    got = decode_image(data)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(got.image.size if got.image is not None else got.reason, (after - before) // 1024)
""")


@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_a_giant_image_costs_little_memory(tmp_path, kind):
    """The largest clip art seen, 20,990 x 29,700 (623 megapixels, 1.9 GB as RGB): a JPEG
    decodes at 1/4 scale, a PNG is refused from its header; both in a fresh process whose
    peak RSS grows by well under the full image."""
    path = tmp_path / f"giant.{kind}"
    path.write_bytes(grey_jpeg(20990, 29700) if kind == "jpeg" else png_header(20990, 29700))
    p = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    result, grown_mb = p.stdout.rsplit(" ", 1)
    assert result == ("(5248, 7425)" if kind == "jpeg" else OVER_PIXEL_LIMIT)
    assert int(grown_mb) < 400, p.stdout  # 39 MP reduced: ~160 MB; decoded whole it would be ~2.5 GB


# --------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def bad_pool(tmp_path_factory) -> Path:
    """test_train's 200-pair pool, with an oversized and an undecodable image in shard 00001."""
    root = tmp_path_factory.mktemp("badpool")
    shards = make_shards(root / "shards", n=200, per_shard=64)
    with tarfile.open(shards[1]) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf if m.isfile()]
    write_tar_members(shards[1], [(n, BAD.get(n.split(".")[0], d) if n.endswith(".png") else d) for n, d in members])
    return root


def shard1(pool: Path) -> str:
    return str(pool / "shards" / "00001.tar")


def expected_skips(pool: Path) -> dict:
    return {
        "skipped_total": 2,
        "skipped": {OVER_PIXEL_LIMIT: 1, UNDECODABLE: 1},
        "skipped_by_shard": {shard1(pool): {OVER_PIXEL_LIMIT: 1, UNDECODABLE: 1}},
        "samples": sorted([shard1(pool), k, REASONS[k]] for k in BAD),
    }


def test_loader_fills_bad_slots_alike_for_any_workers_ranks_and_start(bad_pool):
    shards = sorted((bad_pool / "shards").glob("*.tar"))

    def stream(**kw) -> L.ShardStream:
        spec = L.SampleSpec()
        index = L.build_index(shards, spec)
        return L.ShardStream(index, spec, identity_preprocess, toy_tokenizer, 16, seed=0, **kw)

    whole = stream()
    batches = list(L.TrainLoader(whole, num_workers=0).epoch(0))
    assert len(batches) == 12
    for b in batches:
        assert len(b["keys"]) == len(set(b["keys"])) == 16 and not set(b["keys"]) & set(BAD)
    assert [(i, s[1:]) for i, b in enumerate(batches) for s in b["skips"]] == [
        (1, [OVERSIZED, OVER_PIXEL_LIMIT]),
        (6, [TRUNCATED, UNDECODABLE]),
    ]
    keys, images = collect(batches)
    keys2, images2 = collect(L.TrainLoader(whole, num_workers=2).epoch(0))
    assert keys2 == keys and torch.equal(images2, images)
    parts = [stream(rank=r, world_size=2) for r in range(2)]
    for b, b0, b1 in zip(batches, parts[0].iter_batches(), parts[1].iter_batches()):
        assert b["keys"] == b0["keys"] + b1["keys"] and b["skips"] == b0["skips"] + b1["skips"]
        assert torch.equal(b["images"], torch.cat([b0["images"], b1["images"]]))
    whole.set_position(0, 5)
    later = list(whole.iter_batches())
    assert [b["keys"] for b in later] == [b["keys"] for b in batches[5:]]
    assert torch.equal(collect(later)[1], images[5 * 16 :])


def _args(pool: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(pool / "shards"), "--out", str(out), "--steps", str(STEPS), "--save-every", "5",
            "--checkpoint-minutes", "0", "--patch-dropout", "0.5", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def reference(bad_pool, tmp_path_factory) -> dict:
    """An unbroken run past the epoch end, with the keys of every batch it trained on."""
    out = tmp_path_factory.mktemp("unbroken")
    seen: list[list[str]] = []
    real = train.train_step

    def recording(model, train_model, loss_fn, optimizer, batch, *a, **k):
        seen.append(list(batch["keys"]))
        return real(model, train_model, loss_fn, optimizer, batch, *a, **k)

    train.train_step = recording
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("mode_fast.training.run").addHandler(handler)
    try:
        final = run_train(_args(bad_pool, out, "--max-bad-share", "0.05"))
    finally:
        train.train_step = real
        logging.getLogger("mode_fast.training.run").removeHandler(handler)
    return {"final": final, "job": out / "seed", "batches": seen, "log": [r.getMessage() for r in records]}


def test_training_skips_bad_images_with_full_batches_and_counts_them(bad_pool, reference):
    assert reference["final"].is_file() and len(reference["batches"]) == STEPS
    for keys in reference["batches"]:
        assert len(keys) == len(set(keys)) == 16 and not set(keys) & set(BAD)
    data = json.loads((reference["job"] / "data.json").read_text())
    assert data["skipped_images"] == {**expected_skips(bad_pool), "max_bad_share": 0.05}
    assert data["samples"] == 200 and data["skipped_total"] == 0  # the index's own skips: none
    for key, reason in REASONS.items():  # logged once each, naming shard, sample and reason
        lines = [m for m in reference["log"] if repr(key) in m]
        assert len(lines) == 1 and shard1(bad_pool) in lines[0] and reason in lines[0], reference["log"]
    assert any("images skipped as bad in this job: 2" in m for m in reference["log"])
    ckpt = torch.load(reference["final"], weights_only=True)
    assert ckpt["skipped_images"] == expected_skips(bad_pool)["samples"]


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_killed_and_resumed_with_workers_is_bit_identical(bad_pool, reference, tmp_path):
    out = tmp_path / "run"
    run_train(_args(bad_pool, out, "--max-bad-share", "0.05", "--stop-at-step", "8"))  # killed at 8, saved at 5
    ckpt = torch.load(out / "seed/checkpoints/latest.pt", weights_only=True)
    assert ckpt["job_step"] == 5 and ckpt["skipped_images"] == [[shard1(bad_pool), OVERSIZED, OVER_PIXEL_LIMIT]]
    assert json.loads((out / "seed/data.json").read_text())["skipped_images"]["skipped_total"] == 1
    resumed = run_training(TrainConfig.from_args(parse(BASE[:-3] + ["--workers", "2", "--no-progress"] + _args(bad_pool, out, "--max-bad-share", "0.05"))))  # fmt: skip
    _same_weights(reference["final"], resumed)
    assert [r["loss"] for r in metrics(out / "seed")] == [r["loss"] for r in metrics(reference["job"])]
    assert (
        json.loads((out / "seed/data.json").read_text())["skipped_images"]
        == json.loads((reference["job"] / "data.json").read_text())["skipped_images"]
    )


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_past_max_bad_share_stops_with_one_line_and_a_higher_limit_continues(bad_pool, reference, tmp_path, capsys):
    out = tmp_path / "run"
    # 0.1% of 200 samples: the first bad image (step 2) is over the limit
    assert cli.main(["train", *BASE, *_args(bad_pool, out)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line == (
        f"mode-fast train: error: 1 of the 200 usable samples are bad images (0.5%), over --max-bad-share 0.001 "
        f"(0.1%): e.g. {shard1(bad_pool)} sample '{OVERSIZED}' (over pixel limit) ({out}/seed/data.json lists "
        "them); remove or re-encode them, or raise --max-bad-share"
    )
    assert torch.load(out / "seed/checkpoints/latest.pt", weights_only=True)["job_step"] == 2  # saved at the stop
    assert not (out / "seed/checkpoints/final.pt").exists()
    # the same limit stops again at once; a higher one is not a changed result argument: it continues
    assert cli.main(["train", *BASE, *_args(bad_pool, out)]) == 2
    assert "1 of the 200 usable samples" in _one_line(capsys.readouterr().err)
    assert cli.main(["train", *BASE, *_args(bad_pool, out, "--max-bad-share", "0.05")]) == 0
    _same_weights(reference["final"], out / "seed/checkpoints/final.pt")
    assert [r["step"] for r in metrics(out / "seed")] == list(range(1, STEPS + 1))


def test_two_processes_stop_together_and_count_the_bad_images_of_both_ranks(bad_pool, tmp_path):
    """OVERSIZED lies in rank 1's half of step 2, TRUNCATED in rank 0's half of step 7: every
    rank gathers them at each step, so both stop at step 2 past the default limit, and
    rank 0's data.json lists both after a rerun with a higher limit."""
    import os

    argv = _args(bad_pool, tmp_path, "--steps", "8", "--batch-size", "8", "--warmup", "2", "--workers", "0",
                 "--no-progress")  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mode_fast", "train", *argv]  # fmt: skip
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and p.stderr.count("error: 1 of the 200 usable samples are bad images") == 2, p.stderr
    assert torch.load(tmp_path / "seed/checkpoints/latest.pt", weights_only=True)["job_step"] == 2
    torchrun(2, [*argv, "--max-bad-share", "0.05"])
    assert json.loads((tmp_path / "seed/data.json").read_text())["skipped_images"] == {
        **expected_skips(bad_pool),
        "max_bad_share": 0.05,
    }
    assert [r["step"] for r in metrics(tmp_path / "seed")] == list(range(1, 9))


def test_batch_larger_than_the_data_is_one_line(bad_pool, tmp_path, capsys):
    argv = ["train", *BASE, "--data", str(bad_pool / "shards"), "--out", str(tmp_path), "--batch-size", "256"]
    assert cli.main(argv) == 2
    assert _one_line(capsys.readouterr().err) == (
        "mode-fast train: error: --batch-size 256 on 1 process(es): 200 usable samples are fewer than one "
        "global batch of 256; lower --batch-size or add data"
    )


# --------------------------------------------------------------------------- eval
def _add_bad_images(paths: dict[str, Path]) -> None:
    """An undecodable and an oversized image in each format of test_evaluate's write_formats."""
    folder = paths["folder"]
    first_class = sorted(d for d in folder.iterdir() if d.is_dir())[0]
    (first_class / "bad-truncated.jpg").write_bytes(truncated_jpeg())
    (first_class / "bad-giant.png").write_bytes(png_header(30000, 30000))
    csv_dir = paths["csv"].parent
    label = json.loads((csv_dir / "classes.json").read_text())[0]
    (csv_dir / "img" / "bad-truncated.jpg").write_bytes(truncated_jpeg())
    (csv_dir / "img" / "bad-giant.png").write_bytes(png_header(30000, 30000))
    with open(paths["csv"], "a") as f:
        f.write(f"img/bad-truncated.jpg,{label}\nimg/bad-giant.png,{label}\n")
    with tarfile.open(paths["wds"] / "x-000.tar", "a") as tf:
        for key, ext, image in (("bad-truncated", "jpg", truncated_jpeg()), ("bad-giant", "png", png_header(30000, 30000))):  # fmt: skip
            for name, data in ((f"{key}.{ext}", image), (f"{key}.json", json.dumps({"label": label}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_eval_skips_bad_images_and_counts_them(env, tmp_path, capsys):  # noqa: F811  (env: fixture)
    paths = write_formats(env["sample"], tmp_path / "data")
    clean = tmp_path / "clean"
    templates = str(env["sample"] / "eval" / "templates.json")
    specs = [f"{k}={v}" for k, v in paths.items()]
    assert eval_cli(env, clean, "--templates", templates, "--data", *specs) == 0
    _add_bad_images(paths)
    out = tmp_path / "out"
    assert eval_cli(env, out, "--templates", templates, "--max-bad-share", "0.05", "--data", *specs) == 0
    res, ref = (json.loads((d / "results.json").read_text())["tasks"] for d in (out, clean))
    shards = {"folder": str(paths["folder"]), "csv": str(paths["csv"]), "wds": str(paths["wds"] / "x-000.tar")}
    for name, t in res.items():
        assert t["n_images"] == 48 and t["top1"] == ref[name]["top1"]  # the same scores as without them
        assert t["skipped_total"] == 2 and t["skipped"] == {UNDECODABLE: 1, OVER_PIXEL_LIMIT: 1}
        assert t["skipped_by_shard"] == {shards[name]: {UNDECODABLE: 1, OVER_PIXEL_LIMIT: 1}}
    md = (out / "results.md").read_text()
    assert "- wds: read 48, skipped 2 (" in md and f"{OVER_PIXEL_LIMIT} 1" in md
    # 2 of 50 images is over the default 0.1%: one line naming the task, the count and the flag
    capsys.readouterr()
    assert eval_cli(env, tmp_path / "strict", "--templates", templates, "--data", specs[-1]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(
        "mode-fast eval: error: 2 of the 50 images of task wds are bad images (4%), over --max-bad-share 0.001 (0.1%)"
    )
    assert f"{shards['wds']} sample 'bad-giant' (over pixel limit)" in line
    assert eval_cli(env, tmp_path / "x", "--max-bad-share", "2", "--data", specs[-1]) == 2
    assert "--max-bad-share must be in [0, 1], got 2.0" in _one_line(capsys.readouterr().err)


def test_max_bad_share_must_be_a_share(bad_pool, tmp_path, capsys):
    for value, named in (("1.5", "must be in [0, 1], got 1.5"), ("nan", "must be a finite number, got nan"),
                         ("-0.1", "must be in [0, 1], got -0.1")):  # fmt: skip
        assert cli.main(["train", *BASE, *_args(bad_pool, tmp_path, "--max-bad-share", value)]) == 2
        assert f"--max-bad-share {named}" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "seed").exists() or not any((tmp_path / "seed").glob("checkpoints/*"))
    assert MAX_PIXELS == 89_478_485  # PIL's default, fixed
