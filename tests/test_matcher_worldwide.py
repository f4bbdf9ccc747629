"""metaclip2 matching (MetaCLIP 2's worldwide rules) against a plain-Python transcription."""

from __future__ import annotations

import pickle
import random
import string
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from matching_reference import (
    CJK_OR_SIMILAR_RANGES,
    FULL_WIDTH_PUNCTUATION,
    is_cjk_or_similar_v2,
    naive_match,
    naive_match_v2,
    spaced_entry_v2,
    spacing,
)

from mode_fast._matcher import Matcher, is_cjk_or_similar

# Every code point Python's str.strip() removes.
PY_SPACES = [chr(c) for c in range(0x110000) if chr(c).isspace()]

ENTRIES = [
    "東京",
    "東京 タワー",
    "タワー",
    "京",
    "東",
    "日本語",
    "中文",
    "ไทย",
    "ภาษาไทย",
    "ລາວ",
    "မြန်မာ",
    "ខ្មែរ",
    "བོད",
    "hot",
    "dog",
    "hot dog",
    "a",
    "Inc.",
    "U.S.",
    "e.g.",
    "(a)",
    "C++",
    "#1",
    "-",
    "--",
    "...",
    ",",
    ".",
    "?!",
    "。",
    "，",
    "「東京」",
    "東京。",
    "—",
    "～",
    "“quoted”",
    "‘x’",
    "【新】",
    "《书》",
    "〈a〉",
    "café",
    "naïve",
    " leading",
    "trailing ",
    "double  space",
    "tab\there",
    "x\u3000y",
    "😀",
    "東京 ",
    " 東京",
    "Ａ",
    "ｘ東",
    "東x",
    "x東",
    "0",
    "1,000",
    "π",
    "𠀀",
    "𪜀字",  # CJK extension B / C
    "\u3000",
    ":",
    "`",
    "!",
    "dog stand",
    "stand",
]

TEXTS = [
    "東京タワー",
    "東京 タワー",
    "東京\tタワー",
    "東京\u3000タワー",
    "　東京　",
    "\u3000\u3000",
    "ไทยภาษาไทย",
    "ภาษาไทยดี",
    "ລາວ ແລະ ໄທ",
    "မြန်မာစာ",
    "ខ្មែរ",
    "བོད་ཡིག",
    "hot dog",
    "  hot dog  ",
    "\u2003hot dog\u2028",
    "\x1chot dog\x1f",
    "\x0bhot\x0cdog\x85",
    "\xa0hot dog\xa0",
    "\u1680hot\u205fdog\u202f",
    "\u2029a\u3000",
    "a hot dog stand",
    "hotdog",
    "Acme Inc.",
    "Acme Inc. Ltd",
    "the U.S. army",
    "(a)(b)",
    "(a) b",
    "C++ code",
    "#1 hit",
    "a-b",
    "a--b",
    "wait...",
    "a,b",
    "a , b",
    "?!",
    "東京。東京，東京",
    "「東京」です",
    "東京。",
    "x—y",
    "x～y",
    "“quoted” text",
    "‘x’",
    "【新】品",
    "《书》名",
    "〈a〉",
    "café naïve",
    "cafe\u0301",
    "x leading",
    "trailing  x",
    "double  space",
    "tab\there",
    "x\u3000y",
    "😀😀",
    "ｘ東ｘ",
    "東x東",
    "x東x",
    "1,000",
    "π=3",
    "𠀀𪜀字",
    "\t\n\r",
    "",
    " ",
    ":`!",
    "a\ud800 dog",
    "\ud800東京\udfff",
    "\udc00",
    "hot\ud83d dog",
    "dog stand",
    "ＡＢＣ",
    "mixed 東京 and ไทย and hot dog。",
]


@pytest.fixture(scope="module")
def matcher() -> Matcher:
    return Matcher(ENTRIES, semantics="metaclip2")


@pytest.mark.parametrize("text", TEXTS)
def test_metaclip2_equals_reference(matcher: Matcher, text: str) -> None:
    assert matcher.match(text) == naive_match_v2(ENTRIES, text)


def test_metaclip2_batch_equals_single(matcher: Matcher) -> None:
    texts = TEXTS * 50
    for threads in (1, 2):
        offsets, ids = matcher.match_batch(texts, threads=threads)
        for i, text in enumerate(texts):
            assert ids[offsets[i] : offsets[i + 1]].tolist() == naive_match_v2(ENTRIES, text)


