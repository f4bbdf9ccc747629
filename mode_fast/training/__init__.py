"""Training MoDE data experts: models, checkpoints, the contrastive losses as open_clip drop-ins,
the training loop's pieces.
"""

from mode_fast.core.moved import forward

__getattr__ = forward(__name__)  # the 0.1 module mode_fast.training (see mode_fast.core.moved)
