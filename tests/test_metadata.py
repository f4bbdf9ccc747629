"""Metadata lists: validation, merging, the WordNet builder and the shipped default."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from mode_fast.cli import main
from mode_fast.curation.metadata import (
    MetadataError,
    build_from_wordnet,
    default_wordnet_dir,
    load_metadata,
    merge_metadata,
    metadata_sha256,
    save_metadata,
)

MINI = Path(__file__).parent / "data" / "wordnet_mini"


def _write(tmp_path: Path, obj, name="m.json") -> Path:
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid UTF-8 JSON"),
        ({"dog": 1}, "expected a JSON list of strings, got dict"),
        (["dog", 3], "entry 1 is int"),
        (["dog", ""], "entry 1 is empty"),
        (["dog", " \t"], "entry 1 is empty or only whitespace"),
        (["dog", "cat", "dog"], "entry 2 'dog' duplicates entry 0"),
        ([], "the list is empty"),
        ('["dog", "cat", "\\ud800x"]', "entry 2 .* is not valid Unicode"),  # a JSON escape of a lone surrogate
    ],
)
def test_validation_errors_name_problem_and_index(tmp_path, content, message):
    p = _write(tmp_path, content)
    with pytest.raises(MetadataError, match=message) as exc:
        load_metadata(p)
    assert str(p) in str(exc.value)


def test_missing_file(tmp_path):
    with pytest.raises(MetadataError, match="cannot read"):
        load_metadata(tmp_path / "nope.json")


def test_truncated_or_fake_gz_is_a_metadata_error(tmp_path):
    blob = gzip.compress(json.dumps(["dog", "cat"] * 50, separators=(",", ":")).encode())
    (tmp_path / "cut.json.gz").write_bytes(blob[: len(blob) // 2])  # gzip raises EOFError here, not OSError
    with pytest.raises(MetadataError, match=r"cut\.json\.gz: cannot read"):
        load_metadata(tmp_path / "cut.json.gz")
    (tmp_path / "plain.json.gz").write_text('["dog"]')
    with pytest.raises(MetadataError, match=r"plain\.json\.gz: cannot read"):
        load_metadata(tmp_path / "plain.json.gz")


def test_utf8_bom_is_not_part_of_the_first_entry(tmp_path):
    p = tmp_path / "bom.json"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(["dog", "caf\u00e9"], ensure_ascii=False).encode())
    assert load_metadata(p) == ["dog", "café"]


def test_merge_keeps_first_order_and_appends_new():
    assert merge_metadata(["b", "a"], ["a", "c", "b", "d"]) == ["b", "a", "c", "d"]


def test_save_and_load_roundtrip_gz_and_plain(tmp_path):
    entries = ["dog", "hot dog", "café", "東京"]
    for name in ("m.json", "m.json.gz"):
        save_metadata(entries, tmp_path / name)
        assert load_metadata(tmp_path / name) == entries
    assert gzip.decompress((tmp_path / "m.json.gz").read_bytes()) == (tmp_path / "m.json").read_bytes()
    with pytest.raises(MetadataError, match="duplicates"):
        save_metadata(["a", "a"], tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()


def test_sha256_depends_on_order():
    assert metadata_sha256(["a", "b"]) != metadata_sha256(["b", "a"])
    assert metadata_sha256(["a", "b"]) == metadata_sha256(["a", "b"])


def test_wordnet_parser_on_fixture():
    assert build_from_wordnet(MINI) == [
        "dog",
        "domestic dog",
        "hot dog",
        "Einstein",
        "Albert Einstein",  # nouns, `_` -> space, case kept
        "chase",  # verb "dog" already seen
        "abounding",
        "galore",
        "handy",
        "ready to hand",
        "outback",
        "remote",  # markers stripped
        "a priori",
    ]


def test_wordnet_dir_errors(tmp_path):
    with pytest.raises(MetadataError, match="missing data.noun"):
        build_from_wordnet(tmp_path)


def test_shipped_default_list():
    entries = load_metadata(None)
    assert len(entries) > 100_000 and len(set(entries)) == len(entries)
    assert all(e.strip() for e in entries)
    for lemma in ("dog", "hot dog", "ice cream", "Einstein", "circle", "striped"):
        assert lemma in entries
    assert not any("_" in e or e.endswith(("(a)", "(p)", "(ip)")) for e in entries)


@pytest.mark.skipif(default_wordnet_dir() is None, reason="wordnet-base not installed (apt-get install wordnet-base)")
def test_shipped_list_is_the_wordnet_build():
    assert load_metadata(None) == build_from_wordnet(default_wordnet_dir())


def test_cli_build_and_check(tmp_path, capsys):
    user = _write(tmp_path, ["my brand", "dog"], "user.json")
    out = tmp_path / "merged.json.gz"
    assert main(["metadata", "build", "--wordnet-dir", str(MINI), "--merge", str(user), "--out", str(out)]) == 0
    merged = load_metadata(out)
    assert merged[:2] == ["dog", "domestic dog"] and merged[-1] == "my brand" and merged.count("dog") == 1
    assert main(["metadata", "check", str(out)]) == 0
    assert "14 entries" in capsys.readouterr().out
    assert main(["metadata", "check", str(_write(tmp_path, ["a", "a"], "dup.json"))]) == 2
    assert "duplicates entry 0" in capsys.readouterr().err


def test_wordnet_parser_rejects_malformed_line(tmp_path):
    for name in ("data.noun", "data.verb", "data.adj", "data.adv"):
        (tmp_path / name).write_text((MINI / name).read_text())
    # w_cnt says 3 words, only 2 are there: a truncated or foreign file must fail, naming the line
    (tmp_path / "data.verb").write_text("  1 header\n00004000 35 v 03 dog 0 chase 0\n")
    with pytest.raises(MetadataError, match=r"data\.verb:2: not a WordNet data line"):
        build_from_wordnet(tmp_path)


def test_gz_save_is_byte_reproducible_and_failed_save_keeps_old_file(tmp_path):
    entries = ["dog", "hot dog"]
    save_metadata(entries, tmp_path / "a.json.gz")
    save_metadata(entries, tmp_path / "b.json.gz")
    assert (tmp_path / "a.json.gz").read_bytes() == (tmp_path / "b.json.gz").read_bytes()
    before = (tmp_path / "a.json.gz").read_bytes()
    with pytest.raises(MetadataError, match="entry 1 is empty"):
        save_metadata(["dog", ""], tmp_path / "a.json.gz")
    assert (tmp_path / "a.json.gz").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json.gz", "b.json.gz"]  # no temp left


@pytest.mark.skipif(default_wordnet_dir() is None, reason="wordnet-base not installed (apt-get install wordnet-base)")
def test_shipped_file_is_byte_identical_to_a_fresh_build(tmp_path):
    out = tmp_path / "m.json.gz"
    assert main(["metadata", "build", "--out", str(out)]) == 0  # auto-detected WordNet dir
    shipped = Path(__file__).parent.parent / "mode_fast" / "curation" / "data" / "metadata_wordnet.json.gz"
    assert out.read_bytes() == shipped.read_bytes()


def test_cli_without_wordnet(tmp_path, capsys, monkeypatch):
    import mode_fast.curation.metadata as md

    monkeypatch.setattr(md, "default_wordnet_dir", lambda: None)
    out = tmp_path / "o.json"
    assert main(["metadata", "build", "--out", str(out)]) == 2
    assert "apt-get install wordnet-base" in capsys.readouterr().err and not out.exists()
    a, b = _write(tmp_path, ["x", "y"], "a.json"), _write(tmp_path, ["y", "z"], "b.json")
    assert main(["metadata", "build", "--no-wordnet", "--merge", str(a), str(b), "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == ["x", "y", "z"]
    assert main(["metadata", "build", "--no-wordnet", "--out", str(out)]) == 2
    assert "nothing to build" in capsys.readouterr().err
