"""Pool discovery, readers (captions, keys, bad input), writers and atomic writes."""

from __future__ import annotations

import gzip
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mode_fast.core.files import atomic_write, remove_stale_temporaries
from mode_fast.data import io as dio
from mode_fast.data.io import (
    ShardError,
    list_shards,
    read_shard,
    split_member_name,
    write_kept,
)

RECORDS = [{"uid": f"u{i:03d}", "caption": f"photo {i} of a dog"} for i in range(10)]


def _touch(*paths: Path) -> None:
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")


def _good(records: list[dio.Record]) -> list[tuple[str, str]]:
    return [(r.key, r.caption) for r in records if r.skip_reason is None]


def _reasons(records: list[dio.Record]) -> dict[str, str]:
    return {r.key: r.skip_reason for r in records if r.skip_reason is not None}


def _tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


# --- list_shards ---------------------------------------------------------------------------


def test_list_shards_files_folders_globs_braces(tmp_path):
    a = [tmp_path / "pool" / f"pool-{i:03d}.tar" for i in range(4)]
    nested = tmp_path / "pool" / "more" / "x.parquet"
    gz = tmp_path / "pool" / "more" / "y.jsonl.gz"
    _touch(*a, nested, gz, tmp_path / "pool" / "readme.txt", tmp_path / "pool" / "z.json")
    everything = sorted(p.resolve() for p in a + [nested, gz])
    assert list_shards([tmp_path / "pool"]) == everything
    assert list_shards([str(tmp_path / "pool" / "pool-{001..002}.tar")]) == [a[1].resolve(), a[2].resolve()]
    assert list_shards([str(tmp_path / "pool" / "pool-00{0,3}.tar")]) == [a[0].resolve(), a[3].resolve()]
    # Overlapping patterns: sorted and deduplicated.
    assert list_shards([str(tmp_path / "pool" / "*.tar"), str(a[0])]) == [p.resolve() for p in a]
    assert list_shards([str(tmp_path / "pool" / "**" / "*.parquet")]) == [nested.resolve()]
    assert list_shards([str(tmp_path / "po*")]) == everything  # a glob naming a folder: searched too


def test_list_shards_errors_name_the_pattern(tmp_path):
    with pytest.raises(ShardError, match="nope.tar: no such file"):
        list_shards([tmp_path / "nope.tar"])
    with pytest.raises(ShardError, match=r"\*\.jsonl: matches no shard"):
        list_shards([str(tmp_path / "*.jsonl")])
    _touch(tmp_path / "notes.txt", tmp_path / "a.tar")
    with pytest.raises(ShardError, match="notes.txt: matches no shard"):
        list_shards([tmp_path / "a.tar", tmp_path / "notes.txt"])
    with pytest.raises(ShardError, match="b.tar: no such file"):
        list_shards([str(tmp_path / "{a,b}.tar")])  # one brace alternative missing is an error too


# --- atomic writes -------------------------------------------------------------------------


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_write(target) as f:
        f.write(b"whole")
    assert target.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [target]
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write(b"new but half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"whole"  # the old file stays whole


def test_remove_stale_temporaries_only_touches_temporaries(tmp_path):
    (tmp_path / "data").mkdir()
    left = [tmp_path / "data" / ".a.tar.x1y2.tmp", tmp_path / ".summary.json.abc.tmp"]
    kept = [tmp_path / "data" / "a.tar", tmp_path / "data" / "b.tmp", tmp_path / ".hidden"]
    _touch(*left, *kept)
    assert remove_stale_temporaries(tmp_path) == 2
    assert not any(p.exists() for p in left) and all(p.exists() for p in kept)


# --- webdataset tars -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "abc.txt",
        "abc.seg.json",
        "dir/x.y/abc.jpg",
        "a.b.c.d",
        "noext",
        "dir/.hidden",
        "__key__",
        "dir/__k__.txt",
        "",
        "k.",
        "UP.TXT",
    ],
)
def test_member_names_split_as_webdataset_does(name):
    from webdataset.tariterators import base_plus_ext

    expected = (None, None) if name.startswith("__") and name.endswith("__") else base_plus_ext(name)
    assert split_member_name(name) == expected


