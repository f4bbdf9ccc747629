"""`mode-fast dedup`: the exact stage finds exactly the planted copies; the semantic stage's
maxima and removed sets equal the public SemDeDup code's rule (dense matrix, its keep
order, written here independently) on the run's own embeddings, assignments and centers;
kept_keys.txt is what train --keep-keys reads; duplicate chains end at kept items; the
rerun rule; one-line errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mode_fast import cli
from mode_fast.core.errors import ConfigError, InputError
from mode_fast.data.io import read_key_list, shard_id
from mode_fast.dedup.run import DedupConfig, eps_folder, run_dedup
from mode_fast.kernels.reference import max_earlier_similarity_dense

torch.set_num_threads(1)  # shared 2-core machine

N_TOPICS = 12
DIM = 16


class PlantedEmbedder:
    """Captions "topic T copy V ...": topic T's random unit vector plus a small
    copy-dependent nudge (1e-3 per copy), so copies of one topic are near-duplicates
    (similarity ~1 - 1e-6 .. 1 - 1e-2 as the nudge grows) and topics are far apart."""

    name = "planted16"
    dim = DIM

    def __call__(self, texts):
        out = np.zeros((len(texts), DIM))
        for i, t in enumerate(texts):
            words = t.split()
            topic, copy = int(words[1]), int(words[3])
            base = np.random.default_rng(topic).standard_normal(DIM)
            nudge = np.random.default_rng(1000 + 7 * topic + copy).standard_normal(DIM)
            out[i] = base / np.linalg.norm(base) + 0.02 * copy * nudge / np.linalg.norm(nudge)
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out.astype(np.float32)


def _pool_records() -> tuple[list[dict], set[tuple[str, str]], set[tuple[str, str]]]:
    """Records (uid, caption, image bytes) over 3 shards, and the planted exact duplicates
    as (duplicate, first occurrence) pairs: under --exact image, and under caption+image."""
    rng = random.Random(5)
    records: list[dict] = []
    image_dups: set[tuple[str, str]] = set()
    both_dups: set[tuple[str, str]] = set()
    for i in range(72):
        topic, copy = i % N_TOPICS, rng.randrange(6)
        rec = {"uid": f"k{i:03d}", "caption": f"topic {topic} copy {copy} item {i}", "jpg": f"image {i}".encode()}
        if i >= 20 and i % 9 == 0:  # same image bytes as an earlier record, same caption (modulo case/space)
            src = records[i - 13]
            rec |= {"jpg": src["jpg"], "caption": "  " + src["caption"].upper().replace(" ", "   ")}
            image_dups.add((rec["uid"], src["uid"]))
            both_dups.add((rec["uid"], src["uid"]))
        elif i >= 20 and i % 11 == 0:  # same image bytes, another caption
            src = records[i - 17]
            rec["jpg"] = src["jpg"]
            image_dups.add((rec["uid"], src["uid"]))
        records.append(rec)
    # a copy of a copy matches the first occurrence, not the copy
    first = {}
    for r in records:
        first.setdefault(r["jpg"], r["uid"])
    image_dups = {(d, first[next(r["jpg"] for r in records if r["uid"] == d)]) for d, _ in image_dups}
    return records, image_dups, both_dups


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> tuple[list[Path], list[dict], set, set]:
    from conftest import write_tar_members

    folder = tmp_path_factory.mktemp("pool")
    records, image_dups, both_dups = _pool_records()
    shards = []
    for s in range(3):
        members = []
        for r in records[s * 24 : (s + 1) * 24]:
            members += [(f"{r['uid']}.txt", r["caption"].encode()), (f"{r['uid']}.jpg", r["jpg"])]
        shards.append(write_tar_members(folder / f"pool-{s:04d}.tar", members))
    return shards, records, image_dups, both_dups


def _config(shards, out, **kw) -> DedupConfig:
    base = {"embedder": PlantedEmbedder(), "clusters": 4, "eps": "0.0001,0.001,0.05", "progress": False}
    return DedupConfig(shards=shards, out=out, **(base | kw))


def _duplicates(folder: Path) -> list[dict[str, str]]:
    lines = (folder / "duplicates.tsv").read_text().splitlines()
    assert lines[0] == "key\tstage\tmatch\tsimilarity\tkept"
    return [dict(zip(lines[0].split("\t"), line.split("\t"))) for line in lines[1:]]


@pytest.mark.parametrize("mode", ["image", "caption+image"])
def test_exact_finds_exactly_the_planted_copies(pool, tmp_path, mode):
    shards, records, image_dups, both_dups = pool
    summary = run_dedup(_config(shards, tmp_path / "out", exact=mode, semantic="off", eps="0.05"))
    rows = _duplicates(tmp_path / "out" / "eps_0.05")
    assert {(r["key"], r["match"]) for r in rows} == (image_dups if mode == "image" else both_dups)
    assert all(r["stage"] == "exact" and float(r["similarity"]) == 1.0 for r in rows)
    assert summary["exact"]["removed"] == len(rows)
    kept = read_key_list(tmp_path / "out" / "eps_0.05" / "kept_keys.txt")
    assert kept == {r["uid"] for r in records} - {r["key"] for r in rows}


def _public_order(members: np.ndarray, x: torch.Tensor, center: torch.Tensor, order: str, seed: int, c: int):
    """The public SemDeDup keep order, restated: (pool index, 1 - cosine to the centroid)
    sorted by the distance with reverse=True; easy reverses that list; random permutes it
    (mode-fast's documented generator: seeded by (seed, cluster))."""
    dist = (1 - torch.nn.CosineSimilarity(dim=1)(x, center[None, :])).tolist()
    ranked = sorted(zip(members.tolist(), dist), key=lambda t: t[1], reverse=True)
    idx = [i for i, _ in ranked]
    if order == "easy":
        idx = idx[::-1]
    elif order == "random":
        idx = [idx[p] for p in np.random.default_rng([seed, c]).permutation(len(idx))]
    return np.array(idx, dtype=np.int64)


@pytest.mark.parametrize("order", ["hard", "easy", "random"])
def test_semantic_equals_the_public_rule(pool, tmp_path, order):
    shards, records, _, _ = pool
    out = tmp_path / "out"
    cfg = _config(shards, out, order=order, seed=7)
    summary = run_dedup(cfg)
    work = out / ".work"
    emb = np.load(work / "candidates.npy")
    labels = np.load(work / "labels.npy")
    centers = np.load(work / "centers.npy")
    keys = np.array([r["uid"] for r in records])
    usable = [r["uid"] for r in records]
    dup_rows = {eps: _duplicates(out / eps_folder(eps)) for eps in cfg.eps}
    exact_removed = {r["key"] for r in dup_rows[cfg.eps[0]] if r["stage"] == "exact"}
    cand_keys = np.array([k for k in usable if k not in exact_removed])
    assert len(cand_keys) == len(emb)
    removed_by_oracle: dict[float, set[str]] = {eps: set() for eps in cfg.eps}
    sims: dict[str, float] = {}
    for c in range(cfg.clusters):
        members = np.flatnonzero(labels == c)
        if len(members) == 0:
            continue
        x = torch.from_numpy(emb[members])
        ordered = _public_order(members, x, torch.from_numpy(centers[c]), order, 7, c)
        m = max_earlier_similarity_dense(torch.from_numpy(emb[ordered]))
        with np.load(work / "clusters" / f"{c}.npz") as z:
            assert z["items"].tolist() == ordered.tolist()
            np.testing.assert_allclose(np.maximum(z["best"][1:], 0), m[1:].numpy(), atol=1e-6, rtol=0)
        for eps in cfg.eps:
            removed_by_oracle[eps] |= set(cand_keys[ordered[(m > 1 - eps).numpy()]].tolist())
        sims |= dict(zip(cand_keys[ordered].tolist(), m.tolist()))
    assert any(removed_by_oracle.values())  # the planted near-duplicates are found at some eps
    for eps in cfg.eps:
        got = {r["key"] for r in dup_rows[eps] if r["stage"] == "semantic"}
        assert got == removed_by_oracle[eps], eps
        assert summary["eps"][f"{eps:g}"]["removed_semantic"] == len(got)
        for r in dup_rows[eps]:
            if r["stage"] == "semantic":
                assert abs(float(r["similarity"]) - sims[r["key"]]) < 1e-6
    assert len(keys) == summary["usable"]


@pytest.fixture(scope="module")
def sample_pool(tmp_path_factory) -> list[Path]:
    """The embedded sample's generator, small: 48 pairs (real JPEGs) in 2 shards."""
    from mode_fast.demo.sample import write_sample

    root = tmp_path_factory.mktemp("sample")
    write_sample(root, num_pairs=48, shard_size=24, eval_pairs=8, image_size=32)
    shards = sorted(root.glob("pool/*.tar"))
    assert len(shards) == 2
    return shards


def test_train_keep_keys_takes_kept_keys(sample_pool, tmp_path):
    """train --keep-keys OUT/eps_X/kept_keys.txt trains on exactly the kept pairs."""
    from test_train import run_train

    out = tmp_path / "dedup"
    summary = run_dedup(DedupConfig(shards=sample_pool, out=out, embedder="hash16", clusters=2, eps="0.3",
                                    progress=False))  # fmt: skip
    kept = summary["eps"]["0.3"]["kept"]
    assert 0 < kept < 48
    run_train(["--data", str(sample_pool[0].parent), "--out", str(tmp_path / "run"), "--steps", "1",
               "--keep-keys", str(out / "eps_0.3" / "kept_keys.txt")])  # fmt: skip
    data = json.loads((tmp_path / "run" / "seed" / "data.json").read_text())
    assert data["samples"] == kept and data["skipped"] == {"filtered out": 48 - kept}


def test_semantic_on_images_through_a_model_spec(sample_pool, tmp_path):
    """--semantic images: an open_clip model given as train --pretrained takes one
    (ARCH:FILE, the weights read as data); its unit image embeddings go through the same
    stage (the maxima equal the dense oracle's in keep order)."""
    from conftest import write_tar_members

    from mode_fast.training.checkpoint import build_model
    from mode_fast.training.models import register_model_configs

    odd = write_tar_members(tmp_path / "odd.tar", [("bad.txt", b"a torn picture"), ("bad.jpg", b"not a jpeg"),
                                                   ("noimg.txt", b"a caption without a picture")])  # fmt: skip
    shards = [*sample_pool, odd]
    register_model_configs()
    torch.manual_seed(0)
    model, _ = build_model("mode-fast-tiny")
    weights = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "out"
    summary = run_dedup(DedupConfig(shards=shards, out=out, semantic="images", image_model=f"mode-fast-tiny:{weights}",
                                    clusters=3, eps="0.001,0.01", progress=False, batch_size=16))  # fmt: skip
    # the undecodable image and the missing one stay in, counted; the rest go through the model
    assert summary["semantic"]["items"] == summary["usable"] - 2 == 48 and summary["exact"]["removed"] == 0
    assert summary["exact"]["not_checked"] == 1
    assert (
        summary["semantic"]["not_embedded"]["no_image"] == 1 and sum(summary["semantic"]["not_embedded"].values()) == 2
    )
    assert {"bad", "noimg"} <= set((out / "eps_0.01" / "kept_keys.txt").read_text().split())
    assert json.loads((out / "run.json").read_text())["inputs"]["image-model"]["path"].endswith("tiny.pt")
    emb = np.load(out / ".work" / "candidates.npy")
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    labels, centers = np.load(out / ".work" / "labels.npy"), np.load(out / ".work" / "centers.npy")
    for c in range(3):
        members = np.flatnonzero(labels == c)
        ordered = _public_order(members, torch.from_numpy(emb[members]), torch.from_numpy(centers[c]), "hard", 0, c)
        with np.load(out / ".work" / "clusters" / f"{c}.npz") as z:
            assert z["items"].tolist() == ordered.tolist()
            m = max_earlier_similarity_dense(torch.from_numpy(emb[ordered]))
            np.testing.assert_allclose(np.maximum(z["best"][1:], 0), m[1:].numpy(), atol=1e-6, rtol=0)


def test_kept_keys_and_chains(pool, tmp_path):
    shards, records, _, _ = pool
    out = tmp_path / "out"
    cfg = _config(shards, out, exact="image", eps="0.05")
    run_dedup(cfg)
    folder = out / "eps_0.05"
    text = (folder / "kept_keys.txt").read_text()
    kept_list = text.splitlines()
    rows = _duplicates(folder)
    removed = {r["key"] for r in rows}
    order = [r["uid"] for r in records]
    assert kept_list == [k for k in order if k not in removed]  # pool order, one key a line, as curate writes
    assert text.endswith("\n")
    assert read_key_list(folder / "kept_keys.txt") == set(kept_list)  # train --keep-keys's reader
    assert {r["stage"] for r in rows} == {"exact", "semantic"}
    by_key = {r["key"]: r for r in rows}
    for r in rows:
        assert r["kept"] in set(kept_list)
        assert order.index(r["match"]) != order.index(r["key"])
        k = r["key"]
        for _ in range(len(rows) + 1):  # follow match until a kept item: that is the kept column
            k = by_key[k]["match"]
            if k not in removed:
                break
        assert k == r["kept"]


def test_write_shards_as_curate(pool, tmp_path):
    from mode_fast.data.io import read_shard

    shards, _, _, _ = pool
    out = tmp_path / "out"
    run_dedup(_config(shards, out, semantic="off", eps="0.05", write_shards=0.05))
    folder = out / "eps_0.05"
    written = [rec.key for s in sorted((folder / "data").glob("*.tar")) for rec in read_shard(s)]
    assert written == (folder / "kept_keys.txt").read_text().splitlines()


def test_worker_processes_write_what_one_process_writes(pool, tmp_path):
    """--workers 2 (shards and clusters in worker processes) gives the bytes of a run in
    this process."""
    shards, _, _, _ = pool
    run_dedup(_config(shards, tmp_path / "one", eps="0.001,0.05"))
    run_dedup(_config(shards, tmp_path / "two", eps="0.001,0.05", workers=2))
    for eps in ("eps_0.001", "eps_0.05"):
        for name in ("kept_keys.txt", "duplicates.tsv", "summary.json"):
            assert (tmp_path / "two" / eps / name).read_bytes() == (tmp_path / "one" / eps / name).read_bytes()


def test_rerun_rule(pool, tmp_path, caplog):
    shards, _, _, _ = pool
    out = tmp_path / "out"
    run_dedup(_config(shards, out))
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["job"] == "dedup" and manifest["finished"]
    assert manifest["args"]["--eps"] == [0.0001, 0.001, 0.05]
    # run.json is rewritten as it was (the lifecycle's open); every output stays untouched
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name not in (".lock", "run.json")}
    caplog.clear()
    run_dedup(_config(shards, out))
    assert "nothing to do" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert json.loads((out / "run.json").read_text()) == manifest
    # a changed eps rewrites the eps folders only (the maxima are reused)
    clusters = {p: p.stat().st_mtime_ns for p in (out / ".work" / "clusters").glob("*.npz")}
    run_dedup(_config(shards, out, eps="0.05,0.2"))
    assert {p: p.stat().st_mtime_ns for p in clusters} == clusters
    assert (out / "eps_0.2" / "kept_keys.txt").is_file()
    assert not (out / "eps_0.001").exists()  # a dropped eps leaves no folder behind
    # a changed --clusters refits; a changed embedder stops with one line
    run_dedup(_config(shards, out, eps="0.05,0.2", clusters=3))
    assert json.loads((out / "summary.json").read_text())["semantic"]["clusters"] == 3
    with pytest.raises(ConfigError, match="--embedder"):
        run_dedup(_config(shards, out, eps="0.05,0.2", clusters=3, embedder="hash16"))
    # with the semantic stage off, its models take no part: another embedder redoes nothing
    exact_only = tmp_path / "exact_only"
    run_dedup(_config(shards, exact_only, semantic="off"))
    caplog.clear()
    run_dedup(_config(shards, exact_only, semantic="off", embedder="hash16", image_model="ViT-B-32:openai"))
    assert "nothing to do" in caplog.text
    assert "--embedder" not in json.loads((exact_only / "run.json").read_text())["args"]


