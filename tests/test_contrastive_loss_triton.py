"""Triton kernels of clip_loss / siglip_loss under TRITON_INTERPRET=1 (CPU), and on CUDA when present.

TRITON_INTERPRET must be set before triton is imported (triton.jit reads it when the
kernels are decorated), and other test modules import the kernels first in the same
pytest process, so the interpreted checks run in a fresh subprocess: this file run as
a script (`python tests/test_contrastive_loss_triton.py B D STRIDED`) prints the max
relative errors against the chunked torch backend as JSON.
Interpreter pitfalls avoided: fp32 only (bf16 tl.dot is wrong there), one tile config.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

# (B, D, strided): odd B and D, B below one tile, widths 640 / 1152 (not powers of two)
CASES = [(3, 16, False), (37, 20, False), (50, 33, True), (40, 640, False), (24, 1152, True)]
# the rectangular kernels (interpreted): fewer cases, each runs four variants
RECT_CASES = [(37, 20, False), (50, 33, True)]


def _features(b: int, d: int, strided: bool, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(b * 1000 + d)
    img = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1)
    if strided:  # column-major images, texts every other row of a larger buffer
        img = img.t().contiguous().t()
        txt = torch.stack([txt, torch.zeros_like(txt)], 1).reshape(2 * b, d)[::2]
    return img.to(device, dtype), txt.to(device, dtype)


def _max_rel_errors(b: int, d: int, strided: bool, device="cpu", dtype=torch.float32) -> dict:
    from mode_fast.kernels import clip_loss, siglip_loss

    img0, txt0 = _features(b, d, strided, device, dtype)
    out = {}
    for name in ("clip", "siglip"):
        results = []
        for backend in ("triton", "torch"):
            img, txt = img0.clone().requires_grad_(), txt0.clone().requires_grad_()
            if strided:  # keep the strides: clone() of a strided view may be contiguous
                img = img0.detach().requires_grad_()
                txt = txt0.detach().requires_grad_()
            scale = torch.tensor(12.0, device=device, requires_grad=True)
            bias = torch.tensor(-6.0, device=device, requires_grad=True)
            if name == "clip":
                loss = clip_loss(img, txt, scale, backend=backend, strict_fp32=True)
                leaves = (img, txt, scale)
            else:
                loss = siglip_loss(img, txt, scale, bias, backend=backend, strict_fp32=True)
                leaves = (img, txt, scale, bias)
            loss.backward()
            results.append([loss.detach().float()] + [x.grad.float() for x in leaves])
        out[name] = [float((a - c).abs().max() / c.abs().max().clamp_min(1e-30)) for a, c in zip(*results)]
        out[name + "_strided"] = [not img0.is_contiguous(), not txt0.is_contiguous()]
    return out


def _rect_rel_errors(b: int, d: int, strided: bool, device="cpu", dtype=torch.float32) -> dict:
    """Max relative errors, Triton vs torch backend, of the rectangular variants: InfoNCE rows
    (M < N queries, positives at an offset), local_loss's both directions, SigLIP's
    negatives-only block (M != N), and two ring steps (running LSE merged, gradients
    accumulated into a visiting block's buffer). Also the launches each variant made."""
    from mode_fast.kernels import contrastive_loss as cl

    img0, txt0 = _features(b, d, strided, device, dtype)
    m = b // 3 + 1
    off = b - m - 1
    variants = {
        "infonce": (lambda i, t, s, bk: cl.infonce_loss(i[:m], t, s, off, backend=bk, strict_fp32=True)),
        "local": (lambda i, t, s, bk: cl.local_clip_loss(i[off:off + m], t[off:off + m], i, t, s, off,
                                                         backend=bk, strict_fp32=True)),
        "siglip_negatives": (lambda i, t, s, bk: cl.siglip_loss(i[:m], t, s, torch.tensor(-6.0, device=device),
                                                                backend=bk, positives=False, strict_fp32=True)),
    }
    out = {}
    for name, fn in variants.items():
        results, launched = [], None
        for backend in ("triton", "torch"):
            img, txt = img0.detach().requires_grad_(), txt0.detach().requires_grad_()
            scale = torch.tensor(12.0, device=device, requires_grad=True)
            before = cl.kernel_launches.copy()
            loss = fn(img, txt, scale, backend)
            loss.backward()
            launched = launched or dict(cl.kernel_launches - before)
            results.append([loss.detach().float()] + [x.grad.float() for x in (img, txt, scale)])
        out[name] = [float((a - c).abs().max() / c.abs().max().clamp_min(1e-30)) for a, c in zip(*results)]
        out[name + "_launches"] = launched
    # two ring steps of queries q against blocks k1 (own) and k2 (visiting)
    q, k1, k2 = img0[:m], txt0[:m], txt0[m : 2 * m]
    results = []
    for backend in ("triton", "torch"):
        before = cl.kernel_launches.copy()
        lse = cl.ring_block_forward(q, k1, 12.0, None, backend, strict_fp32=True)
        lse = cl.ring_block_forward(q, k2, 12.0, lse, backend, strict_fp32=True)
        d_q = torch.zeros(q.shape, dtype=torch.float32, device=device)
        acc1, acc2 = torch.zeros_like(d_q), torch.zeros_like(d_q)
        ds = cl.ring_block_backward(q, k1, 12.0, lse, 0.01, d_q, acc1, backend, strict_fp32=True)
        ds += cl.ring_block_backward(q, k2, 12.0, lse, 0.01, d_q, acc2, backend, strict_fp32=True)
        if backend == "triton":
            out["ring_launches"] = dict(cl.kernel_launches - before)
        results.append([lse, d_q, acc1, acc2, torch.tensor(ds)])
    out["ring"] = [float((a - c).abs().max() / c.abs().max().clamp_min(1e-30)) for a, c in zip(*results)]
    return out


RECT_LAUNCHES = {
    "infonce": ["fwd:rows", "bwd:rows"],
    "local": ["fwd:rows", "bwd:rows"],
    "siglip_negatives": ["fwd:siglip_rect", "bwd:siglip_rect"],
    "ring": ["fwd:rows", "fwd:rows_merge", "bwd:rows"],
}


def _interpreted(b: int, d: int, strided: bool, rect: bool = False) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__, str(b), str(d), str(int(strided)), str(int(rect))],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("b,d,strided", CASES)
def test_interpreted_kernels_match_torch_backend(b, d, strided):
    errs = _interpreted(b, d, strided)
    for name in ("clip", "siglip"):
        assert max(errs[name]) <= 1e-5, f"{name} relative errors (loss, grads...): {errs[name]}"
        assert errs[name + "_strided"] == [strided, strided]


