"""Decoding one image with bounded memory, and the tally of images skipped as bad.

The rule, for the training loader and eval's tasks alike (`decode_image`):
- The pixel count is read from the header before any pixel is decoded and compared with
  `MAX_PIXELS`, PIL's default MAX_IMAGE_PIXELS (about 89.5 megapixels, 268 MB as RGB),
  fixed here rather than read from PIL's global (which a library may have changed).
- An image within the limit decodes exactly as `Image.open(...).convert("RGB")`.
- A JPEG over it decodes at the smallest DCT scale (1/2, 1/4 or 1/8; libjpeg's scaled
  decoding through `Image.draft`) whose size fits, so it costs what the reduced image costs;
  the model's transform resizes far below that anyway. Any other format over the limit is
  refused as "over pixel limit" without decoding.
- Anything PIL cannot decode (not an image, truncated data, a bomb met while decoding) is
  "undecodable image".
Bad data never raises here: callers skip the sample and count it by reason and shard,
and `BadImages` stops the job with one line once the share of distinct bad images passes
--max-bad-share.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from mode_fast.core.errors import InputError
from mode_fast.data.io import ReadReport

MAX_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)  # PIL's default Image.MAX_IMAGE_PIXELS
UNDECODABLE = "undecodable image"
OVER_PIXEL_LIMIT = "over pixel limit"
DEFAULT_MAX_BAD_SHARE = 0.001  # a web pool always holds a few; more means a broken pool
_JPEG_MAGIC = b"\xff\xd8\xff"


class Decoded(NamedTuple):
    """An RGB image, or None with the reason it was refused and what PIL said."""

    image: Any
    reason: str | None = None
    detail: str = ""


Skip = tuple[str, str, str]  # (shard, key, reason)


def decode_image(source: bytes | str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Decoded:
    """The image in `source` (bytes or a file path) as RGB, or why it cannot be used (see
    the module doc). Never raises for bad data."""
    from PIL import Image

    with warnings.catch_warnings():
        # PIL's own size check (warning, then error at twice the limit) is replaced by ours
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = _open(source)
        except _OverLimit as e:
            return Decoded(None, OVER_PIXEL_LIMIT, str(e))
        except Exception as e:  # PIL raises many types for broken files
            return Decoded(None, UNDECODABLE, _detail(e))
        try:
            with im:
                width, height = im.size
                if width * height > max_pixels and not _draft_to_fit(im, max_pixels):
                    return Decoded(
                        None, OVER_PIXEL_LIMIT, f"{width} x {height} pixels, over the limit of {max_pixels:,}"
                    )
                return Decoded(im.convert("RGB"))
        except Image.DecompressionBombError as e:  # a frame or layer over PIL's limit
            return Decoded(None, OVER_PIXEL_LIMIT, _detail(e))
        except Exception as e:
            return Decoded(None, UNDECODABLE, _detail(e))


class _OverLimit(Exception):
    pass


def _detail(e: BaseException) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):  # its text names a file object, not the sample
        return "not an image format PIL reads"
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _open(source: bytes | str | os.PathLike) -> Any:
    """Image.open, header only. PIL refuses a header over twice its limit before anything
    can be done; a JPEG is then opened by its plugin directly, so it can be drafted."""
    from PIL import Image, JpegImagePlugin

    fp: Any = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else os.fspath(source)
    try:
        return Image.open(fp)
    except Image.DecompressionBombError as e:
        if isinstance(fp, io.BytesIO):
            fp.seek(0)
            head = fp.read(3)
            fp.seek(0)
        else:
            with open(fp, "rb") as f:
                head = f.read(3)
        if head != _JPEG_MAGIC:
            raise _OverLimit(_detail(e)) from e
        return JpegImagePlugin.JpegImageFile(fp)


def _draft_to_fit(im: Any, max_pixels: int) -> bool:
    """Set a JPEG to decode at the smallest scale that fits `max_pixels`; False when that
    is not possible (another format, or still over at 1/8)."""
    if im.format not in ("JPEG", "MPO"):
        return False
    width, height = im.size
    for scale in (2, 4, 8):
        if math.ceil(width / scale) * math.ceil(height / scale) <= max_pixels:
            break
    else:
        return False
    # draft picks the largest scale s <= min(W // w, H // h): this request gives `scale`
    if im.draft("RGB", (max(1, width // scale), max(1, height // scale))) is None:
        return False
    return im.size[0] * im.size[1] <= max_pixels


# --------------------------------------------------------------------------- the tally
@dataclass
class BadImages:
    """The distinct images a job skipped as bad, as (shard, key, reason): a sample met
    again (the next epoch, a resumed step) is counted once."""

    records: set[Skip] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.records)

    def add(self, records: Iterable[Iterable[str]]) -> list[Skip]:
        """Add records; returns those not seen before, in the order given."""
        new = []
        for record in records:
            shard, key, reason = (str(x) for x in record)
            if (shard, key, reason) not in self.records:
                self.records.add((shard, key, reason))
                new.append((shard, key, reason))
        return new

    def clear(self) -> None:
        self.records.clear()

    def sorted(self) -> list[Skip]:
        return sorted(self.records)

    def report(self) -> ReadReport:
        """Counts by reason and shard, in the tally every reader reports with."""
        report = ReadReport()
        for shard, _, reason in self.sorted():
            report.skip(shard, reason)
        return report

    def summary(self) -> str:
        """'N (reason n, ...)' for a log line."""
        counts = self.report().skipped
        return f"{len(self)} ({', '.join(f'{r} {n}' for r, n in sorted(counts.items()))})"

    def over(self, total: int, max_share: float) -> bool:
        return len(self) > max_share * total

    def check(self, total: int, max_share: float, what: str, hint: str = "") -> None:
        """InputError, one line, when more than `max_share` of `total` images are bad."""
        if not self.over(total, max_share):
            return
        examples = "; ".join(f"{shard} sample {key!r} ({reason})" for shard, key, reason in self.sorted()[:3])
        raise InputError(
            f"{len(self)} of the {total} {what} are bad images ({100 * len(self) / max(total, 1):.3g}%), "
            f"over --max-bad-share {max_share:g} ({100 * max_share:g}%): e.g. {examples}{hint}; "
            "remove or re-encode them, or raise --max-bad-share"
        )
