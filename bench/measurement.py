"""What a benchmark reads off the process and the device while it measures: peak memory, and a device sync so
that a wall-clock timer covers the device's queued work."""

from __future__ import annotations

import resource
import sys

import torch


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock timer measures it (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
