"""Bounded memory per record: a long caption is matched (and tokenized for training) with
memory and time in proportion to what is kept, not to its length times a large factor.

The matcher works through a long text in chunks (csrc/matcher.cpp, kMatchChunkBytes): the
chunked walk must find exactly what the plain references find, across chunk ends too.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from matching_reference import naive_match, naive_match_v2

from mode_fast._matcher import Matcher
from mode_fast.curation.balance import key_hashes, record_scores

CHUNK = 1 << 14  # kMatchChunkBytes in csrc/matcher.h
MB20 = 20 * 1024 * 1024


def _words_text(rng: random.Random, words: list[str], size: int) -> str:
    parts, n = [], 0
    while n < size:
        w = rng.choice(words)
        parts.append(w)
        n += len(w) + 1
    return " ".join(parts)


SEPARATORS = set(b" \t\n\r,.;:?!`")  # bytes that end a token (the spacing rule)


def _chunk_ends(data: bytes) -> list[int]:
    """Where the matcher cuts a text into chunks (match_tokens in csrc/matcher.cpp): just
    after the first separator at or past CHUNK - 1 bytes into the chunk."""
    ends, begin = [], 0
    while len(data) - begin > CHUNK:
        j = begin + CHUNK - 1
        while j < len(data) and data[j] not in SEPARATORS:
            j += 1
        if j == len(data):
            break
        ends.append(j + 1)
        begin = j + 1
    return ends


def _across_chunk_ends(text: str, phrase: str) -> str:
    """text (ASCII) with `phrase` written over it across every chunk end."""
    ends: list[int] = []
    while True:
        cut = next((e for e in _chunk_ends(text.encode()) if e > (ends[-1] if ends else 0)), None)
        if cut is None:
            return text
        start = cut - len(phrase) // 2 - 1
        text = text[:start] + " " + phrase + " " + text[start + len(phrase) + 2 :]
        ends.append(cut)


ENTRIES = [
    "dog",
    "cat",
    "hot dog",
    "hot dog stand",
    "red car on the road",
    "a b",
    "b c d",
    "zq1 zq2 zq3 zq4",
    "sky",
    "café",
]
WORDS = [
    "dog",
    "cat",
    "hot",
    "stand",
    "red",
    "car",
    "on",
    "the",
    "road",
    "a",
    "b",
    "c",
    "d",
    "sky",
    "x",
]  # ASCII: bytes are characters


@pytest.mark.parametrize("semantics", ["metaclip1", "metaclip2"])
def test_long_text_matches_the_reference_across_chunk_ends(semantics: str) -> None:
    rng = random.Random(0)
    reference = naive_match if semantics == "metaclip1" else naive_match_v2
    m = Matcher(ENTRIES, semantics)
    text = _words_text(rng, WORDS, 6 * CHUNK)
    # A four-word entry (found nowhere else) across every chunk end.
    text = _across_chunk_ends(text, "zq1 zq2 zq3 zq4")
    ends = _chunk_ends(text.encode())
    starts = [i for i in range(len(text)) if text.startswith("zq1 zq2 zq3 zq4", i)]
    assert len(starts) == len(ends) >= 5 and all(s < e < s + 15 for s, e in zip(starts, ends))
    assert m.match(text) == reference(ENTRIES, text)
    # Only the straddling entry: found although every occurrence crosses a chunk end.
    assert Matcher(["zq1 zq2 zq3 zq4"], semantics).match(text) == [0]
    assert Matcher(["zq2 zq3 zq4"], semantics).match(text) == [0]
    # Punctuation and whitespace runs at a chunk end.
    text = _across_chunk_ends(text.replace("zq1 zq2 zq3 zq4", "x x x x x x x"), "hot dog,\t\tstand")
    assert m.match(text) == reference(ENTRIES, text)
    assert Matcher(["dog , stand", "dog ,"], semantics).match(text) == reference(["dog , stand", "dog ,"], text) == [1]


def test_a_walk_longer_than_a_chunk_is_followed_to_its_end() -> None:
    # An entry of 40,002 tokens (a whitespace run): its trie walk spans three chunks.
    entry = "a" + " " * 40_000 + "b"
    m = Matcher([entry, "a", "b", "c"])
    assert m.match("x " + entry + " y") == [0, 1, 2]
    assert m.match("x " + entry[:-1] + "c y") == [1, 3]  # one token short at the far end
    assert m.match("x " + entry + "b y") == [1]


def test_many_occurrences_are_deduplicated_on_the_way() -> None:
    # Far more occurrences than the ids kept between chunks (deduplicated as they pile up).
    text = "a b c d, " * 200_000
    m = Matcher(ENTRIES)
    assert m.match(text) == naive_match(ENTRIES, text)
    offsets, ids = m.match_batch(["dog", text, "cat"], threads=1)
    assert offsets.tolist() == [0, 1, 3, 4] and ids.tolist() == [0, 5, 6, 1]


def test_long_cjk_text_matches_the_reference_automaton() -> None:
    rng = random.Random(1)
    chars = "猫狗在上面的一只日本語ภาษาไทย"
    entries = ["猫狗", "日本語", "ภาษา", "一只猫", "在上面", "dog"]
    text = "".join(rng.choice(chars) for _ in range(3 * CHUNK // 2))  # 3-byte characters
    text += " dog " + "".join(rng.choice(chars) for _ in range(CHUNK))
    m = Matcher(entries, "metaclip2")
    assert m.match(text) == naive_match_v2(entries, text)
    assert len(m.match(text)) >= 4


_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, random, sys
    from mode_fast._matcher import Matcher
    from mode_fast.curation.metadata import load_metadata

    def rss(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024

    kind, semantics, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    entries = load_metadata(None)
    m = Matcher(entries, semantics)
    rng = random.Random(0)
    if kind == "words":
        words = [e for e in entries[:5000] if " " not in e]
        parts, n = [], 0
        while n < size:
            parts.append(rng.choice(words))
            n += len(parts[-1]) + 1
        text = " ".join(parts)
    else:  # three-byte characters, no spaces: one long run
        text = "猫が座っている。" * (size // 24 + 1)
    m.match_batch(["a photo of a cat"] * 100, threads=1)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from here
    base = rss("VmRSS")
    offsets, ids = m.match_batch([text, "a cat"], threads=1)
    print(json.dumps({"growth": rss("VmHWM") - base, "bytes": len(text.encode()), "ids": int(offsets[1])}))
    """
)


