"""`mode-fast curate --semantics metaclip2` end to end on a real multilingual pool.

The pool: translated messages from Debian's gettext catalogues (tests/multilingual_corpus.py)
in six languages, plus captions with lone surrogates (JSON "\\ud800" escapes). Per-language
metadata lists are made from the pool's own frequent words (English, German) and character
pairs (Japanese, Chinese, Thai); Russian gets no list, so its captions are counted as
having no metadata. Checked against plain-Python transcriptions of MetaCLIP 2's rules.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from matching_reference import naive_match_v2, p_to_t_reference, t_to_p_reference
from multilingual_corpus import available, catalogue_texts

from mode_fast.curation.worldwide import lid_available

pytestmark = [
    pytest.mark.skipif(not lid_available(), reason="py3langid not installed (mode-fast[worldwide])"),
    pytest.mark.skipif(not available(), reason="no gettext catalogues under /usr/share/locale"),
]

POOL_LANGS = ("en", "ja", "zh", "th", "de", "ru")
META_LANGS = ("en", "ja", "zh", "th", "de")
SURROGATE_CAPTIONS = 3


def _frequent_words(texts: list[str], n: int) -> list[str]:
    words = Counter(w.strip(".,:;!?()\"'«»„“") for t in texts for w in t.split())
    return [w for w, _ in words.most_common() if len(w) >= 4][:n]


def _frequent_pairs(texts: list[str], n: int) -> list[str]:
    pairs = Counter(t[i : i + 2] for t in texts for i in range(len(t) - 1))
    return [p for p, _ in pairs.most_common() if p.strip() == p and not p.isascii() and p.isalpha()][:n]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    data = catalogue_texts(per_language=120)
    records = [{"uid": f"{lang}-{i:04d}", "caption": text} for lang in POOL_LANGS for i, text in enumerate(data[lang])]
    for i in range(SURROGATE_CAPTIONS):  # JSON escapes that decode to lone surrogates
        records.append({"uid": f"sur-{i}", "caption": data["ja"][i] + "\ud800" + data["ja"][i + 1]})
    rng = np.random.default_rng(0)
    records = [records[i] for i in rng.permutation(len(records))]
    pool = root / "pool"
    pool.mkdir()
    half = len(records) // 2
    for k, part in enumerate((records[:half], records[half:])):
        # ensure_ascii: a lone surrogate is written as the \ud800 escape, as crawled JSON has it
        (pool / f"part-{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="ascii")
    meta = {lang: (_frequent_words if lang in ("en", "de") else _frequent_pairs)(data[lang], 60) for lang in META_LANGS}
    folder = root / "meta"
    folder.mkdir()
    for lang, entries in meta.items():
        (folder / f"{lang}.json").write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    return pool, folder, meta, records


def _reference(meta, records):
    """Language, matched ids (per language list) of each record, by MetaCLIP 2's rules."""
    from mode_fast.curation.worldwide import LanguageIdentifier

    langs = LanguageIdentifier()([r["caption"] for r in records])
    matches = [naive_match_v2(meta[lang], r["caption"]) if lang in meta else [] for r, lang in zip(records, langs)]
    return langs, matches


def _curate(pool, out, folder, **kw):
    from mode_fast.curation.run import CurateConfig, run_curation

    kw.setdefault("workers", 1)
    return run_curation(CurateConfig(pools=(str(pool),), out=out, metadata=str(folder), semantics="metaclip2", **kw))


