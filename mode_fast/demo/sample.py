"""The embedded sample: a deterministic synthetic image-text pool for demos, tests and benchmarks.

Layout written by ``write_sample(out_dir)`` / ``mode-fast sample --out DIR``::

    DIR/pool/pool-000000.tar ...   training pool, webdataset shards of `shard_size` samples
    DIR/eval/eval-000000.tar ...   held-out labelled split (own seeds, balanced classes)
    DIR/eval/classes.json          class names, list index = label (same labels as the pool)
    DIR/eval/templates.json        zero-shot prompt templates, each with one "{}"
    DIR/sample_info.json           arguments, shard list and sizes, counts; written last

Pool sample ``sNNNNNNN`` (uid = key, index in the pool, stable across runs and shard sizes):
``.jpg`` (RGB, ``image_size`` px), ``.txt`` (the caption, UTF-8) and ``.json`` with
``uid, caption, domain, label, class_name, mismatched, caption_kind, caption_label,
near_duplicate_of, tricky, fg_colour, bg_colour``. Eval sample ``eNNNNNNN``: ``.cls`` (the
label as ASCII digits), ``.jpg`` and ``.json`` (``uid, caption, domain, label, class_name,
fg_colour, bg_colour``; the caption is always a clean one, for retrieval-style checks).

What is in it:
- Four visual domains with different image statistics, four classes each (``DOMAINS``):
  large light shapes on a dark plain background, full-frame periodic textures in any two
  colours, bold dark glyphs on light paper, and banded scenes under a random light (brightness
  and colour cast). Labels are global (0..15); ``DOMAINS`` groups them.
- Captions built from WordNet lemmas (the shipped MetaCLIP metadata): in a
  ``COLOUR_CAPTION_RATE`` share of shapes/textures/glyphs captions, colour words that are
  the colours actually drawn; several surface forms per class ("checkered pattern",
  "chessboard"), domain words, and suffix phrases whose words are Zipf-distributed over
  long lists, so curation has heads and a long tail to balance. Multi-word and overlapping
  entries appear ("hot dog", "polka dot", "coffee shop"). Pool captions average ~65 bytes.
- Caption kinds (shares are arguments): ``noise`` (product codes, file names: no metadata
  word at all), ``mismatched`` (a caption written for a class of another domain),
  ``near_duplicate`` (an earlier clean caption of the same class with a tiny edit), and
  ``clean``. Independently, a ``tricky`` share of non-noise captions gets tabs, newlines,
  CRLF, punctuation or non-ASCII (café, naïve, emoji, CJK) at word boundaries.

Determinism: the same arguments give byte-identical files with the same numpy and Pillow
(JPEG coding and glyph rasterising come from Pillow's bundled libraries). Sample ``i`` draws
only from ``SeedSequence([seed, split, i])`` plus the earlier samples' captions (for
near-duplicates), so the pool does not depend on ``shard_size`` and a smaller
``num_pairs`` gives a prefix of a larger one. Tar headers are fixed (mtime 0, uid/gid 0).

Re-running: every file is written under a temporary name and renamed. If
``sample_info.json`` exists with the same arguments and format version and every listed
file has its recorded size, the call is a no-op; otherwise (or with ``force``) the info file
is removed first, stale ``pool-*.tar``/``eval-*.tar`` and leftover temporaries are deleted,
and everything is rewritten, so a killed run is never mistaken for a complete one. Other
files in ``DIR`` are left alone. Two runs writing the same ``DIR`` at once are not supported.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import io
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw, ImageFont

from mode_fast.core.config import check_ranges, option
from mode_fast.core.errors import ConfigError, InputError
from mode_fast.core.files import atomic_write, inside, write_json

# Bump when the same arguments would give different bytes: an older output is then rewritten.
FORMAT_VERSION = 3

DOMAINS: dict[str, list[str]] = {
    "shapes": ["circle", "square", "triangle", "cross"],
    "textures": ["stripes", "polka dots", "checkerboard", "wavy lines"],
    "glyphs": ["digit one", "digit seven", "letter A", "letter X"],
    "scenes": ["beach", "forest", "night sky", "desert"],
}
CLASS_NAMES: list[str] = [name for names in DOMAINS.values() for name in names]
DOMAIN_OF_CLASS: list[str] = [domain for domain, names in DOMAINS.items() for _ in names]
TEMPLATES: list[str] = ["a photo of a {}.", "a picture of a {}.", "an image of the {}.", "a drawing of a {}."]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (235, 210, 40),
    "purple": (130, 50, 170), "orange": (240, 140, 30), "pink": (240, 140, 180), "brown": (120, 75, 40),
    "gray": (128, 128, 128), "black": (25, 25, 25), "white": (240, 240, 240),
}  # fmt: skip
# Glyphs are ink on paper: dark foregrounds, light backgrounds (a different colour statistic).
GLYPH_INKS = ["black", "blue", "red", "green", "purple", "brown"]
GLYPH_PAPERS = ["white", "yellow", "pink"]
# Shapes are light on dark: one polarity, so the outline is the strongest signal in the pixels
# rather than a random pair of colours (with any two colours, shapes stayed at chance).
SHAPE_FILLS = ["white", "yellow", "pink", "orange"]
SHAPE_GROUNDS = ["black", "blue", "purple", "brown"]

# Caption surface forms per class (first = class name); every word is a WordNet lemma or
# an inflection of one, so metadata matching finds something in every clean caption.
CLASS_WORDS: dict[str, list[str]] = {
    "circle": ["circle", "disk", "round shape", "circle shape"],
    "square": ["square", "box", "square block", "square shape"],
    "triangle": ["triangle", "pyramid", "triangle shape"],
    "cross": ["cross", "plus sign", "cross symbol"],
    "stripes": ["stripes", "striped pattern", "stripe"],
    "polka dots": ["polka dots", "polka dot", "dotted pattern", "spots"],
    "checkerboard": ["checkerboard", "checkered pattern", "chessboard"],
    "wavy lines": ["wavy lines", "wavy pattern", "wave", "ripple"],
    "digit one": ["digit one", "number 1", "numeral one", "number one"],
    "digit seven": ["digit seven", "number 7", "numeral seven", "number seven"],
    "letter A": ["letter A", "capital A", "uppercase A"],
    "letter X": ["letter X", "capital X", "uppercase X"],
    "beach": ["beach", "seaside", "sandy beach", "coast"],
    "forest": ["forest", "woods", "pine forest", "woodland"],
    "night sky": ["night sky", "starry sky", "full moon", "starry night"],
    "desert": ["desert", "sand dune", "Sahara", "dune"],
}
SCENE_EXTRAS: dict[str, list[str]] = {
    "beach": ["sand and sea", "ocean waves", "palm tree", "blue water", "seawater"],
    "forest": ["tall trees", "green grass", "pine tree", "moss", "fern"],
    "night sky": ["bright stars", "the Milky Way", "dark clouds", "a comet", "moonlight"],
    "desert": ["hot sand", "cactus", "dry heat", "a camel", "sun"],
}
SCENE_TIMES = ["sunset", "sunrise", "noon", "dusk", "dawn", "midnight"]
SCENE_SKIES = ["clear", "cloudy", "blue", "dark", "orange"]
# {obj} = a surface form of the class, {fg}/{bg} = the colours drawn.
DOMAIN_TEMPLATES: dict[str, list[str]] = {
    "shapes": ["a {fg} {obj} on a {bg} background", "{fg} {obj}, {bg} background", "{obj} icon in {fg}",
               "simple {fg} {obj} on {bg}", "{fg} {obj} drawn on {bg} paper"],
    "textures": ["{obj} texture, {fg} and {bg}", "{fg} and {bg} {obj}", "seamless {obj} in {fg} on {bg}",
                 "{obj} fabric, {fg} {bg}", "wallpaper with {fg} {obj}"],
    "glyphs": ["the {obj} in {fg} on {bg}", "{obj} in {fg} ink", "{fg} {obj} on a {bg} sign",
               "font sample: {obj}", "{obj}, {fg} type on {bg} paper"],
    "scenes": ["{obj} at {time}", "a view of the {obj} under a {sky} sky", "{obj} landscape with {extra}",
               "panorama of a {obj}, {extra}", "{time} over the {obj}"],
}  # fmt: skip
# The same without colour words. While every caption named two random colours, shapes and
# textures stayed at chance for every model (issue 16): the colours were the easy signal to
# align. So only a COLOUR_CAPTION_RATE share of shapes/textures/glyphs captions names them.
PLAIN_TEMPLATES: dict[str, list[str]] = {
    "shapes": ["a {obj} icon", "simple {obj} symbol", "a {obj} drawn on paper", "flat {obj} clip art",
               "{obj} sticker design"],
    "textures": ["{obj} texture sample", "seamless {obj} background", "{obj} fabric swatch",
                 "wallpaper with a {obj} design", "{obj} print on cloth"],
    "glyphs": ["the {obj} on a sign", "{obj} in ink on a card", "font sample: {obj}", "{obj} printed on paper",
               "a {obj} stamp"],
}  # fmt: skip
COLOUR_CAPTION_RATE = 0.3
PREFIXES = [
    "",
    "a photo of",
    "picture of",
    "an image of",
    "close up of",
    "a drawing of",
    "illustration:",
    "poster -",
    "high quality photo of",
    "painting of",
]
CONNECTORS = ["on a", "with a", "near the", "from the", "for the", "in a", "by the", "at the"]
# Long tails: drawn with Zipf weights, so the first words are common and the last ones rare
# (the nouns run from household things to a deep tail that a 10k pool sees a few times).
TAIL_ADJECTIVES = [
    "vintage", "modern", "small", "large", "old", "new", "bright", "dark", "minimal", "retro", "wooden", "rustic",
    "elegant", "cute", "classic", "handmade", "pale", "vivid", "soft", "glossy", "matte", "faded", "antique",
    "tiny", "huge", "cozy", "funky", "bold", "subtle", "neon", "pastel", "velvet", "silk", "cotton", "linen",
    "marble", "granite", "copper", "golden", "silver", "brass", "jade", "ivory", "ebony", "crimson", "azure",
    "cobalt", "teal", "maroon", "olive", "lavender", "amber", "scarlet", "indigo", "magenta", "turquoise",
]  # fmt: skip
TAIL_NOUNS = [
    "table", "wall", "shelf", "window", "kitchen", "office", "studio", "gallery", "frame", "mug", "pillow",
    "blanket", "tote bag", "poster", "card", "canvas", "mural", "carpet", "quilt", "sticker", "stamp", "badge",
    "book", "shirt", "dress", "scarf", "umbrella", "tile", "floor", "ceiling", "door", "screen", "phone", "laptop",
    "calendar", "menu", "label", "crate", "basket", "vase", "bottle", "jar", "cup", "plate", "bowl", "lamp",
    "chair", "sofa", "desk", "rug", "curtain", "towel", "apron", "living room", "coffee shop", "post office",
    "hot dog", "ice cream", "bedroom", "bathroom", "hallway", "patio", "balcony", "porch", "attic", "cellar",
    "barn", "cabin", "cottage", "villa", "castle", "palace", "temple", "church", "library", "school", "hospital",
    "airport", "station", "harbor", "bridge", "tower", "lighthouse", "windmill", "factory", "warehouse", "market",
    "bakery", "cafe", "restaurant", "pub", "hotel", "theater", "cinema", "stadium", "zoo", "aquarium", "farm",
    "orchard", "vineyard", "meadow", "prairie", "savanna", "tundra", "glacier", "volcano", "canyon", "valley",
    "cliff", "cave", "island", "lagoon", "reef", "marsh", "swamp", "creek", "pond", "lake", "waterfall", "fountain",
    "dog", "cat", "horse", "cow", "sheep", "goat", "pig", "rabbit", "fox", "wolf", "bear", "deer", "moose", "elk",
    "owl", "eagle", "hawk", "parrot", "pigeon", "sparrow", "swan", "duck", "goose", "penguin", "dolphin", "whale",
    "shark", "octopus", "crab", "lobster", "turtle", "frog", "lizard", "snake", "butterfly", "bee", "ant", "spider",
    "beetle", "dragonfly", "snail", "apple", "banana", "cherry", "lemon", "pear", "peach", "plum", "grape", "melon",
    "mango", "pineapple", "strawberry", "tomato", "potato", "carrot", "onion", "garlic", "pepper", "cucumber",
    "pumpkin", "mushroom", "bread", "cheese", "butter", "egg", "honey", "jam", "pasta", "pizza", "sandwich",
    "burger", "taco", "sushi", "noodle", "soup", "salad", "cake", "cookie", "muffin", "pancake", "waffle", "donut",
    "chocolate", "candy", "coffee", "tea", "juice", "wine", "beer", "milk", "violin", "guitar", "piano", "drum",
    "trumpet", "flute", "harp", "cello", "banjo", "accordion", "bicycle", "motorcycle", "car", "truck", "bus",
    "train", "tram", "boat", "ship", "yacht", "canoe", "kayak", "airplane", "helicopter", "rocket", "balloon",
    "kite", "skateboard", "scooter", "wagon", "tractor", "anchor", "compass", "telescope", "microscope", "camera",
    "radio", "clock", "watch", "hourglass", "candle", "lantern", "key", "lock", "hammer", "wrench", "saw", "drill",
    "shovel", "rake", "ladder", "bucket", "broom", "needle", "thread", "button", "zipper", "ribbon", "feather",
    "shell", "pebble", "crystal", "pearl", "diamond", "emerald", "ruby", "sapphire", "coin", "medal", "trophy",
    "crown", "helmet", "mask", "hat", "cap", "glove", "boot", "sneaker", "sandal", "backpack", "suitcase", "wallet",
    "purse", "necklace", "bracelet", "earring", "mirror", "comb", "brush", "sponge", "soap", "bathtub", "sink",
    "stove", "oven", "kettle", "teapot", "spoon", "fork", "knife", "ladle", "whisk", "skillet", "saucepan",
    "cutlery", "napkin", "tablecloth", "doormat", "mailbox", "fence", "gate", "chimney", "roof", "staircase",
    "elevator", "escalator", "corridor", "courtyard", "greenhouse", "shed", "garage", "driveway", "sidewalk",
    "alley", "avenue", "boulevard", "plaza", "monument", "statue", "obelisk", "pagoda", "mosque", "cathedral",
    "chapel", "monastery", "fortress", "citadel", "dungeon", "labyrinth", "pavilion", "gazebo", "pergola",
    "trellis", "hammock", "swing", "seesaw", "carousel", "circus", "carnival", "parade", "festival", "concert",
    "opera", "ballet", "orchestra", "choir", "auditorium", "planetarium", "observatory", "laboratory", "workshop",
    "forge", "mill", "quarry", "mine", "oasis", "fjord", "delta", "estuary", "peninsula", "archipelago", "atoll",
    "geyser", "crater", "plateau", "mesa", "butte", "gorge", "ravine", "gully", "moor", "heath", "steppe", "jungle",
    "rainforest", "bamboo", "orchid", "tulip", "rose", "daisy", "lily", "sunflower", "lotus", "poppy", "ivy",
    "clover", "dandelion", "thistle", "bonsai", "acorn", "pinecone", "chestnut", "walnut", "almond", "hazelnut",
]  # fmt: skip
TAIL_PHRASE_COUNTS = [0, 1, 2, 3, 4]
TAIL_PHRASE_WEIGHTS = [0.2, 0.4, 0.3, 0.1, 0.0]  # pool captions: ~65 bytes on average
# sample_captions: more suffixes, ~100 bytes on average like web alt-texts (MetaCLIP's ~107).
BENCHMARK_TAIL_PHRASE_WEIGHTS = [0.0, 0.05, 0.2, 0.35, 0.4]
# Strings inserted at word boundaries of a "tricky" caption: whitespace MetaCLIP folds into
# spaces, punctuation it pads, and non-ASCII that must survive as UTF-8.
TRICKY_INSERTS = ["\t", "\n", "\r\n", "  ", ",", "!", "?!", "...", ";", ":", "`", "café", "naïve", "résumé",
                  "jalapeño", "😀", "✨", "猫", "Ünïcödé"]  # fmt: skip
NEAR_DUPLICATE_SUFFIXES = ["!", ".", " .", " !!", " ...", "?"]  # punctuation only: no new word
NEAR_DUPLICATE_MEMORY = 4096  # earlier clean captions remembered per class (bounded memory)
CAPTIONS_CHUNK = 1024  # sample_captions draws one generator per chunk: fast and prefix-stable

POOL_SPLIT, EVAL_SPLIT, CAPTIONS_SPLIT = 0, 1, 2  # keep the three random streams apart
SHARD_FILE_MODE = 0o644
SHARD_NAME = re.compile(r"^(pool|eval)-\d{6}\.tar$")


# --- random picks -----------------------------------------------------------------------
# Captions use random.Random and only its .random(): Mersenne Twister doubles are stable
# across Python versions (choice/shuffle internals are not promised to be), and scalar
# draws are ~10x cheaper than numpy's, which keeps sample_captions fast.


class _Choices:
    """Items with weights; `pick(rng)` is one `rng.random()` and a bisect."""

    def __init__(self, items: Sequence[Any], weights: Sequence[float] | None = None) -> None:
        if not items:
            raise ValueError("_Choices: no items")
        self.items = list(items)
        weights = [1.0] * len(items) if weights is None else list(weights)
        self.cumulative = list(np.cumsum(np.asarray(weights, dtype=np.float64)).tolist())

    def pick(self, rng: random.Random) -> Any:
        i = bisect.bisect_right(self.cumulative, rng.random() * self.cumulative[-1])
        return self.items[min(i, len(self.items) - 1)]  # guards the r * total == total rounding edge


def _zipf(items: Sequence[str], exponent: float = 1.1) -> _Choices:
    return _Choices(items, [1.0 / (rank + 1) ** exponent for rank in range(len(items))])


_UNIFORM_CLASS = _Choices(range(len(CLASS_NAMES)))
_CLASS_WORDS = {name: _Choices(words, [3.0] + [1.0] * (len(words) - 1)) for name, words in CLASS_WORDS.items()}
_TEMPLATES = {domain: _Choices(templates) for domain, templates in DOMAIN_TEMPLATES.items()}
_PLAIN_TEMPLATES = {domain: _Choices(templates) for domain, templates in PLAIN_TEMPLATES.items()}
_PREFIXES = _zipf(PREFIXES, 0.8)
_CONNECTORS = _zipf(CONNECTORS, 0.8)
_TAIL_ADJECTIVES = _zipf(TAIL_ADJECTIVES)
_TAIL_NOUNS = _zipf(TAIL_NOUNS, 1.0)
_TAIL_COUNT = _Choices(TAIL_PHRASE_COUNTS, TAIL_PHRASE_WEIGHTS)
_BENCHMARK_TAIL_COUNT = _Choices(TAIL_PHRASE_COUNTS, BENCHMARK_TAIL_PHRASE_WEIGHTS)
_COLOURS = _Choices(list(COLOURS))
_INKS, _PAPERS = _Choices(GLYPH_INKS), _Choices(GLYPH_PAPERS)
_FILLS, _GROUNDS = _Choices(SHAPE_FILLS), _Choices(SHAPE_GROUNDS)
_TRICKY = _Choices(TRICKY_INSERTS)
_SCENE_EXTRAS = {name: _Choices(extras) for name, extras in SCENE_EXTRAS.items()}
_SCENE_TIMES, _SCENE_SKIES = _Choices(SCENE_TIMES), _Choices(SCENE_SKIES)
_NEAR_DUPLICATE_SUFFIXES = _Choices(NEAR_DUPLICATE_SUFFIXES)


def _seed_int(*parts: int) -> int:
    """One 64-bit seed from a tuple of ints (SeedSequence mixes them well)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0])