@pytest.mark.parametrize(("kind", "semantics"), [("words", "metaclip1"), ("words", "metaclip2"), ("cjk", "metaclip2")])
def test_peak_memory_of_matching_a_20mb_caption(kind: str, semantics: str) -> None:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to reset the peak RSS")
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, kind, semantics, str(MB20)], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout)
    assert result["bytes"] >= MB20
    if kind == "words":
        assert result["ids"] > 100  # it really matched
    # What the matcher keeps is a chunk's tokens and the distinct ids; the rest is
    # Python's UTF-8 copy of a non-ASCII str (measured: under 0.1 MB for the ASCII
    # caption, 2 bytes per byte for the CJK one; it was 56 bytes per byte).
    assert result["growth"] < 4 * result["bytes"], result


def _kept_by_reference(records: list[tuple[str, str]], entries: list[str], t: float, seed: int) -> set[str]:
    """curate's rule (mode_fast.curation.balance) on the plain-Python reference's matches."""
    matches = [naive_match(entries, caption) for _, caption in records]
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in matches])]).astype(np.int64)
    ids = np.array([i for x in matches for i in x], dtype=np.int32)
    counts = np.bincount(ids, minlength=len(entries)).astype(np.uint64)
    scores = record_scores(key_hashes([k for k, _ in records]), offsets, ids, counts, seed=seed)
    return {k for (k, _), s in zip(records, scores) if s < t}


