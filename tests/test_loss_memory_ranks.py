"""Per-rank memory of the distributed losses does not grow with the number of ranks.

Not RSS (noisy): the bytes autograd keeps for backward after one forward, counted with
torch.autograd.graph.saved_tensors_hooks (distinct storages), and the communication
buffers (what blocks and gradients are received into) made during one forward and
backward. For every non-gather setting (SigLipLoss dist_impl shift / bidir / reduce,
ClipLoss ring=True) these must be the same at 2 and 4 gloo ranks, up to a few O(B)
statistics: nothing of a finished step is kept, backward sends the blocks again, and the
receive buffers are made once per call. Losses and gradients
are held to open_clip's classes at both sizes.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from local_ports import free_port
from open_clip.loss import ClipLoss as OpenClipLoss
from open_clip.loss import SigLipLoss as OpenSigLipLoss
from test_loss_distributed import close, grads

import mode_fast.training.loss as loss_mod
from mode_fast.training.loss import ClipLoss, SigLipLoss

B, D = 32, 16  # per rank, fp32: one block is 2 KiB, an O(B) statistic 128 bytes
SLACK = 4 * B * 4  # a few fp32 O(B) vectors; a single kept block (B * D * 4) is 4x this

SETTINGS = {
    "siglip-shift": lambda r, w: SigLipLoss(rank=r, world_size=w, dist_impl="shift", chunk_size=7),
    "siglip-bidir": lambda r, w: SigLipLoss(rank=r, world_size=w, dist_impl="bidir", chunk_size=7),
    "siglip-reduce": lambda r, w: SigLipLoss(rank=r, world_size=w, dist_impl="reduce", chunk_size=7),
    "clip-ring": lambda r, w: ClipLoss(ring=True, rank=r, world_size=w, chunk_size=7),
}


def _reference(name: str, rank: int, world: int):
    if name.startswith("siglip-"):
        return OpenSigLipLoss(rank=rank, world_size=world, dist_impl=name.split("-")[1])
    return OpenClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)


def _memory(loss_fn, args) -> tuple[int, int]:
    """(bytes saved for backward after one forward, bytes of the distinct receive buffers of
    one forward and backward). A receive buffer is one a block or a gradient is received into
    (_exchange's `into`, _broadcast's `buf`). Every buffer is held here until the end, so no
    address is reused and each allocation counts once: a buffer made per step would count W - 1
    times. (Which buffers are alive at a given moment depends on when the collectives release
    them, a matter of timing; how many are made does not.)"""
    saved: dict[int, int] = {}
    buffers: dict[int, torch.Tensor] = {}

    def pack(t):
        s = t.untyped_storage()
        saved[s.data_ptr()] = s.nbytes()
        return t

    def note(into):
        buffers.update((t.untyped_storage().data_ptr(), t) for t in into)

    def exchange(tensors, send_to, recv_from, group, into):
        note(into)
        return original_exchange(tensors, send_to, recv_from, group, into)

    def broadcast(x, src, rank, group, buf):
        if rank != src:
            note([buf])
        return original_broadcast(x, src, rank, group, buf)

    original_exchange, original_broadcast = loss_mod._exchange, loss_mod._broadcast
    loss_mod._exchange, loss_mod._broadcast = exchange, broadcast
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn(*args)
        loss.backward()
    finally:
        loss_mod._exchange, loss_mod._broadcast = original_exchange, original_broadcast
    return sum(saved.values()), sum(t.untyped_storage().nbytes() for t in buffers.values())


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(world)
        img = F.normalize(torch.randn(world * B, D, generator=g), dim=1)
        txt = F.normalize(torch.randn(world * B, D, generator=g), dim=1)
        rows = slice(rank * B, (rank + 1) * B)
        scale, bias = torch.tensor(12.0), torch.tensor(-6.0)
        figures = {}
        for name, make in SETTINGS.items():
            extra = (bias,) if name.startswith("siglip") else ()
            leaves = [x.clone().requires_grad_() for x in (img[rows], txt[rows], scale, *extra)]
            figures[name] = _memory(make(rank, world), leaves)
            ours = grads(make(rank, world), img[rows], txt[rows], scale, *extra)
            theirs = grads(_reference(name, rank, world), img[rows], txt[rows], scale, *extra)
            close(ours, theirs, f"{name} at {world} ranks vs open_clip")
        with open(f"{out}.{rank}", "w") as f:
            json.dump(figures, f)
    finally:
        dist.destroy_process_group()


def _figures(world: int, tmp_path) -> list[dict]:
    out = str(tmp_path / f"world{world}")
    mp.spawn(_worker, args=(world, free_port(), out), nprocs=world, join=True)
    return [json.load(open(f"{out}.{r}")) for r in range(world)]


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("memory")
    return {w: _figures(w, tmp) for w in (2, 4)}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_saved_and_received_bytes_flat_from_2_to_4_ranks(figures, name):
    two, four = figures[2][0][name], figures[4][0][name]
    for ranks in (figures[2], figures[4]):  # every rank saves the same for backward
        assert len({r[name][0] for r in ranks}) == 1, f"{name}: ranks differ {[r[name] for r in ranks]}"
    assert four[0] <= two[0] + SLACK, f"{name}: saved for backward {two[0]} B at 2 ranks, {four[0]} B at 4"
    # receive buffers of one forward and backward: made once per call (one set of visiting
    # blocks and, in backward, the gradients coming home), so the same at 2 and 4 ranks
    block = B * D * 4
    made = {world: [r[name][1] for r in figures[world]] for world in (2, 4)}
    assert 0 < max(made[2] + made[4]) <= 6 * block, f"{name}: receive buffers {made} B"
    assert len(set(made[2] + made[4])) == 1, f"{name}: receive buffers at 2 ranks {made[2]}, at 4 {made[4]}"
