"""`mode-fast curate` end to end on small pools, against plain-Python references."""

from __future__ import annotations

import io
import json
import logging
import math
import random
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from matching_reference import naive_match

from mode_fast.cli import main
from mode_fast.curation.balance import (
    entry_probabilities,
    expected_kept,
    key_hashes,
    pair_uniforms,
    record_scores,
    solve_t,
)
from mode_fast.curation.run import CurateConfig, run_curation
from mode_fast.data.io import ShardError, read_shard

METADATA = [
    "dog",
    "cat",
    "hot dog",
    "dog stand",
    "red",
    "blue",
    "circle",
    "square",
    "sky",
    "sea",
    "ice cream",
    "café",
    "tree",
    "green tree",
    "bird",
    "rare thing",
]
WORDS = (
    ["dog"] * 12
    + ["cat"] * 6
    + ["red"] * 5
    + [
        "hot",
        "stand",
        "blue",
        "circle",
        "square",
        "sky",
        "sea",
        "ice",
        "cream",
        "café",
        "tree",
        "green",
        "bird",
        "rare",
        "thing",
        "a",
        "the",
        "photo",
        "of",
    ]
)


def make_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 8))]
        caption = " ".join(words) + rng.choice(["", ".", ",", "!"])
        recs.append({"uid": f"u{i:05d}", "caption": caption})
    return recs


@pytest.fixture
def meta(metadata_file) -> Path:
    return metadata_file(METADATA)


def kept_keys(out: Path) -> list[str]:
    return (out / "kept_keys.txt").read_text().split()


def run(pool, out, metadata, **kw):
    kw.setdefault("workers", 1)
    return curate([str(pool)], out, metadata=metadata, **kw)


def curate(pools, out, **kw):
    return run_curation(CurateConfig(pools=tuple(pools), out=out, **kw))


