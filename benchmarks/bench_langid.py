"""Language-ID candidates for `curate --semantics metaclip2`: accuracy and speed on real text.

Text: Debian's gettext catalogues (tests/multilingual_corpus.py): translated messages of
apt, glib, gtk, coreutils, ... in 36 languages plus their English msgids, labelled by
catalogue. Each candidate classifies the same texts one at a time in one thread (as a
curation worker would); we report accuracy overall, on short texts (< 40 chars) and per
language, throughput (texts/s), and model load time.

Run:  PYTHONPATH=. .venv/bin/python benchmarks/bench_langid.py --out benchmarks/results/cpu/langid
      [--per-language 200] [--extra-path DIR]   (DIR: where candidates were pip-installed)
Candidates not installed are reported as such. fasttext-langdetect is not a candidate:
it downloads its model (lid.176) on first use.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def _py3langid() -> Callable[[str], str]:
    import py3langid

    return lambda text: py3langid.classify(text)[0]


def _langid() -> Callable[[str], str]:
    from langid.langid import LanguageIdentifier, model

    ident = LanguageIdentifier.from_modelstring(model, norm_probs=False)
    return lambda text: ident.classify(text)[0]


def _langdetect() -> Callable[[str], str]:
    from langdetect import DetectorFactory, detect
    from langdetect.lang_detect_exception import LangDetectException

    DetectorFactory.seed = 0  # otherwise its answers vary from run to run

    def classify(text: str) -> str:
        try:
            return detect(text).split("-")[0]  # zh-cn -> zh
        except LangDetectException:
            return ""

    return classify


def _lingua(low_accuracy: bool) -> Callable[[], Callable[[str], str]]:
    def make() -> Callable[[str], str]:
        from lingua import LanguageDetectorBuilder

        builder = LanguageDetectorBuilder.from_all_languages().with_preloaded_language_models()
        detector = (builder.with_low_accuracy_mode() if low_accuracy else builder).build()

        def classify(text: str) -> str:
            lang = detector.detect_language_of(text)
            return "" if lang is None else lang.iso_code_639_1.name.lower()

        return classify

    return make


CANDIDATES: dict[str, Callable[[], Callable[[str], str]]] = {
    "py3langid": _py3langid,
    "langid": _langid,
    "langdetect": _langdetect,
    "lingua (high accuracy)": _lingua(False),
    "lingua (low accuracy)": _lingua(True),
}
# Codes some libraries use for the same language as our labels.
ALIASES = {"nb": "no", "iw": "he", "in": "id"}


def measure(name: str, factory: Callable[[], Callable[[str], str]], data: dict[str, list[str]]) -> dict:
    start = time.perf_counter()
    try:
        classify = factory()
        classify("warm up the model")
    except ImportError as exc:
        return {"candidate": name, "installed": False, "error": str(exc)}
    load = time.perf_counter() - start
    texts = [(lang, t) for lang, ts in data.items() for t in ts]
    correct_by_lang: dict[str, int] = defaultdict(int)
    short_total = short_correct = 0
    start = time.perf_counter()
    predictions = [classify(t) for _, t in texts]
    seconds = time.perf_counter() - start
    for (lang, text), pred in zip(texts, predictions):
        ok = ALIASES.get(pred, pred) == lang
        correct_by_lang[lang] += ok
        if len(text) < 40:
            short_total += 1
            short_correct += ok
    return {
        "candidate": name,
        "installed": True,
        "load_seconds": load,
        "texts": len(texts),
        "texts_per_second": len(texts) / seconds,
        "accuracy": sum(correct_by_lang.values()) / len(texts),
        "accuracy_short": short_correct / max(short_total, 1),
        "short_texts": short_total,
        "accuracy_by_language": {lang: correct_by_lang[lang] / len(ts) for lang, ts in data.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="path stem: writes STEM.json and STEM.md")
    ap.add_argument("--per-language", type=int, default=200)
    ap.add_argument("--extra-path", action="append", default=[], help="folder with pip --target installs")
    ap.add_argument("--note", default="", help="machine note for the table (load, sharing)")
    args = ap.parse_args()
    sys.path[:0] = args.extra_path
    from multilingual_corpus import catalogue_texts

    data = catalogue_texts(per_language=args.per_language)
    results = [measure(name, f, data) for name, f in CANDIDATES.items()]
    meta = {
        "run": datetime.now(timezone.utc).isoformat(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "note": args.note,
        "languages": sorted(data),
        "texts": sum(map(len, data.values())),
    }
    with open(f"{args.out}.json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1, ensure_ascii=False)
    lines = [
        "# Language ID candidates for `curate --semantics metaclip2`",
        "",
        f"Text: {meta['texts']:,} translated gettext messages (Debian /usr/share/locale: apt, glib, gtk, "
        f"coreutils, ...) in {len(data)} languages, {args.per_language} per language, labelled by catalogue "
        "(`tests/multilingual_corpus.py`). One text per call, one thread. Labels are noisy where a catalogue "
        "left a message in English; every candidate sees the same texts.",
        "",
        f"Machine: {meta['cores']} cores, {meta['note']}. Run {meta['run']}, Python {meta['python']}.",
        "",
        "| candidate | accuracy | accuracy < 40 chars | texts/s | load s |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        if not r["installed"]:
            lines.append(f"| {r['candidate']} | not installed | | | |")
            continue
        lines.append(
            f"| {r['candidate']} | {r['accuracy']:.3f} | {r['accuracy_short']:.3f} ({r['short_texts']}) | "
            f"{r['texts_per_second']:,.0f} | {r['load_seconds']:.2f} |"
        )
    lines += [
        "",
        "fasttext-langdetect: excluded, it downloads its model (lid.176) at first use. lingua's two rows "
        "share its model cache: the second row's load time excludes loading the models.",
        "",
        "Per language (accuracy):",
        "",
        "| language | " + " | ".join(r["candidate"] for r in results if r["installed"]) + " |",
        "|---|" + "---|" * sum(r["installed"] for r in results),
    ]
    for lang in sorted(data):
        lines.append(
            f"| {lang} | "
            + " | ".join(f"{r['accuracy_by_language'][lang]:.2f}" for r in results if r["installed"])
            + " |"
        )
    with open(f"{args.out}.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:16]))


if __name__ == "__main__":
    main()