def test_tar_caption_lookup(tmp_path, make_tar):
    path = make_tar(
        tmp_path / "a.tar",
        [
            ("only_txt.txt", b"txt caption"),
            ("only_txt.jpg", b"img"),
            ("only_json.json", json.dumps({"caption": "json caption", "title": "a title"}).encode()),
            ("both.txt", b"from txt"),
            ("both.json", json.dumps({"caption": "from json"}).encode()),
            ("json_no_cap.json", b'{"other": 1}'),
            ("json_no_cap.txt", b"fallback txt"),
            ("upper.TXT", b"upper-case extension"),
            ("nothing.jpg", b"img"),
            ("num.json", b'{"caption": 5}'),
        ],
    )
    default = list(read_shard(path))
    assert [r.key for r in default] == ["only_txt", "only_json", "both", "json_no_cap", "upper", "nothing", "num"]
    assert _good(default) == [
        ("only_txt", "txt caption"),
        ("only_json", "json caption"),
        ("both", "from json"),
        ("json_no_cap", "fallback txt"),
        ("upper", "upper-case extension"),
    ]
    assert _reasons(default) == {"nothing": "missing_caption", "num": "caption_not_text"}
    assert default[0].sample == {"__key__": "only_txt", "txt": b"txt caption", "jpg": b"img"}
    # caption_key naming an extension takes that member; naming a field takes it from .json only.
    assert _good(read_shard(path, caption_key="txt")) == [
        ("only_txt", "txt caption"),
        ("both", "from txt"),
        ("json_no_cap", "fallback txt"),
        ("upper", "upper-case extension"),
    ]
    assert _good(read_shard(path, caption_key="title")) == [("only_json", "a title")]


def test_tar_bad_text_is_counted_not_raised(tmp_path, make_tar):
    path = make_tar(
        tmp_path / "a.tar",
        [
            ("ok.txt", b"fine"),
            ("latin1.txt", "caf\xe9".encode("latin-1")),
            ("surrogate.json", b'{"caption": "bad \\ud800 escape"}'),
            ("broken.json", b"{not json"),
            ("ok2.txt", "caf\xe9 \u2603".encode()),
        ],
    )
    recs = list(read_shard(path))
    assert _good(recs) == [("ok", "fine"), ("ok2", "caf\xe9 \u2603")]
    assert _reasons(recs) == {"latin1": "invalid_utf8", "surrogate": "invalid_utf8", "broken": "bad_json"}


def _damage_header(path: Path, member_index: int) -> None:
    """Overwrite the header block of the member_index-th member (single-block members)."""
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tf:
        offset = tf.getmembers()[member_index].offset
    data[offset : offset + 100] = b"\x07" * 100  # name field garbage: checksum no longer matches
    path.write_bytes(bytes(data))


def test_corrupt_member_costs_its_neighbours_not_the_shard(tmp_path, make_tar):
    members = [(f"k{i}.{ext}", f"{ext} {i}".encode()) for i in range(6) for ext in ("txt", "cls")]
    path = make_tar(tmp_path / "a.tar", members)
    _damage_header(path, 5)  # k2.cls: k2 lost a member; k3 might have, we cannot tell
    recs = list(read_shard(path))
    assert [r.key for r in recs] == ["k0", "k1", "k2", "k3", "k4", "k5"]
    assert _reasons(recs) == {"k2": "corrupt_member", "k3": "corrupt_member"}
    # The writer walks the same records: keeping all writes the good ones (and what was
    # readable of the damaged ones), and record indices line up.
    keep = np.array([r.skip_reason is None for r in recs])
    assert write_kept(path, tmp_path / "out.tar", keep) == 4
    assert _tar_members(tmp_path / "out.tar") == [m for m in members if m[0][:2] in ("k0", "k1", "k4", "k5")]


