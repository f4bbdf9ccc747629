"""Independent references for MetaCLIP matching, written straight from curation.md.

Used by the matcher tests and benchmarks; deliberately plain so they are easy to trust.
"""

from __future__ import annotations

from collections.abc import Sequence

PUNCTS_TO_WRAP = [",", ".", ";", ":", "?", "!", "`"]
CHARS_TO_SPACE = ["\t", "\n", "\r"]


def spacing(text: str) -> str:
    spaced = f" {text} "
    for p in PUNCTS_TO_WRAP:
        spaced = spaced.replace(p, f" {p} ")
    for c in CHARS_TO_SPACE:
        spaced = spaced.replace(c, " ")
    return spaced


def naive_match(entries: Sequence[str], text: str) -> list[int]:
    spaced = spacing(text)
    return [i for i, e in enumerate(entries) if f" {e} " in spaced]


class AhoCorasickMatcher:
    """pyahocorasick over the space-padded entries: the peer users run today."""

    def __init__(self, entries: Sequence[str]) -> None:
        import ahocorasick

        self.automaton = ahocorasick.Automaton()
        for i, e in enumerate(entries):
            key = f" {e} "
            ids = self.automaton.get(key, None)
            if ids is None:
                self.automaton.add_word(key, [i])
            else:
                ids.append(i)
        self.automaton.make_automaton()

    def match(self, text: str) -> list[int]:
        found: set[int] = set()
        for _, ids in self.automaton.iter(spacing(text)):
            found.update(ids)
        return sorted(found)


# --- MetaCLIP 2 (worldwide), transcribed from metaclip/curation/substr_matching.py and
# curate.py (facebookresearch/MetaCLIP): plain Python over code points.

import string  # noqa: E402

FULL_WIDTH_PUNCTUATION = set("，。、；：？！“”‘’（）【】《》〈〉「」『』～—")

CJK_OR_SIMILAR_RANGES = [
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0x2CEB0, 0x2EBEF),
    (0xF900, 0xFAFF),
    (0x2E80, 0x2EFF),
    (0x2F00, 0x2FDF),
    (0x2FF0, 0x2FFF),
    (0x0E00, 0x0E7F),  # Thai
    (0x0E80, 0x0EFF),  # Lao
    (0x1000, 0x109F),  # Burmese
    (0x1780, 0x17FF),  # Khmer
    (0x0F00, 0x0FFF),  # Tibetan
]


def is_cjk_or_similar_v2(char: str) -> bool:
    cp = ord(char)
    if any(lo <= cp <= hi for lo, hi in CJK_OR_SIMILAR_RANGES):
        return True
    return char in string.punctuation or char in FULL_WIDTH_PUNCTUATION


def spaced_entry_v2(entry: str) -> str:
    spaced = entry
    if not is_cjk_or_similar_v2(spaced[0]):
        spaced = f" {spaced}"
    if not is_cjk_or_similar_v2(spaced[-1]):
        spaced = f"{spaced} "
    return spaced


def naive_match_v2(entries: Sequence[str], text: str) -> list[int]:
    """MetaCLIP 2: the caption is stripped (curate.py), spaced as in MetaCLIP 1, and
    each entry, padded per side unless that edge is CJK-like, is a substring test."""
    spaced = spacing(text.strip())
    return [i for i, e in enumerate(entries) if spaced_entry_v2(e) in spaced]


# MetaCLIP 2's balancing (metaclip/curation/curate.py), transcribed as written.
def t_to_p_reference(entry_counts, t):
    return float(entry_counts[entry_counts < t].sum() / entry_counts.sum())


def p_to_t_reference(entry_counts, p):
    import numpy as np

    counts = np.sort(entry_counts)
    cumsum_counts = np.cumsum(counts)
    portion = cumsum_counts / counts.sum()
    p_idx = (np.abs(portion - p)).argmin()
    return counts[p_idx]


def count_to_prob_reference(entry_count, t):
    import numpy as np

    p_entry_counts = np.array(entry_count)
    p_entry_counts[p_entry_counts < t] = t
    return t / p_entry_counts
