"""MetaCLIP 2 ("worldwide") curation pieces: per-language metadata, language ID, thresholds.

Facts from MetaCLIP 2's public code (facebookresearch/MetaCLIP, ``metaclip/curation/``):

- Each caption is routed by its language to that language's metadata list and automaton
  (matching rules: ``Matcher(entries, semantics="metaclip2")``, csrc/matcher.h).
- Counts are kept per language. The English threshold ``t_en`` fixes the tail share
  ``p = t_to_p(counts_en, t_en)`` (the share of all English matches held by entries with
  count < t_en); every other language gets ``t_lang = p_to_t(counts_lang, p)``, the
  sorted-count value whose cumulative share is closest to p (first such on ties).
  An entry's probability is ``t_lang / max(count, t_lang)`` and a caption is kept with
  ``1 - prod(1 - p_entry)`` over its matched entries, as in MetaCLIP 1.

Language ID (MetaCLIP 2 takes it from its crawl) is py3langid here: it ships its model in
the wheel (no download at run time), was the most accurate and by far the fastest of the
candidates measured on real multilingual text (benchmarks/results/cpu/langid.md), and
installs with ``pip install mode-fast[worldwide]``. It reports ISO 639-1 codes (``en``,
``ja``, ``zh``, ...), which name the per-language metadata lists.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mode_fast.core.errors import ConfigError
from mode_fast.curation.balance import head_entries, tail_entries
from mode_fast.curation.metadata import MetadataError, read_metadata_json, validate_metadata

ENGLISH = "en"
UNKNOWN_LANGUAGE = ""  # empty caption: no language to route to
_LANG_CODE = re.compile(r"^[A-Za-z]{2,3}([_-][A-Za-z0-9]{2,8})*$")
_LID_INSTALL_HINT = "language ID needs py3langid: pip install 'mode-fast[worldwide]'"


# --- per-language metadata ------------------------------------------------------------------


def _check_code(code: object, source: str) -> str:
    if not isinstance(code, str) or not _LANG_CODE.match(code):
        raise MetadataError(f"{source}: {code!r} is not a language code (ISO 639 like 'en', 'ja', 'zh')")
    return code


def load_language_metadata(path: str | os.PathLike) -> dict[str, list[str]]:
    """Per-language metadata: a folder of ``<lang>.json[.gz]`` lists, or one JSON object
    mapping language code to list. Each list is validated as a MetaCLIP metadata list
    (errors name the file, the language and the index). Sorted by language code."""
    p = Path(path)
    out: dict[str, list[str]] = {}
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.name.endswith((".json", ".json.gz")))
        if not files:
            raise MetadataError(f"{p}: no <lang>.json metadata lists in this folder")
        for f in files:
            code = _check_code(f.name.removesuffix(".gz").removesuffix(".json"), str(f))
            if code in out:
                raise MetadataError(f"{f}: language {code!r} has both a .json and a .json.gz list")
            out[code] = validate_metadata(read_metadata_json(f), str(f))
    else:
        obj = read_metadata_json(p)
        if not isinstance(obj, dict):
            raise MetadataError(
                f"{p}: expected a folder of <lang>.json lists or a JSON object mapping language to "
                f"list, got a JSON {type(obj).__name__}"
            )
        if not obj:
            raise MetadataError(f"{p}: the object maps no language")
        for code, entries in obj.items():
            _check_code(code, str(p))
            out[code] = validate_metadata(entries, f"{p} [{code}]")
    return dict(sorted(out.items()))


def language_metadata_sha256(metadata: dict[str, list[str]]) -> str:
    """Stable hash of all lists (order within a list fixes its ids)."""
    import hashlib

    blob = json.dumps(metadata, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


# --- language ID ----------------------------------------------------------------------------


class LanguageIdentifier:
    """py3langid over stripped captions; ``""`` for a caption with no text. Lone
    surrogates are replaced for identification only (the model reads UTF-8)."""

    def __init__(self) -> None:
        try:
            import py3langid
        except ImportError as exc:
            raise ConfigError(_LID_INSTALL_HINT) from exc
        self._classify = py3langid.classify

    def __call__(self, texts: Sequence[str]) -> list[str]:
        out = []
        for text in texts:
            text = text.strip()
            if not text:
                out.append(UNKNOWN_LANGUAGE)
                continue
            if not text.isascii():
                text = text.encode("utf-8", "replace").decode("utf-8")
            out.append(self._classify(text)[0])
        return out


def lid_version() -> str:
    """Names the language-ID model in the match config: another version re-matches."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"py3langid {version('py3langid')}"
    except PackageNotFoundError:
        return "py3langid"