def test_truncated_tar_keeps_what_was_read(tmp_path, make_tar):
    path = make_tar(tmp_path / "a.tar", [("a.txt", b"first"), ("b.txt", b"second " * 300), ("c.txt", b"third")])
    path.write_bytes(path.read_bytes()[: 512 * 3 + 700])  # cut inside b.txt's data
    recs = list(read_shard(path))
    assert _good(recs) == [("a", "first")]
    assert [r.skip_reason for r in recs[1:]] == ["corrupt_member", "corrupt_tar_tail"]
    assert recs[-1].key == "" and "b.txt" in recs[-1].sample["__corrupt__"]
    # Cut inside a header: the record before it may have lost a member.
    path2 = make_tar(tmp_path / "b.tar", [("a.txt", b"first"), ("b.txt", b"second")])
    path2.write_bytes(path2.read_bytes()[: 512 * 2 + 300])
    assert [r.skip_reason for r in read_shard(path2)] == ["corrupt_member", "corrupt_tar_tail"]


def test_concatenated_tars_and_padding_are_not_damage(tmp_path, make_tar):
    a = make_tar(tmp_path / "a.tar", [("a.txt", b"first")]).read_bytes()
    b = make_tar(tmp_path / "b.tar", [("b.txt", b"second")]).read_bytes()
    (tmp_path / "ab.tar").write_bytes(a + b + b"\0" * 4096)
    recs = list(read_shard(tmp_path / "ab.tar"))
    assert [(r.key, r.caption, r.skip_reason) for r in recs] == [("a", "first", None), ("b", "second", None)]


def test_tar_writer_copies_members_byte_for_byte_in_order(tmp_path, make_pool):
    import webdataset as wds

    (src,) = make_pool(tmp_path / "pool", RECORDS, 1, "tar")
    keep = np.zeros(len(RECORDS), dtype=bool)
    keep[[0, 3, 4, 9]] = True
    dst = tmp_path / "out" / "kept.tar"
    assert write_kept(src, dst, keep) == 4
    wanted = {"u000", "u003", "u004", "u009"}
    expected = [m for m in _tar_members(src) if m[0].split(".")[0] in wanted]
    assert _tar_members(dst) == expected
    with tarfile.open(src) as s, tarfile.open(dst) as d:
        src_info = {m.name: (m.mtime, m.mode, m.uname) for m in s.getmembers()}
        assert all(src_info[m.name] == (m.mtime, m.mode, m.uname) for m in d.getmembers())
    # webdataset itself reads the output as the same samples.
    samples = list(wds.WebDataset(str(dst), shardshuffle=False))
    assert [s["__key__"] for s in samples] == sorted(wanted)
    assert samples[1]["txt"] == RECORDS[3]["caption"].encode()


