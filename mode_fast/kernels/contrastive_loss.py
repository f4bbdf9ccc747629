"""Fused, tiled CLIP (InfoNCE) and SigLIP losses: memory O(B*D), never a B x B tensor.

Maths (I, T: B x D features, s: the already-exponentiated logit scale, b: logit bias)
    L = s * I T^T                                   logits, B x B, only ever seen as tiles
    CLIP   loss = 1/(2B) * sum_i [LSE_j L_ij - L_ii] + 1/(2B) * sum_j [LSE_i L_ij - L_jj]
           dL_ij = g/(2B) * (P_row_ij + P_col_ij - 2 delta_ij),   g = upstream gradient
                   P_row_ij = exp(L_ij - LSE_row_i),  P_col_ij = exp(L_ij - LSE_col_j)
           dI = s * dL T,   dT = s * dL^T I,   ds = sum_ij dL_ij * (I T^T)_ij
    SigLIP x = s * I T^T + b;  loss = 1/B * [sum_ij softplus(x_ij) - sum_i x_ii]
           (-log sigmoid(z x) is softplus(x) for z = -1 and softplus(x) - x for z = +1)
           dx_ij = g/B * (sigmoid(x_ij) - delta_ij)
           dI = s * dx T,   dT = s * dx^T I,   ds = sum dx * (I T^T),   db = sum dx
Forward keeps only the row and column LSE (O(B)); backward recomputes the tiles, like
FlashAttention. One logits tile feeds both directions, so fwd + bwd costs 4 B^2 D
matmuls (open_clip's ClipLoss: 6).

Layers: Triton kernels (_*_kernel) -> host *_forward / *_backward -> autograd.Function
-> clip_loss(), siglip_loss(). The pure-PyTorch chunked paths are in reference.py.
"""
from __future__ import annotations

import functools

import os
from typing import Any

import torch

from . import reference as ref

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BACKENDS = ("auto", "torch", "triton")


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


def _pick_backend(backend: str, x: torch.Tensor) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda and _triton_available() else "torch"
    if backend == "triton" and not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError(
            f"backend='triton' needs CUDA tensors (features are on {x.device}); "
            "use backend='torch' or set TRITON_INTERPRET=1 before importing triton"
        )
    return backend


def _triton_available() -> bool:
    return triton is not None


def _grad_like(value: float, like: torch.Tensor, needed: bool) -> torch.Tensor | None:
    return torch.full_like(like, value) if needed else None


# --------------------------------------------------------------------------- Triton kernels
try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backend still works
    triton = None

# Tile sizes: one config (autotuning needs a GPU to mean anything, and several configs
# fail under TRITON_INTERPRET=1). Small tiles when interpreting: it runs through numpy.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_BLOCK_M, _BLOCK_N, _BLOCK_K = (16, 16, 16) if _INTERPRET else (64, 64, 32)