def lid_available() -> bool:
    try:
        import py3langid  # noqa: F401
    except ImportError:
        return False
    return True


# --- thresholds (MetaCLIP 2's t_to_p / p_to_t) ---------------------------------------------------


def t_to_p(counts: np.ndarray, t: float) -> float:
    """Share of all matches held by entries with count < t (MetaCLIP 2's t_to_p)."""
    counts = np.asarray(counts)
    total = counts.sum()
    if total == 0:
        raise ConfigError("t_to_p: the English counts are all zero")
    return float(counts[counts < t].sum() / total)


def p_to_t(counts: np.ndarray, p: float) -> float:
    """The sorted count at which the cumulative share is closest to p, first on ties
    (MetaCLIP 2's p_to_t). A language with no matches gets its smallest count (0)."""
    counts = np.sort(np.asarray(counts))
    if counts.size == 0:
        return 0.0
    total = counts.sum()
    if total == 0:
        return float(counts[0])
    portion = np.cumsum(counts) / total
    return float(counts[int(np.abs(portion - p).argmin())])


def language_thresholds(counts: dict[str, np.ndarray], t_en: float) -> dict[str, float]:
    """t per language: t_en for English, p_to_t(counts, t_to_p(English counts, t_en)) else."""
    if ENGLISH not in counts or np.asarray(counts[ENGLISH]).sum() == 0:
        raise ConfigError(
            "metaclip2 balancing derives every language's t from English (--t is the English "
            "threshold), but no caption matched English metadata: give an en list and English captions"
        )
    p = t_to_p(counts[ENGLISH], t_en)
    return {lang: (float(t_en) if lang == ENGLISH else p_to_t(c, p)) for lang, c in counts.items()}


class _ShareTable:
    """p_to_t for many p at once: searchsorted on the cumulative shares, with the same
    arithmetic and tie rule as p_to_t's argmin (tested against it)."""

    def __init__(self, counts: np.ndarray) -> None:
        self.sorted = np.sort(np.asarray(counts))
        total = self.sorted.sum()
        self.portion = np.cumsum(self.sorted) / total if total > 0 else None

    def t(self, p: np.ndarray) -> np.ndarray:
        if self.sorted.size == 0:
            return np.zeros(len(p))
        if self.portion is None:
            return np.full(len(p), float(self.sorted[0]))
        n = len(self.portion)
        j = np.clip(np.searchsorted(self.portion, p, side="left"), 0, n - 1)
        i = np.clip(j - 1, 0, n - 1)
        pick = np.where(np.abs(self.portion[i] - p) <= np.abs(self.portion[j] - p), i, j)
        # argmin returns the first index holding the smallest distance: the start of
        # pick's run of equal shares.
        pick = np.searchsorted(self.portion, self.portion[pick], side="left")
        return self.sorted[pick].astype(np.float64)


def kept_by_language(scores: dict[str, np.ndarray], thresholds: dict[str, float]) -> dict[str, int]:
    """Records kept per language: score < that language's t."""
    return {lang: int((np.asarray(s) < thresholds[lang]).sum()) for lang, s in scores.items()}


