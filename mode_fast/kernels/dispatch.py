"""Which backend runs a kernel call: one table of what each backend can do, one rule to pick.

Every hot path asks ``pick(op, variant, tensor, backend)`` before it runs. A row of
``CAPABILITIES`` says what one backend can do for one op: the variants it implements,
the dtypes, the devices, whether ``backend="auto"`` may choose it, and what it needs
(an importable package, a CUDA compute capability). The rule:

- ``"auto"`` takes the first row, in table order, that can do the call, so it never picks
  a backend that cannot (multi-GPU SigLIP's negatives-only blocks go to a backend that
  has them, whatever the device).
- An explicit backend that cannot do the call raises ``ConfigError`` naming the op,
  variant, device and dtype, and what the backend lacks.
- ``MODE_FAST_BACKEND=torch|triton`` (environment) replaces the requested backend of
  every call, ``"auto"`` and explicit alike, for tests and debugging; a backend that
  cannot do a call then fails as an explicit one does.
- ``MODE_FAST_CONTRASTIVE_BWD=columns|atomic`` (environment) sets how the Triton
  contrastive backward forms dK when a call does not say (``bwd=None``); unset, the
  default is ``DEFAULT_CONTRASTIVE_BWD`` (``contrastive_bwd()``). For a first GPU run to
  time both without code changes.
- ``TRITON_INTERPRET`` is read here and nowhere else (``interpreting()``). Triton reads it
  itself when its kernels are decorated, so it must be set before triton is imported.
  Interpreted, the Triton backend also runs on CPU tensors, but only when asked for by
  name: ``"auto"`` keeps the torch path on the CPU (the interpreter checks semantics,
  at numpy speed).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from mode_fast.core.errors import ConfigError

BACKENDS = ("auto", "torch", "triton", "faiss")
ENV_BACKEND = "MODE_FAST_BACKEND"
_FORCEABLE = ("torch", "triton")

# Variants of the contrastive op (mode_fast.kernels.contrastive_loss)
CLIP = "clip"  # symmetric B x B, both directions in one pass
INFONCE = "infonce"  # local rows vs N columns, positives at column offset + row
CLIP_LOCAL = "clip_local"  # both directions of local rows vs gathered columns (local_loss)
RING_BLOCK = "ring_block"  # one ring step: rows vs a visiting block, running LSE merged
SIGLIP = "siglip"  # sigmoid loss, positives on the diagonal
SIGLIP_NEGATIVES = "siglip_negatives"  # sigmoid loss, every pair negative (another rank's texts)
CONTRASTIVE_VARIANTS = (CLIP, INFONCE, CLIP_LOCAL, RING_BLOCK, SIGLIP, SIGLIP_NEGATIVES)
# How the Triton contrastive backward forms dK (mode_fast.kernels.contrastive_loss):
# "columns", a second column-owned pass without atomics, or "atomic", one pass adding dK
# with float atomics. The default is the one with less counted global-memory traffic at
# the headline shapes (benchmarks/kernel_traffic.py; tests/test_contrastive_loss.py checks
# the choice against it): the columns pass reads and writes dQ-sized fp32 accumulators
# twice, which outweighs the atomics it saves. Unmeasured on a GPU: benchmarks/gpu_check.sh
# times both.
CONTRASTIVE_BWD = ("columns", "atomic")
DEFAULT_CONTRASTIVE_BWD = "atomic"
ENV_CONTRASTIVE_BWD = "MODE_FAST_CONTRASTIVE_BWD"
# Variants of the k-means op (mode_fast.kernels.kmeans_assign)
ASSIGN = "assign"
# Variants of the SemDeDup op (mode_fast.kernels.semdedup)
EARLIER_MAX = "earlier_max"  # per item, the most similar item before it

_FLOATS = frozenset({torch.float32, torch.float16, torch.bfloat16})


@dataclass(frozen=True)
class Capability:
    """What one backend can do for one op. Table order is auto's order of preference."""

    backend: str
    op: str
    variants: frozenset
    dtypes: frozenset
    devices: frozenset  # device types it runs on natively
    auto: bool = True  # may "auto" choose it
    requires: str | None = None  # a package that must be importable
    interpretable: bool = False  # also runs on CPU tensors when TRITON_INTERPRET is set
    min_cuda: tuple = (0, 0)  # lowest CUDA compute capability
    min_cuda_bf16: tuple = (0, 0)  # lowest CUDA compute capability for bf16 inputs


CAPABILITIES: tuple[Capability, ...] = (
    # Triton: the fused kernels. Triton 3 targets sm_70+ (Volta); bf16 tl.dot needs sm_80+.
    Capability(
        "triton",
        "contrastive",
        frozenset(CONTRASTIVE_VARIANTS),
        _FLOATS,
        frozenset({"cuda"}),
        requires="triton",
        interpretable=True,
        min_cuda=(7, 0),
        min_cuda_bf16=(8, 0),
    ),
    Capability(
        "triton",
        "kmeans_assign",
        frozenset({ASSIGN}),
        _FLOATS,
        frozenset({"cuda"}),
        requires="triton",
        interpretable=True,
        min_cuda=(7, 0),
        min_cuda_bf16=(8, 0),
    ),
    Capability(
        "triton",
        "semdedup",
        frozenset({EARLIER_MAX}),
        _FLOATS,
        frozenset({"cuda"}),
        requires="triton",
        interpretable=True,
        min_cuda=(7, 0),
        min_cuda_bf16=(8, 0),
    ),
    # torch: the chunked PyTorch paths, every device, every variant.
    Capability("torch", "contrastive", frozenset(CONTRASTIVE_VARIANTS), _FLOATS, frozenset({"cpu", "cuda", "meta"})),
    # k-means on the CPU: torch, not faiss. Measured on the 2-core AMD EPYC dev box (AVX-512;
    # torch 2.14 + MKL, faiss-cpu 1.15), K=1024, D=384 fp32, one thread each: faiss
    # IndexFlatL2 0.39-0.41 s for 50k points, the torch path 0.45-0.48 s (1.13-1.18x), faiss
    # asked for the top 2 (what an exact near-tie check would need) 0.42 s; on 2 threads
    # within noise (~1.0 s for 200k). The ~15% buys exact, deterministic labels and no faiss
    # dependency; backend="faiss" remains for raw speed, by name only.
    # See benchmarks/results/cpu/kmeans_assign.md.
    Capability("torch", "kmeans_assign", frozenset({ASSIGN}), _FLOATS, frozenset({"cpu", "cuda", "meta"})),
    Capability("torch", "semdedup", frozenset({EARLIER_MAX}), _FLOATS, frozenset({"cpu", "cuda", "meta"})),
    Capability(
        "faiss", "kmeans_assign", frozenset({ASSIGN}), _FLOATS, frozenset({"cpu"}), auto=False, requires="faiss"
    ),
)


