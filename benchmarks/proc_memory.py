"""Linux process memory for benchmarks run in a fresh interpreter.

Peak RSS of one phase: call reset_peak() when the phase starts, then
status_mb("VmHWM") - the VmRSS read at the start is what the phase added.
"""

from __future__ import annotations


def status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak() -> None:
    # Writing 5 to clear_refs resets the kernel's peak-RSS mark (VmHWM) to the current RSS.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