def test_a_changed_shard_is_reread_and_the_rest_redone(pool, tmp_path, caplog):
    """A rewritten shard: that shard read again (its cached caption embeddings too), the
    k-means and after redone; the outputs are those of a fresh run on the new pool."""
    import shutil

    shards, records, _, _ = pool
    copies = []
    for s in shards:
        copies.append(tmp_path / "pool" / s.name)
        copies[-1].parent.mkdir(exist_ok=True)
        shutil.copy(s, copies[-1])
    out = tmp_path / "out"
    run_dedup(_config(copies, out, eps="0.001,0.05"))
    from conftest import write_tar_members

    members = []
    for r in records[24:48]:  # shard 1, every caption a copy of topic 0's: more near-duplicates
        caption = f"topic 0 copy {int(r['uid'][1:]) % 5} item {r['uid']}"
        members += [(f"{r['uid']}.txt", caption.encode()), (f"{r['uid']}.jpg", r["jpg"])]
    write_tar_members(copies[1], members)
    before = {p.name: p.stat().st_mtime_ns for p in (out / ".work" / "shards").glob("*.npz")}
    caplog.clear()
    run_dedup(_config(copies, out, eps="0.001,0.05"))
    after = {p.name: p.stat().st_mtime_ns for p in (out / ".work" / "shards").glob("*.npz")}
    assert [n for n in before if after[n] != before[n]] == [sorted(before)[1]]
    assert "pool-0001.tar (changed) since the run" in caplog.text
    run_dedup(_config(copies, tmp_path / "fresh", eps="0.001,0.05"))
    for eps in ("eps_0.001", "eps_0.05"):
        for name in ("kept_keys.txt", "duplicates.tsv", "summary.json"):
            assert (out / eps / name).read_bytes() == (tmp_path / "fresh" / eps / name).read_bytes(), (eps, name)