def solve_english_t(
    counts: dict[str, np.ndarray], scores: dict[str, np.ndarray], target_size: int
) -> tuple[float, int]:
    """The English t whose per-language thresholds keep `target_size` records in all.

    (t_en, kept). The kept total rises with t_en; the English share p only changes where
    t_en passes an English count, so between two consecutive English counts only the
    English records move, one at a time, and there t_en is solved exactly from the
    English scores (midpoint, as solve_t). At an English count every other language's
    t may step at once: a target inside such a step is not reachable by any t_en, and
    the largest t_en keeping fewer is returned (kept then says how many).
    """
    if target_size <= 0:
        raise ConfigError(f"target size must be positive, got {target_size}")
    if ENGLISH not in counts or np.asarray(counts[ENGLISH]).sum() == 0:
        language_thresholds(counts, 1.0)  # raises the English-needed error
    c_en = np.asarray(counts[ENGLISH])
    distinct = np.unique(c_en[c_en > 0]).astype(np.float64)  # d_1 < ... < d_m
    total_en = c_en.sum()
    # Interval k = (d_k, d_{k+1}] with d_0 = 0, d_{m+1} = inf: p is constant on it.
    lows = np.concatenate([[0.0], distinct])
    highs = np.concatenate([distinct, [np.inf]])
    # p on (d_k, d_{k+1}] is t_to_p there: the counts <= d_k over all (exact integer
    # sums, then the same float division as t_to_p).
    sorted_en = np.sort(c_en)
    cum = np.concatenate([[0], np.cumsum(sorted_en)]).astype(sorted_en.dtype)
    p_k = cum[np.searchsorted(sorted_en, lows, side="right")] / total_en
    others = np.zeros(len(lows), dtype=np.int64)
    for lang, c in counts.items():
        if lang == ENGLISH:
            continue
        s = np.sort(np.asarray(scores[lang]))
        others += np.searchsorted(s, _ShareTable(c).t(p_k), side="left")  # count of s < t
    en = np.sort(np.asarray(scores[ENGLISH]))
    en = en[np.isfinite(en)]
    e_low = np.searchsorted(en, lows, side="right")  # t just above d_k: s <= d_k kept
    e_high = np.searchsorted(en, highs, side="left")  # t = d_{k+1}: s < d_{k+1} kept
    lo_total, hi_total = others + e_low, others + e_high
    k_hits = np.flatnonzero((lo_total <= target_size) & (target_size <= hi_total))
    if k_hits.size:
        k = int(k_hits[0])
        e = target_size - int(others[k])  # English records to keep: #(en < t) == e
        below = max(en[e - 1] if e > 0 else 0.0, lows[k])
        above = min(en[e] if e < len(en) else np.inf, highs[k])
        if below < above:
            t = float(below + (above - below) / 2) if np.isfinite(above) else float(max(below * 2, below + 1.0))
            t = min(t, float(above))
            return t, int(others[k]) + int(np.searchsorted(en, t, side="left"))
    # Unreachable (a step, or ties of duplicate keys): the largest t keeping fewer.
    reach = np.flatnonzero(hi_total <= target_size)
    if reach.size == 0:  # even the smallest t keeps more (cannot happen with counts >= 1)
        k = 0
        t = float(min(en[0], highs[0])) if len(en) else 1.0
    else:
        k = int(reach[-1])
        if np.isfinite(highs[k]):
            t = float(highs[k])
        else:  # past the largest English count: above every English score too
            t = max(float(np.nextafter(en[-1], np.inf)) if len(en) else 0.0, float(lows[k]) + 1.0)
    return t, int(others[k]) + int(np.searchsorted(en, t, side="left"))


# --- one automaton per language, and routing captions to them ---------------------------------


