"""How well search's objective ranks subnets: Kendall tau between the objective on the search images and the
mIoU on images nobody trained, tuned or searched on.

Takes a trained supernet run that holds a drive out (`qsamc train --holdout-match '<drive>_*'`, as the
folds of benchmarks/real_data.py and benchmarks/recipe_study.py do), draws a fixed, seeded set of subnets
from its space (plus the uniform W8A8 / W4A8 / W4A4 / W2A2 at the largest architecture), and scores each:

- the objective, as `qsamc search` computes it, on the first K images of the search split (`val`: in a
  drive fold, images neither trained on nor reported), for K in --images and each objective (validation
  loss, the paper's proxy; mIoU; fidelity, the per-pixel KL from the FP32 reference's predictions);
- the truth: mIoU on every image of the held-out drive (`--truth holdout`), or of another split nobody
  trained or searched on (`--truth val --search-split holdout` for real_data.py's fold val).

For each (objective, K): Kendall tau (tau-b) between the objective (loss and fidelity negated: higher is better) and the
truth over the subnets, with a 95% bootstrap interval over subnets. Writes proxy_study.json and
proxy_study.png under --out.

    python benchmarks/proxy_study.py --run runs/recipe_study/0006R0/kl-feat [--subnets 24] [--images 8,16,32,64]
    python benchmarks/proxy_study.py --run runs/real_data/val/supernet --truth val --search-split holdout
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau

from qsamc.fileio import atomic_write_json
from qsamc.pipeline import fidelity_reference
from qsamc.progress import progress_bar
from qsamc.task.evaluate import ValidationSet, evaluate_subnet
from qsamc.training.runs import load_supernet
from qsamc.training.splits import run_config, search_images

UNIFORM = ((8, 8), (4, 8), (4, 4), (2, 2))
OBJECTIVES = ("loss", "miou", "fidelity")
SIGN = {"loss": -1.0, "miou": 1.0, "fidelity": -1.0}  # higher is better after the sign
BOOTSTRAP = 2000


def bootstrap_tau(x: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    taus = []
    for _ in range(BOOTSTRAP):
        pick = rng.integers(0, len(x), len(x))
        if len(set(pick)) > 2:
            taus.append(kendalltau(x[pick], y[pick]).statistic)
    low, high = np.nanpercentile(taus, [2.5, 97.5])
    return float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="A supernet run that holds a drive out.")
    parser.add_argument("--out", type=Path, default=None, help="Output folder (default: the run's proxy_study/).")
    parser.add_argument("--subnets", type=int, default=24, help="Random subnets besides the uniform ones.")
    parser.add_argument("--images", default="8,16,32,64", help="Search image counts K.")
    parser.add_argument("--search-split", default="val", help="The split search scores on (val or holdout).")
    parser.add_argument("--truth", default="holdout", help="The split scored as the truth (holdout: the held-out drive).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = run_config(args.run)
    if config is None or (args.truth == "holdout" and not config.holdout_match):
        sys.exit(f"error: {args.run} is not a supernet run that holds a drive out (--holdout-match); "
                 "score another split as the truth with --truth")
    counts = sorted(int(k) for k in args.images.split(","))
    out = args.out or args.run / "proxy_study"
    model, _, spec = load_supernet(args.run)
    space = spec.space
    rng = random.Random(args.seed)
    largest = space.max_subnet()
    subnets = [space.uniform_bits(largest, w, a) for w, a in UNIFORM] + [space.sample(rng) for _ in range(args.subnets)]
    data_root = Path(config.data_root) if config.data_root else None
    truth_images, _ = search_images(args.run, config.dataset, data_root, args.truth, config.task)
    search, _ = search_images(args.run, config.dataset, data_root, args.search_split, config.task)
    truth_set = ValidationSet(truth_images)
    search_sets = {k: ValidationSet(search, k) for k in counts}
    started = time.perf_counter()
    references = {k: fidelity_reference(args.run, model, spec, images) for k, images in search_sets.items()}
    print(f"fidelity against {references[counts[0]][1]}")
    truth, proxies = [], {(objective, k): [] for objective in OBJECTIVES for k in counts}
    with progress_bar(len(subnets), "scoring subnets", fields={}) as bar:
        for subnet in subnets:
            truth.append(evaluate_subnet(model, subnet, truth_set).miou)
            for k, images in search_sets.items():
                evaluation = evaluate_subnet(model, subnet, images, reference=references[k][0])
                for objective in OBJECTIVES:
                    proxies[(objective, k)].append(SIGN[objective] * getattr(evaluation, objective))
            bar.update(advance=1)
    truth_array = np.array(truth)
    rows = []
    truth_name = (f"drive {config.holdout_match.rstrip('_*')} (held out of training)" if args.truth == "holdout"
                  else args.truth)
    print(f"\n{len(subnets)} subnets of {args.run}; truth: mIoU on {len(truth_set.samples)} images of {truth_name}; "
          f"search split: {args.search_split}")
    print("\n| objective | search images | Kendall tau [95% CI] |")
    print("|---|---:|---:|")
    for (objective, k), values in proxies.items():
        x = np.array(values)
        tau = float(kendalltau(x, truth_array).statistic)
        low, high = bootstrap_tau(x, truth_array)
        rows.append({"objective": objective, "images": k, "tau": tau, "low": low, "high": high})
        print(f"| {objective} | {k} | {tau:.3f} [{low:.3f}, {high:.3f}] |")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "proxy_study.json", {
        "run": str(args.run), "truth": args.truth, "truth_images": len(truth_set.samples),
        "search_split": args.search_split, "fidelity_against": references[counts[0]][1],
        "subnets": [s.to_json() for s in subnets], "truth_miou": truth, "rows": rows,
        "proxies": {f"{o}@{k}": v for (o, k), v in proxies.items()}})
    plot(rows, counts, out / "proxy_study.png")
    print(f"\nwrote {out / 'proxy_study.json'} and {out / 'proxy_study.png'} in {time.perf_counter() - started:.0f} s")


def plot(rows: list[dict], counts: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for objective, colour in zip(OBJECTIVES, ("C0", "C1", "C2")):
        mine = [r for r in rows if r["objective"] == objective]
        ax.errorbar([r["images"] for r in mine], [r["tau"] for r in mine], capsize=3, color=colour, marker="o",
                    yerr=[[r["tau"] - r["low"] for r in mine], [r["high"] - r["tau"] for r in mine]], label=objective)
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(k) for k in counts])
    ax.set_xlabel("search images")
    ax.set_ylabel("Kendall tau vs held-out mIoU")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
