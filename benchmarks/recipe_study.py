"""What keeps a supernet as general as its FP32 reference: training recipes side by side, leave one drive out.

On a CamVid drive nobody trained on, a supernet trained with cross-entropy on the labels plus per-pixel KL
from the reference lost 3-5 mIoU points that post-training quantization keeps (docs/benchmarks.md). This
study trains one supernet per recipe from the same reference, in each fold, and scores each at the FP32 grid
and uniform W8A8 / W4A8 / W4A4 on the held-out drive, beside the reference and ModelOpt PTQ at the same
bits. Per fold (`<drive>`: trained without that drive, scored on it; `val`: trained on train less a seeded 10%,
scored on val), under --out/<fold>:

1. reference   `qsamc train --schedule fp32` (benchmarks/real_data.py's settings and holdout).
2. peers       `qsamc baseline --split holdout` (`val` in fold val): the reference and ModelOpt PTQ, scored on the
               fold's images.
3. <recipe>    `qsamc train` from the reference with BASE (real_data's supernet settings before this study) and the
               recipe's changes.

Recipes (RECIPES): `calibrated` (2 iterations: quantizers calibrated, MSE weight scales, nothing learned;
what post-training quantization does), `ce+kl` (the recipe before this study), `kl+feat` (no labels:
logits KL and feature distillation from the reference), `kl+feat+l2sp` (and a pull toward the reference's
weights), `lora kl+feat` (LoRA from the start, no full-parameter phase); then three changes to `kl+feat+l2sp`:
`detach` (multiplex LoRA's base adapter trains only where a layer is at 32 bits, the paper's Alg. 2),
`full-res` (phase 1 up to the native resolution), `l2sp 1000` (a 10x stronger pull) and `sandwich` (largest,
smallest and one sampled subnet per step, a third of the iterations); `lora zeroed` (not trained: the
`kl+feat+l2sp` supernet with its LoRA adapters zeroed) and `full 600` (no LoRA: all weights for the default's
phase-1 iterations); `lora l2sp` (L2-SP's pull reaches the adapters: each B toward 0) and `lora rank 0` (no
adapters: phase 2 trains the quantizers and the head on phase 1's frozen weights); `lora rest 2e-4` (the default,
with the LoRA phase's step sizes, offsets and head at phase 1's learning rate); `l2sp 10000` (`lora l2sp` with a
100x stronger pull: the default since 2026-12-07, where learning rate x 10,000 >= 1 holds the weights at the
reference's and the quantizers train). A recipe folder that holds a
trained supernet is scored without training it again.
Each difference to the reference and to ModelOpt PTQ has a paired bootstrap 95% interval over images; the mean over folds a stratified one.
Writes results.json and recipe_study.png under --out.

    python benchmarks/recipe_study.py [--data ../shared/data/camvid] [--out runs/recipe_study]
                                      [--folds 0001TP,0006R0,0016E5] [--recipes ce+kl,kl+feat] [--scale 1.0]

(`--folds val` reports that fold alone: run it apart from the drives, whose mean the report is.)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from qsamc.baselines import run_baselines
from qsamc.fileio import atomic_torch_save, atomic_write_json
from qsamc.sam import get_config
from qsamc.supernet.lora import LowRank
from qsamc.task.evaluate import ValidationSet, evaluate_subnet
from qsamc.task.intervals import mean_interval, miou_of, paired_bootstrap
from qsamc.training.config import load_train_config
from qsamc.training.runs import load_supernet
from qsamc.training.splits import search_images
from qsamc.training.train import train
from real_data import (DRIVES, FOLDS, MODEL, UNIFORM, camvid_arguments, describe, fold_holdout, fold_splits, scaled,
                       stage, train_reference)

# The supernet settings every recipe starts from: real_data.py's before this study (progressive multiplex LoRA,
# 1200 iterations, cross-entropy + logits KL from the reference), kept here so that the study reruns as it ran.
BASE = {"schedule": "progressive", "lora_variant": "multiplex", "iterations": 1200, "phase1_iterations": 600,
        "batch_size": 4, "lr": 2e-4, "lora_lr": 1e-3, "per_channel": True, "weight_init": "mse",
        "distill": "reference", "calibration_batches": 8, "checkpoint_every": 200, "val_limit": 101,
        "lora_detach": False, "l2sp_lora": False}
DISTILLED = {"label_weight": 0.0, "distill_weight": 1.0, "feature_weight": 1.0}
RECIPES = {
    "calibrated": {"iterations": 2, "phase1_iterations": 1, "label_weight": 1.0, "distill_weight": 1.0,
                   "feature_weight": 0.0, "l2sp": 0.0},  # not scaled
    "ce+kl": {"label_weight": 1.0, "distill_weight": 1.0, "feature_weight": 0.0, "l2sp": 0.0},
    "kl+feat": {**DISTILLED, "l2sp": 0.0},
    "kl+feat+l2sp": {**DISTILLED, "l2sp": 100.0},
    "lora kl+feat": {**DISTILLED, "schedule": "lora", "l2sp": 0.0},
    # Three candidates for what still moves the default (kl+feat+l2sp) on drive 0016E5: the multiplex base
    # adapter, which every bit-width trains and the FP32 grid wears (`detach`: it trains only where a layer is
    # at 32 bits, the paper's Alg. 2); phase 1 capped below the reference's resolution (`full-res`); a pull
    # too weak (`l2sp 1000`, 10x the default's).
    "detach": {**DISTILLED, "l2sp": 100.0, "lora_detach": True},
    "full-res": {**DISTILLED, "l2sp": 100.0, "phase1_max_resolution": get_config(MODEL).img_size},
    "l2sp 1000": {**DISTILLED, "l2sp": 1000.0},
    # The sandwich rule (BigNAS): each step trains the largest subnet (FP32, distilled from the reference), the
    # smallest and one sampled, so the FP32 grid is held to the reference at every step; a third of the
    # iterations keeps the compute of the others (not scaled by --scale).
    "sandwich": {**DISTILLED, "l2sp": 100.0, "sampling": "sandwich", "iterations": 400, "phase1_iterations": 200},
    # No LoRA at all: all weights and quantizers for as many iterations as the default's phase 1 (QFA*'s
    # schedule, anchored and distilled), after the default's adapters, zeroed, were found to cost held-out
    # drives what its phase 1 had kept (not scaled by --scale).
    "full 600": {**DISTILLED, "l2sp": 100.0, "schedule": "full", "iterations": 600},
    # L2-SP reaching the LoRA phase: the default's pull toward the reference's weights stopped at phase 2, where
    # W0 is frozen and the adapters alone move W0 + BA; here each adapter's B is pulled toward 0 as well.
    "lora l2sp": {**DISTILLED, "l2sp": 100.0, "l2sp_lora": True},
    # No adapters at all: phase 2 trains the quantizers and the head on phase 1's frozen weights (what `lora
    # zeroed` measures, as a recipe).
    "lora rank 0": {**DISTILLED, "l2sp": 100.0, "lora_rank": 0},
    # `lora l2sp` (the default before `l2sp 10000`) with what trains beside the adapters in the LoRA phase (quantizer step sizes and
    # offsets, the head) at phase 1's learning rate instead of the adapters' 5x higher one.
    "lora rest 2e-4": {**DISTILLED, "l2sp": 100.0, "l2sp_lora": True, "lora_rest_lr": 2e-4},
    # `lora l2sp` with a 100x stronger pull: the one that kept fold val's reference inside a second reference's
    # seed noise on its held-out runs (benchmarks/scene_noise.py --supernet); the default since 2026-12-07.
    "l2sp 10000": {**DISTILLED, "l2sp": 10000.0, "l2sp_lora": True},
}
# Scored, not trained: another recipe's supernet with every LoRA adapter zeroed (its phase-1 weights and its
# quantizers as trained), what that recipe's phase 2 adds measured by taking it away.
ZEROED = {"lora zeroed": "kl+feat+l2sp"}
SUBNETS = (("FP32 grid", 32, 32), *((f"W{w}A{a}", w, a) for w, a in UNIFORM))


def recipe_folder(root: Path, recipe: str) -> Path:
    return root / recipe.replace(" ", "_").replace("+", "-")


@torch.no_grad()
def zero_lora(model: torch.nn.Module) -> None:
    """Every adapter's update BA to zero (B = 0, as LoRA starts)."""
    for module in model.modules():
        if isinstance(module, LowRank):
            module.B.zero_()


