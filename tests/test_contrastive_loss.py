"""clip_loss / siglip_loss, torch backend, against open_clip 3.3's ClipLoss / SigLipLoss (CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss as OpenClipLoss
from open_clip.loss import SigLipLoss as OpenSigLipLoss

from mode_fast.core.errors import ConfigError
from mode_fast.kernels import clip_loss, siglip_loss
from mode_fast.kernels.contrastive_loss import infonce_loss, local_clip_loss

torch.set_num_threads(1)  # shared machine: 2 threads under contention are slower

# (B, D, chunk): odd B, odd D, chunks that do not divide B, one chunk larger than B
SHAPES = [(1, 8, None), (7, 5, 3), (37, 24, 8), (64, 33, 64), (129, 64, 50), (96, 16, 1000)]
# each dtype's tolerance on (loss, grads) vs the fp32 reference, relative to max |ref|
DTYPE_TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def features(b: int, d: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g), dim=1).to(dtype).requires_grad_()
    txt = F.normalize(torch.randn(b, d, generator=g), dim=1).to(dtype).requires_grad_()
    return img, txt


def run(fn, *tensors):
    """(value, grads of every tensor) of fn(); grads None where none flowed."""
    for x in tensors:
        x.grad = None
    loss = fn()
    loss.backward()
    return [loss.detach().float()] + [None if x.grad is None else x.grad.float() for x in tensors]


def assert_close(got, want, rtol, what=""):
    for k, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), f"{what} item {k}: gradient presence differs"
        if a is None:
            continue
        err = (a - b).abs().max().item()
        scale = max(b.abs().max().item(), 1e-30)
        if err > rtol * scale:
            bad = ((a - b).abs() > rtol * scale).nonzero()[:5].tolist()
            pytest.fail(f"{what} item {k}: max error {err:.3g} > {rtol:g} * {scale:.3g}; first at {bad}")


@pytest.mark.parametrize("b,d,chunk", SHAPES)
def test_clip_matches_open_clip(b, d, chunk):
    img, txt = features(b, d, seed=b)
    scale = torch.tensor(17.0, requires_grad=True)
    got = run(lambda: clip_loss(img, txt, scale, backend="torch", chunk_size=chunk), img, txt, scale)
    want = run(lambda: OpenClipLoss()(img, txt, scale), img, txt, scale)
    assert_close(got, want, 1e-5, "clip")


@pytest.mark.parametrize("b,d,chunk", SHAPES)
def test_siglip_matches_open_clip(b, d, chunk):
    img, txt = features(b, d, seed=b + 1)
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    got = run(lambda: siglip_loss(img, txt, scale, bias, backend="torch", chunk_size=chunk), img, txt, scale, bias)
    want = run(lambda: OpenSigLipLoss()(img, txt, scale, bias), img, txt, scale, bias)
    assert_close(got, want, 1e-5, "siglip")


def test_scale_from_parameter_and_large_logits():
    # logit_scale as open_clip passes it (a parameter's exp), at the clamp value 100
    img, txt = features(50, 32, seed=3)
    log_scale = torch.tensor(4.6052, requires_grad=True)
    got = run(lambda: clip_loss(img, txt, log_scale.exp(), backend="torch", chunk_size=16), img, txt, log_scale)
    want = run(lambda: OpenClipLoss()(img, txt, log_scale.exp()), img, txt, log_scale)
    assert_close(got, want, 1e-5, "clip at s=100")


def test_non_contiguous_inputs():
    base_i, base_t = features(40, 48, seed=5)
    img = base_i.detach()[:, ::2].clone().t().contiguous().t().requires_grad_()  # column-major
    txt = base_t.detach()[::2, :].t()[:24].t()  # row stride 96
    txt = txt.detach().requires_grad_()
    assert not img.is_contiguous() and not txt.is_contiguous()
    img = img[:20]
    scale = torch.tensor(9.0, requires_grad=True)
    bias = torch.tensor(-4.0, requires_grad=True)
    leaf_i, leaf_t = img, txt
    got = run(lambda: clip_loss(leaf_i, leaf_t, scale, backend="torch", chunk_size=7), scale)
    want = run(lambda: OpenClipLoss()(leaf_i.contiguous(), leaf_t.contiguous(), scale), scale)
    assert_close(got, want, 1e-5, "non-contiguous clip")
    got = run(lambda: siglip_loss(leaf_i, leaf_t, scale, bias, backend="torch", chunk_size=7), scale, bias)
    want = run(lambda: OpenSigLipLoss()(leaf_i.contiguous(), leaf_t.contiguous(), scale, bias), scale, bias)
    assert_close(got, want, 1e-5, "non-contiguous siglip")


def test_non_contiguous_feature_grads():
    img, txt = features(33, 20, seed=6)
    wide_i = torch.zeros(33, 40).index_copy(1, torch.arange(0, 40, 2), img.detach()).requires_grad_()
    scale = torch.tensor(12.0)
    loss = clip_loss(wide_i[:, ::2], txt, scale, backend="torch", chunk_size=10)
    loss.backward()
    ref_i = img.detach().clone().requires_grad_()
    OpenClipLoss()(ref_i, txt, scale).backward()
    assert_close([wide_i.grad[:, ::2]], [ref_i.grad], 1e-5, "strided input grad")
    assert wide_i.grad[:, 1::2].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_close_to_fp32(dtype):
    img, txt = features(45, 32, seed=7, dtype=dtype)
    scale = torch.tensor(20.0, requires_grad=True)
    got = run(lambda: clip_loss(img, txt, scale, backend="torch", chunk_size=16), img, txt, scale)
    i32 = img.detach().float().requires_grad_()
    t32 = txt.detach().float().requires_grad_()
    want = run(lambda: OpenClipLoss()(i32, t32, scale), i32, t32, scale)
    assert img.grad.dtype == dtype
    assert_close(got, want, DTYPE_TOL[dtype], f"clip {dtype}")


def test_infonce_is_open_clip_local_rows():
    # open_clip local_loss on rank 1 of 3: local rows against all columns, labels offset
    img, txt = features(30, 16, seed=8)
    scale = torch.tensor(15.0, requires_grad=True)
    rows = slice(10, 20)

    def ours():
        return 0.5 * (
            infonce_loss(img[rows], txt, scale, 10, chunk_size=4)
            + infonce_loss(txt[rows], img, scale, 10, chunk_size=4)
        )

    def naive():
        labels = torch.arange(10, 20)
        return 0.5 * (
            F.cross_entropy(scale * img[rows] @ txt.t(), labels) + F.cross_entropy(scale * txt[rows] @ img.t(), labels)
        )

    assert_close(run(ours, img, txt, scale), run(naive, img, txt, scale), 1e-5, "infonce")


def test_local_clip_loss_is_open_clip_local_loss():
    # rank 2 of 3, local rows 7: both directions of the local rows against all columns
    img, txt = features(21, 12, seed=11)
    scale = torch.tensor(11.0, requires_grad=True)
    rows = slice(14, 21)

    def ours():
        return local_clip_loss(img[rows], txt[rows], img, txt, scale, 14, backend="torch", chunk_size=3)

    def naive():
        labels = torch.arange(14, 21)
        return 0.5 * (
            F.cross_entropy(scale * img[rows] @ txt.t(), labels) + F.cross_entropy(scale * txt[rows] @ img.t(), labels)
        )

    assert_close(run(ours, img, txt, scale), run(naive, img, txt, scale), 1e-5, "local_clip_loss")


def test_siglip_negatives_only_rectangular():
    img, txt = features(9, 16, seed=12)
    other = features(14, 16, seed=13)[1]
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-7.0, requires_grad=True)

    def ours():
        return siglip_loss(img, other, scale, bias, backend="torch", positives=False, chunk_size=4)

    def naive():
        return -F.logsigmoid(-(scale * img @ other.t() + bias)).sum() / img.shape[0]

    assert_close(run(ours, img, other, scale, bias), run(naive, img, other, scale, bias), 1e-5, "negatives")


def test_errors_name_the_problem():
    img, txt = features(8, 4)
    s = torch.tensor(1.0)
    with pytest.raises(ValueError, match="batch sizes differ"):
        clip_loss(img, txt[:7], s)
    with pytest.raises(ValueError, match="feature widths differ"):
        clip_loss(img, txt[:, :3], s)
    with pytest.raises(TypeError, match="dtypes differ"):
        clip_loss(img, txt.double().float().half(), s)
    with pytest.raises(ValueError, match="2-D"):
        clip_loss(img[None], txt, s)
    with pytest.raises(ValueError, match="one number"):
        clip_loss(img, txt, torch.ones(2))
    with pytest.raises(ConfigError, match="backend must be"):
        clip_loss(img, txt, s, backend="cuda")
    with pytest.raises(ConfigError, match="needs CUDA"):
        clip_loss(img, txt, s, backend="triton")
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        siglip_loss(img.double(), txt.double(), s, s)
    with pytest.raises(ValueError, match="runs past"):
        infonce_loss(img, txt, s, offset=1)


def test_device_mismatch_is_rejected():
    img, txt = features(8, 4)
    meta = txt.detach().to("meta")
    with pytest.raises(ValueError, match="devices differ"):
        clip_loss(img, meta, 1.0)


def saved_bytes(fn) -> int:
    """Bytes autograd keeps for backward while fn() builds the graph (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sum(seen.values())


@pytest.mark.parametrize("siglip", [False, True])
def test_saved_memory_is_linear_in_batch(siglip):
    b, d = 1024, 16
    img, txt = features(b, d, seed=9)
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-5.0, requires_grad=True)
    if siglip:
        ours = lambda: siglip_loss(img, txt, scale, bias, backend="torch", chunk_size=128)
        theirs = lambda: OpenSigLipLoss()(img, txt, scale, bias)
    else:
        ours = lambda: clip_loss(img, txt, scale, backend="torch", chunk_size=128)
        theirs = lambda: OpenClipLoss()(img, txt, scale)
    linear = 2 * b * d * 4 + 2 * b * 4 + 64  # the two inputs, two LSE vectors, scalars
    assert saved_bytes(ours) <= linear
    # the probe does see a B x B graph: open_clip keeps at least one B x B fp32 tensor
    assert saved_bytes(theirs) >= b * b * 4


