"""Pure-PyTorch reference paths: test oracles, benchmark baselines and the contrastive CPU paths.

Each kernel family keeps its references in its own section below.
"""

# ---- contrastive loss (see contrastive_loss.py) ----
# Chunked pure-PyTorch paths of the CLIP / SigLIP losses: the "torch" backend of
# clip_loss() / siglip_loss() on every device, and the blocks the ring variant is
# built from. A chunk of rows meets all columns at once, so the extra memory is
# O(chunk * N) temporaries plus O(N) statistics; nothing B x B outlives a chunk.
# Everything accumulates in fp32 whatever the input dtype. Naive references that
# materialise the logits (tests only) are at the end of the section.
import torch as _cl_torch


def contrastive_default_chunk(n_cols: int, device: _cl_torch.device) -> int:
    """Rows per chunk so one chunk's rows x n_cols fp32 block stays small.

    CPU: about 2M floats (8 MB): large enough to amortise per-op overhead, small enough
    to stay near the caches; CUDA: 64M floats (256 MB), enough to fill the GPU.
    """
    budget = (1 << 26) if device.type == "cuda" else (1 << 21)
    return int(min(max(budget // max(n_cols, 1), 16), 1 << 16))


def _cl_f32(x: _cl_torch.Tensor) -> _cl_torch.Tensor:
    return x if x.dtype == _cl_torch.float32 else x.float()


def clip_sym_forward_torch(img, txt, scale: float, chunk: int | None = None):
    """Symmetric CLIP loss of B x D features: (loss, row LSE [B], column LSE [B]), fp32.

    Each chunk of rows meets all columns once; the row LSE comes from it directly and
    the column LSE is folded in with logaddexp, so the logits are computed once.
    """
    b = img.shape[0]
    chunk = chunk or contrastive_default_chunk(b, img.device)
    t = _cl_f32(txt)
    lse_row = _cl_torch.empty(b, dtype=_cl_torch.float32, device=img.device)
    lse_col = _cl_torch.full((b,), float("-inf"), dtype=_cl_torch.float32, device=img.device)
    for s in range(0, b, chunk):
        logits = _cl_torch.mm(_cl_f32(img[s : s + chunk]), t.t()).mul_(scale)
        _cl_torch.logsumexp(logits, 1, out=lse_row[s : s + chunk])
        _cl_torch.logaddexp(lse_col, _cl_torch.logsumexp(logits, 0), out=lse_col)
    diag = scale * (_cl_f32(img) * t).sum(1)
    loss = 0.5 * (lse_row.sum() + lse_col.sum() - 2.0 * diag.sum()) / b
    return loss, lse_row, lse_col


def clip_sym_backward_torch(img, txt, scale: float, lse_row, lse_col, grad: float, chunk: int | None = None):
    """Gradients (d_img, d_txt fp32 [B, D], d_scale float) of the symmetric CLIP loss.

    dLogits = g * (P_row + P_col - 2 Id) with g = grad / (2B), recomputed chunk by chunk;
    d_img = s dLogits T, d_txt = s dLogits^T I, d_scale = sum(dLogits * I T^T).
    The -2 Id part is added in O(B D) after the loop.
    """
    b = img.shape[0]
    chunk = chunk or contrastive_default_chunk(b, img.device)
    i32, t32 = _cl_f32(img), _cl_f32(txt)
    g = grad / (2.0 * b)
    d_img = _cl_torch.empty(b, img.shape[1], dtype=_cl_torch.float32, device=img.device)
    d_txt = _cl_torch.zeros(b, img.shape[1], dtype=_cl_torch.float32, device=img.device)
    d_scale = _cl_torch.zeros((), dtype=_cl_torch.float64, device=img.device)
    for s in range(0, b, chunk):
        a = i32[s : s + chunk]
        raw = _cl_torch.mm(a, t32.t())
        logits = raw * scale
        d_log = _cl_torch.sub(logits, lse_row[s : s + chunk, None]).exp_()
        d_log += logits.sub_(lse_col[None, :]).exp_()
        d_log *= g
        d_scale += _cl_torch.dot(d_log.view(-1), raw.view(-1))
        _cl_torch.mm(d_log, t32, out=d_img[s : s + chunk])
        d_txt.addmm_(d_log.t(), a)
    # the -2g Id part of dLogits
    d_scale -= 2.0 * g * (i32 * t32).sum()
    d_img.sub_(t32, alpha=2.0 * g).mul_(scale)
    d_txt.sub_(i32, alpha=2.0 * g).mul_(scale)
    return d_img, d_txt, float(d_scale)


def row_lse_torch(q, k, scale: float, chunk: int | None = None):
    """LSE over columns of each row of scale * q k^T ([Nq] fp32), chunked over q's rows."""
    n = q.shape[0]
    chunk = chunk or contrastive_default_chunk(k.shape[0], q.device)
    k32 = _cl_f32(k)
    out = _cl_torch.empty(n, dtype=_cl_torch.float32, device=q.device)
    for s in range(0, n, chunk):
        logits = _cl_torch.mm(_cl_f32(q[s : s + chunk]), k32.t()).mul_(scale)
        _cl_torch.logsumexp(logits, 1, out=out[s : s + chunk])
    return out


def row_softmax_grad_torch(q, k, scale: float, lse, g: float, d_q, d_k, chunk: int | None = None) -> float:
    """Adds the gradients of dLogits = g * softmax_rows(scale * q k^T) (rows normalised by lse).

    d_q += s dLogits k, d_k += s dLogits^T q (fp32 buffers, updated in place); returns
    sum(dLogits * q k^T), the logit scale's share. The one-hot (label) part is the caller's.
    """
    n = q.shape[0]
    chunk = chunk or contrastive_default_chunk(k.shape[0], q.device)
    k32 = _cl_f32(k)
    d_scale = _cl_torch.zeros((), dtype=_cl_torch.float64, device=q.device)
    for s in range(0, n, chunk):
        a = _cl_f32(q[s : s + chunk])
        raw = _cl_torch.mm(a, k32.t())
        d_log = _cl_torch.mul(raw, scale).sub_(lse[s : s + chunk, None]).exp_().mul_(g)
        d_scale += _cl_torch.dot(d_log.view(-1), raw.view(-1))
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
    t = _cl_f32(txt)
    total = _cl_torch.zeros((), dtype=_cl_torch.float64, device=img.device)
    for s in range(0, b, chunk):
        x = _cl_torch.mm(_cl_f32(img[s : s + chunk]), t.t()).mul_(scale).add_(bias)
        total += _cl_torch.nn.functional.softplus(x).sum(dtype=_cl_torch.float64)
    if positives:
        total -= (scale * (_cl_f32(img) * t).sum(1) + bias).sum(dtype=_cl_torch.float64)
    return (total / b).float()


def siglip_backward_torch(img, txt, scale: float, bias: float, grad: float, positives: bool = True, chunk: int | None = None):
    """(d_img, d_txt fp32, d_scale, d_bias) of siglip_forward_torch: dx = g (sigmoid(x) - Id), g = grad / B."""
    b, d = img.shape
    chunk = chunk or contrastive_default_chunk(txt.shape[0], img.device)
    i32, t32 = _cl_f32(img), _cl_f32(txt)
    g = grad / b
    d_img = _cl_torch.empty(b, d, dtype=_cl_torch.float32, device=img.device)
    d_txt = _cl_torch.zeros(txt.shape[0], d, dtype=_cl_torch.float32, device=img.device)
    d_scale = _cl_torch.zeros((), dtype=_cl_torch.float64, device=img.device)
    d_bias = _cl_torch.zeros((), dtype=_cl_torch.float64, device=img.device)
    for s in range(0, b, chunk):
        a = i32[s : s + chunk]
        raw = _cl_torch.mm(a, t32.t())
        d_x = _cl_torch.mul(raw, scale).add_(bias).sigmoid_().mul_(g)
        d_scale += _cl_torch.dot(d_x.view(-1), raw.view(-1))
        d_bias += d_x.sum(dtype=_cl_torch.float64)
        _cl_torch.mm(d_x, t32, out=d_img[s : s + chunk])
        d_txt.addmm_(d_x.t(), a)
    if positives:
        d_scale -= g * (i32 * t32).sum()
        d_bias -= g * b
        d_img.sub_(t32, alpha=g)
        d_txt.sub_(i32, alpha=g)
    return d_img.mul_(scale), d_txt.mul_(scale), float(d_scale), float(d_bias)


def clip_loss_naive(img, txt, scale, bias=None):
    """Test reference: materialises the B x B logits (fp32 math of the input dtype)."""
    logits = scale * img @ txt.t()
    if bias is not None:
        logits = logits + bias
    labels = _cl_torch.arange(img.shape[0], device=img.device)
    ce = _cl_torch.nn.functional.cross_entropy
    return 0.5 * (ce(logits, labels) + ce(logits.t(), labels))


def siglip_loss_naive(img, txt, scale, bias):
    """Test reference: -sum log sigmoid(z (s I T^T + b)) / B with z = 2 Id - 1."""
    logits = scale * img @ txt.t() + bias
    z = 2 * _cl_torch.eye(img.shape[0], device=img.device, dtype=logits.dtype) - 1
    return -_cl_torch.nn.functional.logsigmoid(z * logits).sum() / img.shape[0]


# ---- k-means assignment (see kmeans_assign.py) ----
# Test oracle (fp64 brute force) and the naive benchmark baseline (cdist materialises
# N x K). The production torch path lives in kmeans_assign.py.
import torch as _torch


def kmeans_assign_bruteforce(
    x: _torch.Tensor, centroids: _torch.Tensor
) -> tuple[_torch.Tensor, _torch.Tensor]:
    """Test reference: fp64 direct differences over all N x K pairs (small inputs only).

    Returns (labels int64 lowest index among fp64-equal minima, sqdist float64).
    """
    xd = x.detach().double().cpu()
    cd = centroids.detach().double().cpu()
    dist = ((xd[:, None, :] - cd[None, :, :]) ** 2).sum(-1)
    best, arg = dist.min(1)
    return arg, best


def kmeans_assign_cdist(
    x: _torch.Tensor, centroids: _torch.Tensor
) -> tuple[_torch.Tensor, _torch.Tensor]:
    """Naive baseline: torch.cdist then argmin, materialising the full N x K matrix."""
    dist = _torch.cdist(x.float(), centroids.float())
    best, arg = dist.min(1)
    return arg, best * best
