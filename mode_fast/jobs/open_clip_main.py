"""open_clip's own trainer with this project's loss swapped in.

    python -m mode_fast.jobs.open_clip_main --model ViT-B-32 --train-data ... [--siglip] ...
    torchrun --nproc-per-node 8 -m mode_fast.jobs.open_clip_main ...

The arguments are open_clip_train's, unchanged (`python -m open_clip_train.main --help`);
its `main` runs as is. Only the contrastive loss differs: `mode_fast.training.loss.ClipLoss` (or
`SigLipLoss` with --siglip), built with the arguments open_clip would pass to its own
(--local-loss, --gather-with-grad, --loss-dist-impl, rank, world size). Distillation and
CoCa keep open_clip's losses. This project's model configs (mode-fast-tiny, ...) are
registered too, so `--model mode-fast-tiny --dataset-type synthetic` trains on a CPU.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("mode_fast.jobs.open_clip_main")


def create_loss(args: Any) -> Any:
    """open_clip's create_loss(args) with this project's ClipLoss / SigLipLoss."""
    import open_clip

    from mode_fast.training.loop import loss_classes

    if args.distill or "coca" in args.model.lower():
        return open_clip.create_loss(args)  # not contrastive-only: open_clip's own
    clip_loss, siglip_loss, source = loss_classes()
    log.info("contrastive loss from %s", source)
    if args.siglip:
        return siglip_loss(rank=args.rank, world_size=args.world_size, dist_impl=args.loss_dist_impl)
    return clip_loss(
        local_loss=args.local_loss,
        gather_with_grad=args.gather_with_grad,
        cache_labels=True,
        rank=args.rank,
        world_size=args.world_size,
        use_horovod=args.horovod,
    )


def main(argv: Sequence[str] | None = None) -> Any:
    import open_clip_train.main as trainer

    from mode_fast.training.models import register_model_configs

    register_model_configs()
    trainer.create_loss = create_loss  # main() looks the name up in its module at call time
    return trainer.main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
