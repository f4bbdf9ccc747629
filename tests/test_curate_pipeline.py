"""`mode-fast curate` end to end on small pools, against plain-Python references."""
from __future__ import annotations

import gzip
import io
import json
import math
import random
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from matching_reference import naive_match
from mode_fast.cli import main
from mode_fast.curate import curate, entry_probabilities
from mode_fast.data.io import ShardError, read_shard

METADATA = ["dog", "cat", "hot dog", "dog stand", "red", "blue", "circle", "square", "sky", "sea",
            "ice cream", "café", "tree", "green tree", "bird", "rare thing"]
WORDS = ["dog"] * 12 + ["cat"] * 6 + ["red"] * 5 + ["hot", "stand", "blue", "circle", "square", "sky", "sea",
         "ice", "cream", "café", "tree", "green", "bird", "rare", "thing", "a", "the", "photo", "of"]


def make_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 8))]
        caption = " ".join(words) + rng.choice(["", ".", ",", "!"])
        recs.append({"uid": f"u{i:05d}", "caption": caption})
    return recs


def write_tar(path: Path, recs: list[dict]) -> None:
    with tarfile.open(path, "w") as tf:
        for r in recs:
            for ext, data in (("txt", r["caption"].encode()), ("json", json.dumps(r).encode()), ("jpg", b"\xff\xd8fake")):
                info = tarfile.TarInfo(f"{r['uid']}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def write_pool(folder: Path, recs: list[dict], n_shards: int, fmt: str = "tar") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        part = recs[s::n_shards] if fmt == "interleave" else recs[s * len(recs) // n_shards:(s + 1) * len(recs) // n_shards]
        if fmt in ("tar", "interleave"):
            p = folder / f"pool-{s:04d}.tar"
            write_tar(p, part)
        elif fmt == "parquet":
            p = folder / f"pool-{s:04d}.parquet"
            pq.write_table(pa.table({"uid": [r["uid"] for r in part], "caption": [r["caption"] for r in part],
                                     "extra": list(range(len(part)))}), p)
        else:
            p = folder / f"pool-{s:04d}.jsonl"
            p.write_text("".join(json.dumps(r) + "\n" for r in part))
        paths.append(p)
    return paths


@pytest.fixture
def metadata_file(tmp_path: Path) -> Path:
    p = tmp_path / "metadata.json"
    p.write_text(json.dumps(METADATA))
    return p


def kept_keys(out: Path) -> list[str]:
    return (out / "kept_keys.txt").read_text().split()


def run(pool, out, metadata_file, **kw):
    return curate([str(pool)], out, metadata=metadata_file, workers=kw.pop("workers", 1), log=lambda m: None, **kw)


def test_counts_equal_naive_reference(tmp_path, metadata_file):
    recs = make_records(400)
    write_pool(tmp_path / "pool", recs, 3)
    summary = run(tmp_path / "pool", tmp_path / "out", metadata_file, t=5)
    expected = np.zeros(len(METADATA), dtype=np.uint64)
    for r in recs:
        for i in naive_match(METADATA, r["caption"]):
            expected[i] += 1
    counts = np.load(tmp_path / "out" / "entry_count.npy")
    assert counts.dtype == np.uint64
    np.testing.assert_array_equal(counts, expected)
    assert summary["pool_size"] == 400
    assert summary["matched"] == sum(bool(naive_match(METADATA, r["caption"])) for r in recs)
    np.testing.assert_allclose(np.load(tmp_path / "out" / "entry_prob.npy"), entry_probabilities(expected, 5))


def test_kept_set_independent_of_sharding_and_workers(tmp_path, metadata_file):
    recs = make_records(600)
    write_pool(tmp_path / "one", recs, 1)
    write_pool(tmp_path / "three", recs, 3, fmt="interleave")
    a = run(tmp_path / "one", tmp_path / "out1", metadata_file, t=10, seed=3)
    b = run(tmp_path / "three", tmp_path / "out3", metadata_file, t=10, seed=3, workers=2)
    assert a["kept"] == b["kept"] and 0 < a["kept"] < a["matched"]
    assert sorted(kept_keys(tmp_path / "out1")) == sorted(kept_keys(tmp_path / "out3"))
    c = run(tmp_path / "one", tmp_path / "out_seed4", metadata_file, t=10, seed=4)
    assert set(kept_keys(tmp_path / "out_seed4")) != set(kept_keys(tmp_path / "out1"))


def test_new_t_reuses_matches_and_keeps_a_subset(tmp_path, metadata_file):
    write_pool(tmp_path / "pool", make_records(500), 2)
    out = tmp_path / "out"
    first = run(tmp_path / "pool", out, metadata_file, t=20)
    assert first["matches_reused_shards"] == 0
    big = set(kept_keys(out))
    second = run(tmp_path / "pool", out, metadata_file, t=5)
    assert second["matches_reused_shards"] == 2
    small = set(kept_keys(out))
    assert small < big and len(small) == second["kept"]


def test_target_size_keeps_exactly_n(tmp_path, metadata_file):
    write_pool(tmp_path / "pool", make_records(500), 2)
    out = tmp_path / "out"
    summary = run(tmp_path / "pool", out, metadata_file, target_size=123)
    assert summary["kept"] == 123 and len(kept_keys(out)) == 123
    written = sum(1 for p in (out / "data").glob("*.tar") for _ in read_shard(p))
    assert written == 123


def test_keep_rate_matches_reference_probability(tmp_path, metadata_file):
    recs = make_records(3000, seed=1)
    write_pool(tmp_path / "pool", recs, 2)
    summary = run(tmp_path / "pool", tmp_path / "out", metadata_file, t=40)
    counts = np.load(tmp_path / "out" / "entry_count.npy")
    p = entry_probabilities(counts, 40)
    keep_probs = [1 - math.prod(1 - p[i] for i in naive_match(METADATA, r["caption"]))
                  for r in recs if naive_match(METADATA, r["caption"])]
    mean = sum(keep_probs)
    sd = math.sqrt(sum(q * (1 - q) for q in keep_probs))
    assert summary["expected_kept"] == pytest.approx(mean, rel=1e-9)
    assert abs(summary["kept"] - mean) < 4 * sd, (summary["kept"], mean, sd)
    assert summary["kept"] < 0.8 * summary["matched"]  # t=40 really balances this pool


def test_resume_rewrites_only_what_is_missing(tmp_path, metadata_file):
    write_pool(tmp_path / "pool", make_records(400), 3)
    out = tmp_path / "out"
    run(tmp_path / "pool", out, metadata_file, t=10)
    before = {p.name: p.read_bytes() for p in (out / "data").glob("*.tar")}
    keys_before = kept_keys(out)
    # A kill mid-run: one shard's output and done stamp missing, a temporary left behind.
    victim = sorted((out / "data").glob("*.tar"))[1]
    victim.unlink()
    next((out / ".work" / "sampled").glob("pool-0001.tar-*.json")).unlink()
    (out / "data" / ".pool-0001.tar.abc.tmp").write_bytes(b"half")
    summary = run(tmp_path / "pool", out, metadata_file, t=10)
    assert summary["matches_reused_shards"] == 3
    assert {p.name: p.read_bytes() for p in (out / "data").glob("*.tar")} == before
    assert kept_keys(out) == keys_before


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_output_in_input_format(tmp_path, metadata_file, fmt):
    recs = make_records(300)
    write_pool(tmp_path / "pool", recs, 2, fmt=fmt)
    out = tmp_path / "out"
    summary = run(tmp_path / "pool", out, metadata_file, t=8)
    keys = set(kept_keys(out))
    if fmt == "parquet":
        tables = [pq.read_table(p) for p in sorted((out / "data").glob("*.parquet"))]
        assert all(t.schema == pq.read_table(tmp_path / "pool" / "pool-0000.parquet").schema for t in tables)
        rows = [r for t in tables for r in t.to_pylist()]
    else:
        rows = [json.loads(line) for p in sorted((out / "data").glob("*.jsonl")) for line in p.read_text().splitlines()]
    assert len(rows) == summary["kept"] and {r["uid"] for r in rows} == keys
    by_uid = {r["uid"]: r for r in recs}
    assert all(r["caption"] == by_uid[r["uid"]]["caption"] for r in rows)


def test_tar_output_members_byte_identical(tmp_path, metadata_file):
    write_pool(tmp_path / "pool", make_records(200), 1)
    out = tmp_path / "out"
    run(tmp_path / "pool", out, metadata_file, t=8)
    with tarfile.open(tmp_path / "pool" / "pool-0000.tar") as src, tarfile.open(out / "data" / "pool-0000.tar") as dst:
        src_members = {m.name: src.extractfile(m).read() for m in src.getmembers()}
        dst_members = {m.name: dst.extractfile(m).read() for m in dst.getmembers()}
    assert dst_members and all(src_members[name] == data for name, data in dst_members.items())
    assert {n.split(".")[0] for n in dst_members} == set(kept_keys(out))
    assert all(f"{k}.{e}" in dst_members for k in kept_keys(out) for e in ("txt", "json", "jpg"))


def _member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_bad_records_are_counted_and_the_rest_processed(tmp_path, metadata_file):
    pool = tmp_path / "pool"
    pool.mkdir()
    with tarfile.open(pool / "a.tar", "w") as tf:
        _member(tf, "good1.txt", b"a dog")
        _member(tf, "badutf.txt", b"a dog \xff\xfe")
        _member(tf, "nocap.jpg", b"\xff\xd8")
        _member(tf, "badjson.json", b"{not json")
        _member(tf, "good2.txt", b"a cat")
    # A shard cut off in the middle of a member.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        _member(tf, "t1.txt", b"red sky")
        _member(tf, "t2.txt", b"blue sea " * 200)
    (pool / "b.tar").write_bytes(buf.getvalue()[:1024 + 700])
    (pool / "c.jsonl").write_text('{"uid": "j1", "caption": "green tree"}\n{broken\n{"uid": "j3"}\n')
    summary = run(pool, tmp_path / "out", metadata_file, t=100)
    assert summary["skipped"] == {"invalid_utf8": 1, "missing_caption": 2, "bad_json": 2, "corrupt_tar_tail": 1}
    assert set(kept_keys(tmp_path / "out")) == {"good1", "good2", "t1", "j1"}
    assert str(pool / "b.tar") in summary["skipped_by_shard"]


def test_corrupt_header_mid_tar_is_reported(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(4):
            _member(tf, f"k{i}.txt", b"dog")
    data = bytearray(buf.getvalue())
    data[1024:1024 + 100] = b"\x07" * 100  # second member's header: bad checksum
    (tmp_path / "x.tar").write_bytes(bytes(data))
    recs = list(read_shard(tmp_path / "x.tar"))
    assert [r.key for r in recs if r.skip_reason is None] == ["k0"]
    assert recs[-1].skip_reason == "corrupt_tar_tail"


def test_unreadable_shards_fail_naming_the_file(tmp_path, metadata_file):
    (tmp_path / "pool").mkdir()
    bad = tmp_path / "pool" / "junk.tar"
    bad.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(ShardError, match="junk.tar"):
        run(tmp_path / "pool", tmp_path / "out", metadata_file, t=1)
    with pytest.raises(ShardError, match="missing.tar"):
        run(tmp_path / "missing.tar", tmp_path / "out", metadata_file, t=1)
    pq.write_table(pa.table({"text": ["a dog"]}), tmp_path / "nocol.parquet")
    with pytest.raises(ShardError, match="caption column 'caption' not found"):
        run(tmp_path / "nocol.parquet", tmp_path / "out2", metadata_file, t=1)


def test_jsonl_gz_and_brace_patterns(tmp_path, metadata_file):
    recs = make_records(60)
    (tmp_path / "pool").mkdir()
    for s in range(3):
        with gzip.open(tmp_path / "pool" / f"p-{s:03d}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs[s::3])
    summary = curate([str(tmp_path / "pool" / "p-{000..002}.jsonl.gz")], tmp_path / "out", metadata=metadata_file,
                     t=1000, workers=1, log=lambda m: None)
    assert summary["shards"] == 3 and summary["pool_size"] == 60
    assert len(list((tmp_path / "out" / "data").glob("*.jsonl.gz"))) == 3


def test_cli_estimate_and_run(tmp_path, metadata_file, capsys):
    write_pool(tmp_path / "pool", make_records(300), 2)
    out = tmp_path / "out"
    assert main(["curate", str(tmp_path / "pool"), "--out", str(out), "--metadata", str(metadata_file),
                 "--t", "10", "--estimate", "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "expected kept" in err and "<- chosen" in err
    assert not (out / "data").exists() and (out / "summary.json").exists()
    assert main(["curate", str(tmp_path / "pool"), "--out", str(out), "--metadata", str(metadata_file),
                 "--target-size", "50", "--workers", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert summary["kept"] == 50 and summary["matches_reused_shards"] == 2
    assert manifest["kept"] == 50 and len(manifest["inputs"]) == 2 and len(manifest["metadata"]["sha256"]) == 64
    assert main(["curate", str(tmp_path / "nothing*.tar"), "--out", str(out)]) == 2
    assert "matches no shard" in capsys.readouterr().err
