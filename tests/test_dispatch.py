"""mode_fast.kernels.dispatch: auto never picks a backend that cannot do the call; explicit ones fail clearly.

No GPU here: the CUDA cases pass a device and its compute capability to pick(), which is
what it reads from a real device.
"""

from __future__ import annotations

import dataclasses
import pathlib

import pytest
import torch

import mode_fast
from mode_fast.core.errors import ConfigError
from mode_fast.kernels import contrastive_loss, dispatch

CUDA = torch.device("cuda", 0)
H100, T4 = (9, 0), (7, 5)
pytest.importorskip("triton")  # the Triton rows need it importable (as on any GPU install)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_BACKEND, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def pick(variant, device=CUDA, dtype=torch.float32, backend="auto", op="contrastive", **kw):
    return dispatch.pick(op, variant, device, backend, dtype=dtype, **kw)


@pytest.mark.parametrize("variant", dispatch.CONTRASTIVE_VARIANTS)
def test_auto_on_cuda_takes_triton_for_every_contrastive_variant(variant):
    assert pick(variant, cuda_capability=H100) == "triton"
    assert pick(variant, device="cpu") == "torch"


def test_multi_gpu_siglip_routes_to_a_backend_with_negatives_only_blocks(monkeypatch):
    # SigLipLoss with world_size > 1 calls siglip_loss(positives=False): see which variant it asks for
    asked = []
    real_pick = dispatch.pick

    def record(op, variant, like, backend="auto", **kw):
        asked.append(variant)
        return real_pick(op, variant, like, backend, **kw)

    monkeypatch.setattr(dispatch, "pick", record)
    img, txt = torch.randn(3, 8), torch.randn(5, 8)
    contrastive_loss.siglip_loss(img, txt, 10.0, -10.0, positives=False)
    assert asked == [dispatch.SIGLIP_NEGATIVES]
    monkeypatch.setattr(dispatch, "pick", real_pick)
    # on an H100 that variant goes to Triton, which has the kernel ...
    assert pick(dispatch.SIGLIP_NEGATIVES, cuda_capability=H100) == "triton"
    # ... and with a Triton that lacked it (this project before these kernels), auto takes
    # torch and an explicit triton is a one-line ConfigError, not a NotImplementedError mid-step
    old = tuple(
        dataclasses.replace(c, variants=c.variants - {dispatch.SIGLIP_NEGATIVES})
        if c.backend == "triton" and c.op == "contrastive"
        else c
        for c in dispatch.CAPABILITIES
    )
    assert pick(dispatch.SIGLIP_NEGATIVES, cuda_capability=H100, table=old) == "torch"
    assert pick(dispatch.SIGLIP, cuda_capability=H100, table=old) == "triton"
    with pytest.raises(ConfigError, match="backend='triton' cannot run contrastive .siglip_negatives.*has no"):
        pick(dispatch.SIGLIP_NEGATIVES, backend="triton", cuda_capability=H100, table=old)


def test_device_capability_decides_bf16():
    assert pick(dispatch.CLIP, dtype=torch.bfloat16, cuda_capability=H100) == "triton"
    assert pick(dispatch.CLIP, dtype=torch.float16, cuda_capability=T4) == "triton"
    assert pick(dispatch.CLIP, dtype=torch.bfloat16, cuda_capability=T4) == "torch"
    with pytest.raises(ConfigError, match=r"compute capability 8\.0\+ for torch.bfloat16 .the device has 7\.5"):
        pick(dispatch.CLIP, dtype=torch.bfloat16, backend="triton", cuda_capability=T4)
    assert pick(dispatch.CLIP, dtype=torch.float32, cuda_capability=(6, 1)) == "torch"