def recipe_settings(recipe: str, scale: float) -> dict:
    settings = scaled(BASE, scale)
    changes = RECIPES[recipe]
    if "iterations" in changes:
        settings["checkpoint_every"] = changes["iterations"]
    return {**settings, **changes}


def run_fold(fold: str, root: Path, data: dict, recipes: list[str], scale: float) -> dict:
    """Every stage of one fold; returns {label: per-image confusions} on the held-out drive and stage times."""
    reference, peers = root / "reference", root / "peers"
    holdout = fold_holdout(fold)
    scoring_split, _ = fold_splits(fold)
    times = {}
    started = time.perf_counter()
    train_reference(fold, reference, data, scale, False)
    times["reference"] = time.perf_counter() - started
    started = time.perf_counter()
    if stage(fold, "peers", peers / "confusions.pt", False):
        found = run_baselines(reference, data["dataset"], Path(data["data_root"]), peers, methods=("modelopt-ptq",),
                              overwrite=True, split=scoring_split, per_image=True)
        atomic_torch_save({r.label: r.evaluation.image_confusions for r in found}, peers / "confusions.pt")
    times["peers"] = time.perf_counter() - started
    confusions = torch.load(peers / "confusions.pt", weights_only=True)
    for recipe in recipes:
        run = recipe_folder(root, recipe)
        trained = recipe_folder(root, ZEROED[recipe]) if recipe in ZEROED else run
        started = time.perf_counter()
        if stage(fold, recipe, run / "confusions.pt", False):
            if recipe in ZEROED and not (trained / "supernet.pt").is_file():
                sys.exit(f"error: '{recipe}' scores the '{ZEROED[recipe]}' supernet: train that recipe first")
            if recipe not in ZEROED and stage(fold, f"{recipe} training", run / "supernet.pt", False):
                train(load_train_config(None, {"model": MODEL, "out": str(run), "checkpoint": str(reference), **data,
                                               **holdout, **recipe_settings(recipe, scale)}), overwrite=True)
            model, _, spec = load_supernet(trained)
            if recipe in ZEROED:
                zero_lora(model)
                run.mkdir(parents=True, exist_ok=True)
            images, _ = search_images(trained, data["dataset"], Path(data["data_root"]), scoring_split, "semantic")
            scored = ValidationSet(images)
            largest = spec.space.max_subnet()
            found = {f"{recipe} {name}": evaluate_subnet(model, spec.space.uniform_bits(largest, w, a), scored,
                                                         per_image=True).image_confusions for name, w, a in SUBNETS}
            atomic_torch_save(found, run / "confusions.pt")
        confusions.update(torch.load(run / "confusions.pt", weights_only=True))
        times[recipe] = time.perf_counter() - started
    print(f"[{fold}] stages took " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()), flush=True)
    return {"fold": fold, "confusions": confusions, "seconds": times}