def test_documented_differences() -> None:
    m1, m2 = Matcher(["東京"]), Matcher(["東京"], semantics="metaclip2")
    assert m1.match("東京タワー") == [] and m2.match("東京タワー") == [0]
    # Stripping: the ideographic space is not a tab/newline, so only metaclip2 sees the word.
    assert Matcher(["dog"]).match("\u3000dog") == []
    assert Matcher(["dog"], semantics="metaclip2").match("\u3000dog") == [0]
    # A lone surrogate: metaclip1 refuses the text, metaclip2 matches the rest of it.
    with pytest.raises(ValueError, match="surrogate"):
        m1.match("東京 \ud800")
    assert m2.match("東京\ud800") == [0]
    assert Matcher(["dog"], semantics="metaclip2").match_batch(["\ud800 dog", "dog"])[1].tolist() == [0, 0]


def test_default_is_metaclip1_and_unchanged() -> None:
    m = Matcher(ENTRIES)
    assert m.semantics == "metaclip1"
    for text in TEXTS:
        if "\ud800" in text or any(0xD800 <= ord(c) <= 0xDFFF for c in text):
            continue
        assert m.match(text) == naive_match(ENTRIES, text)


def test_unknown_semantics() -> None:
    with pytest.raises(ValueError, match="metaclip1' or 'metaclip2"):
        Matcher(["a"], semantics="metaclip3")


def test_empty_entry_rejected_in_metaclip2() -> None:
    with pytest.raises(ValueError, match="empty"):
        Matcher(["a", ""], semantics="metaclip2")


def test_cjk_rule_matches_reference() -> None:
    # Every code point in and around each range, every punctuation mark, some others.
    probes = set(map(ord, string.punctuation)) | set(map(ord, FULL_WIDTH_PUNCTUATION))
    for lo, hi in CJK_OR_SIMILAR_RANGES:
        probes |= {lo - 1, lo, lo + 1, hi - 1, hi, hi + 1}
    probes |= set(range(0, 0x3100)) | {0xFF01, 0xFF0C, 0xFF5E, 0xFF5F, 0x1F600, 0x10FFFF}
    for cp in sorted(probes):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        assert is_cjk_or_similar(cp) == is_cjk_or_similar_v2(chr(cp)), hex(cp)


def test_save_load_and_pickle_keep_semantics(matcher: Matcher, tmp_path) -> None:
    path = tmp_path / "m2.bin"
    matcher.save(path)
    loaded = Matcher.load(str(path))
    assert loaded.semantics == "metaclip2"
    assert pickle.loads(pickle.dumps(matcher)).semantics == "metaclip2"
    for text in TEXTS:
        assert loaded.match(text) == matcher.match(text)
    # metaclip1 files keep their old layout (magic MFMATCH1).
    Matcher(["a"]).save(tmp_path / "m1.bin")
    assert (tmp_path / "m1.bin").read_bytes()[:8] == b"MFMATCH1"
    assert path.read_bytes()[:8] == b"MFMATC2D"
    # The hash-table layout of before (MFMATCH2) is refused by name, not misread.
    (tmp_path / "old.bin").write_bytes(b"MFMATCH2" + path.read_bytes()[8:])
    with pytest.raises(RuntimeError, match="older mode-fast"):
        Matcher.load(str(tmp_path / "old.bin"))


