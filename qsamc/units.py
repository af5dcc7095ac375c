"""SI prefixes for MACs, BitOPs and bytes, one table for reading budgets and for printing figures; the clocks
latencies are read on."""

from __future__ import annotations

import time

# `qsamc profile --clock`: the timing thread's CPU time (robust on a shared machine) or wall time
CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}

SI = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}


def si_prefix(value: float) -> tuple[str, float]:
    """The largest prefix that `value` reaches, and its scale ("" and 1 below a thousand)."""
    return next(((p, s) for p, s in reversed(SI.items()) if abs(value) >= s), ("", 1.0))


def human(value: float, unit: str = "") -> str:
    """1.49e12 -> '1.49 T' (as BitOPs, MACs and sizes are usually quoted)."""
    prefix, scale = si_prefix(value)
    return f"{value / scale:.2f} {prefix}{unit}" if prefix else f"{value:.0f} {unit}".strip()
