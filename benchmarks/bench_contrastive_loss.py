"""fwd+bwd time and peak memory of the CLIP loss: mode_fast backends vs open_clip's ClipLoss (and Inf-CL).

CPU: the torch backend against open_clip at B in {4096, 8192}, D = 512, fp32, one thread
(the machine is shared; both providers run under the same setting in the same run);
BENCH_LARGE=1 adds B = 65536, where open_clip's two B x B fp32 logit matrices alone need
34 GB (it is skipped, not run into the OOM killer) and mode-fast's torch path runs in O(B*D).
CUDA: also the Triton backend and Inf-CL's `inf_cl.cal_inf_loss` (two calls, both
directions) when importable, over larger B and D = 768, fp32 and bf16.
Peak memory, CPU: what a user's job pays, the peak RSS growth of a fresh process over its
first fwd+bwd (torch, open_clip and mode_fast already imported and the inputs made, then
the kernel's peak-RSS mark reset): one subprocess per provider and size, open_clip
measured the same way in the same run, and mode_fast's row gives the ratio
(first_call_mem_vs_open_clip). The first call includes the one-time allocations a later
step reuses, so it is the honest figure. CUDA: max_memory_allocated growth over a step
after a warm-up (Triton compiles on the first call). Throughput: model FLOP/s = 6 B^2 D / time.

    python -m pytest benchmarks/bench_contrastive_loss.py --benchmark-json benchmarks/results/cpu/contrastive_loss.json
    python benchmarks/report.py benchmarks/results/cpu/contrastive_loss.json --out benchmarks/results/cpu/contrastive_loss.md
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss as OpenClipLoss

from mode_fast.kernels import clip_loss

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))

try:
    from inf_cl import cal_inf_loss
except ImportError:
    cal_inf_loss = None

if CUDA:
    SIZES = [(b, d, dt) for b in (4096, 16384, 32768) for d in (768,) for dt in (torch.float32, torch.bfloat16)]
    SIZES += [(8192, 512, torch.float32), (8192, 1024, torch.float32)]
else:
    SIZES = [(4096, 512, torch.float32), (8192, 512, torch.float32)]
    if os.environ.get("BENCH_LARGE") == "1":  # minutes per step on a CPU: opt in
        SIZES.append((65536, 512, torch.float32))


def _open_clip(img, txt, scale):
    return OpenClipLoss()(img, txt, scale)


def _inf_cl(img, txt, scale):
    labels = torch.arange(img.shape[0], device=img.device)
    return 0.5 * (cal_inf_loss(img, txt, labels, scale) + cal_inf_loss(txt, img, labels, scale))


PROVIDERS = {
    "open_clip": _open_clip,
    "mode_fast torch": lambda i, t, s: clip_loss(i, t, s, backend="torch"),
}
if CUDA:
    PROVIDERS["mode_fast triton"] = lambda i, t, s: clip_loss(i, t, s, backend="triton")
    if cal_inf_loss is not None:
        PROVIDERS["inf_cl"] = _inf_cl


# One provider's first fwd+bwd in a fresh interpreter; everything but the call itself is
# done before the peak-RSS mark is reset (imports of both providers, the inputs).
_FIRST_CALL_SCRIPT = r"""
import json, sys, time
sys.path[:0] = {paths!r}
import torch
torch.set_num_threads({threads})
import bench_contrastive_loss as b
from proc_memory import reset_peak, status_mb
g = torch.Generator().manual_seed(0)
img = torch.nn.functional.normalize(torch.randn({b}, {d}, generator=g), dim=1).requires_grad_()
txt = torch.nn.functional.normalize(torch.randn({b}, {d}, generator=g), dim=1).requires_grad_()
scale = torch.tensor(14.3, requires_grad=True)
reset_peak()
before = status_mb("VmRSS")
t0 = time.perf_counter()
b.PROVIDERS[{provider!r}](img, txt, scale).backward()
seconds = time.perf_counter() - t0
print(json.dumps({{"peak_mb": status_mb("VmHWM") - before, "seconds": seconds}}))
"""


@functools.cache
def first_call_peak_mb(provider: str, b: int, d: int) -> float:
    """Peak RSS growth (MB) of a fresh process's first fp32 fwd+bwd at B x D (CPU)."""
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    script = _FIRST_CALL_SCRIPT.format(paths=[here, root], threads=torch.get_num_threads(), provider=provider, b=b, d=d)
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("b,d,dtype", SIZES, ids=lambda v: str(v).replace("torch.", ""))
def test_clip_loss_fwd_bwd(benchmark, provider, b, d, dtype):
    if provider == "open_clip" and b * b * 4 * 8 > (60 << 30 if CUDA else 12 << 30):
        pytest.skip("open_clip's B x B logits and grads would not fit")
    if provider == "inf_cl" and dtype != torch.float32:
        pytest.skip("Inf-CL takes fp32 only")
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(b, d, generator=g), dim=1).to(DEVICE, dtype).requires_grad_()
    txt = F.normalize(torch.randn(b, d, generator=g), dim=1).to(DEVICE, dtype).requires_grad_()
    scale = torch.tensor(14.3, device=DEVICE, requires_grad=True)
    fn = PROVIDERS[provider]

    def step():
        img.grad = txt.grad = scale.grad = None
        fn(img, txt, scale).backward()
        _sync()

    benchmark.group = f"clip fwd+bwd B={b} D={d} {str(dtype).replace('torch.', '')}"
    benchmark.extra_info.update(
        provider=provider,
        baseline=provider == "open_clip",
        device=torch.cuda.get_device_name(0) if CUDA else "cpu",
        threads=torch.get_num_threads(),
    )
    if CUDA:
        step()  # warm-up: Triton compiles on the first call
        img.grad = txt.grad = scale.grad = None
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        benchmark.extra_info["peak_mem_growth_mb"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    else:
        peak = first_call_peak_mb(provider, b, d)
        benchmark.extra_info["first_call_peak_mb"] = round(peak, 1)
        if provider != "open_clip" and b * b * 4 * 8 <= 12 << 30:
            theirs = first_call_peak_mb("open_clip", b, d)
            benchmark.extra_info["first_call_mem_vs_open_clip"] = f"1/{theirs / peak:.1f}"
        if b <= 8192:
            step()  # warm-up for the timed rounds; a CPU step at B = 65536 takes minutes
    img.grad = txt.grad = scale.grad = None
    rounds = 3 if b <= 8192 else 2 if CUDA else 1
    benchmark.pedantic(step, rounds=rounds, iterations=1)
    benchmark.extra_info["model_tflops"] = round(6 * b * b * d / benchmark.stats.stats.median / 1e12, 4)


# ---- CUDA only: the rectangular kernels a multi-GPU run takes (one rank's share of W = 8)
def _local_naive(img_l, txt_l, img_a, txt_a, scale, off):
    """open_clip's local_loss=True arithmetic: two M x N logit matrices and cross-entropies."""
    labels = torch.arange(off, off + img_l.shape[0], device=img_l.device)
    ce = torch.nn.functional.cross_entropy
    return 0.5 * (ce(scale * img_l @ txt_a.t(), labels) + ce(scale * txt_l @ img_a.t(), labels))


def _siglip_neg_naive(img_l, txt_o, scale, bias):
    return -torch.nn.functional.logsigmoid(-(scale * img_l @ txt_o.t() + bias)).sum() / img_l.shape[0]


RECT_PROVIDERS = ["open_clip math", "mode_fast torch", "mode_fast triton"]


@pytest.mark.skipif(not CUDA, reason="the rectangular kernels' speed needs a GPU")
@pytest.mark.parametrize("provider", RECT_PROVIDERS)
@pytest.mark.parametrize("variant", ["local_loss", "siglip_negatives"])
@pytest.mark.parametrize(
    "n,d,dtype", [(32768, 768, torch.float32), (32768, 768, torch.bfloat16)], ids=lambda v: str(v).replace("torch.", "")
)
def test_rectangular_fwd_bwd(benchmark, provider, variant, n, d, dtype):
    from mode_fast.kernels import local_clip_loss, siglip_loss

    m, off = n // 8, 3 * (n // 8)  # rank 3 of 8
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(n, d, generator=g), dim=1).to(DEVICE, dtype).requires_grad_()
    txt = F.normalize(torch.randn(n, d, generator=g), dim=1).to(DEVICE, dtype).requires_grad_()
    scale = torch.tensor(14.3, device=DEVICE, requires_grad=True)
    bias = torch.tensor(-10.0, device=DEVICE, requires_grad=True)
    backend = provider.split()[-1]

    def step():
        img.grad = txt.grad = scale.grad = bias.grad = None
        i_l, t_l = img[off : off + m], txt[off : off + m]
        if variant == "local_loss" and provider == "open_clip math":
            loss = _local_naive(i_l, t_l, img, txt, scale, off)
        elif variant == "local_loss":
            loss = local_clip_loss(i_l, t_l, img, txt, scale, off, backend=backend)
        elif provider == "open_clip math":
            loss = _siglip_neg_naive(i_l, txt, scale, bias)
        else:
            loss = siglip_loss(i_l, txt, scale, bias, backend, positives=False)
        loss.backward()
        _sync()

    step()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    benchmark.group = f"{variant} fwd+bwd M={m} N={n} D={d} {str(dtype).replace('torch.', '')}"
    benchmark.extra_info.update(
        provider=provider,
        baseline=provider == "open_clip math",
        peak_mem_growth_mb=round((torch.cuda.max_memory_allocated() - base) / 2**20, 1),
        device=torch.cuda.get_device_name(0),
    )
    benchmark.pedantic(step, rounds=3, iterations=1)
    benchmark.extra_info["model_tflops"] = round(
        6 * m * n * d * (2 if variant == "local_loss" else 1) / benchmark.stats.stats.median / 1e12, 4
    )


