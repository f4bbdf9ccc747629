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
row is redone by the torch path (kmeans_recheck_near_ties). Labels are therefore the
exact argmin over the input values, ties going to the lowest index, whatever the
backend's summation order or tile config. sqdist is sum((x - c)^2) computed directly,
not by the expansion, so a point lying on its center gets 0 rather than a residue.

Determinism. Every program owns BLOCK_N rows and writes only them: there is no
cross-program reduction and no atomic, so a launch gives the same bits whatever order
the programs run in. What can vary is the config: autotuning picks one per shape by
timing, and BLOCK_D sets sqdist's (and, with exact=False, the scores') summation order.
deterministic=True therefore pins the first config of the list (no timing involved).

Global-memory traffic per call (Triton backend; s = bytes per input element, P =
ceil(N / BLOCK_N) programs, T = ceil(K / BLOCK_K) center tiles; loads as issued, so
re-reads served by L2 count too; benchmarks/kernel_traffic.py computes these):
    x, main loop      N * D * s * T          (each row block re-read once per center tile)
    centers           P * K * D * s  +  P * K * 4   (every program reads all of C and ||c||^2)
    x + chosen c, sqdist pass   2 * N * D * s
    outputs           N * (5 * 4 + 2 * 8) = 36 N   (best, second, third, sqdist, ||x||^2; two int64)
    atomics           0
Compulsory: N * D * s + K * D * s read, 12 N written (labels int64, sqdist fp32).
At N = 10M, K = 1024, D = 768, bf16, 128 x 128 tiles: x 123 GB and C 123 GB issued
(277 GB in all) against 15.5 GB compulsory. These are L2 requests: C (1.5 MB) stays in
L2, and a program re-reads only its own x block (BLOCK_N * D * s = 196 KB) while it
runs, ~26 MB for one program per SM on an H100/H200 (50 MB L2), so DRAM traffic should
be near compulsory; unmeasured until a GPU profile (benchmarks/kernel_report.py prints
the table for every config).

Layers: torch path (kmeans_assign_torch, the CPU backend) -> private @triton.jit kernel
-> host wrapper _assign_triton -> kmeans_assign(). The launch (compiled forms, configs,
autotuning) is mode_fast.kernels.launch's. Test oracles and the naive baseline live in
reference.py.
"""

from __future__ import annotations

import torch

from mode_fast.core.errors import ConfigError

from . import dispatch, launch

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
# torch path: the CPU backend (and a fallback on any device)
# ---------------------------------------------------------------------------------
# Chunked addmm + argmin, then the exact near-tie re-check in fp64.
_U32 = 2.0**-24  # unit roundoff of fp32
_U64 = 2.0**-53  # unit roundoff of fp64
# Pairs re-checked per batch in fp64 (each costs D doubles of scratch).
_RECHECK_PAIRS = 1 << 14


def _gamma(n: int, u: float) -> float:
    """Higham's gamma_n = n*u / (1 - n*u): bound on the relative error of an n-term dot product."""
    return n * u / (1.0 - n * u)


def _matmul_roundoff(device: torch.device) -> float:
    """Unit roundoff of an fp32 matmul as torch will run it (TF32/bf16 when allowed)."""
    precision = torch.get_float32_matmul_precision()
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        precision = "high" if precision == "highest" else precision
    # "high" allows TF32 (10-bit mantissa), "medium" bf16 (7-bit); see torch docs.
    return {"highest": _U32, "high": 2.0**-11, "medium": 2.0**-8}.get(precision, _U32)


