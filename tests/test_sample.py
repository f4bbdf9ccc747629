"""The embedded sample: deterministic, readable, with the mix of captions curation needs."""
from __future__ import annotations

import json
import tarfile
from collections import Counter

import pytest
import webdataset as wds

from mode_fast.cli import main
from mode_fast.data.sample import CLASS_NAMES, sample_captions, write_sample


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    write_sample(out, num_pairs=600, shard_size=250, eval_pairs=64, seed=3)
    return out


def _pool(sample_dir):
    samples = []
    for shard in sorted((sample_dir / "pool").glob("*.tar")):
        samples += list(wds.WebDataset(str(shard), shardshuffle=False, empty_check=False))
    return samples


def test_deterministic_bytes(sample_dir, tmp_path):
    write_sample(tmp_path, num_pairs=600, shard_size=250, eval_pairs=64, seed=3)
    for rel in ["pool/pool-000000.tar", "pool/pool-000002.tar", "eval/eval-000000.tar", "sample_info.json"]:
        assert (tmp_path / rel).read_bytes() == (sample_dir / rel).read_bytes(), rel
    other = tmp_path / "other"
    write_sample(other, num_pairs=600, shard_size=250, eval_pairs=64, seed=4)
    assert (other / "pool/pool-000000.tar").read_bytes() != (sample_dir / "pool/pool-000000.tar").read_bytes()


def test_pool_is_readable_and_mixed(sample_dir):
    samples = _pool(sample_dir)
    assert len(samples) == 600 and len({s["__key__"] for s in samples}) == 600
    metas = [json.loads(s["json"]) for s in samples]
    assert all({"jpg", "txt", "json"} <= set(s) for s in samples)
    domains = Counter(m["domain"] for m in metas)
    assert set(domains) == {"shapes", "textures", "glyphs", "scenes"} and min(domains.values()) > 100
    mismatch = sum(m["mismatched"] for m in metas) / len(metas)
    assert 0.05 < mismatch < 0.16
    captions = [s["txt"].decode("utf-8") for s in samples]
    assert all(c == m["caption"] for c, m in zip(captions, metas))
    assert any(not c.isascii() for c in captions) and any(("\t" in c or "\n" in c) for c in captions)


def test_captions_hit_metadata_except_noise(sample_dir):
    from mode_fast.curate import Matcher
    from mode_fast.metadata import load_metadata

    matcher = Matcher(load_metadata(None))  # the shipped WordNet list
    captions = [json.loads(s["json"])["caption"] for s in _pool(sample_dir)] + sample_captions(2000, seed=9)
    noise = [c for c in captions if c.lower().startswith("img_")]  # near-duplicates may capitalise
    assert 0.02 < len(noise) / len(captions) < 0.1
    assert all(not matcher.match(c) for c in noise)
    real = [c for c in captions if not c.lower().startswith("img_")]
    assert all(matcher.match(c) for c in real)
    # A long tail for balancing: the commonest words are far more frequent than the rarest.
    counts = Counter(i for c in real for i in matcher.match(c))
    assert max(counts.values()) > 20 * min(counts.values())


def test_eval_split(sample_dir):
    classes = json.loads((sample_dir / "eval" / "classes.json").read_text())
    templates = json.loads((sample_dir / "eval" / "templates.json").read_text())
    assert classes == CLASS_NAMES and all("{}" in t for t in templates)
    with tarfile.open(sample_dir / "eval" / "eval-000000.tar") as tf:
        labels = [int(tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".cls")]
    assert len(labels) == 64 and set(labels) == set(range(len(classes)))


def test_rerun_is_a_noop_and_cli(sample_dir, tmp_path, capsys):
    before = (sample_dir / "pool" / "pool-000000.tar").stat().st_mtime_ns
    write_sample(sample_dir, num_pairs=600, shard_size=250, eval_pairs=64, seed=3)
    assert (sample_dir / "pool" / "pool-000000.tar").stat().st_mtime_ns == before
    assert main(["sample", "--out", str(tmp_path / "cli"), "--num-pairs", "50", "--eval-pairs", "16"]) == 0
    assert "50 pairs" in capsys.readouterr().out
    assert len(sample_captions(100, seed=1)) == 100 and sample_captions(5) == sample_captions(5)