# ---- CUDA only: every Triton variant of the square CLIP loss, one row each: the autotuned
# pick with each backward mode (atomic dK / column-owned pass), deterministic=True, and each
# (forward config, backward config, backward mode) of the launch lists, so one GPU run says
# which is fastest. Each variant's loss and gradients are checked against the torch backend
# first (bf16: 5e-2, fp32 TF32: 1e-2 relative).
def _clip_variants(dtype):
    from mode_fast.kernels import contrastive_loss as cl

    out = [("auto " + mode, {"bwd": mode}) for mode in cl.BWD_MODES]
    out.append(("deterministic", {"deterministic": True}))
    if CUDA:
        for i, fc in enumerate(cl.launch_configs("fwd", dtype)):
            for j, bc in enumerate(cl.launch_configs("bwd", dtype)):
                for mode in cl.BWD_MODES:
                    out.append((f"fwd{i} bwd{j} {mode}", {"bwd": mode, "fwd_config": fc, "bwd_config": bc}))
    return out


def _clip_variant_step(img, txt, scale, bwd="atomic", deterministic=False, fwd_config=None, bwd_config=None):
    """Forward + backward of the square CLIP loss on the host functions, configs pinned."""
    from mode_fast.kernels import contrastive_loss as cl

    s = float(scale)
    loss, lse_r, lse_c = cl.contrastive_forward(img, txt, s, 0.0, False, deterministic=deterministic, config=fwd_config)
    d_i, d_t, d_s, _ = cl.contrastive_backward(
        img, txt, s, 0.0, lse_r, lse_c, 1.0, False, bwd=bwd, deterministic=deterministic, config=bwd_config
    )
    return loss, d_i, d_t, d_s


