"""Wall time of `qsamc quickstart` alone and beside one other CPU-bound process (issue: shared CPUs).

Each run is a fresh `qsamc quickstart --quiet` into a new folder. The neighbour is a plain PyTorch job
with torch's default settings (all cores, OpenMP's default spin-waiting): a matrix-multiply loop, started
3 s before the quickstart or 20 s into it, and killed after it. Runs:
- `auto` (qsamc's own choice, `qsamc.threads`): alone, with the neighbour there first, with the
  neighbour starting 20 s in (the loops look at the free cores again every few seconds);
- each `--also N`: `--threads N` with the neighbour there first (`--also 2`: the thread count qsamc
  used before, torch's default on 2 cores).
Prints a markdown table: setting, neighbour, threads the command chose (its first line), wall time.

    python benchmarks/quickstart_contention.py [--also 2] [--timeout 900]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NEIGHBOUR = """
import torch
a = torch.randn(1024, 1024)
while True:
    b = a @ a
"""


def quickstart(out: Path, threads: int | None, timeout: float) -> tuple[float | None, str]:
    command = [sys.executable, "-m", "qsamc.cli.main"]
    command += ["--threads", str(threads)] if threads else []
    command += ["quickstart", "--out", str(out), "--quiet"]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "timed out"
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"quickstart failed:\n{done.stderr[-2000:]}")
    first = next((line for line in done.stdout.splitlines() if line.startswith("threads:")), "threads: ?")
    return wall, first.removeprefix("threads: ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--also", type=int, action="append", default=[],
                        help="also run with --threads N (repeatable)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before a run counts as timed out")
    args = parser.parse_args()
    runs = [(None, None), (None, -3.0), (None, 20.0), *((n, -3.0) for n in args.also)]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for threads, start in runs:
            out = Path(scratch) / f"run-{len(rows)}"
            other = None
            if start is not None:
                command = [sys.executable, "-c", f"import time; time.sleep({max(start, 0)})\n{NEIGHBOUR}"]
                other = subprocess.Popen(command)
                time.sleep(max(-start, 0))  # the neighbour is busy before the quickstart starts
            try:
                wall, chosen = quickstart(out, threads, args.timeout)
            finally:
                if other is not None:
                    other.kill()
                    other.wait()
            shutil.rmtree(out, ignore_errors=True)
            neighbour = "no" if start is None else ("there first" if start < 0 else f"from {start:.0f} s in")
            rows.append(("auto" if threads is None else f"--threads {threads}", neighbour, chosen, wall))
            shown = "timed out" if wall is None else f"{wall:.0f} s"
            print(f"[{len(rows)}/{len(runs)}] {rows[-1][0]}, neighbour {neighbour}: {shown}", file=sys.stderr)
    print("\n| setting | one other CPU-bound process | threads chosen | wall time |")
    print("|---|---|---|---:|")
    for setting, neighbour, chosen, wall in rows:
        shown = f"> {args.timeout:.0f} s (timed out)" if wall is None else f"{int(wall // 60)}m{wall % 60:04.1f}s"
        print(f"| {setting} | {neighbour} | {chosen} | {shown} |")


if __name__ == "__main__":
    main()
