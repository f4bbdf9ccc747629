"""Pool discovery and atomic writes."""
from __future__ import annotations

from pathlib import Path

import pytest

from mode_fast.data.io import ShardError, atomic_write, list_shards


def _touch(*paths: Path) -> None:
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")


def test_list_shards_files_folders_globs_braces(tmp_path):
    a = [tmp_path / "pool" / f"pool-{i:03d}.tar" for i in range(4)]
    nested = tmp_path / "pool" / "more" / "x.parquet"
    _touch(*a, nested, tmp_path / "pool" / "readme.txt")
    assert list_shards([tmp_path / "pool"]) == sorted(p.resolve() for p in a + [nested])
    assert list_shards([str(tmp_path / "pool" / "pool-{001..002}.tar")]) == [a[1].resolve(), a[2].resolve()]
    assert list_shards([str(tmp_path / "pool" / "*.tar"), str(a[0])]) == [p.resolve() for p in a]
    assert list_shards([str(tmp_path / "pool" / "**" / "*.parquet")]) == [nested.resolve()]


def test_list_shards_errors_name_the_pattern(tmp_path):
    with pytest.raises(ShardError, match="nope.tar: no such file"):
        list_shards([tmp_path / "nope.tar"])
    with pytest.raises(ShardError, match=r"\*\.jsonl: matches no shard"):
        list_shards([str(tmp_path / "*.jsonl")])
    _touch(tmp_path / "notes.txt")
    with pytest.raises(ShardError, match="matches no shard"):
        list_shards([tmp_path / "notes.txt"])


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