def _variant_cases():
    if not CUDA:
        return []
    return [(dt, name, kw) for dt in (torch.bfloat16, torch.float32) for name, kw in _clip_variants(dt)]


@functools.lru_cache(maxsize=2)
def _variant_inputs(dtype):
    b, d = 32768, 768
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(b, d, generator=g), dim=1).to(DEVICE, dtype)
    txt = F.normalize(torch.randn(b, d, generator=g), dim=1).to(DEVICE, dtype)
    scale = torch.tensor(14.3, device=DEVICE, requires_grad=True)
    i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
    clip_loss(i, t, scale, backend="torch").backward()
    return img, txt, [i.grad.float(), t.grad.float(), float(scale.grad)]


@pytest.mark.skipif(not CUDA, reason="the Triton variants' speed needs a GPU")
@pytest.mark.parametrize(
    "dtype,name,kw", _variant_cases(), ids=lambda v: str(v).replace("torch.", "") if not isinstance(v, dict) else ""
)
def test_clip_triton_variant(benchmark, dtype, name, kw):
    img, txt, ref = _variant_inputs(dtype)
    scale = 14.3
    _, d_i, d_t, d_s = _clip_variant_step(img, txt, scale, **kw)  # warm-up (compiles / tunes) and check
    tol = 5e-2 if dtype != torch.float32 else 1e-2
    for got, want in ((d_i, ref[0]), (d_t, ref[1])):
        err = float((got - want).abs().max() / want.abs().max())
        assert err <= tol, f"{name}: gradient off by {err:.2e} relative"
    _sync()
    benchmark.group = f"clip triton variants fwd+bwd B=32768 D=768 {str(dtype).replace('torch.', '')}"
    benchmark.extra_info.update(provider=name, baseline=name == "auto atomic", device=torch.cuda.get_device_name(0))
    benchmark.pedantic(lambda: (_clip_variant_step(img, txt, scale, **kw), _sync()), rounds=3, iterations=1)
    benchmark.extra_info["model_tflops"] = round(6 * 32768**2 * 768 / benchmark.stats.stats.median / 1e12, 4)
