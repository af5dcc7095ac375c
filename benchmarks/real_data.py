"""Real data, side by side: qsamc's subnets against what a user would pick instead, on CamVid, leave one
drive out.

CamVid's val frames are one of its training drives (0016E5), surrounded by that drive's training frames:
val measures fit more than generalisation. So the benchmark runs folds. Fold `val` is the classic run
(train on train less a seeded 10% in runs of 10 consecutive frames, score on val); fold `<drive>` (0001TP,
0006R0, 0016E5) trains on the other two drives (`qsamc train --holdout-match '<drive>_*'`) and scores on the
held-out drive. Each fold, each stage written under --out/<fold> and reused when it is already there
(--fresh redoes all):

1. reference  `qsamc train --schedule fp32`: a SAM-architecture stand-in (vit_t) trained in FP32 from a
              random init (no SAM weights can be downloaded here): the FP32 reference, and the model every
              post-training quantizer starts from.
2. baselines  `qsamc baseline` from the reference, calibrated on the images the reference trained on and
              scored on the fold's images: ModelOpt PTQ (W8A8, W4A8, W4A4), ModelOpt AutoQuantize (6 and 5
              effective weight bits), ONNX Runtime quantize_static (W8A8), and ModelOpt QAT (W8A8, W4A8,
              W4A4: PTQ, then as many steps on the same images as the supernet, distilled from the reference;
              --no-qat leaves it out).
3. supernet   `qsamc train` (progressive, multiplex LoRA) from the reference's encoder and head with the default
              recipe (distillation from the reference alone, logits and features; L2-SP toward its weights at
              10,000, reaching the LoRA adapters: the weights stay the reference's and the quantizers train;
              integer activation zero points, so SAM's zero padding stays 0), holding out what the reference held
              out. `--zero-point continuous` trains it with LSQ+'s continuous offsets, as before 2026-12-07.
4. search     `qsamc search --target cpu --bitops` at each peer's BitOPs and at 1% / 2% of FP32 (attention
              matmuls excluded), scored on images neither trained on nor reported: the held-out 10% in fold
              val, val in the drive folds (for fold 0016E5, val is other frames of the reported drive).
5. evaluate   the supernet's FP32 grid, uniform W8A8 / W4A8 / W4A4, W4A4 with the image input (the patch
              embedding's activations) at 8 bits, and searched subnets on the fold's
              images in PyTorch, each image's confusion matrix kept; in fold val also `qsamc export --target
              cpu` of each (Q/DQ ONNX, every check: mIoU through ONNX Runtime, CPU latency).

The table gives every fold and the mean over the drive folds: mIoU, and each difference to the FP32
reference, to the post-training peer at equal BitOPs and (uniform subnets) to ModelOpt QAT at the same bits with its paired bootstrap 95% interval over images (stratified
by fold for the mean; `qsamc.task.intervals`). An interval that holds 0 is a tie. Writes results.json and
real_data.png (mIoU against BitOPs per fold) under --out; each fold's stage times are in results.json.

    python benchmarks/real_data.py [--data ../shared/data/camvid] [--out runs/real_data] [--folds val,0001TP,...]
                                   [--scale 1.0] [--no-qat] [--fresh]

`--scale` multiplies every training's iterations; `--smoke --scale 0.01` runs every stage in minutes per fold
(a check of the pipeline, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from qsamc.baselines import METHODS, QatSettings, run_baselines
from qsamc.fileio import atomic_torch_save, atomic_write_json
from qsamc.ir.frontend import count_bitops
from qsamc.pipeline import export_subnet, run_search
from qsamc.search.cost import set_group_bits
from qsamc.search.evolution import EvolutionConfig
from qsamc.supernet.quant import ZERO_POINTS
from qsamc.training.config import HEAD_RANGES
from qsamc.supernet.space import Subnet, load_subnet
from qsamc.task.evaluate import ValidationSet, evaluate_subnet
from qsamc.task.intervals import mean_interval, paired_bootstrap
from qsamc.training.config import load_train_config
from qsamc.training.runs import load_supernet
from qsamc.training.splits import search_images
from qsamc.training.train import train

MODEL = "vit_t"
DRIVES = ("0001TP", "0006R0", "0016E5")
FOLDS = ("val", *DRIVES)
REFERENCE = {"schedule": "fp32", "iterations": 1500, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 250,
             "val_limit": 101}
# The default recipe does the rest: from a reference run, distillation from it alone (logits and features) and
# L2-SP toward its weights at 10,000, in the LoRA phase through the adapters (qsamc.training.config).
SUPERNET = {"schedule": "progressive", "lora_variant": "multiplex", "iterations": 1200, "phase1_iterations": 600,
            "batch_size": 4, "lr": 2e-4, "lora_lr": 1e-3, "per_channel": True, "weight_init": "mse",
            "calibration_batches": 8, "checkpoint_every": 200, "val_limit": 101}
# Seeded with the uniform and sensitivity subnets, three generations of 12; qsamc search's default objective
# (fidelity: every supernet here distils from its fold's reference).
SEARCH = EvolutionConfig(population=12, top_k=4, mutations=6, crossovers=6, generations=3, objective="auto")
SMOKE_SEARCH = EvolutionConfig(population=4, top_k=2, mutations=2, crossovers=2, generations=1)  # --smoke
UNIFORM = ((8, 8), (4, 8), (4, 4))
IMAGE_INPUT = "qsamc W4A4, image input A8"  # W4A4 with the patch embedding's input (the image) at 8 bits
LADDER = (0.01, 0.02)  # extra BitOPs budgets, fractions of FP32
SEARCH_IMAGES = 64  # --search-images: qsamc search's default
SMOKE_IMAGES = 8


def stage(fold: str, name: str, done: Path, fresh: bool) -> bool:
    """Whether stage `name` must run (its result `done` is missing, or --fresh)."""
    if done.exists() and not fresh:
        print(f"[{fold}/{name}] reusing {done}", flush=True)
        return False
    print(f"[{fold}/{name}] running", flush=True)
    return True


def scaled(settings: dict, scale: float) -> dict:
    """Training settings with every iteration count times `scale` (at least 2 iterations, 1 in phase 1)."""
    out = dict(settings)
    out["iterations"] = max(2, round(settings["iterations"] * scale))
    if "phase1_iterations" in settings:
        out["phase1_iterations"] = min(out["iterations"] - 1, max(1, round(settings["phase1_iterations"] * scale)))
    out["checkpoint_every"] = max(1, min(out["iterations"], round(settings["checkpoint_every"] * scale)))
    return out


def bitops_exclude(space, subnet) -> int:
    return count_bitops(space, subnet, "exclude")[1].bitops


def fold_holdout(fold: str) -> dict:
    """The training options that hold the fold's images out: a seeded 10% in fold val (the default: runs of 10
    consecutive frames), the drive otherwise."""
    return {} if fold == "val" else {"holdout_match": f"{fold}_*"}


def fold_splits(fold: str) -> tuple[str, str]:
    """(the split a fold reports on, the split it searches on): val and the held-out tenth of train in fold
    val; the held-out drive and val in a drive fold."""
    return ("val", "holdout") if fold == "val" else ("holdout", "val")


def train_reference(fold: str, reference: Path, data: dict, scale: float, fresh: bool) -> None:
    """Stage 1: the fold's FP32 reference, unless it is already there. A stage that runs replaces what an
    earlier (killed or --fresh) run left in its folder."""
    if stage(fold, "reference", reference / "supernet.pt", fresh):
        train(load_train_config(None, {"model": MODEL, "out": str(reference), **data, **fold_holdout(fold),
                                       **scaled(REFERENCE, scale)}), overwrite=True)


def run_fold(fold: str, root: Path, data: dict, scale: float, fresh: bool, smoke: bool = False,
             search_count: int = SEARCH_IMAGES, uniform_guard: bool = False, with_qat: bool = True,
             zero_point: str = "integer", head_ranges: str = "learned") -> dict:
    """Every stage of one fold; returns its rows (label, method, BitOPs, mIoU, ...) and stage times, and
    saves the rows' per-image confusion matrices to <fold>/confusions.pt."""
    reference, supernet, baselines = root / "reference", root / "supernet", root / "baselines"
    search_out, evaluated = root / "search", root / "evaluate"
    scoring_split, search_split = fold_splits(fold)
    times: dict[str, float] = {}
    holdout = fold_holdout(fold)

    started = time.perf_counter()
    train_reference(fold, reference, data, scale, fresh)
    times["reference"] = time.perf_counter() - started

    started = time.perf_counter()
    if stage(fold, "baselines", baselines / "confusions.pt", fresh):
        supernet_settings = scaled(SUPERNET, scale)
        # As many steps on as many images as the supernet, and its loss (the reference's KL alone).
        qat = QatSettings(iterations=supernet_settings["iterations"], batch_size=supernet_settings["batch_size"])
        methods = METHODS + (("modelopt-qat",) if with_qat else ())
        found = run_baselines(reference, data["dataset"], Path(data["data_root"]), baselines, effective_bits=(6.0, 5.0),
                              methods=methods, progress=lambda line: print(f"  {line}", flush=True),
                              overwrite=True, split=scoring_split, per_image=True, qat=qat)
        atomic_torch_save({r.label: r.evaluation.image_confusions for r in found}, baselines / "confusions.pt")
    times["baselines"] = time.perf_counter() - started

    started = time.perf_counter()
    if stage(fold, "supernet", supernet / "supernet.pt", fresh):
        train(load_train_config(None, {"model": MODEL, "out": str(supernet), "checkpoint": str(reference), **data,
                                       **holdout, **scaled(SUPERNET, scale), "zero_point": zero_point,
                                       "head_ranges": head_ranges}), overwrite=True)
    times["supernet"] = time.perf_counter() - started

    peers = json.loads((baselines / "baselines.json").read_text())["results"]
    fp32_bitops = peers[0]["bitops"]
    bitops_budgets = sorted({r["bitops"] for r in peers[1:]} | {int(f * fp32_bitops) for f in LADDER})
    started = time.perf_counter()
    if stage(fold, "search", search_out / "pareto.json", fresh):
        run_search(supernet, "cpu", True, False, [f"{b:.0f}" for b in bitops_budgets], search_out,
                   dataset=data["dataset"], data_root=Path(data["data_root"]),
                   val_limit=SMOKE_IMAGES if smoke else search_count,
                   config=replace(SMOKE_SEARCH if smoke else SEARCH, uniform_guard=uniform_guard),
                   float_macs="exclude", split=search_split, overwrite=True)
    times["search"] = time.perf_counter() - started

    started = time.perf_counter()
    if stage(fold, "evaluate", evaluated / "evaluated.json", fresh):
        model, _, spec = load_supernet(supernet)
        space = spec.space
        largest = space.max_subnet()
        subnets = {"qsamc FP32 grid": space.uniform_bits(largest, 32, 32),
                   **{f"qsamc W{w}A{a}": space.uniform_bits(largest, w, a) for w, a in UNIFORM},
                   IMAGE_INPUT: set_group_bits(space.uniform_bits(largest, 4, 4), {"patch_embed.proj"}, (4, 8))}
        best = json.loads((search_out / "pareto.json").read_text())["best"]
        assert len(best) == len(bitops_budgets), "one best subnet per budget, in the budgets' order"
        budget_of = {}
        for budget, entry in zip(bitops_budgets, best):
            label = f"qsamc search <= {100 * budget / fp32_bitops:.2f}% BitOPs"
            subnets[label], budget_of[label] = load_subnet(search_out / entry["subnet_file"]), budget
        images, _ = search_images(supernet, data["dataset"], Path(data["data_root"]), scoring_split, "semantic")
        scored = ValidationSet(images)
        rows, confusions = [], {}
        for label, subnet in subnets.items():
            evaluation = evaluate_subnet(model, subnet, scored, per_image=True)
            confusions[label] = evaluation.image_confusions
            rows.append({"label": label, "method": "qsamc", "subnet": subnet.to_json(),
                         "bitops": bitops_exclude(space, subnet), "budget": budget_of.get(label),
                         "miou": evaluation.miou, "latency_ms": None, "onnx_miou": None})
            print(f"  {label}: mIoU {evaluation.miou:.4f}", flush=True)
        if fold == "val":
            exported(supernet, subnets, rows, data, evaluated)
        atomic_torch_save(confusions, evaluated / "confusions.pt")
        atomic_write_json(evaluated / "evaluated.json", rows)
    times["evaluate"] = time.perf_counter() - started

    rows = [{"label": r["label"], "method": r["method"], "bitops": r["bitops"], "latency_ms": r["latency_ms"],
             "miou": r["evaluation"]["miou"], "onnx_miou": None, "budget": None} for r in peers]
    rows += json.loads((evaluated / "evaluated.json").read_text())
    confusions = {**torch.load(baselines / "confusions.pt", weights_only=True),
                  **torch.load(evaluated / "confusions.pt", weights_only=True)}
    print(f"[{fold}] stages took " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()), flush=True)
    return {"fold": fold, "scored_on": "CamVid val" if fold == "val" else f"drive {fold} (held out of training)",
            "images": int(next(iter(confusions.values())).shape[0]), "fp32_bitops": fp32_bitops, "rows": rows,
            "seconds": times, "confusions": confusions}