def test_curate_with_a_20mb_caption_keeps_what_the_reference_keeps(tmp_path, metadata_file, make_pool) -> None:
    from mode_fast.curation.run import CurateConfig, run_curation

    entries = ["dog", "cat", "hot dog", "red car", "sky", "sea"]
    rng = random.Random(3)
    words = ["dog", "cat", "hot", "red", "car", "sky", "sea", "a", "the"]
    records = [(f"u{i:04d}", " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))) for i in range(300)]
    records[150] = ("u0150", _words_text(rng, words, MB20))
    make_pool(tmp_path / "pool", [{"uid": k, "caption": c} for k, c in records], 2)
    out = tmp_path / "out"
    summary = run_curation(
        CurateConfig(pools=(str(tmp_path / "pool"),), out=out, metadata=metadata_file(entries), t=20, seed=5, workers=1)
    )
    kept = set((out / "kept_keys.txt").read_text().split())
    assert kept == _kept_by_reference(records, entries, 20, 5)
    assert 0 < summary["kept"] < summary["matched"]


# --- the bounded tokenizer (mode_fast.training.models.get_tokenizer) -------------------------------------


def _captions() -> list[str]:
    """Ordinary and adversarial captions, many long enough to be cut."""
    rng = random.Random(7)
    words = ["a", "photo", "of", "the", "cat", "sitting", "on", "mat", "near", "window", "sunlit", "room"]
    english = _words_text(rng, words, 20_000)
    entity = "ab &amp;amp;lt; x&#39;s &quot;q&quot; "
    caps = [
        "",
        "a photo of a cat",
        "  A  Photo\tof a\nCAT!!  ",
        english,
        english[:1200],
        english[:600] + "\n" + english[600:1800],
        english.replace(" ", "\r\n", 200),
        # whitespace runs, blank lines, leading whitespace: the cut must grow past them
        "a" + " " * 3000 + english[:3000],
        " \t\n" * 2000 + english[:2000],
        english[:400] + "\n  \t\n\n   \n" * 500 + english[:2000],
        "word " * 3 + " " * 5000 + "more " * 300,
        # characters that count towards the cut but make no token (other whitespace,
        # control characters ftfy removes): the cut must grow
        *[c * 3000 + english[:3000] for c in ("\r", "\u00a0", "\u3000", "\x01", "\r\n")],
        # HTML entities everywhere, so some straddle every cut
        *[(entity * 300)[s:] for s in range(0, 40, 3)],
        "&amp;amp;amp; " * 400 + "<b>",  # a "<" only after the cut: ftfy skips unescaping
        "&amp;amp;amp; " * 400 + "\n<b>",  # ... in the next line: it does not
        "&NTILDE; &amp;amp; " * 300 + "x < y",
        # non-Latin scripts, combining marks, final sigma, full width, ligatures, quotes
        "Кошка сидит на коврике у окна " * 80,
        "ΟΔΟΣ ΚΑΙ ΣΠΙΤΙΑ ΣΤΗΝ ΠΟΛΗ " * 80,
        "قطة تجلس على السجادة " * 100,
        "बिल्ली खिड़की के पास बैठी है " * 100,
        "e\u0301 a\u0308\u0301 " * 500,
        "猫 が 座って いる 日本語 の 文章 " * 150,
        "ＬＯＵＤ　ＮＯＩＳＥＳ ﬂubberiﬁc “quoted” it’s " * 80,
        "🐱 on a mat 🧶 " * 300,
        "x" * 40 + " " + "y, " * 2000,
    ]
    return caps


@pytest.fixture(scope="module", params=["ViT-B-32", "mode-fast-tiny"])
def tokenizers(request):
    import open_clip

    from mode_fast.training.models import BoundedTokenizer, get_tokenizer, register_model_configs

    register_model_configs()
    bounded = get_tokenizer(request.param)
    assert isinstance(bounded, BoundedTokenizer) and bounded.exact
    return open_clip.get_tokenizer(request.param), bounded


def test_bounded_tokenizer_gives_open_clips_ids(tokenizers) -> None:
    reference, bounded = tokenizers
    captions = _captions()
    expected = reference(captions)
    got = bounded(captions)
    for caption, want, have in zip(captions, expected, got):
        assert have.tolist() == want.tolist(), caption[:80]
    # Most of them really were cut (else this tested nothing).
    cut = [c for c in captions if bounded.bounded(c, bounded.context_length) != c]
    assert len(cut) > len(captions) // 2
    assert bounded.bounded("&amp;amp;amp; " * 400 + "<b>", bounded.context_length).endswith(" <")
    assert bounded("a photo").tolist() == reference("a photo").tolist()  # a str, as open_clip takes


def test_bounded_tokenizer_on_a_20mb_caption(tokenizers) -> None:
    import time

    reference, bounded = tokenizers
    rng = random.Random(2)
    words = ["a", "photo", "of", "the", "cat", "sitting", "on", "mat", "near", "window"]
    caption = _words_text(rng, words, MB20)
    start = time.perf_counter()
    ids = bounded([caption])
    took = time.perf_counter() - start
    assert took < 1.0, took  # measured: 2 ms (open_clip: 10 s and 345 MB)
    assert ids.tolist() == reference([caption[:200_000]]).tolist()  # open_clip on a part that fills it too


def test_bounded_tokenizer_pickles_and_delegates(tokenizers) -> None:
    import pickle

    reference, bounded = tokenizers
    again = pickle.loads(pickle.dumps(bounded))  # a DataLoader worker gets a copy
    assert again(["a cat"]).tolist() == reference(["a cat"]).tolist()
    assert again.vocab_size == reference.vocab_size and again.context_length == reference.context_length


def test_training_and_eval_use_the_bounded_tokenizer(tmp_path) -> None:
    from mode_fast.training.checkpoint import load_model, save_checkpoint
    from mode_fast.training.models import BoundedTokenizer, create_model

    built = create_model("mode-fast-tiny")
    assert isinstance(built.tokenizer, BoundedTokenizer)
    state = {"model_name": "mode-fast-tiny", "model_kwargs": built.kwargs, "state_dict": built.model.state_dict()}
    save_checkpoint(tmp_path / "final.pt", state)
    assert isinstance(load_model(tmp_path / "final.pt")[2], BoundedTokenizer)


def test_other_tokenizers_are_cut_once() -> None:
    from mode_fast.training.models import CUT_CHARS_PER_TOKEN, BoundedTokenizer

    class Stub:  # a tokenizer without open_clip's encode (an HF tokenizer, say)
        context_length = 8

        def __call__(self, texts, context_length=None):
            return [len(t) for t in texts]

    bounded = BoundedTokenizer(Stub())
    assert not bounded.exact
    words = 4 * CUT_CHARS_PER_TOKEN * 8 // 4  # that many characters other than whitespace
    assert bounded(["word " * 1000, "a cat"]) == [len("word " * words) - 1, 5]  # cut before a space
