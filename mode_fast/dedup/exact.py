"""The exact stage: which records repeat an earlier record's bytes.

A record's hash is blake2b-128 of its image member's bytes (``image``), or of its
normalised caption, a NUL byte and the image bytes (``caption+image``). The caption is
normalised as people retype captions: Unicode NFKC, case folded, runs of whitespace made
one space, ends stripped. A record without an image member (parquet, jsonl, a tar sample
without one of the image extensions) has no hash and is never an exact duplicate; the job
counts it as not checked. The first record of each hash in pool order is kept.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np

EXACT_MODES = ("image", "caption+image", "off")
NO_HASH = b""  # the hash of a record the stage cannot check


def normalise_caption(caption: str) -> str:
    """NFKC, case folded, whitespace runs made one space, ends stripped (module docstring)."""
    return " ".join(unicodedata.normalize("NFKC", caption).casefold().split())


def image_bytes(sample: dict[str, Any], image_exts: Sequence[str]) -> bytes | None:
    """The bytes of the first of `image_exts` the sample holds (a tar sample's members), else None."""
    for ext in image_exts:
        data = sample.get(ext)
        if isinstance(data, bytes | bytearray):
            return bytes(data)
    return None


def record_hash(mode: str, caption: str, image: bytes | None) -> bytes:
    """The record's 16-byte hash under `mode`, or NO_HASH (no image, or mode off)."""
    if mode == "off" or image is None:
        return NO_HASH
    h = hashlib.blake2b(digest_size=16)
    if mode == "caption+image":
        h.update(normalise_caption(caption).encode("utf-8"))
        h.update(b"\0")
    h.update(image)
    return h.digest()


def first_occurrence(hashes: Sequence[bytes]) -> np.ndarray:
    """For each item, the index of the first item with its hash (itself when it is the first,
    or when it has no hash): item i is an exact duplicate when the result differs from i."""
    first: dict[bytes, int] = {}
    out = np.arange(len(hashes), dtype=np.int64)
    for i, h in enumerate(hashes):
        if h == NO_HASH:
            continue
        out[i] = first.setdefault(h, i)
    return out
