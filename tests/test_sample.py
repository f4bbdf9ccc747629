"""The embedded sample: deterministic, readable, with the mix of captions and images later stages need."""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mode_fast.cli import main
from mode_fast.demo import sample as sample_module
from mode_fast.demo.sample import CLASS_NAMES, DOMAIN_OF_CLASS, DOMAINS, TEMPLATES, sample_captions, write_sample

ARGS = {"num_pairs": 800, "shard_size": 300, "eval_pairs": 96, "seed": 3}  # 3 pool shards, last one short


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sample")
    write_sample(out, **ARGS)
    return out


@pytest.fixture(scope="module")
def matcher():
    from mode_fast import Matcher
    from mode_fast.curation.metadata import load_metadata

    return Matcher(load_metadata(None))  # the shipped WordNet list: what `mode-fast curate` uses by default


def _read(shard: Path) -> list[dict]:
    """Samples of one shard, grouped by webdataset's own tar reader; the file is ours to
    close (wds.WebDataset leaves it to the garbage collector: ResourceWarning)."""
    with open(shard, "rb") as f:
        members = ({**member, "__url__": str(shard)} for member in wds.tariterators.tar_file_iterator(f))
        return list(wds.tariterators.group_by_keys(members))


def _pool(out: Path) -> list[dict]:
    return [s for shard in sorted((out / "pool").glob("*.tar")) for s in _read(shard)]


def _metas(samples: list[dict]) -> list[dict]:
    return [json.loads(s["json"]) for s in samples]


def _all_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# --- determinism ------------------------------------------------------------------------


def test_same_arguments_give_byte_identical_files(sample_dir: Path, tmp_path: Path) -> None:
    write_sample(tmp_path / "again", **ARGS)
    first, second = _all_files(sample_dir), _all_files(tmp_path / "again")
    assert sorted(first) == sorted(second)
    assert len([name for name in first if name.endswith(".tar")]) == 4
    for name in first:
        assert first[name] == second[name], name
    write_sample(tmp_path / "other_seed", **(ARGS | {"seed": 4}))
    assert (tmp_path / "other_seed/pool/pool-000000.tar").read_bytes() != first["pool/pool-000000.tar"]


def test_samples_do_not_depend_on_shard_size_and_smaller_pool_is_a_prefix(sample_dir: Path, tmp_path: Path) -> None:
    write_sample(tmp_path, **(ARGS | {"num_pairs": 500, "shard_size": 500, "eval_pairs": 0}))
    smaller = _pool(tmp_path)
    assert len(list((tmp_path / "pool").glob("*.tar"))) == 1
    full = _pool(sample_dir)[:500]
    for a, b in zip(smaller, full, strict=True):
        assert (a["__key__"], a["jpg"], a["txt"], a["json"]) == (b["__key__"], b["jpg"], b["txt"], b["json"])


def test_tar_headers_are_fixed(sample_dir: Path) -> None:
    import tarfile

    with tarfile.open(sample_dir / "pool/pool-000000.tar") as tf:
        members = tf.getmembers()
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}
    # webdataset's grouping needs a sample's members adjacent
    keys = [m.name.split(".")[0] for m in members]
    assert keys == sorted(keys) and len(members) == 3 * 300


# --- pool contents ----------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_pool_is_readable_with_webdataset(sample_dir: Path) -> None:
    pipeline = wds.WebDataset(str(sample_dir / "pool/pool-{000000..000002}.tar"), shardshuffle=False)
    samples = list(pipeline.decode("pil"))  # the loader's own path: brace pattern, decoding
    assert [s["__key__"] for s in samples] == [f"s{i:07d}" for i in range(800)]
    assert all(s["jpg"].size == (32, 32) and s["jpg"].mode == "RGB" for s in samples)
    samples = _pool(sample_dir)
    metas = _metas(samples)
    for s, meta in zip(samples, metas):
        assert {"jpg", "txt", "json"} <= set(s)
        assert meta["uid"] == s["__key__"]
        assert s["txt"].decode("utf-8") == meta["caption"]  # strict UTF-8
        assert CLASS_NAMES[meta["label"]] == meta["class_name"] and DOMAIN_OF_CLASS[meta["label"]] == meta["domain"]
    image = Image.open(io.BytesIO(samples[0]["jpg"]))
    assert image.format == "JPEG" and image.mode == "RGB" and image.size == (32, 32)


