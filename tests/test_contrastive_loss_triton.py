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
import sys

import pytest
import torch
from interpreted import run_interpreted
from kernel_launches import counting

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
        "local": (
            lambda i, t, s, bk: cl.local_clip_loss(
                i[off : off + m], t[off : off + m], i, t, s, off, backend=bk, strict_fp32=True
            )
        ),
        "siglip_negatives": (
            lambda i, t, s, bk: cl.siglip_loss(
                i[:m], t, s, torch.tensor(-6.0, device=device), backend=bk, positives=False, strict_fp32=True
            )
        ),
    }
    out = {}
    for name, fn in variants.items():
        results, launched = [], None
        for backend in ("triton", "torch"):
            img, txt = img0.detach().requires_grad_(), txt0.detach().requires_grad_()
            scale = torch.tensor(12.0, device=device, requires_grad=True)
            with counting() as launches:
                loss = fn(img, txt, scale, backend)
                loss.backward()
            launched = launched or dict(launches)
            results.append([loss.detach().float()] + [x.grad.float() for x in (img, txt, scale)])
        out[name] = [float((a - c).abs().max() / c.abs().max().clamp_min(1e-30)) for a, c in zip(*results)]
        out[name + "_launches"] = launched
    # two ring steps of queries q against blocks k1 (own) and k2 (visiting)
    q, k1, k2 = img0[:m], txt0[:m], txt0[m : 2 * m]
    results = []
    for backend in ("triton", "torch"):
        with counting() as launches:
            lse = cl.ring_block_forward(q, k1, 12.0, None, backend, strict_fp32=True)
            lse = cl.ring_block_forward(q, k2, 12.0, lse, backend, strict_fp32=True)
            d_q = torch.zeros(q.shape, dtype=torch.float32, device=device)
            acc1, acc2 = torch.zeros_like(d_q), torch.zeros_like(d_q)
            ds = cl.ring_block_backward(q, k1, 12.0, lse, 0.01, d_q, acc1, backend, strict_fp32=True)
            ds += cl.ring_block_backward(q, k2, 12.0, lse, 0.01, d_q, acc2, backend, strict_fp32=True)
        if backend == "triton":
            out["ring_launches"] = dict(launches)
        results.append([lse, d_q, acc1, acc2, torch.tensor(ds)])
    out["ring"] = [float((a - c).abs().max() / c.abs().max().clamp_min(1e-30)) for a, c in zip(*results)]
    return out


RECT_LAUNCHES = {
    "infonce": ["fwd:rows", "bwd:rows"],
    "local": ["fwd:rows", "bwd:rows"],
    "siglip_negatives": ["fwd:siglip_rect", "bwd:siglip_rect"],
    "ring": ["fwd:rows", "fwd:rows_merge", "bwd:rows"],
}


def _determinism(b: int, d: int, strided: bool) -> dict:
    """deterministic=True: bitwise equal results on repeated runs, and from the kernels
    launched one row block at a time in a shuffled order (program order permuted) equal to
    one launch; also the results match the torch backend and the default (atomic) mode."""
    import triton

    from mode_fast.kernels import contrastive_loss as cl

    img0, txt0 = _features(b, d, strided)
    out = {}
    m = b // 2 + 1

    def run(fn, **kw):
        img, txt = img0.detach().requires_grad_(), txt0.detach().requires_grad_()
        scale = torch.tensor(12.0, requires_grad=True)
        loss = fn(img, txt, scale, **kw)
        loss.backward()
        return [loss.detach()] + [x.grad for x in (img, txt, scale)]

    variants = {
        "clip": lambda i, t, s, **kw: cl.clip_loss(i, t, s, **kw),
        "siglip": lambda i, t, s, **kw: cl.siglip_loss(i, t, s, -6.0, **kw),
        "infonce": lambda i, t, s, **kw: cl.infonce_loss(i[:m], t, s, 1, **kw),
        "siglip_negatives": lambda i, t, s, **kw: cl.siglip_loss(i[:m], t, s, -6.0, positives=False, **kw),
    }
    for name, fn in variants.items():
        with counting() as launches:
            a = run(fn, backend="triton", strict_fp32=True, deterministic=True)
        launched = dict(launches)
        again = run(fn, backend="triton", strict_fp32=True, deterministic=True)
        ref = run(fn, backend="torch")
        atomic = run(fn, backend="triton", strict_fp32=True, bwd="atomic")
        ref2 = run(fn, backend="torch")
        out[name] = {
            "repeat_equal": all(torch.equal(x, y) for x, y in zip(a, again)),
            "torch_repeat_equal": all(torch.equal(x, y) for x, y in zip(ref, ref2)),
            "err": max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)) for x, y in zip(a, ref)),
            "atomic_err": max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)) for x, y in zip(atomic, ref)),
            "atomic_launches": not launched.get("atomic") and bool(launched.get("dk:columns")),
        }
    # program order: each program owns its rows, so one launch equals the row blocks
    # launched one at a time in a shuffled order, bit for bit (forward rows and both
    # backward passes, with the q / k roles swapped as the columns pass does)
    g = torch.Generator().manual_seed(7)
    q, k = img0, txt0[: b - 3]
    lse = cl.rows_forward(q, k, 12.0, strict_fp32=True)
    lse_k = cl.rows_forward(k, q, 12.0, strict_fp32=True)
    cfg = cl.launch_configs("bwd", q.dtype)[0]
    bm = cfg["BLOCK_M"]
    order_ok = True
    for siglip in (False, True):
        for qq, kk, l_r, l_c in ((q, k, lse, lse_k), (k, q, lse_k, lse)):
            rows, cols = qq.shape[0], kk.shape[0]
            progs = triton.cdiv(rows, bm)

            def launch(r, d_q, d_s, d_b, fwd_row):
                ln = r.stop - r.start
                cl.FWD.kernel("general")[(triton.cdiv(ln, bm),)](
                    qq[r],
                    kk,
                    fwd_row,
                    fwd_row,
                    fwd_row,
                    ln,
                    cols,
                    d,
                    qq.stride(0),
                    qq.stride(1),
                    kk.stride(0),
                    kk.stride(1),
                    12.0,
                    -6.0,
                    0,
                    SIGLIP=siglip,
                    COLS=False,
                    PRECISION="ieee",
                    **cfg,
                )
                cl.BWD.kernel("general")[(triton.cdiv(ln, bm),)](
                    qq[r],
                    kk,
                    l_r[r],
                    l_c,
                    d_q[r],
                    d_q,
                    d_s,
                    d_b,
                    ln,
                    cols,
                    d,
                    qq.stride(0),
                    qq.stride(1),
                    kk.stride(0),
                    kk.stride(1),
                    12.0,
                    -6.0,
                    0.01,
                    1,
                    1,
                    SIGLIP=siglip,
                    DK_ATOMIC=False,
                    PRECISION="ieee",
                    **cfg,
                )

            def bufs():
                return torch.zeros(rows, d), torch.zeros(progs), torch.zeros(progs), torch.zeros(rows)

            whole = bufs()
            launch(slice(0, rows), *whole)
            parts = bufs()
            for p in torch.randperm(progs, generator=g).tolist():
                r = slice(p * bm, min(rows, p * bm + bm))
                launch(r, parts[0], parts[1][p:], parts[2][p:], parts[3][r])
            order_ok &= all(torch.equal(x, y) for x, y in zip(whole, parts))
    out["program_order"] = bool(order_ok)
    return out


