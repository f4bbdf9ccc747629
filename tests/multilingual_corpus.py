"""Real multilingual text that ships with the OS: gettext catalogues (.mo) under
/usr/share/locale, translated by people for Debian's packages (apt, glib, gtk, coreutils...).

Each translated message is a sentence-like string in a known language (the catalogue's
folder), and its msgid is the English original, so the same messages give a labelled
multilingual set for language ID and a pool for worldwide curation. Used by the tests and
benchmarks; messages are cleaned of printf/format placeholders, markup and mnemonics.
"""

from __future__ import annotations

import gettext
import re
from pathlib import Path

LOCALE_DIR = Path("/usr/share/locale")
# Catalogues of prose-like messages present for many languages on Debian.
DOMAINS = (
    "apt",
    "libapt-pkg6.0",
    "glib20",
    "gtk20",
    "gtk20-properties",
    "dpkg",
    "coreutils",
    "gdk-pixbuf",
    "at-spi2-core",
    "PackageKit",
    "shared-mime-info",
    "grep",
    "findutils",
    "tar",
    "sed",
    "bash",
    "gettext-tools",
    "libc",
    "wget",
    "systemd",
    "software-properties",
    "Linux-PAM",
    "xkeyboard-config",
)
# Locale folder -> ISO 639-1 code (the code language-ID libraries report).
LOCALES = {
    "ar": "ar",
    "bg": "bg",
    "ca": "ca",
    "cs": "cs",
    "da": "da",
    "de": "de",
    "el": "el",
    "es": "es",
    "et": "et",
    "eu": "eu",
    "fa": "fa",
    "fi": "fi",
    "fr": "fr",
    "gl": "gl",
    "he": "he",
    "hi": "hi",
    "hr": "hr",
    "hu": "hu",
    "id": "id",
    "it": "it",
    "ja": "ja",
    "ko": "ko",
    "lt": "lt",
    "lv": "lv",
    "nl": "nl",
    "pl": "pl",
    "pt": "pt",
    "ro": "ro",
    "ru": "ru",
    "sk": "sk",
    "sl": "sl",
    "sv": "sv",
    "th": "th",
    "tr": "tr",
    "uk": "uk",
    "vi": "vi",
    "zh_CN": "zh",
}
_PLACEHOLDER = re.compile(
    r"%(\d+\$)?[-+ #0]*\d*(\.\d+)?(hh|h|ll|l|L|z|j|t|I64|'|I)?[a-zA-Z%]|\$\{?\w+\}?|\{[^{}]*\}|<[^<>]*>|&\w+;"
)


_BIDI_MARKS = dict.fromkeys(range(0x202A, 0x202F))  # embedding marks some catalogues wrap English in
NON_LATIN = {"ar", "bg", "el", "fa", "he", "hi", "ja", "ko", "ru", "th", "uk", "zh"}


def clean(message: str) -> str:
    text = _PLACEHOLDER.sub(" ", message).replace("_", "").replace("\\n", " ").translate(_BIDI_MARKS)
    return " ".join(text.split())


def available() -> bool:
    return (LOCALE_DIR / "ja" / "LC_MESSAGES").is_dir()


def catalogue_texts(min_chars: int = 20, per_language: int | None = None) -> dict[str, list[str]]:
    """{language: [cleaned translated messages]}, plus 'en' from the msgids; messages left
    untranslated (msgstr == msgid) and short ones are dropped; order is deterministic."""
    out: dict[str, list[str]] = {}
    english: dict[str, None] = {}
    for folder, lang in sorted(LOCALES.items()):
        seen: dict[str, None] = {}
        for domain in DOMAINS:
            path = LOCALE_DIR / folder / "LC_MESSAGES" / f"{domain}.mo"
            if not path.is_file():
                continue
            try:
                with open(path, "rb") as f:
                    catalog = gettext.GNUTranslations(f)._catalog  # type: ignore[attr-defined]
            except (OSError, UnicodeDecodeError, ValueError):  # a catalogue in a legacy charset
                continue
            for msgid, msgstr in sorted(catalog.items(), key=lambda kv: str(kv[0])):
                if isinstance(msgid, tuple):  # plural forms: (msgid, n)
                    msgid = msgid[0]
                if not msgid or not isinstance(msgstr, str):
                    continue
                src, text = clean(msgid), clean(msgstr)
                if len(src) >= min_chars:
                    english.setdefault(src)
                # A non-Latin-script catalogue's all-ASCII "translation" is English left as is.
                if len(text) >= min_chars and text != src and not (lang in NON_LATIN and text.isascii()):
                    seen.setdefault(text)
        if seen:
            out[lang] = list(seen)
    out["en"] = list(english)
    if per_language is not None:
        out = {k: v[:: max(1, len(v) // per_language)][:per_language] for k, v in out.items()}
    return dict(sorted(out.items()))
