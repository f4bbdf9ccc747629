"""Symlinked inputs work: a pool laid out like a model-hub cache (``snapshots/REV/x.tar ->
../../blobs/HASH``) runs through curate, cluster, train and eval with the outputs of the same
pool as plain files. A shard's format and name come from the link, its bytes from the target
(`mode_fast.data.io.shard_path`), and errors name the link."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_pool_shards

from mode_fast import cli
from mode_fast.data.io import ShardError, list_shards, shard_id
from mode_fast.demo.sample import write_sample

torch.set_num_threads(1)  # shared 2-core machine

ENTRIES = ["circle", "square", "triangle", "clip art", "photo", "red", "blue", "dog", "cat"]


def hubify(src: Path, hub: Path) -> Path:
    """A model-hub cache of every file under `src`: the bytes in hub/blobs/<sha256>, the
    names in hub/snapshots/rev/<path> as relative links. Returns the snapshot folder."""
    snapshot = hub / "snapshots" / "rev"
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        blob = hub / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


@pytest.fixture(scope="module")
def pools(tmp_path_factory) -> dict[str, Path]:
    """The same files twice: plain, and as a hub cache's snapshot."""
    root = tmp_path_factory.mktemp("pools")
    plain = root / "plain"
    write_sample(plain, num_pairs=40, shard_size=20, eval_pairs=24, image_size=32)
    records = [{"uid": f"m{i:03d}", "caption": f"a {w} photo of a {v}"} for i, (w, v) in
               enumerate(zip(ENTRIES * 6, reversed(ENTRIES * 6)))]  # fmt: skip
    write_pool_shards(plain / "mixed", records[:27], 1, "parquet")
    (plain / "mixed" / "pool-0000.parquet").rename(plain / "mixed" / "part-a.parquet")
    write_pool_shards(plain / "mixed", records[27:], 1, "jsonl")
    (plain / "meta.json").write_text(json.dumps(ENTRIES))
    snapshot = hubify(plain, root / "hub")
    assert (snapshot / "pool" / "pool-000000.tar").is_symlink()
    assert (snapshot / "mixed" / "pool-0000.jsonl").is_symlink()
    return {"plain": plain, "hub": snapshot, "blobs": root / "hub" / "blobs"}


def test_shards_keep_the_links_name_and_read_the_target(pools) -> None:
    shards = list_shards([pools["hub"] / "pool", pools["hub"] / "mixed"])
    assert [p.name for p in shards] == ["part-a.parquet", "pool-0000.jsonl", "pool-000000.tar", "pool-000001.tar"]
    assert all(p.is_symlink() and p.parent.is_absolute() for p in shards)
    assert shard_id(shards[2]).startswith("pool-000000-")  # curate's and cluster's files alike


def test_ids_of_files_that_are_not_links_are_unchanged(pools, tmp_path) -> None:
    # Before links were kept, every shard path was Path.resolve()d: the ids of plain files
    # (and of files in a linked folder) must be those, or existing output folders go stale.
    (tmp_path / "linked").symlink_to(pools["plain"] / "pool")
    for given in (pools["plain"] / "pool", tmp_path / "linked"):
        shards = list_shards([given])
        real = sorted(p.resolve() for p in (pools["plain"] / "pool").glob("*.tar"))
        assert shards == real
        for p in shards:
            old = f"{p.name.split('.')[0]}-{hashlib.sha1(str(p.resolve()).encode()).hexdigest()[:8]}"
            assert shard_id(p) == shard_id(os.path.relpath(p)) == old  # cluster's assignments/<id>.parquet


def test_one_file_under_two_names_is_listed_once(pools, tmp_path) -> None:
    blob = next(pools["blobs"].iterdir())
    (tmp_path / "b.tar").symlink_to(blob)
    (tmp_path / "a.tar").symlink_to(blob)
    (tmp_path / "c.tar").symlink_to(tmp_path / "a.tar")  # a link to a link
    assert list_shards([tmp_path / "c.tar", tmp_path, str(tmp_path / "*.tar")]) == [tmp_path / "a.tar"]


def test_linked_folders_are_searched_once(pools, tmp_path) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "part").symlink_to(pools["hub"] / "pool")
    (pool / "again").symlink_to(pools["hub"] / "pool")
    (pool / "loop").symlink_to(pool)  # a folder linked into itself ends nowhere
    shards = list_shards([pool])
    assert len(shards) == 2 and {p.name for p in shards} == {"pool-000000.tar", "pool-000001.tar"}


def curate_outputs(out: Path) -> dict[str, bytes]:
    names = ["kept_keys.txt", "entry_count.npy", "entry_prob.npy"]
    files = {n: (out / n).read_bytes() for n in names}
    files.update({str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "data").rglob("*")) if p.is_file()})
    return files


def test_curate_hub_pool_as_plain_pool(pools, tmp_path) -> None:
    results = {}
    for kind in ("plain", "hub"):
        out = tmp_path / kind
        src = pools[kind]
        argv = ["curate", str(src / "pool"), str(src / "mixed"), "--out", str(out), "--metadata",
                str(src / "meta.json"), "--t", "3", "--workers", "1"]  # fmt: skip
        assert cli.main(argv) == 0
        results[kind] = curate_outputs(out)
    assert results["hub"] == results["plain"]
    assert sorted(results["hub"]) == sorted(
        [
            "kept_keys.txt",
            "entry_count.npy",
            "entry_prob.npy",
            "data/mixed/part-a.parquet",
            "data/mixed/pool-0000.jsonl",
            "data/pool/pool-000000.tar",
            "data/pool/pool-000001.tar",
        ]  # fmt: skip
    )
    assert 0 < len(results["hub"]["kept_keys.txt"].split()) < 94


