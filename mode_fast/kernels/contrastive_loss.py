"""Fused, tiled CLIP (InfoNCE) and SigLIP losses: memory O(B*D), never a B x B tensor.

Maths (Q: M x D query rows, K: N x D key columns, s: the already-exponentiated logit
scale, b: logit bias, g: upstream gradient over the loss's normaliser)
    L = s * Q K^T                                   logits, M x N, only ever seen as tiles
    CLIP (square, Q = I, K = T, M = N = B; both directions from each tile)
           loss = 1/(2B) * sum_i [LSE_j L_ij - L_ii] + 1/(2B) * sum_j [LSE_i L_ij - L_jj]
           dL_ij = g * (P_row_ij + P_col_ij - 2 delta_ij),   g = grad / (2B)
                   P_row_ij = exp(L_ij - LSE_row_i),  P_col_ij = exp(L_ij - LSE_col_j)
    InfoNCE rows (rectangular; the positive of row i is column offset + i)
           loss = 1/M * sum_i [LSE_j L_ij - L_i,offset+i]
           dL_ij = g * (P_row_ij - delta_{j, offset+i}),  g = grad / M
           open_clip's local_loss=True is this twice: local images against all texts and
           local texts against all images, offset = rank * local batch.
    Ring step: the row LSE against one visiting block, merged into the running LSE
           (the kernel starts its online max/sum from it), so W blocks give the LSE over all.
    SigLIP x = s * Q K^T + b;  loss = 1/M * [sum_ij softplus(x_ij) - sum_i x_ii]
           (-log sigmoid(z x) is softplus(x) for z = -1 and softplus(x) - x for z = +1)
           dx_ij = g * (sigmoid(x_ij) - delta_ij),   g = grad / M
           negatives only (another rank's texts): no delta term, M != N allowed.
    Every variant: dQ = s * dL K,  dK = s * dL^T Q,  ds = sum_ij dL_ij * (Q K^T)_ij,  db = sum dx.
Forward keeps only O(M + N) statistics (the LSE vectors); backward recomputes the tiles,
like FlashAttention. One CLIP tile feeds both directions, so fwd + bwd costs 4 B^2 D
matmuls (open_clip's ClipLoss: 6). The label (delta) terms are O(M D) and are added on
the host from the matching rows, chunk by chunk (no upcast copy of a whole input).

Backward's dK. "atomic": one pass; each program adds its s dL^T Q tile into the shared
dK with float atomics. "columns": a second launch of the same kernel with Q and K swapped
(each program owns a block of K's rows and loops over Q's row blocks, recomputing P from
the saved LSEs), so no two programs write the same element. dispatch.contrastive_bwd()
picks the default (keyword bwd=; dispatch also reads MODE_FAST_CONTRASTIVE_BWD).

Determinism. deterministic=True (Triton): no float atomics anywhere (CLIP's column LSE by
a second row pass over T I^T instead of atomic column sums; dK by the columns pass), every
program writes only its own rows, the per-program scale / bias shares are summed on the
host in fp64 in index order, and the config is the list's first (no autotuning), so a
call gives the same bits on every run whatever order the programs run in. The default
(atomic) path is not deterministic. The torch path is deterministic as it is: a fixed
loop over row chunks, no atomics (on CUDA, deterministic as far as cuBLAS / the
reductions are for a fixed shape; torch.use_deterministic_algorithms is the user's).

Global-memory traffic per call (Triton; s = bytes per input element, bm x bn the tile,
P = ceil(M / bm) row programs, C = ceil(N / bn) column blocks; loads as issued, re-reads
served by L2 count too; benchmarks/kernel_traffic.py computes these):
    forward pass        P C (bm + bn) D s                 (Q and K tiles over D)
                        + P C bn 4   with CLIP's atomic column sums (the shifts)
                        + M 4 read   for a ring merge;    stores M 4
                        atomics: P C bn = P N fp32 adds (CLIP column sums only)
    backward pass       P C [(bm + 2 bn) D s + 8 bm D]    (logit tile, K again, dQ read + written fp32)
                        + P C bm D s + atomics P C bn D = M N D / bm   ("atomic": Q again, dK)
                        + M 4 (+ P C bn 4 with a column LSE); stores P C bm D 4 + 8 P
    CLIP forward: one pass with column sums, or deterministic two row passes (M <-> N).
    backward "atomic": one pass; "columns": two passes (M x N, then N x M), no atomics.
Compulsory: forward (M + N) D s read, the LSEs written; backward (M + N) D s + LSEs
read, (M + N) D 4 written (fp32 gradients).
At B = 32k, D = 768, bf16, 64 x 64 tiles: backward "atomic" 155 GB loads + 52 GB stores +
12.9G atomic adds (52 GB), "columns" 258 GB + 103 GB and no atomics, against 0.3 GB
compulsory. Both are dominated by the fp32 dQ accumulator, read and written once per
tile (8 M N D / bn bytes), so "atomic" counts less and is the default; which is faster
is for a GPU to say (benchmarks/gpu_check.sh times both). kernel_report.py prints the
table at B = 32k and 1M.

Layers: Triton kernels (_*_kernel) and torch paths (*_torch) -> host forward / backward
per variant -> autograd Functions -> clip_loss(), infonce_loss(), local_clip_loss(),
siglip_loss(), and the ring's per-step blocks ring_block_forward / ring_block_backward
(mode_fast.training.loss passes the blocks around). The backend of each call is chosen by
mode_fast.kernels.dispatch; the launch (compiled forms, configs, autotuning) is
mode_fast.kernels.launch's. reference.py keeps only the naive test oracles.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from . import dispatch, launch

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- checks
def _check_features(image_features: torch.Tensor, text_features: torch.Tensor, same_rows: bool = True) -> None:
    for name, x in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D [batch, dim], got shape {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            f"feature widths differ: image_features {tuple(image_features.shape)}, "
            f"text_features {tuple(text_features.shape)}"
        )
    if same_rows and image_features.shape[0] != text_features.shape[0]:
        raise ValueError(
            f"batch sizes differ: image_features {tuple(image_features.shape)}, "
            f"text_features {tuple(text_features.shape)} (pairs must line up row by row)"
        )
    if image_features.device != text_features.device:
        raise ValueError(
            f"devices differ: image_features on {image_features.device}, text_features on {text_features.device}"
        )
    if image_features.dtype != text_features.dtype:
        raise TypeError(
            f"dtypes differ: image_features {image_features.dtype}, text_features {text_features.dtype} "
            "(cast one of them; no silent upcast)"
        )


def _check_offset(offset: int, rows: int, cols: int) -> None:
    if not 0 <= offset <= cols - rows:
        raise ValueError(f"offset {offset} + {rows} query rows runs past the {cols} keys")


def _as_scalar_tensor(value: Any, name: str, like: torch.Tensor) -> torch.Tensor:
    """A one-element tensor for `name` (numbers become constants on like's device)."""
    if not isinstance(value, torch.Tensor):
        return torch.tensor(float(value), dtype=torch.float32, device=like.device)
    if value.numel() != 1:
        raise ValueError(f"{name} must hold one number, got shape {tuple(value.shape)}")
    if value.device != like.device and not (value.device.type == "cpu" and value.dim() == 0):
        raise ValueError(f"{name} is on {value.device}, the features on {like.device}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {value.dtype}")
    return value


def _grad_like(value: float, like: torch.Tensor, needed: bool) -> torch.Tensor | None:
    return torch.full_like(like, value) if needed else None


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_d a[i, d] * b[i, d] in fp32 ([M]); half inputs are upcast a chunk at a time."""
    m, d = a.shape
    out = torch.empty(m, dtype=torch.float32, device=a.device)
    step = max(1, (1 << 20) // d)
    for s in range(0, m, step):
        torch.sum(_f32(a[s : s + step]) * _f32(b[s : s + step]), 1, out=out[s : s + step])
    return out


def _sub_labels(
    d_q: torch.Tensor, d_k: torch.Tensor, q: torch.Tensor, k: torch.Tensor, offset: int, coeff: float
) -> None:
    """The label terms of dQ, dK: -coeff on each positive pair (row i, column offset + i).

    In-place fp32 -= input dtype: no upcast copy of q or k.
    """
    n = q.shape[0]
    d_q.sub_(k[offset : offset + n], alpha=coeff)
    d_k[offset : offset + n].sub_(q, alpha=coeff)


# --------------------------------------------------------------------------- Triton kernels
try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backend still works
    triton = None

if triton is not None:

    @triton.jit
    def _logits_tile(
        I_ptr,
        T_ptr,
        rows,
        cols,
        row_ok,
        col_ok,
        D,
        I_stride_b,
        I_stride_d,
        T_stride_b,
        T_stride_d,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """I[rows] . T[cols]^T over all of D in BLOCK_K slices, fp32 accumulation."""
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            # masked lanes must read 0 (other=0.0) so they add nothing to the dot
            a = tl.load(
                I_ptr + rows[:, None] * I_stride_b + ks[None, :] * I_stride_d,
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            bt = tl.load(
                T_ptr + cols[None, :] * T_stride_b + ks[:, None] * T_stride_d,
                mask=col_ok[None, :] & k_ok[:, None],
                other=0.0,
            )
            acc = tl.dot(a, bt, acc, input_precision=PRECISION)
        return acc

    def _block_fwd(
        # data
        Q_ptr,
        K_ptr,
        ROW_ptr,
        COL_SUM_ptr,
        COL_SHIFT_ptr,
        # shapes
        M,
        N,
        D,
        # strides
        Q_stride_m,
        Q_stride_d,
        K_stride_n,
        K_stride_d,
        # constants
        scale,
        bias,
        merge,  # runtime flag: start from the LSE already in ROW (a ring step)
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr,
        SIGLIP: tl.constexpr,
        COLS: tl.constexpr,
    ):
        """Rows of Q (M) against all columns of K (N); one program per block of rows.

        Not SIGLIP: ROW = row LSE by an online max/sum; merge != 0 starts that max/sum from
        the LSE already in ROW (a ring step), so ROW ends as the LSE over all blocks seen.
        COLS (the square CLIP case, not deterministic): column sums exp(L - shift_j) are
        added atomically, shift_j being an upper bound of column j's logits, so partial
        sums from different row blocks need no rescaling. SIGLIP: ROW = sum_j softplus(x_ij).
        """
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        # merge == 0 reads nothing: -inf, and l = 0 (exp(LSE - m) = 1 with m = LSE otherwise)
        m_i = tl.load(ROW_ptr + rows, mask=row_ok & (merge != 0), other=float("-inf"))
        l_i = tl.where(m_i > float("-inf"), 1.0, 0.0)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            ok = row_ok[:, None] & col_ok[None, :]
            logits = scale * _logits_tile(
                Q_ptr,
                K_ptr,
                rows,
                cols,
                row_ok,
                col_ok,
                D,
                Q_stride_m,
                Q_stride_d,
                K_stride_n,
                K_stride_d,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
                PRECISION,
            )
            if SIGLIP:
                x = logits + bias
                sp = tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))  # stable softplus
                l_i += tl.sum(tl.where(ok, sp, 0.0), 1)
            else:
                lr = tl.where(col_ok[None, :], logits, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(lr, 1))
                l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(lr - m_new[:, None]), 1)
                m_i = m_new
                if COLS:
                    shift = tl.load(COL_SHIFT_ptr + cols, mask=col_ok, other=0.0)
                    e = tl.where(ok, tl.exp(logits - shift[None, :]), 0.0)
                    tl.atomic_add(COL_SUM_ptr + cols, tl.sum(e, 0), mask=col_ok)
        if SIGLIP:
            tl.store(ROW_ptr + rows, l_i, mask=row_ok)
        else:
            tl.store(ROW_ptr + rows, m_i + tl.log(l_i), mask=row_ok)

    def _block_bwd(
        # data
        Q_ptr,
        K_ptr,
        LSE_ROW_ptr,
        LSE_COL_ptr,
        DQ_ptr,
        DK_ptr,
        DS_ptr,
        DB_ptr,
        # shapes
        M,
        N,
        D,
        # strides (DQ / DK are contiguous fp32 [M, D] / [N, D])
        Q_stride_m,
        Q_stride_d,
        K_stride_n,
        K_stride_d,
        # constants
        scale,
        bias,
        g,
        row_term,
        col_term,  # runtime flags: which softmax terms dL has (not SIGLIP)
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr,
        SIGLIP: tl.constexpr,
        DK_ATOMIC: tl.constexpr,
    ):
        """Recompute each tile once; dL = g * ([P_row] + [P_col]) or g * sigmoid(x).

        The program's rows of dQ are its own, so they are read, added to and written back
        (a ring accumulates several blocks into one buffer this way). DK_ATOMIC: dK, shared
        by all row blocks, is added atomically in the same pass. Otherwise dK is the
        caller's second launch of this kernel with Q and K swapped (the "columns" pass:
        each program owns a block of K's rows), which has no atomics at all. A term left
        out reads an LSE of +inf, so its exp is 0. Label (delta) terms are the host's.
        """
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        if not SIGLIP:
            lse_r = tl.load(LSE_ROW_ptr + rows, mask=row_ok & (row_term != 0), other=float("inf"))
        ds_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            ok = row_ok[:, None] & col_ok[None, :]
            raw = _logits_tile(
                Q_ptr,
                K_ptr,
                rows,
                cols,
                row_ok,
                col_ok,
                D,
                Q_stride_m,
                Q_stride_d,
                K_stride_n,
                K_stride_d,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
                PRECISION,
            )
            logits = scale * raw
            if SIGLIP:
                p = tl.sigmoid(logits + bias)
            else:
                lse_c = tl.load(LSE_COL_ptr + cols, mask=col_ok & (col_term != 0), other=float("inf"))
                p = tl.exp(logits - lse_r[:, None]) + tl.exp(logits - lse_c[None, :])
            d_log = tl.where(ok, g * p, 0.0)
            ds_acc += tl.sum(d_log * raw, 1)
            db_acc += tl.sum(d_log, 1)
            # The two products take P itself (in [0, 2]) in the inputs' dtype, so 16-bit tiles
            # multiply on tensor cores (fp32 accumulation; fp32 ones as PRECISION says), and
            # are scaled by g * s afterwards: g * s * P can be ~1e-7, below fp16's normal range.
            p_in = tl.where(ok, p, 0.0).to(Q_ptr.dtype.element_ty)
            gs = g * scale
            for k0 in range(0, D, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < D
                k_blk = tl.load(
                    K_ptr + cols[:, None] * K_stride_n + ks[None, :] * K_stride_d,
                    mask=col_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )
                dq_ptrs = DQ_ptr + rows[:, None] * D + ks[None, :]
                dq_mask = row_ok[:, None] & k_ok[None, :]
                dq = tl.load(dq_ptrs, mask=dq_mask, other=0.0)
                tl.store(dq_ptrs, dq + gs * tl.dot(p_in, k_blk, input_precision=PRECISION), mask=dq_mask)
                if DK_ATOMIC:
                    q_blk = tl.load(
                        Q_ptr + rows[:, None] * Q_stride_m + ks[None, :] * Q_stride_d,
                        mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0,
                    )
                    tl.atomic_add(
                        DK_ptr + cols[:, None] * D + ks[None, :],
                        gs * tl.dot(tl.trans(p_in), q_blk, input_precision=PRECISION),
                        mask=col_ok[:, None] & k_ok[None, :],
                    )
        tl.store(DS_ptr + pid, tl.sum(ds_acc, 0))
        tl.store(DB_ptr + pid, tl.sum(db_acc, 0))


# Launch configs (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by kernel, layout and
# dtype class ("fp32" = TF32, "ieee" = strict fp32, "16bit" = fp16/bf16). Every entry
# compiles with 0 bytes of register spills for sm_90a and sm_80 (ptxas from the triton
# wheel; benchmarks/results/static/kernels.md, asserted by tests/test_kernels_compile.py).
# On CUDA the wrappers autotune over the list (cached by M, N, D); the first entry is the
# one deterministic=True pins. Found spilling on sm_80 and left out: the general (scalar
# load) backward at 64 x 64 (16-bit: 84 / 48 B; TF32 64x64x16: 8 / 4 B), the strict-fp32
# forward at 32x64x32 (16 B), and the strict backward at 64 x 64 tiles (428-2900 B).
# Strict fp32: IEEE dots run on FMA units with operands in registers, hence smaller tiles.
_BLOCKS = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
FWD = launch.Launcher(
    "contrastive fwd",
    _BLOCKS,
    table={
        ("aligned", "16bit"): ((64, 64, 64, 4, 3), (128, 64, 64, 8, 3)),
        ("aligned", "fp32"): ((64, 64, 32, 4, 3), (128, 64, 32, 8, 3)),
        ("general", "16bit"): ((64, 64, 32, 4, 2),),
        ("general", "fp32"): ((64, 64, 16, 4, 1),),
        ("aligned", "ieee"): ((64, 64, 16, 4, 2), (32, 64, 16, 4, 3)),
        ("general", "ieee"): ((64, 64, 16, 4, 1),),
    },
    tune_key=("M", "N", "D"),
    restore=("ROW_ptr", "COL_SUM_ptr"),  # timing runs accumulate into them
)
BWD = launch.Launcher(
    "contrastive bwd",
    _BLOCKS,
    table={
        ("aligned", "16bit"): ((64, 64, 32, 4, 2), (64, 128, 32, 8, 2)),
        ("aligned", "fp32"): ((64, 64, 32, 4, 2), (64, 128, 32, 8, 2)),
        ("general", "16bit"): ((32, 64, 32, 4, 1),),
        ("general", "fp32"): ((32, 64, 16, 4, 1),),
        ("aligned", "ieee"): ((32, 64, 16, 4, 2), (32, 32, 32, 4, 2)),
        ("general", "ieee"): ((32, 64, 16, 4, 1),),
    },
    tune_key=("M", "N", "D"),
    restore=("DQ_ptr", "DK_ptr"),
)
LAUNCHERS = {"fwd": FWD, "bwd": BWD}  # by kind
if triton is not None:
    # The batch sizes and the term flags stay generic in both forms; the aligned form
    # specialises on D and the strides (see mode_fast.kernels.launch).
    _INTS = ("D", "Q_stride_m", "Q_stride_d", "K_stride_n", "K_stride_d")
    FWD.compile(_block_fwd, runtime=("M", "N", "merge"), ints=_INTS)
    BWD.compile(_block_bwd, runtime=("M", "N", "row_term", "col_term"), ints=_INTS)

# The backward's dK: "columns" (a second, column-owned pass, no atomics) or "atomic" (one
# pass, dK added with float atomics). See the traffic formulas in the module doc.
BWD_MODES = dispatch.CONTRASTIVE_BWD


def launch_configs(
    kind: str, dtype: torch.dtype, layout: str = "aligned", strict_fp32: bool = False
) -> list[dict[str, int]]:
    """The configs the wrappers may launch for `kind` ("fwd" or "bwd") on inputs of this
    dtype, strict-fp32 flag and layout (the static report compiles each one)."""
    return LAUNCHERS[kind].configs(dtype, layout, strict_fp32)


def _precision(x: torch.Tensor, strict_fp32: bool) -> str:
    # TF32 only for fp32 inputs and only when allowed; fp16/bf16 tiles multiply natively
    return "tf32" if (x.dtype == torch.float32 and not strict_fp32) else "ieee"


def _launch(
    kind: str,
    q: torch.Tensor,
    k: torch.Tensor,
    buffers: tuple,
    args: tuple,
    consts: dict,
    strict_fp32: bool,
    deterministic: bool,
    config: dict | None,
) -> Any:
    """Launch one block kernel ("fwd" or "bwd") over cdiv(M, BLOCK_M) row programs
    (Launcher.launch: one config, or autotuned on CUDA). buffers: the other tensors passed
    (their alignment picks the compiled form). When autotuned, the grid depends on the
    tuned BLOCK_M: the per-program outputs are sized for the smallest BLOCK_M of the list
    (_max_programs), their unused tail left at zero."""
    if triton is None:
        raise RuntimeError("backend='triton' needs the triton package; use backend='torch'")
    consts = dict(consts, PRECISION=_precision(q, strict_fp32))
    return LAUNCHERS[kind].launch(
        q.shape[0],
        args,
        consts,
        dtype=q.dtype,
        layout=launch.layout(q, k, *buffers),
        strict_fp32=strict_fp32,
        deterministic=deterministic,
        config=config,
    )


def _max_programs(kind: str, q: torch.Tensor, dtype_like: torch.Tensor, strict_fp32: bool) -> int:
    """Programs of the largest grid any config of the list can launch (per-program outputs)."""
    smallest = min(c["BLOCK_M"] for layout in ("aligned", "general")
                   for c in launch_configs(kind, dtype_like.dtype, layout, strict_fp32))  # fmt: skip
    return triton.cdiv(q.shape[0], smallest)


def contrastive_forward(
    img,
    txt,
    scale: float,
    bias: float,
    siglip: bool,
    strict_fp32: bool = False,
    deterministic: bool = False,
    config: dict | None = None,
):
    """Square B x B forward on the kernel. CLIP: (loss, lse_row, lse_col); SigLIP: (loss, None, None).

    CLIP's column LSE: column sums added atomically from the row pass (default), or with
    deterministic=True a second row pass over T I^T (no atomics, twice the matmul work).
    """
    b, d = img.shape
    if siglip:
        row = rows_forward(
            img,
            txt,
            scale,
            bias,
            siglip=True,
            strict_fp32=strict_fp32,
            deterministic=deterministic,
            config=config,
        )
        diag = scale * _row_dots(img, txt)
        return (row.sum() - (diag + bias).sum()) / b, None, None
    if deterministic:
        row = rows_forward(img, txt, scale, strict_fp32=strict_fp32, deterministic=True, config=config)
        lse_col = rows_forward(txt, img, scale, strict_fp32=strict_fp32, deterministic=True, config=config)
    else:
        row = torch.empty(b, dtype=torch.float32, device=img.device)
        col_sum = torch.zeros(b, dtype=torch.float32, device=img.device)
        # |L_ij| <= s ||I_i|| ||T_j||: an upper bound per column, a margin above it for the
        # norms' rounding to the input dtype (computed in it: no upcast copy). Being a little
        # under is harmless: the shift only keeps exp() from overflowing.
        t_norm = torch.linalg.vector_norm(txt, dim=1).float()
        i_max = torch.linalg.vector_norm(img, dim=1).max().float()
        col_shift = (abs(scale) * t_norm * i_max) * (1.0 + 1e-2) + 1e-3
        args = (
            img,
            txt,
            row,
            col_sum,
            col_shift,
            b,
            b,
            d,
            img.stride(0),
            img.stride(1),
            txt.stride(0),
            txt.stride(1),
            float(scale),
            float(bias),
            0,
        )
        _launch(
            "fwd",
            img,
            txt,
            (row, col_sum, col_shift),
            args,
            dict(SIGLIP=False, COLS=True),
            strict_fp32,
            False,
            config,
        )
        lse_col = col_shift + torch.log(col_sum)
        # Columns whose every logit sits > ~87 below the bound underflow to a zero sum: rare
        # (it needs s * (||I|| ||T|| - max logit) > 87); redo those exactly as rows of T I^T.
        bad = (col_sum < 1e-30).nonzero().squeeze(1)
        if bad.numel():
            lse_col[bad] = rows_forward(txt[bad], img, scale, strict_fp32=strict_fp32)
    diag = scale * _row_dots(img, txt)
    loss = 0.5 * (row.sum() + lse_col.sum() - 2.0 * diag.sum()) / b
    return loss, row, lse_col


def contrastive_backward(
    img,
    txt,
    scale: float,
    bias: float,
    lse_row,
    lse_col,
    grad: float,
    siglip: bool,
    strict_fp32: bool = False,
    bwd: str = dispatch.DEFAULT_CONTRASTIVE_BWD,
    deterministic: bool = False,
    config: dict | None = None,
):
    """Square B x B backward on the kernel: (d_img, d_txt fp32, d_scale, d_bias)."""
    b, d = img.shape
    d_img = torch.zeros(b, d, dtype=torch.float32, device=img.device)
    d_txt = torch.zeros(b, d, dtype=torch.float32, device=img.device)
    g = grad / b if siglip else grad / (2.0 * b)
    d_scale, d_bias = rows_backward(
        img,
        txt,
        scale,
        bias,
        lse_row,
        g,
        d_img,
        d_txt,
        siglip=siglip,
        strict_fp32=strict_fp32,
        bwd=bwd,
        deterministic=deterministic,
        config=config,
        lse_col=lse_col,
    )
    # the diagonal (label) terms of dLogits: -g (SigLIP) or -2g (CLIP) on each positive pair
    pos = g if siglip else 2.0 * g
    _sub_labels(d_img, d_txt, img, txt, 0, pos * scale)
    d_scale -= pos * float(_row_dots(img, txt).sum())
    d_bias -= pos * b
    return d_img, d_txt, d_scale, d_bias


def rows_forward(
    q,
    k,
    scale: float,
    bias: float = 0.0,
    *,
    siglip: bool = False,
    merge_into=None,
    strict_fp32: bool = False,
    deterministic: bool = False,
    config: dict | None = None,
) -> torch.Tensor:
    """Rectangular M x N forward on the kernel: per row of q, the LSE of s q k^T (or with
    siglip the sum of softplus(s q k^T + b)), fp32 [M]. merge_into: a running row LSE,
    updated in place to the LSE over it and this block (a ring step), and returned.
    No atomics: every program writes only its own rows (deterministic by construction)."""
    m, d = q.shape
    if merge_into is not None:
        row = merge_into
        assert row.dtype == torch.float32 and row.is_contiguous() and row.shape == (m,)
    else:
        row = torch.empty(m, dtype=torch.float32, device=q.device)
    args = (
        q,
        k,
        row,
        row,
        row,
        m,
        k.shape[0],
        d,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        float(scale),
        float(bias),
        int(merge_into is not None),
    )
    _launch("fwd", q, k, (row,), args, dict(SIGLIP=siglip, COLS=False), strict_fp32, deterministic, config)
    return row


def rows_backward(
    q,
    k,
    scale: float,
    bias: float,
    lse,
    g: float,
    d_q,
    d_k,
    *,
    siglip: bool = False,
    strict_fp32: bool = False,
    bwd: str = dispatch.DEFAULT_CONTRASTIVE_BWD,
    deterministic: bool = False,
    config: dict | None = None,
    lse_col=None,
) -> tuple[float, float]:
    """Rectangular backward on the kernel, dL = g * softmax_rows(s q k^T) (lse: its row LSE;
    with lse_col, the square CLIP case, + g * softmax_cols) or g * sigmoid(s q k^T + b):
    adds s dL k to d_q and s dL^T q to d_k (contiguous fp32, in place) and returns
    (sum dL * q k^T, sum dL), the scale's and bias's shares. Label terms are the caller's.

    bwd="columns": d_q by a row-owned pass, d_k by a second pass with q and k swapped
    (column-owned), no atomics; "atomic": one pass, d_k added atomically (not
    deterministic; deterministic=True refuses it).
    """
    if bwd not in BWD_MODES:
        raise ValueError(f"bwd must be one of {BWD_MODES}, got {bwd!r}")
    if deterministic and bwd == "atomic":
        raise ValueError("deterministic=True needs bwd='columns' (the atomic backward adds floats in any order)")
    m, d = q.shape
    assert d_q.is_contiguous() and d_k.is_contiguous() and d_q.dtype == d_k.dtype == torch.float32
    grid = _max_programs("bwd", q, q, strict_fp32)
    d_s = torch.zeros(grid, dtype=torch.float32, device=q.device)
    d_b = torch.zeros(grid, dtype=torch.float32, device=q.device)
    lse_r = d_s if siglip else lse
    lse_c = lse_col if lse_col is not None else lse_r
    col_term = int(lse_col is not None)
    consts = dict(SIGLIP=siglip, DK_ATOMIC=bwd == "atomic")
    common = (float(scale), float(bias), float(g))
    args = (
        q,
        k,
        lse_r,
        lse_c,
        d_q,
        d_k,
        d_s,
        d_b,
        m,
        k.shape[0],
        d,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        *common,
        1,
        col_term,
    )
    _launch("bwd", q, k, (lse_r, lse_c, d_q, d_k, d_s, d_b), args, consts, strict_fp32, deterministic, config)
    if bwd == "columns":
        # Q and K swapped: the row LSE of this pass is the other's column LSE and vice versa
        # (rows only: the term is the column one). Its scale / bias shares repeat the first's.
        n = k.shape[0]
        grid2 = _max_programs("bwd", k, q, strict_fp32)
        scratch = torch.zeros(2 * grid2, dtype=torch.float32, device=q.device)
        if lse_col is not None:
            lse_r2, lse_c2, terms = lse_col, lse_r, (1, 1)
        else:
            lse_r2, lse_c2, terms = lse_r, lse_r, (0, 1)
        args = (
            k,
            q,
            lse_r2,
            lse_c2,
            d_k,
            d_q,
            scratch[:grid2],
            scratch[grid2:],
            n,
            m,
            d,
            k.stride(0),
            k.stride(1),
            q.stride(0),
            q.stride(1),
            *common,
            *terms,
        )
        _launch(
            "bwd",
            k,
            q,
            (lse_r2, lse_c2, d_k, scratch),
            args,
            consts,
            strict_fp32,
            deterministic,
            config,
        )
    return float(d_s.sum(dtype=torch.float64)), float(d_b.sum(dtype=torch.float64))


# --------------------------------------------------------------------------- torch paths
# Chunked PyTorch: the "torch" backend on every device. A chunk of rows meets all columns
# at once, so the extra memory is O(chunk * N) temporaries plus O(N) statistics; nothing
# M x N outlives a chunk. Everything accumulates in fp32 whatever the input dtype.
def contrastive_default_chunk(n_cols: int, device: torch.device) -> int:
    """Rows per chunk so one chunk's rows x n_cols fp32 block stays small.

    CPU: about 2M floats (8 MB): large enough to amortise per-op overhead, small enough
    to stay near the caches; the symmetric path holds two such buffers, reused for every
    chunk, so at B = 8192, D = 512 its workspace (16 MB) is half the inputs' own gradients.
    CUDA: 64M floats (256 MB), enough to fill the GPU.
    """
    budget = (1 << 26) if device.type == "cuda" else (1 << 21)
    return int(min(max(budget // max(n_cols, 1), 16), 1 << 16))


def clip_sym_forward_torch(img, txt, scale: float, chunk: int | None = None):
    """Symmetric CLIP loss of B x D features: (loss, row LSE [B], column LSE [B]), fp32.

    Each chunk of rows meets all columns once; the row LSE comes from it directly and
    the column LSE is folded in with logaddexp, so the logits are computed once. Two
    chunk x B buffers are reused for every chunk (a fresh multi-MB tensor per chunk
    costs page faults on the CPU, and logsumexp's own temporaries would add more).
    """
    b = img.shape[0]
    chunk = min(chunk or contrastive_default_chunk(b, img.device), b)
    t = _f32(txt)
    lse_row = torch.empty(b, dtype=torch.float32, device=img.device)
    lse_col = torch.full((b,), float("-inf"), dtype=torch.float32, device=img.device)
    buf = torch.empty(chunk, b, dtype=torch.float32, device=img.device)
    tmp = torch.empty_like(buf)
    for s in range(0, b, chunk):
        rows = min(chunk, b - s)
        logits = torch.mm(_f32(img[s : s + rows]), t.t(), out=buf[:rows]).mul_(scale)
        e = tmp[:rows]
        m = logits.amax(1)
        torch.sub(logits, m[:, None], out=e).exp_()
        torch.add(m, e.sum(1).log_(), out=lse_row[s : s + rows])
        m = logits.amax(0)
        torch.sub(logits, m[None, :], out=e).exp_()
        torch.logaddexp(lse_col, e.sum(0).log_().add_(m), out=lse_col)
    diag = scale * _row_dots(img, txt)
    loss = 0.5 * (lse_row.sum() + lse_col.sum() - 2.0 * diag.sum()) / b
    return loss, lse_row, lse_col


def clip_sym_backward_torch(img, txt, scale: float, lse_row, lse_col, grad: float, chunk: int | None = None):
    """Gradients (d_img, d_txt fp32 [B, D], d_scale float) of the symmetric CLIP loss.

    dLogits = g * (P_row + P_col - 2 Id) with g = grad / (2B), recomputed chunk by chunk
    in two reused buffers; d_img = s dLogits T, d_txt = s dLogits^T I, and d_scale =
    sum(dLogits * I T^T) = sum(I * (dLogits T)), read off d_img's rows so the raw
    products need no buffer of their own. The -2 Id part is O(B D), added per chunk.
    """
    b = img.shape[0]
    chunk = min(chunk or contrastive_default_chunk(b, img.device), b)
    t32 = _f32(txt)
    g = grad / (2.0 * b)
    d_img = torch.empty(b, img.shape[1], dtype=torch.float32, device=img.device)
    d_txt = torch.zeros(b, img.shape[1], dtype=torch.float32, device=img.device)
    d_scale = torch.zeros((), dtype=torch.float64, device=img.device)
    buf = torch.empty(chunk, b, dtype=torch.float32, device=img.device)
    tmp = torch.empty_like(buf)
    for s in range(0, b, chunk):
        rows = min(chunk, b - s)
        a = _f32(img[s : s + rows])
        d_log = torch.mm(a, t32.t(), out=buf[:rows]).mul_(scale)
        col = torch.sub(d_log, lse_col[None, :], out=tmp[:rows]).exp_()
        d_log.sub_(lse_row[s : s + rows, None]).exp_().add_(col).mul_(g)
        d_txt.addmm_(d_log.t(), a)
        d_rows = torch.mm(d_log, t32, out=d_img[s : s + rows])
        d_rows.sub_(t32[s : s + rows], alpha=2.0 * g)  # the -2g Id part of dLogits, these rows
        d_scale += (a * d_rows).sum(dtype=torch.float64)
    d_txt.sub_(img, alpha=2.0 * g)  # and its columns
    return d_img.mul_(scale), d_txt.mul_(scale), float(d_scale)


def row_lse_torch(q, k, scale: float, chunk: int | None = None, merge_into=None):
    """LSE over columns of each row of scale * q k^T ([Nq] fp32), chunked over q's rows.

    merge_into: a running LSE, updated in place with logaddexp and returned.
    """
    n = q.shape[0]
    chunk = chunk or contrastive_default_chunk(k.shape[0], q.device)
    k32 = _f32(k)
    out = torch.empty(n, dtype=torch.float32, device=q.device)
    for s in range(0, n, chunk):
        logits = torch.mm(_f32(q[s : s + chunk]), k32.t()).mul_(scale)
        torch.logsumexp(logits, 1, out=out[s : s + chunk])
    if merge_into is not None:
        return torch.logaddexp(merge_into, out, out=merge_into)
    return out


def row_softmax_grad_torch(q, k, scale: float, lse, g: float, d_q, d_k, chunk: int | None = None) -> float:
    """Adds the gradients of dLogits = g * softmax_rows(scale * q k^T) (rows normalised by lse).

    d_q += s dLogits k, d_k += s dLogits^T q (fp32 buffers, updated in place); returns
    sum(dLogits * q k^T), the logit scale's share. The one-hot (label) part is the caller's.
    """
    n = q.shape[0]
    chunk = chunk or contrastive_default_chunk(k.shape[0], q.device)
    k32 = _f32(k)
    d_scale = torch.zeros((), dtype=torch.float64, device=q.device)
    for s in range(0, n, chunk):
        a = _f32(q[s : s + chunk])
        raw = torch.mm(a, k32.t())
        d_log = torch.mul(raw, scale).sub_(lse[s : s + chunk, None]).exp_().mul_(g)
        d_scale += torch.dot(d_log.view(-1), raw.view(-1))
        d_q[s : s + chunk].addmm_(d_log, k32, alpha=scale)
        d_k.addmm_(d_log.t(), a, alpha=scale)
    return float(d_scale)


def siglip_forward_torch(img, txt, scale: float, bias: float, positives: bool = True, chunk: int | None = None):
    """SigLIP loss sum_ij softplus(x_ij) - sum_i x_ii over B rows, x = s I T^T + b (fp32 scalar).

    -log sigmoid(z x) with z = -1 is softplus(x); with z = +1 it is softplus(x) - x, so
    the diagonal is a correction in O(B D). positives=False: every pair is a negative
    (a block of another rank's texts).
    """
    b = img.shape[0]
    chunk = chunk or contrastive_default_chunk(txt.shape[0], img.device)
    t = _f32(txt)
    total = torch.zeros((), dtype=torch.float64, device=img.device)
    for s in range(0, b, chunk):
        x = torch.mm(_f32(img[s : s + chunk]), t.t()).mul_(scale).add_(bias)
        total += torch.nn.functional.softplus(x).sum(dtype=torch.float64)
    if positives:
        total -= (scale * _row_dots(img, txt) + bias).sum(dtype=torch.float64)
    return (total / b).float()


def siglip_backward_torch(
    img, txt, scale: float, bias: float, grad: float, positives: bool = True, chunk: int | None = None, into=None
):
    """(d_img, d_txt fp32, d_scale, d_bias) of siglip_forward_torch: dx = g (sigmoid(x) - Id), g = grad / B.

    into=(d_img, d_txt): add the gradients to these fp32 buffers (negatives only) instead of
    allocating new ones, and return them."""
    b, d = img.shape
    chunk = chunk or contrastive_default_chunk(txt.shape[0], img.device)
    t32 = _f32(txt)
    g = grad / b
    if into is not None and positives:
        raise ValueError("siglip_backward_torch: into= is for negatives-only blocks")
    d_img, d_txt = into or (
        torch.empty(b, d, dtype=torch.float32, device=img.device),
        torch.zeros(txt.shape[0], d, dtype=torch.float32, device=img.device),
    )
    d_scale = torch.zeros((), dtype=torch.float64, device=img.device)
    d_bias = torch.zeros((), dtype=torch.float64, device=img.device)
    for s in range(0, b, chunk):
        a = _f32(img[s : s + chunk])
        raw = torch.mm(a, t32.t())
        d_x = torch.mul(raw, scale).add_(bias).sigmoid_().mul_(g)
        d_scale += torch.dot(d_x.view(-1), raw.view(-1))
        d_bias += d_x.sum(dtype=torch.float64)
        if into is None:
            torch.mm(d_x, t32, out=d_img[s : s + chunk])
            d_txt.addmm_(d_x.t(), a)
        else:  # scaled here: the buffers already hold other blocks' gradients
            d_img[s : s + chunk].addmm_(d_x, t32, alpha=scale)
            d_txt.addmm_(d_x.t(), a, alpha=scale)
    if positives:
        d_scale -= g * _row_dots(img, txt).sum()
        d_bias -= g * b
        _sub_labels(d_img, d_txt, img, txt, 0, g)
    if into is None:
        d_img.mul_(scale), d_txt.mul_(scale)
    return d_img, d_txt, float(d_scale), float(d_bias)


# --------------------------------------------------------------------------- blocks, either backend
def row_lse(
    q,
    k,
    scale: float,
    backend: str,
    *,
    merge_into=None,
    chunk: int | None = None,
    strict_fp32: bool = False,
    deterministic: bool = False,
    bwd: str | None = None,
) -> torch.Tensor:
    """Row LSE of s q k^T on a resolved backend ("torch" or "triton"); see row_lse_torch.
    (bwd is accepted so forward and backward share one keyword set; unused here.)"""
    if backend == "triton":
        return rows_forward(q, k, scale, merge_into=merge_into, strict_fp32=strict_fp32, deterministic=deterministic)
    return row_lse_torch(q, k, scale, chunk, merge_into=merge_into)


def row_softmax_grad(
    q,
    k,
    scale: float,
    lse,
    g: float,
    d_q,
    d_k,
    backend: str,
    *,
    chunk: int | None = None,
    strict_fp32: bool = False,
    deterministic: bool = False,
    bwd: str | None = None,
) -> float:
    """row_softmax_grad_torch on a resolved backend ("torch" or "triton")."""
    if backend == "triton":
        return rows_backward(
            q,
            k,
            scale,
            0.0,
            lse,
            g,
            d_q,
            d_k,
            strict_fp32=strict_fp32,
            deterministic=deterministic,
            bwd=dispatch.contrastive_bwd(bwd),
        )[0]
    return row_softmax_grad_torch(q, k, scale, lse, g, d_q, d_k, chunk)


def ring_block_forward(
    q,
    k_block,
    scale: float,
    lse,
    backend: str,
    *,
    chunk: int | None = None,
    strict_fp32: bool = False,
    deterministic: bool = False,
    bwd: str | None = None,
) -> torch.Tensor:
    """One ring step's forward: the running row LSE `lse` of q (fp32, contiguous) merged in
    place with the LSE of s q k_block^T; `lse=None` starts it. Returns the running LSE."""
    return row_lse(
        q, k_block, scale, backend, merge_into=lse, chunk=chunk, strict_fp32=strict_fp32, deterministic=deterministic
    )


def ring_block_backward(
    q,
    k_block,
    scale: float,
    lse,
    g: float,
    d_q,
    d_k_block,
    backend: str,
    *,
    chunk: int | None = None,
    strict_fp32: bool = False,
    deterministic: bool = False,
    bwd: str | None = None,
) -> float:
    """One ring step's backward: adds g * softmax-rows gradients (normalised by the final
    LSE) to d_q and to the visiting block's accumulator d_k_block; returns the scale's share."""
    return row_softmax_grad(
        q,
        k_block,
        scale,
        lse,
        g,
        d_q,
        d_k_block,
        backend,
        chunk=chunk,
        strict_fp32=strict_fp32,
        deterministic=deterministic,
        bwd=bwd,
    )


# --------------------------------------------------------------------------- autograd Functions
def _without_autocast(method):
    """Run an autograd Function's forward/backward with autocast off.

    open_clip trains under autocast, which would run the chunk matmuls in bf16/fp16 and
    cost ~1e-3 relative error in the loss; the loss is computed from the features in their
    own dtype with fp32 accumulation instead, as the Triton kernels do.
    """

    @functools.wraps(method)
    def wrapper(ctx, *args):
        device = next(a for a in args if isinstance(a, torch.Tensor)).device
        with torch.autocast(device_type=device.type, enabled=False):
            return method(ctx, *args)

    return wrapper


class _ClipLoss(torch.autograd.Function):
    """Symmetric CLIP loss; saves the features, the scale and two LSE vectors."""

    @staticmethod
    @_without_autocast
    def forward(ctx, img, txt, scale_t, backend, chunk, kw):
        scale = float(scale_t)
        if backend == "triton":
            loss, lse_row, lse_col = contrastive_forward(img, txt, scale, 0.0, False, **_fwd_kw(kw))
        else:
            loss, lse_row, lse_col = clip_sym_forward_torch(img, txt, scale, chunk)
        ctx.save_for_backward(img, txt, scale_t, lse_row, lse_col)
        ctx.opts = (backend, chunk, kw)
        return loss

    @staticmethod
    @_without_autocast
    def backward(ctx, grad):
        img, txt, scale_t, lse_row, lse_col = ctx.saved_tensors
        backend, chunk, kw = ctx.opts
        scale = float(scale_t)
        if backend == "triton":
            d_img, d_txt, d_scale, _ = contrastive_backward(
                img, txt, scale, 0.0, lse_row, lse_col, float(grad), False, **kw
            )
        else:
            d_img, d_txt, d_scale = clip_sym_backward_torch(img, txt, scale, lse_row, lse_col, float(grad), chunk)
        return (
            d_img.to(img.dtype) if ctx.needs_input_grad[0] else None,
            d_txt.to(txt.dtype) if ctx.needs_input_grad[1] else None,
            _grad_like(d_scale, scale_t, ctx.needs_input_grad[2]),
            None,
            None,
            None,
        )


class _InfoNCE(torch.autograd.Function):
    """One direction: mean_i [LSE_j(s q_i.k_j) - s q_i.k_{offset+i}] (open_clip's local_loss rows)."""

    @staticmethod
    @_without_autocast
    def forward(ctx, q, k, scale_t, offset, backend, chunk, kw):
        scale = float(scale_t)
        n = q.shape[0]
        lse = row_lse(q, k, scale, backend, chunk=chunk, **kw)
        pos = scale * _row_dots(q, k[offset : offset + n])
        ctx.save_for_backward(q, k, scale_t, lse)
        ctx.opts = (offset, backend, chunk, kw)
        return (lse.sum() - pos.sum()) / n

    @staticmethod
    @_without_autocast
    def backward(ctx, grad):
        q, k, scale_t, lse = ctx.saved_tensors
        off, backend, chunk, kw = ctx.opts
        scale, n = float(scale_t), q.shape[0]
        g = float(grad) / n
        d_q = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        d_k = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        d_scale = row_softmax_grad(q, k, scale, lse, g, d_q, d_k, backend, chunk=chunk, **kw)
        d_scale -= g * float(_row_dots(q, k[off : off + n]).sum())
        _sub_labels(d_q, d_k, q, k, off, g * scale)
        return (
            d_q.to(q.dtype) if ctx.needs_input_grad[0] else None,
            d_k.to(k.dtype) if ctx.needs_input_grad[1] else None,
            _grad_like(d_scale, scale_t, ctx.needs_input_grad[2]),
            None,
            None,
            None,
            None,
        )


def siglip_block_forward(img, txt, scale: float, bias: float, positives: bool, backend: str, chunk, kw) -> torch.Tensor:
    """SigLIP loss of one block (fp32 scalar over img's rows) on a resolved backend.

    positives=False: every pair a negative (another rank's texts). Needs nothing saved
    but the two blocks: SigLIP's terms are independent, there is no normaliser."""
    if backend == "triton" and positives:
        return contrastive_forward(img, txt, scale, bias, True, **_fwd_kw(kw))[0]
    if backend == "triton":
        return rows_forward(img, txt, scale, bias, siglip=True, **_fwd_kw(kw)).sum() / img.shape[0]
    return siglip_forward_torch(img, txt, scale, bias, positives, chunk)


def siglip_block_backward(
    img, txt, scale: float, bias: float, grad: float, positives: bool, backend: str, chunk, kw, into=None
):
    """(d_img, d_txt fp32, d_scale, d_bias) of siglip_block_forward for upstream gradient grad.

    into=(d_img, d_txt), negatives only: the gradients are added to these fp32 buffers, which
    are returned (a ring step allocates nothing of size B * D)."""
    if backend == "triton" and positives:
        return contrastive_backward(img, txt, scale, bias, None, None, grad, True, **kw)
    if backend == "triton":
        d_img, d_txt = into or (
            torch.zeros(img.shape, dtype=torch.float32, device=img.device),
            torch.zeros(txt.shape, dtype=torch.float32, device=img.device),
        )
        d_scale, d_bias = rows_backward(
            img, txt, scale, bias, None, grad / img.shape[0], d_img, d_txt, siglip=True, **kw
        )
        return d_img, d_txt, d_scale, d_bias
    return siglip_backward_torch(img, txt, scale, bias, grad, positives, chunk, into)


class _SigLipLoss(torch.autograd.Function):
    @staticmethod
    @_without_autocast
    def forward(ctx, img, txt, scale_t, bias_t, positives, backend, chunk, kw):
        loss = siglip_block_forward(img, txt, float(scale_t), float(bias_t), positives, backend, chunk, kw)
        ctx.save_for_backward(img, txt, scale_t, bias_t)
        ctx.opts = (positives, backend, chunk, kw)
        return loss

    @staticmethod
    @_without_autocast
    def backward(ctx, grad):
        img, txt, scale_t, bias_t = ctx.saved_tensors
        positives, backend, chunk, kw = ctx.opts
        d_img, d_txt, d_scale, d_bias = siglip_block_backward(
            img, txt, float(scale_t), float(bias_t), float(grad), positives, backend, chunk, kw
        )
        return (
            d_img.to(img.dtype) if ctx.needs_input_grad[0] else None,
            d_txt.to(txt.dtype) if ctx.needs_input_grad[1] else None,
            _grad_like(d_scale, scale_t, ctx.needs_input_grad[2]),
            _grad_like(d_bias, bias_t, ctx.needs_input_grad[3]),
            None,
            None,
            None,
            None,
        )


# --------------------------------------------------------------------------- public API
def _kernel_kw(strict_fp32: bool, deterministic: bool, bwd: str | None) -> dict:
    """The Triton options of one call (the torch path takes none: it is deterministic as is)."""
    if deterministic and bwd == "atomic":
        raise ValueError("deterministic=True needs bwd='columns' (the atomic backward adds floats in any order)")
    # deterministic takes the columns pass whatever the default or environment says
    bwd = "columns" if deterministic else dispatch.contrastive_bwd(bwd)
    return {"strict_fp32": bool(strict_fp32), "deterministic": bool(deterministic), "bwd": bwd}


def _fwd_kw(kw: dict) -> dict:
    return {"strict_fp32": kw["strict_fp32"], "deterministic": kw["deterministic"]}


def pick_backend(variant: str, like: torch.Tensor, backend: str = "auto") -> str:
    """The backend ("torch" or "triton") that runs `variant` on `like` (mode_fast.kernels.dispatch)."""
    return dispatch.pick("contrastive", variant, like, backend)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    backend: str = "auto",
    *,
    chunk_size: int | None = None,
    strict_fp32: bool = False,
    deterministic: bool = False,
    bwd: str | None = None,
) -> torch.Tensor:
    """Symmetric CLIP loss 0.5 * (CE(s I T^T, diag) + CE(s T I^T, diag)), a differentiable fp32 scalar.

    logit_scale is the already-exponentiated scale (open_clip passes logit_scale.exp()).
    Memory: O(B * D) saved for backward plus O(chunk * B) temporaries; no B x B tensor.
    backend: "triton" (CUDA kernels), "torch" (chunked PyTorch, any device) or "auto"
    (Triton on CUDA, torch otherwise). strict_fp32: no TF32 in the Triton kernels.
    deterministic: the same bits on every run for the same inputs (module doc:
    Determinism). bwd: the Triton backward's dK pass, "columns" or "atomic" (None: the
    default, see dispatch.contrastive_bwd).
    """
    _check_features(image_features, text_features)
    scale_t = _as_scalar_tensor(logit_scale, "logit_scale", image_features)
    backend = pick_backend(dispatch.CLIP, image_features, backend)
    kw = _kernel_kw(strict_fp32, deterministic, bwd)
    return _ClipLoss.apply(image_features, text_features, scale_t, backend, chunk_size, kw)


def infonce_loss(
    queries: torch.Tensor,
    keys: torch.Tensor,
    logit_scale: torch.Tensor | float,
    offset: int = 0,
    *,
    backend: str = "auto",
    chunk_size: int | None = None,
    strict_fp32: bool = False,
    deterministic: bool = False,
    bwd: str | None = None,
) -> torch.Tensor:
    """One-direction InfoNCE: mean over q rows of CE(s q k^T, offset + row).

    Rectangular: M queries against N >= offset + M keys; no M x N tensor.
    """
    _check_features(queries, keys, same_rows=False)
    _check_offset(offset, queries.shape[0], keys.shape[0])
    scale_t = _as_scalar_tensor(logit_scale, "logit_scale", queries)
    backend = pick_backend(dispatch.INFONCE, queries, backend)
    kw = _kernel_kw(strict_fp32, deterministic, bwd)
    return _InfoNCE.apply(queries, keys, scale_t, int(offset), backend, chunk_size, kw)


def local_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    all_image_features: torch.Tensor,
    all_text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    offset: int,
    *,
    backend: str = "auto",
    chunk_size: int | None = None,
    strict_fp32: bool = False,
    deterministic: bool = False,
    bwd: str | None = None,
) -> torch.Tensor:
    """open_clip's local_loss=True: 0.5 * (CE(s I_loc T_all^T) + CE(s T_loc I_all^T)), labels at offset.

    Both directions of the local rows against the gathered columns (two row passes of the
    rectangular kernel, or of the chunked torch path). offset = rank * local batch.
    """
    _check_features(image_features, text_features)
    _check_features(all_image_features, all_text_features)
    _check_features(image_features, all_text_features, same_rows=False)
    _check_offset(offset, image_features.shape[0], all_text_features.shape[0])
    scale_t = _as_scalar_tensor(logit_scale, "logit_scale", image_features)
    backend = pick_backend(dispatch.CLIP_LOCAL, image_features, backend)
    opts = (int(offset), backend, chunk_size, _kernel_kw(strict_fp32, deterministic, bwd))
    return 0.5 * (
        _InfoNCE.apply(image_features, all_text_features, scale_t, *opts)
        + _InfoNCE.apply(text_features, all_image_features, scale_t, *opts)
    )


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    backend: str = "auto",
    *,
    positives: bool = True,
    chunk_size: int | None = None,
    strict_fp32: bool = False,
    deterministic: bool = False,
    bwd: str | None = None,
) -> torch.Tensor:
    """SigLIP loss -sum_ij log sigmoid(z_ij (s I_i.T_j + b)) / B, z = +1 on the diagonal, -1 elsewhere.

    positives=False treats every pair as negative (another rank's text block, as in
    open_clip's negative_only); then the two batches may differ in size.
    """
    _check_features(image_features, text_features, same_rows=positives)
    scale_t = _as_scalar_tensor(logit_scale, "logit_scale", image_features)
    bias_t = _as_scalar_tensor(logit_bias, "logit_bias", image_features)
    backend = pick_backend(dispatch.SIGLIP if positives else dispatch.SIGLIP_NEGATIVES, image_features, backend)
    return _SigLipLoss.apply(
        image_features,
        text_features,
        scale_t,
        bias_t,
        positives,
        backend,
        chunk_size,
        _kernel_kw(strict_fp32, deterministic, bwd),
    )