def test_domains_and_caption_kind_shares(sample_dir: Path) -> None:
    metas = _metas(_pool(sample_dir))
    n = len(metas)
    per_domain = Counter(m["domain"] for m in metas)
    assert set(per_domain) == set(DOMAINS) and min(per_domain.values()) > 0.6 * n / len(DOMAINS)
    kinds = Counter(m["caption_kind"] for m in metas)
    # binomial bounds, about 4 standard deviations at n = 800
    assert 0.06 < kinds["mismatched"] / n < 0.14
    assert 0.02 < kinds["noise"] / n < 0.09
    assert 0.02 < kinds["near_duplicate"] / n < 0.09
    assert 0.005 < sum(m["tricky"] for m in metas) / n < 0.07
    assert all(m["mismatched"] == (m["caption_kind"] == "mismatched") for m in metas)
    info = json.loads((sample_dir / "sample_info.json").read_text())
    assert info["caption_kinds"] == dict(kinds) | {k: 0 for k in info["caption_kinds"] if k not in kinds}
    assert info["pool_per_domain"] == dict(per_domain)
    assert info["pool_per_class"] == [sum(m["label"] == c for m in metas) for c in range(len(CLASS_NAMES))]


def test_mismatched_captions_describe_another_domain(sample_dir: Path) -> None:
    for m in _metas(_pool(sample_dir)):
        if m["mismatched"]:
            assert DOMAIN_OF_CLASS[m["caption_label"]] != m["domain"]
        elif m["caption_kind"] == "noise":
            assert m["caption_label"] is None
        else:
            assert m["caption_label"] == m["label"]


def _words(caption: str) -> list[str]:
    return re.findall(r"\w+", caption.lower())


def test_near_duplicates_copy_an_earlier_caption_of_the_same_class(sample_dir: Path) -> None:
    by_uid = {m["uid"]: m for m in _metas(_pool(sample_dir))}
    near = [m for m in by_uid.values() if m["caption_kind"] == "near_duplicate"]
    assert near
    for m in near:
        base = by_uid[m["near_duplicate_of"]]
        assert base["uid"] < m["uid"] and base["label"] == m["label"] and base["caption_kind"] == "clean"
        assert m["caption"] != base["caption"]
        if not m["tricky"]:  # the edit touches case, spacing or punctuation only
            assert _words(m["caption"]) == _words(base["caption"])
        # the image is drawn in the colours the copied caption names
        assert (m["fg_colour"], m["bg_colour"]) == (base["fg_colour"], base["bg_colour"])


def test_caption_colours_are_the_colours_drawn(sample_dir: Path) -> None:
    checked = with_colour = 0
    for s, m in zip(_pool(sample_dir), _metas(_pool(sample_dir))):
        if m["domain"] != "shapes" or m["caption_kind"] != "clean":
            continue
        pixels = np.asarray(Image.open(io.BytesIO(s["jpg"])), dtype=np.float32).reshape(-1, 3)
        bg, fg = (np.asarray(sample_module.COLOURS[m[k]], dtype=np.float32) for k in ("bg_colour", "fg_colour"))
        near_bg = (np.abs(pixels - bg).max(1) < 60).mean()
        near_fg = (np.abs(pixels - fg).max(1) < 60).mean()
        assert near_bg > 0.1 and near_fg > 0.1, m  # a shape covers about 25-70% of the frame
        # a caption names the colours drawn or none (most name none: COLOUR_CAPTION_RATE)
        named = {w for w in _words(m["caption"]) if w in sample_module.COLOURS}
        assert named <= {m["fg_colour"], m["bg_colour"]}, m
        with_colour += bool(named)
        checked += 1
    assert checked > 50
    assert 0.1 < with_colour / checked < 0.5


def test_captions_hit_metadata_except_noise(sample_dir: Path, matcher) -> None:
    metas = _metas(_pool(sample_dir))
    noise = [m["caption"] for m in metas if m["caption_kind"] == "noise"]
    worded = [m["caption"] for m in metas if m["caption_kind"] != "noise"]
    assert noise and all(matcher.match(c) == [] for c in noise)
    assert all(len(matcher.match(c)) >= 3 for c in worded)
    # long tail: a few entries in most captions, many seen once or twice
    counts = Counter(i for c in worded for i in matcher.match(c))
    frequencies = sorted(counts.values(), reverse=True)
    assert frequencies[0] > 0.3 * len(worded)
    assert sum(f <= 2 for f in frequencies) > 0.2 * len(frequencies)
    assert len(frequencies) > 150


def test_every_vocabulary_word_is_metadata(matcher) -> None:
    from mode_fast.curation.metadata import load_metadata

    entries = set(load_metadata(None))
    vocabulary = sample_module.TAIL_NOUNS + sample_module.TAIL_ADJECTIVES + list(sample_module.COLOURS)
    assert [w for w in vocabulary if w not in entries] == []
    # class surface forms ("wavy pattern") need not be entries themselves but must contain one
    surface_forms = [w for words in sample_module.CLASS_WORDS.values() for w in words]
    assert [w for w in surface_forms if not matcher.match(w)] == []


