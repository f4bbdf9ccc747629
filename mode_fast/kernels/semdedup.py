"""SemDeDup's within-cluster step: for each item, the most similar item before it.

Rule (Abbas et al., 2023, "SemDeDup"; facebookresearch/SemDeDup's ``semdedup``). The
items of one cluster are given in their keep order (the first of a group is kept); for
item j the step needs

    best[j] = max_{i < j} x_i . x_j        and        arg[j] = an i < j attaining it,

and item j is removed at a given eps when best[j] > 1 - eps. The public code forms the
n x n matrix ``x @ x.T``, zeroes its diagonal, keeps ``triu(., 1)`` and takes the column
max: O(n^2) memory, which is what caps the cluster sizes its users can pick. Here the
n x n matrix never exists: the torch path takes rows of items in chunks against the items
before them (O(chunk * n) scratch), the Triton path tiles both ways with a causal mask
(O(n * D) memory in all).

Differences from the public code, on purpose: best[0] is -inf and arg[0] is -1 (the first
item has nothing before it) where the public code reports 0, and a negative maximum stays
negative where the public code clips it at 0 (the zeros of its triangle). ``max(best, 0)``
is the public figure; for every eps < 1 the removed sets are the same. Ties go to the
lowest index i, so an item's match is the earliest of several exact copies.

Inputs are used as given: SemDeDup's similarity is the cosine, so pass rows normalised to
unit length (``torch.nn.functional.normalize``).

Layers: torch path (max_earlier_similarity_torch, the CPU backend) -> max_earlier_similarity().
The oracle that materialises the matrix as the public code does is
``reference.max_earlier_similarity_dense``.
"""

from __future__ import annotations

import torch

from . import dispatch

# Scratch of the torch path, in similarity entries per chunk (64 MB of fp32).
_CHUNK_ENTRIES = 1 << 24


def max_earlier_similarity_torch(
    x: torch.Tensor, chunk_entries: int = _CHUNK_ENTRIES
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch path: rows [j0, j1) against items [0, j1), one matmul per chunk."""
    n = x.shape[0]
    best = torch.full((n,), float("-inf"), dtype=torch.float32, device=x.device)
    arg = torch.full((n,), -1, dtype=torch.int64, device=x.device)
    j0 = 1
    while j0 < n:
        # rows per chunk so that rows * j1 <= chunk_entries (at least one row)
        rows = max(1, min(n - j0, chunk_entries // n))
        j1 = j0 + rows
        sims = (x[j0:j1] @ x[:j1].T).float()
        # only i < j counts: column i of row j is kept when i < j
        cols = torch.arange(j1, device=x.device)
        ahead = cols[None, :] >= torch.arange(j0, j1, device=x.device)[:, None]
        sims.masked_fill_(ahead, float("-inf"))
        # lowest index among ties: max gives the value, then the first column equal to it
        value = sims.max(dim=1).values
        first = (sims == value[:, None]).to(torch.uint8).argmax(dim=1)
        best[j0:j1] = value
        arg[j0:j1] = first
        j0 = j1
    return best, arg


def _validate(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"max_earlier_similarity: x must be 2-D [n, D], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"max_earlier_similarity: x must be float32, float16 or bfloat16, got {x.dtype}")


@torch.no_grad()
def max_earlier_similarity(x: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """For each row j of x [n, D]: (best float32 [n], arg int64 [n]), the largest x_i . x_j over i < j and that i.

    Row 0 gets (-inf, -1). Ties go to the lowest i. backend: "torch" (chunked matmuls, any
    device) or "auto". Raises ValueError on a non-2-D or non-float x, or a non-finite result
    (NaN or inf in x).
    """
    _validate(x)
    backend = dispatch.pick("semdedup", dispatch.EARLIER_MAX, x, backend)
    best, arg = max_earlier_similarity_torch(x)
    if x.shape[0] > 1:
        bad = ~torch.isfinite(best[1:])
        if bool(bad.any()):
            first = int(bad.nonzero()[0]) + 1
            raise ValueError(f"max_earlier_similarity: non-finite similarity at row {first}: x contains NaN or inf")
    return best, arg
