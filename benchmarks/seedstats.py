"""What several benchmarks report the same way: statistics over seeds, and the CPU they ran on."""

from __future__ import annotations

import statistics
import subprocess
from collections.abc import Sequence


def mean_sd(values: Sequence[float]) -> dict:
    """Mean, sample sd (0 for one value) and count; mean and sd are None when there are no values."""
    values = list(values)
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def mean_curve(curves: Sequence[Sequence[float] | None]) -> list[float] | None:
    """Point-wise mean of several runs' curves over the length they all reach; None if a run has none."""
    if not curves or not all(curves):
        return None
    width = min(len(c) for c in curves)
    return [statistics.fmean(c[i] for c in curves) for i in range(width)]


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (results depend on it: see the README's note on CPU kinds)."""
    try:
        out = subprocess.run(["grep", "-m1", "model name", "/proc/cpuinfo"], capture_output=True, text=True)
        return out.stdout.split(":", 1)[1].strip()
    except (OSError, IndexError):
        return "unknown"
