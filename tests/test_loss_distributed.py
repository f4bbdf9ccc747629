"""mode_fast.training.loss.ClipLoss / SigLipLoss: open_clip parity, 2 processes on gloo, gradient caching."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from local_ports import free_port
from open_clip.loss import ClipLoss as OpenClipLoss
from open_clip.loss import SigLipLoss as OpenSigLipLoss

from mode_fast.training.loss import ClipLoss, SigLipLoss

torch.set_num_threads(1)

WORLD = 2
LOCAL_B, D = 13, 24  # odd local batch on purpose
RTOL = 1e-5


def global_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(WORLD * LOCAL_B, D, generator=g), dim=1)
    txt = F.normalize(torch.randn(WORLD * LOCAL_B, D, generator=g), dim=1)
    return img, txt


def grads(loss_fn, img, txt, scale, bias=None):
    """(loss, d_img, d_txt, d_scale[, d_bias]) of loss_fn on fresh leaves."""
    img = img.clone().requires_grad_()
    txt = txt.clone().requires_grad_()
    scale = scale.clone().requires_grad_()
    args = (img, txt, scale) if bias is None else (img, txt, scale, bias.clone().requires_grad_())
    loss = loss_fn(*args)
    loss.backward()
    return [loss.detach()] + [a.grad for a in args]


def close(got, want, what):
    for k, (a, b) in enumerate(zip(got, want)):
        err = (a - b).abs().max().item()
        tol = RTOL * max(b.abs().max().item(), 1e-30)
        assert err <= tol, f"{what}: item {k} differs by {err:.3g} (tolerance {tol:.3g})"


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        img, txt = global_batch()
        rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
        scale = torch.tensor(14.0)
        # one process, whole batch: the reference every mode is held to
        whole = grads(OpenClipLoss(), img, txt, scale)
        whole_local = [whole[0], whole[1][rows], whole[2][rows], whole[3]]

        def mean_over_ranks(x):
            x = x.clone()
            dist.all_reduce(x)
            return x / WORLD

        modes = [dict(local_loss=ll, gather_with_grad=gg) for ll in (False, True) for gg in (False, True)]
        for kw in modes:
            kw = dict(kw, rank=rank, world_size=WORLD)
            ours = grads(ClipLoss(**kw, chunk_size=5), img[rows], txt[rows], scale)
            theirs = grads(OpenClipLoss(**kw), img[rows], txt[rows], scale)
            close(ours, theirs, f"ClipLoss {kw} vs open_clip")
            if kw["gather_with_grad"]:
                # every rank's features get the sum of all ranks' losses' gradients
                loss, d_i, d_t, d_s = ours
                if not kw["local_loss"]:
                    close([loss, d_s], [whole[0], whole[3]], f"ClipLoss {kw} loss and scale grad")
                close(
                    [mean_over_ranks(loss), d_i / WORLD, d_t / WORLD, mean_over_ranks(d_s)],
                    whole_local,
                    f"ClipLoss {kw} vs one process",
                )

        # the ring, on the world group and on a sub-group (peers addressed by group rank)
        for group in (None, dist.new_group([0, 1])):
            ring = grads(
                ClipLoss(ring=True, rank=rank, world_size=WORLD, group=group, chunk_size=4), img[rows], txt[rows], scale
            )
            theirs = grads(
                OpenClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=WORLD),
                img[rows],
                txt[rows],
                scale,
            )
            close(ring, theirs, "ring vs open_clip local_loss + gather_with_grad")
            loss, d_i, d_t, d_s = ring
            close(
                [mean_over_ranks(loss), d_i / WORLD, d_t / WORLD, mean_over_ranks(d_s)],
                whole_local,
                "ring vs one process",
            )

        bias = torch.tensor(-8.0)
        for impl in ("shift", "bidir", "gather", "reduce"):
            kw = dict(rank=rank, world_size=WORLD, dist_impl=impl)
            ours = grads(SigLipLoss(**kw, chunk_size=6), img[rows], txt[rows], scale, bias)
            theirs = grads(OpenSigLipLoss(**kw), img[rows], txt[rows], scale, bias)
            close(ours, theirs, f"SigLipLoss {impl} vs open_clip")

        # open_clip trains under autocast: the over-ranks losses compute in the features' own
        # dtype whatever autocast says (a bf16 matmul would move the loss by ~1e-3)
        for name, fn, extra in [
            ("ring", ClipLoss(ring=True, rank=rank, world_size=WORLD, chunk_size=4), ()),
            ("SigLIP shift", SigLipLoss(rank=rank, world_size=WORLD, dist_impl="shift", chunk_size=6), (bias,)),
            ("SigLIP reduce", SigLipLoss(rank=rank, world_size=WORLD, dist_impl="reduce", chunk_size=6), (bias,)),
        ]:
            plain = grads(fn, img[rows], txt[rows], scale, *extra)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                under = grads(fn, img[rows], txt[rows], scale, *extra)
            close(under, plain, f"{name} under autocast")
    finally:
        dist.destroy_process_group()


def test_two_processes_gloo_match_one_process():
    mp.spawn(_worker, args=(free_port(),), nprocs=WORLD, join=True)


# ---- one process
def test_single_process_forms_match_open_clip():
    img, txt = global_batch(1)
    scale = torch.tensor(30.0)
    close(grads(ClipLoss(chunk_size=7), img, txt, scale), grads(OpenClipLoss(), img, txt, scale), "ClipLoss")
    out = ClipLoss()(img, txt, scale, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    bias = torch.tensor(-3.0)
    # ClipLoss with a bias: softmax ignores it; its gradient is (numerically) zero
    ours = grads(lambda i, t, s, b: ClipLoss()(i, t, s, logit_bias=b), img, txt, scale, bias)
    theirs = grads(lambda i, t, s, b: OpenClipLoss()(i, t, s, logit_bias=b), img, txt, scale, bias)
    close(ours[:4], theirs[:4], "ClipLoss with bias")
    assert abs(ours[4].item()) < 1e-5 and abs(theirs[4].item()) < 1e-5
    ours = grads(SigLipLoss(), img, txt, scale, bias)
    close(ours, grads(OpenSigLipLoss(), img, txt, scale, bias), "SigLipLoss")
    assert set(SigLipLoss()(img, txt, scale, bias, output_dict=True)) == {"contrastive_loss"}


def test_unsupported_options_fail_clearly():
    with pytest.raises(ValueError, match="horovod"):
        ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="dist_impl"):
        SigLipLoss(dist_impl="ring")
    img, txt = global_batch()
    with pytest.raises(RuntimeError, match="init_process_group"):
        ClipLoss(rank=0, world_size=2)(img, txt, torch.tensor(1.0))


def test_gradient_cache_composition():
    """Features made in chunks without a graph, the loss's feature gradients fed back per chunk."""
    torch.manual_seed(0)
    enc_i, enc_t = torch.nn.Linear(12, 8), torch.nn.Linear(10, 8)
    log_scale = torch.nn.Parameter(torch.tensor(2.5))
    x_i, x_t = torch.randn(23, 12), torch.randn(23, 10)
    params = [*enc_i.parameters(), *enc_t.parameters(), log_scale]

    def encode(enc, x):
        return F.normalize(enc(x), dim=1)

    # direct: one graph over the whole batch
    ClipLoss()(encode(enc_i, x_i), encode(enc_t, x_t), log_scale.exp()).backward()
    direct = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    # gradient cache: 1) features without graph, 2) loss + feature grads, 3) re-encode chunks
    chunks = [slice(0, 9), slice(9, 18), slice(18, 23)]
    with torch.no_grad():
        f_i = torch.cat([encode(enc_i, x_i[c]) for c in chunks]).requires_grad_()
        f_t = torch.cat([encode(enc_t, x_t[c]) for c in chunks]).requires_grad_()
    ClipLoss(chunk_size=4)(f_i, f_t, log_scale.exp()).backward()
    for c in chunks:
        torch.autograd.backward([encode(enc_i, x_i[c]), encode(enc_t, x_t[c])], [f_i.grad[c], f_t.grad[c]])
    close([p.grad for p in params], direct, "gradient cache vs direct")
