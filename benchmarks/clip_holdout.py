"""Fold val of `benchmarks/real_data.py` with a held-out clip as the search split, instead of a seeded tenth
of frames.

A seeded tenth of CamVid's training frames holds frames one second from frames the supernet trained on.
This holds out a clip instead (`--match`, a file-name glob: `0016E5_00*` is frames 00390-00990 of drive
0016E5, 21 images some 7,000 frames before val's), trains the FP32 reference and the supernet without it
(real_data.py's settings), searches on it at real_data.py's fold-val budgets (read from `--budgets-from`,
that fold's baselines) and scores the uniform and searched subnets on val. No peers are trained.

    python benchmarks/clip_holdout.py [--match '0016E5_00*'] [--out runs/clip_holdout]
                                      [--budgets-from runs/real_data/val] [--objective loss|miou]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import real_data as R
from qsamc.pipeline import run_search
from qsamc.supernet.space import load_subnet
from qsamc.task.evaluate import ValidationSet, evaluate_subnet
from qsamc.training.config import load_train_config
from qsamc.training.runs import load_supernet
from qsamc.training.splits import search_images
from qsamc.training.train import train


def main() -> None:
    parser = R.camvid_arguments(__doc__, "runs/clip_holdout", ("val",))
    parser.add_argument("--match", default="0016E5_00*", help="The held-out clip: a glob on file names.")
    parser.add_argument("--budgets-from", type=Path, default=Path("runs/real_data/val"),
                        help="A real_data.py fold whose baselines set the BitOPs budgets.")
    parser.add_argument("--objective", default="loss", choices=("loss", "miou"), help="Search's objective.")
    args = parser.parse_args()
    data = {"dataset": "camvid", "data_root": str(args.data.resolve())}
    hold = {"holdout_match": args.match}
    reference, supernet = args.out / "reference", args.out / "supernet"
    search = args.out / ("search" if args.objective == "loss" else f"search-{args.objective}")
    started = time.perf_counter()
    if not (reference / "supernet.pt").exists():
        train(load_train_config(None, {"model": R.MODEL, "out": str(reference), **data, **hold,
                                       **R.scaled(R.REFERENCE, args.scale)}), overwrite=True)
    if not (supernet / "supernet.pt").exists():
        train(load_train_config(None, {"model": R.MODEL, "out": str(supernet), "checkpoint": str(reference), **data,
                                       **hold, **R.scaled(R.SUPERNET, args.scale)}), overwrite=True)
    peers = json.loads((args.budgets_from / "baselines" / "baselines.json").read_text())["results"]
    fp32 = peers[0]["bitops"]
    budgets = sorted({r["bitops"] for r in peers[1:]} | {int(f * fp32) for f in R.LADDER})
    if not (search / "pareto.json").exists():
        run_search(supernet, "cpu", True, False, [f"{b:.0f}" for b in budgets], search, dataset="camvid",
                   data_root=args.data.resolve(), val_limit=R.SEARCH_IMAGES, config=replace(R.SEARCH, objective=args.objective), float_macs="exclude",
                   split="holdout", overwrite=True)
    model, _, spec = load_supernet(supernet)
    space, largest = spec.space, spec.space.max_subnet()
    val = ValidationSet(search_images(supernet, "camvid", args.data.resolve(), "val", "semantic")[0])
    subnets = {"qsamc FP32 grid": space.uniform_bits(largest, 32, 32),
               **{f"qsamc W{w}A{a}": space.uniform_bits(largest, w, a) for w, a in R.UNIFORM}}
    for budget, entry in zip(budgets, json.loads((search / "pareto.json").read_text())["best"]):
        subnets[f"qsamc search <= {100 * budget / fp32:.2f}% BitOPs"] = load_subnet(search / entry["subnet_file"])
    reference_miou = json.loads((reference / "validation.json").read_text())["max_subnet"]["miou"]
    print(f"\nsearch split: {args.match}, objective {args.objective}; FP32 reference on val: {100 * reference_miou:.2f} mIoU\n")
    print("| model | resolution | depths | % of FP32 BitOPs | val mIoU |")
    print("|---|---:|---|---:|---:|")
    for label, subnet in subnets.items():
        miou = evaluate_subnet(model, subnet, val).miou
        print(f"| {label} | {subnet.resolution} | {subnet.depths} | {100 * R.bitops_exclude(space, subnet) / fp32:.2f}% "
              f"| {100 * miou:.2f} |", flush=True)
    print(f"\ndone in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
