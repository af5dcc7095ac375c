"""Why a searched subnet loses on held-out data: its parts, each scored on the reported images and on the
images search scored on.

For one fold of `benchmarks/real_data.py` (its `supernet` and `search` folders), the searched subnet under
one budget is taken apart: W8A8 at the largest resolution with every block, W8A8 at the searched subnet's
resolution with every block and with its depths, the searched bits with every block, and the searched
subnet itself. Each is scored in PyTorch on the fold's reported images and on its search split (fold val:
val and the held-out tenth of train). A part that costs points on the first and none on the second is one
the search split cannot see.

    python benchmarks/search_split_probe.py [--fold runs/real_data/val] [--budget best-10.65G.json]
                                            [--report val] [--search holdout]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from qsamc.supernet.space import load_subnet
from qsamc.task.evaluate import ValidationSet, evaluate_subnet
from qsamc.training.runs import load_supernet
from qsamc.training.splits import search_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fold", type=Path, default=Path("runs/real_data/val"))
    parser.add_argument("--budget", default="best-10.65G.json", help="The search's subnet file to take apart.")
    parser.add_argument("--report", default="val", help="The split the fold reports on.")
    parser.add_argument("--search", default="holdout", help="The split search scored on.")
    args = parser.parse_args()
    run = args.fold / "supernet"
    config = json.loads((run / "config.json").read_text())
    model, _, spec = load_supernet(run)
    space = spec.space
    splits = {name: ValidationSet(search_images(run, config["dataset"], Path(config["data_root"]), name, "semantic")[0])
              for name in (args.report, args.search)}
    searched = load_subnet(args.fold / "search" / args.budget)
    w8a8 = space.uniform_bits(space.max_subnet(), 8, 8)
    full = space.max_subnet().depths
    parts = {
        f"W8A8, {w8a8.resolution} px, every block": w8a8,
        f"W8A8, {searched.resolution} px, every block": replace(w8a8, resolution=searched.resolution),
        f"W8A8, {searched.resolution} px, depths {searched.depths}": replace(w8a8, resolution=searched.resolution,
                                                                           depths=searched.depths),
        f"the searched bits, {searched.resolution} px, every block": replace(searched, depths=full),
        "the searched subnet": searched,
    }
    print(f"| subnet | {args.report} mIoU | {args.search} mIoU | {args.search} loss |")
    print("|---|---:|---:|---:|")
    for label, subnet in parts.items():
        report, scored = (evaluate_subnet(model, subnet, splits[name]) for name in (args.report, args.search))
        print(f"| {label} | {100 * report.miou:.2f} | {100 * scored.miou:.2f} | {scored.loss:.3f} |", flush=True)


if __name__ == "__main__":
    main()
