"""The C++ matcher against the naive reference and pyahocorasick (curation.md semantics)."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from matching_reference import AhoCorasickMatcher, naive_match

from mode_fast._matcher import Matcher, hash_keys

ENTRIES = [
    "hot",
    "dog",
    "hot dog",
    "dog stand",
    "stand",
    "hot dog stand",
    "a",
    "new york",
    "new york city",
    "york",
    "york city",
    "city",
    "café",
    "naïve",
    "Dog",
    "e.g.",
    "St. Louis",
    ",",
    ".",
    "1",
    "ice cream",
    "trailing ",
    " leading",
    "double  space",
    "tab\there",
    "😀",
    "東京",
    "東京 タワー",
    "é",  # precomposed; the decomposed "e\u0301" must not match it
]

TRICKY_TEXTS = [
    "a hot dog stand",
    "hot dog",
    "hotdog stand",
    "Hot dog",
    "the dog.",
    "dog,stand",
    "dog, stand",
    "e.g. a hot dog",
    "St. Louis",
    "hot\tdog",
    "hot\ndog\rstand",
    "hot\r\ndog",
    "hot  dog",
    "double  space",
    "double space",
    "tab\there",
    "new york city",
    "new york city york",
    "café naïve",
    "cafe\u0301",
    "😀😀 😀",
    "東京 タワー",
    "",
    " ",
    "  ",
    "1,000",
    "!?;:`",
    "trailing  leading",
    "x trailing  y",
    "ice cream, ice cream.",
    "a" * 300,
]


@pytest.fixture(scope="module")
def matcher() -> Matcher:
    return Matcher(ENTRIES)


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_match_equals_naive_reference(matcher: Matcher, text: str) -> None:
    assert matcher.match(text) == naive_match(ENTRIES, text)


def test_overlapping_matches_all_reported(matcher: Matcher) -> None:
    # Leftmost-longest or non-overlapping modes would lose most of these.
    ids = matcher.match("a hot dog stand")
    names = {ENTRIES[i] for i in ids}
    assert names == {"a", "hot", "dog", "hot dog", "dog stand", "stand", "hot dog stand"}


def test_spacing_rules(matcher: Matcher) -> None:
    name = lambda text: {ENTRIES[i] for i in matcher.match(text)}  # noqa: E731
    assert "dog" in name("the dog.")  # punctuation is split off
    assert "e.g." not in name("e.g. x")  # so entries with punctuation never match
    assert "," in name("1,000")  # but a punctuation entry does
    assert "hot dog" in name("hot\tdog")  # tab becomes one space
    assert "hot dog" not in name("hot\r\ndog")  # CR and LF become two spaces
    assert "hot dog" not in name("hot  dog")  # runs of spaces are kept
    assert "Dog" in name("Dog") and "dog" not in name("Dog")  # case-sensitive
    assert "é" not in name("cafe\u0301 e\u0301")  # no Unicode normalisation


def test_results_sorted_unique(matcher: Matcher) -> None:
    ids = matcher.match("dog dog dog hot dog hot dog")
    assert ids == sorted(set(ids))


@pytest.mark.parametrize("n_found", [3, 32, 33, 64, 65, 300])
@pytest.mark.parametrize("semantics", ["metaclip1", "metaclip2"])
def test_many_ids_in_one_text_sorted_unique(n_found: int, semantics: str) -> None:
    # Both ways of ordering a text's ids (up to 32 by rank, more by radix over as many
    # bytes as the largest id needs: ids past 65,535 here), repeats and a duplicate entry
    # included, against the naive reference.
    rng = random.Random(n_found)
    entries = [f"w{i}" for i in range(70_000)] + ["w7"]
    words = [f"w{rng.randrange(70_000)}" for _ in range(n_found)]
    text = " ".join(words + words[: n_found // 3])
    m = Matcher(entries, semantics=semantics)
    assert m.match(text) == naive_match(entries, text)
    offsets, ids = m.match_batch([text, "w1", text])
    assert ids[offsets[2] : offsets[3]].tolist() == naive_match(entries, text)


def test_duplicate_and_empty_entries_follow_naive_semantics() -> None:
    entries = ["dog", "cat", "dog", "", "dog"]
    m = Matcher(entries)
    for text in ["dog", "a  dog", "", "cat dog", "x"]:
        assert m.match(text) == naive_match(entries, text)
    assert m.match("dog") == [0, 2, 4]


def test_empty_metadata() -> None:
    m = Matcher([])
    assert len(m) == 0
    assert m.match("anything") == []
    offsets, ids = m.match_batch(["a", "b"])
    assert offsets.tolist() == [0, 0, 0] and ids.size == 0


# A small alphabet makes collisions of tokens, spaces and punctuation likely.
ALPHABET = st.sampled_from(list("ab c.,\t\n\r!é東😀") + ["  "])
TEXT = st.lists(ALPHABET, max_size=24).map("".join)


@settings(max_examples=300, deadline=None)
@given(entries=st.lists(TEXT.filter(lambda s: len(s) <= 6), min_size=1, max_size=20), texts=st.lists(TEXT, max_size=8))
def test_fuzz_against_naive(entries: list[str], texts: list[str]) -> None:
    m = Matcher(entries)
    offsets, ids = m.match_batch(texts, threads=2)
    for i, text in enumerate(texts):
        expected = naive_match(entries, text)
        assert m.match(text) == expected
        assert ids[offsets[i] : offsets[i + 1]].tolist() == expected


def _caption_corpus(n_entries: int, n_texts: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 5))) for _ in range(3000)]
    entries = list({" ".join(rng.sample(words, rng.choice([1, 1, 1, 2, 3]))) for _ in range(n_entries)})
    puncts = ["", "", "", ",", ".", "!", "\n"]
    texts = [
        " ".join(rng.choice(words) + rng.choice(puncts) for _ in range(rng.randint(0, 25))) for _ in range(n_texts)
    ]
    return entries, texts


def test_batch_against_pyahocorasick_on_caption_like_text() -> None:
    entries, texts = _caption_corpus(5000, 2000, seed=7)
    m = Matcher(entries)
    ac = AhoCorasickMatcher(entries)
    offsets, ids = m.match_batch(texts, threads=1)
    assert offsets.dtype == np.int64 and ids.dtype == np.int32 and offsets.shape == (len(texts) + 1,)
    matched_texts = 0
    for i, text in enumerate(texts):
        expected = ac.match(text)
        assert ids[offsets[i] : offsets[i + 1]].tolist() == expected
        matched_texts += bool(expected)
    assert matched_texts > len(texts) // 2  # the corpus really exercises matching


@pytest.mark.parametrize("threads", [0, 1, 2, 3, 64])
def test_batch_independent_of_threads(threads: int) -> None:
    entries, texts = _caption_corpus(2000, 5000, seed=3)
    m = Matcher(entries)
    ref_offsets, ref_ids = m.match_batch(texts, threads=1)
    offsets, ids = m.match_batch(texts, threads=threads)
    np.testing.assert_array_equal(offsets, ref_offsets)
    np.testing.assert_array_equal(ids, ref_ids)


def test_batch_accepts_tuple_and_bytes_and_empty() -> None:
    m = Matcher(["dog"])
    offsets, ids = m.match_batch(("dog", b"a dog", ""))
    assert offsets.tolist() == [0, 1, 2, 2] and ids.tolist() == [0, 0]
    offsets, ids = m.match_batch([])
    assert offsets.tolist() == [0] and ids.size == 0


def test_bad_input_errors_name_the_problem() -> None:
    with pytest.raises(TypeError, match="entry at index 1"):
        Matcher(["dog", 3])
    with pytest.raises(TypeError, match="single string"):
        Matcher("dog")
    m = Matcher(["dog"])
    with pytest.raises(TypeError, match="text at index 2"):
        m.match_batch(["a", "b", None])
    with pytest.raises(ValueError, match="text at index 1 .*UTF-8"):
        m.match_batch(["ok", "bad \ud800 surrogate"])
    with pytest.raises(TypeError, match="single string"):
        m.match_batch("dog")


def test_save_load_roundtrip(tmp_path) -> None:
    entries, texts = _caption_corpus(3000, 500, seed=11)
    m = Matcher(entries)
    path = tmp_path / "m.bin"
    m.save(str(path))
    assert not list(tmp_path.glob("*.tmp*"))  # atomic: no temporary left behind
    loaded = Matcher.load(str(path))
    assert loaded.entries == entries and len(loaded) == len(entries)
    for a, b in zip(m.match_batch(texts), loaded.match_batch(texts)):
        np.testing.assert_array_equal(a, b)
    clone = pickle.loads(pickle.dumps(m))
    assert clone.match(texts[0]) == m.match(texts[0])


def test_load_rejects_damaged_files(tmp_path) -> None:
    m = Matcher(["hot", "hot dog"])
    path = tmp_path / "m.bin"
    m.save(str(path))
    data = path.read_bytes()
    (tmp_path / "trunc.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match="trunc.bin: .*truncated"):
        Matcher.load(str(tmp_path / "trunc.bin"))
    (tmp_path / "junk.bin").write_bytes(b"not a matcher at all")
    with pytest.raises(RuntimeError, match="bad magic"):
        Matcher.load(str(tmp_path / "junk.bin"))
    with pytest.raises(RuntimeError, match="cannot open"):
        Matcher.load(str(tmp_path / "missing.bin"))


def test_hash_keys_stable_and_seeded() -> None:
    a = hash_keys(["uid-1", "uid-2", "uid-1"], seed=5)
    assert a.dtype == np.uint64 and a[0] == a[2] and a[0] != a[1]
    assert hash_keys(["uid-1"], seed=6)[0] != a[0]
    # Pinned values: the sampling of a curation depends on them across machines and releases.
    pinned = [12966293858919529006, 600730234650689926, 6897897098618318412]
    assert hash_keys(["", "uid-1", "a longer key of 25 bytes!"], seed=0).tolist() == pinned


def _hash_reference(key: bytes, seed: int) -> int:
    """hash_bytes as specified (matcher.cpp), in plain Python: little-endian words, mix64."""
    mask, mul = (1 << 64) - 1, 0x9E3779B97F4A7C15

    def mix64(x: int) -> int:
        x ^= x >> 31
        x = (x * 0xBF58476D1CE4E5B9) & mask
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    h = mix64((seed + mul * (len(key) + 1)) & mask)
    whole = len(key) // 8 * 8
    for at in range(0, whole, 8):
        h = (mix64(h ^ int.from_bytes(key[at : at + 8], "little")) * mul) & mask
    if len(key) > whole:
        h = mix64(h ^ int.from_bytes(key[whole:], "little") ^ (((len(key) - whole) << 59) & mask))
    return mix64(h)


def test_hash_keys_equal_the_specification_at_every_length() -> None:
    # Every tail length (0..7 bytes past whole words) and a non-ASCII key: the word loads
    # that replaced the byte loop must give the same values (saved matchers depend on them).
    keys = ["abcdefghijklmnopqrstuvwxyz0123456789"[:n] for n in range(37)] + ["東京 tower é😀"]
    for seed in (0, 7):
        expected = [_hash_reference(k.encode(), seed) for k in keys]
        assert hash_keys(keys, seed=seed).tolist() == expected


# Tokens of every length around the 8-byte slot prefix and sharing long prefixes: the
# vocabulary compares the bytes past the first 8 separately.
LONG_TOKEN = st.sampled_from(["aaaaaaaa", "aaaaaaab", "aaaaaaaaa", "aaaaaaaab", "ab", "a" * 17, "a" * 16 + "b", "é東"])
LONG_TEXT = st.lists(st.one_of(LONG_TOKEN, st.sampled_from([" ", "  ", ".", ",", "\n"])), max_size=16).map("".join)


@settings(max_examples=200, deadline=None)
@given(entries=st.lists(LONG_TEXT, min_size=1, max_size=12), texts=st.lists(LONG_TEXT, max_size=8))
def test_fuzz_long_tokens_against_naive(entries: list[str], texts: list[str]) -> None:
    m = Matcher(entries)
    for text in texts:
        assert m.match(text) == naive_match(entries, text)


def test_save_goes_through_the_atomic_writer(tmp_path, monkeypatch) -> None:
    """The matcher file is an output like any other (mode_fast.core.files): the umask's mode,
    not mkstemp's 0600; a failed save names the path and leaves no temporary behind."""
    import os
    import stat

    from mode_fast.core.errors import OutputError
    from mode_fast.core.files import default_file_mode

    m = Matcher(["hot", "hot dog"])
    path = tmp_path / "m.bin"
    m.save(path)  # a PathLike is accepted too
    assert stat.S_IMODE(path.stat().st_mode) == default_file_mode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin"]
    assert Matcher.load(str(path)).entries == ["hot", "hot dog"]

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OutputError, match=r"cannot write .*m2\.bin: no space left on device"):
        m.save(str(tmp_path / "m2.bin"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin"]  # no temporary, no m2.bin