# --- captions ---------------------------------------------------------------------------


def _colours_for(label: int, rng: random.Random) -> tuple[str | None, str | None]:
    """Foreground and background colour names drawn for a class (None for scenes)."""
    domain = DOMAIN_OF_CLASS[label]
    if domain == "scenes":
        return None, None
    if domain == "glyphs":
        return _INKS.pick(rng), _PAPERS.pick(rng)
    if domain == "shapes":
        return _FILLS.pick(rng), _GROUNDS.pick(rng)
    fg = _COLOURS.pick(rng)
    bg = _COLOURS.pick(rng)
    while bg == fg:
        bg = _COLOURS.pick(rng)
    return fg, bg


_A_BEFORE_VOWEL = re.compile(r"\ba (?=[aeiou])")


def _caption(label: int, fg: str | None, bg: str | None, rng: random.Random, tail_count: _Choices | None = None) -> str:
    """A clean caption for class `label` drawn in colours fg on bg, with a number of
    long-tail suffix phrases drawn from `tail_count`."""
    name = CLASS_NAMES[label]
    domain = DOMAIN_OF_CLASS[label]
    coloured = domain not in PLAIN_TEMPLATES or rng.random() < COLOUR_CAPTION_RATE
    template: str = (_TEMPLATES if coloured else _PLAIN_TEMPLATES)[domain].pick(rng)
    fields = {"obj": _CLASS_WORDS[name].pick(rng), "fg": fg, "bg": bg}
    if domain == "scenes":
        fields |= {
            "time": _SCENE_TIMES.pick(rng),
            "sky": _SCENE_SKIES.pick(rng),
            "extra": _SCENE_EXTRAS[name].pick(rng),
        }
    parts = [_PREFIXES.pick(rng), template.format(**fields)]
    for _ in range((tail_count or _TAIL_COUNT).pick(rng)):
        parts.append(f"{_CONNECTORS.pick(rng)} {_TAIL_ADJECTIVES.pick(rng)} {_TAIL_NOUNS.pick(rng)}")
    return _A_BEFORE_VOWEL.sub("an ", " ".join(p for p in parts if p))


def _digits(rng: random.Random, n: int) -> str:
    return f"{int(rng.random() * 10**n):0{n}d}"


def _noise_caption(rng: random.Random) -> str:
    """File names and product codes: every token carries digits joined by _ - # so that no
    token (after MetaCLIP's punctuation padding) is an English word or a bare number such as
    "10", which is a WordNet lemma."""
    makers = [
        lambda: f"IMG_{_digits(rng, 5)}.JPG",
        lambda: f"DSC{_digits(rng, 5)}",
        lambda: f"SKU-{_digits(rng, 5)}-{_digits(rng, 2)}",
        lambda: f"P{_digits(rng, 7)}.jpg",
        lambda: f"20{_digits(rng, 2)}-{_digits(rng, 2)}-{_digits(rng, 2)}_{_digits(rng, 6)}",
        lambda: f"#{_digits(rng, 6)}",
        lambda: f"{_digits(rng, 6)}-{_digits(rng, 3)}",
        lambda: f"item_{_digits(rng, 4)}_v{_digits(rng, 2)}",
    ]
    count = 1 + int(rng.random() * 3)
    return " ".join(makers[int(rng.random() * len(makers))]() for _ in range(count))


def _make_tricky(caption: str, rng: random.Random) -> str:
    """Insert one or two tricky strings at word boundaries (never inside a word, so the
    caption's metadata words stay matchable)."""
    for _ in range(1 + int(rng.random() < 0.3)):
        spaces = [i for i, ch in enumerate(caption) if ch == " "] + [len(caption)]
        pos = spaces[int(rng.random() * len(spaces))]
        insert: str = _TRICKY.pick(rng)
        if insert.isalpha() or not insert.isascii():
            insert = " " + insert  # a word of its own
        caption = caption[:pos] + insert + caption[pos:]
    return caption


def _near_duplicate(caption: str, rng: random.Random) -> str:
    """A tiny edit: trailing punctuation, a doubled space or the first letter's case."""
    edit = int(rng.random() * 3)
    if edit == 0:
        return caption + _NEAR_DUPLICATE_SUFFIXES.pick(rng)
    if edit == 1 and " " in caption:
        spaces = [i for i, ch in enumerate(caption) if ch == " "]
        pos = spaces[int(rng.random() * len(spaces))]
        return caption[:pos] + " " + caption[pos:]  # a doubled space
    first = caption[0]
    return (first.lower() if first.isupper() else first.upper()) + caption[1:]


def sample_captions(n: int, seed: int = 0, noise_rate: float = 0.05, tricky_rate: float = 0.03) -> list[str]:
    """`n` caption-like texts (no images), quickly, for matcher and curation benchmarks.

    The pool's caption generator with more long-tail phrases (~100 bytes on average), a `noise_rate`
    share of word-free product codes and a `tricky_rate` share of tricky text. Deterministic
    and prefix-stable: ``sample_captions(n, s)[:m] == sample_captions(m, s)``.
    """
    if n < 0:
        raise ValueError(f"sample_captions: n must be >= 0, got {n}")
    _check_rate("noise_rate", noise_rate)
    _check_rate("tricky_rate", tricky_rate)
    out: list[str] = []
    for chunk_start in range(0, n, CAPTIONS_CHUNK):
        rng = random.Random(_seed_int(seed, CAPTIONS_SPLIT, chunk_start // CAPTIONS_CHUNK))
        for _ in range(min(CAPTIONS_CHUNK, n - chunk_start)):
            if rng.random() < noise_rate:
                out.append(_noise_caption(rng))
                continue
            label = _UNIFORM_CLASS.pick(rng)
            text = _caption(label, *_colours_for(label, rng), rng, _BENCHMARK_TAIL_COUNT)
            out.append(_make_tricky(text, rng) if rng.random() < tricky_rate else text)
    return out


# --- images -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _glyph_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:  # older Pillow: the fixed bitmap font (glyphs come out small)
        return ImageFont.load_default()


def _jitter(rgb: Sequence[int], rng: np.random.Generator, spread: float = 12.0) -> np.ndarray:
    return np.clip(np.asarray(rgb, dtype=np.float32) + rng.normal(0.0, spread, 3), 0, 255)


def _draw_shape(name: str, fg: np.ndarray, bg: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    img = Image.new("RGB", (size, size), tuple(int(v) for v in bg))
    draw = ImageDraw.Draw(img)
    r = size * rng.uniform(0.28, 0.42)  # large: the outline spans several 8-px patches
    cx, cy = size * rng.uniform(0.4, 0.6, size=2)
    colour = tuple(int(v) for v in fg)
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif name == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif name == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:  # cross
        w = max(2.0, r / 2)
        draw.rectangle([cx - r, cy - w / 2, cx + r, cy + w / 2], fill=colour)
        draw.rectangle([cx - w / 2, cy - r, cx + w / 2, cy + r], fill=colour)
    return np.asarray(img, dtype=np.float32)


def _draw_texture(name: str, fg: np.ndarray, bg: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    freq = rng.uniform(2.5, 4.5)  # periods of 7-13 px: about one per 8-px patch or more
    phase = rng.uniform(0.0, 2 * np.pi)
    if name == "stripes":
        angle = rng.uniform(0.0, np.pi)
        mask = np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase) > 0
    elif name == "polka dots":
        cell_x = (freq * xx + phase) % 1.0 - 0.5
        cell_y = (freq * yy) % 1.0 - 0.5
        mask = cell_x**2 + cell_y**2 < 0.09
    elif name == "checkerboard":
        mask = (np.floor(freq * xx + phase) + np.floor(freq * yy)) % 2 == 0
    else:  # wavy lines
        mask = np.sin(2 * np.pi * freq * yy + 2.5 * np.sin(2 * np.pi * 2 * xx + phase)) > 0
    return np.where(mask[..., None], fg, bg)


GLYPH_TEXT = {"digit one": "1", "digit seven": "7", "letter A": "A", "letter X": "X"}


def _draw_glyph(name: str, fg: np.ndarray, bg: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    img = Image.new("RGB", (size, size), tuple(int(v) for v in bg))
    draw = ImageDraw.Draw(img)
    font = _glyph_font(max(8, int(size * rng.uniform(0.65, 0.85))))
    centre = (size * rng.uniform(0.4, 0.6), size * rng.uniform(0.4, 0.6))
    fill = tuple(int(v) for v in fg)
    if isinstance(font, ImageFont.FreeTypeFont):
        draw.text(centre, GLYPH_TEXT[name], fill=fill, font=font, anchor="mm", stroke_width=1, stroke_fill=fill)
    else:  # bitmap fonts only anchor at the top left
        draw.text((centre[0] - 3, centre[1] - 5), GLYPH_TEXT[name], fill=fill, font=font)
    return np.asarray(img, dtype=np.float32)


def _draw_scene(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    horizon = rng.uniform(0.3, 0.5)
    img = np.empty((size, size, 3), dtype=np.float32)
    if name == "beach":
        shore = horizon + rng.uniform(0.15, 0.3) + 0.03 * np.sin(2 * np.pi * (2 * xx + rng.uniform()))
        img[:] = _jitter((120, 185, 240), rng)  # sky
        img[yy >= horizon] = _jitter((30, 90, 170), rng)  # sea
        img[yy >= shore] = _jitter((230, 205, 150), rng)  # sand
    elif name == "forest":
        img[:] = _jitter((170, 205, 230), rng)
        img[yy >= horizon] = _jitter((25, 85, 35), rng)
        tree = _jitter((45, 130, 50), rng)
        for _ in range(int(rng.integers(3, 7))):  # pointed tree crowns above the canopy line
            x0, top = rng.uniform(0, 1), horizon - rng.uniform(0.1, 0.3)
            img[(yy >= top) & (np.abs(xx - x0) < (yy - top) * 0.45)] = tree
    elif name == "night sky":
        t = yy[..., None]
        img[:] = (1 - t) * _jitter((10, 12, 45), rng, 5) + t * _jitter((30, 30, 70), rng, 5)
        img[rng.random((size, size)) > 0.96] = 245  # stars
        mx, my, mr = rng.uniform(0.2, 0.8), rng.uniform(0.15, 0.5), rng.uniform(0.07, 0.12)
        img[(xx - mx) ** 2 + (yy - my) ** 2 < mr**2] = _jitter((240, 235, 200), rng, 5)
    else:  # desert: dunes under a hot sky, a sun disk
        dune_line = horizon + 0.08 * np.sin(2 * np.pi * (1.3 * xx + rng.uniform()))
        img[:] = _jitter((245, 215, 150), rng)
        sand = _jitter((215, 160, 80), rng)
        below = yy >= dune_line
        img[below] = sand * (0.85 + 0.3 * (yy[below, None] - horizon))
        sx, sy = rng.uniform(0.2, 0.8), rng.uniform(0.05, max(0.06, horizon - 0.15))
        img[((xx - sx) ** 2 + (yy - sy) ** 2 < 0.008) & ~below] = (255, 250, 220)
    return img


def _light(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Time of day: a random brightness and colour cast, so that a scene's mean colour alone
    does not give its class away (issue 16: every model was at 100% on scenes)."""
    cast = rng.normal(0.0, 30.0, 3)
    return img * rng.uniform(0.55, 1.15) + cast


def _draw(label: int, fg: str | None, bg: str | None, rng: np.random.Generator, size: int) -> np.ndarray:
    """An RGB uint8 image of class `label` in colours fg on bg (named; None for scenes)."""
    name, domain = CLASS_NAMES[label], DOMAIN_OF_CLASS[label]
    if domain == "scenes":
        img = _light(_draw_scene(name, rng, size), rng)
    else:
        assert fg is not None and bg is not None
        fg_rgb, bg_rgb = _jitter(COLOURS[fg], rng), _jitter(COLOURS[bg], rng)
        draw_domain = {"shapes": _draw_shape, "textures": _draw_texture, "glyphs": _draw_glyph}[domain]
        img = draw_domain(name, fg_rgb, bg_rgb, rng, size)
    img = img + rng.normal(0.0, 4.0, size=img.shape)  # sensor noise: no two images alike
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


# --- samples ----------------------------------------------------------------------------


class _PoolState:
    """Earlier clean captions per class, for near-duplicates: (uid, caption, fg, bg) in a
    bounded ring per class, so memory stays flat for large pools."""

    def __init__(self) -> None:
        self.clean: list[list[tuple[str, str, str | None, str | None]]] = [[] for _ in CLASS_NAMES]
        self.seen: list[int] = [0] * len(CLASS_NAMES)

    def remember(self, label: int, entry: tuple[str, str, str | None, str | None]) -> None:
        ring = self.clean[label]
        if len(ring) < NEAR_DUPLICATE_MEMORY:
            ring.append(entry)
        else:
            ring[self.seen[label] % NEAR_DUPLICATE_MEMORY] = entry
        self.seen[label] += 1


def _pool_sample(i: int, rates: dict[str, float], seed: int, image_size: int, state: _PoolState) -> dict[str, Any]:
    image_rng = np.random.default_rng(np.random.SeedSequence([seed, POOL_SPLIT, i]))
    rng = random.Random(int(image_rng.integers(0, 2**63)))
    uid = f"s{i:07d}"
    label = _UNIFORM_CLASS.pick(rng)
    fg, bg = _colours_for(label, rng)
    record: dict[str, Any] = {
        "uid": uid, "domain": DOMAIN_OF_CLASS[label], "label": label, "class_name": CLASS_NAMES[label],
        "fg_colour": fg, "bg_colour": bg, "mismatched": False, "caption_kind": "clean", "caption_label": label,
        "near_duplicate_of": None, "tricky": False,
    }  # fmt: skip
    roll = rng.random()
    noise_end = rates["noise_rate"]
    mismatch_end = noise_end + rates["mismatch_rate"]
    near_duplicate_end = mismatch_end + rates["near_duplicate_rate"]
    if roll < noise_end:
        record |= {"caption": _noise_caption(rng), "caption_kind": "noise", "caption_label": None}
    elif roll < mismatch_end:
        # A caption written for a class of another domain: the pair is wrong on purpose.
        other = _UNIFORM_CLASS.pick(rng)
        while DOMAIN_OF_CLASS[other] == DOMAIN_OF_CLASS[label]:
            other = _UNIFORM_CLASS.pick(rng)
        caption = _caption(other, *_colours_for(other, rng), rng)
        record |= {"caption": caption, "caption_kind": "mismatched", "caption_label": other, "mismatched": True}
    elif roll < near_duplicate_end and state.clean[label]:
        # The image takes the colours the copied caption names, so the pair stays right.
        ring = state.clean[label]
        base_uid, base, fg, bg = ring[int(rng.random() * len(ring))]
        record |= {"caption": _near_duplicate(base, rng), "caption_kind": "near_duplicate",
                   "near_duplicate_of": base_uid, "fg_colour": fg, "bg_colour": bg}  # fmt: skip
    else:  # clean (also the first near-duplicates of a class, which have nothing to copy yet)
        record["caption"] = _caption(label, fg, bg, rng)
    if record["caption_kind"] != "noise" and rng.random() < rates["tricky_rate"]:
        record |= {"caption": _make_tricky(record["caption"], rng), "tricky": True}
    if record["caption_kind"] == "clean":  # remembered as written, tricky edits included
        state.remember(label, (uid, record["caption"], fg, bg))
    record["jpg"] = _jpeg(_draw(label, record["fg_colour"], record["bg_colour"], image_rng, image_size))
    return record


def _eval_sample(i: int, seed: int, image_size: int) -> dict[str, Any]:
    image_rng = np.random.default_rng(np.random.SeedSequence([seed, EVAL_SPLIT, i]))
    rng = random.Random(int(image_rng.integers(0, 2**63)))
    label = i % len(CLASS_NAMES)  # balanced classes
    fg, bg = _colours_for(label, rng)
    return {
        "uid": f"e{i:07d}", "domain": DOMAIN_OF_CLASS[label], "label": label, "class_name": CLASS_NAMES[label],
        "fg_colour": fg, "bg_colour": bg, "caption": _caption(label, fg, bg, rng),
        "jpg": _jpeg(_draw(label, fg, bg, image_rng, image_size)),
    }  # fmt: skip


# --- shards -----------------------------------------------------------------------------


def _write_shard(path: Path, samples: list[dict[str, Any]], with_cls: bool) -> int:
    """One webdataset shard, atomically; fixed tar headers. Returns its size in bytes."""
    with atomic_write(path) as f:
        # mtime, owner and mode fixed: the same samples give the same bytes on any machine.
        with wds.TarWriter(f, user="", group="", mode=SHARD_FILE_MODE, mtime=0, encoder=False) as writer:
            for s in samples:
                meta = {k: v for k, v in s.items() if k != "jpg"}
                members: dict[str, Any] = {
                    "__key__": s["uid"],
                    "jpg": s["jpg"],
                    "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
                }
                if with_cls:
                    members["cls"] = str(s["label"]).encode("ascii")
                else:
                    members["txt"] = s["caption"].encode("utf-8")
                writer.write(members)
    return path.stat().st_size


def _check_rate(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be in [0, 1], got {value}")


def check_sample_args(
    num_pairs: int, shard_size: int, eval_pairs: int, image_size: int, mismatch_rate: float, noise_rate: float,
    near_duplicate_rate: float, tricky_rate: float,
) -> None:  # fmt: skip
    """The one check of the sample's arguments (write_sample and SampleConfig); ConfigError."""
    if num_pairs <= 0:
        raise ConfigError(f"num_pairs must be > 0, got {num_pairs}")
    if shard_size <= 0:
        raise ConfigError(f"shard_size must be > 0, got {shard_size}")
    if eval_pairs < 0:
        raise ConfigError(f"eval_pairs must be >= 0, got {eval_pairs}")
    if image_size < 16:
        raise ConfigError(f"image_size must be >= 16 (smaller images lose the shapes), got {image_size}")
    rates = {"mismatch_rate": mismatch_rate, "noise_rate": noise_rate,
             "near_duplicate_rate": near_duplicate_rate, "tricky_rate": tricky_rate}  # fmt: skip
    for name, value in rates.items():
        _check_rate(name, value)
    if mismatch_rate + noise_rate + near_duplicate_rate > 1.0:
        raise ConfigError(
            f"mismatch_rate + noise_rate + near_duplicate_rate must be <= 1, got "
            f"{mismatch_rate} + {noise_rate} + {near_duplicate_rate}"
        )


def _shard_names(prefix: str, count: int, shard_size: int) -> list[str]:
    return [f"{prefix}/{prefix}-{k:06d}.tar" for k in range((count + shard_size - 1) // shard_size)]


def _complete(out: Path, info: dict[str, Any]) -> bool:
    """Whether every file the info lists is there with its size; a listed name outside `out`
    (`mode_fast.core.files.inside`) is not this sample's: then it is written again."""
    sizes = info.get("file_bytes", {})
    try:
        paths = {rel: inside(out, rel, out / "sample_info.json") for rel in sizes}
    except InputError:
        return False
    return bool(sizes) and all(paths[rel].is_file() and paths[rel].stat().st_size == n for rel, n in sizes.items())


def _clear_stale(out: Path, keep: set[str]) -> None:
    """Delete shards of ours that the new output will not have, and temporaries a killed
    run left behind; nothing else."""
    for sub in ("pool", "eval"):
        folder = out / sub
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            ours_tmp = path.name.startswith(".") and path.name.endswith(".tmp")
            stale_shard = SHARD_NAME.match(path.name) and f"{sub}/{path.name}" not in keep
            if path.is_file() and (ours_tmp or stale_shard):
                path.unlink()


def write_sample(
    out_dir: str | Path,
    num_pairs: int = 10_000,
    shard_size: int = 1000,
    seed: int = 0,
    eval_pairs: int = 1000,
    mismatch_rate: float = 0.1,
    noise_rate: float = 0.05,
    near_duplicate_rate: float = 0.05,
    tricky_rate: float = 0.03,
    image_size: int = 32,
    force: bool = False,
    progress: Any = None,
) -> dict[str, Any]:
    """Write the sample pool and eval split under `out_dir` (layout: module docstring).

    Returns what it writes to ``out_dir/sample_info.json``: the arguments, shard paths
    (relative to `out_dir`), file sizes, and counts per domain, class and caption kind.
    A complete output of the same arguments is kept as it is unless `force`.
    `progress`: called with a one-line message after each shard written (the CLI prints it).
    """
    check_sample_args(num_pairs, shard_size, eval_pairs, image_size, mismatch_rate, noise_rate,
                      near_duplicate_rate, tricky_rate)  # fmt: skip
    rates = {"mismatch_rate": mismatch_rate, "noise_rate": noise_rate,
             "near_duplicate_rate": near_duplicate_rate, "tricky_rate": tricky_rate}  # fmt: skip
    out = Path(out_dir)
    args = {"num_pairs": num_pairs, "shard_size": shard_size, "seed": seed, "eval_pairs": eval_pairs,
            "image_size": image_size, **rates}  # fmt: skip
    info_path = out / "sample_info.json"
    if info_path.is_file() and not force:
        try:
            old = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        if old.get("format_version") == FORMAT_VERSION and old.get("args") == args and _complete(out, old):
            return old
    # From here on the output is incomplete: without the info file no later run takes it as done.
    info_path.unlink(missing_ok=True)
    pool_shards = _shard_names("pool", num_pairs, shard_size)
    eval_shards = _shard_names("eval", eval_pairs, shard_size)
    _clear_stale(out, set(pool_shards + eval_shards))

    file_bytes: dict[str, int] = {}
    per_class = [0] * len(CLASS_NAMES)
    kinds = {"clean": 0, "noise": 0, "mismatched": 0, "near_duplicate": 0}
    tricky = 0
    state = _PoolState()
    for k, rel in enumerate(pool_shards):
        indices = range(k * shard_size, min((k + 1) * shard_size, num_pairs))
        samples = [_pool_sample(i, rates, seed, image_size, state) for i in indices]
        for s in samples:
            per_class[s["label"]] += 1
            kinds[s["caption_kind"]] += 1
            tricky += s["tricky"]
        file_bytes[rel] = _write_shard(out / rel, samples, with_cls=False)
        if progress is not None:
            progress(f"sample: pool shard {k + 1}/{len(pool_shards)} written ({indices.stop:,} pairs)")
    eval_per_class = [0] * len(CLASS_NAMES)
    for k, rel in enumerate(eval_shards):
        samples = [
            _eval_sample(i, seed, image_size) for i in range(k * shard_size, min((k + 1) * shard_size, eval_pairs))
        ]
        for s in samples:
            eval_per_class[s["label"]] += 1
        file_bytes[rel] = _write_shard(out / rel, samples, with_cls=True)
        if progress is not None:
            progress(f"sample: eval shard {k + 1}/{len(eval_shards)} written")
    for rel, content in (("eval/classes.json", CLASS_NAMES), ("eval/templates.json", TEMPLATES)):
        write_json(out / rel, content)
        file_bytes[rel] = (out / rel).stat().st_size

    info = {
        "format_version": FORMAT_VERSION,
        "args": args,
        "pool_shards": pool_shards,
        "eval_shards": eval_shards,
        "classes_file": "eval/classes.json",
        "templates_file": "eval/templates.json",
        "classes": CLASS_NAMES,
        "domains": {domain: [CLASS_NAMES.index(n) for n in names] for domain, names in DOMAINS.items()},
        "pool_per_domain": {d: sum(per_class[c] for c, dc in enumerate(DOMAIN_OF_CLASS) if dc == d) for d in DOMAINS},
        "pool_per_class": per_class,
        "eval_per_class": eval_per_class,
        "caption_kinds": kinds,
        "tricky": tricky,
        "file_bytes": file_bytes,
        "total_bytes": sum(file_bytes.values()),
    }
    write_json(info_path, info)  # last: its presence marks the output complete
    return info


# --- one run -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleConfig:
    """`mode-fast sample`'s settings (each flag declared here once; checked on creation)."""

    out: Path = option(help="output folder (layout: pool/, eval/, sample_info.json)", result=False)
    num_pairs: int = option(10_000, help="pool size (default 10000)", result=True)
    shard_size: int = option(1000, help="samples per tar shard (default 1000)", result=True)
    eval_pairs: int = option(1000, help="held-out labelled images (default 1000)", result=True)
    seed: int = option(0, help="the sample's seed", result=True)
    image_size: int = option(32, help="image side in pixels (default 32)", result=True)
    mismatch_rate: float = option(0.1, help="share of wrong pairs (default 0.1)", result=True)
    noise_rate: float = option(0.05, help="share of word-free captions (default 0.05)", result=True)
    near_duplicate_rate: float = option(0.05, help="default 0.05", result=True)
    tricky_rate: float = option(0.03, help="share with tabs/newlines/non-ASCII (default 0.03)", result=True)
    force: bool = option(False, help="rewrite even if a complete output of the same arguments exists", result=False)

    def __post_init__(self) -> None:
        check_ranges(self)
        check_sample_args(self.num_pairs, self.shard_size, self.eval_pairs, self.image_size, self.mismatch_rate,
                          self.noise_rate, self.near_duplicate_rate, self.tricky_rate)  # fmt: skip


def run_sample(cfg: SampleConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the sample `cfg` describes (write_sample); `progress` gets one line per shard."""
    kwargs = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "out"}
    return write_sample(cfg.out, **kwargs, progress=progress)
