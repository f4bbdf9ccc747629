"""Counting the contrastive kernels' Triton launches in a test: proof that a kernel ran, no
silent fallback to the torch path. The production module keeps no counter; counting()
wraps its launch point and host functions while open.

Keys of the Counter it yields:
- "<fwd|bwd>:<mode>", one per launch. The mode names the host path that launched it: the
  square losses ("clip", "siglip": contrastive_forward / contrastive_backward), or the
  rectangular kernels called directly ("rows", "rows_merge" for a ring step merging into a
  running LSE, "siglip_rect" for SigLIP's negatives-only block); launches after the first
  of one host call (CLIP's deterministic column LSE, the backward's columns pass) add
  "_cols".
- "atomic", one per launch with float atomics (CLIP's column sums, the atomic dK).
- "dk:atomic" / "dk:columns", one per backward by how it formed dK.
Used in the interpreted test scripts (fresh processes import it from tests/) and in-process.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator


def _square_mode(args: dict) -> str:
    return "siglip" if args["siglip"] else "clip"


def _rows_mode(args: dict) -> str:
    if args["siglip"]:
        return "siglip_rect"
    return "rows_merge" if args.get("merge_into") is not None else "rows"


@contextlib.contextmanager
def counting() -> Iterator[collections.Counter]:
    from mode_fast.kernels import contrastive_loss as cl

    counts: collections.Counter = collections.Counter()
    scope: list[list] = []  # [mode, launches so far] of the outermost host call, while in it

    def bound(fn: Callable, a: tuple, kw: dict) -> dict:
        b = inspect.signature(fn).bind(*a, **kw)
        b.apply_defaults()
        return b.arguments

    def host(fn: Callable, mode_of: Callable[[dict], str]) -> Callable:
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            args = bound(fn, a, kw)
            if fn is real["rows_backward"]:
                counts[f"dk:{args['bwd']}"] += 1
            if scope:  # inside an outer host call: its mode names these launches
                return fn(*a, **kw)
            scope.append([mode_of(args), 0])
            try:
                return fn(*a, **kw)
            finally:
                scope.pop()

        return wrapper

    def launch(*a, **kw):
        args = bound(real["_launch"], a, kw)
        mode, seen = scope[-1]
        scope[-1][1] += 1
        counts[f"{args['kind']}:{mode}{'_cols' if seen else ''}"] += 1
        if args["consts"].get("COLS") or args["consts"].get("DK_ATOMIC"):
            counts["atomic"] += 1
        return real["_launch"](*a, **kw)

    names = ("contrastive_forward", "contrastive_backward", "rows_forward", "rows_backward", "_launch")
    real = {name: getattr(cl, name) for name in names}
    wrappers = {
        "contrastive_forward": host(real["contrastive_forward"], _square_mode),
        "contrastive_backward": host(real["contrastive_backward"], _square_mode),
        "rows_forward": host(real["rows_forward"], _rows_mode),
        "rows_backward": host(real["rows_backward"], _rows_mode),
        "_launch": launch,
    }
    try:
        for name, fn in wrappers.items():
            setattr(cl, name, fn)
        yield counts
    finally:
        for name, fn in real.items():
            setattr(cl, name, fn)
