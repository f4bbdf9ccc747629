"""Fused k-means assignment: the nearest of K centers for each of N points.

Maths. ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, and ||x||^2 is the same for every c, so
    label(x) = argmin_k  s_k(x),   s_k(x) = ||c_k||^2 - 2 x.c_k
is one N x K x D matmul followed by a row argmin (2*N*K*D FLOPs). The Triton kernel tiles
over points (BLOCK_N) and centers (BLOCK_K), accumulates x.c over D in BLOCK_D slices
(so any D fits in shared memory), and keeps a running top 3 (scores; indices of the
first two) per point in registers: the N x K score matrix never exists in memory.

Exact labels. Each computed score s^_k is within g = gamma_{D+2} * (||x|| + max||c||)^2
of s_k (fp32 dot-product bound, gamma_n = n*u / (1 - n*u)). So when the second-best
score is more than 2g above the best, the argmin is certain; otherwise the point is
re-checked on the host: its candidate centers (scores within 2g of the best) are
compared by direct differences in fp64. When the third-best is clear of the window the
candidates are just the best two (a cheap O(D) comparison per point); otherwise the
row is redone by the torch path (reference.kmeans_recheck_near_ties). Labels are
therefore the exact argmin over the input values, ties going to the lowest index,
whatever the backend's summation order, and deterministic run to run (no atomics).
sqdist is sum((x - c)^2) computed directly, not by the expansion, so a point lying on
its center gets 0 rather than a cancellation residue.

Layers: private @triton.jit kernel -> host wrapper _assign_triton -> kmeans_assign().
"""
from __future__ import annotations

import torch

from . import dispatch, reference

try:  # Triton is optional: the torch and faiss backends work without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

try:
    import faiss  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the install
    faiss = None

