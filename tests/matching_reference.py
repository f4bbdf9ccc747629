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
