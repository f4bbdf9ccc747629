"""Every distributed setting of mode_fast.training.loss on 2 gloo ranks, torch and Triton, against open_clip.

Each rank is a fresh process running this file as a script (`python THIS RANK PORT BACKEND
OUT`). It imports mode_fast.training.loss and runs every setting (ClipLoss local_loss x
gather_with_grad, the ring, SigLipLoss bidir / shift / reduce / gather) before open_clip
is imported at all, so the run sees the process a user's job has: a missing import of
torch.distributed.nn (open_clip imports it as a side effect) fails here. Only then does
it import open_clip, run open_clip's own ClipLoss / SigLipLoss on the same rank's rows,
and write the max relative errors of the loss and every gradient (features, scale,
bias) as JSON, with the Triton launches each setting made.

backend="triton" runs under TRITON_INTERPRET=1 (set before triton is imported, hence
the fresh processes): the same kernels a GPU runs, through numpy, so sizes are small
and fp32 (bf16 tl.dot is wrong in the interpreter). Every setting must launch its
rectangular/square kernels (no silent fallback to the torch path).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from local_ports import free_port

WORLD = 2
LOCAL_B, D = 11, 20  # odd; 22 gathered rows span two 16-row tiles of the interpreted kernels
RTOL = 1e-5
CLIP_MODES = [(ll, gg) for ll in (False, True) for gg in (False, True)]
SIGLIP_IMPLS = ("bidir", "shift", "reduce", "gather")
# Triton launches each setting must make, by "direction:mode" (tests/kernel_launches.py)
EXPECTED_LAUNCHES = {
    **{
        f"clip local_loss={ll} gather_with_grad={gg}": (["fwd:rows", "bwd:rows"] if ll else ["fwd:clip", "bwd:clip"])
        for ll, gg in CLIP_MODES
    },
    "clip ring": ["fwd:rows", "fwd:rows_merge", "bwd:rows"],
    **{f"siglip {impl}": ["fwd:siglip", "bwd:siglip", "fwd:siglip_rect", "bwd:siglip_rect"] for impl in SIGLIP_IMPLS},
}


def _batch():
    import torch

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(WORLD * LOCAL_B, D, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(WORLD * LOCAL_B, D, generator=g), dim=1)
    return img, txt


def _run(loss_fn, img, txt, scale, bias):
    """[loss, d_img, d_txt, d_scale, d_bias] on fresh leaves (d_bias 0 when the loss ignores it)."""
    import torch

    leaves = [x.clone().requires_grad_() for x in (img, txt, scale, bias)]
    loss = loss_fn(*leaves)
    loss.backward()
    return [loss.detach()] + [torch.zeros(()) if x.grad is None else x.grad for x in leaves]


def _settings(loss_mod, rank: int, **extra):
    """(name, loss module, fn(module, img, txt, scale, bias)) for every distributed setting."""
    kw = {"rank": rank, "world_size": WORLD}
    out = []
    for ll, gg in CLIP_MODES:
        out.append(
            (
                f"clip local_loss={ll} gather_with_grad={gg}",
                loss_mod.ClipLoss(local_loss=ll, gather_with_grad=gg, **kw, **extra),
                False,
            )
        )
    out.append(
        (
            "clip ring",
            loss_mod.ClipLoss(ring=True, **kw, **extra)
            if extra
            else loss_mod.ClipLoss(local_loss=True, gather_with_grad=True, **kw),
            False,
        )
    )
    for impl in SIGLIP_IMPLS:
        out.append((f"siglip {impl}", loss_mod.SigLipLoss(dist_impl=impl, **kw, **extra), True))
    return out


def _call(module, siglip: bool):
    if siglip:
        return lambda i, t, s, b: module(i, t, s, b)
    return lambda i, t, s, b: module(i, t, s)


def worker(rank: int, port: int, backend: str, out_path: str) -> None:
    assert "open_clip" not in sys.modules and "torch.distributed.nn" not in sys.modules
    import torch
    import torch.distributed as dist
    from kernel_launches import counting

    import mode_fast.training.loss

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        img, txt = _batch()
        rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
        img, txt = img[rows].contiguous(), txt[rows].contiguous()
        scale, bias = torch.tensor(14.0), torch.tensor(-8.0)
        ours, launches = {}, {}
        chunk = 5 if backend == "torch" else None  # torch: chunks that do not divide the rows
        for name, module, siglip in _settings(mode_fast.training.loss, rank, backend=backend, chunk_size=chunk):
            with counting() as launched:
                ours[name] = _run(_call(module, siglip), img, txt, scale, bias)
            launches[name] = dict(launched)
        # everything above ran without open_clip: now the reference
        assert "open_clip" not in sys.modules
        import open_clip.loss

        errors = {}
        for name, module, siglip in _settings(open_clip.loss, rank):
            want = _run(_call(module, siglip), img, txt, scale, bias)
            errors[name] = [
                float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(ours[name], want)
            ]
        with open(out_path, "w") as f:
            json.dump({"errors": errors, "launches": launches}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_every_distributed_setting_matches_open_clip_in_fresh_processes(backend, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MODE_FAST_BACKEND")}
    if backend == "triton":
        pytest.importorskip("triton")
        env["TRITON_INTERPRET"] = "1"
    port = free_port()
    outs = [tmp_path / f"rank{r}.json" for r in range(WORLD)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(r), str(port), backend, str(outs[r])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(WORLD)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-4000:]}"
    for r in range(WORLD):
        result = json.loads(outs[r].read_text())
        assert set(result["errors"]) == set(EXPECTED_LAUNCHES)
        for name, errs in result["errors"].items():
            assert max(errs) <= RTOL, f"rank {r} {name}: relative errors (loss, d_img, d_txt, d_scale, d_bias) {errs}"
        for name, launched in result["launches"].items():
            if backend == "torch":
                assert not launched, f"rank {r} {name}: backend='torch' launched Triton kernels {launched}"
            else:
                missing = [k for k in EXPECTED_LAUNCHES[name] if not launched.get(k)]
                assert not missing, f"rank {r} {name}: no Triton launch of {missing} (launched {launched})"


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