def exported(run: Path, subnets: dict[str, Subnet], rows: list[dict], data: dict, out: Path) -> None:
    """`qsamc export --target cpu` of each subnet with every check (task level on all of val): its mIoU
    through ONNX Runtime and its CPU latency join the subnet's row."""
    for index, ((label, subnet), row) in enumerate(zip(subnets.items(), rows)):
        started = time.perf_counter()
        path = out / f"subnet-{index}.json"
        out.mkdir(parents=True, exist_ok=True)
        subnet.save(path)
        report = export_subnet(run, path, "cpu", "onnx", out / f"export-{index}", dataset=data["dataset"],
                               data_root=Path(data["data_root"]), val_limit=None, overwrite=True)
        task = report.task
        row.update(latency_ms=report.latency.best_ms, onnx_miou=task.onnx_miou, task=task.to_json(),
                   fidelity=report.fidelity.to_json(), worst_part=report.worst_part().to_json())
        fused = "" if task.kernels == "fused" else f" (this CPU's fused INT8 kernels: {task.fused_onnx_miou:.4f})"
        print(f"  [{index + 1}/{len(subnets)}] {label}: ONNX mIoU {task.onnx_miou:.4f}{fused}, "
              f"{report.latency.best_ms:.2f} ms, {time.perf_counter() - started:.0f} s", flush=True)