class LanguageMatchers:
    """One metaclip2 Matcher per language. Entry ids are global: language L's entry i is
    ``base[L] + i``, languages in sorted order, so one counts vector (entry_count.npy)
    covers every list and MetaCLIP 1's scoring code works unchanged on it."""

    def __init__(self, metadata: dict[str, list[str]] | None = None) -> None:
        self.matchers: dict[str, object] = {}
        if metadata is not None:
            from mode_fast._matcher import Matcher

            self.matchers = {
                lang: Matcher(entries, semantics="metaclip2") for lang, entries in sorted(metadata.items())
            }
        self._index()

    def _index(self, sizes: dict[str, int] | None = None) -> None:
        if sizes is None:
            sizes = {lang: len(m) for lang, m in self.matchers.items()}  # type: ignore[arg-type]
        self.languages = sorted(sizes)
        self.sizes = {lang: sizes[lang] for lang in self.languages}
        cum = np.concatenate([[0], np.cumsum([self.sizes[lang] for lang in self.languages])]).astype(np.int64)
        self.bases = dict(zip(self.languages, cum[:-1].tolist()))
        self.total = int(cum[-1])

    @classmethod
    def layout(cls, metadata: dict[str, list[str]]) -> LanguageMatchers:
        """Languages and global id bases only, no automata (for the balancing process)."""
        out = cls()
        out._index({lang: len(entries) for lang, entries in metadata.items()})
        return out

    def save(self, folder: str | os.PathLike) -> None:
        """Each language's matcher as <lang>.bin, then languages.json (written last: its
        presence means the folder is complete)."""
        from mode_fast.core.files import write_json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for lang, m in self.matchers.items():
            m.save(str(folder / f"{lang}.bin"))  # type: ignore[attr-defined]
        write_json(folder / "languages.json", {"languages": self.languages})

    @staticmethod
    def complete(folder: str | os.PathLike) -> bool:
        return (Path(folder) / "languages.json").is_file()

    @classmethod
    def load(cls, folder: str | os.PathLike) -> LanguageMatchers:
        from mode_fast._matcher import Matcher

        folder = Path(folder)
        languages = json.loads((folder / "languages.json").read_text())["languages"]
        out = cls()
        out.matchers = {lang: Matcher.load(str(folder / f"{lang}.bin")) for lang in languages}
        out._index()
        return out

    def match(self, captions: Sequence[str], langs: Sequence[str], threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """CSR (offsets int64, global ids int32) of each caption matched against its own
        language's matcher; a caption whose language has no list matches nothing."""
        n = len(captions)
        langs_arr = np.asarray(langs, dtype=object)
        per_record = np.zeros(n, dtype=np.int64)
        parts = []
        for lang in self.languages:
            idx = np.flatnonzero(langs_arr == lang)
            if idx.size == 0:
                continue
            offsets, ids = self.matchers[lang].match_batch([captions[i] for i in idx], threads=threads)  # type: ignore[attr-defined]
            lengths = np.diff(offsets)
            per_record[idx] = lengths
            parts.append((idx, offsets, lengths, ids.astype(np.int64) + self.bases[lang]))
        offsets = np.concatenate([[0], np.cumsum(per_record)]).astype(np.int64)
        out = np.empty(int(offsets[-1]), dtype=np.int32)
        for idx, sub_offsets, lengths, ids in parts:
            # Each id's place: its record's start in the output plus its rank within the record.
            dest = np.repeat(offsets[idx], lengths) + (np.arange(len(ids)) - np.repeat(sub_offsets[:-1], lengths))
            out[dest] = ids
        return offsets, out

    def counts_by_language(self, counts: np.ndarray) -> dict[str, np.ndarray]:
        return {lang: counts[self.bases[lang] : self.bases[lang] + self.sizes[lang]] for lang in self.languages}


def probabilities(counts: np.ndarray, thresholds: dict[str, float], matchers: LanguageMatchers) -> np.ndarray:
    """Per-entry probability t_lang / max(count, t_lang) (MetaCLIP 2's count_to_prob),
    global ids; an entry with count 0 gets 1 (it never matched, so it never matters)."""
    probs = np.ones(len(counts))
    for lang, c in matchers.counts_by_language(counts).items():
        t = thresholds[lang]
        c = c.astype(np.float64)
        base = matchers.bases[lang]
        probs[base : base + len(c)] = np.where(c > t, t / np.maximum(c, 1.0), 1.0 if t > 0 else 0.0)
        probs[base : base + len(c)][c == 0] = 1.0
    return probs


# --- the curate job's worldwide steps (kept here so curate.py only branches) ----------------------


def match_captions(
    matchers: LanguageMatchers,
    lid: LanguageIdentifier,
    captions: Sequence[str],
    has_caption: Sequence[bool],
    threads: int = 0,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Language ID then per-language matching for one shard: (offsets, global ids,
    language per record). Records without a caption get language "" and no matches."""
    langs = lid([c if ok else "" for c, ok in zip(captions, has_caption)])
    offsets, ids = matchers.match(captions, langs, threads=threads)
    return offsets, ids, langs


class WorldwideBalance:
    """MetaCLIP 2's balancing over one pool: per-language counts and thresholds, each
    record kept iff its score (`mode_fast.curation.balance.record_scores` on global ids) < its
    language's t. The methods are `mode_fast.curation.balance.PoolBalance`'s, with t English's."""

    def __init__(self, matchers: LanguageMatchers, counts: np.ndarray, scores: np.ndarray, langs: np.ndarray) -> None:
        self.matchers = matchers
        self.counts = counts
        self.counts_by_lang = matchers.counts_by_language(counts)
        self.scores = scores
        self.codes, self.inverse = np.unique(np.asarray(langs, dtype=str), return_inverse=True)

    def thresholds(self, t_en: float) -> dict[str, float]:
        return language_thresholds(self.counts_by_lang, t_en)

    def record_thresholds(self, thresholds: dict[str, float]) -> np.ndarray:
        """Each record's language's t; -inf for a language without metadata (never kept)."""
        per_code = np.array([thresholds.get(str(c), -np.inf) for c in self.codes], dtype=np.float64)
        return per_code[self.inverse] if len(self.inverse) else np.zeros(0)

    def record_t(self, t_en: float) -> np.ndarray:
        """The threshold each record's score is compared with: its language's t."""
        return self.record_thresholds(self.thresholds(t_en))

    def kept(self, t_en: float) -> int:
        return int((self.scores < self.record_t(t_en)).sum())

    def solve(self, target_size: int) -> float:
        """The English t keeping `target_size` records in all (or the largest keeping fewer:
        solve_english_t)."""
        scores_by_lang = {
            lang: self.scores[self.inverse == np.searchsorted(self.codes, lang)] if lang in self.codes else np.zeros(0)
            for lang in self.matchers.languages
        }
        return solve_english_t(self.counts_by_lang, scores_by_lang, target_size)[0]

    def probabilities(self, t_en: float) -> np.ndarray:
        return probabilities(self.counts, self.thresholds(t_en), self.matchers)

    def entries_over_t(self, t_en: float) -> int:
        """Entries whose count exceeds their language's t."""
        thresholds = self.thresholds(t_en)
        return sum(int((c > thresholds[lang]).sum()) for lang, c in self.counts_by_lang.items())

    def summary(self, t_en: float, metadata: dict[str, list[str]], n: int = 20) -> dict[str, object]:
        """Per language: pool size, matched, kept, t, entries, head/tail entries (ids
        within the language's own list); languages without metadata, counted."""
        thresholds = self.thresholds(t_en)
        keep = self.scores < self.record_thresholds(thresholds)
        matched = np.isfinite(self.scores)
        languages: dict[str, object] = {}
        no_metadata: dict[str, int] = {}
        pool = (
            np.bincount(self.inverse, minlength=len(self.codes))
            if len(self.inverse)
            else np.zeros(len(self.codes), int)
        )
        for lang in self.matchers.languages:
            at = np.searchsorted(self.codes, lang)
            mask = self.inverse == at if lang in self.codes else np.zeros(len(self.scores), dtype=bool)
            c = self.counts_by_lang[lang]
            languages[lang] = {
                "pool_size": int(mask.sum()),
                "matched": int((mask & matched).sum()),
                "kept": int((mask & keep).sum()),
                "t": thresholds[lang],
                "entries": len(c),
                "entry_id_offset": self.matchers.bases[lang],
                "entries_with_count_over_t": int((c > thresholds[lang]).sum()),
                "head_entries": head_entries(metadata[lang], c, n),
                "tail_entries": tail_entries(metadata[lang], c, n),
            }
        for code, count in zip(self.codes, pool):
            if str(code) not in self.matchers.sizes:
                no_metadata[str(code) or "unknown (no text)"] = int(count)
        return {
            "languages": languages,
            "no_metadata": dict(sorted(no_metadata.items(), key=lambda kv: -kv[1])),
            "no_metadata_total": int(sum(no_metadata.values())),
        }


def load_metadata_by_language(metadata: object) -> tuple[dict[str, list[str]], str]:
    """(lists by language, a description) from a path (folder or JSON object) or a dict."""
    if metadata is None:
        raise ConfigError(
            "--semantics metaclip2 needs --metadata: a folder of <lang>.json lists or one JSON "
            "object mapping language code to list (MetaCLIP 2 keeps one list per language)"
        )
    if isinstance(metadata, dict):
        return {
            _check_code(k, "metadata"): validate_metadata(v, f"metadata [{k}]") for k, v in sorted(metadata.items())
        }, f"{len(metadata)} language lists given in code"
    if isinstance(metadata, (str, os.PathLike)):
        return load_language_metadata(metadata), str(metadata)
    raise ConfigError("metaclip2 metadata must be a path or a dict of language -> list")


def format_language_summary(summary: dict) -> str:
    """The per-language lines `mode-fast curate` prints for metaclip2."""
    lines = ["per language (t keeps English's tail share):"]
    for lang, s in summary["languages"].items():
        head = ", ".join(e["entry"] for e in s["head_entries"][:3])
        lines.append(
            f"  {lang:<5} pool {s['pool_size']:>9,}  matched {s['matched']:>9,}  kept {s['kept']:>9,}  "
            f"t={s['t']:<10,.6g} head: {head}"
        )
    if summary["no_metadata"]:
        shown = ", ".join(f"{k}={v:,}" for k, v in list(summary["no_metadata"].items())[:10])
        lines.append(f"  no metadata for {summary['no_metadata_total']:,} captions (dropped): {shown}")
    if summary.get("lone_surrogate_captions"):
        lines.append(f"  captions with lone surrogates, matched on the rest: {summary['lone_surrogate_captions']:,}")
    return "\n".join(lines)
