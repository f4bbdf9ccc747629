"""fwd+bwd time and peak memory of the CLIP loss: mode_fast backends vs open_clip's ClipLoss (and Inf-CL).

CPU: the torch backend against open_clip at B in {4096, 8192}, D = 512, fp32, one thread
(the machine is shared; both providers run under the same setting in the same run);
BENCH_LARGE=1 adds B = 65536, where open_clip's two B x B fp32 logit matrices alone need
34 GB (it is skipped, not run into the OOM killer) and mode-fast's torch path runs in O(B*D).
CUDA: also the Triton backend and Inf-CL's `inf_cl.cal_inf_loss` (two calls, both
directions) when importable, over larger B and D = 768, fp32 and bf16.
Peak memory: CUDA max_memory_allocated growth; CPU peak RSS growth over the call,
sampled every millisecond by a thread (the torch CPU allocator returns large blocks to
the OS, so RSS follows live memory). Throughput: model FLOP/s = 6 B^2 D / time.

    python -m pytest benchmarks/bench_contrastive_loss.py --benchmark-json benchmarks/results/cpu/contrastive_loss.json
    python benchmarks/report.py benchmarks/results/cpu/contrastive_loss.json --out benchmarks/results/cpu/contrastive_loss.md
"""
from __future__ import annotations

import os
import threading
import time

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


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Peak resident memory above the level at entry, sampled by a thread every ms."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        self.growth = self.peak - self.base


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

    if CUDA or b <= 8192:
        step()  # warm-up (Triton compile, allocator); a CPU step at B = 65536 takes minutes
    img.grad = txt.grad = scale.grad = None
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with _PeakRSS() as mem:
            step()
        peak = mem.growth
    benchmark.group = f"clip fwd+bwd B={b} D={d} {str(dtype).replace('torch.', '')}"
    benchmark.extra_info.update(provider=provider, baseline=provider == "open_clip",
                                peak_mem_growth_mb=round(peak / 2**20, 1),
                                device=torch.cuda.get_device_name(0) if CUDA else "cpu",
                                threads=torch.get_num_threads())
    rounds = 3 if b <= 8192 else 2 if CUDA else 1
    benchmark.pedantic(step, rounds=rounds, iterations=1)
    benchmark.extra_info["model_tflops"] = round(6 * b * b * d / benchmark.stats.stats.median / 1e12, 4)
