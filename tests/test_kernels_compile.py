"""The Triton kernels compile for real GPUs (Hopper sm_90, Ampere sm_80), here on the CPU.

The interpreter runs a kernel through numpy and forgives what the compiler refuses
(shapes tl.dot cannot take, shared memory over the limit, types that do not lower), so
without a GPU this is the check that the kernels the wrappers launch are real kernels:
each is lowered through Triton's own pipeline to PTX and assembled by the ptxas shipped
in the triton wheel, with the tile sizes, dtypes and flags the host wrappers use.
"""
from __future__ import annotations

import importlib
import os

import pytest

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":  # pragma: no cover
    pytest.skip("kernels are interpreter functions in this process", allow_module_level=True)

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mode_fast.kernels import contrastive_loss as cl  # noqa: E402

km = importlib.import_module("mode_fast.kernels.kmeans_assign")  # the package re-exports the function by that name

HOPPER, AMPERE = GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)
TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# shared memory per block (opt-in maximum): H100/H200 228 KB - 1 KB, A100 164 KB - 1 KB
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


def _compile(fn, types: dict[str, str], constants: dict, target: GPUTarget, **options):
    """Compile `fn` with argument types by name ('*fp32', 'i32', 'fp32'); constexprs by name."""
    sig = {name: ("constexpr" if name in constants else types[name]) for name in fn.arg_names}
    constexprs = {(fn.arg_names.index(k),): v for k, v in constants.items()}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=target,
                            options=options)
    assert kernel.asm["cubin"], "no machine code"
    assert kernel.metadata.shared <= SMEM_LIMIT[target.arch], f"{kernel.metadata.shared} B of shared memory"
    return kernel


def _contrastive_types(dtype: torch.dtype) -> dict[str, str]:
    t = TRITON_DTYPE[dtype]
    types = {name: "*fp32" for name in cl._contrastive_bwd_kernel.arg_names if name.endswith("_ptr")}
    types |= {"I_ptr": f"*{t}", "T_ptr": f"*{t}", "ROW_ptr": "*fp32", "COL_SUM_ptr": "*fp32",
              "COL_SHIFT_ptr": "*fp32", "B": "i32", "D": "i32", "scale": "fp32", "bias": "fp32", "g": "fp32"}
    types |= {n: "i32" for n in ("I_stride_b", "I_stride_d", "T_stride_b", "T_stride_d")}
    return types


@pytest.mark.parametrize("siglip", [False, True], ids=["clip", "siglip"])
@pytest.mark.parametrize("dtype,strict", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False),
                                          (torch.float16, False)], ids=["fp32-tf32", "fp32-strict", "bf16", "fp16"])
def test_contrastive_kernels_compile_for_hopper(dtype, strict, siglip):
    x = torch.empty(1, 1, dtype=dtype)
    meta = cl._launch_meta(x, strict)
    for fn in (cl._contrastive_fwd_kernel, cl._contrastive_bwd_kernel):
        _compile(fn, _contrastive_types(dtype), meta | {"SIGLIP": siglip}, HOPPER)


def test_contrastive_kernels_compile_for_ampere():
    meta = cl._launch_meta(torch.empty(1, 1, dtype=torch.bfloat16), False)
    for fn in (cl._contrastive_fwd_kernel, cl._contrastive_bwd_kernel):
        _compile(fn, _contrastive_types(torch.bfloat16), meta | {"SIGLIP": False}, AMPERE)


def _kmeans_types(dtype: torch.dtype) -> dict[str, str]:
    t = TRITON_DTYPE[dtype]
    types = {"X_ptr": f"*{t}", "C_ptr": f"*{t}", "ARG_ptr": "*i64", "ARG2_ptr": "*i64"}
    types |= {n: "*fp32" for n in ("CSQ_ptr", "BEST_ptr", "SECOND_ptr", "THIRD_ptr", "SQDIST_ptr", "XSQ_ptr")}
    types |= {n: "i32" for n in ("N", "K", "D", "X_stride_n", "X_stride_d", "C_stride_k", "C_stride_d")}
    return types


@pytest.mark.parametrize("target", [HOPPER, AMPERE], ids=["sm90", "sm80"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_kmeans_assign_kernel_compiles(dtype, target):
    cfg = dict(km._triton_config(dtype))
    options = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    fn = km._kmeans_assign_kernel
    missing = set(fn.arg_names) - set(_kmeans_types(dtype)) - set(cfg) - {"IEEE_FP32"}
    assert not missing, f"kernel arguments this test does not type: {missing}"
    _compile(fn, _kmeans_types(dtype), cfg | {"IEEE_FP32": dtype == torch.float32}, target, **options)
