"""One shard reader for every job: the same key rule in curate, cluster, train, eval and
the demo; a damaged header costs one sample, counted and reported; data-side user errors
are one line with exit 2."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from mode_fast import cli
from mode_fast.data import io as dio
from mode_fast.data import loader as L
from mode_fast.evaluation import tasks

ROOT = Path(__file__).resolve().parents[1]


def png(i: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), i % 256, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_members(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return path


def damage_header(path: Path, member_index: int) -> None:
    """Garbage in the name field of one member's header: its checksum no longer matches."""
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tf:
        offset = tf.getmembers()[member_index].offset
    data[offset : offset + 100] = b"\x07" * 100
    path.write_bytes(bytes(data))


def one_line_error(err: str, job: str) -> str:
    """The one error line among the job's log lines; no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"mode-fast {job}: error: "), err
    return lines[0]


# --------------------------------------------------------------------------- the key rule
ODD_MEMBERS = [
    ("__index__.json", b'{"shards": 1}'),  # webdataset-style metadata: no sample
    ("a.png", png(1)),
    ("a.txt", b"caption a"),
    ("a.cls", b"0"),
    ("noext", b"no extension: no sample"),
    ("b.png", png(2)),
    ("b.txt", b"caption b1"),
    ("b.cls", b"1"),
    ("b.png", png(3)),
    ("b.txt", b"caption b2"),
    ("b.cls", b"2"),  # repeated extensions: a 2nd record b
    ("d.", b"trailing dot: no sample"),
    ("c.png", png(4)),
    ("c.TXT", b"caption c"),
    ("c.cls", b"3"),
    ("dir/__meta__.txt", b"metadata again"),
]
EXPECTED_KEYS = ["a", "b", "b", "c"]
EXPECTED_CAPTIONS = ["caption a", "caption b1", "caption b2", "caption c"]


def test_key_rule_is_documented_and_shared():
    assert dio.member_key("__index__.json") == (None, "metadata_member")
    assert dio.member_key("dir/__meta__.txt") == (None, "metadata_member")
    assert dio.member_key("__key__") == (None, "metadata_member")
    assert dio.member_key("__k1.txt") == ("__k1", "txt")  # not __NAME__: a sample
    assert dio.member_key("noext") == (None, "no_extension")
    assert dio.member_key("d.") == (None, "no_extension")
    assert dio.member_key("dir/.hidden") == (None, "no_extension")
    assert dio.member_key("dir.v1/k.seg.JPG") == ("dir.v1/k", "seg.jpg")
    doc = dio.__doc__
    assert "__index__.json" in doc and "repeated extension" in doc and "without an extension" in doc


def test_every_job_reads_the_same_samples_from_odd_members(tmp_path):
    """__index__.json, extensionless names and repeated extensions: curate's reader, the
    training index and stream, eval's classification and retrieval tasks agree."""
    folder = tmp_path / "shards"
    shard = write_members(folder / "odd.tar", ODD_MEMBERS)
    (folder / "classes.json").write_text(json.dumps(["w", "x", "y", "z"]))

    # curate (and cluster, which reads through read_shard too)
    records = list(dio.read_shard(shard, caption_key="txt"))
    assert [r.key for r in records] == EXPECTED_KEYS
    assert [r.caption for r in records] == EXPECTED_CAPTIONS

    # train: the index and the batches it yields
    spec = L.SampleSpec(image_key="png", caption_key="txt")
    index = L.build_index([shard], spec)
    assert index.keys == [EXPECTED_KEYS] and index.skipped == {}
    assert index.report.ignored_members == {"metadata_member": 2, "no_extension": 2}
    stream = L.ShardStream(index, spec, lambda im: __import__("torch").zeros(1), lambda c: c, 4, shuffle_window=1)
    (batch,) = list(stream.iter_batches())
    assert sorted(zip(batch["keys"], batch["texts"])) == sorted(zip(EXPECTED_KEYS, EXPECTED_CAPTIONS))

    # eval: labels in record order, captions for retrieval
    task = tasks.load_task(str(folder))
    assert [y for _, y in task.items()] == [0, 1, 2, 3]
    rtask = tasks.load_retrieval_task(str(folder))
    assert [c for _, c in rtask.items()] == EXPECTED_CAPTIONS
    assert task.reads.read == rtask.reads.read == 4 and task.reads.skipped_total == 0