def uniform_label(row: dict) -> str | None:
    """`W8A8` for the uniform qsamc row `qsamc W8A8` (the bits its peers share), else None."""
    match = re.fullmatch(r"qsamc (W\d+A\d+)", row["label"])
    return match[1] if match and row["method"] == "qsamc" and row.get("budget") is None else None


def peer_of(row: dict, rows: list[dict]) -> dict | None:
    """The post-training peer a qsamc row is judged against at equal BitOPs: ModelOpt PTQ at the same uniform
    bits, or the peer whose BitOPs the search budget was."""
    if row["method"] != "qsamc":
        return None
    if row.get("budget") is None:
        bits = uniform_label(row)
        return next((r for r in rows if r["label"] == f"ModelOpt PTQ {bits}"), None) if bits else None
    return next((r for r in rows if r["method"] not in ("qsamc", "fp32") and r["bitops"] == row["budget"]), None)


def qat_of(row: dict) -> str | None:
    """The ModelOpt QAT row a uniform qsamc subnet is also judged against (same bits, trained as long)."""
    bits = uniform_label(row)
    return f"ModelOpt QAT {bits}" if bits else None


def comparisons(fold: dict) -> list[dict]:
    """Each row of a fold with its differences to the FP32 reference, to its post-training peer and (uniform
    subnets) to ModelOpt QAT at the same bits, and their intervals."""
    confusions, rows = fold["confusions"], fold["rows"]
    reference = confusions["FP32 reference"]
    out = []
    for row in rows:
        peer, qat = peer_of(row, rows), qat_of(row)
        mine = confusions[row["label"]]
        out.append({**row, "vs_fp32": paired_bootstrap(mine, reference).to_json() if row["method"] != "fp32" else None,
                    "peer": peer["label"] if peer else None,
                    "vs_peer": paired_bootstrap(mine, confusions[peer["label"]]).to_json() if peer else None,
                    "vs_qat": paired_bootstrap(mine, confusions[qat]).to_json() if qat in confusions else None})
    return out


