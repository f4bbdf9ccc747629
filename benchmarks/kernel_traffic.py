"""Counted global-memory traffic of the Triton kernels, per call, in bytes (atomics: a count).

The formulas are stated in each kernel file's opening comment (mode_fast/kernels/
kmeans_assign.py, contrastive_loss.py and semdedup.py, "Global-memory traffic per call"); this module
computes them for benchmarks/kernel_report.py (the traffic table), the benchmarks (counted
traffic next to each config's time) and tests/test_contrastive_loss.py (dispatch's default
backward mode is the one with the lower count). Loads as issued by the kernel: re-reads
served by L2 count too. Pure arithmetic: no torch, no triton.
"""

from __future__ import annotations


def kmeans_assign_traffic(n: int, k: int, d: int, itemsize: int, block_n: int, block_k: int) -> dict[str, float]:
    """kmeans_assign.py's traffic formulas for one call of the Triton backend with this tile
    config; "compulsory" is inputs read once and the public outputs (labels int64, sqdist
    fp32) written once."""
    programs = -(-n // block_n)
    tiles = -(-k // block_k)
    loads = n * d * itemsize * tiles + programs * k * (d * itemsize + 4) + 2 * n * d * itemsize
    stores = 36 * n
    return {
        "global_load_bytes": float(loads),
        "global_store_bytes": float(stores),
        "atomic_ops": 0.0,
        "compulsory_bytes": float((n + k) * d * itemsize + 12 * n),
    }


def semdedup_traffic(n: int, d: int, itemsize: int, block_j: int, block_i: int) -> dict[str, float]:
    """semdedup.py's traffic formulas for one call of the Triton backend with this tile config:
    item block b loops over the I tiles starting below its last item, and each I tile loads
    the block's rows and the tile's rows over all of D (full tiles, as issued). "compulsory"
    is x read once and the outputs (best fp32, arg int64) written once."""
    tiles = sum(-(-(min((b + 1) * block_j, n) - 1) // block_i) for b in range(-(-n // block_j)))
    return {
        "global_load_bytes": float(tiles * (block_j + block_i) * d * itemsize),
        "global_store_bytes": float(12 * n),
        "atomic_ops": 0.0,
        "compulsory_bytes": float(n * d * itemsize + 12 * n),
    }


def _pass_traffic(
    m: int,
    n: int,
    d: int,
    s: int,
    bm: int,
    bn: int,
    kind: str,
    *,
    lse_loads: int = 0,
    cols: bool = False,
    merge: bool = False,
    dk_atomic: bool = False,
) -> dict[str, float]:
    """One launch of a contrastive block kernel; lse_loads: how many LSE vectors the
    backward reads (per row once, per column block once per tile)."""
    p, c = -(-m // bm), -(-n // bn)
    tiles = p * c
    if kind == "fwd":
        loads = tiles * (bm + bn) * d * s + (m * 4 if merge else 0) + (tiles * bn * 4 if cols else 0)
        stores, atomics = m * 4, (tiles * bn if cols else 0)
    else:
        loads = tiles * ((bm + 2 * bn) * d * s + bm * d * 4) + (tiles * bm * d * s if dk_atomic else 0)
        loads += (m * 4 if lse_loads else 0) + (tiles * bn * 4 if lse_loads > 1 else 0)
        stores, atomics = tiles * bm * d * 4 + 2 * p * 4, (tiles * bn * d if dk_atomic else 0)
    return {
        "global_load_bytes": float(loads),
        "global_store_bytes": float(stores),
        "atomic_ops": float(atomics),
        "atomic_bytes": 4.0 * atomics,
    }


def contrastive_traffic(
    m: int,
    n: int,
    d: int,
    itemsize: int,
    block_m: int,
    block_n: int,
    *,
    loss: str = "clip",
    bwd: str = "atomic",
    deterministic: bool = False,
) -> dict[str, dict[str, float]]:
    """contrastive_loss.py's traffic formulas for one call, in bytes (atomics: a count), with
    this tile config: {"fwd": ..., "bwd": ...}. loss: "clip" (square, M = N), "rows" (one
    InfoNCE direction, M queries x N keys) or "siglip"; bwd: "atomic" or "columns";
    deterministic: CLIP's column LSE by a second row pass. "compulsory": inputs read once,
    outputs written once."""
    s, bm, bn = itemsize, block_m, block_n
    softmax = loss != "siglip"
    if loss == "clip" and deterministic:
        a, b = _pass_traffic(m, n, d, s, bm, bn, "fwd"), _pass_traffic(n, m, d, s, bm, bn, "fwd")
        fwd = {k: a[k] + b[k] for k in a}
    else:
        fwd = _pass_traffic(m, n, d, s, bm, bn, "fwd", cols=loss == "clip")
    lse = (2 if loss == "clip" else 1) if softmax else 0
    if bwd == "atomic":
        back = _pass_traffic(m, n, d, s, bm, bn, "bwd", lse_loads=lse, dk_atomic=True)
    else:
        a = _pass_traffic(m, n, d, s, bm, bn, "bwd", lse_loads=lse)
        b = _pass_traffic(n, m, d, s, bm, bn, "bwd", lse_loads=2 if softmax else 0)
        back = {k: a[k] + b[k] for k in a}
    lse_bytes = (m + (n if loss == "clip" else 0)) * 4 if softmax else m * 4
    fwd["compulsory_bytes"] = float((m + n) * d * s + lse_bytes)
    back["compulsory_bytes"] = float((m + n) * d * (s + 4) + (lse_bytes if softmax else 0))
    return {"fwd": fwd, "bwd": back}
