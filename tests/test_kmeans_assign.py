"""kmeans_assign: every backend against an fp64 brute force, on random and adversarial data.

The Triton kernel runs here under TRITON_INTERPRET=1 in a subprocess: the interpreter is
chosen when a kernel is decorated, i.e. when mode_fast/kernels/kmeans_assign.py is first imported,
and this process has already imported it without the variable.
"""

from __future__ import annotations

import os
import textwrap

import pytest
import torch
from interpreted import run_interpreted

from mode_fast.kernels import reference
from mode_fast.kernels.kmeans_assign import kmeans_assign

try:
    import faiss  # noqa: F401

    HAVE_FAISS = True
except ImportError:
    HAVE_FAISS = False

needs_faiss = pytest.mark.skipif(not HAVE_FAISS, reason="faiss-cpu is not installed")

# (N, K, D): odd sizes on purpose; K > N; D = 1; D not a multiple of any tile.
SHAPES = [(1, 1, 1), (5, 9, 3), (64, 16, 37), (300, 50, 129), (257, 1000, 8)]
# dtype -> how the CPU torch path is compared: always exactly, on the upcast values.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _data(n: int, k: int, d: int, seed: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).to(dtype), torch.randn(k, d, generator=g).to(dtype)


def _fp64_ties(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 distances and, per row, the mask of centers within fp64 rounding of the min."""
    xd, cd = x.double(), c.double()
    dist = ((xd[:, None, :] - cd[None, :, :]) ** 2).sum(-1)
    row_min = dist.min(1, keepdim=True).values
    near = dist <= row_min * (1 + 1e-12)
    return dist, near


def _assert_exact(labels: torch.Tensor, x: torch.Tensor, c: torch.Tensor) -> None:
    """labels must be the lowest index among the fp64-nearest centers, row by row."""
    _, near = _fp64_ties(x, c)
    expected = near.float().argmax(1)  # first True
    bad = (labels.cpu() != expected).nonzero().squeeze(1)
    if bad.numel():
        i = int(bad[0])
        raise AssertionError(
            f"{bad.numel()} of {len(labels)} labels differ from the fp64 argmin; first at row "
            f"{i}: got {int(labels[i])}, expected {int(expected[i])}"
        )


# ---------------------------------------------------------------------------------
# torch backend (the CPU path) and faiss
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_matches_fp64_bruteforce(shape, dtype):
    n, k, d = shape
    x, c = _data(n, k, d, seed=sum(shape), dtype=dtype)
    labels, sqdist = kmeans_assign(x, c, backend="torch")
    assert labels.dtype == torch.int64 and labels.shape == (n,)
    assert sqdist.dtype == torch.float32 and sqdist.shape == (n,)
    _assert_exact(labels, x.float(), c.float())
    _, ref_sq = reference.kmeans_assign_bruteforce(x.float(), c.float())
    torch.testing.assert_close(sqdist.double(), ref_sq, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, None])
def test_torch_chunking_does_not_change_results(chunk_size):
    x, c = _data(150, 33, 21, seed=3)
    labels, sqdist = kmeans_assign(x, c, backend="torch", chunk_size=chunk_size)
    ref_labels, ref_sq = kmeans_assign(x, c, backend="torch", chunk_size=1000)
    assert torch.equal(labels, ref_labels)
    assert torch.equal(sqdist, ref_sq)


@needs_faiss
@pytest.mark.parametrize("shape", SHAPES)
def test_faiss_backend_agrees_away_from_ties(shape):
    n, k, d = shape
    x, c = _data(n, k, d, seed=7 + sum(shape))
    f_labels, f_sq = kmeans_assign(x, c, backend="faiss")
    t_labels, t_sq = kmeans_assign(x, c, backend="torch")
    dist, _ = _fp64_ties(x, c)
    top2 = dist.topk(min(2, k), dim=1, largest=False).values
    gap = top2[:, -1] - top2[:, 0] if k > 1 else torch.full((n,), float("inf"))
    clear = gap > 1e-3 * (1 + top2[:, 0])  # faiss has no near-tie re-check
    assert torch.equal(f_labels[clear], t_labels[clear])
    torch.testing.assert_close(f_sq, t_sq)


def test_auto_on_cpu_is_the_torch_path():
    x, c = _data(100, 10, 5, seed=11)
    a = kmeans_assign(x, c)
    t = kmeans_assign(x, c, backend="torch")
    assert torch.equal(a[0], t[0]) and torch.equal(a[1], t[1])


# ---------------------------------------------------------------------------------
# adversarial inputs
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [12, 100])  # 3k >= 128 takes the grouped-min path
def test_exact_ties_go_to_lowest_index(k):
    x, c = _data(200, k, 6, seed=1)
    c3 = torch.cat([c, c, c])  # every center three times: exact ties at i, i+k, i+2k
    labels, _ = kmeans_assign(x, c3, backend="torch")
    assert int(labels.max()) < k
    _assert_exact(labels, x, c3)
    # Symmetric tie: the origin is equidistant from +e_j and -e_j for every j.
    d = 5
    eye = torch.eye(d)
    c_sym = torch.cat([eye, -eye])[torch.randperm(2 * d, generator=torch.Generator().manual_seed(0))]
    labels, sqdist = kmeans_assign(torch.zeros(3, d), c_sym, backend="torch")
    assert labels.tolist() == [0, 0, 0] and sqdist.tolist() == [1.0, 1.0, 1.0]


def test_duplicate_points_and_points_on_centers():
    x, c = _data(10, 20, 9, seed=2)
    pts = torch.cat([x, x, c[3:4].repeat(5, 1)])
    labels, sqdist = kmeans_assign(pts, c, backend="torch")
    assert torch.equal(labels[:10], labels[10:20])
    assert labels[20:].tolist() == [3] * 5
    # Direct differences: a point on its center is exactly 0, not a cancellation residue.
    assert sqdist[20:].tolist() == [0.0] * 5


def test_near_ties_beyond_fp32_expansion_are_resolved():
    """A large common offset makes ||x||^2 - 2x.c + ||c||^2 useless in fp32 (terms ~1e7,
    differences ~1e-2), so the rounding window flags every row and the fp64 re-check
    must produce every label."""
    g = torch.Generator().manual_seed(5)
    d = 16
    offset = torch.full((d,), 1000.0)
    c = offset + 0.05 * torch.randn(40, d, generator=g)
    x = offset + 0.05 * torch.randn(120, d, generator=g)
    labels, sqdist = kmeans_assign(x, c, backend="torch")
    _assert_exact(labels, x, c)
    _, ref_sq = reference.kmeans_assign_bruteforce(x, c)
    torch.testing.assert_close(sqdist.double(), ref_sq, rtol=1e-3, atol=1e-6)
    # Without the re-check the expansion is wrong on such data (evidence the case bites).
    rough, _ = kmeans_assign(x, c, backend="torch", exact=False)
    assert not torch.equal(rough, labels)


@pytest.mark.parametrize(
    "make",
    [
        lambda t: t.t().contiguous().t(),  # column-major
        lambda t: torch.stack([t, torch.zeros_like(t)], 2)[:, :, 0],  # column stride 2
        lambda t: torch.stack([t, torch.zeros_like(t)], 1)[:, 0],  # row stride 2*D
    ],
    ids=["column_major", "stride_cols", "stride_rows"],
)
def test_non_contiguous_inputs(make):
    x, c = _data(90, 17, 11, seed=4)
    xs, cs = make(x), make(c)
    assert not xs.is_contiguous() and torch.equal(xs, x)
    ref = kmeans_assign(x, c, backend="torch")
    got = kmeans_assign(xs, cs, backend="torch")
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_empty_x_and_single_center():
    _, c = _data(1, 4, 3, seed=6)
    labels, sqdist = kmeans_assign(torch.empty(0, 3), c)
    assert labels.shape == (0,) and sqdist.shape == (0,) and labels.dtype == torch.int64
    x, _ = _data(8, 1, 3, seed=6)
    labels, _ = kmeans_assign(x, c[:1])
    assert labels.tolist() == [0] * 8


@pytest.mark.parametrize("exact", [True, False])
def test_deterministic_across_calls(exact):
    x, c = _data(400, 200, 33, seed=8)
    a = kmeans_assign(x, c, exact=exact)
    b = kmeans_assign(x, c, exact=exact)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # the flag: accepted, same bits (the torch path has no order-dependent reduction)
    d1 = kmeans_assign(x, c, exact=exact, deterministic=True)
    d2 = kmeans_assign(x, c, exact=exact, deterministic=True)
    assert torch.equal(d1[0], a[0]) and torch.equal(d1[1], a[1])
    assert torch.equal(d2[0], d1[0]) and torch.equal(d2[1], d1[1])


@needs_faiss
def test_deterministic_is_refused_for_faiss():
    x, c = _data(10, 4, 3, seed=8)
    with pytest.raises(ValueError, match="deterministic=True needs backend"):
        kmeans_assign(x, c, backend="faiss", deterministic=True)


# ---------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_x_raises(bad):
    x, c = _data(50, 5, 4, seed=9)
    x[17, 2] = bad
    with pytest.raises(ValueError, match=r"NaN or inf.*|row 17"):
        kmeans_assign(x, c)
    with pytest.raises(ValueError, match="row 17"):
        kmeans_assign(x, c, backend="torch")


@needs_faiss
def test_non_finite_x_raises_with_faiss():
    x, c = _data(50, 5, 4, seed=9)
    x[3, 0] = float("nan")
    with pytest.raises(ValueError, match="row 3"):
        kmeans_assign(x, c, backend="faiss")


def test_non_finite_centroids_raise():
    x, c = _data(50, 5, 4, seed=10)
    c[2, 1] = float("nan")
    with pytest.raises(ValueError, match="centroids contain NaN or inf"):
        kmeans_assign(x, c)


def test_overflowing_values_raise():
    x, c = _data(4, 3, 2, seed=12)
    x[1] = 3e38  # finite, but the squared distance overflows fp32
    with pytest.raises(ValueError, match="too large"):
        kmeans_assign(x, c)


@pytest.mark.parametrize(
    "x, c, err, msg",
    [
        (torch.zeros(4, 3), torch.zeros(2, 5), ValueError, "dimension mismatch"),
        (torch.zeros(4), torch.zeros(2, 4), ValueError, "must be 2-D"),
        (torch.zeros(4, 3), torch.zeros(0, 3), ValueError, "K = 0"),
        (torch.zeros(4, 3), torch.zeros(2, 3, dtype=torch.float16), TypeError, "dtype mismatch"),
        (torch.zeros(4, 3, dtype=torch.int32), torch.zeros(2, 3), TypeError, "dtype"),
        (torch.zeros(4, 3, dtype=torch.float64), torch.zeros(2, 3), TypeError, "float32"),
        (torch.zeros(4, 3, device="meta"), torch.zeros(2, 3), ValueError, "device mismatch"),
        ([[0.0]], torch.zeros(1, 1), TypeError, "torch.Tensor"),
    ],
)
def test_bad_arguments_raise(x, c, err, msg):
    with pytest.raises(err, match=msg):
        kmeans_assign(x, c)


def test_unknown_backend_and_triton_on_cpu_raise():
    x, c = _data(4, 2, 3, seed=13)
    with pytest.raises(ValueError, match="unknown backend"):
        kmeans_assign(x, c, backend="cuml")
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        with pytest.raises(ValueError, match="needs CUDA"):
            kmeans_assign(x, c, backend="triton")


def test_public_export_is_the_function():
    """`from mode_fast.kernels import kmeans_assign` must give the function, also after
    the submodule of the same name has been imported (as this file already did)."""
    import mode_fast.kernels as kernels
    from mode_fast.kernels import kmeans_assign as exported

    assert callable(exported)
    assert callable(kernels.kmeans_assign)


# ---------------------------------------------------------------------------------
# Triton kernel under the interpreter (CPU, small sizes, fp32)
# ---------------------------------------------------------------------------------
_INTERP_SCRIPT = textwrap.dedent(
    """
    import json, torch
    from mode_fast.kernels.kmeans_assign import kmeans_assign, launch_configs
    assert launch_configs(torch.float32)[0]["BLOCK_D"] == 16  # interpreter config in use
    out = {}
    g = torch.Generator().manual_seed(0)
    cases = {
        # (N, K, D): D > BLOCK_D (D split), K and N not multiples of the 16-wide tiles
        "odd": (37, 21, 35),
        "k_gt_n": (5, 40, 7),
        "one": (1, 1, 1),
    }
    for name, (n, k, d) in cases.items():
        x, c = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
        out[name] = [x.tolist(), c.tolist(), *[t.tolist() for t in kmeans_assign(x, c, "triton")]]
    # the kernel alone (no host re-check) on random data, where near ties are unlikely
    x, c = torch.randn(45, 35, generator=g), torch.randn(50, 35, generator=g)
    out["raw"] = [x.tolist(), c.tolist(), *[t.tolist() for t in kmeans_assign(x, c, "triton", exact=False)]]
    # exact ties (duplicated centers, lowest index wins) and points on centers
    x, c = torch.randn(20, 9, generator=g), torch.randn(6, 9, generator=g)
    x[:6] = c
    c = torch.cat([c, c, c])
    out["ties"] = [x.tolist(), c.tolist(), *[t.tolist() for t in kmeans_assign(x, c, "triton")]]
    # non-contiguous x and centroids
    x, c = torch.randn(40, 18, generator=g), torch.randn(19, 18, generator=g)
    xs, cs = torch.stack([x, x], 2)[:, :, 0], c.t().contiguous().t()
    assert not xs.is_contiguous() and not cs.is_contiguous()
    out["strided"] = [xs.tolist(), cs.tolist(), *[t.tolist() for t in kmeans_assign(xs, cs, "triton")]]
    # the kernel's own near-tie flags resolve a large-offset case (every row re-checked)
    off = torch.full((16,), 1000.0)
    x, c = off + 0.05 * torch.randn(24, 16, generator=g), off + 0.05 * torch.randn(18, 16, generator=g)
    out["offset"] = [x.tolist(), c.tolist(), *[t.tolist() for t in kmeans_assign(x, c, "triton")]]
    # fp16 inputs (bf16 tl.dot is wrong in the interpreter, so not tried here)
    x, c = torch.randn(33, 20, generator=g).half(), torch.randn(17, 20, generator=g).half()
    out["fp16"] = [x.float().tolist(), c.float().tolist(), *[t.tolist() for t in kmeans_assign(x, c, "triton")]]
    # two-way ties across tiles (centers 0..3 repeated at 20..23): the cheap
    # two-candidate re-check must keep the lower index
    x, c = torch.randn(40, 12, generator=g), torch.randn(20, 12, generator=g)
    c = torch.cat([c, c[:4]])
    x[:8] = c[:4].repeat(2, 1) + 0.01 * torch.randn(8, 12, generator=g)
    out["pairs"] = [x.tolist(), c.tolist(), *[t.tolist() for t in kmeans_assign(x, c, "triton")]]
    # the kernel's running top 3 against a sort of all scores (random data, 4 K-tiles)
    import triton
    import importlib
    km = importlib.import_module("mode_fast.kernels.kmeans_assign")  # the module, not the function
    x, c = torch.randn(37, 35, generator=g), torch.randn(50, 35, generator=g)
    c_sq = (c * c).sum(1)
    bufs = [torch.empty(37) for _ in range(3)] + [torch.empty(37, dtype=torch.int64) for _ in range(2)]
    best, second, third, arg, arg2 = bufs
    sq, xsq = torch.empty(37), torch.empty(37)
    km.ASSIGN.kernel("aligned")[(triton.cdiv(37, 16),)](
        x, c, c_sq, best, second, third, arg, arg2, sq, xsq, 37, 50, 35, 64,
        x.stride(0), x.stride(1), c.stride(0), c.stride(1),
        BLOCK_N=16, BLOCK_K=16, BLOCK_D=16, IEEE_FP32=True)
    ref = (c_sq.double()[None] - 2 * x.double() @ c.double().T).sort(1)
    out["top3"] = {
        "scores_err": float((torch.stack([best, second, third], 1).double() - ref.values[:, :3]).abs().max()),
        "args_ok": bool(torch.equal(arg, ref.indices[:, 0]) and torch.equal(arg2, ref.indices[:, 1])),
        "xsq_err": float((xsq - (x * x).sum(1)).abs().max()),
    }
    # NaN input is rejected, not labelled
    x = torch.randn(20, 9, generator=g); x[7, 3] = float("nan")
    try:
        kmeans_assign(x, torch.randn(5, 9, generator=g), "triton")
        out["nan_raises"] = False
    except ValueError as e:
        out["nan_raises"] = "row 7" in str(e)
    # determinism: bitwise the same on a second run, with and without deterministic=True
    a = kmeans_assign(xs, cs, "triton"); b = kmeans_assign(xs, cs, "triton")
    a2 = kmeans_assign(xs, cs, "triton", deterministic=True)
    b2 = kmeans_assign(xs, cs, "triton", deterministic=True)
    out["deterministic"] = bool(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                and torch.equal(a2[0], b2[0]) and torch.equal(a2[1], b2[1]))
    # program order: each program owns its rows, so running the row blocks one launch at a
    # time, in a shuffled order, gives the same bits as one launch
    def launch(fn, x, c, outs, n):
        fn[(triton.cdiv(n, 16),)](
            x, c, c_sq, *outs, n, c.shape[0], x.shape[1], 64,
            x.stride(0), x.stride(1), c.stride(0), c.stride(1),
            BLOCK_N=16, BLOCK_K=16, BLOCK_D=16, IEEE_FP32=True)
    x, c = torch.randn(70, 35, generator=g), torch.randn(50, 35, generator=g)
    c_sq = (c * c).sum(1)
    order_ok = True
    for fn in (km.ASSIGN.kernel("aligned"), km.ASSIGN.kernel("general")):
        def bufs(n):
            return [torch.empty(n) for _ in range(3)] + [torch.empty(n, dtype=torch.int64) for _ in range(2)] + [torch.empty(n), torch.empty(n)]
        whole = bufs(70)
        launch(fn, x, c, whole, 70)
        parts = bufs(70)
        for s in torch.randperm(5, generator=g).tolist():
            r = slice(16 * s, min(16 * s + 16, 70))
            launch(fn, x[r], c, [t[r] for t in parts], r.stop - r.start)
        order_ok &= all(torch.equal(u, v) for u, v in zip(whole, parts))
    out["program_order"] = bool(order_ok)
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    return run_interpreted(["-c", _INTERP_SCRIPT])


@pytest.mark.parametrize("case", ["odd", "k_gt_n", "one", "raw", "ties", "pairs", "strided", "offset", "fp16"])
def test_triton_interpreted_matches_fp64(interpreted, case):
    x, c, labels, sqdist = (torch.tensor(v) for v in interpreted[case])
    _assert_exact(labels, x, c)
    _, ref_sq = reference.kmeans_assign_bruteforce(x, c)
    torch.testing.assert_close(sqdist.double(), ref_sq, rtol=1e-4, atol=1e-4)
    if case == "ties":
        assert int(labels.max()) < 6 and sqdist[:6].tolist() == [0.0] * 6
    if case == "pairs":
        assert labels[:8].tolist() == [0, 1, 2, 3] * 2


def test_triton_interpreted_running_top3(interpreted):
    top3 = interpreted["top3"]
    assert top3["scores_err"] < 1e-4 and top3["xsq_err"] < 1e-4
    assert top3["args_ok"]


def test_triton_interpreted_deterministic(interpreted):
    assert interpreted["deterministic"]


def test_triton_interpreted_program_order_does_not_matter(interpreted):
    assert interpreted["program_order"]


def test_triton_interpreted_rejects_nan(interpreted):
    assert interpreted["nan_raises"]


# ---------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# ---------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5000, 1024, 384), (777, 300, 129), (3, 5000, 768)])
def test_triton_matches_torch_on_gpu(shape, dtype):
    n, k, d = shape
    x, c = _data(n, k, d, seed=21, dtype=dtype)
    x, c = x.cuda(), c.cuda()
    tri = kmeans_assign(x, c, backend="triton")
    ref = kmeans_assign(x, c, backend="torch")
    cpu = kmeans_assign(x.cpu(), c.cpu(), backend="torch")
    assert torch.equal(tri[0], ref[0]) and torch.equal(tri[0].cpu(), cpu[0])
    torch.testing.assert_close(tri[1], ref[1], rtol=1e-5, atol=1e-5)
    again = kmeans_assign(x, c, backend="triton")
    assert torch.equal(tri[0], again[0]) and torch.equal(tri[1], again[1])


def _gpu_configs():
    import importlib

    km = importlib.import_module("mode_fast.kernels.kmeans_assign")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return []
    return [(dt, layout, cfg) for dt in DTYPES for layout in ("aligned", "general")
            for cfg in km.launch_configs(dt, layout)]  # fmt: skip


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype, layout, cfg", _gpu_configs(), ids=str)
def test_every_launch_config_on_gpu(dtype, layout, cfg):
    """Each config the autotuner may pick gives the exact labels, the same bits twice."""
    import importlib

    from mode_fast.kernels import launch

    km = importlib.import_module("mode_fast.kernels.kmeans_assign")
    x, c = _data(600, 130, 256 if layout == "aligned" else 129, seed=22, dtype=dtype)
    x, c = x.cuda(), c.cuda()
    assert launch.layout(x, c) == layout
    a = km._assign_triton(x, c, exact=True, config=cfg)
    b = km._assign_triton(x, c, exact=True, config=cfg)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    _assert_exact(a[0], x.float().cpu(), c.float().cpu())


@pytest.mark.gpu
@cuda
def test_triton_no_cap_on_n_and_strided_on_gpu():
    # 9M rows: grid > 65,535 programs at any BLOCK_N <= 128.
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(9_000_000, 32, device="cuda", generator=g, dtype=torch.float16)[:, ::2]
    c = torch.randn(16, 16, device="cuda", generator=g, dtype=torch.float16)
    tri = kmeans_assign(x, c, backend="triton")
    ref = kmeans_assign(x, c, backend="torch")
    assert torch.equal(tri[0], ref[0])
