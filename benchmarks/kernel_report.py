"""Static report of every Triton kernel config the wrappers can launch, judged without a GPU.

Each launch is compiled through Triton's own pipeline for Hopper (sm_90a) and Ampere
(sm_80) with the arguments specialised exactly as a real launch specialises them
(Triton's own rule: ints equal to 1 become constants, ints and pointers divisible by 16
get a divisibility hint), then the PTX is assembled by the ptxas shipped in the triton
wheel with -v. Per kernel config and target it records registers, spill bytes (stores /
loads), stack, shared memory (Triton's dynamic allocation), and static counts of
tensor-core instructions (mma / wgmma in the PTX; HMMA / HGMMA in the SASS) and of global
atomics (atom / red in the PTX; ATOM / RED in the SASS). Static counts are instructions
in the code, not executions. A second section prints the counted global-memory traffic
of each kernel at the headline shapes next to the compulsory traffic (kernel_traffic.py).

Adding a kernel: write a function returning its Launch list (one per config a wrapper
can launch) and append it to REGISTRY.

Usage: python benchmarks/kernel_report.py [--out benchmarks/results/static] [--only NAME]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks"):  # also when loaded by file path (the compile test)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from kernel_traffic import contrastive_traffic, kmeans_assign_traffic, semdedup_traffic

from mode_fast.core.files import write_json, write_text

# shared memory per block (opt-in maximum): H100/H200 228 KB - 1 KB, A100 164 KB - 1 KB
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
TARGETS = {"sm_90a": 90, "sm_80": 80}


@dataclass
class Launch:
    """One kernel config a wrapper can launch.

    args: the kernel's runtime arguments by name, as the wrapper passes them (CPU tensors
    stand in for device tensors: only their dtype and alignment matter; ints at the
    headline sizes, since divisibility by 16 and the value 1 are specialised on).
    constexprs: the compile-time arguments by name. spill_free: the owner asserts 0 spill
    bytes for this launch (tests/test_kernels_compile.py); otherwise spills are reported
    as open.
    """

    kernel: str
    variant: str
    fn: Any
    args: dict[str, Any]
    constexprs: dict[str, Any]
    num_warps: int = 4  # Triton's defaults on CUDA
    num_stages: int = 3
    spill_free: bool = False
    owner: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------
# Registered kernels
# ---------------------------------------------------------------------------------
_TDTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _aligned_tensor(dtype: torch.dtype) -> torch.Tensor:
    t = torch.empty(64, dtype=dtype)
    assert t.data_ptr() % 16 == 0
    return t


def kmeans_launches() -> list[Launch]:
    """k-means assign: every (dtype, layout, config) of kmeans_assign.launch_configs."""
    km = importlib.import_module("mode_fast.kernels.kmeans_assign")
    n, k = 10_000_001, 1024  # N not a multiple of 16: the usual shard
    # Each layout family is one compiled form (see kmeans_assign.py): the aligned one is
    # specialised on D, strides and pointers (headline D = 768); the general one on nothing.
    layouts = {
        "aligned": (km.ASSIGN.kernel("aligned"), 768, (768, 1), (768, 1)),
        "general": (km.ASSIGN.kernel("general"), 129, (258, 2), (1, 1024)),
    }
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for layout, (fn, d, xs, cs) in layouts.items():
            for cfg in km.launch_configs(dtype, layout):
                f32, i64 = _aligned_tensor(torch.float32), _aligned_tensor(torch.int64)
                x = _aligned_tensor(dtype)
                args = dict(
                    X_ptr=x, C_ptr=x, CSQ_ptr=f32, BEST_ptr=f32, SECOND_ptr=f32, THIRD_ptr=f32,
                    ARG_ptr=i64, ARG2_ptr=i64, SQDIST_ptr=f32, XSQ_ptr=f32,
                    N=n, K=k, D=d, N_TUNE=1 << (n - 1).bit_length(),
                    X_stride_n=xs[0], X_stride_d=xs[1], C_stride_k=cs[0], C_stride_d=cs[1],
                )  # fmt: skip
                tiles = "x".join(str(cfg[b]) for b in ("BLOCK_N", "BLOCK_K", "BLOCK_D"))
                out.append(Launch(
                    kernel="kmeans_assign",
                    variant=f"{_TDTYPE[dtype]} {layout} {tiles} w{cfg['num_warps']} s{cfg['num_stages']}",
                    fn=fn, args=args,
                    constexprs={"BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"],
                                "BLOCK_D": cfg["BLOCK_D"], "IEEE_FP32": dtype == torch.float32},
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                    spill_free=True, owner="kmeans_assign.py",
                    extra={"dtype": _TDTYPE[dtype], "layout": layout},
                ))  # fmt: skip
    return out


def semdedup_launches() -> list[Launch]:
    """SemDeDup's earlier max: every (dtype, layout, config) of semdedup.launch_configs, at a
    cluster of n = 100,001 items, D = 768 (the general form at D = 129, unspecialised)."""
    sd = importlib.import_module("mode_fast.kernels.semdedup")
    n = 100_001  # not a multiple of 16: the usual cluster
    layouts = {"aligned": (768, (768, 1)), "general": (129, (258, 2))}
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for layout, (d, xs) in layouts.items():
            for cfg in sd.launch_configs(dtype, layout):
                x = _aligned_tensor(dtype)
                args = dict(X_ptr=x, BEST_ptr=_aligned_tensor(torch.float32), ARG_ptr=_aligned_tensor(torch.int64),
                            N=n, D=d, N_TUNE=1 << (n - 1).bit_length(), X_stride_n=xs[0], X_stride_d=xs[1])  # fmt: skip
                tiles = "x".join(str(cfg[b]) for b in ("BLOCK_J", "BLOCK_I", "BLOCK_D"))
                out.append(Launch(
                    kernel="semdedup",
                    variant=f"{_TDTYPE[dtype]} {layout} {tiles} w{cfg['num_warps']} s{cfg['num_stages']}",
                    fn=sd.EARLIER.kernel(layout), args=args,
                    constexprs={"BLOCK_J": cfg["BLOCK_J"], "BLOCK_I": cfg["BLOCK_I"],
                                "BLOCK_D": cfg["BLOCK_D"], "IEEE_FP32": dtype == torch.float32},
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                    spill_free=True, owner="semdedup.py",
                    extra={"dtype": _TDTYPE[dtype], "layout": layout},
                ))  # fmt: skip
    return out


# contrastive modes: (kernel, mode, constexprs). The flags that only select terms (merge,
# row_term, col_term) are runtime ints that are never specialised, so each mode below is
# one compiled variant however the wrapper sets them.
CONTRASTIVE_MODES = [
    ("fwd", "clip+cols", {"SIGLIP": False, "COLS": True}),  # square CLIP, atomic column sums
    ("fwd", "rows", {"SIGLIP": False, "COLS": False}),  # InfoNCE rows, ring steps, deterministic CLIP
    ("fwd", "siglip", {"SIGLIP": True, "COLS": False}),  # SigLIP, positives or negatives only
    ("bwd", "softmax atomic", {"SIGLIP": False, "DK_ATOMIC": True}),
    ("bwd", "softmax columns", {"SIGLIP": False, "DK_ATOMIC": False}),
    ("bwd", "siglip atomic", {"SIGLIP": True, "DK_ATOMIC": True}),
    ("bwd", "siglip columns", {"SIGLIP": True, "DK_ATOMIC": False}),
]
CONTRASTIVE_DTYPES = [
    (torch.float32, False, "fp32-tf32"),
    (torch.float32, True, "fp32-strict"),
    (torch.bfloat16, False, "bf16"),
    (torch.float16, False, "fp16"),
]


def contrastive_launches() -> list[Launch]:
    """contrastive loss: every (mode, dtype + strict flag, layout, config) of
    contrastive_loss.launch_configs, at B = 32k, D = 768 (the general form at D = 129)."""
    cl = importlib.import_module("mode_fast.kernels.contrastive_loss")
    b = 32768
    layouts = {"aligned": (768, (768, 1)), "general": (129, (258, 2))}
    out = []
    for dtype, strict, label in CONTRASTIVE_DTYPES:
        precision = cl._precision(torch.empty(1, 1, dtype=dtype), strict)
        for kind, mode, consts in CONTRASTIVE_MODES:
            for layout, (d, st) in layouts.items():
                for cfg in cl.launch_configs(kind, dtype, layout, strict):
                    x, f32 = _aligned_tensor(dtype), _aligned_tensor(torch.float32)
                    common = dict(M=b, N=b, D=d, Q_stride_m=st[0], Q_stride_d=st[1], K_stride_n=st[0],
                                  K_stride_d=st[1], scale=14.3, bias=-10.0)  # fmt: skip
                    if kind == "fwd":
                        args = dict(Q_ptr=x, K_ptr=x, ROW_ptr=f32, COL_SUM_ptr=f32, COL_SHIFT_ptr=f32,
                                    merge=0, **common)  # fmt: skip
                    else:
                        args = dict(Q_ptr=x, K_ptr=x, LSE_ROW_ptr=f32, LSE_COL_ptr=f32, DQ_ptr=f32,
                                    DK_ptr=f32, DS_ptr=f32, DB_ptr=f32, g=1e-5, row_term=1, col_term=1,
                                    **common)  # fmt: skip
                    tiles = "x".join(str(cfg[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                    out.append(Launch(
                        kernel=f"contrastive_{kind}",
                        variant=f"{mode} {label} {layout} {tiles} w{cfg['num_warps']} s{cfg['num_stages']}",
                        fn=cl.LAUNCHERS[kind].kernel(layout), args=args,
                        constexprs={**consts, "PRECISION": precision,
                                    **{k: v for k, v in cfg.items() if k.startswith("BLOCK")}},
                        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], spill_free=True,
                        owner="contrastive_loss.py",
                        extra={"dtype": label, "layout": layout, "mode": mode},
                    ))  # fmt: skip
    return out


# Observations that the figures alone do not say (kept short; update with the kernels).
NOTES = [
    "k-means assign compiles to two forms: `aligned` (what contiguous inputs with D % 16 == 0 "
    "launch; specialised on D, strides and pointers) and `general` (any other layout, "
    "nothing specialised). Compiling with every int and pointer unspecialised, as an earlier "
    "check did, measures the general form's code at the aligned form's tiles: that is where "
    "the 255-register, 500-800 B spill figures for 128x128 tiles came from.",
    "contrastive kernels: one compiled variant per mode (the term flags merge / row_term / "
    "col_term are unspecialised runtime ints). The earlier sm_80 fp16/bf16 backward (32-56 "
    "registers, KBs of spills) multiplied the fp32 dL tile by fp32-upcast K / Q blocks with "
    "IEEE precision: an FMA dot, no tensor cores. Why ptxas gave that form so few registers "
    "was not pinned down; the backward now casts dL to the inputs' dtype for those two "
    "products (tensor cores, fp32 accumulation, as the forward), and every 16-bit config "
    "compiles without spills. Strict fp32 (IEEE FMA dots) has its own, smaller tiles. "
    "The low register counts come from ptxas's own budget under the `.reqntid` directive "
    "Triton writes: the strict backward at 64x128x32, 8 warps, sm_80 gets 64 registers and "
    "3,024 B of spill stores as emitted (also with --maxrregcount=255), 255 registers and "
    "540 B with `.reqntid` removed, 128 and 1,272 B with `.maxntid` instead; not a maxnreg "
    "(Triton emits none). Configs that meet it are left out of the lists.",
]

# New kernels (rectangular / ring / SigLIP-block ...): append their launch functions here.
REGISTRY: list[Callable[[], list[Launch]]] = [kmeans_launches, contrastive_launches, semdedup_launches]


# ---------------------------------------------------------------------------------
# Compile and measure
# ---------------------------------------------------------------------------------
def _specialise(launch: Launch) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) exactly as Triton's launcher would derive them."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    sig, consts, attrs = {}, {}, {}
    names = [p.name for p in launch.fn.params]
    missing = set(names) - set(launch.args) - set(launch.constexprs)
    if missing:
        raise KeyError(f"{launch.kernel}: no example value for {sorted(missing)}")
    for i, p in enumerate(launch.fn.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            consts[(i,)] = launch.constexprs[p.name]
            continue
        ty, attr = native_specialize_impl(CUDABackend, launch.args[p.name], p.is_const,
                                          not p.do_not_specialize,
                                          not p.do_not_specialize_on_alignment)  # fmt: skip
        sig[p.name] = ty
        if ty == "constexpr":
            consts[(i,)] = attr
        elif isinstance(attr, str):
            attrs[(i,)] = CUDABackend.parse_attr(attr)
    return sig, consts, attrs


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def ptxas_path() -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(90).path


def _ptxas_v(ptx: str, arch: int) -> tuple[str, bytes]:
    """Assemble with the flags Triton uses (make_cubin) plus -v: (log, cubin)."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src, obj = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        src.write_text(ptx)
        proc = subprocess.run([ptxas_path(), "-lineinfo", "-v", "--regAllocOptLevel=2",
                               f"--gpu-name={gpu}", str(src), "-o", str(obj)],
                              capture_output=True, text=True, check=False)  # fmt: skip
        if proc.returncode:
            raise RuntimeError(f"ptxas failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return proc.stderr, obj.read_bytes()


def _count_sass(cubin: bytes) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(path)], capture_output=True,
                              text=True, check=True).stdout  # fmt: skip
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    base = [op.split(".")[0] for op in ops]
    return {
        "sass_instructions": len(base),
        "sass_hmma": sum(op == "HMMA" for op in base),
        "sass_hgmma": sum(op == "HGMMA" for op in base),
        "sass_global_atomics": sum(op in ("ATOM", "ATOMG", "RED", "REDG") for op in base),
    }


