"""MetaCLIP 2 pieces: per-language metadata, thresholds (t_to_p / p_to_t), solving the
English t for a target size, and language ID on real multilingual text."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from matching_reference import count_to_prob_reference, p_to_t_reference, t_to_p_reference

from mode_fast.core.errors import ConfigError
from mode_fast.curation.metadata import MetadataError
from mode_fast.curation.worldwide import (
    _ShareTable,
    kept_by_language,
    language_thresholds,
    lid_available,
    load_language_metadata,
    p_to_t,
    solve_english_t,
    t_to_p,
)

# --- metadata --------------------------------------------------------------------------------


def test_folder_and_object_forms_agree(tmp_path):
    lists = {"en": ["dog", "hot dog"], "ja": ["東京", "犬"], "zh": ["北京"]}
    folder = tmp_path / "meta"
    folder.mkdir()
    for lang, entries in lists.items():
        (folder / f"{lang}.json").write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    with gzip.open(folder / "th.json.gz", "wt", encoding="utf-8") as f:
        json.dump(["ไทย"], f)
    (folder / "README.txt").write_text("not a list")  # ignored: not .json
    obj = tmp_path / "meta.json"
    obj.write_text(json.dumps(lists | {"th": ["ไทย"]}, ensure_ascii=False), encoding="utf-8")
    assert (
        load_language_metadata(folder) == load_language_metadata(obj) == dict(sorted((lists | {"th": ["ไทย"]}).items()))
    )


@pytest.mark.parametrize(
    "lists, match",
    [
        ({"en": ["dog", "dog"]}, r"meta.json \[en\]: entry 1 'dog' duplicates entry 0"),
        ({"ja": ["東京", 3]}, r"meta.json \[ja\]: entry 1 is int"),
        ({"ja": []}, r"\[ja\]: the list is empty"),
        ({"e n": ["x"]}, "'e n' is not a language code"),
        ({}, "maps no language"),
    ],
)
def test_object_form_errors_name_file_language_and_index(tmp_path, lists, match):
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(lists, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(MetadataError, match=match):
        load_language_metadata(path)


def test_folder_errors(tmp_path):
    (tmp_path / "ja.json").write_text(json.dumps(["東京", " "]), encoding="utf-8")
    with pytest.raises(MetadataError, match=r"ja.json: entry 1 is empty or only whitespace"):
        load_language_metadata(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MetadataError, match="no <lang>.json"):
        load_language_metadata(empty)
    with pytest.raises(MetadataError, match="JSON list"):
        (tmp_path / "list.json").write_text('["a"]')
        load_language_metadata(tmp_path / "list.json")


# --- thresholds ------------------------------------------------------------------------------

counts_st = st.lists(st.integers(0, 50), min_size=1, max_size=40).map(lambda v: np.array(v, dtype=np.uint64))


@settings(max_examples=300, deadline=None)
@given(counts=counts_st, t=st.floats(0.5, 60), p=st.floats(0, 1))
def test_t_to_p_and_p_to_t_equal_metaclip2(counts, t, p):
    if counts.sum() > 0:
        assert t_to_p(counts, t) == t_to_p_reference(counts, t)
        assert p_to_t(counts, p) == float(p_to_t_reference(counts, p))
        ps = np.array([p, 0.0, 1.0, t_to_p(counts, t)])
        assert _ShareTable(counts).t(ps).tolist() == [float(p_to_t_reference(counts, q)) for q in ps]


def test_thresholds_and_probabilities():
    en = np.array([0, 1, 2, 3, 100, 200], dtype=np.uint64)
    ja = np.array([5, 5, 10, 1000], dtype=np.uint64)
    t = language_thresholds({"en": en, "ja": ja}, 50.0)
    p = t_to_p_reference(en, 50.0)  # 6 / 306
    assert t["en"] == 50.0 and t["ja"] == float(p_to_t_reference(ja, p))
    # The keep rule (score u*count < t) gives count_to_prob's probabilities: t / max(count, t).
    probs = count_to_prob_reference(ja.astype(np.float64), t["ja"])
    assert np.allclose(probs, np.minimum(1.0, t["ja"] / ja))


def test_english_needed():
    with pytest.raises(ConfigError, match="English"):
        language_thresholds({"ja": np.array([1, 2], dtype=np.uint64)}, 10.0)
    with pytest.raises(ConfigError, match="English"):
        language_thresholds({"en": np.zeros(3, dtype=np.uint64), "ja": np.array([1], dtype=np.uint64)}, 10.0)


def _total_kept(counts, scores, t_en):
    return sum(kept_by_language(scores, language_thresholds(counts, t_en)).values())


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), target=st.integers(1, 120))
def test_solve_english_t_exact_or_best_below(seed, target):
    rng = np.random.default_rng(seed)
    counts, scores = {}, {}
    for lang in ("en", "ja", "th"):
        n_entries, n_records = int(rng.integers(3, 12)), int(rng.integers(5, 60))
        c = rng.integers(0, 30, n_entries).astype(np.uint64)
        c[0] = max(int(c[0]), 1)
        counts[lang] = c
        # Scores as curate makes them: u * count of a matched entry (min over the set).
        matched = rng.integers(0, n_entries, n_records)
        scores[lang] = rng.random(n_records) * c[matched].astype(np.float64)
    t, kept = solve_english_t(counts, scores, target)
    assert _total_kept(counts, scores, t) == kept
    # Every kept size reachable by some t_en: totals at all breakpoints and between them.
    points = np.unique(np.concatenate([scores["en"], counts["en"].astype(np.float64), [0.0]]))
    candidates = np.concatenate([points, (points[:-1] + points[1:]) / 2, [points[-1] + 1, points[-1] * 2 + 1]])
    reachable = {_total_kept(counts, scores, float(x)) for x in candidates if x > 0}
    if target in reachable:
        assert kept == target
    else:
        assert kept == max([r for r in reachable if r < target], default=kept)


# --- language ID ----------------------------------------------------------------------------

needs_lid = pytest.mark.skipif(not lid_available(), reason="py3langid not installed (mode-fast[worldwide])")


@needs_lid
def test_language_id_on_real_text():
    from multilingual_corpus import available, catalogue_texts

    from mode_fast.curation.worldwide import LanguageIdentifier

    if not available():
        pytest.skip("no gettext catalogues under /usr/share/locale")
    data = catalogue_texts(per_language=60)
    lid = LanguageIdentifier()
    for lang in ("en", "ja", "zh", "th", "ru", "de", "ko"):
        predicted = lid(data[lang])
        accuracy = np.mean([p == lang for p in predicted])
        assert accuracy > 0.75, (lang, accuracy)


@needs_lid
def test_language_id_edge_cases():
    from mode_fast.curation.worldwide import LanguageIdentifier

    lid = LanguageIdentifier()
    assert lid(["", " \u3000\n"]) == ["", ""]
    assert lid(["東京タワーの夜景\ud800です"]) == ["ja"]  # a lone surrogate does not stop it


# --- per-language matchers -----------------------------------------------------------------


def test_language_matchers_route_and_use_global_ids(tmp_path):
    from matching_reference import naive_match_v2

    from mode_fast.curation.worldwide import LanguageMatchers

    meta = {"en": ["dog", "hot dog", "Tokyo"], "ja": ["東京", "タワー", "dog"], "th": ["ไทย"]}
    lm = LanguageMatchers(meta)
    assert lm.languages == ["en", "ja", "th"] and lm.bases == {"en": 0, "ja": 3, "th": 6} and lm.total == 7
    captions = ["hot dog in Tokyo", "東京タワーとdog", "ภาษาไทย", "東京", "dog", "hot dog", "\ud800 東京"]
    langs = ["en", "ja", "th", "en", "fr", "", "ja"]
    lm.save(tmp_path / "m")
    assert LanguageMatchers.complete(tmp_path / "m")
    for matchers in (lm, LanguageMatchers.load(tmp_path / "m")):
        offsets, ids = matchers.match(captions, langs, threads=1)
        for i, (caption, lang) in enumerate(zip(captions, langs)):
            expected = [lm.bases[lang] + j for j in naive_match_v2(meta[lang], caption)] if lang in meta else []
            assert ids[offsets[i] : offsets[i + 1]].tolist() == expected, caption
    counts = np.arange(7, dtype=np.uint64)
    assert [c.tolist() for c in lm.counts_by_language(counts).values()] == [[0, 1, 2], [3, 4, 5], [6]]


def test_matchers_saved_in_an_older_file_format_are_built_again(tmp_path):
    # Curate keeps the built matchers under .work/ between runs; a folder from a layout this
    # build cannot read (here: the name it had before FILE_FORMAT, holding unreadable files)
    # must be left alone and a new one built, never loaded.
    from mode_fast import __version__
    from mode_fast._matcher import FILE_FORMAT
    from mode_fast.curation.shards import build_matcher
    from mode_fast.curation.worldwide import LanguageMatchers

    meta = {"en": ["hot dog"], "ja": ["東京"]}
    sha = "0123456789abcdef" * 4
    stale = tmp_path / f"matchers-metaclip2-{__version__}-{sha[:16]}"
    stale.mkdir()
    (stale / "en.bin").write_bytes(b"MFMATCH2" + bytes(64))
    (stale / "languages.json").write_text('{"languages": ["en"]}')
    folder = build_matcher(tmp_path, [], sha, meta)
    assert folder != stale and f"-f{FILE_FORMAT}-" in folder.name
    offsets, ids = LanguageMatchers.load(folder).match(["東京タワー", "a hot dog"], ["ja", "en"], threads=1)
    assert ids.tolist() == [1, 0] and offsets.tolist() == [0, 1, 2]
    assert build_matcher(tmp_path, [], sha, meta) == folder  # complete: reused as it is


def test_lone_surrogate_caption_recovered_from_jsonl_only(tmp_path):
    from mode_fast.data.io import lone_surrogate_caption, read_shard

    shard = tmp_path / "a.jsonl"
    shard.write_text(
        '{"key": "k1", "caption": "\\ud800 東京 dog"}\n'
        '{"key": "k2", "caption": "fine"}\n'
        '{"key": "\\udfff", "caption": "bad key"}\n',
        encoding="utf-8",
    )
    records = list(read_shard(shard, "caption", None))
    assert [r.skip_reason for r in records] == ["invalid_utf8", None, "invalid_utf8"]
    assert [lone_surrogate_caption(r, "caption", shard) for r in records] == ["\ud800 東京 dog", None, None]
