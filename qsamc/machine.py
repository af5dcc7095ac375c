"""What this machine's CPU is, as figures name it: its model name and its INT8 dot-product instructions."""

from __future__ import annotations

import platform
from pathlib import Path


def _cpuinfo_line(prefix: str) -> str | None:
    try:
        return next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith(prefix)), None)
    except OSError:
        return None


def cpu_name() -> str:
    """The CPU's model name (`/proc/cpuinfo`), or what `platform` knows where there is none."""
    return _cpuinfo_line("model name") or platform.processor() or platform.machine()


def int8_isa() -> str:
    """Which INT8 dot product ONNX Runtime's x86 kernels get here: "AVX512-VNNI", "AVX-VNNI", or "no VNNI"
    (VPMADDUBSW, whose S8S8 / U8S8 pair sums saturate: the `cpu-avx2` target's case); "not x86" elsewhere,
    "unknown" where the flags cannot be read."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "not x86"
    line = _cpuinfo_line("flags")
    if line is None:
        return "unknown"  # no /proc/cpuinfo to read
    flags = set(line.split())
    return "AVX512-VNNI" if "avx512_vnni" in flags else "AVX-VNNI" if "avx_vnni" in flags else "no VNNI"