def interpreting() -> bool:
    """TRITON_INTERPRET is set (to anything but "" or "0"): Triton kernels run through numpy."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def forced_backend() -> str | None:
    """The backend MODE_FAST_BACKEND forces, or None when it is unset or empty."""
    value = os.environ.get(ENV_BACKEND, "").strip()
    if not value:
        return None
    if value not in _FORCEABLE:
        raise ConfigError(f"{ENV_BACKEND}={value!r}: must be one of {', '.join(_FORCEABLE)} (or unset)")
    return value


def contrastive_bwd(requested: str | None = None) -> str:
    """The contrastive backward's dK mode: `requested` if given, else MODE_FAST_CONTRASTIVE_BWD,
    else DEFAULT_CONTRASTIVE_BWD."""
    value = requested
    if value is None:
        value = os.environ.get(ENV_CONTRASTIVE_BWD, "").strip() or DEFAULT_CONTRASTIVE_BWD
        if value not in CONTRASTIVE_BWD:
            raise ConfigError(
                f"{ENV_CONTRASTIVE_BWD}={value!r}: must be one of {', '.join(CONTRASTIVE_BWD)} (or unset)"
            )
    if value not in CONTRASTIVE_BWD:
        raise ConfigError(f"bwd must be one of {CONTRASTIVE_BWD} or None, got {value!r}")
    return value


@functools.cache
def _importable(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _why_not(
    cap: Capability, variant: str, device: torch.device, dtype: torch.dtype, cuda_capability: tuple | None
) -> str | None:
    """None if `cap` can do the call, else the reason in words."""
    if variant not in cap.variants:
        return f"has no {variant!r} kernel"
    if dtype not in cap.dtypes:
        return f"does not take {dtype}"
    if cap.requires and not _importable(cap.requires):
        return f"needs the {cap.requires} package, which is not importable"
    if device.type == "cpu" and cap.interpretable and "cpu" not in cap.devices:
        if not interpreting():
            return (
                f"needs CUDA tensors (the tensors are on {device}); use backend='torch', "
                "or set TRITON_INTERPRET=1 before triton is imported"
            )
        return None
    if device.type not in cap.devices:
        return f"does not run on {device.type}"
    if device.type == "cuda":
        cc = tuple(cuda_capability) if cuda_capability is not None else torch.cuda.get_device_capability(device)
        need = cap.min_cuda_bf16 if dtype == torch.bfloat16 else cap.min_cuda
        if cc < need:
            return f"needs CUDA compute capability {need[0]}.{need[1]}+ for {dtype} (the device has {cc[0]}.{cc[1]})"
    return None


def pick(
    op: str,
    variant: str,
    like: torch.Tensor | torch.device | str,
    backend: str = "auto",
    *,
    dtype: torch.dtype | None = None,
    cuda_capability: tuple | None = None,
    table: Iterable[Capability] = CAPABILITIES,
) -> str:
    """The backend that runs `op`/`variant` on `like`'s device and dtype (module doc: the rule).

    like: a tensor of the call (its device and dtype) or a device (then pass dtype).
    cuda_capability: the device's (major, minor); read from the device when None (tests
    pass it to stand in for a GPU they do not have). table: the capability rows.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"{op}: backend must be one of {BACKENDS}, got {backend!r} (unknown backend)")
    if isinstance(like, torch.Tensor):
        device, dtype = like.device, dtype or like.dtype
    else:
        device = torch.device(like)
        if dtype is None:
            raise ValueError("pick(): pass dtype= when `like` is a device")
    rows = [c for c in table if c.op == op]
    if not any(variant in c.variants for c in rows):
        raise ValueError(f"pick(): no backend lists {op} variant {variant!r}")  # a bug, not a user error
    forced = forced_backend()
    where = f"{op} ({variant}, {dtype} on {device})"
    if forced is not None or backend != "auto":
        name = forced or backend
        reasons = [_why_not(c, variant, device, dtype, cuda_capability) for c in rows if c.backend == name]
        if not reasons:
            raise ConfigError(f"backend={name!r} does not implement {op}")
        if None in reasons:
            return name
        via = f" (forced by {ENV_BACKEND})" if forced else ""
        raise ConfigError(f"backend={name!r}{via} cannot run {where}: it {reasons[0]}")
    for c in rows:
        if c.auto and _why_not(c, variant, device, dtype, cuda_capability) is None:
            if c.interpretable and device.type == "cpu":
                continue  # interpreted Triton is for tests that ask for it by name
            return c.backend
    raise ConfigError(f"no backend can run {where}")