def peer_label(label: str) -> str | None:
    bits = label.split()[-1]
    return None if bits == "grid" else f"ModelOpt PTQ {bits}"


def report(folds: list[dict], recipes: list[str], out: Path) -> None:
    reference = "FP32 reference"
    labels = [f"ModelOpt PTQ {name}" for name, _, _ in SUBNETS[1:]]
    labels += [f"{recipe} {name}" for recipe in recipes for name, _, _ in SUBNETS]
    rows = []
    print(f"\n### {len(folds)} held-out drive(s): {', '.join(f['fold'] for f in folds)} "
          f"({', '.join(str(int(f['confusions'][reference].shape[0])) for f in folds)} images)")
    print("\n| model | mIoU | vs FP32, mean [95% CI] | per drive vs FP32 | worst | vs ModelOpt PTQ [95% CI] |")
    print("|---|---:|---:|---|---:|---:|")
    for label in [reference, *labels]:
        per_fold = [paired_bootstrap(f["confusions"][label], f["confusions"][reference]) for f in folds]
        miou = sum(float(miou_of(f['confusions'][label].sum(0))) for f in folds) / len(folds)
        row = {"label": label, "miou": miou, "per_fold": {f["fold"]: i.to_json() for f, i in zip(folds, per_fold)}}
        if label != reference:
            row["vs_fp32"] = mean_interval([(f["confusions"][label], f["confusions"][reference]) for f in folds]).to_json()
            peer = peer_label(label) if not label.startswith("ModelOpt") else None
            row["vs_peer"] = mean_interval([(f["confusions"][label], f["confusions"][peer]) for f in folds]
                                           ).to_json() if peer else None
        rows.append(row)
        drives = " / ".join(f"{100 * i.difference:+.1f}" for i in per_fold)
        worst = min(i.difference for i in per_fold)
        print(f"| {label} | {100 * miou:.2f} | {describe(row.get('vs_fp32'))} | {drives if label != reference else '-'} | "
              f"{f'{100 * worst:+.2f}' if label != reference else '-'} | {describe(row.get('vs_peer'))} |")
    atomic_write_json(out / "results.json", {"folds": [{"fold": f["fold"], "seconds": f["seconds"]} for f in folds],
                                             "rows": rows})
    plot(rows, recipes, out / "recipe_study.png")
    print(f"\nwrote {out / 'results.json'} and {out / 'recipe_study.png'}")