BACKENDS = ("auto", "torch", "triton", "faiss")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _kmeans_assign_kernel(
        # data pointers
        X_ptr,  # [N, D] points, fp32/fp16/bf16, any strides
        C_ptr,  # [K, D] centers, same dtype as X, any strides
        CSQ_ptr,  # [K] fp32 ||c||^2
        BEST_ptr,  # [N] fp32 out: best score ||c||^2 - 2 x.c
        SECOND_ptr,  # [N] fp32 out: second-best score (near-tie detection)
        THIRD_ptr,  # [N] fp32 out: third-best score (is the near tie between two only?)
        ARG_ptr,  # [N] int64 out: argmin, lowest index on equal scores
        ARG2_ptr,  # [N] int64 out: index of the second-best score
        SQDIST_ptr,  # [N] fp32 out: sum((x - c_arg)^2), computed directly
        XSQ_ptr,  # [N] fp32 out: ||x||^2 (for the near-tie window)
        # shapes
        N,
        K,
        D,
        # strides (in elements)
        X_stride_n,
        X_stride_d,
        C_stride_k,
        C_stride_d,
        # constants
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
        IEEE_FP32: tl.constexpr,  # fp32 inputs: full-precision dot, no TF32
    ):
        pid = tl.program_id(0)
        # int64 offsets: N * D passes 2^31 at pool scale (10M x 768).
        rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        row_mask = rows < N
        offs_d = tl.arange(0, BLOCK_D)
        offs_k = tl.arange(0, BLOCK_K)

        # running top 3 scores (sorted) and the indices of the first two
        best = tl.full((BLOCK_N,), float("inf"), tl.float32)
        second = tl.full((BLOCK_N,), float("inf"), tl.float32)
        third = tl.full((BLOCK_N,), float("inf"), tl.float32)
        arg = tl.zeros((BLOCK_N,), tl.int64)
        arg2 = tl.zeros((BLOCK_N,), tl.int64)

        for k0 in range(0, K, BLOCK_K):
            cols = k0 + offs_k
            col_mask = cols < K
            acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                d_mask = dd < D
                x = tl.load(
                    X_ptr + rows[:, None] * X_stride_n + dd[None, :] * X_stride_d,
                    mask=row_mask[:, None] & d_mask[None, :],
                    other=0.0,
                )
                c = tl.load(
                    C_ptr + cols[None, :].to(tl.int64) * C_stride_k + dd[:, None] * C_stride_d,
                    mask=d_mask[:, None] & col_mask[None, :],
                    other=0.0,
                )
                if IEEE_FP32:
                    acc = tl.dot(x, c, acc, input_precision="ieee")
                else:
                    acc = tl.dot(x, c, acc)
            # Padded centers score +inf so they never win.
            csq = tl.load(CSQ_ptr + cols, mask=col_mask, other=float("inf"))
            score = csq[None, :] - 2.0 * acc
            # The tile's top 3: repeated min, masking the column taken (lowest column
            # among equal scores, explicit rather than backend-dependent).
            t1 = tl.min(score, axis=1)
            a1 = tl.min(tl.where(score == t1[:, None], cols[None, :], K), axis=1)
            a1 = tl.minimum(a1, K - 1)  # all-NaN rows match nothing (the host rejects them)
            score = tl.where(cols[None, :] == a1[:, None], float("inf"), score)
            t2 = tl.min(score, axis=1)
            a2 = tl.min(tl.where(score == t2[:, None], cols[None, :], K), axis=1)
            a2 = tl.minimum(a2, K - 1)
            score = tl.where(cols[None, :] == a2[:, None], float("inf"), score)
            t3 = tl.min(score, axis=1)
            # Merge two sorted triples (running, tile). Strict '<': on equal scores the
            # running entry (from earlier, lower-index tiles) comes first.
            take1 = t1 < best  # first place goes to the tile's t1
            n1 = tl.where(take1, t1, best)
            j1 = tl.where(take1, a1.to(tl.int64), arg)
            r_head = tl.where(take1, best, second)  # running list's next unused entry
            r_idx = tl.where(take1, arg, arg2)
            t_head = tl.where(take1, t2, t1)  # tile list's next unused entry
            t_idx = tl.where(take1, a2, a1).to(tl.int64)
            take2 = t_head < r_head
            n2 = tl.where(take2, t_head, r_head)
            j2 = tl.where(take2, t_idx, r_idx)
            # third place: the smaller of the two lists' next unused entries
            n3 = tl.where(
                take1 & take2,
                tl.minimum(best, t3),
                tl.where(take1 | take2, tl.minimum(second, t2), tl.minimum(third, t1)),
            )
            best, arg, second, arg2, third = n1, j1, n2, j2, n3

        # Direct squared distance to the chosen center: one more pass over x's row block.
        sq = tl.zeros((BLOCK_N,), tl.float32)
        xsq = tl.zeros((BLOCK_N,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            m = row_mask[:, None] & (dd < D)[None, :]
            x = tl.load(
                X_ptr + rows[:, None] * X_stride_n + dd[None, :] * X_stride_d, mask=m, other=0.0
            ).to(tl.float32)
            c = tl.load(
                C_ptr + arg[:, None] * C_stride_k + dd[None, :] * C_stride_d, mask=m, other=0.0
            ).to(tl.float32)
            diff = x - c
            sq += tl.sum(diff * diff, axis=1)
            xsq += tl.sum(x * x, axis=1)

        tl.store(BEST_ptr + rows, best, mask=row_mask)
        tl.store(SECOND_ptr + rows, second, mask=row_mask)
        tl.store(THIRD_ptr + rows, third, mask=row_mask)
        tl.store(ARG_ptr + rows, arg, mask=row_mask)
        tl.store(ARG2_ptr + rows, arg2, mask=row_mask)
        tl.store(SQDIST_ptr + rows, sq, mask=row_mask)
        tl.store(XSQ_ptr + rows, xsq, mask=row_mask)


def _interpreting() -> bool:
    return dispatch.interpreting()


def _triton_config(dtype: torch.dtype) -> dict[str, int]:
    """One fixed config (no autotune: several configs fail under the interpreter).

    Interpreter: the smallest tiles tl.dot accepts (16), to keep tests fast. GPU: 128 x 128
    output tiles; BLOCK_D 64 for 2-byte inputs and 32 for fp32 (same shared-memory bytes).
    Not tuned on hardware yet.
    """
    if _interpreting():
        return {"BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_D": 16, "num_warps": 1, "num_stages": 1}
    block_d = 32 if dtype == torch.float32 else 64
    return {"BLOCK_N": 128, "BLOCK_K": 128, "BLOCK_D": block_d, "num_warps": 8, "num_stages": 3}


def _assign_triton(
    x: torch.Tensor, centroids: torch.Tensor, exact: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Host wrapper: launch the fused kernel over cdiv(N, BLOCK_N) programs, then re-check
    near ties with the torch path's exact rule. Peak extra memory: O(N + K*D)."""
    if triton is None:
        raise RuntimeError("backend='triton' needs the triton package, which is not importable")
    n, d = x.shape
    k = centroids.shape[0]
    c_sq = centroids.float().pow(2).sum(1).contiguous()
    best = torch.empty(n, dtype=torch.float32, device=x.device)
    second = torch.empty_like(best)
    third = torch.empty_like(best)
    labels = torch.empty(n, dtype=torch.int64, device=x.device)
    labels2 = torch.empty_like(labels)
    sqdist = torch.empty_like(best)
    x_sq = torch.empty_like(best)
    cfg = _triton_config(x.dtype)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)  # one grid axis: no 65,535 cap on N
    _kmeans_assign_kernel[grid](
        x, centroids, c_sq, best, second, third, labels, labels2, sqdist, x_sq,
        n, k, d,
        x.stride(0), x.stride(1), centroids.stride(0), centroids.stride(1),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_D"],
        IEEE_FP32=x.dtype == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    if exact and k > 1:
        # fp32 inputs use the IEEE dot (u = 2^-24). fp16/bf16 products are exact in fp32,
        # but tensor cores may truncate while accumulating (Fasi et al., 2021): assume
        # 4u there, a margin we could not yet check on hardware.
        u = 2.0**-24 if x.dtype == torch.float32 else 2.0**-22
        g = reference._km_gamma(d + 2, u)
        c_max = float(c_sq.max().sqrt()) * (1.0 + 1e-6)
        window = 2.0 * g * (x_sq.sqrt() * (1.0 + 1e-6) + c_max) ** 2
        near = (second - best <= window) & best.isfinite()
        # Usually only the best two are within the window: compare those two exactly.
        two = (near & (third - best > window)).nonzero().squeeze(1)
        if two.numel():
            picked = _exact_pick_of_two(x, centroids, two, labels[two], labels2[two])
            moved = two[picked != labels[two]]
            labels[two] = picked
            if moved.numel():
                sqdist[moved] = _direct_sqdist(x[moved], centroids, labels[moved])
        # Three or more candidates (e.g. duplicated centers): re-derive them with the
        # torch path (its own error bound covers its own scores), on those rows only.
        many = (near & (third - best <= window)).nonzero().squeeze(1)
        if many.numel():
            fixed, fixed_sq = reference.kmeans_assign_torch(x[many], centroids, exact=True)
            labels[many] = fixed
            sqdist[many] = fixed_sq
    return labels, sqdist


def _exact_pick_of_two(
    x: torch.Tensor, centroids: torch.Tensor, rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """For each row, a or b, whichever is nearer by direct differences in fp64; within
    fp64 rounding the lower index wins (the rule of reference.kmeans_recheck_near_ties)."""
    out = torch.empty_like(a)
    rel = 2.0 * reference._km_gamma(x.shape[1] + 2, reference._KM_U64)
    for s in range(0, rows.numel(), 1 << 16):  # bounded fp64 scratch
        xr = x[rows[s : s + (1 << 16)]].double()
        ai, bi = a[s : s + (1 << 16)], b[s : s + (1 << 16)]
        da = ((xr - centroids[ai].double()) ** 2).sum(1)
        db = ((xr - centroids[bi].double()) ** 2).sum(1)
        lo, hi = torch.minimum(ai, bi), torch.maximum(ai, bi)
        d_lo = torch.where(ai < bi, da, db)
        keep_lo = d_lo <= torch.minimum(da, db) * (1.0 + rel)
        out[s : s + (1 << 16)] = torch.where(keep_lo, lo, hi)
    return out


# ---------------------------------------------------------------------------------
# faiss peer
# ---------------------------------------------------------------------------------
def _assign_faiss(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """faiss IndexFlatL2 search, k=1: faiss's own labels (its fp32 expansion, no near-tie
    re-check, its own tie order); sqdist recomputed directly like the other backends."""
    if faiss is None:
        raise RuntimeError("backend='faiss' needs faiss (pip install faiss-cpu)")
    if x.device.type != "cpu":
        raise ValueError(f"backend='faiss' runs on CPU tensors (faiss-cpu); x is on {x.device}")
    xs = x.detach().to(torch.float32).contiguous().numpy()
    cs = centroids.detach().to(torch.float32).contiguous().numpy()
    index = faiss.IndexFlatL2(cs.shape[1])
    index.add(cs)
    _, idx = index.search(xs, 1)
    labels = torch.from_numpy(idx[:, 0]).to(torch.int64)
    sqdist = _direct_sqdist(x, centroids, labels)
    return labels, sqdist


def _direct_sqdist(
    x: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor, chunk: int = 1 << 16
) -> torch.Tensor:
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    c = centroids.float()
    for s in range(0, x.shape[0], chunk):
        diff = x[s : s + chunk].float() - c[labels[s : s + chunk]]
        out[s : s + chunk] = (diff * diff).sum(1)
    return out


# ---------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------
def _validate(x: torch.Tensor, centroids: torch.Tensor, backend: str) -> None:
    for name, t in (("x", x), ("centroids", centroids)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"kmeans_assign: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"kmeans_assign: {name} must be 2-D, got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(
                f"kmeans_assign: {name} has dtype {t.dtype}; use float32, float16 or bfloat16"
            )
    if x.shape[1] != centroids.shape[1]:
        raise ValueError(
            f"kmeans_assign: dimension mismatch, x is {tuple(x.shape)} and centroids "
            f"{tuple(centroids.shape)} (both must be [*, D] with the same D)"
        )
    if centroids.shape[0] == 0:
        raise ValueError("kmeans_assign: centroids is empty (K = 0)")
    if x.dtype != centroids.dtype:
        raise TypeError(
            f"kmeans_assign: dtype mismatch, x is {x.dtype} and centroids {centroids.dtype}; "
            "cast one to the other"
        )
    if x.device != centroids.device:
        raise ValueError(
            f"kmeans_assign: device mismatch, x is on {x.device} and centroids on "
            f"{centroids.device}"
        )
    if backend not in BACKENDS:
        raise ValueError(f"kmeans_assign: unknown backend {backend!r}; choose one of {BACKENDS}")
    if not bool(torch.isfinite(centroids).all()):
        bad = int((~torch.isfinite(centroids)).any(1).nonzero()[0])
        raise ValueError(f"kmeans_assign: centroids contain NaN or inf (first bad row {bad})")


@torch.no_grad()  # an assignment has no gradient; never record the chunk matmuls
def kmeans_assign(
    x: torch.Tensor,
    centroids: torch.Tensor,
    backend: str = "auto",
    *,
    exact: bool = True,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest center for each point: (labels int64 [N], sqdist float32 [N]).

    x [N, D] and centroids [K, D]: same dtype (float32, float16 or bfloat16) and device;
    any strides. backend: "torch" (chunked addmm + argmin, any device, peak extra memory
    O(chunk_size * K)), "triton" (fused kernel, CUDA), "faiss" (faiss-cpu IndexFlatL2,
    CPU) or "auto" (triton on CUDA, torch on CPU).

    With exact=True (default; torch and triton backends) labels are the exact argmin of
    ||x - c||^2 over the input values, ties to the lowest index: near ties found by a
    rigorous rounding bound are re-checked in fp64. faiss returns its own labels (no
    re-check). sqdist is sum((x - c)^2) in fp32, computed directly.
    Raises ValueError on NaN/inf in x or centroids, or on distances overflowing fp32.
    """
    _validate(x, centroids, backend)
    backend = dispatch.pick("kmeans_assign", dispatch.ASSIGN, x, backend)
    n = x.shape[0]
    if n == 0:
        return (
            torch.empty(0, dtype=torch.int64, device=x.device),
            torch.empty(0, dtype=torch.float32, device=x.device),
        )
    if backend == "torch":
        labels, sqdist = reference.kmeans_assign_torch(
            x, centroids, chunk_size=chunk_size, exact=exact
        )
    elif backend == "triton":
        if x.device.type != "cuda" and not _interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (x is on {x.device}); "
                "use backend='torch' or 'auto'"
            )
        labels, sqdist = _assign_triton(x, centroids, exact)
    else:
        labels, sqdist = _assign_faiss(x, centroids)
    # A NaN/inf anywhere in a row of x makes its distance non-finite: catching it here
    # costs O(N) instead of a separate O(N*D) scan of x.
    bad = ~torch.isfinite(sqdist)
    if bool(bad.any()):
        first = int(bad.nonzero()[0])
        raise ValueError(
            f"kmeans_assign: non-finite distance for {int(bad.sum())} point(s), first at row "
            f"{first}: x contains NaN or inf, or values too large for fp32"
        )
    return labels, sqdist
