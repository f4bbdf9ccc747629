"""A free TCP port on 127.0.0.1, for the tests that start gloo process groups or torchrun."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port the OS reports free now (another process may take it before use; the OS picks
    from its ephemeral range, so two tests rarely collide)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