def test_truncated_metaclip2_file(matcher: Matcher, tmp_path) -> None:
    path = tmp_path / "m2.bin"
    matcher.save(path)
    blob = path.read_bytes()
    for cut in (len(blob) - 1, len(blob) - 9, len(blob) // 2):
        (tmp_path / "cut.bin").write_bytes(blob[:cut])
        with pytest.raises(RuntimeError):
            Matcher.load(str(tmp_path / "cut.bin"))


# --- property tests: random text over an adversarial alphabet -----------------------------

ALPHABET = (
    list("ab 東京タワー中ไทยລາວမြខ្བོ.,;:?!`()\"'-#，。、；：？！“”‘’（）【】《》〈〉「」『』～—Ａ😀𠀀") + PY_SPACES
)
SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff"]

entry_st = st.text(alphabet=st.sampled_from(ALPHABET), min_size=1, max_size=4)
text_st = st.text(alphabet=st.sampled_from(ALPHABET + SURROGATES), max_size=40)


@settings(max_examples=300, deadline=None)
@given(entries=st.lists(entry_st, min_size=1, max_size=12), texts=st.lists(text_st, min_size=1, max_size=8))
def test_metaclip2_property(entries: list[str], texts: list[str]) -> None:
    m = Matcher(entries, semantics="metaclip2")
    offsets, ids = m.match_batch(texts, threads=1)
    for i, text in enumerate(texts):
        expected = naive_match_v2(entries, text)
        assert m.match(text) == expected
        assert ids[offsets[i] : offsets[i + 1]].tolist() == expected


@settings(max_examples=100, deadline=None)
@given(entries=st.lists(entry_st, min_size=1, max_size=12), texts=st.lists(text_st, min_size=1, max_size=4))
def test_metaclip2_property_after_load(entries: list[str], texts: list[str]) -> None:
    m = pickle.loads(pickle.dumps(Matcher(entries, semantics="metaclip2")))
    for text in texts:
        assert m.match(text) == naive_match_v2(entries, text)


# Latin-script entries with an unpadded punctuation edge over ASCII-heavy text: this drives
# the automaton's fast path (the root and its space child, bytes that lead back to either)
# in and out, around spacing-rule bytes, apostrophes and the odd non-ASCII character.
LATIN = list("abm A'\"-.,;:!?`()\t\n\r") + ["é", "東", "\u3000"]
latin_entry_st = st.text(alphabet=st.sampled_from(LATIN), min_size=1, max_size=6)
latin_text_st = st.text(alphabet=st.sampled_from(LATIN), max_size=60)
LATIN_FIXED = ["'s", "April Fools'", "maitre d'", "'tween decks", "hot dog", "a", "(a)", "m-"]


@settings(max_examples=300, deadline=None)
@given(entries=st.lists(latin_entry_st, max_size=12), texts=st.lists(latin_text_st, min_size=1, max_size=8))
def test_metaclip2_property_latin(entries: list[str], texts: list[str]) -> None:
    entries = LATIN_FIXED + entries
    m = Matcher(entries, semantics="metaclip2")
    loaded = pickle.loads(pickle.dumps(m))
    offsets, ids = m.match_batch(texts, threads=1)
    for i, text in enumerate(texts):
        expected = naive_match_v2(entries, text)
        assert m.match(text) == expected
        assert loaded.match(text) == expected
        assert ids[offsets[i] : offsets[i + 1]].tolist() == expected


# A damaged file must be refused on load or, where the damage is in data no check can
# tell from real data (an entry's bytes, a report id still in range), load and match
# without crashing or hanging. Run in a child process: a crash there fails this test
# with its signal instead of taking pytest down.
_FUZZ_CHILD = r"""
import random, sys
from mode_fast._matcher import Matcher
entries, texts, path, out = eval(sys.stdin.read())
Matcher(entries, semantics="metaclip2").save(path)
blob = open(path, "rb").read()
rng = random.Random(7)
refused = loaded = 0
for i in range(300):
    data = bytearray(blob)
    for _ in range(rng.randint(1, 4)):  # flip bytes between the magic header and trailer
        at = rng.randrange(8, len(data) - 8)
        data[at] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
    open(out, "wb").write(bytes(data))
    try:
        m = Matcher.load(out)
    except RuntimeError:
        refused += 1
        continue
    loaded += 1
    for t in texts:
        m.match(t)
print(refused, loaded)
"""


def test_damaged_metaclip2_files_are_refused_or_harmless(tmp_path) -> None:
    entries = ENTRIES + ["東京タワー", "京タ", "ワー", "日本", "本語", "語", "𠀀", "😀x", "x😀"]
    texts = TEXTS + ["東京タワーと日本語の本", "x😀 東京 𠀀 語", "ภาษาไทย ລາວ"]
    payload = repr((entries, texts, str(tmp_path / "m.bin"), str(tmp_path / "d.bin")))
    done = subprocess.run(
        [sys.executable, "-c", _FUZZ_CHILD], input=payload, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    refused, loaded = map(int, done.stdout.split())
    assert refused + loaded == 300 and refused > 100  # most damage is caught on load


@pytest.mark.parametrize("n_found", [5, 40, 400])
def test_many_automaton_ids_in_one_text(n_found: int) -> None:
    # 70,000 two-character CJK entries (ids past 65,535), a text made of n_found of them
    # run together: matches at every boundary too, overlapping, some repeated.
    entries = [chr(0x4E00 + i // 300) + chr(0x4E00 + i % 300) for i in range(70_000)]
    rng = random.Random(n_found)
    text = "".join(rng.choice(entries) for _ in range(n_found))
    text += text[: len(text) // 3]
    m = Matcher(entries, semantics="metaclip2")
    spaced = spacing(text.strip())
    expected = [i for i, e in enumerate(entries) if spaced_entry_v2(e) in spaced]
    assert len(expected) >= n_found // 2
    assert m.match(text) == expected
    offsets, ids = m.match_batch(["中", text])
    assert ids[offsets[1] : offsets[2]].tolist() == expected