def plot(rows: list[dict], recipes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_label = {r["label"]: r for r in rows}
    methods = ["ModelOpt PTQ", *recipes]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(methods)
    for k, method in enumerate(methods):
        for j, (name, _, _) in enumerate(SUBNETS):
            row = by_label.get(f"{method} {name}")
            if row is None:
                continue
            interval = row["vs_fp32"]
            x = j + (k - len(methods) / 2 + 0.5) * width
            ax.bar(x, 100 * interval["difference"], width, color=f"C{k}", label=method if j == 1 else None)
            ax.errorbar(x, 100 * interval["difference"], color="black", capsize=2, linewidth=0.8,
                        yerr=[[100 * (interval["difference"] - interval["low"])],
                              [100 * (interval["high"] - interval["difference"])]])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(SUBNETS)), [name for name, _, _ in SUBNETS])
    ax.set_ylabel("mIoU vs FP32 reference (points)")
    ax.set_title("held-out CamVid drives, mean over folds, 95% CI (vit_t stand-in)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = camvid_arguments(__doc__, "runs/recipe_study", DRIVES)
    known = (*RECIPES, *ZEROED)
    parser.add_argument("--recipes", default=",".join(known), help=f"Some of {', '.join(known)}.")
    args = parser.parse_args()
    if not (args.data / "train").is_dir():
        print(f"CamVid not found at {args.data}; skipping the recipe study.")
        return
    folds, recipes = args.folds.split(","), args.recipes.split(",")
    if [f for f in folds if f not in FOLDS] or [r for r in recipes if r not in known] or not 0 < args.scale <= 10:
        sys.exit(f"error: folds must be some of {', '.join(FOLDS)}, recipes some of {', '.join(known)}, "
                 f"and 0 < --scale <= 10")
    data = {"dataset": "camvid", "data_root": str(args.data.resolve())}
    started = time.perf_counter()
    results = [run_fold(fold, args.out / fold, data, recipes, args.scale) for fold in folds]
    report(results, recipes, args.out)
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
