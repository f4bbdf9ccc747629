"""Plain-PyTorch test oracles and benchmark baselines, nothing production runs.

The torch paths that run in production live beside their Triton kernels
(contrastive_loss.py, kmeans_assign.py); these are the independent references they are
tested against. Each kernel family has its own section below.
"""

import torch

# ---- contrastive loss (see contrastive_loss.py) ----
# Naive losses that materialise the B x B logits: test oracles only.


def clip_loss_naive(img, txt, scale, bias=None):
    """Test reference: materialises the B x B logits (fp32 math of the input dtype)."""
    logits = scale * img @ txt.t()
    if bias is not None:
        logits = logits + bias
    labels = torch.arange(img.shape[0], device=img.device)
    ce = torch.nn.functional.cross_entropy
    return 0.5 * (ce(logits, labels) + ce(logits.t(), labels))


def siglip_loss_naive(img, txt, scale, bias):
    """Test reference: -sum log sigmoid(z (s I T^T + b)) / B with z = 2 Id - 1."""
    logits = scale * img @ txt.t() + bias
    z = 2 * torch.eye(img.shape[0], device=img.device, dtype=logits.dtype) - 1
    return -torch.nn.functional.logsigmoid(z * logits).sum() / img.shape[0]


# ---- k-means assignment (see kmeans_assign.py) ----
# Test oracle (fp64 brute force) and the naive benchmark baseline (cdist materialises
# N x K). The production torch path lives in kmeans_assign.py.


def kmeans_assign_bruteforce(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Test reference: fp64 direct differences over all N x K pairs (small inputs only).

    Returns (labels int64 lowest index among fp64-equal minima, sqdist float64).
    """
    xd = x.detach().double().cpu()
    cd = centroids.detach().double().cpu()
    dist = ((xd[:, None, :] - cd[None, :, :]) ** 2).sum(-1)
    best, arg = dist.min(1)
    return arg, best


def kmeans_assign_cdist(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive baseline: torch.cdist then argmin, materialising the full N x K matrix."""
    dist = torch.cdist(x.float(), centroids.float())
    best, arg = dist.min(1)
    return arg, best * best


def max_earlier_similarity_dense(x: torch.Tensor) -> torch.Tensor:
    """SemDeDup's within-cluster maxima as the public code forms them (facebookresearch/SemDeDup,
    ``semdedup``): the n x n similarity matrix, its diagonal zeroed, the strict upper triangle,
    the column max. O(n^2) memory; row 0 and negative maxima read 0 there."""
    sims = x @ x.T
    sims.fill_diagonal_(0.0)
    return torch.triu(sims, diagonal=1).max(dim=0).values
