"""The Triton kernels compile for real GPUs (Hopper sm_90a, Ampere sm_80), here on the CPU,
and the k-means, contrastive-loss and SemDeDup kernels do so without register spills in every config
the wrappers can launch.

The interpreter runs a kernel through numpy and forgives what the compiler refuses
(shapes tl.dot cannot take, shared memory over the limit, types that do not lower), so
without a GPU this is the check that the kernels the wrappers launch are real kernels.
benchmarks/kernel_report.py lowers each launch config through Triton's own pipeline with
the argument specialisation of a real launch and assembles it with the ptxas shipped in
the triton wheel (-v: registers, spills); this test builds that report (into
$KERNEL_REPORT_DIR when set, for CI to keep, else a temporary folder) and checks it: 0
spill bytes for every k-means, contrastive-loss and SemDeDup config, on both targets.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):  # pragma: no cover
    pytest.skip("kernels are interpreter functions in this process", allow_module_level=True)

import torch

from mode_fast.kernels import launch

km = importlib.import_module("mode_fast.kernels.kmeans_assign")  # the package re-exports the function by that name
cl = importlib.import_module("mode_fast.kernels.contrastive_loss")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_report.py"
_spec = importlib.util.spec_from_file_location("kernel_report", _PATH)
report = importlib.util.module_from_spec(_spec)
sys.modules["kernel_report"] = report  # the compile workers find their function by module name
_spec.loader.exec_module(report)


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[dict]:
    out = Path(os.environ.get("KERNEL_REPORT_DIR") or tmp_path_factory.mktemp("static"))
    built = report.build(report.all_launches(), jobs=min(2, os.cpu_count() or 1))
    report.write(out, built, report.traffic_rows())
    assert (out / "kernels.md").read_text().count("\n| ") == len(built) + 1 + len(report.traffic_rows()) + 1
    return built


def _name(r: dict) -> str:
    return f"{r['kernel']} {r['variant']} {r['target']}"


def test_every_launch_compiles_for_both_targets_within_shared_memory(rows):
    launches = report.all_launches()
    assert len(rows) == len(launches) * len(report.TARGETS)
    for r in rows:
        assert r["sass_instructions"] > 0, f"{_name(r)}: no machine code"
        assert r["shared_bytes"] <= r["smem_limit_bytes"], f"{_name(r)}: {r['shared_bytes']} B shared"


def test_kmeans_assign_never_spills(rows):
    mine = [r for r in rows if r["kernel"] == "kmeans_assign"]
    assert mine and all(r["spill_free_required"] for r in mine)
    spilling = [f"{_name(r)}: {r['spill_store_bytes']}/{r['spill_load_bytes']} B"
                for r in mine if r["spill_store_bytes"] or r["spill_load_bytes"]]  # fmt: skip
    assert not spilling, "register spills:\n" + "\n".join(spilling)
    # no atomics; 16-bit inputs run on tensor cores (wgmma on Hopper, mma.sync on Ampere)
    assert all(r["ptx_global_atomics"] == 0 and r["sass_global_atomics"] == 0 for r in mine)
    for r in mine:
        if r["dtype"] != "fp32":
            tc = r["sass_hgmma"] if r["target"] == "sm_90a" else r["sass_hmma"]
            assert tc > 0, f"{_name(r)}: no tensor-core instruction"


def test_report_covers_every_kmeans_config_the_wrapper_can_launch():
    covered = {(ln.extra["dtype"], ln.extra["layout"], ln.variant.split(" ", 2)[-1])
               for ln in report.kmeans_launches()}  # fmt: skip
    for dtype, tname in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        for layout in ("aligned", "general"):
            for c in km.launch_configs(dtype, layout):
                desc = f"{c['BLOCK_N']}x{c['BLOCK_K']}x{c['BLOCK_D']} w{c['num_warps']} s{c['num_stages']}"
                assert (tname, layout, desc) in covered


LAYOUTS = {
    "contiguous": lambda dt: torch.empty(9, 768, dtype=dt),
    "padded_rows": lambda dt: torch.empty(9, 784, dtype=dt)[:, :768],
    "odd_d": lambda dt: torch.empty(9, 129, dtype=dt),
    "row_stride_not_16": lambda dt: torch.empty(9, 776, dtype=dt)[:, :768],
    "every_other_column": lambda dt: torch.empty(9, 1536, dtype=dt)[:, ::2],
    "column_major": lambda dt: torch.empty(768, 9, dtype=dt).t(),
    "misaligned_base": lambda dt: torch.empty(9 * 768 + 1, dtype=dt)[1:].view(9, 768),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_launch_compiles_to_the_variant_the_report_measured(layout, dtype):
    """Whatever the inputs' sizes and layout, the wrapper's launch specialises to the very
    signature the report compiled for its family (so the report covers every launch)."""
    x = LAYOUTS[layout](dtype)
    c = torch.empty(1000, x.shape[1], dtype=dtype)  # K not a multiple of 16 on purpose
    family = launch.layout(x, c)
    assert family == ("aligned" if layout in ("contiguous", "padded_rows") else "general")
    f32, i64 = torch.empty(77), torch.empty(77, dtype=torch.int64)
    n, d = 12_345, x.shape[1]
    real = dict(X_ptr=x, C_ptr=c, CSQ_ptr=f32, BEST_ptr=f32, SECOND_ptr=f32, THIRD_ptr=f32,
                ARG_ptr=i64, ARG2_ptr=i64, SQDIST_ptr=f32, XSQ_ptr=f32, N=n, K=1000, D=d,
                N_TUNE=1 << (n - 1).bit_length(), X_stride_n=x.stride(0), X_stride_d=x.stride(1),
                C_stride_k=c.stride(0), C_stride_d=c.stride(1))  # fmt: skip
    measured = [ln for ln in report.kmeans_launches() if ln.extra["layout"] == family
                and ln.extra["dtype"] == {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]]  # fmt: skip
    assert measured and all(ln.fn is km.ASSIGN.kernel(family) for ln in measured)
    launched = report._specialise(report.Launch("k", "v", km.ASSIGN.kernel(family), real, measured[0].constexprs))
    assert launched == report._specialise(measured[0])


def test_contrastive_kernels_never_spill(rows):
    mine = [r for r in rows if r["kernel"].startswith("contrastive_")]
    assert mine and all(r["spill_free_required"] for r in mine)
    assert {r["target"] for r in mine} == set(report.TARGETS)
    spilling = [f"{_name(r)}: {r['spill_store_bytes']}/{r['spill_load_bytes']} B"
                for r in mine if r["spill_store_bytes"] or r["spill_load_bytes"]]  # fmt: skip
    assert not spilling, "register spills:\n" + "\n".join(spilling)
    for r in mine:
        # atomics only where the mode has them: CLIP's column sums, the atomic backward's dK
        atomic = r["mode"] in ("clip+cols", "softmax atomic", "siglip atomic")
        assert (r["ptx_global_atomics"] > 0) == atomic, f"{_name(r)}: {r['ptx_global_atomics']} atomics"
        if r["dtype"] in ("bf16", "fp16") and r["layout"] == "aligned":
            tc = r["sass_hgmma"] + r["sass_hmma"]
            assert tc > 0, f"{_name(r)}: no tensor-core instruction"


def test_report_covers_every_contrastive_config_the_wrappers_can_launch():
    covered = {(ln.kernel, ln.extra["mode"], ln.extra["dtype"], ln.extra["layout"],
                " ".join(ln.variant.split(" ")[-3:])) for ln in report.contrastive_launches()}  # fmt: skip
    for kind, mode, _ in report.CONTRASTIVE_MODES:
        for dtype, strict, label in report.CONTRASTIVE_DTYPES:
            for layout in ("aligned", "general"):
                for c in cl.launch_configs(kind, dtype, layout, strict):
                    desc = f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} w{c['num_warps']} s{c['num_stages']}"
                    assert (f"contrastive_{kind}", mode, label, layout, desc) in covered


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_contrastive_launch_compiles_to_the_variant_the_report_measured(layout):
    """Whatever the batch sizes, flags and layout, a wrapper's launch specialises to the
    very signature the report compiled for its form (the sizes and term flags are never
    specialised)."""
    dtype = torch.bfloat16
    x = LAYOUTS[layout](dtype)
    k = torch.empty(1000, x.shape[1], dtype=dtype)
    f32 = torch.empty(77)
    form = launch.layout(x, k, f32)
    assert form == ("aligned" if layout in ("contiguous", "padded_rows") else "general")
    m, n, d = 12_345, 1000, x.shape[1]
    st = dict(Q_stride_m=x.stride(0), Q_stride_d=x.stride(1), K_stride_n=k.stride(0), K_stride_d=k.stride(1))
    for kind, merge_or_terms in (("fwd", dict(merge=1)), ("bwd", dict(row_term=0, col_term=1))):
        ptrs = (dict(Q_ptr=x, K_ptr=k, ROW_ptr=f32, COL_SUM_ptr=f32, COL_SHIFT_ptr=f32) if kind == "fwd" else
                dict(Q_ptr=x, K_ptr=k, LSE_ROW_ptr=f32, LSE_COL_ptr=f32, DQ_ptr=f32, DK_ptr=f32, DS_ptr=f32,
                     DB_ptr=f32, g=0.5))  # fmt: skip
        real = dict(M=m, N=n, D=d, scale=1.0, bias=0.0, **st, **ptrs, **merge_or_terms)
        measured = [
            ln
            for ln in report.contrastive_launches()
            if ln.kernel == f"contrastive_{kind}" and ln.extra["layout"] == form and ln.extra["dtype"] == "bf16"
        ]
        kernel = cl.LAUNCHERS[kind].kernel(form)
        assert measured and all(ln.fn is kernel for ln in measured)
        launched = report._specialise(report.Launch("k", "v", kernel, real, measured[0].constexprs))
        assert launched == report._specialise(measured[0])


sd = importlib.import_module("mode_fast.kernels.semdedup")


def test_semdedup_never_spills(rows):
    mine = [r for r in rows if r["kernel"] == "semdedup"]
    assert mine and all(r["spill_free_required"] for r in mine)
    assert {r["target"] for r in mine} == set(report.TARGETS)
    spilling = [f"{_name(r)}: {r['spill_store_bytes']}/{r['spill_load_bytes']} B"
                for r in mine if r["spill_store_bytes"] or r["spill_load_bytes"]]  # fmt: skip
    assert not spilling, "register spills:\n" + "\n".join(spilling)
    # no atomics (each program writes only its own items); 16-bit inputs on tensor cores
    assert all(r["ptx_global_atomics"] == 0 and r["sass_global_atomics"] == 0 for r in mine)
    for r in mine:
        if r["dtype"] != "fp32" and r["layout"] == "aligned":
            tc = r["sass_hgmma"] if r["target"] == "sm_90a" else r["sass_hmma"]
            assert tc > 0, f"{_name(r)}: no tensor-core instruction"


def test_report_covers_every_semdedup_config_the_wrapper_can_launch():
    covered = {(ln.extra["dtype"], ln.extra["layout"], ln.variant.split(" ", 2)[-1])
               for ln in report.semdedup_launches()}  # fmt: skip
    for dtype, tname in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        for layout in ("aligned", "general"):
            for c in sd.launch_configs(dtype, layout):
                desc = f"{c['BLOCK_J']}x{c['BLOCK_I']}x{c['BLOCK_D']} w{c['num_warps']} s{c['num_stages']}"
                assert (tname, layout, desc) in covered


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_semdedup_launch_compiles_to_the_variant_the_report_measured(layout, dtype):
    """Whatever the cluster size and layout, the wrapper's launch specialises to the very
    signature the report compiled for its form."""
    x = LAYOUTS[layout](dtype)
    best, arg = torch.empty(77), torch.empty(77, dtype=torch.int64)
    family = launch.layout(x, best, arg)
    assert family == ("aligned" if layout in ("contiguous", "padded_rows") else "general")
    n = 12_345
    real = dict(X_ptr=x, BEST_ptr=best, ARG_ptr=arg, N=n, D=x.shape[1], N_TUNE=1 << (n - 1).bit_length(),
                X_stride_n=x.stride(0), X_stride_d=x.stride(1))  # fmt: skip
    label = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    measured = [ln for ln in report.semdedup_launches() if ln.extra["layout"] == family and ln.extra["dtype"] == label]
    assert measured and all(ln.fn is sd.EARLIER.kernel(family) for ln in measured)
    launched = report._specialise(report.Launch("k", "v", sd.EARLIER.kernel(family), real, measured[0].constexprs))
    assert launched == report._specialise(measured[0])
