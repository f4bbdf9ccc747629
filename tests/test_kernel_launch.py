"""mode_fast.kernels.launch: the rules both kernels launch by (CPU, no kernel runs)."""

from __future__ import annotations

import importlib

import pytest
import torch

from mode_fast.kernels import launch

km = importlib.import_module("mode_fast.kernels.kmeans_assign")  # the module, not the function
cl = importlib.import_module("mode_fast.kernels.contrastive_loss")


@pytest.fixture(autouse=True)
def compiled(monkeypatch):
    """The tables of a real launch, not the interpreter's one config."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_dtype_classes():
    assert launch.dtype_class(torch.bfloat16) == launch.dtype_class(torch.float16) == "16bit"
    assert launch.dtype_class(torch.float32) == "fp32"
    assert launch.dtype_class(torch.float32, strict_fp32=True) == "ieee"
    assert launch.dtype_class(torch.bfloat16, strict_fp32=True) == "16bit"  # strict is about fp32 only


def test_alignment_rule_for_matrices_and_vectors():
    base = torch.empty(64 * 48 + 1)
    assert launch.aligned(base[: 64 * 32].view(64, 32))
    assert launch.aligned(base[: 64 * 48].view(64, 48)[:, :32])  # padded rows: row stride 48
    assert not launch.aligned(base[1 : 1 + 64 * 32].view(64, 32))  # base pointer off by 4 bytes
    assert not launch.aligned(base[: 64 * 40].view(64, 40)[:, :32][:, ::2])  # stride 2 along D
    assert not launch.aligned(base[: 64 * 33].view(64, 33))  # row stride 33
    assert not launch.aligned(base[: 32 * 64].view(32, 64).t())  # column-major
    assert launch.aligned(base[:77]) and not launch.aligned(base[1:77])  # vectors: the pointer alone


def test_layout_needs_width_16_and_every_tensor_aligned():
    x, c, out = torch.empty(9, 32), torch.empty(5, 32), torch.empty(9)
    assert launch.layout(x, c) == launch.layout(x, c, out) == "aligned"
    assert launch.layout(torch.empty(9, 33), torch.empty(5, 33)) == "general"  # D % 16
    assert launch.layout(x, c, torch.empty(10)[1:]) == "general"  # one misaligned buffer is enough


def test_configs_are_named_by_each_kernels_blocks():
    (first, *_) = km.launch_configs(torch.bfloat16)
    assert first == dict(zip(km.ASSIGN.blocks, km.ASSIGN.table[("aligned", "16bit")][0][:3]), num_warps=8, num_stages=3)
    assert set(cl.launch_configs("bwd", torch.float32, "general", True)[0]) == {
        "BLOCK_M",
        "BLOCK_N",
        "BLOCK_K",
        "num_warps",
        "num_stages",
    }
    # every table has a list for each layout and dtype class the wrappers can ask for
    for launcher, classes in (
        (km.ASSIGN, ("16bit", "fp32")),
        (cl.FWD, ("16bit", "fp32", "ieee")),
        (cl.BWD, ("16bit", "fp32", "ieee")),
    ):
        assert set(launcher.table) == {(lay, c) for lay in launch.LAYOUTS for c in classes}


def test_interpreter_takes_one_smallest_config(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert km.launch_configs(torch.float32, "general") == [km.ASSIGN.as_dict(launch.INTERPRETER_CONFIG)]
    assert cl.launch_configs("fwd", torch.bfloat16) == [cl.FWD.as_dict(launch.INTERPRETER_CONFIG)]


def test_a_config_outside_the_list_is_refused_before_anything_launches():
    odd = {"BLOCK_M": 48, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
    with pytest.raises(ValueError, match="contrastive bwd: .* is not a general config for torch.float16"):
        cl.BWD.launch(10, (), {}, dtype=torch.float16, layout="general", config=odd)