def test_tricky_text_is_present_and_valid_utf8(sample_dir: Path) -> None:
    captions = [s["txt"].decode("utf-8", errors="strict") for s in _pool(sample_dir)]
    assert any(not c.isascii() for c in captions)
    assert any(any(ch in c for ch in "\t\n\r") for c in captions)
    assert any(ord(ch) > 0xFFFF for c in sample_captions(3000, tricky_rate=0.5) for ch in c)  # emoji: 4-byte UTF-8


# --- images -----------------------------------------------------------------------------


def _image_features(jpgs: list[bytes]) -> np.ndarray:
    """Colour-blind statistics: edge energy, background share, row/column structure."""
    a = np.stack([np.asarray(Image.open(io.BytesIO(j)).convert("RGB"), dtype=np.float32) / 255 for j in jpgs])
    grey = a.mean(-1)
    corner = a[:, :3, :3].mean((1, 2))
    return np.stack([
        5 * np.abs(np.diff(grey, axis=2)).mean((1, 2)),
        5 * np.abs(np.diff(grey, axis=1)).mean((1, 2)),
        (np.abs(a - corner[:, None, None]).sum(-1) < 0.25).mean((1, 2)),
        3 * grey.mean(2).std(1),
        3 * grey.mean(1).std(1),
        grey[:, :10].mean((1, 2)) - grey[:, -10:].mean((1, 2)),
    ], axis=1)  # fmt: skip


def test_domains_are_visually_distinct(sample_dir: Path) -> None:
    """What makes clustering meaningful later: a 5-NN on simple image statistics, fitted on
    the pool, tells the eval images' domains apart."""
    pool = _pool(sample_dir)
    evals = [s for shard in sorted((sample_dir / "eval").glob("*.tar")) for s in _read(shard)]
    train_x, test_x = _image_features([s["jpg"] for s in pool]), _image_features([s["jpg"] for s in evals])
    train_y = np.array([m["domain"] for m in _metas(pool)])
    test_y = np.array([m["domain"] for m in _metas(evals)])
    nearest = np.argsort(((test_x[:, None] - train_x[None]) ** 2).sum(-1), axis=1)[:, :5]
    predicted = np.array([Counter(train_y[row]).most_common(1)[0][0] for row in nearest])
    assert (predicted == test_y).mean() > 0.85


# --- eval split -------------------------------------------------------------------------


