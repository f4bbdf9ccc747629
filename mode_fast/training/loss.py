"""Drop-in replacements for open_clip_torch 3.3's ClipLoss and SigLipLoss on the fused loss.

Same constructor arguments, ``forward`` signatures and return forms (``output_dict``)
as ``open_clip.loss``; ``local_loss`` / ``gather_with_grad`` keep open_clip's meaning
over torch.distributed. Extra keyword-only arguments:

- ``group``: a process group (default: the global one). ``rank`` and ``world_size`` are
  then ranks and size *within* that group.
- ``ring=True`` (ClipLoss): each rank's feature blocks visit every other rank one at a
  time (step k: rank r's to rank r + k) and are never all gathered, so memory is O(local B * D) whatever the world size.
  Each rank's loss and gradients are those of ``local_loss=True, gather_with_grad=True``:
  the mean of the ranks' losses is the global-batch loss, each rank's feature gradients
  are d(sum of the ranks' losses)/d(its features), and the logit scale's gradient is
  that of the rank's own loss, so DDP's gradient average gives the one-process gradient.
- ``backend`` / ``chunk_size``: passed to the kernels (``mode_fast.kernels.contrastive_loss``);
  ``mode_fast.kernels.dispatch`` resolves ``"auto"`` per call and variant.
- ``deterministic=True``: the kernels add no floats atomically and fix every reduction
  order, so a process gives the same bits on every run for the same inputs (the torch
  path always does). Across ranks, the collectives' own reduction order (NCCL / gloo)
  is outside this promise.
- ``bwd``: the Triton backward's dK pass, ``"columns"`` (no atomics) or ``"atomic"``;
  ``None`` takes ``mode_fast.kernels.dispatch.contrastive_bwd()``'s default.

Kernels by setting (``backend="auto"``: Triton on CUDA, the chunked torch path elsewhere):
one process and the plain all-gather run the square fused kernel (both directions from
each tile); ``local_loss=True`` runs the rectangular rows kernel twice (local images
against all texts, local texts against all images); ``ring=True`` runs it once per ring
step per direction, merging each block into the running log-sum-exp; SigLIP runs the
square kernel on the local pairs and the negatives-only rectangular kernel on every other
rank's text block.

Peak memory of the loss itself: O(B * D) saved for backward plus O(chunk * B)
temporaries (torch backend) or a few tiles (Triton), where B is the number of columns
(the gathered batch, or the local batch with ``ring=True`` and SigLIP's ``shift`` /
``bidir`` / ``reduce``, whose visiting blocks are passed again in backward, not kept).
No B x B tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

if dist.is_available():
    # torch.distributed.nn (the all_gather that carries gradients) is a submodule that
    # `import torch.distributed` does not load; without this line gather_with_grad fails
    # with AttributeError in any process that has not imported open_clip first.
    import torch.distributed.nn

from mode_fast.kernels import dispatch
from mode_fast.kernels.contrastive_loss import (
    _as_scalar_tensor,
    _check_features,
    _grad_like,
    _kernel_kw,
    _row_dots,
    _sub_labels,
    _without_autocast,
    clip_loss,
    local_clip_loss,
    pick_backend,
    ring_block_backward,
    ring_block_forward,
    siglip_block_backward,
    siglip_block_forward,
    siglip_loss,
)

__all__ = ["ClipLoss", "SigLipLoss", "ring_clip_loss", "siglip_loss_over_ranks"]


def _check_world(rank: int, world_size: int, group) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"world_size={world_size} > 1 needs torch.distributed initialised (init_process_group)")
    actual = dist.get_world_size(group)
    if actual != world_size:
        raise ValueError(f"world_size={world_size} but the process group has {actual} ranks")
    if dist.get_rank(group) != rank:
        raise ValueError(f"rank={rank} but this process is rank {dist.get_rank(group)} in the process group")


def _gather(x: torch.Tensor, with_grad: bool, keep_local: bool, rank: int, world_size: int, group):
    """open_clip's gather_features for one tensor, on `group`."""
    if with_grad:
        # backward sums every rank's gradient for each block back onto its owner
        return torch.cat(torch.distributed.nn.all_gather(x, group=group or dist.group.WORLD), 0)
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    if keep_local:
        parts[rank] = x  # the local block keeps its graph
    return torch.cat(parts, 0)


