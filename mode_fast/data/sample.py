"""The embedded sample: a deterministic synthetic image-text pool for demos, tests and benchmarks.

Layout written by ``write_sample(out_dir)`` / ``mode-fast sample --out DIR``::

    DIR/pool/pool-000000.tar ...   training pool, webdataset shards
    DIR/eval/eval-000000.tar ...   held-out labelled split (no mismatched pairs)
    DIR/eval/classes.json          class names, index = label
    DIR/eval/templates.json        zero-shot prompt templates ("a photo of a {}.")
    DIR/sample_info.json           arguments, shard list, counts per domain

Each pool sample is ``<key>.jpg`` (RGB, 32 px by default), ``<key>.txt`` (the caption) and
``<key>.json`` ({uid, caption, domain, label, class_name, mismatched}); eval samples carry
``<key>.cls`` (the label) instead of a caption. Four visual domains with different image
statistics (shapes, textures, glyphs, scenes) give clustering something to find. Captions
mix WordNet words (so MetaCLIP matching has work) with a long tail of modifiers, ~5% noise
captions with no English word, ~10% mismatched pairs (caption of another domain), ~5%
near-duplicates of an earlier caption and ~3% tricky text (tabs, newlines, non-ASCII).

Output is byte-identical for the same arguments: every random draw comes from
``numpy.random.default_rng([seed, split, index])`` and tar headers are fixed.
"""
from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mode_fast.data.io import atomic_write, write_json

DOMAINS: dict[str, list[str]] = {
    "shapes": ["circle", "square", "triangle", "cross"],
    "textures": ["stripes", "dots", "checkerboard", "waves"],
    "glyphs": ["digit one", "digit seven", "letter A", "letter X"],
    "scenes": ["beach", "forest", "night sky", "desert"],
}
CLASS_NAMES = [name for names in DOMAINS.values() for name in names]
DOMAIN_OF_CLASS = [d for d, names in DOMAINS.items() for _ in names]
TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of the {}."]

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
           "purple": (140, 50, 170), "orange": (240, 140, 30), "black": (20, 20, 20), "white": (245, 245, 245)}
COLOUR_NAMES = list(COLOURS)
# Long tail: the first modifiers are drawn far more often than the last (Zipf-like).
MODIFIERS = ["simple", "small", "large", "bright", "dark", "old", "vintage", "abstract", "colorful", "minimal",
             "blurry", "tiny", "huge", "shiny", "soft", "sharp", "pale", "vivid", "rough", "smooth", "flat",
             "glossy", "faded", "ancient", "modern", "rustic", "elegant", "quirky", "serene", "gloomy"]
NOUNS_EXTRA = ["photo", "picture", "drawing", "illustration", "painting", "sketch", "icon", "poster", "print",
               "wallpaper", "postcard", "sticker", "stamp", "banner", "canvas"]
TEMPLATES_CAPTION = [
    "a {mod} {noun} of a {colour} {cls}",
    "{colour} {cls} on a {colour2} background",
    "{cls}, {mod} {noun}",
    "{mod} {colour} {cls} {noun} for sale",
    "my {noun} of the {cls}. {mod}!",
    "{cls} {noun}: {colour} and {colour2}",
]
TRICKY = ["\t", "\n", " café ", " naïve ", " 😀 ", " Ünïcödé ", "?!", " ; ", "`quoted`"]

SHARD_TAR_MODE = 0o644


def _zipf_choice(rng: np.random.Generator, items: list[str]) -> str:
    ranks = np.arange(1, len(items) + 1)
    p = 1.0 / ranks
    return items[int(rng.choice(len(items), p=p / p.sum()))]


# --- images -----------------------------------------------------------------------------