def test_unreadable_tars_raise_naming_the_file(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file" * 100)
    (tmp_path / "empty.tar").write_bytes(b"")
    for name in ("junk.tar", "empty.tar", "missing.tar"):
        with pytest.raises(ShardError, match=name):
            list(read_shard(tmp_path / name))
    with pytest.raises(ShardError, match="unknown shard format"):
        list(read_shard(tmp_path / "x.csv"))


# --- parquet -----------------------------------------------------------------------------


def test_parquet_keys_captions_and_streaming(tmp_path, monkeypatch):
    monkeypatch.setattr(dio, "PARQUET_BATCH_ROWS", 3)  # several record batches per file
    caps = ["a dog", None, b"bytes caption", b"\xff bad", "e", "f", "g"]
    table = pa.table(
        {
            "id": [f"i{i}" for i in range(7)],
            "key": [f"k{i}" for i in range(7)],
            "caption": pa.array([c.encode() if isinstance(c, str) else c for c in caps], pa.binary()),
            "n": list(range(7)),
        }
    )
    pq.write_table(table, tmp_path / "p.parquet")
    recs = list(read_shard(tmp_path / "p.parquet"))
    assert [r.key for r in recs] == [f"k{i}" for i in range(7)]  # no uid column: "key"
    assert _good(recs)[:2] == [("k0", "a dog"), ("k2", "bytes caption")]
    assert _reasons(recs) == {"k1": "missing_caption", "k3": "invalid_utf8"}
    assert [r.key for r in read_shard(tmp_path / "p.parquet", key_field="id")][:2] == ["i0", "i1"]
    with pytest.raises(ShardError, match="p.parquet: key field 'uid' not found"):
        list(read_shard(tmp_path / "p.parquet", key_field="uid"))
    with pytest.raises(ShardError, match="caption column 'text' not found"):
        list(read_shard(tmp_path / "p.parquet", caption_key="text"))
    # Row-number keys when there is no key column.
    pq.write_table(table.drop(["id", "key"]), tmp_path / "nokey.parquet")
    assert [r.key for r in read_shard(tmp_path / "nokey.parquet")][:2] == ["nokey/0", "nokey/1"]
    # The writer filters across batch boundaries and keeps the schema (metadata included).
    keep = np.array([1, 0, 0, 1, 1, 0, 1], dtype=bool)
    assert write_kept(tmp_path / "p.parquet", tmp_path / "o.parquet", keep) == 4
    out = pq.read_table(tmp_path / "o.parquet")
    assert out.schema == table.schema and out.equals(table.filter(pa.array(keep)))


def test_unreadable_parquet_raises_naming_the_file(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ShardError, match="bad.parquet: not a readable parquet file"):
        list(read_shard(tmp_path / "bad.parquet"))


# --- jsonl -------------------------------------------------------------------------------


JSONL_LINES = [
    b'{"uid": "a", "caption": "a dog"}\n',
    b'{"key": "b", "caption": "caf\\u00e9"}\n',
    b"\n",  # blank: not a record
    b'{"uid": "c", "caption": "bad \\udc80"}\n',
    b'{"uid": "d", "caption": "\xff\xfe"}\n',
    b"[1, 2]\n",
    b"{truncated\n",
    b'{"uid": "e"}\n',
    b'{"uid": "two\\nlines", "caption": "a dog"}\n',
    b'{"caption": "no key", "x": 1}',  # no final newline
]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_jsonl_records_and_writer(tmp_path, suffix):
    path = tmp_path / f"shard{suffix}"
    blob = b"".join(JSONL_LINES)
    path.write_bytes(gzip.compress(blob) if suffix.endswith(".gz") else blob)
    recs = list(read_shard(path))
    assert [r.key for r in recs] == ["a", "b", "c", "shard/3", "shard/4", "shard/5", "e", "two\\nlines", "shard/8"]
    assert _good(recs) == [("a", "a dog"), ("b", "caf\xe9"), ("shard/8", "no key")]
    assert _reasons(recs) == {
        "c": "invalid_utf8",
        "shard/3": "invalid_utf8",
        "shard/4": "bad_json",
        "shard/5": "bad_json",
        "e": "missing_caption",
        "two\\nlines": "bad_key",
    }
    assert recs[0].sample == {"uid": "a", "caption": "a dog"}
    keep = np.array([r.key in ("a", "e", "shard/8") for r in recs])
    out = tmp_path / f"out{suffix}"
    assert write_kept(path, out, keep) == 3
    raw = gzip.decompress(out.read_bytes()) if suffix.endswith(".gz") else out.read_bytes()
    assert raw == JSONL_LINES[0] + JSONL_LINES[7] + JSONL_LINES[9] + b"\n"


def test_damaged_gzip_raises_naming_the_file(tmp_path):
    blob = gzip.compress(b"".join(JSONL_LINES * 50))
    (tmp_path / "cut.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ShardError, match="cut.jsonl.gz: damaged gzip stream"):
        list(read_shard(tmp_path / "cut.jsonl.gz"))
