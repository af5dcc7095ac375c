"""`cpu` (S8S8 Q/DQ) against `cpu-avx2` (the same model in U8U8) on this CPU: what ONNX Runtime's fused INT8
kernels compute and how fast.

Each subnet of a trained run is exported twice with `qsamc export` (every check, the task check on all of
the run's validation images): `--target cpu` and `--target cpu-avx2`. For each export: the PyTorch
subnet's mIoU, ONNX Runtime's with its fused kernels (as deployed) and whether the export verified with
them or only with the graph as written (`kernels`), the whole model's error against PyTorch with the fused
kernels (mean / max of the output's peak), and the latency of the two written models timed interleaved
(batch 1, median and best of --runs, --threads threads). On a CPU without
VNNI the S8S8 kernels saturate (VPMADDUBSW); with VNNI both forms should compute the same.

    python benchmarks/cpu_avx2.py --run runs/r8/val/supernet [--subnets W8A8,W4A8,W4A4] [--runs 50] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import onnx
import torch

from qsamc.export.ort import ort_session, time_runs
from qsamc.machine import cpu_name, int8_isa
from qsamc.pipeline import export_subnet
from qsamc.training.runs import load_supernet

TARGETS = ("cpu", "cpu-avx2")


def fused_figures(report) -> tuple[float, float, float]:
    """(ONNX Runtime mIoU, whole-model mean and max error of the output's peak), with the fused kernels."""
    task, fidelity = report.task, report.fidelity
    miou = task.onnx_miou if task.kernels == "fused" else task.fused_onnx_miou
    if fidelity.kernels == "fused":
        return miou, fidelity.mean_rel, fidelity.max_rel
    return miou, fidelity.fused_mean_rel, fidelity.fused_max_rel


def interleaved_latency(models: dict[str, onnx.ModelProto], resolution: int, runs: int,
                        threads: int) -> dict[str, list[float]]:
    # Threads sleep between runs: a spinning session would still hold the cores when the other one starts.
    sessions = {name: ort_session(model, threads=threads) for name, model in models.items()}
    feed = {"image": torch.randn(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)).numpy()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for name, session in sessions.items():  # warm-up
        time_runs(lambda: session.run(None, feed), warmup=2, repeats=0)
    for _ in range(runs):
        for name, session in sessions.items():
            times[name] += [1e3 * t for t in time_runs(lambda: session.run(None, feed), warmup=0, repeats=1)]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="A trained supernet run folder.")
    parser.add_argument("--subnets", default="W8A8,W4A8,W4A4", help="Uniform subnets of the largest architecture.")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    _, _, spec = load_supernet(args.run)
    space, started = spec.space, time.perf_counter()
    print(f"## `cpu` vs `cpu-avx2` exports of {args.run} ({cpu_name()}, {int8_isa()}, ONNX Runtime "
          f"{__import__('onnxruntime').__version__}; latency: {args.threads} threads, batch 1, median / best of "
          f"{args.runs} interleaved runs)\n")
    print("| subnet | target | PyTorch mIoU | ONNX Runtime mIoU, fused kernels | verified with | whole model error, "
          "mean / max of peak (fused) | latency median / best ms |")
    print("|---|---|---:|---:|---|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        for bits in args.subnets.split(","):
            w, a = (int(b) for b in bits.removeprefix("W").split("A"))
            subnet = space.uniform_bits(space.max_subnet(), w, a)
            path = Path(folder) / f"{bits}.json"
            subnet.save(path)
            reports, models = {}, {}
            for name in TARGETS:
                out = Path(folder) / f"{bits}-{name}"
                reports[name] = export_subnet(args.run, path, name, "onnx", out, val_limit=None)
                models[name] = onnx.load(out / "encoder.onnx")
            times = interleaved_latency(models, subnet.resolution, args.runs, args.threads)
            for name, report in reports.items():
                miou, mean_rel, max_rel = fused_figures(report)
                kernels = "fused kernels" if report.task.kernels == report.fidelity.kernels == "fused" else \
                    "the graph as written (fused kernels missed)"
                print(f"| {bits} | {name} | {100 * report.task.pytorch_miou:.2f} | {100 * miou:.2f} | {kernels} | "
                      f"{mean_rel:.1e} / {max_rel:.1e} | {statistics.median(times[name]):.1f} / {min(times[name]):.1f} |",
                      flush=True)
    print(f"\n({report.task.val_images} validation images; {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
