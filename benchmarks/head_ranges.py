"""Where fold val's FP32-grid gap sits: the head's learned 8-bit activation ranges.

The task head is W8A8 in every row of `benchmarks/real_data.py` (qsamc's and the peers'), outside the search
space. qsamc trains its two activation quantizers with LSQ+ beside the encoder's; ModelOpt PTQ calibrates its
head's on the training images (max calibration). For each fold given, this scores the trained supernet at
its FP32 grid and uniform W8A8 / W4A8 / W4A4 twice, on the fold's reported split: with the head's learned
ranges, and with them calibrated min-max on the same training images the peers calibrate on (the 32 of
`qsamc baseline`, through the subnet's own encoder), nothing else changed and nothing retrained; and with
one calibration for every subnet (`once`: min-max over the FP32 grid's features, as a supernet's one head
would be calibrated after training, `--once`). Each difference in mIoU points with its paired bootstrap 95%
interval, and the mean over the drive folds given (stratified, as real_data.py's). Writes head_ranges.json
under --root.

    python benchmarks/head_ranges.py --root runs/real_data --folds val,0001TP,0006R0,0016E5 [--once]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from qsamc.baselines import calibration_batches
from qsamc.fileio import atomic_write_json
from qsamc.task.evaluate import ValidationSet, evaluate_subnet
from qsamc.task.head import HEAD_BITS
from qsamc.task.intervals import mean_interval, paired_bootstrap
from qsamc.training.runs import load_supernet
from qsamc.training.splits import run_config, search_images

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_data import fold_splits

BITS = ((32, 32), (8, 8), (4, 8), (4, 4))
CALIBRATION_IMAGES = 32  # qsamc baseline's default: what the peers calibrate on


@torch.no_grad()
def calibrated_head(model: torch.nn.Module, batches: list[torch.Tensor]) -> torch.nn.Module:
    """A copy of `model` whose head's activation ranges are min-max over the features of `batches` through
    the encoder at the subnet it is set to."""
    model = copy.deepcopy(model)
    model.head.calibrate_activations(torch.cat([model.supernet(images) for images in batches]))
    return model


def learned_ranges(model: torch.nn.Module) -> dict[str, list[float]]:
    """Each head activation quantizer's grid, [beta, beta + 255 s]."""
    ranges = {}
    for name in ("conv", "classifier"):
        quantizer = getattr(model.head, name).act_quantizer[HEAD_BITS]
        low = float(quantizer.offset.detach())
        ranges[name] = [low, low + float(quantizer.scale.detach()) * (quantizer.p - quantizer.n)]
    return ranges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="The --out folder of benchmarks/real_data.py.")
    parser.add_argument("--folds", default="val,0001TP,0006R0,0016E5")
    parser.add_argument("--once", action="store_true", help="Calibrate once on the FP32 grid's features and use "
                        "that head for every subnet (default: each subnet's own features).")
    args = parser.parse_args()
    started, results, drive_pairs = time.perf_counter(), {}, {}
    for fold in args.folds.split(","):
        run = args.root / fold / "supernet"
        model, _, spec = load_supernet(run)
        model.eval()
        config = run_config(run)
        images, line = search_images(run, config.dataset, Path(config.data_root), fold_splits(fold)[0], "semantic")
        data = ValidationSet(images)
        largest = spec.space.max_subnet()
        calibration = calibration_batches(config.dataset, Path(config.data_root), CALIBRATION_IMAGES,
                                          largest.resolution, Path(config.checkpoint))
        batches = [batch for batch, _ in calibration]
        model.supernet.set_subnet(spec.space.uniform_bits(largest, 32, 32))
        once = calibrated_head(model, batches) if args.once else None  # one head for every subnet
        ranges = learned_ranges(model)
        print(f"{fold}: {line}; learned head input ranges: "
              + ", ".join(f"{k} [{lo:.2f}, {hi:.2f}]" for k, (lo, hi) in ranges.items()), flush=True)
        results[fold] = {"learned_ranges": ranges, "rows": {}}
        for w, a in BITS:
            subnet = spec.space.uniform_bits(largest, w, a)
            model.supernet.set_subnet(subnet)
            learned = evaluate_subnet(model, subnet, data, per_image=True)
            calibrated = evaluate_subnet(once if args.once else calibrated_head(model, batches), subnet, data,
                                         per_image=True)
            interval = paired_bootstrap(calibrated.image_confusions, learned.image_confusions)
            label = "FP32 grid" if w == 32 else f"W{w}A{a}"
            results[fold]["rows"][label] = {"learned": learned.miou, "calibrated": calibrated.miou,
                                            "calibrated_minus_learned": interval.to_json()}
            if fold != "val":
                drive_pairs.setdefault(label, []).append((calibrated.image_confusions, learned.image_confusions))
            print(f"  {label:9s} learned {100 * learned.miou:6.2f}  min-max calibrated {100 * calibrated.miou:6.2f}  "
                  f"difference {interval.describe()}", flush=True)
    if drive_pairs:
        print(f"mean over the drive folds ({', '.join(f for f in results if f != 'val')}), calibrated - learned:")
        results["mean_over_drives"] = {}
        for label, pairs in drive_pairs.items():
            interval = mean_interval(pairs)
            results["mean_over_drives"][label] = interval.to_json()
            print(f"  {label:9s} {interval.describe()}")
    print(f"{time.perf_counter() - started:.0f} s")
    atomic_write_json(args.root / ("head_ranges_once.json" if args.once else "head_ranges.json"), results)


if __name__ == "__main__":
    sys.exit(main())
