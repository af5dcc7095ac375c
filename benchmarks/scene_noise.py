"""How far each model moves from the FP32 reference scene by scene, against how far training the reference
again with another seed moves it: the noise floor under which no claim about one clip can be made.

For one fold of `benchmarks/real_data.py` (its `reference`, `supernet`, `search`, `baselines` and `evaluate`
folders), trains the fold's FP32 reference again with `--seed` (same images, same settings; skipped where
`<fold>/reference_seed<seed>` is already there), then scores per scene, in mIoU points against the reference:

- the reported split (fold val: the 101 frames of val), in blocks of `--block` consecutive frames;
- the search split (fold val: the held-out runs of training frames), in its runs of consecutive frames
  (a drive fold has no held-out runs: its search split is val, scored in blocks).

Rows: the second reference (the floor), every row `real_data.py` reported (ModelOpt PTQ / QAT /
AutoQuantize, ONNX Runtime, the supernet's uniform subnets, the searched subnets: read from the fold's
per-image confusions, so they are the same figures), and on the search split the supernet's uniform subnets
and the searched subnets scored again. Writes scene_noise.json and scene_noise.png under the fold.

`--supernet RUN` scores another supernet trained from the fold's reference with the same held-out images (a
recipe) instead: its uniform subnets on both splits, beside the second reference (scene_noise_<RUN's name>.*).

    python benchmarks/scene_noise.py --fold runs/real_data/val [--seed 1] [--block 10] [--supernet RUN]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from qsamc.fileio import atomic_write_json, save_figure
from qsamc.supernet.space import load_subnet
from qsamc.task.evaluate import ValidationSet, evaluate_subnet
from qsamc.task.holdout import name_order
from qsamc.task.intervals import miou_of
from qsamc.training.runs import load_supernet
from qsamc.training.splits import run_config, search_images
from qsamc.training.train import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_data import fold_splits

UNIFORM = ((32, 32), (8, 8), (4, 8), (4, 4))


def runs_of(positions: list[int]) -> list[list[int]]:
    """Indices into `positions` (each image's place in its split's file-name order, ascending) grouped into
    runs of consecutive places."""
    runs: list[list[int]] = []
    for i, place in enumerate(positions):
        if runs and place == positions[runs[-1][-1]] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def blocks_of(count: int, block: int) -> list[list[int]]:
    return [list(range(start, min(start + block, count))) for start in range(0, count, block)]


def scene_differences(a: torch.Tensor, b: torch.Tensor, scenes: list[list[int]]) -> list[float]:
    """mIoU(a) - mIoU(b) in points on each scene's images, from per-image confusions [N, C, C]."""
    return [100 * float(miou_of(a[s].sum(0)) - miou_of(b[s].sum(0))) for s in scenes]


def retrained_reference(fold: Path, seed: int) -> Path:
    """The fold's reference trained again with `seed` (every other setting, and the held-out images, as it)."""
    out = fold / f"reference_seed{seed}"
    if not (out / "supernet.pt").exists():
        print(f"training the reference again with seed {seed} -> {out}", flush=True)
        train(replace(run_config(fold / "reference"), seed=seed, out=str(out)), overwrite=True)
    return out


def float_model(run: Path):
    """A reference run's model and its largest subnet, the head float (as the FP32 reference row)."""
    model, _, spec = load_supernet(run)
    model.head.set_bits(32)
    return model, spec.space.max_subnet()