def test_counts_thresholds_and_kept_set_against_reference(tmp_path, world):
    from mode_fast.curation.balance import key_hashes, record_scores

    pool, folder, meta, records = world
    summary = _curate(pool, tmp_path / "out", folder, t=4)
    langs, matches = _reference(meta, records)
    # Global ids: the lists in language order, concatenated.
    order = sorted(meta)
    base = dict(zip(order, np.cumsum([0] + [len(meta[lang]) for lang in order])[:-1].tolist()))
    counts = np.zeros(sum(map(len, meta.values())), dtype=np.uint64)
    for lang, ids in zip(langs, matches):
        for i in ids:
            counts[base[lang] + i] += 1
    assert np.array_equal(np.load(tmp_path / "out" / "entry_count.npy"), counts)
    # Thresholds: English's t is --t; the others keep English's tail share (t_to_p / p_to_t).
    per_lang = {lang: counts[base[lang] : base[lang] + len(meta[lang])] for lang in order}
    p = t_to_p_reference(per_lang["en"], 4)
    expected_t = {lang: 4.0 if lang == "en" else float(p_to_t_reference(c, p)) for lang, c in per_lang.items()}
    assert {lang: s["t"] for lang, s in summary["languages"].items()} == expected_t
    # Pool, matched, kept per language; kept iff score < the record's language's t.
    uids = [r["uid"] for r in records]
    kept_keys = set((tmp_path / "out" / "kept_keys.txt").read_text().split())
    for lang in order:
        rows = [i for i, code in enumerate(langs) if code == lang]
        s = summary["languages"][lang]
        assert s["pool_size"] == len(rows) and s["matched"] == sum(bool(matches[i]) for i in rows)
        ids = [base[lang] + j for i in rows for j in matches[i]]
        offsets = np.cumsum([0] + [len(matches[i]) for i in rows])
        scores = record_scores(key_hashes([uids[i] for i in rows]), offsets, np.array(ids, dtype=np.int64), counts, 0)
        expected_kept = {uids[i] for i, sc in zip(rows, scores) if sc < expected_t[lang]}
        assert {uids[i] for i in rows} & kept_keys == expected_kept
        assert s["kept"] == len(expected_kept)
    assert summary["kept"] == len(kept_keys) == sum(s["kept"] for s in summary["languages"].values())
    # Languages without a list: counted, never kept.
    no_meta = Counter(code or "unknown (no text)" for code in langs if code not in meta)
    assert summary["no_metadata"] == dict(no_meta) and no_meta["ru"] > 60
    assert summary["lone_surrogate_captions"] == SURROGATE_CAPTIONS
    sur = [i for i, r in enumerate(records) if r["uid"].startswith("sur-")]
    assert all(langs[i] == "ja" and matches[i] for i in sur)  # matched on the rest of their text
    assert "invalid_utf8" not in summary["skipped"]
    assert summary["semantics"] == "metaclip2"


def test_rebalancing_reuses_language_and_matches(tmp_path, world, monkeypatch):
    from mode_fast.curation import worldwide

    pool, folder, _, _ = world
    out = tmp_path / "out"
    first = _curate(pool, out, folder, t=2)
    monkeypatch.setattr(worldwide.LanguageIdentifier, "__call__", lambda *a: pytest.fail("language ID re-run"))
    second = _curate(pool, out, folder, t=8)
    assert second["matches_reused_shards"] == 2 and second["kept"] >= first["kept"]
    # --target-size hits an exactly reachable size: the one t=8 kept.
    third = _curate(pool, tmp_path / "out", folder, target_size=second["kept"])
    assert third["kept"] == second["kept"]
    assert len((out / "kept_keys.txt").read_text().split()) == second["kept"]


def test_resume_gives_identical_outputs(tmp_path, world):
    pool, folder, _, _ = world
    _curate(pool, tmp_path / "a", folder, t=3, workers=2)
    _curate(pool, tmp_path / "b", folder, t=3)
    for name in ("entry_count.npy", "entry_prob.npy", "kept_keys.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    files = sorted(p.name for p in (tmp_path / "a" / "data").iterdir())
    for name in files:
        assert (tmp_path / "a" / "data" / name).read_bytes() == (tmp_path / "b" / "data" / name).read_bytes()


def test_cli_end_to_end_with_language_summary(tmp_path, world, capsys):
    from mode_fast.cli import main

    pool, folder, meta, _ = world
    out = tmp_path / "out"
    assert (
        main(
            [
                "curate",
                str(pool),
                "--out",
                str(out),
                "--metadata",
                str(folder),
                "--semantics",
                "metaclip2",
                "--t",
                "3",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    text = captured.out + captured.err
    for lang in meta:
        assert f"\n  {lang} " in text  # one summary line per language
    assert "no metadata" in text and "ru" in text
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["languages"]) == set(meta)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["semantics"] == "metaclip2" and manifest["t_by_language"]["en"] == 3.0
    assert main(["curate", str(pool), "--out", str(tmp_path / "o2"), "--semantics", "metaclip2"]) == 2
    assert "needs --metadata" in capsys.readouterr().err


def test_metaclip1_default_does_not_route_by_language(tmp_path, world, metadata_file):
    from mode_fast.curation.run import CurateConfig, run_curation

    pool, _, meta, _ = world
    summary = run_curation(
        CurateConfig(pools=(str(pool),), out=tmp_path / "out", metadata=metadata_file(meta["en"]), t=3, workers=1)
    )
    assert "languages" not in summary and summary["skipped"].get("invalid_utf8") == SURROGATE_CAPTIONS
