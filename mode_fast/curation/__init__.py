"""MetaCLIP curation: the matcher, metadata lists, the per-shard passes, balancing, worldwide
(MetaCLIP 2) language handling.
"""

from mode_fast.core.moved import forward

__getattr__ = forward(__name__)  # the 0.1 module mode_fast.curation (see mode_fast.core.moved)
