"""Shared fixtures: tiny pools in every input format, written as users' tools write them."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest


def write_tar_members(path: Path, members: Sequence[tuple[str, bytes]]) -> Path:
    """A tar with exactly these (name, bytes) members, for hand-made damage."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return path


def write_pool_shards(
    folder: Path, records: Sequence[dict], n_shards: int, fmt: str = "tar", interleave: bool = False
) -> list[Path]:
    """records ({"uid", "caption", ...}) split into n_shards shards of one format:
    tar (webdataset.TarWriter: .txt caption, .json record, .jpg stand-in), parquet, jsonl.
    interleave: record i goes to shard i % n_shards, not to contiguous blocks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        if interleave:
            part = list(records[s::n_shards])
        else:
            part = list(records[s * len(records) // n_shards : (s + 1) * len(records) // n_shards])
        path = folder / f"pool-{s:04d}.{fmt}"
        if fmt == "tar":
            import webdataset as wds

            with wds.TarWriter(str(path)) as w:
                for r in part:
                    w.write(
                        {
                            "__key__": r["uid"],
                            "txt": r["caption"],
                            "json": json.dumps(r).encode(),
                            "jpg": b"\xff\xd8 not really a jpeg " + r["uid"].encode(),
                        }
                    )
        elif fmt == "parquet":
            pq.write_table(
                pa.table(
                    {
                        "uid": [r["uid"] for r in part],
                        "caption": [r["caption"] for r in part],
                        "extra": list(range(len(part))),
                    }
                ),
                path,
            )
        elif fmt == "jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in part))
        else:
            raise ValueError(fmt)
        paths.append(path)
    return paths


@pytest.fixture
def metadata_file(tmp_path: Path) -> Callable[[Sequence[str]], Path]:
    """make(entries) -> a metadata.json (JSON list of strings) in the test's tmp dir."""

    def make(entries: Sequence[str]) -> Path:
        path = tmp_path / "metadata.json"
        path.write_text(json.dumps(list(entries), ensure_ascii=False))
        return path

    return make


@pytest.fixture
def make_pool() -> Callable[..., list[Path]]:
    """write_pool_shards(folder, records, n_shards, fmt="tar", interleave=False)."""
    return write_pool_shards


@pytest.fixture
def make_tar() -> Callable[[Path, Sequence[tuple[str, bytes]]], Path]:
    """write_tar_members(path, [(name, bytes), ...])."""
    return write_tar_members


@pytest.fixture(scope="session")
def kernel_traffic():
    """benchmarks/kernel_traffic.py, the kernels' counted global-memory traffic (it lives
    beside the kernel report, outside the package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_traffic.py"
    spec = importlib.util.spec_from_file_location("kernel_traffic", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