def _interpreted(b: int, d: int, strided: bool, rect: bool | str = False) -> dict:
    return run_interpreted([__file__, str(b), str(d), str(int(strided)), str(int(rect))])


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


@pytest.mark.parametrize("b,d,strided", [(37, 20, False), (50, 33, True)])
def test_interpreted_deterministic_mode(b, d, strided):
    """deterministic=True: same bits on a second run and whatever order the programs run
    in; no atomic launch; as accurate as the default path. The torch path repeats bitwise."""
    res = _interpreted(b, d, strided, rect=2)
    for name in ("clip", "siglip", "infonce", "siglip_negatives"):
        r = res[name]
        assert r["repeat_equal"] and r["torch_repeat_equal"], f"{name}: {r}"
        assert r["err"] <= 1e-5 and r["atomic_err"] <= 1e-5, f"{name}: {r}"
        assert r["atomic_launches"], f"{name}: an atomic kernel ran under deterministic=True"
    assert res["program_order"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("b,d", [(1000, 768), (4099, 1152), (333, 640)])
def test_cuda_kernels_match_torch_backend(b, d, dtype, tol):
    errs = _max_rel_errors(b, d, False, "cuda", dtype)
    for name in ("clip", "siglip"):
        assert max(errs[name]) <= tol, f"{name} {dtype}: {errs[name]}"
    _check_rect(_rect_rel_errors(b, d, False, "cuda", dtype), tol, f" {dtype}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_deterministic_and_column_backward(dtype):
    """On the GPU: deterministic=True repeats bit for bit; the column-owned and the atomic
    backward agree with the torch backend."""
    from mode_fast.kernels import clip_loss, siglip_loss

    img0, txt0 = _features(3001, 768, False, "cuda", dtype)
    tol = 1e-5 if dtype == torch.float32 else 5e-2

    def run(fn, **kw):
        img, txt = img0.detach().requires_grad_(), txt0.detach().requires_grad_()
        loss = fn(img, txt, **kw)
        loss.backward()
        return [loss.detach().float(), img.grad.float(), txt.grad.float()]

    for fn in (lambda i, t, **kw: clip_loss(i, t, 12.0, **kw), lambda i, t, **kw: siglip_loss(i, t, 12.0, -6.0, **kw)):
        a = run(fn, backend="triton", strict_fp32=True, deterministic=True)
        b = run(fn, backend="triton", strict_fp32=True, deterministic=True)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        ref = run(fn, backend="torch")
        for mode in ("atomic", "columns"):
            got = run(fn, backend="triton", strict_fp32=True, bwd=mode)
            errs = [float((x - y).abs().max() / y.abs().max()) for x, y in zip(got, ref)]
            assert max(errs) <= tol, f"{mode}: {errs}"


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through the tests (sets TRITON_INTERPRET=1)"
    torch.set_num_threads(1)
    b_, d_, strided_ = int(sys.argv[1]), int(sys.argv[2]), bool(int(sys.argv[3]))
    what = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    print(json.dumps((_max_rel_errors, _rect_rel_errors, _determinism)[what](b_, d_, strided_)))
