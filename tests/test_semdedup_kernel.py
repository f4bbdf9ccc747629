"""max_earlier_similarity: the torch path and the Triton kernel against two independent oracles.

- ``reference.max_earlier_similarity_dense``: the public SemDeDup code's way (the n x n matrix,
  diagonal zeroed, strict upper triangle, column max), which equals max(best, 0), and whose
  removed sets (best > 1 - eps) must be the same as ours for every eps;
- a plain-Python double loop in float64 (math.fsum), for the arg and its tie rule (the lowest
  index among equal maxima) and for negative maxima, which the dense form clips at 0.

The Triton kernel runs here under TRITON_INTERPRET=1 in a subprocess (the interpreter is
chosen when a kernel is decorated, i.e. when mode_fast/kernels/semdedup.py is first
imported, and this process has already imported it without the variable). The GPU tests
compare the compiled kernel with the torch path on CUDA (skipped without one).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import textwrap

import pytest
import torch
from interpreted import run_interpreted

from mode_fast.core.errors import ConfigError
from mode_fast.kernels import reference
from mode_fast.kernels.semdedup import default_tile, max_earlier_similarity, max_earlier_similarity_torch

sd = importlib.import_module("mode_fast.kernels.semdedup")

# eps = 0 is left out: the threshold 1.0 sits exactly where exact copies of unit rows land
# (x . x = 1 up to the last bit), so any two summation orders may disagree there.
EPS = (1e-4, 0.001, 0.01, 0.05, 0.1, 0.3, 0.9)


def _unit(n: int, d: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype)


def _near_duplicates(n: int, d: int, seed: int) -> torch.Tensor:
    """Groups of near-duplicates (a base row plus noise of several sizes) and exact copies,
    shuffled: removed sets that change with eps."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(max(n // 4, 1), d, generator=g)
    pick = torch.randint(0, base.shape[0], (n,), generator=g)
    noise = torch.tensor([0.0, 0.01, 0.05, 0.2, 1.0])[torch.randint(0, 5, (n,), generator=g)]
    x = base[pick] + noise[:, None] * torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(x, dim=1)


def _loop(x: torch.Tensor) -> list[list[float]]:
    """sims[j][i] = x_i . x_j for i < j, each an exactly rounded float64 sum (math.fsum)."""
    rows = x.double().tolist()
    return [[math.fsum(a * b for a, b in zip(rows[i], rows[j])) for i in range(j)] for j in range(len(rows))]


def _check(x: torch.Tensor, best: torch.Tensor, arg: torch.Tensor, tol: float = 2e-6) -> None:
    """best within tol of the float64 maximum; arg < j attains it within tol, and is the
    lowest index among the earlier items whose similarity equals its own exactly (copies)."""
    n = x.shape[0]
    assert best.dtype == torch.float32 and arg.dtype == torch.int64
    assert best.shape == (n,) and arg.shape == (n,)
    if n == 0:
        return
    assert best[0].item() == float("-inf") and arg[0].item() == -1
    sims = _loop(x)
    for j in range(1, n):
        top = max(sims[j])
        b, a = best[j].item(), arg[j].item()
        assert abs(b - top) <= tol, f"row {j}: best {b} vs {top}"
        assert 0 <= a < j, f"row {j}: arg {a}"
        assert sims[j][a] >= top - tol, f"row {j}: arg {a} has {sims[j][a]}, the max is {top}"
        lowest = min(i for i in range(j) if sims[j][i] == sims[j][a])
        assert a == lowest, f"row {j}: arg {a}, but item {lowest} has the same similarity"


def _check_dense(x: torch.Tensor, best: torch.Tensor) -> None:
    dense = reference.max_earlier_similarity_dense(x.float())
    torch.testing.assert_close(best.clamp_min(0), dense, rtol=0, atol=1e-6)
    for eps in EPS:
        ours = (best > 1 - eps).nonzero().squeeze(1).tolist()
        theirs = (dense > 1 - eps).nonzero().squeeze(1).tolist()
        assert ours == theirs, f"eps={eps}: removed sets differ"


def _copies(n: int, d: int, seed: int) -> torch.Tensor:
    """Every row is one of n // 3 unit vectors, each appearing three times at shuffled
    positions: exact ties across tiles, the earliest copy must win."""
    g = torch.Generator().manual_seed(seed)
    base = _unit(max(n // 3, 1), d, seed)
    return base[torch.randperm(n, generator=g) % base.shape[0]].contiguous()


# ---------------------------------------------------------------------------------
# torch path (the CPU backend)
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("tile", [None, 64, 7])
@pytest.mark.parametrize("n, d", [(300, 70), (129, 35), (2, 5), (17, 1)])
def test_torch_matches_loop_and_dense(n, d, tile):
    x = _near_duplicates(n, d, seed=n + d)
    best, arg = max_earlier_similarity_torch(x, tile=tile)
    _check(x, best, arg)
    _check_dense(x, best)
    b2, a2 = max_earlier_similarity(x)  # auto on the CPU is this path, default tile
    torch.testing.assert_close(b2, best, rtol=0, atol=1e-6)


@pytest.mark.parametrize("tile", [None, 64, 50])
def test_torch_exact_copies_go_to_the_earliest(tile):
    x = _copies(300, 48, seed=3)
    best, arg = max_earlier_similarity_torch(x, tile=tile)
    _check(x, best, arg)
    first = {}
    for j, row in enumerate(x.tolist()):
        key = tuple(row)
        if key in first:
            assert arg[j].item() == first[key], f"row {j}: arg {arg[j].item()}, first copy {first[key]}"
        first.setdefault(key, j)


@pytest.mark.parametrize("n", [1, 2, 3, 100, 257])
def test_torch_all_equal_rows(n):
    x = _unit(1, 33, seed=5).repeat(n, 1)
    best, arg = max_earlier_similarity(x, backend="torch")
    assert arg[1:].tolist() == [0] * (n - 1)
    same = float((x[0].double() @ x[0].double()).item())
    assert all(abs(v - same) < 1e-6 for v in best[1:].tolist())
    assert best[0].item() == float("-inf") and arg[0].item() == -1


def test_torch_n_0_1_2():
    b, a = max_earlier_similarity(torch.empty(0, 8))
    assert b.shape == (0,) and a.shape == (0,) and b.dtype == torch.float32 and a.dtype == torch.int64
    b, a = max_earlier_similarity(_unit(1, 8, seed=1))
    assert b.tolist() == [float("-inf")] and a.tolist() == [-1]
    x = _unit(2, 8, seed=2)
    b, a = max_earlier_similarity(x)
    assert a.tolist() == [-1, 0] and abs(b[1].item() - float(x[0].double() @ x[1].double())) < 1e-6


def test_torch_negative_maxima_stay_negative():
    # a regular simplex, randomly rotated: every pair at cosine -1/(n-1), so every maximum
    # is negative (rotated so that the pairs' rounding differs: no structured exact ties)
    n = 6
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(6), dtype=torch.float64))
    x = torch.nn.functional.normalize((torch.eye(n, dtype=torch.float64) - 1.0 / n) @ q, dim=1).float()
    best, arg = max_earlier_similarity(x)
    _check(x, best, arg)
    assert (best[1:] < -0.19).all()
    _check_dense(x, best)  # the public code clips them at 0
    # random data in a low dimension has some negative maxima too
    y = _unit(40, 2, seed=9)
    yb, ya = max_earlier_similarity_torch(y, tile=16)
    _check(y, yb, ya)
    _check_dense(y, yb)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_16bit_inputs_are_multiplied_exactly(dtype):
    x = _near_duplicates(150, 40, seed=4).to(dtype)
    best, arg = max_earlier_similarity(x, backend="torch")
    _check(x.float(), best, arg, tol=1e-6)  # exact products, fp32 sums: fp32 rounding only
    _check_dense(x.float(), best)