def _draw(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    domain, name = DOMAIN_OF_CLASS[label], CLASS_NAMES[label]
    fg = np.array(COLOURS[COLOUR_NAMES[rng.integers(0, 6)]], dtype=np.float32)
    bg = np.array(COLOURS[COLOUR_NAMES[rng.integers(0, len(COLOUR_NAMES))]], dtype=np.float32) * 0.5 + 100
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if domain == "shapes":
        img = Image.new("RGB", (size, size), tuple(int(v) for v in bg))
        d = ImageDraw.Draw(img)
        r = size * rng.uniform(0.2, 0.4)
        cx, cy = size * rng.uniform(0.35, 0.65, size=2)
        box = [cx - r, cy - r, cx + r, cy + r]
        colour = tuple(int(v) for v in fg)
        if name == "circle":
            d.ellipse(box, fill=colour)
        elif name == "square":
            d.rectangle(box, fill=colour)
        elif name == "triangle":
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
        else:
            w = max(2, int(r / 2))
            d.rectangle([cx - r, cy - w / 2, cx + r, cy + w / 2], fill=colour)
            d.rectangle([cx - w / 2, cy - r, cx + w / 2, cy + r], fill=colour)
        arr = np.asarray(img, dtype=np.float32)
    elif domain == "textures":
        freq = rng.uniform(3, 7)
        phase = rng.uniform(0, 2 * np.pi)
        if name == "stripes":
            mask = np.sin(2 * np.pi * freq * xx + phase) > 0
        elif name == "dots":
            mask = (np.sin(2 * np.pi * freq * xx + phase) * np.sin(2 * np.pi * freq * yy)) > 0.5
        elif name == "checkerboard":
            mask = ((np.floor(freq * xx) + np.floor(freq * yy)) % 2) == 0
        else:
            mask = np.sin(2 * np.pi * freq * yy + 3 * np.sin(2 * np.pi * 2 * xx) + phase) > 0
        arr = np.where(mask[..., None], fg, bg)
    elif domain == "glyphs":
        img = Image.new("RGB", (size, size), tuple(int(v) for v in bg))
        glyph = {"digit one": "1", "digit seven": "7", "letter A": "A", "letter X": "X"}[name]
        font = ImageFont.load_default(size=int(size * 0.8))
        d = ImageDraw.Draw(img)
        d.text((size * rng.uniform(0.2, 0.4), size * rng.uniform(-0.05, 0.1)), glyph, fill=tuple(int(v) for v in fg), font=font)
        arr = np.asarray(img, dtype=np.float32)
    else:
        horizon = rng.uniform(0.35, 0.65)
        top, bottom = {
            "beach": ((110, 180, 240), (230, 210, 150)),
            "forest": ((150, 200, 230), (30, 110, 40)),
            "night sky": ((10, 10, 50), (30, 30, 40)),
            "desert": ((240, 200, 120), (210, 160, 80)),
        }[name]
        arr = np.where((yy < horizon)[..., None], np.array(top, np.float32), np.array(bottom, np.float32))
        if name == "night sky":
            stars = rng.random((size, size)) > 0.97
            arr[stars & (yy < horizon)] = 250
        else:
            cx, cy = rng.uniform(0.2, 0.8), rng.uniform(0.05, horizon - 0.1)
            arr[((xx - cx) ** 2 + (yy - cy) ** 2) < 0.006] = (255, 240, 120)
    arr = arr + rng.normal(0, 8, size=(size, size, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# --- captions ---------------------------------------------------------------------------


def _caption_for(label: int, rng: np.random.Generator) -> str:
    template = TEMPLATES_CAPTION[int(rng.integers(0, len(TEMPLATES_CAPTION)))]
    colours = rng.choice(COLOUR_NAMES, size=2, replace=False)
    return template.format(mod=_zipf_choice(rng, MODIFIERS), noun=_zipf_choice(rng, NOUNS_EXTRA),
                           colour=colours[0], colour2=colours[1], cls=CLASS_NAMES[label])


def _noise_caption(rng: np.random.Generator) -> str:
    # Digits only after the file name: hex could spell words ("edda" is a WordNet lemma).
    return f"IMG_{int(rng.integers(10000, 99999))}.JPG {int(rng.integers(0, 10 ** 6)):06d}-{int(rng.integers(0, 999)):03d}"


def sample_captions(n: int, seed: int = 0) -> list[str]:
    """Caption-like text only (no images), quickly: for matcher benchmarks."""
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, 2, i])
        out.append(_noise_caption(rng) if rng.random() < 0.05 else _caption_for(int(rng.integers(0, len(CLASS_NAMES))), rng))
    return out


# --- shards -----------------------------------------------------------------------------


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed headers: the same arguments give byte-identical shards
    info.mode = SHARD_TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


def _pool_sample(i: int, seed: int, size: int, mismatch_rate: float, captions: list[str]) -> dict[str, Any]:
    rng = np.random.default_rng([seed, 0, i])
    label = int(rng.integers(0, len(CLASS_NAMES)))
    image = _jpeg(_draw(label, rng, size))
    roll = rng.random()
    mismatched = False
    if roll < 0.05:
        caption = _noise_caption(rng)
    elif roll < 0.05 + mismatch_rate:
        # A caption written for a class of another domain: the pair is wrong on purpose.
        other = int(rng.integers(0, len(CLASS_NAMES)))
        while DOMAIN_OF_CLASS[other] == DOMAIN_OF_CLASS[label]:
            other = int(rng.integers(0, len(CLASS_NAMES)))
        caption, mismatched = _caption_for(other, rng), True
    elif roll < 0.10 + mismatch_rate and captions:
        base = captions[int(rng.integers(0, len(captions)))]  # near-duplicate of an earlier caption
        caption = base + rng.choice(["", "!", " .", "  "]) if rng.random() < 0.5 else base.capitalize()
    else:
        caption = _caption_for(label, rng)
    if rng.random() < 0.03 and not caption.lower().startswith("img_"):  # noise stays word-free
        pos = int(rng.integers(0, len(caption) + 1))
        caption = caption[:pos] + TRICKY[int(rng.integers(0, len(TRICKY)))] + caption[pos:]
    return {"uid": f"s{i:07d}", "caption": caption, "domain": DOMAIN_OF_CLASS[label], "label": label,
            "class_name": CLASS_NAMES[label], "mismatched": mismatched, "jpg": image}


def _write_shard(path: Path, samples: list[dict[str, Any]], eval_split: bool) -> None:
    with atomic_write(path) as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for s in samples:
            key = s["uid"]
            meta = {k: v for k, v in s.items() if k != "jpg"}
            if eval_split:
                _add(tf, f"{key}.cls", str(s["label"]).encode())
            _add(tf, f"{key}.jpg", s["jpg"])
            _add(tf, f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode())
            if not eval_split:
                _add(tf, f"{key}.txt", s["caption"].encode("utf-8"))


def write_sample(
    out_dir: str | Path,
    num_pairs: int = 10_000,
    shard_size: int = 1000,
    seed: int = 0,
    eval_pairs: int = 1000,
    mismatch_rate: float = 0.1,
    image_size: int = 32,
) -> dict[str, Any]:
    """Write the sample pool and eval split; returns (and writes) sample_info.json's content."""
    if num_pairs <= 0 or shard_size <= 0 or eval_pairs < 0 or not 0 <= mismatch_rate <= 0.8 or image_size < 8:
        raise ValueError("need num_pairs > 0, shard_size > 0, eval_pairs >= 0, 0 <= mismatch_rate <= 0.8, image_size >= 8")
    out = Path(out_dir)
    args = {"num_pairs": num_pairs, "shard_size": shard_size, "seed": seed, "eval_pairs": eval_pairs,
            "mismatch_rate": mismatch_rate, "image_size": image_size}
    info_path = out / "sample_info.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("args") == args and all((out / p).exists() for p in info["pool_shards"] + info["eval_shards"]):
            return info  # complete output of the same arguments: nothing to do

    pool_shards, eval_shards = [], []
    domain_counts = dict.fromkeys(DOMAINS, 0)
    mismatched = 0
    captions: list[str] = []
    for start in range(0, num_pairs, shard_size):
        samples = [_pool_sample(i, seed, image_size, mismatch_rate, captions) for i in range(start, min(start + shard_size, num_pairs))]
        for s in samples:
            domain_counts[s["domain"]] += 1
            mismatched += s["mismatched"]
            captions.append(s["caption"])
        rel = f"pool/pool-{start // shard_size:06d}.tar"
        _write_shard(out / rel, samples, eval_split=False)
        pool_shards.append(rel)
    for start in range(0, eval_pairs, shard_size):
        samples = []
        for i in range(start, min(start + shard_size, eval_pairs)):
            rng = np.random.default_rng([seed, 1, i])
            label = i % len(CLASS_NAMES)  # balanced classes
            samples.append({"uid": f"e{i:07d}", "label": label, "class_name": CLASS_NAMES[label],
                            "domain": DOMAIN_OF_CLASS[label], "jpg": _jpeg(_draw(label, rng, image_size))})
        rel = f"eval/eval-{start // shard_size:06d}.tar"
        _write_shard(out / rel, samples, eval_split=True)
        eval_shards.append(rel)
    write_json(out / "eval" / "classes.json", CLASS_NAMES)
    write_json(out / "eval" / "templates.json", TEMPLATES)
    info = {"args": args, "pool_shards": pool_shards, "eval_shards": eval_shards, "classes": CLASS_NAMES,
            "domains": DOMAINS, "domain_counts": domain_counts, "mismatched": mismatched}
    write_json(info_path, info)
    return info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-pairs", type=int, default=10_000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--eval-pairs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--mismatch-rate", type=float, default=0.1)


def run(args: argparse.Namespace) -> int:
    info = write_sample(args.out, num_pairs=args.num_pairs, shard_size=args.shard_size, seed=args.seed,
                        eval_pairs=args.eval_pairs, mismatch_rate=args.mismatch_rate, image_size=args.image_size)
    print(f"sample: {info['args']['num_pairs']:,} pairs in {len(info['pool_shards'])} shards, "
          f"{info['args']['eval_pairs']:,} eval images, {info['mismatched']} mismatched, in {args.out}")
    return 0