def measure(launch: Launch, arch: int) -> dict[str, Any]:
    """Compile `launch` for sm_{arch} and return its static figures."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts, attrs = _specialise(launch)
    src = ASTSource(fn=launch.fn, signature=sig, constexprs=consts, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})  # fmt: skip
    ptx = kernel.asm["ptx"]
    # ptxas -v is not kept by Triton: cache our own run by the PTX it assembled.
    from triton.runtime.cache import get_cache_manager

    key = hashlib.sha256(f"{ptx}|{arch}|{ptxas_path()}|v2".encode()).hexdigest()
    cache = get_cache_manager(key)
    hit = cache.get_file("ptxas_v.json")
    if hit:
        stats = json.loads(Path(hit).read_text())
    else:
        log, cubin = _ptxas_v(ptx, arch)
        regs = re.search(r"Used (\d+) registers", log)
        spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
        stats = {
            "registers": int(regs.group(1)),
            "stack_bytes": int(spill.group(1)),
            "spill_store_bytes": int(spill.group(2)),
            "spill_load_bytes": int(spill.group(3)),
            "ptx_mma": len(re.findall(r"^\s*(?:@%p\d+\s+)?mma\.sync", ptx, re.MULTILINE)),
            "ptx_wgmma": len(re.findall(r"^\s*(?:@%p\d+\s+)?wgmma\.mma_async", ptx, re.MULTILINE)),
            "ptx_global_atomics": len(re.findall(r"^\s*(?:@%p\d+\s+)?(?:atom|red)\.global", ptx, re.MULTILINE)),
            **_count_sass(cubin),
        }
        cache.put(json.dumps(stats), "ptxas_v.json", binary=False)
    return {**stats, "shared_bytes": int(kernel.metadata.shared),
            "smem_limit_bytes": SMEM_LIMIT[arch]}  # fmt: skip


def all_launches(only: str | None = None) -> list[Launch]:
    launches = [ln for make in REGISTRY for ln in make()]
    return [ln for ln in launches if only is None or ln.kernel.startswith(only)]


_WORK: list[Launch] = []


def _measure_index(job: tuple[int, str]) -> dict[str, Any]:
    i, target = job
    ln = _WORK[i]
    row = {"kernel": ln.kernel, "variant": ln.variant, "target": target, "owner": ln.owner,
           "spill_free_required": ln.spill_free, "num_warps": ln.num_warps,
           "num_stages": ln.num_stages, **ln.extra}  # fmt: skip
    return row | measure(ln, TARGETS[target])


def build(launches: list[Launch], targets: tuple[str, ...] = tuple(TARGETS), jobs: int = 1) -> list[dict]:
    """Static figures for every launch on every target, in registry order."""
    global _WORK
    _WORK = launches
    work = [(i, t) for i in range(len(launches)) for t in targets]
    if jobs <= 1:
        return [_measure_index(w) for w in work]
    import multiprocessing

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_measure_index, work))


# ---------------------------------------------------------------------------------
# Counted traffic at the headline shapes
# ---------------------------------------------------------------------------------
def traffic_rows() -> list[dict]:
    km = importlib.import_module("mode_fast.kernels.kmeans_assign")
    rows = []
    n, k, d = 10_000_000, 1024, 768
    for dtype in (torch.bfloat16, torch.float32):
        blocks = ("BLOCK_N", "BLOCK_K", "BLOCK_D")
        tiles = dict.fromkeys(tuple(c[b] for b in blocks) for c in km.launch_configs(dtype))
        for cfg in tiles:  # stages and warps do not change the counts
            t = kmeans_assign_traffic(n, k, d, dtype.itemsize, cfg[0], cfg[1])
            rows.append({"kernel": "kmeans_assign", "shape": f"N=10M K=1024 D=768 {_TDTYPE[dtype]}",
                         "tiles": f"{cfg[0]}x{cfg[1]}x{cfg[2]}", **t})  # fmt: skip
    cl = importlib.import_module("mode_fast.kernels.contrastive_loss")
    variants = [  # (label, loss, bwd, deterministic)
        ("clip atomic", "clip", "atomic", False),
        ("clip columns", "clip", "columns", False),
        ("clip deterministic", "clip", "columns", True),
        ("siglip atomic", "siglip", "atomic", False),
        ("siglip columns", "siglip", "columns", False),
    ]
    for b in (32768, 1 << 20):
        for dtype in (torch.bfloat16, torch.float32):
            cfg = cl.launch_configs("bwd", dtype)[0]  # the deterministic / first config
            bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
            for label, loss, bwd, det in variants:
                t = contrastive_traffic(b, b, 768, dtype.itemsize, bm, bn, loss=loss, bwd=bwd, deterministic=det)
                for direction, v in t.items():
                    if direction == "fwd" and bwd == "columns" and not det:
                        continue  # the forward does not depend on the backward's mode
                    rows.append({"kernel": f"contrastive_{direction} {label}",
                                 "shape": f"B={b // 1024}k D=768 {_TDTYPE[dtype]}",
                                 "tiles": f"{bm}x{bn}", **v})  # fmt: skip
    sd = importlib.import_module("mode_fast.kernels.semdedup")
    n, d = 100_001, 768
    for dtype in (torch.bfloat16, torch.float32):
        blocks = ("BLOCK_J", "BLOCK_I", "BLOCK_D")
        tiles = dict.fromkeys(tuple(c[b] for b in blocks) for c in sd.launch_configs(dtype))
        for cfg in tiles:
            t = semdedup_traffic(n, d, dtype.itemsize, cfg[0], cfg[1])
            rows.append({"kernel": "semdedup", "shape": f"n=100k D=768 {_TDTYPE[dtype]}",
                         "tiles": f"{cfg[0]}x{cfg[1]}x{cfg[2]}", **t})  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------
def _gb(x: float) -> str:
    return f"{x / 1e9:,.1f}"


def render(rows: list[dict], traffic: list[dict], versions: dict) -> str:
    lines = [
        "# Static kernel report (no GPU needed)",
        "",
        f"Triton {versions['triton']}, {versions['ptxas']}; generated by "
        "`python benchmarks/kernel_report.py`. Each row is one config a wrapper can launch, "
        "compiled with the argument specialisation of a real launch (headline sizes: "
        "k-means N=10,000,001 K=1024 D=768, its general form unspecialised; "
        "contrastive B=32k D=768, its general form D=129 unspecialised; "
        "semdedup n=100,001 D=768, its general form D=129 unspecialised). "
        "Spills: ptxas -v bytes of spill stores / loads. Shared: Triton's dynamic shared "
        "memory per block. TC: tensor-core instructions in the code (PTX mma.sync / wgmma; "
        "SASS HMMA / HGMMA); atomics: global atom/red in the PTX (SASS ATOM/RED). "
        "Status: `ok` = 0 spill bytes; `SPILLS` = asserted spill-free but spilling; "
        "`open` = spills in a kernel whose owner has not yet made it spill-free.",
        "",
        "| kernel | config | target | regs | spill st / ld (B) | stack (B) | shared (KB) "
        "| TC PTX (mma / wgmma) | TC SASS (HMMA / HGMMA) | atomics PTX / SASS | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spills = r["spill_store_bytes"] + r["spill_load_bytes"]
        status = "ok" if spills == 0 else ("SPILLS" if r["spill_free_required"] else "open")
        lines.append(
            f"| {r['kernel']} | {r['variant']} | {r['target']} | {r['registers']} "
            f"| {r['spill_store_bytes']} / {r['spill_load_bytes']} | {r['stack_bytes']} "
            f"| {r['shared_bytes'] / 1024:.0f} | {r['ptx_mma']} / {r['ptx_wgmma']} "
            f"| {r['sass_hmma']} / {r['sass_hgmma']} "
            f"| {r['ptx_global_atomics']} / {r['sass_global_atomics']} | {status} |"
        )
    lines += ["", "Notes:", ""] + [f"- {n}" for n in NOTES]
    lines += [
        "",
        "## Counted global-memory traffic per call (formulas in the opening comments of "
        "kmeans_assign.py, contrastive_loss.py and semdedup.py, computed by benchmarks/kernel_traffic.py)",
        "",
        "Loads as issued by the kernel (re-reads served by L2 count); compulsory = inputs "
        "read once, outputs written once. GB = 1e9 bytes. Issued loads are L2 requests; "
        "DRAM traffic is lower where re-reads hit L2 (unmeasured without a GPU).",
        "",
        "| kernel | shape | tiles | loads (GB) | stores (GB) | atomics (ops) | atomic bytes (GB) "
        "| compulsory (GB) | total / compulsory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in traffic:
        total = t["global_load_bytes"] + t["global_store_bytes"] + t.get("atomic_bytes", 0.0)
        lines.append(
            f"| {t['kernel']} | {t['shape']} | {t['tiles']} | {_gb(t['global_load_bytes'])} "
            f"| {_gb(t['global_store_bytes'])} | {t['atomic_ops']:.3g} "
            f"| {_gb(t.get('atomic_bytes', 0.0))} | {_gb(t['compulsory_bytes'])} "
            f"| {total / t['compulsory_bytes']:,.1f}x |"
        )
    return "\n".join(lines) + "\n"


def versions() -> dict:
    import triton

    out = subprocess.run([ptxas_path(), "--version"], capture_output=True, text=True, check=True).stdout
    release = re.search(r"release [\d.]+, V[\d.]+", out)
    return {"triton": triton.__version__, "ptxas": f"ptxas {release.group(0) if release else '?'}"}


def write(out_dir: Path, rows: list[dict], traffic: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    v = versions()
    write_json(out_dir / "kernels.json", {"versions": v, "configs": rows, "traffic": traffic})
    write_text(out_dir / "kernels.md", render(rows, traffic, v))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "static")
    ap.add_argument("--only", help="kernel name prefix (e.g. kmeans_assign)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ap.error("unset TRITON_INTERPRET: the report compiles real kernels")
    rows = build(all_launches(args.only), jobs=args.jobs)
    traffic = traffic_rows()
    write(args.out, rows, traffic)
    text = (args.out / "kernels.md").read_text()
    print(text[text.index("## Counted") :])  # the traffic table, for the log
    bad = [r for r in rows if r["spill_free_required"] and r["spill_store_bytes"] + r["spill_load_bytes"]]
    print(f"{len(rows)} kernel configs; written to {args.out}/kernels.md")
    for r in bad:
        print(f"SPILLS: {r['kernel']} {r['variant']} {r['target']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