def test_tiles_do_not_change_results():
    x = _unit(333, 64, seed=7)
    ref = max_earlier_similarity_torch(x, tile=333)
    for tile in (3, 16, 100, 256):
        b, a = max_earlier_similarity_torch(x, tile=tile)
        torch.testing.assert_close(b, ref[0], rtol=0, atol=1e-6)
        assert torch.equal(a, ref[1])


@pytest.mark.parametrize("chunk_entries", [2 * 512 * 512, 3 * 512 * 512, 1 << 22])
def test_row_blocks_against_wider_column_tiles(chunk_entries):
    """R = 512 rows against C = 1024 or 1536 columns: the diagonal block sits inside the last
    column tile at an offset, and earlier tiles merge by the strict rule."""
    x = _copies(1300, 12, seed=8)
    best, arg = max_earlier_similarity_torch(x, chunk_entries=chunk_entries)
    _check_dense(x, best)
    ref = max_earlier_similarity_torch(x, tile=100)
    torch.testing.assert_close(best, ref[0], rtol=0, atol=1e-6)
    assert torch.equal(arg, ref[1])
    first = {}
    for j, row in enumerate(x.tolist()):
        if tuple(row) in first:
            assert arg[j].item() == first[tuple(row)]
        first.setdefault(tuple(row), j)


def test_default_tile():
    assert default_tile(100) == (100, 41900) and default_tile(10**6) == (512, 8192)
    assert default_tile(10**6, chunk_entries=1 << 16) == (512, 512)
    assert default_tile(10**6, chunk_entries=3 * 512 * 512 + 7) == (512, 1536)