def assignments(out: Path) -> dict[str, list]:
    """Per assignment file, by its shard's name (the id's stem): keys, fine, expert."""
    found = {}
    for path in sorted((out / "assignments").glob("*.parquet")):
        table = pq.read_table(path)
        found[path.name.rsplit("-", 1)[0]] = [table.column(c).to_pylist() for c in ("key", "fine", "expert")]
    return found


def test_cluster_hub_pool_as_plain_pool(pools, tmp_path) -> None:
    results = {}
    for kind in ("plain", "hub"):
        out = tmp_path / kind
        argv = ["cluster", str(pools[kind] / "pool"), "--out", str(out), "--embedder", "hash16", "--fine-k", "4",
                "--experts", "2", "--sample", "40", "--seed", "1", "--no-progress"]  # fmt: skip
        assert cli.main(argv) == 0
        results[kind] = assignments(out)
        shards_json = json.loads((out / "shards.json").read_text())
        assert sorted(Path(p).name for p in shards_json.values()) == ["pool-000000.tar", "pool-000001.tar"]
    assert list(results["hub"]) == ["pool-000000", "pool-000001"]
    assert results["hub"] == results["plain"]
    assert sum(len(keys) for keys, _, _ in results["hub"].values()) == 40


def test_train_hub_pool_as_plain_pool(pools, tmp_path) -> None:
    from test_train import run_train

    weights = {}
    for kind in ("plain", "hub"):
        final = run_train(["--data", str(pools[kind] / "pool"), "--out", str(tmp_path / kind), "--stage", "seed",
                           "--steps", "2", "--batch-size", "8"])  # fmt: skip
        weights[kind] = torch.load(final, map_location="cpu", weights_only=True)["state_dict"]
        data = json.loads((final.parent.parent / "data.json").read_text())
        assert "blobs" not in json.dumps(data)
    assert weights["hub"].keys() == weights["plain"].keys()
    assert all(torch.equal(weights["hub"][k], weights["plain"][k]) for k in weights["plain"])


def test_eval_hub_tasks_as_plain_tasks(pools, tmp_path) -> None:
    from test_evaluate import make_centers, save_random_model

    run = tmp_path / "run"
    save_random_model(run / "seed" / "checkpoints" / "final.pt", 100)
    for k in range(2):
        save_random_model(run / f"expert_{k}" / "checkpoints" / "final.pt", k)
    make_centers(tmp_path / "clusters", n_experts=2)
    # A third copy of the hub's names, one shard linked twice: read once.
    twice = tmp_path / "twice"
    twice.mkdir()
    for link in (pools["hub"] / "pool").iterdir():
        (twice / link.name).symlink_to(link.resolve())
    (twice / "pool-000002.tar").symlink_to((twice / "pool-000000.tar").readlink())
    results = {}
    for kind, src in (("plain", pools["plain"]), ("hub", pools["hub"]), ("twice", pools["hub"])):
        out = tmp_path / kind
        retrieval = twice if kind == "twice" else src / "pool"
        argv = ["eval", "--run", str(run), "--clusters", str(tmp_path / "clusters"), "--out", str(out),
                "--batch-size", "16", "--data", f"cls={src / 'eval'}", "--retrieval", f"ret={retrieval}"]  # fmt: skip
        assert cli.main(argv) == 0
        res = json.loads((out / "results.json").read_text())
        results[kind] = (res["tasks"]["cls"]["top1"], res["retrieval"]["ret"]["recall"])
        assert res["retrieval"]["ret"]["n_pairs"] == 40
    assert results["hub"] == results["plain"] == results["twice"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_damaged_linked_shard_is_named_by_its_link(pools, tmp_path, capsys) -> None:
    blob = tmp_path / "blobs" / ("ab" * 32)
    blob.parent.mkdir()
    blob.write_bytes(b"this is not a tar file " * 40)
    snapshot = tmp_path / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    link = snapshot / "pool-000000.tar"
    link.symlink_to(os.path.relpath(blob, snapshot))
    meta = str(pools["plain"] / "meta.json")
    assert cli.main(["curate", str(snapshot), "--out", str(tmp_path / "out"), "--metadata", meta, "--t", "3"]) == 2
    line = one_line_error(capsys)
    assert f"{link}: not a readable tar file" in line and "blobs" not in line, line
    assert cli.main(["curate", str(link), "--out", str(tmp_path / "out2"), "--metadata", meta, "--t", "3"]) == 2
    assert f"{link}: not a readable tar file" in one_line_error(capsys)
    # A link to nothing (an unfinished download) is named with where it points.
    blob.unlink()
    for argv in (["curate", str(snapshot), "--out", str(tmp_path / "out3"), "--metadata", meta, "--t", "3"],
                 ["train", "--data", str(snapshot), "--out", str(tmp_path / "out4"), "--model", "mode-fast-tiny",
                  "--steps", "1", "--workers", "0"]):  # fmt: skip
        assert cli.main(argv) == 2
        line = one_line_error(capsys)
        assert f"{link}: a link to ../../blobs/{'ab' * 32}, which does not exist" in line, line
    with pytest.raises(ShardError, match="which does not exist"):
        list_shards([str(snapshot / "*.tar")])