def split_scenes(run: Path, split: str, block: int) -> tuple[ValidationSet, list[list[int]], str]:
    config = run_config(run)
    images, _ = search_images(run, config.dataset, Path(config.data_root), split, "semantic")
    if split == "holdout" and config.holdout_match == "":
        train_order = name_order(images.base)
        place = {index: p for p, index in enumerate(train_order)}
        scenes = runs_of([place[i] for i in images.indices])
        how = "runs of consecutive training frames"
    else:
        scenes = blocks_of(len(images), block)
        how = f"blocks of {block} consecutive frames"
    return ValidationSet(images), scenes, how


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fold", type=Path, default=Path("runs/real_data/val"), help="A fold of real_data.py.")
    parser.add_argument("--seed", type=int, default=1, help="Seed of the reference trained again.")
    parser.add_argument("--block", type=int, default=10, help="Frames per scene of a split without runs.")
    parser.add_argument("--supernet", type=Path, default=None,
                        help="Another supernet run from the fold's reference: its uniform subnets on both splits.")
    args = parser.parse_args()
    fold = args.fold
    parts = ("reference", "supernet") if args.supernet else ("reference", "supernet", "search", "baselines", "evaluate")
    for part in parts:
        if not (fold / part).is_dir():
            sys.exit(f"{fold} is not a finished fold of benchmarks/real_data.py: it has no {part}/ folder")
    start = time.perf_counter()
    second = retrained_reference(fold, args.seed)
    report_split, search_split = fold_splits(fold.name)
    reference, reference_subnet = float_model(fold / "reference")
    again, again_subnet = float_model(second)
    run = args.supernet or fold / "supernet"
    if args.supernet and run_config(run) is None:
        sys.exit(f"{run} is not a supernet run (it has no readable config.json)")
    supernet, _, spec = load_supernet(run)
    largest = spec.space.max_subnet()
    searched = {} if args.supernet else {f"qsamc search <= {p.stem[5:]} BitOPs": load_subnet(p)
                                         for p in sorted((fold / "search").glob("best-*.json"))}
    result = {"fold": fold.name, "seed": args.seed, "supernet": str(run), "splits": {}}
    for split in (report_split, search_split):
        data, scenes, how = split_scenes(fold / "supernet", split, args.block)
        base = evaluate_subnet(reference, reference_subnet, data, per_image=True).image_confusions
        rows = {f"FP32 reference, seed {args.seed}": evaluate_subnet(again, again_subnet, data, per_image=True).image_confusions}
        if split == report_split and not args.supernet:  # every row real_data.py reported, from its confusions
            for part in ("baselines", "evaluate"):
                rows.update(torch.load(fold / part / "confusions.pt", weights_only=True))
            rows.pop("FP32 reference", None)
        else:
            for w, a in UNIFORM:
                label = "qsamc FP32 grid" if w == 32 else f"qsamc W{w}A{a}"
                rows[label] = evaluate_subnet(supernet, spec.space.uniform_bits(largest, w, a), data, per_image=True).image_confusions
            for label, subnet in searched.items():
                rows[label] = evaluate_subnet(supernet, subnet, data, per_image=True).image_confusions
        table = {}
        for label, confusions in rows.items():
            per_scene = scene_differences(confusions, base, scenes)
            table[label] = {"all": 100 * float(miou_of(confusions.sum(0)) - miou_of(base.sum(0))), "scenes": per_scene,
                            "spread": float(torch.tensor(per_scene).abs().mean())}
        result["splits"][split] = {"scenes": how, "sizes": [len(s) for s in scenes],
                                   "reference": 100 * float(miou_of(base.sum(0))), "rows": table}
        print(f"\n{split}: {sum(len(s) for s in scenes)} images in {len(scenes)} {how}; FP32 reference "
              f"{result['splits'][split]['reference']:.2f}")
        print("| model | vs reference, all images | per scene | mean abs per scene |")
        print("|---|---:|---|---:|")
        for label, row in table.items():
            print(f"| {label} | {row['all']:+.2f} | {' '.join(f'{d:+.1f}' for d in row['scenes'])} | {row['spread']:.2f} |")
    result["seconds"] = time.perf_counter() - start
    name = f"scene_noise_{run.name}" if args.supernet else "scene_noise"
    atomic_write_json(fold / f"{name}.json", result)
    plot(result, fold / f"{name}.png")
    print(f"\n{result['seconds'] / 60:.1f} min; wrote {fold / name}.json and .png")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = result["splits"]
    fig, axes = plt.subplots(1, len(splits), figsize=(7 * len(splits), 5.5), squeeze=False)
    for ax, (split, data) in zip(axes[0], splits.items()):
        labels = list(data["rows"])
        for y, label in enumerate(labels):
            row = data["rows"][label]
            ax.scatter(row["scenes"], [y] * len(row["scenes"]), s=12, alpha=0.6, color="C0")
            ax.scatter([row["all"]], [y], marker="|", s=200, color="C3")
        floor = data["rows"][f"FP32 reference, seed {result['seed']}"]["spread"]
        ax.axvspan(-floor, floor, color="grey", alpha=0.15, label="second reference's mean abs per scene")
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("mIoU points vs the FP32 reference (dots: scenes, bar: all images)")
        ax.set_title(f"{split}: {len(data['sizes'])} {data['scenes']}", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"fold {result['fold']}: per-scene distance from the reference")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