def describe(interval: dict | None) -> str:
    if interval is None:
        return "-"
    return f"{100 * interval['difference']:+.2f} [{100 * interval['low']:+.2f}, {100 * interval['high']:+.2f}]"


def report(folds: list[dict], out: Path) -> None:
    summary = {}
    for fold in folds:
        fold["rows"] = comparisons(fold)
        print(f"\n### fold {fold['fold']}: scored on {fold['scored_on']}, {fold['images']} images; stages "
              + ", ".join(f"{k} {v / 60:.1f} min" for k, v in fold["seconds"].items()))
        print("\n| model | % of FP32 BitOPs | mIoU | vs FP32 [95% CI] | peer at equal BitOPs | vs peer [95% CI] | "
              "vs ModelOpt QAT [95% CI] |")
        print("|---|---:|---:|---:|---|---:|---:|")
        for r in sorted(fold["rows"], key=lambda r: -r["bitops"]):
            print(f"| {r['label']} | {100 * r['bitops'] / fold['fp32_bitops']:.2f}% | {100 * r['miou']:.2f} | "
                  f"{describe(r['vs_fp32'])} | {r['peer'] or '-'} | {describe(r['vs_peer'])} | {describe(r['vs_qat'])} |")
    drives = [f for f in folds if f["fold"] in DRIVES]
    if len(drives) > 1:
        labels = [r["label"] for r in drives[0]["rows"] if all(r["label"] in f["confusions"] for f in drives)]
        print(f"\n### mean over the held-out drives ({', '.join(f['fold'] for f in drives)})")
        print("\n| model | mIoU | vs FP32 [95% CI] | worst drive vs FP32 | vs peer [95% CI] | vs ModelOpt QAT [95% CI] |")
        print("|---|---:|---:|---:|---:|---:|")
        for label in labels:
            per_fold = [next(r for r in f["rows"] if r["label"] == label) for f in drives]
            vs_fp32 = None if per_fold[0]["method"] == "fp32" else mean_interval(
                [(f["confusions"][label], f["confusions"]["FP32 reference"]) for f in drives]).to_json()
            peers = [r["peer"] for r in per_fold]
            vs_peer = mean_interval([(f["confusions"][label], f["confusions"][p]) for f, p in zip(drives, peers)]
                                    ).to_json() if all(peers) else None
            qat = qat_of(per_fold[0])
            vs_qat = mean_interval([(f["confusions"][label], f["confusions"][qat]) for f in drives]).to_json() if (
                qat and all(qat in f["confusions"] for f in drives)) else None
            worst = min((r["vs_fp32"]["difference"] for r in per_fold if r["vs_fp32"]), default=None)
            miou = sum(r["miou"] for r in per_fold) / len(per_fold)
            summary[label] = {"miou": miou, "vs_fp32": vs_fp32, "worst_vs_fp32": worst, "vs_peer": vs_peer,
                              "vs_qat": vs_qat}
            print(f"| {label} | {100 * miou:.2f} | {describe(vs_fp32)} | "
                  f"{'-' if worst is None else f'{100 * worst:+.2f}'} | {describe(vs_peer)} | {describe(vs_qat)} |")
    atomic_write_json(out / "results.json", {"folds": [{k: v for k, v in f.items() if k != "confusions"} for f in folds],
                                             "mean_over_drives": summary})
    plot(folds, out / "real_data.png")
    print(f"\nwrote {out / 'results.json'} and {out / 'real_data.png'}")