if triton is not None:

    @triton.jit
    def _logits_tile(I_ptr, T_ptr, rows, cols, row_ok, col_ok, D, I_stride_b, I_stride_d,
                     T_stride_b, T_stride_d,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     PRECISION: tl.constexpr):
        """I[rows] . T[cols]^T over all of D in BLOCK_K slices, fp32 accumulation."""
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            # masked lanes must read 0 (other=0.0) so they add nothing to the dot
            a = tl.load(I_ptr + rows[:, None] * I_stride_b + ks[None, :] * I_stride_d,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            bt = tl.load(T_ptr + cols[None, :] * T_stride_b + ks[:, None] * T_stride_d,
                         mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            acc = tl.dot(a, bt, acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _contrastive_fwd_kernel(
        # data
        I_ptr, T_ptr, ROW_ptr, COL_SUM_ptr, COL_SHIFT_ptr,
        # shapes
        B, D,
        # strides
        I_stride_b, I_stride_d, T_stride_b, T_stride_d,
        # constants
        scale, bias,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr, SIGLIP: tl.constexpr,
    ):
        """One program per block of rows, sweeping all column blocks; each tile computed once.

        CLIP: ROW = row LSE (online max/sum); column sums exp(L - shift_j) are added
        atomically, shift_j being an upper bound of column j's logits, so partial sums
        from different row blocks need no rescaling. SIGLIP: ROW = sum_j softplus(x_ij).
        """
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < B
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for n0 in range(0, B, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < B
            ok = row_ok[:, None] & col_ok[None, :]
            logits = scale * _logits_tile(I_ptr, T_ptr, rows, cols, row_ok, col_ok, D, I_stride_b, I_stride_d,
                                          T_stride_b, T_stride_d, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
            if SIGLIP:
                x = logits + bias
                sp = tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))  # stable softplus
                l_i += tl.sum(tl.where(ok, sp, 0.0), 1)
            else:
                lr = tl.where(col_ok[None, :], logits, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(lr, 1))
                l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(lr - m_new[:, None]), 1)
                m_i = m_new
                shift = tl.load(COL_SHIFT_ptr + cols, mask=col_ok, other=0.0)
                e = tl.where(ok, tl.exp(logits - shift[None, :]), 0.0)
                tl.atomic_add(COL_SUM_ptr + cols, tl.sum(e, 0), mask=col_ok)
        if SIGLIP:
            tl.store(ROW_ptr + rows, l_i, mask=row_ok)
        else:
            tl.store(ROW_ptr + rows, m_i + tl.log(l_i), mask=row_ok)

    @triton.jit
    def _contrastive_bwd_kernel(
        # data
        I_ptr, T_ptr, LSE_ROW_ptr, LSE_COL_ptr, DI_ptr, DT_ptr, DS_ptr, DB_ptr,
        # shapes
        B, D,
        # strides (DI / DT are contiguous fp32 [B, D])
        I_stride_b, I_stride_d, T_stride_b, T_stride_d,
        # constants
        scale, bias, g,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr, SIGLIP: tl.constexpr,
    ):
        """Recompute each tile once; dI for the program's rows accumulates in place (rows are
        owned), dT is shared by all row blocks so it is added atomically. Off-diagonal part
        only: the host subtracts the diagonal (label) terms in O(B D).
        """
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < B
        if not SIGLIP:
            lse_r = tl.load(LSE_ROW_ptr + rows, mask=row_ok, other=0.0)
        ds_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
        for n0 in range(0, B, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < B
            ok = row_ok[:, None] & col_ok[None, :]
            raw = _logits_tile(I_ptr, T_ptr, rows, cols, row_ok, col_ok, D, I_stride_b, I_stride_d,
                               T_stride_b, T_stride_d, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
            logits = scale * raw
            if SIGLIP:
                p = tl.sigmoid(logits + bias)
            else:
                lse_c = tl.load(LSE_COL_ptr + cols, mask=col_ok, other=0.0)
                p = tl.exp(logits - lse_r[:, None]) + tl.exp(logits - lse_c[None, :])
            d_log = tl.where(ok, g * p, 0.0)
            ds_acc += tl.sum(d_log * raw, 1)
            db_acc += tl.sum(d_log, 1)
            d_lin = d_log * scale  # d loss / d (I T^T)
            for k0 in range(0, D, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < D
                t_blk = tl.load(T_ptr + cols[:, None] * T_stride_b + ks[None, :] * T_stride_d,
                                mask=col_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                i_blk = tl.load(I_ptr + rows[:, None] * I_stride_b + ks[None, :] * I_stride_d,
                                mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                di_ptrs = DI_ptr + rows[:, None] * D + ks[None, :]
                di_mask = row_ok[:, None] & k_ok[None, :]
                di = tl.load(di_ptrs, mask=di_mask, other=0.0)
                tl.store(di_ptrs, di + tl.dot(d_lin, t_blk, input_precision=PRECISION), mask=di_mask)
                tl.atomic_add(DT_ptr + cols[:, None] * D + ks[None, :],
                              tl.dot(tl.trans(d_lin), i_blk, input_precision=PRECISION),
                              mask=col_ok[:, None] & k_ok[None, :])
        tl.store(DS_ptr + pid, tl.sum(ds_acc, 0))
        tl.store(DB_ptr + pid, tl.sum(db_acc, 0))


def _precision(x: torch.Tensor, strict_fp32: bool) -> str:
    # TF32 only for fp32 inputs and only when allowed; fp16/bf16 tiles multiply natively
    return "tf32" if (x.dtype == torch.float32 and not strict_fp32) else "ieee"


def _launch_meta(x: torch.Tensor, strict_fp32: bool) -> dict:
    if triton is None:
        raise RuntimeError("backend='triton' needs the triton package; use backend='torch'")
    return dict(BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, PRECISION=_precision(x, strict_fp32))


def contrastive_forward(img, txt, scale: float, bias: float, siglip: bool, strict_fp32: bool = False):
    """Host side of the forward kernel. CLIP: (loss, lse_row, lse_col); SigLIP: (loss, None, None)."""
    b, d = img.shape
    meta = _launch_meta(img, strict_fp32)
    row = torch.empty(b, dtype=torch.float32, device=img.device)
    col_sum = torch.zeros(b, dtype=torch.float32, device=img.device)
    if siglip:
        col_shift = col_sum  # unused
    else:
        # |L_ij| <= s ||I_i|| ||T_j||: an upper bound per column, a hair above it for rounding
        t_norm = torch.linalg.vector_norm(txt, dim=1, dtype=torch.float32)
        i_max = torch.linalg.vector_norm(img, dim=1, dtype=torch.float32).max()
        col_shift = (abs(scale) * t_norm * i_max) * (1.0 + 1e-3) + 1e-3
    grid = (triton.cdiv(b, meta["BLOCK_M"]),)
    _contrastive_fwd_kernel[grid](
        img, txt, row, col_sum, col_shift, b, d,
        img.stride(0), img.stride(1), txt.stride(0), txt.stride(1),
        float(scale), float(bias), SIGLIP=siglip, **meta,
    )
    diag = scale * (img.float() * txt.float()).sum(1)  # O(B D); a fp32 copy only for half inputs
    if siglip:
        return (row.sum() - (diag + bias).sum()) / b, None, None
    lse_col = col_shift + torch.log(col_sum)
    # Columns whose every logit sits > ~87 below the bound underflow to a zero sum: rare
    # (it needs s * (||I|| ||T|| - max logit) > 87); redo those exactly in chunked PyTorch.
    bad = (col_sum < 1e-30).nonzero().squeeze(1)
    if bad.numel():
        lse_col[bad] = ref.row_lse_torch(txt[bad], img, scale)
    loss = 0.5 * (row.sum() + lse_col.sum() - 2.0 * diag.sum()) / b
    return loss, row, lse_col


def contrastive_backward(img, txt, scale: float, bias: float, lse_row, lse_col, grad: float, siglip: bool,
                         strict_fp32: bool = False):
    """Host side of the backward kernel: (d_img, d_txt fp32, d_scale, d_bias)."""
    b, d = img.shape
    meta = _launch_meta(img, strict_fp32)
    d_img = torch.zeros(b, d, dtype=torch.float32, device=img.device)
    d_txt = torch.zeros(b, d, dtype=torch.float32, device=img.device)
    grid = (triton.cdiv(b, meta["BLOCK_M"]),)
    d_s = torch.empty(grid[0], dtype=torch.float32, device=img.device)
    d_b = torch.empty(grid[0], dtype=torch.float32, device=img.device)
    g = grad / b if siglip else grad / (2.0 * b)
    dummy = d_s
    _contrastive_bwd_kernel[grid](
        img, txt, dummy if siglip else lse_row, dummy if siglip else lse_col, d_img, d_txt, d_s, d_b, b, d,
        img.stride(0), img.stride(1), txt.stride(0), txt.stride(1),
        float(scale), float(bias), float(g), SIGLIP=siglip, **meta,
    )
    # the diagonal (label) terms of dLogits: -g (SigLIP) or -2g (CLIP) on each positive pair
    pos = g if siglip else 2.0 * g
    i32, t32 = img.float(), txt.float()
    d_img.sub_(t32, alpha=pos * scale)
    d_txt.sub_(i32, alpha=pos * scale)
    d_scale = float(d_s.sum(dtype=torch.float64)) - pos * float((i32 * t32).sum())
    d_bias = float(d_b.sum(dtype=torch.float64)) - pos * b
    return d_img, d_txt, d_scale, d_bias


class _ClipLossTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img, txt, scale_t, strict_fp32):
        loss, lse_row, lse_col = contrastive_forward(img, txt, float(scale_t), 0.0, False, strict_fp32)
        ctx.save_for_backward(img, txt, scale_t, lse_row, lse_col)
        ctx.strict_fp32 = strict_fp32
        return loss

    @staticmethod
    def backward(ctx, grad):
        img, txt, scale_t, lse_row, lse_col = ctx.saved_tensors
        d_img, d_txt, d_scale, _ = contrastive_backward(
            img, txt, float(scale_t), 0.0, lse_row, lse_col, float(grad), False, ctx.strict_fp32
        )
        return (
            d_img.to(img.dtype) if ctx.needs_input_grad[0] else None,
            d_txt.to(txt.dtype) if ctx.needs_input_grad[1] else None,
            _grad_like(d_scale, scale_t, ctx.needs_input_grad[2]),
            None,
        )


class _SigLipLossTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img, txt, scale_t, bias_t, positives, strict_fp32):
        if not positives:
            raise NotImplementedError("siglip_loss(positives=False) has no Triton kernel yet; use backend='torch'")
        loss, _, _ = contrastive_forward(img, txt, float(scale_t), float(bias_t), True, strict_fp32)
        ctx.save_for_backward(img, txt, scale_t, bias_t)
        ctx.strict_fp32 = strict_fp32
        return loss

    @staticmethod
    def backward(ctx, grad):
        img, txt, scale_t, bias_t = ctx.saved_tensors
        d_img, d_txt, d_scale, d_bias = contrastive_backward(
            img, txt, float(scale_t), float(bias_t), None, None, float(grad), True, ctx.strict_fp32
        )
        return (
            d_img.to(img.dtype) if ctx.needs_input_grad[0] else None,
            d_txt.to(txt.dtype) if ctx.needs_input_grad[1] else None,
            _grad_like(d_scale, scale_t, ctx.needs_input_grad[2]),
            _grad_like(d_bias, bias_t, ctx.needs_input_grad[3]),
            None,
            None,
        )


# --------------------------------------------------------------------------- torch backend
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


class _ClipLossTorch(torch.autograd.Function):
    """Symmetric CLIP loss, chunked PyTorch; saves features, scale and two LSE vectors."""

    @staticmethod
    @_without_autocast
    def forward(ctx, img, txt, scale_t, chunk):
        scale = float(scale_t)
        loss, lse_row, lse_col = ref.clip_sym_forward_torch(img, txt, scale, chunk)
        ctx.save_for_backward(img, txt, scale_t, lse_row, lse_col)
        ctx.chunk = chunk
        return loss

    @staticmethod
    @_without_autocast
    def backward(ctx, grad):
        img, txt, scale_t, lse_row, lse_col = ctx.saved_tensors
        d_img, d_txt, d_scale = ref.clip_sym_backward_torch(
            img, txt, float(scale_t), lse_row, lse_col, float(grad), ctx.chunk
        )
        return (
            d_img.to(img.dtype) if ctx.needs_input_grad[0] else None,
            d_txt.to(txt.dtype) if ctx.needs_input_grad[1] else None,
            _grad_like(d_scale, scale_t, ctx.needs_input_grad[2]),
            None,
        )


class _InfoNCETorch(torch.autograd.Function):
    """One direction: mean_i [LSE_j(s q_i.k_j) - s q_i.k_{offset+i}] (open_clip's local_loss rows)."""

    @staticmethod
    @_without_autocast
    def forward(ctx, q, k, scale_t, offset, chunk):
        scale = float(scale_t)
        n = q.shape[0]
        lse = ref.row_lse_torch(q, k, scale, chunk)
        pos = scale * (q.float() * k[offset : offset + n].float()).sum(1)
        ctx.save_for_backward(q, k, scale_t, lse)
        ctx.offset, ctx.chunk = offset, chunk
        return (lse.sum() - pos.sum()) / n

    @staticmethod
    @_without_autocast
    def backward(ctx, grad):
        q, k, scale_t, lse = ctx.saved_tensors
        scale, n, off = float(scale_t), q.shape[0], ctx.offset
        g = float(grad) / n
        d_q = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        d_k = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        d_scale = ref.row_softmax_grad_torch(q, k, scale, lse, g, d_q, d_k, ctx.chunk)
        q32, kpos = q.float(), k[off : off + n].float()
        d_scale -= g * float((q32 * kpos).sum())
        d_q.sub_(kpos, alpha=g * scale)
        d_k[off : off + n].sub_(q32, alpha=g * scale)
        return (
            d_q.to(q.dtype) if ctx.needs_input_grad[0] else None,
            d_k.to(k.dtype) if ctx.needs_input_grad[1] else None,
            _grad_like(d_scale, scale_t, ctx.needs_input_grad[2]),
            None,
            None,
        )


class _SigLipLossTorch(torch.autograd.Function):
    @staticmethod
    @_without_autocast
    def forward(ctx, img, txt, scale_t, bias_t, positives, chunk):
        loss = ref.siglip_forward_torch(img, txt, float(scale_t), float(bias_t), positives, chunk)
        ctx.save_for_backward(img, txt, scale_t, bias_t)
        ctx.positives, ctx.chunk = positives, chunk
        return loss

    @staticmethod
    @_without_autocast
    def backward(ctx, grad):
        img, txt, scale_t, bias_t = ctx.saved_tensors
        d_img, d_txt, d_scale, d_bias = ref.siglip_backward_torch(
            img, txt, float(scale_t), float(bias_t), float(grad), ctx.positives, ctx.chunk
        )
        return (
            d_img.to(img.dtype) if ctx.needs_input_grad[0] else None,
            d_txt.to(txt.dtype) if ctx.needs_input_grad[1] else None,
            _grad_like(d_scale, scale_t, ctx.needs_input_grad[2]),
            _grad_like(d_bias, bias_t, ctx.needs_input_grad[3]),
            None,
            None,
        )


# --------------------------------------------------------------------------- public API
def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    backend: str = "auto",
    *,
    chunk_size: int | None = None,
    strict_fp32: bool = False,
) -> torch.Tensor:
    """Symmetric CLIP loss 0.5 * (CE(s I T^T, diag) + CE(s T I^T, diag)), a differentiable fp32 scalar.

    logit_scale is the already-exponentiated scale (open_clip passes logit_scale.exp()).
    Memory: O(B * D) saved for backward plus O(chunk * B) temporaries; no B x B tensor.
    backend: "triton" (CUDA kernels), "torch" (chunked PyTorch, any device) or "auto"
    (Triton on CUDA, torch otherwise). strict_fp32: no TF32 in the Triton kernels.
    """
    _check_features(image_features, text_features)
    scale_t = _as_scalar_tensor(logit_scale, "logit_scale", image_features)
    if _pick_backend(backend, image_features) == "triton":
        return _ClipLossTriton.apply(image_features, text_features, scale_t, strict_fp32)
    return _ClipLossTorch.apply(image_features, text_features, scale_t, chunk_size)


def infonce_loss(
    queries: torch.Tensor,
    keys: torch.Tensor,
    logit_scale: torch.Tensor | float,
    offset: int = 0,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """One-direction InfoNCE: mean over q rows of CE(s q k^T, offset + row), chunked PyTorch.

    open_clip's local_loss=True computes this for local images against all texts and
    local texts against all images (offset = rank * local batch).
    """
    _check_features(queries, keys, same_rows=False)
    if not 0 <= offset <= keys.shape[0] - queries.shape[0]:
        raise ValueError(
            f"offset {offset} + {queries.shape[0]} query rows runs past the {keys.shape[0]} keys"
        )
    scale_t = _as_scalar_tensor(logit_scale, "logit_scale", queries)
    return _InfoNCETorch.apply(queries, keys, scale_t, int(offset), chunk_size)


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
) -> torch.Tensor:
    """SigLIP loss -sum_ij log sigmoid(z_ij (s I_i.T_j + b)) / B, z = +1 on the diagonal, -1 elsewhere.

    positives=False treats every pair as negative (another rank's text block, as in
    open_clip's negative_only); then the two batches may differ in size.
    """
    _check_features(image_features, text_features, same_rows=positives)
    scale_t = _as_scalar_tensor(logit_scale, "logit_scale", image_features)
    bias_t = _as_scalar_tensor(logit_bias, "logit_bias", image_features)
    if _pick_backend(backend, image_features) == "triton":
        return _SigLipLossTriton.apply(image_features, text_features, scale_t, bias_t, positives, strict_fp32)
    return _SigLipLossTorch.apply(image_features, text_features, scale_t, bias_t, positives, chunk_size)