def test_eval_split_has_labels_classes_and_templates(sample_dir: Path) -> None:
    classes = json.loads((sample_dir / "eval/classes.json").read_text())
    templates = json.loads((sample_dir / "eval/templates.json").read_text())
    assert classes == CLASS_NAMES and len(set(classes)) == len(classes)
    assert templates == TEMPLATES and all(t.count("{}") == 1 for t in templates)
    evals = _read(sample_dir / "eval/eval-000000.tar")
    assert [s["__key__"] for s in evals] == [f"e{i:07d}" for i in range(96)]
    labels = [int(s["cls"]) for s in evals]
    assert Counter(labels) == {c: 96 // len(classes) for c in range(len(classes))}  # balanced
    for s, label in zip(evals, labels):
        meta = json.loads(s["json"])
        assert meta["label"] == label and meta["class_name"] == classes[label]
    info = json.loads((sample_dir / "sample_info.json").read_text())
    assert sorted(c for members in info["domains"].values() for c in members) == list(range(len(classes)))
    assert info["eval_per_class"] == [Counter(labels)[c] for c in range(len(classes))]
    # eval images are new draws, not copies of pool images
    pool_images = {s["jpg"] for s in _pool(sample_dir)}
    assert not any(s["jpg"] in pool_images for s in evals)


# --- re-running, atomic output ----------------------------------------------------------

SMALL = {"num_pairs": 60, "shard_size": 20, "eval_pairs": 16}


def test_rerun_of_complete_output_is_a_noop(tmp_path: Path) -> None:
    write_sample(tmp_path, **SMALL)
    shard = tmp_path / "pool/pool-000000.tar"
    before = shard.stat().st_ino, shard.stat().st_mtime_ns
    write_sample(tmp_path, **SMALL)
    assert (shard.stat().st_ino, shard.stat().st_mtime_ns) == before
    write_sample(tmp_path, **SMALL, force=True)
    assert shard.stat().st_ino != before[0]  # rewritten under a temporary name, then renamed


def test_rerun_with_other_arguments_removes_stale_shards(tmp_path: Path) -> None:
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool/notes.md").write_text("not ours")
    write_sample(tmp_path, **SMALL)
    assert len(list((tmp_path / "pool").glob("*.tar"))) == 3
    info = write_sample(tmp_path, **(SMALL | {"num_pairs": 30}))
    assert sorted(p.name for p in (tmp_path / "pool").iterdir()) == ["notes.md", "pool-000000.tar", "pool-000001.tar"]
    assert info["pool_shards"] == ["pool/pool-000000.tar", "pool/pool-000001.tar"]
    assert len(_pool(tmp_path)) == 30


def test_killed_or_damaged_output_is_rewritten(tmp_path: Path) -> None:
    write_sample(tmp_path, **SMALL)
    reference = _all_files(tmp_path)
    # a run killed mid-way: no info file, a leftover temporary, a shard from other arguments
    (tmp_path / "sample_info.json").unlink()
    (tmp_path / "pool/.pool-000001.tar.x1y2.tmp").write_bytes(b"half")
    (tmp_path / "pool/pool-000001.tar").write_bytes(b"not a shard")
    write_sample(tmp_path, **SMALL)
    assert _all_files(tmp_path) == reference
    # damaged after completion (truncated): the recorded sizes catch it
    shard = tmp_path / "eval/eval-000000.tar"
    shard.write_bytes(shard.read_bytes()[:1024])
    write_sample(tmp_path, **SMALL)
    assert _all_files(tmp_path) == reference


def test_interrupted_rewrite_is_never_taken_as_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_sample(tmp_path, **SMALL)
    reference = _all_files(tmp_path)
    real_write_shard = sample_module._write_shard
    written: list[Path] = []

    def write_one_shard_then_die(path: Path, samples: list[dict], with_cls: bool) -> int:
        if written:
            raise KeyboardInterrupt  # as if killed while writing the second shard
        written.append(path)
        return real_write_shard(path, samples, with_cls)

    monkeypatch.setattr(sample_module, "_write_shard", write_one_shard_then_die)
    with pytest.raises(KeyboardInterrupt):
        write_sample(tmp_path, **(SMALL | {"seed": 9}))
    # the old info file is gone, so the mix of new and old shards cannot pass for either run
    assert not (tmp_path / "sample_info.json").exists()
    assert not list(tmp_path.rglob("*.tmp"))
    monkeypatch.undo()
    write_sample(tmp_path, **SMALL)
    assert _all_files(tmp_path) == reference


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_pairs": 0}, "num_pairs"),
        ({"shard_size": 0}, "shard_size"),
        ({"eval_pairs": -1}, "eval_pairs"),
        ({"image_size": 8}, "image_size"),
        ({"mismatch_rate": 1.5}, "mismatch_rate"),
        ({"mismatch_rate": 0.6, "noise_rate": 0.5}, "must be <= 1"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_sample(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


def test_rates_are_configurable(tmp_path: Path) -> None:
    clean = write_sample(tmp_path / "clean", num_pairs=200, eval_pairs=0, mismatch_rate=0.0, noise_rate=0.0,
                         near_duplicate_rate=0.0, tricky_rate=0.0)  # fmt: skip
    assert clean["caption_kinds"] == {"clean": 200, "noise": 0, "mismatched": 0, "near_duplicate": 0}
    assert clean["tricky"] == 0 and clean["eval_shards"] == []
    half = write_sample(tmp_path / "half", num_pairs=200, eval_pairs=0, mismatch_rate=0.5)
    assert 70 < half["caption_kinds"]["mismatched"] < 130


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert main(["sample", "--out", str(out), "--num-pairs", "50", "--eval-pairs", "16", "--shard-size", "20"]) == 0
    printed = capsys.readouterr().out
    assert "50 pairs in 3 shards" in printed
    # progress: one line per shard written
    assert (
        "sample: pool shard 1/3 written (20 pairs)" in printed
        and "sample: pool shard 3/3 written (50 pairs)" in printed
    )
    assert "sample: eval shard 1/1 written" in printed
    assert len(_pool(out)) == 50 and (out / "eval/classes.json").is_file()
    assert main(["sample", "--out", str(tmp_path / "bad"), "--num-pairs", "0"]) == 2
    assert "num_pairs must be > 0" in capsys.readouterr().err


# --- sample_captions --------------------------------------------------------------------


def test_sample_captions_are_deterministic_prefix_stable_and_caption_sized() -> None:
    captions = sample_captions(3000, seed=1)
    assert captions == sample_captions(3000, seed=1)
    assert captions[:1500] == sample_captions(1500, seed=1)  # crosses a chunk boundary
    assert captions != sample_captions(3000, seed=2)
    assert sample_captions(0) == []
    mean_bytes = sum(len(c.encode("utf-8")) for c in captions) / len(captions)
    assert 80 < mean_bytes < 120
    assert len(set(captions)) > 0.95 * len(captions)


def test_sample_captions_noise_has_no_metadata_and_the_rest_has_some(matcher) -> None:
    assert all(matcher.match(c) == [] for c in sample_captions(500, seed=5, noise_rate=1.0))
    assert all(matcher.match(c) for c in sample_captions(500, seed=5, noise_rate=0.0, tricky_rate=1.0))
    with pytest.raises(ValueError, match="noise_rate"):
        sample_captions(10, noise_rate=2.0)