def outputs(out: Path) -> dict[str, bytes]:
    """Every output file by relative name, except the timing-dependent summary."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in out.rglob("*")
        if p.is_file() and ".work" not in p.parts and p.name != "summary.json"
    }


TRICKY = [
    "hot dog stand",
    "a\tdog\nstand",
    "ice cream.",
    "café!",
    "dog,cat",
    "dog  cat",
    "Dog",
    "",
    "bird:tree;sky?",
    "`red`",
    "green tree tree",
]


# --- the maths against plain Python ------------------------------------------------------------


def test_scores_and_expectation_against_plain_python():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 4, 200)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.concatenate([np.sort(rng.choice(16, k, replace=False)) for k in lengths]).astype(np.int32)
    counts = rng.integers(1, 100, 16).astype(np.uint64)
    hashes = key_hashes([f"k{i}" for i in range(200)])
    u = pair_uniforms(hashes, offsets, ids, seed=7)
    scores = record_scores(hashes, offsets, ids, counts, seed=7)
    p = entry_probabilities(counts, 30)
    expected = 0.0
    for r in range(200):
        seg = slice(offsets[r], offsets[r + 1])
        if lengths[r] == 0:
            assert scores[r] == np.inf
            continue
        assert scores[r] == min(u[seg] * counts[ids[seg]].astype(float))
        # kept iff some entry succeeds (u < p), the reference's rule
        assert (scores[r] < 30) == any(u[seg] < p[ids[seg]])
        expected += 1 - math.prod(1 - p[i] for i in ids[seg])
    assert expected_kept(offsets, ids, p) == pytest.approx(expected, rel=1e-12)
    np.testing.assert_array_equal(entry_probabilities(np.array([0, 5, 30, 60], np.uint64), 30), [1, 1, 1, 0.5])
    for n in (1, 57, 138):
        assert (scores < solve_t(scores, n)).sum() == n


def test_pair_uniforms_look_uniform_and_depend_on_seed_key_and_entry():
    n = 20000
    hashes = key_hashes([f"uid-{i}" for i in range(n)])
    offsets = np.arange(0, 2 * n + 1, 2, dtype=np.int64)
    ids = np.tile(np.array([3, 4], np.int32), n)
    u = pair_uniforms(hashes, offsets, ids, seed=1)
    assert u.min() >= 0 and u.max() < 1
    # mean, and the fraction under 0.1, within 5 standard errors
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / (2 * n))
    assert abs((u < 0.1).mean() - 0.1) < 5 * math.sqrt(0.09 / (2 * n))
    # two entries of one record, and two seeds, are uncorrelated
    assert abs(np.corrcoef(u[0::2], u[1::2])[0, 1]) < 5 / math.sqrt(n)
    assert abs(np.corrcoef(u, pair_uniforms(hashes, offsets, ids, seed=2))[0, 1]) < 5 / math.sqrt(2 * n)


# --- the pipeline ----------------------------------------------------------------------------


def test_counts_equal_naive_reference(tmp_path, meta, make_pool):
    recs = make_records(400) + [{"uid": f"t{i}", "caption": c} for i, c in enumerate(TRICKY)]
    make_pool(tmp_path / "pool", recs, 3, "parquet")
    summary = run(tmp_path / "pool", tmp_path / "out", meta, t=5)
    expected = np.zeros(len(METADATA), dtype=np.uint64)
    for r in recs:
        for i in naive_match(METADATA, r["caption"]):
            expected[i] += 1
    counts = np.load(tmp_path / "out" / "entry_count.npy")
    assert counts.dtype == np.uint64
    np.testing.assert_array_equal(counts, expected)
    assert summary["pool_size"] == len(recs)
    assert summary["matched"] == sum(bool(naive_match(METADATA, r["caption"])) for r in recs)
    probs = np.load(tmp_path / "out" / "entry_prob.npy")
    assert probs.dtype == np.float64
    np.testing.assert_allclose(probs, entry_probabilities(expected, 5))
    assert summary["head_entries"][0] == {"id": 0, "entry": "dog", "count": int(expected[0])}
    assert summary["entries_with_count_over_t"] == int((expected > 5).sum())
    assert summary["entries_never_matched"] == int((expected == 0).sum())


def test_kept_set_independent_of_sharding_workers_and_format(tmp_path, meta, make_pool):
    recs = make_records(600)
    make_pool(tmp_path / "one", recs, 1)
    make_pool(tmp_path / "three", recs, 3, interleave=True)
    make_pool(tmp_path / "jsonl", recs, 2, "jsonl")
    a = run(tmp_path / "one", tmp_path / "out1", meta, t=10, seed=3)
    b = run(tmp_path / "three", tmp_path / "out3", meta, t=10, seed=3, workers=2)
    c = run(tmp_path / "jsonl", tmp_path / "outj", meta, t=10, seed=3, workers=2)
    assert a["kept"] == b["kept"] == c["kept"] and 0 < a["kept"] < a["matched"]
    assert (
        sorted(kept_keys(tmp_path / "out1"))
        == sorted(kept_keys(tmp_path / "out3"))
        == sorted(kept_keys(tmp_path / "outj"))
    )
    np.testing.assert_array_equal(
        np.load(tmp_path / "out1" / "entry_count.npy"), np.load(tmp_path / "out3" / "entry_count.npy")
    )
    run(tmp_path / "one", tmp_path / "out_seed4", meta, t=10, seed=4)
    assert set(kept_keys(tmp_path / "out_seed4")) != set(kept_keys(tmp_path / "out1"))


def test_new_t_reuses_matches_and_keeps_a_subset(tmp_path, meta, make_pool, caplog):
    make_pool(tmp_path / "pool", make_records(500), 2)
    out = tmp_path / "out"
    first = run(tmp_path / "pool", out, meta, t=20)
    assert first["matches_computed_shards"] == 2
    stored = {p: p.stat().st_mtime_ns for p in (out / ".work" / "matches").glob("*.npz")}
    big = set(kept_keys(out))
    caplog.set_level(logging.INFO, logger="mode_fast.curation")
    second = run(tmp_path / "pool", out, meta, t=5)
    logged = caplog.messages
    assert second["matches_reused_shards"] == 2 and second["matches_computed_shards"] == 0
    assert {p: p.stat().st_mtime_ns for p in (out / ".work" / "matches").glob("*.npz")} == stored
    assert any("reusing stored matches for 2 of 2" in m for m in logged)
    small = set(kept_keys(out))
    assert small < big and len(small) == second["kept"]
    # the ladder printed before sampling predicted this t's kept size exactly
    assert {row["t"]: row["kept_with_seed"] for row in first["t_ladder"]}[5] == second["kept"]


def test_changed_input_or_caption_key_recomputes_and_says_so(tmp_path, meta, make_pool, caplog):
    recs = make_records(200)
    shards = make_pool(tmp_path / "pool", recs, 2)
    out = tmp_path / "out"
    run(tmp_path / "pool", out, meta, t=5)
    make_pool(tmp_path / "pool2", recs[:50], 1)
    (tmp_path / "pool2" / "pool-0000.tar").replace(shards[1])  # same name, other content
    caplog.set_level(logging.INFO, logger="mode_fast.curation")
    summary = run(tmp_path / "pool", out, meta, t=5)
    logged = caplog.messages
    assert summary["matches_computed_shards"] == 1 and summary["pool_size"] == 150
    assert any("recomputing 1 shards" in m for m in logged)
    summary = run(tmp_path / "pool", out, meta, t=5, caption_key="txt")
    assert summary["matches_computed_shards"] == 2


def test_target_size_keeps_exactly_n(tmp_path, meta, make_pool):
    make_pool(tmp_path / "pool", make_records(500), 2)
    out = tmp_path / "out"
    summary = run(tmp_path / "pool", out, meta, target_size=123)
    assert summary["kept"] == 123 and len(kept_keys(out)) == 123 and summary["target_size"] == 123
    assert sum(1 for p in (out / "data").glob("*.tar") for _ in read_shard(p)) == 123
    summary = run(tmp_path / "pool", out, meta, target_size=10**6)  # more than the pool: all matched
    assert summary["kept"] == summary["matched"]


def test_keep_rate_matches_reference_probability(tmp_path, meta, make_pool):
    recs = make_records(3000, seed=1)
    make_pool(tmp_path / "pool", recs, 2)
    summary = run(tmp_path / "pool", tmp_path / "out", meta, t=40)
    counts = np.load(tmp_path / "out" / "entry_count.npy")
    p = entry_probabilities(counts, 40)
    keep_probs = [
        1 - math.prod(1 - p[i] for i in naive_match(METADATA, r["caption"]))
        for r in recs
        if naive_match(METADATA, r["caption"])
    ]
    mean = sum(keep_probs)
    sd = math.sqrt(sum(q * (1 - q) for q in keep_probs))
    assert summary["expected_kept"] == pytest.approx(mean, rel=1e-9)
    assert abs(summary["kept"] - mean) < 4 * sd, (summary["kept"], mean, sd)
    assert summary["kept"] < 0.8 * summary["matched"]  # t=40 really balances this pool
    # per-entry: records kept because of a rare entry are kept more often than head ones
    kept = set(kept_keys(tmp_path / "out"))
    only_dog = [r["uid"] for r in recs if naive_match(METADATA, r["caption"]) == [0]]
    assert len(only_dog) > 50
    rate, p_dog = sum(u in kept for u in only_dog) / len(only_dog), p[0]
    assert abs(rate - p_dog) < 4 * math.sqrt(p_dog * (1 - p_dog) / len(only_dog)), (rate, p_dog)


def test_resume_after_kill_gives_identical_outputs(tmp_path, meta, make_pool):
    make_pool(tmp_path / "pool", make_records(400), 3)
    out = tmp_path / "out"
    run(tmp_path / "pool", out, meta, t=10)
    before = outputs(out)
    # A kill: one shard's matches gone (pass 1), another's curated shard and stamp gone
    # (pass 2), a half-written temporary left behind.
    next((out / ".work" / "matches").glob("pool-0000-*.npz")).unlink()
    (out / "data" / "pool-0001.tar").unlink()
    next((out / ".work" / "sampled").glob("pool-0001-*.json")).unlink()
    (out / "data" / ".pool-0001.tar.abc123.tmp").write_bytes(b"half")
    summary = run(tmp_path / "pool", out, meta, t=10)
    # re-matching shard 0 gives the same lists and counts, so its curated shard stands
    assert summary["matches_computed_shards"] == 1 and summary["sampled_shards"] == 1
    assert outputs(out) == before


def test_crash_in_pass_two_leaves_no_manifest_then_resumes(tmp_path, meta, make_pool, monkeypatch):
    import mode_fast.curation.shards as C

    make_pool(tmp_path / "pool", make_records(300), 3)
    clean = tmp_path / "clean"
    run(tmp_path / "pool", clean, meta, t=10)
    out = tmp_path / "out"
    run(tmp_path / "pool", out, meta, t=30)  # a finished run with another t
    real_write_kept = C.write_kept

    def dies_on_second_shard(src, dst, keep):
        if "pool-0001" in str(src):
            raise KeyboardInterrupt  # like a kill: mid-run, nothing cleaned up by us
        return real_write_kept(src, dst, keep)

    monkeypatch.setattr(C, "write_kept", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "pool", out, meta, t=10)
    # data/ now mixes t=10 and t=30 shards: nothing may claim the curation is finished
    assert not (out / "manifest.json").exists() and not (out / "kept_keys.txt").exists()
    monkeypatch.setattr(C, "write_kept", real_write_kept)
    summary = run(tmp_path / "pool", out, meta, t=10)
    assert summary["sampled_shards"] == 2  # the first shard was done at t=10 already
    assert outputs(out) == outputs(clean)


def test_removed_input_removes_its_curated_shard(tmp_path, meta, make_pool):
    make_pool(tmp_path / "pool", make_records(300), 3)
    out = tmp_path / "out"
    run(tmp_path / "pool", out, meta, t=10)
    assert len(list((out / "data").glob("*.tar"))) == 3
    summary = curate([str(tmp_path / "pool" / "pool-000{0,1}.tar")], out, metadata=meta, t=10)
    assert summary["stale_outputs_removed"] == 1
    assert sorted(p.name for p in (out / "data").glob("*.tar")) == ["pool-0000.tar", "pool-0001.tar"]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_output_in_input_format(tmp_path, meta, make_pool, fmt):
    recs = make_records(300)
    make_pool(tmp_path / "pool", recs, 2, fmt)
    out = tmp_path / "out"
    summary = run(tmp_path / "pool", out, meta, t=8)
    keys = kept_keys(out)
    if fmt == "parquet":
        src_schema = pq.read_schema(tmp_path / "pool" / "pool-0000.parquet")
        tables = [pq.read_table(p) for p in sorted((out / "data").glob("*.parquet"))]
        assert len(tables) == 2 and all(t.schema == src_schema for t in tables)
        rows = [r for t in tables for r in t.to_pylist()]
    else:
        lines = [line for p in sorted((out / "data").glob("*.jsonl")) for line in p.read_text().splitlines()]
        source_lines = {
            json.loads(line)["uid"]: line
            for p in sorted((tmp_path / "pool").glob("*.jsonl"))
            for line in p.read_text().splitlines()
        }
        assert all(source_lines[json.loads(line)["uid"]] == line for line in lines)  # lines copied as they were
        rows = [json.loads(line) for line in lines]
    assert len(rows) == summary["kept"] and [r["uid"] for r in rows] == keys  # pool order
    by_uid = {r["uid"]: r for r in recs}
    assert all(r["caption"] == by_uid[r["uid"]]["caption"] for r in rows)


def test_tar_output_members_byte_identical(tmp_path, meta, make_pool):
    make_pool(tmp_path / "pool", make_records(200), 1)
    out = tmp_path / "out"
    run(tmp_path / "pool", out, meta, t=8)
    with tarfile.open(tmp_path / "pool" / "pool-0000.tar") as src, tarfile.open(out / "data" / "pool-0000.tar") as dst:
        src_members = [(m.name, src.extractfile(m).read()) for m in src.getmembers()]
        dst_members = [(m.name, dst.extractfile(m).read()) for m in dst.getmembers()]
    keys = kept_keys(out)
    assert 0 < len(keys) < 200
    assert dst_members == [m for m in src_members if m[0].split(".")[0] in set(keys)]


def _member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_bad_records_are_counted_and_the_rest_processed(tmp_path, meta, make_tar):
    pool = tmp_path / "pool"
    pool.mkdir()
    make_tar(
        pool / "a.tar",
        [
            ("good1.txt", b"a dog"),
            ("badutf.txt", b"a dog \xff\xfe"),
            ("nocap.jpg", b"\xff\xd8"),
            ("badjson.json", b"{not json"),
            ("good2.txt", b"a cat"),
        ],
    )
    # A shard cut off in the middle of a member.
    make_tar(pool / "b.tar", [("t1.txt", b"red sky"), ("t2.txt", b"blue sea " * 200)])
    (pool / "b.tar").write_bytes((pool / "b.tar").read_bytes()[: 1024 + 700])
    (pool / "c.jsonl").write_text(
        '{"uid": "j1", "caption": "green tree"}\n{broken\n{"uid": "j3"}\n{"uid": "j4", "caption": "dog \\ud800"}\n'
    )
    pq.write_table(pa.table({"uid": ["p1", "p2"], "caption": ["sky", None]}), pool / "d.parquet")
    summary = run(pool, tmp_path / "out", meta, t=100)
    assert summary["skipped"] == {
        "invalid_utf8": 2,
        "missing_caption": 3,
        "bad_json": 2,
        "corrupt_member": 1,
        "corrupt_tar_tail": 1,
    }
    assert summary["skipped_total"] == 8 and summary["pool_size"] == 13
    assert set(kept_keys(tmp_path / "out")) == {"good1", "good2", "t1", "j1", "p1"}
    assert summary["skipped_by_shard"][str(pool / "b.tar")] == {"corrupt_member": 1, "corrupt_tar_tail": 1}


def test_unreadable_shards_fail_naming_the_file(tmp_path, meta):
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "junk.tar").write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(ShardError, match="junk.tar"):
        run(tmp_path / "pool", tmp_path / "out", meta, t=1)
    with pytest.raises(ShardError, match="missing.tar"):
        run(tmp_path / "missing.tar", tmp_path / "out", meta, t=1)
    pq.write_table(pa.table({"text": ["a dog"]}), tmp_path / "nocol.parquet")
    with pytest.raises(ShardError, match="nocol.parquet: caption column 'caption' not found"):
        run(tmp_path / "nocol.parquet", tmp_path / "out2", meta, t=1, workers=2)


def test_jsonl_gz_and_brace_patterns(tmp_path, meta):
    import gzip

    recs = make_records(60)
    (tmp_path / "pool").mkdir()
    for s in range(3):
        with gzip.open(tmp_path / "pool" / f"p-{s:03d}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs[s::3])
    summary = curate([str(tmp_path / "pool" / "p-{000..002}.jsonl.gz")], tmp_path / "out", metadata=meta, t=1000)
    assert summary["shards"] == 3 and summary["pool_size"] == 60
    assert len(list((tmp_path / "out" / "data").glob("*.jsonl.gz"))) == 3


def test_duplicate_keys_are_reported(tmp_path, meta, make_pool):
    recs = make_records(50)
    make_pool(tmp_path / "pool", recs + recs[:7], 1, "jsonl")
    summary = run(tmp_path / "pool", tmp_path / "out", meta, t=1000)
    assert summary["duplicate_keys"] == 7


def test_cli_estimate_and_run(tmp_path, meta, make_pool, capsys):
    from mode_fast.curation.metadata import metadata_sha256

    make_pool(tmp_path / "pool", make_records(300), 2)
    out = tmp_path / "out"
    assert (
        main(
            [
                "curate",
                str(tmp_path / "pool"),
                "--out",
                str(out),
                "--metadata",
                str(meta),
                "--t",
                "10",
                "--estimate",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "expected kept" in err and "<- chosen" in err
    assert not (out / "data").exists() and not (out / "manifest.json").exists()
    assert json.loads((out / "summary.json").read_text())["estimate_only"] is True
    assert (
        main(
            [
                "curate",
                str(tmp_path / "pool"),
                "--out",
                str(out),
                "--metadata",
                str(meta),
                "--target-size",
                "50",
                "--seed",
                "9",
                "--workers",
                "2",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert summary["kept"] == 50 and summary["matches_reused_shards"] == 2
    assert manifest["kept"] == 50 and manifest["seed"] == 9 and manifest["t"] == summary["t"]
    assert [Path(i["path"]).name for i in manifest["inputs"]] == ["pool-0000.tar", "pool-0001.tar"]
    assert all(i["size"] == Path(i["path"]).stat().st_size for i in manifest["inputs"])
    assert manifest["metadata"]["sha256"] == metadata_sha256(METADATA)
    import hashlib

    assert manifest["entry_count_sha256"] == hashlib.sha256((out / "entry_count.npy").read_bytes()).hexdigest()
    assert main(["curate", str(tmp_path / "nothing*.tar"), "--out", str(out)]) == 2
    assert "matches no shard" in capsys.readouterr().err
    assert main(["curate", str(tmp_path / "pool"), "--out", str(out), "--metadata", str(meta), "--t", "-1"]) == 2
    assert "t must be a positive number" in capsys.readouterr().err


def test_run_json_args_are_the_configs_result_flags(tmp_path, meta, make_pool):
    """The parser is built from CurateConfig, and run.json records its result-changing flags:
    --metadata by the list's sha256, --semantics (added with MetaCLIP 2) only when not metaclip1,
    --keep-keys (added with dedup) only when given."""
    import argparse

    from mode_fast.core.config import result_flags
    from mode_fast.curation.metadata import metadata_sha256
    from mode_fast.jobs import curate as curate_job

    make_pool(tmp_path / "pool", make_records(100), 1)
    parser = argparse.ArgumentParser()
    curate_job.add_arguments(parser)
    out = tmp_path / "out"
    args = parser.parse_args([str(tmp_path / "pool"), "--out", str(out), "--metadata", str(meta), "--t", "5"])
    assert curate_job.run(args) == 0
    recorded = json.loads((out / "run.json").read_text())["args"]
    assert set(recorded) == result_flags(CurateConfig) - {"--semantics", "--keep-keys"}
    assert recorded["--metadata"] == metadata_sha256(METADATA) and recorded["--t"] == 5.0
    with pytest.raises(SystemExit):  # argparse: one of the two
        parser.parse_args([str(tmp_path / "pool"), "--out", str(out), "--t", "5", "--target-size", "3"])


def test_old_curate_entry_warns_and_still_logs_to_its_callback(tmp_path, meta, make_pool, monkeypatch):
    monkeypatch.delitem(sys.modules, "mode_fast.curate", raising=False)  # imported fresh: it warns
    with pytest.warns(DeprecationWarning, match="mode_fast.curate moved to mode_fast.curation.run"):
        from mode_fast.curate import curate as old_curate  # 0.1's path

    make_pool(tmp_path / "pool", make_records(100), 1)
    logged: list[str] = []
    with pytest.warns(DeprecationWarning, match="run_curation"):
        summary = old_curate(
            [str(tmp_path / "pool")], tmp_path / "out", metadata=meta, t=5, workers=1, log=logged.append
        )
    assert summary == run_curation(
        CurateConfig(pools=(str(tmp_path / "pool"),), out=tmp_path / "out", metadata=meta, t=5)
    )
    assert any("<- chosen" in m for m in logged)


def test_a_work_folder_named_by_the_old_shard_ids_is_redone_not_mixed(tmp_path, meta, make_pool):
    """0.1 named .work files name-sha1[:10] (pool-0000.tar-0123456789.npz); they are never read:
    a rerun that changes anything matches again and removes the old stamps and key lists."""
    make_pool(tmp_path / "pool", make_records(300), 2)
    out = tmp_path / "out"
    run(tmp_path / "pool", out, meta, t=20)
    for sub in ("matches", "sampled", "kept"):  # as 0.1 left them
        for p in (out / ".work" / sub).iterdir():
            stem, digest = p.stem.rsplit("-", 1)
            p.rename(p.with_name(f"{stem}.tar-{digest}ab{p.suffix}"))
    summary = run(tmp_path / "pool", out, meta, t=10)
    assert summary["matches_computed_shards"] == 2 and summary["sampled_shards"] == 2
    assert not list((out / ".work" / "sampled").glob("*.tar-*")) and not list((out / ".work" / "kept").glob("*.tar-*"))
    run(tmp_path / "pool", tmp_path / "clean", meta, t=10)
    redone, clean = outputs(out), outputs(tmp_path / "clean")
    del redone["run.json"], clean["run.json"]  # its outputs list names the old matches files too
    assert redone == clean


# --- --keep-keys: curate only the listed records ---------------------------------------------


def test_keep_keys_curates_as_if_the_pool_held_only_the_listed_records(tmp_path, meta, make_pool, caplog):
    """The reference: the same curation over a pool written with only the listed records
    (kept sets do not depend on sharding). Unlisted records are filtered, not skipped; a rerun
    is a no-op; new file contents are redone (matches reused); the old contents come back."""
    import hashlib

    recs = make_records(500)
    listed = [r for i, r in enumerate(recs) if i % 3]
    make_pool(tmp_path / "pool", recs, 3)
    make_pool(tmp_path / "listed", listed, 2)
    keys = tmp_path / "kept_keys.txt"
    keys.write_text("\n".join(r["uid"] for r in listed) + "\n\nnot-in-the-pool\n")  # blank and stray lines
    out = tmp_path / "out"
    got = run(tmp_path / "pool", out, meta, t=10, seed=2, keep_keys=keys)
    ref = run(tmp_path / "listed", tmp_path / "ref", meta, t=10, seed=2)
    assert sorted(kept_keys(out)) == sorted(kept_keys(tmp_path / "ref")) and 0 < got["kept"] < len(listed)
    np.testing.assert_array_equal(np.load(out / "entry_count.npy"), np.load(tmp_path / "ref" / "entry_count.npy"))
    for name in ("matched", "kept", "expected_kept", "skipped_total"):
        assert got[name] == ref[name], name
    assert got["pool_size"] == 500 and got["filtered_by_keep_keys"] == 500 - len(listed)
    assert got["keep_keys"] == {"file": str(keys), "sha256": hashlib.sha256(keys.read_bytes()).hexdigest(),
                                "keys": len(listed) + 1}  # fmt: skip
    curated = {r.key for p in sorted((out / "data").iterdir()) for r in read_shard(p, "caption")}
    assert curated == set(kept_keys(out))
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["args"]["--keep-keys"] == got["keep_keys"]["sha256"]

    caplog.set_level(logging.INFO, logger="mode_fast.curation")
    assert run(tmp_path / "pool", out, meta, t=10, seed=2, keep_keys=keys) == got  # a no-op
    assert any("nothing to do" in m for m in caplog.messages)

    fewer = [r for i, r in enumerate(listed) if i % 2]
    keys.write_text("\n".join(r["uid"] for r in fewer) + "\n")  # same path, other content
    redone = run(tmp_path / "pool", out, meta, t=10, seed=2, keep_keys=keys)
    make_pool(tmp_path / "fewer", fewer, 1)
    ref2 = run(tmp_path / "fewer", tmp_path / "ref2", meta, t=10, seed=2)
    assert redone["matches_reused_shards"] == 3 and redone["sampled_shards"] == 3
    assert sorted(kept_keys(out)) == sorted(kept_keys(tmp_path / "ref2")) and redone["kept"] == ref2["kept"]
    assert redone["filtered_by_keep_keys"] == 500 - len(fewer)

    without = run(tmp_path / "pool", out, meta, t=10, seed=2)  # no list: the whole pool again
    assert "filtered_by_keep_keys" not in without and without["sampled_shards"] == 3
    assert "--keep-keys" not in json.loads((out / "run.json").read_text())["args"]


def test_keep_keys_errors_are_one_line(tmp_path, meta, make_pool, capsys):
    make_pool(tmp_path / "pool", make_records(60), 1)
    base = ["curate", str(tmp_path / "pool"), "--out", str(tmp_path / "out"), "--metadata", str(meta), "--t", "5"]
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    (tmp_path / "other_pool.txt").write_text("x1\nx2\n")
    for name, says in [
        ("missing.txt", "missing.txt: file not found (curate writes OUT/kept_keys.txt)"),
        (".", "not a file"),
        ("latin1.txt", "latin1.txt: not UTF-8 text"),
        ("other_pool.txt", "lists none of the pool's 60 records (it holds keys like 'x1')"),
    ]:
        assert main([*base, "--keep-keys", str(tmp_path / name)]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("mode-fast curate: error: --keep-keys ") and says in err[-1], err
        assert not (tmp_path / "out" / "manifest.json").exists()
