"""Launching a Triton kernel: what every kernel wrapper of mode_fast.kernels shares.

A kernel body is compiled in two forms, so that each launch config compiles to exactly one
machine-code variant (the one benchmarks/kernel_report.py measures) whatever the call's
sizes: Triton otherwise specialises on every int that is 1 or divisible by 16 and every
pointer that is 16-byte aligned.
- "aligned": launched when ``layout()`` says so (unit stride along D; D, row strides and
  every pointer divisible by 16), so loads vectorise and pipeline into shared memory.
  The sizes and runtime flags stay generic.
- "general": any other layout (odd D, strided views, offset pointers); nothing
  specialised, scalar loads, smaller tiles.

A ``Launcher`` holds one body's two forms, its launch config table (per layout and dtype
class; the first entry of each list is the one deterministic=True pins), and its
autotuners. Each kernel module owns its table and its body; this module owns the rules.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import dispatch

try:  # Triton is optional: the torch paths work without it.
    import triton
except ImportError:  # pragma: no cover - depends on the install
    triton = None

LAYOUTS = ("aligned", "general")
# A launch config: three block sizes (named by the kernel, the first tiling the grid's one
# axis), num_warps, num_stages.
Config = tuple[int, int, int, int, int]
# Under the interpreter: the smallest tiles tl.dot accepts, one config (autotune with
# several configs fails there, and it runs through numpy).
INTERPRETER_CONFIG: Config = (16, 16, 16, 1, 1)


def dtype_class(dtype: torch.dtype, strict_fp32: bool = False) -> str:
    """The config table's dtype class: "16bit" (fp16 / bf16), "fp32" (TF32 allowed, or a
    kernel that always takes the IEEE dot and keeps one fp32 list), "ieee" (strict fp32:
    IEEE dots on FMA units, which need their own, smaller tiles)."""
    if dtype != torch.float32:
        return "16bit"
    return "ieee" if strict_fp32 else "fp32"


def aligned(t: torch.Tensor) -> bool:
    """Triton's rule for the aligned form: pointer 16-byte aligned, and for a matrix unit
    stride along its last axis and a row stride (in elements) divisible by 16."""
    if t.data_ptr() % 16:
        return False
    return t.dim() == 1 or (t.stride(1) == 1 and t.stride(0) % 16 == 0)


def layout(x: torch.Tensor, *others: torch.Tensor) -> str:
    """The compiled form to launch: "aligned" when x's width D is divisible by 16 and x and
    every other tensor the kernel takes is aligned(), else "general"."""
    ok = x.shape[1] % 16 == 0 and all(aligned(t) for t in (x, *others))
    return "aligned" if ok else "general"


class Launcher:
    """One kernel body: its two compiled forms, its launch configs, its autotuners.

    name: the prefix of the wrapper's error messages. blocks: the body's three block-size
    constexprs in the order of the table's tuples; the first tiles the grid (one program per
    that many rows). table: (layout, dtype class) -> configs, the first the pinned one.
    tune_key: the arguments an autotuner caches its pick by (it adds the tensors' dtypes).
    restore: the buffers the kernel accumulates into, restored after each timing run.
    """

    def __init__(
        self,
        name: str,
        blocks: tuple[str, str, str],
        table: dict[tuple[str, str], tuple[Config, ...]],
        tune_key: Sequence[str],
        restore: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.blocks = blocks
        self.table = table
        self.tune_key = list(tune_key)
        self.restore = list(restore)
        self._forms: dict[str, Any] = {}
        self._tuned: dict[tuple[str, str], Any] = {}

    def compile(self, body: Callable, runtime: Sequence[str], ints: Sequence[str]) -> None:
        """Builds the two forms of body (needs triton). runtime: the sizes and flags, never
        specialised; ints: the widths and strides, specialised in the aligned form only.
        The general form does not specialise on the alignment of any parameter named *_ptr."""
        pointers = [p for p in inspect.signature(body).parameters if p.endswith("_ptr")]
        self._forms = {
            "aligned": triton.jit(do_not_specialize=tuple(runtime))(body),
            "general": triton.jit(do_not_specialize=(*runtime, *ints), do_not_specialize_on_alignment=tuple(pointers))(
                body
            ),
        }

    def as_dict(self, cfg: Config) -> dict[str, int]:
        return {**dict(zip(self.blocks, cfg[:3])), "num_warps": cfg[3], "num_stages": cfg[4]}

    def configs(self, dtype: torch.dtype, layout: str = "aligned", strict_fp32: bool = False) -> list[dict[str, int]]:
        """The configs a launch may take for inputs of this dtype, strict flag and layout
        (the static report compiles each one); under the interpreter, its one config."""
        if dispatch.interpreting():
            return [self.as_dict(INTERPRETER_CONFIG)]
        return [self.as_dict(c) for c in self.table[(layout, dtype_class(dtype, strict_fp32))]]

    def kernel(self, layout: str) -> Any:
        """The compiled form for this layout."""
        return self._forms[layout]

    def tuned(self, layout: str, dtype: torch.dtype, strict_fp32: bool = False) -> Any:
        """triton.autotune over the layout and dtype class's list, cached by tune_key. Built
        on first use (CUDA only)."""
        key = (layout, dtype_class(dtype, strict_fp32))
        if key not in self._tuned:
            configs = [
                triton.Config(dict(zip(self.blocks, c[:3])), num_warps=c[3], num_stages=c[4]) for c in self.table[key]
            ]
            self._tuned[key] = triton.autotune(configs=configs, key=self.tune_key, restore_value=self.restore or None)(
                self.kernel(layout)
            )
        return self._tuned[key]

    def launch(
        self,
        rows: int,
        args: tuple,
        consts: dict,
        *,
        dtype: torch.dtype,
        layout: str,
        strict_fp32: bool = False,
        deterministic: bool = False,
        config: dict[str, int] | None = None,
    ) -> Any:
        """Launches the kernel over cdiv(rows, first block) programs (one grid axis: no
        65,535 cap) and returns the grid: its size when one config was launched, else the
        autotuner's grid function.

        Under the interpreter, with deterministic=True or an explicit config (benchmarks):
        that one config (the list's first unless given; one that is not in the list raises
        ValueError); otherwise autotuned over the list (CUDA). The caller checks that triton
        is importable (each with its own message).
        """
        block = self.blocks[0]
        if dispatch.interpreting() or deterministic or config is not None:
            listed = self.configs(dtype, layout, strict_fp32)
            cfg = config or listed[0]
            if cfg not in listed:
                raise ValueError(f"{self.name}: {cfg} is not a {layout} config for {dtype}")
            grid = (triton.cdiv(rows, cfg[block]),)
            self.kernel(layout)[grid](*args, **consts, **cfg)
            return grid[0]
        grid = lambda meta: (triton.cdiv(rows, meta[block]),)
        self.tuned(layout, dtype, strict_fp32)[grid](*args, **consts)
        return grid
