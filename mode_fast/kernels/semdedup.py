"""SemDeDup's within-cluster step: for each item, the most similar item before it.

Rule (Abbas et al., 2023, "SemDeDup"; facebookresearch/SemDeDup's ``semdedup``). The
items of one cluster are given in their keep order (the first of a group is kept); for
item j the step needs

    best[j] = max_{i < j} x_i . x_j        and        arg[j] = an i < j attaining it,

and item j is removed at a given eps when best[j] > 1 - eps. The public code forms the
n x n matrix ``x @ x.T``, zeroes its diagonal, keeps ``triu(., 1)`` and takes the column
max: O(n^2) memory, which is what caps the cluster sizes its users can pick, and n^2 D
multiply-adds, twice the n^2 D / 2 the strict triangle needs. Here the n x n matrix never
exists and only the triangle is computed:

- torch path (the CPU backend): 512 items j at a time against the items before them, in
  column tiles of up to 8192 (the last holding the diagonal block, masked to i < j), one
  matmul per tile into a reused buffer, a row max per tile merged into a running max.
  Scratch O(R C + C D + n): measured peak RSS growth 35 MB at D = 512 (the 16 MB buffer and
  a column tile's worth of x), plus an fp32 copy of x for 16-bit inputs.
- Triton (CUDA): each program owns BLOCK_J items and loops over the item tiles before them
  (BLOCK_I wide, up to the tile holding its last item), accumulating x_J . x_I over D in
  BLOCK_D slices (fp32 accumulation; IEEE dot for fp32 inputs), a causal mask i < j, and a
  running max / argmax in registers. O(n * D) memory in all.

Ties go to the lowest index i, so an item's match is the earliest of several exact copies:
within a tile the lowest column among equal maxima (torch.max's documented rule; the
kernel's explicit min over equal columns), across tiles a later (higher-index) tile
replaces the running max only when strictly greater. Similarities are fp32 (16-bit inputs
are multiplied exactly and accumulated in fp32, on both paths), so the two backends agree
to fp32 rounding; on near ties (not exact ones) their arg may differ.

Differences from the public code, on purpose: best[0] is -inf and arg[0] is -1 (the first
item has nothing before it) where the public code reports 0, and a negative maximum stays
negative where the public code clips it at 0 (the zeros of its triangle). ``max(best, 0)``
is the public figure; for every eps < 1 the removed sets are the same.

Determinism. Each item's result is computed by one program (one row tile on the torch
path) in a fixed order, with no atomics, so a call gives the same bits on every run for a
fixed config; the Triton config sets the summation order over D, so deterministic=True
pins the list's first config instead of autotuning.

Global-memory traffic per call (Triton; s = bytes per input element, P = ceil(n / BLOCK_J)
programs, program p reading the ~(p + 1) BLOCK_J / BLOCK_I item tiles before its own end):
    x_J, re-read per I tile     ~ n^2 D s / (2 BLOCK_I)
    x_I tiles                   ~ n^2 D s / (2 BLOCK_J)
    outputs                     12 n (best fp32, arg int64);  atomics 0
Compulsory: n D s read, 12 n written. At n = 100k, D = 768, bf16, 128 x 128 tiles: 120 GB
issued against 0.2 GB compulsory; a program's own x_J block (196 KB) and the I tiles it walks
are L2 requests, so DRAM traffic should be far lower (unmeasured until a GPU profile;
benchmarks/kernel_report.py prints the table for every tile, kernel_traffic.py computes it).

Inputs are used as given: SemDeDup's similarity is the cosine, so pass rows normalised to
unit length (``torch.nn.functional.normalize``).

Layers: torch path (max_earlier_similarity_torch, the CPU backend) -> private @triton.jit
kernel -> host wrapper _earlier_max_triton -> max_earlier_similarity(). The launch
(compiled forms, configs, autotuning) is mode_fast.kernels.launch's. The oracle that
materialises the matrix as the public code does is ``reference.max_earlier_similarity_dense``.
"""

from __future__ import annotations

import torch

from . import dispatch, launch