def kmeans_default_chunk(k: int, device: torch.device) -> int:
    """Rows per chunk so a chunk's N x K score block stays small.

    CPU: about 2M floats (8 MB): at K = 1024 that is 2048 rows, measured best of
    1024-8192 on the 2-core dev box (larger chunks amortise per-op overhead).
    CUDA: about 64M floats (256 MB), large enough to keep the GPU busy.
    """
    budget = (1 << 26) if device.type == "cuda" else (1 << 21)
    return int(min(max(budget // max(k, 1), 128), 1 << 16))


def kmeans_recheck_near_ties(x_rows: torch.Tensor, centroids: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Exact argmin over each row's candidate centers, by direct differences in fp64.

    x_rows [R, D] and centroids [K, D] in fp32; candidates [R, K] bool (every row has at
    least one True). Distances equal within fp64 rounding count as ties and go to the
    lowest index, so the choice does not depend on summation order.
    """
    r, d = x_rows.shape
    k = centroids.shape[0]
    rows, cols = candidates.nonzero(as_tuple=True)
    dist = torch.empty(rows.numel(), dtype=torch.float64, device=x_rows.device)
    for s in range(0, rows.numel(), _RECHECK_PAIRS):
        ri, ci = rows[s : s + _RECHECK_PAIRS], cols[s : s + _RECHECK_PAIRS]
        diff = x_rows[ri].double() - centroids[ci].double()
        dist[s : s + _RECHECK_PAIRS] = (diff * diff).sum(1)
    inf = torch.full((r,), float("inf"), dtype=torch.float64, device=x_rows.device)
    row_min = inf.scatter_reduce(0, rows, dist, "amin")
    # All terms are >= 0, so the fp64 sum's relative error is at most gamma_{D+2}.
    tied = dist <= row_min[rows] * (1.0 + 2.0 * _gamma(d + 2, _U64))
    idx = torch.where(tied, cols, torch.full_like(cols, k))
    return torch.full((r,), k, dtype=torch.int64, device=x_rows.device).scatter_reduce(0, rows, idx, "amin")


def _best_two(scores: torch.Tensor, group: int) -> tuple[torch.Tensor, ...]:
    """(best, argmin, second-best) per row of scores [n, R * group], in one full pass.

    Column j belongs to group j % group. A vertical min over the R rows of each group
    (vectorises well) gives the group minima; the best group's R scores are then
    gathered to find the argmin and the runner-up inside it. Ties are not resolved here
    (an exact tie makes second == best, so the row is re-checked).
    """
    n, kp = scores.shape
    r = kp // group
    inf = float("inf")
    gmin = scores.view(n, r, group).amin(1)
    _, gidx = gmin.min(1)
    second = gmin.scatter(1, gidx[:, None], inf).amin(1)
    cols = gidx[:, None] + group * torch.arange(r, device=scores.device)
    vals = scores.gather(1, cols)
    best, pos = vals.min(1)
    second = torch.minimum(second, vals.scatter(1, pos[:, None], inf).amin(1))
    return best, gidx + group * pos, second


# Columns per group in _best_two; below 4 groups' worth of centers, plain row min.
_GROUP = 32


def kmeans_assign_torch(
    x: torch.Tensor,
    centroids: torch.Tensor,
    *,
    chunk_size: int | None = None,
    exact: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked matmul + argmin; any device. Inputs are assumed validated (see kmeans_assign).

    Scores ||c||^2 - 2 x.c are computed in fp32 by one addmm per chunk of rows into a
    reused buffer, so peak extra memory is O(chunk_size * (K + D)) plus an fp32 copy of
    the centroids.

    exact=True makes labels the exact argmin of ||x - c||^2 over the fp32 values of the
    inputs: each score's rounding error is at most g = gamma_{D+2} * (||x|| + max||c||)^2
    (fp32 dot-product bound), so only centers scoring within 2g of the row's best can be
    the true nearest; rows with more than one such center are re-checked in fp64 by direct
    differences (kmeans_recheck_near_ties). Ties go to the lowest index.
    exact=False: the fp32 argmin as computed (lowest index among equal fp32 scores).
    sqdist is computed directly as sum((x - c)^2) in fp32, so it is accurate even for a
    point sitting on its center (the expansion cancels catastrophically there).
    """
    n, d = x.shape
    k = centroids.shape[0]
    device = x.device
    c = centroids.to(torch.float32).contiguous()
    c_sq = (c * c).sum(1)
    group = _GROUP if (exact and k >= 4 * _GROUP) else 1
    kp = -(-k // group) * group
    if kp > k:  # pad to whole groups with centers that score +inf
        c_mm = torch.cat([c, c.new_zeros(kp - k, d)])
        c_sq_mm = torch.cat([c_sq, c_sq.new_full((kp - k,), float("inf"))])
    else:
        c_mm, c_sq_mm = c, c_sq
    chunk = chunk_size or kmeans_default_chunk(k, device)
    if exact:
        g = _gamma(d + 2, _matmul_roundoff(device))
        # c_sq itself is rounded: pad max||c|| by a relative 1e-6 (>> fp32 eps * few).
        c_max = float(c_sq.max().sqrt()) * (1.0 + 1e-6)
    labels = torch.empty(n, dtype=torch.int64, device=device)
    sqdist = torch.empty(n, dtype=torch.float32, device=device)
    # Reused buffers: a fresh multi-MB tensor per chunk costs page faults (measured ~15%
    # of the CPU time at K = 1024).
    score_buf = torch.empty(min(chunk, n), kp, dtype=torch.float32, device=device)
    diff_buf = torch.empty(min(chunk, n), d, dtype=torch.float32, device=device)
    for s in range(0, n, chunk):
        xs = x[s : s + chunk].to(torch.float32).contiguous()
        m = xs.shape[0]
        scores = torch.addmm(c_sq_mm, xs, c_mm.t(), beta=1.0, alpha=-2.0, out=score_buf[:m])
        if not exact or k == 1:
            best, arg = scores.min(1)  # first index of the minimum on exact ties
        else:
            best, arg, second = _best_two(scores, group)
            window = 2.0 * g * ((xs * xs).sum(1).sqrt() * (1.0 + 1e-6) + c_max) ** 2
            # Rows with NaN/inf (bad input, rejected by the caller) are left alone.
            ok = (second - best <= window) & window.isfinite() & best.isfinite()
            near = ok.nonzero().squeeze(1)
            if near.numel():
                cand = scores[near, :k] <= (best[near] + window[near])[:, None]
                arg[near] = kmeans_recheck_near_ties(xs[near], c, cand)
        diff = torch.index_select(c, 0, arg, out=diff_buf[:m])
        torch.sub(xs, diff, out=diff)
        diff.mul_(diff)
        torch.sum(diff, 1, out=sqdist[s : s + m])
        labels[s : s + m] = arg
    return labels, sqdist


# ---------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------
if triton is not None:

    def _kmeans_assign(
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
        N_TUNE,  # autotune key only: N rounded up to a power of two (unused in the body)
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

        # Running top 3 scores (sorted) and the indices of the first two. Center indices
        # are int32 in registers (K < 2^31): int64 would double the registers they hold.
        best = tl.full((BLOCK_N,), float("inf"), tl.float32)
        second = tl.full((BLOCK_N,), float("inf"), tl.float32)
        third = tl.full((BLOCK_N,), float("inf"), tl.float32)
        arg = tl.zeros((BLOCK_N,), tl.int32)
        arg2 = tl.zeros((BLOCK_N,), tl.int32)

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
            j1 = tl.where(take1, a1, arg)
            r_head = tl.where(take1, best, second)  # running list's next unused entry
            r_idx = tl.where(take1, arg, arg2)
            t_head = tl.where(take1, t2, t1)  # tile list's next unused entry
            t_idx = tl.where(take1, a2, a1)
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
        arg_off = arg.to(tl.int64) * C_stride_k
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            m = row_mask[:, None] & (dd < D)[None, :]
            x = tl.load(X_ptr + rows[:, None] * X_stride_n + dd[None, :] * X_stride_d, mask=m, other=0.0).to(tl.float32)
            c = tl.load(C_ptr + arg_off[:, None] + dd[None, :] * C_stride_d, mask=m, other=0.0).to(tl.float32)
            diff = x - c
            sq += tl.sum(diff * diff, axis=1)
            xsq += tl.sum(x * x, axis=1)

        tl.store(BEST_ptr + rows, best, mask=row_mask)
        tl.store(SECOND_ptr + rows, second, mask=row_mask)
        tl.store(THIRD_ptr + rows, third, mask=row_mask)
        tl.store(ARG_ptr + rows, arg.to(tl.int64), mask=row_mask)
        tl.store(ARG2_ptr + rows, arg2.to(tl.int64), mask=row_mask)
        tl.store(SQDIST_ptr + rows, sq, mask=row_mask)
        tl.store(XSQ_ptr + rows, xsq, mask=row_mask)


# Launch configs: (BLOCK_N, BLOCK_K, BLOCK_D, num_warps, num_stages), per input layout and
# dtype class (fp32 inputs always take the IEEE dot, so there is no "ieee" class here).
# Every entry compiles with 0 bytes of register spills for sm_90a and sm_80 (ptxas from the
# triton wheel; benchmarks/results/static/kernels.md, asserted by
# tests/test_kernels_compile.py). On CUDA the wrapper autotunes over its list; the first
# entry is the one deterministic=True pins. Spill-free choices found by a compile sweep:
# 128 x 256 tiles, 128 x 128 fp32 FMA tiles and 64-wide BLOCK_D on scalar loads all spill.
# The layouts are mode_fast.kernels.launch's: "aligned" loads vectorise and pipeline into
# shared memory; "general" (odd D, strided views, offset pointers) has scalar loads, smaller tiles.
ASSIGN = launch.Launcher(
    "kmeans_assign",
    blocks=("BLOCK_N", "BLOCK_K", "BLOCK_D"),
    table={
        ("aligned", "16bit"): ((128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 3)),
        ("aligned", "fp32"): ((128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 4, 3)),
        ("general", "16bit"): ((64, 64, 32, 4, 2), (64, 64, 32, 4, 3)),
        ("general", "fp32"): ((64, 64, 16, 4, 1), (32, 64, 16, 4, 2)),
    },  # fmt: skip
    # cached by shape; N rounded up to a power of two (N_TUNE), so a pool's shards share a pick
    tune_key=("N_TUNE", "K", "D"),
)
if triton is not None:
    # N and K stay generic in both forms. (An N of 2^31 or more would compile a third, int64
    # variant of either form; the report measures int32 sizes.)
    ASSIGN.compile(
        _kmeans_assign,
        runtime=("N", "K", "N_TUNE"),
        ints=("D", "X_stride_n", "X_stride_d", "C_stride_k", "C_stride_d"),
    )


def launch_configs(dtype: torch.dtype, layout: str = "aligned") -> list[dict[str, int]]:
    """The configs the wrapper may launch for inputs of this dtype and layout (the
    static report compiles each one)."""
    return ASSIGN.configs(dtype, layout)


def _assign_triton(
    x: torch.Tensor,
    centroids: torch.Tensor,
    exact: bool,
    deterministic: bool = False,
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Host wrapper: launch the fused kernel over cdiv(N, BLOCK_N) programs, then re-check
    near ties with the torch path's exact rule. Peak extra memory: O(N + K*D).
    config: one entry of launch_configs() to launch instead of autotuning (benchmarks)."""
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
    layout = launch.layout(x, centroids, c_sq, best, second, third, labels, labels2, sqdist, x_sq)
    args = (
        x, centroids, c_sq, best, second, third, labels, labels2, sqdist, x_sq,
        n, k, d, min(1 << max(n - 1, 0).bit_length(), 1 << 30),
        x.stride(0), x.stride(1), centroids.stride(0), centroids.stride(1),
    )  # fmt: skip
    consts = {"IEEE_FP32": x.dtype == torch.float32}
    ASSIGN.launch(n, args, consts, dtype=x.dtype, layout=layout, deterministic=deterministic, config=config)
    if exact and k > 1:
        # fp32 inputs use the IEEE dot (u = 2^-24). fp16/bf16 products are exact in fp32,
        # but tensor cores may truncate while accumulating (Fasi et al., 2021): assume
        # 4u there, a margin we could not yet check on hardware.
        u = 2.0**-24 if x.dtype == torch.float32 else 2.0**-22
        g = _gamma(d + 2, u)
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
            fixed, fixed_sq = kmeans_assign_torch(x[many], centroids, exact=True)
            labels[many] = fixed
            sqdist[many] = fixed_sq
    return labels, sqdist


def _exact_pick_of_two(
    x: torch.Tensor, centroids: torch.Tensor, rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """For each row, a or b, whichever is nearer by direct differences in fp64; within
    fp64 rounding the lower index wins (the rule of kmeans_recheck_near_ties)."""
    out = torch.empty_like(a)
    rel = 2.0 * _gamma(x.shape[1] + 2, _U64)
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
            raise TypeError(f"kmeans_assign: {name} has dtype {t.dtype}; use float32, float16 or bfloat16")
    if x.shape[1] != centroids.shape[1]:
        raise ValueError(
            f"kmeans_assign: dimension mismatch, x is {tuple(x.shape)} and centroids "
            f"{tuple(centroids.shape)} (both must be [*, D] with the same D)"
        )
    if centroids.shape[0] == 0:
        raise ValueError("kmeans_assign: centroids is empty (K = 0)")
    if x.dtype != centroids.dtype:
        raise TypeError(
            f"kmeans_assign: dtype mismatch, x is {x.dtype} and centroids {centroids.dtype}; cast one to the other"
        )
    if x.device != centroids.device:
        raise ValueError(f"kmeans_assign: device mismatch, x is on {x.device} and centroids on {centroids.device}")
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
    deterministic: bool = False,
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

    deterministic=True: the same bits on every run for the same inputs (and thread count).
    Both paths are free of atomics and cross-program reductions by construction (each
    row's result is computed by one program / one chunk, in a fixed order); the flag
    makes the Triton backend launch one pinned config instead of autotuning, since the
    tile config sets sqdist's summation order (labels with exact=True do not depend on
    it). Not offered for faiss, whose search makes no such promise.
    Raises ValueError on NaN/inf in x or centroids, or on distances overflowing fp32.
    """
    _validate(x, centroids, backend)
    backend = dispatch.pick("kmeans_assign", dispatch.ASSIGN, x, backend)
    if deterministic and backend == "faiss":
        raise ConfigError(
            "kmeans_assign: deterministic=True needs backend='torch' or 'triton' "
            "(faiss's search makes no bitwise promise)"
        )
    n = x.shape[0]
    if n == 0:
        return (
            torch.empty(0, dtype=torch.int64, device=x.device),
            torch.empty(0, dtype=torch.float32, device=x.device),
        )
    if backend == "torch":
        labels, sqdist = kmeans_assign_torch(x, centroids, chunk_size=chunk_size, exact=exact)
    elif backend == "triton":
        if x.device.type != "cuda" and not dispatch.interpreting():
            raise ValueError(f"backend='triton' needs CUDA tensors (x is on {x.device}); use backend='torch' or 'auto'")
        labels, sqdist = _assign_triton(x, centroids, exact, deterministic)
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