def _error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("mode-fast dedup: error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("extra", "named"),
    [(["--eps", "0"], "--eps"), (["--eps", "1"], "--eps"), (["--eps", "0.1,x"], "--eps"),
     (["--clusters", "500"], "--clusters"), (["--write-shards", "0.3"], "--write-shards"),
     (["--exact", "off", "--semantic", "off"], "nothing to do")],
)  # fmt: skip
def test_one_line_errors(pool, tmp_path, capsys, extra, named):
    shards, _, _, _ = pool
    argv = ["dedup", *map(str, shards), "--out", str(tmp_path / "out"), "--embedder", "hash16", "--no-progress"]
    assert cli.main(argv + extra) == 2
    assert named in _error_line(capsys)
    if named == "--clusters":  # known once the pool is read: the read shards stay for the rerun
        assert not (tmp_path / "out" / "summary.json").exists()
    else:  # refused before anything is made
        assert not (tmp_path / "out").exists()


def test_missing_and_damaged_shards(pool, tmp_path, capsys):
    shards, _, _, _ = pool
    assert cli.main(["dedup", str(tmp_path / "nope.tar"), "--out", str(tmp_path / "o1")]) == 2
    assert "nope.tar" in _error_line(capsys)
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar" * 100)
    argv = ["dedup", str(bad), "--out", str(tmp_path / "o2"), "--embedder", "hash16", "--no-progress"]
    assert cli.main(argv) == 2  # unreadable as a whole: one line naming it, nothing left behind
    assert "bad.tar: not a readable tar file" in _error_line(capsys)
    assert not (tmp_path / "o2").exists()
    assert cli.main(["dedup", str(shards[0]), *argv[1:]]) == 2  # after a good shard: its read is kept for the rerun
    assert "bad.tar: not a readable tar file" in _error_line(capsys)
    units = json.loads((tmp_path / "o2" / "run.json").read_text())["units"]
    assert [u for u in units if u.startswith("shard:")] == ["shard:" + shard_id(shards[0])]
    # a truncated tar: the damaged record and the damaged end are counted, the rest deduplicated
    cut = tmp_path / "cut.tar"
    data = shards[1].read_bytes()
    cut.write_bytes(data[: len(data) // 2 + 100])
    argv = ["dedup", str(shards[0]), str(cut), "--out", str(tmp_path / "o3"), "--embedder", "hash16",
            "--clusters", "2", "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    summary = json.loads((tmp_path / "o3" / "summary.json").read_text())
    assert summary["skipped"] == {"corrupt_member": 1, "corrupt_tar_tail": 1}
    assert summary["pool"] == summary["usable"] + 1
    assert "(skipped 1, 1 damaged shard end)" in capsys.readouterr().out


def test_config_errors(pool, tmp_path):
    shards, _, _, _ = pool
    with pytest.raises(ConfigError, match="--image-model"):
        DedupConfig(shards=shards, out=tmp_path / "o", semantic="images")
    with pytest.raises(InputError, match="--clusters"):
        run_dedup(_config(shards, tmp_path / "o", clusters=100))


class SlowEmbedder(PlantedEmbedder):
    """PlantedEmbedder that takes a second per shard, so a test can stop a run mid-way."""

    name = "slow16"

    def __call__(self, texts):
        import time

        time.sleep(1.0)
        return super().__call__(texts)


def slow_embedder() -> SlowEmbedder:
    return SlowEmbedder()


@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_interrupt_and_kill_then_rerun(pool, tmp_path, sig):
    """Ctrl-C ends with one line, exit 130; after Ctrl-C or SIGKILL the same command
    continues (the shards already read are not read again) to the outputs of an unbroken run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    shards, _, _, _ = pool
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "mode_fast", "dedup", *map(str, shards), "--out", str(out), "--clusters", "4",
            "--eps", "0.001,0.05", "--embedder", "test_dedup:slow_embedder", "--no-progress"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list((out / ".work" / "shards").glob("*.npz")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # the shard's file is there; its unit is recorded just after (the next takes 1 s)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    if sig == "SIGINT":
        assert proc.returncode == 130, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("mode-fast dedup: interrupted at read (") and "rerun the same command" in last, err
        # the units done are recorded on the way out (a SIGKILLed run's last ones may not be: redone)
        done = json.loads((out / "run.json").read_text())["units"]
        assert 1 <= len([u for u in done if u.startswith("shard:")]) < 3
    subprocess.run(argv, env=env, check=True, capture_output=True)
    ref = tmp_path / "ref"
    run_dedup(_config(shards, ref, eps="0.001,0.05", embedder=SlowEmbedder()))
    for eps in ("eps_0.001", "eps_0.05"):
        for name in ("kept_keys.txt", "duplicates.tsv", "summary.json"):
            assert (out / eps / name).read_bytes() == (ref / eps / name).read_bytes(), (eps, name)