def plot(folds: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(folds), figsize=(4.2 * len(folds), 4), squeeze=False)
    styles = {"qsamc": ("o", "#1b9e77"), "fp32": ("*", "black"), "modelopt-ptq": ("s", "#d95f02"),
              "modelopt-qat": ("P", "#66a61e"),
              "modelopt-autoquantize": ("D", "#7570b3"), "ort-static": ("^", "#e7298a")}
    for ax, fold in zip(axes[0], folds):
        for method, (marker, colour) in styles.items():
            points = [r for r in fold["rows"] if r["method"] == method]
            if points:
                ax.scatter([100 * r["bitops"] / fold["fp32_bitops"] for r in points], [100 * r["miou"] for r in points],
                           marker=marker, color=colour, label=method, s=40)
        ax.set_xscale("log")
        ax.set_xlabel("BitOPs, % of FP32")
        ax.set_ylabel("mIoU (%)")
        ax.set_title(f"fold {fold['fold']}: {fold['scored_on']}", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("vit_t stand-in on CamVid, leave one drive out: qsamc vs post-training quantization", fontsize=9)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def camvid_arguments(doc: str, out: str, folds: tuple[str, ...]) -> argparse.ArgumentParser:
    """The options every CamVid benchmark takes: --data, --out, --folds and --scale."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "camvid")
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--folds", default=",".join(folds), help=f"Some of {', '.join(folds)}.")
    parser.add_argument("--scale", type=float, default=1.0, help="Multiplies every training's iterations.")
    return parser


def main() -> None:
    parser = camvid_arguments(__doc__, "runs/real_data", FOLDS)
    parser.add_argument("--search-images", type=int, default=SEARCH_IMAGES, help="Images that score search's "
                        "candidates (a stage already there is reused whatever it was searched with).")
    parser.add_argument("--uniform-guard", action="store_true", help="qsamc search --uniform-guard (a stage already "
                        "there is reused whatever it was searched with).")
    parser.add_argument("--no-qat", action="store_true", help="Leave ModelOpt QAT out of the baselines stage (its "
                        "3 x 1,200 steps are most of that stage's time; a stage already there is reused as it is).")
    parser.add_argument("--zero-point", choices=ZERO_POINTS, default="integer", help="The supernet's activation zero "
                        "points (qsamc train --zero-point; a stage already there is reused as it was trained).")
    parser.add_argument("--head-ranges", choices=HEAD_RANGES, default="learned", help="The supernet's head activation "
                        "ranges (qsamc train --head-ranges; a stage already there is reused as it was trained).")
    parser.add_argument("--fresh", action="store_true", help="Redo every stage.")
    parser.add_argument("--smoke", action="store_true", help="A one-generation search on 8 images: checks the "
                        "pipeline, measures nothing (with --scale 0.01, minutes per fold).")
    args = parser.parse_args()
    if not (args.data / "train").is_dir():
        print(f"CamVid not found at {args.data}; skipping the real-data benchmark.")
        return
    folds = args.folds.split(",")
    unknown = [f for f in folds if f not in FOLDS]
    if unknown or not 0 < args.scale <= 10:
        sys.exit(f"error: folds must be some of {', '.join(FOLDS)} and 0 < --scale <= 10")
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    data = {"dataset": "camvid", "data_root": str(args.data.resolve())}
    started = time.perf_counter()
    results = [run_fold(fold, args.out / fold, data, args.scale, args.fresh, args.smoke, args.search_images,
                        args.uniform_guard, not args.no_qat, args.zero_point, args.head_ranges)
               for fold in folds]
    report(results, args.out)
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