def test_torch_backend_ignores_autocast():
    # open_clip trains under autocast; the loss must not drop to bf16 matmuls inside.
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(96, 32, generator=g), dim=-1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(96, 32, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(100.0)
    plain = clip_loss(img, txt, scale, backend="torch")
    (g_plain,) = torch.autograd.grad(plain, img)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = clip_loss(img, txt, scale, backend="torch")
        (g_cast,) = torch.autograd.grad(cast, img)
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, plain, rtol=1e-6, atol=0)
    torch.testing.assert_close(g_cast, g_plain, rtol=1e-6, atol=1e-9)


def test_default_backward_mode_has_the_lower_counted_traffic(kernel_traffic):
    """dispatch's default dK mode is the one whose counted traffic (benchmarks/kernel_traffic.py,
    the contrastive module doc's formulas) is lower at the headline shapes, B = 32k and 1M at D = 768."""
    from mode_fast.kernels import dispatch

    traffic = kernel_traffic.contrastive_traffic

    def total(t):
        return t["global_load_bytes"] + t["global_store_bytes"] + t["atomic_bytes"]

    for b in (32768, 1 << 20):
        for itemsize in (2, 4):
            counted = {
                mode: total(traffic(b, b, 768, itemsize, 64, 64, bwd=mode)["bwd"]) for mode in dispatch.CONTRASTIVE_BWD
            }
            assert min(counted, key=counted.get) == dispatch.DEFAULT_CONTRASTIVE_BWD, counted
    # the formulas against a hand count: one 64 x 64 tile, D = 32, fp32, atomic backward
    t = traffic(64, 64, 32, 4, 64, 64, bwd="atomic")["bwd"]
    assert t["atomic_ops"] == 64 * 32 and t["global_store_bytes"] == 64 * 32 * 4 + 8
    assert t["global_load_bytes"] == (64 + 2 * 64 + 64) * 32 * 4 + 64 * 32 * 4 + 64 * 4 + 64 * 4
    cols = traffic(64, 64, 32, 4, 64, 64, bwd="columns")["bwd"]
    assert cols["atomic_ops"] == 0 and cols["global_store_bytes"] == 2 * (64 * 32 * 4 + 8)


