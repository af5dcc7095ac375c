"""Light head vs Mask2Former head on the generated shapes: semantic mIoU and instance mask AP of the max
and min subnets, training step time and peak memory.

Each row trains the same `vit_t` supernet from scratch in a fresh `qsamc train` process, with the
quickstart's schedule (progressive, multiplex LoRA, its learning rates), so only the head and the task
differ. The Mask2Former head is sized for this small encoder (`--head-dim`, `--head-queries`,
`--head-layers`); the instance task scores COCO mask AP (COCOeval) on the generated set's instances
(the light head predicts classes per pixel and has no instance row).

    python benchmarks/heads.py [--iterations 300] [--head-dim 64] [--head-queries 16] [--head-layers 3]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def train(out: Path, iterations: int, extra: list[str]) -> dict:
    flags = ["--out", str(out), "--iterations", str(iterations), "--phase1-iterations", str(iterations * 2 // 3),
             "--lr", "1e-3", "--lora-lr", "2e-3", "--checkpoint-every", str(iterations), "--val-limit", "32", *extra]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qsamc.cli.main", "train", "--quiet", *flags], check=True,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    validation = json.loads((out / "validation.json").read_text())
    with open(out / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    metric = "ap" if "ap" in validation["max_subnet"] else "miou"
    return {"metric": metric, "max": validation["max_subnet"][metric], "min": validation["min_subnet"][metric],
            "step_s": statistics.median(1 / float(r["iter_per_s"]) for r in rows),
            "peak_mb": max(float(r["memory_mb"]) for r in rows), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--head-queries", type=int, default=16)
    parser.add_argument("--head-layers", type=int, default=3)
    args = parser.parse_args()
    mask2former = f"mask2former ({args.head_dim} wide, {args.head_queries} queries, {args.head_layers} layers)"
    sized = ["--head", "mask2former", "--head-dim", str(args.head_dim), "--head-queries", str(args.head_queries),
             "--head-layers", str(args.head_layers)]
    rows = [("light (W8A8 conv)", "semantic", ["--head", "light"]),
            (mask2former, "semantic", sized),
            (mask2former, "instance", [*sized, "--task", "instance"])]
    print(f"vit_t on generated shapes, {args.iterations} iterations, batch 4 (quickstart schedule)\n")
    print("| head | task | max subnet | min subnet | step time (s, median) | peak memory (MB) | wall (s) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        for index, (name, task, extra) in enumerate(rows):
            r = train(Path(folder) / str(index), args.iterations, extra)
            label = "mIoU" if r["metric"] == "miou" else "mask AP"
            print(f"| {name} | {task} | {label} {r['max']:.4f} | {label} {r['min']:.4f} | {r['step_s']:.3f} | "
                  f"{r['peak_mb']:.0f} | {r['wall_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