def _check_rect(errs: dict, tol: float, what: str = "") -> None:
    for name, kernels in RECT_LAUNCHES.items():
        assert max(errs[name]) <= tol, f"{name}{what} relative errors (loss/LSE, grads...): {errs[name]}"
        missing = [k for k in kernels if not errs[name + "_launches"].get(k)]
        assert not missing, f"{name}{what}: no Triton launch of {missing} ({errs[name + '_launches']})"


@pytest.mark.parametrize("b,d,strided", RECT_CASES)
def test_interpreted_rectangular_kernels_match_torch_backend(b, d, strided):
    _check_rect(_interpreted(b, d, strided, rect=True), 1e-5)


# (kernel, SIGLIP, MERGE) of each rectangular launch: rows (+ ring merge), SigLIP negatives
RECT_MODES = [("fwd", False, False), ("fwd", False, True), ("fwd", True, False), ("bwd", False, None),
              ("bwd", True, None)]


@pytest.mark.parametrize("kind,siglip,merge", RECT_MODES)
def test_rectangular_kernels_compile_for_hopper(kind, siglip, merge):
    """The rectangular launches lower to sm_90 machine code (bf16 inputs), as
    tests/test_kernels_compile.py checks for the square ones: the interpreter forgives what
    the compiler refuses."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mode_fast.kernels import contrastive_loss as cl
    from mode_fast.kernels import dispatch

    if dispatch.interpreting():
        pytest.skip("kernels are interpreter functions in this process")
    fn = cl._block_fwd_kernel if kind == "fwd" else cl._block_bwd_kernel
    const = cl._launch_meta(torch.empty(1, 1, dtype=torch.bfloat16), False) | {"SIGLIP": siglip, "COLS": False}
    if kind == "fwd":
        const["MERGE"] = merge
    types = {n: "*fp32" for n in fn.arg_names if n.endswith("_ptr")} | {"Q_ptr": "*bf16", "K_ptr": "*bf16"}
    types |= {n: "i32" for n in fn.arg_names if n[0] in "MND" and len(n) == 1 or "_stride_" in n}
    types |= {n: "fp32" for n in ("scale", "bias", "g")}
    sig = {n: ("constexpr" if n in const else types[n]) for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    assert kernel.asm["cubin"], "no machine code"
    assert kernel.metadata.shared <= 227 * 1024


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("b,d", [(1000, 768), (4099, 1152), (333, 640)])
def test_cuda_kernels_match_torch_backend(b, d, dtype, tol):
    errs = _max_rel_errors(b, d, False, "cuda", dtype)
    for name in ("clip", "siglip"):
        assert max(errs[name]) <= tol, f"{name} {dtype}: {errs[name]}"
    _check_rect(_rect_rel_errors(b, d, False, "cuda", dtype), tol, f" {dtype}")


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through the tests (sets TRITON_INTERPRET=1)"
    torch.set_num_threads(1)
    b_, d_, strided_ = int(sys.argv[1]), int(sys.argv[2]), bool(int(sys.argv[3]))
    rect_ = len(sys.argv) > 4 and bool(int(sys.argv[4]))
    print(json.dumps((_rect_rel_errors if rect_ else _max_rel_errors)(b_, d_, strided_)))