def test_deterministic_torch_path_repeats_bitwise_and_refuses_the_atomic_backward():
    from mode_fast.kernels import clip_loss, siglip_loss

    g = torch.Generator().manual_seed(3)
    img = torch.nn.functional.normalize(torch.randn(70, 24, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(70, 24, generator=g), dim=1)

    def run(fn):
        i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
        loss = fn(i, t)
        loss.backward()
        return [loss.detach(), i.grad, t.grad]

    for fn in (
        lambda i, t: clip_loss(i, t, 10.0, "torch", deterministic=True, chunk_size=16),
        lambda i, t: siglip_loss(i, t, 10.0, -5.0, "torch", deterministic=True, chunk_size=16),
    ):
        a, b = run(fn), run(fn)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="deterministic=True needs bwd='columns'"):
        clip_loss(img, txt, 10.0, "torch", deterministic=True, bwd="atomic")


def test_train_deterministic_flag_reaches_the_loss():
    """mode-fast train --deterministic: parsed into TrainConfig and passed to the loss."""
    import argparse

    from mode_fast.jobs import train
    from mode_fast.training.loop import make_loss
    from mode_fast.training.run import TrainConfig

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    for argv, want in (([], False), (["--deterministic"], True)):
        cfg = TrainConfig.from_args(parser.parse_args(["--data", "x.tar", "--out", "run", *argv]))
        assert cfg.deterministic is want
        for siglip in (False, True):
            loss, source = make_loss(siglip, deterministic=cfg.deterministic)
            assert source == "mode_fast.training.loss" and loss.deterministic is want