try:  # Triton is optional: the torch path works without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# ---------------------------------------------------------------------------------
# torch path: the CPU backend (and a fallback on any device)
# ---------------------------------------------------------------------------------
# The torch path's tiles: ROWS items j against up to chunk_entries // ROWS earlier items i per
# matmul (16 MB of fp32 scratch; 8192 columns at 512 rows). Few, large matmuls: with 512 x 512
# tiles the 2-thread runs on the shared 2-core dev box were 1.4-2.5x slower than the dense
# method (each small matmul pays the thread pool's wake-up and barrier, and under other jobs'
# load a stalled thread), while one thread was 1.8-6.7x faster
# (benchmarks/results/cpu/semdedup_t512.md).
_CHUNK_ENTRIES = 1 << 22
_ROWS = 512


def default_tile(n: int, chunk_entries: int = _CHUNK_ENTRIES) -> tuple[int, int]:
    """(rows R, columns C) of the torch path's tiles: R = 512 items (fewer when n is smaller)
    against C = chunk_entries // R earlier items, a multiple of R (at least R)."""
    r = max(min(_ROWS, n), 1)
    return r, max(chunk_entries // r // r, 1) * r


def max_earlier_similarity_torch(
    x: torch.Tensor, chunk_entries: int = _CHUNK_ENTRIES, tile: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch path: rows [j0, j0 + R) against the items before them in column tiles of C
    (the last one holding the diagonal, masked to i < j), one matmul per tile into a reused
    R x C buffer (scratch chunk_entries fp32; R, C = default_tile(n, chunk_entries), or
    R = C = tile when given). On CUDA the fp32 matmul follows torch's TF32 setting (off
    unless the caller allows it)."""
    n = x.shape[0]
    device = x.device
    best = torch.full((n,), float("-inf"), dtype=torch.float32, device=device)
    arg = torch.full((n,), -1, dtype=torch.int64, device=device)
    if n < 2:
        return best, arg
    # fp16/bf16: products are exact in fp32, so one fp32 copy (O(n D)) gives fp32 sums, and
    # the CPU's fp32 matmul is its fast one.
    xf = x if x.dtype == torch.float32 else x.float()
    r, c = (tile, tile) if tile else default_tile(n, chunk_entries)
    buf = torch.empty(min(r, n), min(c, n), dtype=torch.float32, device=device)
    # The diagonal block's columns i >= j (row a, column b: b >= a), as one fixed mask.
    ahead = torch.ones(min(r, n), min(r, n), dtype=torch.bool, device=device).triu_()
    for j0 in range(0, n, r):
        j1 = min(j0 + r, n)
        rows = xf[j0:j1]
        m = j1 - j0
        # Column tiles in index order, the last one ending at j1 (C is a multiple of R, so
        # the diagonal block [j0, j1) lies inside it).
        for i0 in range(0, j1, c):
            i1 = min(i0 + c, j1)
            # a contiguous view of the buffer: a strided out= would make mm write a temporary
            sims = torch.mm(rows, xf[i0:i1].T, out=buf.view(-1)[: m * (i1 - i0)].view(m, i1 - i0))
            if i1 == j1:
                sims[:, j0 - i0 :].masked_fill_(ahead[:m, :m], float("-inf"))
            # torch.max gives the first index among equal maxima; a later tile (higher
            # indices) wins only when strictly greater, so ties go to the lowest i.
            value, idx = sims.max(dim=1)
            if i0 == 0:
                blk_best, blk_arg = value, idx
            else:
                better = value > blk_best
                blk_best = torch.where(better, value, blk_best)
                blk_arg = torch.where(better, idx + i0, blk_arg)
        best[j0:j1] = blk_best
        arg[j0:j1] = blk_arg
    # Row 0 has no earlier item: its row is all masked (max -inf at column 0).
    best[0], arg[0] = float("-inf"), -1
    return best, arg


# ---------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------
if triton is not None:

    def _earlier_max(
        # data pointers
        X_ptr,  # [N, D] items in keep order, fp32/fp16/bf16, any strides
        BEST_ptr,  # [N] fp32 out: max_{i<j} x_i . x_j (-inf for j = 0)
        ARG_ptr,  # [N] int64 out: the lowest i attaining it (-1 for j = 0)
        # shapes
        N,
        D,
        N_TUNE,  # autotune key only: N rounded up to a power of two (unused in the body)
        # strides (in elements)
        X_stride_n,
        X_stride_d,
        # constants
        BLOCK_J: tl.constexpr,
        BLOCK_I: tl.constexpr,
        BLOCK_D: tl.constexpr,
        IEEE_FP32: tl.constexpr,  # fp32 inputs: full-precision dot, no TF32
    ):
        # Program p owns item block P - 1 - p: the blocks with the most earlier tiles start
        # first, so the short ones fill the tail of the launch.
        blk = tl.num_programs(0) - 1 - tl.program_id(0)
        # int64 offsets: N * D passes 2^31 at pool scale.
        rows = blk.to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J).to(tl.int64)
        row_mask = rows < N
        offs_d = tl.arange(0, BLOCK_D)
        offs_i = tl.arange(0, BLOCK_I)
        j_end = tl.minimum((blk + 1) * BLOCK_J, N)  # one past this block's last item

        best = tl.full((BLOCK_J,), float("-inf"), tl.float32)
        arg = tl.full((BLOCK_J,), -1, tl.int32)  # item indices < 2^31: int32 in registers
        # Earlier item tiles, up to the one holding the block's last item - 1.
        for i0 in range(0, j_end - 1, BLOCK_I):
            cols = i0 + offs_i
            acc = tl.zeros((BLOCK_J, BLOCK_I), tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                d_mask = dd < D
                xj = tl.load(
                    X_ptr + rows[:, None] * X_stride_n + dd[None, :] * X_stride_d,
                    mask=row_mask[:, None] & d_mask[None, :],
                    other=0.0,
                )
                xi = tl.load(
                    X_ptr + cols[None, :].to(tl.int64) * X_stride_n + dd[:, None] * X_stride_d,
                    mask=d_mask[:, None] & (cols < N)[None, :],
                    other=0.0,
                )
                if IEEE_FP32:
                    acc = tl.dot(xj, xi, acc, input_precision="ieee")
                else:
                    acc = tl.dot(xj, xi, acc)
            # NaN (NaN or inf in x) becomes +inf, so it wins the max and the host, which
            # checks best for non-finite values, rejects the input.
            acc = tl.where(acc != acc, float("inf"), acc)
            # Causal mask: only i < j counts (also drops columns past N).
            s = tl.where(cols[None, :] < rows[:, None], acc, float("-inf"))
            t = tl.max(s, axis=1)
            # lowest column among equal maxima, explicit rather than backend-dependent
            a = tl.min(tl.where(s == t[:, None], cols[None, :], N), axis=1)
            # Strict '>': the running entry comes from earlier, lower-index tiles.
            take = t > best
            best = tl.where(take, t, best)
            arg = tl.where(take, a, arg)

        tl.store(BEST_ptr + rows, best, mask=row_mask)
        tl.store(ARG_ptr + rows, arg.to(tl.int64), mask=row_mask)


# Launch configs: (BLOCK_J, BLOCK_I, BLOCK_D, num_warps, num_stages), per input layout and
# dtype class (fp32 inputs always take the IEEE dot, so there is no "ieee" class here).
# Every entry compiles with 0 bytes of register spills for sm_90a and sm_80 (ptxas from the
# triton wheel; benchmarks/results/static/kernels.md, asserted by
# tests/test_kernels_compile.py). The 16-bit and general tiles are k-means assign's; its
# aligned fp32 tiles (BLOCK_D 32, 3 stages) spill 16-56 B here (the causal mask and the
# argmax's index tile are live beside the IEEE FMA accumulator), so a compile sweep picked
# BLOCK_D 16, or 2 stages at 32. On CUDA the wrapper autotunes over its list; the first
# entry is the one deterministic=True pins.
EARLIER = launch.Launcher(
    "max_earlier_similarity",
    blocks=("BLOCK_J", "BLOCK_I", "BLOCK_D"),
    table={
        ("aligned", "16bit"): ((128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 4), (64, 64, 64, 4, 3)),
        ("aligned", "fp32"): ((128, 64, 16, 8, 3), (64, 128, 16, 8, 3), (128, 64, 32, 8, 2), (64, 64, 16, 4, 3)),
        ("general", "16bit"): ((64, 64, 32, 4, 2), (64, 64, 32, 4, 3)),
        ("general", "fp32"): ((64, 64, 16, 4, 1), (32, 64, 16, 4, 2)),
    },  # fmt: skip
    # cached by shape; N rounded up to a power of two (N_TUNE), so clusters of similar size share a pick
    tune_key=("N_TUNE", "D"),
)
if triton is not None:
    EARLIER.compile(_earlier_max, runtime=("N", "N_TUNE"), ints=("D", "X_stride_n", "X_stride_d"))


def launch_configs(dtype: torch.dtype, layout: str = "aligned") -> list[dict[str, int]]:
    """The configs the wrapper may launch for inputs of this dtype and layout (the
    static report compiles each one)."""
    return EARLIER.configs(dtype, layout)


def _earlier_max_triton(
    x: torch.Tensor, deterministic: bool = False, config: dict[str, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Host wrapper: one launch over cdiv(n, BLOCK_J) programs. Extra memory: the outputs.
    config: one entry of launch_configs() to launch instead of autotuning (benchmarks)."""
    if triton is None:
        raise RuntimeError("backend='triton' needs the triton package, which is not importable")
    n, d = x.shape
    best = torch.full((n,), float("-inf"), dtype=torch.float32, device=x.device)
    arg = torch.full((n,), -1, dtype=torch.int64, device=x.device)
    if n < 2:  # nothing before the only item (and no zero-program launch)
        return best, arg
    layout = launch.layout(x, best, arg)
    args = (x, best, arg, n, d, min(1 << max(n - 1, 0).bit_length(), 1 << 30), x.stride(0), x.stride(1))
    consts = {"IEEE_FP32": x.dtype == torch.float32}
    EARLIER.launch(n, args, consts, dtype=x.dtype, layout=layout, deterministic=deterministic, config=config)
    return best, arg


# ---------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------
def _validate(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"max_earlier_similarity: x must be 2-D [n, D], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"max_earlier_similarity: x must be float32, float16 or bfloat16, got {x.dtype}")


@torch.no_grad()
def max_earlier_similarity(
    x: torch.Tensor, backend: str = "auto", *, deterministic: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row j of x [n, D]: (best float32 [n], arg int64 [n]), the largest x_i . x_j over i < j and that i.

    Row 0 gets (-inf, -1). Ties go to the lowest i. backend: "torch" (tiled matmuls, any
    device), "triton" (fused kernel, CUDA; CPU tensors under TRITON_INTERPRET) or "auto"
    (triton on CUDA, torch elsewhere). deterministic=True: the Triton backend launches its
    one pinned config instead of autotuning (the config sets the summation order over D);
    the torch path is deterministic as it is. Raises ValueError on a non-2-D or non-float
    x, or on NaN or inf in x (a non-finite similarity).
    """
    _validate(x)
    backend = dispatch.pick("semdedup", dispatch.EARLIER_MAX, x, backend)
    n = x.shape[0]
    if backend == "triton":
        if x.device.type != "cuda" and not dispatch.interpreting():
            raise ValueError(f"backend='triton' needs CUDA tensors (x is on {x.device}); use backend='torch' or 'auto'")
        best, arg = _earlier_max_triton(x, deterministic)
    else:
        best, arg = max_earlier_similarity_torch(x)
    if n > 1:
        # A NaN/inf anywhere in x reaches at least one similarity of a later row (row j's
        # against row 0, row 0's against every later row): O(n) here, not an O(n D) scan.
        bad = ~torch.isfinite(best[1:])
        if bool(bad.any()):
            first = int(bad.nonzero()[0]) + 1
            raise ValueError(f"max_earlier_similarity: non-finite similarity at row {first}: x contains NaN or inf")
    elif n == 1 and not bool(torch.isfinite(x).all()):
        raise ValueError("max_earlier_similarity: non-finite value in row 0: x contains NaN or inf")
    return best, arg
