"""Run a Triton check under TRITON_INTERPRET=1 in a fresh interpreter and read its result.

Triton reads TRITON_INTERPRET when kernels are decorated, so it must be set before triton is
imported: the test process itself (which may have imported triton already) cannot switch.
The child prints a JSON object as its last line of output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_interpreted(args: list[str]) -> dict:
    """`python ARGS` with TRITON_INTERPRET=1; the JSON object it printed last."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
