"""k-means assignment benchmarks: mode-fast's backends against faiss and plain torch, same run.

Run (CPU):  .venv/bin/python -m pytest benchmarks/bench_kmeans_assign.py \
                --benchmark-json benchmarks/results/cpu/kmeans_assign.json
then:       .venv/bin/python benchmarks/report.py benchmarks/results/cpu/kmeans_assign.json
On a CUDA machine the `gpu` groups run too (N=10M, K=1024, D=768 bf16; and the fastkmeans
setup N=6.55M, D=128, K=65,536), and the `gpu variants` groups time every Triton launch
config, the autotuned choice and deterministic=True (benchmarks/gpu_kmeans_variants.sh);
write those to benchmarks/results/<gpu>/. The counted memory traffic of each config at
N=10M, K=1024, D=768 is in benchmarks/results/static/kernels.md (kernel_report.py).
Throughput: FLOP/s = 2*N*K*D / median time (the matmul's work), and points/s.
Every row also reports `label_match`: the fraction of its labels equal to mode-fast's exact
labels (1.0 = the same labels; faiss and naive paths may differ on near ties).
Sizes: KMEANS_BENCH_N (default 200k), KMEANS_BENCH_K (1024), KMEANS_BENCH_D (384).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import pytest
import torch
from kernel_traffic import kmeans_assign_traffic  # benchmarks/ (conftest.py puts it on the path)

from mode_fast.kernels import reference
from mode_fast.kernels.kmeans_assign import kmeans_assign

km = importlib.import_module("mode_fast.kernels.kmeans_assign")  # the module, not the function

try:
    import faiss
except ImportError:  # the faiss rows are skipped
    faiss = None

N = int(os.environ.get("KMEANS_BENCH_N", 200_000))
K = int(os.environ.get("KMEANS_BENCH_K", 1024))
D = int(os.environ.get("KMEANS_BENCH_D", 384))
CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def _data(n: int, k: int, d: int, device: str, dtype: torch.dtype, seed: int = 0):
    """Unit-norm random points and centers (MoDE's embeddings are L2-normalised)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, device=device, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(k, d, device=device, generator=g), dim=1)
    return x.to(dtype), c.to(dtype)


def _faiss(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    index = faiss.IndexFlatL2(c.shape[1])
    index.add(c.numpy())
    return torch.from_numpy(index.search(x.numpy(), 1)[1][:, 0])


def _run(benchmark, fn: Callable[[], torch.Tensor], n: int, k: int, d: int, ref: torch.Tensor,
         rounds: int, **info) -> None:  # fmt: skip
    def timed() -> torch.Tensor:
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        return out

    labels = benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        N=n, K=k, D=d,
        gflops=2.0 * n * k * d / median / 1e9,
        mpoints_per_s=n / median / 1e6,
        label_match=float((labels.to(ref.device) == ref).double().mean()),
        threads=torch.get_num_threads(),
        **info,
    )  # fmt: skip


# ---------------------------------------------------------------------------------
# CPU: N x K x D fp32, MoDE's fine level
# ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cpu_case():
    x, c = _data(N, K, D, "cpu", torch.float32)
    ref, _ = kmeans_assign(x, c, backend="torch")
    return x, c, ref


CPU_GROUP = f"cpu assign N={N} K={K} D={D} fp32"


@pytest.mark.benchmark(group=CPU_GROUP)
@pytest.mark.skipif(faiss is None, reason="faiss-cpu is not installed")
def test_cpu_faiss(benchmark, cpu_case):
    x, c, ref = cpu_case
    _run(benchmark, lambda: _faiss(x, c), N, K, D, ref, rounds=5,
         provider=f"faiss-cpu {faiss.__version__} IndexFlatL2", baseline=True)  # fmt: skip


@pytest.mark.benchmark(group=CPU_GROUP)
def test_cpu_mode_fast_torch_exact(benchmark, cpu_case):
    x, c, ref = cpu_case
    _run(benchmark, lambda: kmeans_assign(x, c, backend="torch")[0], N, K, D, ref, rounds=5,
         provider="mode-fast torch (exact labels)")  # fmt: skip


@pytest.mark.benchmark(group=CPU_GROUP)
def test_cpu_mode_fast_torch_no_recheck(benchmark, cpu_case):
    x, c, ref = cpu_case
    _run(benchmark, lambda: kmeans_assign(x, c, backend="torch", exact=False)[0], N, K, D, ref,
         rounds=5, provider="mode-fast torch (exact=False)")  # fmt: skip


@pytest.mark.benchmark(group=CPU_GROUP)
def test_cpu_torch_cdist_naive(benchmark, cpu_case):
    x, c, ref = cpu_case
    _run(benchmark, lambda: reference.kmeans_assign_cdist(x, c)[0], N, K, D, ref, rounds=3,
         provider="torch cdist + argmin (full N x K)")  # fmt: skip


# Same race on one thread each: less sensitive to other load on a shared machine.
CPU1_GROUP = f"cpu assign N={N // 4} K={K} D={D} fp32, 1 thread"


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    if faiss is not None:
        faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(before)
    if faiss is not None:
        faiss.omp_set_num_threads(before)


@pytest.mark.benchmark(group=CPU1_GROUP)
@pytest.mark.skipif(faiss is None, reason="faiss-cpu is not installed")
def test_cpu1_faiss(benchmark, cpu_case, one_thread):
    x, c, ref = cpu_case
    n = N // 4
    _run(benchmark, lambda: _faiss(x[:n], c), n, K, D, ref[:n], rounds=5,
         provider=f"faiss-cpu {faiss.__version__} IndexFlatL2", baseline=True)  # fmt: skip


@pytest.mark.benchmark(group=CPU1_GROUP)
def test_cpu1_mode_fast_torch_exact(benchmark, cpu_case, one_thread):
    x, c, ref = cpu_case
    n = N // 4
    _run(benchmark, lambda: kmeans_assign(x[:n], c, backend="torch")[0], n, K, D, ref[:n],
         rounds=5, provider="mode-fast torch (exact labels)")  # fmt: skip


# Whole fits, for context: 10 Lloyd iterations, random init both, no subsampling.
FIT_N = 65_536
FIT_GROUP = f"cpu kmeans fit N={FIT_N} K={K} D={D} fp32, 10 iterations"


def _fit_info(benchmark, objective: float, **info) -> None:
    benchmark.extra_info.update(N=FIT_N, K=K, D=D, niter=10, final_objective=objective,
                                threads=torch.get_num_threads(), **info)  # fmt: skip


@pytest.mark.benchmark(group=FIT_GROUP)
@pytest.mark.skipif(faiss is None, reason="faiss-cpu is not installed")
def test_fit_faiss(benchmark, cpu_case):
    x = cpu_case[0][:FIT_N].numpy()

    def fit():
        km = faiss.Kmeans(D, K, niter=10, seed=1234)
        km.train(x)
        return km

    km = benchmark.pedantic(fit, rounds=3, iterations=1)
    _fit_info(benchmark, float(km.obj[-1]), provider=f"faiss.Kmeans {faiss.__version__}",
              baseline=True)  # fmt: skip


@pytest.mark.benchmark(group=FIT_GROUP)
def test_fit_mode_fast(benchmark, cpu_case):
    from mode_fast.clustering.kmeans import KMeans

    x = cpu_case[0][:FIT_N]
    km = benchmark.pedantic(lambda: KMeans(K, niter=10, init="random", tol=0).fit(x), rounds=3, iterations=1)
    _fit_info(benchmark, km.stats[-1]["objective"], provider="mode-fast KMeans")


# ---------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# ---------------------------------------------------------------------------------
def _addmm_argmin_full(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The plain torch peer: one addmm writing the whole N x K score matrix, then argmin."""
    c_sq = (c.float() ** 2).sum(1).to(x.dtype)
    return torch.addmm(c_sq, x, c.t(), beta=1.0, alpha=-2.0).argmin(1)


@pytest.fixture(scope="module")
def gpu_big():
    x, c = _data(10_000_000, 1024, 768, "cuda", torch.bfloat16)
    ref, _ = kmeans_assign(x, c, backend="triton")
    return x, c, ref


G1 = "gpu assign N=10M K=1024 D=768 bf16"


@pytest.mark.gpu
@gpu
@pytest.mark.benchmark(group=G1)
def test_gpu_torch_addmm_argmin(benchmark, gpu_big):
    x, c, ref = gpu_big
    _run(benchmark, lambda: _addmm_argmin_full(x, c), *x.shape[:1], c.shape[0], x.shape[1], ref,
         rounds=5, provider="torch addmm + argmin (bf16, full N x K)", baseline=True,
         device=torch.cuda.get_device_name(0))  # fmt: skip


@pytest.mark.gpu
@gpu
@pytest.mark.benchmark(group=G1)
def test_gpu_mode_fast_triton(benchmark, gpu_big):
    x, c, ref = gpu_big
    _run(benchmark, lambda: kmeans_assign(x, c, backend="triton")[0], x.shape[0], c.shape[0],
         x.shape[1], ref, rounds=5, provider="mode-fast triton (exact labels)",
         device=torch.cuda.get_device_name(0))  # fmt: skip


@pytest.mark.gpu
@gpu
@pytest.mark.benchmark(group=G1)
def test_gpu_mode_fast_torch(benchmark, gpu_big):
    x, c, ref = gpu_big
    _run(benchmark, lambda: kmeans_assign(x, c, backend="torch")[0], x.shape[0], c.shape[0],
         x.shape[1], ref, rounds=3, provider="mode-fast torch (chunked, exact)",
         device=torch.cuda.get_device_name(0))  # fmt: skip


@pytest.fixture(scope="module")
def gpu_fastkmeans_setup():
    # fastkmeans' published setup: 6.55M points, D=128, K=65,536 (8.5 s vs faiss 49 s on
    # an RTX 4090, their figures, full k-means). Here: one assignment pass, fp16.
    x, c = _data(6_550_000, 65_536, 128, "cuda", torch.float16)
    ref, _ = kmeans_assign(x, c, backend="torch")
    return x, c, ref


G2 = "gpu assign N=6.55M K=65536 D=128 fp16"


@pytest.mark.gpu
@gpu
@pytest.mark.benchmark(group=G2)
def test_gpu_big_k_torch_chunked(benchmark, gpu_fastkmeans_setup):
    x, c, ref = gpu_fastkmeans_setup
    _run(benchmark, lambda: kmeans_assign(x, c, backend="torch")[0], x.shape[0], c.shape[0],
         x.shape[1], ref, rounds=3, provider="mode-fast torch (chunked, exact)", baseline=True,
         device=torch.cuda.get_device_name(0))  # fmt: skip


@pytest.mark.gpu
@gpu
@pytest.mark.benchmark(group=G2)
def test_gpu_big_k_triton(benchmark, gpu_fastkmeans_setup):
    x, c, ref = gpu_fastkmeans_setup
    _run(benchmark, lambda: kmeans_assign(x, c, backend="triton")[0], x.shape[0], c.shape[0],
         x.shape[1], ref, rounds=3, provider="mode-fast triton (exact labels)",
         device=torch.cuda.get_device_name(0))  # fmt: skip


# ---------------------------------------------------------------------------------
# GPU: every Triton launch config, the autotuned pick and deterministic=True
# ---------------------------------------------------------------------------------
VAR_N = int(os.environ.get("KMEANS_VARIANTS_N", 2_000_000))


def _variants() -> list[tuple]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return []
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        for cfg in km.launch_configs(dtype, "aligned"):
            out.append((dtype, "aligned", cfg))
        out.append((dtype, "aligned", "autotune"))
        out.append((dtype, "aligned", "deterministic"))
        for cfg in km.launch_configs(dtype, "general"):
            out.append((dtype, "general", cfg))
    return out


@pytest.fixture(scope="module")
def gpu_variant_data():
    cache = {}

    def get(dtype, layout):
        if (dtype, layout) not in cache:
            x, c = _data(VAR_N, 1024, 768, "cuda", dtype)
            if layout == "general":  # a strided view: the unspecialised kernel
                x = torch.stack([x, x], 2)[:, :, 0]
            ref, _ = kmeans_assign(x, c, backend="torch")
            cache[(dtype, layout)] = (x, c, ref)
        return cache[(dtype, layout)]

    return get


def _variant_id(v) -> str:
    dtype, layout, cfg = v
    name = cfg if isinstance(cfg, str) else "{BLOCK_N}x{BLOCK_K}x{BLOCK_D}_w{num_warps}_s{num_stages}".format(**cfg)
    return f"{str(dtype).split('.')[-1]}-{layout}-{name}"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("variant", _variants(), ids=_variant_id)
def test_gpu_variant(benchmark, gpu_variant_data, variant):
    dtype, layout, cfg = variant
    x, c, ref = gpu_variant_data(dtype, layout)
    benchmark.group = f"gpu variants assign N={VAR_N} K=1024 D=768 {str(dtype).split('.')[-1]} {layout}"
    if cfg == "autotune":
        kmeans_assign(x, c, backend="triton")  # tune outside the timed rounds
        fn = lambda: kmeans_assign(x, c, backend="triton")[0]
    elif cfg == "deterministic":
        fn = lambda: kmeans_assign(x, c, backend="triton", deterministic=True)[0]
    else:
        fn = lambda: km._assign_triton(x, c, exact=True, config=cfg)[0]
    traffic = {}
    if isinstance(cfg, dict):  # the counted traffic of this config, next to its time
        traffic = kmeans_assign_traffic(VAR_N, 1024, 768, x.element_size(), cfg["BLOCK_N"], cfg["BLOCK_K"])
    _run(benchmark, fn, VAR_N, 1024, 768, ref, rounds=5, provider=f"mode-fast triton {_variant_id(variant)}",
         device=torch.cuda.get_device_name(0), baseline=cfg == "deterministic",
         **{f"counted_{k}": v for k, v in traffic.items()})  # fmt: skip
