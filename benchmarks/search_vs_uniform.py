"""What search could see of the uniform subnets it is judged against: per budget, its pick and each uniform
subnet of `benchmarks/real_data.py`'s table under that budget, on the search split and on the reported split.

Reads a finished real_data.py run (each fold's search/pareto.json and the run's results.json); evaluates
nothing. For each drive fold and budget: search's pick and every uniform row that fits (W8A8, W4A8, W4A4 at
the largest architecture) with their search-split fidelity (KL from the FP32 reference's predictions, what
search minimises) and mIoU, and their reported-split mIoU; then, over the folds, which uniform row each rule
would have kept (the best by search-split fidelity, by search-split mIoU) and which one the reported split
ranks first. A uniform row search never evaluated under a budget (it did not fit, or was not a seed) shows
"-".

    python benchmarks/search_vs_uniform.py --root runs/real_data
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from qsamc.supernet.space import Subnet
from qsamc.training.runs import read_spec

UNIFORM = re.compile(r"qsamc (W\d+A\d+)")
SEARCHED = re.compile(r"qsamc search <= ([\d.]+)% BitOPs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="The --out folder of benchmarks/real_data.py.")
    args = parser.parse_args()
    results = json.loads((args.root / "results.json").read_text())
    summary: dict[str, list[tuple[str, str, str]]] = {}
    for fold in results["folds"]:
        if fold["fold"] == "val":
            continue
        name = fold["fold"]
        space = read_spec(args.root / name / "supernet" / "supernet.json").space
        pareto = json.loads((args.root / name / "search" / "pareto.json").read_text())
        searched = {space.canonical(Subnet.from_json(c["subnet"])): c for c in pareto["candidates"]}
        uniform = {UNIFORM.fullmatch(r["label"])[1]: r for r in fold["rows"] if UNIFORM.fullmatch(r["label"])}
        print(f"\n{name} (search split: {pareto['scored_on']}; mIoU in points)\n")
        print("| budget | subnet | BitOPs % | search fidelity | search mIoU | reported mIoU |")
        print("|---|---|---:|---:|---:|---:|")
        for row in fold["rows"]:
            match = SEARCHED.fullmatch(row["label"])
            if not match or row.get("budget") is None:
                continue
            pick = searched.get(space.canonical(Subnet.from_json(row["subnet"])))
            entries = [("search's pick", row, pick)]
            for bits, u in uniform.items():
                if u["bitops"] <= row["budget"]:
                    entries.append((bits, u, searched.get(space.canonical(Subnet.from_json(u["subnet"])))))
            for label, r, c in entries:
                fidelity, miou = ("-", "-") if c is None else (f"{c['fidelity']:.4f}", f"{100 * c['miou']:.2f}")
                print(f"| {match[1]}% | {label} | {100 * r['bitops'] / fold['fp32_bitops']:.2f} | {fidelity} | "
                      f"{miou} | {100 * r['miou']:.2f} |")
            seen = [(bits, r, c) for bits, r, c in entries[1:] if c is not None]
            if seen:
                by_fidelity = min(seen, key=lambda e: e[2]["fidelity"])[0]
                by_miou = max(seen, key=lambda e: e[2]["miou"])[0]
                best = max(entries[1:], key=lambda e: e[1]["miou"])[0]
                summary.setdefault(f"{match[1]}%", []).append((by_fidelity, by_miou, best))
    print("\nWhich uniform row each rule keeps, fold by fold (search-split fidelity / search-split mIoU / "
          "reported split):")
    for budget, picks in summary.items():
        print(f"  {budget:>6s}: " + "; ".join(" / ".join(p) for p in picks))


if __name__ == "__main__":
    sys.exit(main())
