"""Pure-PyTorch reference paths: CPU fallback, test reference and benchmark baseline.

Each kernel family keeps its references in its own section below.
"""

# ---- contrastive loss (see contrastive_loss.py) ----
# Naive losses that materialise the B x B logits: test oracles only. The chunked torch
# path that production runs is in contrastive_loss.py, beside the Triton kernels.
import torch as _cl_torch


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
# Nearest center by squared L2 distance. The chunked path is the "torch" backend of
# kmeans_assign() on every device; the fp64 brute force is the test reference; the
# cdist path is the naive benchmark baseline (it materialises N x K).
import torch as _torch

_KM_U32 = 2.0**-24  # unit roundoff of fp32
_KM_U64 = 2.0**-53  # unit roundoff of fp64
# Pairs re-checked per batch in fp64 (each costs D doubles of scratch).
_KM_RECHECK_PAIRS = 1 << 14


def _km_gamma(n: int, u: float) -> float:
    """Higham's gamma_n = n*u / (1 - n*u): bound on the relative error of an n-term dot product."""
    return n * u / (1.0 - n * u)


def _km_matmul_roundoff(device: _torch.device) -> float:
    """Unit roundoff of an fp32 matmul as torch will run it (TF32/bf16 when allowed)."""
    precision = _torch.get_float32_matmul_precision()
    if device.type == "cuda" and _torch.backends.cuda.matmul.allow_tf32:
        precision = "high" if precision == "highest" else precision
    # "high" allows TF32 (10-bit mantissa), "medium" bf16 (7-bit); see torch docs.
    return {"highest": _KM_U32, "high": 2.0**-11, "medium": 2.0**-8}.get(precision, _KM_U32)


def kmeans_default_chunk(k: int, device: _torch.device) -> int:
    """Rows per chunk so a chunk's N x K score block stays small.

    CPU: about 2M floats (8 MB): at K = 1024 that is 2048 rows, measured best of
    1024-8192 on the 2-core dev box (larger chunks amortise per-op overhead).
    CUDA: about 64M floats (256 MB), large enough to keep the GPU busy.
    """
    budget = (1 << 26) if device.type == "cuda" else (1 << 21)
    return int(min(max(budget // max(k, 1), 128), 1 << 16))


def kmeans_recheck_near_ties(
    x_rows: _torch.Tensor, centroids: _torch.Tensor, candidates: _torch.Tensor
) -> _torch.Tensor:
    """Exact argmin over each row's candidate centers, by direct differences in fp64.

    x_rows [R, D] and centroids [K, D] in fp32; candidates [R, K] bool (every row has at
    least one True). Distances equal within fp64 rounding count as ties and go to the
    lowest index, so the choice does not depend on summation order.
    """
    r, d = x_rows.shape
    k = centroids.shape[0]
    rows, cols = candidates.nonzero(as_tuple=True)
    dist = _torch.empty(rows.numel(), dtype=_torch.float64, device=x_rows.device)
    for s in range(0, rows.numel(), _KM_RECHECK_PAIRS):
        ri, ci = rows[s : s + _KM_RECHECK_PAIRS], cols[s : s + _KM_RECHECK_PAIRS]
        diff = x_rows[ri].double() - centroids[ci].double()
        dist[s : s + _KM_RECHECK_PAIRS] = (diff * diff).sum(1)
    inf = _torch.full((r,), float("inf"), dtype=_torch.float64, device=x_rows.device)
    row_min = inf.scatter_reduce(0, rows, dist, "amin")
    # All terms are >= 0, so the fp64 sum's relative error is at most gamma_{D+2}.
    tied = dist <= row_min[rows] * (1.0 + 2.0 * _km_gamma(d + 2, _KM_U64))
    idx = _torch.where(tied, cols, _torch.full_like(cols, k))
    return _torch.full((r,), k, dtype=_torch.int64, device=x_rows.device).scatter_reduce(
        0, rows, idx, "amin"
    )


def _km_best_two(scores: _torch.Tensor, group: int) -> tuple[_torch.Tensor, ...]:
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
    cols = gidx[:, None] + group * _torch.arange(r, device=scores.device)
    vals = scores.gather(1, cols)
    best, pos = vals.min(1)
    second = _torch.minimum(second, vals.scatter(1, pos[:, None], inf).amin(1))
    return best, gidx + group * pos, second


# Columns per group in _km_best_two; below 4 groups' worth of centers, plain row min.
_KM_GROUP = 32


def kmeans_assign_torch(
    x: _torch.Tensor,
    centroids: _torch.Tensor,
    *,
    chunk_size: int | None = None,
    exact: bool = True,
) -> tuple[_torch.Tensor, _torch.Tensor]:
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
    c = centroids.to(_torch.float32).contiguous()
    c_sq = (c * c).sum(1)
    group = _KM_GROUP if (exact and k >= 4 * _KM_GROUP) else 1
    kp = -(-k // group) * group
    if kp > k:  # pad to whole groups with centers that score +inf
        c_mm = _torch.cat([c, c.new_zeros(kp - k, d)])
        c_sq_mm = _torch.cat([c_sq, c_sq.new_full((kp - k,), float("inf"))])
    else:
        c_mm, c_sq_mm = c, c_sq
    chunk = chunk_size or kmeans_default_chunk(k, device)
    if exact:
        g = _km_gamma(d + 2, _km_matmul_roundoff(device))
        # c_sq itself is rounded: pad max||c|| by a relative 1e-6 (>> fp32 eps * few).
        c_max = float(c_sq.max().sqrt()) * (1.0 + 1e-6)
    labels = _torch.empty(n, dtype=_torch.int64, device=device)
    sqdist = _torch.empty(n, dtype=_torch.float32, device=device)
    # Reused buffers: a fresh multi-MB tensor per chunk costs page faults (measured ~15%
    # of the CPU time at K = 1024).
    score_buf = _torch.empty(min(chunk, n), kp, dtype=_torch.float32, device=device)
    diff_buf = _torch.empty(min(chunk, n), d, dtype=_torch.float32, device=device)
    for s in range(0, n, chunk):
        xs = x[s : s + chunk].to(_torch.float32).contiguous()
        m = xs.shape[0]
        scores = _torch.addmm(c_sq_mm, xs, c_mm.t(), beta=1.0, alpha=-2.0, out=score_buf[:m])
        if not exact or k == 1:
            best, arg = scores.min(1)  # first index of the minimum on exact ties
        else:
            best, arg, second = _km_best_two(scores, group)
            window = 2.0 * g * ((xs * xs).sum(1).sqrt() * (1.0 + 1e-6) + c_max) ** 2
            # Rows with NaN/inf (bad input, rejected by the caller) are left alone.
            ok = (second - best <= window) & window.isfinite() & best.isfinite()
            near = ok.nonzero().squeeze(1)
            if near.numel():
                cand = scores[near, :k] <= (best[near] + window[near])[:, None]
                arg[near] = kmeans_recheck_near_ties(xs[near], c, cand)
        diff = _torch.index_select(c, 0, arg, out=diff_buf[:m])
        _torch.sub(xs, diff, out=diff)
        diff.mul_(diff)
        _torch.sum(diff, 1, out=sqdist[s : s + m])
        labels[s : s + m] = arg
    return labels, sqdist


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