def test_no_shard_walker_outside_the_reader():
    """Tars are read only through mode_fast.data.io (writers may open tars for writing)."""
    readers = []
    for path in sorted((ROOT / "mode_fast").rglob("*.py")):
        if path.name == "io.py" and path.parent.name == "data":
            continue
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"tarfile\.open\(([^)]*)\)|\.extractfile\(|split_member_name|TarFile\b", text):
            if m.group(1) is not None and re.search(r"mode=\"w|, \"w", m.group(1)):
                continue  # writing a tar
            readers.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
    assert readers == []


@pytest.mark.skipif(shutil.which("duplicates") is None, reason="the duplicates tool is not installed")
def test_duplicates_finds_no_copied_shard_walker():
    out = subprocess.run(
        ["duplicates", "--repo", str(ROOT / "mode_fast"), "--most", "200", "--seconds", "60"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    walkers = ("data/io.py", "data/loader.py", "tasks.py", "pipeline.py")
    rows = [line for line in out.splitlines() if re.match(r"D\d+ ", line)]
    shared = [r for r in rows if sum(w in r for w in walkers) >= 2 and len({w for w in walkers if w in r}) == 2]
    assert shared == [], out


# --------------------------------------------------------------------------- damage
def damaged_pool(folder: Path, n: int = 200) -> Path:
    """n samples of three members (600 members); the header of member 100 (the second
    member of sample 33) is damaged."""
    members = []
    for i in range(n):
        members += [
            (f"k{i:05d}.png", png(i)),
            (f"k{i:05d}.txt", f"caption {i}".encode()),
            (f"k{i:05d}.cls", str(i % 4).encode()),
        ]
    shard = write_members(folder / "pool-000.tar", members)
    damage_header(shard, 100)
    (folder / "classes.json").write_text(json.dumps(["w", "x", "y", "z"]))
    return shard


def test_training_loader_reads_every_other_sample_and_reports_the_skip(tmp_path):
    import torch

    shard = damaged_pool(tmp_path / "pool")
    spec = L.SampleSpec(image_key="png", caption_key="txt")
    index = L.build_index([shard], spec)
    assert index.total == 199 and "k00033" not in index.keys[0]
    assert index.skipped == {"corrupt_member": 1}
    report = index.report.skips_dict()
    assert report["skipped_total"] == 1 and report["skipped_by_shard"] == {str(shard): {"corrupt_member": 1}}
    stream = L.ShardStream(index, spec, lambda im: torch.zeros(1), lambda c: c, 1, shuffle_window=1)
    keys = [k for b in L.TrainLoader(stream, num_workers=1).epoch(0) for k in b["keys"]]
    assert keys == [f"k{i:05d}" for i in range(200) if i != 33]


def test_eval_tasks_read_every_other_sample_and_report_the_skip(tmp_path, caplog):
    shard = damaged_pool(tmp_path / "pool")
    task = tasks.load_task(str(tmp_path / "pool"))
    labels = [y for _, y in task.items()]
    assert labels == [i % 4 for i in range(200) if i != 33]
    assert task.reads.read == 199 and task.reads.skipped == {"corrupt_member": 1}
    assert task.reads.skips_dict()["skipped_by_shard"] == {str(shard): {"corrupt_member": 1}}
    assert any("damaged tar" in r.getMessage() and "pool-000.tar" in r.getMessage() for r in caplog.records)
    rtask = tasks.load_retrieval_task(str(tmp_path / "pool"))
    assert len(list(rtask.items())) == 199 and rtask.reads.skipped_total == 1


def test_undecodable_image_in_a_loader_worker_is_filled_and_counted(tmp_path):
    """k5 cannot be decoded: its slot is filled from its column (epoch positions 1, 5 with
    a global batch of 4 and no shuffle: k1) and the skip travels with the batch; a column
    with no decodable image left is one named error, raised through the worker."""
    import torch

    def stream(bad: set[int], name: str) -> L.ShardStream:
        shard = write_members(
            tmp_path / name,
            [m for i in range(8) for m in ((f"k{i}.png", b"not a png" if i in bad else png(i)), (f"k{i}.txt", b"cap"))],
        )
        spec = L.SampleSpec(image_key="png", caption_key="txt")
        return L.ShardStream(
            L.build_index([shard], spec), spec, lambda im: torch.zeros(1), lambda c: c, 4, shuffle_window=1
        )

    batches = list(L.TrainLoader(stream({5}, "pool-000.tar"), num_workers=1).epoch(0))
    assert [b["keys"] for b in batches] == [["k0", "k1", "k2", "k3"], ["k4", "k1", "k6", "k7"]]
    assert [b["skips"] for b in batches] == [[], [[str(tmp_path / "pool-000.tar"), "k5", "undecodable image"]]]
    with pytest.raises(L.SampleError) as e:
        list(L.TrainLoader(stream({1, 5}, "pool-001.tar"), num_workers=1).epoch(0))
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "pool-001.tar") in message and "'k1'" in message
    assert "none of the 2 samples" in message


# --------------------------------------------------------------------------- CLI errors
def test_curate_wrong_caption_key_is_one_line(tmp_path, make_pool, capsys):
    make_pool(tmp_path / "pool", [{"uid": f"u{i}", "caption": f"a dog {i}"} for i in range(6)], 2)
    code = cli.main(
        [
            "curate",
            str(tmp_path / "pool"),
            "--out",
            str(tmp_path / "out"),
            "--caption-key",
            "text",
            "--workers",
            "1",
            "--t",
            "5",
        ]
    )
    assert code == 2
    line = one_line_error(capsys.readouterr().err, "curate")
    assert "caption key 'text' is in none of the 6 records" in line
    assert "members .jpg, .json, .txt; .json fields caption, uid" in line
    (tmp_path / "j.jsonl").write_text('{"uid": "a", "caption": "a dog"}\n')
    assert (
        cli.main(
            [
                "curate",
                str(tmp_path / "j.jsonl"),
                "--out",
                str(tmp_path / "out2"),
                "--caption-key",
                "text",
                "--workers",
                "1",
                "--t",
                "5",
            ]
        )
        == 2
    )
    assert "they have fields caption, uid" in one_line_error(capsys.readouterr().err, "curate")


@pytest.mark.parametrize("blocker", ["file_in_the_way", "read_only_folder"])
def test_curate_unwritable_out_is_one_line_naming_the_path(tmp_path, make_pool, capsys, blocker):
    make_pool(tmp_path / "pool", [{"uid": f"u{i}", "caption": f"a dog {i}"} for i in range(4)], 1)
    if blocker == "file_in_the_way":
        (tmp_path / "taken").write_text("a file where a folder should be")
        out = tmp_path / "taken" / "out"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        out = tmp_path / "ro" / "out"
    code = cli.main(["curate", str(tmp_path / "pool"), "--out", str(out), "--workers", "1", "--t", "5"])
    assert code == 2
    line = one_line_error(capsys.readouterr().err, "curate")
    assert str(out) in line


def test_train_wrong_caption_key_and_bad_image_are_one_line(tmp_path, capsys):
    shard = write_members(
        tmp_path / "pool" / "pool-000.tar",
        [m for i in range(8) for m in ((f"k{i}.png", png(i) if i != 5 else b"not a png"), (f"k{i}.txt", b"cap"))],
    )
    base = [
        "train",
        "--data",
        str(tmp_path / "pool"),
        "--model",
        "mode-fast-tiny",
        "--batch-size",
        "4",
        "--warmup",
        "1",
        "--steps",
        "2",
        "--no-progress",
        "--shuffle-window",
        "1",
    ]
    assert cli.main(base + ["--out", str(tmp_path / "a"), "--caption-key", "title", "--workers", "0"]) == 2
    line = one_line_error(capsys.readouterr().err, "train")
    assert "caption key 'title' not found in the first sample 'k0'" in line and ".png, .txt" in line
    assert (
        cli.main(base + ["--out", str(tmp_path / "b"), "--image-key", "png", "--caption-key", "txt", "--workers", "1"])
        == 2
    )
    line = one_line_error(capsys.readouterr().err, "train")  # 1 of 8 is over --max-bad-share's 0.1%
    assert str(shard) in line and "'k5' (undecodable image)" in line and "--max-bad-share 0.001" in line


def test_train_reads_past_a_damaged_header_and_reports_the_skip(tmp_path, caplog):
    shard = damaged_pool(tmp_path / "pool")
    code = cli.main(
        [
            "train",
            "--data",
            str(tmp_path / "pool"),
            "--out",
            str(tmp_path / "run"),
            "--model",
            "mode-fast-tiny",
            "--batch-size",
            "16",
            "--warmup",
            "1",
            "--steps",
            "1",
            "--workers",
            "0",
            "--no-progress",
        ]
    )
    assert code == 0
    data = json.loads((tmp_path / "run" / "seed" / "data.json").read_text())
    assert data["samples"] == 199 and data["skipped"] == {"corrupt_member": 1} and data["skipped_total"] == 1
    assert data["skipped_by_shard"] == {str(shard): {"corrupt_member": 1}}
    log = caplog.text  # the job's log
    assert "read 199 samples, skipped 1 (corrupt_member 1 in pool-000.tar)" in log and "damaged tar" in log


@pytest.mark.parametrize("caption_key", ["caption", "alt"])
def test_caption_key_means_one_thing_in_every_job(tmp_path, caption_key):
    """A sample with a .txt and a .json holding both fields: curate, train and eval's
    retrieval take the caption from the same place (the .json field named by the key; the
    .txt is the fallback only for the default key when no such field exists)."""
    from mode_fast.training.loop import resolve_sample_spec

    folder = tmp_path / "shards"
    members = []
    for i in range(3):
        meta = {"caption": f"json caption {i}", "alt": f"json alt {i}"}
        members += [
            (f"s{i}.png", png(i)),
            (f"s{i}.txt", f"txt {i}".encode()),
            (f"s{i}.json", json.dumps(meta).encode()),
        ]
    shard = write_members(folder / "a.tar", members)
    expected = [f"json {caption_key} {i}" for i in range(3)]

    assert [r.caption for r in dio.read_shard(shard, caption_key=caption_key)] == expected  # curate, cluster
    assert resolve_sample_spec(shard, "png", caption_key).caption_key == f"json:{caption_key}"  # train
    rtask = tasks.load_retrieval_task(str(folder), caption_key=caption_key)  # eval
    assert [c for _, c in rtask.items()] == expected


@pytest.mark.parametrize("caption_key", ["txt", "TXT", ".txt", " .Txt"])
def test_caption_key_names_a_member_the_same_way_in_every_job(tmp_path, caption_key):
    """Members are read with lower-cased extensions (webdataset's rule); a key naming one is
    compared the same way, a leading dot allowed, by curate, train and eval alike."""
    from mode_fast.data.loader import SampleSpec
    from mode_fast.training.loop import resolve_sample_spec

    folder = tmp_path / "shards"
    members = []
    for i in range(3):
        members += [(f"s{i}.png", png(i)), (f"s{i}.TXT", f"txt {i}".encode()), (f"s{i}.json", b'{"alt": "x"}')]
    shard = write_members(folder / "a.tar", members)
    expected = [f"txt {i}" for i in range(3)]

    assert [r.caption for r in dio.read_shard(shard, caption_key=caption_key)] == expected  # curate, cluster
    spec = resolve_sample_spec(shard, "png", caption_key)  # train
    assert isinstance(spec, SampleSpec) and spec.caption_ext == "txt"
    rtask = tasks.load_retrieval_task(str(folder), caption_key=caption_key)  # eval
    assert [c for _, c in rtask.items()] == expected
