"""The training loader: key checks, filters, and an order that is a pure function of
(seed, epoch) whatever the workers, ranks or resume position."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mode_fast.clustering.folder import load_expert_assignments
from mode_fast.core.errors import InputError
from mode_fast.data import loader as L
from mode_fast.data.io import read_key_list

torch.set_num_threads(1)  # shared 2-core machine: oversubscribed OpenMP threads crawl

N_COLORS = 4


def make_shards(
    out: Path,
    n: int = 200,
    per_shard: int = 64,
    image_ext: str = "png",
    caption: str = "txt",
    start: int = 0,
) -> list[Path]:
    """Tiny webdataset shards: key kNNNNN, a 24x24 image whose colour is the pair's
    'topic' (i % 4) and a caption naming it, as .txt or as .json {"caption": ...}."""
    import webdataset as wds
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(123)
    paths = []
    for s, lo in enumerate(range(start, start + n, per_shard)):
        path = out / f"{s:05d}.tar"
        with wds.TarWriter(str(path)) as w:
            for i in range(lo, min(start + n, lo + per_shard)):
                topic = i % N_COLORS
                base = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]][topic])
                arr = np.clip(base * 0.8 + rng.normal(0, 25, (24, 24, 3)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="PNG")
                text = f"a photo of {['red', 'green', 'blue', 'yellow'][topic]} thing {i}"
                sample = {"__key__": f"k{i:05d}", image_ext: buf.getvalue()}
                if caption == "txt":
                    sample["txt"] = text
                else:
                    sample["json"] = json.dumps({"caption": text, "id": i}).encode()
                w.write(sample)
        paths.append(path)
    return paths


def key_topic(key: str) -> int:
    return int(key[1:]) % N_COLORS


def identity_preprocess(image) -> torch.Tensor:
    """A deterministic transform plus one random draw, to show augmentation seeding."""
    t = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255.0
    return t + torch.rand(1)  # the per-sample RNG decides this


def toy_tokenizer(captions: list[str]) -> torch.Tensor:
    return torch.tensor([[len(c), sum(map(ord, c)) % 997] for c in captions])


def make_stream(shards, batch=16, rank=0, world=1, seed=0, window=5000, keep=None, spec=None) -> L.ShardStream:
    spec = spec or L.SampleSpec()
    index = L.build_index(shards, spec, keep)
    return L.ShardStream(index, spec, identity_preprocess, toy_tokenizer, batch, rank, world, seed, window)


def collect(batches) -> tuple[list[str], torch.Tensor]:
    keys: list[str] = []
    images = []
    for b in batches:
        keys += b["keys"]
        images.append(b["images"])
    return keys, torch.cat(images) if images else torch.empty(0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    return make_shards(tmp_path_factory.mktemp("shards"), n=200, per_shard=64)


# --------------------------------------------------------------------------- tar layout
def test_member_names_split_like_webdataset():
    from mode_fast.data.io import member_key  # the one key rule, shared with curate and eval

    assert member_key("k001.jpg") == ("k001", "jpg")
    assert member_key("dir.v1/k001.seg.JSON") == ("dir.v1/k001", "seg.json")
    assert member_key("noext") == (None, "no_extension")


def test_index_counts_and_skips_samples_without_caption(tmp_path):
    import webdataset as wds

    paths = make_shards(tmp_path, n=10, per_shard=10)
    with wds.TarWriter(str(tmp_path / "00001.tar")) as w:  # 2nd sample has no caption
        w.write({"__key__": "a", "png": b"x", "txt": "cap"})
        w.write({"__key__": "b", "png": b"x"})
        w.write({"__key__": "c", "png": b"x", "txt": "cap"})
    index = L.build_index(paths + [tmp_path / "00001.tar"], L.SampleSpec())
    assert index.counts.tolist() == [10, 2]
    assert index.keys[1] == ["a", "c"]
    assert index.skipped == {"no caption member": 1}


def test_shards_that_are_not_tar_files_are_named(shards, tmp_path):
    (tmp_path / "pool.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"webdataset \.tar shards.*pool.parquet"):
        L.build_index([tmp_path / "pool.parquet"], L.SampleSpec())
    (tmp_path / "broken.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(ValueError, match=r"broken.tar: not a readable tar file"):
        L.build_index([shards[0], tmp_path / "broken.tar"], L.SampleSpec())
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        L.build_index([tmp_path / "missing.tar"], L.SampleSpec())


# --------------------------------------------------------------------------- key checks
def test_wrong_caption_key_is_named_with_the_members_present(shards):
    with pytest.raises(L.DataKeyError) as e:
        L.build_index(shards, L.SampleSpec(caption_key="caption"))
    msg = str(e.value)
    assert "'caption'" in msg and "k00000" in msg and ".png, .txt" in msg and "--caption-key" in msg


def test_wrong_image_key_is_named(shards):
    with pytest.raises(L.DataKeyError, match=r"image key 'jpg'.*\.png, \.txt.*--image-key"):
        L.build_index(shards, L.SampleSpec(image_key="jpg"))


def test_json_caption_field(tmp_path):
    paths = make_shards(tmp_path, n=20, per_shard=20, caption="json")
    stream = make_stream(paths, batch=4, spec=L.SampleSpec(caption_key="json:caption"))
    batch = next(stream.iter_batches())
    assert batch["texts"].shape == (4, 2)
    with pytest.raises(L.DataKeyError, match=r"field not found in k00000.json.*\['caption', 'id'\]"):
        L.build_index(paths, L.SampleSpec(caption_key="json:text"))


# --------------------------------------------------------------------------- epoch order
def test_plan_is_a_local_shuffle_and_a_pure_function():
    counts = np.array([50, 70, 30])
    a = L.epoch_plan(counts, seed=3, epoch=1, window=16)
    b = L.epoch_plan(counts, seed=3, epoch=1, window=16)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    shard_order, order = a
    assert sorted(order.tolist()) == list(range(150))
    assert np.abs(order - np.arange(150)).max() <= 16  # moves at most `window` places
    assert not np.array_equal(order, np.arange(150))
    assert not np.array_equal(order, L.epoch_plan(counts, seed=3, epoch=2, window=16)[1])
    assert np.array_equal(L.epoch_plan(counts, 3, 1, window=1)[1], np.arange(150))


def test_epoch_covers_distinct_samples_and_drops_the_tail(shards):
    stream = make_stream(shards, batch=16)
    assert stream.steps_per_epoch == 200 // 16
    keys, images = collect(stream.iter_batches())
    assert len(keys) == 12 * 16 == len(set(keys))
    assert images.shape == (192, 3, 24, 24)
    stream.set_position(1)
    keys1, _ = collect(stream.iter_batches())
    assert keys1 != keys and len(set(keys1)) == 192


def test_same_batches_with_any_number_of_workers(shards):
    stream = make_stream(shards, batch=16, seed=5)
    keys0, images0 = collect(L.TrainLoader(stream, num_workers=0).epoch(2))
    keys2, images2 = collect(L.TrainLoader(stream, num_workers=2).epoch(2))
    assert keys0 == keys2
    assert torch.equal(images0, images2)  # augmentation randomness is per sample


def test_ranks_split_each_global_batch(shards):
    whole = make_stream(shards, batch=16, seed=9)
    parts = [make_stream(shards, batch=16, rank=r, world=2, seed=9) for r in range(2)]
    for b, b0, b1 in zip(whole.iter_batches(), parts[0].iter_batches(), parts[1].iter_batches()):
        assert b["keys"] == b0["keys"] + b1["keys"]
        assert torch.equal(b["images"], torch.cat([b0["images"], b1["images"]]))
        assert torch.equal(b["texts"], torch.cat([b0["texts"], b1["texts"]]))


def test_start_position_skips_to_the_same_batches(shards):
    stream = make_stream(shards, batch=16, seed=2)
    stream.set_position(1, 0)
    keys, images = collect(stream.iter_batches())
    stream.set_position(1, 7)
    keys7, images7 = collect(stream.iter_batches())
    assert keys7 == keys[7 * 16 :]
    assert torch.equal(images7, images[7 * 16 :])


def test_too_few_samples_for_a_batch_is_an_error(shards):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        make_stream(shards, batch=256)


# --------------------------------------------------------------------------- filters
def test_keep_keys_filters_at_load_time(shards, tmp_path):
    kept = {f"k{i:05d}" for i in range(0, 200, 3)}
    (tmp_path / "kept_keys.txt").write_text("\n".join(sorted(kept)) + "\n\n")
    keys_file = read_key_list(tmp_path / "kept_keys.txt")
    assert keys_file == kept
    stream = make_stream(shards, batch=8, keep=lambda k: k in keys_file)
    assert stream.index.total == len(kept)
    keys, _ = collect(stream.iter_batches())
    assert set(keys) <= kept and len(keys) == (len(kept) // 8) * 8
    with pytest.raises(InputError, match="missing.txt: file not found.*kept_keys"):
        read_key_list(tmp_path / "missing.txt")


def test_share_hash_is_uniform_and_fixed():
    values = np.array([L.share_hash(7, f"key{i}") for i in range(20000)])
    assert values.min() >= 0 and values.max() < 1
    assert abs(values.mean() - 0.5) < 0.01
    assert L.share_hash(7, "key1") == values[1]
    assert L.share_hash(8, "key1") != values[1]


def test_expert_filter_own_cluster_plus_a_deterministic_share():
    keys = [f"pair{i}" for i in range(40000)]
    expert_of = {k: i % 4 for i, k in enumerate(keys)}
    chosen = [k for k in keys if L.ExpertFilter(expert_of, 1, 0.02, seed=0)(k)]
    own = [k for k in chosen if expert_of[k] == 1]
    others = [k for k in chosen if expert_of[k] != 1]
    assert len(own) == 10000
    # 30000 other pairs at 2%: mean 600, sd ~24; 5 sd either side
    assert 480 < len(others) < 720
    # deterministic whatever the order and the process; the seed changes the choice
    again = {k for k in reversed(keys) if L.ExpertFilter(expert_of, 1, 0.02, seed=0)(k)}
    assert again == set(chosen)
    other_seed = {k for k in keys if L.ExpertFilter(expert_of, 1, 0.02, seed=1)(k)}
    assert other_seed != set(chosen) and len(other_seed & set(own)) == 10000
    assert sum(L.ExpertFilter(expert_of, 1, 0.0)(k) for k in keys) == 10000
    assert sum(L.ExpertFilter(expert_of, 1, 1.0)(k) for k in keys) == 40000
    f = L.ExpertFilter(expert_of, 1)
    assert not f("unknown") and f.unassigned == 1
    with pytest.raises(ValueError):
        L.ExpertFilter(expert_of, 1, 1.5)


def write_assignments(cluster_dir: Path, shards: list[Path], expert_of_key, n_experts: int = 4) -> None:
    """Assignments in `mode-fast cluster`'s format: assignments/<shard_id>.parquet with
    key, fine, expert, sqdist; centers.npz (TwoLevel) with the expert count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mode_fast.clustering.experts import TwoLevel
    from mode_fast.data.io import shard_id

    (cluster_dir / "assignments").mkdir(parents=True, exist_ok=True)
    for shard, keys in zip(shards, L.build_index(shards, L.SampleSpec()).keys):
        experts = [expert_of_key(k) for k in keys]
        pq.write_table(
            pa.table(
                {
                    "key": pa.array(keys, pa.string()),
                    "fine": pa.array(np.array(experts, np.int32) * 2),
                    "expert": pa.array(np.array(experts, np.int32)),
                    "sqdist": pa.array(np.zeros(len(keys), np.float32)),
                }
            ),
            cluster_dir / "assignments" / f"{shard_id(shard)}.parquet",
        )
    TwoLevel(
        fine_centroids=np.zeros((2 * n_experts, 3), np.float32),
        coarse_centroids=np.zeros((n_experts, 3), np.float32),
        expert_of_fine=np.repeat(np.arange(n_experts), 2),
    ).save(cluster_dir / "centers.npz")


def test_load_expert_assignments(shards, tmp_path):
    write_assignments(tmp_path, shards, key_topic)
    got = load_expert_assignments(tmp_path)
    assert got.n_experts == 4
    assert got.expert_of_key == {f"k{i:05d}": i % 4 for i in range(200)}
    with pytest.raises(InputError, match="mode-fast cluster"):
        load_expert_assignments(tmp_path / "nothing")


def test_expert_stream_holds_own_cluster_and_share(shards, tmp_path):
    write_assignments(tmp_path, shards, key_topic)
    got = load_expert_assignments(tmp_path)
    f = L.ExpertFilter(got.expert_of_key, 2, other_share=0.1, seed=0)
    stream = make_stream(shards, batch=8, keep=f)
    own = [k for k in got.expert_of_key if key_topic(k) == 2]
    shared = [k for k in got.expert_of_key if key_topic(k) != 2 and L.share_hash(0, k) < 0.1]
    assert stream.index.total == len(own) + len(shared)
    keys, _ = collect(stream.iter_batches())
    assert set(keys) <= set(own) | set(shared)