def test_cpu_triton_only_by_name_and_only_interpreted(monkeypatch):
    with pytest.raises(ConfigError, match="needs CUDA tensors"):
        pick(dispatch.CLIP, device="cpu", backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.interpreting()
    assert pick(dispatch.CLIP, device="cpu", backend="triton") == "triton"
    assert pick(dispatch.CLIP, device="cpu") == "torch"  # auto keeps the fast path
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not dispatch.interpreting()


def test_env_forces_a_backend(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_BACKEND, "torch")
    assert pick(dispatch.CLIP, cuda_capability=H100) == "torch"
    assert pick(dispatch.CLIP, backend="triton", cuda_capability=H100) == "torch"
    assert pick(dispatch.ASSIGN, op="kmeans_assign", backend="faiss", device="cpu") == "torch"
    monkeypatch.setenv(dispatch.ENV_BACKEND, "triton")
    assert pick(dispatch.RING_BLOCK, cuda_capability=H100) == "triton"
    with pytest.raises(ConfigError, match=f"forced by {dispatch.ENV_BACKEND}.*needs CUDA"):
        pick(dispatch.CLIP, device="cpu")
    monkeypatch.setenv(dispatch.ENV_BACKEND, "cuda")
    with pytest.raises(ConfigError, match=f"{dispatch.ENV_BACKEND}='cuda': must be one of torch, triton"):
        pick(dispatch.CLIP, device="cpu")


def test_env_reaches_the_public_functions(monkeypatch):
    img, txt = torch.randn(4, 8), torch.randn(4, 8)
    monkeypatch.setenv(dispatch.ENV_BACKEND, "triton")  # no interpreter in this process: must refuse
    with pytest.raises(ConfigError, match="MODE_FAST_BACKEND"):
        contrastive_loss.clip_loss(img, txt, 10.0)
    from mode_fast.kernels import kmeans_assign

    with pytest.raises(ConfigError, match="MODE_FAST_BACKEND"):
        kmeans_assign(img, txt)


def test_kmeans_rows():
    assert pick(dispatch.ASSIGN, op="kmeans_assign", cuda_capability=H100) == "triton"
    assert pick(dispatch.ASSIGN, op="kmeans_assign", device="cpu") == "torch"
    with pytest.raises(ConfigError, match="backend='faiss' cannot run kmeans_assign .*does not run on cuda"):
        pick(dispatch.ASSIGN, op="kmeans_assign", backend="faiss", cuda_capability=H100)


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="backend must be one of"):
        pick(dispatch.CLIP, backend="cuml")
    with pytest.raises(ConfigError, match="does not implement contrastive"):
        pick(dispatch.CLIP, backend="faiss")


def test_environment_read_in_one_place():
    root = pathlib.Path(mode_fast.__file__).parent
    readers = {}
    for path in root.rglob("*.py"):
        for line in path.read_text().splitlines():
            if ("environ" in line or "getenv" in line) and (
                "TRITON_INTERPRET" in line
                or "MODE_FAST_BACKEND" in line
                or "ENV_BACKEND" in line
                or "CONTRASTIVE_BWD" in line
            ):
                readers.setdefault(path.relative_to(root).as_posix(), []).append(line.strip())
    assert set(readers) == {"kernels/dispatch.py"}, readers


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", dispatch.CONTRASTIVE_VARIANTS)
def test_real_gpu_takes_triton(variant):
    x = torch.zeros(2, 2, device="cuda")
    assert dispatch.pick("contrastive", variant, x) == "triton"  # capability read from the device


def test_contrastive_backward_mode_keyword_env_and_default(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_CONTRASTIVE_BWD, raising=False)
    assert dispatch.contrastive_bwd() == dispatch.DEFAULT_CONTRASTIVE_BWD
    monkeypatch.setenv(dispatch.ENV_CONTRASTIVE_BWD, "columns")
    assert dispatch.contrastive_bwd() == "columns"
    assert dispatch.contrastive_bwd("atomic") == "atomic"  # the keyword wins
    monkeypatch.setenv(dispatch.ENV_CONTRASTIVE_BWD, "sideways")
    with pytest.raises(ConfigError, match="MODE_FAST_CONTRASTIVE_BWD='sideways'"):
        dispatch.contrastive_bwd()
    with pytest.raises(ConfigError, match="bwd must be one of"):
        dispatch.contrastive_bwd("both")
