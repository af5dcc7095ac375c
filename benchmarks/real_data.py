"""Real data, side by side: qsamc's searched subnets against what a user would pick instead, on CamVid.

One run, six stages, each written under --out and reused when it is already there (--fresh redoes all):

1. reference  `qsamc train --schedule fp32`: a SAM-architecture stand-in (vit_t) trained in FP32 on
              CamVid train from a random init (no SAM weights can be downloaded here): the FP32
              reference, and the model every post-training quantizer starts from.
2. baselines  `qsamc baseline` from the reference: ModelOpt PTQ (W8A8, W4A8, W4A4), ModelOpt
              AutoQuantize (6 and 5 effective weight bits), ONNX Runtime quantize_static (W8A8).
3. supernet   `qsamc train` (progressive, multiplex LoRA) from the reference's encoder and head, with
              inplace distillation from it, MSE-initialised per-channel weight scales and activation
              ranges calibrated on training images.
4. profile    `qsamc profile --target cpu`: the measured ONNX Runtime latency table.
5. search     `qsamc search --target cpu` on the held-out training images (the 10% of train that reference
              and supernet both never trained on; val stays unseen; population 16, 4
              generations, seeded with uniform-precision subnets) under BitOPs budgets (attention
              matmuls excluded) at each baseline's BitOPs and at 1% and 2% of FP32, and under CPU latency
              budgets at the table's latency of the uniform W8A8 / W4A8 / W4A4 largest subnets and at
              3/4 of the fastest of them.
6. evaluate   the supernet's FP32 grid and uniform W8A8 / W4A8 / W4A4 largest subnets and every searched
              subnet: `qsamc export --target cpu` (Q/DQ ONNX, every check), val mIoU in PyTorch and
              through ONNX Runtime (encoder in ONNX Runtime, the supernet's W8A8 head), CPU latency.

Everything is scored on CamVid val (101 images, never trained on). Prints a markdown table and writes
results.json and real_data.png (mIoU against BitOPs and against CPU latency) under --out.

    python benchmarks/real_data.py [--data ../shared/data/camvid] [--out runs/real_data] [--fresh]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from qsamc.ir.frontend import count_bitops
from qsamc.baselines import run_baselines
from qsamc.fileio import atomic_write_json
from qsamc.training.runs import load_supernet
from qsamc.profiling.timers import ProfileSettings
from qsamc.search.latency_table import LatencyTable, TableLatency
from qsamc.pipeline import export_subnet, profile_target, run_search
from qsamc.search.evolution import EvolutionConfig
from qsamc.supernet.space import Subnet, load_subnet
from qsamc.targets import get_target
from qsamc.training.train import train
from qsamc.training.config import load_train_config

MODEL = "vit_t"
REFERENCE = {"schedule": "fp32", "iterations": 1500, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 250,
             "val_limit": 101}
SUPERNET = {"schedule": "progressive", "lora_variant": "multiplex", "iterations": 1200, "phase1_iterations": 600,
            "batch_size": 4, "lr": 2e-4, "lora_lr": 1e-3, "per_channel": True, "weight_init": "mse",
            "distill": "reference", "calibration_batches": 8, "checkpoint_every": 200, "val_limit": 101}
SEARCH = EvolutionConfig(population=16, top_k=4, mutations=8, crossovers=8, generations=4)
UNIFORM = ((8, 8), (4, 8), (4, 4))
LADDER = (0.01, 0.02)  # extra BitOPs budgets, fractions of FP32
SEARCH_IMAGES = 64
LATENCY_FRACTION = 0.75  # an extra latency budget, a fraction of the fastest uniform subnet's


def stage(name: str, done: Path, fresh: bool) -> bool:
    """Whether stage `name` must run (its result `done` is missing, or --fresh)."""
    if done.exists() and not fresh:
        print(f"[{name}] reusing {done}", flush=True)
        return False
    print(f"[{name}] running", flush=True)
    return True


def bitops_exclude(space, subnet) -> int:
    return count_bitops(space, subnet, "exclude")[1].bitops


def evaluate_subnets(run: Path, subnets: dict[str, Subnet], data: dict, out: Path) -> list[dict]:
    """Export each subnet for `cpu` with every check (task level on all of val) and collect its figures."""
    rows = []
    out.mkdir(parents=True, exist_ok=True)
    for index, (label, subnet) in enumerate(subnets.items()):
        started = time.perf_counter()
        path = out / f"subnet-{index}.json"
        subnet.save(path)
        report = export_subnet(run, path, "cpu", "onnx", out / f"export-{index}", dataset=data["dataset"],
                               data_root=Path(data["data_root"]), val_limit=None, overwrite=True)
        space = load_supernet_spec(run).space
        rows.append({"label": label, "method": "qsamc", "subnet": subnet.to_json(),
                     "bitops": bitops_exclude(space, subnet), "latency_ms": report.latency.best_ms,
                     "miou": report.task.pytorch_miou, "onnx_miou": report.task.onnx_miou,
                     "fidelity": report.fidelity.to_json(), "worst_part": report.worst_part().to_json()})
        print(f"  [{index + 1}/{len(subnets)}] {label}: mIoU {rows[-1]['miou']:.4f} (ONNX {rows[-1]['onnx_miou']:.4f}), "
              f"{rows[-1]['latency_ms']:.2f} ms, {time.perf_counter() - started:.0f} s", flush=True)
    return rows


def load_supernet_spec(run: Path):
    from qsamc.training.runs import read_spec

    return read_spec(run / "supernet.json")


def plot(rows: list[dict], fp32_bitops: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"qsamc": ("o", "#1b9e77"), "fp32": ("*", "black"), "modelopt-ptq": ("s", "#d95f02"),
              "modelopt-autoquantize": ("D", "#7570b3"), "ort-static": ("^", "#e7298a")}
    for ax, key, xlabel in ((axes[0], "bitops", "BitOPs, % of FP32 (attention matmuls excluded)"),
                            (axes[1], "latency_ms", "ONNX Runtime CPU latency (ms, best of 10, 2 threads)")):
        for method, (marker, colour) in styles.items():
            points = [r for r in rows if r["method"] == method and r.get(key) is not None]
            if not points:
                continue
            xs = [100 * r[key] / fp32_bitops if key == "bitops" else r[key] for r in points]
            ax.scatter(xs, [100 * r["miou"] for r in points], marker=marker, color=colour, label=method, s=40)
        if key == "bitops":
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("CamVid val mIoU (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("vit_t stand-in on CamVid: qsamc subnets vs post-training quantization of the same FP32 model", fontsize=9)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "camvid")
    parser.add_argument("--out", type=Path, default=Path("runs/real_data"))
    parser.add_argument("--fresh", action="store_true", help="Redo every stage.")
    parser.add_argument("--stages", default="reference,baselines,supernet,profile,search,evaluate")
    args = parser.parse_args()
    if not (args.data / "train").is_dir():
        print(f"CamVid not found at {args.data}; skipping the real-data benchmark.")
        return
    stages = set(args.stages.split(","))
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    data = {"dataset": "camvid", "data_root": str(args.data.resolve())}
    reference, supernet, baselines = args.out / "reference", args.out / "supernet", args.out / "baselines"
    table, search_out, evaluated = args.out / "latency-cpu.json", args.out / "search", args.out / "evaluate"
    started = time.perf_counter()

    if "reference" in stages and stage("reference", reference / "supernet.pt", args.fresh):
        # A stage that runs replaces what an earlier (killed or --fresh) run left in its folder.
        train(load_train_config(None, {"model": MODEL, "out": str(reference), **data, **REFERENCE}), overwrite=True)
    if "baselines" in stages and stage("baselines", baselines / "baselines.json", args.fresh):
        run_baselines(reference, data["dataset"], Path(data["data_root"]), baselines, effective_bits=(6.0, 5.0),
                      progress=lambda line: print(f"  {line}", flush=True), overwrite=True)
    if "supernet" in stages and stage("supernet", supernet / "supernet.pt", args.fresh):
        train(load_train_config(None, {"model": MODEL, "out": str(supernet), "checkpoint": str(reference),
                                       **data, **SUPERNET}), overwrite=True)
    if "profile" in stages and stage("profile", table, args.fresh):
        profile_target("cpu", MODEL, table, ProfileSettings())

    peers = json.loads((baselines / "baselines.json").read_text())["results"]
    space = load_supernet_spec(supernet).space
    fp32_bitops = peers[0]["bitops"]
    if "search" in stages and stage("search", search_out / "latency" / "pareto.json", args.fresh):
        bitops_budgets = sorted({r["bitops"] for r in peers[1:]} | {int(f * fp32_bitops) for f in LADDER})
        run_search(supernet, "cpu", True, False, [f"{b:.6e}" for b in bitops_budgets], search_out / "bitops",
                   dataset=data["dataset"], data_root=Path(data["data_root"]), val_limit=SEARCH_IMAGES,
                   config=SEARCH, float_macs="exclude", overwrite=True)
        model, ir, spec = load_supernet(supernet)
        latency = TableLatency(LatencyTable.load(table), spec.space, get_target("cpu"), source=str(table))
        uniform = [latency.cost(spec.space.uniform_bits(spec.space.max_subnet(), w, a)) for w, a in UNIFORM]
        latency_budgets = sorted({round(b, 6) for b in uniform} | {round(LATENCY_FRACTION * min(uniform), 6)})
        run_search(supernet, "cpu", False, True, [f"{1e3 * b:.4f}ms" for b in latency_budgets], search_out / "latency",
                   table=table, dataset=data["dataset"], data_root=Path(data["data_root"]), val_limit=SEARCH_IMAGES,
                   config=SEARCH, overwrite=True)
    if "evaluate" in stages and stage("evaluate", evaluated / "evaluated.json", args.fresh):
        largest = space.max_subnet()
        subnets = {"qsamc FP32 grid": space.uniform_bits(largest, 32, 32),
                   **{f"qsamc W{w}A{a}": space.uniform_bits(largest, w, a) for w, a in UNIFORM}}
        for kind in ("bitops", "latency"):
            for best in json.loads((search_out / kind / "pareto.json").read_text())["best"]:
                subnets[f"qsamc search {kind} <= {best['budgets'][0]}"] = load_subnet(search_out / kind / best["subnet_file"])
        rows = evaluate_subnets(supernet, subnets, data, evaluated)
        atomic_write_json(evaluated / "evaluated.json", rows)

    rows = [{"label": r["label"], "method": r["method"], "bitops": r["bitops"], "latency_ms": r["latency_ms"],
             "miou": r["evaluation"]["miou"], "onnx_miou": None} for r in peers]
    rows += json.loads((evaluated / "evaluated.json").read_text())
    report(rows, fp32_bitops, args.out)
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)


def report(rows: list[dict], fp32_bitops: int, out: Path) -> None:
    fp32 = next(r["miou"] for r in rows if r["method"] == "fp32")
    print("\n| model | BitOPs | % of FP32 | CPU latency (ms) | val mIoU (PyTorch) | val mIoU (ONNX Runtime) | vs FP32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: -r["bitops"]):
        latency = "-" if r["latency_ms"] is None else f"{r['latency_ms']:.2f}"
        onnx_miou = "-" if r.get("onnx_miou") is None else f"{100 * r['onnx_miou']:.2f}"
        print(f"| {r['label']} | {r['bitops'] / 1e9:.2f} G | {100 * r['bitops'] / fp32_bitops:.2f}% | {latency} | "
              f"{100 * r['miou']:.2f} | {onnx_miou} | {100 * (r['miou'] - fp32):+.2f} |")
    within = [r for r in rows if r["method"] == "qsamc" and r["miou"] >= fp32 - 0.01]
    if within:
        best = min(within, key=lambda r: r["bitops"])
        print(f"\nsmallest qsamc subnet within 1 mIoU point of FP32 ({100 * fp32:.2f}): {best['label']}, "
              f"{100 * best['bitops'] / fp32_bitops:.2f}% of FP32 BitOPs, mIoU {100 * best['miou']:.2f}")
    else:
        print("\nno qsamc subnet is within 1 mIoU point of FP32")
    atomic_write_json(out / "results.json", {"fp32_bitops": fp32_bitops, "rows": rows})
    plot(rows, fp32_bitops, out / "real_data.png")
    print(f"wrote {out / 'results.json'} and {out / 'real_data.png'}")


if __name__ == "__main__":
    sys.exit(main())
