"""Deterministic benchmark corpus for the matcher: ~500k metadata entries and caption-like text.

Entries: the shipped WordNet list (real lemmas, multi-word included) topped up with
bigrams of its words, the way MetaCLIP's list adds Wikipedia bigrams, to `n_entries`.
Captions: ~100-byte English-like strings with Zipf-distributed words (a few very common,
a long tail), stop words, punctuation and the odd newline, as alt-texts have.
"""

from __future__ import annotations

import itertools
import random

STOP_WORDS = ["a", "the", "of", "with", "and", "in", "on", "for", "to", "at", "by", "from", "is", "this", "my"]
PUNCT = ["", "", "", "", "", "", ",", ".", "!", ":", "\n"]


def _base_words() -> list[str]:
    try:
        from mode_fast.curation.metadata import load_metadata

        return load_metadata(None)
    except Exception:  # the list not built yet: a synthetic vocabulary of the same size
        rng = random.Random(1)
        letters = "abcdefghijklmnopqrstuvwxyz"
        return sorted({"".join(rng.choice(letters) for _ in range(rng.randint(3, 10))) for _ in range(150_000)})


def make_entries(n_entries: int = 500_000, seed: int = 0) -> list[str]:
    base = _base_words()
    entries = list(dict.fromkeys(base))
    seen = set(entries)
    unigrams = [w for w in base if " " not in w]
    rng = random.Random(seed)
    while len(entries) < n_entries:
        bigram = f"{rng.choice(unigrams)} {rng.choice(unigrams)}"
        if bigram not in seen:
            seen.add(bigram)
            entries.append(bigram)
    return entries[:n_entries]


def make_captions(entries: list[str], n_texts: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    unigrams = [e for e in entries if " " not in e]
    rng.shuffle(unigrams)
    # Zipf-like ranks: weight 1/(rank+10) over the vocabulary.
    cum_weights = list(itertools.accumulate(1.0 / (r + 10) for r in range(len(unigrams))))
    out = []
    for _ in range(n_texts):
        words: list[str] = []
        target = rng.randint(40, 170)
        length = 0
        draws = iter(rng.choices(unigrams, cum_weights=cum_weights, k=40))
        while length < target:
            w = rng.choice(STOP_WORDS) if rng.random() < 0.35 else next(draws)
            w += rng.choice(PUNCT)
            words.append(w)
            length += len(w) + 1
        out.append(" ".join(words))
    return out