@pytest.mark.parametrize("where", [0, 4, 9])
def test_non_finite_input_raises(where):
    x = _unit(10, 6, seed=1)
    x[where, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        max_earlier_similarity(x)
    x[where, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        max_earlier_similarity(x)
    with pytest.raises(ValueError, match="row 0"):
        max_earlier_similarity(torch.tensor([[float("nan"), 1.0]]))


def test_bad_inputs_and_backends():
    with pytest.raises(ValueError, match="2-D"):
        max_earlier_similarity(torch.zeros(3))
    with pytest.raises(ValueError, match="float32"):
        max_earlier_similarity(torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ConfigError, match="faiss"):
        max_earlier_similarity(torch.zeros(3, 2), backend="faiss")
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            max_earlier_similarity(torch.zeros(3, 2), backend="triton")


def test_dispatch_rows():
    from mode_fast.kernels import dispatch

    h100 = (9, 0)
    assert dispatch.pick("semdedup", dispatch.EARLIER_MAX, "cpu", dtype=torch.float32) == "torch"
    if importlib.util.find_spec("triton") is not None:
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            got = dispatch.pick("semdedup", dispatch.EARLIER_MAX, "cuda", dtype=dt, cuda_capability=h100)
            assert got == "triton"
        with pytest.raises(ConfigError, match="8.0"):
            dispatch.pick("semdedup", dispatch.EARLIER_MAX, "cuda", "triton", dtype=torch.bfloat16,
                          cuda_capability=(7, 5))  # fmt: skip


@pytest.mark.parametrize("n, bj, bi", [(1, 16, 16), (2, 16, 16), (100, 16, 32), (1000, 128, 64), (777, 64, 128)])
def test_counted_traffic_follows_the_kernels_loops(n, bj, bi):
    """kernel_traffic.semdedup_traffic against the kernel's loops enumerated here: program b
    visits I tiles i0 = 0, bi, ... below its last item, loading bj + bi rows of D each."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks"))
    from kernel_traffic import semdedup_traffic

    d, s = 96, 2
    visits = 0
    for b in range(-(-n // bj)):
        j_end = min((b + 1) * bj, n)
        visits += len(range(0, j_end - 1, bi))
    got = semdedup_traffic(n, d, s, bj, bi)
    assert got["global_load_bytes"] == visits * (bj + bi) * d * s
    assert got["global_store_bytes"] == 12 * n and got["atomic_ops"] == 0
    if n >= 1000:  # about half the n x n tiles: the triangle
        full = -(-n // bj) * -(-n // bi)
        assert 0.45 < visits / full < 0.6


# ---------------------------------------------------------------------------------
# Triton kernel under the interpreter (CPU, small sizes, fp32 and fp16)
# ---------------------------------------------------------------------------------
_INTERP_SCRIPT = textwrap.dedent(
    """
    import importlib, json, torch, triton
    from mode_fast.kernels.semdedup import max_earlier_similarity, launch_configs
    sd = importlib.import_module("mode_fast.kernels.semdedup")
    assert launch_configs(torch.float32) == [dict(BLOCK_J=16, BLOCK_I=16, BLOCK_D=16, num_warps=1, num_stages=1)]
    g = torch.Generator().manual_seed(0)
    def unit(n, d):
        return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    def near(n, d):
        base = torch.randn(max(n // 4, 1), d, generator=g)
        pick = torch.randint(0, base.shape[0], (n,), generator=g)
        noise = torch.tensor([0.0, 0.01, 0.05, 0.2, 1.0])[torch.randint(0, 5, (n,), generator=g)]
        return torch.nn.functional.normalize(base[pick] + noise[:, None] * torch.randn(n, d, generator=g), dim=1)
    out = {}
    def run(name, x, **kw):
        b, a = max_earlier_similarity(x, "triton", **kw)
        out[name] = [x.float().tolist(), b.tolist(), a.tolist()]
    # n and D not multiples of the 16-wide tiles, several J blocks and D slices
    run("odd", near(150, 35))
    run("one", unit(1, 7))
    run("two", unit(2, 7))
    run("n17", near(17, 16))
    base = unit(30, 20)
    run("copies", base[torch.randperm(90, generator=g) % 30].contiguous())
    run("all_equal", unit(1, 24).repeat(40, 1))
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    run("negative", torch.nn.functional.normalize((torch.eye(20, dtype=torch.float64) - 0.05) @ q, dim=1).float())
    run("fp16", near(70, 40).half())  # bf16 tl.dot is wrong in the interpreter: fp16 only
    x = near(60, 18)
    xs = torch.stack([x, x], 2)[:, :, 0]  # strided: the general form
    assert not xs.is_contiguous()
    run("strided", xs)
    run("deterministic", near(50, 32), deterministic=True)
    # the kernel alone with J and I tiles of different widths (the loop bound over I tiles)
    x = near(77, 35)
    shapes = {}
    for bj, bi in ((32, 16), (16, 32), (32, 32)):
        best = torch.full((77,), float("-inf")); arg = torch.full((77,), -1, dtype=torch.int64)
        sd.EARLIER.kernel("general")[(triton.cdiv(77, bj),)](
            x, best, arg, 77, 35, 128, x.stride(0), x.stride(1),
            BLOCK_J=bj, BLOCK_I=bi, BLOCK_D=16, IEEE_FP32=True)
        shapes[f"{bj}x{bi}"] = [best.tolist(), arg.tolist()]
    out["blocks"] = [x.tolist(), shapes]
    # NaN anywhere in x is rejected
    raises = []
    for row in (0, 20, 44):
        x = unit(45, 9); x[row, 3] = float("nan")
        try:
            max_earlier_similarity(x, "triton")
            raises.append(False)
        except ValueError as e:
            raises.append("NaN or inf" in str(e))
    out["nan_raises"] = raises
    # the same bits twice
    x = near(64, 32)
    a, b = max_earlier_similarity(x, "triton"), max_earlier_similarity(x, "triton")
    out["same_bits"] = bool(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]))
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    return run_interpreted(["-c", _INTERP_SCRIPT])


@pytest.mark.parametrize(
    "case", ["odd", "one", "two", "n17", "copies", "all_equal", "negative", "fp16", "strided", "deterministic"]
)
def test_triton_interpreted_matches_loop_and_dense(interpreted, case):
    x, best, arg = (torch.tensor(v) for v in interpreted[case])
    _check(x, best, arg)
    if x.shape[0] > 1:
        _check_dense(x, best)
    # and the torch path gives the same answer
    tb, ta = max_earlier_similarity_torch(x)
    torch.testing.assert_close(best, tb, rtol=0, atol=1e-6)
    if case != "negative":  # the simplex is all near ties (equal but for rounding)
        assert torch.equal(arg, ta)
    if case == "all_equal":
        assert arg[1:].tolist() == [0] * (x.shape[0] - 1)


def test_triton_interpreted_tile_widths(interpreted):
    x, shapes = interpreted["blocks"]
    x = torch.tensor(x)
    assert set(shapes) == {"32x16", "16x32", "32x32"}
    for best, arg in shapes.values():
        _check(x, torch.tensor(best), torch.tensor(arg))


def test_triton_interpreted_rejects_nan(interpreted):
    assert interpreted["nan_raises"] == [True, True, True]


def test_triton_interpreted_same_bits(interpreted):
    assert interpreted["same_bits"]


# ---------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# ---------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _check_close_to(x: torch.Tensor, best: torch.Tensor, arg: torch.Tensor, ref: tuple, tol: float) -> None:
    """best within tol of the torch path's; arg earlier and attaining the max within tol."""
    tb, ta = ref
    torch.testing.assert_close(best, tb, rtol=0, atol=tol)
    j = torch.arange(1, x.shape[0], device=x.device)
    assert bool((arg[1:] < j).all()) and bool((arg[1:] >= 0).all())
    xf = x.float()
    attained = (xf[arg[1:]] * xf[1:]).sum(1)
    assert float((attained - tb[1:]).abs().max()) <= tol


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, d", [(5000, 512), (777, 129), (3, 768), (20_000, 768)])
def test_triton_matches_torch_on_gpu(n, d, dtype):
    x = _near_duplicates(n, d, seed=n).to(dtype).cuda()
    tri = max_earlier_similarity(x, backend="triton")
    ref = max_earlier_similarity(x, backend="torch")
    _check_close_to(x, *tri, ref, tol=1e-5)
    dense = reference.max_earlier_similarity_dense(x.float()) if n <= 5000 else None
    if dense is not None:
        torch.testing.assert_close(tri[0].clamp_min(0), dense, rtol=0, atol=1e-5)
    again = max_earlier_similarity(x, backend="triton")
    assert torch.equal(tri[0], again[0]) and torch.equal(tri[1], again[1])


@pytest.mark.gpu
@cuda
def test_triton_exact_copies_on_gpu():
    x = _copies(3000, 256, seed=11).cuda()
    best, arg = max_earlier_similarity(x, backend="triton")
    first = {}
    for j, row in enumerate(x.cpu().tolist()):
        key = tuple(row)
        if key in first:
            assert arg[j].item() == first[key]
        first.setdefault(key, j)


def _gpu_configs():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return []
    return [(dt, layout, cfg) for dt in (torch.float32, torch.float16, torch.bfloat16)
            for layout in ("aligned", "general") for cfg in sd.launch_configs(dt, layout)]  # fmt: skip


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype, layout, cfg", _gpu_configs(), ids=str)
def test_every_launch_config_on_gpu(dtype, layout, cfg):
    """Each config the autotuner may pick agrees with the torch path, the same bits twice."""
    from mode_fast.kernels import launch

    x = _near_duplicates(600, 256 if layout == "aligned" else 129, seed=22).to(dtype).cuda()
    assert launch.layout(x) == layout
    a = sd._earlier_max_triton(x, config=cfg)
    b = sd._earlier_max_triton(x, config=cfg)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    _check_close_to(x, *a, max_earlier_similarity(x, backend="torch"), tol=1e-5)