def _global(rank: int, group) -> int:
    return dist.get_global_rank(group, rank) if group is not None else rank


def _exchange(tensors: list[torch.Tensor], send_to: int, recv_from: int, group, into: list[torch.Tensor]) -> None:
    """Send each tensor to group rank send_to; receive same-shaped ones from recv_from into `into`."""
    to, frm = _global(send_to, group), _global(recv_from, group)
    ops = [dist.P2POp(dist.isend, t.contiguous(), to, group=group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, frm, group=group) for r in into]
    for req in dist.batch_isend_irecv(ops):
        req.wait()


class _Visits:
    """Every other rank's blocks, one at a time, in one receive buffer set made once.

    Step k (1 .. W - 1): this rank sends its own tensors to rank + k and receives rank - k's.
    Passing blocks along a ring would hold two buffer sets from three ranks on (the one being
    forwarded and the one arriving) against one at two ranks; sending the owner's tensors
    directly holds one set at every world size, with the same bytes sent per step. In
    backward the gradients coming home are received into that same set (the step is done
    with the visiting block by then), so a step holds the visitor and its gradient only. The
    buffers are made once: a fresh buffer per step was measured to grow the CPU process's
    peak RSS by about two blocks per step (glibc raises its mmap threshold after the first
    free and serves later blocks from a heap that fragments).
    """

    def __init__(self, tensors: list[torch.Tensor], rank: int, world_size: int, group):
        self.own = [t.detach() for t in tensors]
        self.rank, self.world_size, self.group = rank, world_size, group
        self._into: list[torch.Tensor] | None = None  # made on first use
        self._back: list[torch.Tensor] | None = None

    def visit(self, k: int) -> list[torch.Tensor]:
        """Rank (rank - k)'s tensors (the buffers are overwritten by the next visit)."""
        if self._into is None:
            self._into = [torch.empty_like(t) for t in self.own]
        w = self.world_size
        _exchange(self.own, (self.rank + k) % w, (self.rank - k) % w, self.group, self._into)
        return self._into

    def send_back(self, k: int, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Return step k's gradients to the visitor's owner (rank - k) and receive this rank's own
        from rank + k, into the visiting blocks' buffers (step k is done with them) where dtype
        and shape fit, else into buffers made once. Read them before the next visit."""
        if self._back is None:
            fits = [b.dtype == g.dtype and b.shape == g.shape for b, g in zip(self._into, grads)]
            self._back = [b if fit else torch.empty_like(g) for b, g, fit in zip(self._into, grads, fits)]
        w = self.world_size
        _exchange(grads, (self.rank - k) % w, (self.rank + k) % w, self.group, self._back)
        return self._back


def _broadcast(x: torch.Tensor, src: int, rank: int, group, buf: torch.Tensor) -> torch.Tensor:
    """Group rank src's x on every rank: received into buf elsewhere; src's own x, not copied."""
    if rank == src:
        buf = x.detach().contiguous()
    dist.broadcast(buf, _global(src, group), group=group)
    return buf


class _RingClip(torch.autograd.Function):
    """Local-rows CLIP loss against every rank's block, the blocks visiting one at a time.

    Forward: W - 1 visits of another rank's (images, texts) (_Visits); the row LSE of local
    images against each text block and of local texts against each image block, each step
    merged into the running LSE (ring_block_forward). Backward: the blocks visit again;
    every rank adds its rows' contributions to its own gradients and the visiting block's
    to an accumulator (ring_block_backward), which goes straight back to the block's owner.
    """

    @staticmethod
    @_without_autocast
    def forward(ctx, img, txt, scale_t, rank, world_size, group, backend, chunk, kw):
        scale = float(scale_t)
        lse_i = ring_block_forward(img, txt, scale, None, backend, chunk=chunk, **kw)
        lse_t = ring_block_forward(txt, img, scale, None, backend, chunk=chunk, **kw)
        visits = _Visits([img, txt], rank, world_size, group)
        for k in range(1, world_size):
            blk_i, blk_t = visits.visit(k)
            ring_block_forward(img, blk_t, scale, lse_i, backend, chunk=chunk, **kw)
            ring_block_forward(txt, blk_i, scale, lse_t, backend, chunk=chunk, **kw)
        pos = scale * _row_dots(img, txt)
        ctx.save_for_backward(img, txt, scale_t, lse_i, lse_t)
        ctx.ring = (rank, world_size, group, backend, chunk, kw)
        return 0.5 * (lse_i.sum() + lse_t.sum() - 2.0 * pos.sum()) / img.shape[0]

    @staticmethod
    @_without_autocast
    def backward(ctx, grad):
        img, txt, scale_t, lse_i, lse_t = ctx.saved_tensors
        rank, world_size, group, backend, chunk, kw = ctx.ring
        scale, b = float(scale_t), img.shape[0]
        g = float(grad) / (2.0 * b)
        d_img = torch.zeros(img.shape, dtype=torch.float32, device=img.device)
        d_txt = torch.zeros_like(d_img)
        # the local block: its column gradients are this rank's own
        d_scale = ring_block_backward(img, txt, scale, lse_i, g, d_img, d_txt, backend, chunk=chunk, **kw)
        d_scale += ring_block_backward(txt, img, scale, lse_t, g, d_txt, d_img, backend, chunk=chunk, **kw)
        if world_size > 1:
            visits = _Visits([img, txt], rank, world_size, group)
            acc_i, acc_t = torch.empty_like(d_img), torch.empty_like(d_img)  # made once (see _Visits)
        for k in range(1, world_size):
            blk_i, blk_t = visits.visit(k)
            acc_i.zero_(), acc_t.zero_()  # the visiting block's gradients
            d_scale += ring_block_backward(img, blk_t, scale, lse_i, g, d_img, acc_t, backend, chunk=chunk, **kw)
            d_scale += ring_block_backward(txt, blk_i, scale, lse_t, g, d_txt, acc_i, backend, chunk=chunk, **kw)
            in_i, in_t = visits.send_back(k, [acc_i, acc_t])
            d_img += in_i
            d_txt += in_t
        _sub_labels(d_img, d_txt, img, txt, 0, 2.0 * g * scale)  # the positives: -2g delta_ij of dLogits
        d_scale -= 2.0 * g * float(_row_dots(img, txt).sum())
        return (
            d_img.to(img.dtype) if ctx.needs_input_grad[0] else None,
            d_txt.to(txt.dtype) if ctx.needs_input_grad[1] else None,
            _grad_like(d_scale, scale_t, ctx.needs_input_grad[2]),
            None,
            None,
            None,
            None,
            None,
            None,
        )


def ring_clip_loss(
    image_features,
    text_features,
    logit_scale,
    rank: int,
    world_size: int,
    group=None,
    chunk_size: int | None = None,
    backend: str = "auto",
    *,
    deterministic: bool = False,
    bwd: str | None = None,
) -> torch.Tensor:
    """CLIP loss of the local rows against all ranks' blocks without gathering them (see module doc).

    Every rank must hold the same number of rows.
    """
    _check_features(image_features, text_features)
    scale_t = _as_scalar_tensor(logit_scale, "logit_scale", image_features)
    backend = pick_backend(dispatch.RING_BLOCK, image_features, backend)
    kw = _kernel_kw(False, deterministic, bwd)
    return _RingClip.apply(image_features, text_features, scale_t, rank, world_size, group, backend, chunk_size, kw)


class ClipLoss(nn.Module):
    """open_clip.loss.ClipLoss on the fused O(B*D)-memory loss (module doc: extras)."""

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        ring: bool = False,
        group=None,
        backend: str = "auto",
        chunk_size: int | None = None,
        deterministic: bool = False,
        bwd: str | None = None,
    ):
        super().__init__()
        if use_horovod:
            raise ValueError(
                "use_horovod=True is not supported by mode_fast.training.loss.ClipLoss; "
                "use open_clip.loss.ClipLoss or torch.distributed"
            )
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels  # labels are implicit (the diagonal): nothing to cache
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.ring = ring
        self.group = group
        self.backend = backend
        self.chunk_size = chunk_size
        self.deterministic = deterministic
        self.bwd = bwd
        self.prev_num_logits = 0
        self.labels: dict = {}

    def _kw(self) -> dict:
        return {"deterministic": self.deterministic, "bwd": self.bwd}

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        if self.world_size > 1:
            _check_world(self.rank, self.world_size, self.group)
        if self.world_size > 1 and self.ring:
            loss = ring_clip_loss(
                image_features,
                text_features,
                logit_scale,
                self.rank,
                self.world_size,
                self.group,
                self.chunk_size,
                self.backend,
                **self._kw(),
            )
        elif self.world_size > 1:
            args = (self.gather_with_grad, not self.local_loss, self.rank, self.world_size, self.group)
            all_img = _gather(image_features, *args)
            all_txt = _gather(text_features, *args)
            if self.local_loss:
                loss = local_clip_loss(
                    image_features,
                    text_features,
                    all_img,
                    all_txt,
                    logit_scale,
                    self.rank * image_features.shape[0],
                    backend=self.backend,
                    chunk_size=self.chunk_size,
                    **self._kw(),
                )
            else:
                loss = clip_loss(all_img, all_txt, logit_scale, self.backend, chunk_size=self.chunk_size, **self._kw())
        else:
            loss = clip_loss(
                image_features, text_features, logit_scale, self.backend, chunk_size=self.chunk_size, **self._kw()
            )
        if logit_bias is not None:
            # a bias shifts every logit of a row alike: softmax cross-entropy is unchanged and
            # its gradient is 0; kept in the graph so logit_bias.grad is 0, not None
            loss = loss + 0.0 * logit_bias.sum()
        return {"contrastive_loss": loss} if output_dict else loss


class _SigLipOverRanks(torch.autograd.Function):
    """SigLIP of the local images against the local texts (positives) and every other
    rank's text block (negatives only), the blocks visiting one at a time.

    how="ring" (dist_impl shift / bidir): W - 1 visits (_Visits: step k, rank r's block to
    rank r + k); how="reduce": each rank's block broadcast in turn. Forward keeps only the
    local features: a visiting block is dropped once its negatives are summed (SigLIP has
    no normaliser to keep). Backward brings the blocks again the same way; the gradient of
    a visiting block goes straight back to its owner ("ring") or is summed onto it
    (dist.reduce). Per-rank memory is O(B * D) whatever the world size, in buffers made
    once per call.
    """

    @staticmethod
    @_without_autocast
    def forward(ctx, img, txt, scale_t, bias_t, how, rank, world_size, group, backends, chunk, kw):
        scale, bias = float(scale_t), float(bias_t)
        backend, neg = backends  # the positives' and the negatives' (dispatch picks each variant)
        loss = siglip_block_forward(img, txt, scale, bias, True, backend, chunk, kw)
        if how == "ring":
            visits = _Visits([txt], rank, world_size, group)
            for k in range(1, world_size):
                (blk,) = visits.visit(k)
                loss = loss + siglip_block_forward(img, blk, scale, bias, False, neg, chunk, kw)
        else:
            buf = torch.empty_like(txt)  # one receive buffer for every broadcast (see _Visits)
            for src in range(world_size):
                blk = _broadcast(txt, src, rank, group, buf)
                if src != rank:
                    loss = loss + siglip_block_forward(img, blk, scale, bias, False, neg, chunk, kw)
        ctx.save_for_backward(img, txt, scale_t, bias_t)
        ctx.opts = (how, rank, world_size, group, backends, chunk, kw)
        return loss

    @staticmethod
    @_without_autocast
    def backward(ctx, grad):
        img, txt, scale_t, bias_t = ctx.saved_tensors
        how, rank, world_size, group, (backend, neg), chunk, kw = ctx.opts
        scale, bias, g = float(scale_t), float(bias_t), float(grad)
        d_img, d_txt, d_scale, d_bias = siglip_block_backward(img, txt, scale, bias, g, True, backend, chunk, kw)
        if how == "ring":
            visits = _Visits([txt], rank, world_size, group)
            acc = torch.empty_like(d_txt)  # made once (see _Visits)
            for k in range(1, world_size):
                (blk,) = visits.visit(k)
                acc.zero_()  # the visiting block's gradient
                _, _, ds, db = siglip_block_backward(img, blk, scale, bias, g, False, neg, chunk, kw, (d_img, acc))
                d_scale, d_bias = d_scale + ds, d_bias + db
                d_txt += visits.send_back(k, [acc])[0]
        else:
            buf, dt = torch.empty_like(txt), torch.empty_like(d_txt)  # made once (see _Visits)
            for src in range(world_size):
                blk = _broadcast(txt, src, rank, group, buf)
                dt.zero_()
                if src != rank:
                    _, _, ds, db = siglip_block_backward(img, blk, scale, bias, g, False, neg, chunk, kw, (d_img, dt))
                    d_scale, d_bias = d_scale + ds, d_bias + db
                dist.reduce(dt, _global(src, group), group=group)  # every rank's share onto the owner
                if src == rank:
                    d_txt += dt
        return (
            d_img.to(img.dtype) if ctx.needs_input_grad[0] else None,
            d_txt.to(txt.dtype) if ctx.needs_input_grad[1] else None,
            _grad_like(d_scale, scale_t, ctx.needs_input_grad[2]),
            _grad_like(d_bias, bias_t, ctx.needs_input_grad[3]),
            *([None] * 7),
        )


def siglip_loss_over_ranks(
    image_features,
    text_features,
    logit_scale,
    logit_bias,
    rank: int,
    world_size: int,
    how: str = "ring",
    group=None,
    chunk_size: int | None = None,
    backend: str = "auto",
    *,
    deterministic: bool = False,
    bwd: str | None = None,
) -> torch.Tensor:
    """open_clip's distributed SigLIP loss of this rank (local pairs + every other rank's
    texts as negatives), the text blocks visiting by point-to-point steps (how="ring") or broadcasts
    (how="reduce"), none kept for backward (see _SigLipOverRanks). Equal batches per rank."""
    _check_features(image_features, text_features)
    scale_t = _as_scalar_tensor(logit_scale, "logit_scale", image_features)
    bias_t = _as_scalar_tensor(logit_bias, "logit_bias", image_features)
    backends = (
        pick_backend(dispatch.SIGLIP, image_features, backend),
        pick_backend(dispatch.SIGLIP_NEGATIVES, image_features, backend),
    )
    kw = _kernel_kw(False, deterministic, bwd)
    return _SigLipOverRanks.apply(
        image_features, text_features, scale_t, bias_t, how, rank, world_size, group, backends, chunk_size, kw
    )


class SigLipLoss(nn.Module):
    """open_clip.loss.SigLipLoss on the tiled sigmoid loss (module doc: extras).

    dist_impl: 'shift' and 'bidir' send each rank's text block to every other rank in
    turn (open_clip passes them along a ring, 'bidir' in both directions; same values and
    gradients, same bytes per step); 'reduce' broadcasts each rank's block in turn; none of these keeps a visiting block for
    backward, which passes the blocks again (siglip_loss_over_ranks). 'gather'
    all-gathers the text features with gradient (memory grows with the world).
    """

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: str | None = None,
        *,
        group=None,
        backend: str = "auto",
        chunk_size: int | None = None,
        deterministic: bool = False,
        bwd: str | None = None,
    ):
        super().__init__()
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or "bidir"
        if self.dist_impl not in ("bidir", "shift", "reduce", "gather"):
            raise ValueError(f"dist_impl must be 'bidir', 'shift', 'reduce' or 'gather', got {dist_impl!r}")
        self.group = group
        self.backend = backend
        self.chunk_size = chunk_size
        self.deterministic = deterministic
        self.bwd = bwd
        self.prev_num_logits = 0
        self.labels: dict = {}

    def _negatives(self, image_features, text_block, logit_scale, logit_bias):
        return siglip_loss(
            image_features,
            text_block,
            logit_scale,
            logit_bias,
            self.backend,
            positives=False,
            chunk_size=self.chunk_size,
            deterministic=self.deterministic,
            bwd=self.bwd,
        )

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict=False):
        if self.world_size > 1 and self.dist_impl != "gather":
            _check_world(self.rank, self.world_size, self.group)
            loss = siglip_loss_over_ranks(
                image_features,
                text_features,
                logit_scale,
                logit_bias,
                self.rank,
                self.world_size,
                "reduce" if self.dist_impl == "reduce" else "ring",
                self.group,
                self.chunk_size,
                self.backend,
                deterministic=self.deterministic,
                bwd=self.bwd,
            )
            return {"contrastive_loss": loss} if output_dict else loss
        loss = siglip_loss(
            image_features,
            text_features,
            logit_scale,
            logit_bias,
            self.backend,
            chunk_size=self.chunk_size,
            deterministic=self.deterministic,
            bwd=self.bwd,
        )
        if self.world_size > 1:  # gather: every rank's text block at once, with gradient
            _check_world(self.rank, self.world_size, self.group)
            blocks = torch.distributed.nn.all_gather(text_features, group=self.group or dist.group.WORLD)
            for k, block in enumerate(blocks):
                if k != self.rank:
                    loss = loss + self._negatives(image_features, block, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss
